"""Pure VM reconcile: desired spec + observed VMM state -> the steps that converge them.

No I/O here: the node agent observes, calls :func:`reconcile`, executes the steps in
order (stopping at the first failure), and observes again. Each step is legal in the
state the previous steps leave behind (see the state machine in the CH NOTES).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .conventions import CONDITION_GUEST_HEALTHY
from .models.common import Condition
from .models.vm import (
    ConsoleMode,
    Phase,
    PowerState,
    RunStrategy,
    SerialMode,
    VirtualMachineSpec,
)

BOOTED = ("Running", "Paused")


class Action(StrEnum):
    SPAWN = "spawn"  # start the VMM process
    KILL = "kill"  # stop the VMM process (vmm.shutdown, then signals)
    CREATE = "vm.create"
    BOOT = "vm.boot"
    PAUSE = "vm.pause"
    RESUME = "vm.resume"
    SHUTDOWN = "vm.shutdown"
    DELETE = "vm.delete"
    RESIZE = "vm.resize"
    ADD_DISK = "vm.add-disk"
    ADD_NET = "vm.add-net"
    REMOVE_DEVICE = "vm.remove-device"
    SNAPSHOT = "vm.snapshot"
    RESTORE = "vm.restore"
    DISCARD_SNAPSHOT = "discard-snapshot"  # the snapshot was consumed by a wake-up
    GUEST_CHECKPOINT = "guest.checkpoint"  # quiesce the workload before a snapshot
    GUEST_RESTORE = "guest.restore"  # let the workload know it woke up
    WAIT = "wait"  # process up, socket not yet: nothing to do but look again


@dataclass(frozen=True)
class Step:
    action: Action
    body: dict[str, Any] | None = None
    why: str = ""


@dataclass(frozen=True)
class Observed:
    """What the agent saw: the VMM process, vm.info, and a sleeping VM's snapshot."""

    process: bool
    socket: bool = False
    state: str | None = None  # vm.info state; None while no VM is created
    config: dict[str, Any] | None = None  # vm.info config
    snapshot: bool = False  # a complete snapshot waits to be restored
    #: Memory the VM was created with. A live resize rewrites ``config.memory.size`` (ACPI
    #: hotplug) while ``hotplug_size`` keeps its boot value, so the ceiling is only knowable
    #: from what was created; None: fall back to the reported size.
    boot_memory: int | None = None


@dataclass(frozen=True)
class Desired:
    """The spec, plus what the agent remembers that the spec cannot say."""

    spec: VirtualMachineSpec
    halted: bool = False  # runStrategy Manual and the guest stopped on its own
    snapshot_url: str = ""
    vsock_socket: str | None = None
    root_disk: str | None = None  # the VM's overlay over spec.image, on this node
    console_socket: str | None = None  # where spec.serial Socket puts the serial port

    @property
    def state(self) -> str:
        """Running, Paused, Sleeping or Off."""
        spec = self.spec
        if spec.run_strategy == RunStrategy.HALTED or spec.power_state == PowerState.STOPPED:
            return "Off"
        if spec.power_state == PowerState.SLEEPING:
            return "Sleeping"
        if self.halted and spec.run_strategy == RunStrategy.MANUAL:
            return "Off"
        return "Paused" if spec.power_state == PowerState.PAUSED else "Running"


@dataclass
class _Sim:
    """The state the plan so far leaves behind."""

    state: str | None
    config: dict[str, Any] | None
    steps: list[Step] = field(default_factory=list)

    def add(self, action: Action, body: dict[str, Any] | None = None, why: str = "",
            state: str | bool | None = False) -> None:
        self.steps.append(Step(action, body, why))
        if state is not False:
            self.state = state  # type: ignore[assignment]


def reconcile(desired: Desired, observed: Observed) -> list[Step]:
    """Every step, in order, that takes ``observed`` to ``desired``."""
    want = desired.state
    if want in ("Off", "Sleeping"):
        return _wind_down(desired, observed, want)
    sim = _Sim(observed.state if observed.process else None, observed.config)
    if not observed.process:
        sim.add(Action.SPAWN)
    elif not observed.socket:
        return [Step(Action.WAIT)]
    target = vm_config(desired.spec, desired.vsock_socket, desired.root_disk,
                       desired.console_socket)
    if sim.state is not None and observed.snapshot:
        sim.add(Action.DISCARD_SNAPSHOT, why=_STALE)
    if sim.state is None:
        if observed.snapshot:
            sim.add(Action.RESTORE, {"source_url": desired.snapshot_url}, "wake from sleep",
                    state="Paused")
            # Before the guest runs on: should RESUME fail or time out, a later crash must
            # cold-boot rather than restore memory older than the disks.
            sim.add(Action.DISCARD_SNAPSHOT, why="consumed by the wake-up")
            sim.add(Action.RESUME, state="Running")
            if desired.spec.guest_agent is not None:
                sim.add(Action.GUEST_RESTORE, why="woke from sleep")
            sim.config = None  # restored config: compared on the next pass
        else:
            sim.add(Action.CREATE, target, state="Created")
            sim.config = target
    elif sim.config is not None:
        _apply_spec_changes(sim, target, observed.boot_memory)
    # cloud-hypervisor reports Created after vm.shutdown (the NOTES' Shutdown never shows);
    # both boot again.
    if sim.state in ("Created", "Shutdown"):
        sim.add(Action.BOOT, state="Running")
    if sim.state == "BreakPoint":
        sim.add(Action.RESUME, state="Running")
    if want == "Running" and sim.state == "Paused":
        sim.add(Action.RESUME, state="Running")
    elif want == "Paused" and sim.state == "Running":
        sim.add(Action.PAUSE, state="Paused")
    return sim.steps


#: A snapshot beside a VM the VMM already holds was restored (or superseded) and the disks
#: have moved on since: restoring it after a later crash would resurrect stale memory.
_STALE = "the VMM holds the VM: the snapshot is stale"


def _wind_down(desired: Desired, observed: Observed, want: str) -> list[Step]:
    if not observed.process:
        return []
    if not observed.socket:
        return [Step(Action.WAIT)]
    if want == "Off":
        steps = [Step(Action.DISCARD_SNAPSHOT, why=_STALE)] \
            if observed.state is not None and observed.snapshot else []
        return steps + ([Step(Action.SHUTDOWN)] if observed.state in BOOTED else [])
    # Sleeping: keep the guest's memory on disk and free the host.
    steps = []
    if observed.state in BOOTED:
        if observed.state == "Running" and desired.spec.guest_agent is not None:
            steps.append(Step(Action.GUEST_CHECKPOINT, why="going to sleep"))
        if observed.state == "Running":
            steps.append(Step(Action.PAUSE, why="quiesce before snapshot"))
        steps.append(Step(Action.SNAPSHOT, {"destination_url": desired.snapshot_url}))
    steps.append(Step(Action.KILL, why="asleep: the snapshot holds the VM"))
    return steps


# Fields whose change cloud-hypervisor cannot apply to a live VM. The serial port counts by
# its mode only: a console socket elsewhere (a VM that migrated in from a node with another
# --socket-dir) still works, and is not worth a restart.
_COLD_FIELDS = ("payload", "vsock", "console")


def recreate_reasons(current: dict[str, Any], target: dict[str, Any],
                     boot_memory: int | None = None) -> list[str]:
    """Why the VM must be recreated to reach ``target`` (empty: it can change live).

    ``boot_memory`` is the size the VM was created with (see :class:`Observed`)."""
    why = [f"{k} changed" for k in _COLD_FIELDS if not _covers(current.get(k), target.get(k))]
    if (current.get("serial") or {}).get("mode") != (target.get("serial") or {}).get("mode"):
        why.append("serial changed")
    cur_cpus, tgt_cpus = current.get("cpus") or {}, target["cpus"]
    if cur_cpus.get("max_vcpus") != tgt_cpus["max_vcpus"]:
        why.append("maxCpus changed")
    # The ceiling is the boot size plus hotplug_size, fixed at create. cloud-hypervisor
    # rewrites memory.size on an ACPI resize (virtio-mem reports hotplugged_size instead), so
    # the boot size comes from what was created; then the new size must fit between the two.
    cur_mem, tgt_mem = current.get("memory") or {}, target["memory"]
    cur_size = boot_memory if boot_memory is not None else int(cur_mem.get("size", 0))
    cur_ceiling = cur_size + int(cur_mem.get("hotplug_size") or 0)
    tgt_ceiling = tgt_mem["size"] + int(tgt_mem.get("hotplug_size") or 0)
    if cur_ceiling != tgt_ceiling:
        why.append("maxMemory changed")
    elif tgt_mem["size"] < cur_size:
        why.append("memory below the boot size")
    if bool(cur_mem.get("shared")) != bool(tgt_mem.get("shared")):
        why.append("liveMigration changed")
    cur_disks, tgt_disks = current.get("disks") or [], target.get("disks") or []
    if not _covers(cur_disks[:1], tgt_disks[:1]):
        why.append("root disk changed")
    return why


def _apply_spec_changes(sim: _Sim, target: dict[str, Any], boot_memory: int | None) -> None:
    current = sim.config or {}
    reasons = recreate_reasons(current, target, boot_memory)
    if reasons:
        why = "; ".join(reasons) + ": cloud-hypervisor cannot apply this live"
        if sim.state in BOOTED:
            sim.add(Action.SHUTDOWN, why=why, state="Shutdown")
        sim.add(Action.DELETE, why=why, state=None)
        sim.add(Action.CREATE, target, why=why, state="Created")
        sim.config = target
        return
    booted = sim.state in BOOTED
    if not booted:
        if not _covers(current, target):
            # Not running yet: recreating is the cheapest way to a config change.
            sim.add(Action.DELETE, why="config changed before boot", state=None)
            sim.add(Action.CREATE, target, state="Created")
            sim.config = target
        return
    resize: dict[str, Any] = {}
    if (current.get("cpus") or {}).get("boot_vcpus") != target["cpus"]["boot_vcpus"]:
        resize["desired_vcpus"] = target["cpus"]["boot_vcpus"]
    cur_mem = current.get("memory") or {}
    cur_ram = int(cur_mem.get("size", 0)) + int(cur_mem.get("hotplugged_size") or 0)
    if cur_ram != target["memory"]["size"]:
        resize["desired_ram"] = target["memory"]["size"]
    if resize:
        sim.add(Action.RESIZE, resize, "cpus/memory changed")
    _hotplug(sim, current.get("disks") or [], target.get("disks") or [], Action.ADD_DISK)
    _hotplug(sim, current.get("net") or [], target.get("net") or [], Action.ADD_NET)


def _hotplug(sim: _Sim, current: list[dict[str, Any]], target: list[dict[str, Any]],
             add: Action) -> None:
    cur = {d.get("id"): d for d in current}
    tgt = {d.get("id"): d for d in target}
    for dev_id in sorted(k for k in cur if k is not None and k not in tgt):
        sim.add(Action.REMOVE_DEVICE, {"id": dev_id}, "removed from spec")
    for dev_id, dev in sorted(tgt.items(), key=lambda kv: str(kv[0])):
        if dev_id in cur and _same_device(cur[dev_id], dev):
            continue
        if dev_id in cur:
            sim.add(Action.REMOVE_DEVICE, {"id": dev_id}, "changed in spec")
        sim.add(add, dev, "added to spec")


def _same_device(current: dict[str, Any], target: dict[str, Any]) -> bool:
    return bool(_covers(current, target))


def _covers(current: Any, target: Any) -> bool:
    """Whether ``current`` (from vm.info) says everything ``target`` says.

    The VMM fills in defaults of its own (queue sizes, flags), so only what the spec
    sets is compared; an absent or empty target value matches an absent or falsy one.
    """
    if isinstance(target, dict):
        cur = current if isinstance(current, dict) else {}
        return all(_covers(cur.get(k), v) for k, v in target.items())
    if isinstance(target, list):
        cur_list = current if isinstance(current, list) else []
        return len(cur_list) == len(target) and all(
            _covers(c, t) for c, t in zip(cur_list, target, strict=True))
    if target in (None, False) and current in (None, False):
        return True
    return bool(current == target)


def phase_of(desired: Desired, observed: Observed) -> Phase:
    """The user-facing phase for what was observed."""
    if observed.state == "Running":
        return Phase.RUNNING
    if observed.state == "Paused" and desired.state != "Sleeping":
        return Phase.PAUSED
    if desired.state == "Sleeping" and not observed.process:
        return Phase.SLEEPING
    if desired.state == "Off":
        return Phase.STOPPED
    return Phase.STARTING


#: Ready=False reasons of a VM that is what its spec asks for, only not serving: stopped,
#: paused or asleep on purpose, or up with a guest that says it is unhealthy. Whatever waits
#: for a spec change to land (a resize job, a GitSource health check) counts them as settled.
SETTLED_REASONS = frozenset({"Stopped", "Halted", "Paused", "Sleeping", "GuestUnhealthy"})


def ready_condition(desired: Desired, observed: Observed, converged: bool,
                    conditions: Sequence[Condition] = ()) -> tuple[bool, str, str]:
    """The VM's ``Ready`` condition (status, reason, message), with KubeVirt's meaning: the
    VM runs and is healthy. A VM stopped, paused or asleep as asked is not Ready (True would
    tell a user or a load balancer it serves) and says so plainly; its phase says the rest."""
    if not converged:
        return (False, "Converging",
                f"hypervisor state {observed.state or 'none'}, desired {desired.state}")
    spec = desired.spec
    if desired.state == "Off":
        if spec.run_strategy == RunStrategy.HALTED:
            return False, "Halted", "stopped as requested (runStrategy: Halted)"
        if spec.power_state == PowerState.STOPPED:
            return False, "Stopped", "stopped as requested (powerState: Stopped)"
        return (False, "Stopped", "the guest shut itself down; runStrategy Manual keeps it "
                "off until the spec changes (set powerState or restart it)")
    if desired.state == "Sleeping":
        return (False, "Sleeping", "asleep as requested (powerState: Sleeping): its memory "
                "is in a snapshot on the node")
    if desired.state == "Paused":
        return False, "Paused", "paused as requested (powerState: Paused)"
    guest = next((c for c in conditions if c.type == CONDITION_GUEST_HEALTHY), None)
    if spec.guest_agent is not None and guest is not None and guest.status == "False":
        return (False, "GuestUnhealthy",
                f"running, but the guest reports unhealthy: {guest.message or guest.reason}")
    return True, "Running", "running (hypervisor state Running)"


def ready_settled(ready: Mapping[str, Any] | None) -> bool:
    """Whether a VM's Ready condition (as stored) says it is what its spec asks for."""
    ready = ready or {}
    return ready.get("status") == "True" or ready.get("reason") in SETTLED_REASONS


def live_migratable(spec: VirtualMachineSpec, observed: Observed) -> tuple[bool, str, str]:
    """The ``LiveMigratable`` condition: (status, reason, message). Drains move a VM live
    only when it is True; otherwise they cold-move it (a restart) or hold."""
    stuck = spec.node_local_data()
    if stuck:
        return (False, "NodeLocalDisk",
                f"{stuck[0]}: cloud-hypervisor migrates memory, not disks, so the VM cannot "
                "run on another node without it")
    if not spec.live_migration:
        return (False, "LiveMigrationDisabled",
                "spec.liveMigration is false: the VM's memory is private to its VMM, so "
                "vm.migrate is refused and a drain restarts it elsewhere; set it true (the "
                "VM restarts once) to have it moved live")
    memory = (observed.config or {}).get("memory") or {}
    if observed.config is not None and not memory.get("shared"):
        return (False, "RecreatePending",
                "spec.liveMigration is true but this VMM was created without shared memory; "
                "it is being recreated with it")
    return (True, "SharedMemory",
            "memory is shared: vm.migrate and drains move the VM without a restart")


def vm_config(spec: VirtualMachineSpec, vsock_socket: str | None = None,
              root_disk: str | None = None, console_socket: str | None = None
              ) -> dict[str, Any]:
    """The upstream ``VmConfig`` body for ``vm.create``.

    ``serial: Socket`` needs ``console_socket``; without one the port goes nowhere (Null):
    cloud-hypervisor v54 panics on a Socket mode without a path."""
    payload = {
        k: v
        for k, v in {
            "kernel": spec.boot.kernel,
            "initramfs": spec.boot.initramfs,
            "cmdline": spec.boot.cmdline,
            "firmware": spec.boot.firmware,
        }.items()
        if v
    }
    memory: dict[str, Any] = {"size": spec.memory_bytes}
    if spec.max_memory_bytes > spec.memory_bytes:
        memory["hotplug_size"] = spec.max_memory_bytes - spec.memory_bytes
    if spec.live_migration:
        memory["shared"] = True
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": spec.cpus, "max_vcpus": spec.max_cpus or spec.cpus},
        "memory": memory,
        "payload": payload,
        "serial": _serial(spec.serial, console_socket),
        "console": {"mode": _mode(spec.console)},
    }
    disks = [{"id": d.name, "path": d.path, "readonly": d.readonly, "direct": d.direct}
             for d in spec.disks]
    if root_disk:
        # A qcow2 overlay: cloud-hypervisor opens its backing file only when told to.
        disks.insert(0, {"id": "root", "path": root_disk, "readonly": False, "direct": False,
                         "backing_files": True, "image_type": "Qcow2"})
    if disks:
        config["disks"] = disks
    if spec.interfaces:
        config["net"] = [
            {
                k: v
                for k, v in {
                    "id": n.name,
                    "tap": n.tap,
                    "mac": n.mac,
                    "ip": n.ip,
                    "mask": n.mask,
                }.items()
                if v
            }
            for n in spec.interfaces
        ]
    if spec.vsock is not None and vsock_socket:
        config["vsock"] = {"cid": spec.vsock.cid, "socket": vsock_socket}
    return config


def _mode(mode: ConsoleMode) -> str:
    return mode.value


def _serial(mode: SerialMode, console_socket: str | None) -> dict[str, str]:
    if mode == SerialMode.SOCKET:
        if console_socket:
            return {"mode": mode.value, "socket": console_socket}
        return {"mode": SerialMode.NULL.value}
    return {"mode": mode.value}


def console_socket_of(config: Mapping[str, Any] | None, state: str | None) -> str | None:
    """The serial console's socket path while the VMM holds it: cloud-hypervisor binds it
    at vm.create and removes it at vm.shutdown, so only a booted VM's is reported."""
    serial = (config or {}).get("serial") or {}
    if state not in BOOTED or serial.get("mode") != SerialMode.SOCKET.value:
        return None
    socket = serial.get("socket")
    return str(socket) if socket else None
