"""The API client against the real API server: full lists are read in pages; an informer
lists, watches and recovers from an expired watch."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hyperfleet.reconcilers import kube as kube_mod
from hyperfleet.reconcilers.conventions import API_VERSION, VIRTUAL_MACHINE
from hyperfleet.reconcilers.informer import Event, Informer
from hyperfleet.reconcilers.kube import VMS, Conflict, Expired, Gone, Kube, load_config
from tests.integration.conftest import Cluster


def test_a_full_list_is_read_in_pages_each_item_passed_on_as_its_page_arrives(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    load_config(str(cluster.kubeconfig))
    kube = Kube()
    names = [f"vm{i}" for i in range(7)]
    for name in names:
        kube.create(VMS, {"apiVersion": API_VERSION, "kind": VIRTUAL_MACHINE.kind,
                          "metadata": {"name": name, "namespace": cluster.namespace},
                          "spec": {"cpus": 1, "memory": "64Mi", "boot": {"kernel": "/k"}}})
    monkeypatch.setattr(kube_mod, "LIST_PAGE", 3)
    calls: list[dict[str, Any]] = []
    real = kube.api.list_namespaced_custom_object

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(dict(kw))
        return real(*args, **kw)

    kube.api.list_namespaced_custom_object = counting
    items, version = kube.snapshot(VMS, cluster.namespace,
                                   each=lambda b: {"name": b["metadata"]["name"]})
    assert sorted(i["name"] for i in items) == names
    assert [c.get("limit") for c in calls] == [3, 3, 3]
    assert "_continue" not in calls[0] and calls[1]["_continue"] and calls[2]["_continue"]
    assert int(version) > 0
    # A cached read (the watch cache) is one request, not paged.
    calls.clear()
    items, _ = kube.snapshot(VMS, cluster.namespace, cached=True)
    assert len(items) == 7 and len(calls) == 1 and "limit" not in calls[0]


class _ExpiresOnce:
    """The real client, except that its first watch waits for ``go`` and then reports the
    watch's version expired (as the API server does after compaction)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.go = threading.Event()
        self.watches = 0

    def snapshot(self, *args: Any, **kw: Any) -> Any:
        return self.kube.snapshot(*args, **kw)

    def watch(self, *args: Any, **kw: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        self.watches += 1
        if self.watches == 1:
            assert self.go.wait(30)
            raise Expired("too old")
        yield from self.kube.watch(*args, **kw)


def test_an_informer_lists_watches_and_turns_a_relist_into_the_events_missed(
        cluster: Cluster) -> None:
    load_config(str(cluster.kubeconfig))
    kube = Kube()
    label = f"informer-test-{uuid.uuid4().hex[:8]}"

    def create(name: str) -> None:
        kube.create(VMS, {"apiVersion": API_VERSION, "kind": VIRTUAL_MACHINE.kind,
                          "metadata": {"name": name, "namespace": cluster.namespace,
                                       "labels": {"test": label}},
                          "spec": {"cpus": 1, "memory": "64Mi", "boot": {"kernel": "/k"}}})

    create("a")
    create("b")
    create("other")
    kube.patch(VMS, "other", {"metadata": {"labels": {"test": "elsewhere"}}}, cluster.namespace)
    source = _ExpiresOnce(kube)
    informer = Informer(source, VMS, label_selector=f"test={label}",
                        each=lambda b: {"metadata": b["metadata"], "cpus": b["spec"]["cpus"]})
    seen: list[tuple[str, str, int | None]] = []

    def sink(events: list[Event]) -> None:
        seen.extend((t, b["metadata"]["name"], b.get("cpus")) for t, b in events)

    async def scenario() -> None:
        task = asyncio.create_task(informer.run(sink))
        await asyncio.wait_for(informer.synced.wait(), 30)
        assert sorted(seen) == [("ADDED", "a", 1), ("ADDED", "b", 1)]
        seen.clear()
        # While the watch is down: b goes, a changes. The relist must say both.
        await asyncio.to_thread(kube.delete, VMS, "b", cluster.namespace)
        await asyncio.to_thread(kube.patch, VMS, "a", {"spec": {"cpus": 2}}, cluster.namespace)
        source.go.set()
        await _until(lambda: len(seen) >= 2)
        assert sorted(seen) == [("DELETED", "b", None), ("MODIFIED", "a", 2)]
        seen.clear()
        # Then the watch itself: a create, a change, a delete, in order.
        await asyncio.to_thread(create, "c")
        await asyncio.to_thread(kube.patch, VMS, "c", {"spec": {"cpus": 3}}, cluster.namespace)
        await asyncio.to_thread(kube.delete, VMS, "a", cluster.namespace)
        await _until(lambda: len(seen) >= 3)
        assert seen == [("ADDED", "c", 1), ("MODIFIED", "c", 3), ("DELETED", "a", 2)]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


async def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_object_calls_round_trip_and_a_failed_json_patch_test_is_a_conflict(
        cluster: Cluster) -> None:
    load_config(str(cluster.kubeconfig))
    kube = Kube()
    ns = cluster.namespace
    made = kube.create(VMS, {"apiVersion": API_VERSION, "kind": VIRTUAL_MACHINE.kind,
                             "metadata": {"name": "jp", "namespace": ns},
                             "spec": {"cpus": 1, "memory": "64Mi", "boot": {"kernel": "/k"}}})
    assert kube.get(VMS, "jp", ns) == made
    out = kube.patch(VMS, "jp", {"metadata": {"finalizers": ["a.example/x", "b.example/y"]}}, ns)
    assert out["metadata"]["finalizers"] == ["a.example/x", "b.example/y"]
    with pytest.raises(Conflict):  # stale: the finalizer at index 0 is not b
        kube.patch(VMS, "jp", [{"op": "test", "path": "/metadata/finalizers/0",
                                "value": "b.example/y"},
                               {"op": "remove", "path": "/metadata/finalizers/0"}], ns)
    with pytest.raises(Conflict):  # a merge patch made on an older version
        kube.patch(VMS, "jp", {"metadata": {"resourceVersion": made["metadata"]["resourceVersion"],
                                            "labels": {"x": "y"}}}, ns)
    out = kube.patch(VMS, "jp", [{"op": "test", "path": "/metadata/finalizers/1",
                                  "value": "b.example/y"},
                                 {"op": "remove", "path": "/metadata/finalizers/1"}], ns)
    assert out["metadata"]["finalizers"] == ["a.example/x"]
    status = kube.patch(VMS, "jp", {"status": {"phase": "Pending"}}, ns, status=True)
    assert status["status"]["phase"] == "Pending"
    kube.patch(VMS, "jp", {"metadata": {"finalizers": None}}, ns)
    kube.delete(VMS, "jp", ns)
    assert kube.get(VMS, "jp", ns) is None
    kube.delete(VMS, "jp", ns)  # already gone: not an error
    with pytest.raises(Gone):
        kube.patch(VMS, "jp", {"status": {"phase": "Running"}}, ns, status=True)


class _Counting:
    """The real client, counting lists and watches."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.lists = 0
        self.watches = 0

    def snapshot(self, *args: Any, **kw: Any) -> Any:
        self.lists += 1
        return self.kube.snapshot(*args, **kw)

    def watch(self, *args: Any, **kw: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        self.watches += 1
        yield from self.kube.watch(*args, **kw)


def test_an_informer_resumes_a_watch_the_server_ended_without_listing_again(
        cluster: Cluster) -> None:
    load_config(str(cluster.kubeconfig))
    kube = Kube()
    label = f"informer-resume-{uuid.uuid4().hex[:8]}"
    source = _Counting(kube)
    informer = Informer(source, VMS, label_selector=f"test={label}", watch_seconds=1)
    seen: list[tuple[str, str]] = []

    async def scenario() -> None:
        task = asyncio.create_task(informer.run(
            lambda events: seen.extend((t, b["metadata"]["name"]) for t, b in events)))
        await asyncio.wait_for(informer.synced.wait(), 30)
        await _until(lambda: source.watches >= 3)  # the server ended two watches meanwhile
        await asyncio.to_thread(kube.create, VMS, {
            "apiVersion": API_VERSION, "kind": VIRTUAL_MACHINE.kind,
            "metadata": {"name": "late", "namespace": cluster.namespace, "labels": {"test": label}},
            "spec": {"cpus": 1, "memory": "64Mi", "boot": {"kernel": "/k"}}})
        await _until(lambda: seen == [("ADDED", "late")])
        assert source.lists == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
