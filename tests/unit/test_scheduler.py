"""The VM scheduler: each filter, scoring, batching, explanations, determinism, invariants."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyperfleet.reconcilers import scheduler
from hyperfleet.reconcilers.scheduler import (
    FILTERS,
    Filter,
    Fleet,
    NodeView,
    Policy,
    ScheduleResult,
    VmView,
    fits_cpu,
    fits_memory,
    has_capabilities,
    headroom,
    in_pool,
    matches_node_selector,
    namespace_of,
    not_cordoned,
    ready,
    schedule,
    summarize,
    vm_affinity,
    vm_anti_affinity,
    vm_view,
)
from tests.unit import scheduler_reference as reference

GI = 1 << 30


def node(name: str, **kw: Any) -> NodeView:
    kw.setdefault("cpus", 8)
    kw.setdefault("memory", 32 * GI)
    return NodeView(name=name, **kw)


def vm(key: str, cpus: int = 1, memory: int = GI, **kw: Any) -> VmView:
    return VmView(key=key, cpus=cpus, memory=memory, **kw)


def verdict(check: Filter, v: VmView, n: NodeView, placed: Sequence[VmView] = ()) -> dict[str, int]:
    """Run one filter on a one-node fleet: {} if the node is kept, else {reason: 1}."""
    kept, rejected = check(v, Fleet([n], placed), [0])
    assert (kept == [0]) == (not rejected)
    assert sum(rejected.values()) == 1 - len(kept)
    return rejected


# -- each filter, accepting and rejecting ----------------------------------------------------


def test_ready_filter() -> None:
    assert verdict(ready, vm("a/x"), node("n")) == {}
    assert verdict(ready, vm("a/x"), node("n", ready=False)) == {"not Ready": 1}


def test_not_cordoned_filter() -> None:
    assert verdict(not_cordoned, vm("a/x"), node("n")) == {}
    assert verdict(not_cordoned, vm("a/x"), node("n", unschedulable=True)) == {"cordoned": 1}


def test_pool_filter() -> None:
    assert verdict(in_pool, vm("a/x"), node("n", pool="gpu")) == {}  # no pool: any pool
    assert verdict(in_pool, vm("a/x", pool="gpu"), node("n", pool="gpu")) == {}
    assert verdict(in_pool, vm("a/x", pool="gpu"), node("n")) == {"not in pool gpu": 1}


def test_node_selector_filter() -> None:
    sel = vm("a/x", node_selector={"zone": "z1", "disk": "ssd"})
    assert (
        verdict(matches_node_selector, sel, node("n", labels={"zone": "z1", "disk": "ssd", "x": "y"})) == {}
    )
    assert verdict(matches_node_selector, vm("a/x"), node("n")) == {}
    for labels in ({"zone": "z1"}, {"zone": "z2", "disk": "ssd"}, {}):
        assert verdict(matches_node_selector, sel, node("n", labels=labels)) == {
            "not matching nodeSelector": 1
        }


def test_capabilities_filter_names_what_is_missing() -> None:
    caps = frozenset({"migration", "gpu"})
    want = vm("a/x", required_capabilities=caps)
    assert verdict(has_capabilities, want, node("n", capabilities=caps | {"sev"})) == {}
    assert verdict(has_capabilities, vm("a/x"), node("n")) == {}
    assert verdict(has_capabilities, want, node("n", capabilities=frozenset({"gpu"}))) == {
        "missing capability migration": 1
    }
    assert verdict(has_capabilities, want, node("n")) == {"missing capabilities gpu,migration": 1}


def test_cpu_filter_counts_placed_vms() -> None:
    n = node("n", cpus=8)
    assert verdict(fits_cpu, vm("a/x", cpus=8), n) == {}
    assert verdict(fits_cpu, vm("a/x", cpus=9), n) == {"insufficient cpu": 1}
    running = [vm("a/r", cpus=5, node="n")]
    assert verdict(fits_cpu, vm("a/x", cpus=3), n, running) == {}
    assert verdict(fits_cpu, vm("a/x", cpus=4), n, running) == {"insufficient cpu": 1}
    elsewhere = [vm("a/r", cpus=5, node="gone")]  # a VM on a vanished node holds nothing here
    assert verdict(fits_cpu, vm("a/x", cpus=8), n, elsewhere) == {}


def test_memory_filter_counts_placed_vms() -> None:
    n = node("n", memory=4 * GI)
    assert verdict(fits_memory, vm("a/x", memory=4 * GI), n) == {}
    assert verdict(fits_memory, vm("a/x", memory=4 * GI + 1), n) == {"insufficient memory": 1}
    running = [vm("a/r", memory=3 * GI, node="n")]
    assert verdict(fits_memory, vm("a/x", memory=GI), n, running) == {}
    assert verdict(fits_memory, vm("a/x", memory=GI + 1), n, running) == {"insufficient memory": 1}


def test_affinity_filter() -> None:
    db = vm("shop/db", affinity=({"app": "shop", "tier": "web"},))
    web = vm("shop/web", labels={"app": "shop", "tier": "web"}, node="n")
    assert verdict(vm_affinity, db, node("n"), [web]) == {}
    assert verdict(vm_affinity, vm("shop/plain"), node("n")) == {}
    # The matching VM is on another node, or only matches part of the selector.
    other = vm("shop/web", labels={"app": "shop", "tier": "web"}, node="m")
    partial = vm("shop/w2", labels={"app": "shop"}, node="n")
    rejected = {"not satisfying VM affinity": 1}
    assert verdict(vm_affinity, db, node("n"), [other, partial]) == rejected
    # Selectors only match VMs of the same namespace.
    foreign = vm("other/web", labels={"app": "shop", "tier": "web"}, node="n")
    assert verdict(vm_affinity, db, node("n"), [foreign]) == rejected


def test_affinity_needs_every_selector_and_one_vm_per_selector() -> None:
    want = vm("a/x", affinity=({"app": "web"}, {"app": "cache"}))
    web = vm("a/web", labels={"app": "web"}, node="n")
    cache = vm("a/cache", labels={"app": "cache"}, node="n")
    assert verdict(vm_affinity, want, node("n"), [web, cache]) == {}
    assert verdict(vm_affinity, want, node("n"), [web]) == {"not satisfying VM affinity": 1}


def test_self_affine_vm_founds_its_group() -> None:
    """Like Kubernetes: the first of a group that wants to be together may go anywhere."""
    first = vm("a/web-0", labels={"app": "web"}, affinity=({"app": "web"},))
    assert verdict(vm_affinity, first, node("n")) == {}
    # Once a member runs somewhere, the others must join it there.
    fleet = Fleet([node("n"), node("m")], [vm("a/web-1", labels={"app": "web"}, node="m")])
    both = [fleet.index["m"], fleet.index["n"]]
    assert vm_affinity(first, fleet, both) == ([fleet.index["m"]], {"not satisfying VM affinity": 1})
    loner = vm("a/db", labels={"app": "db"}, affinity=({"app": "web"},))  # not self-affine
    assert verdict(vm_affinity, loner, node("n")) == {"not satisfying VM affinity": 1}


def test_anti_affinity_filter() -> None:
    replica = vm("a/web-1", labels={"app": "web"}, anti_affinity=({"app": "web"},))
    rejected = {"violating VM anti-affinity": 1}
    assert verdict(vm_anti_affinity, replica, node("n")) == {}
    assert verdict(vm_anti_affinity, replica, node("n"), [vm("a/db", labels={"app": "db"}, node="n")]) == {}
    assert verdict(
        vm_anti_affinity, replica, node("n"), [vm("a/web-0", labels={"app": "web"}, node="n")]
    ) == (rejected)
    # Another namespace's VMs do not repel.
    assert verdict(vm_anti_affinity, replica, node("n"), [vm("b/web", labels={"app": "web"}, node="n")]) == {}


def test_anti_affinity_is_symmetric() -> None:
    """A VM with no rules of its own still may not join a VM that repels it."""
    loner = vm("a/db", labels={"role": "db"}, node="n", anti_affinity=({"role": "db"}, {"role": "x"}))
    newcomer = vm("a/db-2", labels={"role": "db", "size": "l"})
    assert verdict(vm_anti_affinity, newcomer, node("n"), [loner]) == {"violating VM anti-affinity": 1}
    assert verdict(vm_anti_affinity, vm("a/web", labels={"role": "web"}), node("n"), [loner]) == {}
    assert verdict(vm_anti_affinity, vm("b/db", labels={"role": "db"}), node("n"), [loner]) == {}


def test_empty_anti_affinity_selector_wants_a_node_of_its_own() -> None:
    hermit = vm("a/hermit", anti_affinity=({},))
    assert verdict(vm_anti_affinity, hermit, node("n")) == {}
    assert verdict(vm_anti_affinity, hermit, node("n"), [vm("a/any", node="n")]) == {
        "violating VM anti-affinity": 1
    }
    placed_hermit = vm("a/hermit", anti_affinity=({},), node="n")
    assert verdict(vm_anti_affinity, vm("a/any"), node("n"), [placed_hermit]) == {
        "violating VM anti-affinity": 1
    }


def test_filter_list_order() -> None:
    names = [f.__name__ for f in FILTERS]
    assert names == [
        "ready",
        "not_cordoned",
        "in_pool",
        "matches_node_selector",
        "has_capabilities",
        "fits_cpu",
        "fits_memory",
        "vm_affinity",
        "vm_anti_affinity",
    ]


# -- scoring and tie-break ---------------------------------------------------------------------


def test_headroom_combines_cpu_and_memory_fractions() -> None:
    fleet = Fleet([node("n", cpus=8, memory=8 * GI)], [vm("a/r", cpus=2, memory=6 * GI, node="n")])
    assert headroom(vm("a/x", cpus=2, memory=GI), fleet, 0) == pytest.approx(4 / 8 + 1 / 8)
    assert headroom(vm("a/x", cpus=0, memory=0), fleet, 0) == pytest.approx(6 / 8 + 2 / 8)


def two_nodes_one_busy() -> tuple[list[NodeView], list[VmView]]:
    nodes = [node("busy", cpus=8, memory=8 * GI), node("idle", cpus=8, memory=8 * GI)]
    return nodes, [vm("a/r", cpus=4, memory=4 * GI, node="busy")]


def test_spread_prefers_most_headroom_and_is_the_default() -> None:
    nodes, placed = two_nodes_one_busy()
    assert schedule([vm("a/x")], nodes, placed).placements == {"a/x": "idle"}
    assert schedule([vm("a/x")], nodes, placed, policy="spread").placements == {"a/x": "idle"}


def test_binpack_prefers_least_headroom() -> None:
    nodes, placed = two_nodes_one_busy()
    assert schedule([vm("a/x")], nodes, placed, policy=Policy.BINPACK).placements == {"a/x": "busy"}
    assert schedule([vm("a/x")], nodes, placed, policy="binpack").placements == {"a/x": "busy"}


def test_scoring_weighs_memory_too() -> None:
    """Equal free cpus: spread goes where more memory is left, binpack where less."""
    nodes = [node("roomy", cpus=8, memory=64 * GI), node("tight", cpus=8, memory=8 * GI)]
    assert schedule([vm("a/x")], nodes, []).placements == {"a/x": "roomy"}
    assert schedule([vm("a/x")], nodes, [], policy="binpack").placements == {"a/x": "tight"}


def test_policies_over_a_batch() -> None:
    nodes = [node(f"n{i}", cpus=8, memory=8 * GI) for i in range(3)]
    batch = [vm(f"a/vm{i}", cpus=2, memory=2 * GI) for i in range(4)]
    spread = schedule(batch, nodes, [])
    assert sorted(spread.placements.values()) == ["n0", "n0", "n1", "n2"]
    packed = schedule(batch, nodes, [], policy="binpack")
    assert set(packed.placements.values()) == {"n0"}


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError):
        schedule([vm("a/x")], [node("n")], [], policy="random")


def test_tie_break_by_node_name() -> None:
    nodes = [node("c"), node("a"), node("b")]
    for policy in Policy:
        assert schedule([vm("a/x")], nodes, [], policy=policy).placements == {"a/x": "a"}
    assert schedule([vm("a/x")], nodes, [vm("a/r", node="a")]).placements == {"a/x": "b"}


def test_larger_vms_are_placed_first() -> None:
    """Whatever the input order, the big VM gets the only node it fits on."""
    nodes = [node("big", cpus=8), node("small", cpus=2)]
    batch = [vm("a/a-small", cpus=2), vm("a/z-big", cpus=8)]
    result = schedule(batch, nodes, [])
    assert result.placements == {"a/z-big": "big", "a/a-small": "small"}
    assert list(result.placements) == ["a/z-big", "a/a-small"]


# -- batches: capacity and affinity of earlier placements --------------------------------------


def test_batch_accounts_for_earlier_placements() -> None:
    nodes = [node("n0", cpus=4), node("n1", cpus=4)]
    batch = [vm(f"a/vm{i}", cpus=2) for i in range(5)]
    result = schedule(batch, nodes, [])
    assert sorted(result.placements.values()) == ["n0", "n0", "n1", "n1"]
    assert result.unschedulable == {"a/vm4": "0/2 nodes are available: 2 insufficient cpu."}


def test_affinity_within_one_batch() -> None:
    """The db sorts first (bigger) but wants its web VM: it is retried after the web lands."""
    nodes = [node(f"n{i}") for i in range(4)]
    web = vm("shop/web", cpus=1, labels={"app": "shop"})
    db = vm("shop/db", cpus=4, affinity=({"app": "shop"},))
    busy = [vm("x/r", cpus=7, node="n0")]  # spread sends web to n1
    result = schedule([db, web], nodes, busy)
    assert result.placements == {"shop/web": "n1", "shop/db": "n1"}
    assert result.unschedulable == {}


def test_affinity_to_a_vm_that_never_lands() -> None:
    nodes = [node("n0"), node("n1")]
    db = vm("shop/db", affinity=({"app": "shop"},))
    result = schedule([db], nodes, [])
    assert result.placements == {}
    assert result.unschedulable == {"shop/db": "0/2 nodes are available: 2 not satisfying VM affinity."}


def test_self_affine_group_lands_together_in_one_batch() -> None:
    nodes = [node(f"n{i}") for i in range(3)]
    group = [vm(f"a/g{i}", labels={"grp": "g"}, affinity=({"grp": "g"},)) for i in range(3)]
    result = schedule(group, nodes, [])
    assert len(result.placements) == 3
    assert len(set(result.placements.values())) == 1


def test_anti_affinity_within_one_batch() -> None:
    nodes = [node(f"n{i}") for i in range(3)]
    replicas = [vm(f"a/web-{i}", labels={"app": "web"}, anti_affinity=({"app": "web"},)) for i in range(4)]
    for policy in Policy:
        result = schedule(replicas, nodes, [], policy=policy)
        assert sorted(result.placements.values()) == ["n0", "n1", "n2"]
        assert result.unschedulable == {"a/web-3": "0/3 nodes are available: 3 violating VM anti-affinity."}


def test_symmetric_anti_affinity_within_one_batch() -> None:
    """A loner placed earlier in the batch keeps a plain VM off its node, even under binpack."""
    nodes = [node("n0"), node("n1")]
    loner = vm("a/loner", cpus=4, anti_affinity=({"noisy": "yes"},))
    noisy = vm("a/noisy", cpus=1, labels={"noisy": "yes"})
    result = schedule([noisy, loner], nodes, [], policy="binpack")
    assert result.placements["a/loner"] != result.placements["a/noisy"]


# -- unschedulable explanations ------------------------------------------------------------------


def test_unschedulable_summary_counts_first_failing_filter() -> None:
    nodes = [
        node("a", ready=False),
        node("b", ready=False, unschedulable=True),  # counted once, by its first failing filter
        node("c", unschedulable=True),
        node("d"),
        node("e", capabilities=frozenset({"gpu"})),
    ]
    result = schedule([vm("ns/x", required_capabilities=frozenset({"migration"}))], nodes, [])
    assert result.placements == {}
    assert result.unschedulable == {
        "ns/x": "0/5 nodes are available: 2 not Ready, 1 cordoned, 2 missing capability migration."
    }


def test_summary_orders_reasons_by_filter_then_text() -> None:
    nodes = [
        node("a", pool="p", capabilities=frozenset({"x"})),
        node("b", pool="p"),
        node("c", pool="q"),
        node("d", pool="p", capabilities=frozenset({"x", "y"}), cpus=1),
        node("e", pool="p", capabilities=frozenset({"x", "y"}), cpus=4, memory=GI),
        node("f", pool="p", capabilities=frozenset({"x", "y"}), labels={"z": "1"}),
    ]
    want = vm(
        "ns/x",
        cpus=2,
        memory=2 * GI,
        pool="p",
        required_capabilities=frozenset({"x", "y"}),
        node_selector={},
        anti_affinity=({"app": "a"},),
    )
    placed = [vm("ns/a", labels={"app": "a"}, node="f")]
    assert schedule([want], nodes, placed).unschedulable == {
        "ns/x": "0/6 nodes are available: 1 not in pool p, 1 missing capabilities x,y, "
        "1 missing capability y, 1 insufficient cpu, 1 insufficient memory, "
        "1 violating VM anti-affinity."
    }


def test_no_nodes_at_all() -> None:
    result = schedule([vm("a/x")], [], [])
    assert result.unschedulable == {"a/x": "0/0 nodes are available: no WorkerNodes registered."}
    assert summarize(0, []) == "0/0 nodes are available: no WorkerNodes registered."


def test_a_vm_once_unschedulable_then_placed_has_no_reason() -> None:
    nodes = [node("n0", cpus=4)]
    db = vm("a/db", cpus=3, affinity=({"app": "web"},))
    web = vm("a/web", cpus=1, labels={"app": "web"})
    result = schedule([db, web], nodes, [])
    assert result == ScheduleResult(placements={"a/web": "n0", "a/db": "n0"}, unschedulable={})


# -- API objects -------------------------------------------------------------------------------


def test_vm_view_from_api_object() -> None:
    body = {
        "apiVersion": "hyperfleet.dev/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "cpus": 4,
            "memory": "2Gi",
            "boot": {"kernel": "/k"},
            "workerPool": "gpu",
            "nodeSelector": {"zone": "z1"},
            "requiredCapabilities": ["migration", "gpu"],
            "affinity": {"vmAffinity": [{"app": "db"}], "vmAntiAffinity": [{"app": "web"}, {"x": "y"}]},
        },
        "status": {"nodeName": "n3"},
    }
    assert vm_view(body) == VmView(
        key="shop/web-0",
        cpus=4,
        memory=2 * GI,
        labels={"app": "web"},
        pool="gpu",
        node_selector={"zone": "z1"},
        required_capabilities=frozenset({"gpu", "migration"}),
        affinity=({"app": "db"},),
        anti_affinity=({"app": "web"}, {"x": "y"}),
        node="n3",
    )


def test_vm_view_defaults() -> None:
    v = vm_view({"metadata": {"name": "x"}, "spec": {"cpus": 1, "memory": "512Mi"}})
    assert v == VmView(key="default/x", cpus=1, memory=512 << 20)
    assert namespace_of(v.key) == "default"
    assert namespace_of("no-slash") == ""


def test_duplicate_keys_and_node_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="keys"):
        schedule([vm("a/x"), vm("a/x")], [node("n")], [])
    with pytest.raises(ValueError, match="names"):
        schedule([vm("a/x")], [node("n"), node("n")], [])


# -- determinism -------------------------------------------------------------------------------


def scenario(seed: int) -> tuple[list[VmView], list[NodeView], list[VmView]]:
    rng = random.Random(seed)
    nodes = [
        node(
            f"n{i:02d}",
            pool=rng.choice(["a", "b"]),
            labels={"zone": rng.choice(["z1", "z2"])},
            capabilities=frozenset(c for c in ("gpu", "migration") if rng.random() < 0.5),
            cpus=rng.choice([4, 8, 16]),
            memory=rng.choice([8, 16, 32]) * GI,
            ready=rng.random() > 0.1,
        )
        for i in range(20)
    ]
    placed = [vm(f"t/r{i}", cpus=1, labels={"app": f"a{i % 5}"}, node=f"n{i % 20:02d}") for i in range(15)]
    pending = [
        vm(
            f"t/p{i:03d}",
            cpus=rng.choice([1, 1, 2, 2, 4]),  # many equal sizes: order must come from the keys
            memory=rng.choice([1, 2, 4]) * GI,
            labels={"app": f"a{i % 5}"},
            pool=rng.choice([None, None, "a"]),
            affinity=({"app": f"a{(i + 1) % 5}"},) if i % 7 == 0 else (),
            anti_affinity=({"app": f"a{i % 5}"},) if i % 3 == 0 else (),
        )
        for i in range(120)
    ]
    return pending, nodes, placed


def shuffled(items: Sequence[Any], rng: random.Random) -> list[Any]:
    out = list(items)
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("policy", list(Policy))
def test_same_inputs_in_any_order_give_identical_results(policy: Policy) -> None:
    pending, nodes, placed = scenario(1)
    reference = schedule(pending, nodes, placed, policy=policy)
    assert reference.placements and reference.unschedulable  # a scenario that exercises both
    rng = random.Random(2)
    for _ in range(10):
        again = schedule(shuffled(pending, rng), shuffled(nodes, rng), shuffled(placed, rng), policy=policy)
        assert again == reference
        assert list(again.placements.items()) == list(reference.placements.items())


def test_placement_is_pure() -> None:
    pending, nodes, placed = scenario(3)
    before = (list(pending), list(nodes), list(placed))
    first = schedule(pending, nodes, placed)
    assert (pending, nodes, placed) == before
    assert schedule(pending, nodes, placed) == first


# -- properties over random fleets, checked by an independent brute-force oracle ---------------


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def fits(v: VmView, n: NodeView, running: list[VmView], known: set[str]) -> bool:
    """Could ``v`` go on ``n`` given the VMs in ``running`` (``v`` excluded) on ``known`` nodes?"""
    if not n.ready or n.unschedulable or (v.pool and n.pool != v.pool):
        return False
    if not matches(v.node_selector, n.labels) or not v.required_capabilities <= n.capabilities:
        return False
    here = [r for r in running if r.node == n.name]
    if sum(r.cpus for r in here) + v.cpus > n.cpus or sum(r.memory for r in here) + v.memory > n.memory:
        return False
    ns = namespace_of(v.key)
    kin = [r for r in running if namespace_of(r.key) == ns and r.node in known]
    local = [r for r in kin if r.node == n.name]
    for sel in v.affinity:
        founding = matches(sel, v.labels) and not any(matches(sel, r.labels) for r in kin)
        if not founding and not any(matches(sel, r.labels) for r in local):
            return False
    if any(matches(sel, r.labels) for sel in v.anti_affinity for r in local):
        return False
    return not any(matches(sel, v.labels) for r in local for sel in r.anti_affinity)


NODE_NAMES = [f"n{i}" for i in range(6)]
label_maps = st.dictionaries(st.sampled_from(["app", "tier"]), st.sampled_from(["x", "y"]), max_size=2)
zones = st.sampled_from(["z1", "z2"])


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[VmView], list[NodeView], list[VmView]]:
    """Small fleets where most VMs could go somewhere, so placements and conflicts are common."""

    def rarely(strategy: st.SearchStrategy[Any], otherwise: Any) -> Any:
        return draw(strategy) if draw(st.integers(0, 3)) == 3 else otherwise

    names = draw(st.lists(st.sampled_from(NODE_NAMES), unique=True, min_size=1, max_size=6))
    nodes = [
        NodeView(
            name=name,
            pool=draw(st.sampled_from(["p", "q"])),
            labels={"zone": draw(zones)},
            capabilities=draw(st.frozensets(st.sampled_from(["gpu", "migration", "sev"]))),
            cpus=draw(st.integers(0, 16)),
            memory=draw(st.integers(0, 16)),
            ready=draw(st.integers(0, 7)) < 7,
            unschedulable=draw(st.integers(0, 7)) == 7,
        )
        for name in names
    ]

    def vms(prefix: str, count: int, on: st.SearchStrategy[str | None]) -> list[VmView]:
        return [
            VmView(
                key=f"{draw(st.sampled_from(['ns1', 'ns2']))}/{prefix}{i}",
                cpus=draw(st.integers(0, 4)),
                memory=draw(st.integers(0, 4)),
                labels=draw(label_maps),
                pool=rarely(st.sampled_from(["p", "q"]), None),
                node_selector=rarely(st.fixed_dictionaries({"zone": zones}), {}),
                required_capabilities=rarely(
                    st.frozensets(st.sampled_from(["gpu", "migration"])), frozenset()
                ),
                affinity=rarely(st.lists(label_maps, min_size=1, max_size=2).map(tuple), ()),
                anti_affinity=rarely(st.lists(label_maps, min_size=1, max_size=2).map(tuple), ()),
                node=draw(on),
            )
            for i in range(count)
        ]

    placed = vms("r", draw(st.integers(0, 8)), st.sampled_from([*NODE_NAMES, "gone"]))
    pending = vms("p", draw(st.integers(0, 14)), st.none())
    return pending, nodes, placed


@settings(max_examples=200, deadline=None)
@given(fleet=fleets(), policy=st.sampled_from(list(Policy)), seed=st.integers(0, 2**16))
def test_schedule_properties(
    fleet: tuple[list[VmView], list[NodeView], list[VmView]], policy: Policy, seed: int
) -> None:
    pending, nodes, placed = fleet
    result = schedule(pending, nodes, placed, policy=policy)
    by_name = {n.name: n for n in nodes}

    # Every pending VM gets exactly one of a node or a reason.
    keys = {v.key for v in pending}
    assert set(result.placements) | set(result.unschedulable) == keys
    assert not set(result.placements) & set(result.unschedulable)

    new = [replace(v, node=result.placements[v.key]) for v in pending if v.key in result.placements]
    running = placed + new
    for v in new:
        n = by_name[v.node or ""]
        assert n.ready and not n.unschedulable
        assert not v.pool or n.pool == v.pool
        assert matches(v.node_selector, n.labels)
        assert v.required_capabilities <= n.capabilities
        others = [r for r in running if r.key != v.key]
        kin_here = [r for r in others if r.node == n.name and namespace_of(r.key) == namespace_of(v.key)]
        for sel in v.affinity:  # a co-located match, or v founded the group itself
            assert matches(sel, v.labels) or any(matches(sel, r.labels) for r in kin_here)
        assert not any(matches(sel, r.labels) for sel in v.anti_affinity for r in kin_here)
        assert not any(matches(sel, v.labels) for r in kin_here for sel in r.anti_affinity)
    # No node that received a VM is over-committed (pre-existing overcommit is not ours).
    for name in {v.node for v in new}:
        n = by_name[name or ""]
        assert sum(r.cpus for r in running if r.node == name) <= n.cpus
        assert sum(r.memory for r in running if r.node == name) <= n.memory

    # A VM left out really fits nowhere as things ended up, and its reason counts every node.
    for v in pending:
        if v.key in result.unschedulable:
            assert not any(fits(v, n, running, set(by_name)) for n in nodes)
            reason = result.unschedulable[v.key]
            assert reason.startswith(f"0/{len(nodes)} nodes are available: ")
            if nodes:
                parts = reason.split(": ", 1)[1].rstrip(".").split(", ")
                assert sum(int(p.split(" ", 1)[0]) for p in parts) == len(nodes)

    # Input order never matters.
    rng = random.Random(seed)
    assert (
        schedule(shuffled(pending, rng), shuffled(nodes, rng), shuffled(placed, rng), policy=policy) == result
    )


def test_nodes_holding_the_vms_image_come_first() -> None:
    """Among nodes that fit, a node with the base image cached wins over emptier ones;
    without such a node the policy decides as before."""
    nodes = [NodeView("a", cpus=8, memory=16 << 30),
             NodeView("b", cpus=4, memory=8 << 30, images=frozenset({"sha256:" + "1" * 64})),
             NodeView("c", cpus=8, memory=16 << 30)]
    vm = VmView("ns/v", 2, 1 << 30, image="sha256:" + "1" * 64)
    assert schedule([vm], nodes, []).placements == {"ns/v": "b"}
    other = VmView("ns/w", 2, 1 << 30, image="sha256:" + "2" * 64)
    assert schedule([other], nodes, []).placements == {"ns/w": "a"}
    full = [NodeView("a", cpus=8, memory=16 << 30),
            NodeView("b", cpus=1, memory=8 << 30, images=frozenset({"sha256:" + "1" * 64}))]
    assert schedule([vm], full, []).placements == {"ns/v": "a"}  # holding it but too small


# -- equivalence with the plain implementation the vectorised schedule() replaced ----------------
#
# tests/unit/scheduler_reference.py is a verbatim copy of the module before it was
# vectorised: every random fleet must get the very same placements (in the same order) and
# the very same unschedulable reasons from both, under both policies.

IMAGES = ["img-a", "img-b", "img-c"]


def sometimes(strategy: st.SearchStrategy[Any], otherwise: Any) -> st.SearchStrategy[Any]:
    """``strategy`` about one time in three, else ``otherwise``."""
    return st.one_of(st.just(otherwise), st.just(otherwise), strategy)


def node_views(unit: int, huge: bool) -> st.SearchStrategy[NodeView]:
    memory = st.sampled_from([0, 6, 16, 16, 24]).map(lambda n: n * unit)  # 1/6, 1/24: inexact
    return st.builds(
        NodeView,
        name=st.sampled_from([f"n{i:02d}" for i in range(16)]),
        pool=st.sampled_from(["p", "q", "r"]),
        labels=st.fixed_dictionaries({"zone": zones}, optional={"disk": st.just("ssd")}),
        capabilities=st.frozensets(st.sampled_from(["gpu", "migration", "sev"])),
        cpus=st.sampled_from([0, 3, 8, 8, 12, 16]),  # few shapes: many exact ties
        memory=st.one_of(memory, st.just(1 << 70)) if huge else memory,
        ready=st.integers(0, 9).map(bool),
        unschedulable=st.integers(0, 9).map(lambda n: n == 0),
        images=st.frozensets(st.sampled_from(IMAGES), max_size=2),
    )


def vm_views(unit: int, on: st.SearchStrategy[str | None]) -> st.SearchStrategy[VmView]:
    """VMs whose key is only their namespace: :func:`rich_fleets` names them."""
    return st.builds(
        VmView,
        key=st.sampled_from(["ns1", "ns2"]),
        cpus=st.integers(0, 5),
        memory=st.integers(0, 16).map(lambda n: n * unit // 4),
        labels=label_maps,
        pool=sometimes(st.sampled_from(["p", "q"]), None),
        node_selector=sometimes(st.fixed_dictionaries({"zone": zones}), {}),
        required_capabilities=sometimes(st.frozensets(st.sampled_from(["gpu", "migration"])), frozenset()),
        affinity=sometimes(st.lists(label_maps, min_size=1, max_size=2).map(tuple), ()),
        anti_affinity=sometimes(st.lists(label_maps, min_size=1, max_size=2).map(tuple), ()),
        node=on,
        image=sometimes(st.sampled_from([*IMAGES, "img-unheld"]), None),
    )


@st.composite
def rich_fleets(draw: st.DrawFn) -> tuple[list[VmView], list[NodeView], list[VmView]]:
    """Fleets with every kind of constraint, many equal scores, and now and then a huge size."""
    huge = draw(st.integers(0, 19)) == 19  # beyond int64: schedule() takes its plain path
    unit = draw(st.sampled_from([1, GI]))

    def some(strategy: st.SearchStrategy[Any], most: int, **kw: Any) -> list[Any]:
        n = draw(st.integers(0, most))  # not st.lists' preference for short lists
        return draw(st.lists(strategy, min_size=n, max_size=n, **kw))

    nodes = some(node_views(unit, huge), 12, unique_by=lambda n: n.name)
    names = [n.name for n in nodes]
    placed = some(vm_views(unit, st.sampled_from([*names, "gone"])), 10)
    pending = some(vm_views(unit, st.none()), 30)

    def named(vms: list[VmView], prefix: str) -> list[VmView]:
        return [replace(v, key=f"{v.key}/{prefix}{i:02d}") for i, v in enumerate(vms)]

    return named(pending, "p"), nodes, named(placed, "r")


def assert_same_as_reference(
    pending: Sequence[VmView], nodes: Sequence[NodeView], placed: Sequence[VmView], policy: Policy
) -> ScheduleResult:
    got = schedule(pending, nodes, placed, policy=policy)
    want = reference.schedule(pending, nodes, placed, policy=policy)
    assert list(got.unschedulable.items()) == list(want.unschedulable.items())
    assert list(got.placements.items()) == list(want.placements.items())
    return got


@settings(max_examples=150, deadline=None)
@given(fleet=rich_fleets())
def test_schedule_equals_the_reference_implementation(
    fleet: tuple[list[VmView], list[NodeView], list[VmView]],
) -> None:
    pending, nodes, placed = fleet
    for policy in Policy:
        assert_same_as_reference(pending, nodes, placed, policy)


@pytest.mark.parametrize("evict", [False, True])
@pytest.mark.parametrize("policy", list(Policy))
def test_big_batch_equals_the_reference_implementation(
    policy: Policy, evict: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enough placements between two VMs of one size to re-score whole arrays, and (with the
    cache shrunk) more VM sizes than the score-array cache keeps, so it evicts."""
    if evict:
        monkeypatch.setattr(scheduler, "_SCORE_FLOATS", 0)  # keep the minimum: 16 sizes
    rng = random.Random(11)
    nodes = [
        NodeView(
            name=f"n{i:03d}",
            pool=rng.choice(["a", "b"]),
            labels={"zone": f"z{i % 3}"},
            capabilities=frozenset(c for c in ("gpu", "migration") if rng.random() < 0.4),
            cpus=rng.choice([8, 16, 32]),
            memory=rng.choice([16, 32, 64]) * GI,
            ready=rng.random() > 0.05,
            images=frozenset(img for img in IMAGES if rng.random() < 0.2),
        )
        for i in range(150)
    ]
    placed = [vm(f"t/r{i}", cpus=1, labels={"app": f"a{i % 9}"}, node=f"n{i % 150:03d}") for i in range(100)]
    pending = [
        vm(
            f"t{i % 3}/p{i:04d}",
            cpus=rng.choice([1, 1, 2, 2, 4, 8]),
            memory=rng.choice([1, 2, 4, 8]) * GI + (rng.randrange(40) << 20 if i % 50 == 0 else 0),
            labels={"app": f"a{i % 9}", "tier": rng.choice(["web", "db"])},
            pool=rng.choice([None, None, None, "a"]),
            node_selector={"zone": "z1"} if i % 11 == 0 else {},
            required_capabilities=frozenset({"gpu"}) if i % 13 == 0 else frozenset(),
            affinity=({"app": f"a{(i + 1) % 9}", "tier": "web"},) if i % 7 == 0 else (),
            anti_affinity=({"app": f"a{i % 9}", "tier": "web"},) if i % 5 == 0 else (),
            image=rng.choice([None, *IMAGES]),
        )
        for i in range(1200)
    ]
    got = assert_same_as_reference(pending, nodes, placed, policy)
    assert len(got.placements) > 500 and got.unschedulable  # both paths exercised



def seeded_fleet(seed: int) -> tuple[list[VmView], list[NodeView], list[VmView]]:
    """Up to 40 nodes of four random shapes whose inverses round, up to 150 pending VMs."""
    rng = random.Random(seed)
    shapes = [(rng.choice([3, 6, 7, 12, 24, 48]), rng.choice([5, 12, 24, 96, 100])) for _ in range(4)]
    nodes = []
    for i in range(rng.randrange(1, 40)):
        cpus, gib = rng.choice(shapes)
        nodes.append(
            NodeView(
                name=f"n{i:02d}",
                pool=rng.choice(["a", "b"]),
                labels={"zone": rng.choice(["z1", "z2"])},
                capabilities=frozenset(c for c in ("gpu", "sev") if rng.random() < 0.3),
                cpus=cpus,
                memory=gib * GI,
                ready=rng.random() > 0.05,
                unschedulable=rng.random() < 0.05,
                images=frozenset(img for img in IMAGES if rng.random() < 0.3),
            )
        )

    def one(key: str, node: str | None) -> VmView:
        app = f"a{rng.randrange(6)}"
        return vm(
            key,
            cpus=rng.choice([1, 1, 2, 3, 4]),
            memory=rng.choice([1, 2, 3, 5, 8]) * GI // rng.choice([1, 1, 4]),
            labels={"app": app},
            pool=rng.choice([None, None, None, "a"]),
            node_selector={"zone": "z2"} if rng.random() < 0.1 else {},
            required_capabilities=frozenset({"gpu"}) if rng.random() < 0.1 else frozenset(),
            affinity=({"app": f"a{rng.randrange(6)}"},) if rng.random() < 0.1 else (),
            anti_affinity=({"app": app},) if rng.random() < 0.1 else (),
            image=rng.choice([None, *IMAGES]),
            node=node,
        )

    names = [n.name for n in nodes]
    placed = [one(f"t{i % 2}/r{i}", rng.choice(names)) for i in range(rng.randrange(20))]
    pending = [one(f"t{i % 2}/p{i}", None) for i in range(rng.randrange(150))]
    return pending, nodes, placed


def test_many_seeded_fleets_equal_the_reference_implementation() -> None:
    """Bigger fleets than hypothesis draws cheaply, with capacities whose inverses round:
    close scores on nodes of different shapes are where a score computed differently
    would pick another node."""
    for seed in range(200):
        pending, nodes, placed = seeded_fleet(seed)
        for policy in Policy:
            assert_same_as_reference(pending, nodes, placed, policy)
