"""The controller's view of the cluster: late watch events, terminating VMs, node clocks.

Runs the real Controller against FakeKube, the in-memory API (resourceVersions and
conditional patches as the API server does them)."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from hyperfleet.operator.controller import Controller
from hyperfleet.operator.settings import ControllerConfig
from hyperfleet.reconcilers.informer import Informer
from hyperfleet.reconcilers.kube import NODES, VMS
from hyperfleet.reconcilers.models.common import rfc3339
from hyperfleet.reconcilers.testing.fakekube import FakeKube


def event(kind: str) -> Any:
    return {"type": kind, "object": {}}


def node(name: str, cpus: int, beat: datetime) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {},
            "status": {"capacity": {"cpus": cpus, "memory": "16Gi"}, "phase": "Ready",
                       "heartbeatTime": rfc3339(beat),
                       "providers": [{"name": "cloud-hypervisor", "available": True,
                                      "healthy": True}]}}


def vm(name: str, cpus: int, node_name: str | None = None, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "t", **meta},
            "spec": {"cpus": cpus, "memory": "1Gi", "boot": {"kernel": "/k"}},
            "status": {"nodeName": node_name, "phase": "Running"} if node_name else {}}


def bound(kube: FakeKube, name: str) -> str | None:
    node_name = kube.objs[("virtualmachines", f"t/{name}")].get("status", {}).get("nodeName")
    return str(node_name) if node_name else None


def test_a_late_watch_event_does_not_undo_a_binding() -> None:
    async def scenario() -> FakeKube:
        kube = FakeKube()
        ctl = Controller(ControllerConfig(), kube)
        zeta = kube.put(VMS, vm("zeta", 4))
        ctl.observe(ctl.vms, "t/zeta", event("ADDED"), cast(Any, zeta))
        await ctl.pass_once()  # no node yet: zeta is Unschedulable
        stale = copy.deepcopy(ctl.vms["t/zeta"])  # ... and that write's event is in flight
        n1 = kube.put(NODES, node("n1", 4, datetime.now(UTC)))
        ctl.observe(ctl.nodes, "n1", event("ADDED"), cast(Any, n1))
        await ctl.pass_once()  # zeta bound to n1, filling it
        alpha = kube.put(VMS, vm("alpha", 4))
        ctl.observe(ctl.vms, "t/alpha", event("ADDED"), cast(Any, alpha))
        ctl.observe(ctl.vms, "t/zeta", event("MODIFIED"), cast(Any, stale))
        await ctl.pass_once()
        return kube

    kube = asyncio.run(scenario())
    assert bound(kube, "zeta") == "n1"
    assert bound(kube, "alpha") is None  # n1 has no room left


def test_a_terminating_vm_keeps_its_place_until_its_agent_stopped_it() -> None:
    async def scenario() -> FakeKube:
        kube = FakeKube()
        kube.put(NODES, node("n1", 4, datetime.now(UTC)))
        kube.put(VMS, vm("old", 4, "n1", deletionTimestamp="2030-01-01T00:00:00Z",
                         finalizers=["hyperfleet.dev/agent"]))
        kube.put(VMS, vm("new", 4))
        ctl = Controller(ControllerConfig(), kube)
        await ctl.prime()
        await ctl.pass_once()
        return kube

    kube = asyncio.run(scenario())
    assert bound(kube, "new") is None


def test_a_vm_is_not_bound_to_a_node_deleted_during_the_pass() -> None:
    async def scenario() -> FakeKube:
        kube = FakeKube()
        kube.put(VMS, vm("a", 1))
        ctl = Controller(ControllerConfig(), kube)
        await ctl.prime()
        await ctl._bind(ctl.vms["t/a"], "n1")  # the scheduler chose n1, then it went away
        return kube

    assert bound(asyncio.run(scenario()), "a") is None


def test_node_liveness_is_measured_by_the_controllers_clock() -> None:
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    ctl = Controller(ControllerConfig(), FakeKube())
    # The agent's clock is an hour behind: its fresh heartbeat still means "alive now".
    ctl.nodes["slow"] = node("slow", 4, now - timedelta(hours=1))
    # This one's clock is ten minutes ahead, and it stops heartbeating.
    ctl.nodes["fast"] = node("fast", 4, now + timedelta(minutes=10))
    bodies, alive = ctl.liveness(now)
    assert alive == {"slow": now, "fast": now}
    assert all("heartbeatTime" not in b["status"] for b in bodies.values())
    later = now + timedelta(minutes=9)
    ctl.nodes["slow"] = node("slow", 4, now - timedelta(hours=1) + timedelta(minutes=9))
    _, alive = ctl.liveness(later)
    assert alive == {"slow": later, "fast": now}  # fast: silent for 9 minutes, whatever it said


def test_passes_are_spaced_by_twice_their_cost_within_bounds() -> None:
    from hyperfleet.reconcilers.fleet import pass_gap

    assert pass_gap(0.001) == 0.02  # a small fleet reacts at once
    assert pass_gap(0.1) == 0.2  # a 10k-VM pass: passes take at most a third of the time
    assert pass_gap(3.0) == 1.0  # never more than a second between passes


def test_the_vm_view_is_offered_to_others_only_once_the_informer_has_listed_and_events_keep_it() -> None:
    async def scenario() -> None:
        ctl = Controller(ControllerConfig(), FakeKube())
        ctl.vm_informer = Informer(cast(Any, FakeKube()), VMS)  # (never run: events are fed by hand)
        heard: list[tuple[str, str, Any]] = []
        ctl.vm_subscribers.append(lambda t, b: heard.append(
            (t, b["metadata"]["name"], b["metadata"].get("labels"))))
        web = {"metadata": {"name": "web", "namespace": "t", "resourceVersion": "5",
                            "labels": {"pool": "p"}}}
        ctl.observe_vms([("ADDED", web)])
        assert ctl.vm_snapshot() is None  # the first list is not in yet
        ctl.vm_informer.synced.set()
        assert ctl.vm_snapshot() == [web]
        # An older event never replaces a newer copy; a relist's bare DELETED passes on
        # what the view had (its labels: the pool workers need them).
        ctl.observe_vms([("MODIFIED", {**web, "metadata": {**web["metadata"],
                                                            "resourceVersion": "4"}})])
        assert ctl.vms["t/web"]["metadata"]["resourceVersion"] == "5"
        ctl.observe_vms([("DELETED", {"metadata": {"name": "web", "namespace": "t"}})])
        assert ctl.vm_snapshot() == []
        assert heard == [("ADDED", "web", {"pool": "p"}), ("MODIFIED", "web", {"pool": "p"}),
                         ("DELETED", "web", {"pool": "p"})]

    asyncio.run(scenario())
