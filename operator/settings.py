"""Process configuration and the kopf settings shared by the controller and the agents."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import kopf

from hyperfleet.reconcilers.conventions import role_annotation_prefix, role_finalizer
from hyperfleet.reconcilers.kube import LIST_PAGE

DEFAULT_EVICTION_SECONDS = 300.0
#: Half the eviction timeout: a partitioned node pauses its VMs well before the controller
#: may start them elsewhere, with room for clock skew and a slow watch.
DEFAULT_FENCE_AFTER = DEFAULT_EVICTION_SECONDS / 2


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    ch_binary: str = "cloud-hypervisor"
    socket_dir: str = "/run/hyperfleet"
    pool: str = "default"
    cpus: int | None = None  # None: discover from the host
    memory: str | None = None
    heartbeat_seconds: float = 5.0
    # A converged VM's loop wakes on VMM events (inotify on its event monitor), its VMM's
    # exit (pidfd), a 5 s sweep of both, and changes to the object; cloud-hypervisor
    # reports every state change as an event, so this periodic vm.info is a last resort
    # (and was the bulk of an idle node's CPU at 60 s).
    resync_seconds: float = 300.0
    lease_namespace: str = "hyperfleet-system"
    capabilities: tuple[str, ...] = ()  # declared by the operator, on top of discovered ones
    migration_address: str | None = None  # reachable IP for incoming live migrations
    fence_after_seconds: float = DEFAULT_FENCE_AFTER  # 0: never fence
    vmm_args: tuple[str, ...] = ()  # appended to every cloud-hypervisor command line
    state_dir: str = "/var/lib/hyperfleet"  # image cache and the VMs' root disks
    allowed_path_roots: tuple[str, ...] = ()  # () : DEFAULT_ROOTS
    image_cache_size: str = "20Gi"


@dataclass(frozen=True)
class Peering:
    """This replica's kopf peering entry: the scheduling loop runs only while it is the
    active one (see ``hyperfleet.reconcilers.peering``)."""

    name: str
    identity: str
    priority: int


@dataclass(frozen=True)
class ControllerConfig:
    node_grace_seconds: float = 20.0
    eviction_seconds: float = DEFAULT_EVICTION_SECONDS  # NotReady this long: the node is lost, VMs move
    scheduling_policy: str = "spread"  # or "binpack"
    resync_seconds: float = 2.0
    peering: Peering | None = None  # None: the only replica, always active
    peering_lifetime: int = 60  # seconds a silent replica stays the active one


class NoDiffBase(kopf.DiffBaseStorage):
    """No "last handled" copy of each object. kopf keeps one for creation/update/resume
    handlers, which neither role registers (see ``CHANGE_HANDLERS_FORBIDDEN``), and it
    would cost a deep copy of every object on every watch event plus one extra write of
    every new VM. Deletion handlers work without it: kopf detects deletion from the
    deletionTimestamp, not from a diff."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return None

    def fetch(self, *, body: kopf.Body) -> Any:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


#: Handler kinds that need kopf's diff base, which ``NoDiffBase`` does without.
CHANGE_HANDLERS_FORBIDDEN = ("create", "update", "resume")


def configure_kopf(settings: kopf.OperatorSettings, role: str) -> None:
    """Separate finalizers and annotation prefixes per role, so that the controller and
    every agent can handle the same objects without reading each other's bookkeeping."""
    prefix = role_annotation_prefix(role)
    settings.persistence.finalizer = role_finalizer(role)
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 70
    settings.networking.request_timeout = 30
    # List in pages: one LIST of 10,000 VMs is ~100 MB of JSON parsed at once, and the heap
    # it grows to stays with the process (RSS) long after the objects are gone.
    settings.watching.chunk_size = LIST_PAGE
    # One cheap asyncio worker per object, leaving as soon as it is idle: a worker limit
    # makes objects beyond it wait for idle workers to time out (a 60 s stall at scale),
    # and an idle worker holds its object's last raw body (at 5 s, an initial listing of
    # 10,000 VMs kept most of them alive at once: 83 MiB more RSS for good).
    settings.queueing.worker_limit = None
    settings.queueing.idle_timeout = 0.5
