"""Making job documents: the fluent :class:`JobBuilder`, id stamping, manifests.

:func:`submit` fills what a document may leave out (``jobId``, trace ids,
``submittedAt``); :func:`to_manifest` wraps a document in a ``VmJob`` object.
Time and randomness come in as arguments, so a test can pin every id.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from ulid import ULID

from ..conventions import JOB_ID_LABEL, JOB_OPERATION_LABEL
from .envelope import API_VERSION, KIND, PROTOCOL_VERSION, JobDocument
from .parse import JobValidationError, parse_job
from .registry import REGISTRY, PayloadRegistry

__all__ = [
    "JobBuilder",
    "new_job_id",
    "submit",
    "to_manifest",
]


def new_job_id(now: datetime, rng: random.Random | None = None) -> str:
    """A ULID timestamped ``now``; ``rng`` makes the random part reproducible (tests)."""
    if rng is None:
        return str(ULID.from_datetime(now))
    millis = int(now.timestamp() * 1000)
    return str(ULID.from_bytes(millis.to_bytes(6, "big") + rng.getrandbits(80).to_bytes(10, "big")))


def _hex_id(bits: int, rng: random.Random | None) -> str:
    while True:
        value = secrets.randbits(bits) if rng is None else rng.getrandbits(bits)
        if value:  # all-zero ids are invalid in W3C trace-context
            return f"{value:0{bits // 4}x}"


def submit(job: JobDocument, *, now: datetime, rng: random.Random | None = None) -> JobDocument:
    """Stamp a validated job for admission: fill ``jobId``, trace/span ids, ``submittedAt``.

    Returns a copy; present values are kept, so re-submitting is a no-op.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    stamped = job.model_copy(deep=True)
    if stamped.job_id is None:
        stamped.job_id = new_job_id(now, rng)
    if stamped.observability.trace_id is None:
        stamped.observability.trace_id = _hex_id(128, rng)
    if stamped.observability.span_id is None:
        stamped.observability.span_id = _hex_id(64, rng)
    if stamped.audit.submitted_at is None:
        stamped.audit.submitted_at = now
    return stamped


def to_manifest(job: JobDocument, name: str | None = None, namespace: str = "default") -> dict[str, Any]:
    """A complete ``VmJob`` object for ``kubectl apply``/the API server.

    ``metadata.name`` defaults to the lowercased jobId (a valid DNS name); the
    operation and job id are mirrored as labels so ``kubectl get -l`` can select.
    """
    if name is None:
        if job.job_id is None:
            raise ValueError("job has no jobId; pass name= or stamp it with submit() first")
        name = job.job_id.lower()
    labels: dict[str, str] = {}
    if len(job.operation) <= 63:
        labels[JOB_OPERATION_LABEL] = job.operation
    if job.job_id is not None:
        labels[JOB_ID_LABEL] = job.job_id.lower()
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = labels
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": job.to_spec()}



# --------------------------------------------------------------------------- builder


class JobBuilder:
    """Fluent construction of a valid job; :meth:`build` validates and stamps ids.

    >>> job = (JobBuilder("vm.resize").payload(desired_cpus=4).target("web-1")
    ...        .build(now=datetime(2030, 1, 1, tzinfo=UTC)))
    """

    def __init__(
        self,
        operation: str,
        *,
        payload_type: str | None = None,
        registry: PayloadRegistry | None = None,
    ) -> None:
        self._registry = registry or REGISTRY
        self._operation = operation
        if payload_type is None:
            latest = self._registry.latest(operation)
            payload_type = latest.type_name if latest else f"{operation}.v1"
        self._payload_type = payload_type
        self._data: dict[str, Any] = {}
        self._doc: dict[str, Any] = {"version": PROTOCOL_VERSION}
        self._execution: dict[str, Any] = {}
        self._backoff: dict[str, Any] = {}
        self._capabilities: list[str] = []
        self._routing: dict[str, Any] = {}
        self._observability: dict[str, Any] = {}
        self._audit: dict[str, Any] = {}
        self._labels: dict[str, str] = {}
        self._annotations: dict[str, str] = {}

    def protocol_version(self, version: str) -> JobBuilder:
        """Override the envelope version (defaults to :data:`PROTOCOL_VERSION`)."""
        self._doc["version"] = version
        return self

    def job_id(self, job_id: str) -> JobBuilder:
        """Use a caller-chosen ULID instead of generating one."""
        self._doc["jobId"] = job_id
        return self

    def payload_type(self, type_name: str) -> JobBuilder:
        """Pin a payload version, e.g. ``"vm.resize.v1"`` (default: latest registered)."""
        self._payload_type = type_name
        return self

    def payload(self, **fields: Any) -> JobBuilder:
        """Set typed payload fields (snake_case or camelCase); unknown names are rejected.

        Typos in code are bugs, so unlike documents from the wire this is strict;
        use :meth:`payload_data` to pass fields the local model does not know.
        """
        spec = self._registry.get(self._payload_type)
        if spec is not None:
            known = {
                key for name, info in spec.model.model_fields.items() for key in (name, info.alias or name)
            }
            unknown = sorted(set(fields) - known)
            if unknown:
                aliases = sorted(info.alias or n for n, info in spec.model.model_fields.items())
                raise JobValidationError(
                    [
                        (
                            f"payload.data.{key}",
                            f"unknown field for {spec.type_name}; known fields: {', '.join(aliases)}",
                        )
                        for key in unknown
                    ]
                )
        self._data.update(fields)
        return self

    def payload_data(self, data: Mapping[str, Any]) -> JobBuilder:
        """Merge raw wire-form payload data (no field-name check)."""
        self._data.update(data)
        return self

    def target(self, name: str, namespace: str | None = None) -> JobBuilder:
        """The VM the job acts on."""
        target: dict[str, Any] = {"name": name}
        if namespace is not None:
            target["namespace"] = namespace
        self._routing["targetVm"] = target
        return self

    def worker_pool(self, pool: str) -> JobBuilder:
        """Restrict execution to nodes of ``pool``."""
        self._routing["workerPool"] = pool
        return self

    def affinity(self, node_names: Iterable[str] = (), *, prefer: Iterable[str] = ()) -> JobBuilder:
        """Hard node allow-list and ordered soft preference."""
        self._routing["affinity"] = {
            "nodeNames": list(node_names),
            "preferNodeNames": list(prefer),
        }
        return self

    def priority(self, priority: int) -> JobBuilder:
        """0-10, higher runs first."""
        self._execution["priority"] = priority
        return self

    def idempotency_key(self, key: str) -> JobBuilder:
        """De-duplicate: a second job with this key resolves to the first one's outcome."""
        self._execution["idempotencyKey"] = key
        return self

    def timeout(self, seconds: int) -> JobBuilder:
        """Per-attempt run time limit."""
        self._execution["timeoutSeconds"] = seconds
        return self

    def max_attempts(self, attempts: int) -> JobBuilder:
        """Total attempts including the first."""
        self._execution["maxAttempts"] = attempts
        return self

    def backoff(
        self,
        *,
        initial: float | None = None,
        maximum: float | None = None,
        multiplier: float | None = None,
        jitter: bool | None = None,
    ) -> JobBuilder:
        """Retry delay policy; unspecified values keep their defaults."""
        for key, value in (
            ("initialSeconds", initial),
            ("maxSeconds", maximum),
            ("multiplier", multiplier),
            ("jitter", jitter),
        ):
            if value is not None:
                self._backoff[key] = value
        return self

    def deadline(self, when: datetime) -> JobBuilder:
        """Never start the job after ``when``."""
        self._execution["deadline"] = when
        return self

    def require(self, *capabilities: str) -> JobBuilder:
        """Extra node capabilities beyond those the payload type implies."""
        for capability in capabilities:
            if capability not in self._capabilities:
                self._capabilities.append(capability)
        return self

    def trace(
        self,
        trace_id: str | None = None,
        span_id: str | None = None,
        correlation_id: str | None = None,
    ) -> JobBuilder:
        """Join an existing trace; missing ids are generated at build time."""
        for key, value in (
            ("traceId", trace_id),
            ("spanId", span_id),
            ("correlationId", correlation_id),
        ):
            if value is not None:
                self._observability[key] = value
        return self

    def submitted_by(self, who: str, reason: str | None = None) -> JobBuilder:
        """Audit trail: requester and why."""
        self._audit["submittedBy"] = who
        if reason is not None:
            self._audit["reason"] = reason
        return self

    def label(self, key: str, value: str) -> JobBuilder:
        """Add a job label."""
        self._labels[key] = value
        return self

    def annotate(self, key: str, value: str) -> JobBuilder:
        """Add a job annotation."""
        self._annotations[key] = value
        return self

    def to_mapping(self) -> dict[str, Any]:
        """The wire-form document assembled so far (unvalidated, unstamped)."""
        doc: dict[str, Any] = dict(self._doc)
        doc["operation"] = self._operation
        doc["payload"] = {"type": self._payload_type, "data": dict(self._data)}
        execution = dict(self._execution)
        if self._backoff:
            execution["backoff"] = dict(self._backoff)
        constraints: dict[str, Any] = {}
        if self._capabilities:
            constraints["requiredCapabilities"] = list(self._capabilities)
        for key, value in (
            ("execution", execution),
            ("constraints", constraints),
            ("routing", dict(self._routing)),
            ("observability", dict(self._observability)),
            ("audit", dict(self._audit)),
            ("labels", dict(self._labels)),
            ("annotations", dict(self._annotations)),
        ):
            if value:
                doc[key] = value
        return doc

    def build(self, *, now: datetime | None = None, rng: random.Random | None = None) -> JobDocument:
        """Validate and stamp (jobId, traceId/spanId, submittedAt = ``now``).

        Raises :class:`JobValidationError` exactly like :func:`parse_job`.
        """
        moment = now or datetime.now(UTC)
        doc = self.to_mapping()
        # Stamp submittedAt before validating so a deadline already in the past is caught.
        doc.setdefault("audit", {}).setdefault("submittedAt", moment)
        return submit(parse_job(doc, self._registry), now=moment, rng=rng)
