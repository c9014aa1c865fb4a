"""The Nix side (nix/): every file parses, the flake checks, and the cluster-to-manifests
function yields objects that our models and the GitSource renderer accept - evaluated by the
real Nix (Debian's nix-bin), offline."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.reconcilers.gitops.nix import render_nix
from hyperfleet.reconcilers.gitops.render import render_objects
from hyperfleet.reconcilers.gitops.types import SourceLocation
from hyperfleet.reconcilers.jobs.parse import parse_job
from hyperfleet.reconcilers.models.node import WorkerNodeSpec
from hyperfleet.reconcilers.models.vm import VirtualMachineSpec

REPO = Path(__file__).resolve().parents[2]
NIX_DIR = REPO / "nix"
FLAKES = ["--extra-experimental-features", "nix-command flakes"]

if not (shutil.which("nix") and shutil.which("nix-instantiate")):
    pytest.skip("Nix is not installed (Debian: apt-get install nix-bin)", allow_module_level=True)


def nix_files() -> list[Path]:
    return sorted(NIX_DIR.rglob("*.nix"))


def run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def eval_json(expr: str) -> Any:
    r = run("nix-instantiate", "--eval", "--strict", "--json", "-E", expr)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def manifests_of(cluster: str) -> Any:
    return eval_json(f"(import {NIX_DIR}/lib {{ }}).manifests ({cluster})")


def validate(obj: dict[str, Any]) -> None:
    """What the models say about one object (strict, as the GitSource renderer checks)."""
    assert obj["apiVersion"] == "hyperfleet.dev/v1alpha1"
    spec = json.dumps(obj["spec"])
    if obj["kind"] == "VirtualMachine":
        VirtualMachineSpec.model_validate_json(spec, strict=True)
    elif obj["kind"] == "WorkerNode":
        WorkerNodeSpec.model_validate_json(spec, strict=True)
    elif obj["kind"] == "VmJob":
        parse_job(obj["spec"])
    else:
        pytest.fail(f"unexpected kind {obj['kind']}")


@pytest.mark.parametrize("path", nix_files(), ids=lambda p: str(p.relative_to(NIX_DIR)))
def test_every_nix_file_parses(path: Path) -> None:
    r = run("nix-instantiate", "--parse", str(path))
    assert r.returncode == 0, r.stderr


def test_flake_check() -> None:
    r = run("nix", *FLAKES, "flake", "check", f"path:{NIX_DIR}")
    assert r.returncode == 0, r.stderr


def test_example_cluster_renders_valid_manifests() -> None:
    objs = manifests_of(f"import {NIX_DIR}/examples/cluster.nix")
    assert isinstance(objs, list)
    kinds = [o["kind"] for o in objs]
    assert kinds == sorted(kinds, key=["WorkerNode", "VirtualMachine", "VmJob"].index), "apply order"
    for obj in objs:
        validate(obj)
    by_name = {o["metadata"]["name"]: o for o in objs}
    assert {"worker-1", "worker-2", "db", "web-0", "web-1", "db-nightly-snapshot"} == set(by_name)
    web = [by_name["web-0"]["spec"], by_name["web-1"]["spec"]]
    nics = [s["interfaces"][0] for s in web]
    assert nics[0]["mac"] != nics[1]["mac"] and nics[0]["tap"] != nics[1]["tap"]
    assert all(len(n["tap"]) <= 15 and n["tap"].startswith("hf") for n in nics)
    # Replicas share the base image, never a writable disk: each gets its own overlay.
    assert web[0]["image"] == web[1]["image"] == {"path": "/var/lib/hyperfleet/images/web/disk.raw"}
    assert "disks" not in web[0]
    assert web[0]["boot"]["initramfs"].endswith("/initrd")
    assert by_name["web-0"]["metadata"] == {"name": "web-0", "namespace": "fleet", "labels": {"app": "web"}}
    assert by_name["worker-1"]["metadata"]["labels"] == {"hyperfleet.dev/node": "worker-1"}
    assert "namespace" not in by_name["worker-1"]["metadata"]
    job = by_name["db-nightly-snapshot"]["spec"]
    assert job["payload"] == {"type": "vm.snapshot.v1",
                              "data": {"destination": "/var/lib/hyperfleet/snapshots/db"}}
    assert job["routing"] == {"targetVm": {"name": "db"}}
    # The GitSource renderer's own checks (metadata, names, duplicates) accept the lot.
    located = [(SourceLocation("cluster.nix", i), o) for i, o in enumerate(objs)]
    result = render_objects(located, "default", None)
    assert result.ok, [str(e) for e in result.errors]


def test_flake_output_is_what_a_gitsource_evaluates() -> None:
    """`nix eval --json nix#hyperfleet` through the GitSource renderer itself."""
    result = render_nix(NIX_DIR, "nix", "default", nix=shutil.which("nix"))
    assert result.ok, [str(e) for e in result.errors]
    direct = manifests_of(f"import {NIX_DIR}/examples/cluster.nix")
    assert sorted(json.dumps(m.body, sort_keys=True) for m in result.manifests) == sorted(
        json.dumps(o, sort_keys=True) for o in direct)


def test_cluster_template_renders(tmp_path: Path) -> None:
    repo = tmp_path / "cluster"
    shutil.copytree(NIX_DIR / "templates" / "cluster", repo)
    shutil.copytree(NIX_DIR / "lib", repo / "hyperfleet")  # vendored, as the template says
    result = render_nix(repo, ".", "default", nix=shutil.which("nix"))
    assert result.ok, [str(e) for e in result.errors]
    assert [m.ref.name for m in result.manifests] == ["hello"]


def test_unknown_attribute_is_refused_with_the_known_ones() -> None:
    r = run("nix-instantiate", "--eval", "--strict", "--json", "-E",
            f"(import {NIX_DIR}/lib {{ }}).manifests {{ vms.web = {{ cpu = 2; }}; }}")
    assert r.returncode != 0
    assert "vms.web: unknown attribute(s) cpu (known: namespace" in r.stderr


def test_defaults_replicas_and_model_errors() -> None:
    objs = manifests_of('{ namespace = "a"; defaults = { memory = "2Gi"; cpus = 2; }; '
                        'vms.x = { replicas = 3; kernel = "/k"; }; vms.y = { cpus = 0; kernel = "/k"; }; }')
    names = [o["metadata"]["name"] for o in objs]
    assert names == ["x-0", "x-1", "x-2", "y"]
    assert {o["spec"]["memory"] for o in objs} == {"2Gi"} and objs[0]["spec"]["cpus"] == 2
    for o in objs[:3]:
        validate(o)
    # cpus = 0 passes through Nix and is caught by the model, with the field named.
    result = render_objects([(SourceLocation("c.nix", 0), objs[3])], "default", None)
    assert not result.ok and "spec.cpus" in str(result.errors[0])


def test_a_store_path_image_becomes_a_nix_image_per_replica() -> None:
    store = "/nix/store/" + "a" * 32 + "-nixos-disk"
    objs = manifests_of(f"""{{
        vms.web = {{ replicas = 2; kernel = "/var/lib/hyperfleet/vmlinux";
                     image = {{ disk = "{store}/nixos.img"; nixCache = "http://cache:5000";
                                onMove = "Recreate"; }}; }};
      }}""")
    specs = [o["spec"] for o in objs]
    assert len(specs) == 2
    for spec in specs:
        assert spec["image"] == {"nixStorePath": store, "nixFile": "nixos.img",
                                 "nixCache": "http://cache:5000", "onMove": "Recreate"}
        validate({"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
                  "metadata": {"name": "x"}, "spec": spec})
