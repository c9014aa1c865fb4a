"""The agent's hold on the VMs bound to its node, on the real API server with the CH double:
its finalizer is on every VM it runs, so a deletion (while the agent runs, or while it is
away) waits until the VMM is gone."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from hyperfleet.reconcilers.hypervisor.process import pid_alive
from tests import PLACEHOLDER_KERNEL

from .conftest import Cluster, wait_for

FINALIZER = "hyperfleet.dev/agent"


def _vm(name: str) -> str:
    return json.dumps({
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"cpus": 1, "memory": "128Mi", "boot": {"kernel": PLACEHOLDER_KERNEL}},
    })


def _running(cluster: Cluster, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        vm = cluster.get("hvm", name) or {}
        st = vm.get("status") or {}
        return vm if st.get("phase") == "Running" and st.get("hypervisor", {}).get("pid") \
            else None

    found: dict[str, Any] = wait_for(check, 60, f"{name} Running", cluster)
    return found


def _stays_until_its_vmm_is_gone(cluster: Cluster, name: str, pid: int, seconds: float) -> None:
    """For ``seconds`` the object is still there, being deleted, held by our finalizer,
    while its VMM is still alive."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        vm = cluster.get("hvm", name)
        assert vm is not None, "deleted while its VMM still ran"
        assert vm["metadata"].get("deletionTimestamp")
        assert FINALIZER in vm["metadata"].get("finalizers", [])
        assert pid_alive(pid)
        time.sleep(0.2)


def test_deleting_a_running_vm_waits_for_its_vmm_to_stop(cluster: Cluster) -> None:
    node = cluster.node("a")
    cluster.start_controller()
    cluster.start_agent(node)
    assert cluster.apply(_vm("held")).returncode == 0
    vm = _running(cluster, "held")
    assert vm["metadata"]["finalizers"] == [FINALIZER]
    pid = vm["status"]["hypervisor"]["pid"]

    # A VMM slow to stop (stopped by a signal, it answers nothing until it is killed, some
    # 10 s later): the object must outlive it.
    os.kill(pid, signal.SIGSTOP)
    try:
        cluster.kubectl("delete", "hvm", "held", "--wait=false")
        _stays_until_its_vmm_is_gone(cluster, "held", pid, 3.0)
        wait_for(lambda: cluster.get("hvm", "held") is None, 60, "held deleted", cluster)
        assert not pid_alive(pid)
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)
    log = (cluster.workdir / f"agent-{node}.log").read_text()
    assert "VM removed from node" in log


def test_a_vm_deleted_while_its_agent_was_away_is_cleaned_up_when_it_is_back(
        cluster: Cluster) -> None:
    node = cluster.node("a")
    cluster.start_controller()
    cluster.start_agent(node)
    assert cluster.apply(_vm("orphan")).returncode == 0
    pid = _running(cluster, "orphan")["status"]["hypervisor"]["pid"]

    agent = cluster.procs.pop(f"agent-{node}")
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    cluster.kubectl("delete", "hvm", "orphan", "--wait=false")
    _stays_until_its_vmm_is_gone(cluster, "orphan", pid, 2.0)  # no agent: nothing moves

    cluster.start_agent(node)
    wait_for(lambda: cluster.get("hvm", "orphan") is None, 60, "orphan deleted", cluster)
    assert not pid_alive(pid)
