"""Scheduler throughput, old vs new: 10,000 pending VMs on 1,000 and on 5,000 WorkerNodes.

Both placement policies, for the current :func:`schedule` ("new") and the plain
implementation it replaced ("old", ``tests/unit/scheduler_reference.py``), in one run.

Run with ``.venv/bin/python bench/scheduler_bench.py`` (``--help`` for sizes, repeats, and
``--no-old`` to skip the slow reference). Each figure is placements per second as
min / median / max over ``--repeats`` runs on the same inputs. Also printed: whether a run
on shuffled inputs gives the identical result (determinism), whether old and new agree
exactly (placements in order and unschedulable reasons), and placements per CPU second
(median), which a busy machine disturbs less than the wall-clock figures. It asserts
nothing about time: the numbers are for comparing changes on one machine.

The fleet is synthetic but shaped like a real one: three pools of different node shapes, a
few capabilities, zones, some NotReady / cordoned nodes, two VMs already running per node,
and pending VMs of mixed sizes with pools, selectors, capabilities, co-location (affinity),
replica spreading (anti-affinity), and base images that only some nodes have cached
(popular images on many nodes, rare ones on few).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.unit.scheduler_reference

from hyperfleet.reconcilers.scheduler import NodeView, Policy, ScheduleResult, VmView, schedule
from tests.unit import scheduler_reference

GI = 1 << 30
SIZES = [(1, 2), (2, 4), (2, 8), (4, 8), (4, 16), (8, 32), (16, 64)]  # (cpus, GiB)
SIZE_WEIGHTS = [20, 25, 15, 15, 12, 9, 4]
#: Base images by popularity: the share of nodes holding each, and of VMs using it.
IMAGES = [(f"sha256:{i:064x}", hold, use) for i, (hold, use) in enumerate(
    [(0.6, 30), (0.4, 15), (0.3, 10), (0.2, 8), (0.1, 6), (0.05, 4), (0.02, 3), (0.01, 2), (0.0, 2)]
)]

Scheduler = Callable[..., ScheduleResult]
IMPLEMENTATIONS: dict[str, Scheduler] = {"old": scheduler_reference.schedule, "new": schedule}


@dataclass
class Workload:
    nodes: list[NodeView]
    placed: list[VmView]
    pending: list[VmView]


def make_nodes(n: int, rng: random.Random) -> list[NodeView]:
    """60% general (two shapes), 25% highmem, 15% gpu; 2% NotReady, 1% cordoned."""
    nodes = []
    for i in range(n):
        share = i % 20
        if share < 12:
            pool, cpus, mem, caps = "general", (32, 64)[i % 2], (128, 256)[i % 2], {"kvm"}
        elif share < 17:
            pool, cpus, mem, caps = "highmem", 48, 768, {"kvm"}
        else:
            pool, cpus, mem, caps = "gpu", 64, 512, {"kvm", "gpu"}
        if rng.random() < 0.6:
            caps.add("migration")
        if rng.random() < 0.2:
            caps.add("sev")
        nodes.append(
            NodeView(
                name=f"node-{i:04d}",
                pool=pool,
                labels={"zone": f"z{i % 3}", "disk": "ssd" if i % 4 else "hdd"},
                capabilities=frozenset(caps),
                cpus=cpus,
                memory=mem * GI,
                ready=rng.random() >= 0.02,
                unschedulable=rng.random() < 0.01,
                images=frozenset(key for key, hold, _ in IMAGES if rng.random() < hold),
            )
        )
    return nodes


def make_vm(key: str, rng: random.Random, apps: int, node: str | None = None) -> VmView:
    cpus, gib = rng.choices(SIZES, SIZE_WEIGHTS)[0]
    app = f"app{rng.randrange(apps)}"
    tier = rng.choice(("web", "web", "db", "cache"))
    roll = rng.random()
    pool = "highmem" if roll < 0.15 else "gpu" if roll < 0.2 else "general" if roll < 0.3 else None
    caps = set()
    if pool == "gpu":
        caps.add("gpu")
    if rng.random() < 0.2:
        caps.add("migration")
    if rng.random() < 0.05:
        caps.add("sev")
    affinity: tuple[dict[str, str], ...] = ()
    anti: tuple[dict[str, str], ...] = ()
    if tier == "db" and rng.random() < 0.25:
        affinity = ({"app": app, "tier": "web"},)  # sit next to its web tier
    if tier == "web" and rng.random() < 0.3:
        anti = ({"app": app, "tier": "web"},)  # one web replica per node
    image = rng.choices([key for key, _, _ in IMAGES], [use for _, _, use in IMAGES])[0]
    return VmView(
        key=key,
        cpus=cpus,
        memory=gib * GI,
        labels={"app": app, "tier": tier},
        pool=pool,
        node_selector={"zone": f"z{rng.randrange(3)}"} if rng.random() < 0.1 else {},
        required_capabilities=frozenset(caps),
        affinity=affinity,
        anti_affinity=anti,
        node=node,
        image=image if rng.random() < 0.8 else None,  # the rest boot a kernel directly
    )


def make_workload(n_nodes: int, n_placed: int, n_pending: int, seed: int) -> Workload:
    rng = random.Random(seed)
    nodes = make_nodes(n_nodes, rng)
    apps = max(1, n_pending // 25)
    placed = [
        make_vm(f"t{i % 20}/running-{i}", rng, apps, node=nodes[rng.randrange(n_nodes)].name)
        for i in range(n_placed)
    ]
    pending = [make_vm(f"t{i % 20}/vm-{i}", rng, apps) for i in range(n_pending)]
    return Workload(nodes, placed, pending)


def shuffled(w: Workload, seed: int) -> Workload:
    rng = random.Random(seed)
    out = Workload(list(w.nodes), list(w.placed), list(w.pending))
    for seq in (out.nodes, out.placed, out.pending):
        rng.shuffle(seq)
    return out


def timed(impl: Scheduler, w: Workload, policy: Policy) -> tuple[ScheduleResult, float, float]:
    """The result, and the wall-clock and CPU seconds it took."""
    start, cpu = time.perf_counter(), time.process_time()
    result = impl(w.pending, w.nodes, w.placed, policy=policy)
    return result, time.perf_counter() - start, time.process_time() - cpu


def identical(a: ScheduleResult, b: ScheduleResult) -> bool:
    return a == b and list(a.placements.items()) == list(b.placements.items())


def rates(placed: int, seconds: Sequence[float]) -> str:
    per_s = sorted(placed / s for s in seconds)
    return f"{per_s[0]:>8.0f} {statistics.median(per_s):>8.0f} {per_s[-1]:>8.0f}"


def run_size(n_nodes: int, args: argparse.Namespace, impls: dict[str, Scheduler]) -> None:
    w = make_workload(n_nodes, n_nodes * args.placed_per_node, args.pending, args.seed)
    kinds = Counter(
        "affinity" if v.affinity else "anti-affinity" if v.anti_affinity else "plain" for v in w.pending
    )
    imaged = sum(v.image is not None for v in w.pending)
    print(
        f"\n{args.pending} pending VMs ({dict(sorted(kinds.items()))}, {imaged} with an image), "
        f"{len(w.placed)} running, {n_nodes} nodes; placements/s over {args.repeats} runs"
    )
    header = (
        f"{'policy':<8} {'impl':<4} {'placed':>6} {'unsched':>7} {'min':>8} {'median':>8} {'max':>8} "
        f"{'median s':>8} {'cpu med':>8} {'determ.':>7} {'= old':>5}"
    )
    print(header)
    print("-" * len(header))
    reasons: dict[Policy, Counter[str]] = {}
    for policy in Policy:
        results: dict[str, ScheduleResult] = {}
        medians: dict[str, float] = {}
        for name, impl in impls.items():
            runs = [timed(impl, w, policy) for _ in range(args.repeats)]
            first = results[name] = runs[0][0]
            again, _, _ = timed(impl, shuffled(w, args.seed + 1), policy)
            seconds = [s for _, s, _ in runs]
            medians[name] = statistics.median(seconds)
            cpu_rate = len(first.placements) / statistics.median(c for _, _, c in runs)
            same_old = "-" if "old" not in results else "yes" if identical(first, results["old"]) else "NO"
            stable = identical(first, again) and all(identical(first, r) for r, _, _ in runs)
            print(
                f"{policy.value:<8} {name:<4} {len(first.placements):>6} {len(first.unschedulable):>7} "
                f"{rates(len(first.placements), seconds)} {medians[name]:>8.3f} {cpu_rate:>8.0f} "
                f"{'yes' if stable else 'NO':>7} {same_old:>5}"
            )
        if {"old", "new"} <= medians.keys():
            print(f"{'':<8} speed-up (median): {medians['old'] / medians['new']:.1f}x")
        reasons[policy] = Counter(results[next(reversed(results))].unschedulable.values())
    for policy, counts in reasons.items():
        print(f"most common unschedulable reasons ({policy.value}):")
        for reason, n in counts.most_common(2):
            print(f"  {n:>5} x {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 5000], help="fleet sizes to run")
    parser.add_argument("--placed-per-node", type=int, default=2, help="VMs already running per node")
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (at least 3)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-old", action="store_true", help="skip the (slow) reference implementation")
    args = parser.parse_args()
    args.repeats = max(3, args.repeats)
    impls = {k: v for k, v in IMPLEMENTATIONS.items() if not (args.no_old and k == "old")}
    for n_nodes in args.nodes:
        run_size(n_nodes, args, impls)


if __name__ == "__main__":
    main()
