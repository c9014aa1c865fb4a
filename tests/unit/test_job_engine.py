"""Pure job engine: state machine, retries, timeouts, queue, routing, idempotency."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperfleet.reconcilers.jobs.builder import JobBuilder
from hyperfleet.reconcilers.jobs.envelope import (
    MAX_BACKOFF_SECONDS,
    Backoff,
    Execution,
    JobDocument,
    NodeAffinity,
)
from hyperfleet.reconcilers.jobs.idempotency import IdempotencyIndex, Resolution, StoredJob, apply_resolution
from hyperfleet.reconcilers.jobs.retries import (
    JobError,
    check_deadline,
    check_timeout,
    deadline_passed,
    decide_after_failure,
    hand_back,
    next_backoff,
    next_check_at,
    ready_to_start,
    timeout_at,
)
from hyperfleet.reconcilers.jobs.routing import WorkerView, order_queue, route
from hyperfleet.reconcilers.jobs.status import (
    HISTORY_LIMIT,
    TERMINAL_PHASES,
    IllegalTransitionError,
    JobPhase,
    JobStatus,
    Reason,
    advance,
    can_transition,
    transition,
)
from hyperfleet.reconcilers.models.common import set_condition

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
P = JobPhase

_counter = itertools.count()


def make_job(
    operation: str = "vm.reboot",
    *,
    target: str | None = "web-1",
    priority: int = 5,
    max_attempts: int = 3,
    timeout: int = 300,
    deadline: datetime | None = None,
    jitter: bool = False,
    key: str | None = None,
    submitted: datetime = NOW,
    **payload: object,
) -> JobDocument:
    builder = JobBuilder(operation).payload(**payload).priority(priority).timeout(timeout)
    builder.max_attempts(max_attempts).backoff(initial=1, maximum=60, multiplier=2, jitter=jitter)
    if target is not None:
        builder.target(target)
    if deadline is not None:
        builder.deadline(deadline)
    if key is not None:
        builder.idempotency_key(key)
    return builder.build(now=submitted, rng=random.Random(next(_counter)))


def running(attempts: int = 1, started: datetime = NOW, node: str = "n1") -> JobStatus:
    status = JobStatus()
    for i in range(attempts):
        status = advance(status, P.SCHEDULED, now=started, node=node)
        status = advance(status, P.RUNNING, now=started)
        if i < attempts - 1:
            status = advance(status, P.PENDING, now=started)
    return status


# --------------------------------------------------------------------------- state machine

LEGAL = {
    (P.PENDING, P.SCHEDULED),
    (P.PENDING, P.CANCELLED),
    (P.PENDING, P.FAILED),
    (P.SCHEDULED, P.RUNNING),
    (P.SCHEDULED, P.PENDING),
    (P.SCHEDULED, P.CANCELLED),
    (P.SCHEDULED, P.FAILED),
    (P.RUNNING, P.SUCCEEDED),
    (P.RUNNING, P.FAILED),
    (P.RUNNING, P.TIMED_OUT),
    (P.RUNNING, P.CANCELLED),
    (P.RUNNING, P.PENDING),
}
ALL_PAIRS = list(itertools.product(list(JobPhase), repeat=2))


@pytest.mark.parametrize(("current", "to"), sorted(LEGAL))
def test_legal_transitions(current: JobPhase, to: JobPhase) -> None:
    assert can_transition(current, to)
    assert transition(current, to) is to


@pytest.mark.parametrize(("current", "to"), [p for p in ALL_PAIRS if p not in LEGAL])
def test_illegal_transitions(current: JobPhase, to: JobPhase) -> None:
    assert not can_transition(current, to)
    with pytest.raises(IllegalTransitionError) as info:
        transition(current, to)
    assert info.value.current is current and info.value.to is to


def test_terminal_phases_are_final_with_clear_message() -> None:
    assert {P.SUCCEEDED, P.FAILED, P.CANCELLED, P.TIMED_OUT} == TERMINAL_PHASES
    with pytest.raises(IllegalTransitionError, match="Succeeded -> Running: Succeeded is terminal"):
        transition(P.SUCCEEDED, P.RUNNING)
    with pytest.raises(IllegalTransitionError, match="allowed from Pending: Cancelled, Failed, "):
        transition(P.PENDING, P.RUNNING)


def test_phase_values_are_k8s_strings() -> None:
    assert [p.value for p in JobPhase] == [
        "Pending",
        "Scheduled",
        "Running",
        "Succeeded",
        "Failed",
        "Cancelled",
        "TimedOut",
    ]


# --------------------------------------------------------------------------- advance / status


def test_advance_bookkeeping_through_success() -> None:
    status = advance(JobStatus(), P.SCHEDULED, now=NOW, node="n1")
    assert (status.phase, status.assigned_node, status.attempts) == (P.SCHEDULED, "n1", 0)
    status = advance(status, P.RUNNING, now=NOW + timedelta(seconds=1))
    assert status.attempts == 1
    assert status.started_at == status.attempt_started_at == NOW + timedelta(seconds=1)
    done = advance(status, P.SUCCEEDED, now=NOW + timedelta(seconds=5), result={"ok": True})
    assert done.terminal
    assert done.completed_at == NOW + timedelta(seconds=5)
    assert done.result == {"ok": True}
    assert done.progress is not None and done.progress.percent == 100
    assert done.reason == "Succeeded"
    assert [h.phase for h in done.history] == [P.SCHEDULED, P.RUNNING, P.SUCCEEDED]
    assert {c.type: c.status for c in done.conditions} == {
        "Running": "False",
        "Complete": "True",
        "Failed": "False",
    }
    assert status.phase is P.RUNNING  # inputs are not mutated


def test_second_attempt_keeps_first_start_time() -> None:
    first = running(1, started=NOW)
    handed_back = advance(first, P.PENDING, now=NOW + timedelta(seconds=10))
    assert handed_back.assigned_node is None and handed_back.reason == "HandedBack"
    again = advance(
        advance(handed_back, P.SCHEDULED, now=NOW + timedelta(seconds=20), node="n2"),
        P.RUNNING,
        now=NOW + timedelta(seconds=21),
    )
    assert again.attempts == 2
    assert again.started_at == NOW
    assert again.attempt_started_at == NOW + timedelta(seconds=21)
    assert again.assigned_node == "n2"


def test_advance_rejects_illegal_and_naive_now() -> None:
    with pytest.raises(IllegalTransitionError):
        advance(JobStatus(), P.SUCCEEDED, now=NOW)
    with pytest.raises(ValueError, match="timezone-aware"):
        advance(JobStatus(), P.SCHEDULED, now=datetime(2030, 1, 1))


def test_history_is_bounded() -> None:
    status = JobStatus()
    for i in range(HISTORY_LIMIT):
        status = advance(status, P.SCHEDULED, now=NOW + timedelta(seconds=i), node="n")
        status = advance(status, P.PENDING, now=NOW + timedelta(seconds=i))
    assert len(status.history) == HISTORY_LIMIT
    assert status.history[-1].phase is P.PENDING
    assert status.history[0].at == NOW + timedelta(seconds=HISTORY_LIMIT // 2)


def test_set_condition_only_moves_time_on_flip() -> None:
    later = NOW + timedelta(minutes=1)
    conds = set_condition([], "Complete", False, now=NOW, reason="A")
    same = set_condition(conds, "Complete", False, now=later, reason="B")
    assert same[0].last_transition_time == NOW and same[0].reason == "B"
    flipped = set_condition(same, "Complete", True, now=later, reason="C")
    assert flipped[0].last_transition_time == later and flipped[0].status == "True"
    assert len(flipped) == 1


def test_status_wire_form() -> None:
    wire = running().to_status()
    assert wire["phase"] == "Running"
    assert wire["assignedNode"] == "n1"
    assert wire["attemptStartedAt"] == "2030-01-01T12:00:00Z"
    assert "lastError" not in wire
    assert JobStatus.model_validate(wire) == running()


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(("attempt", "expected"), [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (50, 60)])
def test_backoff_exponential_capped(attempt: int, expected: float) -> None:
    policy = Backoff(initial_seconds=1, max_seconds=60, multiplier=2, jitter=False)
    assert next_backoff(Execution(backoff=policy), attempt, random.Random(0)) == expected


def test_backoff_multiplier_one_is_constant() -> None:
    policy = Backoff(initial_seconds=5, max_seconds=60, multiplier=1, jitter=False)
    assert [next_backoff(policy, a, random.Random(0)) for a in (1, 10, 100)] == [5, 5, 5]


def test_backoff_jitter_is_equal_jitter_and_seeded() -> None:
    policy = Backoff(initial_seconds=8, max_seconds=60, multiplier=2, jitter=True)
    values = [next_backoff(policy, 2, random.Random(seed)) for seed in range(50)]
    assert all(8 <= v <= 16 for v in values)
    assert len(set(values)) > 40
    assert next_backoff(policy, 2, random.Random(42)) == next_backoff(policy, 2, random.Random(42))
    expected_fraction = random.Random(42).random()
    assert next_backoff(policy, 2, random.Random(42)) == pytest.approx(8 + 8 * expected_fraction)


def test_backoff_rejects_attempt_zero_and_survives_huge_attempts() -> None:
    with pytest.raises(ValueError, match="1-based"):
        next_backoff(Backoff(), 0, random.Random(0))
    policy = Backoff(initial_seconds=1, max_seconds=10, multiplier=1000, jitter=False)
    assert next_backoff(policy, 10**6, random.Random(0)) == 10


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(0.001, 1000),
    extra=st.floats(0, 10000),
    multiplier=st.floats(1, 50),
    jitter=st.booleans(),
    attempt=st.integers(1, 500),
    seed=st.integers(0, 2**32),
)
def test_property_backoff_bounded(
    initial: float, extra: float, multiplier: float, jitter: bool, attempt: int, seed: int
) -> None:
    policy = Backoff(
        initial_seconds=initial, max_seconds=initial + extra, multiplier=multiplier, jitter=jitter
    )
    delay = next_backoff(policy, attempt, random.Random(seed))
    assert delay <= policy.max_seconds
    assert delay >= initial / 2 if jitter else delay >= initial


@settings(max_examples=50, deadline=None)
@given(attempt=st.integers(1, 40), multiplier=st.floats(1, 4))
def test_property_backoff_monotonic_without_jitter(attempt: int, multiplier: float) -> None:
    policy = Backoff(initial_seconds=0.5, max_seconds=120, multiplier=multiplier, jitter=False)
    rng = random.Random(0)
    assert next_backoff(policy, attempt, rng) <= next_backoff(policy, attempt + 1, rng)


# --------------------------------------------------------------------------- retry decisions


def test_retryable_failure_schedules_retry() -> None:
    job = make_job()
    status = decide_after_failure(job, running(1), JobError("disk busy", code="EBUSY"), NOW)
    assert status.phase is P.PENDING
    assert status.reason == Reason.RETRY_SCHEDULED
    assert status.next_attempt_at == NOW + timedelta(seconds=1)
    assert status.last_error == "[EBUSY] disk busy"
    assert status.assigned_node is None
    assert status.history[-1].message == "attempt 1/3 failed, retrying in 1.0s: [EBUSY] disk busy"
    second = decide_after_failure(job, running(2), JobError("disk busy"), NOW)
    assert second.next_attempt_at == NOW + timedelta(seconds=2)


def test_non_retryable_failure_fails() -> None:
    status = decide_after_failure(make_job(), running(1), JobError("no such VM", False), NOW)
    assert status.phase is P.FAILED
    assert status.reason == Reason.NON_RETRYABLE_ERROR
    assert status.completed_at == NOW
    assert status.next_attempt_at is None
    assert {c.type: c.status for c in status.conditions}["Failed"] == "True"


def test_attempts_exhausted_fails() -> None:
    job = make_job(max_attempts=2)
    assert decide_after_failure(job, running(1), JobError("x"), NOW).phase is P.PENDING
    status = decide_after_failure(job, running(2), JobError("x"), NOW)
    assert status.phase is P.FAILED
    assert status.reason == Reason.ATTEMPTS_EXHAUSTED
    assert status.history[-1].message == "attempt 2/2 failed, no attempts left: x"


def test_deadline_passed_fails_instead_of_retrying() -> None:
    job = make_job(deadline=NOW + timedelta(minutes=5))
    status = decide_after_failure(job, running(1), JobError("x"), NOW + timedelta(minutes=5))
    assert (status.phase, status.reason) == (P.FAILED, Reason.DEADLINE_EXCEEDED)


def test_retry_that_would_start_after_deadline_fails_now() -> None:
    job = make_job(deadline=NOW + timedelta(seconds=10), max_attempts=10)
    status = decide_after_failure(job, running(4), JobError("x"), NOW + timedelta(seconds=5))
    assert (status.phase, status.reason) == (P.FAILED, Reason.DEADLINE_EXCEEDED)
    assert "would be past the deadline" in (status.history[-1].message or "")


def test_failure_while_scheduled_counts_an_attempt() -> None:
    scheduled = advance(JobStatus(), P.SCHEDULED, now=NOW, node="n1")
    status = decide_after_failure(make_job(), scheduled, JobError("VM missing"), NOW)
    assert (status.phase, status.attempts) == (P.PENDING, 1)


def test_failure_outside_running_is_illegal() -> None:
    with pytest.raises(IllegalTransitionError):
        decide_after_failure(make_job(), JobStatus(), JobError("x"), NOW)
    done = advance(running(), P.SUCCEEDED, now=NOW)
    with pytest.raises(IllegalTransitionError):
        decide_after_failure(make_job(), done, JobError("x"), NOW)


def test_default_jitter_is_reproducible_per_job() -> None:
    job = make_job(jitter=True)
    a = decide_after_failure(job, running(2), JobError("x"), NOW)
    b = decide_after_failure(job, running(2), JobError("x"), NOW)
    assert a.next_attempt_at == b.next_attempt_at
    assert a.next_attempt_at is not None
    assert NOW + timedelta(seconds=1) <= a.next_attempt_at <= NOW + timedelta(seconds=2)


# --------------------------------------------------------------------------- timeout / deadline


def test_timeout_is_strictly_longer_than_limit() -> None:
    job = make_job(timeout=60)
    status = running(1, started=NOW)
    assert timeout_at(job, status) == NOW + timedelta(seconds=60)
    assert check_timeout(job, status, NOW + timedelta(seconds=60)) is status
    timed_out = check_timeout(job, status, NOW + timedelta(seconds=61))
    assert timed_out.phase is P.TIMED_OUT
    assert timed_out.reason == Reason.TIMED_OUT
    assert timed_out.last_error == "timed out after 60s"
    assert timed_out.completed_at == NOW + timedelta(seconds=61)


def test_timeout_ignores_jobs_not_running() -> None:
    job = make_job(timeout=1)
    pending = JobStatus()
    assert check_timeout(job, pending, NOW + timedelta(days=1)) is pending
    assert timeout_at(job, pending) is None


def test_timeout_measured_from_current_attempt() -> None:
    job = make_job(timeout=60)
    status = running(1, started=NOW)
    status = advance(advance(status, P.PENDING, now=NOW), P.SCHEDULED, now=NOW, node="n")
    status = advance(status, P.RUNNING, now=NOW + timedelta(seconds=100))
    assert check_timeout(job, status, NOW + timedelta(seconds=150)).phase is P.RUNNING


def test_deadline_passed_boundaries() -> None:
    job = make_job(deadline=NOW + timedelta(hours=1))
    assert not deadline_passed(job, NOW + timedelta(minutes=59, seconds=59))
    assert deadline_passed(job, NOW + timedelta(hours=1))
    assert not deadline_passed(make_job(), NOW + timedelta(days=3650))
    with pytest.raises(ValueError):
        deadline_passed(job, datetime(2030, 1, 1))


def test_check_deadline_fails_unstarted_jobs_only() -> None:
    job = make_job(deadline=NOW + timedelta(minutes=1))
    late = NOW + timedelta(minutes=2)
    failed = check_deadline(job, JobStatus(), late)
    assert (failed.phase, failed.reason) == (P.FAILED, Reason.DEADLINE_EXCEEDED)
    scheduled = advance(JobStatus(), P.SCHEDULED, now=NOW, node="n")
    assert check_deadline(job, scheduled, late).phase is P.FAILED
    run = running()
    assert check_deadline(job, run, late) is run
    fresh = JobStatus()
    assert check_deadline(job, fresh, NOW) is fresh


def test_ready_to_start_respects_backoff_and_deadline() -> None:
    job = make_job(deadline=NOW + timedelta(minutes=10))
    retry = decide_after_failure(job, running(1), JobError("x"), NOW)
    assert retry.next_attempt_at == NOW + timedelta(seconds=1)
    assert not ready_to_start(job, retry, NOW)
    assert ready_to_start(job, retry, NOW + timedelta(seconds=1))
    assert not ready_to_start(job, retry, NOW + timedelta(minutes=10))
    assert not ready_to_start(job, running(), NOW)


def test_next_check_at() -> None:
    job = make_job(timeout=30, deadline=NOW + timedelta(hours=1))
    assert next_check_at(job, JobStatus()) == NOW + timedelta(hours=1)
    retry = decide_after_failure(job, running(1), JobError("x"), NOW)
    assert next_check_at(job, retry) == NOW + timedelta(seconds=1)
    assert next_check_at(job, running()) == NOW + timedelta(seconds=30, microseconds=1)
    assert next_check_at(job, advance(running(), P.SUCCEEDED, now=NOW)) is None


# --------------------------------------------------------------------------- queue


def test_order_queue_priority_then_time_then_id() -> None:
    low = make_job(priority=1, submitted=NOW)
    high_late = make_job(priority=9, submitted=NOW + timedelta(seconds=5))
    high_early = make_job(priority=9, submitted=NOW)
    mid = make_job(priority=5, submitted=NOW - timedelta(hours=1))
    twin_a = make_job(priority=5, submitted=NOW).model_copy(update={"job_id": "0" * 26})
    twin_b = make_job(priority=5, submitted=NOW).model_copy(update={"job_id": "1" * 26})
    ordered = order_queue([low, twin_b, high_late, twin_a, mid, high_early])
    assert ordered == [high_early, high_late, mid, twin_a, twin_b, low]


def test_order_queue_missing_timestamp_uses_creation_then_sorts_last() -> None:
    stamped = make_job(submitted=NOW + timedelta(hours=1))
    bare = stamped.model_copy(deep=True)
    bare.audit.submitted_at = None
    bare.job_id = "7" * 26
    other = bare.model_copy(update={"job_id": "6" * 26})
    assert order_queue([bare, stamped]) == [stamped, bare]
    created = {bare.job_id: NOW, other.job_id: None}
    ordered = order_queue([other, stamped, bare], created_at=lambda j: created.get(j.job_id or ""))
    assert ordered == [bare, stamped, other]


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.integers(0, 10), st.integers(0, 5), st.sampled_from(["A", "B", None])),
        max_size=12,
    )
)
def test_property_order_queue_is_a_stable_sorted_permutation(
    specs: list[tuple[int, int, str | None]],
) -> None:
    base = make_job()
    jobs = []
    for position, (priority, minute, job_id) in enumerate(specs):
        job = base.model_copy(deep=True)
        job.execution.priority = priority
        job.audit.submitted_at = NOW + timedelta(minutes=minute)
        job.job_id = None if job_id is None else job_id * 26
        job.labels = {"position": str(position)}  # identifies equal-looking jobs
        jobs.append(job)
    ordered = order_queue(jobs)
    positions = [int(j.labels["position"]) for j in ordered]
    assert sorted(positions) == list(range(len(jobs)))  # a permutation
    assert order_queue(ordered) == ordered  # idempotent
    keys = [(-j.execution.priority, j.audit.submitted_at or NOW, j.job_id or "") for j in ordered]
    assert keys == sorted(keys)
    for (key_a, pos_a), (key_b, pos_b) in itertools.pairwise(zip(keys, positions, strict=True)):
        if key_a == key_b:  # stable: full ties keep their input order
            assert pos_a < pos_b


# --------------------------------------------------------------------------- routing


def node(name: str, *caps: str, pool: str | None = None, ready: bool = True, load: int = 0) -> WorkerView:
    return WorkerView(name, pool=pool, capabilities=frozenset(caps), ready=ready, active_jobs=load)


def test_route_capability_missing_reason() -> None:
    job = make_job("vm.migrate", destination_node="c")
    decision = route(job, [node("b", "snapshot"), node("a")], {"default/web-1": "a"})
    assert decision.node is None and not decision.routed
    assert decision.reason == "no Ready node has capability 'migration' (nodes: a, b)"


def test_route_several_capabilities_missing_or_split() -> None:
    job = make_job("system.health-check", target=None)
    job.constraints.required_capabilities = ["gpu", "vsock"]
    none = route(job, [node("a")])
    assert none.reason == "no Ready node has capabilities 'gpu', 'vsock' (nodes: a)"
    split = route(job, [node("a", "gpu"), node("b", "vsock")])
    assert split.reason == (
        "no Ready node has all of 'gpu', 'vsock' (nodes: a [missing 'vsock'], b [missing 'gpu'])"
    )


def test_route_no_nodes_and_none_ready() -> None:
    job = make_job("system.health-check", target=None)
    assert route(job, []).reason == "no worker nodes are registered"
    decision = route(job, [node("b", ready=False), node("a", ready=False)])
    assert decision.reason == "no worker node is Ready (nodes: a, b)"


def test_route_worker_pool() -> None:
    job = make_job("system.health-check", target=None)
    job.routing.worker_pool = "gpu"
    decision = route(job, [node("a", pool="cpu"), node("b")])
    assert decision.reason == "no Ready node in worker pool 'gpu' (Ready nodes: a [cpu], b [no pool])"
    assert route(job, [node("a", pool="cpu"), node("c", pool="gpu")]).node == "c"


def test_route_vm_operation_goes_to_host() -> None:
    job = make_job("vm.resize", desired_cpus=4)
    nodes = [node("a", "hot-resize"), node("b", "hot-resize", load=9)]
    decision = route(job, nodes, {"default/web-1": "b"})
    assert (decision.node, decision.reason) == ("b", "node b hosts VM default/web-1")
    assert decision.eligible == ("b",)
    assert route(job, nodes, {"web-1": "b"}).node == "b"  # bare-name key also accepted
    other_ns = make_job("vm.resize", desired_cpus=4)
    assert other_ns.routing.target_vm is not None
    other_ns.routing.target_vm.namespace = "prod"
    assert route(other_ns, nodes, {"default/web-1": "a", "prod/web-1": "b"}).node == "b"


def test_route_vm_host_problems() -> None:
    job = make_job("vm.resize", desired_cpus=4)
    hosts = {"default/web-1": "b"}
    assert route(job, [node("a", "hot-resize")], {}).reason == (
        "VM default/web-1 is not running on any node; start it before vm.resize"
    )
    assert route(job, [node("a", "hot-resize")], hosts).reason == (
        "VM default/web-1 runs on node b, which is not a registered worker node"
    )
    assert route(job, [node("a", "hot-resize"), node("b", "hot-resize", ready=False)], hosts).reason == (
        "VM default/web-1 runs on node b, which is not Ready"
    )
    assert route(job, [node("a", "hot-resize"), node("b")], hosts).reason == (
        "VM default/web-1 runs on node b, which lacks capability 'hot-resize'"
    )
    job.routing.worker_pool = "p1"
    assert route(job, [node("a", "hot-resize", pool="p1"), node("b", "hot-resize")], hosts).reason == (
        "VM default/web-1 runs on node b, which is not in worker pool 'p1'"
    )


def test_route_vm_host_must_satisfy_affinity() -> None:
    job = JobBuilder("vm.reboot").target("web-1").affinity(["a"]).build(now=NOW, rng=random.Random(0))
    decision = route(job, [node("a"), node("b")], {"default/web-1": "b"})
    assert decision.reason == "VM default/web-1 runs on node b, which is not in affinity.nodeNames [a]"


def test_route_restore_may_run_anywhere_when_vm_is_down() -> None:
    job = make_job("vm.restore", source="/snap/web-1")
    nodes = [node("a", "snapshot", load=3), node("b", "snapshot", load=1), node("c")]
    decision = route(job, nodes, {})
    assert decision.node == "b"
    assert decision.eligible == ("a", "b")
    assert decision.reason == "least busy eligible node b (1 active jobs, 2 eligible)"
    assert route(job, nodes, {"default/web-1": "a"}).node == "a"


def test_route_affinity_required_and_preferred() -> None:
    def hc(required: list[str], prefer: list[str]) -> JobDocument:
        builder = JobBuilder("system.health-check").affinity(required, prefer=prefer)
        return builder.build(now=NOW, rng=random.Random(0))

    nodes = [node("a"), node("b"), node("c")]
    assert route(hc(["b", "c"], []), nodes).node == "b"
    assert route(hc(["b", "c"], ["c"]), nodes).node == "c"
    preferred = route(hc([], ["z", "c", "a"]), nodes)
    assert (preferred.node, preferred.reason) == ("c", "preferred node c (affinity.preferNodeNames)")
    missing = route(hc(["x", "y"], []), nodes)
    assert missing.reason == "no eligible node is in affinity.nodeNames [x, y] (eligible: a, b, c)"


def test_route_least_busy_then_name() -> None:
    job = make_job("system.health-check", target=None)
    assert route(job, [node("b", load=1), node("c", load=0), node("a", load=1)]).node == "c"
    assert route(job, [node("b"), node("a")]).node == "a"


# --------------------------------------------------------------------------- idempotency


def test_idempotency_without_key_always_executes() -> None:
    index = IdempotencyIndex()
    resolution = index.claim(make_job())
    assert resolution.kind is Resolution.EXECUTE and resolution.should_execute
    assert len(index) == 0


def test_idempotency_duplicate_resolves_to_first_outcome() -> None:
    index = IdempotencyIndex()
    first = make_job("vm.resize", key="resize-42", desired_cpus=4)
    second = make_job("vm.resize", key="resize-42", desired_cpus=4)
    assert first.job_id != second.job_id
    claim = index.claim(first)
    assert claim.should_execute and claim.record is not None
    assert claim.record.job_id == first.job_id
    assert index.claim(first).should_execute  # the owner re-reconciling is fine

    pending = index.claim(second)
    assert pending.kind is Resolution.DUPLICATE and not pending.should_execute
    waiting = apply_resolution(JobStatus(), pending, NOW)
    assert (waiting.phase, waiting.reason, waiting.duplicate_of) == (
        P.PENDING,
        "WaitingForDuplicate",
        first.job_id,
    )

    done = advance(running(), P.SUCCEEDED, now=NOW, result={"cpus": 4})
    index.record(first, done)
    index.record(second, advance(running(), P.FAILED, now=NOW))  # non-owner: ignored
    resolution = index.claim(second)
    assert resolution.kind is Resolution.DUPLICATE
    assert resolution.record is not None and resolution.record.phase is P.SUCCEEDED
    mirrored = apply_resolution(waiting, resolution, NOW + timedelta(seconds=1))
    assert mirrored.phase is P.SUCCEEDED
    assert mirrored.result == {"cpus": 4}
    assert mirrored.attempts == 0  # never executed
    assert mirrored.duplicate_of == first.job_id
    assert mirrored.reason == "Duplicate"


def test_idempotency_conflicting_request_is_rejected() -> None:
    index = IdempotencyIndex()
    index.claim(make_job("vm.resize", key="k", desired_cpus=4))
    other = make_job("vm.resize", key="k", desired_cpus=8)
    resolution = index.claim(other)
    assert resolution.kind is Resolution.CONFLICT and not resolution.should_execute
    assert "was already used by job" in resolution.message
    failed = apply_resolution(JobStatus(), resolution, NOW)
    assert (failed.phase, failed.reason) == (P.FAILED, "IdempotencyConflict")


def test_idempotency_scopes_and_forget() -> None:
    index = IdempotencyIndex()
    a = make_job(key="k")
    b = make_job(key="k")
    assert index.claim(a, scope="team-a").should_execute
    assert index.claim(b, scope="team-b").should_execute
    assert not index.claim(b, scope="team-a").should_execute
    index.forget("k", scope="team-a")
    assert index.get("k", "team-a") is None
    assert index.claim(b, scope="team-a").should_execute


def test_idempotency_requires_job_id() -> None:
    job = make_job(key="k")
    job.job_id = None
    with pytest.raises(ValueError, match="no jobId"):
        IdempotencyIndex().claim(job)


def test_idempotency_rebuild_from_stored_jobs() -> None:
    owner = make_job(key="k", submitted=NOW)
    dup = make_job(key="k", submitted=NOW - timedelta(minutes=1))  # older but a duplicate
    later = make_job(key="k", submitted=NOW + timedelta(minutes=1))
    done = advance(running(), P.SUCCEEDED, now=NOW, result={"x": 1})
    dup_status = JobStatus(duplicate_of=owner.job_id)
    index = IdempotencyIndex.rebuild([(later, None), (dup, dup_status), (owner, done)])
    record = index.get("k")
    assert record is not None
    assert record.job_id == owner.job_id
    assert record.phase is P.SUCCEEDED and record.result == {"x": 1}
    assert index.claim(later).kind is Resolution.DUPLICATE


# --------------------------------------------------------------------------- review fixes


def test_backoff_is_clamped_even_for_an_unvalidated_policy() -> None:
    huge = Backoff.model_construct(initial_seconds=1.0, max_seconds=1e300, multiplier=1e300,
                                   jitter=False)
    assert next_backoff(huge, 3, random.Random(0)) == MAX_BACKOFF_SECONDS
    job = make_job(max_attempts=5)
    job.execution.backoff = huge
    status = running(attempts=2)
    retry = decide_after_failure(job, status, JobError("EIO"), NOW)  # no OverflowError
    assert retry.next_attempt_at == NOW + timedelta(seconds=MAX_BACKOFF_SECONDS)


def test_route_cordoned_node_gets_no_new_job_but_keeps_its_vms() -> None:
    nodes = [WorkerView("a", schedulable=False), WorkerView("b", active_jobs=5)]
    assert route(make_job("system.health-check", target=None), nodes).node == "b"
    assert route(make_job("vm.reboot"), nodes, {"default/web-1": "a"}).node == "a"
    pinned = make_job("system.health-check", target=None)
    pinned.routing.affinity = NodeAffinity(node_names=["a"])
    decision = route(pinned, nodes)
    assert decision.node is None and "cordoned" in decision.reason


def test_hand_back_counts_a_started_attempt() -> None:
    job = make_job(max_attempts=2)
    first = hand_back(job, running(attempts=1), NOW, "node n1 lost")
    assert first.phase is P.PENDING and first.reason == "HandedBack" and first.assigned_node is None
    last = hand_back(job, running(attempts=2), NOW, "node n1 lost")
    assert last.phase is P.FAILED and last.reason == "AttemptsExhausted"
    assert "2/2" in (last.history[-1].message or "")
    scheduled = advance(JobStatus(), P.SCHEDULED, now=NOW, node="n1")
    assert hand_back(make_job(max_attempts=1), scheduled, NOW, "x").phase is P.PENDING


def test_to_patch_nulls_what_the_status_cleared_but_not_unknown_fields() -> None:
    stored = {**running().to_status(), "migration": {"receiverUrl": "unix:/x"},
              "nextAttemptAt": "2030-01-01T00:00:00Z"}
    back = advance(JobStatus.model_validate(stored), P.PENDING, now=NOW)
    patch = back.to_patch(stored)
    assert patch["assignedNode"] is None and patch["attemptStartedAt"] is None
    assert patch["nextAttemptAt"] == "2030-01-01T00:00:00Z"  # still set: not cleared
    assert "migration" in patch  # kept as an unknown field, never nulled
    assert JobStatus().to_patch(None) == JobStatus().to_status()


def test_idempotency_rebuild_owner_by_start_then_creation_then_name() -> None:
    early, late = NOW - timedelta(minutes=5), NOW
    a = make_job(key="k", submitted=NOW + timedelta(days=1))  # submittedAt is not consulted
    b = make_job(key="k", submitted=NOW - timedelta(days=1))
    index = IdempotencyIndex.rebuild([StoredJob(b, None, "ns", "ns/b", late),
                                      StoredJob(a, None, "ns", "ns/a", early)])
    record = index.get("k", "ns")
    assert record is not None and record.job_id == a.job_id
    started = advance(JobStatus(), P.SCHEDULED, now=NOW, node="n1")
    index = IdempotencyIndex.rebuild([StoredJob(a, None, "ns", "ns/a", early),
                                      StoredJob(b, started, "ns", "ns/b", late)])
    record = index.get("k", "ns")
    assert record is not None and record.job_id == b.job_id
    refused = advance(JobStatus(), P.FAILED, now=NOW, reason=Reason.DUPLICATE_JOB_ID)
    index = IdempotencyIndex.rebuild([StoredJob(b, refused, "ns", "ns/b", early),
                                      StoredJob(a, None, "ns", "ns/a", late)])
    record = index.get("k", "ns")
    assert record is not None and record.job_id == a.job_id
