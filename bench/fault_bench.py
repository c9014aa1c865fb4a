"""Randomized fault rounds over a VM fleet (issue 11): convergence time, duplicates, lost.

Runs the real stack (API server, controller, one agent per node, the CH double) and the
seeded fault harness of tests/faults.py: controller, agent and VMM kills and agent
freezes. Prints rounds, per-fault-kind counts, convergence p50/p95/max, duplicates, lost
VMs and wall time; asserts nothing (tests/integration/test_faults.py asserts).
Target: 0 duplicates, 0 lost, p95 < 15 s.
Usage: python bench/fault_bench.py [--seed 11] [--rounds 12] [--vms 30] [--nodes 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hyperfleet.reconcilers.testing.devstack import (
    ApiServer,
    agent_cmd,
    ch_double_cmd,
    hyperfleet_cmd,
    install_crds,
    kubectl,
    launch,
    stop_processes,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the harness is in tests/
from bench import discard
from tests.faults import FaultRun, Fleet, kill_strays

NAMESPACE = "faults"


class Stack:
    """The Hyperfleet processes of one bench run, each launched against ``api``."""

    def __init__(self, api: ApiServer, work: Path, eviction_timeout: float,
                 fence_after: float, cpus: int) -> None:
        self.api = api
        self.work = work
        self.eviction_timeout = eviction_timeout
        self.fence_after = fence_after
        self.cpus = cpus
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start_controller(self) -> None:
        self.procs["controller"] = launch(
            hyperfleet_cmd("controller", "--node-grace", "6", "--eviction-timeout",
                           str(self.eviction_timeout),
                           "--git-cache-dir", str(self.work / "git-cache")),
            self.work / "controller.log", self.api.kubeconfig)

    def start_agent(self, node: str) -> None:
        self.procs[f"agent-{node}"] = launch(
            agent_cmd(node, self.work / node, ch_double_cmd(), "--fence-after", str(self.fence_after),
                      "--cpus", str(self.cpus), "--memory", "64Gi", "--heartbeat", "1"),
            self.work / f"agent-{node}.log", self.api.kubeconfig)

    def stop(self) -> None:
        stop_processes(list(self.procs.values()))
        self.procs.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--vms", type=int, default=30)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--eviction-timeout", type=float, default=8.0)
    ap.add_argument("--fence-after", type=float, default=4.0)
    ap.add_argument("--converge-timeout", type=float, default=120.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hf-bench-", dir="/tmp"))
    api = ApiServer(work / "api")
    # Enough CPUs on every node for the whole fleet on all but one (a lost node's VMs move).
    per_node = -(-args.vms // max(1, args.nodes - 1)) + 2
    stack = Stack(api, work, args.eviction_timeout, args.fence_after, per_node)
    nodes = [f"n{i}" for i in range(args.nodes)]
    t0 = time.monotonic()
    try:
        api.start()
        install_crds(api.kubeconfig)
        kubectl(api.kubeconfig, "create", "namespace", NAMESPACE)
        fleet = Fleet(api.kubeconfig, NAMESPACE, work, nodes, stack.procs,
                      stack.start_controller, stack.start_agent, args.eviction_timeout)
        run = FaultRun(fleet, args.seed, vms=args.vms, converge_timeout=args.converge_timeout,
                       log=lambda line: print(f"  {line}", flush=True))
        try:
            report = run.run(args.rounds)
        finally:
            kubectl(api.kubeconfig, "-n", NAMESPACE, "delete", "hvm", "--all", "--timeout=60s",
                    check=False)
        print(f"\nfault rounds, {args.vms} VMs on {args.nodes} nodes (CH double), eviction "
              f"timeout {args.eviction_timeout:g}s, --fence-after {args.fence_after:g}s")
        print(report.summary())
        print(f"total wall time {time.monotonic() - t0:.1f}s (with API server start-up)")
    finally:
        stack.stop()
        api.stop()
        kill_strays(work)  # VMMs and fencing watchdogs: they outlive their agents
        discard(work)


if __name__ == "__main__":
    main()
