"""`hyperfleet console`: the relay, the escape character, the terminal mode, the one-client
lock, what a VM must be for a console, the kubectl exec hint; and the serial config the
agent gives cloud-hypervisor."""

from __future__ import annotations

import contextlib
import os
import pty
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from hyperfleet.operator import console as con
from hyperfleet.operator.cli import app
from hyperfleet.operator.clicommon import CliError
from hyperfleet.reconcilers.hypervisor.process import ProcessManager, console_lock
from hyperfleet.reconcilers.kube import VMS
from hyperfleet.reconcilers.models.vm import VirtualMachineSpec
from hyperfleet.reconcilers.testing.fakekube import PODS, FakeCoreV1, FakeKube
from hyperfleet.reconcilers.vm import console_socket_of, recreate_reasons, vm_config

runner = CliRunner()


@pytest.fixture
def vmm_side() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client end the relay uses, VMM end the test plays)."""
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def pipes() -> Iterator[tuple[int, int, int, int]]:
    """(stdin read end, stdin write end, stdout read end, stdout write end)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    yield in_r, in_w, out_r, out_w
    for fd in (in_r, in_w, out_r, out_w):
        with contextlib.suppress(OSError):
            os.close(fd)


def _run(sock: socket.socket, in_fd: int, out_fd: int, **kw: Any) -> tuple[threading.Thread,
                                                                              list[con.End]]:
    result: list[con.End] = []
    t = threading.Thread(target=lambda: result.append(con.relay(sock, in_fd, out_fd, **kw)))
    t.start()
    return t, result


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    s.settimeout(5)
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, data
        data += chunk
    return data


# ------------------------------------------------------------------------ relay


def test_relay_copies_both_ways_and_ctrl_bracket_detaches(
        vmm_side: tuple[socket.socket, socket.socket], pipes: tuple[int, int, int, int]) -> None:
    client, vmm = vmm_side
    in_r, in_w, out_r, out_w = pipes
    t, result = _run(client, in_r, out_w)
    vmm.sendall(b"login: ")
    assert os.read(out_r, 100) == b"login: "
    os.write(in_w, b"root\r")
    assert _recv_exactly(vmm, 5) == b"root\r"
    os.write(in_w, b"ls\x1dnever sent")
    t.join(5)
    assert result == [con.End.DETACHED]
    assert _recv_exactly(vmm, 2) == b"ls"  # what came before the escape still goes
    vmm.setblocking(False)
    with pytest.raises(BlockingIOError):
        vmm.recv(100)  # and nothing after it


def test_relay_keeps_output_flowing_after_input_ends_then_stops(
        vmm_side: tuple[socket.socket, socket.socket], pipes: tuple[int, int, int, int]) -> None:
    client, vmm = vmm_side
    in_r, in_w, out_r, out_w = pipes
    os.write(in_w, b"uname\r")
    os.close(in_w)  # a script's stdin: EOF right after the command
    t, result = _run(client, in_r, out_w, eof_quiet=0.5, eof_max=5)
    assert _recv_exactly(vmm, 6) == b"uname\r"
    time.sleep(0.2)
    vmm.sendall(b"Linux\r\n")  # the guest answers after stdin ended: still relayed
    t.join(5)
    assert result == [con.End.INPUT_ENDED]
    assert os.read(out_r, 100) == b"Linux\r\n"


def test_relay_stops_after_eof_max_even_with_a_chatty_guest(
        vmm_side: tuple[socket.socket, socket.socket], pipes: tuple[int, int, int, int]) -> None:
    client, vmm = vmm_side
    in_r, in_w, _, out_w = pipes
    os.close(in_w)
    stop = threading.Event()

    def chatter() -> None:
        while not stop.is_set():
            try:
                vmm.sendall(b".")
            except OSError:
                return
            time.sleep(0.05)

    threading.Thread(target=chatter, daemon=True).start()
    started = time.monotonic()
    t, result = _run(client, in_r, out_w, eof_quiet=0.5, eof_max=1.0)
    t.join(5)
    stop.set()
    assert result == [con.End.INPUT_ENDED]
    assert time.monotonic() - started < 3


def test_relay_reports_the_vmm_closing(
        vmm_side: tuple[socket.socket, socket.socket], pipes: tuple[int, int, int, int]) -> None:
    client, vmm = vmm_side
    in_r, _, out_r, out_w = pipes
    t, result = _run(client, in_r, out_w)
    vmm.sendall(b"bye\r\n")
    vmm.shutdown(socket.SHUT_RDWR)  # what cloud-hypervisor does when another client attaches
    t.join(5)
    assert result == [con.End.CLOSED]
    assert os.read(out_r, 100) == b"bye\r\n"


# --------------------------------------------------------------------- terminal


def test_raw_terminal_is_raw_inside_and_restored_after_an_error() -> None:
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON and before[3] & termios.ECHO
        with pytest.raises(RuntimeError), con.raw_terminal(slave) as is_tty:
            assert is_tty
            inside = termios.tcgetattr(slave)
            assert not inside[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
            raise RuntimeError("the session broke")
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_raw_terminal_leaves_a_pipe_alone(pipes: tuple[int, int, int, int]) -> None:
    with con.raw_terminal(pipes[0]) as is_tty:
        assert not is_tty


def test_relay_through_a_pty_passes_ctrl_c_to_the_guest_and_detaches(
        vmm_side: tuple[socket.socket, socket.socket]) -> None:
    """As on a user's terminal: raw mode makes Ctrl-C a byte for the guest, not a signal."""
    client, vmm = vmm_side
    master, slave = pty.openpty()
    out_r, out_w = os.pipe()
    try:
        result: list[con.End] = []

        def session() -> None:
            with con.raw_terminal(slave):
                result.append(con.relay(client, slave, out_w))

        t = threading.Thread(target=session)
        t.start()
        deadline = time.monotonic() + 5
        while termios.tcgetattr(slave)[3] & termios.ICANON:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.write(master, b"top\x03")
        assert _recv_exactly(vmm, 4) == b"top\x03"
        os.write(master, b"\x1d")
        t.join(5)
        assert result == [con.End.DETACHED]
        assert termios.tcgetattr(slave)[3] & termios.ICANON  # restored
    finally:
        for fd in (master, slave, out_r, out_w):
            os.close(fd)


# ------------------------------------------------------------------ one client


def test_a_second_session_is_refused_while_one_is_attached(tmp_path: Path) -> None:
    path = tmp_path / "ns_vm.console"
    with con.exclusive(path, "ns/vm"):
        assert console_lock(path).read_text().strip() == str(os.getpid())
        with pytest.raises(CliError, match=rf"in use by another session \(pid {os.getpid()}"), \
                con.exclusive(path, "ns/vm"):
            pass
    with con.exclusive(path, "ns/vm"):  # released on exit
        pass


def test_attach_says_so_when_nothing_listens(tmp_path: Path) -> None:
    path = tmp_path / "ns_vm.console"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening: a VMM that is gone
    with pytest.raises(CliError, match="VMM is not listening"):
        con.attach(path, "ns/vm", 0, 1)


# ----------------------------------------------------------------- the command


def _vm(phase: str = "Running", socket_path: str | None = "/nowhere/t_web.console",
        serial: str = "Socket") -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "t"}, "spec": {"serial": serial},
            "status": {"phase": phase, "nodeName": "node-a",
                       "hypervisor": {"state": "Running", "consoleSocket": socket_path}}}


@pytest.mark.parametrize("vm,match", [
    (_vm(phase="Stopped"), "is Stopped, not Running: start it first"),
    (_vm(socket_path=None, serial="Null"), "spec.serial Null: set it to Socket"),
    (_vm(socket_path=None), "reports no console socket yet"),
])
def test_console_socket_refuses_what_has_no_console(vm: dict[str, Any], match: str) -> None:
    with pytest.raises(CliError, match=match):
        con.console_socket(vm, "t/web")


def _cluster(vm: dict[str, Any], pods: list[tuple[str, str]]) -> FakeKube:
    """The VM, and the running agent pods (namespace, name) on its node."""
    kube = FakeKube()
    kube.put(VMS, vm)
    for ns, name in pods:
        kube.put(PODS, {"metadata": {"name": name, "namespace": ns, "labels": {
            "app.kubernetes.io/name": "hyperfleet", "app.kubernetes.io/component": "agent"}},
            "spec": {"nodeName": "node-a"}, "status": {"phase": "Running"}})
    return kube


def _patch_kube(monkeypatch: pytest.MonkeyPatch, kube: FakeKube) -> None:
    monkeypatch.setattr(con, "connect", lambda kubeconfig, namespace: (kube, namespace or "t"))
    monkeypatch.setattr("kubernetes.client.CoreV1Api", FakeCoreV1)


def test_console_elsewhere_prints_the_kubectl_exec_and_exits_2(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kube = _cluster(_vm(), [("hyperfleet-system", "hyperfleet-agent-x7k2p")])
    _patch_kube(monkeypatch, kube)
    r = runner.invoke(app, ["console", "web", "-n", "t"])
    assert r.exit_code == 2, r.output
    assert ("the console of t/web is on node node-a, not here: run `kubectl exec -n "
            "hyperfleet-system -it hyperfleet-agent-x7k2p -c agent -- hyperfleet console web "
            "-n t`") in r.output
    assert kube.pod_lists == [{
        "label_selector": "app.kubernetes.io/name=hyperfleet,app.kubernetes.io/component=agent",
        "field_selector": "spec.nodeName=node-a,status.phase=Running"}]


def test_console_via_kubectl_exec_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_kube(monkeypatch, _cluster(_vm(), [("hf", "agent-1")]))
    ran: list[list[str]] = []

    def fake_run(cmd: list[str], check: bool) -> Any:
        ran.append(cmd)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    r = runner.invoke(app, ["console", "web", "-n", "t", "--via-kubectl-exec"])
    assert r.exit_code == 0, r.output
    assert ran == [["kubectl", "exec", "-n", "hf", "-i", "agent-1", "-c", "agent", "--",
                    "hyperfleet", "console", "web", "-n", "t"]]  # -i: the test's stdin is no tty


def test_console_via_kubectl_exec_without_an_agent_pod_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_kube(monkeypatch, _cluster(_vm(), []))
    r = runner.invoke(app, ["console", "web", "-n", "t", "--via-kubectl-exec"])
    assert r.exit_code == 1
    assert "no running agent pod on node node-a" in r.output


def test_console_of_a_stopped_vm_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_kube(monkeypatch, _cluster(_vm(phase="Stopped"), []))
    r = runner.invoke(app, ["console", "web", "-n", "t"])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0 and "is Stopped, not Running" in r.output


def test_console_of_a_missing_vm_exits_4(monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_kube(monkeypatch, _cluster(_vm(), []))
    assert runner.invoke(app, ["console", "nosuch", "-n", "t"]).exit_code == 4


# ------------------------------------------------------------ the agent's side


def _spec(**kw: Any) -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate(
        {"cpus": 1, "memory": "256Mi", "boot": {"kernel": "/k"}, **kw})


def test_serial_defaults_to_the_console_socket_the_agent_names() -> None:
    spec = _spec()
    assert vm_config(spec, console_socket="/run/hf/t_web.console")["serial"] == {
        "mode": "Socket", "socket": "/run/hf/t_web.console"}
    # No path, no Socket: cloud-hypervisor v54 panics on a socket mode without one.
    assert vm_config(spec)["serial"] == {"mode": "Null"}
    assert vm_config(_spec(serial="Tty"), console_socket="/x")["serial"] == {"mode": "Tty"}
    with pytest.raises(ValueError):
        _spec(console="Socket")  # virtio-console has no socket mode upstream


def test_console_socket_path_alone_is_no_reason_to_restart() -> None:
    here = vm_config(_spec(), console_socket="/run/b/t_web.console")
    came_from = vm_config(_spec(), console_socket="/run/a/t_web.console")
    assert recreate_reasons(came_from, here) == []
    assert recreate_reasons(vm_config(_spec(serial="Null")), here) == ["serial changed"]


def test_console_socket_is_reported_only_while_booted() -> None:
    config = vm_config(_spec(), console_socket="/run/t_web.console")
    assert console_socket_of(config, "Running") == "/run/t_web.console"
    assert console_socket_of(config, "Paused") == "/run/t_web.console"
    assert console_socket_of(config, "Created") is None  # shut down: the VMM removed it
    assert console_socket_of(vm_config(_spec(serial="Null")), "Running") is None


def test_spawn_clears_a_dead_vmms_console_socket(tmp_path: Path) -> None:
    pm = ProcessManager("/bin/true", tmp_path)
    paths = pm.paths("t", "web")
    assert paths.console == tmp_path / "t_web.console"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(paths.console))  # left by a VMM that was killed
    pm.spawn("t", "web")
    assert not paths.console.exists()  # or vm.create would fail "Address already in use"
