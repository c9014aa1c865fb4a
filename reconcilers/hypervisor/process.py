"""One cloud-hypervisor process per VM: spawn, find again after a restart, stop.

Processes run in their own session so that an agent restart (or crash) leaves the
VMs running; a pid file next to the API socket lets the next agent adopt them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .client import MAX_SOCKET_PATH, ChClient, ChError

log = logging.getLogger(__name__)

_SAFE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
#: Unix sockets beside ``<ns>_<name>.sock``: the API socket's, the guest vsock's (driver),
#: the serial console's and the migration receiver's (jobs runner). All must fit sun_path,
#: not only the first.
_SOCKET_SUFFIXES = (".sock", ".vsock", ".console", ".migration")
_LONGEST_SUFFIX = max(_SOCKET_SUFFIXES, key=len)


class UnsafeNameError(ValueError):
    """A VM name that would escape the socket directory or overflow sun_path."""


@dataclass(frozen=True)
class VmPaths:
    socket: Path
    console: Path  # the serial port's unix socket (spec.serial Socket), bound by the VMM
    vsock: Path  # the guest's vsock, as a unix socket (cloud-hypervisor's hybrid vsock)
    pidfile: Path
    events: Path
    log: Path
    snapshots: Path


class ProcessManager:
    """Owns the files of every VMM on this node under ``socket_dir``."""

    def __init__(self, binary: str, socket_dir: str | Path, extra_args: list[str] | None = None):
        self.binary = binary
        self.socket_dir = Path(socket_dir).resolve()
        self.extra_args = extra_args or []
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._started: dict[str, float] = {}
        self._paths: dict[tuple[str, str], VmPaths] = {}

    def paths(self, namespace: str, name: str) -> VmPaths:
        """The VM's files (validated once per name: every watcher tick asks)."""
        key = (namespace, name)
        known = self._paths.get(key)
        if known is None:
            known = self._paths[key] = self._make_paths(namespace, name)
        return known

    def _make_paths(self, namespace: str, name: str) -> VmPaths:
        for part, what in ((namespace, "metadata.namespace"), (name, "metadata.name")):
            if not _SAFE.match(part) or ".." in part:
                raise UnsafeNameError(
                    f"{what} {part!r} is not a DNS-1123 name: it cannot name a socket "
                    "file safely; rename the VM"
                )
        stem = f"{namespace}_{name}"
        socket = self.socket_dir / f"{stem}.sock"
        if socket.resolve().parent != self.socket_dir:
            raise UnsafeNameError(f"metadata.name {name!r} escapes the socket directory")
        longest = socket.with_suffix(_LONGEST_SUFFIX)
        if len(str(longest).encode()) > MAX_SOCKET_PATH:
            raise UnsafeNameError(
                f"socket path {longest} exceeds the {MAX_SOCKET_PATH}-byte unix socket limit: "
                "shorten metadata.name or the agent's --socket-dir"
            )
        return VmPaths(
            socket=socket,
            console=socket.with_suffix(".console"),
            vsock=socket.with_suffix(".vsock"),
            pidfile=self.socket_dir / f"{stem}.pid",
            events=self.socket_dir / f"{stem}.events",
            log=self.socket_dir / f"{stem}.log",
            snapshots=self.socket_dir / "snapshots" / stem,
        )

    def spawn(self, namespace: str, name: str) -> int:
        p = self.paths(namespace, name)
        for stale in (p.socket, p.console):
            # A dead VMM's API socket would fool the readiness wait; its console socket
            # would fail vm.create/vm.restore ("Address already in use").
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        cmd = [
            self.binary,
            "--api-socket",
            f"path={p.socket}",
            "--event-monitor",
            f"path={p.events}",
            *self.extra_args,
        ]
        with open(p.log, "ab") as logf:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        self._children[str(p.socket)] = proc
        self._started[str(p.socket)] = time.monotonic()
        p.pidfile.write_text(f"{proc.pid}\n")
        log.info("spawned vmm", extra={"vm": f"{namespace}/{name}", "pid": proc.pid})
        return proc.pid

    def pid(self, namespace: str, name: str) -> int | None:
        """The live VMM's pid, or None; reaps our own dead children so they do not linger."""
        p = self.paths(namespace, name)
        child = self._children.get(str(p.socket))
        if child is not None:
            if child.poll() is None:
                return child.pid  # ours, alive: no need to read its pid file and /proc
            del self._children[str(p.socket)]
            return None
        try:
            pid = int(p.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _is_our_vmm(pid, p.socket) else None

    def started_at(self, namespace: str, name: str) -> float | None:
        """Monotonic start time of the live VMM (None if there is none).

        Recorded at spawn; for a VMM an earlier agent started it is derived from the
        process itself, so an adopted VMM whose API socket never appears still times out.
        """
        p = self.paths(namespace, name)
        started = self._started.get(str(p.socket))
        if started is not None:
            return started
        pid = self.pid(namespace, name)
        return None if pid is None else _monotonic_start(pid, p.pidfile)

    def client(self, namespace: str, name: str, wait_socket: float = 5.0) -> ChClient:
        return ChClient(str(self.paths(namespace, name).socket), wait_socket=wait_socket)

    def stop(self, namespace: str, name: str, grace: float = 5.0) -> None:
        """Ask the VMM to exit, then escalate; leave no process, socket or pid file."""
        p = self.paths(namespace, name)
        pid = self.pid(namespace, name)
        if pid is not None:
            client = ChClient(str(p.socket), timeout=grace, wait_socket=0)
            with contextlib.suppress(ChError, OSError):
                client.shutdown_vmm()
            client.close()
            if not self._wait_exit(p, pid, grace):
                log.warning("vmm ignored shutdown; killing", extra={"pid": pid})
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._wait_exit(p, pid, grace)
        for f in (p.socket, p.pidfile, p.events, p.console, console_lock(p.console)):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        self._children.pop(str(p.socket), None)
        self._started.pop(str(p.socket), None)

    def _wait_exit(self, p: VmPaths, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        child = self._children.get(str(p.socket))
        while time.monotonic() < deadline:
            if child is not None:
                if child.poll() is not None:
                    return True
            elif not _is_our_vmm(pid, p.socket):
                return True
            time.sleep(0.02)
        return False

    def discover(self) -> list[tuple[str, str]]:
        """(namespace, name) of every VMM still alive from an earlier agent run."""
        found = []
        for pidfile in sorted(self.socket_dir.glob("*_*.pid")):
            namespace, name = vm_of(pidfile)
            try:
                if self.pid(namespace, name) is not None:
                    found.append((namespace, name))
            except UnsafeNameError:
                continue
        return found


def vm_of(path: Path) -> tuple[str, str]:
    """(namespace, name) of the VM one of the socket directory's files belongs to
    (``<namespace>_<name>.<suffix>``: namespaces hold no "_")."""
    namespace, _, name = path.stem.partition("_")
    return namespace, name


def _monotonic_start(pid: int, pidfile: Path) -> float | None:
    """When ``pid`` started, on the time.monotonic() scale.

    /proc/<pid>/stat field 22 counts clock ticks since boot (CLOCK_BOOTTIME); the pid
    file, written right after the spawn, is the fallback where /proc cannot say.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        try:
            age = time.time() - pidfile.stat().st_mtime
        except OSError:
            return None
    return time.monotonic() - max(0.0, age)


def console_lock(console: Path) -> Path:
    """The file ``hyperfleet console`` locks while attached: cloud-hypervisor would let a
    second client take the serial port over silently, so sessions exclude each other here."""
    return console.with_name(console.name + ".lock")


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a dead VMM whose parent has not reaped it
    still answers kill(pid, 0))."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _is_our_vmm(pid: int, socket: Path) -> bool:
    """True if pid is alive and is the VMM serving this socket."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return str(socket).encode() in cmdline
