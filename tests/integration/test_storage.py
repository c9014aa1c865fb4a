"""Issue 12: VM images, per-VM overlays and confined host paths, on the real API server.

Images come over a real HTTP server on loopback, are checked and cached by the agent,
and each VM boots (the double, and the genuine cloud-hypervisor) from its own qcow2
overlay made by the real qemu-img.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.reconcilers.hypervisor.client import ChClient
from tests import PLACEHOLDER_KERNEL
from tests.fileserver import FileServer

from .conftest import Backend, Cluster, wait_for
from .test_nodes import vmms_in_proc


@pytest.fixture
def server(cluster: Cluster) -> Iterator[FileServer]:
    root = cluster.workdir / "www"
    root.mkdir()
    s = FileServer(root)
    try:
        yield s
    finally:
        s.close()


def base_image(dir_: Path, name: str = "base.qcow2", size: str = "64M") -> tuple[Path, str]:
    """A real qcow2 made by qemu-img, and its sha256."""
    path = dir_ / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def vm(name: str, kernel: str, image: dict[str, Any] | None = None, **spec: Any) -> str:
    body: dict[str, Any] = {
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"cpus": 1, "memory": "128Mi",
                 "boot": {"kernel": kernel, "cmdline": "console=ttyS0 root=/dev/vda"},
                 **({"image": image} if image else {}), **spec},
    }
    return json.dumps(body)


def status(c: Cluster, name: str) -> dict[str, Any]:
    return (c.get("hvm", name) or {}).get("status") or {}


def in_phase(c: Cluster, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    """The VM's status once it reaches ``phase``."""
    def reached() -> dict[str, Any] | None:
        st = status(c, name)
        return st if st.get("phase") == phase else None
    result: dict[str, Any] = wait_for(reached, timeout, f"{name} {phase}", c)
    return result


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((x for x in st.get("conditions") or [] if x["type"] == type_), {})


def start(c: Cluster, binary: str | None = None, nodes: tuple[str, ...] = ("a",)) -> None:
    c.start_controller()
    for n in nodes:
        c.start_agent(c.node(n), ch_binary=binary)
    wait_for(lambda: all((c.get("wn", c.node(n), namespaced=False) or {})
                         .get("status", {}).get("phase") == "Ready" for n in nodes),
             60, "nodes Ready", c)


def backing_file(disk: Path) -> str:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(disk)],
                                     capture_output=True, text=True, check=True).stdout)
    return str(info.get("full-backing-filename") or info.get("backing-filename"))


def test_vms_boot_from_their_own_overlays_of_one_downloaded_image(
        cluster: Cluster, backend: Backend, server: FileServer) -> None:
    c = cluster
    start(c, backend.binary)
    _, digest = base_image(server.root)
    image = {"url": server.url("base.qcow2"), "sha256": digest}
    for name in ("img-1", "img-2"):
        assert c.apply(vm(name, str(backend.kernel), image)).returncode == 0
    sts = {n: in_phase(c, n, "Running", 90) for n in ("img-1", "img-2")}
    disks = {n: Path(st["image"]["rootDisk"]) for n, st in sts.items()}
    assert disks["img-1"] != disks["img-2"] and all(d.exists() for d in disks.values())
    assert server.hits == {"base.qcow2": 1}  # one download, two VMs
    bases = {backing_file(d) for d in disks.values()}
    assert len(bases) == 1 and digest in bases.pop()  # the cached, content-addressed base
    for n, st in sts.items():
        assert st["image"]["phase"] == "Ready" and st["image"]["key"] == f"sha256:{digest}"
        assert condition(st, "ImageReady")["status"] == "True"
        client = ChClient(st["apiSocket"])
        config = (client.info() or {})["config"]
        client.close()
        assert config["disks"][0]["path"] == str(disks[n])  # booted from its overlay
        assert config["disks"][0]["backing_files"] is True
    wait_for(lambda: f"sha256:{digest}" in [  # published with the next heartbeat
        i["key"] for i in ((c.get("wn", c.node("a"), namespaced=False) or {}).get("status")
                           or {}).get("images", [])], 30, "a reports the image", c)

    # Kept across a crash of the VMM and across sleep: the same file, not a new overlay.
    inode = disks["img-1"].stat().st_ino
    os.kill(sts["img-1"]["hypervisor"]["pid"], signal.SIGKILL)
    wait_for(lambda: (s := status(c, "img-1")).get("phase") == "Running"
             and s["hypervisor"]["pid"] != sts["img-1"]["hypervisor"]["pid"], 60,
             "img-1 restarted", c)
    for power, phase in (("Sleeping", "Sleeping"), ("Running", "Running")):
        c.kubectl("patch", "hvm", "img-1", "--type=merge", "-p",
                  json.dumps({"spec": {"powerState": power}}))
        in_phase(c, "img-1", phase)
    assert disks["img-1"].stat().st_ino == inode
    assert status(c, "img-1")["image"]["rootDisk"] == str(disks["img-1"])

    # Deleted with the VM unless retained.
    c.kubectl("patch", "hvm", "img-2", "--type=merge", "-p",
              '{"spec": {"image": {"reclaimPolicy": "Retain"}}}')
    for n in ("img-1", "img-2"):
        c.kubectl("delete", "hvm", n, "--timeout=60s")
    assert not disks["img-1"].exists() and disks["img-2"].exists()


@pytest.mark.double_only("no VMM is reached: the image is refused before anything starts")
def test_a_bad_or_unreachable_image_boots_nothing_and_says_why(
        cluster: Cluster, backend: Backend, server: FileServer) -> None:
    c = cluster
    start(c)
    base_image(server.root)
    cases = {
        "wrong-sum": ({"url": server.url("base.qcow2"), "sha256": "0" * 64},
                      "ChecksumMismatch", "spec.image.sha256"),
        "missing": ({"url": server.url("nope.qcow2"), "sha256": "1" * 64}, "NotFound", "404"),
        "nowhere": ({"url": "http://127.0.0.1:9/x.qcow2", "sha256": "2" * 64}, "Unreachable",
                    "127.0.0.1:9"),
    }
    for name, (image, _, _) in cases.items():
        assert c.apply(vm(name, PLACEHOLDER_KERNEL, image)).returncode == 0
    for name, (_, reason, says) in cases.items():
        def failed(n: str = name, r: str = reason) -> dict[str, Any] | None:
            x = condition(status(c, n), "ImageReady")
            return x if x.get("reason") == r else None
        cond = wait_for(failed, 60, f"{name}: {reason}", c)
        assert cond["status"] == "False" and says in cond["message"], cond
        assert status(c, name)["image"]["phase"] == "Failed"
        assert not vmms_in_proc(c, name)  # nothing booted


@pytest.mark.double_only("no VMM is reached: the path is refused before anything starts")
def test_host_paths_outside_the_allowed_roots_are_refused_naming_the_field(
        cluster: Cluster) -> None:
    c = cluster
    start(c)
    link = c.workdir / "innocent.img"
    link.symlink_to("/etc/shadow")
    inside = c.workdir / "images"
    inside.mkdir()
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "proc-mem": ({"boot": {"kernel": "/proc/self/mem"}}, "spec.boot.kernel"),
        "dotdot": ({"disks": [{"name": "d", "path": "../../etc/shadow"}]}, "spec.disks[0].path"),
        "token": ({"disks": [{"name": "d", "readonly": True, "path":
                              "/var/run/secrets/kubernetes.io/serviceaccount/token"}]},
                  "spec.disks[0].path"),
        "escape": ({"disks": [{"name": "d", "path": f"{inside}/../../../etc/passwd"}]},
                   "spec.disks[0].path"),
        "symlink": ({"disks": [{"name": "d", "path": str(link)}]}, "spec.disks[0].path"),
        "sys": ({"boot": {"kernel": "/sys/kernel/notes"}}, "spec.boot.kernel"),
        "dev": ({"disks": [{"name": "d", "path": "/dev/sda"}]}, "spec.disks[0].path"),
        "image": ({"image": {"path": "/etc/passwd"}}, "spec.image.path"),
    }
    for name, (spec, _) in cases.items():
        body = json.loads(vm(name, PLACEHOLDER_KERNEL))
        body["spec"].update(spec)
        if "kernel" in (spec.get("boot") or {}):
            body["spec"]["boot"] = spec["boot"]
        assert c.apply(json.dumps(body)).returncode == 0, name
    for name, (_, field) in cases.items():
        st = in_phase(c, name, "Failed")
        ready = condition(st, "Ready")
        assert ready["reason"] == "PathNotAllowed" and field in ready["message"], (name, ready)
        assert not vmms_in_proc(c, name), name
    events = json.loads(c.kubectl("get", "events", "-o", "json").stdout)["items"]
    assert {e["involvedObject"]["name"] for e in events
            if e["reason"] == "PathNotAllowed"} == set(cases)


def cordon(c: Cluster, node: str, on: bool) -> None:
    c.kubectl("patch", "wn", c.node(node), "--type=merge", "-p",
              json.dumps({"spec": {"unschedulable": on}}), namespaced=False)


def two_nodes_with_an_image(c: Cluster, server: FileServer) -> dict[str, str]:
    """Nodes a and b (b cordoned until the caller says), and an image served here."""
    start(c, nodes=("a", "b"))
    cordon(c, "b", True)
    _, digest = base_image(server.root)
    return {"url": server.url("base.qcow2"), "sha256": digest}


@pytest.mark.double_only("placement and pulls: the double's run covers them")
def test_scheduler_prefers_the_node_that_holds_the_image(
        cluster: Cluster, server: FileServer) -> None:
    c = cluster
    image = two_nodes_with_an_image(c, server)
    digest = image["sha256"]
    assert c.apply(vm("first", PLACEHOLDER_KERNEL, image)).returncode == 0
    in_phase(c, "first", "Running")
    cordon(c, "b", False)
    wait_for(lambda: f"sha256:{digest}" in [
        i["key"] for i in ((c.get("wn", c.node("a"), namespaced=False) or {}).get("status")
                           or {}).get("images", [])], 30, "a reports the image", c)
    # Spread alone would pick b (empty); a holds the image.
    assert c.apply(vm("second", PLACEHOLDER_KERNEL, image)).returncode == 0
    assert c.apply(vm("plain", PLACEHOLDER_KERNEL)).returncode == 0
    for n in ("second", "plain"):
        in_phase(c, n, "Running")
    assert status(c, "second")["nodeName"] == c.node("a")
    assert status(c, "plain")["nodeName"] == c.node("b")
    assert server.hits == {"base.qcow2": 1}


@pytest.mark.double_only("placement and drains: the double's run covers them")
def test_a_vm_with_node_local_data_is_held_and_a_recreatable_one_moves_afresh(
        cluster: Cluster, server: FileServer) -> None:
    c = cluster
    image = two_nodes_with_an_image(c, server)
    assert c.apply(vm("keeps", PLACEHOLDER_KERNEL, image)).returncode == 0
    assert c.apply(vm("fresh", PLACEHOLDER_KERNEL, {**image, "onMove": "Recreate"})
                   ).returncode == 0
    old = {n: Path(in_phase(c, n, "Running")["image"]["rootDisk"]) for n in ("keeps", "fresh")}
    cond = condition(status(c, "keeps"), "LiveMigratable")
    assert cond["status"] == "False" and cond["reason"] == "NodeLocalDisk"
    cordon(c, "b", False)
    c.kubectl("patch", "wn", c.node("a"), "--type=merge", "-p", '{"spec": {"drain": true}}',
              namespaced=False)
    st = wait_for(lambda: (s := status(c, "fresh")).get("phase") == "Running"
                  and s.get("nodeName") == c.node("b") and s, 60, "fresh moved to b", c)
    assert Path(st["image"]["rootDisk"]) != old["fresh"]
    wait_for(lambda: not old["fresh"].exists(), 30, "a drops the stale overlay", c)
    blocked = wait_for(lambda: (x := condition(
        (c.get("wn", c.node("a"), namespaced=False) or {}).get("status") or {},
        "DrainBlocked")).get("status") == "True" and x, 30, "DrainBlocked", c)
    assert f"{c.namespace}/keeps" in blocked["message"] and "spec.image" in blocked["message"]
    assert status(c, "keeps")["nodeName"] == c.node("a") and old["keeps"].exists()


@pytest.mark.double_only("the Nix path is about fetching; the double's run covers it")
def test_an_image_from_a_nix_binary_cache_is_realised_on_the_node(
        cluster: Cluster, server: FileServer) -> None:
    """A store path built offline, copied to a binary cache served over loopback, then
    removed from the store: the agent realises it with nix copy --from."""
    c = cluster
    start(c)
    made, _ = base_image(c.workdir, "nixos.qcow2", "16M")
    store = subprocess.run(["nix-store", "--add", str(made)], capture_output=True, text=True,
                           check=True).stdout.strip()
    cache = server.root / "cache"
    nix = ["nix", "--extra-experimental-features", "nix-command"]
    subprocess.run([*nix, "copy", "--to", f"file://{cache}", store], check=True)
    subprocess.run(["nix-store", "--delete", store], check=True, capture_output=True)
    assert not Path(store).exists()
    try:
        image = {"nixStorePath": store, "nixCache": server.url("cache").rstrip("/")}
        assert c.apply(vm("from-nix", PLACEHOLDER_KERNEL, image)).returncode == 0
        st = wait_for(lambda: (s := status(c, "from-nix")).get("phase") == "Running" and s,
                      120, "from-nix Running", c)
        assert Path(store).exists() and backing_file(Path(st["image"]["rootDisk"])) == store
        assert st["image"]["key"] == f"nix:{store}"
    finally:
        c.kubectl("delete", "hvm", "from-nix", "--timeout=60s", check=False)
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["nix-store", "--delete", store], check=False, capture_output=True)
    assert os.path.isdir(cache)
