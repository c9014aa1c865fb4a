"""VirtualMachinePools in the controller: watch events in, planner decisions out.

One asyncio worker per pool wakes when its pool's spec changes or one of its members
changes, plans with the pure ``plan_pool`` and carries the plan out (member creates and
deletes, finalizer, status). Members are known from an in-memory index fed by the VM
watch the controller already has, filtered by kopf to VMs with the pool label, so a pool
costs work proportional to its own members, never a re-list of the fleet; each pool's
members are listed once (by label) when its worker starts or this replica becomes the
active one, since a standby's watches are paused and miss changes.

Deleting a pool deletes its members first (the pool's ``hyperfleet.dev/pool-members``
finalizer): a cluster may have no garbage collector (the local API server has none),
and owner references alone would then leave the VMs running.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from hyperfleet.reconcilers.kube import POOLS, VMS, Conflict, Gone, Kube
from hyperfleet.reconcilers.models.common import GROUP, VERSION, now_utc, version_of
from hyperfleet.reconcilers.models.pool import POOL_LABEL
from hyperfleet.reconcilers.pools import (
    FINALIZER,
    Create,
    Delete,
    PoolPlan,
    is_member,
    plan_pool,
    with_failure,
)

from .tasks import cancel_all

log = logging.getLogger("hyperfleet.pools")

RESYNC = 30.0  # seconds between two plans of a quiet pool (a safety net, not the driver)
ERROR_RETRY = 2.0  # seconds before a plan whose API calls failed is tried again
DEBOUNCE = 0.1  # seconds to gather a burst of member events into one plan
STANDBY_RECHECK = 1.0
API_WORKERS = 8  # concurrent member creates/deletes across all pools


def _key(body: dict[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def _always() -> bool:
    return True


def _store(store: dict[str, dict[str, Any]], key: str, body: dict[str, Any]) -> None:
    """Keep ``body`` unless a newer version (resourceVersion) is already there."""
    have = store.get(key)
    if have is None or version_of(have) <= version_of(body):
        store[key] = body


def _wakes(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """Whether a pool event asks for a plan: not for our own status writes."""
    if old is None:
        return True
    o, n = old.get("metadata") or {}, new.get("metadata") or {}
    return any(o.get(f) != n.get(f) for f in ("generation", "deletionTimestamp", "finalizers",
                                              "uid"))


class Pools:
    """The known pools and their members (from watch events), and a worker per pool.

    ``active``: whether this replica may act now (kopf peering's active replica)."""

    def __init__(self, kube: Kube, active: Callable[[], bool] | None = None) -> None:
        self.kube = kube
        self.active = active or _always
        self.pools: dict[str, dict[str, Any]] = {}
        #: pool key -> VM name -> body, for every VM labelled with that pool's name.
        self.vms: dict[str, dict[str, dict[str, Any]]] = {}
        #: pool key -> members whose delete we sent and whose watch event has not come yet:
        #: they count as terminating, so the next plan does not delete one more.
        self.deleting: dict[str, set[str]] = {}
        self.wakeups: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.primed: set[str] = set()
        self.executor = ThreadPoolExecutor(max_workers=API_WORKERS, thread_name_prefix="pools")

    # ------------------------------------------------------------------ watch side

    def observe_pool(self, event_type: str | None, body: dict[str, Any]) -> None:
        key = _key(body)
        if event_type == "DELETED":
            self.pools.pop(key, None)
            self.primed.discard(key)
            task = self.tasks.pop(key, None)
            if task:
                task.cancel()
            self.wakeups.pop(key, None)
            return
        old = self.pools.get(key)
        if old is not None and version_of(old) > version_of(body):
            return  # older than what our own write returned
        self.pools[key] = body
        task = self.tasks.get(key)
        if task is None or task.done():
            self.wakeups[key] = asyncio.Event()
            self.tasks[key] = asyncio.create_task(self._worker(key), name=f"pool {key}")
        elif _wakes(old, body):
            self.wakeups[key].set()

    def observe_vm(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        pool = (meta.get("labels") or {}).get(POOL_LABEL)
        if not pool:
            return
        key = f"{meta.get('namespace') or 'default'}/{pool}"
        name = str(meta.get("name"))
        members = self.vms.setdefault(key, {})
        if event_type == "DELETED":
            members.pop(name, None)
            self.deleting.get(key, set()).discard(name)
        else:
            _store(members, name, body)
            if meta.get("deletionTimestamp"):
                self.deleting.get(key, set()).discard(name)
        wake = self.wakeups.get(key)
        if wake is not None:
            wake.set()

    # ------------------------------------------------------------------ workers

    def is_active(self) -> bool:
        try:
            return bool(self.active())
        except Exception:
            log.exception("cannot tell whether this replica is active; standing by")
            return False

    async def _worker(self, key: str) -> None:
        wake = self.wakeups[key]
        while key in self.pools:
            if not self.is_active():
                self.primed.discard(key)  # our watches are paused: read afresh when active
                await asyncio.sleep(STANDBY_RECHECK)
                continue
            try:
                retry = await self.reconcile(key)
            except Exception:
                log.exception("pool reconcile crashed", extra={"pool": key})
                retry = ERROR_RETRY
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=retry)
            wake.clear()
            await asyncio.sleep(DEBOUNCE)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _list_members(self, namespace: str, pool: str) -> tuple[list[dict[str, Any]], str]:
        out = self.kube.api.list_namespaced_custom_object(
            GROUP, VERSION, namespace, VMS.plural, label_selector=f"{POOL_LABEL}={pool}")
        return list(out.get("items", [])), str((out.get("metadata") or {}).get("resourceVersion"))

    async def prime(self, key: str) -> None:
        """Read the pool's members once by label: the watch may not have delivered them
        all yet (controller start) or may have been paused (standby)."""
        ns, name = key.split("/", 1)
        items, at = await self._call(self._list_members, ns, name)
        listed = {str(b["metadata"]["name"]): b for b in items}
        members = self.vms.setdefault(key, {})
        at_version = version_of({"metadata": {"resourceVersion": at}})
        for gone in [n for n, b in members.items() if n not in listed
                     and version_of(b) <= at_version]:
            del members[gone]
        for n, b in listed.items():
            _store(members, n, b)
        self.primed.add(key)

    def members_of(self, key: str, pool: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
        """The pool's members (those we just deleted marked so), and other VMs' names."""
        deleting = self.deleting.get(key, set())
        members, occupied = [], []
        for name, body in self.vms.get(key, {}).items():
            if not is_member(pool, body):
                occupied.append(name)
                continue
            if name in deleting and not body["metadata"].get("deletionTimestamp"):
                body = {**body, "metadata": {**body["metadata"],
                                             "deletionTimestamp": "deleting"}}
            members.append(body)
        return members, occupied

    async def reconcile(self, key: str) -> float:
        """One plan, carried out; returns seconds until the next unprompted plan."""
        if key not in self.primed:
            await self.prime(key)
        pool = self.pools.get(key)
        if pool is None:
            return RESYNC
        members, occupied = self.members_of(key, pool)
        plan = plan_pool(pool, members, now_utc(), occupied)
        ns, name = key.split("/", 1)
        if plan.add_finalizer and not await self._set_finalizer(key, pool, add=True):
            return ERROR_RETRY
        failures = await self._carry_out(key, pool, plan)
        if plan.remove_finalizer:
            if not failures:
                await self._set_finalizer(key, pool, add=False)
            return ERROR_RETRY if failures else RESYNC
        status = plan.status
        if status is not None and failures:
            reason = "FailedCreate" if any(isinstance(a, Create) for a, _ in failures) \
                else "FailedDelete"
            status = with_failure(status, reason, "; ".join(f"{a}: {why}" for a, why in failures),
                                  (pool.get("metadata") or {}).get("generation"), now_utc())
        if status is not None and status != (pool.get("status") or {}):
            try:
                out = await self._call(self.kube.patch, POOLS, name, {"status": status}, ns, True)
            except Gone:
                return RESYNC
            _store(self.pools, key, out)
        return ERROR_RETRY if failures else RESYNC

    async def _carry_out(self, key: str, pool: dict[str, Any], plan: PoolPlan
                         ) -> list[tuple[Create | Delete, str]]:
        """Every create and delete at once (bounded by the executor); the failed ones."""
        ns = key.split("/", 1)[0]
        failures: list[tuple[Create | Delete, str]] = []

        async def one(action: Create | Delete) -> None:
            try:
                if isinstance(action, Create):
                    out = await self._call(self.kube.create, VMS, action.body)
                    self.deleting.get(key, set()).discard(action.name)
                    _store(self.vms.setdefault(key, {}), action.name, out)
                    log.info("pool member created", extra={
                        "pool": key, "member": action.name,
                        "revision": (plan.status or {}).get("updateRevision")})
                else:
                    await self._call(self.kube.delete, VMS, action.name, ns)
                    self.deleting.setdefault(key, set()).add(action.name)
                    log.info("pool member deleted", extra={"pool": key, "member": action.name,
                                                           "why": action.why})
            except ApiException as exc:
                why = ("a VirtualMachine of that name exists and is not this pool's member"
                       if exc.status == 409 and isinstance(action, Create)
                       else f"HTTP {exc.status}: {exc.reason}")
                failures.append((action, why))
            except Exception as exc:
                failures.append((action, str(exc) or type(exc).__name__))

        coros: list[Coroutine[Any, Any, None]] = [one(a) for a in plan.actions]
        await asyncio.gather(*coros)
        for action, why in failures:
            log.warning("pool member action failed", extra={"pool": key, "action": str(action),
                                                             "error": why})
            await self._call(self.kube.event, pool, "FailedCreate" if isinstance(action, Create)
                             else "FailedDelete", f"{action}: {why}", "Warning",
                             "hyperfleet-controller")
        return failures

    async def _set_finalizer(self, key: str, pool: dict[str, Any], add: bool) -> bool:
        """Add or remove our finalizer, conditional on the version the plan saw."""
        ns, name = key.split("/", 1)
        meta = pool["metadata"]
        have = list(meta.get("finalizers") or [])
        want = [*have, FINALIZER] if add else [f for f in have if f != FINALIZER]
        patch = {"metadata": {"finalizers": want, "resourceVersion": meta["resourceVersion"]}}
        try:
            out = await self._call(self.kube.patch, POOLS, name, patch, ns, False)
        except Gone:
            return False
        except Conflict:
            return False  # the pool changed: its watch event brings the new version
        if add:
            _store(self.pools, key, out)
        log.info("pool finalizer added" if add else "pool members deleted; finalizer removed",
                 extra={"pool": key})
        return True

    async def stop(self) -> None:
        await cancel_all(self.tasks.values())
        self.tasks.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)


def register(registry: kopf.OperatorRegistry, kube: Kube,
             vm_subscribers: list[Callable[[str, dict[str, Any]], None]],
             active: Callable[[], bool] | None = None) -> Pools:
    """Add the VirtualMachinePool handlers to a kopf registry (the controller process).
    Member events come from the controller's VM informer (``vm_subscribers``): one watch
    of the fleet per process."""
    pools = Pools(kube, active=active)
    vm_subscribers.append(pools.observe_vm)  # (it ignores VMs without the pool label)

    @kopf.on.cleanup(registry=registry, id="pools-cleanup")
    async def pools_cleanup(**_: Any) -> None:
        await pools.stop()

    @kopf.on.event(GROUP, VERSION, POOLS.plural, registry=registry, id="pools-pool-event")
    async def pool_event(*, event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        pools.observe_pool(event.get("type"), copy.deepcopy(dict(body)))

    return pools
