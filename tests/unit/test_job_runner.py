"""Node side of VmJobs: an agent writes a job's status only over its own attempt, and only
once its handler has really stopped."""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, ClassVar, cast

import pytest

from hyperfleet.reconcilers.jobs import runner as runner_mod
from hyperfleet.reconcilers.jobs.builder import JobBuilder, to_manifest
from hyperfleet.reconcilers.jobs.dispatch import dispatch
from hyperfleet.reconcilers.jobs.handlers import HANDLERS, JobContext
from hyperfleet.reconcilers.jobs.routing import WorkerView
from hyperfleet.reconcilers.jobs.runner import JobRunner, MigrationPeers
from hyperfleet.reconcilers.kube import JOBS, VMS, Conflict, JsonPatch, Resource
from hyperfleet.reconcilers.models.common import now_utc
from hyperfleet.reconcilers.testing.fakekube import FakeKube

OP = "system.health-check"


class JobKube(FakeKube):
    """The shared fake holding one VmJob, ns/j: notes when, from which thread and with what
    status each write left it (the order in which agents and the controller wrote)."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__()
        self.put(JOBS, body)
        self.history: list[tuple[float, str, dict[str, Any]]] = []  # (time, thread, status)

    def patch(self, res: Resource, name: str, patch: dict[str, Any] | JsonPatch,
              namespace: str | None = None, status: bool = False) -> dict[str, Any]:
        with self.lock:
            out = super().patch(res, name, patch, namespace, status)
            self.history.append((time.monotonic(), threading.current_thread().name,
                                 copy.deepcopy(out.get("status") or {})))
            return out

    @property
    def job(self) -> dict[str, Any]:
        body = self.get(JOBS, "j", "ns")
        assert body is not None
        return body

    @property
    def status(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.job.get("status") or {})


def scheduled(builder: JobBuilder, node: str = "a") -> JobKube:
    """A job the controller routed to ``node``, as stored."""
    now = now_utc()
    m = to_manifest(builder.build(now=now), name="j", namespace="ns")
    m["metadata"].update(resourceVersion="1", uid=str(uuid.uuid4()), generation=1,
                         creationTimestamp=now.isoformat())
    kube = JobKube(m)
    controller_pass(kube, [WorkerView(node)])
    assert kube.status["phase"] == "Scheduled" and kube.status["assignedNode"] == node
    return kube


def controller_pass(kube: JobKube, nodes: list[WorkerView], later: float = 0.0) -> None:
    """What the controller writes in one pass (conditional, like Controller._write_status)."""
    for d in dispatch([kube.job], nodes, {}, now_utc() + timedelta(seconds=later)):
        try:
            kube.patch(JOBS, d.name, {"metadata": {"resourceVersion": d.resource_version},
                                      "status": d.status}, d.namespace, status=True)
        except Conflict:
            continue  # as the controller: no Event for a write that did not happen
        if d.event:
            kube.event({}, d.event[1], d.event[2], d.event[0])


def agent(node: str, kube: FakeKube, stop_grace: float = 5.0) -> JobRunner:
    r = JobRunner(node, kube, driver=cast(Any, None))
    r.stop_grace = stop_grace
    return r


def start(r: JobRunner, kube: JobKube) -> threading.Thread:
    t = threading.Thread(target=r.run, args=(kube.job,), name=f"agent-{r.node}", daemon=True)
    t.start()
    return t


def wait_until(pred: Callable[[], object], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def handler(monkeypatch: pytest.MonkeyPatch, fn: Callable[[JobContext], dict[str, Any]]) -> None:
    monkeypatch.setitem(HANDLERS, OP, fn)


def writes_by(kube: JobKube, thread: str) -> list[dict[str, Any]]:
    return [st for _, who, st in kube.history if who == thread]


# --------------------------------------------------------------------------- superseded attempts


def test_outcome_is_not_written_over_the_attempt_on_another_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def run(ctx: JobContext) -> dict[str, Any]:
        if ctx.node == "a":
            release.wait(5)
        return {"node": ctx.node}

    handler(monkeypatch, run)
    kube = scheduled(JobBuilder(OP).timeout(60))
    ta = start(agent("a", kube), kube)
    wait_until(lambda: kube.status.get("phase") == "Running")
    # a's lease lapses: the controller hands the job back and routes it to b, which runs it.
    controller_pass(kube, [WorkerView("a", ready=False), WorkerView("b")])
    assert kube.status["phase"] == "Pending" and "assignedNode" not in kube.status
    controller_pass(kube, [WorkerView("a", ready=False), WorkerView("b")])
    start(agent("b", kube), kube).join(5)
    assert kube.status["phase"] == "Succeeded" and kube.status["result"] == {"node": "b"}
    release.set()
    ta.join(5)
    assert kube.status["result"] == {"node": "b"} and kube.status["assignedNode"] == "b"
    assert [st["phase"] for st in writes_by(kube, "agent-a")] == ["Running"]  # the claim only


def test_controller_timeout_is_not_overwritten_by_a_late_result(
        monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def late(ctx: JobContext) -> dict[str, Any]:
        release.wait(5)
        return {"late": True}

    handler(monkeypatch, late)
    kube = scheduled(JobBuilder(OP).timeout(60))
    t = start(agent("a", kube), kube)
    wait_until(lambda: kube.status.get("phase") == "Running")
    controller_pass(kube, [WorkerView("a")], later=61)
    assert kube.status["phase"] == "TimedOut"
    release.set()
    t.join(5)
    assert kube.status["phase"] == "TimedOut" and "result" not in kube.status


def test_observe_stops_an_attempt_handed_back_but_not_on_a_stale_event(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stopped = threading.Event()

    def run(ctx: JobContext) -> dict[str, Any]:
        try:
            while True:
                ctx.check_cancelled()
                time.sleep(0.01)
        finally:
            stopped.set()

    handler(monkeypatch, run)
    kube = scheduled(JobBuilder(OP).timeout(60))
    pre_claim = kube.job
    r = agent("a", kube)
    t = start(r, kube)
    wait_until(lambda: kube.status.get("phase") == "Running")
    r.observe(pre_claim)  # an event older than the claim says nothing about it
    time.sleep(0.1)
    assert not stopped.is_set()
    controller_pass(kube, [WorkerView("a", ready=False)])
    handed_back = kube.job
    r.observe(handed_back)
    t.join(5)
    assert stopped.is_set() and not t.is_alive()
    assert kube.status["phase"] == "Pending"  # the hand-back stands
    assert [st["phase"] for st in writes_by(kube, "agent-a")] == ["Running"]


def test_progress_is_not_written_once_the_attempt_is_not_ours(
        monkeypatch: pytest.MonkeyPatch) -> None:
    handed_back = threading.Event()
    seen_cancel: list[bool] = []

    def run(ctx: JobContext) -> dict[str, Any]:
        handed_back.wait(5)
        ctx.report(100, "done")
        seen_cancel.append(ctx.cancelled.is_set())
        return {}

    handler(monkeypatch, run)
    kube = scheduled(JobBuilder(OP).timeout(60))
    t = start(agent("a", kube), kube)
    wait_until(lambda: kube.status.get("phase") == "Running")
    controller_pass(kube, [WorkerView("a", ready=False)])
    handed_back.set()
    t.join(5)
    assert [st["phase"] for st in writes_by(kube, "agent-a")] == ["Running"]
    assert "percent" not in (kube.status.get("progress") or {}) or \
        kube.status["progress"]["percent"] != 100
    assert seen_cancel == [True]  # the runner learned it from the progress write


# --------------------------------------------------------------------------- stopping a handler


def _stoppable(cleanup: float, stopped_at: list[float]) -> Callable[[JobContext], dict[str, Any]]:
    """A handler that honours cancellation, taking ``cleanup`` seconds to stop."""

    def run(ctx: JobContext) -> dict[str, Any]:
        while not ctx.cancelled.is_set():
            time.sleep(0.01)
        time.sleep(cleanup)
        stopped_at.append(time.monotonic())
        ctx.check_cancelled()
        return {}

    return run


def test_cancel_is_recorded_after_the_handler_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    stopped_at: list[float] = []
    handler(monkeypatch, _stoppable(0.4, stopped_at))
    kube = scheduled(JobBuilder(OP).timeout(60))
    r = agent("a", kube)
    t = start(r, kube)
    wait_until(lambda: kube.status.get("phase") == "Running")
    r.cancel("ns/j")
    t.join(5)
    when, _, st = kube.history[-1]
    assert st["phase"] == "Cancelled"
    assert stopped_at and when >= stopped_at[0]


def test_a_handler_that_finished_despite_a_cancel_is_recorded_as_done(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Like a restore: the cancel came during a step that cannot stop half way."""
    def run(ctx: JobContext) -> dict[str, Any]:
        time.sleep(0.4)
        return {"restored": True}

    handler(monkeypatch, run)
    kube = scheduled(JobBuilder(OP).timeout(60))
    r = agent("a", kube)
    t = start(r, kube)
    wait_until(lambda: kube.status.get("phase") == "Running")
    r.cancel("ns/j")
    t.join(5)
    assert kube.status["phase"] == "Succeeded" and kube.status["result"] == {"restored": True}


def test_timeout_is_recorded_after_the_handler_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    stopped_at: list[float] = []
    handler(monkeypatch, _stoppable(0.3, stopped_at))
    kube = scheduled(JobBuilder(OP).timeout(1))
    start(agent("a", kube), kube).join(5)
    when, _, st = kube.history[-1]
    assert st["phase"] == "TimedOut"
    assert stopped_at and when >= stopped_at[0]


def test_shutdown_waits_for_the_handler_then_hands_back(monkeypatch: pytest.MonkeyPatch) -> None:
    stopped_at: list[float] = []
    handler(monkeypatch, _stoppable(0.4, stopped_at))
    kube = scheduled(JobBuilder(OP).timeout(60).max_attempts(2))
    r = agent("a", kube)
    t = start(r, kube)
    wait_until(lambda: kube.status.get("phase") == "Running")
    r.hand_back(grace=5)
    t.join(5)
    when, _, st = kube.history[-1]
    assert st["phase"] == "Pending" and st["reason"] == "HandedBack"
    assert "assignedNode" not in st
    assert stopped_at and when >= stopped_at[0]


def test_shutdown_hand_back_counts_against_max_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    handler(monkeypatch, _stoppable(0.0, []))
    kube = scheduled(JobBuilder(OP).timeout(60).max_attempts(1))
    r = agent("a", kube)
    t = start(r, kube)
    wait_until(lambda: kube.status.get("phase") == "Running")
    r.hand_back(grace=5)
    t.join(5)
    assert kube.status["phase"] == "Failed" and kube.status["reason"] == "AttemptsExhausted"


def test_shutdown_leaves_a_handler_that_does_not_stop_running(
        monkeypatch: pytest.MonkeyPatch) -> None:
    done = threading.Event()

    def stubborn(ctx: JobContext) -> dict[str, Any]:
        time.sleep(1.0)
        done.set()
        return {}

    handler(monkeypatch, stubborn)
    kube = scheduled(JobBuilder(OP).timeout(60))
    r = agent("a", kube, stop_grace=0.2)
    t = start(r, kube)
    wait_until(lambda: kube.status.get("phase") == "Running")
    r.hand_back(grace=5)
    t.join(5)
    # Handing back now could run it twice; the controller hands it back once the lease lapses.
    assert kube.status["phase"] == "Running" and kube.status["assignedNode"] == "a"
    done.wait(5)


# --------------------------------------------------------------------------- claiming


def test_deadline_passed_before_the_claim_fails_the_job_without_running_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []

    def run(ctx: JobContext) -> dict[str, Any]:
        ran.append(ctx.node)
        return {}

    handler(monkeypatch, run)
    kube = scheduled(JobBuilder(OP).deadline(now_utc() + timedelta(seconds=30)))
    later = now_utc() + timedelta(minutes=10)  # the agent sees it late (it restarted)
    monkeypatch.setattr(runner_mod, "_now", lambda: later)
    body = kube.job
    controller = dispatch([body], [WorkerView("a")], {}, later)[0].status
    agent("a", kube).run(body)
    assert ran == []
    assert kube.status["phase"] == "Failed"
    assert (kube.status["reason"], kube.status["lastError"]) == \
        (controller["reason"], controller["lastError"]) == ("DeadlineExceeded", "deadline exceeded")


# --------------------------------------------------------------------------- logs


def test_log_lines_keep_their_own_fields_and_the_job_ids(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    handler(monkeypatch, lambda ctx: {})
    kube = scheduled(JobBuilder(OP).trace(correlation_id="change-7"))
    body = kube.job
    trace = body["spec"]["observability"]["traceId"]
    with caplog.at_level(logging.INFO, logger="hyperfleet.jobs"):
        agent("a", kube).run(body)
    lines = {r.getMessage(): r.__dict__ for r in caplog.records}
    started, finished = lines["job started"], lines["job finished"]
    assert started["attempt"] == 1 and finished["phase"] == "Succeeded"
    for rec in (started, finished):
        assert rec["traceId"] == trace and rec["correlationId"] == "change-7"


def test_migration_receiver_logs_carry_the_job_trace_ids(
        caplog: pytest.LogCaptureFixture) -> None:
    class Driver:
        class pm:
            @staticmethod
            def pid(ns: str, name: str) -> int:
                return 42  # a VMM already runs here: the receiver refuses

        def expect(self, key: str) -> None:
            pass

        def lock(self, ns: str, name: str) -> threading.Lock:
            return threading.Lock()

    job = JobBuilder("vm.migrate").payload(destination_node="b").target("web") \
        .trace(correlation_id="move-1").build(now=now_utc())
    m = to_manifest(job, name="mig", namespace="ns")
    m["metadata"].update(resourceVersion="1", uid="u1", generation=1)
    m["status"] = {"phase": "Running", "assignedNode": "a", "attempts": 1}
    kube = FakeKube()
    kube.put(JOBS, m)
    r = JobRunner("b", kube, driver=cast(Any, Driver()))
    with caplog.at_level(logging.INFO, logger="hyperfleet.jobs"):
        MigrationPeers(r).receive(m)
    rec = next(r.__dict__ for r in caplog.records if r.getMessage() == "cannot receive migration")
    assert rec["traceId"] == job.observability.trace_id and rec["correlationId"] == "move-1"
    assert "already runs here" in rec["error"]


@pytest.mark.parametrize(("phase", "stopped"), [
    ("Cancelled", True), ("Failed", True), ("TimedOut", True), ("Pending", True),
    (None, True),  # deleted
    ("Running", False), ("Succeeded", False),
])
def test_a_receiver_whose_source_gave_up_stops_its_vmm(
        tmp_path: Any, phase: str | None, stopped: bool) -> None:
    """Without this, the receiving VMM waited 10 minutes for a sender that had failed, and
    refused the VM's next start on this node ("a migration is being received")."""
    gone = threading.Event()
    (tmp_path / "ns_web.migration").touch()

    class Client:
        timeout = 0.0

        def request(self, method: str, action: str, body: Any) -> None:
            assert action == "vm.receive-migration"
            if not gone.wait(0.5):
                return  # the whole VM arrived
            raise ConnectionError("the VMM went away")

        def close(self) -> None:
            pass

    class Pm:
        def stop(self, ns: str, name: str, grace: float) -> None:
            gone.set()

        def paths(self, ns: str, name: str) -> Any:
            return type("P", (), {"socket": tmp_path / f"{ns}_{name}.sock"})

    class Driver:
        pm = Pm()
        let_go: ClassVar[list[str]] = []

        def lock(self, ns: str, name: str) -> threading.Lock:
            return threading.Lock()

        def not_coming(self, key: str) -> None:
            self.let_go.append(key)

    job = to_manifest(JobBuilder("vm.migrate").payload(destination_node="b").target("web")
                      .build(now=now_utc()), name="mig", namespace="ns")
    job["metadata"].update(resourceVersion="1")
    job["status"] = {"phase": phase}
    kube = FakeKube()
    if phase is not None:  # else deleted
        kube.put(JOBS, job)
    peers = MigrationPeers(JobRunner("b", kube, driver=cast(Any, Driver())))
    peers.poll_interval = 0.05
    peers.receiving.add("ns/mig")
    adapter = runner_mod.job_log(None, "b", "ns/mig")
    peers._listen(Client(), "unix:x", "ns/mig", adapter, "ns", "web")
    assert gone.is_set() == stopped
    assert (Driver.let_go == ["ns/web"]) == stopped
    assert (tmp_path / "ns_web.migration").exists() != stopped
    assert "ns/mig" not in peers.receiving


@pytest.mark.parametrize(("bound_to", "after"), [("a", "b"), ("c", "c"), (None, None)])
def test_a_received_vm_is_bound_to_its_new_node_at_once(bound_to: str | None,
                                                        after: str | None) -> None:
    """Only while it is still bound to the migration's source: a VM the controller or the
    source agent rebound meanwhile is left as it is."""
    kube = FakeKube()
    vm = kube.put(VMS, {"metadata": {"name": "web", "namespace": "ns"},
                        "status": {"nodeName": bound_to}})
    job = kube.put(JOBS, {"metadata": {"name": "mig", "namespace": "ns"},
                          "status": {"phase": "Running", "assignedNode": "a"}})
    peers = MigrationPeers(JobRunner("b", kube, driver=cast(Any, None)))
    peers._take_binding("ns/mig", "ns", "web", runner_mod.job_log(None, "b", "ns/mig"))
    assert (kube.get(VMS, "web", "ns") or {})["status"]["nodeName"] == after
    # Only the VM is written, and only over the version read.
    assert kube.get(JOBS, "mig", "ns") == job
    assert all(w["metadata"]["resourceVersion"] == vm["metadata"]["resourceVersion"]
               for w in kube.writes)


def outcome_events(kube: FakeKube) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the outcome Events."""
    return [(type_, reason, message) for _, reason, message, type_ in kube.events
            if reason in ("Succeeded", "Failed", "TimedOut", "Cancelled")]


@pytest.mark.parametrize(("outcome", "expected"), [
    ("ok", ("Normal", "Succeeded", "system.health-check succeeded on a")),
    ("fail", ("Warning", "Failed", "system.health-check failed on a (NonRetryableError): disk "
                                   "full")),
    ("cancel", ("Normal", "Cancelled", "system.health-check cancelled on a: cancelled while "
                                       "running")),
    ("timeout", ("Warning", "TimedOut", "system.health-check timed out on a: no result "
                                        "within 1s")),
])
def test_a_finished_job_gets_one_outcome_event(monkeypatch: pytest.MonkeyPatch, outcome: str,
                                                expected: tuple[str, str, str]) -> None:
    """Exactly one Event per job when it finishes, whoever writes the end: the agent here,
    and no second one from a controller pass (or a later agent) over the finished job."""
    from hyperfleet.reconcilers.jobs.handlers import JobFailure

    def run(ctx: JobContext) -> dict[str, Any]:
        if outcome == "fail":
            raise JobFailure("disk full", retryable=False)
        if outcome in ("cancel", "timeout"):
            return _stoppable(0.1, [])(ctx)
        return {}

    handler(monkeypatch, run)
    kube = scheduled(JobBuilder(OP).timeout(1 if outcome == "timeout" else 60))
    r = agent("a", kube)
    t = start(r, kube)
    if outcome == "cancel":
        wait_until(lambda: kube.status.get("phase") == "Running")
        r.cancel("ns/j")
    t.join(5)
    assert outcome_events(kube) == [expected]
    controller_pass(kube, [WorkerView("a")], later=120)
    start(agent("a", kube), kube).join(5)
    assert outcome_events(kube) == [expected]


def test_a_job_the_controller_ends_gets_one_event_from_it() -> None:
    kube = scheduled(JobBuilder(OP).timeout(60))
    kube.patch(JOBS, "j", {"metadata": {"annotations": {"hyperfleet.dev/cancel": "true"}}}, "ns")
    controller_pass(kube, [WorkerView("a")])
    controller_pass(kube, [WorkerView("a")])
    assert kube.status["phase"] == "Cancelled"
    assert outcome_events(kube) == [
        ("Normal", "Cancelled", "system.health-check cancelled on a: cancelled by annotation")]
