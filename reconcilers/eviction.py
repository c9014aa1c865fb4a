"""Moving VMs off drained or lost nodes without ever running one VM twice.

Drain, like ``kubectl drain`` with a PodDisruptionBudget that never lets a VM go down
for nothing: a VM that can migrate live is moved by a ``vm.migrate`` VmJob to a node the
scheduler picks; any other VM is cold-moved (the controller asks its agent to stop it,
``status.evictFrom``, and only once the VMM is stopped is it unbound and placed again),
but only when another node can take it. Otherwise the drain holds that VM and says why
on the WorkerNode (``DrainBlocked``). Lost node (no
heartbeat for ``eviction_timeout``): the controller unbinds the VM itself; the lost
agent, if it ever returns, stops any VMM whose VM is no longer bound to it before doing
anything else (and may fence itself earlier, see the agent's ``--fence-after``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from .conventions import CONDITION_LIVE_MIGRATABLE, CONDITION_READY, CONDITION_SCHEDULED
from .conventions import DRAIN_LABEL as DRAIN_LABEL
from .models.common import rfc3339
from .models.vm import Phase, node_local_reasons
from .nodes import heartbeat_age
from .scheduler import NodeView, Policy, VmView, schedule, vm_view

#: Live migrations a draining node sends at once (KubeVirt's default per node is 2 too):
#: each one copies the VM's whole memory over the network.
PARALLEL_DRAIN_MIGRATIONS = 2
_TERMINAL = ("Succeeded", "Failed", "TimedOut", "Cancelled")


class Eviction(StrEnum):
    ASK_AGENT = "ask-agent"  # drain: the agent stops the VMM, then unbinds
    UNBIND = "unbind"  # node lost: unbind now, the node is presumed dead
    HOLD = "hold"  # drain cannot move it without losing state: the operator decides
    MIGRATE = "migrate"  # drain: create the vm.migrate VmJob to ``destination``
    WAIT = "wait"  # drain: its migration is under way, or queued behind others


@dataclass(frozen=True)
class EvictionDecision:
    vm: Mapping[str, Any]
    action: Eviction
    node: str
    reason: str
    destination: str | None = None
    #: MIGRATE only: a finished migration job of an earlier drain holds the name; delete it
    replace_job: bool = False
    event: str = "DrainBlocked"  # HOLD: the Event reason that tells the user


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
            stuck = node_local(vm)
            if stuck:
                # Placed elsewhere it would boot without what it wrote: it waits for its node.
                out.append(EvictionDecision(vm, Eviction.HOLD, node_name, (
                    f"{why}, but the VM's data is on that node alone ({stuck[0]}); it waits "
                    "for the node to return. To give that data up, delete the VM and create "
                    "it again"), event="WaitingForNode"))
                continue
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


def drain_job_name(vm: Mapping[str, Any], node: str) -> str:
    """The drain's vm.migrate VmJob for this VM: one name per (node, VM), so a controller
    that restarts before it sees its own create cannot start a second migration."""
    meta = vm["metadata"]
    digest = hashlib.sha256(f"{node}/{meta.get('uid') or meta['name']}".encode()).hexdigest()
    return f"drain-{meta['name'][:40].rstrip('-.')}-{digest[:10]}"


def node_local(vm: Mapping[str, Any]) -> list[str]:
    """Why the VM cannot leave its node (see node_local_reasons)."""
    return node_local_reasons(vm.get("spec") or {})


def live_migratable(vm: Mapping[str, Any]) -> bool:
    """Running or paused, declared with shared memory, and its agent does not say no."""
    status = vm.get("status") or {}
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == CONDITION_LIVE_MIGRATABLE),
                None)
    return bool((vm.get("spec") or {}).get("liveMigration")) \
        and (status.get("hypervisor") or {}).get("state") in ("Running", "Paused") \
        and (cond is None or cond.get("status") == "True")


def plan_drain(
    decisions: Sequence[EvictionDecision],
    nodes: Sequence[NodeView],
    placed: Sequence[VmView],
    jobs: Mapping[str, Mapping[str, Any]],
    policy: Policy | str = Policy.SPREAD,
) -> list[EvictionDecision]:
    """Turn the drain's ASK_AGENT decisions into how each VM leaves, or why it stays.

    ``jobs``: VmJobs by namespace/name (the drain's own are found by
    :func:`drain_job_name`). ``placed``: every bound VM, for capacity. A VM that can move
    live gets a destination from the scheduler among nodes offering ``migration``; any
    other VM is cold-moved only if the scheduler can place it elsewhere; a stopped VM
    always goes (nothing runs to lose). Capacity taken by the migrations under way and
    chosen in this pass is counted, so two VMs are never sent to the one free slot.
    """
    out = [d for d in decisions if d.action != Eviction.ASK_AGENT]
    asks = [d for d in decisions if d.action == Eviction.ASK_AGENT]
    views = {d.node + "/" + _key(d.vm): vm_view(d.vm) for d in asks}
    taken: list[VmView] = list(placed)
    sending: Counter[str] = Counter()
    live: list[EvictionDecision] = []
    cold: list[EvictionDecision] = []
    for d in asks:
        job = jobs.get(f"{_key(d.vm).split('/')[0]}/{drain_job_name(d.vm, d.node)}")
        phase = ((job or {}).get("status") or {}).get("phase")
        if job is not None and phase not in _TERMINAL:
            dest = _destination(job)
            sending[d.node] += 1
            if dest:
                taken.append(replace(views[d.node + "/" + _key(d.vm)],
                                     key=f"{_key(d.vm)}@{dest}", node=dest))
            out.append(replace(d, action=Eviction.WAIT, destination=dest,
                               reason=f"live-migrating to {dest} (VmJob {job['metadata']['name']})"))
        elif job is not None and phase != "Succeeded":
            error = (job.get("status") or {}).get("lastError") or phase
            out.append(replace(d, action=Eviction.HOLD, reason=(
                f"its live migration (VmJob {job['metadata']['name']}) ended {phase}: {error}. "
                "Delete that VmJob to try again, or set spec.liveMigration false to let the "
                "drain restart the VM elsewhere")))
        elif stuck := node_local(d.vm):
            out.append(replace(d, action=Eviction.HOLD, reason=(
                f"its data is on {d.node} alone ({stuck[0]}): moving it would boot it "
                "without what it wrote")))
        elif live_migratable(d.vm):
            live.append(replace(d, replace_job=job is not None))
        elif ((d.vm.get("status") or {}).get("hypervisor") or {}).get("state") \
                not in ("Running", "Paused"):
            out.append(d)  # nothing runs: unbinding loses nothing
        else:
            cold.append(d)

    if not live and not cold:
        return out  # (scheduling costs O(fleet) even with nothing to place)
    placements = schedule(
        [replace(views[d.node + "/" + _key(d.vm)], node=None,
                 required_capabilities=views[d.node + "/" + _key(d.vm)].required_capabilities
                 | {"migration"}) for d in live],
        nodes, taken, policy=policy)
    for d in sorted(live, key=lambda d: _key(d.vm)):
        key = _key(d.vm)
        dest = placements.placements.get(key)
        if dest is None:
            out.append(replace(d, action=Eviction.HOLD, reason=(
                f"it can only move live, and no node can receive it: "
                f"{placements.unschedulable.get(key, 'no node fits')}")))
            continue
        taken.append(replace(views[d.node + "/" + key], node=dest))
        if sending[d.node] >= PARALLEL_DRAIN_MIGRATIONS:
            out.append(replace(d, action=Eviction.WAIT, destination=dest, reason=(
                f"queued: {sending[d.node]} live migrations off {d.node} are under way")))
            continue
        sending[d.node] += 1
        out.append(replace(d, action=Eviction.MIGRATE, destination=dest,
                           reason=f"WorkerNode {d.node} is draining: live-migrating to {dest}"))

    fits = schedule([replace(views[d.node + "/" + _key(d.vm)], node=None) for d in cold],
                    nodes, taken, policy=policy)
    for d in cold:
        key = _key(d.vm)
        if key in fits.placements:
            out.append(replace(d, reason=(
                f"WorkerNode {d.node} is draining and the VM cannot move live "
                "(spec.liveMigration false): it restarts on another node")))
        else:
            out.append(replace(d, action=Eviction.HOLD, reason=(
                f"it cannot move live (spec.liveMigration false) and no other node can "
                f"take it: {fits.unschedulable.get(key, 'no node fits')}. Add capacity, "
                "uncordon a node, or stop the VM")))
    return out


def drain_blocked(node: str, held: Sequence[EvictionDecision], left: int
                  ) -> tuple[bool, str, str]:
    """The WorkerNode's DrainBlocked condition: (status, reason, message)."""
    mine = sorted((d for d in held if d.node == node), key=lambda d: _key(d.vm))
    if not mine:
        return (False, "Draining" if left else "Drained",
                f"{left} VM(s) still to move off {node}" if left
                else f"no VM is bound to {node}")
    shown = "; ".join(f"{_key(d.vm)}: {d.reason}" for d in mine[:5])
    more = f"; and {len(mine) - 5} more" if len(mine) > 5 else ""
    return True, "VmsCannotMove", f"{len(mine)} VM(s) cannot leave {node}: {shown}{more}"


def _key(vm: Mapping[str, Any]) -> str:
    meta = vm["metadata"]
    return f"{meta.get('namespace') or 'default'}/{meta['name']}"


def _destination(job: Mapping[str, Any]) -> str | None:
    data = (((job.get("spec") or {}).get("payload") or {}).get("data") or {})
    dest = data.get("destinationNode")
    return str(dest) if dest else None


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
        "phase": Phase.PENDING.value,
        "message": message,
        "hypervisor": None,
        "apiSocket": None,
        "snapshot": None,  # it stays on the node it was taken on
        "conditions": [
            {"type": CONDITION_SCHEDULED, "status": "False", "reason": reason, "message": message,
             "lastTransitionTime": ts},
            {"type": CONDITION_READY, "status": "False", "reason": reason, "message": message,
             "lastTransitionTime": ts},
        ],
    }
