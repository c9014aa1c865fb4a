"""VM lifecycle policy: what one agent pass does with what it saw, and what it reports.

Pure: no process, socket, file or clock. The driver (:mod:`.driver`) observes the VMM,
calls :func:`decide`, executes ``decision.steps`` in order (telling the decision what each
one did), observes again and patches :attr:`Decision.status`. Restart backoff, the Manual
halt, waiting for an image, the Ready/Failure/Recreated conditions and the status
dictionary are decided here, so their tests need neither a VMM nor a patched clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from .conventions import (
    CONDITION_FAILURE,
    CONDITION_GUEST_HEALTHY,
    CONDITION_IMAGE_READY,
    CONDITION_LIVE_MIGRATABLE,
    CONDITION_READY,
)
from .models.common import Condition, rfc3339, set_condition
from .models.vm import Phase, RunStrategy, VirtualMachine
from .text import describe
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

#: (type, reason, message) of a Kubernetes Event.
Event = tuple[str, str, str]

#: Steps that start a VMM or hand it host paths: the spec's paths are checked first.
STARTS = frozenset({Action.SPAWN, Action.CREATE, Action.ADD_DISK, Action.RESTORE})
#: Restart backoff: immediate first, then doubling up to the cap; reset after a quiet spell.
BACKOFF_CAP = 300.0
BACKOFF_RESET = timedelta(minutes=10)


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


@dataclass(frozen=True)
class Place:
    """Where one VM's files live on its node (the process manager's paths, as strings)."""

    api_socket: str
    snapshots: str
    vsock: str
    console: str


@dataclass(frozen=True)
class RootState:
    """Where the VM's root disk (made from spec.image) stands on this node."""

    ready: bool
    path: str
    status: dict[str, Any]  # status.image


@dataclass
class Ledger:
    """What the VM's status remembers across passes, as this pass updates it."""

    conditions: list[Condition]
    boot_time: datetime | None
    restarts: int
    last_restart: datetime | None
    streak: int
    restart_at: datetime | None
    halted_gen: int | None
    snapshot: dict[str, Any] | None
    boot_memory: int | None
    image: dict[str, Any] | None = None
    message: str | None = None
    events: list[Event] = field(default_factory=list)

    @classmethod
    def of(cls, vm: VirtualMachine) -> Ledger:
        st, gen = vm.status, vm.metadata.generation
        return cls(
            conditions=list(st.conditions),
            boot_time=st.boot_time,
            restarts=st.restart_count,
            last_restart=st.last_restart_time,
            streak=st.consecutive_restarts,
            restart_at=st.next_restart_time,
            halted_gen=st.halted_generation if st.halted_generation == gen else None,
            snapshot=st.snapshot.wire() if st.snapshot else None,
            boot_memory=st.hypervisor.boot_memory if st.hypervisor else None,
        )

    def copy(self) -> Ledger:
        return replace(self, conditions=list(self.conditions), events=list(self.events))


@dataclass
class Decision:
    """One pass's plan and its running account; :attr:`status` is the patch to write."""

    vm: VirtualMachine
    node: str
    now: datetime
    ledger: Ledger
    observed: Observed = field(default_factory=lambda: Observed(process=False))
    pid: int | None = None
    place: Place | None = None
    desired: Desired | None = None
    steps: list[Step] = field(default_factory=list)
    retry_after: float | None = None  # seconds; None: the normal resync
    converged: bool = False
    phase: Phase | None = None  # set by a failure; otherwise from what was observed
    #: The ledger before the policy ran: a pass that fails before its first step reports
    #: nothing it only decided (no restart counted for a VMM that never started).
    _undecided: Ledger | None = None
    _acted: bool = False
    _settled: bool = False

    @property
    def events(self) -> list[Event]:
        return self.ledger.events

    @property
    def conditions(self) -> list[Condition]:
        return self.ledger.conditions

    @property
    def hands_paths(self) -> bool:
        """Whether a step hands the spec's host paths to a VMM (so they are checked first;
        not every pass: resolving each path is the dearest part of a pass with nothing to do)."""
        return any(s.action in STARTS for s in self.steps)

    @property
    def waits_for_socket(self) -> bool:
        return any(s.action == Action.WAIT for s in self.steps)

    @property
    def status(self) -> dict[str, Any]:
        """The status patch as things stand: after :meth:`settle` if the pass got that far,
        else what it would be if the steps changed nothing (computed on a copy)."""
        probe = self
        if self.phase is None and self.desired is not None and not self._settled:
            probe = replace(self, ledger=self.ledger.copy())
            probe.settle()
        return probe.report()

    def _condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        led = self.ledger
        led.conditions = set_condition(led.conditions, type_, status, reason, message,
                                       self.vm.metadata.generation, self.now)

    # ------------------------------------------------------------ what the steps did

    def executed(self, step: Step, at: datetime, snapshot_bytes: int = 0) -> None:
        """Account for a step the driver ran at ``at`` (``snapshot_bytes``: what a
        snapshot step wrote)."""
        self._acted = True
        led = self.ledger
        if step.action == Action.CREATE and step.body:
            led.boot_memory = int(step.body["memory"]["size"])
        if step.action == Action.BOOT or (step.action == Action.RESUME
                                           and self.observed.state is None):
            led.boot_time = at
        if step.action == Action.SNAPSHOT and self.place is not None:
            led.snapshot = {"path": self.place.snapshots, "takenAt": rfc3339(at),
                            "sizeBytes": snapshot_bytes}
        if step.action == Action.RESTORE and led.snapshot:
            led.snapshot = {**led.snapshot, "restoredAt": rfc3339(at)}
        if step.action == Action.DISCARD_SNAPSHOT and led.snapshot \
                and not led.snapshot.get("restoredAt"):
            led.snapshot = None  # gone from disk, and no wake-up from it is on record
        reason, text = event_for(step, self.node)
        if reason:
            led.events.append(("Normal", reason, text))

    def guest_answered(self, step: Step, hooks: Sequence[str] | None = None,
                       error: tuple[str, str] | None = None) -> None:
        """Account for a guest checkpoint/restore: the hooks it ran, or (reason, message)
        of why it did not. Either way the pass goes on: a silent guest does not block
        sleep (the memory snapshot is still crash-consistent) but is reported."""
        self._acted = True
        checkpoint = step.action == Action.GUEST_CHECKPOINT
        kind = "GuestCheckpointed" if checkpoint else "GuestRestored"
        if error is None:
            msg = (f"guest agent {'checkpointed' if checkpoint else 'restored'} "
                   f"({', '.join(hooks or []) or 'no hooks'})")
            self.ledger.events.append(("Normal", kind, msg))
            self._condition(kind, True, "GuestAgent", msg)
        else:
            msg = f"{step.why}: {error[1]}; continuing without it"
            self.ledger.events.append(("Warning", f"{kind}Failed", msg))
            self._condition(kind, False, error[0], msg)

    def observed_again(self, observed: Observed, pid: int | None) -> None:
        """What the VMM looks like after the steps: converged if nothing is left to do."""
        self.observed, self.pid = observed, pid
        if self.desired is not None and self.phase is None:
            self.converged = self.retry_after is None and not reconcile(self.desired, observed)

    @property
    def checks_health(self) -> bool:
        """Whether the guest's health is worth asking about in this pass."""
        return self.vm.spec.guest_agent is not None and self.observed.state == "Running" \
            and self.phase is None

    def health(self, healthy: bool, reason: str, message: str) -> None:
        """Account for a guest health check's answer (an Event only when it flips)."""
        old = next((c for c in self.conditions if c.type == CONDITION_GUEST_HEALTHY), None)
        if old is None or (old.status == "True") != healthy:
            self.ledger.events.append(("Normal" if healthy else "Warning", reason, message))
        self._condition(CONDITION_GUEST_HEALTHY, healthy, reason, message)

    def settle(self, health_retry: float | None = None) -> None:
        """The pass's closing conditions: Ready (unless it waits on purpose),
        LiveMigratable, and Failure cleared. ``health_retry``: seconds until the next
        guest health check, the pass's resync when it converged."""
        assert self.desired is not None
        self._settled = True
        if self.retry_after is None:
            self._condition(CONDITION_READY, *ready_condition(self.desired, self.observed,
                                                      self.converged, self.conditions))
            if self.converged and self.checks_health and health_retry is not None:
                self.retry_after = health_retry  # the next health check, not a resync
        self._condition(CONDITION_LIVE_MIGRATABLE, *live_migratable(self.vm.spec, self.observed))
        if any(c.type == CONDITION_FAILURE and c.status == "True" for c in self.conditions):
            self._condition(CONDITION_FAILURE, False, "Recovered", "")

    def failed(self, reason: str, why: str, retry_after: float,
               image_failed: bool = False) -> None:
        """Account for an error that ended the pass (an Event once per distinct failure)."""
        if not self._acted and self._undecided is not None:
            self.ledger = self._undecided
        self.retry_after, self.phase, self.converged = retry_after, Phase.FAILED, False
        self.ledger.message = why
        if image_failed:
            self.ledger.image = {"key": self.vm.spec.image.key if self.vm.spec.image else "",
                                 "phase": "Failed", "message": why}
            self._condition(CONDITION_IMAGE_READY, False, reason, why)
        was = next((c for c in self.conditions if c.type == CONDITION_FAILURE), None)
        self._condition(CONDITION_READY, False, reason, why)
        self._condition(CONDITION_FAILURE, True, reason, why)
        if was is None or was.status != "True" or was.message != why:
            self.ledger.events.append(("Warning", reason, why))

    def report(self) -> dict[str, Any]:
        """The status patch for what was observed last (the VMM after the steps)."""
        led, observed, pid = self.ledger, self.observed, self.pid
        phase = self.phase
        if phase is None:
            phase = phase_of(self.desired, observed) if self.desired else Phase.STARTING
        api_socket = self.place.api_socket if pid and self.place else None
        return {
            "phase": phase.value,
            "nodeName": self.node,
            "message": led.message,
            "observedGeneration": self.vm.metadata.generation,
            "hypervisor": {"state": observed.state, "pid": pid, "bootMemory": led.boot_memory,
                           "consoleSocket": console_socket_of(observed.config, observed.state)},
            "apiSocket": api_socket,
            "bootTime": _ts(led.boot_time),
            "restartCount": led.restarts,
            "lastRestartTime": _ts(led.last_restart),
            "consecutiveRestarts": led.streak,
            "nextRestartTime": _ts(led.restart_at),
            "haltedGeneration": led.halted_gen,
            "snapshot": led.snapshot,
            "image": led.image,
            "conditions": [c.wire() for c in led.conditions],
        }


def begin(vm: VirtualMachine, node: str, now: datetime) -> Decision:
    """A pass before anything was observed: what the VM's status already says."""
    return Decision(vm=vm, node=node, now=now, ledger=Ledger.of(vm))


def desired_of(vm: VirtualMachine, place: Place, halted: bool,
               root: RootState | None = None) -> Desired:
    return Desired(spec=vm.spec, halted=halted, snapshot_url=f"file://{place.snapshots}",
                   vsock_socket=place.vsock, root_disk=root.path if root else None,
                   console_socket=place.console)


def guest_exited(vm: VirtualMachine, observed: Observed) -> bool:
    """The VM was up when last reported and is now down without being asked to.

    Only the moment of the exit: a restart still waiting out its backoff is
    ``status.nextRestartTime`` (the waiting pass reports phase Starting)."""
    st = vm.status
    # Failed still reports the VMM state it re-observed: a guest that then dies exits.
    was_up = st.phase in (Phase.RUNNING, Phase.PAUSED, Phase.FAILED) \
        and st.hypervisor is not None and st.hypervisor.state in BOOTED
    return was_up and observed.state not in BOOTED


def decide(vm: VirtualMachine, observed: Observed, now: datetime, *, node: str, place: Place,
           pid: int | None = None, root: RootState | None = None,
           decision: Decision | None = None) -> Decision:
    """Plan one pass from what was observed at ``now``: the steps, the events, when to
    look again, and (``.status``) what to report if the steps change nothing.

    ``decision``: one :func:`begin` made earlier in the pass, to continue."""
    d = decision or begin(vm, node, now)
    d.observed, d.pid, d.place = observed, pid, place
    led = d.ledger
    gen = vm.metadata.generation
    if root is not None:
        led.image = root.status
        d._condition(CONDITION_IMAGE_READY, root.ready, "Ready" if root.ready else "Pulling",
                     root.status.get("progress") or f"root disk {root.path}")
    d._undecided = led.copy()
    desired = desired_of(vm, place, led.halted_gen is not None, root)
    exited = guest_exited(vm, observed)
    if exited and vm.spec.run_strategy == RunStrategy.MANUAL and desired.state in BOOTED:
        led.halted_gen = gen
        led.events.append(("Normal", "GuestStopped",
                           "guest stopped on its own; runStrategy Manual keeps it off"))
        desired = desired_of(vm, place, True, root)
    d.desired = desired
    plan = reconcile(desired, observed)
    if root is not None and not root.ready:
        # Nothing that needs the root disk runs before it exists.
        plan, d.retry_after = [], 1.0
        led.message = (f"pulling image {describe(root.status.get('key'))}: "
                       f"{describe(root.status.get('progress') or 'starting')}")
        d._condition(CONDITION_READY, False, "ImagePulling", led.message)
    plan = _restart_policy(d, plan, exited)
    recreate = next((s.why for s in plan if s.action == Action.DELETE and s.why), None)
    if recreate:
        d._condition("Recreated", True, "ColdChange", recreate)
        led.events.append(("Normal", "Recreating", recreate))
    d.steps = plan
    d.observed_again(observed, pid)
    return d


def _restart_policy(d: Decision, plan: list[Step], exited: bool) -> list[Step]:
    """runStrategy Always: restart an exited VM, immediately the first time, then after a
    growing backoff; the plan is held while the backoff runs."""
    vm, led, now = d.vm, d.ledger, d.now
    assert d.desired is not None
    auto = vm.spec.run_strategy == RunStrategy.ALWAYS and d.desired.state in BOOTED
    if led.restart_at is not None and not (auto and plan):
        led.restart_at = None  # up again, stopped, asleep or Manual now: nothing to wait for
    if not (auto and plan and (exited or led.restart_at is not None)):
        return plan
    how = "process died" if not d.observed.process else "guest shut down"
    if exited:
        ups = [t for t in (led.boot_time, led.last_restart) if t is not None]
        led.streak = crash_streak(led.streak, max(ups) if ups else None, now)
        delay = restart_delay(led.streak)
        if delay:
            led.restart_at = now + timedelta(seconds=delay)
            led.events.append(("Warning", "BackOff",
                               f"VM exited ({how}); restart {led.restarts + 1} in "
                               f"{delay:.0f}s (runStrategy Always)"))
    if vm.metadata.deletion_timestamp:
        return []  # being deleted: the delete handler stops the VMM
    if led.restart_at is not None and led.restart_at > now:
        # The message names a fixed time, so waiting passes write no new status (each
        # status write would wake this VM's loop again at once).
        d._condition(CONDITION_READY, False, "RestartBackoff",
                     f"VM exited; restart {led.restarts + 1} at {rfc3339(led.restart_at)}")
        d.retry_after = (led.restart_at - now).total_seconds()
        return []
    led.restarts += 1
    led.streak += 1
    led.last_restart = now
    text = f"VM exited ({how})" if led.restart_at is None else "backoff over"
    led.restart_at = None
    led.events.append(("Warning", "Restarted",
                       f"{text}; restart {led.restarts} (runStrategy Always)"))
    return plan


def _ts(t: datetime | None) -> str | None:
    return rfc3339(t) if t else None


# ------------------------------------------------------------------ events for steps

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


def step_text(step: Step) -> str:
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


def event_for(step: Step, node: str) -> tuple[str | None, str]:
    """The Event a finished step gets: a sentence, e.g. "resized to 4 vCPUs on node-a
    (cpus/memory changed)"."""
    reason = _EVENTS.get(step.action)
    if reason is None:
        return None, ""
    return reason, f"{step_text(step)} on {node}" + (f" ({step.why})" if step.why else "")

