"""The Hyperfleet custom resource kinds: names, scopes, printer columns, models."""

from __future__ import annotations

from .crdgen import CrdKind
from .models.node import WorkerNodeSpec, WorkerNodeStatus
from .models.vm import VirtualMachineSpec, VirtualMachineStatus

VIRTUAL_MACHINE = CrdKind(
    kind="VirtualMachine",
    plural="virtualmachines",
    singular="virtualmachine",
    short_names=["hvm"],
    scope="Namespaced",
    spec_model=VirtualMachineSpec,
    status_model=VirtualMachineStatus,
    columns=[
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Node", "type": "string", "jsonPath": ".status.nodeName"},
        {"name": "CPUs", "type": "integer", "jsonPath": ".spec.cpus"},
        {"name": "Memory", "type": "string", "jsonPath": ".spec.memory"},
        {"name": "State", "type": "string", "jsonPath": ".status.hypervisor.state",
         "priority": 1},
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restartCount",
         "priority": 1},
    ],
)

WORKER_NODE = CrdKind(
    kind="WorkerNode",
    plural="workernodes",
    singular="workernode",
    short_names=["wn"],
    scope="Cluster",
    spec_model=WorkerNodeSpec,
    status_model=WorkerNodeStatus,
    columns=[
        {"name": "Status", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Pool", "type": "string", "jsonPath": ".spec.pool"},
        {"name": "VMs", "type": "integer", "jsonPath": ".status.vmCount"},
        {"name": "CPUs", "type": "integer", "jsonPath": ".status.allocatable.cpus"},
        {"name": "Memory", "type": "string", "jsonPath": ".status.allocatable.memory"},
        {"name": "Hypervisor", "type": "string", "jsonPath": ".status.hypervisorVersion",
         "priority": 1},
    ],
)

ALL_KINDS = [VIRTUAL_MACHINE, WORKER_NODE]
