"""Push webhooks: signature checks, payload parsing, URL matching, and the receiver itself."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import kopf
import pytest
from aiohttp.test_utils import TestClient, TestServer

from hyperfleet.operator import gitsource
from hyperfleet.operator.gitsource import GitOps, GitOpsConfig, register, why_run
from hyperfleet.reconcilers.gitops.reconcile import GitSourceReconciler, Result
from hyperfleet.reconcilers.gitops.webhook import (
    Provider,
    Push,
    WebhookAuthError,
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
