"""One reconcile pass against a real git repository and an in-memory cluster: the ordering
rules (validate everything, then apply, prune only after a full apply) and the status."""

from __future__ import annotations

import copy
import json
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import pytest

from hyperfleet.reconcilers.gitops.apply import Applier, Outcome
from hyperfleet.reconcilers.gitops.fetch import ExportError, GitFetcher
from hyperfleet.reconcilers.gitops.reconcile import GitSourceReconciler, Result
from hyperfleet.reconcilers.gitops.types import OWNER_LABEL, ObjectRef
from hyperfleet.reconcilers.kube import GITSOURCES, Kube
from hyperfleet.reconcilers.testing.fakekube import FakeKube, merge_patch

from .test_gitops_fetch import Remote


def vm(name: str, cpus: int = 1) -> str:
    return (f"apiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: {name}}}\n"
            f"spec: {{cpus: {cpus}, memory: 1Gi, boot: {{kernel: /k}}}}\n")


class FakeApplier(Applier):
    """An in-memory cluster; ``reject`` decides which objects the 'API server' refuses."""

    def __init__(self) -> None:
        super().__init__(Kube(), workers=2)  # (a client of its own it never uses)
        self.objects: dict[ObjectRef, dict[str, Any]] = {}
        self.reject: Callable[[dict[str, Any], bool], str | None] = lambda body, dry: None
        self.calls: list[str] = []

    def list_live(self, kinds: Iterable[str]) -> dict[ObjectRef, dict[str, Any]]:
        self.calls.append("list")
        return {r: copy.deepcopy(b) for r, b in self.objects.items() if r.kind in set(kinds)}

    def list_owned(self, kind: str, owner: str) -> list[dict[str, Any]]:
        self.calls.append(f"list-owned {kind} {owner}")
        return [copy.deepcopy(b) for r, b in self.objects.items() if r.kind == kind
                and (b["metadata"].get("labels") or {}).get(OWNER_LABEL) == owner]

    def apply(self, body: dict[str, Any], dry_run: bool = False) -> Outcome:
        self.calls.append(f"{'dry-run' if dry_run else 'apply'} {body['metadata']['name']}")
        err = self.reject(body, dry_run)
        if err:
            return Outcome(False, error=err)
        if not dry_run:
            ref = ObjectRef.of(body)
            stored = copy.deepcopy(body)
            stored["metadata"]["uid"] = f"uid-{ref.name}"
            stored["status"] = self.objects.get(ref, {}).get("status", {"phase": "Pending"})
            self.objects[ref] = stored
        return Outcome(True, result=body)

    def delete(self, ref: ObjectRef, uid: str | None = None) -> Outcome:
        self.calls.append(f"delete {ref.name}")
        assert uid == f"uid-{ref.name}"
        self.objects.pop(ref, None)
        return Outcome(True)


def gitsource(url: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "GitSource",
            "metadata": {"name": "fleet", "namespace": "ns", "generation": 1, "uid": "gs-uid"},
            # Health checks have tests of their own (test_gitops_health): off here, so Ready
            # means "applied" as it would without VMs that run.
            "spec": {"url": url, "path": "fleet", "interval": "1m",
                     "healthCheck": {"enabled": False}, **spec}}


class Env:
    """The GitSource ns/fleet on the shared FakeKube; its objects in a FakeApplier."""

    def __init__(self, tmp_path: Path, **spec: Any) -> None:
        self.remote = Remote(tmp_path / "repo")
        self.kube = FakeKube()
        self.kube.put(GITSOURCES, gitsource(str(self.remote.bare), **spec))
        self.applier = FakeApplier()
        # The reconciler takes Kube for the raw client (Secrets), which these tests never reach.
        self.reconciler = GitSourceReconciler(cast(Kube, self.kube), GitFetcher(tmp_path / "cache"),
                                              self.applier)

    def run(self) -> Result:
        result = self.reconciler.reconcile("ns/fleet")
        assert all(set(w) == {"status"} for w in self.kube.writes)  # it writes only its status
        return result

    def edit(self, patch: dict[str, Any]) -> None:
        """Change the GitSource as its user would (a merge patch; not one of ``writes``,
        which are the reconciler's)."""
        self.kube.put(GITSOURCES, merge_patch(self.source, patch))

    @property
    def source(self) -> dict[str, Any]:
        body = self.kube.get(GITSOURCES, "fleet", "ns")
        assert body is not None
        return body

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.source.get("status") or {})

    @property
    def events(self) -> list[tuple[str, str, str]]:
        """(type, reason, message) of every Event posted."""
        return [(type_, reason, message) for _, reason, message, type_ in self.kube.events]

    def cond(self, type_: str) -> dict[str, Any]:
        return next(c for c in self.status["conditions"] if c["type"] == type_)

    def names(self) -> set[str]:
        return {r.name for r in self.applier.objects}


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_apply_then_idle_pass_writes_nothing(env: Env) -> None:
    c1 = env.remote.commit({"fleet/a.yaml": vm("a") + "---\n" + vm("b")})
    r = env.run()
    assert r.state == "applied" and r.commit == c1 and r.requeue_after == 60
    assert env.names() == {"a", "b"}
    assert env.status["lastAppliedCommit"] == c1 and env.cond("Ready")["status"] == "True"
    assert [e["name"] for e in env.status["inventory"]] == ["a", "b"]
    assert env.status["observedGeneration"] == 1
    assert any(reason == "Applied" and "created 2" in msg for _, reason, msg in env.events)
    assert env.applier.calls.index("dry-run a") < env.applier.calls.index("apply a")
    patches = len(env.kube.writes)
    assert env.run().state == "unchanged"
    assert len(env.kube.writes) == patches  # an idle interval writes no status


def test_server_rejection_applies_nothing(env: Env) -> None:
    env.remote.commit({"fleet/a.yaml": vm("a")})
    env.run()
    env.remote.commit({"fleet/a.yaml": vm("a", cpus=2), "fleet/b.yaml": vm("b")})
    env.applier.reject = lambda body, dry: "spec.cpus: too many" if body["metadata"]["name"] == "b" else None
    env.applier.calls.clear()
    r = env.run()
    assert r.state == "stalled"
    assert not [c for c in env.applier.calls if c.startswith("apply")]
    msg = env.cond("Stalled")["message"]
    assert "fleet/b.yaml:1 (document 0)" in msg and "spec.cpus: too many" in msg
    assert env.applier.objects[ObjectRef("VirtualMachine", "ns", "a")]["spec"]["cpus"] == 1


def test_partial_apply_failure_prunes_nothing_and_remembers_what_was_applied(env: Env) -> None:
    env.remote.commit({"fleet/a.yaml": vm("a"), "fleet/b.yaml": vm("b"), "fleet/c.yaml": vm("c")})
    env.run()
    env.remote.commit({"fleet/b.yaml": None, "fleet/d.yaml": vm("d"), "fleet/e.yaml": vm("e")})
    env.applier.reject = lambda body, dry: "boom" if body["metadata"]["name"] == "e" and not dry else None
    r = env.run()
    assert r.state == "failed" and r.requeue_after == 30
    assert env.names() == {"a", "b", "c", "d"}  # b not pruned, d applied
    assert {e["name"] for e in env.status["inventory"]} == {"a", "b", "c", "d"}
    assert env.cond("Ready")["reason"] == "ApplyFailed" and env.cond("Stalled")["status"] == "False"
    env.applier.reject = lambda body, dry: None
    assert env.run().state == "applied"
    assert env.names() == {"a", "c", "d", "e"}


def test_unreachable_remote_keeps_everything(env: Env, tmp_path: Path) -> None:
    c1 = env.remote.commit({"fleet/a.yaml": vm("a")})
    env.run()
    env.remote.bare.rename(tmp_path / "elsewhere.git")
    env.applier.calls.clear()
    r = env.run()
    assert r.state == "failed" and r.requeue_after == 30
    assert env.applier.calls == [] and env.names() == {"a"}
    assert env.cond("Ready")["reason"] == "FetchFailed" and env.status["lastAppliedCommit"] == c1
    assert "nothing is pruned" in env.status["lastError"]
    warnings = [e for e in env.events if e[0] == "Warning"]
    env.run()
    assert [e for e in env.events if e[0] == "Warning"] == warnings  # no event spam


def test_missing_path_and_invalid_spec(tmp_path: Path) -> None:
    env = Env(tmp_path, path="clusters/prod")
    env.remote.commit({"fleet/a.yaml": vm("a")})
    assert env.run().state == "stalled"
    assert env.cond("Stalled")["reason"] == "PathNotFound"
    assert "spec.path 'clusters/prod' does not exist" in env.cond("Stalled")["message"]
    env.edit({"spec": {"url": "https://bob:token@h/r"}})
    assert env.run().state == "stalled"
    assert env.cond("Stalled")["reason"] == "InvalidSpec" and "token" not in env.status["lastError"][-20:]


def test_nix_flake_selected_but_unavailable(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.remote.commit({"fleet/flake.nix": "{ outputs = _: { hyperfleet = []; }; }\n",
                       "fleet/a.yaml": vm("a")})
    env.reconciler.nix = None  # as on a host without Nix
    assert env.run().state == "stalled"
    assert env.cond("Stalled")["reason"] == "NixUnavailable"
    env.edit({"spec": {"renderer": "Yaml"}})  # the documented way out
    assert env.run().state == "applied" and env.names() == {"a"}


def test_nix_flake_rendered(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.remote.commit({"fleet/flake.nix": "{ }\n"})
    nix = tmp_path / "nix"
    # Only spec.path is handed to nix (-I <checkout>/fleet), nothing else of the repository.
    nix.write_text('#!/bin/sh\ncase "$*" in *"/fleet --expr"*) ;; *) exit 3;; esac\n'
                   "echo '[{\"apiVersion\":\"hyperfleet.dev/v1alpha1\",\"kind\":\"VirtualMachine\","
                   "\"metadata\":{\"name\":\"from-nix\"},\"spec\":{\"cpus\":1,\"memory\":\"1Gi\","
                   "\"boot\":{\"kernel\":\"/k\"}}}]'\n")
    nix.chmod(nix.stat().st_mode | stat.S_IXUSR)
    env.reconciler.nix = str(nix)
    assert env.run().state == "applied", env.status.get("lastError")
    assert env.names() == {"from-nix"}


def test_held_deletion_then_confirmed(env: Env) -> None:
    env.remote.commit({"fleet/a.yaml": vm("a"), "fleet/b.yaml": vm("b")})
    env.run()
    wipe = env.remote.commit({"fleet/a.yaml": None, "fleet/b.yaml": None, "fleet/keep.txt": "x\n"})
    assert env.run().state == "held"
    assert env.names() == {"a", "b"} and env.status["heldDeletion"]["commit"] == wipe
    assert any(reason == "DeletionHeld" for _, reason, _ in env.events)
    env.edit({"metadata": {"annotations": {"hyperfleet.dev/confirm-deletion": wipe[:8]}}})
    assert env.run().state == "applied"
    assert env.names() == set() and "heldDeletion" not in env.status
    assert env.status["inventory"] == []


def test_suspended_does_nothing(tmp_path: Path) -> None:
    env = Env(tmp_path, suspend=True)
    env.remote.commit({"fleet/a.yaml": vm("a")})
    assert env.run().state == "suspended"
    assert env.applier.calls == [] and env.cond("Reconciling")["reason"] == "Suspended"


def test_render_error_applies_nothing_and_is_not_retried_as_new_work(env: Env) -> None:
    good = env.remote.commit({"fleet/a.yaml": vm("a")})
    env.run()
    env.remote.commit({"fleet/a.yaml": vm("a", cpus=2), "fleet/b.yaml": "kind: [\n"})
    env.applier.calls.clear()
    assert env.run().state == "stalled"
    assert env.applier.calls == []  # not even listed: validation comes first
    assert env.status["lastAppliedCommit"] == good
    assert env.cond("Stalled")["message"].startswith(f"commit {env.status['lastAttemptedCommit'][:12]} "
                                                     f"was not applied (the last applied commit "
                                                     f"{good[:12]} stays in place): 1 problem: "
                                                     "fleet/b.yaml:2")
    events = len(env.events)
    env.run()
    assert len(env.events) == events  # the same failure is reported once


def test_hand_made_objects_are_left_alone_until_annotated_for_adoption(env: Env) -> None:
    by_hand = {"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
               "metadata": {"name": "a", "namespace": "ns", "uid": "uid-a"},
               "spec": {"cpus": 4, "memory": "1Gi", "boot": {"kernel": "/k"}}}
    env.applier.objects[ObjectRef("VirtualMachine", "ns", "a")] = copy.deepcopy(by_hand)
    env.remote.commit({"fleet/a.yaml": vm("a"), "fleet/b.yaml": vm("b")})
    assert env.run().state == "stalled"
    assert env.cond("Ready")["reason"] == "OwnershipConflict"
    msg = env.cond("Stalled")["message"]
    assert "VirtualMachine/ns/a (fleet/a.yaml:1 (document 0)) already exists" in msg
    assert "kubectl annotate virtualmachines -n ns a hyperfleet.dev/adopt=true" in msg
    assert not [c for c in env.applier.calls if c.startswith(("apply", "dry-run"))]
    assert env.applier.objects[ObjectRef("VirtualMachine", "ns", "a")] == by_hand
    env.applier.objects[ObjectRef("VirtualMachine", "ns", "a")]["metadata"]["annotations"] = {
        "hyperfleet.dev/adopt": "true"}
    assert env.run().state == "applied"
    live = env.applier.objects[ObjectRef("VirtualMachine", "ns", "a")]
    assert live["metadata"]["labels"][OWNER_LABEL] == "ns.fleet" and live["spec"]["cpus"] == 1
    assert any(reason == "Applied" and "adopted 1 (VirtualMachine/ns/a)" in m
               for _, reason, m in env.events)
    assert [e["name"] for e in env.status["inventory"]] == ["a", "b"]


def test_nix_checkout_without_links_to_the_host(tmp_path: Path) -> None:
    env = Env(tmp_path)
    (env.remote.work / "fleet").mkdir(parents=True)
    (env.remote.work / "result").symlink_to("/nix/store/abc-result")  # outside spec.path
    (env.remote.work / "fleet" / "token").symlink_to("/var/run/secrets/token")
    env.remote.commit({"fleet/flake.nix": "{ }\n", "fleet/lib.nix": "{ }\n", "other/x.txt": "x\n"})
    seen = tmp_path / "seen"
    nix = tmp_path / "nix"
    nix.write_text(f"#!/bin/sh\nfor a; do prev=$last; last=$a; [ \"$prev\" = -I ] && "
                   f"(cd \"$a/..\" && find . | sort > {seen}); done\necho '[]'\n")
    nix.chmod(nix.stat().st_mode | stat.S_IXUSR)
    env.reconciler.nix = str(nix)
    env.run()
    assert env.cond("Ready")["status"] == "True", env.status.get("lastError")
    assert seen.read_text().split() == [".", "./fleet", "./fleet/flake.nix", "./fleet/lib.nix"]


def test_cross_namespace_applies_can_be_disabled(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.reconciler.cross_namespace = False
    other = vm("b").replace("{name: b}", "{name: b, namespace: prod}")
    node = "apiVersion: hyperfleet.dev/v1alpha1\nkind: WorkerNode\nmetadata: {name: w}\nspec: {}\n"
    env.remote.commit({"fleet/a.yaml": vm("a"), "fleet/b.yaml": other, "fleet/n.yaml": node})
    assert env.run().state == "stalled" and env.names() == set()
    msg = env.cond("Stalled")["message"]
    assert "fleet/b.yaml:1 (document 0): VirtualMachine b: metadata.namespace 'prod' is not the " \
           "GitSource's namespace 'ns'" in msg
    assert "fleet/n.yaml:1 (document 0): WorkerNode w: WorkerNode is cluster-scoped" in msg
    env.remote.commit({"fleet/b.yaml": None, "fleet/n.yaml": None})
    assert env.run().state == "applied" and env.names() == {"a"}
    env.edit({"spec": {"targetNamespace": "prod"}})
    assert env.run().state == "stalled" and env.cond("Stalled")["reason"] == "InvalidSpec"
    env.reconciler.cross_namespace = True  # the default, as Flux: metadata.namespace is honoured
    env.edit({"spec": {"targetNamespace": None}})
    env.remote.commit({"fleet/b.yaml": other})
    assert env.run().state == "applied"
    assert ObjectRef("VirtualMachine", "prod", "b") in env.applier.objects


def test_a_file_that_cannot_be_exported_is_a_validation_error(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(tmp_path)
    env.remote.commit({"fleet/flake.nix": "{ }\n"})
    env.reconciler.nix = "/usr/bin/false"

    def export(*_: Any, **__: Any) -> list[str]:
        raise ExportError("fleet/dev", "cannot be exported for nix eval (special file); remove it")

    monkeypatch.setattr(env.reconciler.fetcher, "export", export)
    assert env.run().state == "stalled"
    assert env.cond("Stalled")["reason"] == "ValidationFailed"
    assert "1 problem: fleet/dev: cannot be exported" in env.cond("Stalled")["message"]


@pytest.mark.parametrize("userinfo", ["ghp_TOKENinUSERpart1234", "deploy:glpat-PASSWORDpart5678"])
def test_a_token_in_the_url_never_reaches_status_events_or_logs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, userinfo: str) -> None:
    """A real git fetch from a closed loopback port, the token in the URL's user part: git's
    error, the FetchError, the status, the Events and the log lines show *** instead."""
    import logging
    import socket

    from hyperfleet.operator.logs import RedactFilter

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = userinfo.split(":")[-1]
    env = Env(tmp_path)
    env.edit({"spec": {"url": f"https://{userinfo}@127.0.0.1:{port}/org/fleet.git"}})
    caplog.handler.addFilter(RedactFilter())
    with caplog.at_level(logging.DEBUG):
        r = env.run()
    assert r.state != "applied"
    texts = [json.dumps(env.status), json.dumps(env.events), caplog.text,
             *(str(p) for p in env.kube.writes)]
    for text in texts:
        assert token not in text
    ready = env.cond("Ready")
    if ":" in userinfo:  # refused before any fetch: a password belongs in a Secret
        assert ready["reason"] == "InvalidSpec" and "secretRef" in ready["message"]
    else:  # still says which remote failed
        assert f"https://***@127.0.0.1:{port}/org/fleet.git" in ready["message"], ready


def test_a_token_the_server_echoes_alone_is_scrubbed_too() -> None:
    from hyperfleet.reconcilers.gitops.fetch import scrub, url_secrets

    url = "https://ghp_TOKENinUSERpart1234@git.example/org/fleet.git"
    echoed = "remote: invalid credentials for ghp_TOKENinUSERpart1234\nfatal: " + url
    assert scrub(echoed, url_secrets(url)) == (
        "remote: invalid credentials for ***\nfatal: https://***@git.example/org/fleet.git")
    assert url_secrets("https://git@host/r") == []  # a user name is no secret
    assert sorted(url_secrets("https://u:p%40ss-word@host/r")) == ["p%40ss-word", "p@ss-word"]
