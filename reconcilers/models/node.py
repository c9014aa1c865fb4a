"""WorkerNode: a host that runs VMs; spec is the operator's intent, status the agent's report."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from .common import CamelModel, Condition, KubeObject, Quantity


class Overcommit(CamelModel):
    cpu: float = Field(default=1.0, ge=1.0, le=16.0, description="vCPUs per host CPU")
    memory: float = Field(default=1.0, ge=1.0, le=4.0, description="Guest RAM per host RAM")


class WorkerNodeSpec(CamelModel):
    pool: str = Field(default="default", description="Worker pool the node belongs to")
    unschedulable: bool = Field(default=False, description="Cordon: no new VMs are placed here")
    drain: bool = Field(default=False, description="Move the VMs away (implies unschedulable)")
    overcommit: Overcommit = Field(default_factory=Overcommit)
    capacity_override: Resources | None = Field(
        default=None, description="Advertise less than the agent discovered (reserve for host)"
    )


class Resources(CamelModel):
    cpus: int = Field(ge=0)
    memory: Quantity


class Provider(CamelModel):
    """One backend provider's runtime report (e.g. cloud-hypervisor)."""

    name: str
    available: bool
    healthy: bool = True
    version: str | None = None
    capabilities: list[str] = Field(default_factory=list)
    message: str | None = None


class CachedImage(CamelModel):
    """A base image in the node's cache (the scheduler prefers nodes that hold a VM's)."""

    key: str = Field(description="sha256:<hex>, nix:<store path>, or path:<host path>")
    size_bytes: int = Field(ge=0)
    last_used: datetime | None = None


class WorkerNodeStatus(CamelModel):
    model_config = CamelModel.model_config | {"extra": "allow"}

    capacity: Resources | None = Field(default=None, description="What the agent found on "
                                       "the host (or spec.capacityOverride)")
    allocatable: Resources | None = Field(
        default=None, description="What VMs may take in all: capacity times the overcommit "
        "ratios (not what is left: see allocated)")
    allocated: Resources | None = Field(
        default=None, description="What the VMs placed here ask for; free = allocatable - "
        "allocated")
    vm_count: int = 0
    capabilities: list[str] = Field(default_factory=list)
    providers: list[Provider] = Field(default_factory=list)
    hypervisor_version: str | None = None
    agent_version: str | None = None
    heartbeat_time: datetime | None = None
    images: list[CachedImage] = Field(
        default_factory=list, description="Base images cached on the node, most recently used "
        "first (at most 50)")
    conditions: list[Condition] = Field(default_factory=list)
    phase: Literal["Ready", "NotReady", "Unknown"] = "Unknown"
    scheduling: Literal["Enabled", "Cordoned", "Draining"] | None = Field(
        default=None, description="Whether new VMs may be placed here: Enabled, Cordoned "
        "(spec.unschedulable) or Draining (spec.drain: VMs are being moved away); written by "
        "the controller")


class WorkerNode(KubeObject):
    api_version: Literal["hyperfleet.dev/v1alpha1"] = "hyperfleet.dev/v1alpha1"
    kind: Literal["WorkerNode"] = "WorkerNode"
    spec: WorkerNodeSpec = Field(default_factory=WorkerNodeSpec)
    status: WorkerNodeStatus = Field(default_factory=WorkerNodeStatus)



WorkerNodeSpec.model_rebuild()
