"""VmJob job protocol: the versioned envelope, payload registry, validation and builder.

The envelope (:class:`JobDocument`) is exactly the ``spec`` of a ``VmJob`` custom
resource. Everything here is pure: no Kubernetes client, no clock unless one is
passed in, so the CRD generator, the controller (admission + scheduling) and the
node agent (execution) can share one definition of "a valid job".

Validation is split in two layers on purpose:

* structural/field rules live on the pydantic models (they map onto a CRD
  structural schema and give precise field paths);
* cross-field rules (payload type vs. operation, typed payload data, backoff
  bounds, target VM presence, ...) live in :func:`semantic_errors`, because a
  structural schema cannot express them and pydantic would lose the field path.

:func:`parse_job` runs both and reports *all* problems as ``(field_path, message)``
pairs; ``JobDocument.model_validate`` enforces the same rules (with a flatter error).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar, overload

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError
from ulid import ULID

from ..conventions import GROUP, JOB_ID_LABEL, JOB_OPERATION_LABEL, VERSION, VM_JOB
from ..models.common import OpenCamelModel
from .payloads import (
    BUILTIN_PAYLOADS,
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    PayloadData,
    quote,
)

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "CAPABILITY_PATTERN",
    "KIND",
    "MAX_BACKOFF_SECONDS",
    "OPERATION_PATTERN",
    "PROTOCOL_VERSION",
    "REGISTRY",
    "SPAN_ID_PATTERN",
    "SUPPORTED_MAJOR",
    "TRACE_ID_PATTERN",
    "ULID_PATTERN",
    "Audit",
    "Backoff",
    "Constraints",
    "Execution",
    "JobBuilder",
    "JobDocument",
    "JobValidationError",
    "NodeAffinity",
    "Observability",
    "Payload",
    "PayloadRegistry",
    "PayloadSpec",
    "Routing",
    "TargetVm",
    "effective_capabilities",
    "from_manifest",
    "parse_job",
    "parse_version",
    "payload_spec",
    "register_payload",
    "request_fingerprint",
    "semantic_errors",
    "submit",
    "to_manifest",
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
OPERATION_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$"
TRACE_ID_PATTERN = r"^[0-9a-f]{32}$"
SPAN_ID_PATTERN = r"^[0-9a-f]{16}$"
CAPABILITY_PATTERN = DNS_LABEL_PATTERN

# jobId is accepted in any case (Crockford) and normalised to upper case.
_ULID_ANY_CASE_PATTERN = r"^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$"

_VERSION_RE = re.compile(VERSION_PATTERN)
_ULID_RE = re.compile(ULID_PATTERN)
_OPERATION_RE = re.compile(OPERATION_PATTERN)
_PAYLOAD_TYPE_RE = re.compile(r"^(?P<operation>.+)\.v(?P<version>[1-9][0-9]*)$")
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


_MODEL_CONTEXT_REGISTRY = "hyperfleet.registry"
_MODEL_CONTEXT_DEFER = "hyperfleet.defer-semantic"


# --------------------------------------------------------------------------- errors


class JobValidationError(ValueError):
    """A job document broke one or more protocol rules.

    ``errors`` is a list of ``(field_path, message)`` where ``field_path`` uses the
    camelCase wire names (``execution.backoff.maxSeconds``, ``payload.data.command[0]``)
    and ``message`` says what is wrong and how to fix it.
    """

    def __init__(self, errors: Sequence[tuple[str, str]]) -> None:
        self.errors: list[tuple[str, str]] = list(errors)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(f"{path or '(document)'}: {message}" for path, message in self.errors)

    @property
    def paths(self) -> list[str]:
        """Field paths in error, for assertions and UI highlighting."""
        return [path for path, _ in self.errors]


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
        if _OPERATION_RE.match(value):
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
        if context.get(_MODEL_CONTEXT_DEFER):
            return self
        registry = context.get(_MODEL_CONTEXT_REGISTRY) or REGISTRY
        errors = _finalize(self, registry)
        if errors:
            raise _custom("job_semantics", str(JobValidationError(errors)))
        return self

    def to_spec(self) -> dict[str, Any]:
        """The wire form (camelCase, JSON types, ``None`` omitted) for ``VmJob.spec``."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def typed_payload(self, registry: PayloadRegistry | None = None) -> PayloadData:
        """``payload.data`` as the typed model registered for ``payload.type``."""
        reg = registry or REGISTRY
        errors, typed = _payload_errors(self.operation, self.payload.type, self.payload.data, reg)
        if errors or typed is None:
            raise JobValidationError(errors)
        return typed


# --------------------------------------------------------------------------- registry

M = TypeVar("M", bound=PayloadData)


@dataclass(frozen=True)
class PayloadSpec:
    """Everything the system knows about one payload type.

    ``targets_vm``: the job must name ``routing.targetVm`` and runs on its host node.
    ``requires_running_vm``: routing fails while the target VM is not running
    (``False`` lets e.g. a restore run on any eligible node).
    """

    type_name: str
    operation: str
    version: int
    model: type[PayloadData]
    required_capabilities: frozenset[str]
    targets_vm: bool
    requires_running_vm: bool


class PayloadRegistry:
    """Maps payload type names to :class:`PayloadSpec`; plugins add types at import time."""

    def __init__(self, specs: Iterable[PayloadSpec] = ()) -> None:
        self._specs: dict[str, PayloadSpec] = {}
        for spec in specs:
            self._specs[spec.type_name] = spec

    def register(
        self,
        type_name: str,
        model: type[PayloadData],
        *,
        required_capabilities: Iterable[str] = (),
        targets_vm: bool | None = None,
        requires_running_vm: bool | None = None,
        replace: bool = False,
    ) -> PayloadSpec:
        """Register ``model`` for ``type_name`` (``"<operation>.v<N>"``).

        ``targets_vm`` defaults to ``True`` for the ``vm`` namespace;
        ``requires_running_vm`` defaults to ``targets_vm``. Re-registering a type
        raises unless ``replace=True`` so two plugins cannot silently fight.
        """
        match = _PAYLOAD_TYPE_RE.match(type_name)
        if match is None or not _OPERATION_RE.match(match.group("operation")):
            raise ValueError(
                f"payload type {quote(type_name)} must look like '<namespace>.<name>.v<N>', "
                "e.g. 'vm.snapshot.v1'"
            )
        if not (isinstance(model, type) and issubclass(model, PayloadData)):
            raise TypeError(f"payload model for {type_name!r} must subclass PayloadData")
        capabilities = frozenset(required_capabilities)
        for capability in capabilities:
            if not _DNS_LABEL_RE.match(capability):
                raise ValueError(f"capability {capability!r} of {type_name!r} is not a DNS label")
        if type_name in self._specs and not replace:
            raise ValueError(f"payload type {type_name!r} is already registered")
        operation = match.group("operation")
        targets = operation.split(".", 1)[0] == "vm" if targets_vm is None else targets_vm
        spec = PayloadSpec(
            type_name=type_name,
            operation=operation,
            version=int(match.group("version")),
            model=model,
            required_capabilities=capabilities,
            targets_vm=targets,
            requires_running_vm=targets if requires_running_vm is None else requires_running_vm,
        )
        self._specs[type_name] = spec
        return spec

    def unregister(self, type_name: str) -> None:
        """Remove a type (tests, plugin unload)."""
        self._specs.pop(type_name, None)

    def get(self, type_name: str) -> PayloadSpec | None:
        """The spec for ``type_name`` or ``None``."""
        return self._specs.get(type_name)

    def types_for(self, operation: str) -> list[str]:
        """Registered payload types of ``operation``, oldest version first."""
        specs = [s for s in self._specs.values() if s.operation == operation]
        return [s.type_name for s in sorted(specs, key=lambda s: s.version)]

    def latest(self, operation: str) -> PayloadSpec | None:
        """Highest registered version for ``operation`` (what the builder uses)."""
        types = self.types_for(operation)
        return self._specs[types[-1]] if types else None

    def operations(self) -> list[str]:
        """All operations with at least one payload type, sorted."""
        return sorted({s.operation for s in self._specs.values()})

    def copy(self) -> PayloadRegistry:
        """An independent registry with the same types (isolate plugin experiments)."""
        return PayloadRegistry(self._specs.values())

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._specs

    def __iter__(self) -> Iterator[PayloadSpec]:
        return iter(sorted(self._specs.values(), key=lambda s: s.type_name))

    def __len__(self) -> int:
        return len(self._specs)


REGISTRY = PayloadRegistry()
for _builtin in BUILTIN_PAYLOADS:
    REGISTRY.register(
        _builtin.type_name,
        _builtin.model,
        required_capabilities=_builtin.required_capabilities,
        targets_vm=_builtin.targets_vm,
        requires_running_vm=_builtin.requires_running_vm,
    )


@overload
def register_payload(
    type_name: str,
    model: type[M],
    *,
    required_capabilities: Iterable[str] = (),
    targets_vm: bool | None = None,
    requires_running_vm: bool | None = None,
    replace: bool = False,
    registry: PayloadRegistry | None = None,
) -> type[M]: ...


@overload
def register_payload(
    type_name: str,
    model: None = None,
    *,
    required_capabilities: Iterable[str] = (),
    targets_vm: bool | None = None,
    requires_running_vm: bool | None = None,
    replace: bool = False,
    registry: PayloadRegistry | None = None,
) -> Callable[[type[M]], type[M]]: ...


def register_payload(
    type_name: str,
    model: type[M] | None = None,
    *,
    required_capabilities: Iterable[str] = (),
    targets_vm: bool | None = None,
    requires_running_vm: bool | None = None,
    replace: bool = False,
    registry: PayloadRegistry | None = None,
) -> type[M] | Callable[[type[M]], type[M]]:
    """Register a payload model in ``registry`` (default :data:`REGISTRY`).

    Usable directly, ``register_payload("acme.flush.v1", FlushV1)``, or as a class
    decorator, ``@register_payload("acme.flush.v1", required_capabilities={"acme"})``.
    """
    reg = registry or REGISTRY
    caps = tuple(required_capabilities)

    def decorate(cls: type[M]) -> type[M]:
        reg.register(
            type_name,
            cls,
            required_capabilities=caps,
            targets_vm=targets_vm,
            requires_running_vm=requires_running_vm,
            replace=replace,
        )
        return cls

    return decorate if model is None else decorate(model)


def payload_spec(job: JobDocument, registry: PayloadRegistry | None = None) -> PayloadSpec:
    """The registered spec of ``job.payload.type``; raises if it is not registered."""
    spec = (registry or REGISTRY).get(job.payload.type)
    if spec is None:
        errors, _ = _payload_errors(job.operation, job.payload.type, job.payload.data, registry or REGISTRY)
        raise JobValidationError(errors or [("payload.type", "payload type is not registered")])
    return spec


def effective_capabilities(job: JobDocument, registry: PayloadRegistry | None = None) -> frozenset[str]:
    """Capabilities a node needs: implied by the payload type plus ``requiredCapabilities``."""
    spec = payload_spec(job, registry)
    return spec.required_capabilities | frozenset(job.constraints.required_capabilities)


# --------------------------------------------------------------------------- validation


def parse_version(version: str) -> tuple[int, int]:
    """``"1.2"`` -> ``(1, 2)``; raises ``ValueError`` for other shapes."""
    match = _VERSION_RE.match(version)
    if match is None:
        raise ValueError(f"{version!r} is not a MAJOR.MINOR version")
    return int(match.group(1)), int(match.group(2))


_EXAMPLES: dict[str, str] = {
    "version": f'version: "{PROTOCOL_VERSION}"',
    "operation": 'operation: "vm.snapshot"',
    "payload": 'payload: {type: "vm.snapshot.v1", data: {}}',
    "payload.type": 'type: "vm.snapshot.v1"',
    "routing.targetVm.name": 'name: "web-1"',
    "payload.data.source": 'source: "/var/lib/hyperfleet/snapshots/web-1"',
    "payload.data.destinationNode": 'destinationNode: "node-b"',
    "payload.data.command": 'command: ["/bin/sh", "-c", "uptime"]',
}


def _field_aliases(registry: PayloadRegistry) -> dict[str, str]:
    models: list[type[BaseModel]] = [
        JobDocument,
        Payload,
        Execution,
        Backoff,
        Constraints,
        Routing,
        TargetVm,
        NodeAffinity,
        Observability,
        Audit,
    ]
    models.extend(spec.model for spec in registry)
    aliases: dict[str, str] = {}
    for model in models:
        for name, info in model.model_fields.items():
            aliases[name] = info.alias or to_camel(name)
    return aliases


def _join_path(parts: Iterable[str | int]) -> str:
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else part
    return path


def _bound(value: object) -> object:
    """86400, not 86400.0: pydantic reports a float field's bound as a float."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _describe(error: Mapping[str, Any], path: str) -> str:
    """Translate a pydantic error into 'what is wrong; how to fix it'."""
    kind: str = error["type"]
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    got = quote(error.get("input"))
    if kind == "missing":
        example = _EXAMPLES.get(path)
        return "required field is missing; " + (f"add {example}" if example else "add it")
    if kind == "greater_than":
        return f"must be greater than {_bound(ctx['gt'])} (got {got}); use a larger value"
    if kind == "greater_than_equal":
        return f"must be at least {_bound(ctx['ge'])} (got {got}); use a larger value"
    if kind == "less_than":
        return f"must be less than {_bound(ctx['lt'])} (got {got}); use a smaller value"
    if kind == "less_than_equal":
        return f"must be at most {_bound(ctx['le'])} (got {got}); use a smaller value"
    if kind == "string_too_short":
        return "must not be empty; set a value or remove the field"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters; shorten it"
    if kind == "too_short":
        return f"must contain at least {ctx['min_length']} item(s); add one"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number (got {got}); e.g. 3"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number (got {got}); e.g. 1.5"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false (got {got})"
    if kind in ("string_type", "string_unicode"):
        return f"must be a string (got {got}); quote it"
    if kind in ("dict_type", "model_type", "model_attributes_type", "mapping_type"):
        return f"must be a mapping of fields (got {got}); write it as key: value pairs"
    if kind in ("list_type", "tuple_type", "iterable_type"):
        return f"must be a list (got {got}); write it as [a, b] or '- a' lines"
    if kind == "timezone_aware":
        return f"must carry a UTC offset (got {got}); e.g. 2030-01-01T00:00:00Z"
    if kind.startswith("datetime"):
        return f"must be an RFC3339 timestamp (got {got}); e.g. 2030-01-01T00:00:00Z"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected', '')} (got {got})"
    message: str = error["msg"]
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _convert_errors(
    exc: ValidationError, registry: PayloadRegistry, prefix: Sequence[str | int] = ()
) -> list[tuple[str, str]]:
    aliases = _field_aliases(registry)
    result: list[tuple[str, str]] = []
    for error in exc.errors(include_url=False):
        parts: list[str | int] = list(prefix)
        for part in error["loc"]:
            parts.append(aliases.get(part, part) if isinstance(part, str) else part)
        path = _join_path(parts)
        result.append((path, _describe(error, path)))
    return result


def _payload_errors(
    operation: str, type_name: str, data: Mapping[str, Any], registry: PayloadRegistry
) -> tuple[list[tuple[str, str]], PayloadData | None]:
    spec = registry.get(type_name)
    if spec is None:
        if not (type_name.startswith(f"{operation}.v") and _PAYLOAD_TYPE_RE.match(type_name)):
            return [
                (
                    "payload.type",
                    f"payload type {quote(type_name)} does not match operation "
                    f"{quote(operation)}; use {quote(operation + '.v<N>')}"
                    + _known_types_hint(operation, registry),
                )
            ], None
        known = registry.types_for(operation)
        if not known:
            return [
                (
                    "operation",
                    f"unknown operation {quote(operation)}; known operations: "
                    f"{', '.join(registry.operations())} (or register a payload type for it)",
                )
            ], None
        return [
            (
                "payload.type",
                f"unknown payload type {quote(type_name)}; known types for {operation}: {', '.join(known)}",
            )
        ], None
    if spec.operation != operation:
        return [
            (
                "payload.type",
                f"payload type {quote(type_name)} does not match operation {quote(operation)}; "
                f"use {quote(operation + '.v<N>')}" + _known_types_hint(operation, registry),
            )
        ], None
    try:
        return [], spec.model.model_validate(data)
    except ValidationError as exc:
        return _convert_errors(exc, registry, ("payload", "data")), None


def _known_types_hint(operation: str, registry: PayloadRegistry) -> str:
    known = registry.types_for(operation)
    return f" (known: {', '.join(known)})" if known else ""


def semantic_errors(job: JobDocument, registry: PayloadRegistry | None = None) -> list[tuple[str, str]]:
    """Cross-field rules a CRD structural schema cannot express (see module docstring)."""
    reg = registry or REGISTRY
    errors, typed = _payload_errors(job.operation, job.payload.type, job.payload.data, reg)
    errors.extend(_cross_field_errors(job, typed, reg))
    return errors


def _cross_field_errors(
    job: JobDocument, typed: PayloadData | None, registry: PayloadRegistry
) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    backoff = job.execution.backoff
    if backoff.max_seconds < backoff.initial_seconds:
        errors.append(
            (
                "execution.backoff.maxSeconds",
                f"must be >= initialSeconds ({backoff.initial_seconds:g}), got "
                f"{backoff.max_seconds:g}; raise maxSeconds or lower initialSeconds",
            )
        )
    payload_timeout = getattr(typed, "timeout_seconds", None)
    if isinstance(payload_timeout, int) and payload_timeout > job.execution.timeout_seconds:
        errors.append(
            (
                "payload.data.timeoutSeconds",
                f"{payload_timeout}s exceeds execution.timeoutSeconds "
                f"({job.execution.timeout_seconds}s), so the job would time out first; lower it "
                "or raise execution.timeoutSeconds",
            )
        )
    spec = registry.get(job.payload.type)
    if spec is not None and spec.targets_vm and job.routing.target_vm is None:
        errors.append(
            (
                "routing.targetVm",
                f"required for operation {job.operation}; set routing.targetVm.name to the VM to act on",
            )
        )
    deadline, submitted = job.execution.deadline, job.audit.submitted_at
    if deadline is not None and submitted is not None and deadline <= submitted:
        errors.append(
            (
                "execution.deadline",
                f"{deadline.isoformat()} is not after audit.submittedAt "
                f"({submitted.isoformat()}), so the job could never start; move it later",
            )
        )
    return errors


def _finalize(job: JobDocument, registry: PayloadRegistry) -> list[tuple[str, str]]:
    """Run semantic checks and, when clean, normalise ``payload.data`` (defaults, aliases)."""
    errors, typed = _payload_errors(job.operation, job.payload.type, job.payload.data, registry)
    errors.extend(_cross_field_errors(job, typed, registry))
    if not errors and typed is not None:
        job.payload.data = typed.model_dump(mode="json", by_alias=True, exclude_none=True)
    return errors


def _raw_payload_errors(obj: Mapping[str, Any], registry: PayloadRegistry) -> list[tuple[str, str]]:
    """Payload checks on the raw input, so they are reported alongside envelope errors."""
    operation, payload = obj.get("operation"), obj.get("payload")
    if not (isinstance(operation, str) and _OPERATION_RE.match(operation)):
        return []  # the envelope error on ``operation`` already explains it
    if not isinstance(payload, Mapping):
        return []
    type_name, data = payload.get("type"), payload.get("data", {})
    if not isinstance(type_name, str) or not isinstance(data, Mapping):
        return []
    errors, _ = _payload_errors(operation, type_name, data, registry)
    return errors


def parse_job(obj: Mapping[str, Any], registry: PayloadRegistry | None = None) -> JobDocument:
    """Validate a VmJob spec mapping and return the typed document.

    Raises :class:`JobValidationError` listing every problem found. On success,
    ``payload.data`` is normalised through its typed model (defaults filled in,
    camelCase keys) while unknown fields are kept.
    """
    reg = registry or REGISTRY
    if not isinstance(obj, Mapping):
        raise JobValidationError([("", f"a VmJob spec must be a mapping, got {type(obj).__name__}")])
    context = {_MODEL_CONTEXT_REGISTRY: reg, _MODEL_CONTEXT_DEFER: True}
    try:
        job = JobDocument.model_validate(obj, context=context)
    except ValidationError as exc:
        errors = _convert_errors(exc, reg)
        errors.extend(_raw_payload_errors(obj, reg))
        raise JobValidationError(errors) from None
    errors = _finalize(job, reg)
    if errors:
        raise JobValidationError(errors)
    return job


# --------------------------------------------------------------------------- ids, submit, manifest


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


def from_manifest(obj: Mapping[str, Any], registry: PayloadRegistry | None = None) -> JobDocument:
    """Parse the ``spec`` of a ``VmJob`` object; error paths are prefixed with ``spec.``."""
    if not isinstance(obj, Mapping):
        # A YAML file may hold any document (a list, a string); say so instead of crashing.
        raise JobValidationError([("", f"a VmJob must be a mapping with apiVersion, kind, "
                                        f"metadata and spec, got a {type(obj).__name__}")])
    errors: list[tuple[str, str]] = []
    if obj.get("apiVersion") != API_VERSION:
        errors.append(("apiVersion", f"must be {quote(API_VERSION)} (got {quote(obj.get('apiVersion'))})"))
    if obj.get("kind") != KIND:
        errors.append(("kind", f"must be {quote(KIND)} (got {quote(obj.get('kind'))})"))
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        errors.append(("spec", "required mapping is missing; add the job document under spec"))
        raise JobValidationError(errors)
    try:
        job = parse_job(spec, registry)
    except JobValidationError as exc:
        errors.extend((f"spec.{path}" if path else "spec", msg) for path, msg in exc.errors)
        raise JobValidationError(errors) from None
    if errors:
        raise JobValidationError(errors)
    return job


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
