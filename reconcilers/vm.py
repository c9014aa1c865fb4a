"""Pure VM reconcile: desired spec + observed VMM state -> the actions that converge them.

No I/O here: the node agent observes, calls :func:`reconcile`, executes the actions in
order (stopping at the first failure), and observes again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .models.vm import ConsoleMode, Phase, PowerState, RunStrategy, VirtualMachineSpec


class Action(StrEnum):
    SPAWN = "spawn"  # start the VMM process
    CREATE = "vm.create"
    BOOT = "vm.boot"
    PAUSE = "vm.pause"
    RESUME = "vm.resume"
    SHUTDOWN = "vm.shutdown"
    WAIT = "wait"  # process up, socket not yet: nothing to do but look again


@dataclass(frozen=True)
class Observed:
    """What the agent saw: is there a VMM process, and what does vm.info say."""

    process: bool
    socket: bool = False
    state: str | None = None  # vm.info state; None while no VM is created


def desired_state(spec: VirtualMachineSpec) -> str:
    """The VMM state the spec asks for: Running, Paused or Off."""
    if spec.run_strategy == RunStrategy.HALTED or spec.power_state == PowerState.STOPPED:
        return "Off"
    return "Paused" if spec.power_state == PowerState.PAUSED else "Running"


def reconcile(spec: VirtualMachineSpec, observed: Observed) -> list[Action]:
    """Every action, in order, that takes ``observed`` to the spec's desired state."""
    want = desired_state(spec)
    if want == "Off":
        if observed.process and observed.state in ("Running", "Paused"):
            return [Action.SHUTDOWN]
        return []
    plan: list[Action] = []
    state = observed.state
    if not observed.process:
        plan.append(Action.SPAWN)
        state = None
    elif not observed.socket:
        return [Action.WAIT]
    if state is None:
        plan.append(Action.CREATE)
        state = "Created"
    if state in ("Created", "Shutdown"):
        plan.append(Action.BOOT)
        state = "Running"
    if state == "BreakPoint":
        plan.append(Action.RESUME)
        state = "Running"
    if want == "Running" and state == "Paused":
        plan.append(Action.RESUME)
    elif want == "Paused" and state == "Running":
        plan.append(Action.PAUSE)
    return plan


def phase_of(spec: VirtualMachineSpec, observed: Observed) -> Phase:
    """The user-facing phase for what was observed."""
    if observed.state == "Running":
        return Phase.RUNNING
    if observed.state == "Paused":
        return Phase.PAUSED
    if desired_state(spec) == "Off":
        return Phase.STOPPED
    return Phase.STARTING


def vm_config(spec: VirtualMachineSpec, vsock_socket: str | None = None) -> dict[str, Any]:
    """The upstream ``VmConfig`` body for ``vm.create``."""
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
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": spec.cpus, "max_vcpus": spec.max_cpus or spec.cpus},
        "memory": {"size": spec.memory_bytes},
        "payload": payload,
        "serial": {"mode": _mode(spec.serial)},
        "console": {"mode": _mode(spec.console)},
    }
    if spec.disks:
        config["disks"] = [
            {"id": d.name, "path": d.path, "readonly": d.readonly, "direct": d.direct}
            for d in spec.disks
        ]
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
