"""Idempotency: jobs sharing an ``idempotencyKey`` execute at most once.

The first job to claim a key owns it; a later job with the same request (same
:func:`request_fingerprint`) mirrors the owner's outcome without running, and one
with a different request under the key fails. :class:`IdempotencyIndex` is the
controller's in-memory view, rebuilt from the stored VmJobs on start.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from .envelope import JobDocument
from .routing import NO_TIME
from .status import (
    HISTORY_LIMIT,
    TERMINAL_PHASES,
    HistoryEntry,
    JobPhase,
    JobStatus,
    Reason,
    advance,
    require_aware,
    sync_conditions,
)

__all__ = [
    "IdempotencyIndex",
    "IdempotencyRecord",
    "IdempotencyResolution",
    "Resolution",
    "StoredJob",
    "apply_resolution",
    "request_fingerprint",
]

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
        return (not self.started, when is None, when or NO_TIME, self.name, self.job.job_id or "")


def _require_job_id(job: JobDocument) -> str:
    if job.job_id is None:
        raise ValueError("job has no jobId; stamp it with builder.submit() first")
    return job.job_id


def apply_resolution(status: JobStatus, resolution: IdempotencyResolution, now: datetime) -> JobStatus:
    """Status for a job that must not execute (duplicate or conflict).

    A duplicate of a finished job takes the owner's phase, result and error without
    running (a resolution, not an execution, hence no transition check); a duplicate
    of an unfinished job stays Pending until the owner finishes. ``EXECUTE`` leaves
    ``status`` unchanged.
    """
    require_aware(now)
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
    new.conditions = sync_conditions(new.conditions, record.phase, now, Reason.DUPLICATE, resolution.message)
    new.history = [
        *new.history,
        HistoryEntry(phase=record.phase, at=now, message=resolution.message),
    ][-HISTORY_LIMIT:]
    return new
