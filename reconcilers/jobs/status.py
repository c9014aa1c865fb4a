"""A VmJob's status and the phase state machine that moves it.

:class:`JobStatus` is exactly ``VmJob.status``; :func:`advance` is the one way a
phase changes, with the bookkeeping each phase implies (attempts, timestamps,
conditions, history). Status objects are treated as immutable values: every
function of the engine (:mod:`.retries`, :mod:`.idempotency`) returns a new
:class:`JobStatus`, or the same instance when nothing changed, which the caller
patches onto ``VmJob.status``. Nothing here reads a clock: ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, Field

from ..conventions import CONDITION_COMPLETE, CONDITION_FAILED
from ..models.common import Condition, OpenCamelModel, set_condition

__all__ = [
    "HISTORY_LIMIT",
    "PHASE_TRANSITIONS",
    "TERMINAL_PHASES",
    "HistoryEntry",
    "IllegalTransitionError",
    "JobPhase",
    "JobStatus",
    "Progress",
    "Reason",
    "advance",
    "can_transition",
    "finished_event",
    "require_aware",
    "sync_conditions",
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
    cond = next((c for c in status.conditions if c.type in (CONDITION_COMPLETE, CONDITION_FAILED)
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


def require_aware(now: datetime) -> None:
    """Refuse a naive ``now``: comparing it with the aware times in a status would raise later."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")


_FAILED_PHASES = frozenset({JobPhase.FAILED, JobPhase.CANCELLED, JobPhase.TIMED_OUT})


def sync_conditions(
    conditions: Sequence[Condition], phase: JobPhase, now: datetime, reason: str, message: str
) -> list[Condition]:
    """Running / Complete / Failed mirror the phase, for ``kubectl wait --for=condition=``."""
    result = list(conditions)
    for type_, on in (("Running", phase is JobPhase.RUNNING),
                      (CONDITION_COMPLETE, phase is JobPhase.SUCCEEDED),
                      (CONDITION_FAILED, phase in _FAILED_PHASES)):
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
    require_aware(now)
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
    new.conditions = sync_conditions(new.conditions, to, now, new.reason, text)
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
