"""The Hyperfleet CRDs: models, printer columns, selectable fields (identity: conventions.py)."""

from __future__ import annotations

from . import conventions as conv
from .crdgen import CrdKind
from .gitops.crd import GIT_SOURCE
from .jobs.envelope import JobDocument
from .jobs.status import JobStatus
from .models.node import WorkerNodeSpec, WorkerNodeStatus
from .models.pool import VirtualMachinePoolSpec, VirtualMachinePoolStatus
from .models.vm import VirtualMachineSpec, VirtualMachineStatus

VIRTUAL_MACHINE = CrdKind(
    conv.VIRTUAL_MACHINE,
    spec_model=VirtualMachineSpec,
    status_model=VirtualMachineStatus,
    selectable_fields=[".status.nodeName"],
    columns=[
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Node", "type": "string", "jsonPath": ".status.nodeName"},
        # Running and healthy, as KubeVirt's VMI Ready (a VM stopped on purpose is False).
        {"name": "Ready", "type": "string",
         "jsonPath": conv.condition_path(conv.CONDITION_READY)},
        {"name": "CPUs", "type": "integer", "jsonPath": ".spec.cpus"},
        {"name": "Memory", "type": "string", "jsonPath": ".spec.memory"},
        {"name": "State", "type": "string", "jsonPath": ".status.hypervisor.state",
         "priority": 1},
        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restartCount",
         "priority": 1},
    ],
)

WORKER_NODE = CrdKind(
    conv.WORKER_NODE,
    spec_model=WorkerNodeSpec,
    status_model=WorkerNodeStatus,
    columns=[
        {"name": "Status", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Pool", "type": "string", "jsonPath": ".spec.pool"},
        # Enabled / Cordoned / Draining (the controller keeps it in step with the spec), as
        # `kubectl get nodes` shows SchedulingDisabled.
        {"name": "Scheduling", "type": "string", "jsonPath": ".status.scheduling"},
        {"name": "VMs", "type": "integer", "jsonPath": ".status.vmCount"},
        # Allocatable: what VMs may take in all (capacity x overcommit), not what is left.
        {"name": "CPUs", "type": "integer", "jsonPath": ".status.allocatable.cpus"},
        {"name": "Memory", "type": "string", "jsonPath": ".status.allocatable.memory"},
        {"name": "Alloc CPUs", "type": "integer", "jsonPath": ".status.allocated.cpus",
         "priority": 1},
        {"name": "Alloc Memory", "type": "string", "jsonPath": ".status.allocated.memory",
         "priority": 1},
        {"name": "Hypervisor", "type": "string", "jsonPath": ".status.hypervisorVersion",
         "priority": 1},
    ],
)

VM_JOB = CrdKind(
    conv.VM_JOB,
    spec_model=JobDocument,
    status_model=JobStatus,
    selectable_fields=[".spec.operation", ".status.assignedNode"],
    columns=[
        {"name": "Operation", "type": "string", "jsonPath": ".spec.operation"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Target", "type": "string", "jsonPath": ".spec.routing.targetVm.name"},
        {"name": "Node", "type": "string", "jsonPath": ".status.assignedNode"},
        {"name": "Priority", "type": "integer", "jsonPath": ".spec.execution.priority",
         "priority": 1},
        {"name": "Attempts", "type": "integer", "jsonPath": ".status.attempts", "priority": 1},
    ],
)

VIRTUAL_MACHINE_POOL = CrdKind(
    conv.VIRTUAL_MACHINE_POOL,
    spec_model=VirtualMachinePoolSpec,
    status_model=VirtualMachinePoolStatus,
    scale={"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
           "labelSelectorPath": ".status.selector"},
    columns=[
        {"name": "Desired", "type": "integer", "jsonPath": ".spec.replicas"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Updated", "type": "integer", "jsonPath": ".status.updatedReplicas"},
        {"name": "Available", "type": "integer", "jsonPath": ".status.availableReplicas"},
        {"name": "Revision", "type": "string", "jsonPath": ".status.updateRevision",
         "priority": 1},
        {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy.type",
         "priority": 1},
    ],
)

ALL_KINDS = [VIRTUAL_MACHINE, WORKER_NODE, VM_JOB, GIT_SOURCE, VIRTUAL_MACHINE_POOL]
