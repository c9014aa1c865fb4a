"""Job handlers stop at a cancel between steps, before the step that cannot be undone."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from hyperfleet.reconcilers.jobs.builder import JobBuilder
from hyperfleet.reconcilers.jobs.handlers import (
    Cancelled,
    JobContext,
    vm_reboot,
    vm_restore,
    vm_snapshot,
)
from hyperfleet.reconcilers.kube import NODES, VMS, JsonPatch, Resource
from hyperfleet.reconcilers.models.common import now_utc
from hyperfleet.reconcilers.testing.fakekube import FakeKube


class Client:
    def __init__(self, calls: list[str], on_put: Callable[[str], None]) -> None:
        self.calls = calls
        self.on_put = on_put

    def info(self) -> dict[str, Any]:
        return {"state": "Running"}

    def put(self, path: str, body: Any = None) -> None:
        self.calls.append(path)
        self.on_put(path)

    def close(self) -> None:
        pass


class Pm:
    def __init__(self, socket_dir: Path, on_put: Callable[[str], None]) -> None:
        self.calls: list[str] = []
        self.socket_dir = socket_dir
        self.on_put = on_put

    def pid(self, ns: str, name: str) -> int:
        return 42

    def client(self, ns: str, name: str, wait_socket: float | None = None) -> Client:
        return Client(self.calls, self.on_put)

    def stop(self, ns: str, name: str, grace: float | None = None) -> None:
        self.calls.append("stop")

    def spawn(self, ns: str, name: str) -> None:
        self.calls.append("spawn")


class Driver:
    def __init__(self, pm: Pm) -> None:
        self.pm = pm

    def lock(self, ns: str, name: str) -> threading.Lock:
        return threading.Lock()


def context(builder: JobBuilder, tmp_path: Path, cancel_on: str | None = None
            ) -> tuple[JobContext, Pm]:
    """A handler context; the cancel arrives at once, or while the VMM does ``cancel_on``."""
    cancelled = threading.Event()

    def on_put(path: str) -> None:
        if path == cancel_on:
            cancelled.set()

    if cancel_on is None:
        cancelled.set()
    pm = Pm(tmp_path, on_put)
    job = builder.target("web", "ns").build(now=now_utc())
    ctx = JobContext(job=job, payload=job.typed_payload(), name="j", namespace="ns", node="a",
                     driver=cast(Any, Driver(pm)), kube=FakeKube(),
                     log=logging.LoggerAdapter(logging.getLogger("test")),
                     report=lambda percent, message: None, cancelled=cancelled)
    return ctx, pm


def test_restore_cancelled_before_it_stops_the_running_vmm(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{}")
    ctx, pm = context(JobBuilder("vm.restore").payload(source=str(tmp_path)), tmp_path)
    with pytest.raises(Cancelled):
        vm_restore(ctx)
    assert pm.calls == []


def test_reboot_cancelled_does_not_reboot(tmp_path: Path) -> None:
    ctx, pm = context(JobBuilder("vm.reboot"), tmp_path)
    with pytest.raises(Cancelled):
        vm_reboot(ctx)
    assert "vm.reboot" not in pm.calls


def test_snapshot_cancelled_while_pausing_resumes_without_snapshotting(tmp_path: Path) -> None:
    ctx, pm = context(JobBuilder("vm.snapshot").payload(destination=str(tmp_path / "s")),
                      tmp_path, cancel_on="vm.pause")
    with pytest.raises(Cancelled):
        vm_snapshot(ctx)
    assert pm.calls == ["vm.pause", "vm.resume"]


def test_resize_of_a_git_managed_vm_is_refused_naming_the_gitsource(tmp_path: Path) -> None:
    """GitOps owns its spec: the resize would be reverted at the next reconcile."""
    from hyperfleet.reconcilers.gitops.types import OWNER_LABEL
    from hyperfleet.reconcilers.jobs.handlers import JobFailure, vm_resize

    ctx, _ = context(JobBuilder("vm.resize").payload(desired_cpus=4), tmp_path, cancel_on="-")
    kube = FakeKube()
    kube.put(VMS, {"metadata": {"name": "web", "namespace": "ns", "generation": 1,
                                "labels": {OWNER_LABEL: "flux-like.fleet"}},
                   "spec": {"cpus": 2, "memory": "1Gi"}})
    ctx.kube = kube
    with pytest.raises(JobFailure) as err:
        vm_resize(ctx)
    assert "GitSource flux-like.fleet" in str(err.value) and "in Git" in str(err.value)
    assert not err.value.error.retryable and kube.writes == []


class NodeKube(FakeKube):
    """The VM on node n1 (4 CPUs, 8Gi), with a neighbour using 2 CPUs and 4Gi; its agent
    converges at once to a new spec (the new generation observed, Ready)."""

    def __init__(self) -> None:
        super().__init__()
        self.put(NODES, {"metadata": {"name": "n1"}, "spec": {},
                         "status": {"capacity": {"cpus": 4, "memory": "8Gi"}}})
        self.put(VMS, {"metadata": {"name": "web", "namespace": "ns", "uid": "u1",
                                    "generation": 1},
                       "spec": {"cpus": 1, "memory": "1Gi"}, "status": {"nodeName": "n1"}})
        self.put(VMS, {"metadata": {"name": "db", "namespace": "ns", "uid": "u2"},
                       "spec": {"cpus": 2, "memory": "4Gi"}, "status": {"nodeName": "n1"}})

    def patch(self, res: Resource, name: str, patch: dict[str, Any] | JsonPatch,
              namespace: str | None = None, status: bool = False) -> dict[str, Any]:
        out = super().patch(res, name, patch, namespace, status)
        if status:
            return out
        return super().patch(res, name, {"status": {
            "observedGeneration": out["metadata"]["generation"],
            "conditions": [{"type": "Ready", "status": "True"}]}}, namespace, status=True)

    @property
    def spec_patches(self) -> list[dict[str, Any]]:
        return [w for w in self.writes if "spec" in w]


@pytest.mark.parametrize(("payload", "fits"), [
    ({"desired_cpus": 2}, True),
    ({"desired_cpus": 3}, False),  # 3 + the neighbour's 2 > 4
    ({"desired_memory": "4Gi"}, True),
    ({"desired_memory": "5Gi"}, False),
])
def test_growing_a_vm_beyond_its_nodes_room_is_refused(
        tmp_path: Path, payload: dict[str, Any], fits: bool) -> None:
    from hyperfleet.reconcilers.jobs.handlers import JobFailure, vm_resize

    ctx, _ = context(JobBuilder("vm.resize").payload(**payload), tmp_path, cancel_on="-")
    kube = NodeKube()
    ctx.kube = kube
    if fits:
        result = vm_resize(ctx)
        assert result["generation"] == 2 and len(kube.spec_patches) == 1
    else:
        with pytest.raises(JobFailure) as err:
            vm_resize(ctx)
        assert "WorkerNode n1 has room for 2 CPUs and 4Gi" in str(err.value)
        assert kube.spec_patches == []
