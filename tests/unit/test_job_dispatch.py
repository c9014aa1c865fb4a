"""Controller-side VmJob dispatch: pure decisions from objects, nodes and VM hosts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hyperfleet.reconcilers.jobs.dispatch import dispatch, parse
from hyperfleet.reconcilers.jobs.engine import WorkerView
from hyperfleet.reconcilers.jobs.protocol import JobBuilder, to_manifest

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
    assert "assignedNode" not in ds["lost"].status


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
