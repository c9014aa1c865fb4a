"""Small client for one cloud-hypervisor process's REST API on its unix socket."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from typing import Any

import requests
import requests_unixsocket
from tenacity import (
    retry,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

log = logging.getLogger(__name__)

#: Unix socket paths are limited to 108 bytes including the NUL (sun_path).
MAX_SOCKET_PATH = 107


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


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, ChError) and exc.transient


class ChClient:
    """Speaks the upstream API (``/api/v1/<action>``); errors become :class:`ChError`."""

    def __init__(self, socket_path: str, timeout: float = 10.0, wait_socket: float = 5.0) -> None:
        if len(socket_path.encode()) > MAX_SOCKET_PATH:
            raise ValueError(
                f"socket path {socket_path!r} is longer than {MAX_SOCKET_PATH} bytes: "
                "use a shorter --socket-dir or VM name"
            )
        self.socket_path = socket_path
        self.timeout = timeout
        self.wait_socket = wait_socket
        self._session = requests_unixsocket.Session()
        self._base = f"http+unix://{urllib.parse.quote(socket_path, safe='')}/api/v1/"

    def close(self) -> None:
        self._session.close()

    def request(self, method: str, action: str, body: Any = None) -> Any:
        """One call, retried (bounded by ``wait_socket``) only on transient failures."""

        @retry(
            retry=retry_if_exception(_is_transient),
            stop=stop_after_delay(self.wait_socket),
            wait=wait_exponential(multiplier=0.02, max=0.5),
            reraise=True,
        )
        def _do() -> Any:
            return self._once(method, action, body)

        return _do()

    def _once(self, method: str, action: str, body: Any) -> Any:
        if not os.path.exists(self.socket_path):
            raise ChError(action, None, [f"API socket {self.socket_path} does not exist (yet)"])
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            resp = self._session.request(
                method, self._base + action, data=data, headers=headers, timeout=self.timeout
            )
        except requests.ConnectionError as exc:
            raise ChError(action, None, [f"cannot connect to {self.socket_path}: {exc}"]) from exc
        except requests.Timeout as exc:
            raise ChError(action, 504, [f"no answer within {self.timeout}s"]) from exc
        if resp.status_code >= 400:
            raise ChError(action, resp.status_code, _messages(resp))
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

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


def _messages(resp: requests.Response) -> list[str]:
    try:
        body = resp.json()
    except ValueError:
        return [resp.text.strip() or resp.reason or ""]
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
