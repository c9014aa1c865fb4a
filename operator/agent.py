"""Node agent: registers its WorkerNode, heartbeats, and drives the VMs bound to it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import watchfiles

from hyperfleet.reconcilers import providers
from hyperfleet.reconcilers.conventions import WORKER_NODE, role_finalizer
from hyperfleet.reconcilers.disks import NodeStorage
from hyperfleet.reconcilers.driver import VmDriver
from hyperfleet.reconcilers.eviction import unbound_status
from hyperfleet.reconcilers.gitops.types import ADOPT_ANNOTATION
from hyperfleet.reconcilers.hypervisor import fence
from hyperfleet.reconcilers.hypervisor.process import ProcessManager, vm_of
from hyperfleet.reconcilers.images import DEFAULT_ROOTS
from hyperfleet.reconcilers.informer import Event, Informer, object_key
from hyperfleet.reconcilers.jobs.runner import RECEIVE_TIMEOUT, JobRunner
from hyperfleet.reconcilers.kube import JOBS, NODES, VMS, Conflict, Gone, JsonPatch, Kube, KubeApi
from hyperfleet.reconcilers.models.common import GROUP, VERSION, now_utc, parse_quantity, version_of
from hyperfleet.reconcilers.models.vm import VirtualMachine
from hyperfleet.reconcilers.nodes import (
    LEASE_LABEL,
    heartbeat_status,
    host_capacity,
    lease_name,
    merge_conditions,
)

from . import metrics
from .settings import AgentConfig, configure_kopf
from .tasks import cancel_all

log = logging.getLogger("hyperfleet.agent")
AGENT_VERSION = "0.1.0"
PROBE_INTERVAL = 300.0  # seconds between capability discoveries
ORPHAN_SWEEP_SECONDS = 60.0  # the backstop sweep for VMMs of VMs not bound here
VMM_SWEEP_SECONDS = 5.0  # the backstop for VMM exits and events the watches missed
#: The agents' finalizer on the VMs bound to them. kopf's name for it (the "agent" role's),
#: so that VMs finalized by older agents, and VMs that moved between nodes, carry the one
#: every agent removes.
FINALIZER = role_finalizer("agent")
#: How long a deleted VM's loop may take to finish its pass before it is cancelled (its VMM
#: is destroyed after the pass either way: the driver holds a per-VM lock).
STOP_SECONDS = 30.0
#: After a VM loop failed: as long as kopf waited before running a failed daemon again.
LOOP_RETRY_SECONDS = 60.0
#: First and longest wait between attempts of a finalizer write or a deletion's cleanup.
RETRY_SECONDS = (0.5, 30.0)


@dataclass
class VmLoop:
    """A VM's loop task and what asks it to finish (what kopf's DaemonStopped was)."""

    task: asyncio.Task[None]
    stopped: asyncio.Event


class _Backoff:
    """Waits between attempts of a step that must eventually succeed (a finalizer write, a
    deletion's cleanup): from RETRY_SECONDS[0], doubling up to RETRY_SECONDS[1], each
    failure logged with the wait that follows."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.delay = RETRY_SECONDS[0]

    async def wait(self, what: str, exc: BaseException, trace: bool = False) -> None:
        """``trace``: log the traceback too (an unexpected failure, not an API error)."""
        log.warning(f"{what} failed; retrying", exc_info=exc if trace else None, extra={
            "vm": self.key, "error": str(exc), "seconds": self.delay})
        await asyncio.sleep(self.delay)
        self.delay = min(2 * self.delay, RETRY_SECONDS[1])


class Agent:
    """State shared by the agent's handlers (one per process)."""

    def __init__(self, cfg: AgentConfig, kube: KubeApi) -> None:
        self.cfg = cfg
        self.kube = kube
        self.pm = ProcessManager(cfg.ch_binary, cfg.socket_dir, list(cfg.vmm_args))
        self.storage = NodeStorage(cfg.state_dir, cfg.allowed_path_roots or DEFAULT_ROOTS,
                                   parse_quantity(cfg.image_cache_size))
        self.driver = VmDriver(self.pm, cfg.node_name, storage=self.storage)
        self.jobs = JobRunner(cfg.node_name, kube, self.driver, cfg.migration_address)
        self.jobs.on_finish = lambda job, st: metrics.JOB_OUTCOMES.labels(
            st.phase.value, job.operation).inc()
        self.wakeups: dict[str, asyncio.Event] = {}
        self.pidfds: dict[str, tuple[int, int]] = {}  # VM -> (VMM pid, its pidfd)
        # The VMs bound here as the watch (``vm_informer``) brought them last: plain dicts,
        # each replaced by the next event and never changed in place, so a loop's pass can
        # hold one without copying it.
        self.bodies: dict[str, dict[str, Any]] = {}
        # The latest body of each VM whose loop runs here: the per-VM metrics read it at
        # scrape time (metrics.NodeVmCollector).
        self.vms: dict[str, dict[str, Any]] = {}
        # Each VM's loop. One that ended on its own (moved away by migration, evicted) stays
        # here, so that later events do not start it again, until the VM leaves the watch:
        # what kopf did with its daemons.
        self.loops: dict[str, VmLoop] = {}
        # What a VM that left the watch still has running (its loop finishing its pass, its
        # deletion's cleanup): a new VM of the same name waits for it.
        self.ending: dict[str, list[asyncio.Task[None]]] = {}
        self.deleting: dict[str, asyncio.Task[None]] = {}  # deletion's cleanup, once per VM
        self.finalizing: set[str] = set()  # VMs whose finalizer write is on its way
        self.vm_informer: Informer | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.background: set[asyncio.Future[None]] = set()
        # Per VM: the copy its loop last decided on (or wrote); a watch event equal to it
        # but for bookkeeping does not wake the loop for another pass.
        self.decided: dict[str, Mapping[str, Any]] = {}
        self.poked: set[str] = set()  # VMs woken by news from outside their object
        self.node_status: dict[str, Any] = {}
        self._status_at = 0.0
        self._probed_at = time.monotonic()
        # Fenced: the API server was unreachable for --fence-after and every VM was paused
        # (by us and by the watchdog, which also covers a frozen or dead agent); no VM may
        # run here again until a heartbeat gets through and each VM's binding has been
        # re-read (it may have moved meanwhile). The epoch tells a VM loop that a fence
        # happened since its last pass.
        self.fenced = False
        self.fence_epoch = 0
        # When the API server last answered a heartbeat. A longer silence (a partition, a
        # frozen process, a suspended host) means every cached VM body may be stale.
        self.last_contact = time.monotonic()
        # Separate threads, so that neither can starve the other nor the heartbeat: VM
        # converge passes (the loop's default executor), VmJobs (which may wait for a
        # converge pass), and the heartbeat.
        self.job_threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix="job")
        self.beat_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="heartbeat")

    def spawn_job(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a job (or a migration receiver) on the job threads, in the background."""
        self._keep(asyncio.get_running_loop().run_in_executor(self.job_threads, fn, *args))

    def _keep(self, task: asyncio.Future[None]) -> None:
        """Hold a background task until it is done (the loop keeps only weak references)."""
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def poke(self, key: str) -> None:
        """Wake a VM's loop for news from outside its object (the VMM, a lifted fence):
        unlike a watch event, never dismissed as nothing new."""
        ev = self.wakeups.get(key)
        if ev is not None:
            self.poked.add(key)
            ev.set()

    def wakeup(self, key: str) -> asyncio.Event:
        return self.wakeups.setdefault(key, asyncio.Event())

    def register_node(self) -> None:
        """Create our WorkerNode if absent and publish what this host offers."""
        name = self.cfg.node_name
        if self.kube.get(NODES, name) is None:
            self.kube.create(NODES, {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": WORKER_NODE.kind,
                # Registered as a placeholder: a GitSource that declares this node may
                # take it over (pool, cordon, overcommit) without a manual annotation.
                "metadata": {"name": name, "labels": {LEASE_LABEL: name},
                             "annotations": {ADOPT_ANNOTATION: "true"}},
                "spec": {"pool": self.cfg.pool},
            })
            log.info("registered WorkerNode", extra={"node": name})
        self.refresh_capabilities()
        self.heartbeat()

    def refresh_capabilities(self) -> None:
        """Probe the backend providers (at start, then every few minutes: hosts change)."""
        reports = providers.discover(
            providers.default_providers(self.cfg.ch_binary, list(self.cfg.capabilities)))
        cpus, mem = host_capacity()
        cpus = self.cfg.cpus or cpus
        mem = parse_quantity(self.cfg.memory) if self.cfg.memory else mem
        new_status = heartbeat_status(
            cpus, mem, reports, providers.capabilities(reports), AGENT_VERSION
        )
        new_status["images"] = self.storage.report()
        if self.node_status and {k: v for k, v in new_status.items() if k != "heartbeatTime"} \
                != {k: v for k, v in self.node_status.items() if k != "heartbeatTime"}:
            self._status_at = 0.0  # publish the change with the next heartbeat
        self.node_status = new_status

    def heartbeat(self) -> None:
        """Renew the Lease every beat; rewrite the WorkerNode status only now and then,
        since a status write costs far more (the whole object goes to etcd and to every
        watcher)."""
        node = self.cfg.node_name
        self.kube.renew_lease(self.cfg.lease_namespace, lease_name(node), node,
                              max(1, round(self.cfg.heartbeat_seconds * 3)),
                              {LEASE_LABEL: node, "app.kubernetes.io/part-of": "hyperfleet"})
        self.contact()
        now = time.monotonic()
        images = self.storage.report()
        if images != self.node_status.get("images"):
            self.node_status["images"] = images  # pulled or evicted: say so now
            self._status_at = 0.0
        if now - self._status_at < max(30.0, 6 * self.cfg.heartbeat_seconds):
            return
        self._status_at = now
        fresh = heartbeat_status(0, 0, [], [], AGENT_VERSION)
        status = {**self.node_status, "heartbeatTime": fresh["heartbeatTime"]}
        try:
            # The controller owns other conditions (DrainBlocked): send them back as they
            # are, and only onto the version they were read from.
            current = self.kube.get(NODES, node)
            if current is None:
                raise Gone(f"workernodes/{node}")
            status["conditions"] = merge_conditions(
                (current.get("status") or {}).get("conditions"), *status["conditions"])
            self.kube.patch(NODES, node, {
                "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                "status": status}, status=True)
        except Conflict as exc:
            if not isinstance(exc, Gone):
                self._status_at = 0.0  # written meanwhile: again at the next beat
                return
            # Deleted under a live agent (by hand, or pruned from Git): register again, as
            # a kubelet does, so its VMs are not left bound to a node that does not exist.
            log.warning("WorkerNode deleted while its agent runs; registering it again",
                        extra={"node": node})
            self._status_at = 0.0  # publish the whole status again right away
            self.register_node()

    def contact(self) -> None:
        """The API server answered: tell the watchdog, and make sure one is guarding."""
        if not self.cfg.fence_after_seconds:
            return
        fence.record_contact(self.pm.socket_dir)
        if fence.ensure_watchdog(self.pm.socket_dir, self.cfg.fence_after_seconds):
            log.info("started the fencing watchdog", extra={
                "node": self.cfg.node_name, "fence_after": self.cfg.fence_after_seconds})

    async def watch_vmms(self) -> None:
        """Event-driven VMM supervision: a VMM's exit (its pidfd) or a new event in its
        ``--event-monitor`` file (inotify) wakes its VM's loop within milliseconds, at no
        cost while nothing happens; a slow sweep backs both up (and vm.info polling at the
        resync interval backs that)."""
        await asyncio.gather(self._watch_event_files(), self._sweep_vmms())

    async def _watch_event_files(self) -> None:
        # The watcher thread wakes every ``step`` ms to look for changes (and takes the GIL
        # to do so): 100 ms keeps an idle node's cost at a few wakeups a second, and a VMM
        # event (exits come by pidfd at once) reaches its VM within a fifth of a second.
        while True:
            try:
                async for changes in watchfiles.awatch(
                        self.pm.socket_dir, watch_filter=_event_file, debounce=50, step=100,
                        recursive=False):
                    keys = {"/".join(vm_of(Path(path))) for _, path in changes}
                    await self.check_vmms([k for k in keys if k in self.wakeups])
            except Exception:
                log.exception("watching the VMMs' event files failed; the sweep covers")
            await asyncio.sleep(VMM_SWEEP_SECONDS)

    async def _sweep_vmms(self) -> None:
        while True:
            await asyncio.sleep(VMM_SWEEP_SECONDS)
            try:
                await self.check_vmms(list(self.wakeups))
            except Exception:
                log.exception("checking the VMMs failed")

    async def check_vmms(self, keys: list[str], exits: bool = False) -> None:
        """Wake the loops of the VMs whose VMM has news. A VM whose pass is running now
        sees its VMM itself, except an exit after the pass's last look: for ``exits`` (a
        pidfd fired) it is asked again once the pass is over (a pass records the pid it
        saw, so the exit is still news then)."""
        while keys:
            changed, keys = await asyncio.to_thread(self.driver.changed_among, keys)
            for key in changed:
                self.poke(key)
            if not exits:
                return
            if keys:
                await asyncio.sleep(0.2)
                keys = [k for k in keys if k in self.wakeups]

    def track(self, key: str, pid: int | None) -> None:
        """Hold a pidfd on the VM's VMM (called by its loop after each pass), so that its
        exit is an event on the agent's loop instead of something a poll finds."""
        held = self.pidfds.get(key)
        if held is not None and held[0] == pid:
            return
        self.untrack(key)
        if pid is None:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # gone already, or no pidfd on this kernel: the sweep finds out
        self.pidfds[key] = (pid, fd)
        asyncio.get_running_loop().add_reader(fd, self._vmm_exited, key)

    def untrack(self, key: str) -> None:
        held = self.pidfds.pop(key, None)
        if held is not None:
            asyncio.get_running_loop().remove_reader(held[1])
            os.close(held[1])

    def _vmm_exited(self, key: str) -> None:
        self.untrack(key)
        # Checked, not poked: a VMM the agent stopped itself is no news.
        self._keep(asyncio.ensure_future(self.check_vmms([key], exits=True)))

    def in_gap(self) -> bool:
        """Out of touch with the API server for longer than a few heartbeats."""
        return time.monotonic() - self.last_contact > max(3 * self.cfg.heartbeat_seconds, 3.0)

    async def heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = time.monotonic()
        while True:
            # A fixed cadence, not a fixed pause: a slow beat must not stretch the next one
            # towards the controller's grace period.
            due = max(due + self.cfg.heartbeat_seconds, time.monotonic())
            await asyncio.sleep(due - time.monotonic())
            try:
                if time.monotonic() - self._probed_at > PROBE_INTERVAL:
                    self._probed_at = time.monotonic()
                    await loop.run_in_executor(self.beat_thread, self.refresh_capabilities)
                gap = self.in_gap()
                await loop.run_in_executor(self.beat_thread, self.heartbeat)
                if gap or self.fenced:
                    # Back from a partition or a freeze (fenced or not): VMs may have been
                    # placed elsewhere meanwhile. Stop their copies here before anything
                    # else runs them; the VM loops then resume the ones still bound here.
                    log.warning("API server reachable after a gap; checking every VMM",
                                extra={"node": self.cfg.node_name, "fenced": self.fenced})
                    await asyncio.to_thread(self.fence_orphans)
                    await asyncio.to_thread(self.report_fenced)
                self.last_contact = time.monotonic()
                if self.fenced:
                    self.fenced = False
                    log.warning("API server reachable again; lifting the fence",
                                extra={"node": self.cfg.node_name})
                    for key in list(self.wakeups):
                        self.poke(key)
            except Exception:
                log.exception("heartbeat failed", extra={"node": self.cfg.node_name})
                lapse = time.monotonic() - self.last_contact
                if self.cfg.fence_after_seconds and lapse > self.cfg.fence_after_seconds \
                        and not self.fenced:
                    log.error("API server unreachable; fencing: pausing every VM on this node",
                              extra={"node": self.cfg.node_name, "seconds": round(lapse)})
                    self.fenced = True
                    self.fence_epoch += 1
                    await asyncio.to_thread(fence.pause_all, self.pm)

    def write_status(self, seen: dict[str, Any], status: dict[str, Any]
                     ) -> dict[str, Any] | None:
        """Report what this node did, but only while the VM is still bound here: each
        write is conditional on a version that says so, so a binding or an unbinding the
        controller wrote meanwhile is never undone. None when it is no longer ours."""
        meta = seen["metadata"]
        name, ns, version = meta["name"], meta.get("namespace"), meta["resourceVersion"]
        for _ in range(5):
            try:
                return self.kube.patch(VMS, name, {"metadata": {"resourceVersion": version},
                                                   "status": status}, ns, status=True)
            except Gone:
                return None
            except Conflict:
                fresh = self.kube.get(VMS, name, ns)
                st = (fresh or {}).get("status") or {}
                if fresh is None or st.get("nodeName") != self.cfg.node_name \
                        or st.get("evictFrom") == self.cfg.node_name:
                    return None
                version = fresh["metadata"]["resourceVersion"]
        raise Conflict(f"virtualmachines/{name}: status kept changing; retrying next pass")

    def evict(self, ns: str, name: str, body: dict[str, Any]) -> None:
        """Drain: stop the VMM here first, then hand the VM back to the scheduler."""
        self.driver.destroy(ns, name)
        self.drop_left_disks(ns, name, body)
        message = f"stopped on {self.cfg.node_name} (drain); placing it again"
        self.kube.patch(VMS, name, {"status": unbound_status("Evicted", message, now_utc())},
                        ns, status=True)
        self.kube.event(body, "Evicted", message, "Normal", "hyperfleet-agent")

    def fence_orphans(self) -> list[str]:
        """Stop every VMM here whose VM is gone or bound elsewhere, judged from a fresh
        list of the VMs bound to this node, never from a VM loop's cached copy (a loop
        that slept through a partition still holds "bound here")."""
        since = time.monotonic()
        bound = {f"{vm['metadata'].get('namespace')}/{vm['metadata']['name']}"
                 for vm in self.kube.list(VMS, None, f"status.nodeName={self.cfg.node_name}")
                 if (vm.get("status") or {}).get("evictFrom") != self.cfg.node_name}
        stopped = []
        for ns, name in self.pm.discover():
            key = f"{ns}/{name}"
            if key in bound or self.driver.expecting(key, window=RECEIVE_TIMEOUT):
                continue
            started = self.pm.started_at(ns, name)
            if started is not None and started >= since:
                continue  # started after the list was read: its binding is newer
            if self.stop_moved(ns, name, self.kube.get(VMS, name, ns)):
                stopped.append(key)
        if stopped:
            log.warning("stopped VMMs of VMs not bound here", extra={"vms": stopped})
        return stopped

    def stop_moved(self, ns: str, name: str, vm: dict[str, Any] | None) -> bool:
        """Stop this node's copy of a VM that is gone or bound elsewhere, and say so on
        the VM once, whichever of the orphan sweep and the VM's own loop gets there first."""
        if not self.driver.fence(ns, name):
            return False
        if vm is not None:
            self.drop_left_disks(ns, name, vm)
            where = (vm.get("status") or {}).get("nodeName") or "no node"
            self.kube.event(vm, "Fenced", f"stopped its VMM on {self.cfg.node_name}: the "
                            f"VM is bound to {where} now", "Warning", "hyperfleet-agent")
        return True

    def drop_left_disks(self, ns: str, name: str, vm: dict[str, Any]) -> None:
        """A VM that left this node with ``onMove: Recreate`` starts afresh where it went:
        its old overlay here is garbage. Any other VM's disk is data, and stays."""
        if ((vm.get("spec") or {}).get("image") or {}).get("onMove") == "Recreate":
            self.storage.remove(ns, name)

    def report_fenced(self) -> None:
        """An Event, once, on each VM that was paused by fencing and is still ours."""
        for key, since in fence.take_fenced(self.pm.socket_dir).items():
            ns, _, name = key.partition("/")
            vm = self.kube.get(VMS, name, ns)
            if vm is None or (vm.get("status") or {}).get("nodeName") != self.cfg.node_name:
                continue  # moved away: fence_orphans stopped it and said so
            self.kube.event(vm, "FencePaused", (
                f"paused on {self.cfg.node_name} for {time.time() - since:.0f}s because its "
                f"agent could not reach the API server (--fence-after "
                f"{self.cfg.fence_after_seconds:g}s); still bound here, so it resumes"),
                "Warning", "hyperfleet-agent")

    async def migration_loop(self) -> None:
        """Incoming live migrations are assigned to the source node, so this agent's
        watch does not see them: look for ones that name us as destination."""
        while True:
            await asyncio.sleep(1.0)
            try:
                jobs = await asyncio.to_thread(self.kube.list, JOBS, None,
                                               "spec.operation=vm.migrate", True)
            except Exception:
                log.exception("listing migrations failed")
                continue
            for body in jobs:
                if self.jobs.peers.wants_to_receive(body):
                    self.spawn_job(self.jobs.peers.receive, body)

    async def fence_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.fence_orphans)
            except Exception:
                log.exception("orphan check failed")
            # A backstop (gaps and fences check at once, and each VM's loop re-reads its
            # binding after one): each sweep is a quorum list of every VM bound here, the
            # one periodic cost that grows with the node's VMs.
            await asyncio.sleep(max(ORPHAN_SWEEP_SECONDS, self.cfg.heartbeat_seconds))

    # ------------------------------------------------------------------ the VMs bound here

    def observe_vms(self, events: list[Event]) -> None:
        """A burst of watch events of the VMs bound here (the informer's sink: it runs on
        the loop and must not block). A new VM gets our finalizer and its loop; a change
        wakes the loop; a deletion runs the cleanup, once; a VM gone from the watch (deleted,
        or no longer bound here) stops its loop and leaves its VMM to eviction and fencing."""
        for type_, body in events:
            key = object_key(body)
            known = self.bodies.get(key)
            if type_ == "DELETED" or (known is not None and _uid(known) != _uid(body)):
                self._forget(key)  # (another object of the same name starts afresh)
                if type_ == "DELETED":
                    continue
            self._store(key, body)
            if body["metadata"].get("deletionTimestamp"):
                self._delete(key)
                continue
            self._ensure_finalizer(key)
            if key not in self.loops:
                self._start_loop(key)

    def _store(self, key: str, body: dict[str, Any]) -> None:
        self.bodies[key] = body
        if key in self.vms:
            self.vms[key] = body
        # (A loop woken by our own write sees nothing new in the body and goes back to
        # waiting: see the wait after each pass.)
        ev = self.wakeups.get(key)
        if ev is not None:
            ev.set()

    def _forget(self, key: str) -> None:
        """The VM left the watch: stop its loop, as kopf stopped a daemon then."""
        self.bodies.pop(key, None)
        loop = self.loops.pop(key, None)
        if loop is not None:
            loop.stopped.set()
        for task in (loop.task if loop else None, self.deleting.pop(key, None)):
            if task is not None and not task.done():
                self.ending.setdefault(key, []).append(task)
                task.add_done_callback(functools.partial(self._ended, key))

    def _ended(self, key: str, task: asyncio.Task[None]) -> None:
        left = [t for t in self.ending.get(key, ()) if t is not task]
        if left:
            self.ending[key] = left
        else:
            self.ending.pop(key, None)

    def _start_loop(self, key: str) -> None:
        stopped = asyncio.Event()
        before = list(self.ending.get(key, ()))
        task = asyncio.create_task(self._run_loop(key, stopped, before), name=f"vm {key}")
        self.loops[key] = VmLoop(task, stopped)

    async def _run_loop(self, key: str, stopped: asyncio.Event,
                        before: list[asyncio.Task[None]]) -> None:
        """A VM's loop, after whatever an earlier VM of the same name left running here,
        and again after a failure, as kopf ran a failed daemon again."""
        if before:
            await asyncio.wait(before)
        while not stopped.is_set():
            try:
                await self.vm_loop(key, stopped)
                return
            except Exception:
                log.exception("VM loop failed; retrying", extra={
                    "vm": key, "seconds": LOOP_RETRY_SECONDS})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), LOOP_RETRY_SECONDS)

    async def vm_loop(self, key: str, stopped: asyncio.Event) -> None:
        """Drive one VM bound here until ``stopped`` (it was deleted or left the node) or
        until it is no longer ours to drive: a converge pass, its status and events, then a
        wait for a change, the VMM's news or the resync."""
        body = self.bodies.get(key)
        if body is None:
            return
        namespace = body["metadata"].get("namespace") or "default"
        name = body["metadata"]["name"]
        kube, cfg = self.kube, self.cfg
        wake = self.wakeup(key)
        self.driver.arrived(key)
        epoch = self.fence_epoch
        written = 0  # resourceVersion of our last status write
        self.vms[key] = body
        try:
            while not stopped.is_set():
                wake.clear()
                body = self.bodies.get(key, body)
                if FINALIZER not in (body["metadata"].get("finalizers") or ()):
                    # Never drive a VM whose deletion would not wait for us: its object
                    # could go while the VMM runs, and a new VM of the same name run twice.
                    # (``_ensure_finalizer`` is writing it; its answer wakes us.)
                    await _wait_either(wake, stopped, cfg.heartbeat_seconds)
                    continue
                if self.fenced:
                    await _wait_either(wake, stopped, cfg.heartbeat_seconds)
                    continue
                if epoch != self.fence_epoch or self.in_gap():
                    # Fenced since the last pass, or out of touch with the API server: our
                    # copy may predate a move elsewhere. Act only on a fresh read.
                    try:
                        fresh = await asyncio.to_thread(kube.get, VMS, name, namespace)
                    except Exception:
                        await _wait_either(wake, stopped, cfg.heartbeat_seconds)
                        continue
                    if fresh is None or (fresh.get("status") or {}).get("nodeName") \
                            != cfg.node_name:
                        await asyncio.to_thread(self.stop_moved, namespace, name, fresh)
                        return
                    epoch = self.fence_epoch
                if version_of(body) < written:
                    # Our own write's watch event is on its way: converging on the older
                    # copy would only make a conflicting write. Poll briefly rather than
                    # wait for a wakeup that may already have been consumed.
                    give_up = time.monotonic() + 2.0
                    while version_of(self.bodies.get(key, body)) < written \
                            and time.monotonic() < give_up and not stopped.is_set():
                        await asyncio.sleep(0.01)
                    written = 0  # arrived, or the watch restarted: go by what we have
                    body = self.bodies.get(key, body)
                if (body.get("status") or {}).get("evictFrom") == cfg.node_name:
                    await asyncio.to_thread(self.evict, namespace, name, body)
                    return
                self.poked.discard(key)
                seen = body  # the version this pass decides on (never changed in place)
                self.decided[key] = seen
                vm = VirtualMachine.from_body(seen)
                with metrics.RECONCILE_SECONDS.labels("vm").time():
                    outcome = await asyncio.to_thread(self.driver.converge, vm)
                if outcome is None:
                    return
                self.track(key, outcome.status["hypervisor"]["pid"])
                current = dict(seen.get("status") or {})
                if any(_without_nulls(current.get(k)) != _without_nulls(v)
                       for k, v in outcome.status.items()):
                    try:
                        out = await asyncio.to_thread(self.write_status, seen, outcome.status)
                    except Conflict:
                        out = None
                    if out is None:  # unbound, evicted or deleted meanwhile: see the change
                        await _wait_either(wake, stopped, 1.0)
                        continue
                    written = version_of(out)
                    self.decided[key] = out  # its watch event brings nothing new
                for type_, reason, message in outcome.events:
                    await asyncio.to_thread(kube.event, self.bodies.get(key, body), reason,
                                            message, type_, "hyperfleet-agent")
                result = "converged" if outcome.converged else "pending"
                metrics.RECONCILES.labels("vm", result).inc()
                if outcome.retry_after is not None:
                    delay = outcome.retry_after
                else:
                    delay = cfg.resync_seconds if outcome.converged else 0.2
                until = time.monotonic() + delay
                while not stopped.is_set() and (left := until - time.monotonic()) > 0:
                    await _wait_either(wake, stopped, left)
                    if not wake.is_set() or key in self.poked \
                            or not _same_inputs(self.decided[key], self.bodies.get(key, body)):
                        break
                    # Woken by the watch event of our own write (it can arrive before the
                    # write returns): nothing new, so no pass until the time is up.
                    wake.clear()
        finally:
            self.wakeups.pop(key, None)
            self.decided.pop(key, None)
            self.poked.discard(key)
            self.vms.pop(key, None)
            self.untrack(key)

    def _ensure_finalizer(self, key: str) -> None:
        """Put our finalizer on a VM bound here that lacks it (in the background)."""
        meta = self.bodies[key]["metadata"]
        if key in self.finalizing or FINALIZER in (meta.get("finalizers") or ()):
            return
        self.finalizing.add(key)
        self._keep(asyncio.ensure_future(self._add_finalizer(key)))

    async def _add_finalizer(self, key: str) -> None:
        """A merge patch of the finalizers, conditional on the version they were read from
        (a list is written whole). On a conflict the VM changed: its next watch event
        brings the version to write on, and tries again."""
        backoff = _Backoff(key)
        try:
            while (body := self.bodies.get(key)) is not None:
                meta = body["metadata"]
                finalizers = list(meta.get("finalizers") or ())
                if FINALIZER in finalizers or meta.get("deletionTimestamp"):
                    return
                patch = {"metadata": {"finalizers": [*finalizers, FINALIZER],
                                      "resourceVersion": meta["resourceVersion"]}}
                try:
                    out = await asyncio.to_thread(self.kube.patch, VMS, meta["name"], patch,
                                                  meta.get("namespace"))
                except Conflict:
                    if self.bodies.get(key) is body:
                        return  # the event of the change is still on its way
                    continue  # it came meanwhile: write on it
                except Exception as exc:
                    await backoff.wait("adding the finalizer", exc)
                    continue
                # Stored at once (the watch event follows): the VM's first pass waits for it.
                latest = self.bodies.get(key)
                if latest is not None and _uid(latest) == _uid(out) \
                        and version_of(out) > version_of(latest):
                    self._store(key, _drop_managed_fields(out))
                return
        finally:
            self.finalizing.discard(key)

    def _delete(self, key: str) -> None:
        """The VM is being deleted: clean up once (``_remove``)."""
        if key in self.deleting:
            return
        loop = self.loops.get(key)
        if loop is not None:
            loop.stopped.set()  # now: no pass may start on this version, woken or not
        task = asyncio.create_task(self._remove(key, self.bodies[key], loop,
                                                list(self.ending.get(key, ()))))
        self.deleting[key] = task
        self._keep(task)

    async def _remove(self, key: str, body: dict[str, Any], loop: VmLoop | None,
                      before: list[asyncio.Task[None]]) -> None:
        """Stop the VM's loop, destroy its VMM, remove its disks if its reclaim policy says
        so, and only then remove our finalizer: the object goes once nothing of it runs
        here. Each step is retried until it is done."""
        if loop is not None:
            await asyncio.wait([loop.task], timeout=STOP_SECONDS)
            if not loop.task.done():
                log.warning("VM loop did not stop in time; cancelling it", extra={
                    "vm": key, "seconds": STOP_SECONDS})
                loop.task.cancel()
                await asyncio.wait([loop.task])
        if before:
            await asyncio.wait(before)
        latest = self.bodies.get(key)
        if latest is not None and _uid(latest) == _uid(body):
            body = latest
        meta = body["metadata"]
        namespace, name = meta.get("namespace") or "default", meta["name"]
        backoff = _Backoff(key)
        while True:
            try:
                await asyncio.to_thread(self.driver.destroy, namespace, name)
                image: dict[str, Any] = dict((body.get("spec") or {}).get("image") or {})
                if image and image.get("reclaimPolicy", "Delete") == "Delete":
                    await asyncio.to_thread(self.storage.remove, namespace, name)
                break
            except Exception as exc:
                await backoff.wait("removing the VM", exc, trace=True)
        log.info("VM removed from node", extra={"vm": key})
        await self._release(key, body)

    async def _release(self, key: str, body: dict[str, Any]) -> None:
        """Remove our finalizer with a JSON patch that tests the object's uid and the entry
        it removes: other finalizers and other writes do not make it fail, and a list that
        did change never loses the wrong entry (then it is read again)."""
        meta = body["metadata"]
        namespace, name, uid = meta.get("namespace"), meta["name"], meta.get("uid")
        backoff = _Backoff(key)
        while FINALIZER in (finalizers := list(body["metadata"].get("finalizers") or ())):
            index = finalizers.index(FINALIZER)
            ops: JsonPatch = [
                {"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
                {"op": "remove", "path": f"/metadata/finalizers/{index}"}]
            if uid:
                ops.insert(0, {"op": "test", "path": "/metadata/uid", "value": uid})
            try:
                await asyncio.to_thread(self.kube.patch, VMS, name, ops, namespace)
                return
            except Gone:
                return
            except Conflict:
                pass  # the finalizers changed: read them again
            except Exception as exc:
                await backoff.wait("removing the finalizer", exc)
            try:
                fresh = await asyncio.to_thread(self.kube.get, VMS, name, namespace)
            except Exception as exc:
                await backoff.wait("reading the VM", exc)
                continue
            if fresh is None or (uid and _uid(fresh) != uid):
                return  # gone already
            body = fresh

    async def stop_vms(self) -> None:
        """At shutdown: end every VM loop and cleanup; the VMMs run on, and the next agent
        adopts them (a cleanup cut short is done again: the finalizer is still there)."""
        tasks: list[asyncio.Future[None]] = []
        for loop in self.loops.values():
            loop.stopped.set()
            tasks.append(loop.task)
        tasks += [*self.deleting.values(), *(t for ts in self.ending.values() for t in ts)]
        await cancel_all(tasks)


def register(registry: kopf.OperatorRegistry, cfg: AgentConfig, kube: Kube) -> Agent:
    agent = Agent(cfg, kube)
    # The VMs bound to this node come from an informer of our own, not from kopf: no
    # per-object worker, body copy, diff and patch on every event, nor a daemon per VM.
    # It watches only this node's VMs (a selectable field in the CRD): an agent's load then
    # grows with its own VMs, not with the fleet.
    informer = agent.vm_informer = Informer(
        kube, VMS, field_selector=f"status.nodeName={cfg.node_name}", each=_drop_managed_fields)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, "agent")
        # Watch only this node's jobs (a selectable field in the CRD), as for the VMs.
        settings.watching.field_selectors[GROUP, JOBS.plural] = \
            f"status.assignedNode={cfg.node_name}"
        # Each VM's converge pass runs in a worker thread (blocking socket I/O); the default
        # pool (cores + 4) would serialise a node's VMs behind a few slow VMM starts.
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="vm"))
        await asyncio.to_thread(agent.register_node)
        # Before adopting anything: a VM that moved while we were away must not run twice.
        await asyncio.to_thread(agent.fence_orphans)
        adopted = await asyncio.to_thread(agent.pm.discover)
        if adopted:
            log.info("adopting running VMMs", extra={"vms": [f"{n}/{m}" for n, m in adopted]})
        agent.tasks = [asyncio.create_task(agent.heartbeat_loop()),
                       asyncio.create_task(agent.watch_vmms()),
                       asyncio.create_task(agent.fence_loop()),
                       asyncio.create_task(agent.migration_loop()),
                       asyncio.create_task(informer.run(agent.observe_vms))]

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await asyncio.to_thread(agent.jobs.hand_back)
        await cancel_all(agent.tasks)
        await agent.stop_vms()

    @kopf.on.event(GROUP, VERSION, JOBS.plural, registry=registry)
    async def job_event(*, event: kopf.RawEvent, body: kopf.Body, name: str,
                        namespace: str | None, **_: Any) -> None:
        key = f"{namespace}/{name}"
        agent.jobs.observe(body)  # handed back, timed out or recreated: stop our attempt
        if event.get("type") == "DELETED" or agent.jobs.cancelled_by_user(body):
            agent.jobs.cancel(key)
            return
        snapshot = copy.deepcopy(dict(body))
        if agent.jobs.wants(snapshot) and key not in agent.jobs.running:
            agent.jobs.running[key] = threading.Event()  # claimed here; the runner takes over
            agent.spawn_job(agent.jobs.run, snapshot)

    return agent


def _drop_managed_fields(body: dict[str, Any]) -> dict[str, Any]:
    """A VM as the agent keeps it: without managedFields, which no pass reads and which
    are the larger part of a small object (the informer's freshly parsed copy, or a write's
    answer: changed in place)."""
    body.get("metadata", {}).pop("managedFields", None)
    return body


def _uid(body: Mapping[str, Any]) -> str | None:
    uid = (body.get("metadata") or {}).get("uid")
    return str(uid) if uid else None


#: What a VM loop's decisions depend on: everything but the bookkeeping of writes
#: (resourceVersion, managedFields) and the finalizers (ours, and any others).
_IGNORED_METADATA = frozenset({"resourceVersion", "managedFields", "finalizers"})


def _same_inputs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two copies of a VM differ only in what no converge pass reads."""
    if a.get("spec") != b.get("spec") or a.get("status") != b.get("status"):
        return False
    ma, mb = a.get("metadata") or {}, b.get("metadata") or {}
    return all(ma.get(k) == mb.get(k) for k in ma.keys() | mb.keys()
               if k not in _IGNORED_METADATA)


def _event_file(_change: watchfiles.Change, path: str) -> bool:
    return path.endswith(".events")


def _without_nulls(value: Any) -> Any:
    """A status value as the API server stores it: a merge patch's nulls delete keys, so
    they are never read back, and comparing with them would write on every pass."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


async def _wait_either(wake: asyncio.Event, stopped: asyncio.Event, timeout: float) -> None:
    """Sleep until the object changed, the loop is stopped, or ``timeout`` passed."""
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
