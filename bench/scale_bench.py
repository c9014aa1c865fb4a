"""Operator efficiency at scale: one git push of N VMs onto K agents driving the fast
stand-in VMM (bench/fastvmm), so the figures are the operator's, not the VMM double's.

Prints, for one run: push -> all Running; operator CPU (controller, GitSource controller,
agents; the VMMs excluded) in ms per VM started; idle CPU per VM once converged; RSS of
each process; node heartbeat lapses (NotReady transitions). Asserts nothing.

Usage: python bench/scale_bench.py [--vms 1000] [--agents 10] [--idle 10] [--profile DIR]

``--profile DIR``: py-spy samples each operator process while the VMs start (only threads
holding the GIL, so waiting is not counted) and writes one collapsed-stack file per
process to DIR (``bench/profile_summary.py DIR`` sums them by where the time goes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cpu_seconds, discard, print_figures, rss_mib
from bench.fastvmm import fastvmm_binary
from bench.gitops_bench import NS, SECRET_ENV, Bench, vm, wait
from hyperfleet.reconcilers.testing.devstack import agent_cmd, hyperfleet_cmd, kubectl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle measurement")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--gitops-in-controller", action="store_true",
                    help="GitOps inside the controller process (as the chart runs it) instead "
                         "of a process of its own")
    ap.add_argument("--profile", type=Path, default=None,
                    help="py-spy each operator process while the VMs start; stacks to DIR")
    args = ap.parse_args()
    n, k = args.vms, args.agents
    binary = fastvmm_binary()
    work = Path(tempfile.mkdtemp(prefix="hf-bench-scale-", dir="/tmp"))
    b = Bench(work)
    figures: list[tuple[str, str]] = []
    try:
        b.up(gitops=not args.gitops_in_controller)
        if args.gitops_in_controller:  # as the chart runs it: one process, one VM watch
            b.start("controller", hyperfleet_cmd("controller", *b.gitops_args("--git-cache-dir")), SECRET_ENV)
            b.wait_receiver()
        else:
            b.start("controller", hyperfleet_cmd("controller", "--no-gitops"))
        for i in range(k):
            b.start(f"agent-{i}", agent_cmd(
                f"node-{i}", work / f"node-{i}", binary,
                "--cpus", str(max(32, 2 * -(-n // k))), "--memory", "1Ti", "--heartbeat", "3"))
        wait(lambda: kubectl(b.kc, "get", "wn", "-o",
                             "jsonpath={.items[*].status.phase}").stdout.split().count("Ready")
             >= k, 120, f"{k} WorkerNodes Ready", every=0.5)
        b.follow_empty_fleet()
        b.repo.set_fleet({f"vm-{i:04d}.yaml": vm(i) for i in range(n)})
        sha = b.repo.commit(f"{n} VMs")
        pids = {name: p.pid for name, p in b.procs.items()}
        server = [p.pid for p in b.api.procs]  # etcd and the API server: the comparator
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        server0 = sum(cpu_seconds(pid) for pid in server)
        assert b.vms is not None
        writes0 = b.vms.writes
        spies = profile(args.profile, pids) if args.profile else []
        t0 = b.push_and_notify(sha)
        wait(lambda: b.vms is not None and b.vms.count("Running") >= n, args.timeout,
             f"{n} VMs Running", every=0.1)
        took = time.time() - t0
        for spy in spies:  # py-spy writes its file on SIGINT
            spy.send_signal(2)
        for spy in spies:
            spy.wait(timeout=60)
        writes = b.vms.writes - writes0
        events = len(kubectl(b.kc, "-n", NS, "get", "events", "-o", "name").stdout.split())
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        server1 = sum(cpu_seconds(pid) for pid in server)
        time.sleep(args.idle)
        cpu2 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        server2 = sum(cpu_seconds(pid) for pid in server)
        used = {name: cpu1[name] - cpu0[name] for name in pids}
        idle = {name: cpu2[name] - cpu1[name] for name in pids}
        agents = [name for name in pids if name.startswith("agent-")]
        total = sum(used.values())
        figures += [
            (f"push of {n} VMs -> all Running on {k} agents (fastvmm)", f"{took:.1f} s"),
            ("API writes per VM started: VM object / Events",
             f"{writes / n:.1f} / {events / n:.1f}"),
            ("operator CPU while starting (all processes)", f"{total:.1f} s = "
             f"{1e3 * total / n:.1f} ms per VM started"),
            ("  controller / GitSource controller / agents (sum)",
             f"{used['controller']:.1f} / {used.get('gitops', 0):.1f} / "
             f"{sum(used[a] for a in agents):.1f} s"),
            ("API server + etcd CPU while starting (comparator)",
             f"{server1 - server0:.1f} s = {1e3 * (server1 - server0) / n:.1f} ms per VM"),
            (f"idle CPU over {args.idle:g} s, all processes",
             f"{sum(idle.values()) / args.idle * 1e3:.0f} ms/s = "
             f"{sum(idle.values()) / args.idle / n * 1e6:.0f} us/s per VM"),
            ("  controller / GitSource controller / agents (sum)",
             f"{idle['controller'] / args.idle * 1e3:.0f} / "
             f"{idle.get('gitops', 0) / args.idle * 1e3:.0f}"
             f" / {sum(idle[a] for a in agents) / args.idle * 1e3:.0f} ms/s"),
            ("  API server + etcd (comparator)",
             f"{(server2 - server1) / args.idle * 1e3:.0f} ms/s"),
            ("RSS controller / GitSource controller / agent (max)",
             f"{rss_mib(pids['controller']):.0f} / "
             f"{rss_mib(pids['gitops']) if 'gitops' in pids else 0:.0f} / "
             f"{max(rss_mib(pids[a]) for a in agents):.0f} MiB"),
        ]
        lapses = (work / "controller.log").read_text().count('"node NotReady"')
        figures.append(("WorkerNodes turned NotReady (heartbeat lapses)", str(lapses)))
    finally:
        b.down()
        discard(work)
    print_figures(f"Scale benchmark ({os.cpu_count()} cores, real API server + etcd on loopback)",
                  figures)


def profile(out: Path, pids: dict[str, int]) -> list[subprocess.Popen[bytes]]:
    """Start py-spy on each process; stopped (and written out) by SIGINT."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([spy, "record", "-p", str(pid), "--gil", "-r", "250", "-f", "raw",
                              "-o", str(out / f"{name}.txt"), "--nonblocking"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in pids.items()]


if __name__ == "__main__":
    main()
