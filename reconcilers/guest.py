"""Guest agent over vsock: quiesce workloads before a VM sleeps, resume them on wake,
and report the guest's own health checks.

Both halves live here so they cannot drift: :class:`GuestClient` is what the node agent
uses (through cloud-hypervisor's vsock unix socket and its ``CONNECT <port>`` handshake),
:class:`GuestAgent` is what runs inside the VM (``hyperfleet-guest-agent``, listening on
AF_VSOCK). The wire format is one JSON object per line, request then response.

Hooks are executables in ``<hooks>/checkpoint.d``, ``<hooks>/restore.d`` and
``<hooks>/health.d``, run in name order: a database flushes and freezes on checkpoint, a
service reconnects on restore, a health hook exits non-zero (stdout says why) when sick.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import socketserver
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PORT = 1024
OPS = ("ping", "checkpoint", "restore", "health")


class GuestError(Exception):
    """The guest agent could not be reached or reported a failure."""


class GuestUnreachable(GuestError):
    """Nothing answered on the guest port (no agent, guest not running yet)."""


class GuestClient:
    """Host side: one request per connection (the guest may have rebooted in between)."""

    def __init__(self, vsock_socket: str, port: int = DEFAULT_PORT, timeout: float = 5.0):
        self.vsock_socket = vsock_socket
        self.port = port
        self.timeout = timeout

    def call(self, op: str, timeout: float | None = None,
             retry_for: float = 0.0) -> dict[str, Any]:
        """One request; ``retry_for`` seconds of retries while the guest is unreachable
        (right after a resume its vsock listener may take a moment)."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return self._call(op, timeout)
            except GuestUnreachable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def _call(self, op: str, timeout: float | None) -> dict[str, Any]:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout or self.timeout)
                s.connect(self.vsock_socket)
                f = s.makefile("rwb")
                f.write(f"CONNECT {self.port}\n".encode())
                f.flush()
                hello = f.readline().decode().strip()
                if not hello.startswith("OK"):
                    raise GuestUnreachable(
                        f"vsock port {self.port}: {hello or 'no guest agent answered'}")
                f.write((json.dumps({"op": op}) + "\n").encode())
                f.flush()
                line = f.readline()
        except OSError as exc:
            raise GuestUnreachable(f"guest agent unreachable on vsock port {self.port}: {exc}") \
                from exc
        if not line:
            raise GuestError("guest agent closed the connection without answering")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise GuestError(str(reply.get("error") or "guest agent reported a failure"))
        result: dict[str, Any] = reply.get("result") or {}
        return result


class GuestAgent:
    """Guest side: runs the hooks and remembers the last checkpoint."""

    def __init__(self, hooks_dir: str | Path, state_dir: str | Path,
                 hook_timeout: float = 60.0) -> None:
        self.hooks = Path(hooks_dir)
        self.state = Path(state_dir)
        self.hook_timeout = hook_timeout

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op not in OPS:
            return {"ok": False, "error": f"unknown op {op!r}; known: {', '.join(OPS)}"}
        try:
            result = getattr(self, f"_{op}")()
        except GuestError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "result": result}

    def _ping(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def _run(self, kind: str, check: bool) -> list[dict[str, Any]]:
        out = []
        hook_dir = self.hooks / f"{kind}.d"
        for hook in sorted(hook_dir.iterdir()) if hook_dir.is_dir() else []:
            if not (hook.is_file() and os.access(hook, os.X_OK)):
                continue
            try:
                r = subprocess.run([str(hook)], capture_output=True, text=True,
                                   timeout=self.hook_timeout, check=False)
                entry = {"hook": hook.name, "ok": r.returncode == 0,
                         "output": (r.stdout or r.stderr).strip()[-500:]}
            except subprocess.TimeoutExpired:
                entry = {"hook": hook.name, "ok": False,
                         "output": f"timed out after {self.hook_timeout:.0f}s"}
            out.append(entry)
            if check and not entry["ok"]:
                raise GuestError(f"{kind} hook {hook.name} failed: {entry['output']}")
        return out

    def _checkpoint(self) -> dict[str, Any]:
        hooks = self._run("checkpoint", check=True)
        self.state.mkdir(parents=True, exist_ok=True)
        record = {"at": time.time(), "hooks": [h["hook"] for h in hooks]}
        (self.state / "last-checkpoint.json").write_text(json.dumps(record))
        return record

    def _restore(self) -> dict[str, Any]:
        hooks = self._run("restore", check=True)
        checkpoint = self.state / "last-checkpoint.json"
        since = json.loads(checkpoint.read_text()) if checkpoint.exists() else None
        return {"hooks": [h["hook"] for h in hooks], "checkpoint": since}

    def _health(self) -> dict[str, Any]:
        checks = self._run("health", check=False)
        st = os.statvfs("/")
        free = st.f_bavail * st.f_frsize
        checks.append({"hook": "root-disk", "ok": free > 64 << 20,
                       "output": f"{free >> 20} MiB free on /"})
        return {"healthy": all(c["ok"] for c in checks), "checks": checks}

    def serve_connection(self, rfile: Any, wfile: Any) -> None:
        """One request/response after the transport is set up."""
        line = rfile.readline()
        if not line:
            return
        try:
            reply = self.handle(json.loads(line))
        except ValueError as exc:
            reply = {"ok": False, "error": f"request is not JSON: {exc}"}
        wfile.write((json.dumps(reply) + "\n").encode())
        wfile.flush()


def serve_vsock(agent: GuestAgent, port: int) -> None:
    """Inside the VM: listen on AF_VSOCK (any CID) for the host."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            agent.serve_connection(self.rfile, self.wfile)

    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        address_family = socket.AF_VSOCK
        daemon_threads = True

    with Server((socket.VMADDR_CID_ANY, port), Handler) as server:  # type: ignore[arg-type]
        log.info("guest agent listening", extra={"vsockPort": port})
        server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(prog="hyperfleet-guest-agent", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vsock-port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--hooks-dir", default="/etc/hyperfleet/guest")
    ap.add_argument("--state-dir", default="/var/lib/hyperfleet-guest")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    serve_vsock(GuestAgent(args.hooks_dir, args.state_dir), args.vsock_port)


if __name__ == "__main__":
    main()
