"""VirtualMachinePools end to end: the real API server, kubectl, the controller and an agent
driving the CH double (issue 16)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hyperfleet.reconcilers.models.pool import POOL_LABEL, REVISION_LABEL
from hyperfleet.reconcilers.pools import FINALIZER
from tests import PLACEHOLDER_KERNEL

from .conftest import Cluster, wait_for
from .test_gitops import Repo, applied, gitsource


def pool_yaml(name: str = "web", replicas: int = 3, cpus: int = 1, strategy: str = "",
              selector: str = "web", extra_spec: str = "") -> str:
    return (
        "apiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachinePool\n"
        f"metadata: {{name: {name}}}\n"
        f"spec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {selector}}}}}\n"
        f"{strategy}"
        "  template:\n    metadata: {labels: {app: web, tier: front}}\n"
        f"    spec:\n      cpus: {cpus}\n      memory: 128Mi\n"
        f"      boot: {{kernel: {PLACEHOLDER_KERNEL}}}\n{extra_spec}"
    )


def members(c: Cluster, pool: str = "web") -> dict[str, dict[str, Any]]:
    r = c.kubectl("get", "hvm", "-l", f"{POOL_LABEL}={pool}", "-o", "json", check=False)
    if r.returncode != 0:
        return {}
    return {i["metadata"]["name"]: i for i in json.loads(r.stdout)["items"]}


def available(vm: dict[str, Any]) -> bool:
    st = vm.get("status") or {}
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))
    return not vm["metadata"].get("deletionTimestamp") and st.get("phase") == "Running" and ready


def pool_status(c: Cluster, name: str = "web") -> dict[str, Any]:
    return dict((c.get("hvmpool", name) or {}).get("status") or {})


def conditions(c: Cluster, name: str = "web") -> dict[str, dict[str, Any]]:
    return {x["type"]: x for x in pool_status(c, name).get("conditions", [])}


def running(c: Cluster, names: list[str], cpus: int | None = None) -> bool:
    ms = members(c)
    return sorted(ms) == sorted(names) and all(
        available(v) and (cpus is None or v["spec"]["cpus"] == cpus) for v in ms.values())


def start(c: Cluster) -> str:
    node = c.node("a")
    c.start_controller()
    c.start_agent(node, cpus=32, memory="32Gi")
    wait_for(lambda: (c.get("wn", node, namespaced=False) or {}).get("status", {})
             .get("phase") == "Ready", 60, "WorkerNode Ready", c)
    return node


def test_apply_scale_roll_and_delete(cluster: Cluster) -> None:
    c = cluster
    start(c)
    r = c.apply(pool_yaml(replicas=3))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: running(c, ["web-0", "web-1", "web-2"]), 60, "3 members Running", c)

    pool = c.get("hvmpool", "web")
    assert pool is not None
    assert FINALIZER in pool["metadata"]["finalizers"]
    vm0 = members(c)["web-0"]
    labels = vm0["metadata"]["labels"]
    assert labels["app"] == "web" and labels["tier"] == "front" and labels[POOL_LABEL] == "web"
    assert labels[REVISION_LABEL] == pool["status"]["updateRevision"]
    (owner,) = vm0["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "VirtualMachinePool", "web", pool["metadata"]["uid"], True)
    wait_for(lambda: pool_status(c).get("readyReplicas") == 3
             and conditions(c).get("Progressing", {}).get("reason") == "Complete", 30,
             "pool status complete", c)
    st = pool_status(c)
    assert (st["replicas"], st["availableReplicas"], st["updatedReplicas"]) == (3, 3, 3)
    assert st["selector"] == "app=web"
    assert st["observedGeneration"] == pool["metadata"]["generation"]
    assert conditions(c)["Available"]["status"] == "True"
    table = c.kubectl("get", "hvmpool").stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "DESIRED", "READY", "UPDATED", "AVAILABLE"]
    assert table[1].split()[:5] == ["web", "3", "3", "3", "3"]

    # kubectl scale goes through the scale subresource.
    c.kubectl("scale", "hvmpool/web", "--replicas=5")
    wait_for(lambda: running(c, [f"web-{i}" for i in range(5)]), 60, "scaled up to 5", c)
    scale = json.loads(c.kubectl("get", "--raw", f"/apis/hyperfleet.dev/v1alpha1/namespaces/"
                                 f"{c.namespace}/virtualmachinepools/web/scale",
                                 namespaced=False).stdout)
    assert scale["spec"]["replicas"] == 5
    wait_for(lambda: json.loads(c.kubectl(
        "get", "--raw", f"/apis/hyperfleet.dev/v1alpha1/namespaces/{c.namespace}/"
        "virtualmachinepools/web/scale", namespaced=False).stdout)["status"].get("replicas") == 5,
        30, "scale status replicas 5", c)
    assert scale["status"].get("selector", "app=web") == "app=web"
    c.kubectl("scale", "hvmpool/web", "--replicas=2")
    wait_for(lambda: running(c, ["web-0", "web-1"]), 60, "scaled down to 2 (highest gone)", c)
    c.kubectl("scale", "hvmpool/web", "--replicas=4")
    wait_for(lambda: running(c, [f"web-{i}" for i in range(4)]), 60, "back to 4", c)

    # A template change rolls through, one member at a time (maxUnavailable 1, maxSurge 0).
    old_rev = pool_status(c)["updateRevision"]
    c.kubectl("patch", "hvmpool", "web", "--type=merge", "-p",
              '{"spec": {"template": {"spec": {"cpus": 2}}}}')
    worst_unavailable, most, samples = 0, 0, 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ms = members(c)
        worst_unavailable = max(worst_unavailable, 4 - sum(available(v) for v in ms.values()))
        most = max(most, len(ms))
        samples += 1
        if running(c, [f"web-{i}" for i in range(4)], cpus=2):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the roll did not finish\n{c.logs()}")
    assert samples > 3, "the roll finished before it could be observed"
    assert worst_unavailable == 1, f"{worst_unavailable} members unavailable at once (max 1)"
    assert most <= 4
    new_rev = {v["metadata"]["labels"][REVISION_LABEL] for v in members(c).values()}
    assert new_rev == {pool_status(c)["updateRevision"]} and old_rev not in new_rev
    wait_for(lambda: pool_status(c).get("currentRevision") == pool_status(c)["updateRevision"]
             and pool_status(c).get("updatedReplicas") == 4, 30, "revisions settled", c)

    # Deleting the pool deletes its members (no garbage collector here: the finalizer).
    c.kubectl("delete", "hvmpool", "web", "--timeout=60s")
    wait_for(lambda: not members(c), 60, "members gone", c)
    assert c.get("hvmpool", "web") is None


def test_rolling_with_surge_keeps_every_member_available(cluster: Cluster) -> None:
    c = cluster
    start(c)
    strategy = "  strategy: {rollingUpdate: {maxUnavailable: 0, maxSurge: 1}}\n"
    assert c.apply(pool_yaml(replicas=3, strategy=strategy)).returncode == 0
    wait_for(lambda: running(c, ["web-0", "web-1", "web-2"]), 60, "3 members Running", c)
    assert c.apply(pool_yaml(replicas=3, cpus=2, strategy=strategy)).returncode == 0
    worst_unavailable, most = 0, 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ms = members(c)
        live = [v for v in ms.values() if not v["metadata"].get("deletionTimestamp")]
        worst_unavailable = max(worst_unavailable, 3 - sum(available(v) for v in live))
        most = max(most, len(ms))
        if len(ms) == 3 and all(available(v) and v["spec"]["cpus"] == 2 for v in ms.values()):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the roll did not finish\n{c.logs()}")
    assert worst_unavailable == 0
    assert most == 4  # one surge member, never more


def test_bad_pools_are_refused_naming_the_field(cluster: Cluster) -> None:
    c = cluster
    r = c.apply(pool_yaml(selector="db"))
    assert r.returncode != 0
    assert "spec.template.metadata.labels must contain every spec.selector.matchLabels" in r.stderr
    r = c.apply(pool_yaml(strategy="  strategy: {rollingUpdate: {maxUnavailable: 0, maxSurge: "
                                   "'0%'}}\n"))
    assert r.returncode != 0 and "maxUnavailable and maxSurge cannot both be 0" in r.stderr
    for bad in ("'150%'", "'1'", "-1"):  # a count is a number, not a string
        r = c.apply(pool_yaml(strategy=f"  strategy: {{rollingUpdate: {{maxSurge: {bad}}}}}\n"))
        assert r.returncode != 0 and "maxSurge must be a number >= 0 or a percentage" \
            in r.stderr, (bad, r.stderr)
    r = c.apply(pool_yaml(extra_spec="      cpus: 0\n").replace("      cpus: 1\n", ""))
    assert r.returncode != 0 and "spec.template.spec.cpus" in r.stderr

    # A writable disk every member would share: accepted by the API, refused by the pool.
    start(c)
    data = c.workdir / "data.raw"
    data.write_bytes(b"\0" * 4096)
    disk = f"      disks: [{{name: data, path: {data}}}]\n"
    assert c.apply(pool_yaml(replicas=2, extra_spec=disk)).returncode == 0

    def refused() -> dict[str, Any] | None:
        cond = conditions(c).get("ReplicaFailure") or {}
        return cond if cond.get("reason") == "InvalidTemplate" else None

    cond = wait_for(refused, 30, "ReplicaFailure InvalidTemplate", c)
    assert cond["status"] == "True"
    assert f"spec.template.spec.disks[0] (data, {data}) is writable" in cond["message"]
    assert conditions(c)["Progressing"]["status"] == "False"
    assert members(c) == {}
    # Marked read-only, the same disk is fine.
    ro = disk.replace("data.raw}", "data.raw, readonly: true}")
    assert ro != disk
    assert c.apply(pool_yaml(replicas=2, extra_spec=ro)).returncode == 0
    wait_for(lambda: running(c, ["web-0", "web-1"]), 60, "members of the fixed pool", c)
    assert conditions(c)["ReplicaFailure"]["status"] == "False"


def healthy(c: Cluster) -> dict[str, Any]:
    """The GitSource ``fleet``'s Healthy condition ({} until it has one)."""
    st = (c.get("gitsource", "fleet") or {}).get("status") or {}
    return next((x for x in st.get("conditions", []) if x["type"] == "Healthy"), {})


def test_a_pool_applied_from_a_gitsource(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    start(c)  # the controller runs the GitSource reconciler too
    repo = Repo(tmp_path / "repo").init()
    repo.write("fleet/pool.yaml", pool_yaml(name="git", replicas=2))
    sha = repo.push("a pool")
    gitsource(c, "fleet", str(repo.remote), extra="  maxDeletionRatio: 1.0\n", health=True)
    wait_for(lambda: applied(c, sha), 60, "GitSource applied the pool", c)
    wait_for(lambda: sorted(members(c, "git")) == ["git-0", "git-1"]
             and all(available(v) for v in members(c, "git").values()), 60,
             "pool members from Git Running", c)
    # A new template in Git rolls the members.
    repo.write("fleet/pool.yaml", pool_yaml(name="git", replicas=2, cpus=2))
    sha2 = repo.push("bigger")
    wait_for(lambda: applied(c, sha2), 60, "GitSource applied the edit", c)
    wait_for(lambda: sorted(members(c, "git")) == ["git-0", "git-1"] and all(
        available(v) and v["spec"]["cpus"] == 2 for v in members(c, "git").values()), 90,
        "members rolled to the new template", c)
    # The GitSource's health check judges the pool itself: healthy once fully rolled out.
    wait_for(lambda: (h := healthy(c)).get("status") == "True" and h, 60, "GitSource Healthy", c)
    assert healthy(c)["message"] == "all 1 VirtualMachines and pools healthy"
    # Removed from Git: pruned, and its members with it.
    repo.remove("fleet/pool.yaml")
    repo.write("fleet/.keep", "")
    sha3 = repo.push("remove the pool")
    c.kubectl("annotate", "--overwrite", "gitsource", "fleet",
              f"hyperfleet.dev/reconcile-now={time.time()}")
    wait_for(lambda: c.get("hvmpool", "git") is None and not members(c, "git"), 90,
             "pool pruned with its members", c)
    assert sha3
    c.kubectl("delete", "gitsource", "fleet", "--wait=false")
