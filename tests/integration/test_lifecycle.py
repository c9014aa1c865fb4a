"""Issue 3: the agent drives every VM lifecycle transition on the real API server."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.reconcilers.hypervisor.client import ChClient

from .conftest import Cluster, wait_for

VM = """
apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  cpus: 2
  maxCpus: 8
  memory: 512Mi
  maxMemory: 2Gi
  boot: {{kernel: /images/vmlinux}}
  disks: [{{name: root, path: /images/{name}.raw}}]
  runStrategy: {strategy}
"""


@pytest.fixture
def node(cluster: Cluster) -> Iterator[str]:
    n = cluster.node("a")
    cluster.start_controller()
    cluster.start_agent(n)
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
        ready = {c["type"]: c["status"] for c in st.get("conditions", [])}.get("Ready")
        vm = cluster.get("hvm", name) or {}
        current = st.get("observedGeneration") == vm.get("metadata", {}).get("generation")
        return st if st.get("phase") == phase and ready == "True" and current else None

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


def test_power_states_sleep_and_wake(cluster: Cluster, node: str) -> None:
    assert cluster.apply(VM.format(name="vm1", strategy="Always")).returncode == 0
    st = _wait_phase(cluster, "vm1", "Running")
    assert _info(st)["state"] == "Running"

    _patch(cluster, "vm1", {"powerState": "Paused"})
    st = _wait_phase(cluster, "vm1", "Paused")
    assert _info(st)["state"] == "Paused"

    _patch(cluster, "vm1", {"powerState": "Running"})
    st = _wait_phase(cluster, "vm1", "Running")
    assert _info(st)["state"] == "Running"

    _patch(cluster, "vm1", {"powerState": "Stopped"})
    st = _wait_phase(cluster, "vm1", "Stopped")
    assert _info(st)["state"] == "Shutdown"  # the VMM keeps the config

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
    with pytest.raises(ProcessLookupError):
        os.kill(pid_before_sleep, 0)

    _patch(cluster, "vm1", {"powerState": "Running"})
    st = _wait_phase(cluster, "vm1", "Running")
    info = _info(st)
    assert info["state"] == "Running"
    assert info["config"]["memory"]["size"] == 512 << 20  # restored, not recreated
    assert st["snapshot"]["restoredAt"]
    assert not snap.exists()  # consumed: a later crash must not resurrect old memory
    reasons = _events(cluster, "vm1")
    for r in ("Booted", "Paused", "Resumed", "Stopped", "Snapshotted", "Restored"):
        assert r in reasons


def test_resize_hotplug_and_cold_change(cluster: Cluster, node: str) -> None:
    assert cluster.apply(VM.format(name="vm2", strategy="Always")).returncode == 0
    st = _wait_phase(cluster, "vm2", "Running")
    pid = st["hypervisor"]["pid"]

    _patch(cluster, "vm2", {"cpus": 4, "memory": "1Gi"})
    st = _wait_phase(cluster, "vm2", "Running")
    cfg = _info(st)["config"]
    assert cfg["cpus"]["boot_vcpus"] == 4
    mem = cfg["memory"]
    assert mem["size"] + mem.get("hotplugged_size", 0) == 1 << 30
    assert st["hypervisor"]["pid"] == pid  # live: same process, no reboot

    _patch(cluster, "vm2", {"disks": [{"name": "root", "path": "/images/vm2.raw"},
                                      {"name": "data", "path": "/images/data.raw"}]})
    st = _wait_phase(cluster, "vm2", "Running")
    disks = {d["id"]: d["path"] for d in _info(st)["config"]["disks"]}
    assert disks == {"root": "/images/vm2.raw", "data": "/images/data.raw"}

    _patch(cluster, "vm2", {"disks": [{"name": "root", "path": "/images/vm2.raw"}]})
    st = _wait_phase(cluster, "vm2", "Running")
    assert [d["id"] for d in _info(st)["config"]["disks"]] == ["root"]
    assert st["hypervisor"]["pid"] == pid

    # A kernel change cannot be applied live: the VM is recreated and says so.
    _patch(cluster, "vm2", {"boot": {"kernel": "/images/vmlinux-2"}})
    st = _wait_phase(cluster, "vm2", "Running")
    assert _info(st)["config"]["payload"]["kernel"] == "/images/vmlinux-2"
    recreated = {c["type"]: c for c in st["conditions"]}["Recreated"]
    assert "payload changed" in recreated["message"]
    assert "Recreating" in _events(cluster, "vm2")


def test_crash_restart_and_agent_adoption(cluster: Cluster, node: str) -> None:
    assert cluster.apply(VM.format(name="vm3", strategy="Always")).returncode == 0
    st = _wait_phase(cluster, "vm3", "Running")
    pid = st["hypervisor"]["pid"]
    assert st["restartCount"] == 0

    os.kill(pid, signal.SIGKILL)
    st = wait_for(lambda: (s := _status(cluster, "vm3")).get("restartCount") == 1
                  and s.get("phase") == "Running" and s["hypervisor"]["pid"] != pid and s,
                  30, "restart after kill -9", cluster)
    assert _info(st)["state"] == "Running"
    assert "Restarted" in _events(cluster, "vm3")

    # kill -9 of the agent: the VMs keep running, and the new agent adopts them.
    new_pid = st["hypervisor"]["pid"]
    agent = cluster.procs[f"agent-{node}"]
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    del cluster.procs[f"agent-{node}"]
    os.kill(new_pid, 0)  # still alive without its agent
    cluster.start_agent(node)
    _patch(cluster, "vm3", {"cpus": 3})  # prove the new agent drives it
    st = _wait_phase(cluster, "vm3", "Running")
    assert st["hypervisor"]["pid"] == new_pid
    assert st["restartCount"] == 1
    assert _info(st)["config"]["cpus"]["boot_vcpus"] == 3


def test_guest_shutdown_manual_stays_off_always_restarts(cluster: Cluster, node: str) -> None:
    assert cluster.apply(VM.format(name="man", strategy="Manual")).returncode == 0
    assert cluster.apply(VM.format(name="alw", strategy="Always")).returncode == 0
    man = _wait_phase(cluster, "man", "Running")
    alw = _wait_phase(cluster, "alw", "Running")
    os.kill(man["hypervisor"]["pid"], signal.SIGUSR1)  # the double's guest powers off
    os.kill(alw["hypervisor"]["pid"], signal.SIGUSR1)
    st = _wait_phase(cluster, "man", "Stopped")
    assert _info(st)["state"] == "Shutdown"
    assert st["restartCount"] == 0
    wait_for(lambda: _status(cluster, "alw").get("restartCount") == 1, 20, "Always restart",
             cluster)
    assert _info(_wait_phase(cluster, "alw", "Running"))["state"] == "Running"
    # Manual: a spec change is the user's say-so to run it again.
    _patch(cluster, "man", {"cpus": 1})
    _wait_phase(cluster, "man", "Running")


def test_bad_input_becomes_a_condition_not_a_crash_loop(cluster: Cluster, node: str) -> None:
    # A request the VMM refuses (a second disk on the same image path: 409).
    assert cluster.apply(VM.format(name="bad", strategy="Always")).returncode == 0
    _wait_phase(cluster, "bad", "Running")
    _patch(cluster, "bad", {"disks": [{"name": "root", "path": "/images/bad.raw"},
                                      {"name": "dup", "path": "/images/bad.raw"}]})

    def failed() -> dict[str, Any] | None:
        st = _status(cluster, "bad")
        cond = {c["type"]: c for c in st.get("conditions", [])}.get("Failure")
        return st if cond and cond["status"] == "True" else None

    st = wait_for(failed, 30, "Failure condition", cluster)
    failure = {c["type"]: c for c in st["conditions"]}["Failure"]
    assert "vm.add-disk" in failure["message"] and "409" in failure["message"]
    assert st["phase"] == "Failed"
    assert cluster.procs[f"agent-{node}"].poll() is None  # the agent lives on
    assert _events(cluster, "bad").count("HypervisorError") == 1  # one event, not a storm
    # Fixing the spec recovers.
    _patch(cluster, "bad", {"disks": [{"name": "root", "path": "/images/bad.raw"}]})
    st = _wait_phase(cluster, "bad", "Running")
    assert {c["type"]: c for c in st["conditions"]}["Failure"]["status"] == "False"


def test_name_too_long_for_a_socket_is_reported(cluster: Cluster, node: str) -> None:
    name = "x" * 120  # a valid Kubernetes name, but no unix socket path can hold it
    assert cluster.apply(VM.format(name=name, strategy="Always")).returncode == 0

    def failed() -> dict[str, Any] | None:
        st = _status(cluster, name)
        return st if st.get("phase") == "Failed" else None

    st = wait_for(failed, 30, "InvalidName condition", cluster)
    cond = {c["type"]: c for c in st["conditions"]}["Failure"]
    assert cond["reason"] == "InvalidName"
    assert "shorten metadata.name" in cond["message"]
    assert cluster.procs[f"agent-{node}"].poll() is None
