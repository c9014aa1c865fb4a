"""Guest agent requests and hooks, and the host client's handshake, over a real socket."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.reconcilers import driver as driver_mod
from hyperfleet.reconcilers import guestagent
from hyperfleet.reconcilers.driver import VmDriver
from hyperfleet.reconcilers.guest import GuestClient, GuestError, GuestTimeout, GuestUnreachable
from hyperfleet.reconcilers.guestagent.program import GuestAgent
from hyperfleet.reconcilers.hypervisor.process import ProcessManager
from hyperfleet.reconcilers.hypervisor.process import pid_alive as alive
from hyperfleet.reconcilers.lifecycle import begin
from hyperfleet.reconcilers.models.common import Condition, now_utc
from hyperfleet.reconcilers.models.vm import VirtualMachine
from hyperfleet.reconcilers.vm import Action, Step
from tests import PLACEHOLDER_KERNEL


def hook(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def serve_once(path: Path, agent: GuestAgent, answer: bytes = b"OK 1\n") -> threading.Thread:
    """A stand-in for cloud-hypervisor's vsock socket with the agent behind it."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            f = conn.makefile("rwb")
            assert f.readline() == b"CONNECT 1024\n"
            f.write(answer)
            f.flush()
            if answer.startswith(b"OK"):
                agent.serve_connection(f, f)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_checkpoint_runs_hooks_in_order_and_records_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hook(tmp_path / "hooks/checkpoint.d/20-b", f"echo b >> {out}")
    hook(tmp_path / "hooks/checkpoint.d/10-a", f"echo a >> {out}")
    agent = GuestAgent(tmp_path / "hooks", tmp_path / "state")
    serve_once(tmp_path / "v.sock", agent)
    result = GuestClient(str(tmp_path / "v.sock")).call("checkpoint")
    assert result["hooks"] == ["10-a", "20-b"]
    assert out.read_text().split() == ["a", "b"]
    assert (tmp_path / "state/last-checkpoint.json").exists()


def test_failing_checkpoint_hook_is_an_error_naming_it(tmp_path: Path) -> None:
    hook(tmp_path / "hooks/checkpoint.d/10-db", "echo cannot freeze; exit 3")
    agent = GuestAgent(tmp_path / "hooks", tmp_path / "state")
    reply = agent.handle({"op": "checkpoint"})
    assert not reply["ok"] and "10-db" in reply["error"] and "cannot freeze" in reply["error"]
    assert not agent.handle({"op": "format-disk"})["ok"]


def test_health_reports_each_check(tmp_path: Path) -> None:
    hook(tmp_path / "hooks/health.d/10-ok", "echo fine")
    hook(tmp_path / "hooks/health.d/20-bad", "echo broken; exit 1")
    result = GuestAgent(tmp_path / "hooks", tmp_path / "s").handle({"op": "health"})["result"]
    assert result["healthy"] is False
    by = {c["hook"]: c for c in result["checks"]}
    assert by["10-ok"]["ok"] and not by["20-bad"]["ok"] and by["20-bad"]["output"] == "broken"
    assert "root-disk" in by


def test_client_reports_unreachable_and_refused(tmp_path: Path) -> None:
    with pytest.raises(GuestUnreachable):
        GuestClient(str(tmp_path / "missing.sock"), timeout=0.5).call("ping")
    serve_once(tmp_path / "v.sock", GuestAgent(tmp_path, tmp_path), answer=b"")
    with pytest.raises(GuestError, match="no guest agent answered"):
        GuestClient(str(tmp_path / "v.sock"), timeout=2).call("ping")


def serve_silent(path: Path, requests: list[dict[str, Any]]) -> threading.Event:
    """A guest that takes requests (recorded) and never answers; set the event to end it."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    srv.settimeout(0.05)
    done = threading.Event()

    def run() -> None:
        held = []
        with srv:
            while not done.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                f = conn.makefile("rwb")
                f.readline()
                f.write(b"OK 1\n")
                f.flush()
                requests.append(json.loads(f.readline()))
                held.append(conn)
        for conn in held:
            conn.close()

    threading.Thread(target=run, daemon=True).start()
    return done


def test_checkpoint_stops_at_the_hosts_deadline_and_answers_in_time(tmp_path: Path) -> None:
    """Hooks longer together than the host waits: the one running at the deadline is
    stopped before the reply, so the VM is never paused mid-hook, and none starts after."""
    hooks = tmp_path / "hooks/checkpoint.d"
    hook(hooks / "10-flush", "sleep 0.8; echo flushed")
    hook(hooks / "20-freeze", f"sleep 1.5; touch {tmp_path / 'froze'}")
    hook(hooks / "30-never", f"touch {tmp_path / 'never'}")
    agent = GuestAgent(tmp_path / "hooks", tmp_path / "state")  # 60 s per hook
    serve_once(tmp_path / "v.sock", agent)
    started = time.monotonic()
    with pytest.raises(GuestError, match="20-freeze failed: stopped at the host's deadline") as e:
        GuestClient(str(tmp_path / "v.sock")).call("checkpoint", deadline=1.2)
    assert not isinstance(e.value, GuestTimeout)  # the guest answered, in time
    assert time.monotonic() - started < 2.0
    time.sleep(max(0.0, started + 2.6 - time.monotonic()))  # 20-freeze would be done by now
    assert not (tmp_path / "froze").exists() and not (tmp_path / "never").exists()


def test_health_hooks_past_the_deadline_are_failed_checks(tmp_path: Path) -> None:
    hook(tmp_path / "hooks/health.d/10-slow", "sleep 5; echo db ok")
    hook(tmp_path / "hooks/health.d/20-next", "echo fine")
    agent = GuestAgent(tmp_path / "hooks", tmp_path / "state")
    started = time.monotonic()
    reply = agent.handle({"op": "health", "deadline": 0.5})
    assert time.monotonic() - started < 1.5
    by = {c["hook"]: c for c in reply["result"]["checks"]}
    assert not by["10-slow"]["ok"] and "deadline" in by["10-slow"]["output"]
    assert not by["20-next"]["ok"] and "not started" in by["20-next"]["output"]


def test_a_guest_that_does_not_answer_in_time_is_a_timeout(tmp_path: Path) -> None:
    """Distinct from unreachable: the request arrived and hooks may be running, so the
    client must not retry it and the driver must not call the guest absent."""
    requests: list[dict[str, Any]] = []
    done = serve_silent(tmp_path / "v.sock", requests)
    client = GuestClient(str(tmp_path / "v.sock"))
    client.margin = 0.2
    try:
        started = time.monotonic()
        with pytest.raises(GuestTimeout, match="did not answer restore"):
            client.call("restore", deadline=0.3, retry_for=5)
        assert 0.5 <= time.monotonic() - started < 1.5  # deadline + margin, no retries
        assert requests == [{"op": "restore", "deadline": 0.3}]
    finally:
        done.set()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hfg", dir="/tmp"))  # sun_path is 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_driver_tells_a_slow_guest_from_a_missing_one(
        sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver_mod, "GUEST_HEALTH_DEADLINE", 0.2)
    monkeypatch.setattr(driver_mod, "GUEST_STEP_DEADLINE", 0.2)
    monkeypatch.setattr(GuestClient, "margin", 0.2)
    drv = VmDriver(ProcessManager("/bin/true", sockdir), "node-a")
    vm = VirtualMachine.from_body({
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": "vm1", "namespace": "default", "generation": 1, "uid": "u"},
        "spec": {"cpus": 1, "memory": "256Mi", "boot": {"kernel": PLACEHOLDER_KERNEL},
                 "vsock": {"cid": 3}, "guestAgent": {}}})

    def health() -> Condition:
        drv._health_at.clear()
        d = begin(vm, "node-a", now_utc())
        drv._guest_health(vm, d)
        return d.conditions[0]

    assert health().reason == "GuestAgentUnreachable"
    requests: list[dict[str, Any]] = []
    done = serve_silent(sockdir / "default_vm1.vsock", requests)
    try:
        slow = health()
        assert (slow.status, slow.reason) == ("False", "GuestAgentTimeout")
        step = Step(Action.GUEST_CHECKPOINT, why="powerState Sleeping")
        d = begin(vm, "node-a", now_utc())
        drv._guest_step(vm, step, d)
        cond, events = d.conditions[0], d.events
        assert (cond.type, cond.status, cond.reason) == \
            ("GuestCheckpointed", "False", "GuestAgentTimeout")
        assert "continuing without it" in cond.message
        assert events[0][:2] == ("Warning", "GuestCheckpointedFailed")
        assert [r["op"] for r in requests] == ["health", "checkpoint"]
        assert all(r["deadline"] == 0.2 for r in requests)
    finally:
        done.set()


def test_hook_that_starts_a_background_service_succeeds(tmp_path: Path) -> None:
    """The hook is done when it exits, not when every holder of its stdout closes it."""
    pidfile = tmp_path / "svc.pid"
    hook(tmp_path / "hooks/restore.d/10-svc", f"sleep 30 & echo $! > {pidfile}; echo started")
    agent = GuestAgent(tmp_path / "hooks", tmp_path / "state", hook_timeout=5)
    try:
        started = time.monotonic()
        reply = agent.handle({"op": "restore"})
        assert time.monotonic() - started < 2
        assert reply["ok"], reply
        assert alive(int(pidfile.read_text()))  # the service keeps running
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_overrunning_hook_is_stopped_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    hook(tmp_path / "hooks/health.d/10-hung", f"sleep 60 & echo $! > {pidfile}; sleep 60")
    agent = GuestAgent(tmp_path / "hooks", tmp_path / "state", hook_timeout=0.5)
    reply = agent.handle({"op": "health"})
    check = reply["result"]["checks"][0]
    assert not check["ok"] and check["output"].startswith("timed out after")
    child = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 3
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_hook_output_is_read_from_the_tail_only(tmp_path: Path) -> None:
    """A hook printing megabytes must not cost the agent megabytes."""
    hook(tmp_path / "hooks/health.d/10-chatty",
         "head -c 20000000 /dev/zero | tr '\\0' x; echo; echo done")
    agent = GuestAgent(tmp_path / "hooks", tmp_path / "state")
    tracemalloc.start()
    try:
        reply = agent.handle({"op": "health"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    output = reply["result"]["checks"][0]["output"]
    assert output.endswith("x\ndone") and len(output) == 500
    assert peak < 1 << 20


def test_unreadable_output_and_unrunnable_hooks_fail_only_that_hook(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks/health.d"
    hook(hooks / "10-binary", "printf '\\377\\376 binary'; exit 1")
    hook(hooks / "30-ok", "echo fine")
    bare = hooks / "20-no-shebang"
    bare.write_text("echo hi\n")
    bare.chmod(0o755)
    agent = GuestAgent(tmp_path / "hooks", tmp_path / "state")
    wire = io.BytesIO()
    agent.serve_connection(io.BytesIO(b'{"op": "health"}\n'), wire)
    reply = json.loads(wire.getvalue())
    by = {c["hook"]: c for c in reply["result"]["checks"]}
    assert by["10-binary"] == {"hook": "10-binary", "ok": False, "output": "\ufffd\ufffd binary"}
    assert not by["20-no-shebang"]["ok"] and "#!" in by["20-no-shebang"]["output"]
    assert by["30-ok"]["ok"]
    (hooks.parent / "checkpoint.d").mkdir()
    bare.rename(hooks.parent / "checkpoint.d/10-no-shebang")
    failed = agent.handle({"op": "checkpoint"})
    assert not failed["ok"] and "10-no-shebang failed: cannot run" in failed["error"]


@pytest.mark.parametrize(("line", "error"), [
    (b'["op"]\n', "must be a JSON object"),
    (b'{"op": "ping", "deadline": -1}\n', "not a positive number"),
    (b'{"op": "ping", "deadline": true}\n', "not a positive number"),
    (b'{"op": "ping", "deadline": "60"}\n', "not a positive number"),
])
def test_malformed_requests_get_an_error_reply(tmp_path: Path, line: bytes, error: str) -> None:
    wire = io.BytesIO()
    GuestAgent(tmp_path, tmp_path).serve_connection(io.BytesIO(line), wire)
    reply = json.loads(wire.getvalue())
    assert reply["ok"] is False and error in reply["error"]


def test_host_that_hung_up_is_logged_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Gone(io.BytesIO):
        def write(self, data: Any) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    with caplog.at_level(logging.WARNING):
        GuestAgent(tmp_path, tmp_path).serve_connection(io.BytesIO(b'{"op": "ping"}\n'), Gone())
    assert "hung up" in caplog.text


def test_the_guest_agent_package_needs_only_the_standard_library() -> None:
    """It runs inside the VM, where the operator's dependencies are not installed (the
    import-linter contract guest-agent keeps the host client and kopf out of it too)."""
    found = []
    for path in sorted(Path(guestagent.__file__).parent.glob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and n.level == 1:
                continue  # within the package
            names = [n.module or ""] if isinstance(n, ast.ImportFrom) else \
                [a.name for a in n.names] if isinstance(n, ast.Import) else []
            found += [f"{path.name}: {m}" for m in names
                      if m.split(".")[0] not in sys.stdlib_module_names]
    assert not found
