"""What each VmJob operation does on a node: a registry of handlers (plugin style).

A handler gets a :class:`JobContext` and returns the job's result (a JSON-able dict),
or raises :class:`JobFailure` (``retryable`` says whether another attempt may help).
Handlers hold the VM's driver lock while they touch its VMM, so they never interleave
with the VM's converge loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..conventions import CONDITION_FAILURE, CONDITION_READY, OWNER_LABEL
from ..driver import VmDriver
from ..hypervisor.client import ChClient, ChError
from ..hypervisor.events import EventTail
from ..hypervisor.process import pid_alive
from ..kube import NODES, VMS, KubeApi
from ..models.common import format_quantity, parse_quantity
from ..nodes import allocatable
from ..vm import ready_settled
from .envelope import JobDocument
from .payloads import (
    SystemHealthCheckV1,
    VmMigrateV1,
    VmRebootV1,
    VmResizeV1,
    VmRestoreV1,
    VmSnapshotV1,
)
from .retries import JobError

Handler = Callable[["JobContext"], dict[str, Any]]
HANDLERS: dict[str, Handler] = {}


def handler(operation: str) -> Callable[[Handler], Handler]:
    """Register the handler of an operation (a plugin may replace a built-in one)."""

    def register(fn: Handler) -> Handler:
        HANDLERS[operation] = fn
        return fn

    return register


class JobFailure(Exception):
    """An attempt failed; ``error.retryable`` tells the engine whether to try again."""

    def __init__(self, message: str, retryable: bool = True, code: str | None = None) -> None:
        super().__init__(message)
        self.error = JobError(message, retryable, code)


class Cancelled(Exception):
    """The job was cancelled (annotation or deletion) while it ran."""


@dataclass
class JobContext:
    job: JobDocument
    payload: Any
    name: str  # the VmJob object's name
    namespace: str
    node: str
    driver: VmDriver
    kube: KubeApi
    log: logging.LoggerAdapter[logging.Logger]
    report: Callable[[int, str], None]  # progress: percent, message
    cancelled: threading.Event = field(default_factory=threading.Event)
    peers: Any = None  # migration rendezvous (see vm_migrate)

    @property
    def vm(self) -> tuple[str, str]:
        target = self.job.routing.target_vm
        if target is None:
            raise JobFailure("routing.targetVm is required for this operation", retryable=False)
        return target.namespace or self.namespace, target.name

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("cancelled while running")

    @contextmanager
    def vmm(self) -> Iterator[ChClient]:
        """The target VM's VMM client, with the VM's lock held."""
        ns, name = self.vm
        with self.driver.lock(ns, name):
            if self.driver.pm.pid(ns, name) is None:
                raise JobFailure(f"VM {ns}/{name} has no running VMM on node {self.node}")
            client = self.driver.pm.client(ns, name)
            try:
                yield client
            except ChError as exc:
                raise JobFailure(str(exc), retryable=exc.transient or exc.status == 500) from exc
            finally:
                client.close()


def _dir_from(url_or_path: str) -> Path:
    return Path(url_or_path.removeprefix("file://"))


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@handler("vm.snapshot")
def vm_snapshot(ctx: JobContext) -> dict[str, Any]:
    p: VmSnapshotV1 = ctx.payload
    ns, name = ctx.vm
    dest = _dir_from(p.destination) if p.destination else (
        ctx.driver.pm.socket_dir / "snapshots" / "jobs" / f"{ns}_{name}" / (ctx.job.job_id or "x"))
    with ctx.vmm() as vmm:
        ctx.check_cancelled()  # the lock may have been waited for: nothing done yet
        info = vmm.info() or {}
        state = info.get("state")
        if state not in ("Running", "Paused"):
            raise JobFailure(f"VM {ns}/{name} is {state or 'not created'}; boot it first",
                           retryable=False)
        paused_here = state == "Running" and p.pause_vm
        if state == "Running" and not paused_here:
            raise JobFailure("the VMM snapshots only paused VMs: set pauseVm: true", retryable=False)
        if paused_here:
            vmm.put("vm.pause")
        ctx.report(30, "paused" if paused_here else "already paused")
        try:
            ctx.check_cancelled()  # last point before the snapshot; the finally resumes
            try:
                dest.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise JobFailure(f"payload.data.destination {dest}: cannot create the "
                                 f"directory ({exc}); fix the path or its parent") from exc
            vmm.put("vm.snapshot", {"destination_url": f"file://{dest}"})
        finally:
            if paused_here:
                vmm.put("vm.resume")
    ctx.report(90, "snapshot written")
    return {"destination": str(dest), "sizeBytes": _size(dest),
            "files": sorted(f.name for f in dest.iterdir())}


@handler("vm.restore")
def vm_restore(ctx: JobContext) -> dict[str, Any]:
    p: VmRestoreV1 = ctx.payload
    ns, name = ctx.vm
    src = _dir_from(p.source)
    if not (src / "state.json").exists():
        raise JobFailure(f"payload.data.source {p.source}: no snapshot there (state.json missing)",
                       retryable=False)
    pm = ctx.driver.pm
    with ctx.driver.lock(ns, name):
        # Stopping the running VMM is the point of no return: after it, finishing the
        # restore leaves the VM in a better state than stopping half way.
        ctx.check_cancelled()
        pm.stop(ns, name)
        ctx.report(30, "previous VMM stopped")
        pm.spawn(ns, name)
        client = pm.client(ns, name)
        try:
            client.put("vm.restore", {"source_url": f"file://{src}"})
            ctx.report(70, "restored (paused)")
            if p.resume:
                client.put("vm.resume")
            state = (client.info() or {}).get("state")
        except ChError as exc:
            raise JobFailure(str(exc), retryable=exc.transient) from exc
        finally:
            client.close()
    return {"source": str(src), "state": state}


@handler("vm.reboot")
def vm_reboot(ctx: JobContext) -> dict[str, Any]:
    p: VmRebootV1 = ctx.payload
    with ctx.vmm() as vmm:
        ctx.check_cancelled()
        if (vmm.info() or {}).get("state") != "Running":
            raise JobFailure("only a Running VM can be rebooted", retryable=False)
        ctx.check_cancelled()
        ns, name = ctx.vm
        events = EventTail(ctx.driver.pm.paths(ns, name).events)
        events.read()
        vmm.put("vm.reboot")
        # The reset may finish after the answer; a lifecycle call during it has killed the
        # real VMM (BUILD.md), so the VM's lock is held until vm:rebooted arrives.
        deadline = time.monotonic() + 10
        while not any(e.get("event") == "rebooted" for e in events.read()):
            if time.monotonic() > deadline:
                raise JobFailure("the VMM did not report vm:rebooted within 10s")
            time.sleep(0.02)
        state = (vmm.info() or {}).get("state")
    return {"mode": p.mode, "state": state}


@handler("vm.resize")
def vm_resize(ctx: JobContext) -> dict[str, Any]:
    """Resizing changes desired state (the VM's spec), so the reconcile loop keeps it."""
    p: VmResizeV1 = ctx.payload
    ns, name = ctx.vm
    spec: dict[str, Any] = {}
    ctx.check_cancelled()
    current = ctx.kube.get(VMS, name, ns)
    if current is None:
        raise JobFailure(f"VirtualMachine {ns}/{name} not found", retryable=False)
    source = ((current.get("metadata") or {}).get("labels") or {}).get(OWNER_LABEL)
    if source:
        # Its spec is Git's: the GitSource would revert the resize at its next reconcile.
        raise JobFailure(
            f"VirtualMachine {ns}/{name} is managed by GitSource {source}: a resize here "
            "would be reverted; change spec.cpus / spec.memory in Git instead",
            retryable=False)
    if p.desired_cpus is not None:
        spec["cpus"] = p.desired_cpus
    if p.desired_memory is not None:
        spec["memory"] = p.desired_memory
    _check_room(ctx, current, spec)
    out = ctx.kube.patch(VMS, name, {"spec": spec}, ns)
    generation = out["metadata"]["generation"]
    ctx.report(40, f"spec updated (generation {generation})")
    deadline = time.monotonic() + max(5.0, ctx.job.execution.timeout_seconds - 5)
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        vm = ctx.kube.get(VMS, name, ns) or {}
        st = vm.get("status") or {}
        ready = {c.get("type"): c for c in st.get("conditions") or []}.get(CONDITION_READY) or {}
        # Ready, or stopped/paused/asleep as asked: a resize of a stopped VM lands at boot.
        if st.get("observedGeneration", 0) >= generation and ready_settled(ready):
            return {"cpus": vm["spec"]["cpus"], "memory": vm["spec"]["memory"],
                    "generation": generation}
        failure = {c.get("type"): c for c in st.get("conditions") or []}.get(CONDITION_FAILURE) or {}
        if st.get("observedGeneration", 0) >= generation and failure.get("status") == "True":
            raise JobFailure(f"the VMM refused the resize: {failure.get('message')}",
                           retryable=False)
        time.sleep(0.3)
    raise JobFailure("the VM did not converge to the new size in time")


def _check_room(ctx: JobContext, vm: dict[str, Any], spec: dict[str, Any]) -> None:
    """Growing a placed VM must fit its node, as placing it had to: the scheduler counts
    spec sizes, so an unchecked resize over-commits the node for every later decision."""
    node_name = (vm.get("status") or {}).get("nodeName")
    if not node_name:
        return  # not placed yet: the scheduler will find it a node that fits
    node = ctx.kube.get(NODES, node_name)
    if node is None:
        return
    cpus_free, mem_free = allocatable(node)
    for other in ctx.kube.list(VMS, None, f"status.nodeName={node_name}"):
        if other["metadata"].get("uid") != vm["metadata"].get("uid"):
            cpus_free -= int(other["spec"]["cpus"])
            mem_free -= parse_quantity(str(other["spec"]["memory"]))
    want_cpus = int(spec.get("cpus", vm["spec"]["cpus"]))
    want_mem = parse_quantity(str(spec.get("memory", vm["spec"]["memory"])))
    grows = want_cpus > int(vm["spec"]["cpus"]) \
        or want_mem > parse_quantity(str(vm["spec"]["memory"]))
    if grows and (want_cpus > cpus_free or want_mem > mem_free):
        raise JobFailure(
            f"WorkerNode {node_name} has room for {max(cpus_free, 0)} CPUs and "
            f"{format_quantity(max(mem_free, 0))} for this VM, not {want_cpus} CPUs and "
            f"{format_quantity(want_mem)}: resize less, or live-migrate the VM to a larger "
            "node first", retryable=False)


@handler("system.health-check")
def system_health_check(ctx: JobContext) -> dict[str, Any]:
    p: SystemHealthCheckV1 = ctx.payload
    pm = ctx.driver.pm
    checks = list(p.checks) or ["vmm", "socket-dir", "kvm"]
    results: dict[str, dict[str, Any]] = {}
    for i, check in enumerate(checks):
        ctx.check_cancelled()
        if check == "vmm":
            vms = pm.discover()
            bad = []
            for ns, name in vms:
                client = pm.client(ns, name, wait_socket=1)
                try:
                    client.ping()
                except ChError as exc:
                    bad.append(f"{ns}/{name}: {exc}")
                finally:
                    client.close()
            results[check] = {"ok": not bad, "vmms": len(vms), "failing": bad}
        elif check == "socket-dir":
            ok = os.access(pm.socket_dir, os.W_OK)
            free = shutil.disk_usage(pm.socket_dir).free
            results[check] = {"ok": ok, "path": str(pm.socket_dir), "freeBytes": free}
        elif check == "kvm":
            results[check] = {"ok": True, "present": os.path.exists("/dev/kvm"),
                              "note": "informational: the configured VMM decides if it needs KVM"}
        else:
            raise JobFailure(f"payload.data.checks: unknown check {check!r}; "
                           "known: vmm, socket-dir, kvm", retryable=False)
        ctx.report(int(100 * (i + 1) / len(checks)), f"{check} checked")
    failing = [k for k, v in results.items() if not v["ok"]]
    if failing:
        raise JobFailure(f"health checks failed: {', '.join(failing)}; details: {results}",
                       retryable=False)
    return {"node": ctx.node, "checks": results}


@handler("vm.migrate")
def vm_migrate(ctx: JobContext) -> dict[str, Any]:
    """Source side of a live migration; the destination agent receives (see receive_vm)."""
    p: VmMigrateV1 = ctx.payload
    ns, name = ctx.vm
    if p.destination_node == ctx.node:
        raise JobFailure("payload.data.destinationNode is the node the VM already runs on",
                       retryable=False)
    if ctx.peers is None:
        raise JobFailure("this agent cannot reach migration peers", retryable=False)
    receiver = ctx.peers.await_receiver(ctx, p.destination_node, p.timeout_seconds or 60)
    ctx.report(40, f"destination {p.destination_node} listening")
    pm = ctx.driver.pm
    with ctx.driver.lock(ns, name):
        ctx.check_cancelled()  # last point before the VM leaves this node
        pid = pm.pid(ns, name)
        if pid is None:
            raise JobFailure(f"VM {ns}/{name} has no running VMM on node {ctx.node}")
        events = EventTail(pm.paths(ns, name).events)
        events.read()  # only what the migration brings counts
        client = pm.client(ns, name, wait_socket=1)
        try:
            client.request("PUT", "vm.send-migration", {"destination_url": receiver})
        except ChError as exc:
            raise JobFailure(f"vm.send-migration failed: {exc}", retryable=False) from exc
        finally:
            client.close()
        _await_migration(ctx, events, pid, p.timeout_seconds or 300,
                         pm.paths(ns, name).log)
        ctx.driver.departed.add(f"{ns}/{name}")
        pm.stop(ns, name, grace=2)
        ctx.report(80, "memory and state sent")
        ctx.kube.patch(VMS, name, {"status": {"nodeName": p.destination_node,
                                              "message": f"migrated from {ctx.node}"}},
                       ns, status=True)
    return {"from": ctx.node, "to": p.destination_node, "receiver": receiver}


def _await_migration(ctx: JobContext, events: EventTail, pid: int, timeout: float,
                     log: Path) -> None:
    """Wait for the source VMM to say how the migration ended.

    cloud-hypervisor answers vm.send-migration at once and migrates in a worker thread:
    the answer says nothing of the outcome. ``migration-finished`` (after which the source
    VMM exits by itself) is success; ``migration-failed``, or the VMM dying without it, is
    not, and the VM must then stay this node's."""
    deadline = time.monotonic() + timeout
    while True:
        for event in events.read():
            if event.get("event") == "migration-finished":
                return
            if event.get("event") == "migration-failed":
                raise JobFailure(f"the source VMM reported migration-failed; see {log}",
                                 retryable=False)
        if not pid_alive(pid):
            if any(e.get("event") == "migration-finished" for e in events.read()):
                return
            raise JobFailure(f"the source VMM (pid {pid}) exited before the migration "
                             f"finished; see {log}", retryable=False)
        if time.monotonic() > deadline:
            raise JobFailure(f"the migration did not finish within {timeout:.0f}s",
                             retryable=False)
        time.sleep(0.05)
