"""Node-side VM driver: observe a VM's VMM, run the planned steps, report status.

This is the I/O half of :mod:`.vm`; the kopf agent calls :meth:`VmDriver.converge`
from a worker thread for each VM bound to its node.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .disks import NodeStorage, PathRefused, RootDisk, RootDiskError
from .guest import GuestClient, GuestError, GuestTimeout, GuestUnreachable
from .hypervisor.client import ChClient, ChError
from .hypervisor.events import EventTail, is_outcome
from .hypervisor.process import ProcessManager, UnsafeNameError
from .models.common import Condition, now_utc, rfc3339, set_condition
from .models.vm import Phase, RunStrategy, VirtualMachine
from .text import describe, error_text
from .vm import (
    BOOTED,
    Action,
    Desired,
    Observed,
    Step,
    console_socket_of,
    live_migratable,
    phase_of,
    ready_condition,
    reconcile,
)

log = logging.getLogger(__name__)

#: Steps that start a VMM or hand it host paths: the spec's paths are checked first.
_STARTS = frozenset({Action.SPAWN, Action.CREATE, Action.ADD_DISK, Action.RESTORE})

#: How long a freshly spawned VMM may take to create its API socket.
SOCKET_TIMEOUT = 10.0
#: Restart backoff: immediate first, then doubling up to the cap; reset after a quiet spell.
BACKOFF_CAP = 300.0
BACKOFF_RESET = timedelta(minutes=10)
#: The guest's whole budget for its checkpoint or restore hooks: it stops them then and
#: answers, so the VM is never paused mid-hook (the client waits a margin more).
GUEST_STEP_DEADLINE = 60.0
#: Health hooks run inside the converge pass, so theirs is short; a hook still running
#: then is a failed check, not an unreachable guest.
GUEST_HEALTH_DEADLINE = 10.0
#: Condition reasons: an agent that is not there, one that is too slow, one that said no.
_GUEST_REASONS: dict[type[GuestError], str] = {
    GuestUnreachable: "GuestAgentUnreachable", GuestTimeout: "GuestAgentTimeout"}


@dataclass
class Outcome:
    """What one converge pass learned: the status patch and events worth recording."""

    status: dict[str, Any]
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    converged: bool = False
    retry_after: float | None = None  # seconds; None: the normal resync


def restart_delay(streak: int) -> float:
    """Seconds to wait before the next automatic restart, given the restarts already in
    this crash streak: the first is immediate, then 2 s doubling up to the cap."""
    if streak <= 0:
        return 0.0
    return float(min(BACKOFF_CAP, 2 ** min(streak, 12)))


def crash_streak(streak: int, up_since: datetime | None, now: datetime) -> int:
    """The streak an exit at ``now`` continues: a VM that stayed up BACKOFF_RESET starts
    over, however often it crashed before (restartCount keeps the lifetime total)."""
    if up_since is None or now - up_since >= BACKOFF_RESET:
        return 0
    return streak


def _ts(t: datetime | None) -> str | None:
    return rfc3339(t) if t else None


class VmDriver:
    def __init__(self, pm: ProcessManager, node_name: str, socket_wait: float = 5.0,
                 storage: NodeStorage | None = None) -> None:
        self.pm = pm
        self.node_name = node_name
        self.storage = storage  # None: no images, no path confinement (unit tests)
        self.socket_wait = socket_wait
        self._clients: dict[str, ChClient] = {}
        self._failures: dict[str, int] = {}
        self._seen: dict[str, int | None] = {}  # the VMM pid when the last pass ended
        self._tails: dict[str, EventTail] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.departed: set[str] = set()  # migrated away: no longer ours to converge
        self._incoming: dict[str, float] = {}  # being received by migration: not orphans
        self._health_at: dict[str, float] = {}

    def expect(self, key: str) -> None:
        self._incoming[key] = time.monotonic()

    def arrived(self, key: str) -> None:
        self._incoming.pop(key, None)
        self.departed.discard(key)

    def not_coming(self, key: str) -> None:
        self._incoming.pop(key, None)

    def expecting(self, key: str, window: float = 120.0) -> bool:
        since = self._incoming.get(key)
        return since is not None and time.monotonic() - since < window

    def lock(self, ns: str, name: str) -> threading.Lock:
        """One VM's VMM is driven by one thread at a time (converge loop or a VmJob)."""
        with self._guard:
            return self._locks.setdefault(f"{ns}/{name}", threading.Lock())

    def _client(self, ns: str, name: str) -> ChClient:
        key = f"{ns}/{name}"
        c = self._clients.get(key)
        if c is None:
            c = self.pm.client(ns, name, wait_socket=self.socket_wait)
            self._clients[key] = c
        return c

    def observe(self, ns: str, name: str, boot_memory: int | None = None
                ) -> tuple[Observed, int | None]:
        paths = self.pm.paths(ns, name)
        snapshot = (paths.snapshots / "state.json").exists()
        pid = self.pm.pid(ns, name)
        if pid is None:
            return Observed(process=False, snapshot=snapshot), None
        if not paths.socket.exists():
            return Observed(process=True, socket=False, snapshot=snapshot), pid
        try:
            info = self._client(ns, name).info()
        except ChError as exc:
            if exc.status is None and self.pm.pid(ns, name) is None:
                # It exited while we asked (a guest power-off ends the VMM): a dead
                # process, not a failing one.
                return Observed(process=False, snapshot=snapshot), None
            raise
        if info is None:
            return Observed(True, True, None, None, snapshot), pid
        return Observed(True, True, info["state"], info.get("config"), snapshot,
                        boot_memory), pid

    def changed_among(self, keys: list[str]) -> list[str]:
        """The VMs (namespace/name) whose VMM died or reported something since their last
        pass: one call per watcher tick for the whole node, not a thread hop per VM."""
        out = []
        for key in keys:
            ns, _, name = key.partition("/")
            if self.changed(ns, name):
                out.append(key)
        return out

    def changed(self, ns: str, name: str) -> bool:
        """Cheap check for the watcher: did the VMM die, or report something that happened,
        since the last converge pass ended? What a pass itself set off (including a failed
        action's events) is no news: waking on it would retry at once, past the backoff."""
        lock = self.lock(ns, name)
        if not lock.acquire(blocking=False):
            return False  # a pass is running; it sees the VMM itself
        try:
            before = self._seen.get(f"{ns}/{name}", -1)
            pid, events = self._catch_up(ns, name)
        finally:
            lock.release()
        return before != -1 and (before != pid or any(is_outcome(e) for e in events))

    def _catch_up(self, ns: str, name: str) -> tuple[int | None, list[dict[str, Any]]]:
        """Record the VMM's pid and read its new events; called with the VM's lock held."""
        key = f"{ns}/{name}"
        try:
            paths = self.pm.paths(ns, name)
            pid = self.pm.pid(ns, name)
            tail = self._tails.get(key)
            if tail is None:
                tail = self._tails[key] = EventTail(paths.events)
            events = tail.read()
        except (UnsafeNameError, OSError):
            return self._seen.get(key), []
        self._seen[key] = pid
        return pid, events

    def converge(self, vm: VirtualMachine) -> Outcome | None:
        """One pass; None when the VM is no longer this node's to drive."""
        ns, name = vm.metadata.namespace or "default", vm.metadata.name
        with self.lock(ns, name):
            if vm.key in self.departed:
                return None
            try:
                return self._converge(vm)
            finally:
                self._catch_up(ns, name)

    def _converge(self, vm: VirtualMachine) -> Outcome:
        ns, name = vm.metadata.namespace or "default", vm.metadata.name
        key = vm.key
        st = vm.status
        gen = vm.metadata.generation
        now = now_utc()
        events: list[tuple[str, str, str]] = []
        conditions = list(st.conditions)
        boot_time, restarts, last_restart = st.boot_time, st.restart_count, st.last_restart_time
        streak, restart_at = st.consecutive_restarts, st.next_restart_time
        halted_gen = st.halted_generation if st.halted_generation == gen else None
        snapshot = st.snapshot.wire() if st.snapshot else None
        boot_memory = st.hypervisor.boot_memory if st.hypervisor else None
        retry_after: float | None = None
        observed, pid = Observed(process=False), None
        image_status: dict[str, Any] | None = None
        message: str | None = None
        try:
            paths = self.pm.paths(ns, name)
            observed, pid = self.observe(ns, name, boot_memory)
            root = self._root_disk(vm)
            if root is not None:
                image_status = root.status
                conditions = set_condition(
                    conditions, "ImageReady", root.ready, "Ready" if root.ready else "Pulling",
                    root.status.get("progress") or f"root disk {root.path}", gen)
            desired = self._desired(vm, halted_gen, root.path if root else None)
            exited = self._guest_exited(vm, observed)
            if exited and vm.spec.run_strategy == RunStrategy.MANUAL \
                    and desired.state in BOOTED:
                halted_gen = gen
                events.append(("Normal", "GuestStopped",
                               "guest stopped on its own; runStrategy Manual keeps it off"))
                desired = self._desired(vm, halted_gen)
            plan = reconcile(desired, observed)
            if self.storage is not None and any(s.action in _STARTS for s in plan):
                # Before anything hands the spec's host paths to a VMM (not every pass:
                # resolving each path is the dearest part of a pass with nothing to do).
                self.storage.check_paths(vm.spec)
            if root is not None and not root.ready:
                # Nothing that needs the root disk runs before it exists.
                plan, retry_after = [], 1.0
                message = (f"pulling image {describe(root.status.get('key'))}: "
                           f"{describe(root.status.get('progress') or 'starting')}")
                conditions = set_condition(conditions, "Ready", False, "ImagePulling",
                                           message, gen)
            auto = vm.spec.run_strategy == RunStrategy.ALWAYS and desired.state in BOOTED
            if restart_at is not None and not (auto and plan):
                restart_at = None  # up again, stopped, asleep or Manual now: nothing to wait for
            if auto and plan and (exited or restart_at is not None):
                how = "process died" if not observed.process else "guest shut down"
                if exited:
                    ups = [t for t in (boot_time, last_restart) if t is not None]
                    streak = crash_streak(streak, max(ups) if ups else None, now)
                    delay = restart_delay(streak)
                    if delay:
                        restart_at = now + timedelta(seconds=delay)
                        events.append(("Warning", "BackOff",
                                       f"VM exited ({how}); restart {restarts + 1} in "
                                       f"{delay:.0f}s (runStrategy Always)"))
                if vm.metadata.deletion_timestamp:
                    plan = []  # being deleted: the delete handler stops the VMM
                elif restart_at is not None and restart_at > now:
                    # The message names a fixed time, so waiting passes write no new status
                    # (each status write would wake this VM's loop again at once).
                    conditions = set_condition(
                        conditions, "Ready", False, "RestartBackoff",
                        f"VM exited; restart {restarts + 1} at {rfc3339(restart_at)}", gen)
                    plan, retry_after = [], (restart_at - now).total_seconds()
                else:
                    restarts += 1
                    streak += 1
                    last_restart = now
                    text = f"VM exited ({how})" if restart_at is None else "backoff over"
                    restart_at = None
                    events.append(("Warning", "Restarted",
                                   f"{text}; restart {restarts} (runStrategy Always)"))
            if any(s.action == Action.WAIT for s in plan):
                self._check_socket_timeout(ns, name)
            recreate = next((s.why for s in plan if s.action == Action.DELETE and s.why), None)
            if recreate:
                conditions = set_condition(conditions, "Recreated", True, "ColdChange", recreate,
                                           gen)
                events.append(("Normal", "Recreating", recreate))
            for step in plan:
                if step.action in (Action.GUEST_CHECKPOINT, Action.GUEST_RESTORE):
                    conditions = self._guest_step(vm, step, conditions, events)
                    continue
                self._execute(ns, name, step)
                if step.action == Action.CREATE and step.body:
                    boot_memory = int(step.body["memory"]["size"])
                if step.action == Action.BOOT or (step.action == Action.RESUME
                                                   and observed.state is None):
                    boot_time = now_utc()
                if step.action == Action.SNAPSHOT:
                    snapshot = {"path": str(paths.snapshots), "takenAt": _ts(now_utc()),
                                "sizeBytes": _dir_size(paths.snapshots)}
                if step.action == Action.RESTORE and snapshot:
                    snapshot = {**snapshot, "restoredAt": _ts(now_utc())}
                if step.action == Action.DISCARD_SNAPSHOT and snapshot \
                        and not snapshot.get("restoredAt"):
                    snapshot = None  # gone from disk, and no wake-up from it is on record
                reason, text = _event_for(step, self.node_name)
                if reason:
                    events.append(("Normal", reason, text))
            if plan:
                observed, pid = self.observe(ns, name, boot_memory)
            converged = retry_after is None and not reconcile(desired, observed)
            if vm.spec.guest_agent is not None and observed.state == "Running":
                conditions = self._guest_health(vm, conditions, events)
            phase = phase_of(desired, observed)
            if retry_after is None:
                conditions = set_condition(
                    conditions, "Ready", *ready_condition(desired, observed, converged,
                                                          conditions), gen)
                if converged and vm.spec.guest_agent is not None and observed.state == "Running":
                    retry_after = self._health_due(vm)  # the next health check, not a resync
            conditions = set_condition(conditions, "LiveMigratable",
                                       *live_migratable(vm.spec, observed), gen)
            if any(c.type == "Failure" and c.status == "True" for c in conditions):
                conditions = set_condition(conditions, "Failure", False, "Recovered", "", gen)
            self._failures.pop(key, None)
        except (ChError, UnsafeNameError, OSError, ValueError, RootDiskError) as exc:
            reason = "InvalidName" if isinstance(exc, UnsafeNameError) \
                else "PathNotAllowed" if isinstance(exc, PathRefused) \
                else exc.reason if isinstance(exc, RootDiskError) else "HypervisorError"
            n = self._failures[key] = self._failures.get(key, 0) + 1
            retry_after = min(60.0, 0.5 * 2 ** min(n, 7))
            if isinstance(exc, RootDiskError):
                retry_after = exc.retry_after or 30.0
                image_status = {"key": vm.spec.image.key if vm.spec.image else "",
                                "phase": "Failed", "message": error_text(exc)}
                conditions = set_condition(conditions, "ImageReady", False, reason,
                                           error_text(exc), gen)
            why = error_text(exc)
            log.warning("converge failed", extra={"vm": key, "error": why, "attempt": n})
            was = next((c for c in conditions if c.type == "Failure"), None)
            conditions = set_condition(conditions, "Ready", False, reason, why, gen)
            conditions = set_condition(conditions, "Failure", True, reason, why, gen)
            if was is None or was.status != "True" or was.message != why:
                events.append(("Warning", reason, why))  # once per distinct failure
            phase, message, converged = Phase.FAILED, why, False
            with contextlib.suppress(ChError, UnsafeNameError, OSError):
                observed, pid = self.observe(ns, name, boot_memory)
        try:
            sock: str | None = str(self.pm.paths(ns, name).socket) if pid else None
        except UnsafeNameError:
            sock = None
        status: dict[str, Any] = {
            "phase": phase.value,
            "nodeName": self.node_name,
            "message": message,
            "observedGeneration": gen,
            "hypervisor": {"state": observed.state, "pid": pid, "bootMemory": boot_memory,
                           "consoleSocket": console_socket_of(observed.config, observed.state)},
            "apiSocket": sock,
            "bootTime": _ts(boot_time),
            "restartCount": restarts,
            "lastRestartTime": _ts(last_restart),
            "consecutiveRestarts": streak,
            "nextRestartTime": _ts(restart_at),
            "haltedGeneration": halted_gen,
            "snapshot": snapshot,
            "image": image_status,
            "conditions": [c.wire() for c in conditions],
        }
        return Outcome(status=status, events=events, converged=converged, retry_after=retry_after)

    def _guest(self, vm: VirtualMachine) -> GuestClient:
        paths = self.pm.paths(vm.metadata.namespace or "default", vm.metadata.name)
        port = vm.spec.guest_agent.port if vm.spec.guest_agent else 1024
        return GuestClient(str(paths.socket.with_suffix(".vsock")), port)

    def _guest_step(self, vm: VirtualMachine, step: Step, conditions: list[Condition],
                    events: list[tuple[str, str, str]]) -> list[Condition]:
        """Checkpoint/restore through the guest agent; a silent, slow or failing guest does
        not block sleep (the memory snapshot is still crash-consistent) but is reported. The
        deadline makes the guest stop its hooks before it answers, so the pause that follows
        never lands mid-hook."""
        checkpoint = step.action == Action.GUEST_CHECKPOINT
        kind = "GuestCheckpointed" if checkpoint else "GuestRestored"
        try:
            result = self._guest(vm).call("checkpoint" if checkpoint else "restore",
                                          deadline=GUEST_STEP_DEADLINE,
                                          retry_for=0 if checkpoint else 10)
            hooks = ", ".join(result.get("hooks") or []) or "no hooks"
            msg = f"guest agent {'checkpointed' if checkpoint else 'restored'} ({hooks})"
            events.append(("Normal", kind, msg))
            return set_condition(conditions, kind, True, "GuestAgent", msg,
                                 vm.metadata.generation)
        except GuestError as exc:
            msg = f"{step.why}: {error_text(exc)}; continuing without it"
            events.append(("Warning", f"{kind}Failed", msg))
            return set_condition(conditions, kind, False,
                                 _GUEST_REASONS.get(type(exc), "GuestAgentError"), msg,
                                 vm.metadata.generation)

    def _health_due(self, vm: VirtualMachine) -> float:
        """Seconds until the guest's next health check is due."""
        assert vm.spec.guest_agent is not None
        since = time.monotonic() - self._health_at.get(vm.key, 0.0)
        return max(1.0, vm.spec.guest_agent.health_interval_seconds - since)

    def _guest_health(self, vm: VirtualMachine, conditions: list[Condition],
                      events: list[tuple[str, str, str]]) -> list[Condition]:
        spec = vm.spec.guest_agent
        assert spec is not None
        last = self._health_at.get(vm.key, 0.0)
        old = next((c for c in conditions if c.type == "GuestHealthy"), None)
        if old is not None and time.monotonic() - last < spec.health_interval_seconds:
            return conditions
        self._health_at[vm.key] = time.monotonic()
        try:
            result = self._guest(vm).call("health", deadline=GUEST_HEALTH_DEADLINE)
            bad = [f"{c['hook']}: {c.get('output') or 'failed'}"
                   for c in result.get("checks", []) if not c.get("ok")]
            healthy = bool(result.get("healthy")) and not bad
            msg = "; ".join(bad) if bad else f"{len(result.get('checks', []))} checks passed"
            reason = "ChecksPassed" if healthy else "ChecksFailed"
        except GuestError as exc:
            healthy, msg = False, error_text(exc)
            reason = _GUEST_REASONS.get(type(exc), "GuestAgentError")
        if old is None or (old.status == "True") != healthy:
            events.append(("Normal" if healthy else "Warning", reason, msg))
        return set_condition(conditions, "GuestHealthy", healthy, reason, msg,
                             vm.metadata.generation)

    def _desired(self, vm: VirtualMachine, halted_gen: int | None,
                 root_disk: Path | None = None) -> Desired:
        paths = self.pm.paths(vm.metadata.namespace or "default", vm.metadata.name)
        return Desired(
            spec=vm.spec,
            halted=halted_gen is not None,
            snapshot_url=f"file://{paths.snapshots}",
            vsock_socket=str(paths.socket.with_suffix(".vsock")),
            root_disk=str(root_disk) if root_disk else None,
            console_socket=str(paths.console),
        )

    def _root_disk(self, vm: VirtualMachine) -> RootDisk | None:
        """Make sure the root disk exists (or is on its way) before any step could hand
        its path to the VMM; spec.image.path is confined by the image cache."""
        if self.storage is None:
            if vm.spec.image is not None:
                raise RootDiskError("NoImageStore", "spec.image: this agent keeps no images "
                                    "(start it with --state-dir)", None)
            return None
        if vm.spec.image is None:
            return None
        return self.storage.prepare(vm.metadata.namespace or "default", vm.metadata.name,
                                    vm.spec.image)

    @staticmethod
    def _guest_exited(vm: VirtualMachine, observed: Observed) -> bool:
        """The VM was up when last reported and is now down without being asked to.

        Only the moment of the exit: a restart still waiting out its backoff is
        ``status.nextRestartTime`` (the waiting pass reports phase Starting)."""
        st = vm.status
        # Failed still reports the VMM state it re-observed: a guest that then dies exits.
        was_up = st.phase in (Phase.RUNNING, Phase.PAUSED, Phase.FAILED) \
            and st.hypervisor is not None and st.hypervisor.state in BOOTED
        return was_up and observed.state not in BOOTED

    def _check_socket_timeout(self, ns: str, name: str) -> None:
        started = self.pm.started_at(ns, name)
        if started is not None and time.monotonic() - started > SOCKET_TIMEOUT:
            self.pm.stop(ns, name, grace=1)
            raise ChError("spawn", None, [
                f"API socket {self.pm.paths(ns, name).socket} did not appear within "
                f"{SOCKET_TIMEOUT:.0f}s; check the agent's --ch-binary and the VMM log "
                f"{self.pm.paths(ns, name).log}"
            ])

    def _execute(self, ns: str, name: str, step: Step) -> None:
        log.info("step", extra={"vm": f"{ns}/{name}", "action": step.action.value,
                                "why": step.why})
        if step.action == Action.SPAWN:
            self._drop_client(ns, name)
            self.pm.spawn(ns, name)
        elif step.action == Action.KILL:
            self._drop_client(ns, name)
            self.pm.stop(ns, name)
        elif step.action == Action.WAIT:
            return
        elif step.action == Action.DISCARD_SNAPSHOT:
            # Fail loudly: a consumed snapshot left behind would be restored after a crash.
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.pm.paths(ns, name).snapshots)
        elif step.action == Action.SNAPSHOT:
            d = self.pm.paths(ns, name).snapshots
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            self._client(ns, name).put(step.action.value, step.body)
        elif step.action == Action.BOOT:
            try:
                self._client(ns, name).put(step.action.value)
            except ChError as exc:
                if exc.status is not None and exc.status != 400:
                    # A boot that failed past validation (kernel unreadable, ...) leaves
                    # cloud-hypervisor with a half-built VM that reports Created yet answers
                    # every later boot "VM is already created": drop it, so the next pass
                    # creates it afresh and reports the real cause again.
                    with contextlib.suppress(ChError):
                        self._client(ns, name).put(Action.DELETE.value)
                raise
        else:
            self._client(ns, name).put(step.action.value, step.body)

    def fence(self, ns: str, name: str) -> bool:
        """Stop this node's VMM of a VM that is no longer bound here; a VM loop still
        holding an old copy then gets None from converge instead of starting it again.
        True if a VMM was running (so two callers racing report it once)."""
        key = f"{ns}/{name}"
        with self.lock(ns, name):
            self.departed.discard(key)
            try:
                had = self.pm.pid(ns, name) is not None
            except UnsafeNameError:
                had = False
            self.destroy(ns, name)
            self.departed.add(key)
            return had

    def destroy(self, ns: str, name: str) -> None:
        if f"{ns}/{name}" in self.departed:
            self.departed.discard(f"{ns}/{name}")
            return  # the VM lives on another node now
        self._drop_client(ns, name)
        self._failures.pop(f"{ns}/{name}", None)
        self._seen.pop(f"{ns}/{name}", None)
        self._tails.pop(f"{ns}/{name}", None)
        try:
            paths = self.pm.paths(ns, name)
        except UnsafeNameError:
            return  # no VMM can have been started under a name that has no socket path
        self.pm.stop(ns, name)
        shutil.rmtree(paths.snapshots, ignore_errors=True)

    def _drop_client(self, ns: str, name: str) -> None:
        c = self._clients.pop(f"{ns}/{name}", None)
        if c is not None:
            c.close()


_EVENTS = {
    Action.BOOT: "Booted",
    Action.PAUSE: "Paused",
    Action.RESUME: "Resumed",
    Action.SHUTDOWN: "Stopped",
    Action.RESIZE: "Resized",
    Action.ADD_DISK: "DeviceAdded",
    Action.ADD_NET: "DeviceAdded",
    Action.REMOVE_DEVICE: "DeviceRemoved",
    Action.SNAPSHOT: "Snapshotted",
    Action.RESTORE: "Restored",
}


def _gib(size: Any) -> str:
    return f"{int(size) / 2**30:g} GiB"


def _step_text(step: Step) -> str:
    """What a step did, in words (its body is cloud-hypervisor's JSON, not for people)."""
    body = step.body or {}
    match step.action:
        case Action.BOOT:
            return "booted"
        case Action.PAUSE:
            return "paused"
        case Action.RESUME:
            return "resumed"
        case Action.SHUTDOWN:
            return "shut down"
        case Action.RESIZE:
            parts = []
            if body.get("desired_vcpus") is not None:
                parts.append(f"{body['desired_vcpus']} vCPUs")
            if body.get("desired_ram") is not None:
                parts.append(f"{_gib(body['desired_ram'])} of memory")
            return "resized to " + (" and ".join(parts) or "the spec")
        case Action.ADD_DISK:
            path = f" ({body['path']})" if body.get("path") else ""
            return f"added disk {describe(body.get('id') or 'without id')}{path}"
        case Action.ADD_NET:
            return f"added network interface {describe(body.get('id') or 'without id')}"
        case Action.REMOVE_DEVICE:
            return f"removed device {describe(body.get('id'))}"
        case Action.SNAPSHOT:
            dest = str(body.get("destination_url") or "").removeprefix("file://")
            return "snapshotted" + (f" to {dest}" if dest else "")
        case Action.RESTORE:
            return "restored from its snapshot"
    return step.action.value


def _event_for(step: Step, node: str) -> tuple[str | None, str]:
    """The Event a finished step gets: a sentence, e.g. "resized to 4 vCPUs on node-a
    (cpus/memory changed)"."""
    reason = _EVENTS.get(step.action)
    if reason is None:
        return None, ""
    return reason, f"{_step_text(step)} on {node}" + (f" ({step.why})" if step.why else "")


def _dir_size(path: Any) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
