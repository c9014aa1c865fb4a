"""Metrics as Prometheus scrapes them: the registry text (generate_latest), parsed back, across
state transitions. The state gauges must follow the in-memory views exactly (no stale phase,
no series of a VM or GitSource that is gone), and each role exports only its own series."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hyperfleet.operator import metrics
from hyperfleet.operator.controller import Controller
from hyperfleet.operator.gitsource import GitOps, GitOpsConfig
from hyperfleet.operator.settings import ControllerConfig
from hyperfleet.reconcilers.gitops.apply import Applier
from hyperfleet.reconcilers.gitops.fetch import GitFetcher
from hyperfleet.reconcilers.gitops.reconcile import GitSourceReconciler, Result
from hyperfleet.reconcilers.kube import Kube
from hyperfleet.reconcilers.testing.fakekube import FakeKube

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

CONTROLLER_ONLY = ("hyperfleet_vms", "hyperfleet_scheduler_queue_depth", "hyperfleet_node_ready",
                   "hyperfleet_controller_active", "hyperfleet_bindings_total",
                   "hyperfleet_job_transitions_total", "hyperfleet_gitsource_ready",
                   "hyperfleet_gitsource_reconcile_duration_seconds")
AGENT_ONLY = ("hyperfleet_vm_info", "hyperfleet_job_outcomes_total")


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of one scrape: (name, sorted labels) -> value."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


def value(samples: Samples, metric: str, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


def vm(name: str, phase: str | None = None, node: str | None = None, ns: str = "ns",
       version: int = 1, **status: Any) -> dict[str, Any]:
    st: dict[str, Any] = dict(status)
    if phase:
        st["phase"] = phase
    if node:
        st["nodeName"] = node
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(version)},
            "spec": {"cpus": 2, "memory": "1Gi"}, "status": st}


# ---------------------------------------------------------------------------- controller


def see(ctl: Controller, store: dict[str, dict[str, Any]], key: str, type_: str,
        body: dict[str, Any]) -> None:
    """A watch event as kopf hands it to the controller."""
    ctl.observe(store, key, cast(Any, {"type": type_, "object": body}), cast(Any, body))


@pytest.fixture
def controller() -> tuple[Controller, CollectorRegistry]:
    ctl = Controller(ControllerConfig(), FakeKube())
    reg = metrics.registry_for("controller")
    reg.register(metrics.FleetCollector(ctl))
    return ctl, reg


def test_phase_gauges_follow_the_view_failed_then_running(
        controller: tuple[Controller, CollectorRegistry]) -> None:
    ctl, reg = controller
    see(ctl, ctl.vms, "ns/a", "ADDED", vm("a", "Failed", "n1", version=1))
    see(ctl, ctl.vms, "ns/b", "ADDED", vm("b", None, None, version=2))
    s = scrape(reg)
    assert value(s, "hyperfleet_vms", phase="Failed") == 1
    assert value(s, "hyperfleet_vms", phase="Pending") == 1  # no status yet counts as Pending
    assert value(s, "hyperfleet_scheduler_queue_depth") == 1
    # Recovered: Failed goes back to 0 (was stuck at 1 with a set-only Gauge).
    see(ctl, ctl.vms, "ns/a", "MODIFIED", vm("a", "Running", "n1", version=3))
    s = scrape(reg)
    assert value(s, "hyperfleet_vms", phase="Failed") == 0
    assert value(s, "hyperfleet_vms", phase="Running") == 1
    # Every known phase is always there, so `== 0` and `> 0` both work in alerts.
    assert {dict(lbl)["phase"] for n, lbl in s if n == "hyperfleet_vms"} >= {
        "Pending", "Running", "Failed", "Stopped", "Sleeping", "Unschedulable"}
    see(ctl, ctl.vms, "ns/a", "DELETED", vm("a", "Running", "n1", version=4))
    see(ctl, ctl.vms, "ns/b", "DELETED", vm("b", version=5))
    s = scrape(reg)
    assert value(s, "hyperfleet_vms", phase="Running") == 0
    assert value(s, "hyperfleet_scheduler_queue_depth") == 0


def test_a_vm_being_deleted_is_not_counted(controller: tuple[Controller, CollectorRegistry]) -> None:
    ctl, reg = controller
    going = vm("a", "Running", "n1")
    going["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    see(ctl, ctl.vms, "ns/a", "MODIFIED", going)
    assert value(scrape(reg), "hyperfleet_vms", phase="Running") == 0


def test_node_series_follow_nodes_and_leases(controller: tuple[Controller, CollectorRegistry]) -> None:
    ctl, reg = controller
    node = {"metadata": {"name": "n1", "resourceVersion": "1"}, "spec": {"pool": "gpu"},
            "status": {"heartbeatTime": "2025-01-01T00:00:00Z",
                       "conditions": [{"type": "Ready", "status": "False"}]}}
    see(ctl, ctl.nodes, "n1", "ADDED", node)
    see(ctl, ctl.vms, "ns/a", "ADDED", vm("a", "Running", "n1"))
    s = scrape(reg)
    assert value(s, "hyperfleet_node_ready", node="n1", pool="gpu") == 0
    assert value(s, "hyperfleet_node_vms", node="n1") == 1
    assert value(s, "hyperfleet_node_heartbeat_timestamp_seconds", node="n1") == 1735689600.0
    from hyperfleet.reconcilers.models.common import parse_time

    ctl.leases["n1"] = parse_time("2025-01-01T00:01:00Z")  # the Lease is newer: it wins
    assert value(scrape(reg), "hyperfleet_node_heartbeat_timestamp_seconds", node="n1") == 1735689660.0
    see(ctl, ctl.nodes, "n1", "DELETED", node)
    assert "hyperfleet_node_ready" not in names(scrape(reg))


def test_a_standby_exports_no_fleet_gauges(controller: tuple[Controller, CollectorRegistry]) -> None:
    ctl, reg = controller
    see(ctl, ctl.vms, "ns/a", "ADDED", vm("a", "Running", "n1"))
    ctl.active = False  # its view is paused by kopf peering: stale, and it would double-count
    s = scrape(reg)
    assert not {"hyperfleet_vms", "hyperfleet_scheduler_queue_depth"} & names(s)
    ctl.active = True
    assert value(scrape(reg), "hyperfleet_vms", phase="Running") == 1


# ---------------------------------------------------------------------------- agent


def test_per_vm_series_appear_and_vanish_with_the_vm() -> None:
    vms: dict[str, Any] = {}
    reg = metrics.registry_for("agent")
    reg.register(metrics.NodeVmCollector("n1", vms))
    assert "hyperfleet_vm_info" not in names(scrape(reg))
    vms["ns/a"] = vm("a", "Starting", "n1")
    vms["ns/b"] = vm("b", "Running", "n1", restartCount=3, bootTime="2025-01-01T00:00:00Z")
    s = scrape(reg)
    assert value(s, "hyperfleet_vm_info", namespace="ns", name="a", node="n1", phase="Starting") == 1
    b = {"namespace": "ns", "name": "b", "node": "n1"}
    assert value(s, "hyperfleet_vm_vcpus", **b) == 2
    assert value(s, "hyperfleet_vm_memory_bytes", **b) == 1 << 30
    assert value(s, "hyperfleet_vm_restarts_total", **b) == 3
    assert value(s, "hyperfleet_vm_boot_time_seconds", **b) == 1735689600.0
    assert value(s, "hyperfleet_vm_boot_time_seconds", namespace="ns", name="a", node="n1") is None
    # A phase change replaces the info series; it does not add a second one.
    vms["ns/a"]["status"]["phase"] = "Running"
    s = scrape(reg)
    infos = [dict(lbl) for n, lbl in s if n == "hyperfleet_vm_info" and dict(lbl)["name"] == "a"]
    assert infos == [{"namespace": "ns", "name": "a", "node": "n1", "phase": "Running"}]
    del vms["ns/a"]  # its loop ended: deleted, or moved to another node
    s = scrape(reg)
    assert not [lbl for _, lbl in s if ("name", "a") in lbl]
    assert value(s, "hyperfleet_vm_info", namespace="ns", name="b", node="n1", phase="Running") == 1


def test_each_role_exports_only_its_own_series() -> None:
    metrics.BINDINGS.labels("bound").inc()
    metrics.JOB_TRANSITIONS.labels("Running").inc()
    metrics.JOB_OUTCOMES.labels("Succeeded", "vm.snapshot").inc()
    metrics.RECONCILES.labels("vm", "converged").inc()
    agent = metrics.registry_for("agent")
    agent.register(metrics.NodeVmCollector("n1", {"ns/a": vm("a", "Running", "n1")}))
    seen = names(scrape(agent))
    assert not {n for n in seen for c in CONTROLLER_ONLY if n.startswith(c)}, seen
    assert {"hyperfleet_vm_info", "hyperfleet_job_outcomes_total", "hyperfleet_reconciles_total",
            "process_cpu_seconds_total"} <= seen
    ctl = Controller(ControllerConfig(), FakeKube())
    controller = metrics.registry_for("controller")
    controller.register(metrics.FleetCollector(ctl))
    seen = names(scrape(controller))
    assert not {n for n in seen for a in AGENT_ONLY if n.startswith(a)}, seen
    assert {"hyperfleet_vms", "hyperfleet_bindings_total", "hyperfleet_controller_active"} <= seen


# ---------------------------------------------------------------------------- GitSources


class OneShot(GitSourceReconciler):
    """Answers each reconcile with the next result of a script, then waits an hour."""

    def __init__(self, tmp_path: Path, *results: Result) -> None:
        kube = Kube()
        super().__init__(kube, GitFetcher(tmp_path), Applier(kube, workers=1))
        self.results = list(results)

    def reconcile(self, key: str, trigger: str = "interval") -> Result:
        time.sleep(0.02)
        return self.results.pop(0)


def _gitsource(ready: str | None, suspend: bool = False) -> dict[str, Any]:
    status = {"conditions": [{"type": "Ready", "status": ready}]} if ready else {}
    # A name of its own: the histogram is process-wide, and other tests reconcile "ns/fleet".
    return {"metadata": {"name": "metered", "namespace": "ns"}, "spec": {"suspend": suspend},
            "status": status}


def test_gitsource_series_follow_the_source_and_go_with_it(tmp_path: Path) -> None:
    rec = OneShot(tmp_path, Result("applied", 3600.0, "c" * 40), Result("failed", 3600.0))
    role = {"active": True}
    reg = metrics.registry_for("controller")

    async def scenario() -> None:
        ops = GitOps(GitOpsConfig(cache_dir=str(tmp_path)), Kube(), reconciler=rec,
                     active=lambda: role["active"])
        reg.register(metrics.GitSourceCollector(ops))
        before = time.time()
        try:
            ops.observe("ADDED", _gitsource(None))
            await asyncio.sleep(0.3)
            s = scrape(reg)
            labels = {"namespace": "ns", "name": "metered"}
            assert value(s, "hyperfleet_gitsource_ready", **labels) == -1  # no condition yet
            assert value(s, "hyperfleet_gitsource_reconcile_duration_seconds_count", **labels) == 1
            assert (value(s, "hyperfleet_gitsource_reconcile_duration_seconds_sum", **labels)
                    or 0) >= 0.02
            applied = value(s, "hyperfleet_gitsource_last_applied_timestamp_seconds", **labels)
            assert applied is not None
            assert before <= applied <= time.time()
            assert value(s, "hyperfleet_reconciles_total", kind="gitsource", result="applied")
            ops.observe("MODIFIED", _gitsource("True"))  # our own status write comes back
            assert value(scrape(reg), "hyperfleet_gitsource_ready", **labels) == 1
            ops.observe("MODIFIED", _gitsource("False"))
            ops.trigger("ns/metered", "reconcile-now")
            await asyncio.sleep(0.3)
            s = scrape(reg)
            assert value(s, "hyperfleet_gitsource_ready", **labels) == 0
            assert value(s, "hyperfleet_gitsource_reconcile_duration_seconds_count", **labels) == 2
            # A failed reconcile leaves the last successful apply's time as it was.
            assert value(s, "hyperfleet_gitsource_last_applied_timestamp_seconds", **labels) == applied
            role["active"] = False
            assert "hyperfleet_gitsource_ready" not in names(scrape(reg))
            role["active"] = True
            ops.observe("DELETED", _gitsource("False"))
            s = scrape(reg)
            assert not [lbl for _, lbl in s if ("name", "metered") in lbl], "series of a deleted GitSource"
        finally:
            await ops.stop()

    asyncio.run(scenario())


def test_the_scrape_reads_memory_only_and_stays_cheap_at_1000_vms() -> None:
    """1,000 VMs on one controller and on one agent: a scrape is pure iteration (no Kube)."""
    ctl = Controller(ControllerConfig(), FakeKube())
    for i in range(1000):
        ctl.vms[f"ns/vm{i}"] = vm(f"vm{i}", "Running", f"n{i % 50}", restartCount=i % 3,
                                  bootTime="2025-01-01T00:00:00Z")
    vms = dict(ctl.vms)
    reg = CollectorRegistry()
    reg.register(metrics.FleetCollector(ctl))
    reg.register(metrics.NodeVmCollector("n1", vms))
    started = time.perf_counter()
    s = scrape(reg)
    elapsed = time.perf_counter() - started
    assert value(s, "hyperfleet_vms", phase="Running") == 1000
    assert sum(v for (n, _), v in s.items() if n == "hyperfleet_vm_info") == 1000
    assert elapsed < 1.0, f"a scrape of 1,000 VMs took {elapsed:.2f}s"
