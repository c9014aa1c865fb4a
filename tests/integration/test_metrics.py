"""The controller's and an agent's /metrics and /healthz over HTTP, as Prometheus and the
kubelet see them, while a VM comes and goes (CH double)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests import PLACEHOLDER_KERNEL

from .conftest import Cluster, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

VM = f"""
apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: metered}}
spec:
  cpus: 2
  memory: 512Mi
  boot: {{kernel: {PLACEHOLDER_KERNEL}, cmdline: console=ttyS0}}
  disks: [{{name: root, path: /tmp/hf-images/metered.raw}}]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""  # not listening (yet)


def scrape(port: int) -> Samples:
    status, text = _get(port, "/metrics")
    if status != 200:
        return {}
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def series(samples: Samples, metric: str, **labels: str) -> list[float]:
    want = set(labels.items())
    return [v for (n, lbl), v in samples.items() if n == metric and want <= lbl]


def test_controller_and_agent_metrics_over_http(cluster: Cluster) -> None:
    node = cluster.node("m")
    ns = cluster.namespace
    ctl_metrics, ctl_health, agent_metrics, agent_health = (_free_port() for _ in range(4))
    cluster.start("controller", "controller", "--node-grace", "6",
                  "--git-cache-dir", str(cluster.workdir / "git-cache"),
                  "--metrics-port", str(ctl_metrics), "--metrics-address", "127.0.0.1",
                  "--health-port", str(ctl_health), "--health-address", "127.0.0.1")
    # The agent's address is left to its default: loopback (it runs on the host network).
    cluster.start_agent(node, extra=["--metrics-port", str(agent_metrics),
                                     "--health-port", str(agent_health)])
    wait_for(lambda: series(scrape(ctl_metrics), "hyperfleet_node_ready", node=node) == [1.0],
             60, "hyperfleet_node_ready 1 for the node", cluster)
    wait_for(lambda: [_get(p, "/healthz")[0] for p in (ctl_health, agent_health)] == [200, 200],
             30, "kopf's /healthz on both", cluster)

    ctl, agent = scrape(ctl_metrics), wait_for(lambda: scrape(agent_metrics), 30, "agent /metrics")
    assert series(ctl, "hyperfleet_controller_active") == [1.0]
    assert series(ctl, "hyperfleet_node_heartbeat_timestamp_seconds", node=node)
    agent_names = {n for n, _ in agent}
    assert "process_cpu_seconds_total" in agent_names
    assert not {"hyperfleet_vms", "hyperfleet_controller_active", "hyperfleet_node_ready",
                "hyperfleet_scheduler_queue_depth"} & agent_names, "controller series on an agent"
    assert not {n for n, _ in ctl if n.startswith("hyperfleet_vm_")}, "agent series on the controller"

    r = cluster.apply(VM)
    assert r.returncode == 0, r.stderr
    mine = {"namespace": ns, "name": "metered", "node": node}
    wait_for(lambda: series(scrape(agent_metrics), "hyperfleet_vm_info", phase="Running", **mine),
             60, "hyperfleet_vm_info phase Running", cluster)
    agent = scrape(agent_metrics)
    assert series(agent, "hyperfleet_vm_vcpus", **mine) == [2.0]
    assert series(agent, "hyperfleet_vm_memory_bytes", **mine) == [float(512 << 20)]
    assert series(agent, "hyperfleet_vm_restarts_total", **mine) == [0.0]
    (booted,) = series(agent, "hyperfleet_vm_boot_time_seconds", **mine)
    assert booted > 1.7e9
    assert len(series(agent, "hyperfleet_vm_info", **mine)) == 1  # one phase at a time
    assert series(agent, "hyperfleet_reconciles_total", kind="vm")
    ctl = scrape(ctl_metrics)
    assert series(ctl, "hyperfleet_node_vms", node=node) == [1.0]
    assert series(ctl, "hyperfleet_vms", phase="Running")[0] >= 1
    assert series(ctl, "hyperfleet_bindings_total", result="bound")[0] >= 1

    cluster.kubectl("delete", "hvm", "metered", "--timeout=30s")
    wait_for(lambda: not [lbl for _, lbl in scrape(agent_metrics) if ("name", "metered") in lbl],
             30, "the deleted VM's series gone from the agent", cluster)
    wait_for(lambda: series(scrape(ctl_metrics), "hyperfleet_node_vms", node=node) == [0.0],
             30, "hyperfleet_node_vms back to 0", cluster)
