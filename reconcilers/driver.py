"""Node-side VM driver: observe a VM's VMM, execute what the lifecycle policy decides.

The I/O half of :mod:`.lifecycle` (which decides, purely) and :mod:`.vm` (which plans);
the kopf agent calls :meth:`VmDriver.converge` from a worker thread for each VM bound to
its node.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from .conventions import CONDITION_GUEST_HEALTHY
from .disks import NodeStorage, PathRefused, RootDisk, RootDiskError
from .guest import GuestClient, GuestError, GuestTimeout, GuestUnreachable
from .hypervisor.client import ChClient, ChError
from .hypervisor.events import EventTail, is_outcome
from .hypervisor.process import ProcessManager, UnsafeNameError
from .lifecycle import Decision, Event, Place, RootState, begin, decide
from .models.common import now_utc
from .models.vm import VirtualMachine
from .text import error_text
from .vm import Action, Observed, Step

log = logging.getLogger(__name__)

#: How long a freshly spawned VMM may take to create its API socket.
SOCKET_TIMEOUT = 10.0
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
    events: list[Event] = field(default_factory=list)
    converged: bool = False
    retry_after: float | None = None  # seconds; None: the normal resync


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

    def changed_among(self, keys: list[str]) -> tuple[list[str], list[str]]:
        """(changed, busy): the VMs (namespace/name) whose VMM died or reported something
        since their last pass, and those whose pass is running now (ask again after it):
        one call per batch of news for the whole node, not a thread hop per VM."""
        changed, busy = [], []
        for key in keys:
            ns, _, name = key.partition("/")
            news = self.changed(ns, name)
            if news is None:
                busy.append(key)
            elif news:
                changed.append(key)
        return changed, busy

    def changed(self, ns: str, name: str) -> bool | None:
        """Cheap check for the watchers: did the VMM die, or report something that happened,
        since the last converge pass observed it? What a pass itself set off (including a
        failed action's events) is no news: waking on it would retry at once, past the
        backoff. None while a pass runs."""
        lock = self.lock(ns, name)
        if not lock.acquire(blocking=False):
            return None
        try:
            before = self._seen.get(f"{ns}/{name}", -1)
            pid, events = self._catch_up(ns, name)
        finally:
            lock.release()
        return before != -1 and (before != pid or any(is_outcome(e) for e in events))

    def _catch_up(self, ns: str, name: str, observed: int | Literal["now"] | None = "now"
                  ) -> tuple[int | None, list[dict[str, Any]]]:
        """Record the VMM's pid (``observed``: the one a pass last saw, so a VMM that died
        after that look is still news) and read its new events; called with the VM's lock
        held."""
        key = f"{ns}/{name}"
        try:
            paths = self.pm.paths(ns, name)
            pid = self.pm.pid(ns, name) if observed == "now" else observed
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
            outcome: Outcome | None = None
            try:
                outcome = self._converge(vm)
                return outcome
            finally:
                self._catch_up(ns, name, outcome.status["hypervisor"]["pid"]
                               if outcome is not None else "now")

    def _converge(self, vm: VirtualMachine) -> Outcome:
        """Observe, let :func:`.lifecycle.decide` plan, execute, observe again, report."""
        ns, name = vm.metadata.namespace or "default", vm.metadata.name
        key = vm.key
        d = begin(vm, self.node_name, now_utc())
        try:
            paths = self.pm.paths(ns, name)
            d.place = place = Place(api_socket=str(paths.socket),
                                    snapshots=str(paths.snapshots),
                                    vsock=str(paths.vsock),
                                    console=str(paths.console))
            observed, pid = self.observe(ns, name, d.ledger.boot_memory)
            root = self._root_disk(vm)
            decide(vm, observed, d.now, node=self.node_name, place=place, pid=pid,
                   root=RootState(root.ready, str(root.path), root.status) if root else None,
                   decision=d)
            if self.storage is not None and d.hands_paths:
                self.storage.check_paths(vm.spec)
            if d.waits_for_socket:
                self._check_socket_timeout(ns, name)
            for step in d.steps:
                if step.action in (Action.GUEST_CHECKPOINT, Action.GUEST_RESTORE):
                    self._guest_step(vm, step, d)
                    continue
                self._execute(ns, name, step)
                d.executed(step, now_utc(), _dir_size(paths.snapshots)
                           if step.action == Action.SNAPSHOT else 0)
            if d.steps:
                d.observed_again(*self.observe(ns, name, d.ledger.boot_memory))
            if d.checks_health:
                self._guest_health(vm, d)
            d.settle(self._health_due(vm) if d.checks_health else None)
            self._failures.pop(key, None)
        except (ChError, UnsafeNameError, OSError, ValueError, RootDiskError) as exc:
            reason = "InvalidName" if isinstance(exc, UnsafeNameError) \
                else "PathNotAllowed" if isinstance(exc, PathRefused) \
                else exc.reason if isinstance(exc, RootDiskError) else "HypervisorError"
            n = self._failures[key] = self._failures.get(key, 0) + 1
            retry_after = min(60.0, 0.5 * 2 ** min(n, 7))
            if isinstance(exc, RootDiskError):
                retry_after = exc.retry_after or 30.0
            why = error_text(exc)
            log.warning("converge failed", extra={"vm": key, "error": why, "attempt": n})
            d.failed(reason, why, retry_after, image_failed=isinstance(exc, RootDiskError))
            with contextlib.suppress(ChError, UnsafeNameError, OSError):
                d.observed_again(*self.observe(ns, name, d.ledger.boot_memory))
        return Outcome(status=d.status, events=d.events, converged=d.converged,
                       retry_after=d.retry_after)

    def _guest(self, vm: VirtualMachine) -> GuestClient:
        paths = self.pm.paths(vm.metadata.namespace or "default", vm.metadata.name)
        port = vm.spec.guest_agent.port if vm.spec.guest_agent else 1024
        return GuestClient(str(paths.vsock), port)

    def _guest_step(self, vm: VirtualMachine, step: Step, d: Decision) -> None:
        """Checkpoint/restore through the guest agent. The deadline makes the guest stop
        its hooks before it answers, so the pause that follows never lands mid-hook."""
        checkpoint = step.action == Action.GUEST_CHECKPOINT
        try:
            result = self._guest(vm).call("checkpoint" if checkpoint else "restore",
                                          deadline=GUEST_STEP_DEADLINE,
                                          retry_for=0 if checkpoint else 10)
        except GuestError as exc:
            d.guest_answered(step, error=(_GUEST_REASONS.get(type(exc), "GuestAgentError"),
                                          error_text(exc)))
        else:
            d.guest_answered(step, hooks=result.get("hooks") or [])

    def _health_due(self, vm: VirtualMachine) -> float:
        """Seconds until the guest's next health check is due."""
        assert vm.spec.guest_agent is not None
        since = time.monotonic() - self._health_at.get(vm.key, 0.0)
        return max(1.0, vm.spec.guest_agent.health_interval_seconds - since)

    def _guest_health(self, vm: VirtualMachine, d: Decision) -> None:
        """Ask the guest how it is, at most once per spec.guestAgent.healthIntervalSeconds."""
        spec = vm.spec.guest_agent
        assert spec is not None
        last = self._health_at.get(vm.key, 0.0)
        known = any(c.type == CONDITION_GUEST_HEALTHY for c in d.conditions)
        if known and time.monotonic() - last < spec.health_interval_seconds:
            return
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
        d.health(healthy, reason, msg)

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


def _dir_size(path: Any) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
