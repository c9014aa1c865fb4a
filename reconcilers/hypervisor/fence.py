"""Node-local fencing: pause this node's VMs when its agent has lost the API server.

The controller places a lost node's VMs elsewhere after its eviction timeout. Before
that, the node must stop executing them, or a partitioned node and the new one run the
same VM (and write the same disks) at once. The agent cannot do this alone: a frozen or
crashed agent does nothing. So a small watchdog process per socket directory, which
outlives the agent, pauses every VMM once the agent's last API contact is older than
``fence_after``. A paused VM executes nothing yet loses nothing: when contact returns,
the agent resumes the VMs still bound here and stops the ones that moved.

The agent records each successful API contact in ``CONTACT_FILE`` as a CLOCK_MONOTONIC
reading, which every process on the host shares and wall-clock steps do not move.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .client import ChClient, ChError
from .process import ProcessManager

log = logging.getLogger(__name__)

CONTACT_FILE = ".api-contact"
FENCED_FILE = ".fenced.json"  # VMs the watchdog paused, for the agent's Events
LOCK_FILE = ".watchdog.lock"
PID_FILE = "watchdog.pid"  # no "_": never taken for a VMM's <ns>_<name>.pid
INTERVAL = 1.0


def record_contact(socket_dir: Path) -> None:
    """The agent reached the API server just now."""
    tmp = socket_dir / f"{CONTACT_FILE}.tmp"
    tmp.write_text(f"{time.monotonic()!r}\n")
    tmp.replace(socket_dir / CONTACT_FILE)


def contact_age(socket_dir: Path) -> float | None:
    """Seconds since the agent last reached the API server; None if it never recorded."""
    try:
        return time.monotonic() - float((socket_dir / CONTACT_FILE).read_text())
    except (OSError, ValueError):
        return None


def pause_all(pm: ProcessManager) -> list[str]:
    """Pause every running VM here; record which, with when, for the agent to report."""
    paused = []
    for ns, name in pm.discover():
        client = ChClient(str(pm.paths(ns, name).socket), timeout=2.0, wait_socket=0)
        try:
            info = client.info()
            if info is not None and info.get("state") == "Running":
                client.put("vm.pause")
                paused.append(f"{ns}/{name}")
        except (ChError, OSError) as exc:
            # Still booting, or wedged: kill it rather than let it run unfenced.
            log.warning("cannot pause VM %s/%s while fencing (%s); stopping its VMM",
                        ns, name, exc)
            pm.stop(ns, name, grace=1.0)
            paused.append(f"{ns}/{name}")
        finally:
            client.close()
    if paused:
        fenced = read_fenced(pm.socket_dir)
        stamp = time.time()
        fenced.update({key: fenced.get(key, stamp) for key in paused})
        # Whole or not at all: the agent may read it at any moment.
        tmp = pm.socket_dir / f"{FENCED_FILE}.tmp"
        tmp.write_text(json.dumps(fenced))
        os.replace(tmp, pm.socket_dir / FENCED_FILE)
    return paused


def read_fenced(socket_dir: Path) -> dict[str, float]:
    """VMs the watchdog paused (key -> wall-clock time of the pause)."""
    try:
        data = json.loads((socket_dir / FENCED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def take_fenced(socket_dir: Path) -> dict[str, float]:
    """Read and clear the record (the agent reports each fence once)."""
    out = read_fenced(socket_dir)
    with contextlib.suppress(FileNotFoundError):
        (socket_dir / FENCED_FILE).unlink()
    return out


def _try_lock(socket_dir: Path) -> int | None:
    """An fd holding the directory's watchdog lock, or None if a watchdog holds it."""
    fd = os.open(socket_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def watchdog_running(socket_dir: Path) -> bool:
    fd = _try_lock(socket_dir)
    if fd is None:
        return True
    os.close(fd)
    return False


def ensure_watchdog(socket_dir: Path, fence_after: float) -> bool:
    """Start the watchdog for ``socket_dir`` unless one runs; True if started.

    The lock is taken here and handed to the child (a flock belongs to the open file,
    which the child inherits), so two agents racing cannot start two. The child runs in
    its own session: killing the agent or its process group leaves it guarding the VMMs,
    which outlive the agent too.
    """
    fd = _try_lock(socket_dir)
    if fd is None:
        return False
    try:
        with open(socket_dir / "watchdog.log", "ab") as errors:
            subprocess.Popen(
                [sys.executable, "-m", "hyperfleet.reconcilers.hypervisor.fence",
                 str(socket_dir), str(fence_after), str(fd)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                start_new_session=True, pass_fds=(fd,))
    finally:
        os.close(fd)
    return True


def watch(socket_dir: Path, fence_after: float, binary: str = "cloud-hypervisor") -> None:
    """The watchdog loop (its caller holds the lock). Exits when the directory goes, or
    when no VMM is left to guard and no agent is in touch (the next agent starts one)."""
    pm = ProcessManager(binary, socket_dir)
    pidfile = socket_dir / PID_FILE  # beside the VMMs' own, so whoever stops those finds it
    pidfile.write_text(f"{os.getpid()}\n")
    try:
        _guard(socket_dir, fence_after, pm)
    finally:
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()


def _guard(socket_dir: Path, fence_after: float, pm: ProcessManager) -> None:
    fencing = False
    while socket_dir.is_dir():
        age = contact_age(socket_dir)
        if age is None or age > fence_after:
            if not pm.discover():
                return
            paused = pause_all(pm)
            if paused or not fencing:
                log.warning("agent out of touch with the API server for %s s; paused %s",
                            "?" if age is None else round(age), paused or "nothing new")
            fencing = True
        else:
            fencing = False
        time.sleep(INTERVAL)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave no stale pid file
    socket_dir, fence_after = Path(argv[0]), float(argv[1])
    if len(argv) < 3 and _try_lock(socket_dir) is None:
        return 0  # started by hand while one runs
    watch(socket_dir, fence_after)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
