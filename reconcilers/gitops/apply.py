"""Server-side apply (field manager ``hyperfleet-gitops``, force) and guarded pruning.

SSA means the reconciler owns exactly the fields Git sets: status and anything controllers
or agents write stay theirs, a hand edit of a Git-owned field is taken back on the next
apply, and a field removed from Git is removed from the object. ``force`` only ever reaches
objects the plan found to be ours (or annotated for adoption): anything else is a conflict.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from hyperfleet.reconcilers.conventions import VIRTUAL_MACHINE
from hyperfleet.reconcilers.kube import Kube, Resource, api_retry, object_path, request
from hyperfleet.reconcilers.models.common import GROUP, VERSION

from .types import FIELD_MANAGER, KINDS, OWNER_LABEL, ObjectRef

log = logging.getLogger("hyperfleet.gitops.apply")

APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
T = TypeVar("T")
R = TypeVar("R")


class ApplyError(Exception):
    """The API server refused one object; the message is the server's, naming the field."""


def api_message(exc: ApiException) -> str:
    """The Status message of an API error (what kubectl would print)."""
    try:
        body = json.loads(exc.body or "{}")
        msg = body.get("message")
        if msg:
            return str(msg)
    except (ValueError, AttributeError):
        pass
    return f"HTTP {exc.status} {exc.reason}"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    error: str | None = None
    result: dict[str, Any] | None = None


class Applier:
    """Apply and delete Hyperfleet objects for the GitOps reconciler, ``workers`` at a time."""

    def __init__(self, kube: Kube, field_manager: str = FIELD_MANAGER, workers: int = 16,
                 vms: Callable[[], list[dict[str, Any]] | None] | None = None) -> None:
        # ``vms``: the VMs as the process's own watch has them (the controller's view, when
        # GitOps runs inside it), None until that view is complete. A fleet read from the
        # API server instead is ~7 KB of JSON per VM on every reconcile and health check
        # (70 MB at 10,000 VMs, and the heap it grows to stays with the process).
        self.vms = vms
        # An own client whose connection pool fits the workers (the default holds cpus*5
        # connections and would churn TLS connections under a 1,000-object apply).
        conf = copy.deepcopy(kube.api.api_client.configuration)
        conf.connection_pool_maxsize = max(conf.connection_pool_maxsize or 0, workers + 2)
        self.api: Any = client.CustomObjectsApi(client.ApiClient(conf))
        self.field_manager = field_manager
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="gitops-apply")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if len(items) <= 1:
            return [fn(i) for i in items]
        return list(self.pool.map(fn, items))

    @api_retry
    def _list(self, plural: str) -> list[dict[str, Any]]:
        out = self.api.list_cluster_custom_object(GROUP, VERSION, plural)
        return list(out.get("items", []))

    def _watched(self, kind: str) -> list[dict[str, Any]] | None:
        """Every object of ``kind`` from the process's own watch (VMs only), else None."""
        if kind != VIRTUAL_MACHINE.kind or self.vms is None:
            return None
        items = self.vms()
        if items is None:
            return None
        return [b if "kind" in b else {**b, "kind": kind} for b in items]

    def list_live(self, kinds: Iterable[str]) -> dict[ObjectRef, dict[str, Any]]:
        """Every object of these kinds, labelled or not: one list call per kind (not a GET per
        object, which a 1,000-object commit could not afford), so the plan can tell objects
        made by hand or by an agent from ours and leave them alone.

        A kind whose CRD is not installed has no objects; any other error propagates, since
        an incomplete view must never be mistaken for "deleted"."""
        live: dict[ObjectRef, dict[str, Any]] = {}
        for kind in sorted(set(kinds)):
            info = KINDS[kind]
            watched = self._watched(kind)
            if watched is not None:
                live.update((ObjectRef.of(item), item) for item in watched)
                continue
            try:
                items = self._list(info.plural)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            for item in items:
                item.setdefault("kind", kind)
                live[ObjectRef.of(item)] = item
        return live

    @api_retry
    def _list_labelled(self, plural: str, selector: str) -> list[dict[str, Any]]:
        # resourceVersion "0": from the API server's watch cache, not a quorum read of
        # etcd. A periodic health verdict may lag by a moment; etcd then serves nothing.
        out = self.api.list_cluster_custom_object(GROUP, VERSION, plural, label_selector=selector,
                                                  resource_version="0")
        return list(out.get("items", []))

    def list_owned(self, kind: str, owner: str) -> list[dict[str, Any]]:
        """Objects of ``kind`` carrying the ownership label ``owner`` (any namespace): the
        health check's one list call, filtered by the API server rather than here."""
        watched = self._watched(kind)
        if watched is not None:
            return [b for b in watched
                    if ((b.get("metadata") or {}).get("labels") or {}).get(OWNER_LABEL) == owner]
        items = self._list_labelled(KINDS[kind].plural, f"{OWNER_LABEL}={owner}")
        for item in items:
            item.setdefault("kind", kind)
        return items

    @api_retry
    def _patch(self, body: dict[str, Any], dry_run: bool) -> dict[str, Any]:
        ref = ObjectRef.of(body)
        info = KINDS[ref.kind]
        query: list[tuple[str, Any]] = [("fieldManager", self.field_manager), ("force", True),
                                        ("fieldValidation", "Strict")]
        if dry_run:
            query.append(("dryRun", "All"))
        res = Resource(info.plural, info.namespaced)
        return request(self.api.api_client, "PATCH", object_path(res, ref.name, ref.namespace),
                       body, APPLY_CONTENT_TYPE, query)

    def apply(self, body: dict[str, Any], dry_run: bool = False) -> Outcome:
        try:
            return Outcome(True, result=self._patch(body, dry_run))
        except ApiException as exc:
            msg = api_message(exc)
            if exc.status == 404 and "the server could not find the requested resource" in msg:
                msg = f"the {body.get('kind')} CRD is not installed in the cluster ({msg})"
            return Outcome(False, error=msg)

    def apply_all(self, bodies: Sequence[dict[str, Any]], dry_run: bool = False) -> list[Outcome]:
        return self.map(lambda b: self.apply(b, dry_run), bodies)

    @api_retry
    def _delete(self, ref: ObjectRef, uid: str | None) -> None:
        info = KINDS[ref.kind]
        # The uid precondition deletes the object we saw carrying our label, not a namesake.
        body = client.V1DeleteOptions(
            propagation_policy="Background",
            preconditions=client.V1Preconditions(uid=uid) if uid else None,
        )
        if info.namespaced:
            self.api.delete_namespaced_custom_object(
                GROUP, VERSION, ref.namespace, info.plural, ref.name, body=body)
        else:
            self.api.delete_cluster_custom_object(GROUP, VERSION, info.plural, ref.name, body=body)

    def delete(self, ref: ObjectRef, uid: str | None = None) -> Outcome:
        try:
            self._delete(ref, uid)
        except ApiException as exc:
            if exc.status == 404:
                return Outcome(True)
            return Outcome(False, error=api_message(exc))
        return Outcome(True)

    def delete_all(self, refs: Sequence[tuple[ObjectRef, str | None]]) -> list[Outcome]:
        return self.map(lambda r: self.delete(*r), refs)
