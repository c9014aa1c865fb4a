"""Controller: watches VMs and WorkerNodes, places pending VMs, tracks node health.

The kopf side of it: the view fed by watch events, the passes and the API writes. What
each pass decides comes from ``reconcilers/fleet.py`` (and the scheduler, eviction and
VmJob dispatch it calls)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime, timedelta
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from hyperfleet.reconcilers.eviction import (
    DRAIN_LABEL,
    Eviction,
    EvictionDecision,
    drain_job_name,
    evictions,
    plan_drain,
)
from hyperfleet.reconcilers.fleet import (
    Liveness,
    allocation_updates,
    bound_status,
    compact,
    drain_conditions,
    eviction_status,
    job_workers,
    merge,
    merge_one,
    missing_since,
    node_health,
    object_key,
    on_nodes,
    pass_gap,
    pending_and_placed,
    troubled_nodes,
    unschedulable_status,
    vm_hosts,
)
from hyperfleet.reconcilers.informer import Event, Informer
from hyperfleet.reconcilers.jobs.builder import JobBuilder, to_manifest
from hyperfleet.reconcilers.jobs.dispatch import Decision, dispatch
from hyperfleet.reconcilers.kube import JOBS, NODES, VMS, Conflict, Gone, Kube, KubeApi, Resource
from hyperfleet.reconcilers.models.common import GROUP, VERSION, now_utc, parse_time, rfc3339
from hyperfleet.reconcilers.nodes import LEASE_LABEL, node_view
from hyperfleet.reconcilers.peering import Activation, is_active
from hyperfleet.reconcilers.scheduler import NodeView, VmView, schedule, vm_view

from . import metrics
from .settings import ControllerConfig, configure_kopf
from .tasks import cancel_all

log = logging.getLogger("hyperfleet.controller")


class Controller:
    """An in-memory view of the cluster fed by watch events, and the scheduling loop."""

    def __init__(self, cfg: ControllerConfig, kube: KubeApi) -> None:
        self.cfg = cfg
        self.kube = kube
        self.vms: dict[str, dict[str, Any]] = {}
        self._views: dict[str, tuple[Any, VmView]] = {}  # key -> (resourceVersion, view)
        self.nodes: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.leases: dict[str, datetime] = {}  # node -> last renewTime of its agent's Lease
        self.missing_since: dict[str, datetime] = {}  # bound-to node -> first seen absent
        self.held: set[str] = set()  # VMs a drain cannot move (already reported)
        self._liveness = Liveness()
        self.dirty = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.vm_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._writes = asyncio.Semaphore(16)
        self._allocations_at = 0.0
        self.active = cfg.peering is None  # only the active peering replica schedules
        self._active_at = -1.0
        self._said = False  # whether this replica has logged its peering role yet
        self._activation = Activation()
        # The fleet's VMs come from an informer of our own (``register``), not from kopf: no
        # per-object worker, body or patch for each of thousands of VMs, and each event is
        # compacted on arrival. Others in the process (pools) subscribe to its events.
        self.vm_informer: Informer | None = None
        self.vm_subscribers: list[Callable[[str, dict[str, Any]], None]] = []

    async def parallel(self, coros: list[Coroutine[Any, Any, None]]) -> None:
        """Run API writes concurrently, but never more than 16 at once."""
        async def limited(coro: Coroutine[Any, Any, None]) -> None:
            async with self._writes:
                await coro

        await asyncio.gather(*(limited(c) for c in coros))

    def record(self, body: dict[str, Any], reason: str, message: str, type_: str) -> None:
        """Post an Event in the background: it must not slow down binding."""
        task = asyncio.create_task(asyncio.to_thread(
            self.kube.event, body, reason, message, type_, "hyperfleet-controller"))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _view(self, key: str, body: Mapping[str, Any]) -> VmView:
        """The scheduler's view of a VM, made again only when the VM changed: a pass then
        costs little per VM that did not."""
        version = body["metadata"].get("resourceVersion")
        cached = self._views.get(key)
        if cached is None or cached[0] != version:
            cached = self._views[key] = (version, vm_view(body))
        return cached[1]

    def observe(self, store: dict[str, dict[str, Any]], key: str, event: kopf.RawEvent,
                body: kopf.Body) -> None:
        if event.get("type") == "DELETED":
            store.pop(key, None)
            if store is self.vms:
                self._views.pop(key, None)
        else:
            # Never older than what our own write already stored: a late event would
            # undo a binding in our view and let the next pass over-commit its node.
            merge_one(store, key, body)  # (merge_one keeps a compact copy)
        self.dirty.set()

    def observe_vms(self, events: list[Event]) -> None:
        """A burst of VM watch events (compact copies, from the informer)."""
        for type_, body in events:
            key = object_key(body)
            if type_ == "DELETED":
                # (A deletion found by a relist carries only the name: pass on what we had.)
                body = self.vms.pop(key, body)
                self._views.pop(key, None)
            else:
                merge_one(self.vms, key, body, compacted=True)
            for subscriber in self.vm_subscribers:
                subscriber(type_, body)
        self.dirty.set()

    def vm_snapshot(self) -> list[dict[str, Any]] | None:
        """Every VM as the informer has it (compact copies; never modify them), or None
        until its first list is in. Safe from any thread: the copy is one C call."""
        if self.vm_informer is None or not self.vm_informer.synced.is_set():
            return None
        return list(self.vms.values())

    def liveness(self, now: datetime) -> tuple[dict[str, dict[str, Any]], dict[str, datetime]]:
        """Node bodies and when each agent was last seen alive, by the controller's clock."""
        return self._liveness.update(self.nodes, self.leases, now)

    async def prime(self) -> None:
        """Read everything the passes use before the first one (and again on taking over
        from another replica): the watches fill the view object by object, and a
        half-filled or frozen view must not look like lost nodes or free capacity."""
        informed = self.vm_informer is not None
        while True:
            try:
                nodes, jobs, leases, vms = await asyncio.gather(
                    asyncio.to_thread(self.kube.snapshot, NODES, each=compact),
                    asyncio.to_thread(self.kube.snapshot, JOBS, each=compact),
                    asyncio.to_thread(self.kube.lease_renewals, LEASE_LABEL),
                    # The VM informer is never paused (kopf pauses only its own watches on
                    # a standby): its first list is all a pass needs.
                    asyncio.to_thread(lambda: ([], "") if informed
                                      else self.kube.snapshot(VMS, each=compact)))
                break
            except Exception:
                log.exception("cannot list the cluster yet; retrying")
                await asyncio.sleep(2)
        if self.vm_informer is not None:
            await self.vm_informer.synced.wait()
        else:
            merge(self.vms, {object_key(b): b for b in vms[0]}, vms[1])
        merge(self.nodes, {b["metadata"]["name"]: b for b in nodes[0]}, nodes[1])
        merge(self.jobs, {object_key(b): b for b in jobs[0]}, jobs[1])
        self.leases = {n: max(t, self.leases.get(n, t)) for n, t in leases.items()}
        self.dirty.set()

    async def check_active(self) -> bool:
        """Whether this replica is kopf peering's active one (always, without peering).
        Asked at most once a second; a replica that becomes active re-reads the cluster,
        since its watches were paused and missed deletions."""
        p = self.cfg.peering
        if p is None or time.monotonic() - self._active_at < 1.0:
            return self.active
        self._active_at = time.monotonic()
        try:
            peers = await asyncio.to_thread(self.kube.peering_status, p.name)
        except Exception:
            log.exception("cannot read the peering object; standing by")
            peers = {}
        active = self._activation.update(is_active(peers, p.identity, p.priority, now_utc()),
                                         time.monotonic())
        if active != self.active or not self._said:
            self._said = True
            log.info("active replica: scheduling here" if active
                     else "another replica is active; standing by",
                     extra={"peering": p.name, "identity": p.identity})
            metrics.CONTROLLER_ACTIVE.set(int(active))
            if active and not self.active:
                await self.prime()
        self.active = active
        return active

    async def run(self) -> None:
        metrics.CONTROLLER_ACTIVE.set(int(self.active))
        if self.active:
            await self.prime()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dirty.wait(), timeout=self.cfg.resync_seconds)
            self.dirty.clear()
            try:
                if not await self.check_active():
                    continue
                started = time.monotonic()
                await self.pass_once()
                metrics.RECONCILES.labels("schedule", "ok").inc()
                # While events stream in (a big commit, a restart listing the fleet) each
                # would set off another pass at once: batch them, so that passes take at
                # most a third of the time whatever a pass costs at this fleet's size.
                await asyncio.sleep(pass_gap(time.monotonic() - started))
            except Exception:
                metrics.RECONCILES.labels("schedule", "error").inc()
                log.exception("scheduling pass failed")
                await asyncio.sleep(1)

    async def pass_once(self) -> None:
        now = now_utc()
        grace = timedelta(seconds=self.cfg.node_grace_seconds)
        bodies, alive = self.liveness(now)
        await self._mark_node_health(now, grace, bodies, alive)
        views = [self._view(k, b) for k, b in self.vms.items()]
        if len(self._views) > len(self.vms):  # some left while no watch event told us
            self._views = {k: v for k, v in self._views.items() if k in self.vms}
        pending, placed = pending_and_placed(views, self.vms)
        pending_bodies = {v.key: self.vms[v.key] for v in pending}
        nodes = [node_view(b, now, grace, alive.get(n)) for n, b in bodies.items()]
        await self._publish_allocations(placed)
        # Only VMs on nodes that are lost, silent or draining can have anything to do here.
        troubled = troubled_nodes({v.node for v in placed if v.node}, bodies, alive, now,
                                  timedelta(seconds=self.cfg.eviction_seconds))
        vms = on_nodes(placed, troubled, self.vms)
        await self._evict(vms, now, bodies, alive, nodes, placed)
        await self._dispatch_jobs(now, nodes)
        if not pending_bodies:
            return
        # (A node deleted during the awaits above is caught by _bind.)
        with metrics.RECONCILE_SECONDS.labels("schedule").time():
            result = schedule(pending, nodes, placed,
                              policy=self.cfg.scheduling_policy)
        await self.parallel([
            *(self._bind(pending_bodies[k], n) for k, n in result.placements.items()),
            *(self._unschedulable(pending_bodies[k], r) for k, r in result.unschedulable.items()),
        ])

    async def _evict(self, vms: list[Mapping[str, Any]], now: datetime,
                     bodies: dict[str, dict[str, Any]], alive: dict[str, datetime],
                     nodes: list[NodeView], placed: list[VmView]) -> None:
        timeout = timedelta(seconds=self.cfg.eviction_seconds)
        self.missing_since = missing_since(self.missing_since, vms, bodies, now)
        decisions = plan_drain(
            evictions(vms, bodies, now, timeout, alive, self.missing_since),
            nodes, placed, self.jobs, self.cfg.scheduling_policy)
        held: set[str] = set()
        for d in decisions:
            meta = d.vm["metadata"]
            if d.action == Eviction.WAIT:
                continue
            if d.action == Eviction.HOLD:
                key = f"{object_key(d.vm)}:{d.reason}"
                held.add(key)
                if key not in self.held:  # say it once per drain and reason, not every pass
                    log.warning("VM held on its node", extra={
                        "vm": object_key(d.vm), "node": d.node, "reason": d.reason})
                    self.record(dict(d.vm), d.event, d.reason, "Warning")
                continue
            if d.action == Eviction.MIGRATE:
                await self._drain_migrate(d)
                continue
            status, event = eviction_status(d, now)
            out = await self._write_status(self.vms, VMS, meta, status)
            if out is None:
                continue
            log.warning("evicting VM", extra={"vm": meta["name"], "node": d.node,
                                              "action": d.action.value, "reason": d.reason})
            self.record(out, event, d.reason, "Warning")
        self.held = held
        await self._drain_conditions(bodies, vms, decisions)

    async def _drain_migrate(self, d: EvictionDecision) -> None:
        """Create the drain's vm.migrate VmJob (the source agent runs it like any other)."""
        meta = d.vm["metadata"]
        ns, name = meta.get("namespace") or "default", meta["name"]
        job_name = drain_job_name(d.vm, d.node)
        if d.replace_job:  # a finished one from an earlier drain of this node
            await asyncio.to_thread(self.kube.delete, JOBS, job_name, ns)
            self.jobs.pop(f"{ns}/{job_name}", None)
            return  # created next pass, once the delete is seen
        job = (JobBuilder("vm.migrate").payload(destination_node=d.destination)
               .target(name, ns).build(now=now_utc()))
        manifest = to_manifest(job, name=job_name, namespace=ns)
        manifest["metadata"].setdefault("labels", {})[DRAIN_LABEL] = d.node
        try:
            created = await asyncio.to_thread(self.kube.create, JOBS, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return  # created by an earlier pass; the watch brings it
        self.jobs[f"{ns}/{job_name}"] = created
        log.info("drain live-migrates VM", extra={"vm": f"{ns}/{name}", "node": d.node,
                                                   "destination": d.destination, "job": job_name})
        self.record(dict(d.vm), "Migrating", f"{d.reason} (VmJob {job_name})", "Normal")

    async def _drain_conditions(self, bodies: dict[str, dict[str, Any]],
                                vms: list[Mapping[str, Any]],
                                decisions: list[EvictionDecision]) -> None:
        """DrainBlocked on each draining WorkerNode: which VMs cannot leave, and why."""
        updates = drain_conditions(bodies, vms, decisions, rfc3339(now_utc()))
        for name, conditions in updates.items():
            patch = {"metadata": {"resourceVersion": bodies[name]["metadata"]["resourceVersion"]},
                     "status": {"conditions": conditions}}
            try:
                self.nodes[name] = await asyncio.to_thread(
                    self.kube.patch, NODES, name, patch, None, True)
            except Conflict:
                self.dirty.set()  # the agent wrote meanwhile: decide again on its version

    async def _dispatch_jobs(self, now: datetime, nodes: list[NodeView]) -> None:
        """Validate, time out, de-duplicate and route VmJobs (the agents run them)."""
        active = [b for b in self.jobs.values() if not b["metadata"].get("deletionTimestamp")]
        if not active:
            return
        decisions = dispatch(active, job_workers(nodes), vm_hosts(self.vms), now, self.vms)
        await self.parallel([self._write_job(d) for d in decisions])

    async def _write_job(self, d: Decision) -> None:
        meta = {"name": d.name, "namespace": d.namespace, "resourceVersion": d.resource_version}
        out = await self._write_status(self.jobs, JOBS, meta, d.status)
        if out is None:
            return
        metrics.JOB_TRANSITIONS.labels(d.status.get("phase", "")).inc()
        if d.event:
            self.record(out, d.event[1], d.event[2], d.event[0])

    async def _bind(self, body: dict[str, Any], node: str) -> None:
        meta = body["metadata"]
        if node not in self.nodes:
            self.dirty.set()  # deleted while this pass ran: decide again without it
            return
        status = bound_status(body, node, rfc3339(now_utc()))
        # Stored at once: the allocation counts before the watch event arrives.
        if await self._write_status(self.vms, VMS, meta, status) is None:
            metrics.BINDINGS.labels("conflict").inc()
            log.info("binding conflict; will retry", extra={"vm": meta["name"]})
            return
        metrics.BINDINGS.labels("bound").inc()
        log.info("bound VM", extra={"vm": object_key(body), "node": node})
        self.record(body, "Scheduled", f"placed on WorkerNode {node}", "Normal")

    async def _unschedulable(self, body: dict[str, Any], reason: str) -> None:
        status = unschedulable_status(body, reason, rfc3339(now_utc()))
        if status is None:
            return
        if await self._write_status(self.vms, VMS, body["metadata"], status) is not None:
            self.record(body, "FailedScheduling", reason, "Warning")

    async def _write_status(self, store: dict[str, dict[str, Any]], res: Resource,
                            meta: Mapping[str, Any], status: dict[str, Any]
                            ) -> dict[str, Any] | None:
        """Patch status only if the object is still the version the decision was made on.
        On a conflict our copy is stale and the newer version is on its way in the watch:
        the next pass decides on it (a vanished object is forgotten at once). None when
        nothing was written."""
        name, ns = meta["name"], meta.get("namespace")
        key = object_key({"metadata": meta})
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        try:
            out = await asyncio.to_thread(self.kube.patch, res, name, patch, ns, True)
        except Gone:
            store.pop(key, None)
            self.dirty.set()
            return None
        except Conflict:
            self.dirty.set()
            return None
        merge_one(store, key, out)
        return out

    async def _mark_node_health(self, now: datetime, grace: timedelta,
                                bodies: dict[str, dict[str, Any]],
                                alive: dict[str, datetime]) -> None:
        """Ready follows the agent's Lease (``fleet.node_health``)."""
        for name, body in list(bodies.items()):
            change = node_health(body, now, grace, alive.get(name))
            if change is None:
                continue
            ready, patch = change
            self.nodes[name] = await asyncio.to_thread(
                self.kube.patch, NODES, name, patch, None, True
            )
            (log.info if ready else log.warning)(
                "node Ready" if ready else "node NotReady", extra={"node": name})

    async def _publish_allocations(self, placed: list[VmView]) -> None:
        """WorkerNode scheduling (a cordon shows at once) and allocated/allocatable/vmCount
        (informational, so at most every 2 s)."""
        due = time.monotonic() - self._allocations_at >= 2
        if due:
            self._allocations_at = time.monotonic()
        await self.parallel([self._write_node(name, want) for name, want
                             in allocation_updates(self.nodes, placed, due).items()])

    async def _write_node(self, name: str, status: dict[str, Any]) -> None:
        self.nodes[name] = await asyncio.to_thread(
            self.kube.patch, NODES, name, {"status": status}, None, True)


def register(registry: kopf.OperatorRegistry, cfg: ControllerConfig, kube: Kube) -> Controller:
    ctl = Controller(cfg, kube)
    informer = ctl.vm_informer = Informer(kube, VMS, each=compact)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, "controller")
        settings.peering.lifetime = cfg.peering_lifetime
        # Only Hyperfleet agents' Leases, filtered by the API server, not every Lease.
        settings.watching.label_selectors["coordination.k8s.io", "leases"] = LEASE_LABEL
        ctl.task = asyncio.create_task(ctl.run())
        ctl.vm_task = asyncio.create_task(informer.run(ctl.observe_vms))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await cancel_all([t for t in (ctl.task, ctl.vm_task) if t])

    @kopf.on.event("coordination.k8s.io", "v1", "leases", registry=registry,
                   labels={LEASE_LABEL: kopf.PRESENT})
    async def lease_event(*, event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        node = body["metadata"]["labels"][LEASE_LABEL]
        renew = (body.get("spec") or {}).get("renewTime")
        if event.get("type") == "DELETED" or not renew:
            ctl.leases.pop(node, None)
        else:
            ctl.leases[node] = parse_time(renew)

    @kopf.on.event(GROUP, VERSION, JOBS.plural, registry=registry)
    async def job_event(*, event: kopf.RawEvent, body: kopf.Body, name: str,
                        namespace: str | None, **_: Any) -> None:
        ctl.observe(ctl.jobs, f"{namespace}/{name}", event, body)

    @kopf.on.event(GROUP, VERSION, NODES.plural, registry=registry)
    async def node_event(*, event: kopf.RawEvent, body: kopf.Body, name: str,
                         **_: Any) -> None:
        ctl.observe(ctl.nodes, name, event, body)

    return ctl
