"""End-to-end rates on the real API server: VM binding and VmJob throughput.

1. Bind rate: N VMs applied at once onto M WorkerNodes (heartbeats written by this
   script, no agents, so only the controller's placement + binding is measured).
2. Job throughput: J queued `system.health-check` VmJobs across A real agent processes.

Prints figures; asserts nothing. Usage: python bench/cluster_bench.py [--vms 1000 ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cpu_seconds
from hyperfleet.reconcilers.jobs.builder import JobBuilder, to_manifest
from hyperfleet.reconcilers.kube import JOBS, NODES, VMS, Kube, load_config
from hyperfleet.reconcilers.models.node import Provider
from hyperfleet.reconcilers.nodes import heartbeat_status
from hyperfleet.reconcilers.testing.devstack import (
    ApiServer,
    agent_cmd,
    ch_double_cmd,
    hyperfleet_cmd,
    install_crds,
    kill_pidfiles,
    kubectl,
    launch,
    stop_process,
)


def start(work: Path, api: ApiServer, name: str, *args: str) -> subprocess.Popen[bytes]:
    return launch(hyperfleet_cmd(*args), work / f"{name}.log", api.kubeconfig)


def fake_nodes(kube: Kube, count: int, stop: threading.Event) -> None:
    """WorkerNodes that heartbeat without agents (bind benchmark only)."""
    ch = Provider(name="cloud-hypervisor", available=True, version="53.0",
                  capabilities=["provision"])
    for i in range(count):
        kube.create(NODES, {"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "WorkerNode",
                            "metadata": {"name": f"fake-{i}"}, "spec": {"pool": "default"}})
    while not stop.is_set():
        for i in range(count):
            st = heartbeat_status(64, 256 << 30, [ch], ["provision"], "bench")
            kube.patch(NODES, f"fake-{i}", {"status": st}, status=True)
        stop.wait(5)  # the agents' default heartbeat interval


def print_cpu(label: str, procs: dict[str, int]) -> None:
    parts = ", ".join(f"{k} {cpu_seconds(p):.0f}s" for k, p in procs.items())
    print(f"      CPU during {label}: {parts}")


def wait_all(kube: Kube, res: Any, ns: str, done: Any, total: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        items = kube.list(res, ns)
        if sum(1 for i in items if done(i)) >= total:
            return time.monotonic() - t0
        time.sleep(0.25)
    return float("nan")


def control_plane(api: ApiServer) -> dict[str, int]:
    return {"apiserver": api.procs[1].pid, "etcd": api.procs[0].pid}


def bind_rate(api: ApiServer, kube: Kube, work: Path, vms: int, nodes: int) -> None:
    stop = threading.Event()
    t = threading.Thread(target=fake_nodes, args=(kube, nodes, stop), daemon=True)
    t.start()
    ctl = start(work, api, "controller-bind", "controller")
    try:
        time.sleep(3)
        kubectl(api.kubeconfig, "create", "namespace", "bind")
        manifest = "".join(
            "---\napiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachine\n"
            f"metadata: {{name: v{i}, namespace: bind}}\n"
            "spec: {cpus: 1, memory: 512Mi, boot: {kernel: /k}}\n" for i in range(vms))
        t0 = time.monotonic()
        kubectl(api.kubeconfig, "apply", "-f", "-", input_=manifest)
        applied = time.monotonic() - t0
        took = wait_all(kube, VMS, "bind", lambda i: (i.get("status") or {}).get("nodeName"),
                        vms, 600)
        total = applied + took
        print(f"bind: {vms} VMs on {nodes} nodes: kubectl apply took {applied:.1f}s; all bound "
              f"{total:.1f}s after it started ({took:.1f}s after it returned) -> "
              f"{vms / total:.0f} VMs/s end to end, limited by object creation")
        print_cpu("bind", {"controller": ctl.pid, **control_plane(api)})
    finally:
        stop_process(ctl)
        stop.set()
        t.join(5)
        # The VMs go first: otherwise the next phase's controller would find them bound to
        # vanished nodes and (rightly) place them on the job benchmark's agents.
        kubectl(api.kubeconfig, "delete", "namespace", "bind", "--wait=false", check=False)
        for vm in kube.list(VMS, "bind"):
            kube.delete(VMS, vm["metadata"]["name"], "bind")
        for i in range(nodes):
            kube.delete(NODES, f"fake-{i}")


def job_throughput(api: ApiServer, kube: Kube, work: Path, jobs: int, agents: int) -> None:
    procs = [start(work, api, "controller-jobs", "controller")]
    try:
        for i in range(agents):
            procs.append(launch(agent_cmd(f"ag-{i}", work / f"ag-{i}", ch_double_cmd(),
                                          "--heartbeat", "3"),
                                work / f"agent-{i}.log", api.kubeconfig))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready = [n for n in kube.list(NODES) if n["metadata"]["name"].startswith("ag-")
                     and (n.get("status") or {}).get("phase") == "Ready"]
            if len(ready) == agents:
                break
            time.sleep(0.5)
        kubectl(api.kubeconfig, "create", "namespace", "jobs")
        now = datetime.now(UTC)
        t0 = time.monotonic()
        for i in range(jobs):
            job = JobBuilder("system.health-check").payload(checks=["socket-dir"]).build(now=now)
            kube.create(JOBS, to_manifest(job, name=f"hc-{i}", namespace="jobs"))
        created = time.monotonic() - t0
        took = wait_all(kube, JOBS, "jobs",
                        lambda i: (i.get("status") or {}).get("phase") == "Succeeded",
                        jobs, 900)
        total = created + took
        print(f"jobs: {jobs} system.health-check on {agents} agents: created in {created:.1f}s,"
              f" all Succeeded {total:.1f}s after the first -> {jobs / total:.1f} jobs/s")
        per_node: dict[str, int] = {}
        for item in kube.list(JOBS, "jobs"):
            node = (item.get("status") or {}).get("assignedNode", "?")
            per_node[node] = per_node.get(node, 0) + 1
        print(f"      spread over nodes: {dict(sorted(per_node.items()))}")
        agents_cpu = sum(cpu_seconds(p.pid) for p in procs[1:])
        print_cpu("jobs (cumulative for the API server)",
                  {"controller": procs[0].pid, **control_plane(api)})
        print(f"      CPU of the {agents} agents together: {agents_cpu:.0f}s")
    finally:
        for p in procs:
            stop_process(p)
        kill_pidfiles(work, "ag-*/*.pid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hf-bench-", dir="/tmp"))
    api = ApiServer(work / "api").start()
    try:
        install_crds(api.kubeconfig)
        load_config(str(api.kubeconfig))
        kube = Kube()
        bind_rate(api, kube, work, args.vms, args.nodes)
        job_throughput(api, kube, work, args.jobs, args.agents)
    finally:
        api.stop()
    print(f"logs in {work}")


if __name__ == "__main__":
    main()
