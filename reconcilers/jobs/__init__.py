"""VmJobs. The protocol: ``envelope``, ``registry`` and ``payloads`` (typed, versioned),
``parse`` (validation), ``builder``. The pure engine: ``status`` (the state machine),
``retries`` (backoff, timeouts, deadlines), ``routing`` (queue order, node choice), ``idempotency``.
Then ``dispatch`` (the controller's side), ``handlers`` and ``runner`` (the agent's)."""

from .builder import JobBuilder, submit, to_manifest
from .envelope import PROTOCOL_VERSION, JobDocument
from .idempotency import IdempotencyIndex
from .parse import JobValidationError, from_manifest, parse_job
from .payloads import PayloadData
from .registry import REGISTRY, register_payload
from .retries import JobError, decide_after_failure, next_backoff
from .routing import RoutingDecision, WorkerView, effective_capabilities, order_queue, route
from .status import IllegalTransitionError, JobPhase, JobStatus, transition

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
