"""VmJob protocol: envelope, typed versioned payloads, validation, builder, engine."""

from .builder import JobBuilder, submit, to_manifest
from .engine import (
    IdempotencyIndex,
    IllegalTransitionError,
    JobError,
    JobPhase,
    JobStatus,
    RoutingDecision,
    WorkerView,
    decide_after_failure,
    effective_capabilities,
    next_backoff,
    order_queue,
    route,
    transition,
)
from .envelope import PROTOCOL_VERSION, JobDocument
from .parse import JobValidationError, from_manifest, parse_job
from .payloads import PayloadData
from .registry import REGISTRY, register_payload

__all__ = [
    "PROTOCOL_VERSION",
    "REGISTRY",
    "IdempotencyIndex",
    "IllegalTransitionError",
    "JobBuilder",
    "JobDocument",
    "JobError",
    "JobPhase",
    "JobStatus",
    "JobValidationError",
    "PayloadData",
    "RoutingDecision",
    "WorkerView",
    "decide_after_failure",
    "effective_capabilities",
    "from_manifest",
    "next_backoff",
    "order_queue",
    "parse_job",
    "register_payload",
    "route",
    "submit",
    "to_manifest",
    "transition",
]
