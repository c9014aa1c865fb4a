"""`hyperfleet console VM`: the VM's serial port, like `virtctl console`.

The node agent has cloud-hypervisor put each VM's serial port on a unix socket beside its API
socket (``status.hypervisor.consoleSocket``). That socket lives on the VM's node, so the
command attaches only where the path exists (on the node, or inside its agent pod); elsewhere
it says which ``kubectl exec`` reaches it, or runs that itself (``--via-kubectl-exec``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import select
import shlex
import socket
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hyperfleet.reconcilers.hypervisor.process import console_lock

from .clicommon import KUBECONFIG, NAMESPACE, CliError, ExitCode, connect, one_line_errors

if TYPE_CHECKING:
    from hyperfleet.reconcilers.kube import Kube

#: Ctrl-]: detaches, as in virtctl console and telnet.
ESCAPE = b"\x1d"
#: After stdin ends (a script's input), output is relayed until it has been quiet this long
#: (the guest's answer to the last line), and no longer than EOF_MAX in all.
EOF_QUIET = 1.0
EOF_MAX = 10.0
#: The chart's agent pods (charts/hyperfleet/templates/agent.yaml, selector labels).
AGENT_SELECTOR = "app.kubernetes.io/name=hyperfleet,app.kubernetes.io/component=agent"
AGENT_CONTAINER = "agent"


class End(enum.Enum):
    """Why a session ended."""

    DETACHED = "detached"  # the escape character
    INPUT_ENDED = "input ended"  # stdin reached EOF (scripted use)
    CLOSED = "closed"  # the VMM closed the connection


def relay(sock: socket.socket, in_fd: int, out_fd: int, escape: bytes = ESCAPE,
          eof_quiet: float = EOF_QUIET, eof_max: float = EOF_MAX) -> End:
    """Copy ``in_fd`` to the socket and the socket to ``out_fd`` until one side ends.

    The escape byte detaches (what came before it in the same read is still sent). At EOF
    on ``in_fd`` the socket is kept open while output still comes: cloud-hypervisor drops
    a client that half-closes, and with it the guest's reply."""
    reading_input = True
    eof_at = quiet_since = 0.0
    while True:
        wait: float | None = None
        if not reading_input:
            now = time.monotonic()
            if now - quiet_since >= eof_quiet or now - eof_at >= eof_max:
                return End.INPUT_ENDED
            wait = min(eof_quiet - (now - quiet_since), eof_max - (now - eof_at))
        fds: list[Any] = [sock, in_fd] if reading_input else [sock]
        try:
            ready, _, _ = select.select(fds, [], [], wait)
        except InterruptedError:  # pragma: no cover - PEP 475 retries select itself
            continue
        if sock in ready:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return End.CLOSED
            _write_all(out_fd, data)
            quiet_since = time.monotonic()
        if reading_input and in_fd in ready:
            data = os.read(in_fd, 4096)
            if not data:
                reading_input = False
                eof_at = quiet_since = time.monotonic()
                continue
            head, hit, _ = data.partition(escape)
            if head:
                try:
                    sock.sendall(head)
                except (BrokenPipeError, ConnectionResetError):
                    return End.CLOSED
            if hit:
                return End.DETACHED


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    """Raw mode while attached, if ``fd`` is a terminal (the guest does the echoing and
    line editing, and Ctrl-C goes to it); the old mode comes back however the session ends.
    Yields whether it is a terminal."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def exclusive(console: Path, vm: str) -> Iterator[None]:
    """Hold the console's lock file: cloud-hypervisor would hand the port to a second client
    and silently cut the first one off, so a second `hyperfleet console` is refused."""
    lock = console_lock(console)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CliError(f"cannot lock the console of {vm} ({lock}): {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CliError(f"the console of {vm} is in use by another session (pid {holder} "
                           "on this node); only one client can attach at a time") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def attach(path: Path, vm: str, in_fd: int, out_fd: int) -> End:
    """Connect to the console socket and relay until detached or closed."""
    with exclusive(path, vm):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with sock:
            try:
                sock.connect(str(path))
            except OSError as exc:
                why = "the VMM is not listening (is the VM still running?)" \
                    if exc.errno in (errno.ECONNREFUSED, errno.ENOENT) else exc.strerror
                raise CliError(f"cannot connect to the console of {vm} at {path}: {why}") \
                    from None
            with raw_terminal(in_fd) as is_tty:
                if is_tty:
                    sys.stderr.write(f"Connected to the console of {vm}. "
                                     "The escape sequence is ^]\r\n")
                    sys.stderr.flush()
                end = relay(sock, in_fd, out_fd)
            if is_tty:
                sys.stderr.write("\n")
            return end


# --------------------------------------------------------------------- not on this node


def agent_pods(kube: Kube, node: str) -> list[tuple[str, str]]:
    """(namespace, name) of the running agent pods on ``node``, from the chart's labels."""
    from kubernetes import client  # CoreV1Api: a second to import, only needed here

    core: Any = client.CoreV1Api(kube.api.api_client)  # its answers as plain objects
    pods = core.list_pod_for_all_namespaces(
        label_selector=AGENT_SELECTOR,
        field_selector=f"spec.nodeName={node},status.phase=Running")
    return sorted((p.metadata.namespace, p.metadata.name) for p in pods.items)


def _agent_pods_or_none(kube: Kube, node: str, strict: bool) -> list[tuple[str, str]]:
    """The agent pods, or none found when only a hint is printed and listing pods
    cluster-wide is not allowed (the hint then names placeholders)."""
    from kubernetes.client.exceptions import ApiException

    if not node:
        return []
    try:
        return agent_pods(kube, node)
    except ApiException as exc:
        if strict or exc.status not in (401, 403):
            raise
        return []


def exec_command(pod: tuple[str, str] | None, name: str, ns: str, tty_flag: bool,
                 kubeconfig: str | None = None) -> list[str]:
    """The kubectl exec that runs this command inside the node's agent pod."""
    pod_ns, pod_name = pod or ("<agent namespace>", "<agent pod on the node>")
    cfg = ["--kubeconfig", kubeconfig] if kubeconfig else []
    return ["kubectl", *cfg, "exec", "-n", pod_ns, "-it" if tty_flag else "-i", pod_name,
            "-c", AGENT_CONTAINER, "--", "hyperfleet", "console", name, "-n", ns]


def console_socket(vm: Mapping[str, Any], ref: str) -> tuple[Path, str]:
    """The console socket of a running VM and its node, or why there is none."""
    status = vm.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase != "Running":
        raise CliError(f"virtualmachine {ref} is {phase}, not Running: start it first "
                       f"(`hyperfleet start {ref.split('/')[1]} -n {ref.split('/')[0]}`)")
    path = (status.get("hypervisor") or {}).get("consoleSocket")
    if not path:
        serial = (vm.get("spec") or {}).get("serial") or "Socket"
        if serial != "Socket":
            raise CliError(f"virtualmachine {ref} has spec.serial {serial}: set it to Socket "
                           "for a console (the VM restarts to apply it)")
        raise CliError(f"virtualmachine {ref} reports no console socket yet (its agent has "
                       "not reported one: the VM started before its agent supported consoles, "
                       "and gets one when it restarts)")
    return Path(path), str(status.get("nodeName") or "")


KubeconfigOpt = Annotated[str | None, KUBECONFIG]
NamespaceOpt = Annotated[str | None, NAMESPACE]


@one_line_errors
def console(
    name: Annotated[str, typer.Argument(help="VirtualMachine name")],
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    via_kubectl_exec: Annotated[bool, typer.Option(
        "--via-kubectl-exec",
        help="When the console is on another node, run `kubectl exec` into that node's "
        "agent pod (found by the chart's labels) instead of printing the command")] = False,
) -> None:
    """Attach to a VM's serial console (Ctrl-] detaches). Runs where the VM's console socket
    is: on its node or in its agent pod; elsewhere it prints the kubectl exec that gets there."""
    from .vmcli import get_vm

    kube, ns = connect(kubeconfig, namespace)
    ref = f"{ns}/{name}"
    path, node = console_socket(get_vm(kube, name, ns), ref)
    if path.is_socket():
        end = attach(path, ref, sys.stdin.fileno(), sys.stdout.fileno())
        if end is End.CLOSED:
            raise CliError(f"the console of {ref} was closed on the VM's side (it stopped or "
                           "rebooted, or a client outside `hyperfleet console` took it over)")
        return
    tty_flag = sys.stdin.isatty()
    pods = _agent_pods_or_none(kube, node, strict=via_kubectl_exec)
    if via_kubectl_exec:
        if not pods:
            raise CliError(f"no running agent pod on node {node or '?'} (labels "
                           f"{AGENT_SELECTOR}): is the chart's agent DaemonSet there?")
        cmd = exec_command(pods[0], name, ns, tty_flag, kubeconfig)
        try:
            raise typer.Exit(subprocess.run(cmd, check=False).returncode)
        except FileNotFoundError:
            raise CliError("kubectl is not on PATH") from None
    cmd = exec_command(pods[0] if pods else None, name, ns, True, kubeconfig)
    raise CliError(f"the console of {ref} is on node {node or '?'}, not here: run "
                   f"`{shlex.join(cmd)}` (or add --via-kubectl-exec)", ExitCode.USAGE)


__all__ = ["ESCAPE", "End", "agent_pods", "attach", "console", "console_socket",
           "exclusive", "exec_command", "raw_terminal", "relay"]
