"""Reference copy of ``hyperfleet.reconcilers.scheduler`` before its vectorised rewrite.

The original, straightforward implementation, kept verbatim (below the original docstring)
as the oracle that ``tests/unit/test_scheduler.py`` compares the optimised
:func:`hyperfleet.reconcilers.scheduler.schedule` against (same placements, same
unschedulable reasons), and the "old" column of ``bench/scheduler_bench.py``. The only
edits: the package-relative imports are absolute, and the view/result types are the live
module's (not redefined), so that both functions take the same inputs and their results
compare with ``==``. Do not optimise this file.

Original module docstring:
VM placement as a pure, deterministic function of (pending VMs, nodes, placed VMs).

The controller builds the views from the API objects, calls :func:`schedule`, and binds
each placement with a resourceVersion-conditional status patch.

Placement works like kube-scheduler's filter-then-score cycle, run for a whole batch:

* :data:`FILTERS` narrow the candidate nodes one named filter at a time, so an
  unschedulable VM's message can say how many nodes each filter rejected. The first
  five depend only on the VM's node constraints and are evaluated once per distinct
  constraint set; the others depend on what earlier placements consumed.
* The survivors are scored by :func:`headroom` (free cpu fraction + free memory fraction
  after placement): :attr:`Policy.SPREAD` takes the highest, :attr:`Policy.BINPACK` the
  lowest, an exact tie goes to the first node name.
* Pending VMs are placed largest first (cpus, then memory, then key), each one seeing
  the capacity and the VMs of the placements before it. VMs with affinity rules that
  failed are retried until a round places nothing, since a later placement in the same
  batch may be the VM they want to share a node with.

Determinism: nodes are indexed in name order, pending VMs sorted, ties broken by name,
and no result depends on input order, set or dict iteration order, randomness or time.

Affinity and anti-affinity selectors are ``matchLabels`` maps that only match VMs in the
VM's own namespace (the namespace part of the ``namespace/name`` key), like pod affinity
without ``namespaces``: one tenant's labels can neither attract nor repel another's VMs.
As in Kubernetes, a VM that matches its own affinity selector may go anywhere while no
VM matches that selector yet, so the first member of a co-located group can start it.
Anti-affinity is symmetric: a node is also refused when a VM already on it has an
anti-affinity selector matching the new VM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from hyperfleet.reconcilers.models.common import parse_quantity
from hyperfleet.reconcilers.models.vm import image_key
from hyperfleet.reconcilers.scheduler import NodeView, Policy, ScheduleResult, VmView

#: A matchLabels selector (or a VM's labels) as a hashable set of (key, value) pairs.
Labels = frozenset[tuple[str, str]]
#: Where a selector is filed: (namespace, its smallest pair), or (namespace, None) if empty.
#: A label set holding the selector holds that pair, so a lookup probes one anchor per label.
_Anchor = tuple[str, tuple[str, str] | None]
#: Nodes (as indexes into ``Fleet.nodes``) kept by a filter, and reason -> nodes rejected.
FilterResult = tuple[list[int], dict[str, int]]
Filter = Callable[[VmView, "Fleet", list[int]], FilterResult]
#: What the static filters read of a VM: (pool, nodeSelector, required capabilities).
_Constraints = tuple[str | None, Labels, frozenset[str]]


def namespace_of(key: str) -> str:
    """The namespace part of a ``namespace/name`` key: the scope of affinity selectors."""
    ns, sep, _ = key.partition("/")
    return ns if sep else ""


def labels_of(mapping: Mapping[str, str]) -> Labels:
    """Hashable, order-free form of a label map, so ``selector <= labels`` tests a match."""
    return frozenset(mapping.items())


def _anchor(ns: str, selector: Labels) -> _Anchor:
    return (ns, min(selector)) if selector else (ns, None)


def _anchors(ns: str, labels: Labels) -> list[_Anchor]:
    return [(ns, None), *((ns, pair) for pair in labels)]


class Fleet:
    """The mutable state of one scheduling call: nodes, free capacity, who runs where.

    Nodes are kept in name order and referred to by index, so every scan and tie-break
    follows names. VMs are indexed by label so that affinity costs are proportional to
    the VMs a selector matches, not to (VMs x nodes): a selector's host set is built on
    first use and then kept current by :meth:`place`.
    """

    def __init__(self, nodes: Iterable[NodeView], placed: Iterable[VmView] = ()) -> None:
        self.nodes = sorted(nodes, key=lambda n: n.name)
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        if len(self.index) != len(self.nodes):
            raise ValueError("WorkerNode names must be unique")
        self.free_cpu = [n.cpus for n in self.nodes]
        self.free_mem = [n.memory for n in self.nodes]
        self.inv_cpu = [1.0 / n.cpus if n.cpus > 0 else 0.0 for n in self.nodes]
        self.inv_mem = [1.0 / n.memory if n.memory > 0 else 0.0 for n in self.nodes]
        # (labels, node) of every VM on a known node, filed under each anchor of its labels.
        self._vms: dict[_Anchor, list[tuple[Labels, int]]] = {}
        # Nodes hosting a VM matching (namespace, selector), for selectors used so far.
        self._hosts: dict[tuple[str, Labels], set[int]] = {}
        self._hosts_by_anchor: dict[_Anchor, list[tuple[Labels, set[int]]]] = {}
        # Nodes hosting a VM that has this anti-affinity selector, filed by its anchor.
        self._repellers: dict[_Anchor, dict[Labels, set[int]]] = {}
        # Static filter outcome per (pool, nodeSelector, capabilities).
        self._static: dict[_Constraints, tuple[list[int], list[tuple[str, int]]]] = {}
        for vm in placed:
            i = self.index.get(vm.node) if vm.node is not None else None
            if i is not None:  # a VM on a vanished node holds no capacity we schedule
                self.place(vm, i)

    def place(self, vm: VmView, i: int) -> None:
        """Account for ``vm`` running on node ``i``: capacity and every label index."""
        self.free_cpu[i] -= vm.cpus
        self.free_mem[i] -= vm.memory
        ns = namespace_of(vm.key)
        labels = labels_of(vm.labels)
        for anchor in _anchors(ns, labels):
            self._vms.setdefault(anchor, []).append((labels, i))
            for selector, hosts in self._hosts_by_anchor.get(anchor, ()):
                if selector <= labels:
                    hosts.add(i)
        for raw in vm.anti_affinity:
            selector = labels_of(raw)
            self._repellers.setdefault(_anchor(ns, selector), {}).setdefault(selector, set()).add(i)

    def hosts(self, ns: str, selector: Labels) -> set[int]:
        """Nodes running a VM of namespace ``ns`` whose labels include ``selector``.

        The returned set is live (updated by later placements): callers must not mutate it.
        """
        found = self._hosts.get((ns, selector))
        if found is None:
            scan = min(  # the VMs carrying the selector's rarest pair
                (self._vms.get((ns, pair), []) for pair in sorted(selector)),
                key=len,
                default=self._vms.get((ns, None), []),
            )
            found = {i for labels, i in scan if selector <= labels}
            self._hosts[(ns, selector)] = found
            self._hosts_by_anchor.setdefault(_anchor(ns, selector), []).append((selector, found))
        return found

    def repelled(self, ns: str, labels: Labels) -> set[int]:
        """Nodes running a VM of namespace ``ns`` with anti-affinity matching ``labels``."""
        out: set[int] = set()
        for anchor in _anchors(ns, labels):
            for selector, nodes in self._repellers.get(anchor, {}).items():
                if selector <= labels:
                    out |= nodes
        return out

    def candidates(self, vm: VmView) -> tuple[list[int], list[tuple[str, int]]]:
        """Nodes passing every filter, and (reason, node count) per rejection in filter order."""
        key: _Constraints = (vm.pool or None, labels_of(vm.node_selector), vm.required_capabilities)
        static = self._static.get(key)
        if static is None:
            static = _run(STATIC_FILTERS, vm, self, list(range(len(self.nodes))))
            self._static[key] = static
        nodes, rejected = static
        extra: list[tuple[str, int]] = []
        for check in DYNAMIC_FILTERS:
            if not nodes:
                break
            nodes, why = check(vm, self, nodes)
            extra.extend(sorted(why.items()))
        return nodes, rejected + extra if extra else rejected


def _run(
    filters: Sequence[Filter], vm: VmView, fleet: Fleet, nodes: list[int]
) -> tuple[list[int], list[tuple[str, int]]]:
    """Apply ``filters`` in order, collecting each one's rejections (sorted by reason)."""
    rejected: list[tuple[str, int]] = []
    for check in filters:
        nodes, why = check(vm, fleet, nodes)
        rejected.extend(sorted(why.items()))
    return nodes, rejected


def _per_node(fleet: Fleet, nodes: list[int], reject: Callable[[NodeView], str | None]) -> FilterResult:
    """Apply a per-node check; used by the static filters, which run once per constraint set."""
    kept: list[int] = []
    rejected: dict[str, int] = {}
    for i in nodes:
        why = reject(fleet.nodes[i])
        if why is None:
            kept.append(i)
        else:
            rejected[why] = rejected.get(why, 0) + 1
    return kept, rejected


def _counted(reason: str, before: list[int], kept: list[int]) -> FilterResult:
    """A single-reason filter's result: whatever it dropped was dropped for ``reason``."""
    n = len(before) - len(kept)
    return kept, ({reason: n} if n else {})


# -- filters: each keeps the nodes that may host the VM and counts the rest by reason ------


def ready(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """A node whose agent stopped heartbeating cannot start the VM."""
    return _per_node(fleet, nodes, lambda n: None if n.ready else "not Ready")


def not_cordoned(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """Cordoned or draining nodes take no new VMs."""
    return _per_node(fleet, nodes, lambda n: "cordoned" if n.unschedulable else None)


def in_pool(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """``spec.workerPool`` restricts the VM to one pool; unset means any pool."""
    if not vm.pool:
        return nodes, {}
    reason = f"not in pool {vm.pool}"
    return _per_node(fleet, nodes, lambda n: None if n.pool == vm.pool else reason)


def matches_node_selector(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """Every ``spec.nodeSelector`` label must be on the node with the same value."""
    want = vm.node_selector.items()
    if not want:
        return nodes, {}
    return _per_node(
        fleet, nodes, lambda n: None if want <= n.labels.items() else "not matching nodeSelector"
    )


def has_capabilities(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """The node must advertise every ``spec.requiredCapabilities`` entry; says which lack."""
    need = vm.required_capabilities
    if not need:
        return nodes, {}

    def reject(n: NodeView) -> str | None:
        missing = sorted(need - n.capabilities)
        if not missing:
            return None
        return f"missing capabilit{'y' if len(missing) == 1 else 'ies'} {','.join(missing)}"

    return _per_node(fleet, nodes, reject)


def fits_cpu(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """Allocatable vCPUs minus those of VMs already there (or placed earlier in the batch)."""
    need, free = vm.cpus, fleet.free_cpu
    return _counted("insufficient cpu", nodes, [i for i in nodes if free[i] >= need])


def fits_memory(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """Allocatable memory minus that of VMs already there (or placed earlier in the batch)."""
    need, free = vm.memory, fleet.free_mem
    return _counted("insufficient memory", nodes, [i for i in nodes if free[i] >= need])


def vm_affinity(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """For each affinity selector the node must already run a matching VM (same namespace)."""
    if not vm.affinity:
        return nodes, {}
    ns, own = namespace_of(vm.key), labels_of(vm.labels)
    allowed: set[int] | None = None
    for raw in vm.affinity:
        selector = labels_of(raw)
        hosts = fleet.hosts(ns, selector)
        if not hosts and selector <= own:
            continue  # first VM of a self-affine group: it founds the group anywhere
        allowed = hosts if allowed is None else allowed & hosts
    if allowed is None:
        return nodes, {}
    return _counted("not satisfying VM affinity", nodes, [i for i in nodes if i in allowed])


def vm_anti_affinity(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """No VM on the node may match the VM's anti-affinity, nor have anti-affinity matching it."""
    ns, own = namespace_of(vm.key), labels_of(vm.labels)
    forbidden = fleet.repelled(ns, own)
    for raw in vm.anti_affinity:
        forbidden |= fleet.hosts(ns, labels_of(raw))
    if not forbidden:
        return nodes, {}
    return _counted("violating VM anti-affinity", nodes, [i for i in nodes if i not in forbidden])


#: Filters that only read the VM's node constraints: cached per distinct constraint set.
STATIC_FILTERS: tuple[Filter, ...] = (ready, not_cordoned, in_pool, matches_node_selector, has_capabilities)
#: Filters that read the capacity and VMs placed so far, evaluated for every VM.
DYNAMIC_FILTERS: tuple[Filter, ...] = (fits_cpu, fits_memory, vm_affinity, vm_anti_affinity)
#: Every filter in evaluation order: also the order of reasons in an unschedulable summary.
FILTERS: tuple[Filter, ...] = STATIC_FILTERS + DYNAMIC_FILTERS


def headroom(vm: VmView, fleet: Fleet, i: int) -> float:
    """Fraction of node ``i``'s cpus plus fraction of its memory still free after ``vm``."""
    cpu = (fleet.free_cpu[i] - vm.cpus) * fleet.inv_cpu[i]
    return cpu + (fleet.free_mem[i] - vm.memory) * fleet.inv_mem[i]


def choose(vm: VmView, fleet: Fleet, nodes: list[int], policy: Policy) -> int:
    """The best-scoring node; ``nodes`` is in name order, so ``index`` finds the first of equals.

    Nodes that already hold the VM's base image come first: its pull (minutes, for a big
    image) is the slowest part of a start."""
    if vm.image is not None:
        holding = [i for i in nodes if vm.image in fleet.nodes[i].images]
        if holding:
            nodes = holding
    c, m = vm.cpus, vm.memory
    fc, fm, ic, im = fleet.free_cpu, fleet.free_mem, fleet.inv_cpu, fleet.inv_mem
    # headroom(), inlined into one comprehension: this is the hot loop of a big batch.
    scores = [(fc[i] - c) * ic[i] + (fm[i] - m) * im[i] for i in nodes]
    return nodes[scores.index(max(scores) if policy is Policy.SPREAD else min(scores))]


def summarize(total: int, rejected: Sequence[tuple[str, int]]) -> str:
    """Kubernetes-style ``0/N nodes are available: ...`` from per-reason node counts."""
    if total == 0:
        return "0/0 nodes are available: no WorkerNodes registered."
    return f"0/{total} nodes are available: {', '.join(f'{n} {why}' for why, n in rejected)}."


def _order(vm: VmView) -> tuple[int, int, str]:
    """Largest first (hardest to fit once the fleet fills up), then by key for stability."""
    return (-vm.cpus, -vm.memory, vm.key)


def schedule(
    pending: Sequence[VmView],
    nodes: Sequence[NodeView],
    placed: Sequence[VmView],
    *,
    policy: Policy | str = Policy.SPREAD,
) -> ScheduleResult:
    """Place a batch of pending VMs; each gets a node or a reason, never both.

    Pure and deterministic: the same VMs and nodes in any order give the same result.
    ``placed`` VMs consume capacity on their ``node`` and count for affinity.
    """
    policy = Policy(policy)
    order = sorted(pending, key=_order)
    if len({vm.key for vm in order}) != len(order):
        raise ValueError("pending VM keys must be unique")
    fleet = Fleet(nodes, placed)
    result = ScheduleResult()

    def attempt(vm: VmView) -> bool:
        survivors, rejected = fleet.candidates(vm)
        if not survivors:
            result.unschedulable[vm.key] = summarize(len(fleet.nodes), rejected)
            return False
        i = choose(vm, fleet, survivors, policy)
        fleet.place(vm, i)
        result.placements[vm.key] = fleet.nodes[i].name
        result.unschedulable.pop(vm.key, None)
        return True

    # Only affinity can turn satisfiable later (capacity shrinks, anti-affinity grows).
    retry: list[VmView] = []
    for vm in order:
        if not attempt(vm) and vm.affinity:
            retry.append(vm)
    while retry:
        still = [vm for vm in retry if not attempt(vm)]
        if len(still) == len(retry):
            break
        retry = still
    return result


def vm_view(body: Mapping[str, Any]) -> VmView:
    """Scheduler input from a VirtualMachine object as the API server returns it."""
    meta = body.get("metadata", {})
    spec = body.get("spec", {})
    aff = spec.get("affinity") or {}
    return VmView(
        key=f"{meta.get('namespace') or 'default'}/{meta['name']}",
        cpus=int(spec.get("cpus", 1)),
        memory=parse_quantity(str(spec.get("memory", "0"))),
        labels=dict(meta.get("labels") or {}),
        pool=spec.get("workerPool"),
        node_selector=dict(spec.get("nodeSelector") or {}),
        required_capabilities=frozenset(spec.get("requiredCapabilities") or ()),
        affinity=tuple(dict(s) for s in aff.get("vmAffinity") or ()),
        anti_affinity=tuple(dict(s) for s in aff.get("vmAntiAffinity") or ()),
        node=(body.get("status") or {}).get("nodeName"),
        image=image_key(spec.get("image")),
    )
