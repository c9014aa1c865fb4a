"""Push webhooks from GitHub, Gitea and GitLab: authenticate, parse, match GitSources.

Pure functions; the HTTP receiver lives in ``hyperfleet.operator.gitsource``. Signatures are
HMAC-SHA256 of the raw body (GitHub, Gitea) or a shared token (GitLab), always compared in
constant time, and a request without any of them is refused.

Replays: forges name each delivery (``X-GitHub-Delivery``, ``X-Gitea-Delivery``,
``X-Gitlab-Event-UUID``, or ``X-Hyperfleet-Delivery`` for other senders); ``DeliveryLog``
remembers the ids of accepted deliveries for a window so that the same delivery sent again
is refused. The id is not covered by the signature, so this stops verbatim duplicates and
replays, not a sender that knows the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from hyperfleet.reconcilers.models.gitsource import GitRef

_SCP_LIKE = re.compile(r"^(?:[^@/\s]+@)?(?P<host>[^:/\s]+):(?!//)(?P<path>.+)$")


class Provider(StrEnum):
    GITHUB = "github"
    GITEA = "gitea"
    GITLAB = "gitlab"


class WebhookAuthError(Exception):
    """Missing or wrong signature/token: answer 401 and do nothing."""


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def hmac_hex(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(headers: Mapping[str, str], body: bytes, secret: bytes) -> Provider:
    """Which provider signed ``body`` with ``secret``; raises WebhookAuthError otherwise.

    Gitea also sends ``X-Hub-Signature-256``; either of its headers must verify."""
    if not secret:
        raise WebhookAuthError("the receiver has no webhook secret configured")
    h = _headers(headers)
    github = h.get("x-hub-signature-256")
    gitea = h.get("x-gitea-signature")
    gitlab = h.get("x-gitlab-token")
    expected = hmac_hex(secret, body)
    if gitea is not None and hmac.compare_digest(gitea.strip().lower().encode(), expected.encode()):
        return Provider.GITEA
    if github is not None:
        if hmac.compare_digest(github.strip().lower().encode(), f"sha256={expected}".encode()):
            return Provider.GITEA if "x-gitea-event" in h else Provider.GITHUB
        raise WebhookAuthError("X-Hub-Signature-256 does not match the body")
    if gitea is not None:
        raise WebhookAuthError("X-Gitea-Signature does not match the body")
    if gitlab is not None:
        if hmac.compare_digest(gitlab.encode(), secret):
            return Provider.GITLAB
        raise WebhookAuthError("X-Gitlab-Token is wrong")
    raise WebhookAuthError(
        "no signature: configure the webhook secret (GitHub: X-Hub-Signature-256, Gitea: "
        "X-Gitea-Signature, GitLab: X-Gitlab-Token)"
    )


# Checked in this order; Gitea sends its id under its own and GitHub's name (same value).
DELIVERY_HEADERS = ("x-github-delivery", "x-gitea-delivery", "x-gitlab-event-uuid",
                    "x-hyperfleet-delivery")
MAX_DELIVERY_ID = 200  # characters; longer ids are refused rather than stored


def delivery_id(headers: Mapping[str, str]) -> str | None:
    """The forge's id of this delivery, or None when the sender names none."""
    h = _headers(headers)
    for name in DELIVERY_HEADERS:
        value = (h.get(name) or "").strip()
        if value:
            return value
    return None


class DeliveryLog:
    """Ids of accepted deliveries for ``window`` seconds, at most ``capacity`` of them
    (oldest forgotten first), so that memory stays bounded whatever the senders do.

    Only accepted deliveries are remembered: one that failed (bad payload, standby replica)
    may be redelivered by the forge under the same id."""

    def __init__(self, window: float = 3600.0, capacity: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.capacity = max(1, capacity)
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # id -> when accepted, oldest first

    def _expire(self, now: float) -> None:
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at < self.window:
                return
            del self._seen[oldest]

    def seen(self, delivery: str) -> float | None:
        """Seconds since ``delivery`` was accepted, or None when it is new (or expired)."""
        if self.window <= 0:
            return None
        now = self.clock()
        self._expire(now)
        at = self._seen.get(delivery)
        return None if at is None else now - at

    def remember(self, delivery: str) -> None:
        if self.window <= 0:
            return
        now = self.clock()
        self._seen[delivery] = now
        self._seen.move_to_end(delivery)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


@dataclass(frozen=True)
class Push:
    """What a push event says: the repository (every URL it is known by) and the ref."""

    urls: frozenset[str]
    ref: str = ""
    after: str = ""
    keys: frozenset[str] = field(default_factory=frozenset)  # normalised urls

    @classmethod
    def of(cls, urls: Iterable[str], ref: str = "", after: str = "") -> Push:
        u = frozenset(x for x in urls if x)
        return cls(u, ref, after, frozenset(normalize_url(x) for x in u))


_URL_KEYS = ("clone_url", "ssh_url", "html_url", "git_url", "git_http_url", "git_ssh_url",
             "http_url", "ssh_url_to_repo", "http_url_to_repo", "web_url", "url", "homepage")


def event_kind(provider: Provider, headers: Mapping[str, str]) -> str:
    """"push", "tag_push", "ping" or the provider's own name for anything else."""
    h = _headers(headers)
    raw = (h.get("x-gitea-event") or h.get("x-github-event") or h.get("x-gitlab-event") or "").lower()
    if raw in ("push", "push hook"):
        return "push"
    if raw in ("tag push hook", "create"):
        return "tag_push" if provider == Provider.GITLAB else raw
    return raw or "push"


def parse_push(body: bytes) -> Push:
    """Repository URLs and ref of a GitHub, Gitea or GitLab push payload."""
    try:
        data = json.loads(body or b"{}")
    except ValueError as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("body is not a JSON object")
    urls: list[str] = []
    for section in ("repository", "project"):
        repo = data.get(section)
        if isinstance(repo, dict):
            urls += [str(repo[k]) for k in _URL_KEYS if isinstance(repo.get(k), str)]
    return Push.of(urls, str(data.get("ref") or ""), str(data.get("after") or data.get("checkout_sha") or ""))


def normalize_url(url: str) -> str:
    """One spelling per repository: host (no user, port or scheme) + path without .git, so
    git@host:org/repo.git, ssh://git@host:22/org/repo and https://host/org/repo match;
    local repositories become file:<absolute path>."""
    url = url.strip()
    if url.startswith("/"):
        return "file:" + os.path.normpath(url).removesuffix(".git")
    if "://" not in url:
        m = _SCP_LIKE.match(url)
        if m:
            return f"{m['host'].lower()}/{m['path'].strip('/').removesuffix('.git').lower()}"
        return url.lower()
    parts = urlsplit(url)
    if parts.scheme == "file":
        return "file:" + os.path.normpath(parts.path or "/").removesuffix(".git")
    path = parts.path.strip("/").removesuffix(".git").lower()
    return f"{(parts.hostname or '').lower()}/{path}"


def wants(ref: GitRef | None, push: Push) -> bool:
    """Whether a push can change what a GitSource following ``ref`` deploys."""
    if ref is None or not (ref.branch or ref.tag or ref.commit):
        return True  # the default branch: its name is not known without asking the remote
    if ref.commit:
        return False  # pinned: no push moves it
    if not push.ref:
        return True
    if ref.branch:
        return push.ref in (f"refs/heads/{ref.branch}", ref.branch)
    return push.ref in (f"refs/tags/{ref.tag}", ref.tag)


def matches(url: str, ref: GitRef | None, push: Push) -> bool:
    return normalize_url(url) in push.keys and wants(ref, push)


def sign_github(secret: bytes, body: bytes) -> dict[str, str]:
    """Headers a GitHub push carries (for tests, the benchmark, and manual curl)."""
    return {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=" + hmac_hex(secret, body),
            "Content-Type": "application/json"}


def sign_gitea(secret: bytes, body: bytes) -> dict[str, str]:
    return {"X-Gitea-Event": "push", "X-Gitea-Signature": hmac_hex(secret, body),
            "Content-Type": "application/json"}


def sign_gitlab(secret: bytes, body: bytes) -> dict[str, str]:
    del body
    return {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": secret.decode(),
            "Content-Type": "application/json"}


def push_payload(url: str, ref: str, after: str = "") -> dict[str, Any]:
    """A minimal push payload in the GitHub/Gitea shape (GitLab readers also accept it)."""
    return {"ref": ref, "after": after, "repository": {"clone_url": url}}
