"""The agent's handling of the VMs bound to its node, fed watch events as its informer would:
the finalizer is stored before a VM's first pass, a deletion stops the loop and the VMM
before the finalizer goes, and a VM that leaves the watch stops its loop."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from hyperfleet.operator import agent as agent_mod
from hyperfleet.operator.agent import FINALIZER, Agent
from hyperfleet.operator.settings import AgentConfig
from hyperfleet.reconcilers.kube import VMS, JsonPatch, Resource
from hyperfleet.reconcilers.models.vm import VirtualMachine
from hyperfleet.reconcilers.testing.fakekube import FakeKube

KEY = "ns/web"


def vm(rv: int = 5, finalizers: list[str] | None = None, deleting: bool = False,
       uid: str = "u1", **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web", "namespace": "ns", "uid": uid,
                            "resourceVersion": str(rv)}
    if finalizers is not None:
        meta["finalizers"] = finalizers
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine", "metadata": meta,
            "spec": {"cpus": 1, "memory": "64Mi", "boot": {"kernel": "/k"}, **spec},
            "status": {"nodeName": "a"}}


class GatedKube(FakeKube):
    """FakeKube whose finalizer writes wait for ``gate``: a slow API server."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def patch(self, res: Resource, name: str, patch: dict[str, Any] | JsonPatch,
              namespace: str | None = None, status: bool = False) -> dict[str, Any]:
        if isinstance(patch, dict) and "finalizers" in (patch.get("metadata") or {}):
            assert self.gate.wait(10)
        return super().patch(res, name, patch, namespace, status)


def make_agent(tmp_path: Path, kube: FakeKube) -> Agent:
    return Agent(AgentConfig(node_name="a", ch_binary="/bin/true",
                             socket_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "state")),
                 kube)


def stored(kube: FakeKube) -> dict[str, Any]:
    body = kube.get(VMS, "web", "ns")
    assert body is not None
    return body


async def until(cond: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_new_vm_is_driven_only_once_its_finalizer_is_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kube = GatedKube()
    kube.put(VMS, vm(), keep_version=True)
    agent = make_agent(tmp_path, kube)
    passes: list[list[str]] = []

    def converge(v: VirtualMachine) -> None:  # None: no longer ours, the loop ends
        passes.append(list(stored(kube)["metadata"].get("finalizers") or []))

    monkeypatch.setattr(agent.driver, "converge", converge)

    async def scenario() -> None:
        kube.gate.clear()
        agent.observe_vms([("ADDED", vm())])
        await asyncio.sleep(0.3)
        assert passes == []  # the finalizer write is still on its way
        kube.gate.set()
        await until(lambda: passes)
        await until(lambda: agent.loops[KEY].task.done())

    asyncio.run(scenario())
    assert passes == [[FINALIZER]]
    # Conditional on the version it was read from (a list is written whole).
    assert kube.writes == [{"metadata": {"finalizers": [FINALIZER], "resourceVersion": "5"}}]
    assert agent.bodies[KEY]["metadata"]["finalizers"] == [FINALIZER]


def test_a_finalizer_write_that_conflicts_waits_for_the_newer_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    kube.put(VMS, vm(rv=6, finalizers=["example.com/other"]), keep_version=True)
    agent = make_agent(tmp_path, kube)
    passes: list[str] = []
    monkeypatch.setattr(agent.driver, "converge", lambda v: passes.append(v.key))

    async def scenario() -> None:
        agent.observe_vms([("ADDED", vm(rv=5))])  # older than what is stored
        await asyncio.sleep(0.3)
        assert kube.writes == [] and passes == [] and not agent.finalizing
        agent.observe_vms([("MODIFIED", vm(rv=6, finalizers=["example.com/other"]))])
        await until(lambda: passes)

    asyncio.run(scenario())
    assert stored(kube)["metadata"]["finalizers"] == ["example.com/other", FINALIZER]


def test_deletion_stops_the_loop_then_the_vmm_then_releases_the_vm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    kube.put(VMS, vm(finalizers=[FINALIZER]), keep_version=True)
    agent = make_agent(tmp_path, kube)
    steps: list[str] = []

    async def loop(key: str, stopped: asyncio.Event) -> None:
        steps.append("loop")
        await stopped.wait()
        await asyncio.sleep(0.1)  # the pass in flight finishes
        steps.append("loop stopped")

    def patch(res: Resource, name: str, patch: dict[str, Any] | JsonPatch,
              namespace: str | None = None, status: bool = False) -> dict[str, Any]:
        if isinstance(patch, list):
            steps.append("finalizer removed")
        return FakeKube.patch(kube, res, name, patch, namespace, status)

    monkeypatch.setattr(agent, "vm_loop", loop)
    monkeypatch.setattr(agent.driver, "destroy", lambda ns, name: steps.append("destroyed"))
    monkeypatch.setattr(agent.storage, "remove", lambda ns, name: steps.append("disks removed"))
    monkeypatch.setattr(kube, "patch", patch)

    async def scenario() -> None:
        agent.observe_vms([("ADDED", vm(finalizers=[FINALIZER]))])
        await until(lambda: steps)
        deleting = vm(rv=7, finalizers=["example.com/other", FINALIZER], deleting=True,
                      image={"name": "img", "reclaimPolicy": "Delete"})
        kube.put(VMS, deleting, keep_version=True)
        agent.observe_vms([("MODIFIED", deleting)])
        agent.observe_vms([("MODIFIED", copy.deepcopy(deleting))])  # runs once
        await until(lambda: "finalizer removed" in steps)
        await until(lambda: not stored(kube)["metadata"].get("finalizers", [FINALIZER])
                    .count(FINALIZER))

    asyncio.run(scenario())
    assert steps == ["loop", "loop stopped", "destroyed", "disks removed", "finalizer removed"]
    assert stored(kube)["metadata"]["finalizers"] == ["example.com/other"]


def test_a_vm_deleted_while_the_agent_was_away_is_cleaned_up_at_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The informer's first list brings it being deleted: no loop, the VMM destroyed, the
    disks kept (Retain), the finalizer removed even where it is not where we last saw it."""
    kube = FakeKube()
    kube.put(VMS, vm(rv=9, finalizers=["example.com/a", FINALIZER], deleting=True,
                     image={"name": "img", "reclaimPolicy": "Retain"}), keep_version=True)
    agent = make_agent(tmp_path, kube)
    destroyed: list[str] = []
    monkeypatch.setattr(agent.driver, "destroy",
                        lambda ns, name: destroyed.append(f"{ns}/{name}"))
    monkeypatch.setattr(agent.storage, "remove",
                        lambda ns, name: pytest.fail("Retain keeps the disks"))

    async def scenario() -> None:
        # Our copy still has the finalizer first: the patch's test fails, the list is read
        # again, and the right entry goes.
        agent.observe_vms([("ADDED", vm(rv=8, finalizers=[FINALIZER], deleting=True,
                                        image={"name": "img", "reclaimPolicy": "Retain"}))])
        await until(lambda: KEY in agent.deleting and agent.deleting[KEY].done())

    asyncio.run(scenario())
    assert destroyed == [KEY] and KEY not in agent.loops
    assert stored(kube)["metadata"]["finalizers"] == ["example.com/a"]


def test_a_vm_that_leaves_the_watch_stops_its_loop_and_one_that_comes_back_starts_anew(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube()
    kube.put(VMS, vm(finalizers=[FINALIZER]), keep_version=True)
    agent = make_agent(tmp_path, kube)
    runs: list[str] = []

    async def loop(key: str, stopped: asyncio.Event) -> None:
        runs.append(agent.bodies[key]["metadata"]["uid"])
        if len(runs) == 1:
            await stopped.wait()
        # the second one ends on its own (e.g. the VM migrated away)

    monkeypatch.setattr(agent, "vm_loop", loop)

    async def scenario() -> None:
        agent.observe_vms([("ADDED", vm(finalizers=[FINALIZER]))])
        await until(lambda: runs)
        first = agent.loops[KEY]
        agent.observe_vms([("DELETED", {"metadata": {"name": "web", "namespace": "ns"}})])
        assert first.stopped.is_set() and KEY not in agent.bodies
        await until(lambda: first.task.done())
        # Bound here again, as another object of the same name.
        agent.observe_vms([("ADDED", vm(rv=10, finalizers=[FINALIZER], uid="u2"))])
        await until(lambda: len(runs) == 2 and agent.loops[KEY].task.done())
        # A loop that ended on its own is not started again by later events ...
        agent.observe_vms([("MODIFIED", vm(rv=11, finalizers=[FINALIZER], uid="u2"))])
        await asyncio.sleep(0.1)
        assert len(runs) == 2
        # ... but another object of that name (a relist that missed the deletion) is.
        agent.observe_vms([("MODIFIED", vm(rv=12, finalizers=[FINALIZER], uid="u3"))])
        await until(lambda: len(runs) == 3)

    asyncio.run(scenario())
    assert runs == ["u1", "u2", "u3"]


def test_a_deletion_whose_steps_fail_retries_each_with_backoff_until_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The VMM that would not stop and the API server that refused the finalizer's removal
    are retried (each failure logged with its wait), never skipped: the VM is released only
    once its VMM is gone."""
    monkeypatch.setattr(agent_mod, "RETRY_SECONDS", (0.01, 0.02))
    kube = FakeKube()
    deleting = vm(finalizers=[FINALIZER], deleting=True)
    kube.put(VMS, deleting, keep_version=True)
    agent = make_agent(tmp_path, kube)
    steps: list[str] = []
    failures = {"destroy": 2, "release": 2}

    def destroy(ns: str, name: str) -> None:
        if failures["destroy"]:
            failures["destroy"] -= 1
            raise OSError("VMM still there")
        steps.append("destroyed")

    def patch(res: Resource, name: str, patch: dict[str, Any] | JsonPatch,
              namespace: str | None = None, status: bool = False) -> dict[str, Any]:
        if isinstance(patch, list) and failures["release"]:
            failures["release"] -= 1
            raise ApiException(status=503, reason="unavailable")
        if isinstance(patch, list):
            steps.append("released")
        return FakeKube.patch(kube, res, name, patch, namespace, status)

    monkeypatch.setattr(agent.driver, "destroy", destroy)
    monkeypatch.setattr(kube, "patch", patch)

    async def scenario() -> None:
        agent.observe_vms([("ADDED", deleting)])
        await until(lambda: "released" in steps)

    with caplog.at_level(logging.WARNING, logger="hyperfleet.agent"):
        asyncio.run(scenario())
    assert steps == ["destroyed", "released"]
    assert FINALIZER not in stored(kube)["metadata"].get("finalizers", [])
    said = [r.getMessage() for r in caplog.records]
    assert said.count("removing the VM failed; retrying") == 2
    assert said.count("removing the finalizer failed; retrying") == 2
    assert [getattr(r, "seconds", None) for r in caplog.records
            if r.getMessage() == "removing the VM failed; retrying"] == [0.01, 0.02]
