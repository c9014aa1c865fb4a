"""The VmJob envelope: the models of a job document, exactly ``VmJob.spec``.

Structural and per-field rules live here, on the pydantic models: they map onto the
CRD's structural schema and name the field at fault. Rules across fields and the
typed ``payload.data`` need the payload registry, and live in :mod:`.parse`;
``JobDocument.model_validate`` runs them too (with a flatter error than
:func:`.parse.parse_job`). Pure: no Kubernetes client and no clock, so the CRD
generator, the controller and the node agent share one definition of a valid job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..conventions import GROUP, VERSION, VM_JOB
from ..models.common import OpenCamelModel
from .payloads import DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, PayloadData, quote
from .registry import OPERATION_PATTERN, OPERATION_RE, REGISTRY, PayloadRegistry

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "CAPABILITY_PATTERN",
    "KIND",
    "MAX_BACKOFF_SECONDS",
    "PROTOCOL_VERSION",
    "SPAN_ID_PATTERN",
    "SUPPORTED_MAJOR",
    "TRACE_ID_PATTERN",
    "ULID_PATTERN",
    "VERSION_PATTERN",
    "Audit",
    "Backoff",
    "Constraints",
    "Execution",
    "JobDocument",
    "NodeAffinity",
    "Observability",
    "Payload",
    "Routing",
    "TargetVm",
    "parse_version",
]

PROTOCOL_VERSION = "1.0"
SUPPORTED_MAJOR = 1
API_GROUP = GROUP
API_VERSION = f"{API_GROUP}/{VERSION}"
KIND = VM_JOB.kind

# RE2-compatible so they can be copied into CRD ``pattern`` fields.
VERSION_PATTERN = r"^([0-9]+)\.([0-9]+)$"
# Crockford base32 without I, L, O, U; first char <= 7 keeps the value within 128 bits.
ULID_PATTERN = r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$"
TRACE_ID_PATTERN = r"^[0-9a-f]{32}$"
SPAN_ID_PATTERN = r"^[0-9a-f]{16}$"
CAPABILITY_PATTERN = DNS_LABEL_PATTERN

# jobId is accepted in any case (Crockford) and normalised to upper case.
_ULID_ANY_CASE_PATTERN = r"^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"

_VERSION_RE = re.compile(VERSION_PATTERN)
_ULID_RE = re.compile(ULID_PATTERN)
_TRACE_ID_RE = re.compile(TRACE_ID_PATTERN)
_SPAN_ID_RE = re.compile(SPAN_ID_PATTERN)
_DNS_LABEL_RE = re.compile(DNS_LABEL_PATTERN)
_DNS_SUBDOMAIN_RE = re.compile(DNS_SUBDOMAIN_PATTERN)


def _schema_pattern(pattern: str) -> dict[str, Any]:
    """Publish a pattern in the JSON schema (hence the CRD) without a pydantic check.

    The validators below give friendlier messages than pydantic's pattern error;
    the schema copy lets the API server reject bad ``kubectl apply`` input early.
    """
    return {"pattern": pattern}


# ``model_validate`` context keys: the registry for the semantic rules, and "skip them"
# (parse_job runs them itself, to report them together with the structural errors).
MODEL_CONTEXT_REGISTRY = "hyperfleet.registry"
MODEL_CONTEXT_DEFER = "hyperfleet.defer-semantic"


def parse_version(version: str) -> tuple[int, int]:
    """``"1.2"`` -> ``(1, 2)``; raises ``ValueError`` for other shapes."""
    match = _VERSION_RE.match(version)
    if match is None:
        raise ValueError(f"{version!r} is not a MAJOR.MINOR version")
    return int(match.group(1)), int(match.group(2))


def _custom(kind: str, message: str) -> PydanticCustomError:
    # No context dict: the message is pre-rendered and must not be re-formatted,
    # since user input may contain braces.
    return PydanticCustomError(kind, message)


# --------------------------------------------------------------------------- field types


def _check_capability(value: str) -> str:
    if not _DNS_LABEL_RE.match(value) or len(value) > 63:
        raise _custom(
            "capability",
            f"{quote(value)} is not a capability name; use lowercase letters, digits and "
            'hyphens, e.g. "hot-resize"',
        )
    return value


def _check_node_name(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN_RE.match(value):
        raise _custom(
            "node_name",
            f"{quote(value)} is not a valid node name; use the lowercase name shown by `kubectl get nodes`",
        )
    return value


Capability = Annotated[
    str,
    AfterValidator(_check_capability),
    Field(json_schema_extra=_schema_pattern(CAPABILITY_PATTERN)),
]
NodeName = Annotated[
    str,
    AfterValidator(_check_node_name),
    Field(json_schema_extra=_schema_pattern(DNS_SUBDOMAIN_PATTERN)),
]


def _no_duplicates(values: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise _custom("duplicate", f"duplicate {what} {quote(value)}; list each {what} once")
        seen.add(value)
    return values


def _reject_non_string(value: object) -> object:
    # pydantic would say "Input should be a valid string"; numbers here almost
    # always come from unquoted YAML, so say that.
    if value is not None and not isinstance(value, str):
        raise _custom(
            "yaml_string",
            f"must be a string, got {type(value).__name__} {quote(value)}; quote it in YAML",
        )
    return value



# --------------------------------------------------------------------------- envelope models


# pydantic renders ``gt=0`` as JSON-Schema-2020 ``exclusiveMinimum: 0``; CRDs use
# OpenAPI v3.0, where exclusiveMinimum is a boolean beside ``minimum``.
_OPENAPI_V3_POSITIVE: dict[str, Any] = {"minimum": 0, "exclusiveMinimum": True}


MAX_BACKOFF_SECONDS = 86400
"""Longest retry delay (one day): longer waits belong to a deadline, and an unbounded
value overflows the retry time (``now + delay``)."""


class Backoff(OpenCamelModel):
    """Retry delay policy: ``initialSeconds * multiplier**(attempt-1)``, capped, jittered."""

    initial_seconds: float = Field(
        default=1.0,
        gt=0,
        le=MAX_BACKOFF_SECONDS,
        description="Delay before the 1st retry.",
        json_schema_extra=_OPENAPI_V3_POSITIVE,
    )
    max_seconds: float = Field(
        default=60.0,
        gt=0,
        le=MAX_BACKOFF_SECONDS,
        description="Upper bound for any delay.",
        json_schema_extra=_OPENAPI_V3_POSITIVE,
    )
    multiplier: float = Field(default=2.0, ge=1, description="Growth factor per attempt.")
    jitter: bool = Field(default=True, description="Randomise delays (equal jitter).")


class Execution(OpenCamelModel):
    """How the job is executed: retries, timeout, priority, deadline, de-duplication."""

    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="Jobs sharing a key (per namespace) execute at most once.",
    )
    max_attempts: int = Field(default=3, ge=1, le=100, description="Attempts incl. the first.")
    backoff: Backoff = Field(default_factory=Backoff)
    timeout_seconds: int = Field(default=300, ge=1, description="Per-attempt run time limit.")
    priority: int = Field(default=5, ge=0, le=10, description="0-10, higher runs first.")
    deadline: AwareDatetime | None = Field(
        default=None, description="RFC3339; a job is never started after this instant."
    )


class Constraints(OpenCamelModel):
    """Requirements a worker node must meet, on top of what the payload type implies."""

    required_capabilities: list[Capability] = Field(default_factory=list)

    @field_validator("required_capabilities")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return _no_duplicates(value, "capability")


class TargetVm(OpenCamelModel):
    """The VirtualMachine the job acts on; ``namespace`` defaults to the VmJob's."""

    name: str = Field(
        description="VirtualMachine name.",
        json_schema_extra=_schema_pattern(DNS_SUBDOMAIN_PATTERN),
    )
    namespace: str | None = Field(
        default=None,
        description="VirtualMachine namespace.",
        json_schema_extra=_schema_pattern(DNS_LABEL_PATTERN),
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if len(value) > 253 or not _DNS_SUBDOMAIN_RE.match(value):
            raise _custom(
                "vm_name",
                f'{quote(value)} is not a valid VM name; use a lowercase DNS name like "web-1"',
            )
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 63 or not _DNS_LABEL_RE.match(value)):
            raise _custom(
                "namespace",
                f'{quote(value)} is not a valid namespace; use a lowercase DNS label like "default"',
            )
        return value


# Which nodes may run a job; not models.vm.VmAffinity, which says which VMs share a node.
class NodeAffinity(OpenCamelModel):
    """Node placement: ``nodeNames`` is a hard filter, ``preferNodeNames`` an ordered wish."""

    node_names: list[NodeName] = Field(default_factory=list)
    prefer_node_names: list[NodeName] = Field(default_factory=list)


class Routing(OpenCamelModel):
    """Where the job may run."""

    worker_pool: str | None = Field(
        default=None,
        description="Only nodes of this pool.",
        json_schema_extra=_schema_pattern(DNS_LABEL_PATTERN),
    )
    target_vm: TargetVm | None = None
    affinity: NodeAffinity | None = None

    @field_validator("worker_pool")
    @classmethod
    def _pool(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 63 or not _DNS_LABEL_RE.match(value)):
            raise _custom(
                "worker_pool",
                f'{quote(value)} is not a pool name; use a lowercase DNS label like "general"',
            )
        return value


class Observability(OpenCamelModel):
    """W3C trace-context identifiers so job execution joins the submitter's trace."""

    trace_id: str | None = Field(
        default=None,
        description="32 lowercase hex characters.",
        json_schema_extra=_schema_pattern(TRACE_ID_PATTERN),
    )
    span_id: str | None = Field(
        default=None,
        description="16 lowercase hex characters.",
        json_schema_extra=_schema_pattern(SPAN_ID_PATTERN),
    )
    correlation_id: str | None = None

    @field_validator("trace_id")
    @classmethod
    def _trace(cls, value: str | None) -> str | None:
        if value is not None and (not _TRACE_ID_RE.match(value) or set(value) == {"0"}):
            raise _custom(
                "trace_id",
                f"{quote(value)} is not a W3C trace id; use 32 lowercase hex characters, not "
                "all zero, or omit it to have one generated",
            )
        return value

    @field_validator("span_id")
    @classmethod
    def _span(cls, value: str | None) -> str | None:
        if value is not None and (not _SPAN_ID_RE.match(value) or set(value) == {"0"}):
            raise _custom(
                "span_id",
                f"{quote(value)} is not a W3C span id; use 16 lowercase hex characters, not "
                "all zero, or omit it to have one generated",
            )
        return value


class Audit(OpenCamelModel):
    """Who asked for the job and why; informational, also used as queue tie-breaker."""

    submitted_by: str | None = None
    reason: str | None = None
    submitted_at: AwareDatetime | None = None


class Payload(OpenCamelModel):
    """``{type: "<operation>.v<N>", data: {...}}``; ``data`` is checked against ``type``."""

    type: str = Field(description='Payload type, "<operation>.v<N>".')
    data: dict[str, Any] = Field(
        default_factory=dict, description="Operation parameters; schema depends on type."
    )


class JobDocument(OpenCamelModel):
    """The VmJob envelope (``VmJob.spec``), protocol version 1.x."""

    version: Annotated[str, BeforeValidator(_reject_non_string)] = Field(
        description='Protocol version "MAJOR.MINOR".',
        json_schema_extra=_schema_pattern(VERSION_PATTERN),
    )
    job_id: Annotated[str | None, BeforeValidator(_reject_non_string)] = Field(
        default=None,
        description="ULID; generated on submit when omitted.",
        json_schema_extra=_schema_pattern(_ULID_ANY_CASE_PATTERN),
    )
    operation: Annotated[str, BeforeValidator(_reject_non_string)] = Field(
        description='Namespaced operation, e.g. "vm.snapshot".',
        json_schema_extra=_schema_pattern(OPERATION_PATTERN),
    )
    payload: Payload
    execution: Execution = Field(default_factory=Execution)
    constraints: Constraints = Field(default_factory=Constraints)
    routing: Routing = Field(default_factory=Routing)
    observability: Observability = Field(default_factory=Observability)
    audit: Audit = Field(default_factory=Audit)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        match = _VERSION_RE.match(value)
        if match is None:
            raise _custom(
                "version_format",
                f'{quote(value)} is not a protocol version; use "MAJOR.MINOR", e.g. "{PROTOCOL_VERSION}"',
            )
        if int(match.group(1)) != SUPPORTED_MAJOR:
            raise _custom(
                "version_unsupported",
                f"unsupported protocol version {quote(value)}; supported: {SUPPORTED_MAJOR}.x "
                f'(set version: "{PROTOCOL_VERSION}")',
            )
        return value

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        normalized = value.upper()  # Crockford base32 is case-insensitive
        if not _ULID_RE.match(normalized):
            raise _custom(
                "job_id",
                f"{quote(value)} is not a ULID (26 Crockford base32 characters, got "
                f"{len(value)}); omit jobId to have one generated",
            )
        return normalized

    @field_validator("operation")
    @classmethod
    def _operation(cls, value: str) -> str:
        if OPERATION_RE.match(value):
            return value
        if "." not in value:
            name = value if _DNS_LABEL_RE.match(value) else "snapshot"
            raise _custom(
                "operation_namespace",
                f'{quote(value)} is not namespaced; use "<namespace>.<name>", e.g. "vm.{name}"',
            )
        raise _custom(
            "operation_format",
            f"{quote(value)} is not a valid operation; use lowercase dot-separated segments "
            'of letters, digits and hyphens, e.g. "system.health-check"',
        )

    @model_validator(mode="after")
    def _semantics(self, info: ValidationInfo) -> JobDocument:
        context = info.context if isinstance(info.context, Mapping) else {}
        if context.get(MODEL_CONTEXT_DEFER):
            return self
        # Imported here, not at the top: the semantic rules need every envelope model,
        # so parse.py imports this module.
        from .parse import JobValidationError, finalize

        registry = context.get(MODEL_CONTEXT_REGISTRY) or REGISTRY
        errors = finalize(self, registry)
        if errors:
            raise _custom("job_semantics", str(JobValidationError(errors)))
        return self

    def to_spec(self) -> dict[str, Any]:
        """The wire form (camelCase, JSON types, ``None`` omitted) for ``VmJob.spec``."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def typed_payload(self, registry: PayloadRegistry | None = None) -> PayloadData:
        """``payload.data`` as the typed model registered for ``payload.type``."""
        from .parse import JobValidationError, payload_errors  # a cycle at the top (see above)

        reg = registry or REGISTRY
        errors, typed = payload_errors(self.operation, self.payload.type, self.payload.data, reg)
        if errors or typed is None:
            raise JobValidationError(errors)
        return typed
