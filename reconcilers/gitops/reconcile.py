"""One reconcile of one GitSource: fetch -> render -> validate -> plan -> apply -> prune -> status.

The order is the safety argument: nothing is applied until the whole commit rendered,
validated (schema and server-side dry-run) and planned; nothing is pruned unless every apply
succeeded, the deletions are within maxDeletionRatio (or confirmed), and the objects still
carry this GitSource's ownership label. Any failure keeps the last applied state.
"""

from __future__ import annotations

import base64
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from hyperfleet.reconcilers.conventions import (
    CONDITION_READY,
    CONDITION_RECONCILING,
    REASON_PROGRESSING,
    VIRTUAL_MACHINE,
    VIRTUAL_MACHINE_POOL,
)
from hyperfleet.reconcilers.kube import GITSOURCES, Kube
from hyperfleet.reconcilers.models.common import now_utc, set_condition
from hyperfleet.reconcilers.models.gitsource import (
    GitSourceSpec,
    GitSourceStatus,
    HeldDeletion,
    InventoryEntry,
    Renderer,
    VerifySpec,
)
from hyperfleet.reconcilers.text import error_text

from .apply import Applier, api_message
from .fetch import Credentials, ExportError, FetchError, GitFetcher, PathNotFound, scrub
from .health import FAILED, PROGRESSING, Health, assess_health
from .nix import NixUnavailable, render_nix
from .plan import Plan, Reason, make_plan
from .render import RenderResult, pydantic_messages, render_yaml
from .types import (
    CONFIRM_DELETION_ANNOTATION,
    RECONCILE_NOW_ANNOTATION,
    ObjectRef,
    RenderError,
    SourceLocation,
    owner_value,
)
from .verify import PublicKey, VerificationError, Verified, Verifier, keys_digest

log = logging.getLogger("hyperfleet.gitops")

COMPONENT = "hyperfleet-gitops"
RETRY_AFTER_FAILURE = 30.0  # seconds; a transient failure is retried sooner than a long interval
MAX_ERRORS_SHOWN = 5
#: Seconds between health re-assessments while VMs are on their way, and once settled.
HEALTH_POLL_PROGRESSING = 5.0
HEALTH_POLL_SETTLED = 15.0
#: Ready reasons that come from a successful apply, so the health check may update Ready.
_HEALTH_GOVERNED = frozenset({"ReconciliationSucceeded", PROGRESSING, FAILED})
VM_KIND = VIRTUAL_MACHINE.kind
#: The kinds whose health gates Ready (see health.py).
HEALTH_KINDS = frozenset({VM_KIND, VIRTUAL_MACHINE_POOL.kind})

State = Literal["applied", "unchanged", "held", "stalled", "failed", "suspended", "deleted"]


@dataclass(frozen=True)
class Result:
    state: State
    requeue_after: float
    commit: str | None = None
    #: Seconds until the applied VMs' health should be looked at again (None: no check).
    health_after: float | None = None


class _Stop(Exception):
    """End this reconcile with a condition (raised by the steps, handled in one place)."""

    def __init__(self, reason: str, message: str, stalled: bool, requeue: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.stalled = stalled
        self.requeue = requeue


def _summary(errors: Sequence[object], total: int | None = None) -> str:
    shown = "; ".join(str(e) for e in errors[:MAX_ERRORS_SHOWN])
    n = total if total is not None else len(errors)
    more = f"; and {n - MAX_ERRORS_SHOWN} more" if n > MAX_ERRORS_SHOWN else ""
    return f"{n} problem{'s' if n != 1 else ''}: {shown}{more}"


class GitSourceReconciler:
    """Stateless between calls: everything it needs is in the GitSource, Git and the cluster.

    ``nix``: path of the nix binary, or None where Nix is not installed (flakes then stall
    with a clear condition; YAML sources are unaffected). ``cross_namespace``: False confines
    every GitSource to its own namespace (for clusters where tenants create GitSources: the
    reconciler's rights are cluster-wide, theirs are not)."""

    def __init__(self, kube: Kube, fetcher: GitFetcher, applier: Applier, *,
                 nix: str | None = None, server_dry_run: bool = True,
                 cross_namespace: bool = True, verifier: Verifier | None = None) -> None:
        self.kube = kube
        self.fetcher = fetcher
        self.applier = applier
        self.verifier = verifier or Verifier()
        # Last verified commit per GitSource (with the key set): not re-checked every interval.
        self.verified: dict[str, tuple[tuple[str, str, str], Verified]] = {}
        self.nix = nix
        self.server_dry_run = server_dry_run
        self.cross_namespace = cross_namespace
        # Last render per GitSource: an unchanged commit is not parsed again every interval.
        self.rendered: dict[str, tuple[tuple[Any, ...], RenderResult]] = {}

    # ------------------------------------------------------------------ entry point

    def reconcile(self, key: str, trigger: str = "interval") -> Result:
        namespace, _, name = key.partition("/")
        body = self.kube.get(GITSOURCES, name, namespace)
        if body is None:
            self.fetcher.remove(key)
            self.rendered.pop(key, None)
            self.verified.pop(key, None)
            return Result("deleted", 0.0)
        started = time.monotonic()
        quiet = trigger == "interval"  # routine polls log at debug unless something happened
        log.log(logging.DEBUG if quiet else logging.INFO, "reconcile started",
                extra={"gitsource": key, "trigger": trigger})
        run = _Run(self, body)
        result = run.execute()
        level = logging.DEBUG if quiet and result.state in ("unchanged", "suspended") else logging.INFO
        log.log(level, "reconcile finished", extra={
            "gitsource": key, "trigger": trigger, "state": result.state, "commit": result.commit,
            "seconds": round(time.monotonic() - started, 3)})
        return result

    def check_health(self, key: str) -> float | None:
        """Re-assess the health of what ``key`` applied (between reconciles): one list call
        for the VMs carrying its ownership label. Returns when to look again (None: no need:
        deleted, suspended, health checks off or nothing to check)."""
        namespace, _, name = key.partition("/")
        body = self.kube.get(GITSOURCES, name, namespace)
        if body is None:
            return None
        run = _Run(self, body)
        try:
            run.spec = GitSourceSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return None  # the next reconcile reports it
        if not run.wants_health():
            return None
        owner = owner_value(namespace, name)
        owned = [b for kind in sorted({e.kind for e in run.status.inventory} & HEALTH_KINDS)
                 for b in self.applier.list_owned(kind, owner)]
        run.assess(owned, governs_ready=run.ready_follows_health())
        run._write()
        return run.health_after()

    def _secret(self, name: str, namespace: str) -> Any:
        """A Secret (None when there is none); other API errors propagate."""
        try:
            return client.CoreV1Api(self.kube.api.api_client).read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def verify_keys(self, namespace: str, verify: VerifySpec) -> list[PublicKey]:
        """The trusted keys: inline ones, then every value of the Secret (if named)."""
        keys = [PublicKey(f"spec.verify.publicKeys[{i}]", k) for i, k in enumerate(verify.public_keys)]
        if verify.secret_ref is None:
            return keys
        name = verify.secret_ref.name
        try:
            secret = self._secret(name, namespace)
        except ApiException as exc:
            raise VerificationError("VerificationFailed", f"cannot read Secret {name} "
                                    f"(spec.verify.secretRef): {api_message(exc)}", transient=True) from None
        if secret is None:
            raise VerificationError("SecretNotFound", f"Secret {name} (spec.verify.secretRef) not "
                                    f"found in namespace {namespace}: create it with the trusted "
                                    "public keys or fix spec.verify.secretRef")
        for k, v in sorted((secret.data or {}).items()):
            keys.append(PublicKey(f"Secret {name} key {k} (spec.verify.secretRef)",
                                  base64.b64decode(v).decode("utf-8", "replace")))
        return keys

    def credentials(self, namespace: str, spec: GitSourceSpec) -> Credentials | None:
        if spec.secret_ref is None:
            return None
        name = spec.secret_ref.name
        try:
            secret = self._secret(name, namespace)
        except ApiException as exc:
            raise FetchError(f"cannot read Secret {name}: {api_message(exc)}") from None
        if secret is None:
            raise FetchError(f"Secret {name} (spec.secretRef) not found in namespace {namespace}: "
                             "create it or fix spec.secretRef", transient=False,
                             reason="SecretNotFound")
        data = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (secret.data or {}).items()}
        return Credentials.from_secret_data(data, name, spec.url)


class _Run:
    """The state of one reconcile; ``execute`` never raises for expected failures."""

    def __init__(self, r: GitSourceReconciler, body: dict[str, Any]) -> None:
        self.r = r
        self.body = body
        meta = body.get("metadata") or {}
        self.name = str(meta.get("name"))
        self.namespace = str(meta.get("namespace") or "default")
        self.key = f"{self.namespace}/{self.name}"
        self.generation = meta.get("generation")
        self.annotations: dict[str, str] = dict(meta.get("annotations") or {})
        self.status: GitSourceStatus
        try:
            self.status = GitSourceStatus.model_validate(body.get("status") or {})
        except ValidationError:
            # A hand-mangled status must not wedge the source; starting from an empty
            # inventory errs on the safe side (nothing unknown is ever pruned).
            log.warning("unreadable status; starting afresh", extra={"gitsource": self.key})
            self.status = GitSourceStatus()
        self.before = self.status.wire()
        self.prev_ready = next((c for c in self.status.conditions if c.type == CONDITION_READY), None)
        self.spec: GitSourceSpec | None = None
        self.commit: str | None = None
        self.secrets: list[str] = []

    # ------------------------------------------------------------------ flow

    def execute(self) -> Result:
        interval = 60.0
        # Set first, so the status writes of this very run do not look like unhandled changes.
        self.status.observed_generation = self.generation
        self.status.last_handled_reconcile_at = self.annotations.get(RECONCILE_NOW_ANNOTATION)
        try:
            try:
                self.spec = GitSourceSpec.model_validate(self.body.get("spec") or {})
            except ValidationError as exc:
                raise _Stop("InvalidSpec", "; ".join(pydantic_messages(exc, "spec")), True) from None
            interval = self.spec.interval_seconds
            result = self._suspended(interval) if self.spec.suspend else self._sync(self.spec)
        except _Stop as stop:
            result = self._stopped(stop, interval)
        except FetchError as exc:
            requeue = min(interval, RETRY_AFTER_FAILURE) if exc.transient else interval
            result = self._stopped(_Stop(exc.reason, self._fetch_message(str(exc)), not exc.transient,
                                         requeue), interval)
        except Exception as exc:  # API hiccups and bugs: report, keep state, retry soon
            log.exception("reconcile failed", extra={"gitsource": self.key})
            msg = (api_message(exc) if isinstance(exc, ApiException)
                   else f"{type(exc).__name__}: {error_text(exc)}")
            result = self._stopped(_Stop("ReconcileFailed", scrub(msg, self.secrets), False,
                                         min(interval, RETRY_AFTER_FAILURE)), interval)
        self._write()
        return replace(result, health_after=self.health_after())

    def _sync(self, spec: GitSourceSpec) -> Result:
        if self._home() is not None and spec.target_namespace not in (None, self.namespace):
            raise _Stop("InvalidSpec", f"spec.targetNamespace {spec.target_namespace!r} is not the "
                        f"GitSource's namespace {self.namespace!r}, and this reconciler applies only "
                        "into a GitSource's own namespace: remove spec.targetNamespace", True)
        creds = self.r.credentials(self.namespace, spec)
        self.secrets = creds.secrets() if creds else []
        fetched = self.r.fetcher.fetch(self.key, spec.url, spec.ref, creds, spec.timeout_seconds)
        self.commit = fetched.commit
        self.status.last_fetched_commit = fetched.commit
        if fetched.rewritten and fetched.previous:
            self._event("HistoryRewritten", f"history of {self._ref()} was rewritten (force-push): "
                        f"{fetched.previous[:12]} is not an ancestor of {fetched.commit[:12]}; the "
                        "new tip is the desired state", "Warning")
        self._verify(spec, fetched.commit)
        rendered = self._render(spec, fetched.commit)
        if rendered.errors:
            raise _Stop("ValidationFailed", self._not_applied(_summary(rendered.errors)), True)
        inventory = [ObjectRef.from_inventory(e.wire()) for e in self.status.inventory]
        kinds = {m.ref.kind for m in rendered.manifests} | {r.kind for r in inventory}
        live = self.r.applier.list_live(kinds)
        plan = make_plan(
            rendered.manifests, inventory, live,
            owner=owner_value(self.namespace, self.name), source=self.key, commit=fetched.commit,
            prune=spec.prune, max_deletion_ratio=spec.max_deletion_ratio,
            confirmed=self.annotations.get(CONFIRM_DELETION_ANNOTATION),
        )
        if plan.conflicts:
            raise _Stop("OwnershipConflict", self._not_applied(_summary(plan.conflicts)), True)
        if plan.hold is not None:
            h = plan.hold
            self.status.held_deletion = HeldDeletion(
                commit=h.commit, count=len(h.deletions), total=h.total,
                objects=[str(x) for x in h.deletions[:20]])
            raise _Stop("DeletionHeld", h.message(self.name, self.namespace), True)
        self.status.held_deletion = None
        return self._carry_out(plan, live, spec)

    def _verify(self, spec: GitSourceSpec, commit: str) -> None:
        """Refuse the commit unless signed by a trusted key (before anything of it is read)."""
        v = spec.verify
        if v is None:
            self._drop("SourceVerified")
            self.r.verified.pop(self.key, None)
            return
        where = "spec.verify.publicKeys" + (
            f" or Secret {v.secret_ref.name} (spec.verify.secretRef)" if v.secret_ref else "")
        try:
            keys = self.r.verify_keys(self.namespace, v)
            inputs = (commit, v.mode.value, keys_digest(v.provider, keys))
            cached = self.r.verified.get(self.key)
            if cached is not None and cached[0] == inputs:
                verified = cached[1]
            else:
                git_dir = Path(self.r.fetcher.repo(self.key, spec.url).git_dir)
                verified = self.r.verifier.verify(git_dir, commit, v.provider, keys, where)
                self.r.verified[self.key] = (inputs, verified)
                log.info("commit signature verified", extra={
                    "gitsource": self.key, "commit": commit, "provider": v.provider.value,
                    "key": verified.fingerprint})
        except VerificationError as exc:
            self.r.verified.pop(self.key, None)
            msg = self._not_applied(exc.message)
            self._set("SourceVerified", False, exc.reason, msg)
            raise _Stop(exc.reason, msg, not exc.transient,
                        min(spec.interval_seconds, RETRY_AFTER_FAILURE) if exc.transient else None
                        ) from None
        self._set("SourceVerified", True, "Succeeded", f"commit {commit[:12]} is signed by "
                  f"{v.provider.value} key {verified.fingerprint}"
                  + (f" ({verified.signer})" if verified.signer and verified.signer != "*" else ""))

    def _home(self) -> str | None:
        return None if self.r.cross_namespace else self.namespace

    def _render(self, spec: GitSourceSpec, commit: str) -> RenderResult:
        inputs = (commit, spec.path, spec.renderer, spec.target_namespace, self.namespace,
                  self.r.nix is not None, self.r.cross_namespace)
        cached = self.r.rendered.get(self.key)
        if cached is not None and cached[0] == inputs:
            return cached[1]
        result = self._render_fresh(spec, commit)
        self.r.rendered[self.key] = (inputs, result)
        return result

    def _render_fresh(self, spec: GitSourceSpec, commit: str) -> RenderResult:
        f, key = self.r.fetcher, self.key
        try:
            use_nix = spec.renderer == Renderer.NIX or (
                spec.renderer == Renderer.AUTO and f.has_file(key, spec.url, commit, spec.path, "flake.nix"))
            if not use_nix:
                return render_yaml(f.manifest_files(key, spec.url, commit, spec.path),
                                   self.namespace, spec.target_namespace, self._home())
            with tempfile.TemporaryDirectory(prefix="hf-nix-") as tmp:
                # Only spec.path: nix can read nothing else of the repository (or the host).
                f.export(key, spec.url, commit, Path(tmp), spec.path)
                flake_dir = Path(tmp) if spec.path == "." else Path(tmp) / spec.path
                if not (flake_dir / "flake.nix").is_file():
                    raise PathNotFound(f"spec.renderer is Nix but {spec.path}/flake.nix does not exist "
                                       f"in commit {commit[:12]}")
                return render_nix(flake_dir, spec.path, self.namespace, spec.target_namespace,
                                  timeout=spec.timeout_seconds, nix=self.r.nix,
                                  home_namespace=self._home())
        except ExportError as exc:
            return RenderResult(errors=[RenderError(SourceLocation(exc.file), exc.message)])
        except PathNotFound as exc:
            raise _Stop("PathNotFound", self._not_applied(str(exc)), True) from None
        except NixUnavailable as exc:
            raise _Stop("NixUnavailable", self._not_applied(str(exc)), True) from None

    def _carry_out(self, plan: Plan, live: dict[ObjectRef, dict[str, Any]],
                   spec: GitSourceSpec) -> Result:
        commit = self.commit or ""
        applier = self.r.applier
        applied: list[ObjectRef] = []
        if plan.applies:
            self._set(CONDITION_RECONCILING, True, REASON_PROGRESSING,
                      f"applying commit {commit[:12]}: {len(plan.applies)} object(s) to create or update")
            self._write()
            bodies = [a.body for a in plan.applies]
            if self.r.server_dry_run:
                outcomes = applier.apply_all(bodies, dry_run=True)
                bad = [f"{a.manifest.where}: {a.manifest.ref}: {o.error}"
                       for a, o in zip(plan.applies, outcomes, strict=True) if not o.ok]
                if bad:
                    raise _Stop("ValidationFailed",
                                self._not_applied("the API server rejected " + _summary(bad)), True)
            outcomes = applier.apply_all(bodies)
            failed = []
            for a, o in zip(plan.applies, outcomes, strict=True):
                if o.ok:
                    applied.append(a.manifest.ref)
                    if o.result:
                        live[a.manifest.ref] = o.result  # what the server made of it: generation
                else:
                    failed.append(f"{a.manifest.where}: {a.manifest.ref}: {o.error}")
            if failed:
                # Remember what did get applied so a later commit can prune it; prune nothing now.
                old = [ObjectRef.from_inventory(e.wire()) for e in self.status.inventory]
                self._set_inventory(list(dict.fromkeys([*old, *applied])))
                self._applied_event(plan, applied)
                raise _Stop("ApplyFailed", f"commit {commit[:12]} was applied only in part, nothing "
                            f"pruned: {_summary(failed)}", False,
                            min(spec.interval_seconds, RETRY_AFTER_FAILURE))
        self._applied_event(plan, applied)
        kept: list[ObjectRef] = []
        if plan.prunes:
            outcomes = applier.delete_all([(ref, (live[ref].get("metadata") or {}).get("uid"))
                                           for ref in plan.prunes])
            pruned = [ref for ref, o in zip(plan.prunes, outcomes, strict=True) if o.ok]
            kept = [ref for ref, o in zip(plan.prunes, outcomes, strict=True) if not o.ok]
            if pruned:
                self._event("Pruned", f"commit {commit[:12]}: deleted {len(pruned)} object(s) removed "
                            f"from Git: {', '.join(str(r) for r in pruned[:20])}")
                log.info("pruned", extra={"gitsource": self.key, "commit": commit,
                                          "objects": [str(r) for r in pruned]})
        self._set_inventory([*plan.inventory, *kept])
        self.status.last_applied_commit = commit
        self.status.last_attempted_commit = commit
        self.status.last_error = None
        if kept:
            raise _Stop("PruneFailed", f"commit {commit[:12]} applied, but {len(kept)} object(s) could "
                        f"not be deleted yet: {', '.join(str(r) for r in kept[:10])}", False,
                        min(spec.interval_seconds, RETRY_AFTER_FAILURE))
        if plan.changes or self.status.last_changed_at is None:
            self.status.last_changed_at = now_utc()
        self._set("Stalled", False, "ReconciliationSucceeded")
        if self.prev_ready is not None and self.prev_ready.status == "False" \
                and self.prev_ready.reason not in _HEALTH_GOVERNED:
            self._event("ReconciliationSucceeded", f"recovered: {self._applied_message()}")
        if self.wants_health():
            self.assess([b for r, b in live.items() if r.kind in HEALTH_KINDS], governs_ready=True)
        else:
            self._drop("Healthy")
            self._set(CONDITION_READY, True, "ReconciliationSucceeded", self._applied_message())
            self._set(CONDITION_RECONCILING, False, "ReconciliationSucceeded")
        state: State = "applied" if plan.changes else "unchanged"
        return Result(state, spec.interval_seconds, commit)

    # ------------------------------------------------------------------ health

    def wants_health(self) -> bool:
        spec = self.spec
        return bool(spec is not None and spec.health_check.enabled and not spec.suspend
                    and any(e.kind in HEALTH_KINDS for e in self.status.inventory))

    def ready_follows_health(self) -> bool:
        """Whether Ready is the health check's to set: the last reconcile applied the commit
        it tried, for the current generation (otherwise Ready reports that failure)."""
        ready = next((c for c in self.status.conditions if c.type == CONDITION_READY), None)
        st = self.status
        return (ready is not None and ready.reason in _HEALTH_GOVERNED
                and st.last_applied_commit is not None
                and st.last_applied_commit == st.last_attempted_commit
                and st.observed_generation == self.generation)

    def assess(self, vms: Sequence[dict[str, Any]], governs_ready: bool) -> Health:
        """Set Healthy (and Ready, where it follows health) from the live ``vms``."""
        assert self.spec is not None
        observed = {ObjectRef.of(b): b for b in vms}
        inventory = [ObjectRef.from_inventory(e.wire()) for e in self.status.inventory]
        before = next((c for c in self.status.conditions if c.type == "Healthy"), None)
        health = assess_health(inventory, observed, now_utc(), self.status.last_changed_at,
                               self.spec.health_check.timeout_seconds)
        self._set("Healthy", "Unknown" if health.status == "Unknown" else health.status == "True",
                  health.reason, health.message)
        if governs_ready:
            applied = self._applied_message()
            if health.status == "True":
                self._set(CONDITION_READY, True, "ReconciliationSucceeded", f"{applied}; {health.message}")
                self._set(CONDITION_RECONCILING, False, "ReconciliationSucceeded")
            elif health.status == "Unknown":
                self._set(CONDITION_READY, "Unknown", PROGRESSING, f"{applied}; {health.message}")
                self._set(CONDITION_RECONCILING, True, PROGRESSING, health.message)
            else:
                self._set(CONDITION_READY, False, FAILED, f"{applied}; {health.message}")
                self._set(CONDITION_RECONCILING, False, FAILED)
        if health.status == "False" and (before is None or before.status != "False"):
            self._event(FAILED, health.message, "Warning")
            log.warning("health check failed", extra={
                "gitsource": self.key, "commit": self.status.last_applied_commit,
                "unhealthy": [str(v.ref) for v in health.unhealthy[:20]]})
        elif health.status == "True" and before is not None and before.status != "True":
            self._event("HealthCheckSucceeded", health.message)
        return health

    def health_after(self) -> float | None:
        if not self.wants_health():
            return None
        healthy = next((c for c in self.status.conditions if c.type == "Healthy"), None)
        waiting = healthy is None or healthy.status == "Unknown"
        return HEALTH_POLL_PROGRESSING if waiting else HEALTH_POLL_SETTLED

    def _applied_message(self) -> str:
        commit = self.status.last_applied_commit or ""
        return f"Applied revision {self._ref()}@{commit[:12]}: {len(self.status.inventory)} object(s)"

    # ------------------------------------------------------------------ endings

    def _suspended(self, interval: float) -> Result:
        self._set(CONDITION_RECONCILING, False, "Suspended",
                  "spec.suspend is true: not fetching, applying or pruning; set it to false to resume")
        return Result("suspended", interval)

    def _stopped(self, stop: _Stop, interval: float) -> Result:
        msg = scrub(stop.message, self.secrets)
        self.status.last_error = msg
        if self.commit:
            self.status.last_attempted_commit = self.commit
        if stop.reason != "DeletionHeld":
            self.status.held_deletion = None
        self._set(CONDITION_READY, False, stop.reason, msg)
        self._set("Stalled", stop.stalled, stop.reason if stop.stalled else "Retrying",
                  msg if stop.stalled else "")
        self._set(CONDITION_RECONCILING, not stop.stalled,
                  "RetryingAfterError" if not stop.stalled else stop.reason,
                  "" if stop.stalled else f"will retry: {msg}")
        if self.prev_ready is None or (self.prev_ready.reason, self.prev_ready.message) != (stop.reason, msg):
            self._event(stop.reason, msg, "Warning")
            log.warning("reconcile stopped", extra={"gitsource": self.key, "reason": stop.reason,
                                                    "error": msg, "commit": self.commit})
        state: State = "held" if stop.reason == "DeletionHeld" else (
            "stalled" if stop.stalled else "failed")
        return Result(state, stop.requeue if stop.requeue is not None else interval, self.commit)

    # ------------------------------------------------------------------ helpers

    def _ref(self) -> str:
        return self.spec.ref.short() if self.spec and self.spec.ref else "HEAD"

    def _not_applied(self, what: str) -> str:
        last = self.status.last_applied_commit
        keep = f"the last applied commit {last[:12]} stays in place" if last else "nothing was applied"
        return f"commit {(self.commit or '?')[:12]} was not applied ({keep}): {what}"

    def _fetch_message(self, what: str) -> str:
        last = self.status.last_applied_commit
        keep = f"keeping commit {last[:12]}" if last else "nothing applied yet"
        return f"{what} ({keep}; nothing is pruned while the remote cannot be read)"

    def _drop(self, type_: str) -> None:
        self.status.conditions = [c for c in self.status.conditions if c.type != type_]

    def _set(self, type_: str, status: bool | Literal["Unknown"], reason: str,
             message: str = "") -> None:
        self.status.conditions = set_condition(self.status.conditions, type_, status, reason,
                                               message[:4000], self.generation)

    def _set_inventory(self, refs: Sequence[ObjectRef]) -> None:
        ordered = sorted(dict.fromkeys(refs), key=lambda r: r.sort_key())
        self.status.inventory = [InventoryEntry.model_validate(r.to_inventory()) for r in ordered]

    def _applied_event(self, plan: Plan, applied: Sequence[ObjectRef]) -> None:
        done = set(applied)
        counts = {reason: sum(1 for a in plan.applies if a.reason == reason and a.manifest.ref in done)
                  for reason in Reason}
        if not any(counts.values()):
            return
        parts = [f"created {counts[Reason.CREATE]}", f"updated {counts[Reason.UPDATE]}"]
        if counts[Reason.DRIFT]:
            drifted = [str(a.manifest.ref) for a in plan.applies
                       if a.reason == Reason.DRIFT and a.manifest.ref in done]
            parts.append(f"reverted drift on {counts[Reason.DRIFT]} ({', '.join(drifted[:10])})")
        if counts[Reason.ADOPT]:
            adopted = [str(a.manifest.ref) for a in plan.applies
                       if a.reason == Reason.ADOPT and a.manifest.ref in done]
            parts.append(f"adopted {counts[Reason.ADOPT]} ({', '.join(adopted[:10])})")
        self._event("Applied", f"commit {(self.commit or '')[:12]}: {', '.join(parts)}")
        log.info("applied", extra={"gitsource": self.key, "commit": self.commit,
                                   **{str(k): v for k, v in counts.items()}})

    def _event(self, reason: str, message: str, type_: str = "Normal") -> None:
        self.r.kube.event(self.body, reason, scrub(message, self.secrets), type_, COMPONENT)

    def _write(self) -> None:
        new = self.status.wire()
        if new == self.before:
            return
        patch: dict[str, Any] = dict(new)
        for k in self.before:
            if k not in new:
                patch[k] = None  # merge patch: null removes a field we no longer report
        self.r.kube.patch(GITSOURCES, self.name, {"status": patch}, self.namespace, True)
        self.before = new


__all__ = ["GITSOURCES", "GitSourceReconciler", "RenderError", "Result"]
