"""The controller's pass decisions as plain functions (reconcilers/fleet.py): the statuses
it writes, and when it writes nothing. tests/unit/test_controller.py runs them through the
real Controller."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hyperfleet.reconcilers import fleet
from hyperfleet.reconcilers.eviction import Eviction, EvictionDecision
from hyperfleet.reconcilers.scheduler import vm_view

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
TS = "2030-01-01T12:00:00Z"


def node(name: str, *, phase: str = "Ready", beat: datetime | None = NOW, **spec: Any
         ) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "capacity": {"cpus": 4, "memory": "8Gi"},
                              "providers": [{"name": "cloud-hypervisor", "available": True,
                                             "healthy": True}]}
    if beat is not None:
        status["heartbeatTime"] = beat.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"metadata": {"name": name, "resourceVersion": "1"}, "spec": spec, "status": status}


def vm(name: str, node_name: str | None = None, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "t", "resourceVersion": "1", **meta},
            "spec": {"cpus": 1, "memory": "1Gi", "boot": {"kernel": "/k"}},
            "status": {"nodeName": node_name} if node_name else {}}


def test_binding_replaces_only_the_scheduled_condition() -> None:
    body = vm("a")
    body["status"]["conditions"] = [{"type": "Scheduled", "status": "False"},
                                    {"type": "Other", "status": "True"}]
    status = fleet.bound_status(body, "n1", TS)
    assert (status["nodeName"], status["phase"], status["message"]) == ("n1", "Scheduled", None)
    assert [(c["type"], c["status"]) for c in status["conditions"]] == [
        ("Other", "True"), ("Scheduled", "True")]


def test_an_unschedulable_vm_is_written_once_per_reason() -> None:
    status = fleet.unschedulable_status(vm("a"), "no node has 1 CPU free", TS)
    assert status is not None and status["phase"] == "Unschedulable"
    body = {**vm("a"), "status": status}
    assert fleet.unschedulable_status(body, "no node has 1 CPU free", TS) is None
    assert fleet.unschedulable_status(body, "another reason", TS) is not None


def test_node_health_changes_only_the_phase_that_no_longer_holds() -> None:
    grace = timedelta(seconds=20)
    assert fleet.node_health(node("n1"), NOW, grace, NOW) is None
    lapsed = fleet.node_health(node("n1"), NOW + timedelta(minutes=1), grace, NOW)
    assert lapsed is not None
    ready, patch = lapsed
    assert not ready and patch["status"]["phase"] == "NotReady"
    assert patch["status"]["conditions"][0]["reason"] == "HeartbeatLapsed"
    back = fleet.node_health(node("n1", phase="NotReady"), NOW, grace, NOW)
    assert back is not None and back[0] and back[1]["status"]["phase"] == "Ready"


def test_terminating_vms_keep_their_place_but_are_not_placed() -> None:
    vms = {"t/a": vm("a"), "t/b": vm("b", "n1"),
           "t/gone": vm("gone", deletionTimestamp=TS)}
    pending, placed = fleet.pending_and_placed([vm_view(b) for b in vms.values()], vms)
    assert [v.key for v in pending] == ["t/a"] and [v.key for v in placed] == ["t/b"]


def test_drain_blocked_is_written_on_change_and_dropped_after_the_drain() -> None:
    draining = node("n1", drain=True)
    held = EvictionDecision(vm("a", "n1"), Eviction.HOLD, "n1", "no other node fits it")
    updates = fleet.drain_conditions({"n1": draining}, [vm("a", "n1")], [held], TS)
    (cond,) = updates["n1"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("DrainBlocked", "True",
                                                               "VmsCannotMove")
    draining["status"]["conditions"] = updates["n1"]
    assert fleet.drain_conditions({"n1": draining}, [vm("a", "n1")], [held], TS) == {}
    undrained = {**draining, "spec": {}}
    assert fleet.drain_conditions({"n1": undrained}, [], [], TS) == {"n1": []}


def test_allocations_are_written_only_where_they_differ() -> None:
    nodes = {"n1": node("n1"), "n2": node("n2", unschedulable=True)}
    placed = [vm_view(vm("a", "n1"))]
    due = fleet.allocation_updates(nodes, placed, due=True)
    assert due["n1"]["vmCount"] == 1 and due["n1"]["allocated"]["cpus"] == 1
    assert due["n2"]["scheduling"] == "Cordoned" and due["n2"]["vmCount"] == 0
    nodes["n1"]["status"] |= due["n1"]
    assert "n1" not in fleet.allocation_updates(nodes, placed, due=True)
    assert set(fleet.allocation_updates(nodes, placed, due=False)) == {"n2"}
