"""The host's client for the guest agent over vsock, used by the node agent's VM driver:
checkpoint before a VM sleeps, restore on wake, the guest's health checks.

It reaches the guest through cloud-hypervisor's vsock unix socket and its
``CONNECT <port>`` handshake. The program answering inside the VM is
``reconcilers/guestagent/program.py`` (``hyperfleet-guest-agent``); the two share only the
wire protocol, ``reconcilers/guestagent/protocol.py``.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from .guestagent.protocol import DEFAULT_PORT, MAX_LINE, REPLY_MARGIN, encode, request
from .guestagent.protocol import GuestError as GuestError


class GuestUnreachable(GuestError):
    """Nothing answered on the guest port (no agent, guest not running yet).

    Raised only before the request is sent, so retrying cannot run hooks twice."""


class GuestTimeout(GuestError):
    """The agent took the request but did not answer in time: its hooks may still be
    running, which is not the same as a guest without an agent."""


class GuestClient:
    """One request per connection (the guest may have rebooted in between).

    ``timeout`` bounds the connect and handshake; the reply may take the request's
    deadline plus :attr:`margin`."""

    margin = REPLY_MARGIN

    def __init__(self, vsock_socket: str, port: int = DEFAULT_PORT, timeout: float = 5.0):
        self.vsock_socket = vsock_socket
        self.port = port
        self.timeout = timeout

    def call(self, op: str, deadline: float = 10.0, retry_for: float = 0.0) -> dict[str, Any]:
        """One request the guest must finish within ``deadline`` seconds; ``retry_for``
        seconds of retries while the guest is unreachable (right after a resume its vsock
        listener may take a moment)."""
        retry_until = time.monotonic() + retry_for
        while True:
            try:
                return self._call(op, deadline)
            except GuestUnreachable:
                if time.monotonic() >= retry_until:
                    raise
                time.sleep(0.2)

    def _call(self, op: str, deadline: float) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(self.vsock_socket)
                f = s.makefile("rwb")
                f.write(f"CONNECT {self.port}\n".encode())
                f.flush()
                hello = f.readline(256).decode(errors="replace").strip()
                if hello.startswith("OK"):
                    f.write(encode(request(op, deadline)))
                    f.flush()
            except OSError as exc:
                raise GuestUnreachable(
                    f"guest agent unreachable on vsock port {self.port}: {exc}") from exc
            if not hello.startswith("OK"):
                raise GuestUnreachable(
                    f"vsock port {self.port}: {hello or 'no guest agent answered'}")
            wait = deadline + self.margin
            s.settimeout(wait)
            try:
                line = f.readline(MAX_LINE)
            except TimeoutError as exc:
                raise GuestTimeout(
                    f"guest agent did not answer {op} within {wait:.0f}s (deadline "
                    f"{deadline:.0f}s); its hooks may still be running") from exc
            except OSError as exc:
                raise GuestError(f"guest agent connection lost during {op}: {exc}") from exc
        if not line:
            raise GuestError("guest agent closed the connection without answering")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise GuestError(f"guest agent answered {op} with something not JSON: {exc}") \
                from exc
        if not isinstance(reply, dict):
            raise GuestError(f"guest agent answered {op} with {type(reply).__name__}, "
                             "not an object")
        if not reply.get("ok"):
            raise GuestError(str(reply.get("error") or "guest agent reported a failure"))
        result: dict[str, Any] = reply.get("result") or {}
        return result
