"""Guest agent requests and hooks, and the host client's handshake, over a real socket."""

from __future__ import annotations

import socket
import stat
import threading
from pathlib import Path

import pytest

from hyperfleet.reconcilers.guest import GuestAgent, GuestClient, GuestError, GuestUnreachable


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
