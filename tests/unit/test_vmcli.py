"""The CLI's pure parts: kinds, columns and formats of `get`, what each power verb patches,
when --wait is done, GitOps ownership, YAML that cannot hang, --set keys, exit codes."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from typer.testing import CliRunner

from hyperfleet.operator import clicommon, jobcli, vmcli
from hyperfleet.operator.cli import app
from hyperfleet.operator.clicommon import CliError, ExitCode
from hyperfleet.reconcilers import kinds
from hyperfleet.reconcilers.gitops.types import FIELD_MANAGER, OWNER_LABEL, SOURCE_ANNOTATION
from hyperfleet.reconcilers.jobs.parse import from_manifest

runner = CliRunner()
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


# ----------------------------------------------------------------------- get


def _put(body: dict[str, Any], path: str, value: Any) -> None:
    """Write ``value`` where a printer column's JSONPath reads (the test's inverse), with a
    decoy list item before a filtered one."""
    cur: Any = body
    tokens = re.findall(r'\[\?\(@\.(\w+)=="([^"]*)"\)\]|\.(\w+)', path)
    for i, (field, want, key) in enumerate(tokens):
        last = i == len(tokens) - 1
        if key:
            nxt_is_filter = not last and tokens[i + 1][0]
            if last:
                cur[key] = value
            else:
                cur = cur.setdefault(key, [] if nxt_is_filter else {})
        else:
            item = {field: want}
            cur.extend([{field: "decoy"}, item])
            cur = item


@pytest.mark.parametrize("crd", kinds.ALL_KINDS, ids=lambda k: k.kind)
def test_every_printer_column_path_is_read(crd: Any) -> None:
    for col in crd.columns:
        body: dict[str, Any] = {}
        _put(body, col["jsonPath"], "the-value")
        assert vmcli.column_value(body, col["jsonPath"]) == "the-value", col
        assert vmcli.column_value({}, col["jsonPath"]) is None


def test_filter_picks_the_matching_condition() -> None:
    body = {"status": {"conditions": [{"type": "Stalled", "status": "True"},
                                      {"type": "Ready", "status": "False", "message": "boom"}]}}
    assert vmcli.column_value(body, '.status.conditions[?(@.type=="Ready")].message') == "boom"
    assert vmcli.column_value(body, '.status.conditions[?(@.type=="Gone")].message') is None


@pytest.mark.parametrize(("seconds", "shown"), [
    (5, "5s"), (119, "119s"), (150, "2m30s"), (600, "10m"), (3900, "65m"), (4 * 3600, "4h"),
    (4 * 3600 + 60, "4h1m"), (30 * 3600, "30h"), (3 * 86400, "3d"), (3 * 86400 + 5 * 3600, "3d5h"),
    (20 * 86400, "20d"), (800 * 86400, "2y70d")])
def test_age_reads_like_kubectl(seconds: int, shown: str) -> None:
    ts = (NOW - timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    assert vmcli.age(ts, NOW) == shown
    assert vmcli.age(None, NOW) == ""


@pytest.mark.parametrize(("word", "plural"), [
    ("vms", "virtualmachines"), ("hvm", "virtualmachines"), ("VM", "virtualmachines"),
    ("wn", "workernodes"), ("nodes", "workernodes"), ("jobs", "vmjobs"), ("gs", "gitsources")])
def test_kinds_by_kubectl_names(word: str, plural: str) -> None:
    assert vmcli.resolve_kind(word).resource.plural == plural


def test_an_unknown_kind_is_a_usage_error_listing_the_kinds() -> None:
    with pytest.raises(CliError) as e:
        vmcli.resolve_kind("pods")
    assert e.value.code == ExitCode.USAGE and "vms" in str(e.value) and "nodes" in str(e.value)
    r = runner.invoke(app, ["get", "pods"])
    assert r.exit_code == 2 and "unknown kind 'pods'" in r.output


def _vm(name: str, ns: str = "prod", **status: Any) -> dict[str, Any]:
    return {"apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": ns, "generation": 1,
                         "creationTimestamp": (NOW - timedelta(minutes=3)).isoformat()},
            "spec": {"cpus": 2, "memory": "1Gi", "boot": {"kernel": "/k"}},
            "status": status}


def test_table_wide_and_all_namespaces() -> None:
    k = vmcli.resolve_kind("vms")
    long_name = "a-very-long-virtual-machine-name-" + "x" * 80
    items = [_vm(long_name, phase="Running", nodeName="n1", hypervisor={"state": "Running"},
                 restartCount=2, conditions=[{"type": "Ready", "status": "True"}])]
    text = vmcli.render(k, items, "table", single=False, all_namespaces=True, now=NOW)
    lines = text.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "PHASE", "NODE", "READY", "CPUS", "MEMORY",
                                "AGE"]
    # never wrapped or cut, whatever the width, and no trailing blanks
    assert lines[1].split() == ["prod", long_name, "Running", "n1", "True", "2", "1Gi", "3m"]
    assert all(line == line.rstrip() for line in lines)
    wide = vmcli.render(k, items, "wide", single=False, all_namespaces=False, now=NOW)
    assert wide.splitlines()[0].split() == ["NAME", "PHASE", "NODE", "READY", "CPUS", "MEMORY",
                                            "STATE", "RESTARTS", "AGE"]
    # cluster-scoped kinds get no NAMESPACE column even with -A
    node = {"metadata": {"name": "n1"}, "spec": {"pool": "gpu", "unschedulable": True, "drain": True},
            "status": {"phase": "Ready", "vmCount": 4, "scheduling": "Draining"}}
    lines = vmcli.render(vmcli.resolve_kind("wn"), [node], "table", single=False,
                         all_namespaces=True, now=NOW).splitlines()
    assert lines[0].split()[:5] == ["NAME", "STATUS", "POOL", "SCHEDULING", "VMS"]
    assert lines[1].split() == ["n1", "Ready", "gpu", "Draining", "4"]


def test_json_and_yaml_are_the_objects() -> None:
    k = vmcli.resolve_kind("vms")
    items = [_vm("a"), _vm("b")]
    doc = json.loads(vmcli.render(k, items, "json", single=False, all_namespaces=False))
    assert doc["kind"] == "List" and doc["items"] == items
    one = yaml.safe_load(vmcli.render(k, items[:1], "yaml", single=True, all_namespaces=False))
    assert one == items[0]


# ----------------------------------------------------------------------- power verbs


def _spec_vm(power: str = "Running", strategy: str = "Always", generation: int = 4,
             halted: int | None = None) -> dict[str, Any]:
    status = {"haltedGeneration": halted} if halted is not None else {}
    return {"metadata": {"name": "web", "generation": generation},
            "spec": {"powerState": power, "runStrategy": strategy}, "status": status}


def test_power_patches() -> None:
    v = vmcli.POWER_VERBS
    assert vmcli.power_patches(v["stop"], _spec_vm()) == [{"spec": {"powerState": "Stopped"}}]
    assert vmcli.power_patches(v["start"], _spec_vm()) == []
    assert vmcli.power_patches(v["pause"], _spec_vm()) == [{"spec": {"powerState": "Paused"}}]
    assert vmcli.power_patches(v["pause"], _spec_vm("Paused")) == []
    assert vmcli.power_patches(v["sleep"], _spec_vm("Paused")) == [
        {"spec": {"powerState": "Sleeping"}}]
    # Halted keeps a VM off whatever powerState says: starting it leaves Halted.
    assert vmcli.power_patches(v["start"], _spec_vm("Running", "Halted")) == [
        {"spec": {"runStrategy": "Always"}}]
    # Manual, the guest stopped itself at this generation: only a new generation restarts it.
    assert vmcli.power_patches(v["start"], _spec_vm("Running", "Manual", halted=4)) == [
        {"spec": {"powerState": "Stopped"}}, {"spec": {"powerState": "Running"}}]
    assert vmcli.power_patches(v["start"], _spec_vm("Running", "Manual", halted=3)) == []


@pytest.mark.parametrize(("verb", "power", "hint"), [
    ("unpause", "Stopped", "start it"), ("wake", "Stopped", "start it"), ("pause", "Sleeping", "wake it"),
    ("sleep", "Stopped", "start it")])
def test_verbs_refuse_a_state_they_do_not_apply_to(verb: str, power: str, hint: str | None) -> None:
    with pytest.raises(CliError) as e:
        vmcli.power_patches(vmcli.POWER_VERBS[verb], _spec_vm(power))
    assert e.value.code == ExitCode.FAILED and f"powerState {power}" in str(e.value)
    if hint:
        assert hint in str(e.value)


def test_vm_settled() -> None:
    def vm(**st: Any) -> dict[str, Any]:
        return {"status": st}

    assert vmcli.vm_settled(vm(phase="Running", observedGeneration=2), "Running", 3) == (False, None)
    assert vmcli.vm_settled(vm(phase="Running", nodeName="n1", observedGeneration=2),
                            "Stopped", 3) == (False, None)
    # never placed: nothing runs it, and no agent will ever report it Stopped
    assert vmcli.vm_settled(vm(phase="Unschedulable"), "Stopped", 3) == (True, None)
    assert vmcli.vm_settled(vm(phase="Running", observedGeneration=3), "Running", 3) == (True, None)
    assert vmcli.vm_settled(vm(phase="Starting", observedGeneration=3), "Running", 3) == (False, None)
    done, why = vmcli.vm_settled(vm(phase="Failed", observedGeneration=3, conditions=[
        {"type": "Failure", "status": "True", "reason": "PathNotAllowed",
         "message": "kernel /etc/x\nis outside"}]), "Running", 3)
    assert not done and why == "PathNotAllowed: kernel /etc/x is outside"


def _owned(fields: list[str] | None, annotation: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web", "namespace": "prod",
                            "labels": {OWNER_LABEL: "ops.fleet"}}
    if annotation:
        meta["annotations"] = {SOURCE_ANNOTATION: "ops/fleet"}
    if fields is not None:
        meta["managedFields"] = [
            {"manager": "kubectl", "fieldsV1": {"f:spec": {"f:powerState": {}}}},
            {"manager": FIELD_MANAGER, "operation": "Apply",
             "fieldsV1": {"f:spec": {f"f:{f}": {} for f in fields}}}]
    return meta


def test_git_reverts_only_what_git_sets() -> None:
    assert vmcli.git_reverts({"metadata": _owned(["powerState", "cpus"])}, ["powerState"]) == "ops/fleet"
    assert vmcli.git_reverts({"metadata": _owned(["cpus"])}, ["powerState"]) is None
    assert vmcli.git_reverts({"metadata": _owned(["cpus"])}, ["powerState", "cpus"]) == "ops/fleet"
    # managedFields stripped: assume the worst
    assert vmcli.git_reverts({"metadata": _owned(None, annotation=False)}, ["powerState"]) == "ops.fleet"
    assert vmcli.git_reverts({"metadata": {"name": "x"}}, ["powerState"]) is None


def test_reconcile_outcome() -> None:
    def gs(handled: str, ready: str, reconciling: str = "False", reason: str = "x") -> dict[str, Any]:
        return {"status": {"lastHandledReconcileAt": handled, "conditions": [
            {"type": "Ready", "status": ready, "reason": "ApplyFailed", "message": "bad\nvm"},
            {"type": "Reconciling", "status": reconciling, "reason": reason}]}}

    assert vmcli.reconcile_outcome(gs("old", "True"), "new") == (False, None)
    assert vmcli.reconcile_outcome(gs("new", "True"), "new") == (True, None)
    assert vmcli.reconcile_outcome(gs("new", "True", "True", "Progressing"), "new") == (False, None)
    assert vmcli.reconcile_outcome(gs("new", "False"), "new") == (True, "ApplyFailed: bad vm")
    # applied, the health check still waits for the VMs (spec.healthCheck)
    assert vmcli.reconcile_outcome(gs("new", "Unknown", "True", "Progressing"), "new") == (False, None)
    assert vmcli.reconcile_outcome(gs("new", "Unknown"), "new") == (False, None)


def test_vm_job_is_valid_and_named_for_the_verb() -> None:
    m = vmcli.vm_job("vm.migrate", "web", "prod", {"destinationNode": "n2"}, "migrate",
                     idempotency_key="move-web", reason=None, now=NOW)
    job = from_manifest(m)
    assert m["metadata"]["name"].startswith("migrate-web-") and m["metadata"]["namespace"] == "prod"
    assert job.execution.idempotency_key == "move-web"
    assert job.routing.target_vm is not None and job.routing.target_vm.name == "web"
    with pytest.raises(CliError) as e:
        vmcli.vm_job("vm.migrate", "web", "prod", {"destinationNode": "Not_A_Node"}, "migrate",
                     idempotency_key=None, reason=None, now=NOW)
    assert e.value.code == ExitCode.USAGE and "destinationNode" in str(e.value)


# ----------------------------------------------------------------------- YAML, --set


BOMB = "\n".join(
    ['lol: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] +
    [f"l{i}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["validate", "submit"])
def test_a_billion_laughs_job_is_refused_at_once(command: str, tmp_path: Path) -> None:
    # 9^9 strings where validation walks them (a health check's names); the anchors sit in
    # an extra spec field before it. Plain safe_load + validation ran for minutes.
    bombs = "\n".join("    " + line for line in BOMB.splitlines())
    path = tmp_path / "bomb.yaml"
    path.write_text("apiVersion: hyperfleet.dev/v1alpha1\nkind: VmJob\nmetadata: {name: bomb}\n"
                    "spec:\n  version: '1.0'\n  operation: system.health-check\n"
                    f"  bombs:\n{bombs}\n"
                    "  payload:\n    type: system.health-check.v1\n    data:\n      checks: *i\n")
    started = time.monotonic()
    r = runner.invoke(app, ["job", command, str(path)])
    assert time.monotonic() - started < 10
    assert r.exit_code == 2, r.output
    assert "billion laughs" in r.output and r.output.count("\n") == 1


def test_aliases_within_reason_load_and_recursion_is_refused() -> None:
    assert clicommon.safe_load_all("a: &x [1, 2]\nb: *x\n") == [{"a": [1, 2], "b": [1, 2]}]
    with pytest.raises(CliError, match="billion laughs"):
        clicommon.safe_load_all(BOMB)
    with pytest.raises(CliError, match="refers to itself"):
        clicommon.safe_load_all("a: &x [1, *x]\n")


@pytest.mark.parametrize(("text", "says"), [("a: [", "line 1, column 5"), ("a: b: c", "line 1, column 5")])
def test_invalid_yaml_is_one_line(text: str, says: str, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    r = runner.invoke(app, ["job", "validate", str(path)])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "not valid YAML" in r.output and says in r.output


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    r = runner.invoke(app, ["job", "submit", str(tmp_path / "nope.yaml")])
    missing = tmp_path / "nope.yaml"
    assert r.exit_code == 2 and r.output.strip() == f"error: {missing}: No such file or directory"


def test_set_keys_are_checked_against_the_payload_model() -> None:
    r = runner.invoke(app, ["job", "create", "vm.resize", "--target", "w", "--set", "desiredCpu=4"])
    assert r.exit_code == 2
    assert "desiredCpu" in r.output and "did you mean desiredCpus" in r.output
    assert "valid fields: desiredCpus, desiredMemory" in r.output
    ok = runner.invoke(app, ["job", "create", "vm.resize", "--target", "w", "--set", "desired_cpus=4",
                             "--set", "desiredMemory=2Gi", "-n", "x"])
    assert ok.exit_code == 0, ok.output
    with pytest.raises(CliError) as e:
        jobcli.check_set_keys("vm.reboot", ["hard"])
    assert "valid fields: mode" in str(e.value)


# ----------------------------------------------------------------------- plumbing


def test_context_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kc: dict[str, Any] = {"apiVersion": "v1", "kind": "Config", "current-context": "b",
          "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
          "users": [{"name": "u", "user": {}}],
          "contexts": [{"name": "a", "context": {"cluster": "c", "user": "u", "namespace": "ay"}},
                       {"name": "b", "context": {"cluster": "c", "user": "u", "namespace": "bee"}}]}
    path = tmp_path / "kc"
    path.write_text(yaml.safe_dump(kc))
    assert clicommon.context_namespace(str(path)) == "bee"
    del kc["contexts"][1]["context"]["namespace"]
    path.write_text(yaml.safe_dump(kc))
    assert clicommon.context_namespace(str(path)) == "default"
    assert clicommon.context_namespace(str(tmp_path / "missing")) == "default"
    # `job create` is offline but still takes the context's namespace
    kc["contexts"][1]["context"]["namespace"] = "bee"
    path.write_text(yaml.safe_dump(kc))
    r = runner.invoke(app, ["job", "create", "vm.reboot", "--target", "w"], env={"KUBECONFIG": str(path)})
    assert r.exit_code == 0 and yaml.safe_load(r.stdout)["metadata"]["namespace"] == "bee"


def test_explain_maps_failures_to_exit_codes() -> None:
    import urllib3.exceptions as u3

    refused = u3.MaxRetryError(None, "/apis", u3.NewConnectionError(  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        "Failed to establish a new connection: [Errno 111] Connection refused"))
    err = clicommon.explain(refused)
    assert err is not None and err.code == ExitCode.UNREACHABLE and "connection refused" in str(err)

    def api(status: int) -> ApiException:
        exc = ApiException(status=status, reason="x")
        exc.body = json.dumps({"message": f"server says {status}"})
        return exc

    codes = {s: clicommon.explain(api(s)) for s in (404, 422, 403, 500)}
    assert {s: e.code for s, e in codes.items() if e} == {
        404: ExitCode.NOT_FOUND, 422: ExitCode.USAGE, 403: ExitCode.FAILED, 500: ExitCode.FAILED}
    assert "server says 422" in str(codes[422])
    assert clicommon.explain(ValueError("a bug")) is None


def test_version_and_exit_codes_in_help() -> None:
    from importlib.metadata import version

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"hyperfleet {version('hyperfleet')}"
    text = " ".join(runner.invoke(app, ["--help"]).output.replace("│", " ").split())
    assert "Exit codes" in text and "4 not found" in text and "unreachable" in text
