"""Typed payload models, one per ``<operation>.v<N>`` payload type.

A VmJob carries ``payload: {type, data}``; ``data`` is stored untyped in the
envelope (a CRD structural schema cannot express a union keyed by ``type``) and
validated here by the model registered for ``type``. Models are camelCase on the
wire and snake_case in Python, and keep unknown fields so that a newer producer
can add optional fields without older agents dropping them on a round trip.

This module only *defines* models; :mod:`hyperfleet.reconcilers.jobs.registry`
owns the registry and registers :data:`BUILTIN_PAYLOADS` into it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..models.common import QUANTITY_PATTERN, OpenCamelModel, parse_quantity

__all__ = [
    "BUILTIN_PAYLOADS",
    "DNS_LABEL_PATTERN",
    "DNS_SUBDOMAIN_PATTERN",
    "LOCATION_PATTERN",
    "QUANTITY_PATTERN",
    "BuiltinPayload",
    "GuestExecV1",
    "PayloadData",
    "SystemHealthCheckV1",
    "VmMigrateV1",
    "VmRebootV1",
    "VmResizeV1",
    "VmRestoreV1",
    "VmSnapshotV1",
    "quantity_to_bytes",
    "quote",
]

# All patterns are RE2-compatible (no look-around/backrefs) so the integrator can
# copy them verbatim into CRD ``pattern`` fields, which the apiserver evaluates in Go.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# An absolute directory path or a URL with a scheme (file://, s3://, https://, ...).
LOCATION_PATTERN = r"^(/\S*|[a-z][a-z0-9+.-]*://\S+)$"
_DNS_SUBDOMAIN_RE = re.compile(DNS_SUBDOMAIN_PATTERN)
_LOCATION_RE = re.compile(LOCATION_PATTERN)

def quote(value: object, limit: int = 80) -> str:
    """Render a user value for an error message: JSON quoting, truncated."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quantity_to_bytes(quantity: str, field: str = "quantity") -> int:
    """Whole bytes of a Kubernetes quantity (``"2Gi"``, ``"1.5Gi"``, ``"1e9"``), for
    cloud-hypervisor's resize API; the one parser of :mod:`..models.common`, so a job and
    the VM it resizes read a size the same way."""
    return parse_quantity(quantity, field)


class PayloadData(OpenCamelModel):
    """Base class for typed ``payload.data`` models; subclass and register to extend."""


def _check_location(value: str | None, example: str) -> str | None:
    if value is None:
        return None
    if not _LOCATION_RE.match(value):
        raise PydanticCustomError(
            "location", f"{quote(value)} is neither an absolute path nor a URL; use e.g. {example}"
        )
    return value


class VmSnapshotV1(PayloadData):
    """Snapshot a running VM (cloud-hypervisor ``vm.snapshot``)."""

    destination: str | None = Field(
        default=None,
        description="Directory path or URL for the snapshot; node default when omitted.",
    )
    pause_vm: bool = Field(
        default=True,
        description="Pause the VM while snapshotting (required for a consistent image).",
    )

    @field_validator("destination")
    @classmethod
    def _destination(cls, value: str | None) -> str | None:
        return _check_location(value, '"/var/lib/hyperfleet/snapshots/web-1" or "s3://bucket/web-1"')


class VmRestoreV1(PayloadData):
    """Restore a VM from a snapshot (cloud-hypervisor ``vm.restore``)."""

    source: str = Field(description="Directory path or URL of the snapshot to restore.")
    resume: bool = Field(default=True, description="Resume the VM after the restore.")

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        checked = _check_location(value, '"/var/lib/hyperfleet/snapshots/web-1"')
        assert checked is not None
        return checked


class VmRebootV1(PayloadData):
    """Reboot a VM; ``hard`` resets without asking the guest."""

    mode: Literal["soft", "hard"] = Field(default="soft", description="soft (ACPI) or hard.")


class VmResizeV1(PayloadData):
    """Hot-resize vCPUs and/or memory of a running VM."""

    desired_cpus: int | None = Field(default=None, ge=1, description="Target vCPU count.")
    desired_memory: str | None = Field(
        default=None, description='Target memory as a Kubernetes quantity, e.g. "2Gi".'
    )

    @field_validator("desired_memory", mode="before")
    @classmethod
    def _memory_int(cls, value: object) -> object:
        # YAML authors write ``desiredMemory: 2147483648``; accept it like int-or-string.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("desired_memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            size = quantity_to_bytes(value)
        except ValueError:
            raise PydanticCustomError(
                "quantity",
                f'{quote(value)} is not a memory quantity; use a whole size such as "2Gi" or "512Mi"',
            ) from None
        if size <= 0:
            raise PydanticCustomError("quantity", 'must be greater than zero; use a size such as "2Gi"')
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> VmResizeV1:
        if self.desired_cpus is None and self.desired_memory is None:
            raise PydanticCustomError(
                "resize_empty",
                "nothing to resize; set desiredCpus and/or desiredMemory",
            )
        return self

    @property
    def desired_memory_bytes(self) -> int | None:
        """Target memory in bytes, for the hypervisor API."""
        return None if self.desired_memory is None else quantity_to_bytes(self.desired_memory)


class VmMigrateV1(PayloadData):
    """Live-migrate a VM to another node."""

    destination_node: str = Field(description="Kubernetes node name to migrate to.")
    timeout_seconds: int | None = Field(default=None, ge=1, description="Migration time limit.")

    @field_validator("destination_node")
    @classmethod
    def _node(cls, value: str) -> str:
        if len(value) > 253 or not _DNS_SUBDOMAIN_RE.match(value):
            raise PydanticCustomError(
                "node_name",
                f"{quote(value)} is not a valid node name; use the lowercase name shown by "
                "`kubectl get nodes`",
            )
        return value


class GuestExecV1(PayloadData):
    """Run a command inside the guest over vsock."""

    command: list[str] = Field(min_length=1, description="argv; the first item is the program.")
    timeout_seconds: int | None = Field(default=None, ge=1, description="Command time limit.")

    @field_validator("command")
    @classmethod
    def _program(cls, value: list[str]) -> list[str]:
        if not value[0].strip():
            raise PydanticCustomError(
                "empty_program",
                'command[0] (the program) is empty; e.g. command: ["/bin/sh", "-c", "uptime"]',
            )
        return value


class SystemHealthCheckV1(PayloadData):
    """Run node/agent health checks; an empty list means the agent's default set."""

    checks: list[str] = Field(default_factory=list, description="Check names to run.")

    @field_validator("checks")
    @classmethod
    def _checks(cls, value: list[str]) -> list[str]:
        for index, name in enumerate(value):
            if not name.strip():
                raise PydanticCustomError(
                    "empty_check", f"checks[{index}] is empty; remove it or name a check"
                )
        return value


@dataclass(frozen=True)
class BuiltinPayload:
    """Registration record for a payload type shipped with Hyperfleet."""

    type_name: str
    model: type[PayloadData]
    required_capabilities: frozenset[str]
    targets_vm: bool | None = None
    requires_running_vm: bool | None = None


BUILTIN_PAYLOADS: tuple[BuiltinPayload, ...] = (
    BuiltinPayload("vm.snapshot.v1", VmSnapshotV1, frozenset({"snapshot"})),
    # Restore builds a fresh VMM, so it may run on any eligible node when the VM is down.
    BuiltinPayload("vm.restore.v1", VmRestoreV1, frozenset({"snapshot"}), requires_running_vm=False),
    BuiltinPayload("vm.reboot.v1", VmRebootV1, frozenset()),
    BuiltinPayload("vm.resize.v1", VmResizeV1, frozenset({"hot-resize"})),
    BuiltinPayload("vm.migrate.v1", VmMigrateV1, frozenset({"migration"})),
    # Guest commands travel over the VM's vsock, which only its host node can reach.
    BuiltinPayload("guest.exec.v1", GuestExecV1, frozenset({"vsock"}), targets_vm=True),
    BuiltinPayload("system.health-check.v1", SystemHealthCheckV1, frozenset()),
)
