"""Which watch events wake a VM's loop: only those that change what a pass decides on."""

from __future__ import annotations

import copy
from typing import Any

from hyperfleet.operator.agent import _same_inputs


def vm() -> dict[str, Any]:
    return {"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": "a", "namespace": "n", "generation": 1,
                         "resourceVersion": "10", "managedFields": [{"manager": "x"}],
                         "labels": {"app": "web"}},
            "spec": {"cpus": 1}, "status": {"nodeName": "n1", "phase": "Scheduled"}}


def test_the_agent_finalizer_and_write_bookkeeping_are_nothing_new() -> None:
    a, b = vm(), vm()
    b["metadata"].update(resourceVersion="11", finalizers=["hyperfleet.dev/agent"],
                         managedFields=[{"manager": "hyperfleet-agent"}])
    assert _same_inputs(a, b)


def test_spec_status_and_other_metadata_are_news() -> None:
    base = vm()
    for path, value in [(("spec", "cpus"), 2), (("status", "nodeName"), "n2"),
                        (("status", "evictFrom"), "n1"), (("metadata", "generation"), 2),
                        (("metadata", "deletionTimestamp"), "2026-01-01T00:00:00Z"),
                        (("metadata", "annotations"), {"hyperfleet.dev/restart": "1"}),
                        (("metadata", "labels"), {"app": "db"})]:
        b = copy.deepcopy(base)
        b[path[0]][path[1]] = value
        assert not _same_inputs(base, b), path


def test_a_missing_status_differs_from_a_present_one() -> None:
    a, b = vm(), vm()
    del b["status"]
    assert not _same_inputs(a, b)
