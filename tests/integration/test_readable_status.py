"""What users read (issue #14), as the real kubectl prints it from the real API server:
READY and SCHEDULING columns, Ready of a VM stopped on purpose, memory quantities."""

from __future__ import annotations

import json
import re
from typing import Any

from tests import PLACEHOLDER_KERNEL

from .conftest import Cluster, wait_for


def _vm(name: str, memory: str = "512Mi", **spec: Any) -> str:
    return json.dumps({
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"cpus": 1, "memory": memory, "boot": {"kernel": PLACEHOLDER_KERNEL}, **spec},
    })


def _row(c: Cluster, *args: str, namespaced: bool = True) -> dict[str, str]:
    """kubectl's table as header -> cell, cut at the headers' offsets (a cell may be empty)."""
    lines = c.kubectl("get", *args, namespaced=namespaced, check=False).stdout.splitlines()
    if len(lines) < 2:
        return {}  # not there yet
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    ends = [*starts[1:], None]
    return {lines[0][a:b].strip(): lines[1][a:b].strip() for a, b in zip(starts, ends, strict=True)}


def _ready(c: Cluster, name: str) -> dict[str, Any]:
    conds = ((c.get("hvm", name) or {}).get("status") or {}).get("conditions") or []
    return next((x for x in conds if x["type"] == "Ready"), {})


def test_ready_and_scheduling_columns(cluster: Cluster) -> None:
    c = cluster
    node = c.node("a")
    c.start_controller()
    c.start_agent(node)
    wait_for(lambda: _row(c, "wn", node, namespaced=False).get("SCHEDULING") == "Enabled",
             60, "SCHEDULING Enabled", c)

    assert c.apply(_vm("web", memory="1.5Gi")).returncode == 0
    wait_for(lambda: _row(c, "hvm", "web").get("READY") == "True", 60, "READY True", c)
    row = _row(c, "hvm", "web")
    assert (row["PHASE"], row["NODE"], row["MEMORY"]) == ("Running", node, "1.5Gi")
    info = (c.get("hvm", "web") or {})["status"]
    assert info["conditions"] and _ready(c, "web")["reason"] == "Running"

    # Stopped as asked: not Ready, and it says so; the node counts 1.5Gi for it.
    c.kubectl("patch", "hvm", "web", "--type=merge", "-p", '{"spec":{"powerState":"Stopped"}}')
    wait_for(lambda: _row(c, "hvm", "web").get("PHASE") == "Stopped", 60, "Stopped", c)
    wait_for(lambda: _ready(c, "web").get("reason") == "Stopped", 30, "Ready reason", c)
    assert _row(c, "hvm", "web")["READY"] == "False"
    assert _ready(c, "web")["message"] == "stopped as requested (powerState: Stopped)"
    assert _row(c, "wn", node, namespaced=False)["STATUS"] == "Ready"

    c.kubectl("patch", "wn", node, "--type=merge", "-p", '{"spec":{"unschedulable":true}}',
              namespaced=False)
    wait_for(lambda: _row(c, "wn", node, namespaced=False).get("SCHEDULING") == "Cordoned",
             30, "SCHEDULING Cordoned", c)
    c.kubectl("patch", "wn", node, "--type=merge", "-p", '{"spec":{"drain":true}}',
              namespaced=False)
    wait_for(lambda: _row(c, "wn", node, namespaced=False).get("SCHEDULING") == "Draining",
             30, "SCHEDULING Draining", c)
    c.kubectl("patch", "wn", node, "--type=merge", "-p",
              '{"spec":{"drain":false,"unschedulable":false}}', namespaced=False)
    wait_for(lambda: _row(c, "wn", node, namespaced=False).get("SCHEDULING") == "Enabled",
             30, "SCHEDULING Enabled again", c)


def test_memory_quantities_follow_kubernetes_rules(cluster: Cluster) -> None:
    """The API server takes what Kubernetes calls a quantity, and refuses zero (the CRD's
    CEL rule) and what is no quantity (its pattern), naming the field."""
    c = cluster
    for name, memory in (("half", "0.5Gi"), ("dec", "1.5G"), ("exp", "1e9")):
        r = c.apply(_vm(name, memory=memory))
        assert r.returncode == 0, r.stderr
    for memory, words in (("0.0Gi", "must be above zero"),
                          ("0", "must be above zero"),
                          ("1.5GB", "spec.memory"), ("1e3Mi", "spec.memory")):
        r = c.apply(_vm("bad", memory=memory))
        assert r.returncode != 0 and words in r.stderr, (memory, r.stderr)
        assert "spec.memory" in r.stderr
