"""One in-memory API server implementing ``KubeApi``, shared by the unit tests and bench/.

It does what the product relies on: increasing resourceVersions, conditional patches
(``metadata.resourceVersion`` in the patch: 409 ``Conflict`` when stale), 404s (``None``
from get, ``Gone`` from patch), JSON merge patches (RFC 7386: a ``None`` removes a key;
``status=True`` writes only the status, as the status subresource does), metadata.generation
(1 at create, +1 at each change of the spec), one request at a time (an agent's threads and
the test share it), Leases and Events recorded for assertions, and the agents' Pods for the
code that lists them with ``CoreV1Api`` (``FakeCoreV1``)."""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import jsonpatch
import jsonpointer
from kubernetes import client

from hyperfleet.reconcilers.kube import Conflict, Gone, Items, JsonPatch, KubeApi, Resource

#: core/v1 Pods, kept like the custom objects (``put`` them): the console finds the agents'.
PODS = Resource("pods", namespaced=True)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch of ``patch`` onto ``target`` (a new value)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class FakeKube:
    """Objects by (plural, "<namespace>/<name>" or name), as the API server keys them."""

    def __init__(self) -> None:
        self.rv = itertools.count(100)
        self.objs: dict[tuple[str, str], dict[str, Any]] = {}
        #: (involved object's name, reason, message, type) of every Event posted.
        self.events: list[tuple[str, str, str, str]] = []
        #: Every patch accepted, as sent (resourceVersion precondition included).
        self.writes: list[dict[str, Any]] = []
        #: Lease name -> (holder, labels) of every renewal; renewal times for lease_renewals.
        self.leases: dict[str, tuple[str, dict[str, str]]] = {}
        self.renewals: dict[str, datetime] = {}
        self.peering: dict[str, dict[str, Any]] = {}
        #: The selectors of every pod list, as asked (``FakeCoreV1``).
        self.pod_lists: list[dict[str, str | None]] = []
        #: The API server handles one request at a time here (reentrant: a subclass may hold it
        #: around a call to note something atomically with it).
        self.lock = threading.RLock()
        #: ``Kube.api`` for code that builds another API class on its client
        #: (``client.CoreV1Api(kube.api.api_client)``): the client is this fake, for
        #: ``FakeCoreV1`` to stand in for that class. Any other use of it fails loudly.
        self.api = SimpleNamespace(api_client=self)

    def _key(self, res: Resource, name: str, ns: str | None) -> tuple[str, str]:
        return res.plural, f"{ns or 'default'}/{name}" if res.namespaced else name

    def put(self, res: Resource, body: dict[str, Any], keep_version: bool = False) -> dict[str, Any]:
        """Store ``body`` as is (status included) with a new resourceVersion, or the one it
        has with ``keep_version``: test setup."""
        with self.lock:
            body = copy.deepcopy(body)
            if not keep_version:
                body["metadata"]["resourceVersion"] = str(next(self.rv))
            self.objs[self._key(res, body["metadata"]["name"], body["metadata"].get("namespace"))] = body
            return copy.deepcopy(body)

    def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        with self.lock:
            b = self.objs.get(self._key(res, name, namespace))
            return copy.deepcopy(b) if b else None

    def list(self, res: Resource, namespace: str | None = None,
             field_selector: str | None = None, cached: bool = False) -> Items:
        return self.snapshot(res, namespace, field_selector, cached)[0]

    def snapshot(self, res: Resource, namespace: str | None = None,
                 field_selector: str | None = None, cached: bool = False,
                 each: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                 ) -> tuple[Items, str]:
        with self.lock:
            items = [copy.deepcopy(b) for (p, _), b in self.objs.items() if p == res.plural
                     and (not namespace or not res.namespaced
                          or b["metadata"].get("namespace", "default") == namespace)
                     and _selected(b, field_selector)]
            version = str(next(self.rv))
        return [each(b) for b in items] if each else items, version

    def create(self, res: Resource, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            meta = body.get("metadata", {})
            if self._key(res, meta["name"], meta.get("namespace")) in self.objs:
                raise Conflict(f"{res.plural}/{meta['name']} already exists")
            return self.put(res, {**body, "metadata": {**meta, "generation": 1}})

    def patch(self, res: Resource, name: str, patch: dict[str, Any] | JsonPatch,
              namespace: str | None = None, status: bool = False) -> dict[str, Any]:
        with self.lock:
            key = self._key(res, name, namespace)
            cur = self.objs.get(key)
            if cur is None:
                raise Gone(name)
            if isinstance(patch, list):  # a JSON patch: its failed ``test`` is a conflict
                try:
                    new = jsonpatch.apply_patch(cur, patch)
                except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                    raise Conflict(name) from exc
                new["metadata"]["resourceVersion"] = str(next(self.rv))
                self.objs[key] = new
                self.writes.append({"jsonPatch": copy.deepcopy(patch)})
                return copy.deepcopy(new)
            sent = copy.deepcopy(patch)
            body = copy.deepcopy(patch)
            want = (body.get("metadata") or {}).pop("resourceVersion", None)
            if want is not None and want != cur["metadata"]["resourceVersion"]:
                raise Conflict(name)
            if status:  # the status subresource ignores everything else
                body = {"status": body["status"]} if "status" in body else {}
            else:  # ... and the main resource ignores the status
                body.pop("status", None)
            new = merge_patch(cur, body)
            if _desired(new) != _desired(cur):  # a new spec: a new generation, as upstream
                new["metadata"]["generation"] = int(cur["metadata"].get("generation") or 1) + 1
            new["metadata"]["resourceVersion"] = str(next(self.rv))
            self.objs[key] = new
            self.writes.append(sent)
            return copy.deepcopy(new)

    def delete(self, res: Resource, name: str, namespace: str | None = None) -> None:
        with self.lock:
            self.objs.pop(self._key(res, name, namespace), None)

    def renew_lease(self, namespace: str, name: str, holder: str, seconds: int,
                    labels: dict[str, str]) -> None:
        with self.lock:
            self.leases[name] = (holder, dict(labels))

    def peering_status(self, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.peering.get(name, {}))

    def lease_renewals(self, label: str) -> dict[str, datetime]:
        with self.lock:
            return dict(self.renewals)

    def event(self, involved: dict[str, Any], reason: str, message: str,
              type_: str = "Normal", component: str = "hyperfleet") -> None:
        with self.lock:
            self.events.append(((involved.get("metadata") or {}).get("name", ""), reason, message,
                                type_))


class FakeCoreV1:
    """``kubernetes.client.CoreV1Api`` on a FakeKube's Pods (``PODS``), for the pod list the
    console makes: monkeypatch ``kubernetes.client.CoreV1Api`` with this class. Answers are the
    generated client's models, as the real class returns them."""

    def __init__(self, api_client: FakeKube) -> None:
        self.kube = api_client

    def list_pod_for_all_namespaces(self, label_selector: str | None = None,
                                    field_selector: str | None = None) -> client.V1PodList:
        with self.kube.lock:
            self.kube.pod_lists.append({"label_selector": label_selector,
                                        "field_selector": field_selector})
            pods = [b for b in self.kube.list(PODS, field_selector=field_selector)
                    if _labelled(b, label_selector)]
        return client.V1PodList(items=[client.V1Pod(metadata=client.V1ObjectMeta(
            name=b["metadata"]["name"], namespace=b["metadata"].get("namespace", "default"),
            labels=b["metadata"].get("labels"),
            resource_version=b["metadata"]["resourceVersion"])) for b in pods])


def _labelled(body: dict[str, Any], label_selector: str | None) -> bool:
    """``key=value`` terms joined by commas (equality-based; anything else is refused, so
    that a test never passes on a selector this fake does not understand)."""
    labels = (body.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (label_selector or "").split(",")):
        key, sep, want = term.partition("=")
        if not sep or want.startswith("=") or key.endswith("!") or not key:
            raise NotImplementedError(f"label selector term {term!r}")
        if labels.get(key) != want:
            return False
    return True


def _desired(body: dict[str, Any]) -> dict[str, Any]:
    """What metadata.generation counts changes of: everything but metadata and status."""
    return {k: v for k, v in body.items() if k not in ("metadata", "status")}


def _selected(body: dict[str, Any], field_selector: str | None) -> bool:
    """``a.b=value`` selectors joined by commas, as the CRDs' selectable fields allow."""
    for term in filter(None, (field_selector or "").split(",")):
        path, _, want = term.partition("=")
        value: Any = body
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if str(value if value is not None else "") != want:
            return False
    return True


_: type[KubeApi] = FakeKube  # mypy checks that the fake still fits the Protocol
