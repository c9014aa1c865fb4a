"""VM placement as a pure, deterministic function of (pending VMs, nodes, placed VMs).

The controller builds the views from the API objects, calls :func:`schedule`, and binds
each placement with a resourceVersion-conditional status patch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .models.common import parse_quantity


@dataclass(frozen=True)
class NodeView:
    name: str
    pool: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    cpus: int = 0  # allocatable vCPUs (after overcommit)
    memory: int = 0  # allocatable bytes (after overcommit)
    ready: bool = True
    unschedulable: bool = False


@dataclass(frozen=True)
class VmView:
    key: str  # namespace/name
    cpus: int
    memory: int
    labels: Mapping[str, str] = field(default_factory=dict)
    pool: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    required_capabilities: frozenset[str] = frozenset()
    affinity: tuple[Mapping[str, str], ...] = ()
    anti_affinity: tuple[Mapping[str, str], ...] = ()
    node: str | None = None


@dataclass
class ScheduleResult:
    placements: dict[str, str] = field(default_factory=dict)  # vm key -> node name
    unschedulable: dict[str, str] = field(default_factory=dict)  # vm key -> reason


def schedule(
    pending: Sequence[VmView], nodes: Sequence[NodeView], placed: Sequence[VmView]
) -> ScheduleResult:
    """First fit in name order (the capability-aware scheduler replaces this)."""
    free = {n.name: [n.cpus, n.memory] for n in nodes}
    for vm in placed:
        if vm.node in free:
            free[vm.node][0] -= vm.cpus
            free[vm.node][1] -= vm.memory
    result = ScheduleResult()
    ordered = sorted(nodes, key=lambda n: n.name)
    for vm in sorted(pending, key=lambda v: v.key):
        reasons: dict[str, int] = {}
        for node in ordered:
            why = _reject(vm, node, free[node.name])
            if why is None:
                free[node.name][0] -= vm.cpus
                free[node.name][1] -= vm.memory
                result.placements[vm.key] = node.name
                break
            reasons[why] = reasons.get(why, 0) + 1
        else:
            summary = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
            result.unschedulable[vm.key] = (
                f"0/{len(nodes)} nodes are available: {summary or 'no WorkerNodes registered'}"
            )
    return result


def _reject(vm: VmView, node: NodeView, free: list[int]) -> str | None:
    if not node.ready:
        return "not Ready"
    if node.unschedulable:
        return "cordoned"
    if vm.pool and node.pool != vm.pool:
        return f"not in pool {vm.pool}"
    if any(node.labels.get(k) != v for k, v in vm.node_selector.items()):
        return "not matching nodeSelector"
    missing = vm.required_capabilities - node.capabilities
    if missing:
        return f"missing capability {','.join(sorted(missing))}"
    if free[0] < vm.cpus:
        return "short of cpus"
    if free[1] < vm.memory:
        return "short of memory"
    return None


def vm_view(body: Mapping[str, Any]) -> VmView:
    """Scheduler input from a VirtualMachine object as the API server returns it."""
    meta = body.get("metadata", {})
    spec = body.get("spec", {})
    aff = spec.get("affinity") or {}
    return VmView(
        key=f"{meta.get('namespace') or 'default'}/{meta['name']}",
        cpus=int(spec.get("cpus", 1)),
        memory=parse_quantity(str(spec.get("memory", "0"))),
        labels=dict(meta.get("labels") or {}),
        pool=spec.get("workerPool"),
        node_selector=dict(spec.get("nodeSelector") or {}),
        required_capabilities=frozenset(spec.get("requiredCapabilities") or ()),
        affinity=tuple(aff.get("vmAffinity") or ()),
        anti_affinity=tuple(aff.get("vmAntiAffinity") or ()),
        node=(body.get("status") or {}).get("nodeName"),
    )
