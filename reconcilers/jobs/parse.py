"""Parsing and validating job documents, with every error naming its field.

Validation is split in two layers on purpose:

* structural/field rules live on the pydantic models in :mod:`.envelope` (they map
  onto a CRD structural schema and give precise field paths);
* cross-field rules (payload type vs. operation, typed payload data, backoff
  bounds, target VM presence, ...) live here in :func:`semantic_errors`, because a
  structural schema cannot express them and pydantic would lose the field path.

:func:`parse_job` runs both and reports *all* problems as ``(field_path, message)``
pairs; ``JobDocument.model_validate`` enforces the same rules (with a flatter error).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.alias_generators import to_camel

from .envelope import (
    API_VERSION,
    KIND,
    MODEL_CONTEXT_DEFER,
    MODEL_CONTEXT_REGISTRY,
    PROTOCOL_VERSION,
    Audit,
    Backoff,
    Constraints,
    Execution,
    JobDocument,
    NodeAffinity,
    Observability,
    Payload,
    Routing,
    TargetVm,
)
from .payloads import PayloadData, quote
from .registry import OPERATION_RE, PAYLOAD_TYPE_RE, REGISTRY, PayloadRegistry, PayloadSpec

__all__ = [
    "JobValidationError",
    "from_manifest",
    "parse_job",
    "payload_spec",
    "semantic_errors",
]


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


def payload_errors(
    operation: str, type_name: str, data: Mapping[str, Any], registry: PayloadRegistry
) -> tuple[list[tuple[str, str]], PayloadData | None]:
    """Check ``data`` against the model registered for ``type_name``: errors, or the typed data."""
    spec = registry.get(type_name)
    if spec is None:
        if not (type_name.startswith(f"{operation}.v") and PAYLOAD_TYPE_RE.match(type_name)):
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
    errors, typed = payload_errors(job.operation, job.payload.type, job.payload.data, reg)
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


def finalize(job: JobDocument, registry: PayloadRegistry) -> list[tuple[str, str]]:
    """Run semantic checks and, when clean, normalise ``payload.data`` (defaults, aliases)."""
    errors, typed = payload_errors(job.operation, job.payload.type, job.payload.data, registry)
    errors.extend(_cross_field_errors(job, typed, registry))
    if not errors and typed is not None:
        job.payload.data = typed.model_dump(mode="json", by_alias=True, exclude_none=True)
    return errors


def _raw_payload_errors(obj: Mapping[str, Any], registry: PayloadRegistry) -> list[tuple[str, str]]:
    """Payload checks on the raw input, so they are reported alongside envelope errors."""
    operation, payload = obj.get("operation"), obj.get("payload")
    if not (isinstance(operation, str) and OPERATION_RE.match(operation)):
        return []  # the envelope error on ``operation`` already explains it
    if not isinstance(payload, Mapping):
        return []
    type_name, data = payload.get("type"), payload.get("data", {})
    if not isinstance(type_name, str) or not isinstance(data, Mapping):
        return []
    errors, _ = payload_errors(operation, type_name, data, registry)
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
    context = {MODEL_CONTEXT_REGISTRY: reg, MODEL_CONTEXT_DEFER: True}
    try:
        job = JobDocument.model_validate(obj, context=context)
    except ValidationError as exc:
        errors = _convert_errors(exc, reg)
        errors.extend(_raw_payload_errors(obj, reg))
        raise JobValidationError(errors) from None
    errors = finalize(job, reg)
    if errors:
        raise JobValidationError(errors)
    return job



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


def payload_spec(job: JobDocument, registry: PayloadRegistry | None = None) -> PayloadSpec:
    """The registered spec of ``job.payload.type``; raises if it is not registered."""
    spec = (registry or REGISTRY).get(job.payload.type)
    if spec is None:
        errors, _ = payload_errors(job.operation, job.payload.type, job.payload.data, registry or REGISTRY)
        raise JobValidationError(errors or [("payload.type", "payload type is not registered")])
    return spec
