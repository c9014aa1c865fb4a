"""VirtualMachine: the desired VM (spec) and what the node agent observed (status)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from .common import CamelModel, Condition, KubeObject, PositiveQuantity, parse_quantity

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class RunStrategy(StrEnum):
    ALWAYS = "Always"
    HALTED = "Halted"
    MANUAL = "Manual"


class PowerState(StrEnum):
    RUNNING = "Running"
    STOPPED = "Stopped"
    PAUSED = "Paused"
    SLEEPING = "Sleeping"


class Phase(StrEnum):
    PENDING = "Pending"
    UNSCHEDULABLE = "Unschedulable"
    SCHEDULED = "Scheduled"
    STARTING = "Starting"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPED = "Stopped"
    SLEEPING = "Sleeping"
    EVICTING = "Evicting"
    FAILED = "Failed"
    TERMINATING = "Terminating"


class EvictionPolicy(StrEnum):
    RESCHEDULE = "Reschedule"
    NONE = "None"


class Boot(CamelModel):
    """What the VMM loads: a kernel (+initramfs, cmdline) or firmware."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.kernel) || has(self.firmware)",
                    "message": "set boot.kernel or boot.firmware",
                }
            ]
        }
    }

    kernel: str | None = Field(default=None, description="Host path of the guest kernel")
    initramfs: str | None = Field(default=None, description="Host path of the initramfs")
    cmdline: str | None = Field(default=None, description="Kernel command line")
    firmware: str | None = Field(
        default=None, description="Host path of the firmware (e.g. hypervisor-fw, OVMF)"
    )

    @model_validator(mode="after")
    def _kernel_or_firmware(self) -> Boot:
        if not self.kernel and not self.firmware:
            raise ValueError("boot: set boot.kernel or boot.firmware")
        return self


class Disk(CamelModel):
    name: str = Field(pattern=NAME_PATTERN, max_length=63, description="Device id in the VMM")
    path: str = Field(min_length=1, description="Host path of the disk image, under one of the "
                      "agent's --allowed-path-root")
    readonly: bool = False
    direct: bool = False
    shared: bool = Field(
        default=False,
        description="The path is on storage every node sees at the same path (NFS, CephFS, a "
        "SAN), so the VM may move with it. False: node-local; a VM with a writable "
        "node-local disk is never moved to another node (drains hold it)")


class OnMove(StrEnum):
    REFUSE = "Refuse"
    RECREATE = "Recreate"


class ReclaimPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class ImageSpec(CamelModel):
    """The VM's root disk: a base image the node caches, under a copy-on-write overlay of
    the VM's own (never shared with another VM)."""

    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.path) ? 1 : 0) + (has(self.url) ? 1 : 0) + "
                    "(has(self.nixStorePath) ? 1 : 0) == 1",
                    "message": "set exactly one of image.path, image.url, image.nixStorePath",
                },
                {
                    "rule": "!has(self.url) || has(self.sha256)",
                    "message": "image.url needs image.sha256 (the image's sha256 digest, 64 hex "
                    "digits): an unverified download is never booted",
                },
            ]
        }
    }

    path: str | None = Field(default=None, description="Host path of a base image (qcow2 or "
                             "raw) under one of the agent's --allowed-path-root")
    url: str | None = Field(default=None, pattern=r"^https?://",
                            description="http(s) URL of a base image (qcow2 or raw)")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                               description="sha256 of the base image file; required with url")
    nix_store_path: str | None = Field(
        default=None, pattern=r"^/nix/store/[0-9a-z]{32}-[^/]+$",
        description="Nix store path holding the image, realised on the node")
    nix_file: str | None = Field(
        default=None, pattern=r"^[^/].*$",
        description="The image file inside nixStorePath (default: the store path itself)")
    nix_cache: str | None = Field(
        default=None, description="Binary cache to fetch nixStorePath from (nix copy --from)")
    on_move: OnMove = Field(
        default=OnMove.REFUSE,
        description="Refuse: the overlay holds the VM's writes and exists only on its node, so "
        "the VM never moves to another node (drains hold it); Recreate: on another node it "
        "starts from a fresh overlay, losing what it wrote (like a container disk)")
    reclaim_policy: ReclaimPolicy = Field(
        default=ReclaimPolicy.DELETE,
        description="What becomes of the VM's overlay when the VM is deleted")

    @model_validator(mode="after")
    def _one_source(self) -> ImageSpec:
        given = [f for f in ("path", "url", "nix_store_path") if getattr(self, f)]
        if len(given) != 1:
            raise ValueError("image: set exactly one of image.path, image.url, "
                             "image.nixStorePath")
        if self.url and not self.sha256:
            raise ValueError("image.url needs image.sha256 (the image's sha256 digest, 64 hex "
                             "digits): an unverified download is never booted")
        return self

    @property
    def key(self) -> str:
        """What a WorkerNode reports for a cached image, and the scheduler matches."""
        return str(image_key(self.model_dump(by_alias=True)))


def image_key(image: Mapping[str, Any] | None) -> str | None:
    """The cache key of a spec.image (as stored, camelCase): its digest when declared."""
    if not image:
        return None
    if image.get("sha256"):
        return f"sha256:{image['sha256']}"
    if image.get("nixStorePath"):
        nix_file = image.get("nixFile")
        return f"nix:{image['nixStorePath']}" + (f"/{nix_file}" if nix_file else "")
    return f"path:{image.get('path')}"


class Interface(CamelModel):
    name: str = Field(pattern=NAME_PATTERN, max_length=63, description="Device id in the VMM")
    tap: str | None = Field(default=None, max_length=15, description="Host TAP device name")
    mac: str | None = Field(
        default=None, pattern=r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$", description="Guest MAC"
    )
    ip: str | None = Field(default=None, description="Host-side IPv4 address of the TAP")
    mask: str | None = Field(default=None, description="Host-side netmask of the TAP")


class Vsock(CamelModel):
    cid: int = Field(ge=3, le=4294967294, description="Guest context id (3 or more)")


class ConsoleMode(StrEnum):
    OFF = "Off"
    PTY = "Pty"
    TTY = "Tty"
    FILE = "File"
    NULL = "Null"


class SerialMode(StrEnum):
    """The serial port's modes: the console's, plus Socket (cloud-hypervisor offers a socket
    for the serial port only)."""

    OFF = "Off"
    PTY = "Pty"
    TTY = "Tty"
    FILE = "File"
    NULL = "Null"
    #: A unix socket the node agent puts beside the VM's API socket (``hyperfleet console``).
    SOCKET = "Socket"


class GuestAgentSpec(CamelModel):
    """The Hyperfleet guest agent inside the VM (``hyperfleet-guest-agent``), over vsock."""

    port: int = Field(default=1024, ge=1, le=4294967295, description="Guest vsock port")
    health_interval_seconds: int = Field(
        default=30, ge=5, le=3600, description="How often the guest's health checks run"
    )


# Which VMs share a node; a VmJob's routing.affinity (jobs NodeAffinity) picks nodes instead.
class VmAffinity(CamelModel):
    """VM-to-VM co-location rules, evaluated per WorkerNode."""

    vm_affinity: list[dict[str, str]] = Field(
        default_factory=list,
        description="Each entry is a label selector (matchLabels); the VM must share a node "
        "with a VM matching every entry",
    )
    vm_anti_affinity: list[dict[str, str]] = Field(
        default_factory=list,
        description="Each entry is a label selector (matchLabels); the VM must not share a "
        "node with any VM matching an entry",
    )


class VirtualMachineSpec(CamelModel):
    model_config = CamelModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxCpus) || self.maxCpus >= self.cpus",
                    "message": "maxCpus must be >= cpus: raise maxCpus or lower cpus",
                },
                {
                    "rule": "!has(self.guestAgent) || has(self.vsock)",
                    "message": "guestAgent talks over vsock: set spec.vsock.cid too",
                },
                {
                    "rule": "!has(self.maxMemory) || "
                    "quantity(self.maxMemory).compareTo(quantity(self.memory)) >= 0",
                    "message": "maxMemory must be >= memory: raise maxMemory or lower memory",
                },
            ]
        }
    }

    cpus: int = Field(ge=1, le=512, description="vCPUs at boot (1-512)")
    max_cpus: int | None = Field(
        default=None, ge=1, le=512, description="vCPU ceiling for hot-resize; defaults to cpus"
    )
    memory: PositiveQuantity
    max_memory: PositiveQuantity | None = Field(
        default=None,
        description="Memory ceiling for hot-resize (hotplug_size = maxMemory - memory)",
    )
    live_migration: bool = Field(
        default=False, description="Shared guest memory, which vm.send-migration requires"
    )
    boot: Boot
    image: ImageSpec | None = Field(
        default=None, description="Root disk from a base image: the VM gets its own "
        "copy-on-write overlay of it, as its first disk")
    disks: list[Disk] = Field(default_factory=list)
    interfaces: list[Interface] = Field(default_factory=list)
    vsock: Vsock | None = None
    guest_agent: GuestAgentSpec | None = Field(
        default=None,
        description="Checkpoint the workload before sleep, restore it on wake, report guest "
        "health (needs vsock)",
    )
    serial: SerialMode = Field(
        default=SerialMode.SOCKET,
        description="Where the serial port goes; Socket (the default) lets `hyperfleet "
        "console` attach to it",
    )
    console: ConsoleMode = ConsoleMode.OFF
    run_strategy: RunStrategy = Field(
        default=RunStrategy.ALWAYS,
        description="Always: keep it running (restart on exit); Halted: keep it off; "
        "Manual: do what powerState says, never restart",
    )
    power_state: PowerState = PowerState.RUNNING
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="WorkerNode labels the node must have"
    )
    worker_pool: str | None = Field(default=None, description="Only nodes of this pool")
    required_capabilities: list[str] = Field(
        default_factory=list, description="Capabilities the node must advertise"
    )
    affinity: VmAffinity | None = None
    eviction_policy: EvictionPolicy = Field(
        default=EvictionPolicy.RESCHEDULE,
        description="Reschedule: when its node drains or is lost, start the VM elsewhere; "
        "None: stay bound to the node and wait for it",
    )

    @model_validator(mode="after")
    def _max_cpus(self) -> VirtualMachineSpec:
        if self.max_cpus is not None and self.max_cpus < self.cpus:
            raise ValueError("maxCpus must be >= cpus: raise maxCpus or lower cpus")
        if self.guest_agent is not None and self.vsock is None:
            raise ValueError("guestAgent talks over vsock: set spec.vsock.cid too")
        if self.max_memory is not None and self.max_memory_bytes < self.memory_bytes:
            raise ValueError("maxMemory must be >= memory: raise maxMemory or lower memory")
        return self

    @property
    def memory_bytes(self) -> int:
        return parse_quantity(self.memory)

    def node_local_data(self) -> list[str]:
        """Why this VM cannot leave its node (see node_local_reasons)."""
        return node_local_reasons(self.model_dump(by_alias=True))

    @property
    def max_memory_bytes(self) -> int:
        return parse_quantity(self.max_memory) if self.max_memory else self.memory_bytes


def node_local_reasons(spec: Mapping[str, Any]) -> list[str]:
    """Why a VM (its spec as stored, camelCase) cannot leave its node: its writes live on
    that node alone. Empty: it may move (cold, or live if it also has shared memory).
    Works on the raw spec, so a spec the models would refuse is judged all the same."""
    why = []
    image = spec.get("image") or {}
    if image and image.get("onMove", OnMove.REFUSE) != OnMove.RECREATE:
        why.append("spec.image: its copy-on-write root disk exists only on this node "
                   "(set spec.image.onMove: Recreate to let it start afresh elsewhere)")
    why += [f"spec.disks[{i}] ({d.get('name')}) is writable and node-local (set shared: true "
            "if it is on storage every node sees)"
            for i, d in enumerate(spec.get("disks") or [])
            if not d.get("readonly") and not d.get("shared")]
    return why


class HypervisorStatus(CamelModel):
    state: str | None = Field(default=None, description="vm.info state reported by the VMM")
    pid: int | None = None
    version: str | None = None
    boot_memory: int | None = Field(
        default=None,
        description="Bytes of memory the VM was created with: with maxMemory, how far it can "
        "grow live (the VMM rewrites its reported size on a resize)")
    console_socket: str | None = Field(
        default=None,
        description="The serial console's unix socket on the node, while the VMM holds it "
        "(spec.serial Socket)")


class ImageStatus(CamelModel):
    """The root disk: its base image on this node, and the VM's overlay over it."""

    key: str
    phase: Literal["Pulling", "Ready", "Failed"]
    progress: str | None = None
    digest: str | None = None
    root_disk: str | None = Field(default=None, description="The VM's overlay on its node")
    message: str | None = None


class SnapshotStatus(CamelModel):
    """The last sleep snapshot: where it is and what it holds."""

    path: str
    taken_at: datetime | None = None
    size_bytes: int | None = None
    restored_at: datetime | None = None


class VirtualMachineStatus(CamelModel):
    model_config = CamelModel.model_config | {"extra": "allow"}

    phase: Phase = Phase.PENDING
    node_name: str | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    hypervisor: HypervisorStatus | None = None
    api_socket: str | None = None
    boot_time: datetime | None = None
    restart_count: int = 0
    last_restart_time: datetime | None = None
    consecutive_restarts: int = Field(
        default=0,
        description="Automatic restarts since the VM last ran 10 minutes without exiting; "
        "each one doubles the wait before the next (restartCount counts them all)",
    )
    next_restart_time: datetime | None = Field(
        default=None,
        description="runStrategy Always: the VM exited on its own and is restarted at this "
        "time (crash-loop backoff); unset when no restart is pending",
    )
    halted_generation: int | None = Field(
        default=None,
        description="runStrategy Manual: the guest stopped on its own at this generation; "
        "it stays off until the spec changes",
    )
    snapshot: SnapshotStatus | None = None
    image: ImageStatus | None = None
    evict_from: str | None = Field(
        default=None, description="The node asked to stop this VM so it can move elsewhere"
    )


class VirtualMachine(KubeObject):
    """The whole object, as read from the API server."""

    api_version: Literal["hyperfleet.dev/v1alpha1"] = "hyperfleet.dev/v1alpha1"
    kind: Literal["VirtualMachine"] = "VirtualMachine"
    spec: VirtualMachineSpec
    status: VirtualMachineStatus = Field(default_factory=VirtualMachineStatus)
