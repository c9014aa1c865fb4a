"""The guest agent program (``hyperfleet-guest-agent``), run inside the VM: listens on
AF_VSOCK, quiesces workloads before the VM sleeps, resumes them on wake, and reports the
guest's own health checks. The host's side is ``reconcilers/guest.py``; the two share only
``protocol.py``.

Hooks are executables in ``<hooks>/checkpoint.d``, ``<hooks>/restore.d`` and
``<hooks>/health.d``, run in name order: a database flushes and freezes on checkpoint, a
service reconnects on restore, a health hook exits non-zero (stdout says why) when sick.
Each runs in its own session with stdin from /dev/null; it is done when it exits, so it
may leave a service running in the background. One that overruns is stopped with its
whole process group.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import socketserver
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from .protocol import (
    DEFAULT_PORT,
    KILL_GRACE,
    MAX_LINE,
    OPS,
    OUTPUT_CHARS,
    GuestError,
    encode,
    error_reply,
    ok_reply,
)

log = logging.getLogger(__name__)

_TAIL_BYTES = 4 * OUTPUT_CHARS  # enough for OUTPUT_CHARS of UTF-8


class GuestAgent:
    """Runs the hooks and remembers the last checkpoint."""

    def __init__(self, hooks_dir: str | Path, state_dir: str | Path,
                 hook_timeout: float = 60.0) -> None:
        self.hooks = Path(hooks_dir)
        self.state = Path(state_dir)
        self.hook_timeout = hook_timeout

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op not in OPS:
            return error_reply(f"unknown op {op!r}; known: {', '.join(OPS)}")
        deadline = request.get("deadline")
        if deadline is None:  # an older host: each hook still has hook_timeout
            until = None
        elif isinstance(deadline, int | float) and not isinstance(deadline, bool) \
                and deadline > 0:
            until = time.monotonic() + deadline
        else:
            return error_reply(f"deadline {deadline!r} is not a positive number of seconds")
        try:
            result = getattr(self, f"_{op}")(until)
        except (GuestError, OSError) as exc:
            return error_reply(str(exc))
        return ok_reply(result)

    def _ping(self, until: float | None) -> dict[str, Any]:
        return {"pid": os.getpid()}

    def _run(self, kind: str, check: bool, until: float | None) -> list[dict[str, Any]]:
        """Each hook in turn; none starts once the host's deadline has passed, and one
        still running then is stopped, so the reply is in time."""
        out = []
        hook_dir = self.hooks / f"{kind}.d"
        for hook in sorted(hook_dir.iterdir()) if hook_dir.is_dir() else []:
            if not (hook.is_file() and os.access(hook, os.X_OK)):
                continue
            left = None if until is None else until - time.monotonic()
            if left is not None and left <= 0:
                ok, output = False, "not started: the host's deadline had passed"
            else:
                ok, output = self._run_hook(hook, left)
            entry = {"hook": hook.name, "ok": ok, "output": output}
            out.append(entry)
            if check and not ok:
                raise GuestError(f"{kind} hook {hook.name} failed: {output}")
        return out

    def _run_hook(self, hook: Path, left: float | None) -> tuple[bool, str]:
        """(ok, output tail). Output goes to files, not pipes: a background child that
        keeps stdout open cannot hold the hook up, and a chatty one costs no memory."""
        limit = self.hook_timeout if left is None else min(self.hook_timeout, left)
        self.state.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.state) as stdout, \
                tempfile.TemporaryFile(dir=self.state) as stderr:
            try:
                proc = subprocess.Popen([str(hook)], stdin=subprocess.DEVNULL, stdout=stdout,
                                        stderr=stderr, start_new_session=True)
            except OSError as exc:
                hint = " (a script needs a #! line)" if exc.errno == errno.ENOEXEC else ""
                return False, f"cannot run: {exc.strerror or exc}{hint}"
            try:
                code: int | None = proc.wait(limit)
            except subprocess.TimeoutExpired:
                _stop_group(proc)
                code = None
            output = _tail(stdout) or _tail(stderr)
        if code is not None:
            return code == 0, output
        why = (f"timed out after {limit:.0f}s" if limit == self.hook_timeout
               else f"stopped at the host's deadline after {limit:.1f}s")
        if not output:
            return False, why
        why += "; last output: "
        return False, why + output[len(why) - OUTPUT_CHARS:]

    def _checkpoint(self, until: float | None) -> dict[str, Any]:
        hooks = self._run("checkpoint", True, until)
        self.state.mkdir(parents=True, exist_ok=True)
        record = {"at": time.time(), "hooks": [h["hook"] for h in hooks]}
        (self.state / "last-checkpoint.json").write_text(json.dumps(record))
        return record

    def _restore(self, until: float | None) -> dict[str, Any]:
        hooks = self._run("restore", True, until)
        checkpoint = self.state / "last-checkpoint.json"
        since = json.loads(checkpoint.read_text()) if checkpoint.exists() else None
        return {"hooks": [h["hook"] for h in hooks], "checkpoint": since}

    def _health(self, until: float | None) -> dict[str, Any]:
        checks = self._run("health", False, until)
        st = os.statvfs("/")
        free = st.f_bavail * st.f_frsize
        checks.append({"hook": "root-disk", "ok": free > 64 << 20,
                       "output": f"{free >> 20} MiB free on /"})
        return {"healthy": all(c["ok"] for c in checks), "checks": checks}

    def serve_connection(self, rfile: Any, wfile: Any) -> None:
        """One request/response after the transport is set up. Every request gets a
        reply; a host that hung up meanwhile (it gave up) is logged, not raised."""
        try:
            line = rfile.readline(MAX_LINE)
        except OSError as exc:
            log.warning("host request not received", extra={"error": str(exc)})
            return
        if not line:
            return
        request: Any = None
        try:
            request = json.loads(line)
        except ValueError as exc:
            reply = error_reply(f"request is not JSON: {exc}")
        else:
            reply = self.handle(request) if isinstance(request, dict) else error_reply(
                'request must be a JSON object such as {"op": "ping"}')
        try:
            wfile.write(encode(reply))
            wfile.flush()
        except OSError as exc:
            log.warning("host hung up before the reply",
                        extra={"op": request.get("op") if isinstance(request, dict) else None,
                               "error": str(exc)})


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL, the hook's whole process group (its session): children it
    left behind would otherwise keep running after the host moved on. The hook is reaped
    only after the SIGKILL, so its pid, the group's id, cannot be reused in between."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    end = time.monotonic() + KILL_GRACE
    while time.monotonic() < end and os.waitid(
            os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(f: IO[bytes]) -> str:
    """The last OUTPUT_CHARS of a hook's output file, whatever its encoding."""
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - _TAIL_BYTES))
    return f.read(_TAIL_BYTES).decode(errors="replace").strip()[-OUTPUT_CHARS:]


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
