"""The agent's VM status writes: conditional on a version that still binds the VM to
this node, so a late write never undoes the controller's binding or unbinding."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from hyperfleet.operator.agent import Agent
from hyperfleet.operator.settings import AgentConfig
from hyperfleet.reconcilers.kube import Conflict, Gone, Resource


class FakeKube:
    """One VM with a resourceVersion, and the API server's precondition check."""

    def __init__(self, vm: dict[str, Any]) -> None:
        self.vm: dict[str, Any] | None = vm
        self.writes: list[dict[str, Any]] = []

    def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return copy.deepcopy(self.vm)

    def patch(self, res: Resource, name: str, patch: dict[str, Any],
              namespace: str | None = None, status: bool = False) -> dict[str, Any]:
        if self.vm is None:
            raise Gone(name)
        if patch["metadata"]["resourceVersion"] != self.vm["metadata"]["resourceVersion"]:
            raise Conflict(name)
        self.vm["status"].update(patch["status"])
        self.vm["metadata"]["resourceVersion"] = str(int(self.vm["metadata"]["resourceVersion"]) + 1)
        self.writes.append(patch)
        return copy.deepcopy(self.vm)


def vm_of(kube: FakeKube) -> dict[str, Any]:
    assert kube.vm is not None
    return kube.vm


def vm(rv: int, node: str | None, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "ns", "resourceVersion": str(rv)},
            "status": {"nodeName": node, **status}}


def agent(kube: FakeKube) -> Agent:
    return Agent(AgentConfig(node_name="a", ch_binary="/bin/true", socket_dir="/tmp/hf-unit"),
                 kube)  # type: ignore[arg-type]


@pytest.mark.parametrize("moved", [
    {"nodeName": None},  # the controller unbound it (node lost)
    {"nodeName": "b"},  # ... and placed it elsewhere
    {"nodeName": "a", "evictFrom": "a"},  # drain asked us to stop it
])
def test_a_write_racing_a_binding_change_is_dropped(moved: dict[str, Any]) -> None:
    kube = FakeKube(vm(7, "a"))
    seen = copy.deepcopy(vm_of(kube))
    assert kube.vm is not None
    kube.vm["status"].update(moved)
    kube.vm["metadata"]["resourceVersion"] = "8"
    assert agent(kube).write_status(seen, {"phase": "Running", "nodeName": "a"}) is None
    assert kube.writes == [] and kube.vm["status"]["nodeName"] == moved["nodeName"]


def test_a_write_racing_another_change_is_retried_on_the_fresh_version() -> None:
    kube = FakeKube(vm(7, "a"))
    seen = copy.deepcopy(vm_of(kube))
    assert kube.vm is not None
    kube.vm["metadata"]["resourceVersion"] = "9"  # e.g. a spec edit
    out = agent(kube).write_status(seen, {"phase": "Sleeping", "snapshot": {"path": "/s"}})
    assert out is not None and out["status"]["snapshot"] == {"path": "/s"}
    assert [w["metadata"]["resourceVersion"] for w in kube.writes] == ["9"]


def test_a_deleted_vm_is_not_written() -> None:
    kube = FakeKube(vm(7, "a"))
    seen = copy.deepcopy(vm_of(kube))
    kube.vm = None
    assert agent(kube).write_status(seen, {"phase": "Running"}) is None


def test_the_heartbeat_status_write_keeps_the_controllers_node_conditions() -> None:
    """A merge patch replaces the whole conditions list: the agent's periodic status write
    must send DrainBlocked (the controller's) back unchanged, onto the version it read."""
    drain = {"type": "DrainBlocked", "status": "True", "reason": "VmsCannotMove",
             "message": "1 VM(s) cannot leave a"}
    node = {"metadata": {"name": "a", "resourceVersion": "3"},
            "status": {"conditions": [{"type": "Ready", "status": "False"}, drain]}}

    class NodeKube(FakeKube):
        def renew_lease(self, *args: Any) -> None:
            pass

    kube = NodeKube(node)
    a = Agent(AgentConfig(node_name="a", ch_binary="/bin/true", socket_dir="/tmp/hf-unit",
                          fence_after_seconds=0), kube)  # type: ignore[arg-type]
    a.node_status = {"phase": "Ready", "conditions": [{"type": "Ready", "status": "True"}]}
    a.heartbeat()
    conditions = {c["type"]: c for c in vm_of(kube)["status"]["conditions"]}
    assert conditions == {"Ready": {"type": "Ready", "status": "True"}, "DrainBlocked": drain}
    assert kube.writes[0]["metadata"]["resourceVersion"] == "3"
