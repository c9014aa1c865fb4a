"""Prometheus metrics of the Hyperfleet processes (served on --metrics-port).

Each process role has a registry of its own (``registry_for``), so an agent never exports
the controller's series and vice versa. Counters and histograms are updated where things
happen; every gauge that describes the state of objects (VMs by phase, nodes, one series
per VM or GitSource) is a collector that reads the process's in-memory view at scrape
time instead. So they are always exact: a VM that recovers leaves no ``Failed`` series
behind, and a deleted VM or GitSource leaves nothing. A scrape makes no API call: it
iterates dictionaries the watches already keep (1,000 VMs cost a millisecond or two).

The scrape runs in the HTTP server's thread while the event loop mutates those
dictionaries: the collectors take a snapshot (``tuple(d.items())``, atomic under the GIL)
and read each body once.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Literal, Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hyperfleet.reconcilers.conventions import CONDITION_READY
from hyperfleet.reconcilers.models.common import parse_quantity, parse_time
from hyperfleet.reconcilers.models.vm import Phase

log = logging.getLogger("hyperfleet.metrics")

Role = Literal["controller", "agent"]

# ---------------------------------------------------------------------------- events
# Not registered anywhere here: registry_for() adds each to the roles that update it.

RECONCILES = Counter(
    "hyperfleet_reconciles_total", "Reconcile passes by kind and result", ["kind", "result"],
    registry=None)
RECONCILE_SECONDS = Histogram(
    "hyperfleet_reconcile_duration_seconds", "Duration of one reconcile pass", ["kind"],
    registry=None)
CONTROLLER_ACTIVE = Gauge(
    "hyperfleet_controller_active", "1 on the controller replica that schedules, 0 on standbys",
    registry=None)
BINDINGS = Counter("hyperfleet_bindings_total", "VM to node bindings by result", ["result"],
                   registry=None)
JOB_TRANSITIONS = Counter(
    "hyperfleet_job_transitions_total", "VmJob phase changes written, by new phase", ["phase"],
    registry=None)
JOB_OUTCOMES = Counter(
    "hyperfleet_job_outcomes_total", "VmJobs finished on a node, by phase and operation",
    ["phase", "operation"], registry=None)
#: Buckets from a no-op poll (tens of ms) to a large apply or a slow Nix evaluation.
GITSOURCE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
GITSOURCE_SECONDS = Histogram(
    "hyperfleet_gitsource_reconcile_duration_seconds",
    "Duration of one GitSource reconcile (fetch, render, apply, prune)", ["namespace", "name"],
    buckets=GITSOURCE_BUCKETS, registry=None)

_ROLE_METRICS: dict[Role, tuple[Collector, ...]] = {
    "controller": (RECONCILES, RECONCILE_SECONDS, CONTROLLER_ACTIVE, BINDINGS, JOB_TRANSITIONS,
                   GITSOURCE_SECONDS),
    "agent": (RECONCILES, RECONCILE_SECONDS, JOB_OUTCOMES),
}

# ---------------------------------------------------------------------------- state views

Body = Mapping[str, Any]


class FleetView(Protocol):
    """What the controller keeps (operator/controller.py: Controller)."""

    vms: dict[str, dict[str, Any]]
    nodes: dict[str, dict[str, Any]]
    leases: dict[str, datetime]
    active: bool


class GitSourceView(Protocol):
    """What the GitSource reconciler keeps (operator/gitsource.py: GitOps)."""

    sources: dict[str, dict[str, Any]]
    last_applied: dict[str, float]

    def is_active(self) -> bool: ...


def _status(body: Body) -> Mapping[str, Any]:
    return body.get("status") or {}


def _condition(body: Body, type_: str) -> float:
    """1 True, 0 False, -1 Unknown or not reported yet."""
    for c in _status(body).get("conditions") or []:
        if c.get("type") == type_:
            return {"True": 1.0, "False": 0.0}.get(c.get("status"), -1.0)
    return -1.0


def _timestamp(value: Any) -> float | None:
    if not value:
        return None
    try:
        return parse_time(str(value)).timestamp()
    except ValueError:
        return None


def _ns_name(key: str, body: Body) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    ns, _, name = key.partition("/")
    return str(meta.get("namespace") or ns or "default"), str(meta.get("name") or name)


class FleetCollector(Collector):
    """Fleet gauges from the controller's view; only the active replica exports them (a
    standby's watches are paused by kopf peering, so its view is stale, and summing two
    replicas would count every VM twice)."""

    def __init__(self, view: FleetView) -> None:
        self.view = view

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("hyperfleet_vms", "VirtualMachines by phase", labels=["phase"]),
            GaugeMetricFamily("hyperfleet_scheduler_queue_depth", "VMs waiting for a node"),
            GaugeMetricFamily("hyperfleet_node_ready",
                              "WorkerNode Ready condition: 1 True, 0 False, -1 unknown",
                              labels=["node", "pool"]),
            GaugeMetricFamily("hyperfleet_node_heartbeat_timestamp_seconds",
                              "Unix time of the agent's last heartbeat (Lease or status), "
                              "by the agent's clock", labels=["node"]),
            GaugeMetricFamily("hyperfleet_node_vms", "VMs bound to the node (not being deleted)",
                              labels=["node"]),
        )

    def collect(self) -> Iterator[Metric]:
        v = self.view
        if not v.active:
            return
        vms = tuple(v.vms.values())
        nodes = tuple(v.nodes.items())
        leases = dict(v.leases)
        phases: Tally[str] = Tally({p.value: 0 for p in Phase})
        per_node: Tally[str] = Tally()
        pending = 0
        for body in vms:
            if (body.get("metadata") or {}).get("deletionTimestamp"):
                continue
            st = _status(body)
            phases[st.get("phase") or Phase.PENDING.value] += 1
            node = st.get("nodeName")
            if node:
                per_node[node] += 1
            else:
                pending += 1
        by_phase, queue, ready, beat, on_node = self._families()
        for phase, n in sorted(phases.items()):
            by_phase.add_metric([phase], n)
        queue.add_metric([], pending)
        for name, body in sorted(nodes):
            ready.add_metric([name, str((body.get("spec") or {}).get("pool") or "default")],
                             _condition(body, CONDITION_READY))
            beats = [t for t in (_timestamp(_status(body).get("heartbeatTime")),
                                 leases[name].timestamp() if name in leases else None)
                     if t is not None]
            if beats:
                beat.add_metric([name], max(beats))
            on_node.add_metric([name], per_node.get(name, 0))
        yield from (by_phase, queue, ready, beat, on_node)


class NodeVmCollector(Collector):
    """One set of series per VM on this agent's node, like KubeVirt's kubevirt_vmi_*: from
    the latest body of each VM whose loop runs (the agent replaces it on every watch event),
    gone when a VM's loop ends."""

    def __init__(self, node: str, vms: Mapping[str, Body]) -> None:
        self.node = node
        self.vms = vms

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily,
                             CounterMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("hyperfleet_vm_info", "A VM running on this node (always 1)",
                              labels=["namespace", "name", "node", "phase"]),
            GaugeMetricFamily("hyperfleet_vm_vcpus", "vCPUs the VM boots with (spec.cpus)",
                              labels=["namespace", "name", "node"]),
            GaugeMetricFamily("hyperfleet_vm_memory_bytes", "Guest memory (spec.memory)",
                              labels=["namespace", "name", "node"]),
            CounterMetricFamily("hyperfleet_vm_restarts",
                                "Automatic restarts of the VM (status.restartCount)",
                                labels=["namespace", "name", "node"]),
            GaugeMetricFamily("hyperfleet_vm_boot_time_seconds",
                              "Unix time the VM last booted (status.bootTime)",
                              labels=["namespace", "name", "node"]),
        )

    def collect(self) -> Iterator[Metric]:
        info, vcpus, memory, restarts, boot = self._families()
        for key, body in sorted(tuple(self.vms.items())):
            ns, name = _ns_name(key, body)
            spec = body.get("spec") or {}
            st = _status(body)
            labels = [ns, name, self.node]
            info.add_metric([*labels, str(st.get("phase") or Phase.PENDING.value)], 1)
            if isinstance(spec.get("cpus"), int):
                vcpus.add_metric(labels, spec["cpus"])
            with contextlib.suppress(KeyError, ValueError):  # invalid: the CRD rejects it
                memory.add_metric(labels, parse_quantity(str(spec["memory"])))
            restarts.add_metric(labels, int(st.get("restartCount") or 0))
            booted = _timestamp(st.get("bootTime"))
            if booted is not None:
                boot.add_metric(labels, booted)
        yield from (info, vcpus, memory, restarts, boot)


class GitSourceCollector(Collector):
    """Per-GitSource gauges like Flux's gotk_reconcile_*, from the reconciler's view of its
    GitSources (the watch keeps their status current); active replica only."""

    def __init__(self, view: GitSourceView) -> None:
        self.view = view

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("hyperfleet_gitsource_ready",
                              "GitSource Ready condition: 1 True, 0 False, -1 Unknown",
                              labels=["namespace", "name"]),
            GaugeMetricFamily("hyperfleet_gitsource_suspended", "1 when spec.suspend is set",
                              labels=["namespace", "name"]),
            GaugeMetricFamily("hyperfleet_gitsource_last_applied_timestamp_seconds",
                              "Unix time of the last reconcile that applied its commit "
                              "(changed or unchanged) on this replica",
                              labels=["namespace", "name"]),
        )

    def collect(self) -> Iterator[Metric]:
        if not self.view.is_active():
            return
        ready, suspended, applied = self._families()
        last = dict(self.view.last_applied)
        for key, body in sorted(tuple(self.view.sources.items())):
            labels = list(_ns_name(key, body))
            ready.add_metric(labels, _condition(body, CONDITION_READY))
            suspended.add_metric(labels, float(bool((body.get("spec") or {}).get("suspend"))))
            if key in last:
                applied.add_metric(labels, last[key])
        yield from (ready, suspended, applied)


def forget_gitsource(namespace: str, name: str) -> None:
    """Drop a deleted GitSource's histogram series (the gauges follow the view by themselves)."""
    with contextlib.suppress(KeyError):  # never reconciled here
        GITSOURCE_SECONDS.remove(namespace, name)


# ---------------------------------------------------------------------------- registries


def registry_for(role: Role) -> CollectorRegistry:
    """A registry with the series ``role`` updates and the client's process/platform/GC ones;
    the caller registers its state collectors once the role's view exists."""
    reg = CollectorRegistry(auto_describe=True)
    for c in (*_ROLE_METRICS[role], PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        reg.register(c)
    return reg


def serve(port: int | None, address: str, registry: CollectorRegistry) -> None:
    if port:
        start_http_server(port, addr=address, registry=registry)
        log.info("serving metrics", extra={"address": address, "port": port})
