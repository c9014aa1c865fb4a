"""The benchmarks' stand-in VMM (bench/fastvmm) under the agent's own driver, unchanged.

ProcessManager spawns it with the agent's command line and VmDriver takes a VM through
its lifecycle on it, as on cloud-hypervisor: Running, a live resize and disk hotplug,
Paused, Sleeping and back, Stopped, a kill -9 of the VMM and the restart that follows,
an agent restart adopting it. The event-monitor file must read like upstream's.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fastvmm import fastvmm_binary
from hyperfleet.reconcilers.driver import VmDriver
from hyperfleet.reconcilers.hypervisor.client import ChClient, ChError
from hyperfleet.reconcilers.hypervisor.events import EventTail
from hyperfleet.reconcilers.hypervisor.process import ProcessManager
from tests import PLACEHOLDER_KERNEL
from tests.unit.test_driver import respec, step

NS, NAME = "default", "fast1"
MiB = 1 << 20


@pytest.fixture(scope="module")
def binary() -> str:
    return fastvmm_binary()


@pytest.fixture
def sockdir(binary: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hff", dir="/tmp"))  # sun_path is 108 bytes
    yield d
    ProcessManager(binary, d).stop(NS, NAME, grace=1)  # whatever a test left running
    shutil.rmtree(d, ignore_errors=True)


def vm_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": NAME, "namespace": NS, "generation": 1, "uid": "u"},
        "spec": {"cpus": 1, "maxCpus": 2, "memory": "256Mi", "maxMemory": "1Gi",
                 "boot": {"kernel": PLACEHOLDER_KERNEL}, "runStrategy": "Always", **spec},
        "status": {"nodeName": "node-a"},
    }


def converge(drv: VmDriver, body: dict[str, Any], phase: str) -> list[str]:
    """Passes until the VM is converged in ``phase``; the event reasons on the way."""
    reasons: list[str] = []
    for _ in range(4):
        out = step(drv, body)
        reasons += [reason for _, reason, _ in out.events]
        if out.converged and body["status"]["phase"] == phase:
            return reasons
    raise AssertionError(f"not converged to {phase}: {body['status']}")


def wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def info(pm: ProcessManager) -> dict[str, Any] | None:
    client = pm.client(NS, NAME)
    try:
        return client.info()
    finally:
        client.close()


def test_the_driver_runs_a_vm_lifecycle_on_fastvmm(sockdir: Path, binary: str) -> None:
    pm = ProcessManager(binary, sockdir)
    drv = VmDriver(pm, "node-a")
    root, data = sockdir / "root.raw", sockdir / "data.raw"
    root.write_bytes(b"")
    data.write_bytes(b"")
    disks = [{"name": "root", "path": str(root)}]
    b = vm_body(disks=disks)

    assert "Booted" in converge(drv, b, "Running")
    st = b["status"]
    assert st["hypervisor"]["state"] == "Running" and st["hypervisor"]["bootMemory"] == 256 * MiB
    first_pid = st["hypervisor"]["pid"]
    vm = info(pm)
    assert vm is not None and vm["state"] == "Running"
    assert vm["config"]["payload"] == {"kernel": PLACEHOLDER_KERNEL}
    assert vm["config"]["memory"] == {"size": 256 * MiB, "hotplug_size": 768 * MiB}

    # Live changes: a resize and a disk hotplug, which the next pass sees as done.
    respec(b, cpus=2, memory="512Mi", disks=[*disks, {"name": "data", "path": str(data)}])
    assert {"Resized", "DeviceAdded"} <= set(converge(drv, b, "Running"))
    vm = info(pm)
    assert vm is not None and vm["config"]["cpus"]["boot_vcpus"] == 2
    assert vm["config"]["memory"]["size"] == 512 * MiB
    assert [d["id"] for d in vm["config"]["disks"]] == ["root", "data"]
    respec(b, disks=disks)
    assert "DeviceRemoved" in converge(drv, b, "Running")

    respec(b, powerState="Paused")
    assert "Paused" in converge(drv, b, "Paused")
    assert (info(pm) or {}).get("state") == "Paused"
    respec(b, powerState="Running")
    assert "Resumed" in converge(drv, b, "Running")

    # Sleep: pause, snapshot, VMM gone; wake: a new VMM restores and resumes.
    respec(b, powerState="Sleeping")
    assert "Snapshotted" in converge(drv, b, "Sleeping")
    assert pm.pid(NS, NAME) is None
    assert (pm.paths(NS, NAME).snapshots / "state.json").exists()
    respec(b, powerState="Running")
    assert {"Restored", "Resumed"} <= set(converge(drv, b, "Running"))
    assert b["status"]["snapshot"]["restoredAt"]
    assert not (pm.paths(NS, NAME).snapshots / "state.json").exists()
    assert b["status"]["hypervisor"]["pid"] != first_pid

    respec(b, powerState="Stopped")
    assert "Stopped" in converge(drv, b, "Stopped")
    assert (info(pm) or {}).get("state") == "Created"  # as upstream after vm.shutdown
    respec(b, powerState="Running")
    assert "Booted" in converge(drv, b, "Running")

    # kill -9 of the VMM: runStrategy Always restarts it at once, and counts it.
    pid = pm.pid(NS, NAME)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: pm.pid(NS, NAME) is None, "VMM exit")
    assert "Restarted" in converge(drv, b, "Running")
    assert b["status"]["restartCount"] == 1
    assert b["status"]["hypervisor"]["pid"] not in (None, pid)

    # A restarted agent adopts the running VMM instead of starting another.
    pm2 = ProcessManager(binary, sockdir)
    drv2 = VmDriver(pm2, "node-a")
    before = pm2.pid(NS, NAME)
    assert pm2.discover() == [(NS, NAME)]
    converge(drv2, b, "Running")
    assert pm2.pid(NS, NAME) == before

    drv2.destroy(NS, NAME)
    paths = pm2.paths(NS, NAME)
    assert pm2.pid(NS, NAME) is None
    assert not paths.socket.exists() and not paths.pidfile.exists()


def test_fastvmm_answers_and_reports_events_like_the_vmm(sockdir: Path, binary: str) -> None:
    pm = ProcessManager(binary, sockdir)
    pm.spawn(NS, NAME)
    paths = pm.paths(NS, NAME)
    tail = EventTail(paths.events)
    client = ChClient(str(paths.socket))
    try:
        assert client.ping()["pid"] == pm.pid(NS, NAME)
        assert client.info() is None  # 404 "VM is not created"
        with pytest.raises(ChError) as err:
            client.put("vm.boot")
        assert (err.value.status, err.value.messages) == (
            404, ["Error from API", "The VM could not boot", "VM config is missing"])
        with pytest.raises(ChError) as err:
            client.put("vm.nosuch")
        assert (err.value.status, err.value.messages) == (404, ["Not Found"])
        config = {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 64 * MiB},
                  "payload": {"kernel": PLACEHOLDER_KERNEL, "cmdline": "console=ttyS0"}}
        client.create(config)
        assert client.info() == {"config": config, "state": "Created",
                                 "memory_actual_size": 64 * MiB}
        client.put("vm.boot")
        with pytest.raises(ChError) as err:
            client.put("vm.resume")
        assert err.value.status == 500 and err.value.messages[-1] == \
            "Invalid transition: InvalidStateTransition(Running, Running)"
        client.put("vm.reboot")
        client.put("vm.delete")
        assert client.info() is None
        client.shutdown_vmm()
        wait_for(lambda: pm.pid(NS, NAME) is None, "VMM exit after vmm.shutdown")
        assert not paths.socket.exists()
    finally:
        client.close()
    events = tail.read()
    assert all(set(e) == {"timestamp", "source", "event", "properties"} for e in events)
    assert all(set(e["timestamp"]) == {"secs", "nanos"} and e["properties"] is None
               for e in events)
    assert [f"{e['source']}:{e['event']}" for e in events] == [
        "vmm:starting", "vm:booting", "vm:booting", "vm:booted", "vm:resuming",
        "vm:rebooting", "vm:rebooted", "vm:shutdown", "vm:deleted", "vmm:shutdown"]


def test_a_kept_alive_client_outlives_its_vmm(sockdir: Path, binary: str) -> None:
    """ChClient keeps its connection open between calls: one to a VMM that was killed and
    replaced is noticed and a new one opened; a VMM that stops answering is a 504."""
    pm = ProcessManager(binary, sockdir)
    pm.spawn(NS, NAME)
    client = pm.client(NS, NAME)
    try:
        first = client.ping()["pid"]
        assert client.ping()["pid"] == first
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: pm.pid(NS, NAME) is None, "VMM exit")
        pm.spawn(NS, NAME)
        second = client.ping()["pid"]  # waits for the new socket, on a new connection
        assert second not in (None, first)
        os.kill(second, signal.SIGSTOP)
        try:
            client.timeout = 0.2
            with pytest.raises(ChError) as err:
                client.info()
            assert err.value.status == 504 and not err.value.transient
        finally:
            os.kill(second, signal.SIGCONT)
        client.timeout = 10.0
        assert client.info() is None
    finally:
        client.close()
