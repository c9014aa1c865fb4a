"""Rendering the desired set from YAML (and Nix): deterministic, validated, errors named."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.reconcilers.gitops.nix import NixUnavailable, render_nix
from hyperfleet.reconcilers.gitops.render import MAX_DOCUMENT_VALUES, is_manifest_file, render_yaml
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
    assert "VirtualMachine, VirtualMachinePool, VmJob, WorkerNode" in err.message


POOL = """apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachinePool
metadata: {{name: web}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: {selector}}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{cpus: 1, memory: 256Mi, boot: {{kernel: /images/vmlinux}}}}
"""


def test_pools_are_applied_from_git_and_checked_like_vms() -> None:
    out = render_yaml({"pool.yaml": POOL.format(selector="web").encode()}, "team")
    assert out.ok, out.errors
    assert [str(m.ref) for m in out.manifests] == ["VirtualMachinePool/team/web"]
    bad = render_yaml({"pool.yaml": POOL.format(selector="db").encode()}, "team")
    (err,) = bad.errors
    assert "VirtualMachinePool web" in err.message
    assert "spec.template.metadata.labels must contain every spec.selector.matchLabels" \
        in err.message and "add app: db" in err.message
    nospec = render_yaml({"pool.yaml": b"apiVersion: hyperfleet.dev/v1alpha1\n"
                          b"kind: VirtualMachinePool\nmetadata: {name: web}\n"}, "team")
    assert "spec is required for a VirtualMachinePool" in nospec.errors[0].message


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
    assert f"eval --read-only --json -I {tmp_path.resolve()} --expr" in args
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


@pytest.mark.parametrize(("value", "says"), [
    ("!!set {a: null}", "YAML tag !!set is not allowed"),
    ("!!binary aGVsbG8=", "!!binary is not allowed: a Kubernetes object holds only strings"),
    ("!!timestamp 2024-06-01", "!!timestamp is not allowed"),
    ("!!omap [{a: 1}]", "!!omap is not allowed"),
    (".nan", ".nan is not a JSON number"),
    ("-.inf", "-.inf is not a JSON number"),
])
def test_yaml_values_json_cannot_hold_name_file_and_line(value: str, says: str) -> None:
    doc = ("apiVersion: hyperfleet.dev/v1alpha1\nkind: VmJob\nmetadata: {name: j}\nspec:\n"
           f"  operation: vm.snapshot\n  payload:\n    data:\n      x: {value}\n")
    out = render_yaml({"jobs/j.yaml": (VM.format(name="a", cpus=1) + "---\n" + doc).encode()}, "ns")
    (err,) = out.errors  # an error with file, line and document, not a TypeError
    assert str(err).startswith("jobs/j.yaml:17 (document 1): ") and says in err.message


def test_aliases_expanding_without_bound_are_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    doc = "apiVersion: hyperfleet.dev/v1alpha1\nkind: WorkerNode\nmetadata: {name: n}\nspec:\n"
    text = doc + "".join(f"  {ln}\n" for ln in lines)
    out = render_yaml({"bomb.yaml": text.encode()}, "ns")
    assert len(out.errors) == 1 and f"more than {MAX_DOCUMENT_VALUES} values" in str(out.errors[0])
    assert str(out.errors[0]).startswith("bomb.yaml:1 (document 0)")


class _Recorder:
    """Stands in for subprocess.run: what nix would have been asked, in which environment."""

    def __init__(self, stdout: str = "[]") -> None:
        self.stdout = stdout
        self.cmd: list[str] = []
        self.env: dict[str, str] = {}
        self.home_mode = 0

    def __call__(self, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        self.cmd, self.env = cmd, kw["env"]
        self.home_mode = stat.S_IMODE(os.stat(self.env["HOME"]).st_mode)
        return subprocess.CompletedProcess(cmd, 0, self.stdout, "")


def test_nix_runs_confined_and_without_the_controllers_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.setenv("NIX_PATH", "nixpkgs=/somewhere")
    rec = _Recorder()
    assert render_nix(tmp_path, ".", "ns", nix="/usr/bin/nix", run=rec).ok
    opts = {rec.cmd[i + 1]: rec.cmd[i + 2] for i, a in enumerate(rec.cmd) if a == "--option"}
    assert opts["experimental-features"] == "nix-command"  # no flakes: no fetchTree/getFlake
    assert opts["restrict-eval"] == "true" and opts["allowed-uris"] == "" and opts["nix-path"] == ""
    assert opts["allow-import-from-derivation"] == "false"
    assert opts["allow-unsafe-native-code-during-evaluation"] == "false"
    assert rec.cmd[rec.cmd.index("eval"):rec.cmd.index("--expr")] == [
        "eval", "--read-only", "--json", "-I", str(tmp_path.resolve())]
    assert "--impure" not in rec.cmd
    assert not any(k.startswith(("KUBERNETES", "AWS")) or k == "NIX_PATH" for k in rec.env)
    assert rec.env["HOME"] != "/root" and rec.home_mode == 0o700
    assert not Path(rec.env["HOME"]).exists()  # removed after the run
    assert rec.env["NIX_CONFIG"] == ""


@pytest.mark.parametrize(("locked", "says"), [
    ({"type": "path", "path": "/var/run/secrets/kubernetes.io/serviceaccount/token"},
     "'leak' (path:/var/run/secrets/kubernetes.io/serviceaccount/token) is a local path"),
    ({"type": "git", "url": "file:///var/cache/hyperfleet/git/other/fleet-0123456789ab"},
     "'leak' (git:file:///var/cache/hyperfleet/git/other/fleet-0123456789ab) is a local path"),
    ({"type": "tarball", "url": "file:///etc/hyperfleet.tar"}, "is a local path"),
    ({"type": "file", "url": "/etc/passwd"}, "is a local path"),
    ({"type": "github", "owner": "NixOS", "repo": "nixpkgs", "rev": "a" * 40},
     "'leak' (github:NixOS/nixpkgs) would have to be fetched"),
    ({"type": "git", "url": "https://bob:tok3n@git.example.com/x"},
     "'leak' (git:https://***@git.example.com/x) would have to be fetched"),
])
def test_flake_lock_inputs_are_refused_before_nix_runs(tmp_path: Path, locked: dict[str, str],
                                                       says: str) -> None:
    lock = {"nodes": {"leak": {"flake": False, "locked": locked, "original": locked},
                      "root": {"inputs": {"leak": "leak"}}}, "root": "root", "version": 7}
    (tmp_path / "flake.lock").write_text(json.dumps(lock))
    rec = _Recorder()
    out = render_nix(tmp_path, "fleet", "ns", nix="/usr/bin/nix", run=rec)
    assert rec.cmd == []  # nix never saw it
    (err,) = out.errors
    assert err.where.file == "fleet/flake.lock" and says in err.message
    assert "tok3n" not in err.message
    (tmp_path / "flake.lock").write_text("{nope")
    (err,) = render_nix(tmp_path, "fleet", "ns", nix="/usr/bin/nix", run=rec).errors
    assert str(err).startswith("fleet/flake.lock: not a valid flake.lock")
    no_inputs = {"nodes": {"root": {}}, "root": "root", "version": 7}
    (tmp_path / "flake.lock").write_text(json.dumps(no_inputs))
    assert render_nix(tmp_path, "fleet", "ns", nix="/usr/bin/nix", run=rec).ok


NIX = shutil.which("nix")
needs_nix = pytest.mark.skipif(NIX is None, reason="nix is not installed")


@pytest.fixture
def store_watch() -> Iterator[str]:
    """A marker for the test's secret; afterwards, no store path may hold it (in name or
    content). Any that a regression did leave are deleted again (only those)."""
    marker = f"hf-secret-{secrets.token_hex(8)}"
    before = set(os.listdir("/nix/store"))
    yield marker
    leaked = []
    for name in sorted(set(os.listdir("/nix/store")) - before):
        path = Path("/nix/store") / name
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        if marker in name or any(marker.encode() in f.read_bytes() for f in files):
            leaked.append(str(path))
    if leaked:
        r = subprocess.run(["nix-store", "--delete", *leaked], capture_output=True, text=True,
                           check=False)
        pytest.fail(f"copied into the world-readable store: {leaked} (removed again: "
                    f"{r.returncode == 0}: {r.stderr.strip()[-300:]})")


_VM = ('vm = s: { apiVersion = "hyperfleet.dev/v1alpha1"; kind = "VirtualMachine"; '
       'metadata = { name = "web-1"; annotations.stolen = s; }; '
       'spec = { cpus = 1; memory = "1Gi"; boot.kernel = "/k"; }; };')
#: Ways a pushed flake could read a controller file (@SECRET@) into a manifest or the store.
_LEAKS = {
    "input": '{ inputs.leak = { url = "path:@SECRET@"; flake = false; };\n'
             '  outputs = { self, leak }: let @VM@ in '
             '{ hyperfleet = [ (vm (builtins.readFile leak)) ]; };\n}',
    "fetchTree": '{ outputs = { self }: let @VM@ in { hyperfleet = [ (vm (builtins.readFile '
                 '(builtins.fetchTree { type = "path"; path = "@SECRET@"; '
                 'narHash = "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="; }))) ]; }; }',
    "absolute": '{ outputs = { self }: let @VM@ in '
                '{ hyperfleet = [ (vm (builtins.readFile @SECRET@)) ]; }; }',
    "fetchurl": '{ outputs = { self }: let @VM@ in { hyperfleet = [ (vm (builtins.readFile '
                '(builtins.fetchurl "file://@SECRET@"))) ]; }; }',
    "ifd": '{ outputs = { self }: let @VM@ in { hyperfleet = [ (vm (builtins.readFile (derivation { '
           'name = "x"; system = "x86_64-linux"; builder = "/bin/sh"; '
           'args = [ "-c" "/bin/cat @SECRET@ > $out" ]; }))) ]; }; }',
    "env": '{ outputs = { self }: let @VM@ in '
           '{ hyperfleet = [ (vm (builtins.getEnv "HF_TEST_SECRET")) ]; }; }',
}


@needs_nix
@pytest.mark.parametrize("attack", sorted(_LEAKS))
def test_real_nix_cannot_read_the_controllers_files(tmp_path: Path, store_watch: str, attack: str,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    request: pytest.FixtureRequest) -> None:
    # World-readable, as a file the build users could read if a build ever ran.
    host = Path(tempfile.mkdtemp(prefix="hf-host-"))
    host.chmod(0o755)
    secret = host / "token"
    secret.write_text(store_watch)
    secret.chmod(0o644)
    request.addfinalizer(lambda: shutil.rmtree(host))
    monkeypatch.setenv("HF_TEST_SECRET", store_watch)
    flake = tmp_path / f"repo-{store_watch}"
    flake.mkdir()
    (flake / "flake.nix").write_text(_LEAKS[attack].replace("@SECRET@", str(secret)).replace("@VM@", _VM))
    out = render_nix(flake, "fleet", "ns", nix=NIX, timeout=120)
    assert store_watch not in json.dumps([m.body for m in out.manifests]) + str(out.errors)
    if attack == "env":  # evaluates, but sees nothing of the controller's environment
        assert out.ok and out.manifests[0].body["metadata"]["annotations"]["stolen"] == ""
    else:
        assert not out.ok and out.errors[0].where.file.startswith("fleet/flake.")


@needs_nix
def test_real_nix_reads_files_inside_the_flake_and_names_them_in_errors(tmp_path: Path,
                                                                          store_watch: str) -> None:
    flake = tmp_path / f"repo-{store_watch}"
    (flake / "lib").mkdir(parents=True)
    # "${self}" would copy the checkout into the store; --read-only keeps it out.
    (flake / "flake.nix").write_text('{ outputs = { self }: { hyperfleet = builtins.seq "${self}" '
                                     '(import ./lib/vms.nix); }; }\n')
    (flake / "lib" / "vms.nix").write_text(
        '[ { apiVersion = "hyperfleet.dev/v1alpha1"; kind = "VirtualMachine"; '
        f'metadata.name = "web"; metadata.annotations.m = "{store_watch}"; '
        'spec = { cpus = 1; memory = "1Gi"; boot.kernel = "/k"; }; } ]\n')
    out = render_nix(flake, "clusters/prod", "ns", nix=NIX, timeout=120)
    assert out.ok, [str(e) for e in out.errors]
    assert [m.ref.name for m in out.manifests] == ["web"]
    (flake / "lib" / "vms.nix").write_text('[ (throw "vm web is wrong") ]\n')
    (err,) = render_nix(flake, "clusters/prod", "ns", nix=NIX, timeout=120).errors
    assert "vm web is wrong" in err.message and str(tmp_path) not in err.message
