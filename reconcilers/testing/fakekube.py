"""One in-memory API server implementing ``KubeApi``, shared by the unit tests and bench/.

It does what the product relies on: increasing resourceVersions, conditional patches
(``metadata.resourceVersion`` in the patch: 409 ``Conflict`` when stale), 404s (``None``
from get, ``Gone`` from patch), JSON merge patches (RFC 7386: a ``None`` removes a key;
``status=True`` writes only the status, as the status subresource does), Leases and Events
recorded for assertions."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from datetime import datetime
from typing import Any

from hyperfleet.reconcilers.kube import Conflict, Gone, Items, KubeApi, Resource


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

    def _key(self, res: Resource, name: str, ns: str | None) -> tuple[str, str]:
        return res.plural, f"{ns or 'default'}/{name}" if res.namespaced else name

    def put(self, res: Resource, body: dict[str, Any], keep_version: bool = False) -> dict[str, Any]:
        """Store ``body`` as is (status included) with a new resourceVersion, or the one it
        has with ``keep_version``: test setup."""
        body = copy.deepcopy(body)
        if not keep_version:
            body["metadata"]["resourceVersion"] = str(next(self.rv))
        self.objs[self._key(res, body["metadata"]["name"], body["metadata"].get("namespace"))] = body
        return copy.deepcopy(body)

    def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        b = self.objs.get(self._key(res, name, namespace))
        return copy.deepcopy(b) if b else None

    def list(self, res: Resource, namespace: str | None = None,
             field_selector: str | None = None, cached: bool = False) -> Items:
        return self.snapshot(res, namespace, field_selector, cached)[0]

    def snapshot(self, res: Resource, namespace: str | None = None,
                 field_selector: str | None = None, cached: bool = False,
                 each: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                 ) -> tuple[Items, str]:
        items = [copy.deepcopy(b) for (p, _), b in self.objs.items() if p == res.plural
                 and (not namespace or not res.namespaced
                      or b["metadata"].get("namespace", "default") == namespace)
                 and _selected(b, field_selector)]
        return [each(b) for b in items] if each else items, str(next(self.rv))

    def create(self, res: Resource, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.get("metadata", {})
        if self._key(res, meta["name"], meta.get("namespace")) in self.objs:
            raise Conflict(f"{res.plural}/{meta['name']} already exists")
        return self.put(res, body)

    def patch(self, res: Resource, name: str, patch: dict[str, Any],
              namespace: str | None = None, status: bool = False) -> dict[str, Any]:
        key = self._key(res, name, namespace)
        cur = self.objs.get(key)
        if cur is None:
            raise Gone(name)
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
        new["metadata"]["resourceVersion"] = str(next(self.rv))
        self.objs[key] = new
        self.writes.append(sent)
        return copy.deepcopy(new)

    def delete(self, res: Resource, name: str, namespace: str | None = None) -> None:
        self.objs.pop(self._key(res, name, namespace), None)

    def renew_lease(self, namespace: str, name: str, holder: str, seconds: int,
                    labels: dict[str, str]) -> None:
        self.leases[name] = (holder, dict(labels))

    def peering_status(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.peering.get(name, {}))

    def lease_renewals(self, label: str) -> dict[str, datetime]:
        return dict(self.renewals)

    def event(self, involved: dict[str, Any], reason: str, message: str,
              type_: str = "Normal", component: str = "hyperfleet") -> None:
        self.events.append(((involved.get("metadata") or {}).get("name", ""), reason, message,
                            type_))


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
