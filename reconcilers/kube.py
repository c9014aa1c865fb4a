"""Thin Kubernetes API client for the Hyperfleet kinds (sync; call via asyncio.to_thread)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast
from urllib.parse import quote

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from . import conventions as conv
from .conventions import GROUP, VERSION, KindId

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resource:
    """Where a kind lives on the API server (the two facts a custom-object call needs)."""

    plural: str
    namespaced: bool

    @classmethod
    def of(cls, kind: KindId) -> Resource:
        return cls(kind.plural, kind.namespaced)


VMS = Resource.of(conv.VIRTUAL_MACHINE)
NODES = Resource.of(conv.WORKER_NODE)
JOBS = Resource.of(conv.VM_JOB)
GITSOURCES = Resource.of(conv.GIT_SOURCE)
POOLS = Resource.of(conv.VIRTUAL_MACHINE_POOL)


#: The items of a list response.
Items = list[dict[str, Any]]
#: A JSON patch (RFC 6902): its operations, ``test`` ones making it conditional.
JsonPatch = list[dict[str, Any]]
#: Objects per page of a full list.
LIST_PAGE = 500


class Conflict(Exception):
    """The object changed since it was read (HTTP 409): re-read and decide again."""


class Gone(Conflict):
    """The object was deleted since it was read (HTTP 404): a conflict nothing can win."""


class Expired(Exception):
    """A watch's resourceVersion is older than the API server keeps (HTTP 410): list again."""


def _transient(exc: BaseException) -> bool:
    # 429: the API server's storage is (re)initialising right after start; 5xx: hiccups.
    return isinstance(exc, ApiException) and exc.status in (429, 500, 502, 503, 504)


#: Retry policy for every Kubernetes API call Hyperfleet makes (transient failures only).
api_retry = retry(
    retry=retry_if_exception(_transient),
    stop=stop_after_attempt(6),
    wait=wait_exponential(multiplier=0.1, max=2),
    reraise=True,
)


def request(api: Any, method: str, path: str, body: Any = None,
            content_type: str | None = None, query: list[tuple[str, Any]] | None = None
            ) -> dict[str, Any]:
    """One API request, plain JSON in and out. The generated methods validate each argument
    with pydantic and build models, a fifth of a request's client CPU (0.70 vs 0.57 ms per
    status patch, measured): too much for the calls made per VM started."""
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    _, url, headers, data, _ = api.param_serialize(
        method, path, query_params=query, header_params=headers, body=body,
        auth_settings=["BearerToken"])
    answer = api.call_api(method, url, header_params=headers, body=data)
    answer.read()  # (returns the connection to the pool)
    if not 200 <= answer.status < 300:
        raise ApiException(http_resp=answer)
    return cast(dict[str, Any], json.loads(answer.data)) if answer.data else {}


def object_path(res: Resource, name: str | None = None, namespace: str | None = None,
                subresource: str | None = None) -> str:
    """The URL path of a Hyperfleet object (or of its kind's collection, ``name`` None)."""
    path = f"/apis/{GROUP}/{VERSION}"
    if res.namespaced:
        path += f"/namespaces/{quote(namespace or 'default', safe='')}"
    path += f"/{res.plural}"
    if name is not None:
        path += f"/{quote(name, safe='')}"
    if subresource:
        path += f"/{subresource}"
    return path


def load_config(kubeconfig: str | None = None) -> None:
    """In-cluster config when running in a pod, else the kubeconfig."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]


class KubeApi(Protocol):
    """What the controller, the agent and the job runner call on the API: ``Kube`` in
    production, FakeKube (reconcilers/testing/fakekube.py) in unit tests. Code that needs more
    (the raw client: server-side apply, Secrets) takes ``Kube`` itself."""

    def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        ...

    def list(self, res: Resource, namespace: str | None = None,
             field_selector: str | None = None, cached: bool = False) -> Items: ...

    def snapshot(self, res: Resource, namespace: str | None = None,
                 field_selector: str | None = None, cached: bool = False,
                 each: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                 ) -> tuple[Items, str]: ...

    def create(self, res: Resource, body: dict[str, Any]) -> dict[str, Any]: ...

    def patch(self, res: Resource, name: str, patch: dict[str, Any] | JsonPatch,
              namespace: str | None = None, status: bool = False) -> dict[str, Any]: ...

    def delete(self, res: Resource, name: str, namespace: str | None = None) -> None: ...

    def renew_lease(self, namespace: str, name: str, holder: str, seconds: int,
                    labels: dict[str, str]) -> None: ...

    def peering_status(self, name: str) -> dict[str, Any]: ...

    def lease_renewals(self, label: str) -> dict[str, datetime]: ...

    def event(self, involved: dict[str, Any], reason: str, message: str,
              type_: str = "Normal", component: str = "hyperfleet") -> None: ...


class Kube:
    """The real API client (implements ``KubeApi``)."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        # The generated client's annotations say `object`; treat its answers as JSON.
        self.api: Any = client.CustomObjectsApi(api_client)
        # Made once: each API class costs about a millisecond to build. (Events go out
        # without CoreV1Api, whose import alone costs a second and 20 MB.)
        self.coordination: Any = client.CoordinationV1Api(self.api.api_client)

    @api_retry
    def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return request(self.api.api_client, "GET", object_path(res, name, namespace))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, res: Resource, namespace: str | None = None,
             field_selector: str | None = None, cached: bool = False) -> Items:
        return self.snapshot(res, namespace, field_selector, cached)[0]

    @api_retry
    def snapshot(self, res: Resource, namespace: str | None = None,
                 field_selector: str | None = None, cached: bool = False,
                 each: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 label_selector: str | None = None) -> tuple[Items, str]:
        """The items and the list's resourceVersion (the point in time they describe).

        ``cached``: from the API server's watch cache (resourceVersion "0"), possibly a
        moment old but no read of etcd: for polls, never for decisions that need the latest
        (fencing). Otherwise read in pages of LIST_PAGE, each item passed through ``each``
        as its page arrives: a fleet read in one piece is ~10 KB of JSON per VM parsed at
        once, and the heap it grows to stays with the process."""
        kw: dict[str, Any] = {"field_selector": field_selector} if field_selector else {}
        if label_selector:
            kw["label_selector"] = label_selector
        if cached:
            kw["resource_version"] = "0"
        else:
            kw["limit"] = LIST_PAGE
        items: Items = []
        while True:
            try:
                if res.namespaced and namespace:
                    out = self.api.list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                 res.plural, **kw)
                else:
                    out = self.api.list_cluster_custom_object(GROUP, VERSION, res.plural, **kw)
            except ApiException as exc:
                if exc.status == 410 and "_continue" in kw:  # expired between pages
                    items = []
                    del kw["_continue"]
                    continue
                raise
            page = out.get("items") or []
            items.extend(map(each, page) if each else page)
            meta = out.get("metadata") or {}
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion", ""))
            kw["_continue"] = meta["continue"]
            del out, page  # not held while the next page is read

    def watch(self, res: Resource, resource_version: str, field_selector: str | None = None,
              label_selector: str | None = None, timeout: int = 60
              ) -> Iterator[tuple[str, dict[str, Any]]]:
        """One watch request from ``resource_version``, all namespaces: (type, object) per
        event until the API server ends it after ``timeout`` seconds. BOOKMARK events carry
        only the resourceVersion to resume from. Raises ``Expired`` when the version is
        older than the server keeps; the caller lists again."""
        kw: dict[str, Any] = {
            "watch": True, "resource_version": resource_version, "allow_watch_bookmarks": True,
            "timeout_seconds": timeout, "_preload_content": False,
            # No read may hang past the server's own end of the request.
            "_request_timeout": (10, timeout + 30)}
        if field_selector:
            kw["field_selector"] = field_selector
        if label_selector:
            kw["label_selector"] = label_selector
        try:
            resp = self.api.list_cluster_custom_object(GROUP, VERSION, res.plural, **kw)
        except ApiException as exc:
            if exc.status == 410:
                raise Expired(f"{res.plural} at {resource_version}") from exc
            raise
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    if status.get("code") == 410:
                        raise Expired(f"{res.plural}: {status.get('message')}")
                    raise ApiException(status=status.get("code"), reason=status.get("message"))
                yield event["type"], event["object"]
        finally:
            resp.release_conn()

    @api_retry
    def create(self, res: Resource, body: dict[str, Any]) -> dict[str, Any]:
        ns = body.get("metadata", {}).get("namespace") or "default"
        return request(self.api.api_client, "POST", object_path(res, None, ns), body,
                       "application/json")

    @api_retry
    def patch(
        self,
        res: Resource,
        name: str,
        patch: dict[str, Any] | JsonPatch,
        namespace: str | None = None,
        status: bool = False,
    ) -> dict[str, Any]:
        """JSON merge patch; put metadata.resourceVersion in ``patch`` to make it conditional.
        A list is a JSON patch (its ``test`` operations make it conditional)."""
        kind = "json-patch" if isinstance(patch, list) else "merge-patch"
        try:
            return request(self.api.api_client, "PATCH",
                           object_path(res, name, namespace, "status" if status else None),
                           patch, f"application/{kind}+json")
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(f"{res.plural}/{name} changed since it was read") from exc
            if exc.status == 404:
                raise Gone(f"{res.plural}/{name} no longer exists") from exc
            if exc.status == 422 and isinstance(patch, list):  # a failed ``test``
                raise Conflict(f"{res.plural}/{name} changed since it was read") from exc
            raise

    @api_retry
    def delete(self, res: Resource, name: str, namespace: str | None = None) -> None:
        try:
            request(self.api.api_client, "DELETE", object_path(res, name, namespace))
        except ApiException as exc:
            if exc.status != 404:
                raise

    @api_retry
    def renew_lease(self, namespace: str, name: str, holder: str, seconds: int,
                    labels: dict[str, str]) -> None:
        """Create or renew a coordination.k8s.io Lease: the cheap way to say "alive"."""
        api = self.coordination
        now = datetime.now(UTC)
        spec = client.V1LeaseSpec(holder_identity=holder, lease_duration_seconds=seconds,
                                  renew_time=now)
        try:
            api.patch_namespaced_lease(name, namespace, {"spec": {
                "holderIdentity": holder, "leaseDurationSeconds": seconds,
                "renewTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}})
        except ApiException as exc:
            if exc.status != 404:
                raise
            spec.acquire_time = now
            api.create_namespaced_lease(namespace, client.V1Lease(
                metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels=labels),
                spec=spec))

    @api_retry
    def peering_status(self, name: str) -> dict[str, Any]:
        """The keep-alives in kopf's ClusterKopfPeering ``name`` ({} when it is missing)."""
        try:
            body = self.api.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", name)
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        return dict(body.get("status") or {})

    @api_retry
    def lease_renewals(self, label: str) -> dict[str, datetime]:
        """``label`` value -> renewTime of every Lease carrying ``label``, cluster-wide."""
        api = self.coordination
        out: dict[str, datetime] = {}
        for lease in api.list_lease_for_all_namespaces(label_selector=label).items:
            owner = ((lease.metadata and lease.metadata.labels) or {}).get(label)
            if owner and lease.spec and lease.spec.renew_time:
                out[owner] = lease.spec.renew_time
        return out

    def event(
        self,
        involved: dict[str, Any],
        reason: str,
        message: str,
        type_: str = "Normal",
        component: str = "hyperfleet",
    ) -> None:
        """Best-effort Kubernetes Event; a failure to record must never break a reconcile."""
        meta = involved.get("metadata", {})
        ns = meta.get("namespace") or "default"
        body = {
            "metadata": {"generateName": f"{meta.get('name', 'x')}."},
            "involvedObject": {k: v for k, v in (
                ("apiVersion", involved.get("apiVersion")), ("kind", involved.get("kind")),
                ("name", meta.get("name")), ("namespace", meta.get("namespace")),
                ("uid", meta.get("uid"))) if v is not None},
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": component},
            "count": 1,
        }
        try:
            # A plain body and an unread answer: the generated models cost more CPU than
            # the request itself, and Events are the most frequent write after status.
            api = self.api.api_client
            request = api.param_serialize(
                "POST", "/api/v1/namespaces/{namespace}/events", path_params={"namespace": ns},
                header_params={"Content-Type": "application/json"}, body=body,
                auth_settings=["BearerToken"])
            answer = api.call_api(*request)
            answer.read()  # (returns the connection to the pool)
            if not 200 <= answer.status < 300:
                raise ApiException(status=answer.status, reason=answer.reason)
        except Exception as exc:
            log.debug("event not recorded: %s", exc)
