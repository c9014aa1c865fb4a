"""Small client for one cloud-hypervisor process's REST API on its unix socket.

HTTP/1.1 straight over an AF_UNIX socket, the connection kept alive between calls (the
VMM's micro_http keeps it open): a call is one request written and one answer read. The
VMM's answers are simple (a status line, a few headers, a Content-Length body), so they
are parsed here; a requests/urllib3 stack cost ~8x more per call, and http.client (its
e-mail header parser) ~4x more than ``curl --unix-socket`` does per request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import socket
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

#: Unix socket paths are limited to 108 bytes including the NUL (sun_path).
MAX_SOCKET_PATH = 107
API_PREFIX = "/api/v1/"
#: Retry of transient failures: exponential waits from RETRY_FIRST_WAIT, capped at
#: RETRY_MAX_WAIT, until ``wait_socket`` seconds have passed since the first attempt.
RETRY_FIRST_WAIT = 0.02
RETRY_MAX_WAIT = 0.5
#: Idle keep-alive connections a client holds on to (more only while calls overlap).
MAX_IDLE = 2
#: Upper bound of an answer's status line and headers.
MAX_HEAD = 64 * 1024
_ACTION = re.compile(r"[A-Za-z0-9._-]+")


class ChError(Exception):
    """An error answer from the VMM (or no answer at all)."""

    def __init__(self, action: str, status: int | None, messages: list[str]) -> None:
        self.action = action
        self.status = status
        self.messages = messages
        where = f"HTTP {status}" if status is not None else "no answer"
        super().__init__(f"{action}: {where}: {' / '.join(messages) or 'no detail'}")

    @property
    def transient(self) -> bool:
        """Worth retrying: the VMM is busy or its socket is not up yet."""
        return self.status is None or self.status in (429, 503)


class ProtocolError(Exception):
    """The VMM's answer is not HTTP this client understands (or was cut short)."""


class _Answer:
    __slots__ = ("body", "keep", "reason", "status")

    def __init__(self, status: int, reason: str, body: bytes, keep: bool) -> None:
        self.status = status
        self.reason = reason
        self.body = body
        self.keep = keep  # the connection can carry the next call


class _Connection:
    """One HTTP/1.1 connection to a unix socket (the Host header says ``localhost``)."""

    def __init__(self, socket_path: str, timeout: float | None) -> None:
        self.answered = False  # some byte of the current call's answer was received
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(socket_path)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def reusable(self) -> bool:
        """Nothing to read while idle. Readable means the VMM closed the connection (it
        exited, or another VMM has the path now) or sent bytes nobody asked for: either
        way it cannot carry the next call."""
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def exchange(self, method: str, action: str, data: bytes | None,
                 timeout: float | None) -> _Answer:
        head = f"{method} {API_PREFIX}{action} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
        if data is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        elif method != "GET":
            head += "Content-Length: 0\r\n"
        self.sock.settimeout(timeout)
        self.sock.sendall(head.encode() + b"\r\n" + (data or b""))
        self.answered = False
        return self._answer()

    def _more(self, buf: bytearray) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            # Not ``buf``: the parsed part of the answer is no longer in it.
            raise ProtocolError("the VMM closed the connection " +
                                ("mid-answer" if self.answered else "without answering"))
        self.answered = True
        buf += chunk

    def _answer(self) -> _Answer:
        buf = bytearray()
        while True:  # past interim answers (100 Continue) to the final one
            while (end := buf.find(b"\r\n\r\n")) < 0:
                if len(buf) > MAX_HEAD:
                    raise ProtocolError(f"answer header over {MAX_HEAD} bytes")
                self._more(buf)
            lines = bytes(buf[:end]).split(b"\r\n")
            del buf[:end + 4]
            version, _, rest = lines[0].partition(b" ")
            code, _, reason = rest.partition(b" ")
            if not version.startswith(b"HTTP/") or len(code) != 3 or not code.isdigit():
                raise ProtocolError(f"bad status line {lines[0][:80]!r}")
            status = int(code)
            if status >= 200:
                break
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        keep = {b"close": False, b"keep-alive": True}.get(
            headers.get(b"connection", b"").lower(), version == b"HTTP/1.1")
        if status in (204, 304):
            body = b""
        elif headers.get(b"transfer-encoding", b"identity").lower() != b"identity":
            body = self._chunked(buf)
        elif b"content-length" in headers:
            if not headers[b"content-length"].isdigit():  # int() takes "-1", "+1", "1_0"
                raise ProtocolError("bad Content-Length")
            length = int(headers[b"content-length"])
            while len(buf) < length:
                self._more(buf)
            body = bytes(buf[:length])
            del buf[:length]
        else:  # the body ends with the connection
            while chunk := self.sock.recv(65536):
                buf += chunk
            body, keep = bytes(buf), False
            buf.clear()
        if buf:
            keep = False  # bytes past the answer: the connection is out of step
        return _Answer(status, reason.decode("latin-1").strip(), body, keep)

    def _chunked(self, buf: bytearray) -> bytes:
        body = bytearray()
        while True:
            while (end := buf.find(b"\r\n")) < 0:
                self._more(buf)
            try:
                size = int(bytes(buf[:end]).split(b";")[0], 16)
            except ValueError:
                raise ProtocolError("bad chunk size") from None
            del buf[:end + 2]
            if size == 0:  # then trailers, up to an empty line
                while (end := buf.find(b"\r\n")) != 0:
                    if end > 0:
                        del buf[:end + 2]
                    else:
                        self._more(buf)
                del buf[:2]
                return bytes(body)
            while len(buf) < size + 2:
                self._more(buf)
            body += buf[:size]
            del buf[:size + 2]


class ChClient:
    """Speaks the upstream API (``/api/v1/<action>``); errors become :class:`ChError`.

    Safe to share between threads: a call takes an idle kept-alive connection (or opens
    one) and gives it back once the answer is read. ``timeout`` (seconds per connect,
    send and receive) may be changed between calls."""

    def __init__(self, socket_path: str, timeout: float = 10.0, wait_socket: float = 5.0) -> None:
        if len(socket_path.encode()) > MAX_SOCKET_PATH:
            raise ValueError(
                f"socket path {socket_path!r} is longer than {MAX_SOCKET_PATH} bytes: "
                "use a shorter --socket-dir or VM name"
            )
        self.socket_path = socket_path
        self.timeout = timeout
        self.wait_socket = wait_socket
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the kept-alive connections; a later call opens a new one."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def request(self, method: str, action: str, body: Any = None) -> Any:
        """One call, retried (bounded by ``wait_socket``) only on transient failures."""
        start = time.monotonic()
        attempt = 1
        while True:
            try:
                return self._once(method, action, body)
            except ChError as exc:
                if not exc.transient or time.monotonic() - start >= self.wait_socket:
                    raise
            time.sleep(min(RETRY_FIRST_WAIT * 2 ** (attempt - 1), RETRY_MAX_WAIT))
            attempt += 1

    def _once(self, method: str, action: str, body: Any) -> Any:
        if not _ACTION.fullmatch(action):
            raise ValueError(f"not a VMM API action: {action!r}")
        if not os.path.exists(self.socket_path):
            raise ChError(action, None, [f"API socket {self.socket_path} does not exist (yet)"])
        data = None if body is None else json.dumps(body).encode()
        conn = self._checkout()
        try:
            if conn is None:
                try:
                    conn = _Connection(self.socket_path, self.timeout)
                except OSError as exc:
                    raise ChError(action, None, [f"cannot connect to {self.socket_path}: "
                                                 f"{_describe(exc)}"]) from exc
            try:
                answer = conn.exchange(method, action, data, self.timeout)
            except TimeoutError as exc:
                raise ChError(action, 504, [f"no answer within {self.timeout}s"]) from exc
            except (OSError, ProtocolError) as exc:
                raise ChError(action, None, [f"cannot connect to {self.socket_path}: "
                                             f"{_describe(exc)}"]) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if answer.keep:
            self._checkin(conn)
        else:
            conn.close()
        if answer.status >= 400:
            raise ChError(action, answer.status, _messages(answer.body, answer.reason))
        if answer.status == 204 or not answer.body:
            return None
        return json.loads(answer.body)

    def _checkout(self) -> _Connection | None:
        """An idle connection still good to use, or None: open a new one."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.reusable():
                    return conn
                conn.close()
        return None

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    # --- the actions Hyperfleet uses -------------------------------------------------
    def ping(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "vmm.ping")
        return result

    def info(self) -> dict[str, Any] | None:
        """vm.info, or None while no VM is created in this process."""
        try:
            result: dict[str, Any] = self.request("GET", "vm.info")
            return result
        except ChError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, config: dict[str, Any]) -> None:
        self.request("PUT", "vm.create", config)

    def put(self, action: str, body: Any = None) -> Any:
        return self.request("PUT", action, body)

    def shutdown_vmm(self) -> None:
        try:
            self._once("PUT", "vmm.shutdown", None)
        except ChError as exc:
            if exc.status is not None:
                raise


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _messages(payload: bytes, reason: str) -> list[str]:
    """An error answer's messages: upstream sends a JSON array of strings."""
    try:
        body = json.loads(payload)
    except ValueError:
        return [payload.decode("utf-8", errors="replace").strip() or reason or ""]
    if isinstance(body, list):
        return [str(m) for m in body]
    return [json.dumps(body)]


def wait_for_socket(path: str, timeout: float) -> bool:
    """Bounded wait for a freshly spawned VMM's socket to appear."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.02)
    return os.path.exists(path)
