"""Event and condition messages are sentences, never Python reprs.

``kubectl describe`` readers and alert rules see these strings; a dict, list, tuple, None or
``<object at 0x..>`` in one means a value was interpolated raw. Drives representative
producers (the VM driver against the cloud-hypervisor double, the controller's scheduling
and eviction, VmJob outcomes) and checks every message they make."""

from __future__ import annotations

import asyncio
import errno
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.operator.controller import Controller
from hyperfleet.operator.settings import ControllerConfig
from hyperfleet.reconcilers import driver as driver_mod
from hyperfleet.reconcilers.driver import Outcome
from hyperfleet.reconcilers.hypervisor.client import ChError
from hyperfleet.reconcilers.hypervisor.process import ProcessManager
from hyperfleet.reconcilers.jobs.builder import JobBuilder
from hyperfleet.reconcilers.jobs.handlers import JobContext
from hyperfleet.reconcilers.kube import NODES, VMS
from hyperfleet.reconcilers.lifecycle import event_for
from hyperfleet.reconcilers.testing.fakekube import FakeKube
from hyperfleet.reconcilers.text import describe, error_text, repr_fragments
from hyperfleet.reconcilers.vm import Action, Step
from tests.unit import test_controller as tc
from tests.unit import test_driver as td
from tests.unit import test_job_runner as tj

REPRS = ["{'a': 1}", "['x']", "('x', 1)", "None", "<Foo object at 0x7f3a2b1c>",
         "progress: None", "body {'desired_vcpus': 2}"]


def assert_sentences(messages: list[str]) -> None:
    assert messages, "no message was produced"
    for m in messages:
        assert m.strip(), "an empty message"
        assert not repr_fragments(m), f"a Python repr in {m!r}"


# ------------------------------------------------------------------ the helpers


@pytest.mark.parametrize("text", REPRS)
def test_repr_fragments_are_found(text: str) -> None:
    assert repr_fragments(text)


@pytest.mark.parametrize("text", ["placed on WorkerNode n1", "no node is Ready (0/3)",
                                  "capability 'hot-resize' is missing", "Nonexistent path"])
def test_sentences_are_clean(text: str) -> None:
    assert repr_fragments(text) == []


def test_describe_renders_values_as_words() -> None:
    assert describe(None) == "none"
    assert describe(["a", "b"]) == "a, b" and describe(("a",)) == "a" and describe([]) == "none"
    assert describe({"b", "a"}) == "a, b"
    assert describe({"desired_vcpus": 2, "desired_ram": None}) == "desired_vcpus=2, desired_ram=none"
    assert describe(True) == "true" and describe(3) == "3" and describe("x") == "x"
    assert describe(ValueError("bad")) == "bad"
    assert describe(object()) == "object"
    for value in ([None], {"k": ["v"]}, ("t", 1), {1, 2}, object(), [object()]):
        assert not repr_fragments(describe(value)), describe(value)


def test_error_text_is_never_empty_nor_a_repr() -> None:
    assert error_text(KeyError("disk")) == "missing key disk"
    assert error_text(TimeoutError()) == "TimeoutError (no detail)"
    assert error_text(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")) == \
        "No such file or directory: /x"
    assert error_text(RuntimeError("a", 1)) == "a; 1"
    assert error_text(ValueError("plain words")) == "plain words"
    assert error_text(ChError("vm.boot", 500, ["Error", "no kernel"])).startswith("vm.boot")


# ------------------------------------------------------------------ the VM driver


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="hfe", dir="/tmp"))  # sun_path is 108 bytes
    yield d
    ProcessManager(td.DOUBLE, d).stop(td.NS, td.NAME, grace=1)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> td.Clock:
    c = td.Clock()
    monkeypatch.setattr(driver_mod, "now_utc", c)
    return c


@pytest.mark.parametrize("step", [
    Step(Action.BOOT), Step(Action.PAUSE, why="quiesce before snapshot"), Step(Action.RESUME),
    Step(Action.SHUTDOWN, why="maxMemory changed: cloud-hypervisor cannot apply this live"),
    Step(Action.RESIZE, {"desired_vcpus": 4, "desired_ram": 2 * 2**30}, "cpus/memory changed"),
    Step(Action.RESIZE, {"desired_vcpus": 2}, "cpus/memory changed"),
    Step(Action.ADD_DISK, {"id": "data", "path": "/srv/disks/data.raw"}, "added to spec"),
    Step(Action.ADD_NET, {"id": "net1", "tap": "tap3", "mac": "52:54:00:00:00:01"}, "added to spec"),
    Step(Action.REMOVE_DEVICE, {"id": "data"}, "removed from spec"),
    Step(Action.SNAPSHOT, {"destination_url": "file:///run/hf/ns_vm/snapshots"}),
    Step(Action.RESTORE, {"source_url": "file:///run/hf/ns_vm/snapshots"}, "wake from sleep"),
])
def test_every_step_event_is_a_sentence(step: Step) -> None:
    reason, message = event_for(step, "node-a")
    assert reason
    assert_sentences([message])
    assert message.split(" on node-a")[0] and "vm." not in message


def test_step_events_say_what_changed() -> None:
    resize = Step(Action.RESIZE, {"desired_vcpus": 4, "desired_ram": 2 * 2**30}, "cpus/memory changed")
    assert event_for(resize, "node-a") == (
        "Resized", "resized to 4 vCPUs and 2 GiB of memory on node-a (cpus/memory changed)")
    disk = Step(Action.ADD_DISK, {"id": "data", "path": "/srv/d.raw"}, "added to spec")
    assert event_for(disk, "n")[1] == "added disk data (/srv/d.raw) on n (added to spec)"


def test_driver_outcome_events_over_a_lifecycle(sockdir: Path, clock: td.Clock,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Boot, hot resize, a failed call, a crash and its backoff, sleep and wake, stop."""
    pm, drv = td.agent(sockdir)
    b = td.vm_body(maxCpus=4)
    messages: list[str] = []

    def run() -> Outcome:
        out = td.step(drv, b)
        messages.extend(m for _, _, m in out.events)
        messages.extend(c["message"] for c in b["status"].get("conditions") or [] if c.get("message"))
        if b["status"].get("message"):
            messages.append(b["status"]["message"])
        return out

    assert "Booted" in td.reasons(run())
    td.respec(b, cpus=2)
    assert "Resized" in td.reasons(run())
    real = drv._execute
    failures: list[Exception] = [TimeoutError(), ChError("vm.resize", 500, ["Error from API"])]

    def execute(ns: str, name: str, st: Step) -> None:
        if st.action == Action.RESIZE and failures:
            raise failures.pop()
        real(ns, name, st)

    monkeypatch.setattr(drv, "_execute", execute)
    td.respec(b, cpus=3)
    assert "HypervisorError" in td.reasons(run())
    td.respec(b, cpus=4)
    out = run()  # a message-less exception still says something
    assert ("Warning", "HypervisorError", "TimeoutError (no detail)") in out.events
    run()
    td.power_off(pm, drv)
    run()  # Restarted
    td.power_off(pm, drv)
    assert "BackOff" in td.reasons(run())
    clock.advance(600)
    run()
    td.respec(b, powerState="Sleeping")
    assert "Snapshotted" in td.reasons(run())
    td.respec(b, powerState="Running")
    assert "Restored" in td.reasons(run())
    td.respec(b, runStrategy="Halted")
    assert "Stopped" in td.reasons(run())
    assert_sentences(messages)


# ------------------------------------------------------------------ the controller


def test_controller_scheduling_and_eviction_messages() -> None:
    messages: list[tuple[str, str]] = []

    async def scenario() -> None:
        kube = FakeKube()
        now = datetime.now(UTC)
        kube.put(NODES, tc.node("n1", 4, now))
        kube.put(VMS, tc.vm("fits", 2))
        kube.put(VMS, tc.vm("huge", 64))
        kube.put(VMS, tc.vm("stranded", 1, "vanished"))  # its WorkerNode and agent are gone
        ctl = Controller(ControllerConfig(eviction_seconds=0), kube)
        ctl.record = lambda body, reason, message, type_: messages.append(  # type: ignore[method-assign]
            (reason, message))
        await ctl.prime()
        ctl.missing_since = {"vanished": now - timedelta(hours=1)}  # seen missing that long
        await ctl.pass_once()
        await ctl.pass_once()

    asyncio.run(scenario())
    reasons = {r for r, _ in messages}
    assert {"Scheduled", "FailedScheduling", "NodeLost"} <= reasons, messages
    assert_sentences([m for _, m in messages])


# ------------------------------------------------------------------ VmJob outcomes


@pytest.mark.parametrize("raised", [KeyError("disk"), RuntimeError("a", 1), TimeoutError()])
def test_a_crashed_handler_fails_the_job_with_a_sentence(monkeypatch: pytest.MonkeyPatch,
                                                         raised: Exception) -> None:
    def run(ctx: JobContext) -> dict[str, Any]:
        raise raised

    tj.handler(monkeypatch, run)
    kube = tj.scheduled(JobBuilder(tj.OP).max_attempts(1))
    tj.start(tj.agent("a", kube), kube).join(5)
    (event,) = tj.outcome_events(kube)
    assert event[:2] == ("Warning", "Failed")
    assert f"the handler crashed: {type(raised).__name__}: " in event[2]
    assert_sentences([event[2], kube.status["lastError"]])
