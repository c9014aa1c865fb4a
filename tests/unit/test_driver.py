"""VmDriver against the cloud-hypervisor double: restart backoff, snapshots, adoption.

Each pass is fed the status the previous one produced, as the agent's status patch
would; a fake clock (the driver's ``now_utc``) stands in for waiting out a backoff.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.reconcilers import driver as driver_mod
from hyperfleet.reconcilers.driver import Outcome, VmDriver
from hyperfleet.reconcilers.hypervisor.client import ChError
from hyperfleet.reconcilers.hypervisor.process import ProcessManager
from hyperfleet.reconcilers.lifecycle import crash_streak, restart_delay
from hyperfleet.reconcilers.models.common import now_utc, rfc3339
from hyperfleet.reconcilers.models.vm import VirtualMachine
from hyperfleet.reconcilers.vm import Action, Step
from tests import PLACEHOLDER_KERNEL

DOUBLE = str(Path(sys.executable).with_name("hyperfleet-ch-double"))
NS, NAME = "default", "vm1"


class Clock:
    def __init__(self) -> None:
        self.now = now_utc()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hfd", dir="/tmp"))  # sun_path is 108 bytes
    yield d
    ProcessManager(DOUBLE, d).stop(NS, NAME, grace=1)  # whatever a test left running
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(driver_mod, "now_utc", c)
    return c


def agent(sockdir: Path) -> tuple[ProcessManager, VmDriver]:
    """A fresh agent over the socket directory (a restarted agent adopts what is there)."""
    pm = ProcessManager(DOUBLE, sockdir)
    return pm, VmDriver(pm, "node-a")


def vm_body(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": NAME, "namespace": NS, "generation": 1, "uid": "u"},
        "spec": {"cpus": 1, "memory": "256Mi", "boot": {"kernel": PLACEHOLDER_KERNEL},
                 "runStrategy": "Always", **spec},
        "status": {"nodeName": "node-a"},
    }


def step(drv: VmDriver, body: dict[str, Any]) -> Outcome:
    """One agent pass: converge, then merge the status as the agent's patch does."""
    out = drv.converge(VirtualMachine.from_body(body))
    assert out is not None
    merged = {**body["status"], **out.status}
    body["status"] = {k: v for k, v in merged.items() if v is not None}
    return out


def respec(body: dict[str, Any], **spec: Any) -> None:
    body["spec"].update(spec)
    body["metadata"]["generation"] += 1


def wait_for(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def power_off(pm: ProcessManager, drv: VmDriver) -> None:
    """The guest shuts itself down (the double's SIGUSR1): as upstream, the VMM exits."""
    pid = pm.pid(NS, NAME)
    assert pid is not None
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: pm.pid(NS, NAME) is None, "guest power-off")


def hv_state(body: dict[str, Any]) -> str | None:
    state: str | None = (body["status"].get("hypervisor") or {}).get("state")
    return state


def reasons(out: Outcome) -> list[str]:
    return [reason for _, reason, _ in out.events]


def ready(body: dict[str, Any]) -> dict[str, Any]:
    cond: dict[str, Any] = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    return cond


def test_backoff_grows_by_consecutive_crashes_and_starts_over_after_a_stable_spell() -> None:
    now = now_utc()
    assert [restart_delay(n) for n in (0, 1, 2, 3, 8, 9, 40)] == [0, 2, 4, 8, 256, 300, 300]
    assert crash_streak(5, now - timedelta(seconds=30), now) == 5
    assert crash_streak(5, now - timedelta(minutes=11), now) == 0
    assert crash_streak(5, None, now) == 0


def test_exits_during_the_backoff_are_waited_out_and_counted(sockdir: Path,
                                                             clock: Clock) -> None:
    pm, drv = agent(sockdir)
    b = vm_body()
    step(drv, b)
    assert b["status"]["phase"] == "Running"

    power_off(pm, drv)
    out = step(drv, b)  # the first exit restarts at once
    assert b["status"]["phase"] == "Running" and b["status"]["restartCount"] == 1
    assert "Restarted" in reasons(out)

    power_off(pm, drv)
    out = step(drv, b)
    assert out.retry_after == 2.0 and "BackOff" in reasons(out)
    assert b["status"]["phase"] == "Starting" and hv_state(b) is None
    assert ready(b)["reason"] == "RestartBackoff"
    assert b["status"]["nextRestartTime"] == rfc3339(clock.now + timedelta(seconds=2))
    waiting = dict(b["status"])

    # The agent's own status patch wakes the VM's loop at once: still waiting, and the
    # status is unchanged (a new write would wake the loop yet again).
    out = step(drv, b)
    assert out.retry_after == 2.0 and out.events == [] and b["status"] == waiting
    # So does a restarted agent: the pending restart is in the status, not in memory.
    pm, drv = agent(sockdir)
    clock.advance(1)
    out = step(drv, b)
    assert out.retry_after == 1.0 and hv_state(b) is None
    assert b["status"]["restartCount"] == 1

    clock.advance(1)
    out = step(drv, b)
    assert "Restarted" in reasons(out) and "Booted" in reasons(out)
    assert b["status"]["phase"] == "Running" and hv_state(b) == "Running"
    assert b["status"]["restartCount"] == 2 and b["status"]["consecutiveRestarts"] == 2
    assert "nextRestartTime" not in b["status"]

    power_off(pm, drv)
    assert step(drv, b).retry_after == 4.0  # doubling


def test_backoff_starts_over_after_a_stable_spell(sockdir: Path, clock: Clock) -> None:
    pm, drv = agent(sockdir)
    b = vm_body()
    step(drv, b)
    long_ago = rfc3339(clock.now - timedelta(minutes=11))
    b["status"].update(restartCount=9, consecutiveRestarts=9, lastRestartTime=long_ago,
                       bootTime=long_ago)

    power_off(pm, drv)
    step(drv, b)  # up 11 minutes: a fresh streak, restarted at once
    assert hv_state(b) == "Running"
    assert b["status"]["restartCount"] == 10 and b["status"]["consecutiveRestarts"] == 1

    clock.advance(30)
    power_off(pm, drv)
    assert step(drv, b).retry_after == 2.0  # second of the new streak, not the 10th ever


def test_a_guest_exit_after_a_failed_pass_is_a_restart(sockdir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Phase Failed still carries the VMM state it saw; a guest that then dies exited."""
    pm, drv = agent(sockdir)
    b = vm_body(maxCpus=2)
    step(drv, b)
    real = drv._execute
    failures = [ChError("vm.resize", 500, ["Error from API", "resize failed"])]

    def execute(ns: str, name: str, st: Step) -> None:
        if st.action == Action.RESIZE and failures:
            raise failures.pop()
        real(ns, name, st)

    monkeypatch.setattr(drv, "_execute", execute)
    respec(b, cpus=2)
    step(drv, b)
    assert b["status"]["phase"] == "Failed" and hv_state(b) == "Running"

    power_off(pm, drv)
    out = step(drv, b)
    assert "Restarted" in reasons(out) and b["status"]["restartCount"] == 1
    assert hv_state(b) == "Running"


def _into_backoff(sockdir: Path) -> tuple[VmDriver, dict[str, Any]]:
    pm, drv = agent(sockdir)
    b = vm_body()
    step(drv, b)
    power_off(pm, drv)
    step(drv, b)
    power_off(pm, drv)
    assert step(drv, b).retry_after == 2.0
    return drv, b


def test_a_vm_stopped_during_the_backoff_stays_stopped(sockdir: Path, clock: Clock) -> None:
    drv, b = _into_backoff(sockdir)
    respec(b, powerState="Stopped")
    step(drv, b)
    assert b["status"]["phase"] == "Stopped" and "nextRestartTime" not in b["status"]
    clock.advance(60)
    out = step(drv, b)
    assert out.converged and hv_state(b) is None and b["status"]["restartCount"] == 1

    # Starting it again is the user's doing, not an automatic restart.
    respec(b, powerState="Running")
    out = step(drv, b)
    assert hv_state(b) == "Running" and "Restarted" not in reasons(out)
    assert b["status"]["restartCount"] == 1


def test_a_vm_deleted_during_the_backoff_is_not_restarted(sockdir: Path,
                                                          clock: Clock) -> None:
    drv, b = _into_backoff(sockdir)
    b["metadata"]["deletionTimestamp"] = rfc3339(clock.now)
    clock.advance(60)
    out = step(drv, b)
    assert "Booted" not in reasons(out) and hv_state(b) is None
    assert b["status"]["restartCount"] == 1


def _flaky_resume(drv: VmDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    """vm.resume answers too late once (the VMM may well have resumed)."""
    real = drv._execute
    failures = [ChError("vm.resume", 504, ["no answer within 10.0s"])]

    def execute(ns: str, name: str, st: Step) -> None:
        if st.action == Action.RESUME and failures:
            raise failures.pop()
        real(ns, name, st)

    monkeypatch.setattr(drv, "_execute", execute)


def asleep(sockdir: Path) -> tuple[ProcessManager, VmDriver, dict[str, Any], Path]:
    """A VM run, then put to sleep: (process manager, driver, body, its snapshot file)."""
    pm, drv = agent(sockdir)
    b = vm_body()
    step(drv, b)
    respec(b, powerState="Sleeping")
    step(drv, b)
    return pm, drv, b, pm.paths(NS, NAME).snapshots / "state.json"


def test_a_failed_wake_up_does_not_restore_stale_memory_after_a_crash(
        sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pm, drv, b, state_json = asleep(sockdir)
    assert b["status"]["phase"] == "Sleeping" and state_json.exists()

    respec(b, powerState="Running")
    _flaky_resume(drv, monkeypatch)
    step(drv, b)
    assert b["status"]["phase"] == "Failed" and hv_state(b) == "Paused"
    assert not state_json.exists()
    step(drv, b)
    assert b["status"]["phase"] == "Running" and b["status"]["snapshot"]["restoredAt"]

    pid = pm.pid(NS, NAME)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # later, the VMM dies
    wait_for(lambda: pm.pid(NS, NAME) is None, "VMM exit")
    out = step(drv, b)
    assert "Booted" in reasons(out) and "Restored" not in reasons(out)  # a cold boot
    assert hv_state(b) == "Running" and b["status"]["restartCount"] == 1


def test_an_agent_restart_mid_wake_up_still_discards_the_snapshot(
        sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, drv, b, state_json = asleep(sockdir)
    assert b["status"]["snapshot"] and "restoredAt" not in b["status"]["snapshot"]

    # The agent dies right after vm.restore: no discard, and no status written.
    respec(b, powerState="Running")
    real = drv._execute

    def die_after_restore(ns: str, name: str, st: Step) -> None:
        if st.action == Action.DISCARD_SNAPSHOT:
            raise KeyboardInterrupt
        real(ns, name, st)

    monkeypatch.setattr(drv, "_execute", die_after_restore)
    with pytest.raises(KeyboardInterrupt):
        step(drv, b)
    assert state_json.exists()

    _, drv = agent(sockdir)  # a new agent adopts the VMM
    step(drv, b)
    assert hv_state(b) == "Running" and not state_json.exists()
    assert "snapshot" not in b["status"]  # consumed, and no wake-up from it on record


def test_an_adopted_vmm_whose_socket_never_appears_times_out(
        sockdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPERFLEET_CH_DOUBLE_SOCKET_DELAY", "1000")
    monkeypatch.setattr(driver_mod, "SOCKET_TIMEOUT", 0.5)
    old_pm = ProcessManager(DOUBLE, sockdir)
    old_pm.spawn(NS, NAME)  # started by the previous agent
    time.sleep(0.6)

    pm, drv = agent(sockdir)
    assert pm.discover() == [(NS, NAME)]
    b = vm_body()
    step(drv, b)
    assert b["status"]["phase"] == "Failed"
    assert "did not appear" in b["status"]["message"]
    assert pm.pid(NS, NAME) is None  # stopped, so the next pass can start afresh


@pytest.mark.parametrize(("spec", "phase", "reason", "words"), [
    ({"powerState": "Stopped"}, "Stopped", "Stopped", "stopped as requested (powerState: Stopped)"),
    ({"runStrategy": "Halted"}, "Stopped", "Halted", "stopped as requested (runStrategy: Halted)"),
    ({"powerState": "Paused"}, "Paused", "Paused", "paused as requested (powerState: Paused)"),
    ({"powerState": "Sleeping"}, "Sleeping", "Sleeping", "asleep as requested"),
])
def test_a_vm_at_rest_as_asked_is_not_ready_and_says_why(
        sockdir: Path, spec: dict[str, Any], phase: str, reason: str, words: str) -> None:
    """KubeVirt's meaning: Ready is running and healthy. A VM stopped on purpose is
    converged, but Ready=True would tell users and tools that it serves."""
    _, drv = agent(sockdir)
    b = vm_body()
    step(drv, b)
    assert b["status"]["phase"] == "Running"
    assert (ready(b)["status"], ready(b)["reason"]) == ("True", "Running")
    respec(b, **spec)
    for _ in range(3):
        out = step(drv, b)
        if out.converged:
            break
    assert out.converged and b["status"]["phase"] == phase
    assert (ready(b)["status"], ready(b)["reason"]) == ("False", reason)
    assert words in ready(b)["message"]


def test_a_root_disk_failure_still_reports_the_running_vmm(sockdir: Path) -> None:
    """A pass that fails before deciding anything (here: an image this agent cannot keep)
    still says where the live VMM's API socket is."""
    _, drv = agent(sockdir)
    b = vm_body()
    step(drv, b)
    assert hv_state(b) == "Running"
    respec(b, image={"path": "/var/lib/images/base.qcow2"})
    out = step(drv, b)
    assert b["status"]["phase"] == "Failed" and "NoImageStore" in reasons(out)
    assert b["status"]["image"]["phase"] == "Failed"
    assert b["status"]["apiSocket"] == str(sockdir / f"{NS}_{NAME}.sock")
    assert b["status"]["hypervisor"]["pid"] is not None
