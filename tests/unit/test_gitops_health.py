"""spec.healthCheck: the pure verdict over applied VMs, and Ready following it in a reconcile."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.operator.gitsource import GitOps, GitOpsConfig
from hyperfleet.reconcilers.gitops.apply import Applier
from hyperfleet.reconcilers.gitops.fetch import GitFetcher
from hyperfleet.reconcilers.gitops.health import assess_health, expected_phases, vm_health
from hyperfleet.reconcilers.gitops.reconcile import (
    HEALTH_POLL_PROGRESSING,
    HEALTH_POLL_SETTLED,
    GitSourceReconciler,
    Result,
)
from hyperfleet.reconcilers.gitops.types import ObjectRef
from hyperfleet.reconcilers.kube import Kube
from hyperfleet.reconcilers.models.common import rfc3339

from .test_gitops_reconcile import Env, vm

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TIMEOUT = 300.0


def ref(name: str) -> ObjectRef:
    return ObjectRef("VirtualMachine", "ns", name)


def body(name: str, phase: str | None = "Running", gen: int = 1, observed: int | None = 1,
         spec: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    st: dict[str, Any] = {**status}
    if phase is not None:
        st["phase"] = phase
    if observed is not None:
        st["observedGeneration"] = observed
    return {"kind": "VirtualMachine", "metadata": {"name": name, "namespace": "ns", "generation": gen},
            "spec": {"cpus": 1, **(spec or {})}, "status": st}


def cond(type_: str, status: str, reason: str, message: str, at: datetime = T0) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": rfc3339(at)}


def verdict(bodies: list[dict[str, Any]], now: datetime, names: list[str] | None = None,
            since: datetime | None = T0) -> Any:
    observed = {ref(b["metadata"]["name"]): b for b in bodies}
    applied = [ref(n) for n in (names or [b["metadata"]["name"] for b in bodies])]
    return assess_health(applied, observed, now, since, TIMEOUT)


@pytest.mark.parametrize(("spec", "status", "phases"), [
    ({}, {}, ("Running",)),
    ({"powerState": "Sleeping"}, {}, ("Sleeping",)),
    ({"powerState": "Stopped"}, {}, ("Stopped",)),
    ({"powerState": "Paused"}, {}, ("Paused",)),
    ({"runStrategy": "Halted"}, {}, ("Stopped",)),
    ({"runStrategy": "Manual"}, {"haltedGeneration": 3}, ("Running", "Stopped")),
    ({"runStrategy": "Manual"}, {"haltedGeneration": 2}, ("Running",)),
])
def test_expected_phases(spec: dict[str, Any], status: dict[str, Any], phases: tuple[str, ...]) -> None:
    assert expected_phases(spec, status, 3) == phases


def test_all_healthy_including_requested_sleep() -> None:
    h = verdict([body("a"), body("b", "Sleeping", spec={"powerState": "Sleeping"}),
                 body("c", "Stopped", spec={"runStrategy": "Halted"})], T0 + timedelta(seconds=1))
    assert (h.status, h.reason, h.message) == ("True", "Healthy", "all 3 VirtualMachines healthy")


def test_progressing_then_overdue() -> None:
    bodies = [body("a"), body("b", None, observed=None),
              body("c", "Running", gen=2, observed=1),
              body("d", "Stopped")]  # asked to run, not running yet
    h = verdict(bodies, T0 + timedelta(seconds=30), names=["a", "b", "c", "d", "e"])
    assert h.status == "Unknown" and h.reason == "Progressing"
    assert h.message.startswith("waiting for 4 of 5 VirtualMachines to become healthy: ")
    assert "ns/c (Running: status not yet for generation 2)" in h.message
    assert "ns/e (not found)" in h.message and "want Running" in h.message
    late = verdict(bodies, T0 + timedelta(seconds=TIMEOUT + 1), names=["a", "b", "c", "d", "e"])
    assert late.status == "False" and late.reason == "HealthCheckFailed"
    assert late.message.startswith("4 of 5 VirtualMachines unhealthy; 4 not healthy after 5m00s: ")


def test_failed_fails_at_once_with_the_reason_from_its_conditions() -> None:
    bad = body("db", "Failed", conditions=[
        cond("Ready", "False", "HypervisorError", "vm.boot: kernel not found"),
        cond("Failure", "True", "HypervisorError", "vm.boot: kernel not found")],
        message="vm.boot: kernel not found")
    h = verdict([body("a"), bad], T0 + timedelta(seconds=2))
    assert h.status == "False" and h.reason == "HealthCheckFailed"
    assert h.message == ("1 of 2 VirtualMachines unhealthy; 1 failed: "
                         "ns/db (Failed: HypervisorError: vm.boot: kernel not found)")
    assert [v.ref.name for v in h.unhealthy] == ["db"]


def test_unschedulable_waits_for_the_timeout_counted_from_its_own_transition() -> None:
    stuck = body("big", "Unschedulable", observed=None, message="no node has 64 CPUs free",
                 conditions=[cond("Scheduled", "False", "Unschedulable", "no node has 64 CPUs free",
                                  at=T0 + timedelta(days=1))])
    # The GitSource changed long ago, but the VM only became unschedulable a minute ago.
    h = verdict([stuck], T0 + timedelta(days=1, minutes=1))
    assert h.status == "Unknown"
    h = verdict([stuck], T0 + timedelta(days=1, minutes=6))
    assert h.status == "False"
    assert "ns/big (Unschedulable: no node has 64 CPUs free)" in h.message


def test_crash_loop_and_unhealthy_guest_are_not_healthy() -> None:
    loop = body("a", nextRestartTime=rfc3339(T0), conditions=[
        cond("Ready", "False", "RestartBackoff", "VM exited; restart 3 at ...")])
    guest = body("b", conditions=[cond("GuestHealthy", "False", "ChecksFailed", "db: down")])
    assert vm_health(ref("a"), loop).state == "progressing"
    assert "guest reports unhealthy: db: down" in vm_health(ref("b"), guest).why
    h = verdict([loop, guest], T0 + timedelta(seconds=TIMEOUT * 2))
    assert h.status == "False" and "2 not healthy after 5m00s" in h.message


def test_the_listing_is_bounded() -> None:
    bodies = [body(f"vm-{i:02d}", "Failed", message="boom") for i in range(12)]
    h = verdict(bodies, T0)
    assert "ns/vm-04 (Failed: boom)" in h.message and "vm-05" not in h.message
    assert h.message.endswith("; and 7 more") and len(h.unhealthy) == 12


def test_no_vms_is_healthy_and_other_kinds_are_not_checked() -> None:
    h = assess_health([ObjectRef("WorkerNode", "", "n1"), ObjectRef("VmJob", "ns", "j")], {}, T0, T0,
                      TIMEOUT)
    assert h.status == "True" and h.checked == 0


# ---------------------------------------------------------------------- in a reconcile


def pool(name: str, replicas: int = 3, updated: int = 3, available: int = 3, gen: int = 2,
         observed: int | None = 2, *conditions: dict[str, Any]) -> dict[str, Any]:
    st: dict[str, Any] = {"replicas": replicas, "updatedReplicas": updated,
                          "availableReplicas": available, "readyReplicas": available,
                          "conditions": list(conditions)}
    if observed is not None:
        st["observedGeneration"] = observed
    return {"kind": "VirtualMachinePool",
            "metadata": {"name": name, "namespace": "ns", "generation": gen},
            "spec": {"replicas": replicas}, "status": st}


def pool_verdict(bodies: list[dict[str, Any]], now: datetime) -> Any:
    refs = {ObjectRef("VirtualMachinePool", "ns", b["metadata"]["name"]): b for b in bodies}
    return assess_health(list(refs), refs, now, T0, TIMEOUT)


def test_a_fully_rolled_out_pool_is_healthy_beside_its_vms() -> None:
    refs = {ObjectRef("VirtualMachinePool", "ns", "web"): pool("web"), ref("db"): body("db")}
    h = assess_health(list(refs), refs, T0, T0, TIMEOUT)
    assert (h.status, h.reason, h.checked) == ("True", "Healthy", 2)
    assert h.message == "all 2 VirtualMachines and pools healthy"


@pytest.mark.parametrize(("b", "why"), [
    (pool("web", updated=1), "1 of 3 members updated, 3 available"),
    (pool("web", available=2), "3 of 3 members updated, 2 available"),
    (pool("web", observed=1), "status not yet for generation 2"),
    (pool("web", 3, 3, 3, 2, 2, cond("ReplicaFailure", "True", "CreateFailed", "API said no")),
     "CreateFailed: API said no"),
])
def test_a_pool_on_its_way_progresses_then_fails_after_the_timeout(b: dict[str, Any],
                                                                  why: str) -> None:
    h = pool_verdict([b], T0 + timedelta(seconds=10))
    assert h.status == "Unknown" and why in h.message
    late = pool_verdict([b], T0 + timedelta(seconds=TIMEOUT + 1))
    assert late.status == "False" and late.reason == "HealthCheckFailed" and why in late.message


def test_a_refused_pool_template_fails_at_once() -> None:
    b = pool("web", 3, 0, 0, 2, 2,
             cond("ReplicaFailure", "True", "InvalidTemplate", "spec.template.spec.disks[0] is "
                  "writable and not shared"))
    h = pool_verdict([b], T0 + timedelta(seconds=1))
    assert h.status == "False" and "InvalidTemplate: spec.template.spec.disks[0]" in h.message


def test_a_missing_pool_is_not_yet_created() -> None:
    r = ObjectRef("VirtualMachinePool", "ns", "web")
    assert assess_health([r], {}, T0 + timedelta(seconds=1), T0, TIMEOUT).status == "Unknown"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path, healthCheck={"enabled": True, "timeout": "5m"})


def set_phase(env: Env, name: str, phase: str, **status: Any) -> None:
    obj = env.applier.objects[ObjectRef("VirtualMachine", "ns", name)]
    obj["metadata"]["generation"] = 1
    obj["status"] = {"phase": phase, "observedGeneration": 1, **status}


def test_ready_waits_for_health_and_fails_naming_the_vm(env: Env) -> None:
    c1 = env.remote.commit({"fleet/a.yaml": vm("a") + "---\n" + vm("b")})
    r = env.run()
    assert r.state == "applied" and r.health_after == HEALTH_POLL_PROGRESSING
    ready, healthy = env.cond("Ready"), env.cond("Healthy")
    assert (ready["status"], ready["reason"]) == ("Unknown", "Progressing")
    assert ready["message"].startswith(f"Applied revision HEAD@{c1[:12]}: 2 object(s); waiting for 2")
    assert healthy["status"] == "Unknown" and env.cond("Reconciling")["status"] == "True"
    assert env.status["lastAppliedCommit"] == c1 and "lastChangedAt" in env.status

    # The periodic check (one labelled list call) sees them come up.
    set_phase(env, "a", "Running")
    set_phase(env, "b", "Running")
    env.applier.calls.clear()
    assert env.reconciler.check_health("ns/fleet") == HEALTH_POLL_SETTLED
    assert env.applier.calls == ["list-owned VirtualMachine ns.fleet"]
    assert (env.cond("Ready")["status"], env.cond("Ready")["reason"]) == ("True", "ReconciliationSucceeded")
    assert env.cond("Healthy")["reason"] == "Healthy" and env.cond("Reconciling")["status"] == "False"
    patches = len(env.kube.writes)
    env.reconciler.check_health("ns/fleet")
    assert len(env.kube.writes) == patches  # nothing new: no status write

    set_phase(env, "b", "Failed", message="vm.boot: kernel not found")
    env.reconciler.check_health("ns/fleet")
    ready = env.cond("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "HealthCheckFailed")
    assert "ns/b (Failed: vm.boot: kernel not found)" in ready["message"]
    assert env.cond("Healthy")["status"] == "False"
    warnings = [m for t, rs, m in env.events if t == "Warning" and rs == "HealthCheckFailed"]
    assert len(warnings) == 1 and "ns/b" in warnings[0]
    env.reconciler.check_health("ns/fleet")
    assert len([e for e in env.events if e[1] == "HealthCheckFailed"]) == 1  # no repeats
    # An interval reconcile keeps the verdict (it sees the same VMs).
    assert env.run().state == "unchanged" and env.cond("Ready")["reason"] == "HealthCheckFailed"

    set_phase(env, "b", "Running")
    env.reconciler.check_health("ns/fleet")
    assert env.cond("Ready")["status"] == "True"
    assert any(rs == "HealthCheckSucceeded" for _, rs, _ in env.events)


def test_health_never_overrides_a_failed_reconcile(env: Env) -> None:
    env.remote.commit({"fleet/a.yaml": vm("a")})
    env.run()
    env.remote.commit({"fleet/a.yaml": "kind: [\n"})
    assert env.run().state == "stalled"
    set_phase(env, "a", "Running")
    env.reconciler.check_health("ns/fleet")
    assert env.cond("Ready")["reason"] == "ValidationFailed"  # still the reconcile's verdict
    assert env.cond("Healthy")["status"] == "True"  # but the VMs' health is current


def test_disabled_or_suspended_means_no_health_condition(env: Env) -> None:
    env.remote.commit({"fleet/a.yaml": vm("a")})
    env.run()
    assert env.cond("Healthy")["status"] == "Unknown"
    env.edit({"spec": {"healthCheck": {"enabled": False, "timeout": None}}})
    r = env.run()
    assert r.health_after is None and env.cond("Ready")["status"] == "True"
    assert "Healthy" not in {c["type"] for c in env.status["conditions"]}
    assert env.reconciler.check_health("ns/fleet") is None


# ---------------------------------------------------------------------- the worker's timer


class TimedReconciler(GitSourceReconciler):
    """Counts reconciles and health checks; the first reconcile asks for a quick re-check."""

    def __init__(self, tmp_path: Path, checks_left: int) -> None:
        kube = Kube()
        super().__init__(kube, GitFetcher(tmp_path), Applier(kube, workers=1))
        self.log: list[str] = []
        self.checks_left = checks_left

    def reconcile(self, key: str, trigger: str = "interval") -> Result:
        self.log.append(f"reconcile {trigger}")
        return Result("applied", 3600.0, "c" * 40, health_after=0.05)

    def check_health(self, key: str) -> float | None:
        self.log.append("health")
        self.checks_left -= 1
        if self.checks_left < 0:
            raise RuntimeError("API down")
        return 0.05 if self.checks_left else None


def test_the_worker_rechecks_health_between_reconciles_until_told_to_stop(tmp_path: Path) -> None:
    rec = TimedReconciler(tmp_path, checks_left=3)

    async def scenario() -> None:
        ops = GitOps(GitOpsConfig(cache_dir=str(tmp_path)), Kube(), reconciler=rec)
        ops.observe("ADDED", {"metadata": {"name": "fleet", "namespace": "ns"}, "spec": {}})
        try:
            await asyncio.sleep(1.5)
            # Three checks, the last one saying "no more": then only the 1 h interval is left.
            assert rec.log == ["reconcile startup", "health", "health", "health"]
            ops.trigger("ns/fleet", "reconcile-now")  # a trigger still ends the wait at once
            await asyncio.sleep(0.5)
            assert rec.log[4] == "reconcile reconcile-now"
        finally:
            await ops.stop()

    asyncio.run(scenario())


def test_a_crashing_health_check_is_retried_later_not_in_a_loop(tmp_path: Path) -> None:
    rec = TimedReconciler(tmp_path, checks_left=0)

    async def scenario() -> None:
        ops = GitOps(GitOpsConfig(cache_dir=str(tmp_path)), Kube(), reconciler=rec)
        ops.observe("ADDED", {"metadata": {"name": "fleet", "namespace": "ns"}, "spec": {}})
        try:
            await asyncio.sleep(1.0)
            assert rec.log == ["reconcile startup", "health"]  # next try in HEALTH_RETRY (30 s)
        finally:
            await ops.stop()

    asyncio.run(scenario())


def test_a_vm_stopped_on_purpose_is_healthy_though_not_ready() -> None:
    """A VM's Ready=False reason Stopped/Halted means stopped as asked: healthy for a
    GitSource, which checks that each VM is what its spec asks for."""
    stopped = body("off", "Stopped", spec={"powerState": "Stopped"}, conditions=[
        cond("Ready", "False", "Stopped", "stopped as requested (powerState: Stopped)")])
    halted = body("halt", "Stopped", spec={"runStrategy": "Halted"}, conditions=[
        cond("Ready", "False", "Halted", "stopped as requested (runStrategy: Halted)")])
    v = verdict([stopped, halted], T0 + timedelta(hours=1))
    assert (v.status, v.reason) == ("True", "Healthy")
    # Stopped but asked to run: not healthy, and the reason says so.
    wrong = body("wrong", "Stopped", conditions=[
        cond("Ready", "False", "Converging", "hypervisor state none, desired Running")])
    v = verdict([wrong], T0 + timedelta(hours=1))
    assert v.status == "False" and "want Running" in v.message
