"""Moving VMs off drained or lost nodes without ever running one VM twice.

Drain: the controller asks the VM's agent to stop it (``status.evictFrom``); only once
the agent reports the VMM stopped is the VM unbound and placed again. Lost node (no
heartbeat for ``eviction_timeout``): the controller unbinds the VM itself; the lost
agent, if it ever returns, stops any VMM whose VM is no longer bound to it before doing
anything else (and may fence itself earlier, see the agent's ``--fence-after``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from .models.common import rfc3339
from .nodes import heartbeat_age


class Eviction(StrEnum):
    ASK_AGENT = "ask-agent"  # drain: the agent stops the VMM, then unbinds
    UNBIND = "unbind"  # node lost: unbind now, the node is presumed dead
    HOLD = "hold"  # drain cannot move it without losing state: the operator decides


@dataclass(frozen=True)
class EvictionDecision:
    vm: Mapping[str, Any]
    action: Eviction
    node: str
    reason: str


def evictions(
    vms: Sequence[Mapping[str, Any]],
    nodes: Mapping[str, Mapping[str, Any]],
    now: datetime,
    eviction_timeout: timedelta,
    leases: Mapping[str, datetime] | None = None,
    missing_since: Mapping[str, datetime] | None = None,
) -> list[EvictionDecision]:
    """``missing_since``: when the caller first saw each bound-to node absent from
    ``nodes``. A node absent with no Lease is lost only after ``eviction_timeout`` of
    that, so a view that is still filling (a controller that just started, or resumed
    after peering paused it) never evicts a healthy fleet."""
    out: list[EvictionDecision] = []
    for vm in vms:
        status = vm.get("status") or {}
        node_name = status.get("nodeName")
        if not node_name or vm["metadata"].get("deletionTimestamp"):
            continue
        if (vm.get("spec") or {}).get("evictionPolicy", "Reschedule") != "Reschedule":
            continue
        node = nodes.get(node_name)
        lease = (leases or {}).get(node_name)
        if node is None:
            # A deleted WorkerNode whose agent still renews its Lease is not a lost node
            # (the agent re-registers it); evicting now would run its VMs twice.
            since = lease if lease is not None else (missing_since or {}).get(node_name)
            if since is None:
                continue
            age: timedelta | None = now - since
        else:
            age = heartbeat_age(node, now, lease)
        if age is None or age > eviction_timeout:
            why = (f"WorkerNode {node_name} is gone and its agent silent" if node is None else
                   f"WorkerNode {node_name} has not heartbeated for "
                   f"{(age or eviction_timeout).total_seconds():.0f}s")
            out.append(EvictionDecision(vm, Eviction.UNBIND, node_name, why))
        elif node is not None and (node.get("spec") or {}).get("drain") \
                and status.get("evictFrom") != node_name:
            if asleep(vm):
                # Like `kubectl drain` and local storage: moving it would throw away the
                # memory snapshot that only this node has.
                out.append(EvictionDecision(vm, Eviction.HOLD, node_name, (
                    f"WorkerNode {node_name} is draining, but this VM sleeps with its memory "
                    "snapshot on that node: set spec.powerState Running to wake it (then "
                    "live-migrate it), or Stopped to let it move and cold-boot elsewhere")))
                continue
            out.append(EvictionDecision(vm, Eviction.ASK_AGENT, node_name,
                                        f"WorkerNode {node_name} is draining"))
    return out


def asleep(vm: Mapping[str, Any]) -> bool:
    """Sleeping, or on its way to sleep: its state is (about to be) a snapshot on disk."""
    return (vm.get("spec") or {}).get("powerState") == "Sleeping" \
        or (vm.get("status") or {}).get("phase") == "Sleeping"


def unbound_status(reason: str, message: str, now: datetime) -> dict[str, Any]:
    """Status patch that returns a VM to the scheduler (nulls delete the fields)."""
    ts = rfc3339(now)
    return {
        "nodeName": None,
        "evictFrom": None,
        "phase": "Pending",
        "message": message,
        "hypervisor": None,
        "apiSocket": None,
        "snapshot": None,  # it stays on the node it was taken on
        "conditions": [
            {"type": "Scheduled", "status": "False", "reason": reason, "message": message,
             "lastTransitionTime": ts},
            {"type": "Ready", "status": "False", "reason": reason, "message": message,
             "lastTransitionTime": ts},
        ],
    }
