"""Shared pieces of the CRD models: camelCase wire names, quantities, conditions."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "hyperfleet.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

QUANTITY_PATTERN = r"^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_UNITS = {
    "": 1,
    "k": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
}

#: A memory size that must not be zero: a VM's memory (0 would take no room when
#: scheduling and fail only at vm.create).
PositiveQuantity = Annotated[
    str,
    Field(
        pattern=r"^[1-9][0-9]*(Ki|Mi|Gi|Ti|k|M|G|T)?$",
        description="Memory quantity above zero: digits with an optional Ki/Mi/Gi/Ti (or "
        "k/M/G/T) suffix, e.g. 512Mi or 2Gi",
        json_schema_extra={"example": "1Gi"},
    ),
]

#: A Kubernetes-style memory quantity ("512Mi", "2Gi", bytes as digits).
Quantity = Annotated[
    str,
    Field(
        pattern=QUANTITY_PATTERN,
        description="Memory quantity: digits with an optional Ki/Mi/Gi/Ti (or k/M/G/T) "
        "suffix, e.g. 512Mi or 2Gi",
        json_schema_extra={"example": "1Gi"},
    ),
]


def parse_quantity(value: str) -> int:
    """Bytes of a quantity string; the CRD pattern already rejected anything else."""
    m = _QUANTITY_RE.match(value)
    if not m:
        raise ValueError(f"invalid quantity {value!r}: use digits with Ki/Mi/Gi/Ti, e.g. 512Mi")
    unit = m.group(1) or ""
    return int(value[: len(value) - len(unit)]) * _UNITS[unit]


def format_quantity(n_bytes: int) -> str:
    """The shortest exact binary-suffixed form, so status reads like the spec."""
    for unit in ("Ti", "Gi", "Mi", "Ki"):
        size = _UNITS[unit]
        if n_bytes and n_bytes % size == 0:
            return f"{n_bytes // size}{unit}"
    return str(n_bytes)


class CamelModel(BaseModel):
    """Models whose wire form is Kubernetes camelCase while Python stays snake_case."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
    )

    def wire(self) -> dict[str, Any]:
        """JSON-ready dict in Kubernetes form (aliases, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


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
