"""WorkerNode readiness (Lease or status heartbeat), allocatable, and eviction decisions."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from hyperfleet.reconcilers.eviction import (
    PARALLEL_DRAIN_MIGRATIONS,
    Eviction,
    EvictionDecision,
    drain_blocked,
    drain_job_name,
    evictions,
    plan_drain,
    unbound_status,
)
from hyperfleet.reconcilers.nodes import allocatable, heartbeat_age, is_ready, node_view
from hyperfleet.reconcilers.scheduler import NodeView, vm_view

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
GRACE = timedelta(seconds=20)


def node(name: str = "n1", beat: datetime | None = NOW, healthy: bool = True,
         **spec: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "capacity": {"cpus": 8, "memory": "16Gi"},
        "providers": [{"name": "cloud-hypervisor", "available": True, "healthy": healthy}],
        "capabilities": ["snapshot"],
    }
    if beat is not None:
        status["heartbeatTime"] = beat.isoformat().replace("+00:00", "Z")
    return {"metadata": {"name": name, "labels": {"zone": "a"}}, "spec": spec, "status": status}


def vm(name: str, node_name: str | None, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": spec,
            "status": {"nodeName": node_name} if node_name else {}}


def test_readiness_follows_the_newest_of_lease_and_status() -> None:
    stale = node(beat=NOW - timedelta(minutes=5))
    assert not is_ready(stale, NOW, GRACE)
    assert is_ready(stale, NOW, GRACE, lease=NOW - timedelta(seconds=3))
    assert heartbeat_age(stale, NOW, NOW - timedelta(seconds=3)) == timedelta(seconds=3)
    assert heartbeat_age(node(beat=None), NOW) is None
    assert not is_ready(node(beat=None), NOW, GRACE)


def test_unhealthy_hypervisor_is_not_ready_however_fresh() -> None:
    assert not is_ready(node(healthy=False), NOW, GRACE, lease=NOW)


def test_allocatable_applies_override_and_overcommit() -> None:
    assert allocatable(node()) == (8, 16 << 30)
    assert allocatable(node(overcommit={"cpu": 4.0, "memory": 1.5})) == (32, 24 << 30)
    assert allocatable(node(capacityOverride={"cpus": 4, "memory": "8Gi"})) == (4, 8 << 30)
    # 100 * 1.15 is 114.99999999999999 in floating point: still 115 CPUs.
    hundred = node()
    hundred["status"]["capacity"]["cpus"] = 100
    hundred["spec"]["overcommit"] = {"cpu": 1.15}
    assert allocatable(hundred)[0] == 115
    view = node_view(node(unschedulable=True, pool="gpu"), NOW, GRACE)
    assert view.unschedulable and view.pool == "gpu" and view.capabilities == {"snapshot"}
    assert node_view(node(drain=True), NOW, GRACE).unschedulable


def test_evictions_drain_asks_the_agent_and_lost_node_unbinds() -> None:
    nodes = {"n1": node("n1", drain=True), "n2": node("n2", beat=NOW - timedelta(minutes=10)),
             "n3": node("n3")}
    vms = [vm("a", "n1"), vm("b", "n2"), vm("c", "n3"), vm("d", None),
           vm("e", "n2", evictionPolicy="None"), vm("f", "gone")]
    gone_since = {"gone": NOW - timedelta(minutes=6)}
    out = {d.vm["metadata"]["name"]: d
           for d in evictions(vms, nodes, NOW, timedelta(minutes=5), missing_since=gone_since)}
    assert set(out) == {"a", "b", "f"}
    assert out["a"].action == Eviction.ASK_AGENT
    assert out["b"].action == Eviction.UNBIND and "600s" in out["b"].reason
    assert out["f"].action == Eviction.UNBIND and "gone" in out["f"].reason
    # A fresh Lease keeps a node whose status heartbeat is old from being declared lost,
    # and a deleted WorkerNode whose agent is still alive (it will re-register).
    kept = evictions(vms, nodes, NOW, timedelta(minutes=5), {"n2": NOW, "gone": NOW},
                     gone_since)
    assert {d.vm["metadata"]["name"] for d in kept} == {"a"}
    # Already asked: not asked again.
    asked = vm("a", "n1")
    asked["status"]["evictFrom"] = "n1"
    assert evictions([asked], nodes, NOW, timedelta(minutes=5)) == []


def test_a_node_missing_from_the_view_is_lost_only_after_the_eviction_timeout() -> None:
    """A controller whose watches have not yet delivered every WorkerNode must not
    evict the VMs bound to the ones it has not seen (it did, once: a second controller
    replica unbound healthy VMs on start)."""
    vms = [vm("a", "late"), vm("b", "late")]
    timeout = timedelta(minutes=5)
    assert evictions(vms, {}, NOW, timeout) == []
    assert evictions(vms, {}, NOW, timeout, missing_since={"late": NOW - timedelta(minutes=4)}) == []
    lost = evictions(vms, {}, NOW, timeout, missing_since={"late": NOW - timedelta(minutes=6)})
    assert [d.action for d in lost] == [Eviction.UNBIND, Eviction.UNBIND]
    # Its agent's Lease, when there is one, is the better clock.
    assert evictions(vms, {}, NOW, timeout, {"late": NOW - timedelta(minutes=1)},
                     {"late": NOW - timedelta(minutes=60)}) == []


def test_drain_holds_a_sleeping_vm_whose_snapshot_only_that_node_has() -> None:
    nodes = {"n1": node("n1", drain=True)}
    sleeping = vm("s", "n1", powerState="Sleeping")
    dozing = vm("z", "n1")  # spec already says Running (waking), status still Sleeping
    dozing["status"]["phase"] = "Sleeping"
    out = evictions([sleeping, dozing, vm("r", "n1")], nodes, NOW, timedelta(minutes=5))
    assert {d.vm["metadata"]["name"]: d.action for d in out} == {
        "s": Eviction.HOLD, "z": Eviction.HOLD, "r": Eviction.ASK_AGENT}
    assert "spec.powerState" in out[0].reason
    # A lost node is another matter: its snapshot is gone with it, the VM moves.
    lost = {"n1": node("n1", beat=NOW - timedelta(minutes=10))}
    assert [d.action for d in evictions([sleeping], lost, NOW, timedelta(minutes=5))] == [
        Eviction.UNBIND]


def test_unbound_status_clears_the_binding() -> None:
    st = unbound_status("NodeLost", "gone", NOW)
    assert st["nodeName"] is None and st["phase"] == "Pending"
    assert st["snapshot"] is None  # the snapshot stays behind on the old node
    assert {c["type"] for c in st["conditions"]} == {"Scheduled", "Ready"}


# --------------------------------------------------------------------------- drain plans

def running(name: str, node_name: str, live: bool, state: str = "Running",
            cpus: int = 2) -> dict[str, Any]:
    body = vm(name, node_name, cpus=cpus, memory="1Gi", liveMigration=live)
    body["metadata"]["uid"] = f"uid-{name}"
    body["status"]["hypervisor"] = {"state": state}
    return body


def drain_views(free_cpus: dict[str, int], caps: frozenset[str] = frozenset({"migration"})
                ) -> list[NodeView]:
    views = [NodeView("n1", capabilities=caps, cpus=16, memory=64 << 30, unschedulable=True)]
    views += [NodeView(n, capabilities=caps, cpus=c, memory=64 << 30)
              for n, c in free_cpus.items()]
    return views


def plan(vms: list[dict[str, Any]], views: list[NodeView],
         jobs: dict[str, dict[str, Any]] | None = None) -> dict[str, EvictionDecision]:
    asks = evictions(vms, {"n1": node("n1", drain=True)}, NOW, timedelta(minutes=5))
    placed = [vm_view(v) for v in vms]
    return {d.vm["metadata"]["name"]: d for d in plan_drain(asks, views, placed, jobs or {})}


def test_drain_moves_live_what_can_move_live_and_cold_moves_only_where_it_fits() -> None:
    vms = [running("live", "n1", True), running("cold", "n1", False),
           running("off", "n1", False, state="Shutdown")]
    out = plan(vms, drain_views({"n2": 3}))
    assert out["live"].action == Eviction.MIGRATE and out["live"].destination == "n2"
    # The migration takes 2 of n2's 3 CPUs: the cold VM has nowhere to go, so it stays.
    assert out["cold"].action == Eviction.HOLD
    assert "spec.liveMigration false" in out["cold"].reason and "0/" in out["cold"].reason
    assert out["off"].action == Eviction.ASK_AGENT  # nothing runs: it just goes
    out = plan(vms, drain_views({"n2": 8}))
    assert out["cold"].action == Eviction.ASK_AGENT and "restarts" in out["cold"].reason


def test_drain_holds_a_live_vm_no_node_can_receive() -> None:
    out = plan([running("live", "n1", True)], drain_views({"n2": 8}, frozenset()))
    assert out["live"].action == Eviction.HOLD
    assert "only move live" in out["live"].reason and "migration" in out["live"].reason
    refused = running("live", "n1", True)
    refused["status"]["conditions"] = [{"type": "LiveMigratable", "status": "False"}]
    assert plan([refused], drain_views({"n2": 8}))["live"].action == Eviction.ASK_AGENT


def test_drain_migrations_are_limited_per_node_and_their_capacity_is_counted() -> None:
    vms = [running(f"v{i}", "n1", True) for i in range(4)]
    first = plan(vms, drain_views({"n2": 8, "n3": 8}))
    started = [d for d in first.values() if d.action == Eviction.MIGRATE]
    assert len(started) == PARALLEL_DRAIN_MIGRATIONS
    assert all(d.action == Eviction.WAIT for d in first.values() if d not in started)
    # Next pass: those two are VmJobs under way; they still hold their destinations.
    jobs: dict[str, dict[str, Any]] = {f"ns/{drain_job_name(d.vm, 'n1')}": {
        "metadata": {"name": drain_job_name(d.vm, "n1")},
        "spec": {"payload": {"data": {"destinationNode": d.destination}}},
        "status": {"phase": "Running"}} for d in started}
    assert {d.destination for d in started} == {"n2", "n3"}  # spread
    again = plan(vms, drain_views({"n2": 2, "n3": 2}), jobs)
    assert Counter(d.action for d in again.values()) == {Eviction.WAIT: 2, Eviction.HOLD: 2}
    # A migration that failed holds its VM and says how to go on.
    failed = next(iter(jobs.values()))
    failed["status"] = {"phase": "Failed", "lastError": "the source VMM reported migration-failed"}
    name = next(d.vm["metadata"]["name"] for d in started
                if drain_job_name(d.vm, "n1") == failed["metadata"]["name"])
    held = plan(vms, drain_views({"n2": 8, "n3": 8}), jobs)[name]
    assert held.action == Eviction.HOLD and "migration-failed" in held.reason
    assert "Delete that VmJob" in held.reason
    # A job that succeeded in an earlier drain is replaced, not taken for this one's.
    failed["status"] = {"phase": "Succeeded"}
    assert plan(vms, drain_views({"n2": 8, "n3": 8}), jobs)[name].replace_job


def test_drain_blocked_condition_names_the_vms_and_why() -> None:
    out = plan([running("cold", "n1", False)], drain_views({}))
    blocked, reason, message = drain_blocked("n1", list(out.values()), 1)
    assert blocked and reason == "VmsCannotMove"
    assert message.startswith("1 VM(s) cannot leave n1: ns/cold: it cannot move live")
    assert drain_blocked("n1", [], 2) == (False, "Draining", "2 VM(s) still to move off n1")
    assert drain_blocked("n1", [], 0)[1] == "Drained"


def test_drain_holds_a_vm_whose_writable_disk_is_node_local() -> None:
    """Only a disk declared shared (or read-only) may move with its VM."""
    local = running("local", "n1", True)
    local["spec"]["disks"] = [{"name": "data", "path": "/var/lib/hyperfleet/d.raw"}]
    shared = running("shared", "n1", True)
    shared["spec"]["disks"] = [{"name": "data", "path": "/mnt/nfs/d.raw", "shared": True},
                               {"name": "iso", "path": "/var/lib/hyperfleet/i.iso",
                                "readonly": True}]
    out = plan([local, shared], drain_views({"n2": 8}))
    assert out["local"].action == Eviction.HOLD
    assert "spec.disks[0] (data) is writable and node-local" in out["local"].reason
    assert out["shared"].action == Eviction.MIGRATE
    # A lost node's VM with node-local data waits for its node instead of moving.
    lost = {"n1": node("n1", beat=NOW - timedelta(minutes=10))}
    (d,) = evictions([local], lost, NOW, timedelta(minutes=5))
    assert d.action == Eviction.HOLD and d.event == "WaitingForNode"


def test_scheduling_state_is_one_column_like_kubectl_get_nodes() -> None:
    from hyperfleet.reconcilers.nodes import scheduling_state

    assert scheduling_state({}) == "Enabled"
    assert scheduling_state({"unschedulable": True}) == "Cordoned"
    assert scheduling_state({"drain": True}) == "Draining"
    assert scheduling_state({"unschedulable": True, "drain": True}) == "Draining"
