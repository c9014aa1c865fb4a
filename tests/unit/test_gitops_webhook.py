"""Push webhooks: signature checks, payload parsing, URL matching, and the receiver itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import kopf
import pytest
from aiohttp.test_utils import TestClient, TestServer

from hyperfleet.operator import gitsource
from hyperfleet.operator.gitsource import GitOps, GitOpsConfig, register, why_run
from hyperfleet.reconcilers.gitops.reconcile import GitSourceReconciler, Result
from hyperfleet.reconcilers.gitops.webhook import (
    DeliveryLog,
    Provider,
    Push,
    WebhookAuthError,
    delivery_id,
    event_kind,
    hmac_hex,
    matches,
    normalize_url,
    parse_push,
    push_payload,
    sign_gitea,
    sign_github,
    sign_gitlab,
    verify,
    wants,
)
from hyperfleet.reconcilers.kube import Kube
from hyperfleet.reconcilers.models.gitsource import GitRef

SECRET = b"s3cret"
BODY = json.dumps(push_payload("https://github.com/acme/fleet.git", "refs/heads/main", "a" * 40)).encode()


def test_github_signature() -> None:
    assert verify(sign_github(SECRET, BODY), BODY, SECRET) == Provider.GITHUB
    with pytest.raises(WebhookAuthError, match="does not match"):
        verify(sign_github(b"other", BODY), BODY, SECRET)
    with pytest.raises(WebhookAuthError, match="does not match"):
        verify(sign_github(SECRET, BODY), BODY + b" ", SECRET)  # body tampered with
    h = sign_github(SECRET, BODY)
    h["X-Hub-Signature-256"] = h["X-Hub-Signature-256"].removeprefix("sha256=")
    with pytest.raises(WebhookAuthError):
        verify(h, BODY, SECRET)


def test_header_names_are_case_insensitive() -> None:
    h = {k.lower(): v for k, v in sign_github(SECRET, BODY).items()}
    assert verify(h, BODY, SECRET) == Provider.GITHUB


def test_gitea_signature() -> None:
    assert verify(sign_gitea(SECRET, BODY), BODY, SECRET) == Provider.GITEA
    with pytest.raises(WebhookAuthError, match="X-Gitea-Signature"):
        verify(sign_gitea(b"nope", BODY), BODY, SECRET)
    # Gitea also sends the GitHub header; it is recognised as Gitea by its event header.
    both = {**sign_github(SECRET, BODY), "X-Gitea-Event": "push"}
    assert verify(both, BODY, SECRET) == Provider.GITEA


def test_gitlab_token() -> None:
    assert verify(sign_gitlab(SECRET, BODY), BODY, SECRET) == Provider.GITLAB
    with pytest.raises(WebhookAuthError, match="X-Gitlab-Token"):
        verify(sign_gitlab(b"guess", BODY), BODY, SECRET)


def test_missing_signature_or_secret() -> None:
    with pytest.raises(WebhookAuthError, match="no signature"):
        verify({"X-GitHub-Event": "push"}, BODY, SECRET)
    with pytest.raises(WebhookAuthError, match="no webhook secret"):
        verify(sign_github(b"", BODY), BODY, b"")


def test_hmac_hex_is_sha256() -> None:
    # From GitHub's documentation of X-Hub-Signature-256.
    assert hmac_hex(b"It's a Secret to Everybody", b"Hello, World!") == (
        "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")


def test_parse_push_shapes() -> None:
    gh = parse_push(json.dumps({"ref": "refs/heads/main", "after": "abc", "repository": {
        "clone_url": "https://github.com/acme/fleet.git", "ssh_url": "git@github.com:acme/fleet.git",
        "html_url": "https://github.com/acme/fleet"}}).encode())
    assert gh.ref == "refs/heads/main" and gh.after == "abc"
    assert gh.keys == {"github.com/acme/fleet"}
    gl = parse_push(json.dumps({"object_kind": "push", "ref": "refs/heads/main", "checkout_sha": "def",
                                "project": {"git_http_url": "https://gitlab.com/acme/fleet.git",
                                            "git_ssh_url": "git@gitlab.com:acme/fleet.git"}}).encode())
    assert gl.after == "def" and gl.keys == {"gitlab.com/acme/fleet"}
    with pytest.raises(ValueError, match="not JSON"):
        parse_push(b"{")
    with pytest.raises(ValueError, match="not a JSON object"):
        parse_push(b"[]")


@pytest.mark.parametrize("url", [
    "https://github.com/Acme/Fleet.git", "https://user@github.com/acme/fleet/",
    "git@github.com:acme/fleet.git", "ssh://git@github.com:22/acme/fleet", "http://github.com:80/acme/fleet",
])
def test_normalize_url_equivalents(url: str) -> None:
    assert normalize_url(url) == "github.com/acme/fleet"


def test_normalize_local_paths() -> None:
    assert normalize_url("/srv/git/fleet.git") == normalize_url("file:///srv/git/fleet.git/") \
        == "file:/srv/git/fleet"
    assert normalize_url("/srv/git/fleet") != normalize_url("/srv/git/other")


def test_ref_matching() -> None:
    main = Push.of(["https://h/o/r"], "refs/heads/main")
    tag = Push.of(["https://h/o/r"], "refs/tags/v1")
    assert wants(None, main) and wants(GitRef(), tag)
    assert wants(GitRef(branch="main"), main) and not wants(GitRef(branch="dev"), main)
    assert wants(GitRef(tag="v1"), tag) and not wants(GitRef(tag="v1"), main)
    assert not wants(GitRef(commit="a" * 40), main)
    assert matches("git@h:o/r.git", GitRef(branch="main"), main)
    assert not matches("git@h:o/other.git", GitRef(branch="main"), main)


def test_event_kinds() -> None:
    assert event_kind(Provider.GITHUB, {"X-GitHub-Event": "ping"}) == "ping"
    assert event_kind(Provider.GITLAB, {"X-Gitlab-Event": "Push Hook"}) == "push"
    assert event_kind(Provider.GITLAB, {"X-Gitlab-Event": "Tag Push Hook"}) == "tag_push"
    assert event_kind(Provider.GITEA, {"X-Gitea-Event": "push"}) == "push"
    assert event_kind(Provider.GITHUB, {"X-GitHub-Event": "issues"}) == "issues"


def _source(name: str, url: str, ref: dict[str, Any] | None = None, suspend: bool = False,
            gen: int = 1, status: dict[str, Any] | None = None,
            annotations: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"url": url, "suspend": suspend}
    if ref:
        spec["ref"] = ref
    return {"metadata": {"name": name, "namespace": "ns", "generation": gen,
                         "annotations": annotations or {}},
            "spec": spec, "status": status or {"observedGeneration": gen}}


def test_why_run_ignores_our_own_status_writes() -> None:
    base = _source("a", "u")
    assert why_run(None, base) is None
    assert why_run(base, _source("a", "u", gen=2, status={"observedGeneration": 1})) == "spec-changed"
    now = _source("a", "u", annotations={"hyperfleet.dev/reconcile-now": "x"})
    assert why_run(base, now) == "reconcile-now"
    handled = _source("a", "u", annotations={"hyperfleet.dev/reconcile-now": "x"},
                      status={"observedGeneration": 1, "lastHandledReconcileAt": "x"})
    assert why_run(now, handled) is None
    confirm = _source("a", "u", annotations={"hyperfleet.dev/confirm-deletion": "abc1234"})
    assert why_run(base, confirm) == "confirm-deletion" and why_run(confirm, confirm) is None


def test_receiver_needs_a_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="HYPERFLEET_WEBHOOK_SECRET"):
        GitOpsConfig(webhook_port=9999).check()
    assert "hidden" not in repr(GitOpsConfig(webhook_secret="hidden"))


def test_receiver_authenticates_and_triggers_matching_sources(tmp_path: Path) -> None:
    async def scenario() -> None:
        ops = GitOps(GitOpsConfig(cache_dir=str(tmp_path), webhook_port=1,
                                  webhook_secret=SECRET.decode()), Kube())
        triggered: list[tuple[str, str]] = []
        ops.trigger = lambda key, reason: triggered.append((key, reason))  # type: ignore[method-assign]
        ops.sources = {
            "ns/main": _source("main", "git@github.com:acme/fleet.git", {"branch": "main"}),
            "ns/dev": _source("dev", "https://github.com/acme/fleet", {"branch": "dev"}),
            "ns/paused": _source("paused", "https://github.com/acme/fleet", suspend=True),
            "ns/other": _source("other", "https://github.com/acme/other"),
        }
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/{tail:.*}", ops.handle_webhook)
        async with TestClient(TestServer(app)) as client:
            r = await client.post("/hook", data=BODY, headers=sign_github(b"wrong", BODY))
            assert r.status == 401 and "does not match" in (await r.json())["error"]
            r = await client.post("/hook", data=BODY, headers={"X-GitHub-Event": "push"})
            assert r.status == 401
            assert triggered == []
            r = await client.post("/hook", data=BODY, headers=sign_github(SECRET, BODY))
            assert r.status == 202 and (await r.json()) == {"triggered": ["ns/main"]}
            assert triggered == [("ns/main", "webhook:github")]
            ping = {**sign_github(SECRET, b"{}"), "X-GitHub-Event": "ping"}
            r = await client.post("/", data=b"{}", headers=ping)
            assert r.status == 200
            r = await client.post("/", data=b"nope", headers=sign_gitlab(SECRET, b"nope"))
            assert r.status == 400
        await ops.stop()

    asyncio.run(scenario())


class _Reconciler:
    """Counts reconciles instead of doing them."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.rendered: dict[str, Any] = {}
        self.fetcher = SimpleNamespace(remove=lambda key: None)

    def reconcile(self, key: str, trigger: str = "interval") -> Result:
        self.calls.append((key, trigger))
        return Result("unchanged", 60.0)


async def _until(check: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_standby_replica_neither_reconciles_nor_takes_webhooks(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitsource, "STANDBY_RECHECK", 0.02)
    role = {"active": False}

    async def scenario() -> None:
        rec = _Reconciler()
        ops = GitOps(GitOpsConfig(cache_dir=str(tmp_path), webhook_port=1, webhook_secret=SECRET.decode()),
                     Kube(), reconciler=cast(GitSourceReconciler, rec), active=lambda: role["active"])
        ops.observe("ADDED", _source("main", "git@github.com:acme/fleet.git", {"branch": "main"}))
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/{tail:.*}", ops.handle_webhook)
        async with TestClient(TestServer(app)) as client:
            await asyncio.sleep(0.2)
            ops.trigger("ns/main", "reconcile-now")
            r = await client.post("/hook", data=BODY, headers=sign_github(SECRET, BODY))
            assert r.status == 503 and "standby" in (await r.json())["error"]
            await asyncio.sleep(0.2)
            assert rec.calls == []
            role["active"] = True
            await _until(lambda: rec.calls)
            assert rec.calls == [("ns/main", "became-active")]
            r = await client.post("/hook", data=BODY, headers=sign_github(SECRET, BODY))
            assert r.status == 202
            await _until(lambda: len(rec.calls) == 2)
            assert rec.calls[1] == ("ns/main", "webhook:github")
            role["active"] = False
            ops.trigger("ns/main", "reconcile-now")
            await asyncio.sleep(0.2)
            assert len(rec.calls) == 2
        await ops.stop()

    asyncio.run(scenario())


def test_an_unanswerable_active_check_means_standby(tmp_path: Path) -> None:
    def broken() -> bool:
        raise RuntimeError("peering object unreadable")

    ops = register(kopf.OperatorRegistry(), GitOpsConfig(cache_dir=str(tmp_path)), Kube(), active=broken)
    assert not ops.is_active()
    assert GitOps(GitOpsConfig(cache_dir=str(tmp_path)), Kube()).is_active()  # default: always


# ---------------------------------------------------------------- receiver hardening
# The real receiver (GitOps.start) on 127.0.0.1, spoken to over real sockets.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _receiver(tmp_path: Path, **cfg: Any) -> tuple[GitOps, list[tuple[str, str]]]:
    ops = GitOps(GitOpsConfig(cache_dir=str(tmp_path), webhook_port=_free_port(),
                              webhook_host="127.0.0.1", webhook_secret=SECRET.decode(), **cfg), Kube())
    triggered: list[tuple[str, str]] = []
    ops.trigger = lambda key, reason: triggered.append((key, reason))  # type: ignore[method-assign]
    ops.sources = {"ns/main": _source("main", "git@github.com:acme/fleet.git", {"branch": "main"})}
    return ops, triggered


async def _post(ops: GitOps, headers: dict[str, str], body: bytes = BODY) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, \
            http.post(f"http://127.0.0.1:{ops.port}/hook", data=body, headers=headers) as r:
        return r.status, await r.json()


async def _read_until_closed(reader: asyncio.StreamReader, limit: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``limit``)."""
    got = b""
    async with asyncio.timeout(limit):
        while chunk := await reader.read(4096):
            got += chunk
    return got


def test_slowloris_headers_are_cut_off_while_a_valid_delivery_goes_through(tmp_path: Path) -> None:
    async def scenario() -> None:
        ops, triggered = _receiver(tmp_path, webhook_header_timeout=1.0)
        await ops.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
            started = time.monotonic()
            writer.write(b"POST /hook HTTP/1.1\r\nHost: hooks\r\n")

            async def trickle() -> None:  # one more header byte every 100 ms, never the end
                with contextlib.suppress(ConnectionError):
                    for _ in range(100):
                        writer.write(b"X")
                        await writer.drain()
                        await asyncio.sleep(0.1)

            dripping = asyncio.create_task(trickle())
            await asyncio.sleep(0.3)
            # Meanwhile a real delivery is served at once.
            status, answer = await _post(ops, sign_github(SECRET, BODY))
            assert status == 202 and answer == {"triggered": ["ns/main"]}
            assert time.monotonic() - started < 1.0
            # The trickling connection is closed by the server after about the timeout.
            assert await _read_until_closed(reader, 5.0) == b""
            assert 0.9 <= time.monotonic() - started < 3.0
            dripping.cancel()
            writer.close()
            assert triggered == [("ns/main", "webhook:github")]
        finally:
            await ops.stop()

    asyncio.run(scenario())


def test_a_kept_alive_connection_gets_a_fresh_head_deadline_per_request(tmp_path: Path) -> None:
    """The deadline restarts after each response, and a silent idle connection is closed."""
    async def scenario() -> None:
        ops, _ = _receiver(tmp_path, webhook_header_timeout=0.6)
        await ops.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
            head = (f"POST /hook HTTP/1.1\r\nHost: hooks\r\nContent-Length: {len(BODY)}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in sign_github(SECRET, BODY).items()) + "\r\n")
            for _ in range(2):
                await asyncio.sleep(0.4)  # within the deadline each time: 0.8 s in all
                writer.write(head.encode() + BODY)
                status_line = await asyncio.wait_for(reader.readline(), 2.0)
                assert status_line.startswith(b"HTTP/1.1 202"), status_line
                while (await asyncio.wait_for(reader.readline(), 2.0)) not in (b"\r\n", b""):
                    pass
                await asyncio.wait_for(reader.readexactly(len(b'{"triggered": ["ns/main"]}')), 2.0)
            started = time.monotonic()
            assert await _read_until_closed(reader, 3.0) == b""
            assert 0.5 <= time.monotonic() - started < 2.0
            writer.close()
        finally:
            await ops.stop()

    asyncio.run(scenario())


def test_a_slow_body_gets_408_and_a_large_one_413(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gitsource, "MAX_WEBHOOK_BODY", 4096)

    async def scenario() -> None:
        ops, triggered = _receiver(tmp_path, webhook_body_timeout=0.5, webhook_header_timeout=1.0)
        await ops.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", ops.port)
            started = time.monotonic()
            writer.write(b"POST /hook HTTP/1.1\r\nHost: hooks\r\nContent-Length: 1000\r\n\r\n{")
            raw = await _read_until_closed(reader, 5.0)
            assert raw.startswith(b"HTTP/1.1 408"), raw
            assert b"did not arrive within 0.5 seconds" in raw
            assert 0.4 <= time.monotonic() - started < 3.0
            writer.close()
            big = b"{" + b" " * 8192 + b"}"
            status, answer = await _post(ops, sign_github(SECRET, big), big)
            assert status == 413 and answer == {"error": "the request body is larger than 4096 bytes"}
            assert triggered == []
        finally:
            await ops.stop()

    asyncio.run(scenario())


def test_a_replayed_delivery_is_refused_and_only_signed_ones_count(tmp_path: Path) -> None:
    async def scenario() -> None:
        ops, triggered = _receiver(tmp_path)
        await ops.start()
        try:
            uuid = "72d3162e-cc78-11e3-81ab-4c9367dc0958"
            signed = {**sign_github(SECRET, BODY), "X-GitHub-Delivery": uuid}
            # A bad signature with a fresh id: refused, and the id stays unused.
            forged = {**sign_github(b"guess", BODY), "X-GitHub-Delivery": signed["X-GitHub-Delivery"]}
            status, answer = await _post(ops, forged)
            assert status == 401 and "does not match" in answer["error"]
            unsigned = {"X-GitHub-Event": "push", "X-GitHub-Delivery": signed["X-GitHub-Delivery"]}
            assert (await _post(ops, unsigned))[0] == 401
            assert len(ops.deliveries) == 0 and triggered == []
            # The genuine delivery with that id is accepted once...
            assert await _post(ops, signed) == (202, {"triggered": ["ns/main"]})
            # ...and refused when sent again, with a sentence saying why.
            status, answer = await _post(ops, signed)
            assert status == 409
            assert answer["error"].startswith(
                f"delivery {signed['X-GitHub-Delivery']} was already accepted")
            assert "replayed delivery is refused" in answer["error"]
            # A forged replay is still a signature failure, not a replay.
            assert (await _post(ops, forged))[0] == 401
            assert triggered == [("ns/main", "webhook:github")]
            # Another id goes through; so does a sender that names none (no replay check).
            assert (await _post(ops, {**signed, "X-GitHub-Delivery": "another"}))[0] == 202
            assert (await _post(ops, sign_github(SECRET, BODY)))[0] == 202
            assert (await _post(ops, sign_github(SECRET, BODY)))[0] == 202
            # GitLab's, Gitea's and the generic header are checked the same way.
            for header, sign in (("X-Gitlab-Event-UUID", sign_gitlab), ("X-Gitea-Delivery", sign_gitea),
                                 ("X-Hyperfleet-Delivery", sign_github)):
                headers = {**sign(SECRET, BODY), header: f"id-{header}"}
                assert (await _post(ops, headers))[0] == 202
                assert (await _post(ops, headers))[0] == 409, header
            assert len(triggered) == 7
        finally:
            await ops.stop()

    asyncio.run(scenario())


def test_a_failed_delivery_does_not_burn_its_id(tmp_path: Path) -> None:
    """A forge redelivers a failed delivery under the same id: that must go through."""
    async def scenario() -> None:
        ops, triggered = _receiver(tmp_path)
        await ops.start()
        try:
            bad = b"not json"
            headers = {**sign_gitlab(SECRET, bad), "X-Gitlab-Event-UUID": "u-1"}
            assert (await _post(ops, headers, bad))[0] == 400
            assert (await _post(ops, {**sign_gitlab(SECRET, BODY), "X-Gitlab-Event-UUID": "u-1"}))[0] == 202
            assert triggered == [("ns/main", "webhook:gitlab")]
        finally:
            await ops.stop()

    asyncio.run(scenario())


def test_delivery_ids() -> None:
    assert delivery_id({"X-GitHub-Delivery": " a "}) == "a"
    assert delivery_id({"x-gitea-delivery": "b"}) == "b"
    assert delivery_id({"X-Gitlab-Event-UUID": "c"}) == "c"
    assert delivery_id({"X-Hyperfleet-Delivery": "d"}) == "d"
    assert delivery_id({"X-GitHub-Delivery": ""}) is None and delivery_id({}) is None


def test_delivery_log_window_and_capacity() -> None:
    now = [0.0]
    log = DeliveryLog(window=60.0, capacity=3, clock=lambda: now[0])
    assert log.seen("a") is None
    log.remember("a")
    now[0] = 59.0
    assert log.seen("a") == 59.0
    now[0] = 60.0
    assert log.seen("a") is None and len(log) == 0  # expired, and forgotten
    for name in "bcde":
        log.remember(name)
    assert len(log) == 3 and log.seen("b") is None and log.seen("e") == 0.0  # oldest dropped
    off = DeliveryLog(window=0)
    off.remember("x")
    assert off.seen("x") is None and len(off) == 0


def test_receiver_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="timeouts must be positive"):
        GitOpsConfig(webhook_header_timeout=0).check()
    with pytest.raises(ValueError, match="replay window"):
        GitOpsConfig(webhook_replay_capacity=0).check()
