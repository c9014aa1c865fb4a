"""VmJob outcome Events on the real API server: one per finished job, a sentence.

The agent (success, handler failure) or the controller (timeout, cancel) posts the Event
after the resourceVersion-conditional write that made the job final; later controller
passes and agent resyncs over the finished job must not post a second one."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import yaml

from hyperfleet.reconcilers.jobs.builder import JobBuilder, to_manifest
from hyperfleet.reconcilers.text import repr_fragments

from .conftest import Cluster, wait_for

VM = """
apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: web}}
spec:
  cpus: 1
  memory: 256Mi
  boot: {{kernel: {kernel}}}
"""

OUTCOMES = ("Succeeded", "Failed", "TimedOut", "Cancelled")


def _submit(c: Cluster, builder: JobBuilder, name: str) -> None:
    manifest = to_manifest(builder.build(now=datetime.now(UTC)), name=name, namespace=c.namespace)
    r = c.apply(yaml.safe_dump(manifest))
    assert r.returncode == 0, r.stderr


def _phase(c: Cluster, name: str) -> str | None:
    body = c.get("vmjob", name) or {}
    phase = (body.get("status") or {}).get("phase")
    return str(phase) if phase else None


def _job_events(c: Cluster) -> list[dict[str, Any]]:
    out = c.kubectl("get", "events", "--field-selector", "involvedObject.kind=VmJob",
                    "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def _outcomes(c: Cluster, job: str) -> list[tuple[str, str, str]]:
    return [(e["type"], e["reason"], e["message"]) for e in _job_events(c)
            if e["involvedObject"]["name"] == job and e["reason"] in OUTCOMES]


def test_a_finished_job_has_exactly_one_outcome_event(cluster: Cluster) -> None:
    c = cluster
    kernel = c.workdir / "vmlinux"
    kernel.write_bytes(b"the double opens no kernel")
    c.start_controller()
    node = c.node("a")
    c.start_agent(node)
    wait_for(lambda: ((c.get("wn", node, namespaced=False) or {}).get("status") or {})
             .get("phase") == "Ready", 60, "node Ready", c)
    assert c.apply(VM.format(kernel=kernel)).returncode == 0
    wait_for(lambda: ((c.get("hvm", "web") or {}).get("status") or {}).get("phase") == "Running",
             60, "web Running", c)

    _submit(c, JobBuilder("vm.reboot").target("web"), "reboot")
    blocker = c.workdir / "not-a-dir"
    blocker.write_text("a file where the snapshot directory should go")
    _submit(c, JobBuilder("vm.snapshot").payload(destination=str(blocker / "snap"))
            .target("web").max_attempts(1), "snap")
    wait_for(lambda: all(_phase(c, j) in OUTCOMES for j in ("reboot", "snap")), 60,
             "both jobs finished", c)
    assert _phase(c, "reboot") == "Succeeded" and _phase(c, "snap") == "Failed"
    wait_for(lambda: _outcomes(c, "reboot") and _outcomes(c, "snap"), 30, "outcome Events", c)
    time.sleep(3)  # several controller passes and agent resyncs over the finished jobs

    ((type_, reason, message),) = _outcomes(c, "reboot")
    assert (type_, reason) == ("Normal", "Succeeded")
    assert message.startswith(f"vm.reboot succeeded on {node}"), message
    ((type_, reason, message),) = _outcomes(c, "snap")
    assert (type_, reason) == ("Warning", "Failed")
    assert message.startswith(f"vm.snapshot failed on {node}") and "not-a-dir" in message, message
    for e in _job_events(c):
        assert e["message"].strip() and not repr_fragments(e["message"]), e["message"]
        assert e["involvedObject"]["namespace"] == c.namespace
