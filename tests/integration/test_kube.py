"""The API client against the real API server: full lists are read in pages."""

from __future__ import annotations

from typing import Any

import pytest

from hyperfleet.reconcilers import kube as kube_mod
from hyperfleet.reconcilers.conventions import API_VERSION, VIRTUAL_MACHINE
from hyperfleet.reconcilers.kube import VMS, Kube, load_config
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
