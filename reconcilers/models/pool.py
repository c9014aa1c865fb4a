"""VirtualMachinePool: N identical VirtualMachines from one template, rolled on change.

Like KubeVirt's VirtualMachinePool (and a ReplicaSet with a StatefulSet's names): members
are ``<pool>-<ordinal>``, owned by the pool, labelled with the pool's name and the hash of
the template they were made from. The planner (``reconcilers/pools.py``) reads these.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

# On every member: the name of its pool (members are listed and watched by it), and the
# hash of the template it was made from (what a roll compares). Declared in conventions.py.
from ..conventions import POOL_LABEL as POOL_LABEL
from ..conventions import REVISION_LABEL as REVISION_LABEL
from .common import CamelModel, Condition, KubeObject
from .vm import VirtualMachineSpec

RESERVED_LABELS = (POOL_LABEL, REVISION_LABEL)

_PERCENT_RE = re.compile(r"^(100|[1-9]?[0-9])%$")

#: Labels, bounded (64 entries, values of 63 characters as Kubernetes allows) so the CEL
#: rules over them stay within the API server's cost budget.
LabelMap = Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(max_length=64)]

#: A count or a percentage of replicas ("25%"), as Deployments take them.
IntOrPercent = Annotated[
    int | str,
    WithJsonSchema({
        "x-kubernetes-int-or-string": True,
        "description": "A number of members (e.g. 1) or a percentage of spec.replicas "
        "(e.g. \"25%\")",
    }),
]


def resolve_int_or_percent(value: int | str, replicas: int, round_up: bool) -> int:
    """The count ``value`` stands for: percentages round up for maxSurge, down for
    maxUnavailable (as Deployments do), so a small pool still makes progress."""
    if isinstance(value, int):
        return value
    pct = int(value.rstrip("%"))
    whole, rest = divmod(replicas * pct, 100)
    return whole + (1 if round_up and rest else 0)


class LabelSelector(CamelModel):
    """Labels every member carries: matchLabels only, since members are found by owner."""

    match_labels: LabelMap = Field(
        min_length=1, description="Labels every member has; spec.template.metadata.labels "
        "must contain each of them with the same value")


class TemplateMetadata(CamelModel):
    labels: LabelMap = Field(default_factory=dict, description="Labels of every member; "
                             "must include spec.selector.matchLabels")
    annotations: dict[str, str] = Field(default_factory=dict,
                                        description="Annotations of every member")


class PoolTemplate(CamelModel):
    metadata: TemplateMetadata = Field(default_factory=TemplateMetadata)
    spec: VirtualMachineSpec = Field(description="The spec of every member VirtualMachine")


class StrategyType(StrEnum):
    ROLLING_UPDATE = "RollingUpdate"
    ON_DELETE = "OnDelete"


def _check_int_or_percent(value: int | str, field: str) -> int | str:
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise ValueError(f"{field} must be a number >= 0 or a percentage like \"25%\"")
    if isinstance(value, str) and not _PERCENT_RE.match(value):
        raise ValueError(f"{field} {value!r}: use a number >= 0 or a percentage from \"0%\" "
                         "to \"100%\"")
    return value


def _zero(value: int | str) -> bool:
    return value in (0, "0%")


class RollingUpdate(CamelModel):
    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "type(self.maxUnavailable) == int ? self.maxUnavailable >= 0 : "
                    "self.maxUnavailable.matches('^(100|[1-9]?[0-9])%$')",
                    "message": "maxUnavailable must be a number >= 0 or a percentage from "
                    "\"0%\" to \"100%\"",
                },
                {
                    "rule": "type(self.maxSurge) == int ? self.maxSurge >= 0 : "
                    "self.maxSurge.matches('^(100|[1-9]?[0-9])%$')",
                    "message": "maxSurge must be a number >= 0 or a percentage from \"0%\" "
                    "to \"100%\"",
                },
                {
                    "rule": "!(string(self.maxUnavailable) in ['0', '0%'] && "
                    "string(self.maxSurge) in ['0', '0%'])",
                    "message": "maxUnavailable and maxSurge cannot both be 0: the roll could "
                    "never replace a member; set maxUnavailable: 1 or maxSurge: 1",
                },
            ]
        }
    }

    max_unavailable: IntOrPercent = Field(
        default=1, description="Members that may be unavailable during a roll (number or "
        "percentage of replicas, rounded down); default 1")
    max_surge: IntOrPercent = Field(
        default=0, description="Members that may exist above replicas during a roll "
        "(number or percentage, rounded up); default 0: replace in place, no extra capacity")

    @field_validator("max_unavailable", "max_surge", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # JSON true is not a count (pydantic would take it as 1)
            raise ValueError("must be a number >= 0 or a percentage like \"25%\", not a boolean")
        return v

    @field_validator("max_unavailable")
    @classmethod
    def _unavailable(cls, v: int | str) -> int | str:
        return _check_int_or_percent(v, "maxUnavailable")

    @field_validator("max_surge")
    @classmethod
    def _surge(cls, v: int | str) -> int | str:
        return _check_int_or_percent(v, "maxSurge")

    @model_validator(mode="after")
    def _not_both_zero(self) -> RollingUpdate:
        if _zero(self.max_unavailable) and _zero(self.max_surge):
            raise ValueError("maxUnavailable and maxSurge cannot both be 0: the roll could "
                             "never replace a member; set maxUnavailable: 1 or maxSurge: 1")
        return self


class PoolStrategy(CamelModel):
    type: StrategyType = Field(
        default=StrategyType.ROLLING_UPDATE,
        description="RollingUpdate: replace members running an old template automatically "
        "(delete, then create anew); OnDelete: only when you delete one")
    rolling_update: RollingUpdate = Field(default_factory=RollingUpdate)
    sleeping_counts_as_available: bool = Field(
        default=False, description="A member in phase Sleeping counts as available (for "
        "maxUnavailable and the Available condition); default: only Running and Ready")


class VirtualMachinePoolSpec(CamelModel):
    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "self.selector.matchLabels.all(k, has(self.template.metadata) && "
                    "has(self.template.metadata.labels) && k in self.template.metadata.labels "
                    "&& self.template.metadata.labels[k] == self.selector.matchLabels[k])",
                    "message": "spec.template.metadata.labels must contain every "
                    "spec.selector.matchLabels entry with the same value: add them to the "
                    "template's labels",
                },
                {
                    "rule": "!has(self.template.metadata) || "
                    "!has(self.template.metadata.labels) || "
                    f"!self.template.metadata.labels.exists(k, k in {list(RESERVED_LABELS)!r})",
                    "message": f"spec.template.metadata.labels must not set {POOL_LABEL} or "
                    f"{REVISION_LABEL}: the pool sets them on its members; remove them",
                },
            ]
        }
    }

    replicas: int = Field(default=1, ge=0, le=10000, description="How many members (0-10000)")
    selector: LabelSelector
    template: PoolTemplate
    strategy: PoolStrategy = Field(default_factory=PoolStrategy)

    @model_validator(mode="after")
    def _template_matches_selector(self) -> VirtualMachinePoolSpec:
        labels = self.template.metadata.labels
        missing = {k: v for k, v in self.selector.match_labels.items() if labels.get(k) != v}
        if missing:
            want = ", ".join(f"{k}: {v}" for k, v in sorted(missing.items()))
            raise ValueError("spec.template.metadata.labels must contain every "
                             f"spec.selector.matchLabels entry with the same value: add {want}")
        reserved = sorted(set(labels) & set(RESERVED_LABELS))
        if reserved:
            raise ValueError(f"spec.template.metadata.labels must not set {', '.join(reserved)}: "
                             "the pool sets them on its members; remove them")
        return self


def template_problems(template: dict[str, Any]) -> list[str]:
    """Why N copies of this template (its ``spec``, as stored) cannot run side by side,
    each naming the field and the fix. Empty: every member gets what it writes to alone."""
    spec = template.get("spec") or {}
    out = []
    for i, d in enumerate(spec.get("disks") or []):
        if not d.get("readonly") and not d.get("shared"):
            out.append(
                f"spec.template.spec.disks[{i}] ({d.get('name')}, {d.get('path')}) is writable: "
                "every member would open the same file read-write; use spec.template.spec.image "
                "(each member gets its own copy-on-write root disk), or set readonly: true "
                "(or shared: true if the guests coordinate writes, e.g. a cluster filesystem)")
    for i, n in enumerate(spec.get("interfaces") or []):
        fixed = [f for f in ("tap", "mac", "ip") if n.get(f)]
        if fixed:
            out.append(
                f"spec.template.spec.interfaces[{i}] ({n.get('name')}) sets "
                f"{', '.join(fixed)}: one per VM, the members would clash; remove "
                f"{'it' if len(fixed) == 1 else 'them'} (cloud-hypervisor picks a TAP and a "
                "MAC for each VM)")
    return out


class VirtualMachinePoolStatus(CamelModel):
    model_config = CamelModel.model_config | {"extra": "allow"}

    replicas: int = Field(default=0, description="Members that exist and are not being "
                          "deleted")
    ready_replicas: int = Field(default=0, description="Members Running with Ready True")
    available_replicas: int = Field(
        default=0, description="Ready members, plus Sleeping ones with "
        "spec.strategy.sleepingCountsAsAvailable")
    updated_replicas: int = Field(default=0, description="Members made from the current "
                                  "template (updateRevision)")
    current_revision: str | None = Field(
        default=None, description="The template hash most members ran before the roll in "
        "progress (updateRevision once done)")
    update_revision: str | None = Field(default=None, description="Hash of the current "
                                        "template")
    selector: str | None = Field(default=None, description="spec.selector as a label "
                                 "selector string (for the scale subresource)")
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


class VirtualMachinePool(KubeObject):
    """The whole object, as read from the API server."""

    api_version: Literal["hyperfleet.dev/v1alpha1"] = "hyperfleet.dev/v1alpha1"
    kind: Literal["VirtualMachinePool"] = "VirtualMachinePool"
    spec: VirtualMachinePoolSpec
    status: VirtualMachinePoolStatus = Field(default_factory=VirtualMachinePoolStatus)
