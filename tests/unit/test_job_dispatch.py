"""Controller-side VmJob dispatch: pure decisions from objects, nodes and VM hosts."""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hyperfleet.reconcilers.jobs.builder import JobBuilder, to_manifest
from hyperfleet.reconcilers.jobs.dispatch import dispatch, parse
from hyperfleet.reconcilers.jobs.routing import WorkerView
from hyperfleet.reconcilers.kube import JOBS
from hyperfleet.reconcilers.testing.fakekube import FakeKube

NOW = datetime(2030, 1, 1, tzinfo=UTC)
NODES = [WorkerView("a", "default", frozenset({"snapshot", "migration"}), True),
         WorkerView("b", "default", frozenset({"snapshot"}), True)]


def obj(builder: JobBuilder, name: str, status: dict[str, Any] | None = None,
        rv: str = "1", created: datetime = NOW) -> dict[str, Any]:
    m = to_manifest(builder.build(now=created), name=name, namespace="ns")
    m["metadata"].update(resourceVersion=rv, creationTimestamp=created.isoformat(),
                         uid=str(uuid.uuid4()), generation=1)
    if status:
        m["status"] = status
    return m


def by_name(decisions: list[Any]) -> dict[str, Any]:
    return {d.name: d for d in decisions}


def test_routes_vm_jobs_to_the_vm_host_conditionally() -> None:
    job = obj(JobBuilder("vm.snapshot").target("web", namespace="ns"), "j1", rv="7")
    d = by_name(dispatch([job], NODES, {"ns/web": "b"}, NOW))["j1"]
    assert d.status["phase"] == "Scheduled" and d.status["assignedNode"] == "b"
    assert d.resource_version == "7"
    assert d.event is not None and d.event[1] == "Scheduled"


def test_missing_capability_stays_pending_with_reason() -> None:
    job = obj(JobBuilder("system.health-check").require("gpu"), "j1")
    d = by_name(dispatch([job], NODES, {}, NOW))["j1"]
    assert d.status["phase"] == "Pending"
    cond = {c["type"]: c for c in d.status["conditions"]}["Scheduled"]
    assert cond["status"] == "False" and "gpu" in cond["message"]


def test_priority_order_balances_nodes() -> None:
    low = obj(JobBuilder("system.health-check").priority(1), "low")
    high = obj(JobBuilder("system.health-check").priority(9), "high")
    ds = by_name(dispatch([low, high], NODES, {}, NOW))
    assert ds["high"].status["assignedNode"] == "a"  # first pick, least busy, by name
    assert ds["low"].status["assignedNode"] == "b"  # a now has one active job


def test_deadline_and_cancel_and_validation() -> None:
    late = obj(JobBuilder("system.health-check").deadline(NOW + timedelta(seconds=1)), "late")
    cancel = obj(JobBuilder("system.health-check"), "cancel")
    cancel["metadata"]["annotations"] = {"hyperfleet.dev/cancel": "true"}
    bad = obj(JobBuilder("system.health-check"), "bad")
    bad["spec"]["version"] = "9.0"
    ds = by_name(dispatch([late, cancel, bad], NODES, {}, NOW + timedelta(seconds=5)))
    assert ds["late"].status["phase"] == "Failed"
    assert ds["late"].status["reason"] == "DeadlineExceeded"
    assert ds["cancel"].status["phase"] == "Cancelled"
    assert ds["bad"].status["phase"] == "Failed"
    assert "spec.version" in ds["bad"].status["lastError"]


def test_running_job_times_out_and_lost_node_hands_back() -> None:
    running = {"phase": "Running", "attempts": 1, "assignedNode": "a",
               "attemptStartedAt": NOW.isoformat(), "startedAt": NOW.isoformat()}
    slow = obj(JobBuilder("system.health-check").timeout(10), "slow", dict(running))
    lost = obj(JobBuilder("system.health-check").timeout(100), "lost",
               {**running, "assignedNode": "gone"})
    ds = by_name(dispatch([slow, lost], NODES, {}, NOW + timedelta(seconds=11)))
    assert ds["slow"].status["phase"] == "TimedOut"
    assert ds["lost"].status["phase"] == "Pending"
    # An explicit null: the controller's merge patch would otherwise keep the old node.
    assert "assignedNode" in ds["lost"].status and ds["lost"].status["assignedNode"] is None


def test_terminal_jobs_are_left_alone_and_ids_are_stable() -> None:
    done = obj(JobBuilder("system.health-check"), "done", {"phase": "Succeeded"})
    assert dispatch([done], NODES, {}, NOW) == []
    anon = obj(JobBuilder("system.health-check"), "anon")
    del anon["spec"]["jobId"]
    assert parse(anon).job_id == parse(anon).job_id
    assert len(parse(anon).job_id or "") == 26


def test_migration_receiver_urls_unix_on_one_host_tcp_between_hosts(tmp_path: Any) -> None:
    import socket

    from hyperfleet.reconcilers.jobs.runner import receiver_urls

    listen, publish, ready = receiver_urls(None, tmp_path / "vm.migration")
    assert listen == publish == f"unix:{tmp_path / 'vm.migration'}"
    assert not ready()
    (tmp_path / "vm.migration").touch()
    assert ready()

    listen, publish, ready = receiver_urls("127.0.0.1", tmp_path / "unused")
    port = int(listen.rsplit(":", 1)[1])
    assert listen == publish == f"tcp:127.0.0.1:{port}"  # never every interface
    assert not ready()
    with socket.socket() as srv:  # what the receiving VMM does
        srv.bind(("127.0.0.1", port))
        srv.listen(1)
        assert ready()


# --------------------------------------------------------------------------- cordoned nodes

RUNNING_ON_A = {"phase": "Running", "attempts": 1, "assignedNode": "a",
                "attemptStartedAt": NOW.isoformat(), "startedAt": NOW.isoformat()}


def test_cordoned_node_keeps_its_jobs_and_its_vms_jobs_but_gets_no_new_ones() -> None:
    nodes = [WorkerView("a", "default", frozenset({"migration"}), True, schedulable=False),
             WorkerView("b", "default", frozenset({"migration"}), True)]
    running = obj(JobBuilder("system.health-check"), "running", dict(RUNNING_ON_A))
    waiting = obj(JobBuilder("system.health-check"), "waiting",
                  {"phase": "Scheduled", "assignedNode": "a"})
    migrate = obj(JobBuilder("vm.migrate").payload(destination_node="b").target("web", "ns"),
                  "migrate")
    new = obj(JobBuilder("system.health-check"), "new")
    ds = by_name(dispatch([running, waiting, migrate, new], nodes, {"ns/web": "a"}, NOW))
    assert "running" not in ds and "waiting" not in ds  # not handed back
    assert ds["migrate"].status["assignedNode"] == "a"  # off the draining node
    assert ds["new"].status["assignedNode"] == "b"  # a is less busy, but cordoned


def test_no_schedulable_node_leaves_a_new_job_pending_saying_so() -> None:
    nodes = [WorkerView("a", schedulable=False), WorkerView("b", schedulable=False)]
    d = by_name(dispatch([obj(JobBuilder("system.health-check"), "j")], nodes, {}, NOW))["j"]
    assert d.status["phase"] == "Pending"
    cond = {c["type"]: c for c in d.status["conditions"]}["Scheduled"]
    assert "cordoned" in cond["message"] and "a, b" in cond["message"]


def test_controller_passes_cordoned_nodes_as_ready_but_unschedulable() -> None:
    import asyncio

    from hyperfleet.operator.controller import Controller
    from hyperfleet.operator.settings import ControllerConfig
    from hyperfleet.reconcilers.models.common import rfc3339
    from hyperfleet.reconcilers.nodes import node_view

    def node(name: str, cordoned: bool) -> dict[str, Any]:
        return {"metadata": {"name": name}, "spec": {"unschedulable": cordoned},
                "status": {"heartbeatTime": rfc3339(NOW), "capabilities": ["migration"],
                           "providers": [{"name": "cloud-hypervisor", "available": True,
                                          "healthy": True}]}}

    kube = FakeKube()
    ctl = Controller(ControllerConfig(), kube)
    ctl.vms = {"ns/web": {"metadata": {"name": "web", "namespace": "ns"},
                          "spec": {"liveMigration": True},
                          "status": {"nodeName": "a", "hypervisor": {"state": "Running"}}}}
    ctl.jobs = {
        "ns/running": obj(JobBuilder("system.health-check"), "running", dict(RUNNING_ON_A)),
        "ns/migrate": obj(JobBuilder("vm.migrate").payload(destination_node="b")
                          .target("web", "ns"), "migrate"),
    }
    running = kube.put(JOBS, ctl.jobs["ns/running"], keep_version=True)
    kube.put(JOBS, ctl.jobs["ns/migrate"], keep_version=True)
    nodes = [node_view(node("a", True), NOW), node_view(node("b", False), NOW)]
    assert [n.ready for n in nodes] == [True, True]

    async def main() -> None:
        await ctl._dispatch_jobs(NOW, nodes)
        await asyncio.gather(*ctl._background)

    asyncio.run(main())
    assert kube.get(JOBS, "running", "ns") == running  # not written
    migrate = (kube.get(JOBS, "migrate", "ns") or {})["status"]
    assert migrate["phase"] == "Scheduled"
    assert migrate["assignedNode"] == "a"


# --------------------------------------------------------------------------- hand-back limits


@pytest.mark.parametrize(("max_attempts", "phase", "reason"),
                         [(1, "Failed", "AttemptsExhausted"), (2, "Pending", "HandedBack")])
def test_hand_back_from_a_lost_node_counts_against_max_attempts(
        max_attempts: int, phase: str, reason: str) -> None:
    job = obj(JobBuilder("system.health-check").max_attempts(max_attempts), "j",
              dict(RUNNING_ON_A))
    d = by_name(dispatch([job], [WorkerView("a", ready=False), WorkerView("b")], {}, NOW))["j"]
    assert (d.status["phase"], d.status["reason"]) == (phase, reason)
    assert d.status["attempts"] == 1


# --------------------------------------------------------------------------- idempotency owner


def _raw(builder: JobBuilder, name: str, created: datetime,
         audit: dict[str, Any] | None = None, status: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """A VmJob applied as plain YAML: no jobId, and audit only as the user wrote it."""
    spec = builder.to_mapping()
    if audit is not None:
        spec["audit"] = audit
    m: dict[str, Any] = {"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VmJob",
                         "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1",
                                      "uid": str(uuid.uuid4()), "generation": 1,
                                      "creationTimestamp": created.isoformat()},
                         "spec": spec}
    if status:
        m["status"] = status
    return m


def _snap() -> JobBuilder:
    return JobBuilder("vm.snapshot").target("web", "ns").idempotency_key("nightly")


@pytest.mark.parametrize("audit", [None, {"submittedAt": "2029-01-01T00:00:00Z"}],
                         ids=["no-submittedAt", "backdated-submittedAt"])
def test_idempotency_owner_is_by_creation_not_by_submitted_at(
        audit: dict[str, Any] | None) -> None:
    owner = obj(_snap(), "owner", dict(RUNNING_ON_A), created=NOW - timedelta(minutes=1))
    later = _raw(_snap(), "later", NOW, audit)
    d = by_name(dispatch([later, owner], NODES, {"ns/web": "a"}, NOW))["later"]
    assert d.status["phase"] == "Pending" and d.status["reason"] == "WaitingForDuplicate"
    assert d.status["duplicateOf"] == owner["spec"]["jobId"]


def test_a_started_job_keeps_its_key_over_an_older_unseen_one() -> None:
    started = obj(_snap(), "started", {"phase": "Scheduled", "assignedNode": "a"})
    unseen = _raw(_snap(), "unseen", NOW - timedelta(minutes=5))
    d = by_name(dispatch([unseen, started], NODES, {"ns/web": "a"}, NOW))["unseen"]
    assert d.status["duplicateOf"] == started["spec"]["jobId"]


def test_of_two_new_jobs_with_one_key_the_first_created_runs() -> None:
    first = _raw(_snap(), "first", NOW - timedelta(seconds=2),
                 {"submittedAt": "2030-06-01T00:00:00Z"})
    second = _raw(_snap(), "second", NOW, {"submittedAt": "2029-01-01T00:00:00Z"})
    ds = by_name(dispatch([second, first], NODES, {"ns/web": "a"}, NOW))
    assert ds["first"].status["phase"] == "Scheduled"
    assert ds["second"].status["reason"] == "WaitingForDuplicate"


# --------------------------------------------------------------------------- jobId reuse


def _copies(*where: tuple[str, str, datetime]) -> list[dict[str, Any]]:
    """One manifest (hence one spec.jobId) applied under several namespaces/names."""
    base = to_manifest(JobBuilder("system.health-check").build(now=NOW), namespace="ns")
    out = []
    for ns, name, created in where:
        m = copy.deepcopy(base)
        m["metadata"].update(namespace=ns, name=name, resourceVersion="1",
                             uid=str(uuid.uuid4()), generation=1,
                             creationTimestamp=created.isoformat())
        out.append(m)
    return out


def _apply(bodies: list[dict[str, Any]], decisions: list[Any]) -> None:
    for d in decisions:
        body = next(b for b in bodies if (b["metadata"]["namespace"], b["metadata"]["name"])
                    == (d.namespace, d.name))
        body["status"] = {k: v for k, v in d.status.items() if v is not None}
        body["metadata"]["resourceVersion"] = str(int(body["metadata"]["resourceVersion"]) + 1)


def test_one_job_id_in_two_namespaces_is_two_jobs() -> None:
    jobs = _copies(("team-a", "hc", NOW), ("team-b", "hc", NOW))
    ds = dispatch(jobs, NODES, {}, NOW)
    assert sorted((d.namespace, d.status["phase"]) for d in ds) == \
        [("team-a", "Scheduled"), ("team-b", "Scheduled")]


def test_a_reused_job_id_in_one_namespace_is_refused_naming_it() -> None:
    jobs = _copies(("ns", "first", NOW - timedelta(seconds=5)), ("ns", "again", NOW))
    job_id = jobs[0]["spec"]["jobId"]
    for _ in range(3):  # stable: the refused one never takes the jobId back
        ds = dispatch(jobs, NODES, {}, NOW)
        _apply(jobs, ds)
    first, again = (j["status"] for j in jobs)
    assert first["phase"] == "Scheduled"
    assert again["phase"] == "Failed" and again["reason"] == "DuplicateJobId"
    assert f"spec.jobId {job_id}" in again["lastError"] and "ns/first" in again["lastError"]


# --------------------------------------------------------------------------- refused up front

MIGRATABLE = [WorkerView("a", "default", frozenset({"migration"}), True),
              WorkerView("b", "default", frozenset({"migration"}), True),
              WorkerView("c", "default", frozenset({"snapshot"}), True)]


def vm_body(live: bool) -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "ns"},
            "spec": {"cpus": 1, "memory": "1Gi", "liveMigration": live}}


@pytest.mark.parametrize(("live", "dest", "reason", "says"), [
    (False, "b", "NotMigratable", "spec.liveMigration false"),
    (True, "a", "InvalidDestination", "runs on already"),
    (True, "zz", "InvalidDestination", "not a registered WorkerNode; known: a, b, c"),
    (True, "c", "InvalidDestination", "does not offer the 'migration' capability"),
])
def test_a_migration_that_cannot_succeed_fails_before_it_is_routed(
        live: bool, dest: str, reason: str, says: str) -> None:
    job = obj(JobBuilder("vm.migrate").payload(destination_node=dest).target("web", "ns"), "m")
    d = by_name(dispatch([job], MIGRATABLE, {"ns/web": "a"}, NOW,
                         {"ns/web": vm_body(live)}))["m"]
    assert d.status["phase"] == "Failed" and d.status["reason"] == reason
    assert says in d.status["lastError"] and "assignedNode" not in d.status
    assert d.event is not None and d.event[:2] == ("Warning", "Failed") and f"({reason})" in d.event[2]


def test_a_migratable_vm_is_routed_to_its_host() -> None:
    job = obj(JobBuilder("vm.migrate").payload(destination_node="b").target("web", "ns"), "m")
    d = by_name(dispatch([job], MIGRATABLE, {"ns/web": "a"}, NOW,
                         {"ns/web": vm_body(True)}))["m"]
    assert d.status["phase"] == "Scheduled" and d.status["assignedNode"] == "a"
