"""The VirtualMachinePool planner: from a pool and its members, what to create and delete.

Pure (no API calls, time passed in), so every rule is unit-tested; ``operator/pools.py``
feeds it from watch events and carries the actions out.

Rules, in the order they apply:

* Members are ``<pool>-<ordinal>``. A new member takes the lowest ordinal no member (nor
  another VM of that name) holds; scaling down removes the highest ordinals first.
* A member being deleted still holds its name and its node's capacity until its agent
  stopped it: it counts towards ``replicas + maxSurge`` (like a terminating StatefulSet
  pod), so a replacement waits for it and comes back under the same name.
* RollingUpdate: members whose template hash is not the current one are deleted, never
  leaving fewer than ``replicas - maxUnavailable`` available (unavailable ones first, as
  they cost nothing), then recreated from the new template, never more than
  ``replicas + maxSurge`` members at once. Delete + recreate, because a VM does not apply
  every spec change live.
* OnDelete: members are created from the current template, old ones stay until someone
  deletes them.
* A template whose members would share a writable disk or a fixed TAP/MAC/IP is refused:
  nothing is created or deleted until it is fixed (ReplicaFailure says what to change).
* A pool being deleted deletes every member; its finalizer goes once all are deleting.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from .conventions import (
    CONDITION_AVAILABLE,
    CONDITION_PROGRESSING,
    CONDITION_READY,
    CONDITION_REPLICA_FAILURE,
    POOL_FINALIZER,
)
from .models.common import API_VERSION, Condition, set_condition
from .models.pool import (
    POOL_LABEL,
    REVISION_LABEL,
    StrategyType,
    VirtualMachinePoolSpec,
    resolve_int_or_percent,
    template_problems,
)

#: The pool controller's finalizer: deleting a pool deletes its members first (there may
#: be no garbage collector, e.g. the local API server, and members can outlive a GC's
#: foreground wait when nodes are slow to stop them).
FINALIZER = POOL_FINALIZER
POOL_KIND = "VirtualMachinePool"
MAX_NAMED = 5  # members named in a condition message before "and N more"


def revision_of(template: Mapping[str, Any]) -> str:
    """The template's hash (10 hex digits, a label value): equal hashes, identical members."""
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def selector_string(match_labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))


def ordinal_of(pool: str, name: str) -> int | None:
    """``web-3`` of pool ``web`` -> 3; None for any other name."""
    m = re.fullmatch(re.escape(pool) + r"-(0|[1-9][0-9]*)", name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Member:
    """What the planner needs of one member VM."""

    name: str
    ordinal: int
    revision: str | None
    phase: str
    ready: bool
    terminating: bool
    message: str = ""

    def available(self, sleeping_ok: bool) -> bool:
        if self.terminating or not self.ready:
            return False
        return self.phase == "Running" or (sleeping_ok and self.phase == "Sleeping")


def member_of(pool: str, body: Mapping[str, Any]) -> Member | None:
    """The planner's view of a member VM body; None if its name is not ``<pool>-<n>``."""
    meta = body.get("metadata") or {}
    ordinal = ordinal_of(pool, str(meta.get("name")))
    if ordinal is None:
        return None
    status = body.get("status") or {}
    ready = any(c.get("type") == CONDITION_READY and c.get("status") == "True"
                for c in status.get("conditions") or [] if isinstance(c, Mapping))
    return Member(name=str(meta["name"]), ordinal=ordinal,
                  revision=(meta.get("labels") or {}).get(REVISION_LABEL),
                  phase=str(status.get("phase") or "Pending"), ready=ready,
                  terminating=bool(meta.get("deletionTimestamp")),
                  message=str(status.get("message") or ""))


def is_member(pool: Mapping[str, Any], body: Mapping[str, Any]) -> bool:
    """Owned by this pool (its uid, not just its name: a pool deleted and re-created under
    the same name does not adopt what the old one left terminating)."""
    uid = (pool.get("metadata") or {}).get("uid")
    return any(ref.get("kind") == POOL_KIND and ref.get("uid") == uid and ref.get("controller")
               for ref in (body.get("metadata") or {}).get("ownerReferences") or [])


@dataclass(frozen=True)
class Create:
    name: str
    body: dict[str, Any]

    def __str__(self) -> str:
        return f"create {self.name}"


@dataclass(frozen=True)
class Delete:
    name: str
    why: Literal["scale-down", "rolling-update", "pool-deleted"]

    def __str__(self) -> str:
        return f"delete {self.name} ({self.why})"


Action = Create | Delete


@dataclass
class PoolPlan:
    actions: list[Action] = field(default_factory=list)
    #: The status to write (None: none, e.g. the pool is going away).
    status: dict[str, Any] | None = None
    #: Add the finalizer (a pool seen for the first time, not being deleted).
    add_finalizer: bool = False
    #: Remove the finalizer once ``actions`` succeeded (every member is deleting).
    remove_finalizer: bool = False


def member_body(pool: Mapping[str, Any], name: str, revision: str) -> dict[str, Any]:
    """A member VirtualMachine: the template, the pool's labels, owned by the pool."""
    meta = pool["metadata"]
    template = pool["spec"]["template"]
    tmeta = template.get("metadata") or {}
    labels = {**(tmeta.get("labels") or {}), POOL_LABEL: meta["name"], REVISION_LABEL: revision}
    out_meta: dict[str, Any] = {
        "name": name,
        "namespace": meta.get("namespace") or "default",
        "labels": labels,
        "ownerReferences": [{
            "apiVersion": API_VERSION, "kind": POOL_KIND, "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True,
        }],
    }
    if tmeta.get("annotations"):
        out_meta["annotations"] = dict(tmeta["annotations"])
    return {"apiVersion": API_VERSION, "kind": "VirtualMachine", "metadata": out_meta,
            "spec": json.loads(json.dumps(template["spec"]))}


def _names(members: Iterable[Member]) -> str:
    names = [m.name for m in members]
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


def _lowest_free(taken: set[int], count: int) -> list[int]:
    out: list[int] = []
    n = 0
    while len(out) < count:
        if n not in taken:
            out.append(n)
        n += 1
    return out


def _conditions(pool: Mapping[str, Any]) -> list[Condition]:
    out = []
    for c in ((pool.get("status") or {}).get("conditions") or []):
        try:
            out.append(Condition.model_validate(c))
        except ValidationError:
            continue  # someone else's malformed entry: rewritten below
    return out


def plan_pool(pool: Mapping[str, Any], members: Iterable[Mapping[str, Any]], now: datetime,
              occupied: Iterable[str] = ()) -> PoolPlan:
    """What to do for ``pool`` given the VM bodies it owns (``members``, see is_member).

    ``occupied``: names of other VMs in the namespace that look like members but are not
    the pool's (left by an earlier pool of the same name, or made by hand): never created."""
    meta = pool.get("metadata") or {}
    name = str(meta.get("name"))
    generation = meta.get("generation")
    finalizers = list(meta.get("finalizers") or [])
    view = sorted((m for m in (member_of(name, b) for b in members) if m is not None),
                  key=lambda m: m.ordinal)

    if meta.get("deletionTimestamp"):
        if FINALIZER not in finalizers:
            return PoolPlan()
        return PoolPlan(actions=[Delete(m.name, "pool-deleted") for m in view if not m.terminating],
                        remove_finalizer=True)

    plan = PoolPlan(add_finalizer=FINALIZER not in finalizers)
    conditions = _conditions(pool)

    def cond(type_: str, ok: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, ok, reason, message, generation, now)

    raw_spec = pool.get("spec") or {}
    try:
        spec = VirtualMachinePoolSpec.model_validate(raw_spec)
    except ValidationError as exc:
        problem = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                            for e in exc.errors()[:3])
        cond(CONDITION_REPLICA_FAILURE, True, "InvalidSpec", problem)
        cond(CONDITION_PROGRESSING, False, "InvalidSpec", "fix the spec: " + problem)
        plan.status = {**(pool.get("status") or {}), "observedGeneration": generation,
                       "conditions": [c.wire() for c in conditions]}
        return plan

    replicas = spec.replicas
    revision = revision_of(raw_spec["template"])
    rolling = spec.strategy.type == StrategyType.ROLLING_UPDATE
    ru = spec.strategy.rolling_update
    surge = resolve_int_or_percent(ru.max_surge, replicas, round_up=True) if rolling else 0
    max_unavailable = resolve_int_or_percent(ru.max_unavailable, replicas, round_up=False)
    if rolling and surge == 0 and max_unavailable == 0:
        max_unavailable = 1  # e.g. "10%" of 3 replicas: a roll must still make progress
    sleeping_ok = spec.strategy.sleeping_counts_as_available
    min_available = max(0, replicas - max_unavailable)

    live = [m for m in view if not m.terminating]
    terminating = [m for m in view if m.terminating]
    new = [m for m in live if m.revision == revision]
    old = [m for m in live if m.revision != revision]
    available = sum(m.available(sleeping_ok) for m in live)
    problems = template_problems(raw_spec["template"])

    deleting: list[Member] = []
    creating: list[str] = []
    if not problems:
        # 1. More members of the current template than wanted: the highest ordinals go.
        surplus_new = max(0, len(new) - replicas)
        doomed_new = sorted(new, key=lambda m: -m.ordinal)[:surplus_new]
        # 2. Members of an old template.
        doomed_old: list[Member] = []
        if rolling:
            budget = available - sum(m.available(sleeping_ok) for m in doomed_new) - min_available
            # Unavailable ones first (no availability lost), then the highest ordinals.
            for m in sorted(old, key=lambda m: (m.available(sleeping_ok), -m.ordinal)):
                if not m.available(sleeping_ok):
                    doomed_old.append(m)
                elif budget > 0:
                    doomed_old.append(m)
                    budget -= 1
        else:
            # OnDelete: old members stay; a scale-down removes the highest ordinals,
            # whatever their template.
            doomed = sorted(live, key=lambda m: -m.ordinal)[:max(0, len(live) - replicas)]
            doomed_new = [m for m in doomed if m.revision == revision]
            doomed_old = [m for m in doomed if m.revision != revision]
        deleting = sorted(doomed_new + doomed_old, key=lambda m: -m.ordinal)
        # 3. New members: up to replicas of the current template, within replicas + surge
        # members in all (those being deleted included: they still hold name and capacity).
        kept_new = len(new) - len(doomed_new)
        kept_old = len(old) - len(doomed_old)
        want = replicas - kept_new if rolling else replicas - kept_new - kept_old
        room = replicas + surge - len(view)
        count = max(0, min(want, room))
        taken = {m.ordinal for m in view}
        taken |= {o for o in (ordinal_of(name, n) for n in occupied) if o is not None}
        creating = [f"{name}-{o}" for o in _lowest_free(taken, count)]
        plan.actions = [Delete(m.name, "scale-down" if m in doomed_new or not rolling
                               else "rolling-update") for m in deleting]
        plan.actions += [Create(n, member_body(pool, n, revision)) for n in creating]

    # ---------------------------------------------------------------- status
    ready = sum(m.ready and m.phase == "Running" for m in live)
    old_revisions = Counter(m.revision or "" for m in old)
    current = (revision if not old_revisions else
               sorted(old_revisions.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] or None)
    failed = [m for m in live if m.phase == "Failed"]

    if problems:
        cond(CONDITION_REPLICA_FAILURE, True, "InvalidTemplate", "; ".join(problems))
    elif failed:
        cond(CONDITION_REPLICA_FAILURE, True, "MemberFailed", "; ".join(
            f"{m.name}: {m.message or 'phase Failed'}" for m in failed[:MAX_NAMED])
            + (f" and {len(failed) - MAX_NAMED} more" if len(failed) > MAX_NAMED else ""))
    else:
        cond(CONDITION_REPLICA_FAILURE, False, "NoFailure", "")

    cond(CONDITION_AVAILABLE, available >= min_available,
         "MinimumMembersAvailable" if available >= min_available
         else "MinimumMembersUnavailable",
         f"{available} of {replicas} members available (at least {min_available} required)")

    if problems:
        cond(CONDITION_PROGRESSING, False, "InvalidTemplate",
             "nothing is created or deleted until spec.template is fixed (see ReplicaFailure)")
    elif old and rolling:
        cond(CONDITION_PROGRESSING, True, "RollingUpdate",
             f"{len(new)} of {replicas} members on revision {revision}; old: {_names(old)}")
    elif old:
        cond(CONDITION_PROGRESSING, False, "WaitingForDeletion",
             f"strategy OnDelete: {_names(old)} run an old template; delete them "
             "(kubectl delete hvm NAME) to recreate them from the current one")
    elif len(live) < replicas:
        cond(CONDITION_PROGRESSING, True, "ScalingUp", f"{len(live)} of {replicas} members exist"
             + (f"; waiting for {_names(terminating)} to be deleted" if terminating and not creating
                else ""))
    elif len(live) > replicas:
        cond(CONDITION_PROGRESSING, True, "ScalingDown", f"{len(live)} members, {replicas} wanted")
    elif terminating:
        cond(CONDITION_PROGRESSING, True, "WaitingForDeletion",
             f"waiting for {_names(terminating)} to be deleted")
    elif available < replicas:
        cond(CONDITION_PROGRESSING, True, "WaitingForAvailable",
             f"{available} of {replicas} members available")
    else:
        cond(CONDITION_PROGRESSING, True, "Complete", f"{replicas} members on revision {revision}, "
             "all available")

    plan.status = {
        "replicas": len(live),
        "readyReplicas": ready,
        "availableReplicas": available,
        "updatedReplicas": len(new),
        "currentRevision": current,
        "updateRevision": revision,
        "selector": selector_string(spec.selector.match_labels),
        "observedGeneration": generation,
        "conditions": [c.wire() for c in conditions],
    }
    return plan


def with_failure(status: Mapping[str, Any], reason: str, message: str,
                 generation: int | None, now: datetime) -> dict[str, Any]:
    """``status`` with ReplicaFailure True: an API call the plan needed failed (the plan
    itself cannot know; the worker tells it here)."""
    conditions = [Condition.model_validate(c) for c in status.get("conditions") or []]
    conditions = set_condition(conditions, CONDITION_REPLICA_FAILURE, True, reason, message, generation,
                               now)
    return {**status, "conditions": [c.wire() for c in conditions]}
