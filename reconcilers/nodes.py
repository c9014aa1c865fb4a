"""WorkerNode logic: readiness from heartbeats, allocatable from capacity and overcommit."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from .conventions import CONDITION_READY, REASON_AGENT_HEARTBEAT
from .conventions import LEASE_LABEL as LEASE_LABEL
from .models.common import format_quantity, now_utc, parse_quantity, parse_time, rfc3339
from .models.node import Provider
from .scheduler import NodeView

#: A node whose agent has not heartbeated for this long is NotReady.
DEFAULT_GRACE = timedelta(seconds=20)


def host_capacity() -> tuple[int, int]:
    """(cpus, memory bytes) of this host."""
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    return os.cpu_count() or 1, mem




def lease_name(node: str) -> str:
    return f"hyperfleet-node-{node}"


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return parse_time(value)


def heartbeat_age(body: Mapping[str, Any], now: datetime,
                  lease: datetime | None = None) -> timedelta | None:
    """Time since the agent last said it is alive, by its Lease or its status (None: never)."""
    beats = [b for b in (_parse_time((body.get("status") or {}).get("heartbeatTime")), lease)
             if b is not None]
    return now - max(beats) if beats else None


def is_ready(body: Mapping[str, Any], now: datetime, grace: timedelta = DEFAULT_GRACE,
             lease: datetime | None = None) -> bool:
    status = body.get("status") or {}
    age = heartbeat_age(body, now, lease)
    if age is None or age > grace:
        return False
    # The agent's own report (not the Ready condition, which the controller also writes).
    return any(
        p.get("name") == "cloud-hypervisor" and p.get("available") and p.get("healthy")
        for p in status.get("providers") or []
    )


def allocatable(body: Mapping[str, Any]) -> tuple[int, int]:
    """Capacity (or its override) scaled by the overcommit ratios."""
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    cap = spec.get("capacityOverride") or status.get("capacity") or {}
    over = spec.get("overcommit") or {}
    # Rounded before flooring: 100 * 1.15 is 114.99999999999999 in binary floating point.
    cpus = int(round(int(cap.get("cpus", 0)) * float(over.get("cpu", 1.0)), 6))
    mem = int(round(parse_quantity(str(cap.get("memory", "0"))) * float(over.get("memory", 1.0)),
                    3))
    return cpus, mem


def scheduling_state(spec: Mapping[str, Any]) -> str:
    """What ``kubectl get wn`` shows as SCHEDULING: a drain outranks a cordon (it implies one),
    so a single column says both, like SchedulingDisabled in ``kubectl get nodes``."""
    if spec.get("drain"):
        return "Draining"
    return "Cordoned" if spec.get("unschedulable") else "Enabled"


def node_view(
    body: Mapping[str, Any], now: datetime, grace: timedelta = DEFAULT_GRACE,
    lease: datetime | None = None,
) -> NodeView:
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    cpus, mem = allocatable(body)
    return NodeView(
        name=body["metadata"]["name"],
        pool=spec.get("pool") or "default",
        labels=dict(body["metadata"].get("labels") or {}),
        capabilities=frozenset(status.get("capabilities") or ()),
        cpus=cpus,
        memory=mem,
        ready=is_ready(body, now, grace, lease),
        unschedulable=bool(spec.get("unschedulable") or spec.get("drain")),
        images=frozenset(str(i.get("key")) for i in status.get("images") or ()
                         if isinstance(i, dict)),
    )


def heartbeat_status(
    cpus: int,
    memory: int,
    providers: list[Provider],
    capabilities: list[str],
    agent_version: str,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The status patch an agent writes on each heartbeat."""
    now = now or now_utc()
    ts = rfc3339(now)
    ch = next((p for p in providers if p.name == "cloud-hypervisor"), None)
    healthy = ch is not None and ch.available and ch.healthy
    return {
        "capacity": {"cpus": cpus, "memory": format_quantity(memory)},
        "capabilities": capabilities,
        "providers": [p.wire() for p in providers],
        "hypervisorVersion": ch.version if ch else None,
        "agentVersion": agent_version,
        "heartbeatTime": ts,
        "phase": "Ready" if healthy else "NotReady",
        "conditions": [
            {
                "type": CONDITION_READY,
                "status": "True" if healthy else "False",
                "reason": REASON_AGENT_HEARTBEAT if healthy else "HypervisorUnavailable",
                "message": "agent is heartbeating"
                if healthy
                else (ch.message if ch else "no cloud-hypervisor provider") or "",
                "lastTransitionTime": ts,
            }
        ],
    }


def merge_conditions(old: list[dict[str, Any]] | None, *new: dict[str, Any]
                     ) -> list[dict[str, Any]]:
    """``old`` with each of ``new`` replacing the condition of its type. The agent and the
    controller each own some WorkerNode condition types; a merge patch replaces the whole
    list, so each writer sends the others' conditions back unchanged."""
    types = {c["type"] for c in new}
    return [c for c in old or [] if c.get("type") not in types] + list(new)
