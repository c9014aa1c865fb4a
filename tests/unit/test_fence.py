"""The fencing watchdog: a node out of touch with the API server pauses its VMs, even
when its agent is frozen or dead (the watchdog is a process of its own)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfleet.reconcilers.hypervisor import fence
from hyperfleet.reconcilers.hypervisor.client import wait_for_socket
from hyperfleet.reconcilers.hypervisor.process import ProcessManager
from tests import PLACEHOLDER_KERNEL

from .test_process import DOUBLE


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hff", dir="/tmp"))  # sun_path is 108 bytes
    yield d
    pm = ProcessManager(DOUBLE, d)
    for ns, name in pm.discover():
        pm.stop(ns, name, grace=1)
    shutil.rmtree(d, ignore_errors=True)  # the watchdog exits when its directory goes


def boot(pm: ProcessManager, name: str) -> None:
    pm.spawn("default", name)
    client = pm.client("default", name)
    client.create({"payload": {"kernel": PLACEHOLDER_KERNEL}, "memory": {"size": 64 << 20}})
    client.put("vm.boot")
    client.close()


def state(pm: ProcessManager, name: str) -> str:
    client = pm.client("default", name, wait_socket=0)
    try:
        return str((client.info() or {}).get("state"))
    finally:
        client.close()


def wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(pred) and pred():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def test_contact_age_is_read_back(sockdir: Path) -> None:
    assert fence.contact_age(sockdir) is None
    fence.record_contact(sockdir)
    age = fence.contact_age(sockdir)
    assert age is not None and 0 <= age < 1
    (sockdir / fence.CONTACT_FILE).write_text("garbage")
    assert fence.contact_age(sockdir) is None  # unreadable: treated as never in touch


def test_watchdog_pauses_vms_once_contact_is_stale_and_never_resumes_them(
        sockdir: Path) -> None:
    pm = ProcessManager(DOUBLE, sockdir)
    boot(pm, "vm1")
    boot(pm, "vm2")
    pm.client("default", "vm2").put("vm.pause")  # paused by its owner: not the fence's
    fence.record_contact(sockdir)
    assert fence.ensure_watchdog(sockdir, 1.5)
    assert not fence.ensure_watchdog(sockdir, 1.5)  # one per directory
    assert fence.watchdog_running(sockdir)

    time.sleep(0.8)  # contact still fresh: nothing happens
    assert state(pm, "vm1") == "Running"

    wait(lambda: state(pm, "vm1") == "Paused", 5, "the watchdog pauses vm1")
    # It records the fence right after pausing (the pause shows first).
    wait(lambda: fence.read_fenced(sockdir), 5, "the watchdog's record of the fence")
    fenced = fence.read_fenced(sockdir)
    assert set(fenced) == {"default/vm1"}  # vm2 was paused already
    assert abs(fenced["default/vm1"] - time.time()) < 5

    fence.record_contact(sockdir)  # back in touch: resuming is the agent's decision
    time.sleep(1.5)
    assert state(pm, "vm1") == "Paused"
    assert set(fence.take_fenced(sockdir)) == {"default/vm1"}
    assert fence.read_fenced(sockdir) == {}  # each fence is reported once


def test_watchdog_leaves_when_nothing_is_left_to_guard(sockdir: Path) -> None:
    """Out of touch and no VMM: nothing to fence; the next agent starts a new one."""
    pm = ProcessManager(DOUBLE, sockdir)
    boot(pm, "vm1")
    fence.record_contact(sockdir)
    assert fence.ensure_watchdog(sockdir, 0.5)
    wait(lambda: state(pm, "vm1") == "Paused", 5, "vm1 paused")
    assert fence.watchdog_running(sockdir)
    pm.stop("default", "vm1", grace=1)
    wait(lambda: not fence.watchdog_running(sockdir), 5, "the watchdog to exit")


def test_a_vmm_that_cannot_be_paused_is_stopped(sockdir: Path) -> None:
    """A VMM whose API does not answer (still starting, or wedged) cannot be trusted to
    stay idle: fencing stops it."""
    pm = ProcessManager(DOUBLE, sockdir)
    pm.spawn("default", "vm1")
    socket = pm.paths("default", "vm1").socket
    assert wait_for_socket(str(socket), 5)
    socket.unlink()  # its API is unreachable
    assert fence.pause_all(pm) == ["default/vm1"]
    assert pm.pid("default", "vm1") is None


def test_the_watchdog_leaves_a_pid_file_for_whoever_stops_the_node(sockdir: Path) -> None:
    """Stopping a dev stack (or a test) by its pid files stops the watchdog too; the file
    is never taken for a VMM's."""
    fence.record_contact(sockdir)
    assert fence.ensure_watchdog(sockdir, 60)
    pidfile = sockdir / fence.PID_FILE
    wait(pidfile.exists, 5, "the watchdog's pid file")
    assert ProcessManager(DOUBLE, sockdir).discover() == []
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    wait(lambda: not fence.watchdog_running(sockdir), 5, "the watchdog to stop")
    wait(lambda: not pidfile.exists(), 5, "its pid file gone")
