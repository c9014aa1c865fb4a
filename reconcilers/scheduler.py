"""VM placement as a pure, deterministic function of (pending VMs, nodes, placed VMs).

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

Speed: the filters and :func:`choose` below are the specification; :func:`schedule` runs
an equivalent vectorised form of them (:class:`_Batch`, numpy) that gives the very same
placements and reasons, which a property test checks against the plain implementation
(``tests/unit/scheduler_reference.py``). Per VM it adds a cached per-size score array (the
headroom of every node, ``-inf``, or ``+inf`` for binpack, where the VM does not fit; kept
current by re-scoring only the nodes that took a VM since) to a cached per-constraint-set
penalty array (``0.0`` where the static filters pass, which leaves a score's value as
it is), blanks what affinity and anti-affinity exclude, and takes numpy's arg-max
(arg-min), which returns the first of equal values: the first node name. Scores are
computed with :func:`headroom`'s operations in its order, so equal scores stay equal.
Rejections are counted only for a VM that fits nowhere, and for a VM with affinity only
once retrying it is over. Capacities too large for int64 take the plain path.

Affinity and anti-affinity selectors are ``matchLabels`` maps that only match VMs in the
VM's own namespace (the namespace part of the ``namespace/name`` key), like pod affinity
without ``namespaces``: one tenant's labels can neither attract nor repel another's VMs.
As in Kubernetes, a VM that matches its own affinity selector may go anywhere while no
VM matches that selector yet, so the first member of a co-located group can start it.
Anti-affinity is symmetric: a node is also refused when a VM already on it has an
anti-affinity selector matching the new VM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import chain
from typing import Any

import numpy as np
import numpy.typing as npt

from .models.common import parse_quantity
from .models.vm import image_key


@dataclass(frozen=True)
class NodeView:
    name: str
    pool: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    capabilities: frozenset[str] = frozenset()
    cpus: int = 0  # allocatable vCPUs (after overcommit)
    memory: int = 0  # allocatable bytes (after overcommit)
    ready: bool = True
    unschedulable: bool = False
    images: frozenset[str] = frozenset()  # keys of the base images cached there


@dataclass(frozen=True)
class VmView:
    key: str  # namespace/name
    cpus: int
    memory: int
    labels: Mapping[str, str] = field(default_factory=dict)
    pool: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    required_capabilities: frozenset[str] = frozenset()
    affinity: tuple[Mapping[str, str], ...] = ()
    anti_affinity: tuple[Mapping[str, str], ...] = ()
    node: str | None = None
    image: str | None = None  # key of its base image (spec.image)


@dataclass
class ScheduleResult:
    placements: dict[str, str] = field(default_factory=dict)  # vm key -> node name
    unschedulable: dict[str, str] = field(default_factory=dict)  # vm key -> reason


class Policy(StrEnum):
    """How to choose among the nodes that pass every filter."""

    SPREAD = "spread"  # most headroom left: failures and noisy neighbours hit fewer VMs
    BINPACK = "binpack"  # least headroom left: keeps whole nodes free for big VMs / scale-in


#: A matchLabels selector (or a VM's labels) as a hashable set of (key, value) pairs.
Labels = frozenset[tuple[str, str]]
#: One (key, value) pair of a label set: what the label indexes file VMs and selectors under.
_Pair = tuple[str, str]
#: Nodes (as indexes into ``Fleet.nodes``) kept by a filter, and reason -> nodes rejected.
FilterResult = tuple[list[int], dict[str, int]]
Filter = Callable[[VmView, "Fleet", list[int]], FilterResult]
#: What the static filters read of a VM: (pool, nodeSelector, required capabilities).
_Constraints = tuple[str | None, Labels, frozenset[str]]


def namespace_of(key: str) -> str:
    """The namespace part of a ``namespace/name`` key: the scope of affinity selectors."""
    ns, sep, _ = key.partition("/")
    return ns if sep else ""


_NO_LABELS: Labels = frozenset()


def labels_of(mapping: Mapping[str, str]) -> Labels:
    """Hashable, order-free form of a label map, so ``selector <= labels`` tests a match."""
    return frozenset(mapping.items())


class Fleet:
    """The mutable state of one scheduling call: nodes, free capacity, who runs where.

    Nodes are kept in name order and referred to by index, so every scan and tie-break
    follows names. VMs are indexed by label so that affinity costs are proportional to
    the VMs a selector matches, not to (VMs x nodes): a selector's host set is built on
    first use and then kept current by :meth:`place`.

    The label indexes are per namespace, keyed by one (key, value) pair (or None for all
    VMs): a selector is filed under its smallest pair, and a VM under each of its pairs
    and None, so a VM's labels meet every selector they may match. Label sets are shared
    (:meth:`canonical`) and VMs filed as flat ``[labels, node, labels, node, ...]`` lists:
    a big batch then leaves few objects behind for the garbage collector to walk.
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
        self._canonical: dict[Labels, Labels] = {}
        # namespace -> pair (or None) -> [labels, node, ...] of every VM on a known node.
        self._vms: dict[str, dict[_Pair | None, list[Any]]] = {}
        # Nodes hosting a VM matching (namespace, selector), for selectors used so far,
        # also filed as namespace -> the selector's smallest pair -> [(selector, nodes)].
        self._hosts: dict[tuple[str, Labels], set[int]] = {}
        self._watched: dict[str, dict[_Pair | None, list[tuple[Labels, set[int]]]]] = {}
        # namespace -> smallest pair -> anti-affinity selector -> nodes of VMs that have it.
        self._repellers: dict[str, dict[_Pair | None, dict[Labels, set[int]]]] = {}
        # Static filter outcome per (pool, nodeSelector, capabilities).
        self._static: dict[_Constraints, tuple[list[int], list[tuple[str, int]]]] = {}
        for vm in placed:
            i = self.index.get(vm.node) if vm.node is not None else None
            if i is not None:  # a VM on a vanished node holds no capacity we schedule
                self.place(vm, i)

    def canonical(self, labels: Labels) -> Labels:
        """The one instance of an equal label set this fleet keeps."""
        return self._canonical.setdefault(labels, labels)

    def place(self, vm: VmView, i: int) -> None:
        """Account for ``vm`` running on node ``i``: capacity and every label index."""
        self._place(vm, i, namespace_of(vm.key), self.canonical(labels_of(vm.labels)))

    def _place(self, vm: VmView, i: int, ns: str, labels: Labels) -> None:
        self.free_cpu[i] -= vm.cpus
        self.free_mem[i] -= vm.memory
        vms = self._vms.get(ns)
        if vms is None:
            vms = self._vms[ns] = {}
        watched = self._watched.get(ns)
        for pair in (None, *labels):
            filed = vms.get(pair)
            if filed is None:
                vms[pair] = [labels, i]
            else:
                filed.append(labels)
                filed.append(i)
            if watched and pair in watched:
                for selector, hosts in watched[pair]:
                    if selector <= labels:
                        hosts.add(i)
        for raw in vm.anti_affinity:
            selector = labels_of(raw)
            anchor = min(selector) if selector else None
            filed_ = self._repellers.setdefault(ns, {}).setdefault(anchor, {})
            filed_.setdefault(selector, set()).add(i)

    def hosts(self, ns: str, selector: Labels) -> set[int]:
        """Nodes running a VM of namespace ``ns`` whose labels include ``selector``.

        The returned set is live (updated by later placements): callers must not mutate it.
        """
        found = self._hosts.get((ns, selector))
        if found is None:
            vms = self._vms.get(ns, {})
            flat: list[Any] = min(  # the VMs carrying the selector's rarest pair
                (vms.get(pair, []) for pair in sorted(selector)),
                key=len,
                default=vms.get(None, []),
            )
            scan = iter(flat)
            found = {i for labels, i in zip(scan, scan, strict=True) if selector <= labels}
            self._hosts[(ns, selector)] = found
            anchor = min(selector) if selector else None
            self._watched.setdefault(ns, {}).setdefault(anchor, []).append((selector, found))
        return found

    def repelled(self, ns: str, labels: Labels) -> set[int]:
        """Nodes running a VM of namespace ``ns`` with anti-affinity matching ``labels``."""
        out: set[int] = set()
        repellers = self._repellers.get(ns)
        if repellers:
            for pair in (None, *labels):
                filed = repellers.get(pair)
                if filed:
                    for selector, nodes in filed.items():
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

    return _per_node(fleet, nodes, lambda n: _missing(need, n.capabilities))


def _missing(need: frozenset[str], capabilities: frozenset[str]) -> str | None:
    missing = sorted(need - capabilities)
    if not missing:
        return None
    return f"missing capabilit{'y' if len(missing) == 1 else 'ies'} {','.join(missing)}"


def fits_cpu(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """Allocatable vCPUs minus those of VMs already there (or placed earlier in the batch)."""
    need, free = vm.cpus, fleet.free_cpu
    return _counted("insufficient cpu", nodes, [i for i in nodes if free[i] >= need])


def fits_memory(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """Allocatable memory minus that of VMs already there (or placed earlier in the batch)."""
    need, free = vm.memory, fleet.free_mem
    return _counted("insufficient memory", nodes, [i for i in nodes if free[i] >= need])


def _affine(vm: VmView, fleet: Fleet, ns: str, own: Labels) -> set[int] | None:
    """The nodes :func:`vm_affinity` keeps (do not mutate), or None if it keeps every node."""
    allowed: set[int] | None = None
    for raw in vm.affinity:
        selector = labels_of(raw)
        hosts = fleet.hosts(ns, selector)
        if not hosts and selector <= own:
            continue  # first VM of a self-affine group: it founds the group anywhere
        allowed = hosts if allowed is None else allowed & hosts
    return allowed


def _repelling(vm: VmView, fleet: Fleet, ns: str, own: Labels) -> set[int]:
    """The nodes :func:`vm_anti_affinity` rejects (a new set)."""
    forbidden = fleet.repelled(ns, own)
    for raw in vm.anti_affinity:
        forbidden |= fleet.hosts(ns, labels_of(raw))
    return forbidden


def vm_affinity(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """For each affinity selector the node must already run a matching VM (same namespace)."""
    allowed = _affine(vm, fleet, namespace_of(vm.key), labels_of(vm.labels)) if vm.affinity else None
    if allowed is None:
        return nodes, {}
    return _counted("not satisfying VM affinity", nodes, [i for i in nodes if i in allowed])


def vm_anti_affinity(vm: VmView, fleet: Fleet, nodes: list[int]) -> FilterResult:
    """No VM on the node may match the VM's anti-affinity, nor have anti-affinity matching it."""
    forbidden = _repelling(vm, fleet, namespace_of(vm.key), labels_of(vm.labels))
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


FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]
#: Free capacities are mirrored in int64 arrays only while no value can come near overflow.
_INT64_SAFE = 1 << 62
#: How many floats the per-size score arrays of one batch may hold (32 MiB); 16 arrays at least.
_SCORE_FLOATS = 1 << 22


class _Scores:
    """Headroom of every node for one VM size, ``worst`` where the size does not fit."""

    __slots__ = ("seen", "values")

    def __init__(self, values: FloatArray, seen: int) -> None:
        self.values = values
        self.seen = seen  # how much of _Batch.changed is reflected in ``values``


class _Static:
    """A constraint set's static filter outcome in array form."""

    __slots__ = ("nodes", "penalty", "rejected")

    def __init__(self, nodes: IndexArray, rejected: list[tuple[str, int]], size: int, worst: float) -> None:
        self.nodes = nodes
        self.rejected = rejected
        # Added to a score array: 0.0 keeps a passing node's score (x + 0.0 == x for every
        # float x), ``worst`` blanks a rejected one.
        self.penalty: FloatArray = np.full(size, worst)
        self.penalty[self.nodes] = 0.0


class _Batch:
    """:meth:`Fleet.candidates` then :func:`choose` for one VM after another, vectorised.

    Results are identical to the plain filters: the survivors of every filter are the
    nodes whose entry in ``score + penalty`` (after the affinity blanks) is not ``worst``,
    their scores are computed exactly as :func:`headroom` does, and numpy's arg-max /
    arg-min return the first of equal values, i.e. the first node name, like ``index``.
    """

    def __init__(self, fleet: Fleet, policy: Policy) -> None:
        self.fleet = fleet
        self.size = len(fleet.nodes)
        self.spread = policy is Policy.SPREAD
        self.worst = -math.inf if self.spread else math.inf
        self.free_cpu = np.array(fleet.free_cpu, dtype=np.int64)
        self.free_mem = np.array(fleet.free_mem, dtype=np.int64)
        self.inv_cpu = np.array(fleet.inv_cpu, dtype=np.float64)
        self.inv_mem = np.array(fleet.inv_mem, dtype=np.float64)
        self.changed: list[int] = []  # nodes that took a VM in this batch, in order
        self.mirrored = 0  # how much of ``changed`` free_cpu / free_mem reflect
        self.scores: dict[tuple[int, int], _Scores] = {}
        self.keep_scores = max(16, _SCORE_FLOATS // self.size)
        self.statics: dict[_Constraints, _Static] = {}
        self.holders: dict[str, IndexArray] | None = None
        # What the static filters read of the nodes, as arrays (label pairs and pools on demand).
        nodes = fleet.nodes
        self.everywhere: IndexArray = np.arange(self.size, dtype=np.intp)
        self.ready = np.array([n.ready for n in nodes], dtype=np.bool_)
        self.open = np.array([not n.unschedulable for n in nodes], dtype=np.bool_)
        self.pools: dict[str, npt.NDArray[np.bool_]] = {}
        self.pairs: dict[tuple[str, str], npt.NDArray[np.bool_]] = {}
        kinds: dict[frozenset[str], int] = {}  # distinct capability sets
        self.capability_kind = np.array(
            [kinds.setdefault(n.capabilities, len(kinds)) for n in nodes], dtype=np.intp
        )
        self.capability_kinds = list(kinds)
        self.buf: FloatArray = np.empty(self.size)
        self.names = [n.name for n in nodes]
        # What the last attempt of a VM that failed without a reason saw: see explain().
        self.failed: dict[str, tuple[_Static, set[int] | None, set[int]]] = {}

    @staticmethod
    def applies(nodes: Sequence[NodeView], vms: Iterable[VmView]) -> bool:
        """Whether int64 arrays hold every capacity and every difference the batch computes."""
        bound = max(max(abs(n.cpus), abs(n.memory)) for n in nodes)
        bound += sum(abs(v.cpus) + abs(v.memory) for v in vms)
        return type(bound) is int and bound < _INT64_SAFE  # a float anywhere makes it a float

    def _mirror(self) -> None:
        """Bring the int64 free-capacity arrays up to date with the fleet's lists."""
        todo = self.changed[self.mirrored :]
        if todo:
            fc, fm, ac, am = self.fleet.free_cpu, self.fleet.free_mem, self.free_cpu, self.free_mem
            for i in todo:
                ac[i] = fc[i]
                am[i] = fm[i]
            self.mirrored = len(self.changed)

    def _all_scores(self, c: int, m: int) -> FloatArray:
        self._mirror()
        fc, fm = self.free_cpu, self.free_mem
        # headroom()'s operations in headroom()'s order: int difference, times the inverse,
        # cpu term + memory term (numpy converts int64 to float64 as Python converts int).
        values: FloatArray = (fc - c) * self.inv_cpu + (fm - m) * self.inv_mem
        values[(fc < c) | (fm < m)] = self.worst
        return values

    def _scores(self, c: int, m: int) -> FloatArray:
        """The score array for a VM of ``c`` cpus and ``m`` bytes, brought up to date."""
        entry = self.scores.get((c, m))
        changed = self.changed
        if entry is None:
            if len(self.scores) >= self.keep_scores:
                del self.scores[next(iter(self.scores))]
            entry = self.scores[(c, m)] = _Scores(self._all_scores(c, m), len(changed))
        elif entry.seen < len(changed):
            todo = changed[entry.seen :]
            if len(todo) > 64 and len(todo) > self.size >> 3:
                entry.values = self._all_scores(c, m)
            else:
                values, worst, fleet = entry.values, self.worst, self.fleet
                fc, fm, ic, im = fleet.free_cpu, fleet.free_mem, fleet.inv_cpu, fleet.inv_mem
                for i in todo:
                    if fc[i] >= c and fm[i] >= m:
                        values[i] = (fc[i] - c) * ic[i] + (fm[i] - m) * im[i]
                    else:
                        values[i] = worst
            entry.seen = len(changed)
        return entry.values

    def _static_filters(
        self, pool: str | None, selector: Labels, need: frozenset[str]
    ) -> tuple[IndexArray, list[tuple[str, int]]]:
        """:data:`STATIC_FILTERS` over all nodes, as :func:`_run` applies them, on arrays."""
        nodes, rejected = self.everywhere, []
        nodes_ = self.fleet.nodes

        def keep(passes: npt.NDArray[np.bool_], reason: str) -> None:
            nonlocal nodes
            kept = nodes[passes[nodes]]
            if len(kept) < len(nodes):
                rejected.append((reason, len(nodes) - len(kept)))
            nodes = kept

        keep(self.ready, "not Ready")
        keep(self.open, "cordoned")
        if pool:
            if pool not in self.pools:
                self.pools[pool] = np.array([n.pool == pool for n in nodes_], dtype=np.bool_)
            keep(self.pools[pool], f"not in pool {pool}")
        if selector:
            matching = np.ones(self.size, dtype=np.bool_)
            for pair in selector:
                if pair not in self.pairs:
                    self.pairs[pair] = np.array([pair in n.labels.items() for n in nodes_], dtype=np.bool_)
                matching &= self.pairs[pair]
            keep(matching, "not matching nodeSelector")
        if need and len(nodes):
            # The reason depends on the node's capability set only: one per distinct set.
            reasons = [_missing(need, kind) for kind in self.capability_kinds]
            texts = sorted({r for r in reasons if r is not None})
            code = np.array([0 if r is None else 1 + texts.index(r) for r in reasons], dtype=np.intp)
            codes = code[self.capability_kind[nodes]]
            counts = np.bincount(codes, minlength=len(texts) + 1)
            rejected.extend((text, int(n)) for text, n in zip(texts, counts[1:], strict=True) if n)
            nodes = nodes[codes == 0]
        return nodes, rejected

    def _holders(self) -> dict[str, IndexArray]:
        """The nodes holding each image, in name order."""
        found: dict[str, list[int]] = {}
        for i, n in enumerate(self.fleet.nodes):
            for key in n.images:
                found.setdefault(key, []).append(i)
        return {key: np.array(nodes, dtype=np.intp) for key, nodes in found.items()}

    def _mask(self, nodes: set[int]) -> npt.NDArray[np.bool_]:
        mask = np.zeros(self.size, dtype=np.bool_)
        mask[np.fromiter(nodes, dtype=np.intp, count=len(nodes))] = True
        return mask

    def attempt(self, vm: VmView, result: ScheduleResult, explain: bool) -> bool:
        """Place ``vm`` where :func:`choose` would among :meth:`Fleet.candidates`, or say why not
        (if ``explain``, else only hold its place in ``result.unschedulable``: :meth:`explain`
        can fill it in while nothing has been placed since).

        The hot loop of a big batch: helpers are inlined where it measurably helps."""
        selector = vm.node_selector
        key: _Constraints = (
            vm.pool or None,
            labels_of(selector) if selector else _NO_LABELS,
            vm.required_capabilities,
        )
        static = self.statics.get(key)
        if static is None:
            static = self.statics[key] = _Static(*self._static_filters(*key), self.size, self.worst)
        if not static.nodes.size:
            result.unschedulable[vm.key] = summarize(self.size, static.rejected)
            return False
        fleet, worst, values, spread = self.fleet, self.worst, self.buf, self.spread
        ns, sep, _ = vm.key.partition("/")
        if not sep:
            ns = ""
        own = fleet.canonical(labels_of(vm.labels))
        allowed = _affine(vm, fleet, ns, own) if vm.affinity else None
        forbidden = fleet.repelled(ns, own)
        for raw in vm.anti_affinity:
            forbidden |= fleet.hosts(ns, labels_of(raw))
        np.add(self._scores(vm.cpus, vm.memory), static.penalty, out=values)
        if allowed is not None:
            np.copyto(values, worst, where=~self._mask(allowed))
        if forbidden:
            values[np.fromiter(forbidden, dtype=np.intp, count=len(forbidden))] = worst
        i = -1
        if vm.image is not None:
            if self.holders is None:
                self.holders = self._holders()
            held = self.holders.get(vm.image)
            if held is not None:
                among = values[held]
                best = among.argmax() if spread else among.argmin()
                if among[best] != worst:
                    i = int(held[best])
        if i < 0:
            i = int(values.argmax() if spread else values.argmin())
            if values[i] == worst:
                if explain:
                    why = self._explain(vm, static, allowed, forbidden)
                    result.unschedulable[vm.key] = summarize(self.size, why)
                else:
                    result.unschedulable.setdefault(vm.key, "")
                    self.failed[vm.key] = (static, allowed, forbidden)
                return False
        fleet._place(vm, i, ns, own)
        self.changed.append(i)
        result.placements[vm.key] = self.names[i]
        if result.unschedulable:
            result.unschedulable.pop(vm.key, None)
        return True

    def explain(self, vm: VmView, result: ScheduleResult) -> None:
        """The reason of ``vm``'s last attempt, which failed, if nothing was placed since."""
        # Not there if the VM passes no static filter: then every attempt gave its reason.
        if vm.key in self.failed:
            why = self._explain(vm, *self.failed[vm.key])
            result.unschedulable[vm.key] = summarize(self.size, why)

    def _explain(
        self, vm: VmView, static: _Static, allowed: set[int] | None, forbidden: set[int]
    ) -> list[tuple[str, int]]:
        """The dynamic filters' rejections, counted as :meth:`Fleet.candidates` counts them."""
        self._mirror()
        nodes, extra = static.nodes, []
        checks: list[tuple[str, Callable[[IndexArray], npt.NDArray[np.bool_]]]] = [
            ("insufficient cpu", lambda n: self.free_cpu[n] >= vm.cpus),
            ("insufficient memory", lambda n: self.free_mem[n] >= vm.memory),
        ]
        if allowed is not None:
            keep = self._mask(allowed)
            checks.append(("not satisfying VM affinity", lambda n: keep[n]))
        if forbidden:
            drop = self._mask(forbidden)
            checks.append(("violating VM anti-affinity", lambda n: ~drop[n]))
        for reason, passes in checks:
            if not len(nodes):
                break
            kept = nodes[passes(nodes)]
            if len(kept) < len(nodes):
                extra.append((reason, len(nodes) - len(kept)))
            nodes = kept
        return static.rejected + extra if extra else static.rejected


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

    def plain(vm: VmView, result: ScheduleResult, explain: bool) -> bool:
        survivors, rejected = fleet.candidates(vm)
        if not survivors:
            result.unschedulable[vm.key] = summarize(len(fleet.nodes), rejected)
            return False
        i = choose(vm, fleet, survivors, policy)
        fleet.place(vm, i)
        result.placements[vm.key] = fleet.nodes[i].name
        result.unschedulable.pop(vm.key, None)
        return True

    def explain(vm: VmView, result: ScheduleResult) -> None:
        pass  # plain() always gives the reason

    attempt = plain
    if fleet.nodes and _Batch.applies(fleet.nodes, chain(placed, order)):
        batch = _Batch(fleet, policy)
        attempt, explain = batch.attempt, batch.explain

    # Only affinity can turn satisfiable later (capacity shrinks, anti-affinity grows). A VM
    # with affinity that fails is tried again until a round places nothing, so only its
    # last reason counts: it is worked out then, in that round's (final) state.
    retry: list[VmView] = []
    for vm in order:
        if not attempt(vm, result, not vm.affinity) and vm.affinity:
            retry.append(vm)
    while retry:
        still = [vm for vm in retry if not attempt(vm, result, False)]
        if len(still) == len(retry):
            for vm in still:
                explain(vm, result)
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
