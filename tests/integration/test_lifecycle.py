"""The agent drives every VM lifecycle transition on the real API server, against the CH
double and against the genuine cloud-hypervisor (``backend``: each test runs on both).

Under this machine's KVM (PVM) the real VMM creates, boots, pauses, snapshots, resizes and
hot-plugs, but the guest kernel hangs: what only a guest can do (power itself off, run the
guest agent) stays on the double, with the reason next to the test.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.reconcilers.hypervisor.client import ChClient
from hyperfleet.reconcilers.hypervisor.process import pid_alive
from hyperfleet.reconcilers.vm import ready_settled

from .conftest import Backend, Cluster, wait_for

MiB = 1 << 20


def _vm(backend: Backend, name: str, strategy: str = "Always", **spec: Any) -> str:
    """A VirtualMachine whose kernel and root disk exist (the real VMM opens them)."""
    body = {
        "apiVersion": "hyperfleet.dev/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {
            "cpus": 1, "maxCpus": 4, "memory": "256Mi", "maxMemory": "1Gi",
            "boot": {"kernel": str(backend.kernel), "cmdline": "console=ttyS0"},
            "disks": [{"name": "root", "path": backend.disk(name)}],
            "runStrategy": strategy,
            **spec,
        },
    }
    return json.dumps(body)


@pytest.fixture
def node(cluster: Cluster, backend: Backend) -> Iterator[str]:
    n = cluster.node("a")
    cluster.start_controller()
    cluster.start_agent(n, ch_binary=backend.binary)
    wait_for(lambda: _node_phase(cluster, n) == "Ready", 60, "node Ready", cluster)
    yield n


def _node_phase(cluster: Cluster, node: str) -> str | None:
    return ((cluster.get("wn", node, namespaced=False) or {}).get("status") or {}).get("phase")


def _status(cluster: Cluster, name: str) -> dict[str, Any]:
    return (cluster.get("hvm", name) or {}).get("status") or {}


def _patch(cluster: Cluster, name: str, spec: dict[str, Any]) -> None:
    cluster.kubectl("patch", "hvm", name, "--type=merge", "-p", json.dumps({"spec": spec}))


def _wait_phase(cluster: Cluster, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = _status(cluster, name)
        # Settled: Ready=True when running, or Ready=False saying it is stopped, paused or
        # asleep as asked (KubeVirt's meaning of Ready).
        ready = {c["type"]: c for c in st.get("conditions", [])}.get("Ready")
        vm = cluster.get("hvm", name) or {}
        current = st.get("observedGeneration") == vm.get("metadata", {}).get("generation")
        return st if st.get("phase") == phase and ready_settled(ready) and current else None

    result: dict[str, Any] = wait_for(check, timeout, f"{name} {phase}", cluster)
    return result


def _info(status: dict[str, Any]) -> dict[str, Any]:
    client = ChClient(status["apiSocket"])
    try:
        info = client.info()
    finally:
        client.close()
    assert info is not None
    return info


def _events(cluster: Cluster, name: str) -> list[str]:
    out = cluster.kubectl("get", "events", "-o", "json").stdout
    return [e["reason"] for e in json.loads(out)["items"]
            if e["involvedObject"].get("name") == name]


def _failure(cluster: Cluster, name: str) -> dict[str, Any] | None:
    st = _status(cluster, name)
    cond = {c["type"]: c for c in st.get("conditions", [])}.get("Failure")
    return cond if cond and cond["status"] == "True" else None


def test_power_states_sleep_wake_and_delete(cluster: Cluster, backend: Backend,
                                            node: str) -> None:
    assert cluster.apply(_vm(backend, "vm1")).returncode == 0
    st = _wait_phase(cluster, "vm1", "Running")
    assert _info(st)["state"] == "Running"
    assert st["hypervisor"]["bootMemory"] == 256 * MiB

    _patch(cluster, "vm1", {"powerState": "Paused"})
    st = _wait_phase(cluster, "vm1", "Paused")
    assert _info(st)["state"] == "Paused"

    _patch(cluster, "vm1", {"powerState": "Running"})
    st = _wait_phase(cluster, "vm1", "Running")
    assert _info(st)["state"] == "Running"

    _patch(cluster, "vm1", {"powerState": "Stopped"})
    st = _wait_phase(cluster, "vm1", "Stopped")
    # cloud-hypervisor keeps the config after vm.shutdown and reports Created (never the
    # Shutdown its docs name), ready to boot again.
    assert _info(st)["state"] == "Created"

    _patch(cluster, "vm1", {"powerState": "Running"})
    st = _wait_phase(cluster, "vm1", "Running")
    pid_before_sleep = st["hypervisor"]["pid"]

    _patch(cluster, "vm1", {"powerState": "Sleeping"})
    st = _wait_phase(cluster, "vm1", "Sleeping")
    assert st["hypervisor"].get("pid") is None  # the host is freed (null is dropped)
    snap = Path(st["snapshot"]["path"])
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "memory-ranges",
                                                      "state.json"]
    assert st["snapshot"]["sizeBytes"] > 0
    assert not pid_alive(pid_before_sleep)

    _patch(cluster, "vm1", {"powerState": "Running"})
    st = _wait_phase(cluster, "vm1", "Running")
    info = _info(st)
    assert info["state"] == "Running"
    assert info["config"]["memory"]["size"] == 256 * MiB  # restored, not recreated
    assert st["snapshot"]["restoredAt"]
    assert not snap.exists()  # consumed: a later crash must not resurrect old memory
    reasons = _events(cluster, "vm1")
    for r in ("Booted", "Paused", "Resumed", "Stopped", "Snapshotted", "Restored"):
        assert r in reasons

    pid, socket = st["hypervisor"]["pid"], Path(st["apiSocket"])
    cluster.kubectl("delete", "hvm", "vm1", "--timeout=60s")
    assert cluster.get("hvm", "vm1") is None
    assert not pid_alive(pid) and not socket.exists()  # no VMM, no socket left behind


def test_resize_hotplug_and_cold_change(cluster: Cluster, backend: Backend,
                                        node: str) -> None:
    assert cluster.apply(_vm(backend, "vm2")).returncode == 0
    st = _wait_phase(cluster, "vm2", "Running")
    pid = st["hypervisor"]["pid"]

    def ram(cfg: dict[str, Any]) -> int:
        mem = cfg["memory"]
        return int(mem["size"]) + int(mem.get("hotplugged_size") or 0)

    _patch(cluster, "vm2", {"cpus": 3, "memory": "512Mi"})
    st = _wait_phase(cluster, "vm2", "Running")
    cfg = _info(st)["config"]
    assert cfg["cpus"]["boot_vcpus"] == 3 and ram(cfg) == 512 * MiB
    assert st["hypervisor"]["pid"] == pid  # live: same process, no reboot
    # A second resize: the VMM now reports 512 MiB as its size, yet the VM may still grow
    # to maxMemory live (the boot size, not the reported one, fixes the ceiling).
    _patch(cluster, "vm2", {"cpus": 2, "memory": "768Mi"})
    st = _wait_phase(cluster, "vm2", "Running")
    cfg = _info(st)["config"]
    assert cfg["cpus"]["boot_vcpus"] == 2 and ram(cfg) == 768 * MiB
    assert st["hypervisor"]["pid"] == pid
    assert "Recreating" not in _events(cluster, "vm2")

    root, data = backend.disk("vm2"), backend.disk("vm2-data")
    _patch(cluster, "vm2", {"disks": [{"name": "root", "path": root},
                                      {"name": "data", "path": data}]})
    st = _wait_phase(cluster, "vm2", "Running")
    disks = {d["id"]: d["path"] for d in _info(st)["config"]["disks"]}
    assert disks == {"root": root, "data": data}

    _patch(cluster, "vm2", {"disks": [{"name": "root", "path": root}]})
    st = _wait_phase(cluster, "vm2", "Running")
    assert [d["id"] for d in _info(st)["config"]["disks"]] == ["root"]
    assert st["hypervisor"]["pid"] == pid

    # A kernel change cannot be applied live: the VM is recreated and says so.
    kernel2 = backend.kernel_alias("vmlinux-2")
    _patch(cluster, "vm2", {"boot": {"kernel": kernel2}})
    st = _wait_phase(cluster, "vm2", "Running")
    assert _info(st)["config"]["payload"]["kernel"] == kernel2
    recreated = {c["type"]: c for c in st["conditions"]}["Recreated"]
    assert "payload changed" in recreated["message"]
    assert "Recreating" in _events(cluster, "vm2")


def test_crash_restart_backoff_and_agent_adoption(cluster: Cluster, backend: Backend,
                                                  node: str) -> None:
    assert cluster.apply(_vm(backend, "vm3")).returncode == 0
    st = _wait_phase(cluster, "vm3", "Running")
    pid = st["hypervisor"]["pid"]
    assert st["restartCount"] == 0

    os.kill(pid, signal.SIGKILL)
    st = wait_for(lambda: (s := _status(cluster, "vm3")).get("restartCount") == 1
                  and s.get("phase") == "Running" and s["hypervisor"]["pid"] != pid and s,
                  30, "restart after kill -9", cluster)
    assert _info(st)["state"] == "Running"
    assert "Restarted" in _events(cluster, "vm3")

    # A second crash in the same streak waits out a backoff before the restart.
    os.kill(st["hypervisor"]["pid"], signal.SIGKILL)
    backoff = wait_for(lambda: (s := _status(cluster, "vm3")).get("nextRestartTime") and s,
                       30, "restart backoff", cluster)
    assert backoff["consecutiveRestarts"] == 1
    st = wait_for(lambda: (s := _status(cluster, "vm3")).get("restartCount") == 2
                  and s.get("phase") == "Running" and s, 30, "restart after backoff", cluster)
    assert "BackOff" in _events(cluster, "vm3")
    assert _info(st)["state"] == "Running"

    # kill -9 of the agent: the VMs keep running, and the new agent adopts them.
    new_pid = st["hypervisor"]["pid"]
    agent = cluster.procs[f"agent-{node}"]
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    del cluster.procs[f"agent-{node}"]
    assert pid_alive(new_pid)  # still alive without its agent
    cluster.start_agent(node, ch_binary=backend.binary)
    _patch(cluster, "vm3", {"cpus": 3})  # prove the new agent drives it
    st = _wait_phase(cluster, "vm3", "Running")
    assert st["hypervisor"]["pid"] == new_pid
    assert st["restartCount"] == 2
    assert _info(st)["config"]["cpus"]["boot_vcpus"] == 3


def test_errors_at_boot_and_refused_devices_are_conditions(cluster: Cluster, backend: Backend,
                                                           node: str) -> None:
    # cloud-hypervisor accepts any config at vm.create and refuses it only at vm.boot.
    missing = str(backend.images / "no-such-kernel")
    assert cluster.apply(_vm(backend, "bad", boot={"kernel": missing})).returncode == 0
    cond = wait_for(lambda: _failure(cluster, "bad"), 30, "Failure at boot", cluster)
    assert cond["reason"] == "HypervisorError" and "vm.boot" in cond["message"]
    assert _status(cluster, "bad")["phase"] == "Failed"
    # The failed boot's "booting" event must not wake the VM at once: retries back off.
    events = cluster.socket_dir(node) / f"{cluster.namespace}_bad.events"
    before = events.read_text().count('"booting"')
    time.sleep(8)
    attempts = events.read_text().count('"booting"') - before
    assert 1 <= attempts <= 6, f"{attempts} boot attempts in 8 s: the backoff was bypassed"
    assert _events(cluster, "bad").count("HypervisorError") == 1  # one event, not a storm

    _patch(cluster, "bad", {"boot": {"kernel": str(backend.kernel)}})
    st = _wait_phase(cluster, "bad", "Running")
    assert {c["type"]: c for c in st["conditions"]}["Failure"]["status"] == "False"

    # A request the VMM refuses: a second disk on the root disk's image.
    root = backend.disk("bad")
    _patch(cluster, "bad", {"disks": [{"name": "root", "path": root},
                                      {"name": "dup", "path": root}]})
    cond = wait_for(lambda: _failure(cluster, "bad"), 30, "Failure condition", cluster)
    assert "vm.add-disk: HTTP 500" in cond["message"] and "lock" in cond["message"]
    assert cluster.procs[f"agent-{node}"].poll() is None  # the agent lives on
    # Fixing the spec recovers.
    _patch(cluster, "bad", {"disks": [{"name": "root", "path": root}]})
    st = _wait_phase(cluster, "bad", "Running")
    assert {c["type"]: c for c in st["conditions"]}["Failure"]["status"] == "False"


@pytest.mark.double_only("under this machine's KVM (PVM) the real guest kernel hangs, so it "
                         "cannot power itself off; the double's SIGUSR1 plays the guest")
def test_guest_shutdown_manual_stays_off_always_restarts(cluster: Cluster, backend: Backend,
                                                         node: str) -> None:
    assert cluster.apply(_vm(backend, "man", "Manual")).returncode == 0
    assert cluster.apply(_vm(backend, "alw", "Always")).returncode == 0
    man = _wait_phase(cluster, "man", "Running")
    alw = _wait_phase(cluster, "alw", "Running")
    os.kill(man["hypervisor"]["pid"], signal.SIGUSR1)  # the double's guest powers off
    os.kill(alw["hypervisor"]["pid"], signal.SIGUSR1)
    st = _wait_phase(cluster, "man", "Stopped")
    assert st["hypervisor"].get("state") not in ("Running", "Paused")
    assert st["restartCount"] == 0
    wait_for(lambda: _status(cluster, "alw").get("restartCount") == 1, 20, "Always restart",
             cluster)
    assert _info(_wait_phase(cluster, "alw", "Running"))["state"] == "Running"
    # Manual: a spec change is the user's say-so to run it again.
    _patch(cluster, "man", {"cpus": 2})
    _wait_phase(cluster, "man", "Running")


@pytest.mark.double_only("refused before any VMM starts: nothing of the real VMM to exercise")
def test_name_too_long_for_a_socket_is_reported(cluster: Cluster, backend: Backend,
                                                node: str) -> None:
    name = "x" * 120  # a valid Kubernetes name, but no unix socket path can hold it
    assert cluster.apply(_vm(backend, name)).returncode == 0

    def failed() -> dict[str, Any] | None:
        st = _status(cluster, name)
        return st if st.get("phase") == "Failed" else None

    st = wait_for(failed, 30, "InvalidName condition", cluster)
    cond = {c["type"]: c for c in st["conditions"]}["Failure"]
    assert cond["reason"] == "InvalidName"
    assert "shorten metadata.name" in cond["message"]
    assert cluster.procs[f"agent-{node}"].poll() is None
