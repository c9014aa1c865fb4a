"""The controller's view of the fleet and the decisions of one pass over it, as plain
functions: which agents are alive (by the controller's own clock), which nodes are in
trouble, and the status each VM and WorkerNode should get.

``operator/controller.py`` feeds the view from watch events, runs the passes and writes
what these return; nothing here calls the API server, so each decision is tested with
plain dicts (tests/unit/test_fleet.py).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from .conventions import CONDITION_READY, CONDITION_SCHEDULED, REASON_AGENT_HEARTBEAT
from .eviction import Eviction, EvictionDecision, drain_blocked, unbound_status
from .jobs.routing import WorkerView
from .models.common import format_quantity, rfc3339, version_of
from .models.vm import Phase
from .nodes import allocatable, heartbeat_age, is_ready, merge_conditions, scheduling_state
from .scheduler import NodeView, VmView

#: On a draining WorkerNode: which of its VMs cannot leave, and why (only the controller
#: writes or reads it).
CONDITION_DRAIN_BLOCKED = "DrainBlocked"

Body = Mapping[str, Any]

# ------------------------------------------------------------------ the view


def object_key(body: Body) -> str:
    """``namespace/name``, how the view keys namespaced objects."""
    meta = body["metadata"]
    return f"{meta.get('namespace') or 'default'}/{meta['name']}"


def merge(store: dict[str, dict[str, Any]], listed: dict[str, dict[str, Any]],
          list_version: str) -> None:
    """Make ``store`` what a list taken at ``list_version`` says, except where a watch event
    already brought something newer (etcd resourceVersions are increasing integers, which
    the API server does not promise but every etcd-backed one gives). ``listed`` holds
    compact copies already (``Kube.snapshot(..., each=compact)`` makes them page by page)
    and is stored as it is."""
    at = version_of({"metadata": {"resourceVersion": list_version}})
    for key in [k for k, body in store.items() if k not in listed and version_of(body) <= at]:
        del store[key]  # deleted while no watch event could tell us
    for key, body in listed.items():
        if _not_older(store, key, body):
            store[key] = body


def merge_one(store: dict[str, dict[str, Any]], key: str, body: Body,
              compacted: bool = False) -> None:
    """Store a compact copy of ``body`` (``body`` itself if ``compacted`` already) unless a
    newer version of it is already there."""
    if _not_older(store, key, body):
        store[key] = cast(dict[str, Any], body) if compacted else compact(body)


def _not_older(store: Mapping[str, Mapping[str, Any]], key: str, body: Body) -> bool:
    have = store.get(key)
    return have is None or version_of(have) <= version_of(body)


def compact(body: Body) -> dict[str, Any]:
    """A copy of an object for the controller's view, which holds the whole fleet: without
    managedFields (a third of a VM, read by nobody here), and with keys and short strings
    interned, so the field names, phases, reasons and node names repeated in every object
    are stored once (about half the memory of a plain deep copy, and faster to make)."""
    meta = body.get("metadata")
    if isinstance(meta, Mapping) and "managedFields" in meta:  # dropped before, not after
        body = {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
    return cast(dict[str, Any], _compact(body))


def _compact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {sys.intern(k) if isinstance(k, str) else k: _compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, str) and len(value) <= 64:
        return sys.intern(value)
    return value


class Liveness:
    """When each node's agent was last seen alive, by the controller's clock.

    Lease renewTime and status.heartbeatTime come from the agent's clock; like the node
    lifecycle controller, only count when we saw them change, so a skewed node clock
    neither keeps a dead node Ready nor evicts a live one."""

    def __init__(self) -> None:
        self._marks: dict[str, tuple[Any, datetime]] = {}

    def update(self, nodes: Mapping[str, dict[str, Any]], leases: Mapping[str, datetime],
               now: datetime) -> tuple[dict[str, dict[str, Any]], dict[str, datetime]]:
        """Node bodies without the agent's heartbeatTime, and when each agent was last
        seen alive."""
        alive: dict[str, datetime] = {}
        marks: dict[str, tuple[Any, datetime]] = {}
        for name in set(nodes) | set(leases):
            beat = ((nodes.get(name) or {}).get("status") or {}).get("heartbeatTime")
            mark = (leases.get(name), beat)
            if mark == (None, None):
                continue  # the agent never reported
            prev = self._marks.get(name)
            marks[name] = prev if prev is not None and prev[0] == mark else (mark, now)
            alive[name] = marks[name][1]
        self._marks = marks
        bodies = {n: {**b, "status": {k: v for k, v in (b.get("status") or {}).items()
                                      if k != "heartbeatTime"}}
                  for n, b in nodes.items()}
        return bodies, alive


def pass_gap(took: float) -> float:
    """Seconds to wait after a pass that took ``took`` before the next: twice its cost,
    at least 20 ms (a small fleet reacts at once), at most 1 s (placement latency)."""
    return min(1.0, max(0.02, 2 * took))


# ------------------------------------------------------------------ placement


def pending_and_placed(views: Sequence[VmView], vms: Mapping[str, Body]
                       ) -> tuple[list[VmView], list[VmView]]:
    """VMs to place, and VMs bound to a node. A VM being deleted still runs until its
    agent's finalizer stopped it: it keeps its place in the capacity count (as a
    terminating pod does), and is not placed if it has none."""
    pending = [v for v in views
               if not v.node and not vms[v.key]["metadata"].get("deletionTimestamp")]
    return pending, [v for v in views if v.node]


def bound_status(body: Body, node: str, ts: str) -> dict[str, Any]:
    """The status patch binding a VM to ``node`` (its agent takes over from there)."""
    return {
        "nodeName": node,
        "phase": Phase.SCHEDULED.value,
        "message": None,
        "conditions": [
            c for c in (body.get("status") or {}).get("conditions") or []
            if c.get("type") != CONDITION_SCHEDULED
        ] + [{
            "type": CONDITION_SCHEDULED, "status": "True", "reason": "Bound",
            "message": f"placed on {node}", "lastTransitionTime": ts,
        }],
    }


def unschedulable_status(body: Body, reason: str, ts: str) -> dict[str, Any] | None:
    """The status patch saying why a VM has no node; None if it already says so."""
    status = body.get("status") or {}
    if status.get("phase") == Phase.UNSCHEDULABLE and status.get("message") == reason:
        return None
    return {
        "phase": Phase.UNSCHEDULABLE.value,
        "message": reason,
        "conditions": [{
            "type": CONDITION_SCHEDULED, "status": "False", "reason": "Unschedulable",
            "message": reason, "lastTransitionTime": ts,
        }],
    }


# ------------------------------------------------------------------ nodes and evictions


def node_health(body: Body, now: datetime, grace: timedelta, alive_at: datetime | None
                ) -> tuple[bool, dict[str, Any]] | None:
    """(ready, status patch) when a WorkerNode's phase must change: like the node lifecycle
    controller, Ready follows the agent's Lease. None when the phase already agrees."""
    status = body.get("status") or {}
    ready = is_ready(body, now, grace, alive_at)
    if (status.get("phase") == "Ready") == ready:
        return None
    ts = rfc3339(now)
    age = heartbeat_age(body, now, alive_at)
    cond = {"type": CONDITION_READY, "status": "True", "reason": REASON_AGENT_HEARTBEAT,
            "message": "agent is heartbeating", "lastTransitionTime": ts} if ready else {
        "type": CONDITION_READY, "status": "False", "reason": "HeartbeatLapsed",
        "message": f"no heartbeat for {age.total_seconds():.0f}s" if age
        else "the agent never reported", "lastTransitionTime": ts}
    return ready, {"status": {"phase": "Ready" if ready else "NotReady",
                              "conditions": merge_conditions(status.get("conditions"), cond)}}


def troubled_nodes(bound_to: Iterable[str], bodies: Mapping[str, Body],
                   alive: Mapping[str, datetime], now: datetime, timeout: timedelta) -> set[str]:
    """Nodes (of those VMs are bound to) that are absent, draining, or silent past
    the eviction timeout: where ``evictions`` may decide something."""
    out = set()
    for name in bound_to:
        body = bodies.get(name)
        if body is None or (body.get("spec") or {}).get("drain"):
            out.add(name)
            continue
        age = heartbeat_age(body, now, alive.get(name))
        if age is None or age > timeout:
            out.add(name)
    return out


def on_nodes(placed: Iterable[VmView], nodes: set[str], vms: Mapping[str, Body]
             ) -> list[Body]:
    """Bodies of the VMs bound to one of ``nodes`` and not being deleted: only these can
    have anything to evict, so planning costs what those nodes hold, not the fleet."""
    return [b for v in placed if v.node in nodes
            and not (b := vms[v.key])["metadata"].get("deletionTimestamp")]


def missing_since(previous: Mapping[str, datetime], vms: Iterable[Body],
                  bodies: Mapping[str, Body], now: datetime) -> dict[str, datetime]:
    """Since when each node that VMs are bound to has had no WorkerNode (kept from the
    previous pass while it stays absent)."""
    absent = {n for vm in vms if (n := (vm.get("status") or {}).get("nodeName"))
              and n not in bodies}
    return {n: previous.get(n, now) for n in absent}


def eviction_status(d: EvictionDecision, now: datetime) -> tuple[dict[str, Any], str]:
    """(status patch, Event reason) for an ASK_AGENT or UNBIND decision: a drain asks the
    VM's agent to stop it first; a lost node's VMs are unbound at once."""
    if d.action == Eviction.ASK_AGENT:
        return {"phase": Phase.EVICTING.value, "evictFrom": d.node, "message": d.reason}, \
            "Evicting"
    return unbound_status("NodeLost", f"{d.reason}; placing it again", now), "NodeLost"


def drain_conditions(bodies: Mapping[str, Body], vms: Iterable[Body],
                     decisions: Iterable[EvictionDecision], ts: str
                     ) -> dict[str, list[dict[str, Any]]]:
    """The new conditions of each WorkerNode whose DrainBlocked must change: on a draining
    node, which VMs cannot leave and why; gone from one no longer draining."""
    held = [d for d in decisions if d.action == Eviction.HOLD]
    left = Counter((vm.get("status") or {}).get("nodeName") for vm in vms)
    out = {}
    for name, body in bodies.items():
        conditions = (body.get("status") or {}).get("conditions") or []
        old = next((c for c in conditions if c.get("type") == CONDITION_DRAIN_BLOCKED), None)
        if not (body.get("spec") or {}).get("drain"):
            if old is not None:
                out[name] = [c for c in conditions if c.get("type") != CONDITION_DRAIN_BLOCKED]
            continue
        blocked, reason, message = drain_blocked(name, held, left[name])
        cond = {"type": CONDITION_DRAIN_BLOCKED, "status": str(blocked), "reason": reason,
                "message": message, "lastTransitionTime": ts}
        if old is not None and all(old.get(k) == cond[k] for k in ("status", "reason", "message")):
            continue
        if old is not None and old.get("status") == cond["status"]:
            cond["lastTransitionTime"] = old.get("lastTransitionTime", ts)
        out[name] = merge_conditions(conditions, cond)
    return out


def allocation_updates(nodes: Mapping[str, Body], placed: Iterable[VmView], due: bool
                       ) -> dict[str, dict[str, Any]]:
    """The status each WorkerNode should get where it differs: scheduling (a cordon shows
    at once) and, when ``due``, allocated/allocatable/vmCount (informational)."""
    per_node: dict[str, list[int]] = {n: [0, 0, 0] for n in nodes}
    for vm in placed if due else ():
        if vm.node in per_node:
            acc = per_node[vm.node]
            acc[0] += vm.cpus
            acc[1] += vm.memory
            acc[2] += 1
    out = {}
    for name, (cpus, mem, count) in per_node.items():
        body = nodes[name]
        status = body.get("status") or {}
        want: dict[str, Any] = {"scheduling": scheduling_state(body.get("spec") or {})}
        if due and status.get("capacity"):  # else the agent has not reported yet
            a_cpus, a_mem = allocatable(body)
            want |= {
                "allocated": {"cpus": cpus, "memory": format_quantity(mem)},
                "allocatable": {"cpus": a_cpus, "memory": format_quantity(a_mem)},
                "vmCount": count,
            }
        if all(status.get(k) == v for k, v in want.items()):
            continue
        out[name] = want
    return out


# ------------------------------------------------------------------ VmJob routing


def job_workers(nodes: Iterable[NodeView]) -> list[WorkerView]:
    """The nodes as VmJob routing sees them. Cordoned/draining is not lost: such a node
    keeps its running jobs and its VMs' jobs (a migration off a draining node); it only
    gets no new placements."""
    return [WorkerView(n.name, n.pool, n.capabilities, n.ready, schedulable=not n.unschedulable)
            for n in nodes]


def vm_hosts(vms: Mapping[str, Body]) -> dict[str, str]:
    """Where each VM with a running or paused VMM is, for the jobs that act on it."""
    return {
        k: b["status"]["nodeName"] for k, b in vms.items()
        if (b.get("status") or {}).get("nodeName")
        and ((b["status"].get("hypervisor") or {}).get("state") in ("Running", "Paused"))
    }
