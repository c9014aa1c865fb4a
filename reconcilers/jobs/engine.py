"""Pure job engine: phase state machine, retries, timeouts, queue order, routing, idempotency.

Nothing here sleeps, reads a clock or talks to Kubernetes: every time-dependent
function takes ``now`` (timezone-aware), and randomness comes from an explicit
``random.Random``. That keeps the controller's decisions reproducible in tests
and lets the same code run in the controller and the node agent.

Status objects are treated as immutable values: every function returns a new
:class:`JobStatus` (or the same instance when nothing changed), which the caller
patches onto ``VmJob.status``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

from pydantic import AwareDatetime, Field

from ..models.common import Condition, OpenCamelModel, set_condition
from .envelope import MAX_BACKOFF_SECONDS, Backoff, Execution, JobDocument
from .parse import payload_spec
from .registry import PayloadRegistry

__all__ = [
    "HISTORY_LIMIT",
    "PHASE_TRANSITIONS",
    "TERMINAL_PHASES",
    "Condition",
    "HistoryEntry",
    "IdempotencyIndex",
    "IdempotencyRecord",
    "IdempotencyResolution",
    "IllegalTransitionError",
    "JobError",
    "JobPhase",
    "JobStatus",
    "Progress",
    "Reason",
    "Resolution",
    "RoutingDecision",
    "StoredJob",
    "WorkerView",
    "advance",
    "apply_resolution",
    "can_transition",
    "check_deadline",
    "check_timeout",
    "deadline_passed",
    "decide_after_failure",
    "effective_capabilities",
    "hand_back",
    "next_backoff",
    "next_check_at",
    "order_queue",
    "queue_key",
    "ready_to_start",
    "request_fingerprint",
    "route",
    "set_condition",
    "timeout_at",
    "transition",
]

# --------------------------------------------------------------------------- phases


class JobPhase(StrEnum):
    """Lifecycle phase stored in ``VmJob.status.phase``."""

    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    TIMED_OUT = "TimedOut"


TERMINAL_PHASES: frozenset[JobPhase] = frozenset(
    {JobPhase.SUCCEEDED, JobPhase.FAILED, JobPhase.CANCELLED, JobPhase.TIMED_OUT}
)

PHASE_TRANSITIONS: Mapping[JobPhase, frozenset[JobPhase]] = {
    # Failed from Pending/Scheduled covers "deadline passed before start".
    JobPhase.PENDING: frozenset({JobPhase.SCHEDULED, JobPhase.CANCELLED, JobPhase.FAILED}),
    # Scheduled -> Pending: the assigned node went away before starting (hand-back).
    JobPhase.SCHEDULED: frozenset({JobPhase.RUNNING, JobPhase.PENDING, JobPhase.CANCELLED, JobPhase.FAILED}),
    # Running -> Pending: retry after a retryable failure, or node hand-back.
    JobPhase.RUNNING: frozenset(
        {
            JobPhase.SUCCEEDED,
            JobPhase.FAILED,
            JobPhase.TIMED_OUT,
            JobPhase.CANCELLED,
            JobPhase.PENDING,
        }
    ),
    JobPhase.SUCCEEDED: frozenset(),
    JobPhase.FAILED: frozenset(),
    JobPhase.CANCELLED: frozenset(),
    JobPhase.TIMED_OUT: frozenset(),
}


class IllegalTransitionError(ValueError):
    """A phase change the state machine forbids (e.g. leaving a terminal phase)."""

    def __init__(self, current: JobPhase, to: JobPhase) -> None:
        self.current = current
        self.to = to
        if current in TERMINAL_PHASES:
            why = f"{current} is terminal"
        else:
            allowed = ", ".join(sorted(PHASE_TRANSITIONS[current])) or "none"
            why = f"allowed from {current}: {allowed}"
        super().__init__(f"illegal job phase transition {current} -> {to}: {why}")


def can_transition(current: JobPhase, to: JobPhase) -> bool:
    """Whether ``current -> to`` is allowed (self-transitions are not)."""
    return to in PHASE_TRANSITIONS[current]


def transition(current: JobPhase, to: JobPhase) -> JobPhase:
    """Validate ``current -> to`` and return ``to``; raises :class:`IllegalTransitionError`."""
    if not can_transition(current, to):
        raise IllegalTransitionError(current, to)
    return to


class Reason(StrEnum):
    """Machine-readable ``status.reason`` / condition reasons."""

    SCHEDULED = "Scheduled"
    STARTED = "Started"
    SUCCEEDED = "Succeeded"
    RETRY_SCHEDULED = "RetryScheduled"
    HANDED_BACK = "HandedBack"
    NON_RETRYABLE_ERROR = "NonRetryableError"
    ATTEMPTS_EXHAUSTED = "AttemptsExhausted"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    TIMED_OUT = "TimedOut"
    CANCELLED = "Cancelled"
    DUPLICATE = "Duplicate"
    WAITING_FOR_DUPLICATE = "WaitingForDuplicate"
    IDEMPOTENCY_CONFLICT = "IdempotencyConflict"
    DUPLICATE_JOB_ID = "DuplicateJobId"


# --------------------------------------------------------------------------- status model

HISTORY_LIMIT = 50
"""History entries kept in status; bounded because etcd objects are size-limited."""


class Progress(OpenCamelModel):
    """Agent-reported progress of the running attempt."""

    percent: int = Field(default=0, ge=0, le=100)
    message: str | None = None


class HistoryEntry(OpenCamelModel):
    """One phase change, for ``kubectl describe`` and post-mortems."""

    phase: JobPhase
    at: AwareDatetime
    node: str | None = None
    message: str | None = None


class JobStatus(OpenCamelModel):
    """``VmJob.status``. ``attempts`` counts attempts started (or failed at scheduling)."""

    phase: JobPhase = JobPhase.PENDING
    attempts: int = Field(default=0, ge=0)
    last_error: str | None = None
    next_attempt_at: AwareDatetime | None = None
    started_at: AwareDatetime | None = Field(default=None, description="First attempt start.")
    attempt_started_at: AwareDatetime | None = Field(
        default=None, description="Current attempt start; the timeout is measured from here."
    )
    completed_at: AwareDatetime | None = None
    progress: Progress | None = None
    result: dict[str, Any] | None = None
    assigned_node: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    reason: str | None = None
    duplicate_of: str | None = Field(
        default=None, description="jobId whose outcome this job mirrors (idempotency)."
    )
    history: list[HistoryEntry] = Field(default_factory=list)

    @property
    def terminal(self) -> bool:
        """Whether the job has finished for good."""
        return self.phase in TERMINAL_PHASES

    def to_status(self) -> dict[str, Any]:
        """Wire form for a status patch (camelCase, JSON types, ``None`` omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def to_patch(self, current: Mapping[str, Any] | None) -> dict[str, Any]:
        """Wire form for a JSON merge patch over the stored ``current`` status.

        A merge patch keeps every field it does not mention, so a field this status
        cleared (``assignedNode`` after a hand-back) is sent as an explicit null. Only
        declared fields: unknown ones (``migration``, written by the agents) are not ours.
        """
        out = self.to_status()
        stored = current or {}
        for name, info in type(self).model_fields.items():
            alias = info.alias or name
            if alias not in out and stored.get(alias) is not None:
                out[alias] = None
        return out


def finished_event(status: JobStatus, operation: str) -> tuple[str, str, str]:
    """The Event (type, reason, message) a VmJob gets once, when it finishes: Normal
    Succeeded or Cancelled, Warning Failed or TimedOut, so ``kubectl describe`` and event
    alerts see the outcome without reading status. The message is a sentence: what ran,
    where, and why it ended."""
    cond = next((c for c in status.conditions if c.type in ("Complete", "Failed")
                 and c.status == "True"), None)
    said = cond.message if cond is not None else ""
    # A failure's own error says most; a timeout's or cancel's message says why it ended.
    why = (status.last_error or said) if status.phase is JobPhase.FAILED else said
    where = f" on {status.assigned_node}" if status.assigned_node else ""
    tries = f" after {status.attempts} attempts" if status.attempts > 1 else ""
    if status.phase is JobPhase.SUCCEEDED:
        done = why if why and why != "succeeded" else ""
        return ("Normal", "Succeeded",
                f"{operation} succeeded{where}{tries}" + (f" ({done})" if done else ""))
    if status.phase is JobPhase.CANCELLED:
        return "Normal", "Cancelled", f"{operation} cancelled{where}: {why or 'as requested'}"
    if status.phase is JobPhase.TIMED_OUT:
        return "Warning", "TimedOut", f"{operation} timed out{where}: {why or 'no result in time'}"
    reason = f" ({status.reason})" if status.reason else ""
    return "Warning", "Failed", f"{operation} failed{where}{tries}{reason}: {why or 'no detail'}"


def _require_aware(now: datetime) -> None:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")


_FAILED_PHASES = frozenset({JobPhase.FAILED, JobPhase.CANCELLED, JobPhase.TIMED_OUT})


def _sync_conditions(
    conditions: Sequence[Condition], phase: JobPhase, now: datetime, reason: str, message: str
) -> list[Condition]:
    """Running / Complete / Failed mirror the phase, for ``kubectl wait --for=condition=``."""
    result = list(conditions)
    for type_, on in (("Running", phase is JobPhase.RUNNING),
                      ("Complete", phase is JobPhase.SUCCEEDED),
                      ("Failed", phase in _FAILED_PHASES)):
        result = set_condition(result, type_, on, reason, message if on else "", now=now)
    return result


def advance(
    status: JobStatus,
    to: JobPhase,
    *,
    now: datetime,
    node: str | None = None,
    reason: str | None = None,
    message: str | None = None,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> JobStatus:
    """Apply a legal phase change and the bookkeeping that goes with it.

    Entering Scheduled records ``node``; Running counts an attempt and starts the
    timeout clock; Pending clears the node so the job is routed afresh; terminal
    phases set ``completedAt``. Raises :class:`IllegalTransitionError`.
    """
    _require_aware(now)
    transition(status.phase, to)
    new = status.model_copy(deep=True)
    new.phase = to
    new.reason = reason or _DEFAULT_REASON[to]
    if error is not None:
        new.last_error = error
    if to is JobPhase.SCHEDULED:
        new.assigned_node = node
    elif to is JobPhase.RUNNING:
        new.attempts += 1
        new.attempt_started_at = now
        new.started_at = new.started_at or now
        new.next_attempt_at = None
        new.progress = Progress()
        if node is not None:
            new.assigned_node = node
    elif to is JobPhase.PENDING:
        new.assigned_node = None
        new.attempt_started_at = None
    else:  # terminal
        new.completed_at = now
        new.next_attempt_at = None
        if result is not None:
            new.result = dict(result)
        if to is JobPhase.SUCCEEDED and new.progress is not None:
            new.progress = Progress(percent=100, message=new.progress.message)
    text = message or error or ""
    new.conditions = _sync_conditions(new.conditions, to, now, new.reason, text)
    new.history = [
        *new.history,
        HistoryEntry(phase=to, at=now, node=node or new.assigned_node, message=message or error),
    ][-HISTORY_LIMIT:]
    return new


_DEFAULT_REASON: Mapping[JobPhase, str] = {
    JobPhase.PENDING: Reason.HANDED_BACK,
    JobPhase.SCHEDULED: Reason.SCHEDULED,
    JobPhase.RUNNING: Reason.STARTED,
    JobPhase.SUCCEEDED: Reason.SUCCEEDED,
    JobPhase.FAILED: Reason.NON_RETRYABLE_ERROR,
    JobPhase.CANCELLED: Reason.CANCELLED,
    JobPhase.TIMED_OUT: Reason.TIMED_OUT,
}


# --------------------------------------------------------------------------- retries


class RandomSource(Protocol):
    """What :func:`next_backoff` needs from an RNG (``random.Random`` fits)."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class JobError:
    """A failed attempt as reported by the agent. ``retryable=False`` stops retries."""

    message: str
    retryable: bool = True
    code: str | None = None

    def describe(self) -> str:
        """``"[CODE] message"`` for ``status.lastError``."""
        return f"[{self.code}] {self.message}" if self.code else self.message


def next_backoff(execution: Execution | Backoff, attempt: int, rng: RandomSource) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    ``initial * multiplier**(attempt-1)`` capped at ``maxSeconds``; with jitter the
    result is drawn from ``[d/2, d]`` ("equal jitter"): retries of many jobs spread
    out, yet never retry sooner than half the nominal delay.
    """
    if attempt < 1:
        raise ValueError(f"attempt is 1-based, got {attempt}")
    policy = execution.backoff if isinstance(execution, Execution) else execution
    # Clamped as well as validated: a policy built without validation (model_construct,
    # an older stored object) must not overflow the datetime arithmetic of a retry.
    cap = min(max(policy.max_seconds, policy.initial_seconds), MAX_BACKOFF_SECONDS)
    delay = min(policy.initial_seconds, cap)
    if policy.multiplier > 1:
        # Iterate instead of ``multiplier ** n`` so huge attempts cannot overflow a float.
        for _ in range(attempt - 1):
            delay *= policy.multiplier
            if delay >= cap:
                delay = cap
                break
    if policy.jitter:
        delay = delay / 2 + rng.random() * (delay / 2)
    return min(delay, cap)


def deadline_passed(job: JobDocument, now: datetime) -> bool:
    """True once ``now`` reaches ``execution.deadline``; such a job must not start."""
    _require_aware(now)
    deadline = job.execution.deadline
    return deadline is not None and now >= deadline


def _job_rng(job: JobDocument, attempt: int) -> random.Random:
    # Deterministic per job+attempt: controller restarts re-derive the same delay.
    return random.Random(f"{job.job_id or job.payload.type}:{attempt}")


def decide_after_failure(
    job: JobDocument,
    status: JobStatus,
    error: JobError,
    now: datetime,
    *,
    rng: RandomSource | None = None,
) -> JobStatus:
    """Retry (back to Pending with ``nextAttemptAt``) or fail the job after an error.

    Retries only when the error is retryable, attempts remain and the retry would
    still start before the deadline. A failure while Scheduled (the node refused
    the job) counts as an attempt so such loops stay bounded. ``rng`` defaults to
    one seeded from jobId and attempt, so the decision is reproducible.
    """
    _require_aware(now)
    if status.phase not in (JobPhase.RUNNING, JobPhase.SCHEDULED):
        raise IllegalTransitionError(status.phase, JobPhase.FAILED)
    if status.phase is JobPhase.SCHEDULED:
        status = status.model_copy(update={"attempts": status.attempts + 1})
    attempts, limit = status.attempts, job.execution.max_attempts
    text = error.describe()

    def fail(reason: Reason, message: str) -> JobStatus:
        return advance(status, JobPhase.FAILED, now=now, reason=reason, message=message, error=text)

    if not error.retryable:
        return fail(Reason.NON_RETRYABLE_ERROR, f"attempt {attempts} failed permanently: {text}")
    if attempts >= limit:
        return fail(Reason.ATTEMPTS_EXHAUSTED, f"attempt {attempts}/{limit} failed, no attempts left: {text}")
    if deadline_passed(job, now):
        return fail(Reason.DEADLINE_EXCEEDED, f"deadline passed after attempt {attempts}: {text}")
    delay = next_backoff(job.execution, max(attempts, 1), rng or _job_rng(job, attempts))
    retry_at = now + timedelta(seconds=delay)
    deadline = job.execution.deadline
    if deadline is not None and retry_at >= deadline:
        return fail(
            Reason.DEADLINE_EXCEEDED,
            f"next retry at {retry_at.isoformat()} would be past the deadline {deadline.isoformat()}: {text}",
        )
    pending = advance(
        status,
        JobPhase.PENDING,
        now=now,
        reason=Reason.RETRY_SCHEDULED,
        message=f"attempt {attempts}/{limit} failed, retrying in {delay:.1f}s: {text}",
        error=text,
    )
    pending.next_attempt_at = retry_at
    return pending


def hand_back(job: JobDocument, status: JobStatus, now: datetime, why: str) -> JobStatus:
    """Back to Pending because the node stopped running the job (lost, or its agent shut down).

    A Running attempt has started, so it counts against ``maxAttempts`` like a failed
    one; otherwise a flapping node would run the job without bound. A Scheduled job
    never started and just goes back to the queue.
    """
    _require_aware(now)
    limit = job.execution.max_attempts
    if status.phase is JobPhase.RUNNING and status.attempts >= limit:
        return advance(status, JobPhase.FAILED, now=now, reason=Reason.ATTEMPTS_EXHAUSTED,
                       message=f"{why}; attempt {status.attempts}/{limit} was the last",
                       error=why)
    return advance(status, JobPhase.PENDING, now=now, reason=Reason.HANDED_BACK, message=why)


# --------------------------------------------------------------------------- time checks


def timeout_at(job: JobDocument, status: JobStatus) -> datetime | None:
    """When the running attempt times out, or ``None`` if it is not running."""
    if status.phase is not JobPhase.RUNNING:
        return None
    start = status.attempt_started_at or status.started_at
    if start is None:
        return None
    return start + timedelta(seconds=job.execution.timeout_seconds)


def check_timeout(job: JobDocument, status: JobStatus, now: datetime) -> JobStatus:
    """TimedOut once an attempt has run longer than ``timeoutSeconds``; else ``status`` itself."""
    _require_aware(now)
    limit = timeout_at(job, status)
    if limit is None or now <= limit:
        return status
    seconds = job.execution.timeout_seconds
    return advance(
        status,
        JobPhase.TIMED_OUT,
        now=now,
        reason=Reason.TIMED_OUT,
        message=f"attempt {status.attempts} ran longer than timeoutSeconds={seconds}",
        error=f"timed out after {seconds}s",
    )


def check_deadline(job: JobDocument, status: JobStatus, now: datetime) -> JobStatus:
    """Fail a not-yet-started job whose deadline passed; else ``status`` itself.

    Running jobs are left alone: the deadline gates *starting*, the timeout bounds running.
    """
    if status.phase not in (JobPhase.PENDING, JobPhase.SCHEDULED) or not deadline_passed(job, now):
        return status
    deadline = job.execution.deadline
    assert deadline is not None
    return advance(
        status,
        JobPhase.FAILED,
        now=now,
        reason=Reason.DEADLINE_EXCEEDED,
        message=f"not started before the deadline {deadline.isoformat()}",
        error="deadline exceeded",
    )


def ready_to_start(job: JobDocument, status: JobStatus, now: datetime) -> bool:
    """Pending, backoff elapsed and deadline not passed: the scheduler may route it."""
    if status.phase is not JobPhase.PENDING or deadline_passed(job, now):
        return False
    return status.next_attempt_at is None or status.next_attempt_at <= now


def next_check_at(job: JobDocument, status: JobStatus) -> datetime | None:
    """Earliest instant the engine's answer may change (for the controller's requeue)."""
    candidates: list[datetime] = []
    if status.phase is JobPhase.PENDING and status.next_attempt_at is not None:
        candidates.append(status.next_attempt_at)
    if status.phase in (JobPhase.PENDING, JobPhase.SCHEDULED) and job.execution.deadline:
        candidates.append(job.execution.deadline)
    limit = timeout_at(job, status)
    if limit is not None:
        candidates.append(limit + timedelta(microseconds=1))  # check_timeout is strict (>)
    return min(candidates) if candidates else None


# --------------------------------------------------------------------------- queue

_NO_TIME = datetime.min.replace(tzinfo=UTC)


def queue_key(job: JobDocument, created_at: datetime | None = None) -> tuple[Any, ...]:
    """Sort key: priority desc, then submittedAt (or ``created_at``) asc, then jobId.

    Jobs without any timestamp sort after timestamped ones of the same priority.
    """
    when = job.audit.submitted_at or created_at
    return (-job.execution.priority, when is None, when or _NO_TIME, job.job_id or "")


def order_queue(
    jobs: Iterable[JobDocument],
    *,
    created_at: Callable[[JobDocument], datetime | None] | None = None,
) -> list[JobDocument]:
    """Jobs in execution order; stable, so full ties keep their input order.

    ``created_at`` supplies a fallback timestamp (e.g. ``metadata.creationTimestamp``)
    for jobs without ``audit.submittedAt``.
    """
    return sorted(jobs, key=lambda j: queue_key(j, created_at(j) if created_at else None))


# --------------------------------------------------------------------------- routing


def effective_capabilities(job: JobDocument, registry: PayloadRegistry | None = None) -> frozenset[str]:
    """Capabilities a node needs: implied by the payload type plus ``requiredCapabilities``."""
    spec = payload_spec(job, registry)
    return spec.required_capabilities | frozenset(job.constraints.required_capabilities)


@dataclass(frozen=True)
class WorkerView:
    """What routing needs to know about a worker node (decoupled from k8s models).

    ``ready`` (the agent is alive) and ``schedulable`` (not cordoned or draining) are
    separate: a cordoned node still runs its jobs and still hosts its VMs, so jobs on
    those VMs (a migration off a draining node) go there; only new placement avoids it.
    """

    name: str
    pool: str | None = None
    capabilities: AbstractSet[str] = field(default_factory=frozenset)
    ready: bool = True
    active_jobs: int = 0
    schedulable: bool = True


@dataclass(frozen=True)
class RoutingDecision:
    """Chosen node (or ``None``) and a human explanation for events/conditions."""

    node: str | None
    reason: str
    eligible: tuple[str, ...] = ()

    @property
    def routed(self) -> bool:
        """Whether a node was chosen."""
        return self.node is not None


def _names(nodes: Iterable[WorkerView]) -> str:
    names = sorted(n.name for n in nodes)
    return ", ".join(names) if names else "none"


def _quoted(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in sorted(values))


def route(
    job: JobDocument,
    nodes: Iterable[WorkerView],
    vm_hosts: Mapping[str, str] | None = None,
    *,
    default_namespace: str = "default",
    registry: PayloadRegistry | None = None,
) -> RoutingDecision:
    """Pick the worker node for ``job``, or explain why none qualifies.

    Filters in order (the first filter that empties the set names the reason):
    Ready, ``routing.workerPool``, effective capabilities, target VM host (for
    payload types that target a VM; ``vm_hosts`` maps ``"namespace/name"`` or bare
    ``"name"`` to a node), ``affinity.nodeNames``, schedulable. Among the survivors
    the first of ``affinity.preferNodeNames`` wins, else the least busy node (then by
    name). A VM's host is chosen even when cordoned: the job has to run where the VM is.
    """
    workers = sorted(nodes, key=lambda n: n.name)
    if not workers:
        return RoutingDecision(None, "no worker nodes are registered")
    ready = [n for n in workers if n.ready]
    if not ready:
        return RoutingDecision(None, f"no worker node is Ready (nodes: {_names(workers)})")

    pool = job.routing.worker_pool
    in_pool = [n for n in ready if n.pool == pool] if pool else ready
    where = f" in worker pool '{pool}'" if pool else ""
    if not in_pool:
        seen = ", ".join(f"{n.name} [{n.pool or 'no pool'}]" for n in ready)
        return RoutingDecision(None, f"no Ready node{where} (Ready nodes: {seen})")

    needed = effective_capabilities(job, registry)
    capable = [n for n in in_pool if needed <= n.capabilities]
    if not capable:
        return RoutingDecision(None, _capability_reason(needed, in_pool, where))

    spec = payload_spec(job, registry)
    target = job.routing.target_vm
    affinity = job.routing.affinity
    required_nodes = set(affinity.node_names) if affinity and affinity.node_names else None

    if spec.targets_vm and target is not None:
        namespace = target.namespace or default_namespace
        vm = f"{namespace}/{target.name}"
        hosts = vm_hosts or {}
        host = hosts.get(vm) or hosts.get(target.name)
        if host is not None:
            return _route_to_host(host, vm, workers, capable, needed, pool, required_nodes)
        if spec.requires_running_vm:
            return RoutingDecision(
                None, f"VM {vm} is not running on any node; start it before {job.operation}"
            )

    eligible = capable
    if required_nodes is not None:
        eligible = [n for n in capable if n.name in required_nodes]
        if not eligible:
            return RoutingDecision(
                None,
                f"no eligible node is in affinity.nodeNames [{', '.join(sorted(required_nodes))}]"
                f" (eligible: {_names(capable)})",
            )
    placeable = [n for n in eligible if n.schedulable]
    if not placeable:
        return RoutingDecision(
            None,
            f"every eligible node is cordoned or draining ({_names(eligible)}); "
            "uncordon one or add a node",
        )
    eligible = placeable
    names = tuple(n.name for n in eligible)
    preferred = affinity.prefer_node_names if affinity else []
    for name in preferred:
        if name in names:
            return RoutingDecision(name, f"preferred node {name} (affinity.preferNodeNames)", names)
    best = min(eligible, key=lambda n: (n.active_jobs, n.name))
    return RoutingDecision(
        best.name,
        f"least busy eligible node {best.name} ({best.active_jobs} active jobs, {len(names)} eligible)",
        names,
    )


def _capability_reason(needed: AbstractSet[str], nodes: Sequence[WorkerView], where: str) -> str:
    nowhere = {c for c in needed if not any(c in n.capabilities for n in nodes)}
    if len(nowhere) == 1:
        return f"no Ready node{where} has capability {_quoted(nowhere)} (nodes: {_names(nodes)})"
    if nowhere:
        return f"no Ready node{where} has capabilities {_quoted(nowhere)} (nodes: {_names(nodes)})"
    detail = ", ".join(f"{n.name} [missing {_quoted(needed - n.capabilities)}]" for n in nodes)
    return f"no Ready node{where} has all of {_quoted(needed)} (nodes: {detail})"


def _route_to_host(
    host: str,
    vm: str,
    workers: Sequence[WorkerView],
    capable: Sequence[WorkerView],
    needed: AbstractSet[str],
    pool: str | None,
    required_nodes: set[str] | None,
) -> RoutingDecision:
    node = next((n for n in workers if n.name == host), None)
    prefix = f"VM {vm} runs on node {host}"
    if node is None:
        return RoutingDecision(None, f"{prefix}, which is not a registered worker node")
    if not node.ready:
        return RoutingDecision(None, f"{prefix}, which is not Ready")
    if pool and node.pool != pool:
        return RoutingDecision(None, f"{prefix}, which is not in worker pool '{pool}'")
    if node not in capable:
        missing = needed - node.capabilities
        noun = "capability" if len(missing) == 1 else "capabilities"
        return RoutingDecision(None, f"{prefix}, which lacks {noun} {_quoted(missing)}")
    if required_nodes is not None and host not in required_nodes:
        return RoutingDecision(
            None,
            f"{prefix}, which is not in affinity.nodeNames [{', '.join(sorted(required_nodes))}]",
        )
    return RoutingDecision(host, f"node {host} hosts VM {vm}", (host,))


# --------------------------------------------------------------------------- idempotency


def request_fingerprint(job: JobDocument) -> str:
    """Hash of what the job *does* (operation, payload, target), for idempotency checks."""
    target = job.routing.target_vm
    material = {
        "operation": job.operation,
        "payload": job.payload.model_dump(mode="json", by_alias=True, exclude_none=True),
        "targetVm": None if target is None else [target.namespace, target.name],
    }
    encoded = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()


class Resolution(StrEnum):
    """Outcome of an idempotency lookup."""

    EXECUTE = "Execute"  # first job with this key (or no key): run it
    DUPLICATE = "Duplicate"  # same request seen before: mirror that job, do not run
    CONFLICT = "Conflict"  # key reused for a different request: reject


@dataclass(frozen=True)
class IdempotencyRecord:
    """The job owning a key and, once known, its outcome."""

    key: str
    scope: str
    job_id: str
    fingerprint: str
    phase: JobPhase = JobPhase.PENDING
    result: Mapping[str, Any] | None = None
    last_error: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the owner reached a terminal phase."""
        return self.phase in TERMINAL_PHASES


@dataclass(frozen=True)
class IdempotencyResolution:
    """What to do with a job given its idempotency key."""

    kind: Resolution
    message: str
    record: IdempotencyRecord | None = None

    @property
    def should_execute(self) -> bool:
        """Only ``EXECUTE`` jobs may run; the others never do."""
        return self.kind is Resolution.EXECUTE


class IdempotencyIndex:
    """In-memory map ``(scope, idempotencyKey) -> owning job and outcome``.

    ``scope`` is typically the namespace. The controller rebuilds it from the
    VmJob list on start (:meth:`rebuild`) and keeps it current with :meth:`claim`
    and :meth:`record`. A key is owned by the first job that claimed it; later
    jobs with the same request resolve to the owner's outcome, whatever it was.
    """

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], IdempotencyRecord] = {}

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str, scope: str = "") -> IdempotencyRecord | None:
        """The record for ``key`` in ``scope``, if any."""
        return self._records.get((scope, key))

    def resolve(self, job: JobDocument, scope: str = "") -> IdempotencyResolution:
        """Classify ``job`` without changing the index."""
        key = job.execution.idempotency_key
        if key is None:
            return IdempotencyResolution(Resolution.EXECUTE, "no idempotency key")
        job_id = _require_job_id(job)
        record = self._records.get((scope, key))
        if record is None:
            return IdempotencyResolution(Resolution.EXECUTE, f"first job with key '{key}'")
        if record.job_id == job_id:
            return IdempotencyResolution(Resolution.EXECUTE, f"job owns key '{key}'", record=record)
        if record.fingerprint != request_fingerprint(job):
            return IdempotencyResolution(
                Resolution.CONFLICT,
                f"idempotency key '{key}' was already used by job {record.job_id} for a "
                "different request (operation, payload or target differ); use a new key",
                record=record,
            )
        state = "finished as " + record.phase if record.finished else "still in progress"
        return IdempotencyResolution(
            Resolution.DUPLICATE,
            f"duplicate of job {record.job_id} (key '{key}', {state})",
            record=record,
        )

    def claim(self, job: JobDocument, scope: str = "") -> IdempotencyResolution:
        """Resolve ``job`` and, if it is the first with its key, make it the owner."""
        resolution = self.resolve(job, scope)
        key = job.execution.idempotency_key
        if resolution.should_execute and key is not None and resolution.record is None:
            record = IdempotencyRecord(
                key=key, scope=scope, job_id=_require_job_id(job), fingerprint=request_fingerprint(job)
            )
            self._records[(scope, key)] = record
            return IdempotencyResolution(resolution.kind, resolution.message, record=record)
        return resolution

    def record(self, job: JobDocument, status: JobStatus, scope: str = "") -> None:
        """Store the owner's latest phase/result; ignored for non-owners."""
        key = job.execution.idempotency_key
        if key is None:
            return
        current = self._records.get((scope, key))
        if current is None or current.job_id != job.job_id:
            return
        self._records[(scope, key)] = IdempotencyRecord(
            key=key,
            scope=scope,
            job_id=current.job_id,
            fingerprint=current.fingerprint,
            phase=status.phase,
            result=None if status.result is None else dict(status.result),
            last_error=status.last_error,
        )

    def forget(self, key: str, scope: str = "") -> None:
        """Drop a key (e.g. its owner VmJob was garbage-collected)."""
        self._records.pop((scope, key), None)

    @classmethod
    def rebuild(
        cls,
        items: Iterable[StoredJob | tuple[JobDocument, JobStatus | None]],
        *,
        scope: Callable[[JobDocument], str] | None = None,
    ) -> IdempotencyIndex:
        """Recreate the index from stored jobs; the owner of a key is the first by
        :meth:`StoredJob.owner_key`. Duplicates and jobs refused (conflict, reused jobId)
        never owned their key. ``scope`` applies to plain ``(job, status)`` pairs."""
        index = cls()
        stored = [
            item if isinstance(item, StoredJob)
            else StoredJob(item[0], item[1], scope(item[0]) if scope else "")
            for item in items
        ]
        owners = [
            s for s in stored
            if s.job.execution.idempotency_key is not None
            and s.job.job_id is not None
            and (s.status is None or (s.status.duplicate_of is None
                                      and s.status.reason not in _NEVER_OWNED))
        ]
        owners.sort(key=StoredJob.owner_key)
        for s in owners:
            if index.claim(s.job, s.scope).record is not None and s.status is not None:
                index.record(s.job, s.status, s.scope)
        return index


_NEVER_OWNED = frozenset({Reason.IDEMPOTENCY_CONFLICT, Reason.DUPLICATE_JOB_ID})


@dataclass(frozen=True)
class StoredJob:
    """A job as stored: document, status and the server's metadata about the object."""

    job: JobDocument
    status: JobStatus | None = None
    scope: str = ""  # the namespace
    name: str = ""  # "namespace/name"
    created_at: datetime | None = None  # metadata.creationTimestamp

    @property
    def started(self) -> bool:
        """Routed or run at least once: it may already have had effects."""
        st = self.status
        return st is not None and (st.phase is not JobPhase.PENDING or st.attempts > 0)

    def owner_key(self) -> tuple[Any, ...]:
        """Order among jobs claiming the same thing (an idempotency key, a jobId).

        A job that already started keeps its claim over one that has not; then the
        earliest created wins. Server time, not ``audit.submittedAt``: the submitter
        writes that field, may omit it, or may backdate it to take over a key.
        """
        when = self.created_at
        return (not self.started, when is None, when or _NO_TIME, self.name, self.job.job_id or "")


def _require_job_id(job: JobDocument) -> str:
    if job.job_id is None:
        raise ValueError("job has no jobId; stamp it with protocol.submit() first")
    return job.job_id


def apply_resolution(status: JobStatus, resolution: IdempotencyResolution, now: datetime) -> JobStatus:
    """Status for a job that must not execute (duplicate or conflict).

    A duplicate of a finished job takes the owner's phase, result and error without
    running (a resolution, not an execution, hence no transition check); a duplicate
    of an unfinished job stays Pending until the owner finishes. ``EXECUTE`` leaves
    ``status`` unchanged.
    """
    _require_aware(now)
    record = resolution.record
    if resolution.kind is Resolution.EXECUTE or record is None:
        return status
    if resolution.kind is Resolution.CONFLICT:
        return advance(
            status,
            JobPhase.FAILED,
            now=now,
            reason=Reason.IDEMPOTENCY_CONFLICT,
            message=resolution.message,
            error=resolution.message,
        )
    new = status.model_copy(deep=True)
    new.duplicate_of = record.job_id
    if not record.finished:
        new.reason = Reason.WAITING_FOR_DUPLICATE
        return new
    new.phase = record.phase
    new.reason = Reason.DUPLICATE
    new.result = None if record.result is None else dict(record.result)
    new.last_error = record.last_error
    new.completed_at = now
    new.conditions = _sync_conditions(new.conditions, record.phase, now, Reason.DUPLICATE, resolution.message)
    new.history = [
        *new.history,
        HistoryEntry(phase=record.phase, at=now, message=resolution.message),
    ][-HISTORY_LIMIT:]
    return new
