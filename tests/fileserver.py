"""A loopback HTTP server for tests: serves a directory on 127.0.0.1, counts requests,
and can make some files fail first or trickle (image pulls, Nix binary caches)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

MiB = 1 << 20


class FileServer:
    """Serves a directory on 127.0.0.1, counting requests; some files fail first or trickle."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.fail_first: dict[str, int] = {}  # name -> how many more requests get a 500
        self.slow: dict[str, float] = {}  # name -> seconds to sleep after each 64 KiB
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # a connection the client leaks slows teardown down instead of hanging it

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.serve(head=True)

            def do_GET(self) -> None:
                self.serve(head=False)

            def serve(self, *, head: bool) -> None:
                name = unquote(urlsplit(self.path).path).lstrip("/")
                with server.lock:
                    if not head:
                        server.hits[name] += 1
                    failing = server.fail_first.get(name, 0)
                    if failing and not head:
                        server.fail_first[name] = failing - 1
                f = server.root / name
                if failing:
                    self.reply(500)
                elif ".." in name.split("/") or not f.is_file():
                    self.reply(404)
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(f.stat().st_size))
                    self.end_headers()
                    if not head:
                        self.send_file(f, server.slow.get(name))

            def reply(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def send_file(self, f: Path, delay: float | None) -> None:
                with open(f, "rb") as fh:
                    while chunk := fh.read(64 * 1024 if delay else MiB):
                        try:
                            self.wfile.write(chunk)
                        except (BrokenPipeError, ConnectionResetError):
                            return
                        if delay:
                            time.sleep(delay)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False  # server_close() joins the handler threads: none outlive a test
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="test-http", daemon=True)
        self.thread.start()

    def url(self, name: str, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
