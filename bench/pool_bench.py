"""VirtualMachinePool rolling update: N members on K agents driving the fast stand-in VMM
(bench/fastvmm), then a template change rolled through all of them.

Prints: kubectl apply -> N members Running; template change -> every member replaced,
Running and available; the most members unavailable at once and the most members at once
(sampled from a watch stream every 20 ms), against maxUnavailable and replicas + maxSurge;
controller CPU during the roll. Stops by itself (--timeout bounds each phase).

Usage: python bench/pool_bench.py [--vms 100] [--agents 4] [--max-unavailable 10%]
                                  [--max-surge 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cpu_seconds, discard, print_figures
from bench.fastvmm import fastvmm_binary
from bench.gitops_bench import KERNEL, NS, Bench, wait
from hyperfleet.reconcilers.models.pool import POOL_LABEL, resolve_int_or_percent
from hyperfleet.reconcilers.testing.devstack import agent_cmd, hyperfleet_cmd, kubectl

POOL = "web"


def pool_yaml(replicas: int, cpus: int, max_unavailable: str, max_surge: str) -> str:
    return (
        "apiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachinePool\n"
        f"metadata: {{name: {POOL}, namespace: {NS}}}\n"
        f"spec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {POOL}}}}}\n"
        f"  strategy: {{rollingUpdate: {{maxUnavailable: {_yaml(max_unavailable)}, "
        f"maxSurge: {_yaml(max_surge)}}}}}\n"
        f"  template:\n    metadata: {{labels: {{app: {POOL}}}}}\n"
        f"    spec: {{cpus: {cpus}, memory: 64Mi, boot: {{kernel: {KERNEL}}}}}\n")


def _int_or_pct(text: str) -> int | str:
    return text if text.endswith("%") else int(text)


def _yaml(text: str) -> str:
    """A count as a YAML number, a percentage as a string (as the CRD wants them)."""
    return f'"{text}"' if text.endswith("%") else str(int(text))


def _available(o: dict[str, Any]) -> bool:
    st = o.get("status") or {}
    return (not o["metadata"].get("deletionTimestamp") and st.get("phase") == "Running"
            and any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in st.get("conditions") or []))


class Sampler:
    """Samples the members (from the bench's VM watch) while a roll runs."""

    def __init__(self, b: Bench, replicas: int) -> None:
        self.b, self.replicas = b, replicas
        self.worst_unavailable = 0
        self.most = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def members(self) -> list[dict[str, Any]]:
        assert self.b.vms is not None
        with self.b.vms.lock:
            return [o for o in self.b.vms.objects.values()
                    if (o["metadata"].get("labels") or {}).get(POOL_LABEL) == POOL]

    def _run(self) -> None:
        while not self.stop.is_set():
            ms = self.members()
            self.worst_unavailable = max(self.worst_unavailable,
                                         self.replicas - sum(_available(o) for o in ms))
            self.most = max(self.most, len(ms))
            self.samples += 1
            time.sleep(0.02)

    def done(self, cpus: int) -> bool:
        ms = self.members()
        return len(ms) == self.replicas and all(
            _available(o) and o["spec"]["cpus"] == cpus for o in ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--max-unavailable", default="10%")
    ap.add_argument("--max-surge", default="0")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per phase")
    args = ap.parse_args()
    n, k = args.vms, args.agents
    binary = fastvmm_binary()
    work = Path(tempfile.mkdtemp(prefix="hf-bench-pool-", dir="/tmp"))
    b = Bench(work)
    figures: list[tuple[str, str]] = []
    try:
        b.up()
        b.start("controller", hyperfleet_cmd("controller", "--no-gitops"))
        for i in range(k):
            b.start(f"agent-{i}", agent_cmd(
                f"node-{i}", work / f"node-{i}", binary,
                "--cpus", str(max(32, 4 * -(-n // k))), "--memory", "1Ti", "--heartbeat", "3"))
        wait(lambda: kubectl(b.kc, "get", "wn", "-o",
                             "jsonpath={.items[*].status.phase}").stdout.split().count("Ready")
             >= k, 120, f"{k} WorkerNodes Ready", every=0.5)
        sampler = Sampler(b, n)
        t0 = time.time()
        kubectl(b.kc, "apply", "-f", "-",
                input_=pool_yaml(n, 1, args.max_unavailable, args.max_surge))
        wait(lambda: sampler.done(1), args.timeout, f"{n} members Running", every=0.1)
        figures.append((f"kubectl apply of a {n}-member pool -> all Running on {k} agents",
                        f"{time.time() - t0:.1f} s"))
        controller = b.procs["controller"].pid
        cpu0 = cpu_seconds(controller)
        sampler.thread.start()
        t1 = time.time()
        kubectl(b.kc, "apply", "-f", "-",
                input_=pool_yaml(n, 2, args.max_unavailable, args.max_surge))
        wait(lambda: sampler.done(2), args.timeout, "every member rolled", every=0.1)
        took = time.time() - t1
        sampler.stop.set()
        sampler.thread.join()
        cpu = cpu_seconds(controller) - cpu0
        max_u = resolve_int_or_percent(_int_or_pct(args.max_unavailable), n, round_up=False)
        max_s = resolve_int_or_percent(_int_or_pct(args.max_surge), n, round_up=True)
        figures += [
            (f"template change -> {n} members replaced, Running and available",
             f"{took:.1f} s ({took / n * 1e3:.0f} ms per member)"),
            (f"most members unavailable at once (maxUnavailable {args.max_unavailable} = "
             f"{max_u})", str(sampler.worst_unavailable)),
            (f"most members at once (replicas + maxSurge = {n + max_s})", str(sampler.most)),
            ("samples taken during the roll", str(sampler.samples)),
            ("controller CPU during the roll", f"{cpu:.1f} s = {cpu / n * 1e3:.0f} ms per "
             "member replaced"),
        ]
    finally:
        b.down()
        discard(work)
    print_figures(f"Pool benchmark ({os.cpu_count()} cores, real API server + etcd on loopback)",
                  figures)


if __name__ == "__main__":
    main()
