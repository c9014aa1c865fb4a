"""Health of what a GitSource applied (``spec.healthCheck``), as a pure function.

Like Flux's kustomize-controller health checks: after an apply, Ready waits for the applied
VirtualMachines to reach the state their spec asks for. A VM in phase Failed fails the check
at once; one still on its way (Pending, Scheduled, Starting, Unschedulable, crash-loop
backoff, status not yet for the current generation) fails it only once it has been so for
longer than the timeout, counted from the later of the apply that changed the GitSource's
objects and the VM's own last Ready/Scheduled transition (a VM that ran fine for a week and
is now being rescheduled gets the full timeout too). A VirtualMachinePool is healthy once
its status is for the current generation and every member is updated and available; a
template it refuses (ReplicaFailure InvalidTemplate/InvalidSpec) fails the check at once.
WorkerNodes and VmJobs are not checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from hyperfleet.reconcilers.conventions import (
    CONDITION_AVAILABLE,
    CONDITION_FAILURE,
    CONDITION_GUEST_HEALTHY,
    CONDITION_IMAGE_READY,
    CONDITION_PROGRESSING,
    CONDITION_READY,
    CONDITION_REPLICA_FAILURE,
    CONDITION_SCHEDULED,
    REASON_PROGRESSING,
)
from hyperfleet.reconcilers.models.common import parse_time

from .types import ObjectRef

MAX_SHOWN = 5

HEALTHY = "Healthy"
PROGRESSING = REASON_PROGRESSING
FAILED = "HealthCheckFailed"


@dataclass(frozen=True)
class VmHealth:
    ref: ObjectRef
    state: Literal["healthy", "progressing", "failed"]
    why: str = ""
    since: datetime | None = None  # when it last stopped being healthy, where status says

    def __str__(self) -> str:
        return f"{self.ref.namespace}/{self.ref.name} ({self.why})" if self.why else \
            f"{self.ref.namespace}/{self.ref.name}"


@dataclass(frozen=True)
class Health:
    """The verdict: ``status`` is the Healthy condition's ("True"/"False"/"Unknown")."""

    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str
    unhealthy: tuple[VmHealth, ...] = ()
    checked: int = 0


def expected_phases(spec: Mapping[str, Any], status: Mapping[str, Any],
                    generation: int | None) -> tuple[str, ...]:
    """The phases in which a VM is what its spec asks for."""
    if spec.get("runStrategy") == "Halted":
        return ("Stopped",)
    power = str(spec.get("powerState") or "Running")
    if power == "Running":
        # runStrategy Manual: a guest that stopped on its own stays off by design.
        halted = status.get("haltedGeneration")
        if spec.get("runStrategy") == "Manual" and halted is not None and halted == generation:
            return ("Running", "Stopped")
        return ("Running",)
    return (power,)


def _conditions(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(c.get("type")): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}


def _why(phase: str, status: Mapping[str, Any]) -> str:
    """A short reason from the VM's status: its message, else its first failing condition's."""
    conds = _conditions(status)
    for t in (CONDITION_FAILURE, CONDITION_SCHEDULED, CONDITION_READY, CONDITION_IMAGE_READY,
              CONDITION_GUEST_HEALTHY):
        c = conds.get(t)
        bad = c is not None and (c.get("status") == "True" if t == CONDITION_FAILURE
                                 else c.get("status") == "False")
        if c is not None and bad and c.get("message"):
            reason = str(c.get("reason") or t)
            return f"{phase}: {c.get('message')}" if reason == phase else \
                f"{phase}: {reason}: {c.get('message')}"
    if status.get("message"):
        return f"{phase}: {status.get('message')}"
    return phase


def _not_ready_since(status: Mapping[str, Any]) -> datetime | None:
    latest: datetime | None = None
    for t, c in _conditions(status).items():
        if t in (CONDITION_READY, CONDITION_SCHEDULED) and c.get("status") != "True" \
                and c.get("lastTransitionTime"):
            try:
                when = parse_time(str(c["lastTransitionTime"]))
            except ValueError:
                continue
            latest = when if latest is None or when > latest else latest
    return latest


def vm_health(ref: ObjectRef, body: Mapping[str, Any] | None) -> VmHealth:
    """One VM's state, before any timeout is applied."""
    if body is None:
        return VmHealth(ref, "progressing", "not found")
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    generation = meta.get("generation")
    phase = str(status.get("phase") or "Pending")
    since = _not_ready_since(status)
    if phase == "Failed":
        return VmHealth(ref, "failed", _why(phase, status), since)
    if meta.get("deletionTimestamp"):
        return VmHealth(ref, "progressing", "being deleted", since)
    if phase not in expected_phases(spec, status, generation):
        want = " or ".join(expected_phases(spec, status, generation))
        why = _why(phase, status)
        return VmHealth(ref, "progressing", why if phase == "Unschedulable" else f"{why}; want {want}",
                        since)
    # The right phase, but maybe still of the previous spec (a resize or reboot on its way).
    observed = status.get("observedGeneration")
    if generation is not None and (observed is None or int(observed) < int(generation)):
        return VmHealth(ref, "progressing", f"{phase}: status not yet for generation {generation}", since)
    if status.get("nextRestartTime"):
        return VmHealth(ref, "progressing", f"{phase}: restart pending after a crash", since)
    guest = _conditions(status).get(CONDITION_GUEST_HEALTHY)
    if guest is not None and guest.get("status") == "False":
        why = guest.get("message") or guest.get("reason") or "guest unhealthy"
        return VmHealth(ref, "progressing", f"{phase}: guest reports unhealthy: {why}", since)
    return VmHealth(ref, "healthy")


#: ReplicaFailure reasons nothing but a spec change fixes.
_POOL_FATAL = frozenset({"InvalidTemplate", "InvalidSpec"})


def pool_health(ref: ObjectRef, body: Mapping[str, Any] | None) -> VmHealth:
    """One VirtualMachinePool's state, as kstatus judges a Deployment: fully rolled out."""
    if body is None:
        return VmHealth(ref, "progressing", "not found")
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    want = int((body.get("spec") or {}).get("replicas", 1))
    conds = _conditions(status)
    failure = conds.get(CONDITION_REPLICA_FAILURE)
    since = _pool_not_available_since(conds)
    if failure is not None and failure.get("status") == "True":
        state: Literal["failed", "progressing"] = \
            "failed" if failure.get("reason") in _POOL_FATAL else "progressing"
        return VmHealth(ref, state, f"{failure.get('reason')}: {failure.get('message')}", since)
    if meta.get("deletionTimestamp"):
        return VmHealth(ref, "progressing", "being deleted", since)
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and (observed is None or int(observed) < int(generation)):
        return VmHealth(ref, "progressing", f"status not yet for generation {generation}", since)
    updated, available = int(status.get("updatedReplicas", 0)), \
        int(status.get("availableReplicas", 0))
    if updated < want or available < want or int(status.get("replicas", 0)) != want:
        return VmHealth(ref, "progressing", f"{updated} of {want} members updated, {available} "
                        "available", since)
    return VmHealth(ref, "healthy")


def _pool_not_available_since(conds: Mapping[str, Mapping[str, Any]]) -> datetime | None:
    for t in (CONDITION_AVAILABLE, CONDITION_PROGRESSING):
        c = conds.get(t)
        if c is not None and c.get("lastTransitionTime") and \
                (t == CONDITION_PROGRESSING or c.get("status") != "True"):
            try:
                return parse_time(str(c["lastTransitionTime"]))
            except ValueError:
                continue
    return None


#: The kinds the health check judges, and how.
_JUDGES = {"VirtualMachine": vm_health, "VirtualMachinePool": pool_health}


def _listing(vms: Sequence[VmHealth]) -> str:
    shown = "; ".join(str(v) for v in vms[:MAX_SHOWN])
    more = f"; and {len(vms) - MAX_SHOWN} more" if len(vms) > MAX_SHOWN else ""
    return shown + more


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def assess_health(applied: Iterable[ObjectRef], observed: Mapping[ObjectRef, Mapping[str, Any]],
                  now: datetime, since: datetime | None, timeout: float) -> Health:
    """Whether the applied VirtualMachines and VirtualMachinePools are healthy.

    ``applied``: the inventory (other kinds are skipped); ``observed``: live objects by
    reference (a missing one counts as not yet created); ``since``: when the last apply
    changed objects (None: long ago); ``timeout``: seconds one may stay on its way."""
    vms = sorted({r for r in applied if r.kind in _JUDGES}, key=lambda r: r.sort_key())
    if not vms:
        return Health("True", HEALTHY, "no VirtualMachines to check", checked=0)
    states = [_JUDGES[r.kind](r, observed.get(r)) for r in vms]
    noun = "VirtualMachines" if all(r.kind == "VirtualMachine" for r in vms) else \
        "VirtualMachines and pools"
    failed = [s for s in states if s.state == "failed"]
    waiting = [s for s in states if s.state == "progressing"]
    overdue = []
    for s in waiting:
        start = max((t for t in (since, s.since) if t is not None), default=None)
        if start is None or (now - start).total_seconds() >= timeout:
            overdue.append(s)
    n = len(vms)
    if failed or overdue:
        bad = failed + overdue
        parts = []
        if failed:
            parts.append(f"{len(failed)} failed: {_listing(failed)}")
        if overdue:
            parts.append(f"{len(overdue)} not healthy after {_duration(timeout)}: {_listing(overdue)}")
        return Health("False", FAILED, f"{len(bad)} of {n} {noun} unhealthy; "
                      + "; ".join(parts), tuple(bad), n)
    if waiting:
        return Health("Unknown", PROGRESSING, f"waiting for {len(waiting)} of {n} {noun} "
                      f"to become healthy: {_listing(waiting)}", tuple(waiting), n)
    return Health("True", HEALTHY, f"all {n} {noun} healthy", checked=n)


__all__ = ["FAILED", "HEALTHY", "PROGRESSING", "Health", "VmHealth", "assess_health",
           "expected_phases", "pool_health", "vm_health"]
