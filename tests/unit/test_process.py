"""ProcessManager: what a restarted agent can still tell about the VMMs it adopts."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperfleet.reconcilers.hypervisor.process import (
    ProcessManager,
    UnsafeNameError,
    _monotonic_start,
)

DOUBLE = str(Path(sys.executable).with_name("hyperfleet-ch-double"))


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hfp", dir="/tmp"))  # sun_path is 108 bytes
    yield d
    ProcessManager(DOUBLE, d).stop("default", "vm1", grace=1)
    shutil.rmtree(d, ignore_errors=True)


def test_an_adopted_vmm_has_a_start_time(sockdir: Path) -> None:
    """Without one, the driver's socket timeout never fires for an adopted VMM."""
    old = ProcessManager(DOUBLE, sockdir)
    old.spawn("default", "vm1")
    spawned = old.started_at("default", "vm1")
    assert spawned is not None
    time.sleep(0.3)

    adopted = ProcessManager(DOUBLE, sockdir).started_at("default", "vm1")
    assert adopted is not None
    assert abs(adopted - spawned) < 0.2  # from /proc: clock ticks, not "now"
    assert time.monotonic() - adopted >= 0.3


def test_no_vmm_no_start_time(sockdir: Path) -> None:
    assert ProcessManager(DOUBLE, sockdir).started_at("default", "vm1") is None


def test_start_time_falls_back_to_the_pid_file(tmp_path: Path) -> None:
    """Where /proc cannot say (the pid is gone or unreadable), the pid file, written
    right after the spawn, dates the VMM."""
    pidfile = tmp_path / "x.pid"
    pidfile.write_text("1\n")
    written = time.time() - 30
    os.utime(pidfile, (written, written))
    started = _monotonic_start(2**22 + 1, pidfile)  # above pid_max: no such process
    assert started is not None
    assert abs((time.monotonic() - started) - 30) < 1
    assert _monotonic_start(2**22 + 1, tmp_path / "missing.pid") is None


def test_names_are_checked_against_the_longest_derived_socket(sockdir: Path) -> None:
    """The vsock and migration sockets sit beside the API socket with longer suffixes:
    a name whose ``.sock`` just fits would leave them unbindable."""
    pm = ProcessManager(DOUBLE, sockdir)
    stem = f"{sockdir}/default_"
    fits_sock = "a" * (107 - len(stem) - len(".sock"))
    with pytest.raises(UnsafeNameError, match=r"\.migration exceeds the 107-byte .*--socket-dir"):
        pm.paths("default", fits_sock)
    fits_all = "a" * (107 - len(stem) - len(".migration"))
    assert len(str(pm.paths("default", fits_all).socket.with_suffix(".migration"))) == 107
