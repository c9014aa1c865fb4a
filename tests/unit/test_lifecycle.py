"""The VM lifecycle policy as a pure function: no VMM process, no socket, no patched clock.

Each test feeds :func:`decide` a VM (spec + the status the last pass wrote) and what the
VMM looks like, at a chosen ``now``, and reads the steps, the status, the events and when
to look again. The driver's I/O half is covered in test_driver.py against the double.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hyperfleet.reconcilers.lifecycle import (
    Decision,
    Place,
    RootState,
    begin,
    decide,
)
from hyperfleet.reconcilers.models.common import rfc3339
from hyperfleet.reconcilers.models.vm import VirtualMachine
from hyperfleet.reconcilers.vm import Action, Observed, Step, vm_config

T0 = datetime(2026, 12, 3, 12, 0, 0, tzinfo=datetime.now().astimezone().tzinfo)
PLACE = Place(api_socket="/run/hf/default_vm1.sock", snapshots="/run/hf/default_vm1.snap",
              vsock="/run/hf/default_vm1.vsock", console="/run/hf/default_vm1.console")
NODE = "node-a"
GONE = Observed(process=False)


def vm(status: dict[str, Any] | None = None, generation: int = 1,
       deleting: bool = False, **spec: Any) -> VirtualMachine:
    meta: dict[str, Any] = {"name": "vm1", "namespace": "default", "generation": generation,
                            "uid": "u"}
    if deleting:
        meta["deletionTimestamp"] = rfc3339(T0)
    return VirtualMachine.from_body({
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": meta,
        "spec": {"cpus": 1, "memory": "256Mi", "boot": {"kernel": "/k"},
                 "runStrategy": "Always", "serial": "Null", **spec},
        "status": status or {"nodeName": NODE},
    })


def running(v: VirtualMachine, state: str = "Running") -> Observed:
    """The VMM holding exactly what the spec asks for."""
    cfg = vm_config(v.spec, PLACE.vsock, None, PLACE.console)
    return Observed(process=True, socket=True, state=state, config=cfg,
                    boot_memory=cfg["memory"]["size"])


def pass_(v: VirtualMachine, observed: Observed, now: datetime = T0, **kw: Any) -> Decision:
    return decide(v, observed, now, node=NODE, place=PLACE, pid=42 if observed.process else None,
                  **kw)


def up_status(**extra: Any) -> dict[str, Any]:
    """What the last pass wrote for a VM that was running."""
    return {"nodeName": NODE, "phase": "Running", "bootTime": rfc3339(T0 - timedelta(hours=1)),
            "hypervisor": {"state": "Running", "pid": 41}, **extra}


def cond(d: Decision, type_: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in d.status["conditions"] if c["type"] == type_)
    return found


def reasons(d: Decision) -> list[str]:
    return [r for _, r, _ in d.events]


def test_a_new_vm_is_spawned_created_and_booted_and_is_not_ready_yet() -> None:
    d = pass_(vm(), GONE)
    assert [s.action for s in d.steps] == [Action.SPAWN, Action.CREATE, Action.BOOT]
    assert not d.converged and d.retry_after is None
    assert d.status["phase"] == "Starting" and d.status["apiSocket"] is None
    assert (cond(d, "Ready")["status"], cond(d, "Ready")["reason"]) == ("False", "Converging")


def test_a_vm_running_as_asked_plans_nothing_and_is_ready() -> None:
    v = vm(up_status())
    d = pass_(v, running(v))
    assert d.steps == [] and d.converged and d.events == []
    st = d.status
    assert st["phase"] == "Running" and st["apiSocket"] == PLACE.api_socket
    assert st["hypervisor"]["pid"] == 42
    assert cond(d, "Ready")["status"] == "True"
    assert cond(d, "LiveMigratable")["reason"] == "LiveMigrationDisabled"


def test_status_before_settling_is_computed_on_a_copy() -> None:
    v = vm(up_status())
    d = pass_(v, running(v))
    first = d.status
    assert d.status == first and not any(c.type == "Ready" for c in d.conditions)


def test_executed_steps_are_accounted_for() -> None:
    d = pass_(vm(), GONE)
    booted_at = T0 + timedelta(seconds=1)
    for step in d.steps:
        d.executed(step, booted_at)
    v = d.vm
    d.observed_again(running(v), 43)
    d.settle()
    st = d.status
    assert st["bootTime"] == rfc3339(booted_at) and st["hypervisor"]["bootMemory"] == 256 << 20
    assert st["phase"] == "Running" and d.converged
    assert reasons(d) == ["Booted"]
    assert "booted on node-a" in d.events[0][2]


def test_the_first_exit_restarts_at_once_and_the_next_ones_back_off() -> None:
    v = vm(up_status())
    d = pass_(v, GONE)
    assert reasons(d) == ["Restarted"] and d.steps[0].action == Action.SPAWN
    assert d.status["restartCount"] == 1 and d.status["consecutiveRestarts"] == 1
    assert d.status["lastRestartTime"] == rfc3339(T0)

    # Up again, then down 30 s later: the second of the streak waits 2 s.
    later = T0 + timedelta(seconds=30)
    v2 = vm(up_status(restartCount=1, consecutiveRestarts=1, lastRestartTime=rfc3339(T0)))
    d = pass_(v2, GONE, now=later)
    assert d.steps == [] and d.retry_after == 2.0 and reasons(d) == ["BackOff"]
    assert d.status["phase"] == "Starting" and not d.converged
    assert d.status["nextRestartTime"] == rfc3339(later + timedelta(seconds=2))
    assert cond(d, "Ready")["reason"] == "RestartBackoff"
    assert d.status["restartCount"] == 1

    # A pass inside the backoff (e.g. woken by its own status write) waits and says nothing
    # new: the same status, so no further write.
    waiting = {**d.status}
    v3 = vm({**waiting, "hypervisor": {"state": None}})
    d = pass_(v3, GONE, now=later + timedelta(seconds=1))
    assert d.steps == [] and d.retry_after == 1.0 and d.events == []
    assert d.status["conditions"] == waiting["conditions"]

    # The backoff over: restarted, counted, the wait cleared.
    d = pass_(v3, GONE, now=later + timedelta(seconds=2))
    assert reasons(d) == ["Restarted"] and "backoff over" in d.events[0][2]
    assert d.steps[0].action == Action.SPAWN
    assert d.status["restartCount"] == 2 and d.status["nextRestartTime"] is None


def test_a_vm_up_longer_than_the_reset_spell_starts_a_new_streak() -> None:
    long_ago = rfc3339(T0 - timedelta(minutes=11))
    v = vm(up_status(restartCount=9, consecutiveRestarts=9, lastRestartTime=long_ago,
                     bootTime=long_ago))
    d = pass_(v, GONE)
    assert reasons(d) == ["Restarted"] and d.retry_after is None
    assert d.status["restartCount"] == 10 and d.status["consecutiveRestarts"] == 1


def test_a_vm_deleted_or_stopped_during_its_backoff_is_not_restarted() -> None:
    waiting = up_status(restartCount=1, consecutiveRestarts=1, lastRestartTime=rfc3339(T0),
                        nextRestartTime=rfc3339(T0 + timedelta(seconds=2)))
    waiting["phase"], waiting["hypervisor"] = "Starting", {"state": None}
    later = T0 + timedelta(minutes=1)
    d = pass_(vm(waiting, deleting=True), GONE, now=later)
    assert d.steps == [] and "Restarted" not in reasons(d) and d.status["restartCount"] == 1

    d = pass_(vm(waiting, generation=2, powerState="Stopped"), GONE, now=later)
    assert d.steps == [] and d.converged and d.status["phase"] == "Stopped"
    assert d.status["nextRestartTime"] is None
    assert cond(d, "Ready")["reason"] == "Stopped"


def test_manual_keeps_a_guest_that_stopped_itself_off() -> None:
    v = vm(up_status(), runStrategy="Manual")
    d = pass_(v, GONE)
    assert d.steps == [] and reasons(d) == ["GuestStopped"]
    assert d.status["haltedGeneration"] == 1 and d.status["phase"] == "Stopped"
    assert cond(d, "Ready")["reason"] == "Stopped"
    # A spec change (new generation) lifts the halt.
    d = pass_(vm(d.status, generation=2, runStrategy="Manual"), GONE)
    assert d.steps[0].action == Action.SPAWN and d.status["haltedGeneration"] is None


def test_nothing_runs_before_the_root_disk_exists() -> None:
    root = RootState(ready=False, path="/var/lib/hf/vm1.qcow2",
                     status={"key": "sha256:ab", "progress": "12 MiB of 40 MiB"})
    d = pass_(vm(), GONE, root=root)
    assert d.steps == [] and d.retry_after == 1.0
    assert d.status["message"] == "pulling image sha256:ab: 12 MiB of 40 MiB"
    assert cond(d, "Ready")["reason"] == "ImagePulling"
    assert (cond(d, "ImageReady")["status"], cond(d, "ImageReady")["reason"]) == \
        ("False", "Pulling")
    assert d.status["image"] == root.status

    ready = RootState(ready=True, path=root.path, status={"key": "sha256:ab", "phase": "Ready"})
    d = pass_(vm(), GONE, root=ready)
    create = next(s for s in d.steps if s.action == Action.CREATE)
    assert create.body is not None and create.body["disks"][0]["path"] == root.path


def test_a_cold_change_recreates_and_says_why() -> None:
    v = vm(up_status(), generation=2, boot={"kernel": "/k2"})
    old = vm_config(vm().spec, PLACE.vsock, None, PLACE.console)
    d = pass_(v, Observed(process=True, socket=True, state="Running", config=old))
    assert Action.DELETE in [s.action for s in d.steps]
    assert reasons(d) == ["Recreating"]
    assert cond(d, "Recreated")["reason"] == "ColdChange"


def test_a_failure_before_the_first_step_records_nothing_only_decided() -> None:
    d = pass_(vm(up_status()), GONE)
    assert reasons(d) == ["Restarted"]
    d.failed("PathNotAllowed", "spec.disks[0].path: outside the allowed roots", 1.0)
    st = d.status
    assert st["restartCount"] == 0 and reasons(d) == ["PathNotAllowed"]
    assert st["phase"] == "Failed" and st["message"].startswith("spec.disks[0].path")
    assert (cond(d, "Failure")["status"], cond(d, "Ready")["reason"]) == \
        ("True", "PathNotAllowed")
    assert d.retry_after == 1.0 and not d.converged


def test_a_failure_after_a_step_keeps_what_the_step_did_and_warns_once() -> None:
    d = pass_(vm(), GONE)
    d.executed(d.steps[0], T0)
    d.failed("HypervisorError", "vm.create: 500", 1.0)
    assert reasons(d) == ["HypervisorError"]
    # The next pass fails the same way: no second Event for the same failure.
    again = pass_(vm(d.status), GONE)
    again.failed("HypervisorError", "vm.create: 500", 2.0)
    assert reasons(again) == []
    # A pass that gets through clears it.
    v = vm({**again.status, **up_status()})
    ok = pass_(v, running(v))
    ok.settle()
    assert (cond(ok, "Failure")["status"], cond(ok, "Failure")["reason"]) == \
        ("False", "Recovered")
    assert ok.status["phase"] == "Running"


def test_a_silent_guest_does_not_block_sleep_but_is_reported() -> None:
    d = begin(vm(guestAgent={}, vsock={"cid": 3}), NODE, T0)
    step = Step(Action.GUEST_CHECKPOINT, why="powerState Sleeping")
    d.guest_answered(step, error=("GuestAgentTimeout", "no answer in 60s"))
    c = d.conditions[0]
    assert (c.type, c.status, c.reason) == ("GuestCheckpointed", "False", "GuestAgentTimeout")
    assert c.message == "powerState Sleeping: no answer in 60s; continuing without it"
    assert d.events[0][:2] == ("Warning", "GuestCheckpointedFailed")
    d.guest_answered(Step(Action.GUEST_RESTORE), hooks=["10-db"])
    assert d.events[1] == ("Normal", "GuestRestored", "guest agent restored (10-db)")


def test_guest_health_flips_make_one_event_each_and_gate_ready() -> None:
    v = vm(up_status(), guestAgent={}, vsock={"cid": 3})
    d = pass_(v, running(v))
    assert d.checks_health
    d.health(False, "ChecksFailed", "10-http: connection refused")
    d.settle(health_retry=30.0)
    assert cond(d, "Ready")["reason"] == "GuestUnhealthy" and d.retry_after == 30.0
    assert reasons(d) == ["ChecksFailed"]
    d2 = pass_(vm(d.status, guestAgent={}, vsock={"cid": 3}), running(v))
    d2.health(False, "ChecksFailed", "10-http: connection refused")
    assert reasons(d2) == []  # no flip, no Event
    d2.health(True, "ChecksPassed", "1 checks passed")
    d2.settle(health_retry=30.0)
    assert reasons(d2) == ["ChecksPassed"] and cond(d2, "Ready")["status"] == "True"
