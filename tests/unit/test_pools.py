"""The VirtualMachinePool planner: ordinals, scaling, rolling updates, OnDelete, deletion."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from hyperfleet.reconcilers.models.pool import (
    POOL_LABEL,
    REVISION_LABEL,
    RollingUpdate,
    VirtualMachinePoolSpec,
    resolve_int_or_percent,
)
from hyperfleet.reconcilers.pools import (
    FINALIZER,
    Create,
    Delete,
    is_member,
    member_body,
    ordinal_of,
    plan_pool,
    revision_of,
)

NOW = datetime(2025, 1, 1, tzinfo=UTC)
UID = "uid-web"


def pool(replicas: int = 3, cpus: int = 1, strategy: dict[str, Any] | None = None,
         finalizers: tuple[str, ...] = (FINALIZER,), **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachinePool",
        "metadata": {"name": "web", "namespace": "ns", "uid": UID, "generation": 4,
                     "finalizers": list(finalizers)},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web", "tier": "front"}},
                         "spec": {"cpus": cpus, "memory": "256Mi",
                                  "boot": {"kernel": "/k"}, **spec}},
            **({"strategy": strategy} if strategy else {}),
        },
    }


def rev(p: dict[str, Any]) -> str:
    return revision_of(p["spec"]["template"])


def vm(p: dict[str, Any], ordinal: int, phase: str = "Running", ready: bool = True,
       revision: str | None = None, terminating: bool = False) -> dict[str, Any]:
    body = member_body(p, f"web-{ordinal}", revision or rev(p))
    body["status"] = {"phase": phase,
                      "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if terminating:
        body["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    return body


def creates(plan: Any) -> list[str]:
    return [a.name for a in plan.actions if isinstance(a, Create)]


def deletes(plan: Any) -> list[str]:
    return [a.name for a in plan.actions if isinstance(a, Delete)]


def conds(plan: Any) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in plan.status["conditions"]}


# ------------------------------------------------------------------ scaling and ordinals

def test_new_pool_creates_ordinals_from_zero_and_asks_for_its_finalizer() -> None:
    p = pool(3, finalizers=())
    plan = plan_pool(p, [], NOW)
    assert creates(plan) == ["web-0", "web-1", "web-2"]
    assert plan.add_finalizer
    body = next(a.body for a in plan.actions if isinstance(a, Create))
    assert body["metadata"]["labels"] == {"app": "web", "tier": "front", POOL_LABEL: "web",
                                          REVISION_LABEL: rev(p)}
    assert body["metadata"]["ownerReferences"][0] | {} == {
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachinePool", "name": "web",
        "uid": UID, "controller": True, "blockOwnerDeletion": True}
    assert body["spec"] == p["spec"]["template"]["spec"]
    assert body["metadata"]["namespace"] == "ns"
    assert plan.status is not None and plan.status["replicas"] == 0
    assert conds(plan)["Progressing"]["reason"] == "ScalingUp"


def test_scale_up_fills_the_lowest_free_ordinals() -> None:
    p = pool(4)
    plan = plan_pool(p, [vm(p, 0), vm(p, 2)], NOW)
    assert creates(plan) == ["web-1", "web-3"]
    assert not plan.add_finalizer and deletes(plan) == []


def test_scale_down_removes_the_highest_ordinals() -> None:
    p = pool(2)
    plan = plan_pool(p, [vm(p, i) for i in range(5)], NOW)
    assert deletes(plan) == ["web-4", "web-3", "web-2"]
    assert creates(plan) == []
    assert conds(plan)["Progressing"]["reason"] == "ScalingDown"
    assert all(a.why == "scale-down" for a in plan.actions if isinstance(a, Delete))


def test_scale_to_zero_deletes_everything() -> None:
    p = pool(0)
    plan = plan_pool(p, [vm(p, 0), vm(p, 1)], NOW)
    assert deletes(plan) == ["web-1", "web-0"]
    assert conds(plan)["Available"]["status"] == "True"


def test_a_terminating_member_keeps_its_name_and_is_replaced_under_it() -> None:
    p = pool(3)
    members = [vm(p, 0), vm(p, 1, terminating=True), vm(p, 2)]
    plan = plan_pool(p, members, NOW)
    assert plan.actions == []  # web-1 still holds its name and its capacity
    assert conds(plan)["Progressing"]["reason"] == "ScalingUp"
    assert "web-1 to be deleted" in conds(plan)["Progressing"]["message"]
    plan = plan_pool(p, [vm(p, 0), vm(p, 2)], NOW)
    assert creates(plan) == ["web-1"]


def test_names_held_by_other_vms_are_skipped() -> None:
    p = pool(2)
    plan = plan_pool(p, [], NOW, occupied=["web-0", "web-x", "other-1"])
    assert creates(plan) == ["web-1", "web-2"]


def test_only_ordinal_names_are_members() -> None:
    assert ordinal_of("web", "web-3") == 3
    assert ordinal_of("web", "web-03") is None
    assert ordinal_of("web", "web-a") is None
    assert ordinal_of("web", "webx-1") is None
    assert ordinal_of("a.b", "axb-1") is None  # the name is matched literally
    p = pool(1)
    stray = member_body(p, "web-extra", rev(p))
    plan = plan_pool(p, [stray], NOW)
    assert creates(plan) == ["web-0"]


def test_membership_is_by_owner_uid() -> None:
    p = pool(1)
    body = vm(p, 0)
    assert is_member(p, body)
    other = copy.deepcopy(p)
    other["metadata"]["uid"] = "uid-of-a-new-pool-of-the-same-name"
    assert not is_member(other, body)
    body["metadata"]["ownerReferences"][0]["controller"] = False
    assert not is_member(p, body)


# ------------------------------------------------------------------ status

def test_status_counts_and_conditions_when_complete() -> None:
    p = pool(3)
    plan = plan_pool(p, [vm(p, i) for i in range(3)], NOW)
    assert plan.actions == []
    st = plan.status
    assert st is not None
    assert (st["replicas"], st["readyReplicas"], st["availableReplicas"],
            st["updatedReplicas"]) == (3, 3, 3, 3)
    assert st["currentRevision"] == st["updateRevision"] == rev(p)
    assert st["selector"] == "app=web"
    assert st["observedGeneration"] == 4
    c = conds(plan)
    assert c["Available"]["status"] == "True"
    assert c["Progressing"]["reason"] == "Complete"
    assert c["ReplicaFailure"]["status"] == "False"
    assert c["Available"]["lastTransitionTime"] == "2025-01-01T00:00:00Z"


def test_transition_time_is_kept_while_a_condition_holds() -> None:
    p = pool(1, strategy={"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}})
    first = plan_pool(p, [vm(p, 0)], NOW)
    p["status"] = first.status
    later = plan_pool(p, [vm(p, 0)], datetime(2025, 1, 2, tzinfo=UTC))
    assert conds(later)["Available"]["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    down = plan_pool(p, [vm(p, 0, phase="Starting", ready=False)], datetime(2025, 1, 3, tzinfo=UTC))
    assert conds(down)["Available"]["status"] == "False"
    assert conds(down)["Available"]["lastTransitionTime"] == "2025-01-03T00:00:00Z"


def test_failed_members_are_named_in_replica_failure() -> None:
    p = pool(2)
    bad = vm(p, 1, phase="Failed", ready=False)
    bad["status"]["message"] = "vm.boot: kernel not found"
    plan = plan_pool(p, [vm(p, 0), bad], NOW)
    c = conds(plan)["ReplicaFailure"]
    assert c["status"] == "True" and c["reason"] == "MemberFailed"
    assert "web-1: vm.boot: kernel not found" in c["message"]
    assert conds(plan)["Available"]["status"] == "True"  # 1 of 2, maxUnavailable 1


def test_available_needs_running_and_ready() -> None:
    p = pool(2, strategy={"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}})
    plan = plan_pool(p, [vm(p, 0), vm(p, 1, ready=False)], NOW)
    assert plan.status is not None
    assert plan.status["availableReplicas"] == 1 and plan.status["readyReplicas"] == 1
    c = conds(plan)["Available"]
    assert c["status"] == "False" and c["reason"] == "MinimumMembersUnavailable"
    assert c["message"] == "1 of 2 members available (at least 2 required)"


def test_sleeping_members_count_as_available_only_when_asked() -> None:
    p = pool(2)
    members = [vm(p, 0), vm(p, 1, phase="Sleeping")]
    plan = plan_pool(p, members, NOW)
    assert plan.status is not None and plan.status["availableReplicas"] == 1
    p2 = pool(2, strategy={"sleepingCountsAsAvailable": True})
    members2 = [vm(p2, 0), vm(p2, 1, phase="Sleeping")]
    plan2 = plan_pool(p2, members2, NOW)
    assert plan2.status is not None and plan2.status["availableReplicas"] == 2
    assert plan2.status["readyReplicas"] == 1


# ------------------------------------------------------------------ template problems

def test_a_shared_writable_disk_is_refused_with_the_field_and_the_fix() -> None:
    p = pool(3, disks=[{"name": "data", "path": "/var/lib/hyperfleet/data.raw"}])
    plan = plan_pool(p, [], NOW)
    assert plan.actions == []
    c = conds(plan)
    assert c["ReplicaFailure"]["status"] == "True"
    assert c["ReplicaFailure"]["reason"] == "InvalidTemplate"
    msg = c["ReplicaFailure"]["message"]
    assert "spec.template.spec.disks[0] (data, /var/lib/hyperfleet/data.raw) is writable" in msg
    assert "spec.template.spec.image" in msg and "readonly: true" in msg
    assert c["Progressing"]["status"] == "False"


@pytest.mark.parametrize("disk", [{"readonly": True}, {"shared": True}])
def test_read_only_or_shared_disks_are_allowed(disk: dict[str, Any]) -> None:
    p = pool(2, disks=[{"name": "data", "path": "/d.raw", **disk}])
    assert creates(plan_pool(p, [], NOW)) == ["web-0", "web-1"]


def test_a_fixed_tap_or_mac_is_refused() -> None:
    p = pool(2, interfaces=[{"name": "net0", "tap": "tap0", "mac": "02:00:00:00:00:01"}])
    plan = plan_pool(p, [], NOW)
    assert plan.actions == []
    msg = conds(plan)["ReplicaFailure"]["message"]
    assert "spec.template.spec.interfaces[0] (net0) sets tap, mac" in msg
    assert "remove them" in msg
    assert creates(plan_pool(pool(1, interfaces=[{"name": "net0"}]), [], NOW)) == ["web-0"]


def test_an_invalid_spec_is_reported_not_raised() -> None:
    p = pool(2)
    p["spec"]["strategy"] = {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 0}}
    plan = plan_pool(p, [], NOW)
    assert plan.actions == []
    c = conds(plan)["ReplicaFailure"]
    assert c["reason"] == "InvalidSpec" and "cannot both be 0" in c["message"]


# ------------------------------------------------------------------ rolling updates

def test_template_change_replaces_one_at_a_time_by_default() -> None:
    old = pool(3)
    p = pool(3, cpus=2)
    assert rev(p) != rev(old)
    members = [vm(p, i, revision=rev(old)) for i in range(3)]
    plan = plan_pool(p, members, NOW)
    assert deletes(plan) == ["web-2"] and creates(plan) == []  # maxSurge 0: room first
    assert all(a.why == "rolling-update" for a in plan.actions if isinstance(a, Delete))
    assert plan.status is not None
    assert plan.status["currentRevision"] == rev(old)
    assert plan.status["updateRevision"] == rev(p)
    assert conds(plan)["Progressing"]["reason"] == "RollingUpdate"
    # web-2 is being deleted: nothing else may go (maxUnavailable 1) nor come (no room).
    members[2]["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:01Z"
    members[2]["status"]["phase"] = "Terminating"
    assert plan_pool(p, members, NOW).actions == []
    # Gone: recreated under the same name, from the new template.
    plan = plan_pool(p, members[:2], NOW)
    assert creates(plan) == ["web-2"] and deletes(plan) == []
    body = plan.actions[0].body  # type: ignore[union-attr]
    assert body["spec"]["cpus"] == 2 and body["metadata"]["labels"][REVISION_LABEL] == rev(p)


def test_unavailable_old_members_go_first_and_freely() -> None:
    old, p = pool(4), pool(4, cpus=2)
    members = [vm(p, 0, revision=rev(old)), vm(p, 1, revision=rev(old), phase="Failed",
                                                 ready=False),
               vm(p, 2, revision=rev(old), phase="Starting", ready=False),
               vm(p, 3, revision=rev(old))]
    # 2 available, maxUnavailable 1 -> min 3: no available one may go, the broken ones may.
    assert deletes(plan_pool(p, members, NOW)) == ["web-2", "web-1"]


def test_surge_creates_before_deleting() -> None:
    old = pool(3, strategy={"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}})
    p = pool(3, cpus=2, strategy={"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}})
    members = [vm(p, i, revision=rev(old)) for i in range(3)]
    plan = plan_pool(p, members, NOW)
    assert creates(plan) == ["web-3"] and deletes(plan) == []
    members.append(vm(p, 3, phase="Starting", ready=False))
    assert plan_pool(p, members, NOW).actions == []  # not available yet: nothing goes
    members[3] = vm(p, 3)
    assert deletes(plan_pool(p, members, NOW)) == ["web-2"]


def test_percentages_resolve_like_deployments() -> None:
    assert resolve_int_or_percent("25%", 10, round_up=True) == 3
    assert resolve_int_or_percent("25%", 10, round_up=False) == 2
    assert resolve_int_or_percent("100%", 7, round_up=False) == 7
    assert resolve_int_or_percent(2, 7, round_up=False) == 2
    # 10% of 3 rounds down to 0 unavailable and 0 surge: one may still be unavailable.
    old = pool(3, strategy={"rollingUpdate": {"maxUnavailable": "10%"}})
    p = pool(3, cpus=2, strategy={"rollingUpdate": {"maxUnavailable": "10%"}})
    assert deletes(plan_pool(p, [vm(p, i, revision=rev(old)) for i in range(3)], NOW)) == ["web-2"]


def _simulate(p: dict[str, Any], old_rev: str, n_old: int, steps: int = 400
              ) -> tuple[int, int, list[str]]:
    """Run the planner to completion against an idealised cluster where a created member
    becomes available on the next step and a deleted one is gone on the next step.
    Returns (max unavailable, max members at once, final member names)."""
    replicas = p["spec"]["replicas"]
    members = {f"web-{i}": vm(p, i, revision=old_rev) for i in range(n_old)}
    worst_unavailable = worst_total = 0
    for _ in range(steps):
        plan = plan_pool(p, list(members.values()), NOW)
        if not plan.actions and all(
                b["metadata"]["labels"][REVISION_LABEL] == rev(p) and b["status"]["phase"] == "Running"
                and not b["metadata"].get("deletionTimestamp") for b in members.values()) \
                and len(members) == replicas:
            return worst_unavailable, worst_total, sorted(members)
        for name, body in list(members.items()):  # the cluster moves on
            if body["metadata"].get("deletionTimestamp"):
                del members[name]
            elif body["status"]["phase"] == "Starting":
                body["status"] = vm(p, 0)["status"]
        for a in plan.actions:
            if isinstance(a, Delete):
                members[a.name]["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
            else:
                members[a.name] = {**a.body, "status": {"phase": "Starting", "conditions": []}}
        avail = sum(1 for b in members.values() if not b["metadata"].get("deletionTimestamp")
                    and b["status"]["phase"] == "Running")
        worst_unavailable = max(worst_unavailable, replicas - avail)
        worst_total = max(worst_total, len(members))
    raise AssertionError(f"did not converge: {sorted(members)}")


@pytest.mark.parametrize(("replicas", "unavailable", "surge"), [
    (5, 1, 0), (5, 2, 0), (5, 0, 1), (5, 1, 1), (10, "25%", "25%"), (1, 1, 0), (1, 0, 1),
    (7, "100%", 0), (4, 0, "100%"),
])
def test_rolls_converge_within_both_bounds(replicas: int, unavailable: int | str,
                                           surge: int | str) -> None:
    strategy = {"rollingUpdate": {"maxUnavailable": unavailable, "maxSurge": surge}}
    old = pool(replicas, strategy=strategy)
    p = pool(replicas, cpus=2, strategy=strategy)
    max_u = resolve_int_or_percent(unavailable, replicas, round_up=False)
    max_s = resolve_int_or_percent(surge, replicas, round_up=True)
    worst_u, worst_total, names = _simulate(p, rev(old), replicas)
    assert worst_u <= max_u
    assert worst_total <= replicas + max_s
    assert len(names) == replicas


def test_a_roll_and_a_scale_down_together() -> None:
    old = pool(6)
    p = pool(2, cpus=2)
    _, worst_total, names = _simulate(p, rev(old), 6)
    assert worst_total <= 6 and names == ["web-0", "web-1"]


def test_a_roll_and_a_scale_up_together() -> None:
    old = pool(2)
    p = pool(5, cpus=2)
    _, worst_total, names = _simulate(p, rev(old), 2)
    assert worst_total <= 5 and names == [f"web-{i}" for i in range(5)]


def test_surplus_of_the_new_revision_goes_highest_first_during_a_roll() -> None:
    old = pool(2)
    p = pool(2, cpus=2)
    members = [vm(p, 0, revision=rev(old)), vm(p, 1), vm(p, 2), vm(p, 3)]
    plan = plan_pool(p, members, NOW)
    assert deletes(plan) == ["web-3", "web-0"]
    assert {a.why for a in plan.actions if isinstance(a, Delete)} == {"scale-down",
                                                                       "rolling-update"}


# ------------------------------------------------------------------ OnDelete

def test_on_delete_leaves_old_members_and_says_so() -> None:
    old = pool(2, strategy={"type": "OnDelete"})
    p = pool(2, cpus=2, strategy={"type": "OnDelete"})
    members = [vm(p, 0, revision=rev(old)), vm(p, 1, revision=rev(old))]
    plan = plan_pool(p, members, NOW)
    assert plan.actions == []
    c = conds(plan)["Progressing"]
    assert c["status"] == "False" and c["reason"] == "WaitingForDeletion"
    assert "web-0, web-1 run an old template" in c["message"]
    assert plan.status is not None and plan.status["updatedReplicas"] == 0
    # The user deletes web-1: once gone it comes back from the new template.
    plan = plan_pool(p, members[:1], NOW)
    assert creates(plan) == ["web-1"]
    assert plan.actions[0].body["spec"]["cpus"] == 2  # type: ignore[union-attr]


def test_on_delete_scale_down_removes_highest_ordinals_of_any_revision() -> None:
    old = pool(3, strategy={"type": "OnDelete"})
    p = pool(1, cpus=2, strategy={"type": "OnDelete"})
    members = [vm(p, 0, revision=rev(old)), vm(p, 1), vm(p, 2, revision=rev(old))]
    assert deletes(plan_pool(p, members, NOW)) == ["web-2", "web-1"]


# ------------------------------------------------------------------ deletion

def test_deleting_the_pool_deletes_every_member_then_the_finalizer() -> None:
    p = pool(3)
    p["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    members = [vm(p, 0), vm(p, 1, terminating=True), vm(p, 2)]
    plan = plan_pool(p, members, NOW)
    assert deletes(plan) == ["web-0", "web-2"] and creates(plan) == []
    assert plan.remove_finalizer and plan.status is None
    assert plan_pool(p, [], NOW).remove_finalizer
    p["metadata"]["finalizers"] = []
    assert plan_pool(p, members, NOW).actions == []  # not ours to clean up any more


# ------------------------------------------------------------------ the model

def _spec(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = pool(2)["spec"]
    spec.update(over)
    return spec


def test_model_refuses_template_labels_that_miss_the_selector() -> None:
    with pytest.raises(ValidationError, match="add app: db"):
        VirtualMachinePoolSpec.model_validate(_spec(selector={"matchLabels": {"app": "db"}}))


def test_model_refuses_reserved_labels() -> None:
    spec = _spec()
    spec["template"]["metadata"]["labels"][POOL_LABEL] = "x"
    with pytest.raises(ValidationError, match=r"must not set hyperfleet\.dev/pool"):
        VirtualMachinePoolSpec.model_validate(spec)


@pytest.mark.parametrize(("value", "ok"), [
    (0, True), (3, True), ("0%", True), ("25%", True), ("100%", True),
    (-1, False), ("101%", False), ("25", False), ("x%", False), (True, False),
])
def test_int_or_percent(value: Any, ok: bool) -> None:
    if ok:
        RollingUpdate.model_validate({"maxUnavailable": 1, "maxSurge": value})
    else:
        with pytest.raises(ValidationError, match="maxSurge"):
            RollingUpdate.model_validate({"maxUnavailable": 1, "maxSurge": value})


def test_both_zero_is_refused() -> None:
    with pytest.raises(ValidationError, match="cannot both be 0"):
        RollingUpdate.model_validate({"maxUnavailable": "0%", "maxSurge": 0})


def test_revision_changes_with_the_template_only() -> None:
    a, b = pool(3), pool(5)
    assert rev(a) == rev(b)
    assert rev(a) != rev(pool(3, cpus=2))
    c = pool(3)
    c["spec"]["template"]["metadata"]["labels"]["tier"] = "back"
    assert rev(c) != rev(a)


def test_a_failed_api_call_becomes_replica_failure() -> None:
    from hyperfleet.reconcilers.pools import with_failure

    p = pool(1)
    plan = plan_pool(p, [], NOW)
    assert plan.status is not None
    out = with_failure(plan.status, "FailedCreate", "create web-0: HTTP 403: Forbidden", 4, NOW)
    c = {c["type"]: c for c in out["conditions"]}["ReplicaFailure"]
    assert (c["status"], c["reason"]) == ("True", "FailedCreate")
    assert "web-0" in c["message"]
    assert out["replicas"] == plan.status["replicas"]
