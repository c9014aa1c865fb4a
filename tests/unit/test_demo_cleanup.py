"""`hyperfleet demo` leaves nothing running: not after a failed start, not after SIGTERM or
SIGHUP (its children run in their own sessions, so only the demo can stop them). The control
plane here is fake executables (sleep), so this needs neither etcd nor an API server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import certifi
import pytest

from hyperfleet.reconcilers.hypervisor.process import pid_alive
from hyperfleet.reconcilers.testing.demo import run_demo
from hyperfleet.reconcilers.testing.devstack import stop_processes

FakeK8s = Callable[[str], Path]


def _pid(path: Path) -> int:
    return int(path.read_text())


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """The demo's state directory, with certificates already there (so no openssl) and, after
    the test, no fake process left whatever the outcome."""
    w = tmp_path / "demo"
    (w / "apiserver").mkdir(parents=True)
    (w / "apiserver" / "admin.crt").write_text("")  # devstack makes certificates only once
    (w / "apiserver" / "ca.crt").write_text(Path(certifi.where()).read_text())
    yield w
    for pidfile in w.rglob("*.pid"):
        pid = _pid(pidfile)
        with contextlib.suppress(OSError):
            if pid_alive(pid) and b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fake_k8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeK8s:
    """HYPERFLEET_K8S_DIR with an etcd that runs (sleeps) and an API server script of choice."""
    def make(apiserver_script: str) -> Path:
        root = tmp_path / "k8s"
        for rel, body in (("chroot/usr/bin/etcd", "exec sleep 300"),
                          ("chroot/root/out/crd-apiserver", apiserver_script)):
            exe = root / rel
            exe.parent.mkdir(parents=True, exist_ok=True)
            exe.write_text(f"#!/bin/sh\n{body}\n")
            exe.chmod(0o755)
        monkeypatch.setenv("HYPERFLEET_K8S_DIR", str(root))
        return root

    return make


def test_a_failed_start_stops_the_etcd_it_started(workdir: Path, fake_k8s: FakeK8s) -> None:
    fake_k8s("echo 'boom: bad flag'; exit 1")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="exited early"):
        run_demo(workdir, 1, keep=False)
    assert not pid_alive(_pid(workdir / "apiserver" / "etcd.pid"))
    assert signal.getsignal(signal.SIGTERM) == handler  # the demo's handlers are gone again


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_stops_every_child_and_vmm(sig: signal.Signals, workdir: Path,
                                            fake_k8s: FakeK8s) -> None:
    root = fake_k8s("exec sleep 301")  # started, never ready: the demo is waiting for it
    # A VMM an agent left behind (they outlive their agent by design): the demo's to stop.
    vmm = subprocess.Popen(["sleep", "302"], start_new_session=True)
    (workdir / "node-1").mkdir()
    (workdir / "node-1" / "web.pid").write_text(str(vmm.pid))
    demo = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from hyperfleet.reconcilers.testing.demo import run_demo; "
         "sys.exit(run_demo(Path(sys.argv[1]), 1, False))", str(workdir)],
        env={**os.environ, "HYPERFLEET_K8S_DIR": str(root)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pidfiles = [workdir / "apiserver" / f"{n}.pid" for n in ("etcd", "apiserver")]
        deadline = time.monotonic() + 30
        while not all(p.exists() for p in pidfiles):
            assert demo.poll() is None, demo.communicate()[0]
            assert time.monotonic() < deadline, "the fake control plane never started"
            time.sleep(0.05)
        pids = [_pid(p) for p in pidfiles]
        assert all(pid_alive(p) for p in pids)
        demo.send_signal(sig)
        out, _ = demo.communicate(timeout=30)
        assert demo.returncode == 128 + sig, out
        assert f"{sig.name}: stopping the stack" in out
        assert not [p for p in pids if pid_alive(p)], "control plane left running"
        assert vmm.wait(timeout=10) == -signal.SIGTERM
    finally:
        for proc in (demo, vmm):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_stop_processes_kills_what_ignores_sigterm() -> None:
    polite = subprocess.Popen(["sleep", "300"])
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 300"])
    time.sleep(0.2)  # let the shell install its trap before exec
    started = time.monotonic()
    stop_processes([polite, stubborn], grace=1.0)
    assert polite.returncode == -signal.SIGTERM and stubborn.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 5
