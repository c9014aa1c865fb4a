"""The pure plan: create/update/drift, prune only what we own, hold mass deletions."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from hyperfleet.reconcilers.gitops.plan import Reason, confirms, is_subset, make_plan, with_provenance
from hyperfleet.reconcilers.gitops.render import render_yaml
from hyperfleet.reconcilers.gitops.types import (
    ADOPT_ANNOTATION,
    COMMIT_ANNOTATION,
    OWNER_LABEL,
    Manifest,
    ObjectRef,
    owner_value,
)

OWNER = "ns.fleet"
C1, C2 = "1" * 40, "2" * 40


def vm(name: str, cpus: int = 1) -> str:
    return (f"apiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n"
            f"spec: {{cpus: {cpus}, memory: 1Gi, boot: {{kernel: /k}}}}\n")


def desired(*docs: str) -> list[Manifest]:
    out = render_yaml({f"f{i}.yaml": d.encode() for i, d in enumerate(docs)}, "ns")
    assert out.ok, out.errors
    return out.manifests


def live_of(ms: list[Manifest], commit: str = C1, owner: str = OWNER) -> dict[ObjectRef, dict[str, Any]]:
    """What the cluster holds after applying ``ms`` (plus server-side additions)."""
    out = {}
    for m in ms:
        body = with_provenance(m, owner=owner, source="ns/fleet", commit=commit)
        body["metadata"]["uid"] = f"uid-{m.ref.name}"
        body["spec"]["serial"] = "Null"  # a CRD default: not drift
        body["status"] = {"phase": "Running"}
        out[m.ref] = body
    return out


def ref(name: str) -> ObjectRef:
    return ObjectRef("VirtualMachine", "ns", name)


def plan(ms: list[Manifest], inventory: list[ObjectRef], live: dict[ObjectRef, dict[str, Any]],
         **kw: Any) -> Any:
    return make_plan(ms, inventory, live, owner=OWNER, source="ns/fleet", commit=kw.pop("commit", C2),
                     **kw)


def test_first_apply_creates_everything() -> None:
    ms = desired(vm("a"), vm("b"))
    p = plan(ms, [], {})
    assert [a.reason for a in p.applies] == [Reason.CREATE, Reason.CREATE]
    body = p.applies[0].body
    assert body["metadata"]["labels"][OWNER_LABEL] == OWNER
    assert body["metadata"]["annotations"][COMMIT_ANNOTATION] == C2
    assert p.inventory == [ref("a"), ref("b")] and not p.prunes and p.hold is None


def test_unchanged_objects_are_not_touched_and_keep_their_commit() -> None:
    ms = desired(vm("a"), vm("b"))
    live = live_of(ms, commit=C1)
    p = plan(ms, [ref("a"), ref("b")], live)
    assert not p.applies and len(p.unchanged) == 2 and not p.changes


def test_git_edit_is_an_update_with_the_new_commit() -> None:
    live = live_of(desired(vm("a"), vm("b")))
    p = plan(desired(vm("a", cpus=2), vm("b")), [ref("a"), ref("b")], live)
    (a,) = p.applies
    assert a.reason == Reason.UPDATE and a.manifest.ref == ref("a")
    assert a.body["metadata"]["annotations"][COMMIT_ANNOTATION] == C2


def test_hand_edit_is_drift_and_keeps_provenance() -> None:
    ms = desired(vm("a"))
    live = live_of(ms, commit=C1)
    live[ref("a")]["spec"]["cpus"] = 4
    (a,) = plan(ms, [ref("a")], live).applies
    assert a.reason == Reason.DRIFT
    assert a.body["metadata"]["annotations"][COMMIT_ANNOTATION] == C1
    live = live_of(ms)
    del live[ref("a")]["metadata"]["labels"][OWNER_LABEL]
    assert plan(ms, [ref("a")], live).applies[0].reason == Reason.DRIFT  # label removed by hand


def test_prune_only_inventory_objects_carrying_our_label() -> None:
    old = desired(vm("a"), vm("b"), vm("c"))
    live = live_of(old)
    live[ref("x")] = copy.deepcopy(live[ref("c")])  # ours in the cluster, but not in inventory
    live[ref("x")]["metadata"]["name"] = "x"
    live[ref("c")]["metadata"]["labels"][OWNER_LABEL] = "ns.other"  # taken over since
    p = plan(desired(vm("a")), [ref("a"), ref("b"), ref("c"), ref("gone")], live,
             max_deletion_ratio=1.0)
    assert p.prunes == [ref("b")]
    assert set(p.forgotten) == {ref("c"), ref("gone")}
    assert ref("x") not in p.prunes and p.inventory == [ref("a")]


def test_prune_disabled_forgets_instead() -> None:
    live = live_of(desired(vm("a"), vm("b")))
    p = plan(desired(vm("a")), [ref("a"), ref("b")], live, prune=False)
    assert not p.prunes and p.forgotten == [ref("b")] and p.hold is None


def test_conflict_with_another_gitsource() -> None:
    ms = desired(vm("a"))
    live = live_of(ms, owner="ns.other")
    p = plan(ms, [], live)
    assert not p.applies and len(p.conflicts) == 1
    assert "managed by GitSource ns/fleet" in str(p.conflicts[0])  # source annotation wins


@pytest.mark.parametrize(("total", "delete", "ratio", "held"), [
    (4, 2, 0.5, False),  # exactly the ratio is allowed
    (4, 3, 0.5, True),
    (3, 1, 0.5, False),
    (1, 1, 0.5, True),  # deleting the whole (tiny) fleet is held
    (10, 1, 0.0, True),  # 0: every deletion needs confirmation
    (2, 2, 1.0, False),  # 1: never held
])
def test_deletion_ratio(total: int, delete: int, ratio: float, held: bool) -> None:
    names = [f"vm-{i}" for i in range(total)]
    live = live_of(desired(*[vm(n) for n in names]))
    keep = desired(*[vm(n) for n in names[delete:]]) if delete < total else []
    p = plan(keep, [ref(n) for n in names], live, max_deletion_ratio=ratio)
    assert (p.hold is not None) is held
    if p.hold:
        assert len(p.hold.deletions) == delete and p.hold.total == total
        msg = p.hold.message("fleet", "ns")
        assert f"hyperfleet.dev/confirm-deletion={C2}" in msg and "Nothing was applied" in msg


def test_confirmation_releases_the_hold_for_that_commit_only() -> None:
    names = ["a", "b", "c"]
    live = live_of(desired(*[vm(n) for n in names]))
    inv = [ref(n) for n in names]
    assert plan([], inv, live, confirmed=C2).hold is None
    assert plan([], inv, live, confirmed=C2[:7]).hold is None
    assert plan([], inv, live, confirmed=C1).hold is not None
    assert plan([], inv, live, confirmed=C2[:5]).hold is not None  # too short to be sure


def test_confirms() -> None:
    assert confirms("ABCDEF1", "abcdef1234") and not confirms("", "abc") and not confirms(None, "a")


def test_prune_order_is_reverse_apply_order() -> None:
    node = ("apiVersion: hyperfleet.dev/v1alpha1\nkind: WorkerNode\nmetadata: {name: n1}\n"
            "spec: {pool: x}\n")
    ms = desired(node, vm("a"))
    live = live_of(ms)
    p = plan([], [m.ref for m in ms], live, max_deletion_ratio=1.0)
    assert [r.kind for r in p.prunes] == ["VirtualMachine", "WorkerNode"]


def test_is_subset() -> None:
    assert is_subset({"a": 1, "b": {"c": [1, {"d": 2}]}}, {"a": 1, "b": {"c": [1, {"d": 2, "e": 3}]}, "z": 0})
    assert not is_subset({"a": [1, 2]}, {"a": [1, 2, 3]})
    assert not is_subset({"a": {"b": 1}}, {"a": {"b": 2}})
    assert not is_subset({"a": 1}, {})
    assert is_subset({"a": None}, {})
    assert not is_subset({"a": None}, {"a": 1})
    assert not is_subset({"a": True}, {"a": 1})
    assert is_subset({"a": 1}, {"a": 1.0})


def test_owner_value_fits_a_label() -> None:
    assert owner_value("ns", "fleet") == "ns.fleet"
    long = owner_value("n" * 63, "f" * 200)
    assert len(long) <= 63 and long[-1].isalnum()
    assert long != owner_value("n" * 63, "f" * 199)


NODE = ("apiVersion: hyperfleet.dev/v1alpha1\nkind: WorkerNode\nmetadata: {name: worker-1}\n"
        "spec: {pool: general}\n")


def hand_made(ms: list[Manifest],
              annotations: dict[str, str] | None = None) -> dict[ObjectRef, dict[str, Any]]:
    """Objects with the same names made by kubectl or registered by an agent: no label."""
    out = {}
    for m in ms:
        body = copy.deepcopy(m.body)
        body["metadata"]["uid"] = f"uid-{m.ref.name}"
        if annotations:
            body["metadata"]["annotations"] = dict(annotations)
        out[m.ref] = body
    return out


def test_objects_made_by_hand_or_by_an_agent_are_conflicts_not_creates() -> None:
    ms = desired(NODE, vm("db"), vm("new"))
    live = hand_made(ms[:2])
    p = plan(ms, [], live)
    assert [a.manifest.ref.name for a in p.applies] == ["new"]
    assert {c.manifest.ref.name for c in p.conflicts} == {"worker-1", "db"}
    msgs = sorted(str(c) for c in p.conflicts)
    assert msgs[0].startswith("VirtualMachine/ns/db (f1.yaml:1 (document 0)) already exists and was "
                              "not created by a GitSource; it is left alone")
    assert "kubectl annotate virtualmachines -n ns db hyperfleet.dev/adopt=true" in msgs[0]
    assert "kubectl annotate workernodes worker-1 hyperfleet.dev/adopt=true" in msgs[1]
    assert p.inventory == [ref("new")]  # never ours, so no later commit can prune them


def test_adopt_annotation_on_the_live_object_hands_it_over() -> None:
    ms = desired(vm("db"))
    (a,) = plan(ms, [], hand_made(ms, {ADOPT_ANNOTATION: "true"})).applies
    assert a.reason == Reason.ADOPT and a.body["metadata"]["labels"][OWNER_LABEL] == OWNER
    (a,) = plan(ms, [], hand_made(ms, {ADOPT_ANNOTATION: "ns/fleet"})).applies
    assert a.reason == Reason.ADOPT
    assert plan(ms, [], hand_made(ms, {ADOPT_ANNOTATION: "false"})).conflicts
    assert plan(ms, [], hand_made(ms, {ADOPT_ANNOTATION: "ns/other"})).conflicts


def test_taking_an_object_from_another_gitsource_needs_this_gitsources_name() -> None:
    ms = desired(vm("db"))
    theirs = live_of(ms, owner="ns.other")
    theirs[ref("db")]["metadata"]["annotations"][ADOPT_ANNOTATION] = "true"
    (c,) = plan(ms, [], theirs).conflicts  # "true" only frees objects nobody owns
    assert "hyperfleet.dev/adopt=ns/fleet" in str(c)
    theirs[ref("db")]["metadata"]["annotations"][ADOPT_ANNOTATION] = "ns/fleet"
    (a,) = plan(ms, [], theirs).applies
    assert a.reason == Reason.ADOPT
