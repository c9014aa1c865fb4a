"""What failures and time do to a job: retries with backoff, hand-back, timeouts, deadlines.

Each function takes the job, its :class:`.status.JobStatus` and ``now`` (timezone-aware)
and returns the next status, or answers when it will change; randomness comes from an
explicit RNG (by default one seeded from the job), so the controller's decisions are
reproducible in tests and the same code runs in the controller and the node agent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from .envelope import MAX_BACKOFF_SECONDS, Backoff, Execution, JobDocument
from .status import IllegalTransitionError, JobPhase, JobStatus, Reason, advance, require_aware

__all__ = [
    "JobError",
    "RandomSource",
    "check_deadline",
    "check_timeout",
    "deadline_passed",
    "decide_after_failure",
    "hand_back",
    "next_backoff",
    "next_check_at",
    "ready_to_start",
    "timeout_at",
]

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
    require_aware(now)
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
    require_aware(now)
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
    require_aware(now)
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
    require_aware(now)
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
