"""Tests of ChClient's own HTTP/1.1 over a kept-alive unix socket.

``ChClient`` writes its requests and parses the VMM's answers itself (see the module's
docstring for why). Each test here starts a scripted server: a thread with a real
AF_UNIX listening socket in a short temporary directory (socket paths are limited to
108 bytes) that answers every request of every accepted connection with raw bytes the
test chooses, and records what it received (the raw request bytes and the connection
they came on). So the tests can say both what the client returns or raises and what
reached the VMM: how many connections, how many requests, which bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from hyperfleet.reconcilers.hypervisor import client as client_module
from hyperfleet.reconcilers.hypervisor.client import ChClient, ChError

#: Generous bound for calls that must fail or give up "soon" (the tests do not assert
#: tight timings, only that a call returns and is bounded).
BOUND = 5.0
REQUEST_LINE = re.compile(r"(GET|PUT) (/api/v1/[A-Za-z0-9._-]+) HTTP/1\.1")
HEADER_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ?(.*)")


@dataclass(frozen=True)
class Request:
    """One request as the server received it."""

    n: int  # the server's count of requests, from 1
    conn: int  # the accepted connection it came on, from 1
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    raw: bytes  # exactly the bytes of this request

    @property
    def action(self) -> str:
        return self.path.removeprefix("/api/v1/")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    """What the server does with one request."""

    data: bytes = b""
    #: keep: read the next request on this connection; close: close it after ``data``;
    #: hang: send ``data``, then neither answer nor close until the server stops.
    then: Literal["keep", "close", "hang"] = "keep"
    #: > 0: send ``data`` one byte at a time, this many seconds apart.
    dribble: float = 0.0


Answer = Callable[[Request], Reply]


def http(status: int, body: bytes = b"", *, reason: str = "", headers: Sequence[str] = (),
         version: str = "HTTP/1.1", length: bool = True) -> bytes:
    """Raw bytes of one answer; Content-Length is added unless ``length`` is False."""
    lines = [f"{version} {status} {reason}".rstrip(), *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def ok_json(value: Any, *headers: str) -> bytes:
    return http(200, json.dumps(value).encode(), reason="OK",
                headers=["Content-Type: application/json", *headers])


class ScriptedServer:
    """An AF_UNIX HTTP server answering with canned bytes, recording what it received."""

    def __init__(self, path: str, answer: Answer, listen_after: float = 0.0) -> None:
        self.path = path
        self.answer = answer
        self.requests: list[Request] = []
        self.connections = 0
        self.closed_by_server = 0
        self.errors: list[str] = []  # requests the server could not parse
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []  # accepted, to wake at stop()
        self._listener: socket.socket | None = None
        self._spawn(self._serve, listen_after)
        if listen_after == 0:
            assert self._listening.wait(BOUND), "the scripted server did not start"

    # --- what the tests look at ------------------------------------------------------
    def wait_for(self, predicate: Callable[[], bool], timeout: float = BOUND) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), "the server never got there"

    def actions(self) -> list[str]:
        with self._cond:
            return [r.action for r in self.requests]

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            open_socks = list(self._open)
        for sock in open_socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv
        if self._listening.is_set():  # wakes the accept
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waker, \
                    contextlib.suppress(OSError):
                waker.connect(self.path)
        for thread in list(self._threads):
            thread.join(BOUND)
        if self._listener is not None:
            self._listener.close()

    # --- the server ------------------------------------------------------------------
    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._cond:
            self._threads.append(thread)
        thread.start()

    def _serve(self, listen_after: float) -> None:
        if self._stop.wait(listen_after):
            return
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(64)
        listener.settimeout(0.5)
        self._listener = listener
        self._listening.set()
        while not self._stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._stop.is_set():
                sock.close()
                return
            with self._cond:
                self._open.append(sock)
                self.connections += 1
                conn = self.connections
                self._cond.notify_all()
            self._spawn(self._handle, sock, conn)

    def _recv(self, sock: socket.socket, buf: bytearray) -> bool:
        """More bytes into ``buf``; False at the end of the stream or when stopping."""
        while not self._stop.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return False
            buf += chunk
            return bool(chunk)
        return False

    def _read_request(self, sock: socket.socket, buf: bytearray, conn: int) -> Request | None:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if not self._recv(sock, buf):
                return None
        head = bytes(buf[:end]).decode("latin-1")
        lines = head.split("\r\n")
        request_line = REQUEST_LINE.fullmatch(lines[0])
        headers: dict[str, str] = {}
        problems = [] if request_line else [f"bad request line {lines[0]!r}"]
        for line in lines[1:]:
            header = HEADER_LINE.fullmatch(line)
            if header is None or "\r" in line or "\n" in line:
                problems.append(f"bad header line {line!r}")
                continue
            headers[header[1].lower()] = header[2]
        length = int(headers.get("content-length", "0"))
        while len(buf) < end + 4 + length:
            if not self._recv(sock, buf):
                return None
        raw = bytes(buf[:end + 4 + length])
        del buf[:end + 4 + length]
        with self._cond:
            self.errors += problems
            request = Request(len(self.requests) + 1, conn,
                              request_line[1] if request_line else "",
                              request_line[2] if request_line else "",
                              headers, raw[end + 4:], raw)
            self.requests.append(request)
            self._cond.notify_all()
        return request

    def _handle(self, sock: socket.socket, conn: int) -> None:
        sock.settimeout(0.5)
        buf = bytearray()
        try:
            while (request := self._read_request(sock, buf, conn)) is not None:
                reply = self.answer(request)
                if reply.dribble > 0:
                    for i in range(len(reply.data)):
                        sock.sendall(reply.data[i:i + 1])
                        time.sleep(reply.dribble)
                else:
                    sock.sendall(reply.data)
                if reply.then == "hang":
                    self._stop.wait()
                    return
                if reply.then == "close":
                    sock.close()
                    with self._cond:
                        self.closed_by_server += 1
                        self._cond.notify_all()
                    return
        except OSError:
            pass  # the client went away mid-answer
        finally:
            sock.close()


ServerFactory = Callable[..., ScriptedServer]


@pytest.fixture
def socket_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="chc-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(socket_dir: str) -> Iterator[ServerFactory]:
    """``serve(answer, listen_after=0.0)``: a started scripted server on ``<dir>/api``."""
    servers: list[ScriptedServer] = []

    def start(answer: Answer, listen_after: float = 0.0) -> ScriptedServer:
        server = ScriptedServer(os.path.join(socket_dir, "api"), answer, listen_after)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def always(data: bytes, then: Literal["keep", "close", "hang"] = "keep",
           dribble: float = 0.0) -> Answer:
    return lambda request: Reply(data, then, dribble)


def client_for(server: ScriptedServer, timeout: float = 2.0, wait_socket: float = 0.3) -> ChClient:
    return ChClient(server.path, timeout=timeout, wait_socket=wait_socket)


def failing(call: Callable[[], Any]) -> tuple[ChError, float]:
    """The ChError ``call`` raises, and how long it took to raise it."""
    start = time.monotonic()
    with pytest.raises(ChError) as caught:
        call()
    return caught.value, time.monotonic() - start


# --- answers the client must read (and then reuse the connection when it may) -------

INFO = {"state": "Running", "config": {"cpus": {"boot_vcpus": 2}}, "memory_actual_size": 1 << 30}
INFO_BYTES = json.dumps(INFO).encode()
#: Chunk data cut at arbitrary places, one chunk holding a CRLF (legal JSON whitespace)
#: so that only the chunk size can tell where the chunk ends.
CHUNKED_BODY = (
    b"7;name=value\r\n" + b'{"state' + b"\r\n"
    + b"c\r\n" + b'":\r\n "Runnin' + b"\r\n"
    + b"1;a=1;b=\"q\"\r\n" + b'g' + b"\r\n"
    + b"1C\r\n" + b'", "config": {"cpus": {"boot' + b"\r\n"
    + b"15\r\n" + b'_vcpus": 2}}, "memory' + b"\r\n"
    + b"1a\r\n" + b'_actual_size": 1073741824}' + b"\r\n"
    + b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
)

SHAPES: dict[str, tuple[bytes, bool]] = {
    # name: (raw answer, whether the connection may carry the next call)
    "content-length": (ok_json(INFO, "Server: Cloud Hypervisor API",
                               "Connection: keep-alive"), True),
    "chunked, extensions and trailers": (
        http(200, CHUNKED_BODY, reason="OK", length=False,
             headers=["Content-Type: application/json", "Transfer-Encoding: chunked"]), True),
    "100 Continue first": (b"HTTP/1.1 100 Continue\r\n\r\n" + ok_json(INFO), True),
    "two interim answers": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX: y\r\n\r\n"
                            + ok_json(INFO), True),
    "body until close": (http(200, INFO_BYTES, reason="OK", length=False,
                              headers=["Connection: close"]), False),
    "HTTP/1.0, body until close": (http(200, INFO_BYTES, version="HTTP/1.0", length=False), False),
}


@pytest.mark.parametrize("dribble", [0.0, 0.0003], ids=["whole", "dribbled"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_answer_shapes_are_read(serve: ServerFactory, shape: str, dribble: float) -> None:
    """The body is exactly the JSON, however it is framed and however it arrives; then
    the connection carries the next call when the framing allows it."""
    data, reusable = SHAPES[shape]
    then: Literal["keep", "close"] = "keep" if reusable else "close"
    server = serve(always(data, then, dribble))
    client = client_for(server)
    assert client.info() == INFO
    assert client.info() == INFO
    assert server.actions() == ["vm.info", "vm.info"]
    assert server.connections == (1 if reusable else 2)
    assert server.errors == []


@pytest.mark.parametrize("data", [
    http(204, reason="No Content"),
    http(200, reason="OK"),
    http(200, reason="OK", length=False, headers=["Transfer-Encoding: chunked"]) + b"0\r\n\r\n",
], ids=["204", "200 empty", "200 empty chunked"])
def test_empty_answers_are_none_and_keep_the_connection(serve: ServerFactory, data: bytes) -> None:
    server = serve(always(data))
    client = client_for(server)
    for _ in range(3):
        assert client.put("vm.pause") is None
    assert server.connections == 1


@pytest.mark.parametrize(("connection", "reused"), [
    (["Connection: keep-alive"], True),
    ([], True),  # HTTP/1.1 keeps the connection unless told otherwise
    (["Connection: close"], False),
    (["Connection: Close"], False),
])
def test_keep_alive_reuses_and_close_reconnects(serve: ServerFactory, connection: list[str],
                                                reused: bool) -> None:
    """The server never closes here: only the client's reading of Connection decides."""
    server = serve(always(ok_json({"version": "v54"}, *connection)))
    client = client_for(server)
    for _ in range(5):
        assert client.ping() == {"version": "v54"}
    assert len(server.requests) == 5
    assert server.connections == (1 if reused else 5)
    assert [r.conn for r in server.requests] == ([1] * 5 if reused else [1, 2, 3, 4, 5])


@pytest.mark.parametrize(("headers", "reused"), [([], False), (["Connection: keep-alive"], True)])
def test_http_1_0_answers(serve: ServerFactory, headers: list[str], reused: bool) -> None:
    server = serve(always(http(200, b'{"a": 1}', version="HTTP/1.0", headers=headers)))
    client = client_for(server)
    assert [client.ping() for _ in range(3)] == [{"a": 1}] * 3
    assert server.connections == (1 if reused else 3)


def test_close_answer_then_keep_alive_answer(serve: ServerFactory) -> None:
    """Connection: close on the first answer only: 3 calls need exactly 2 connections."""
    def answer(request: Request) -> Reply:
        return Reply(ok_json({"n": request.n}, *(["Connection: close"] if request.n == 1 else [])))

    server = serve(answer)
    client = client_for(server)
    assert [client.ping()["n"] for _ in range(3)] == [1, 2, 3]
    assert [r.conn for r in server.requests] == [1, 2, 2]


def test_bytes_past_the_answer_drop_the_connection(serve: ServerFactory) -> None:
    """An answer followed by bytes nobody asked for (here a second answer): the
    connection is out of step, so the next call must not read its answer from it."""
    def answer(request: Request) -> Reply:
        return Reply(ok_json({"n": request.n}) + ok_json({"stray": request.n}))

    server = serve(answer)
    client = client_for(server)
    assert [client.ping() for _ in range(3)] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert server.connections == 3


# --- a kept-alive connection the VMM closed while idle --------------------------------

def test_idle_connection_closed_by_server_reconnects_once(serve: ServerFactory) -> None:
    """The VMM answers keep-alive, then closes the idle connection: the next call sees
    that before sending and opens a new one; the PUT reaches the VMM exactly once."""
    def answer(request: Request) -> Reply:
        if request.conn == 1:
            return Reply(ok_json({"version": "v54"}), then="close")
        return Reply(http(204, reason="No Content"))

    server = serve(answer)
    # No retry allowed: the close must be noticed before the PUT is sent.
    client = client_for(server, wait_socket=0.0)
    assert client.ping() == {"version": "v54"}
    server.wait_for(lambda: server.closed_by_server == 1)
    assert client.put("vm.resize", {"desired_vcpus": 4}) is None
    assert server.actions() == ["vmm.ping", "vm.resize"]
    assert [r.conn for r in server.requests] == [1, 2]
    assert server.requests[1].json() == {"desired_vcpus": 4}


def test_close_racing_the_idle_check_still_reaches_server_once(
        serve: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The close lands just after the idle check said the connection was fine (simulated:
    the check always says fine). Sending on it fails, so nothing reached the VMM on it,
    and the call is retried on a new connection: still exactly one PUT."""
    def answer(request: Request) -> Reply:
        if request.conn == 1:
            return Reply(ok_json({"version": "v54"}), then="close")
        return Reply(http(204, reason="No Content"))

    monkeypatch.setattr(client_module._Connection, "reusable", lambda self: True)
    server = serve(answer)
    client = client_for(server, wait_socket=2.0)
    assert client.ping() == {"version": "v54"}
    server.wait_for(lambda: server.closed_by_server == 1)
    assert client.put("vm.resize", {"desired_vcpus": 4}) is None
    assert server.actions() == ["vmm.ping", "vm.resize"]
    assert server.connections == 2


def test_close_drops_idle_connections(serve: ServerFactory) -> None:
    server = serve(always(ok_json({"version": "v54"})))
    client = client_for(server)
    client.ping()
    client.close()
    client.ping()
    assert server.connections == 2


# --- answers that are not (complete) HTTP ---------------------------------------------

def _bad_then_good(bad: Reply) -> Answer:
    """``bad`` to the first two requests, a good answer to the others."""
    return lambda request: bad if request.n <= 2 else Reply(ok_json({"version": "v54"}))


def _fails_then_retry_succeeds(server: ScriptedServer, call: Callable[[ChClient], Any],
                               message: str) -> ChError:
    """With ``wait_socket=0`` the call is tried once and fails with ``message``; with time
    left it is retried on a new connection (a broken one is never reused) and succeeds."""
    client = client_for(server, wait_socket=0.0)
    exc, elapsed = failing(lambda: call(client))
    assert exc.status is None and exc.transient
    assert message in str(exc)
    assert elapsed < BOUND
    assert len(server.requests) == 1
    client.wait_socket = BOUND
    assert call(client) == {"version": "v54"}
    assert len(server.requests) == 3
    assert [r.conn for r in server.requests] == [1, 2, 3]
    return exc


HEAD_200 = b"HTTP/1.1 200 OK\r\n"
CHUNKED_HEAD = HEAD_200 + b"Transfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(("data", "message"), [
    (HEAD_200 + b"Content-Length: 10\r\n\r\n" + b'{"a"', "mid-answer"),
    (HEAD_200 + b"Content-Length: 10\r\n\r\n", "mid-answer"),
    (CHUNKED_HEAD + b"10\r\n" + b'{"a": ', "mid-answer"),
    (CHUNKED_HEAD + b"2\r\n{}\r\n", "mid-answer"),
    (CHUNKED_HEAD + b"2\r\n{}\r\n0\r\nX-Trailer: 1\r\n", "mid-answer"),
    (HEAD_200 + b"Content-Le", "mid-answer"),
    (b"HTTP/1.1 100 Continue\r\n\r\n", "mid-answer"),
    (b"", "without answering"),
], ids=["content-length", "head only", "chunk data", "no last chunk", "trailers", "headers",
        "interim only", "nothing"])
def test_truncated_answer_is_no_answer(serve: ServerFactory, data: bytes, message: str) -> None:
    """Cut short by EOF: ChError with status None, which is transient, so it is retried
    while ``wait_socket`` lasts. NB a PUT cut short mid-answer reached the VMM, and its
    retry reaches it again."""
    server = serve(_bad_then_good(Reply(data, "close")))
    exc = _fails_then_retry_succeeds(server, lambda c: c.put("vm.resize", {"desired_vcpus": 4}),
                                     message)
    assert exc.action == "vm.resize"
    assert isinstance(exc.__cause__, client_module.ProtocolError)
    assert server.actions() == ["vm.resize"] * 3


@pytest.mark.parametrize(("data", "then", "message"), [
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "keep", "bad status line"),
    (b"220 mail.example ESMTP\r\n\r\n", "keep", "bad status line"),
    (b"HTTP/1.1 2x0 OK\r\n\r\n", "keep", "bad status line"),
    (b"HTTP/1.1 20 OK\r\n\r\n", "keep", "bad status line"),
    (b"\x00\x01\x02 binary, no line ends at all", "close", "mid-answer"),
    (b"x" * (client_module.MAX_HEAD + 4096), "hang", f"over {client_module.MAX_HEAD} bytes"),
    (HEAD_200 + b"Content-Length: abc\r\n\r\n{}", "keep", "bad Content-Length"),
    (HEAD_200 + b"Content-Length: -1\r\n\r\n{}", "keep", "bad Content-Length"),
    (CHUNKED_HEAD + b"zz\r\n{}\r\n0\r\n\r\n", "keep", "bad chunk size"),
    (CHUNKED_HEAD + b"-2\r\n{}\r\n0\r\n\r\n", "keep", "bad chunk size"),
], ids=["ssh", "smtp", "status letters", "status 2 digits", "binary", "endless head",
        "content-length letters", "content-length negative", "chunk size letters",
        "chunk size negative"])
def test_garbage_is_a_protocol_error(serve: ServerFactory, data: bytes,
                                     then: Literal["keep", "close", "hang"], message: str) -> None:
    """Not HTTP: ChError with status None and the ProtocolError's text, promptly even
    when the peer keeps the connection open; retried like no answer at all."""
    server = serve(_bad_then_good(Reply(data, then)))
    exc = _fails_then_retry_succeeds(server, lambda c: c.ping(), message)
    assert isinstance(exc.__cause__, client_module.ProtocolError)


# --- error answers --------------------------------------------------------------------

def test_404_json_array_is_cherror_and_info_none(serve: ServerFactory) -> None:
    body = json.dumps(["VM is not created"]).encode()
    server = serve(always(http(404, body, reason="Not Found",
                               headers=["Content-Type: application/json"])))
    client = client_for(server, wait_socket=2.0)
    exc, _ = failing(lambda: client.request("GET", "vm.info"))
    assert (exc.action, exc.status, exc.messages) == ("vm.info", 404, ["VM is not created"])
    assert not exc.transient
    assert client.info() is None
    assert len(server.requests) == 2  # not retried
    assert server.connections == 1  # an error answer still leaves the connection usable


def test_500_json_array_messages(serve: ServerFactory) -> None:
    chain = ["Error from device manager", "Failed to add disk", "No such file: /nope.raw"]
    server = serve(always(http(500, json.dumps(chain).encode(), reason="Internal Server Error")))
    client = client_for(server, wait_socket=2.0)
    exc, _ = failing(lambda: client.put("vm.add-disk", {"path": "/nope.raw"}))
    assert exc.status == 500 and exc.messages == chain and not exc.transient
    assert " / ".join(chain) in str(exc)
    assert server.actions() == ["vm.add-disk"]  # not retried


@pytest.mark.parametrize(("body", "messages"), [
    (b"plain text problem", ["plain text problem"]),
    (b"", ["Bad Request"]),
    (b'{"error": "x"}', ['{"error": "x"}']),
], ids=["text", "empty", "object"])
def test_non_array_error_bodies(serve: ServerFactory, body: bytes, messages: list[str]) -> None:
    server = serve(always(http(400, body, reason="Bad Request")))
    client = client_for(server)
    exc, _ = failing(lambda: client.put("vm.boot"))
    assert (exc.status, exc.messages) == (400, messages)


@pytest.mark.parametrize("status", [503, 429])
def test_busy_is_retried_until_wait_socket_runs_out(serve: ServerFactory, status: int) -> None:
    server = serve(always(http(status, b'["busy"]', reason="Busy")))
    client = client_for(server, wait_socket=0.3)
    exc, elapsed = failing(client.ping)
    assert exc.status == status and exc.transient and exc.messages == ["busy"]
    assert 0.3 <= elapsed < BOUND
    assert len(server.requests) >= 2


def test_busy_then_answer_succeeds(serve: ServerFactory) -> None:
    def answer(request: Request) -> Reply:
        if request.n <= 2:
            return Reply(http(503, b'["busy"]', reason="Service Unavailable"))
        return Reply(ok_json({"version": "v54"}))

    server = serve(answer)
    client = client_for(server, wait_socket=BOUND)
    assert client.ping() == {"version": "v54"}
    assert len(server.requests) == 3


# --- time ------------------------------------------------------------------------------

def test_no_answer_times_out(serve: ServerFactory) -> None:
    """A kept-alive connection opened under a long timeout; the timeout is then lowered
    and the VMM never answers the next call: the call gives up after the new timeout
    (504, not retried)."""
    def answer(request: Request) -> Reply:
        return Reply(ok_json({"version": "v54"})) if request.n == 1 else Reply(then="hang")

    server = serve(answer)
    client = client_for(server, timeout=30.0, wait_socket=30.0)
    client.ping()
    client.timeout = 0.3
    exc, elapsed = failing(client.ping)
    assert exc.status == 504 and not exc.transient
    assert elapsed < BOUND
    assert len(server.requests) == 2 and server.connections == 1


def test_headers_without_body_times_out(serve: ServerFactory) -> None:
    server = serve(always(http(200, b"", headers=["Content-Length: 100"], length=False), "hang"))
    client = client_for(server, timeout=0.3, wait_socket=30.0)
    exc, elapsed = failing(client.ping)
    assert exc.status == 504
    assert elapsed < BOUND


def test_socket_appearing_later(serve: ServerFactory) -> None:
    server = serve(always(ok_json({"version": "v54"})), listen_after=0.3)
    assert not os.path.exists(server.path)
    client = client_for(server, wait_socket=2.0)
    assert client.ping() == {"version": "v54"}
    assert len(server.requests) == 1


def test_socket_never_appearing(socket_dir: str) -> None:
    client = ChClient(os.path.join(socket_dir, "api"), timeout=1.0, wait_socket=0.1)
    exc, elapsed = failing(client.ping)
    assert exc.status is None and "does not exist" in str(exc)
    assert elapsed < BOUND


def test_socket_file_without_listener(socket_dir: str) -> None:
    """A stale socket file (the VMM died): connection refused, retried, then no answer."""
    path = os.path.join(socket_dir, "api")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    client = ChClient(path, timeout=1.0, wait_socket=0.1)
    exc, elapsed = failing(client.ping)
    assert exc.status is None and "cannot connect" in str(exc)
    assert elapsed < BOUND


def test_socket_path_too_long() -> None:
    with pytest.raises(ValueError, match="longer than"):
        ChClient("/tmp/" + "x" * 103)
    ChClient("/tmp/" + "x" * 102)  # 107 bytes: fine


# --- the requests written ---------------------------------------------------------------

@pytest.mark.parametrize("action", [
    "vm.info x", "vm.info\r\nX-Injected: 1", "vm.info\n", "vm.info HTTP/1.1\r\n\r\nGET /x",
    "../vmm.ping", "vm/info", "", "vm.info?x=1", "vm.ïnfo",
])
def test_bad_action_is_rejected_before_sending(serve: ServerFactory, action: str) -> None:
    server = serve(always(ok_json({})))
    client = client_for(server)
    with pytest.raises(ValueError, match="not a VMM API action"):
        client.request("PUT", action, {"a": 1})
    with pytest.raises(ValueError):
        client.put(action)
    assert client.ping() == {}  # the only thing that reached the server
    assert server.actions() == ["vmm.ping"]


def test_bad_action_is_rejected_without_socket(socket_dir: str) -> None:
    """Rejected at once, not retried as if the socket were just not up yet."""
    client = ChClient(os.path.join(socket_dir, "api"), wait_socket=30.0)
    start = time.monotonic()
    with pytest.raises(ValueError):
        client.put("vm.info\r\nX: y")
    assert time.monotonic() - start < BOUND


def _head_lines(request: Request) -> list[str]:
    head, sep, _ = request.raw.partition(b"\r\n\r\n")
    assert sep, request.raw
    assert b"\n" not in head.replace(b"\r\n", b""), "a bare LF in the head"
    assert b"\r" not in head.replace(b"\r\n", b""), "a bare CR in the head"
    return head.decode("ascii").split("\r\n")


def test_request_bytes_are_http_1_1(serve: ServerFactory) -> None:
    server = serve(always(http(204, reason="No Content")))
    client = client_for(server)
    body = {"desired_vcpus": 4, "name": "é ü", "nested": [1, {"a": None}]}
    client.put("vm.resize", body)
    client.request("GET", "vm.info")
    client.put("vm.pause")
    assert server.errors == []
    put, get, bare_put = server.requests

    lines = _head_lines(put)
    assert lines[0] == "PUT /api/v1/vm.resize HTTP/1.1"
    assert put.headers["host"] == "localhost"
    assert put.headers["content-type"] == "application/json"
    assert int(put.headers["content-length"]) == len(put.body)
    assert json.loads(put.body) == body
    assert put.raw.endswith(put.body)
    assert len(put.raw) == len(lines[0]) + sum(len(x) + 2 for x in lines[1:]) + 4 + len(put.body)
    assert len(lines) - 1 == len(put.headers)  # no header twice

    lines = _head_lines(get)
    assert lines[0] == "GET /api/v1/vm.info HTTP/1.1"
    assert get.headers["host"] == "localhost"
    assert "content-type" not in get.headers
    assert get.headers.get("content-length", "0") == "0"
    assert get.body == b"" and get.raw.endswith(b"\r\n\r\n")

    lines = _head_lines(bare_put)
    assert lines[0] == "PUT /api/v1/vm.pause HTTP/1.1"
    assert bare_put.headers["content-length"] == "0"  # a PUT without body says so
    assert "content-type" not in bare_put.headers
    assert server.connections == 1


# --- threads ------------------------------------------------------------------------------

def test_threads_share_one_client(serve: ServerFactory) -> None:
    """8 threads x 50 calls on one client: every answer is the one to that call."""
    def answer(request: Request) -> Reply:
        return Reply(ok_json({"echo": request.json()["id"], "conn": request.conn}))

    server = serve(answer)
    client = client_for(server, timeout=2.0, wait_socket=2.0)
    wrong: list[tuple[str, Any]] = []
    failures: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(t: int) -> None:
        try:
            barrier.wait(BOUND)
            for i in range(50):
                rid = f"t{t}-{i}"
                got = client.put("vm.echo", {"id": rid})
                if got["echo"] != rid:
                    wrong.append((rid, got))
                    return
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == [] and wrong == []
    ids = [r.json()["id"] for r in server.requests]
    assert len(ids) == 400 and len(set(ids)) == 400  # each call reached the server once
    assert server.errors == []
    assert server.connections < 400  # some kept-alive connection was reused
