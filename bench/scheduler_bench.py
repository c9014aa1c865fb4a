"""Scheduler throughput: 10,000 pending VMs on 1,000 WorkerNodes, per placement policy.

Run with ``.venv/bin/python bench/scheduler_bench.py``. Prints a table of figures and
the determinism check (a second run on shuffled inputs must give the identical result).
It asserts nothing about time: the numbers are for comparing changes on one machine.
The fleet is synthetic but shaped like a real one: three pools of different node
shapes, a few capabilities, zones, some NotReady / cordoned nodes, 2,000 VMs already
running, and pending VMs of mixed sizes with pools, selectors, capabilities, co-location
(affinity) and replica spreading (anti-affinity).
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from dataclasses import dataclass

from hyperfleet.reconcilers.scheduler import NodeView, Policy, ScheduleResult, VmView, schedule

GI = 1 << 30
SIZES = [(1, 2), (2, 4), (2, 8), (4, 8), (4, 16), (8, 32), (16, 64)]  # (cpus, GiB)
SIZE_WEIGHTS = [20, 25, 15, 15, 12, 9, 4]


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


def timed(w: Workload, policy: Policy) -> tuple[ScheduleResult, float]:
    start = time.perf_counter()
    result = schedule(w.pending, w.nodes, w.placed, policy=policy)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--placed", type=int, default=2000)
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    w = make_workload(args.nodes, args.placed, args.pending, args.seed)
    constrained = Counter(
        "affinity" if v.affinity else "anti-affinity" if v.anti_affinity else "plain" for v in w.pending
    )
    print(
        f"{args.pending} pending VMs ({dict(sorted(constrained.items()))}), "
        f"{args.placed} running, {args.nodes} nodes"
    )
    header = (
        f"{'policy':<8} {'placed':>7} {'unsched':>7} {'seconds':>8} {'placed/s':>9} {'VMs/s':>8} "
        f"{'deterministic':>13}"
    )
    print(header)
    print("-" * len(header))
    reasons: dict[Policy, Counter[str]] = {}
    for policy in Policy:
        first, secs = timed(w, policy)
        second, secs2 = timed(shuffled(w, args.seed + 1), policy)
        same = first == second and list(first.placements.items()) == list(second.placements.items())
        best = min(secs, secs2)
        placed = len(first.placements)
        print(
            f"{policy.value:<8} {placed:>7} {len(first.unschedulable):>7} {best:>8.2f} "
            f"{placed / best:>9.0f} {args.pending / best:>8.0f} {'yes' if same else 'NO':>13}"
        )
        reasons[policy] = Counter(first.unschedulable.values())
    for policy, counts in reasons.items():
        print(f"\nmost common unschedulable reasons ({policy.value}):")
        for reason, n in counts.most_common(3):
            print(f"  {n:>5} x {reason}")


if __name__ == "__main__":
    main()
