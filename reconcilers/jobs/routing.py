"""Which pending job goes first, and on which worker node it runs.

:func:`order_queue` sorts by priority then submission time; :func:`route` filters the
worker nodes by readiness, pool, capabilities, the target VM's host and affinity, and
says why when none is left. Pure: nodes come in as :class:`WorkerView` values, not
Kubernetes objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .envelope import JobDocument
from .parse import payload_spec
from .registry import PayloadRegistry

__all__ = [
    "NO_TIME",
    "RoutingDecision",
    "WorkerView",
    "effective_capabilities",
    "order_queue",
    "queue_key",
    "route",
]

# --------------------------------------------------------------------------- queue

#: The time in a sort key of a job that has none (``None`` would not compare).
NO_TIME = datetime.min.replace(tzinfo=UTC)


def queue_key(job: JobDocument, created_at: datetime | None = None) -> tuple[Any, ...]:
    """Sort key: priority desc, then submittedAt (or ``created_at``) asc, then jobId.

    Jobs without any timestamp sort after timestamped ones of the same priority.
    """
    when = job.audit.submitted_at or created_at
    return (-job.execution.priority, when is None, when or NO_TIME, job.job_id or "")


def order_queue(
    jobs: Iterable[JobDocument],
    *,
    created_at: Callable[[JobDocument], datetime | None] | None = None,
) -> list[JobDocument]:
    """Jobs in execution order; stable, so full ties keep their input order.

    ``created_at`` supplies a fallback timestamp (e.g. ``metadata.creationTimestamp``)
    for jobs without ``audit.submittedAt``.
    """
    return sorted(jobs, key=lambda j: queue_key(j, created_at(j) if created_at else None))



# --------------------------------------------------------------------------- routing


def effective_capabilities(job: JobDocument, registry: PayloadRegistry | None = None) -> frozenset[str]:
    """Capabilities a node needs: implied by the payload type plus ``requiredCapabilities``."""
    spec = payload_spec(job, registry)
    return spec.required_capabilities | frozenset(job.constraints.required_capabilities)


@dataclass(frozen=True)
class WorkerView:
    """What routing needs to know about a worker node (decoupled from k8s models).

    ``ready`` (the agent is alive) and ``schedulable`` (not cordoned or draining) are
    separate: a cordoned node still runs its jobs and still hosts its VMs, so jobs on
    those VMs (a migration off a draining node) go there; only new placement avoids it.
    """

    name: str
    pool: str | None = None
    capabilities: AbstractSet[str] = field(default_factory=frozenset)
    ready: bool = True
    active_jobs: int = 0
    schedulable: bool = True


@dataclass(frozen=True)
class RoutingDecision:
    """Chosen node (or ``None``) and a human explanation for events/conditions."""

    node: str | None
    reason: str
    eligible: tuple[str, ...] = ()

    @property
    def routed(self) -> bool:
        """Whether a node was chosen."""
        return self.node is not None


def _names(nodes: Iterable[WorkerView]) -> str:
    names = sorted(n.name for n in nodes)
    return ", ".join(names) if names else "none"


def _quoted(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in sorted(values))


def route(
    job: JobDocument,
    nodes: Iterable[WorkerView],
    vm_hosts: Mapping[str, str] | None = None,
    *,
    default_namespace: str = "default",
    registry: PayloadRegistry | None = None,
) -> RoutingDecision:
    """Pick the worker node for ``job``, or explain why none qualifies.

    Filters in order (the first filter that empties the set names the reason):
    Ready, ``routing.workerPool``, effective capabilities, target VM host (for
    payload types that target a VM; ``vm_hosts`` maps ``"namespace/name"`` or bare
    ``"name"`` to a node), ``affinity.nodeNames``, schedulable. Among the survivors
    the first of ``affinity.preferNodeNames`` wins, else the least busy node (then by
    name). A VM's host is chosen even when cordoned: the job has to run where the VM is.
    """
    workers = sorted(nodes, key=lambda n: n.name)
    if not workers:
        return RoutingDecision(None, "no worker nodes are registered")
    ready = [n for n in workers if n.ready]
    if not ready:
        return RoutingDecision(None, f"no worker node is Ready (nodes: {_names(workers)})")

    pool = job.routing.worker_pool
    in_pool = [n for n in ready if n.pool == pool] if pool else ready
    where = f" in worker pool '{pool}'" if pool else ""
    if not in_pool:
        seen = ", ".join(f"{n.name} [{n.pool or 'no pool'}]" for n in ready)
        return RoutingDecision(None, f"no Ready node{where} (Ready nodes: {seen})")

    needed = effective_capabilities(job, registry)
    capable = [n for n in in_pool if needed <= n.capabilities]
    if not capable:
        return RoutingDecision(None, _capability_reason(needed, in_pool, where))

    spec = payload_spec(job, registry)
    target = job.routing.target_vm
    affinity = job.routing.affinity
    required_nodes = set(affinity.node_names) if affinity and affinity.node_names else None

    if spec.targets_vm and target is not None:
        namespace = target.namespace or default_namespace
        vm = f"{namespace}/{target.name}"
        hosts = vm_hosts or {}
        host = hosts.get(vm) or hosts.get(target.name)
        if host is not None:
            return _route_to_host(host, vm, workers, capable, needed, pool, required_nodes)
        if spec.requires_running_vm:
            return RoutingDecision(
                None, f"VM {vm} is not running on any node; start it before {job.operation}"
            )

    eligible = capable
    if required_nodes is not None:
        eligible = [n for n in capable if n.name in required_nodes]
        if not eligible:
            return RoutingDecision(
                None,
                f"no eligible node is in affinity.nodeNames [{', '.join(sorted(required_nodes))}]"
                f" (eligible: {_names(capable)})",
            )
    placeable = [n for n in eligible if n.schedulable]
    if not placeable:
        return RoutingDecision(
            None,
            f"every eligible node is cordoned or draining ({_names(eligible)}); "
            "uncordon one or add a node",
        )
    eligible = placeable
    names = tuple(n.name for n in eligible)
    preferred = affinity.prefer_node_names if affinity else []
    for name in preferred:
        if name in names:
            return RoutingDecision(name, f"preferred node {name} (affinity.preferNodeNames)", names)
    best = min(eligible, key=lambda n: (n.active_jobs, n.name))
    return RoutingDecision(
        best.name,
        f"least busy eligible node {best.name} ({best.active_jobs} active jobs, {len(names)} eligible)",
        names,
    )


def _capability_reason(needed: AbstractSet[str], nodes: Sequence[WorkerView], where: str) -> str:
    nowhere = {c for c in needed if not any(c in n.capabilities for n in nodes)}
    if len(nowhere) == 1:
        return f"no Ready node{where} has capability {_quoted(nowhere)} (nodes: {_names(nodes)})"
    if nowhere:
        return f"no Ready node{where} has capabilities {_quoted(nowhere)} (nodes: {_names(nodes)})"
    detail = ", ".join(f"{n.name} [missing {_quoted(needed - n.capabilities)}]" for n in nodes)
    return f"no Ready node{where} has all of {_quoted(needed)} (nodes: {detail})"


def _route_to_host(
    host: str,
    vm: str,
    workers: Sequence[WorkerView],
    capable: Sequence[WorkerView],
    needed: AbstractSet[str],
    pool: str | None,
    required_nodes: set[str] | None,
) -> RoutingDecision:
    node = next((n for n in workers if n.name == host), None)
    prefix = f"VM {vm} runs on node {host}"
    if node is None:
        return RoutingDecision(None, f"{prefix}, which is not a registered worker node")
    if not node.ready:
        return RoutingDecision(None, f"{prefix}, which is not Ready")
    if pool and node.pool != pool:
        return RoutingDecision(None, f"{prefix}, which is not in worker pool '{pool}'")
    if node not in capable:
        missing = needed - node.capabilities
        noun = "capability" if len(missing) == 1 else "capabilities"
        return RoutingDecision(None, f"{prefix}, which lacks {noun} {_quoted(missing)}")
    if required_nodes is not None and host not in required_nodes:
        return RoutingDecision(
            None,
            f"{prefix}, which is not in affinity.nodeNames [{', '.join(sorted(required_nodes))}]",
        )
    return RoutingDecision(host, f"node {host} hosts VM {vm}", (host,))
