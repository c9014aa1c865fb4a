"""The agent's VM status writes: conditional on a version that still binds the VM to
this node, so a late write never undoes the controller's binding or unbinding."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from hyperfleet.operator.agent import Agent
from hyperfleet.operator.settings import AgentConfig
from hyperfleet.reconcilers.kube import NODES, VMS, Resource
from hyperfleet.reconcilers.testing.fakekube import FakeKube


def stored(body: dict[str, Any], res: Resource = VMS) -> FakeKube:
    """An API holding just ``body``, at the resourceVersion it carries."""
    kube = FakeKube()
    kube.put(res, body, keep_version=True)
    return kube


def vm_of(kube: FakeKube, res: Resource = VMS, name: str = "web", ns: str | None = "ns"
          ) -> dict[str, Any]:
    """The stored object itself (not a copy), for a test to change behind the agent's back."""
    return kube.objs[kube._key(res, name, ns)]


def vm(rv: int, node: str | None, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "ns", "resourceVersion": str(rv)},
            "status": {"nodeName": node, **status}}


def agent(kube: FakeKube) -> Agent:
    return Agent(AgentConfig(node_name="a", ch_binary="/bin/true", socket_dir="/tmp/hf-unit"),
                 kube)


@pytest.mark.parametrize("moved", [
    {"nodeName": None},  # the controller unbound it (node lost)
    {"nodeName": "b"},  # ... and placed it elsewhere
    {"nodeName": "a", "evictFrom": "a"},  # drain asked us to stop it
])
def test_a_write_racing_a_binding_change_is_dropped(moved: dict[str, Any]) -> None:
    kube = stored(vm(7, "a"))
    seen = copy.deepcopy(vm_of(kube))
    vm_of(kube)["status"].update(moved)
    vm_of(kube)["metadata"]["resourceVersion"] = "8"
    assert agent(kube).write_status(seen, {"phase": "Running", "nodeName": "a"}) is None
    assert kube.writes == [] and vm_of(kube)["status"]["nodeName"] == moved["nodeName"]


def test_a_write_racing_another_change_is_retried_on_the_fresh_version() -> None:
    kube = stored(vm(7, "a"))
    seen = copy.deepcopy(vm_of(kube))
    vm_of(kube)["metadata"]["resourceVersion"] = "9"  # e.g. a spec edit
    out = agent(kube).write_status(seen, {"phase": "Sleeping", "snapshot": {"path": "/s"}})
    assert out is not None and out["status"]["snapshot"] == {"path": "/s"}
    assert [w["metadata"]["resourceVersion"] for w in kube.writes] == ["9"]


def test_a_deleted_vm_is_not_written() -> None:
    kube = stored(vm(7, "a"))
    seen = copy.deepcopy(vm_of(kube))
    kube.delete(VMS, "web", "ns")
    assert agent(kube).write_status(seen, {"phase": "Running"}) is None


def test_the_heartbeat_status_write_keeps_the_controllers_node_conditions() -> None:
    """A merge patch replaces the whole conditions list: the agent's periodic status write
    must send DrainBlocked (the controller's) back unchanged, onto the version it read."""
    drain = {"type": "DrainBlocked", "status": "True", "reason": "VmsCannotMove",
             "message": "1 VM(s) cannot leave a"}
    node = {"metadata": {"name": "a", "resourceVersion": "3"},
            "status": {"conditions": [{"type": "Ready", "status": "False"}, drain]}}

    kube = stored(node, NODES)
    a = Agent(AgentConfig(node_name="a", ch_binary="/bin/true", socket_dir="/tmp/hf-unit",
                          fence_after_seconds=0), kube)
    a.node_status = {"phase": "Ready", "conditions": [{"type": "Ready", "status": "True"}]}
    a.heartbeat()
    conditions = {c["type"]: c for c in vm_of(kube, NODES, "a", None)["status"]["conditions"]}
    assert conditions == {"Ready": {"type": "Ready", "status": "True"}, "DrainBlocked": drain}
    assert kube.writes[0]["metadata"]["resourceVersion"] == "3"
