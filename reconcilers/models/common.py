"""Shared pieces of the CRD models: camelCase wire names, quantities, conditions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import Annotated, Any, Literal, Self

from kubernetes.utils.quantity import parse_quantity as k8s_parse_quantity
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Re-exported: the models predate conventions.py and many modules import these from here.
from ..conventions import API_VERSION as API_VERSION
from ..conventions import GROUP as GROUP
from ..conventions import VERSION as VERSION

#: A non-negative Kubernetes quantity as memory is written: a decimal number (``1.5``,
#: ``.5``) with a binary (Ki..Ei) or decimal (k..E) suffix or a decimal exponent (``1e9``).
#: It is apimachinery's resource.Quantity grammar without signs and milli/micro/nano (no
#: memory size is a fraction of a byte); RE2-compatible, as CRD patterns must be.
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[kMGTPE])?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_QUANTITY_HELP = "use a number with an optional Ki/Mi/Gi/Ti suffix, e.g. 512Mi or 1.5Gi"
#: Kubernetes keeps quantities in an int64; a larger one is a typo, and an unbounded exponent
#: would have Python build an integer of any size.
_QUANTITY_MAX = 2**63 - 1
_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
#: A memory size that must not be zero: a VM's memory (0 would take no room when
#: scheduling and fail only at vm.create).
PositiveQuantity = Annotated[
    str,
    Field(
        pattern=QUANTITY_PATTERN,
        max_length=64,
        description="Memory quantity above zero: a number with an optional Ki/Mi/Gi/Ti (or "
        "k/M/G/T) suffix, e.g. 512Mi, 1.5Gi or 2Gi",
        # The pattern cannot tell zero (0.0Gi) from more; the API server's CEL can.
        json_schema_extra={"example": "1Gi", "x-kubernetes-validations": [
            {"rule": "quantity(self).isGreaterThan(quantity('0'))",
             "message": f"must be above zero: {_QUANTITY_HELP}"}]},
    ),
    AfterValidator(lambda v: _checked(v, positive=True)),
]

#: A Kubernetes-style memory quantity ("512Mi", "1.5Gi", bytes as digits).
Quantity = Annotated[
    str,
    Field(
        pattern=QUANTITY_PATTERN,
        max_length=64,
        description="Memory quantity: a number with an optional Ki/Mi/Gi/Ti (or k/M/G/T) "
        "suffix, e.g. 512Mi, 1.5Gi or 2Gi",
        json_schema_extra={"example": "1Gi"},
    ),
    AfterValidator(lambda v: _checked(v, positive=False)),
]


def parse_quantity(value: str, field: str = "quantity") -> int:
    """Bytes of a memory quantity, by Kubernetes' rules: ``1.5Gi`` is 1610612736, and a
    fraction of a byte rounds up as ``resource.Quantity.Value()`` does (``0.5`` is 1).

    The one parser for memory sizes (VM specs, node capacity, resize jobs, agent flags), so
    everything agrees with what the API server accepted. Raises ValueError naming ``field``
    and the fix for bad syntax or more than Kubernetes' int64."""
    text = str(value).strip()
    if not _QUANTITY_RE.match(text):
        raise ValueError(f"{field}: {value!r} is not a memory quantity: {_QUANTITY_HELP}")
    amount: Decimal = k8s_parse_quantity(text)  # type: ignore[no-untyped-call]
    if amount > _QUANTITY_MAX:
        raise ValueError(f"{field}: {value!r} is larger than Kubernetes allows (2^63-1 bytes)")
    return int(amount.to_integral_value(rounding=ROUND_CEILING))


def _checked(value: str, positive: bool) -> str:
    """Pydantic's half of the CEL rules above: what the pattern lets through but is no size."""
    if parse_quantity(value, "memory") == 0 and positive:
        raise ValueError(f"memory: {value!r} is zero: {_QUANTITY_HELP}")
    return value


def format_quantity(n_bytes: int) -> str:
    """The shortest exact binary-suffixed form, so status reads like the spec."""
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        size = _UNITS[unit]
        if n_bytes and n_bytes % size == 0:
            return f"{n_bytes // size}{unit}"
    return str(n_bytes)


class CamelModel(BaseModel):
    """Models whose wire form is Kubernetes camelCase while Python stays snake_case.

    Unknown fields are rejected (``extra="forbid"``): a CRD spec is written by people, and
    a misspelt field must fail validation rather than be dropped. A model that must keep
    what it does not know says so: :class:`OpenCamelModel`, or a status that others write
    into overriding ``extra`` in its own ``model_config``.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
    )

    def wire(self) -> dict[str, Any]:
        """JSON-ready dict in Kubernetes form (aliases, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class OpenCamelModel(CamelModel):
    """A :class:`CamelModel` that keeps unknown fields (``extra="allow"``): the VmJob protocol's.

    This is its forward-compatibility contract: a 1.x job document (or status) written by
    a newer producer round-trips through an older library without losing data.
    """

    model_config = CamelModel.model_config | {"extra": "allow"}


class Condition(CamelModel):
    """A Kubernetes API-conventions condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(default="", description="CamelCase machine-readable reason")
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class ObjectMeta(BaseModel):
    """The parts of metadata Hyperfleet reads; the API server owns the rest."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    resource_version: str | None = Field(default=None, alias="resourceVersion")
    uid: str | None = None
    deletion_timestamp: str | None = Field(default=None, alias="deletionTimestamp")


class KubeObject(CamelModel):
    """A whole object as the API server returns it; unknown top-level fields are ignored."""

    model_config = CamelModel.model_config | {"extra": "ignore"}

    metadata: ObjectMeta

    @classmethod
    def from_body(cls, body: Any) -> Self:
        return cls.model_validate(dict(body))

    @property
    def key(self) -> str:
        return f"{self.metadata.namespace or 'default'}/{self.metadata.name}"


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def rfc3339(t: datetime) -> str:
    """Kubernetes' timestamp form (``...Z``), for status fields written as plain JSON."""
    return t.isoformat().replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    """A Kubernetes timestamp (``...Z`` or an explicit offset) as an aware datetime."""
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def version_of(body: Mapping[str, Any] | None) -> int:
    """An object's resourceVersion as a number, to tell which of two copies is newer
    (etcd's are increasing integers; the API server does not promise it, so anything
    else counts as 0, the oldest)."""
    value = ((body or {}).get("metadata") or {}).get("resourceVersion")
    try:
        return int(value or 0)
    except ValueError:
        return 0


def set_condition(
    conditions: list[Condition],
    type_: str,
    status: bool | Literal["Unknown"],
    reason: str,
    message: str = "",
    generation: int | None = None,
    now: datetime | None = None,
) -> list[Condition]:
    """Upsert a condition, keeping lastTransitionTime when the status did not flip."""
    status_s: Literal["True", "False", "Unknown"] = (
        "Unknown" if status == "Unknown" else ("True" if status else "False")
    )
    old = next((c for c in conditions if c.type == type_), None)
    ltt = old.last_transition_time if old is not None and old.status == status_s else None
    new = Condition(
        type=type_,
        status=status_s,
        reason=reason,
        message=message,
        last_transition_time=ltt or now or now_utc(),
        observed_generation=generation,
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == type_ else c for c in conditions]
