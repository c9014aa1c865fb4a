"""Every Hyperfleet kind and API convention, declared once.

The bottom of the package: it imports nothing from Hyperfleet (and no pydantic), so models,
pure domain code, adapters, kopf handlers and the CLI can all read names from here instead
of spelling ``"virtualmachines"`` or ``"hyperfleet.dev/node"`` again; a unit test
(tests/unit/test_conventions.py) keeps plural literals out of every other module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GROUP = "hyperfleet.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Scope = Literal["Namespaced", "Cluster"]


@dataclass(frozen=True)
class KindId:
    """A kind's identity on the API server: what a client needs to address it."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    scope: Scope

    @property
    def namespaced(self) -> bool:
        return self.scope == "Namespaced"


VIRTUAL_MACHINE = KindId("VirtualMachine", "virtualmachines", "virtualmachine", ("hvm",),
                         "Namespaced")
WORKER_NODE = KindId("WorkerNode", "workernodes", "workernode", ("wn",), "Cluster")
VM_JOB = KindId("VmJob", "vmjobs", "vmjob", ("vmjob",), "Namespaced")
GIT_SOURCE = KindId("GitSource", "gitsources", "gitsource", ("gs",), "Namespaced")
VIRTUAL_MACHINE_POOL = KindId("VirtualMachinePool", "virtualmachinepools", "virtualmachinepool",
                              ("hvmpool", "vmpool"), "Namespaced")

#: In the order the CRDs are generated and installed.
ALL_KINDS: tuple[KindId, ...] = (VIRTUAL_MACHINE, WORKER_NODE, VM_JOB, GIT_SOURCE,
                                 VIRTUAL_MACHINE_POOL)
BY_KIND: dict[str, KindId] = {k.kind: k for k in ALL_KINDS}

# ------------------------------------------------------------------ labels

#: On each agent's coordination.k8s.io Lease (and its WorkerNode): the node it speaks for.
LEASE_LABEL = f"{GROUP}/node"
#: On a VmJob the controller created to drain a node: the node being drained.
DRAIN_LABEL = f"{GROUP}/drain-node"
#: On a pool's member VMs: the owning VirtualMachinePool's name.
POOL_LABEL = f"{GROUP}/pool"
#: On a pool's member VMs: the template revision they were made from.
REVISION_LABEL = f"{GROUP}/pool-revision"
#: GitOps ownership: only objects carrying it (with our value) are ever pruned.
OWNER_LABEL = f"{GROUP}/gitsource"
#: On a VmJob's pods/objects: its operation and id (see to_manifest in reconcilers/jobs/builder.py).
JOB_OPERATION_LABEL = f"{GROUP}/operation"
JOB_ID_LABEL = f"{GROUP}/job-id"

# ------------------------------------------------------------------ annotations

#: GitOps provenance on applied objects: "<namespace>/<name>" of the owning GitSource
#: (labels cannot hold "/"), the commit, the file and the rendered digest.
SOURCE_ANNOTATION = f"gitops.{GROUP}/source"
COMMIT_ANNOTATION = f"gitops.{GROUP}/commit"
PATH_ANNOTATION = f"gitops.{GROUP}/path"
DIGEST_ANNOTATION = f"gitops.{GROUP}/digest"
#: User-facing annotations on a GitSource.
RECONCILE_NOW_ANNOTATION = f"{GROUP}/reconcile-now"
CONFIRM_DELETION_ANNOTATION = f"{GROUP}/confirm-deletion"
#: Set by a user on a live object that exists without a GitSource's label: "true" lets the
#: GitSource defining it take it over, "<namespace>/<name>" also takes it from another one.
ADOPT_ANNOTATION = f"{GROUP}/adopt"
#: Set on a VmJob to ask for its cancellation.
CANCEL_ANNOTATION = f"{GROUP}/cancel"

# ------------------------------------------------------------------ finalizers

#: The pool controller's finalizer: deleting a pool deletes its members first.
POOL_FINALIZER = f"{GROUP}/pool-members"


def role_finalizer(role: str) -> str:
    """kopf's finalizer for one role ("controller", "agent", ...): separate per role so that
    the controller and the agents never remove each other's."""
    return f"{GROUP}/{role}"


def role_annotation_prefix(role: str) -> str:
    """kopf's annotation prefix (progress, last-handled) for one role, for the same reason."""
    return f"{role}.{GROUP}"


# ------------------------------------------------------------------ conditions

#: Condition types read by more than one module (the controller, the agent, gitops health,
#: printer columns and the CLI). Ready and Scheduled: VMs' and WorkerNodes' (Ready), VmJobs'
#: (Scheduled) and GitSources' (Ready) alike.
CONDITION_READY = "Ready"
CONDITION_SCHEDULED = "Scheduled"
#: A VM's, written by its agent; gitops health, eviction, pools and the CLI read them.
CONDITION_FAILURE = "Failure"
CONDITION_LIVE_MIGRATABLE = "LiveMigratable"
CONDITION_IMAGE_READY = "ImageReady"
CONDITION_GUEST_HEALTHY = "GuestHealthy"
#: A GitSource's, written by its reconciler; the CLI reads it.
CONDITION_RECONCILING = "Reconciling"
#: A VirtualMachinePool's, written by its planner; gitops health reads them.
CONDITION_AVAILABLE = "Available"
CONDITION_PROGRESSING = "Progressing"
CONDITION_REPLICA_FAILURE = "ReplicaFailure"
#: A VmJob's (mirroring its phase, for ``kubectl wait``); the CLI reads Failed.
CONDITION_COMPLETE = "Complete"
CONDITION_FAILED = "Failed"

#: Condition reasons read by more than one module: a WorkerNode's Ready (its agent and the
#: controller), and a GitSource's Reconciling (its reconciler; the CLI waits on it).
REASON_AGENT_HEARTBEAT = "AgentHeartbeat"
REASON_PROGRESSING = "Progressing"


def condition_path(type_: str, field: str = "status") -> str:
    """A printer column's JSONPath to one condition's field."""
    return f'.status.conditions[?(@.type=="{type_}")].{field}'
