"""Rendering the desired set from YAML (and Nix): deterministic, validated, errors named."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.reconcilers.gitops.render import (
    NixUnavailable,
    is_manifest_file,
    render_nix,
    render_yaml,
)
from hyperfleet.reconcilers.gitops.types import ObjectRef

VM = """apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachine
metadata:
  name: {name}
spec:
  cpus: {cpus}
  memory: 512Mi
  boot: {{kernel: /images/vmlinux}}
"""


def vm(name: str, cpus: int = 1) -> str:
    return VM.format(name=name, cpus=cpus)


def files(**named: str) -> dict[str, bytes]:
    return {k.replace("__", "/").replace("_yaml", ".yaml").replace("_yml", ".yml"): v.encode()
            for k, v in named.items()}


def test_multi_document_files_sorted_and_deterministic() -> None:
    src = {
        "fleet/b.yaml": (vm("b-1") + "---\n" + vm("b-2")).encode(),
        "fleet/a.yml": ("---\n# only a comment\n---\n" + vm("a-1")).encode(),
        "fleet/nodes/n.yaml": b"apiVersion: hyperfleet.dev/v1alpha1\nkind: WorkerNode\n"
                              b"metadata: {name: node-1}\nspec: {pool: gpu}\n",
    }
    out = render_yaml(src, "team")
    assert out.ok, out.errors
    # WorkerNodes first (apply order), then VMs by namespace/name.
    assert [str(m.ref) for m in out.manifests] == [
        "WorkerNode/node-1", "VirtualMachine/team/a-1", "VirtualMachine/team/b-1",
        "VirtualMachine/team/b-2",
    ]
    a1 = out.manifests[1]
    assert a1.where.file == "fleet/a.yml" and a1.where.index == 1 and a1.where.line == 4
    assert out.manifests[0].ref == ObjectRef("WorkerNode", "", "node-1")
    again = render_yaml(dict(reversed(list(src.items()))), "team")
    assert [(m.ref, m.digest) for m in again.manifests] == [(m.ref, m.digest) for m in out.manifests]


def test_namespace_default_explicit_and_target_override() -> None:
    src = {"a.yaml": (vm("x") + "---\n" + vm("y").replace("  name: y", "  name: y\n  namespace: other"))
           .encode()}
    out = render_yaml(src, "home")
    assert {str(m.ref) for m in out.manifests} == {"VirtualMachine/home/x", "VirtualMachine/other/y"}
    out = render_yaml(src, "home", target_namespace="prod")
    assert {str(m.ref) for m in out.manifests} == {"VirtualMachine/prod/x", "VirtualMachine/prod/y"}
    assert all(m.body["metadata"]["namespace"] == "prod" for m in out.manifests)


def test_status_is_dropped_and_spec_kept_as_written() -> None:
    out = render_yaml({"a.yaml": (vm("x") + "status: {phase: Running}\n").encode()}, "ns")
    assert out.ok
    body = out.manifests[0].body
    assert "status" not in body
    assert body["spec"] == {"cpus": 1, "memory": "512Mi", "boot": {"kernel": "/images/vmlinux"}}


def test_yaml_syntax_error_names_file_and_line() -> None:
    out = render_yaml({"fleet/good.yaml": vm("ok").encode(),
                       "fleet/bad.yaml": b"apiVersion: x\nmetadata: {name: x\nspec: {}\n"}, "ns")
    assert not out.ok
    (err,) = out.errors
    assert err.where.file == "fleet/bad.yaml" and err.where.line == 3
    assert str(err).startswith("fleet/bad.yaml:3 (document 0): invalid YAML")


def test_duplicate_keys_are_an_error() -> None:
    out = render_yaml({"a.yaml": (vm("x") + "spec: {}\n").encode()}, "ns")
    assert "duplicate key 'spec'" in str(out.errors[0])


def test_non_hyperfleet_kind_is_named_with_file_and_document_index() -> None:
    out = render_yaml({"apps.yaml": (vm("ok") + "---\napiVersion: apps/v1\nkind: Deployment\n"
                                     "metadata: {name: nginx}\n").encode()}, "ns")
    (err,) = out.errors
    assert err.where.file == "apps.yaml" and err.where.index == 1 and err.where.line == 10
    assert "'Deployment'" in err.message and "not a Hyperfleet kind" in err.message
    assert "VirtualMachine, VmJob, WorkerNode" in err.message


def test_schema_errors_name_the_field() -> None:
    bad = vm("x", cpus=0).replace("memory: 512Mi", "memory: lots\n  colour: blue")
    out = render_yaml({"a.yaml": bad.encode()}, "ns")
    msgs = [e.message for e in out.errors]
    assert any("spec.cpus" in m and "greater than or equal to 1" in m for m in msgs), msgs
    assert any("spec.memory" in m for m in msgs), msgs
    assert any("spec.colour: unknown field" in m for m in msgs), msgs
    assert all(m.startswith("VirtualMachine x: ") for m in msgs)


def test_strict_types_like_the_api_server() -> None:
    out = render_yaml({"a.yaml": vm("x").replace("cpus: 1", 'cpus: "2"').encode()}, "ns")
    assert any("spec.cpus" in e.message for e in out.errors)


def test_metadata_and_shape_errors() -> None:
    cases: dict[str, str] = {
        "- just\n- a list\n": "must be a Kubernetes object",
        vm("Bad_Name"): "lowercase DNS name",
        vm("x").replace("  name: x", "  name: x\n  uid: abc"): "metadata.uid is not allowed",
        vm("x").replace("  name: x", "  name: x\n  labels: {n: 1}"): "quote it",
        vm("x") + "extra: 1\n": "unknown top-level field 'extra'",
        vm("x").replace("v1alpha1", "v1"): "apiVersion must be 'hyperfleet.dev/v1alpha1'",
        "apiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {name: x}\n":
            "spec is required",
        "apiVersion: hyperfleet.dev/v1alpha1\nkind: WorkerNode\nmetadata: {name: n, namespace: a}\n":
            "cluster-scoped",
    }
    for text, expected in cases.items():
        out = render_yaml({"a.yaml": text.encode()}, "ns")
        assert any(expected in e.message for e in out.errors), (expected, out.errors)


def test_duplicate_objects_across_files() -> None:
    out = render_yaml({"a.yaml": vm("x").encode(), "b.yaml": vm("x", cpus=2).encode()}, "ns")
    (err,) = out.errors
    assert err.where.file == "b.yaml" and "also defined in a.yaml" in err.message


def test_not_utf8() -> None:
    out = render_yaml({"a.yaml": b"\xff\xfe"}, "ns")
    assert "not UTF-8" in str(out.errors[0])


def test_manifest_file_filter() -> None:
    assert is_manifest_file("fleet/a.yaml") and is_manifest_file("b.yml")
    assert not is_manifest_file("fleet/a.json")
    assert not is_manifest_file(".github/workflows/ci.yml")
    assert not is_manifest_file("fleet/.hidden.yaml")


def test_digest_changes_with_content_only() -> None:
    a = render_yaml({"a.yaml": vm("x").encode()}, "ns").manifests[0]
    b = render_yaml({"other.yaml": ("# comment\n" + vm("x")).encode()}, "ns").manifests[0]
    c = render_yaml({"a.yaml": vm("x", cpus=2).encode()}, "ns").manifests[0]
    assert a.digest == b.digest != c.digest


def _fake_nix(tmp_path: Path, output: Any, code: int = 0) -> str:
    script = tmp_path / "nix"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n"
                      f"cat <<'EOF'\n{json.dumps(output)}\nEOF\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _vm_obj(name: str, cpus: int = 1) -> dict[str, Any]:
    return {"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name},
            "spec": {"cpus": cpus, "memory": "1Gi", "boot": {"kernel": "/k"}}}


def test_nix_list_and_attrset(tmp_path: Path) -> None:
    nix = _fake_nix(tmp_path, [_vm_obj("a"), _vm_obj("b")])
    out = render_nix(tmp_path, "clusters/prod", "ns", nix=nix)
    assert out.ok and [m.ref.name for m in out.manifests] == ["a", "b"]
    assert out.manifests[1].where.file == "clusters/prod/flake.nix#hyperfleet"
    assert out.manifests[1].where.index == 1
    args = (tmp_path / "args").read_text()
    assert f"eval --json path:{tmp_path}#hyperfleet" in args
    nix = _fake_nix(tmp_path, {"web": _vm_obj("web", cpus=0)})
    out = render_nix(tmp_path, ".", "ns", nix=nix)
    assert "flake.nix#hyperfleet.web" in str(out.errors[0]) and "spec.cpus" in str(out.errors[0])


def test_nix_failure_and_bad_output(tmp_path: Path) -> None:
    out = render_nix(tmp_path, ".", "ns", nix=_fake_nix(tmp_path, "boom", code=1))
    assert "nix eval failed" in str(out.errors[0])
    out = render_nix(tmp_path, ".", "ns", nix=_fake_nix(tmp_path, 42))
    assert "must evaluate to a list" in str(out.errors[0])

    def slow(*_: Any, **__: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired("nix", 1)

    out = render_nix(tmp_path, ".", "ns", nix="/bin/true", timeout=1, run=slow)
    assert "raise spec.timeout" in str(out.errors[0])


def test_nix_unavailable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NixUnavailable, match=r"spec\.renderer: Yaml"):
        render_nix(tmp_path, "fleet", "ns", nix=None)


@pytest.mark.skipif(shutil.which("nix") is None, reason="nix is not installed")
def test_real_nix_eval(tmp_path: Path) -> None:
    (tmp_path / "flake.nix").write_text(
        '{ outputs = _: { hyperfleet = [ { apiVersion = "hyperfleet.dev/v1alpha1"; '
        'kind = "VirtualMachine"; metadata.name = "nixed"; '
        'spec = { cpus = 2; memory = "1Gi"; boot.kernel = "/k"; }; } ]; }; }\n')
    out = render_nix(tmp_path, ".", "ns", nix=shutil.which("nix"), timeout=120)
    assert out.ok, out.errors
    assert [(m.ref.name, m.body["spec"]["cpus"]) for m in out.manifests] == [("nixed", 2)]
