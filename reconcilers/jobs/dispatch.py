"""Controller side of VmJobs: validate, de-duplicate, time out and route to a node.

Pure: takes the VmJob objects, the WorkerNodes and where each VM runs, and returns the
status patches to write (each conditional on the object's resourceVersion). The node
agent owns the Running phase and what happens inside it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ulid import ULID

from ..conventions import CANCEL_ANNOTATION as CANCEL_ANNOTATION
from ..conventions import CONDITION_SCHEDULED
from ..eviction import node_local
from ..models.common import parse_time, set_condition
from .envelope import JobDocument
from .idempotency import IdempotencyIndex, StoredJob, apply_resolution
from .parse import JobValidationError, from_manifest
from .payloads import VmMigrateV1
from .retries import check_deadline, check_timeout, hand_back, ready_to_start
from .routing import WorkerView, queue_key, route
from .status import TERMINAL_PHASES, JobPhase, JobStatus, Reason, advance, finished_event


@dataclass(frozen=True)
class Decision:
    namespace: str
    name: str
    resource_version: str
    status: dict[str, Any]
    event: tuple[str, str, str] | None = None  # (type, reason, message)


def job_key(body: Mapping[str, Any]) -> str:
    meta = body["metadata"]
    return f"{meta.get('namespace') or 'default'}/{meta['name']}"


_PARSED: dict[tuple[str, int], JobDocument] = {}
_PARSED_LIMIT = 20000


def parse(body: Mapping[str, Any]) -> JobDocument:
    """The job document, with a stable jobId derived from the object when none was set.

    Cached per (uid, generation): the spec only changes with the generation, and the
    controller looks at every job on every pass.
    """
    meta = body.get("metadata") or {}
    cache_key = (str(meta.get("uid")), int(meta.get("generation") or 0))
    if meta.get("uid") and cache_key in _PARSED:
        return _PARSED[cache_key]
    job = _parse(body)
    if meta.get("uid"):
        if len(_PARSED) >= _PARSED_LIMIT:
            _PARSED.clear()
        _PARSED[cache_key] = job
    return job


def _parse(body: Mapping[str, Any]) -> JobDocument:
    job = from_manifest(body)
    if job.job_id is None:
        meta = body["metadata"]
        created = parse_time(meta["creationTimestamp"])
        digest = hashlib.sha256(str(meta.get("uid", meta["name"])).encode()).digest()[:10]
        ms = int(created.timestamp() * 1000).to_bytes(6, "big")
        job = job.model_copy(update={"job_id": str(ULID.from_bytes(ms + digest))})
    return job


def current_status(body: Mapping[str, Any]) -> JobStatus | None:
    raw = body.get("status")
    if not raw or "phase" not in raw:
        return None
    return JobStatus.model_validate(raw)


@dataclass(frozen=True)
class _Entry:
    """One parsed VmJob; ``key`` (namespace/name) identifies it, never the jobId."""

    body: Mapping[str, Any]
    stored: StoredJob

    @property
    def key(self) -> str:
        return self.stored.name

    @property
    def job(self) -> JobDocument:
        return self.stored.job

    @property
    def namespace(self) -> str:
        return self.stored.scope


def dispatch(
    bodies: Sequence[Mapping[str, Any]],
    nodes: Sequence[WorkerView],
    vm_hosts: Mapping[str, str],
    now: datetime,
    vms: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Decision]:
    """One pass over every VmJob; returns only the jobs whose status must change.

    ``vms`` (namespace/name -> VirtualMachine) lets a job that cannot succeed on the VM
    as it is declared fail before it is routed, naming the field to change."""
    decisions: list[Decision] = []
    entries: list[_Entry] = []  # all valid jobs still relevant (live, or owning a key)
    for body in bodies:
        status = current_status(body)
        has_key = bool(((body.get("spec") or {}).get("execution") or {}).get("idempotencyKey"))
        if status is not None and status.terminal and not has_key:
            continue  # finished, and no later job can be its duplicate
        if status is not None and status.reason == Reason.DUPLICATE_JOB_ID:
            continue  # refused: it must not take the jobId back from the job that kept it
        try:
            job = parse(body)
        except JobValidationError as exc:
            if status is None or not status.terminal:
                decisions.append(_invalid(body, status, exc, now))
            continue
        key = job_key(body)
        entries.append(_Entry(body, StoredJob(job, status, key.split("/")[0], key,
                                              _created(body))))
    entries.sort(key=lambda e: e.stored.owner_key())
    entries, refused = _unique_job_ids(entries, now)
    decisions.extend(refused)
    index = IdempotencyIndex.rebuild(e.stored for e in entries)
    live = [e for e in entries if e.stored.status is None or not e.stored.status.terminal]
    active = {n.name: 0 for n in nodes}
    for e in live:
        st = e.stored.status
        if st and st.phase in (JobPhase.SCHEDULED, JobPhase.RUNNING) and st.assigned_node in active:
            active[st.assigned_node] += 1
    ready = {n.name for n in nodes if n.ready}
    for e in live:
        st = e.stored.status or JobStatus()
        if st.phase == JobPhase.PENDING:
            continue  # routed below, in priority order
        new = _advance_active(e.body, e.job, st, ready, now)
        if new is not None:
            decisions.append(_decide(e.body, new[0], new[1]))
    queue = sorted((e for e in live if (e.stored.status or JobStatus()).phase == JobPhase.PENDING),
                   key=lambda e: (*queue_key(e.job, e.stored.created_at), e.key))
    for e in queue:
        st = e.stored.status or JobStatus()
        new_st, event = _pending(e.body, e.job, st, index, e.namespace, nodes, active,
                                 vm_hosts, now, vms or {})
        if new_st is not None and new_st.to_status() != (e.body.get("status") or {}):
            decisions.append(_decide(e.body, new_st, event))
            if new_st.phase == JobPhase.SCHEDULED and new_st.assigned_node:
                active[new_st.assigned_node] = active.get(new_st.assigned_node, 0) + 1
    return decisions


def _unique_job_ids(entries: Sequence[_Entry], now: datetime
                    ) -> tuple[list[_Entry], list[Decision]]:
    """spec.jobId is unique per namespace: a later job reusing one fails before it runs.

    Namespaces are separate: the same manifest applied in two namespaces gives two
    jobs. Within one, the jobId names the job in ``duplicateOf`` and idempotency
    records, so two live jobs with it would be mistaken for each other. ``entries``
    are in ownership order; a job that already started is never refused.
    """
    kept: list[_Entry] = []
    refused: list[Decision] = []
    first: dict[tuple[str, str], _Entry] = {}
    for e in entries:
        ident = (e.namespace, e.job.job_id or "")
        owner = first.setdefault(ident, e)
        if owner is e or e.stored.started:
            kept.append(e)
            continue
        message = (f"spec.jobId {e.job.job_id} is already used by VmJob {owner.key} in this "
                   "namespace; remove spec.jobId to have one generated, or set a new ULID")
        st = e.stored.status or JobStatus()
        failed = advance(st, JobPhase.FAILED, now=now, reason=Reason.DUPLICATE_JOB_ID,
                         message=message, error=message)
        refused.append(_decide(e.body, failed, ("Warning", Reason.DUPLICATE_JOB_ID, message)))
    return kept, refused


def _created(body: Mapping[str, Any]) -> datetime | None:
    ts = body.get("metadata", {}).get("creationTimestamp")
    return parse_time(ts) if ts else None


def _decide(body: Mapping[str, Any], status: JobStatus,
            event: tuple[str, str, str] | None) -> Decision:
    meta = body["metadata"]
    out = status.to_patch(body.get("status"))
    out["observedGeneration"] = meta.get("generation")
    before = (body.get("status") or {}).get("phase")
    if status.terminal and before not in TERMINAL_PHASES:
        # The one outcome Event of the job (the write is conditional on resourceVersion).
        event = finished_event(status, str((body.get("spec") or {}).get("operation") or "job"))
    return Decision(meta.get("namespace") or "default", meta["name"], meta["resourceVersion"],
                    out, event)


def _invalid(body: Mapping[str, Any], status: JobStatus | None, exc: JobValidationError,
             now: datetime) -> Decision:
    """A job that fails validation fails at once, naming every bad field."""
    st = status or JobStatus()
    message = str(exc)
    failed = advance(st, JobPhase.FAILED, now=now, reason="ValidationFailed", message=message,
                     error=message) if st.phase != JobPhase.RUNNING else st
    return _decide(body, failed, ("Warning", "ValidationFailed", message))


def _advance_active(body: Mapping[str, Any], job: JobDocument, st: JobStatus, ready: set[str],
                    now: datetime) -> tuple[JobStatus, tuple[str, str, str] | None] | None:
    """Scheduled or Running: cancel, time out, or hand back from a lost node.

    Lost means not Ready (no heartbeat). A cordoned or draining node is healthy: its
    agent goes on running what it has, so nothing is taken from it.
    """
    cancel = (body["metadata"].get("annotations") or {}).get(CANCEL_ANNOTATION)
    if st.phase == JobPhase.SCHEDULED:
        if cancel:
            return (advance(st, JobPhase.CANCELLED, now=now, message="cancelled by annotation"),
                    ("Normal", "Cancelled", "cancelled before it started"))
        passed = check_deadline(job, st, now)
        if passed.phase != st.phase:
            return passed, ("Warning", "DeadlineExceeded", passed.last_error or "")
        if st.assigned_node not in ready:
            why = f"node {st.assigned_node} is not Ready; routing again"
            back = hand_back(job, st, now, why)
            return back, ("Warning", "HandedBack", why)
        return None
    if st.phase == JobPhase.RUNNING:
        timed = check_timeout(job, st, now)
        if timed.phase != st.phase:
            return timed, ("Warning", "TimedOut",
                           f"no result within {job.execution.timeout_seconds}s")
        if st.assigned_node not in ready:
            back = hand_back(job, st, now,
                             f"node {st.assigned_node} was lost while running the job")
            if back.phase == JobPhase.FAILED:
                return back, ("Warning", str(back.reason), back.last_error or "")
            return back, ("Warning", "HandedBack", f"node {st.assigned_node} lost; retrying")
    return None


def _pending(
    body: Mapping[str, Any], job: JobDocument, st: JobStatus, index: IdempotencyIndex,
    scope: str, nodes: Sequence[WorkerView], active: Mapping[str, int],
    vm_hosts: Mapping[str, str], now: datetime, vms: Mapping[str, Mapping[str, Any]],
) -> tuple[JobStatus | None, tuple[str, str, str] | None]:
    meta = body["metadata"]
    if (meta.get("annotations") or {}).get(CANCEL_ANNOTATION):
        return (advance(st, JobPhase.CANCELLED, now=now, message="cancelled by annotation"),
                ("Normal", "Cancelled", "cancelled before it started"))
    passed = check_deadline(job, st, now)
    if passed.phase != st.phase:
        return passed, ("Warning", "DeadlineExceeded", passed.last_error or "deadline passed")
    resolution = index.resolve(job, scope)
    if not resolution.should_execute:
        out = apply_resolution(st, resolution, now)
        return out, ("Normal", str(out.reason or "Duplicate"), resolution.message)
    refused = refusal(job, scope, nodes, vm_hosts, vms)
    if refused is not None:
        reason, message = refused
        failed = advance(st, JobPhase.FAILED, now=now, reason=reason, message=message,
                         error=message)
        return failed, ("Warning", reason, message)
    if not ready_to_start(job, st, now):
        return None, None
    views = [replace(n, active_jobs=active.get(n.name, 0)) for n in nodes]
    decision = route(job, views, vm_hosts, default_namespace=scope)
    if decision.node is None:
        conds = set_condition(st.conditions, CONDITION_SCHEDULED, False, now=now,
                              reason="Unroutable", message=decision.reason)
        waiting = st.model_copy(update={"conditions": conds, "reason": "Unroutable"})
        event = None
        old = next((c for c in st.conditions if c.type == CONDITION_SCHEDULED), None)
        if old is None or old.message != decision.reason:
            event = ("Warning", "Unroutable", decision.reason)
        return waiting, event
    scheduled = advance(st, JobPhase.SCHEDULED, now=now, node=decision.node,
                        message=decision.reason)
    return scheduled, ("Normal", "Scheduled", f"routed to {decision.node}: {decision.reason}")


def refusal(job: JobDocument, scope: str, nodes: Sequence[WorkerView],
            vm_hosts: Mapping[str, str], vms: Mapping[str, Mapping[str, Any]]
            ) -> tuple[str, str] | None:
    """(reason, message) when ``job`` cannot succeed as declared: better to fail before
    it runs than late, with a raw VMM error and a receiver left on the destination."""
    if job.operation != "vm.migrate" or job.routing.target_vm is None:
        return None
    payload = job.typed_payload()
    if not isinstance(payload, VmMigrateV1):
        return None
    target = job.routing.target_vm
    key = f"{target.namespace or scope}/{target.name}"
    dest = payload.destination_node
    vm = vms.get(key)
    stuck = node_local(vm) if vm is not None else []
    if stuck:
        return ("NotMigratable",
                f"VirtualMachine {key}: {stuck[0]}; cloud-hypervisor migrates memory, not "
                "disks, so it cannot run on another node")
    if vm is not None and not (vm.get("spec") or {}).get("liveMigration"):
        return ("NotMigratable",
                f"VirtualMachine {key} has spec.liveMigration false: its memory is private "
                "to its VMM and cannot be sent. Set spec.liveMigration: true (the VM "
                "restarts once, with shared memory), or stop it and let the scheduler "
                "place it elsewhere")
    if vm_hosts.get(key) == dest:
        return ("InvalidDestination",
                f"payload.data.destinationNode {dest} is the node VM {key} runs on already; "
                "name another WorkerNode")
    by_name = {n.name: n for n in nodes}
    if dest not in by_name:
        return ("InvalidDestination",
                f"payload.data.destinationNode {dest} is not a registered WorkerNode; "
                f"known: {', '.join(sorted(by_name)) or 'none'} (kubectl get wn)")
    if "migration" not in by_name[dest].capabilities:
        return ("InvalidDestination",
                f"payload.data.destinationNode {dest} does not offer the 'migration' "
                "capability (see its status.capabilities); name a node that does")
    return None
