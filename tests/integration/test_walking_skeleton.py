"""Issue 2: kubectl apply of a VirtualMachine runs it on a WorkerNode, end to end."""

from __future__ import annotations

import os
from typing import Any

from hyperfleet.reconcilers.hypervisor.client import ChClient
from hyperfleet.reconcilers.hypervisor.process import pid_alive as alive
from tests import PLACEHOLDER_KERNEL

from .conftest import Cluster, wait_for

VM = """
apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
  cpus: {cpus}
  memory: 512Mi
  boot: {{kernel: {kernel}, cmdline: console=ttyS0}}
  disks: [{{name: root, path: /tmp/hf-images/{name}.raw}}]
"""
VM = VM.replace("{kernel}", PLACEHOLDER_KERNEL)


def test_apply_runs_vm_and_delete_cleans_up(cluster: Cluster) -> None:
    node = cluster.node("a")
    cluster.start_controller()
    cluster.start_agent(node)
    wait_for(lambda: (cluster.get("wn", node, namespaced=False) or {}).get("status", {})
             .get("phase") == "Ready", 60, "WorkerNode Ready", cluster)

    r = cluster.apply(VM.format(name="web-1", cpus=2))
    assert r.returncode == 0, r.stderr

    def running() -> dict[str, Any] | None:
        vm = cluster.get("hvm", "web-1")
        return vm if vm and vm.get("status", {}).get("phase") == "Running" else None

    vm = wait_for(running, 60, "VM Running", cluster)
    status = vm["status"]
    assert status["nodeName"] == node
    assert status["hypervisor"]["state"] == "Running"
    assert status["observedGeneration"] == vm["metadata"]["generation"]
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    assert ready["status"] == "True"
    sock = status["apiSocket"]
    assert sock.startswith(str(cluster.socket_dir(node)))

    # A live VMM process answers vm.info with Running, with the config from the spec.
    client = ChClient(sock)
    info = client.info()
    client.close()
    assert info is not None and info["state"] == "Running"
    assert info["config"]["cpus"]["boot_vcpus"] == 2
    assert info["config"]["memory"]["size"] == 512 * 1024 * 1024
    pid = status["hypervisor"]["pid"]
    assert alive(pid)

    # The printer columns show phase and node.
    table = cluster.kubectl("get", "hvm").stdout
    assert "web-1" in table and "Running" in table and node in table

    cluster.kubectl("delete", "hvm", "web-1", "--timeout=30s")
    assert cluster.get("hvm", "web-1") is None
    wait_for(lambda: not alive(pid), 10, "VMM process gone", cluster)
    assert not os.path.exists(sock)


def test_bad_fields_are_rejected_naming_the_field(cluster: Cluster) -> None:
    bad_cpus = cluster.apply(VM.format(name="bad-1", cpus=-1))
    assert bad_cpus.returncode != 0
    assert "spec.cpus" in bad_cpus.stderr
    assert "greater than or equal to 1" in bad_cpus.stderr

    bad_strategy = cluster.apply(VM.format(name="bad-2", cpus=1) + "  runStrategy: Sometimes\n")
    assert bad_strategy.returncode != 0
    assert "spec.runStrategy" in bad_strategy.stderr
    assert '"Always", "Halted", "Manual"' in bad_strategy.stderr

    no_boot = cluster.apply(VM.format(name="bad-3", cpus=1).replace(
        f"boot: {{kernel: {PLACEHOLDER_KERNEL}, cmdline: console=ttyS0}}", "boot: {cmdline: x}"))
    assert no_boot.returncode != 0
    assert "boot.kernel or boot.firmware" in no_boot.stderr

    bad_memory = cluster.apply(VM.format(name="bad-4", cpus=1).replace("512Mi", "lots"))
    assert bad_memory.returncode != 0
    assert "spec.memory" in bad_memory.stderr

    # Nothing was stored.
    assert cluster.kubectl("get", "hvm", "-o", "name").stdout.strip() == ""
