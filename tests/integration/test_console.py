"""`hyperfleet console` against the CH double and the genuine cloud-hypervisor (``backend``).

Under this machine's KVM (PVM) the real guest hangs before it writes to its serial port, so
no guest output is asserted: that the VMM bound the socket the agent configured, that the
command connects and its bytes are accepted, that Ctrl-] detaches with exit 0, that a second
session is refused, that a raw client taking the port over ends the session (the VMM's own
rule), and that a stopped VM has no console.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from hyperfleet.reconcilers.hypervisor.client import ChClient
from hyperfleet.reconcilers.hypervisor.process import console_lock
from hyperfleet.reconcilers.testing.devstack import hyperfleet_cmd

from .conftest import Backend, Cluster, wait_for


def _start(cluster: Cluster, backend: Backend, name: str) -> tuple[str, dict[str, Any]]:
    node = cluster.node("a")
    cluster.start_controller()
    cluster.start_agent(node, ch_binary=backend.binary)
    body = {"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {"cpus": 1, "memory": "256Mi",
                     "boot": {"kernel": str(backend.kernel), "cmdline": "console=ttyS0"},
                     "disks": [{"name": "root", "path": backend.disk(name)}]}}
    assert cluster.apply(json.dumps(body)).returncode == 0
    st = wait_for(lambda: (s := _status(cluster, name)).get("phase") == "Running"
                  and (s.get("hypervisor") or {}).get("consoleSocket") and s,
                  60, f"{name} Running with a console socket", cluster)
    return node, st


def _status(cluster: Cluster, name: str) -> dict[str, Any]:
    return (cluster.get("hvm", name) or {}).get("status") or {}


def _console(cluster: Cluster, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(hyperfleet_cmd("console", name, "-n", cluster.namespace),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)})


def _attached(lock: Path, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, proc.communicate()
    return lock.exists() and lock.read_text().strip() == str(proc.pid)


def test_console_attaches_to_the_socket_the_agent_configured(cluster: Cluster,
                                                            backend: Backend) -> None:
    node, st = _start(cluster, backend, "con")
    path = Path(st["hypervisor"]["consoleSocket"])
    assert path == cluster.socket_dir(node) / f"{cluster.namespace}_con.console"
    assert path.is_socket()  # bound by the VMM itself
    info = ChClient(st["apiSocket"]).info()
    assert info is not None
    assert info["config"]["serial"] == {"mode": "Socket", "socket": str(path)}

    first = _console(cluster, "con")
    assert first.stdin is not None
    first.stdin.write(b"root\r")  # for the guest's UART: accepted, not answered
    first.stdin.flush()
    wait_for(lambda: _attached(console_lock(path), first), 30, "console attached")
    second = _console(cluster, "con")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 1, err
    assert b"is in use by another session" in err and err.count(b"\n") == 1, err

    first.stdin.write(b"echo hi\r\x1d")  # Ctrl-] detaches
    first.stdin.flush()
    _, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert path.is_socket()  # the VM and its console are still there


def test_a_client_taking_the_port_over_ends_the_session(cluster: Cluster,
                                                       backend: Backend) -> None:
    """The VMM's rule (real v54): a new connection makes the previous one read EOF."""
    _, st = _start(cluster, backend, "take")
    path = Path(st["hypervisor"]["consoleSocket"])
    session = _console(cluster, "take")
    assert session.stdin is not None
    wait_for(lambda: _attached(console_lock(path), session), 30, "console attached")
    time.sleep(0.5)  # the VMM accepts connections from its own thread
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(path))
        _, err = session.communicate(timeout=30)
    assert session.returncode == 1, err
    assert b"was closed on the VM's side" in err, err


def test_console_refuses_a_stopped_vm(cluster: Cluster, backend: Backend) -> None:
    _, st = _start(cluster, backend, "off")
    path = Path(st["hypervisor"]["consoleSocket"])
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    stop = subprocess.run(hyperfleet_cmd("stop", "off", "-n", cluster.namespace, "--wait",
                                         "--timeout", "60"), env=env, capture_output=True)
    assert stop.returncode == 0, stop.stderr
    assert not path.exists()  # the VMM removes its console socket when the VM shuts down
    assert (_status(cluster, "off").get("hypervisor") or {}).get("consoleSocket") is None
    r = subprocess.run(hyperfleet_cmd("console", "off", "-n", cluster.namespace), env=env,
                       capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stderr.decode().startswith(
        f"error: virtualmachine {cluster.namespace}/off is Stopped, not Running"), r.stderr
