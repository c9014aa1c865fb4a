"""Prometheus metrics of the Hyperfleet processes (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter(
    "hyperfleet_reconciles_total", "Reconcile passes by kind and result", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "hyperfleet_reconcile_duration_seconds", "Duration of one reconcile pass", ["kind"]
)
VMS_BY_PHASE = Gauge("hyperfleet_vms", "VirtualMachines by phase", ["phase"])
CONTROLLER_ACTIVE = Gauge(
    "hyperfleet_controller_active", "1 on the controller replica that schedules, 0 on standbys")
PENDING_VMS = Gauge("hyperfleet_scheduler_queue_depth", "VMs waiting for a node")
BINDINGS = Counter("hyperfleet_bindings_total", "VM to node bindings by result", ["result"])


def serve(port: int | None, address: str = "0.0.0.0") -> None:
    if port:
        start_http_server(port, addr=address)
JOB_TRANSITIONS = Counter(
    "hyperfleet_job_transitions_total", "VmJob phase changes written, by new phase", ["phase"]
)
JOB_OUTCOMES = Counter(
    "hyperfleet_job_outcomes_total", "VmJobs finished on a node, by phase and operation",
    ["phase", "operation"],
)
