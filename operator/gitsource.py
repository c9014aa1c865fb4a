"""GitOps in the operator: a worker per GitSource (poll at spec.interval, or sooner when
triggered) and the push-webhook receiver that triggers them.

Triggers: a spec change (generation), a new ``hyperfleet.dev/reconcile-now`` value, a changed
``hyperfleet.dev/confirm-deletion`` value, and an authenticated push webhook for a tracked
repository. Reconciles run in threads (git, YAML and API calls are blocking) so kopf's event
loop keeps serving watch events and webhooks.

Health: between reconciles, a GitSource with ``spec.healthCheck`` on has the health of the
VirtualMachines it applied re-assessed on a timer of its own worker (every 5 s while they
are on their way, every 15 s once settled), with one list call filtered by its ownership
label: no VM watch, so a 1,000-VM fleet's status churn costs nothing between two checks.

With several controller replicas only the active one (kopf peering) may reconcile: the
workers are plain asyncio tasks kopf does not pause, so they ask ``active`` before every
reconcile, and a standby's webhook receiver answers 503.

The receiver faces the internet, so every connection has deadlines: its request head (line
and headers) must arrive within ``webhook_header_timeout`` of connecting or of its previous
response (slowloris), its body within ``webhook_body_timeout`` (408), at most
MAX_WEBHOOK_BODY bytes (413); a delivery id accepted within ``webhook_replay_window`` is
refused with 409, checked after the signature so that unsigned requests never touch it.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from aiohttp import web
from pydantic import ValidationError

from hyperfleet.reconcilers.gitops.apply import Applier
from hyperfleet.reconcilers.gitops.fetch import GitFetcher
from hyperfleet.reconcilers.gitops.reconcile import GitSourceReconciler, Result
from hyperfleet.reconcilers.gitops.types import (
    CONFIRM_DELETION_ANNOTATION,
    RECONCILE_NOW_ANNOTATION,
)
from hyperfleet.reconcilers.gitops.webhook import (
    MAX_DELIVERY_ID,
    DeliveryLog,
    Provider,
    Push,
    WebhookAuthError,
    delivery_id,
    event_kind,
    matches,
    parse_push,
    verify,
)
from hyperfleet.reconcilers.kube import GITSOURCES, Kube
from hyperfleet.reconcilers.models.common import GROUP, VERSION
from hyperfleet.reconcilers.models.gitsource import GitRef

from . import metrics
from .tasks import cancel_all

log = logging.getLogger("hyperfleet.gitops")

WEBHOOK_SECRET_ENV = "HYPERFLEET_WEBHOOK_SECRET"
MAX_WEBHOOK_BODY = 25 * 1024 * 1024  # GitHub's payload cap
STANDBY_RECHECK = 1.0  # seconds between two questions "am I the active replica now?"
HEALTH_RETRY = 30.0  # seconds before a health check that crashed is tried again


def _always() -> bool:
    return True


@dataclass(frozen=True)
class GitOpsConfig:
    cache_dir: str = "/var/cache/hyperfleet/git"
    webhook_port: int = 0  # 0: no receiver, polling only
    webhook_host: str = "0.0.0.0"
    webhook_secret: str | None = field(default=None, repr=False)
    apply_workers: int = 16  # concurrent API calls while applying/pruning (16: best on 2 cores)
    max_concurrent: int = 4  # GitSources reconciled at the same time
    server_dry_run: bool = True
    nix: str | None = None  # path of `nix`; None: look it up on PATH
    # False: a GitSource applies only into its own namespace (multi-tenant clusters).
    cross_namespace: bool = True
    # Seconds a connection may take to send a request head (from connecting, or from its
    # previous response when kept alive) and a request body.
    webhook_header_timeout: float = 10.0
    webhook_body_timeout: float = 30.0
    # Seconds an accepted delivery id is remembered (0: no replay check), and how many ids.
    webhook_replay_window: float = 3600.0
    webhook_replay_capacity: int = 10_000

    def check(self) -> None:
        """Refuse a receiver that anyone could trigger."""
        if self.webhook_port and not self.webhook_secret:
            raise ValueError(f"the webhook receiver (port {self.webhook_port}) needs a secret: set "
                             f"{WEBHOOK_SECRET_ENV} or --webhook-secret-file, or use port 0 to "
                             "disable it")
        if self.webhook_header_timeout <= 0 or self.webhook_body_timeout <= 0:
            raise ValueError("the webhook header and body timeouts must be positive seconds")
        if self.webhook_replay_window < 0 or self.webhook_replay_capacity < 1:
            raise ValueError("the webhook replay window must be 0 (off) or positive seconds, "
                             "and its capacity at least 1")


class _HeadDeadline(asyncio.Protocol):
    """aiohttp's per-connection protocol behind a deadline: a connection with no request in
    the application must deliver a complete request head within ``timeout`` seconds, or it
    is closed. aiohttp has no header timeout of its own (its keep-alive timer is not one in
    every supported version), and a client trickling headers would hold a socket forever."""

    def __init__(self, inner: asyncio.Protocol, timeout: float,
                 guards: dict[asyncio.BaseTransport, _HeadDeadline]) -> None:
        self.inner = inner
        self.timeout = timeout
        self.guards = guards
        self.transport: asyncio.Transport | None = None
        self.in_app = 0  # requests between head parsed and handler returned
        self.handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.guards[transport] = self
        self.inner.connection_made(transport)
        self.idle()

    def _cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def idle(self) -> None:
        """No request in the application: the next head is due within the timeout."""
        self._cancel()
        if self.transport is not None and self.in_app == 0:
            self.handle = asyncio.get_running_loop().call_later(self.timeout, self._expire)

    def entered(self) -> None:
        self.in_app += 1
        self._cancel()

    def left(self) -> None:
        self.in_app -= 1
        self.idle()

    def _expire(self) -> None:
        self.handle = None
        transport = self.transport
        if transport is None or self.in_app:
            return
        if transport.get_write_buffer_size():  # a response is still on its way out
            self.idle()
            return
        peer = transport.get_extra_info("peername")
        log.info("webhook connection closed: no complete request head in time",
                 extra={"remote": peer[0] if isinstance(peer, tuple) else str(peer),
                        "timeout": self.timeout})
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self.transport is not None:
            self.guards.pop(self.transport, None)
        self.transport = None
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def _key(body: Any) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _annotation(body: dict[str, Any] | None, name: str) -> str | None:
    if body is None:
        return None
    value = ((body.get("metadata") or {}).get("annotations") or {}).get(name)
    return str(value) if value is not None else None


def why_run(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """The trigger a watch event carries, or None when it is our own status write."""
    meta = new.get("metadata") or {}
    status = new.get("status") or {}
    if meta.get("generation") != status.get("observedGeneration"):
        return "spec-changed"
    now = _annotation(new, RECONCILE_NOW_ANNOTATION)
    if now is not None and now != status.get("lastHandledReconcileAt"):
        return "reconcile-now"
    confirm = _annotation(new, CONFIRM_DELETION_ANNOTATION)
    if confirm is not None and confirm != _annotation(old, CONFIRM_DELETION_ANNOTATION):
        return "confirm-deletion"
    return None


class GitOps:
    """The set of known GitSources (from watch events), their workers and the receiver.

    ``active``: whether this replica may reconcile now (kopf peering's active replica);
    called on the event loop, so it must answer at once. Default: always."""

    def __init__(self, cfg: GitOpsConfig, kube: Kube,
                 reconciler: GitSourceReconciler | None = None,
                 active: Callable[[], bool] | None = None,
                 vms: Callable[[], list[dict[str, Any]] | None] | None = None) -> None:
        cfg.check()
        self.cfg = cfg
        self.active = active or _always
        self.applier = Applier(kube, workers=cfg.apply_workers, vms=vms)
        self.reconciler = reconciler or GitSourceReconciler(
            kube, GitFetcher(Path(cfg.cache_dir)), self.applier,
            nix=cfg.nix or shutil.which("nix"), server_dry_run=cfg.server_dry_run,
            cross_namespace=cfg.cross_namespace)
        self.sources: dict[str, dict[str, Any]] = {}
        self.wakeups: dict[str, asyncio.Event] = {}
        self.reasons: dict[str, str] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        # Unix time of each GitSource's last successful apply here (metrics only).
        self.last_applied: dict[str, float] = {}
        self.executor = ThreadPoolExecutor(max_workers=max(1, cfg.max_concurrent),
                                           thread_name_prefix="gitops")
        self.runner: web.AppRunner | None = None
        self.server: asyncio.Server | None = None
        self.port: int | None = None
        self.deliveries = DeliveryLog(cfg.webhook_replay_window, cfg.webhook_replay_capacity)
        self.guards: dict[asyncio.BaseTransport, _HeadDeadline] = {}

    # ------------------------------------------------------------------ watch side

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        key = _key(body)
        if event_type == "DELETED":
            self.sources.pop(key, None)
            self.last_applied.pop(key, None)
            metrics.forget_gitsource(*key.split("/", 1))
            task = self.tasks.pop(key, None)
            if task:
                task.cancel()
            self.wakeups.pop(key, None)
            self.reconciler.rendered.pop(key, None)
            self.reconciler.verified.pop(key, None)
            self.executor.submit(self.reconciler.fetcher.remove, key)
            log.info("GitSource deleted; its objects are left in place (orphaned)",
                     extra={"gitsource": key})
            return
        old = self.sources.get(key)
        self.sources[key] = body
        task = self.tasks.get(key)
        if task is None or task.done():  # new, or its worker ended (deleted, then re-created)
            self.wakeups[key] = asyncio.Event()
            self.tasks[key] = asyncio.create_task(self._worker(key), name=f"gitsource {key}")
            return
        reason = why_run(old, body)
        if reason:
            self.trigger(key, reason)

    def trigger(self, key: str, reason: str) -> None:
        wake = self.wakeups.get(key)
        if wake is not None:
            self.reasons[key] = reason
            wake.set()

    def is_active(self) -> bool:
        """``active()``, where an error counts as standby: two replicas applying (and pruning)
        from different views is worse than a delayed reconcile."""
        try:
            return bool(self.active())
        except Exception:
            log.exception("cannot tell whether this replica is active; standing by")
            return False

    async def _standby(self, key: str, wake: asyncio.Event) -> bool:
        """Wait until this replica is the active one; False if the GitSource went meanwhile.
        Triggers arriving meanwhile are dropped: the first reconcile as active covers them."""
        said = False
        while not self.is_active():
            if not said:
                log.info("standby replica: not reconciling", extra={"gitsource": key})
                said = True
            wake.clear()
            await asyncio.sleep(STANDBY_RECHECK)
            if key not in self.sources:
                return False
        return True

    async def _worker(self, key: str) -> None:
        wake = self.wakeups[key]
        reason = "startup"
        loop = asyncio.get_running_loop()
        while key in self.sources:
            if not self.is_active():
                if not await self._standby(key, wake):
                    return
                reason = "became-active"
            started = time.monotonic()
            try:
                result = await loop.run_in_executor(self.executor, self.reconciler.reconcile, key, reason)
            except Exception:
                log.exception("reconcile crashed", extra={"gitsource": key})
                result = Result("failed", 30.0)
            if result.state == "deleted":
                return
            if key in self.sources:  # not deleted meanwhile: no series for it again
                _observe(key, result, time.monotonic() - started, self.last_applied)
            reason = await self._wait(key, wake, result)

    async def _wait(self, key: str, wake: asyncio.Event, result: Result) -> str:
        """Sleep until a trigger or the next reconcile, re-assessing the applied VMs' health
        on the way when the last result asks for it; returns the next reconcile's trigger."""
        loop = asyncio.get_running_loop()
        due = loop.time() + max(result.requeue_after, 0.2)
        health_after = result.health_after
        try:
            while True:
                left = due - loop.time()
                nap = left if health_after is None else min(left, health_after)
                try:
                    await asyncio.wait_for(wake.wait(), timeout=max(nap, 0.2))
                    return self.reasons.pop(key, "trigger")
                except TimeoutError:
                    pass
                if loop.time() >= due - 0.05 or key not in self.sources:
                    return "interval"
                if not self.is_active():
                    health_after = None  # the active replica checks; the worker loop waits
                    continue
                try:
                    health_after = await loop.run_in_executor(
                        self.executor, self.reconciler.check_health, key)
                except Exception:
                    log.exception("health check crashed", extra={"gitsource": key})
                    health_after = HEALTH_RETRY
        finally:
            wake.clear()

    # ------------------------------------------------------------------ webhook side

    def match(self, push: Push) -> list[str]:
        """GitSources (not suspended) that track the pushed repository and ref."""
        out = []
        for key, body in self.sources.items():
            spec = body.get("spec") or {}
            if spec.get("suspend"):
                continue
            try:
                ref = GitRef.model_validate(spec["ref"]) if spec.get("ref") else None
            except ValidationError:
                ref = None
            if isinstance(spec.get("url"), str) and matches(spec["url"], ref, push):
                out.append(key)
        return sorted(out)

    async def handle_webhook(self, request: web.Request) -> web.Response:
        if not self.is_active():
            # Before reading or authenticating anything: a load balancer retries elsewhere.
            return web.json_response(
                {"error": "standby replica: another controller replica is active; retry"},
                status=503, headers={"Retry-After": "1"})
        try:
            body = await asyncio.wait_for(request.read(), self.cfg.webhook_body_timeout)
        except TimeoutError:
            log.warning("webhook rejected: body too slow",
                        extra={"remote": request.remote, "timeout": self.cfg.webhook_body_timeout})
            resp = web.json_response(
                {"error": f"the request body did not arrive within "
                          f"{self.cfg.webhook_body_timeout:g} seconds"}, status=408)
            resp.force_close()
            return resp
        except web.HTTPRequestEntityTooLarge:
            resp = web.json_response(
                {"error": f"the request body is larger than {MAX_WEBHOOK_BODY} bytes"}, status=413)
            resp.force_close()
            return resp
        secret = (self.cfg.webhook_secret or "").encode()
        try:
            provider = verify(request.headers, body, secret)
        except WebhookAuthError as exc:
            log.warning("webhook rejected", extra={"remote": request.remote, "reason": str(exc)})
            return web.json_response({"error": str(exc)}, status=401)
        # Only now, authenticated: an unsigned request must not be able to burn an id.
        delivery = delivery_id(request.headers)
        if delivery is None:
            log.debug("webhook delivery without an id: no replay check",
                      extra={"provider": provider.value})
        elif len(delivery) > MAX_DELIVERY_ID:
            return web.json_response({"error": f"the delivery id is longer than "
                                               f"{MAX_DELIVERY_ID} characters"}, status=400)
        else:
            age = self.deliveries.seen(delivery)
            if age is not None:
                log.warning("webhook replay refused",
                            extra={"provider": provider.value, "delivery": delivery,
                                   "first_seen_seconds_ago": round(age, 1)})
                return web.json_response(
                    {"error": f"delivery {delivery} was already accepted {age:.0f} seconds ago; "
                              "a replayed delivery is refused (to reconcile again, change the "
                              "hyperfleet.dev/reconcile-now annotation)"}, status=409)
        resp = self._accept(provider, request, body)
        if delivery is not None and resp.status < 300:
            self.deliveries.remember(delivery)
        return resp

    def _accept(self, provider: Provider, request: web.Request, body: bytes) -> web.Response:
        """The answer to an authenticated, new delivery (triggers matching GitSources)."""
        kind = event_kind(provider, request.headers)
        if kind == "ping":
            return web.json_response({"ok": True, "provider": provider.value})
        if kind not in ("push", "tag_push"):
            return web.json_response({"ignored": kind}, status=202)
        try:
            push = parse_push(body)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        keys = self.match(push)
        for key in keys:
            self.trigger(key, f"webhook:{provider.value}")
        log.info("webhook push", extra={"provider": provider.value, "ref": push.ref,
                                         "after": push.after, "triggered": keys})
        return web.json_response({"triggered": keys}, status=202)

    @web.middleware
    async def _in_app(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
        """Holds the connection's head deadline while a request is being handled."""
        guard = self.guards.get(request.transport) if request.transport is not None else None
        if guard is None:
            return await handler(request)
        guard.entered()
        try:
            return await handler(request)
        finally:
            guard.left()

    async def handle_readyz(self, _: web.Request) -> web.Response:
        """Readiness: 200 only on the active replica. A standby answers pushes with 503, so it
        must not be a Service endpoint either (/healthz, liveness, is OK on every replica)."""
        if self.is_active():
            return web.json_response({"ok": True, "role": "active"})
        return web.json_response({"ok": False, "role": "standby"}, status=503)

    async def start(self) -> None:
        if not self.cfg.webhook_port:
            return
        app = web.Application(client_max_size=MAX_WEBHOOK_BODY, middlewares=[self._in_app])
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/readyz", self.handle_readyz)
        app.router.add_post("/{tail:.*}", self.handle_webhook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        http = self.runner.server
        assert http is not None
        timeout = self.cfg.webhook_header_timeout
        # Not a web.TCPSite: each connection's protocol gets the head deadline around it.
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _HeadDeadline(http(), timeout, self.guards),
            self.cfg.webhook_host, self.cfg.webhook_port, reuse_address=True)
        self.port = self.cfg.webhook_port
        log.info("webhook receiver listening",
                 extra={"host": self.cfg.webhook_host, "port": self.cfg.webhook_port})

    async def stop(self) -> None:
        await cancel_all(self.tasks.values())
        self.tasks.clear()
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.applier.close()


def _observe(key: str, result: Result, seconds: float, last_applied: dict[str, float]) -> None:
    """Metrics of one finished reconcile (the per-GitSource gauges are read from the view)."""
    metrics.RECONCILES.labels("gitsource", result.state).inc()
    if result.state == "suspended":
        return  # nothing was fetched or applied: keep the latency series about real work
    metrics.GITSOURCE_SECONDS.labels(*key.split("/", 1)).observe(seconds)
    if result.state in ("applied", "unchanged"):
        last_applied[key] = time.time()


async def _healthz(_: web.Request) -> web.Response:
    """Liveness: the receiver's event loop answers, whatever this replica's peering role."""
    return web.json_response({"ok": True})


def register(registry: kopf.OperatorRegistry, cfg: GitOpsConfig, kube: Kube,
             active: Callable[[], bool] | None = None,
             vms: Callable[[], list[dict[str, Any]] | None] | None = None) -> GitOps:
    """Add the GitSource handlers and the webhook receiver to a kopf registry. ``active``:
    whether this replica is the active one (see GitOps); default always. ``vms``: the
    controller's view of the VMs when GitOps runs in its process (see ``Applier``)."""
    ops = GitOps(cfg, kube, active=active, vms=vms)

    @kopf.on.startup(registry=registry, id="gitops-startup")
    async def gitops_startup(**_: Any) -> None:
        await ops.start()

    @kopf.on.cleanup(registry=registry, id="gitops-cleanup")
    async def gitops_cleanup(**_: Any) -> None:
        await ops.stop()

    @kopf.on.event(GROUP, VERSION, GITSOURCES.plural, registry=registry, id="gitops-gitsource-event")
    async def gitsource_event(*, event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        ops.observe(event.get("type"), copy.deepcopy(dict(body)))

    return ops


def main(argv: Sequence[str] | None = None) -> None:
    """Run only the GitOps reconciler (tests, benchmarks, or a separate deployment)."""
    p = argparse.ArgumentParser(prog="python -m hyperfleet.operator.gitsource",
                                description="Hyperfleet GitSource reconciler")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--namespace", action="append", default=[],
                   help="watch only this namespace (repeatable; default: all)")
    p.add_argument("--cache-dir", default=GitOpsConfig.cache_dir, help="git cache directory")
    p.add_argument("--webhook-port", type=int, default=0, help="push webhook port (0: off)")
    p.add_argument("--webhook-host", default="0.0.0.0", help="address to bind the receiver to")
    p.add_argument("--webhook-secret-file", type=Path,
                   help=f"file holding the webhook secret (or set {WEBHOOK_SECRET_ENV})")
    p.add_argument("--webhook-header-timeout", type=float, default=GitOpsConfig.webhook_header_timeout,
                   help="seconds a connection may take to send its request headers")
    p.add_argument("--webhook-body-timeout", type=float, default=GitOpsConfig.webhook_body_timeout,
                   help="seconds a request may take to send its body (then 408)")
    p.add_argument("--webhook-replay-window", type=float, default=GitOpsConfig.webhook_replay_window,
                   help="seconds an accepted delivery id is remembered (409 when seen again; 0: off)")
    p.add_argument("--apply-workers", type=int, default=GitOpsConfig.apply_workers)
    p.add_argument("--no-cross-namespace", action="store_true",
                   help="apply only into each GitSource's own namespace (multi-tenant clusters)")
    p.add_argument("--log-format", default="json", choices=["json", "text"])
    p.add_argument("--log-level", default=os.environ.get("HYPERFLEET_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"],
                   help="least severe level written (debug: also kopf's per-handler lines)")
    args = p.parse_args(argv)

    from hyperfleet.reconcilers.kube import load_config

    from . import logs
    from .settings import configure_kopf

    logs.setup(level=args.log_level, fmt=args.log_format)  # kopf's per-event lines: debug
    secret = os.environ.get(WEBHOOK_SECRET_ENV)
    if args.webhook_secret_file:
        secret = args.webhook_secret_file.read_text().strip()
    cfg = GitOpsConfig(cache_dir=args.cache_dir, webhook_port=args.webhook_port,
                       webhook_host=args.webhook_host, webhook_secret=secret,
                       webhook_header_timeout=args.webhook_header_timeout,
                       webhook_body_timeout=args.webhook_body_timeout,
                       webhook_replay_window=args.webhook_replay_window,
                       apply_workers=args.apply_workers, cross_namespace=not args.no_cross_namespace)
    try:
        cfg.check()
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    load_config(args.kubeconfig)
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry, id="gitops-settings")
    def settings(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, "gitops")

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    register(registry, cfg, Kube())
    asyncio.run(kopf.operator(registry=registry, standalone=True,
                              clusterwide=not args.namespace, namespaces=list[str](args.namespace)))


if __name__ == "__main__":
    main()
