"""The installed `hyperfleet` executable (and its kubectl plugin name) against the real API
server: what it prints, what it changes, and its exit codes.

No controller or agent runs here: the commands only read and write objects, and where a
test needs an agent's answer (--wait) it writes that status itself with kubectl, as the
agent would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from hyperfleet.reconcilers.gitops.types import FIELD_MANAGER, OWNER_LABEL, RECONCILE_NOW_ANNOTATION

from .conftest import Cluster, wait_for

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
HYPERFLEET = BIN / "hyperfleet"


def vm_manifest(name: str, power: str = "Running", strategy: str = "Always",
                labels: dict[str, str] | None = None) -> str:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return yaml.safe_dump({
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine", "metadata": meta,
        "spec": {"cpus": 1, "memory": "256Mi", "boot": {"kernel": "/tmp/vmlinux"},
                 "powerState": power, "runStrategy": strategy}})


def hf(c: Cluster, *args: str, kubeconfig: Path | None = None, timeout: float = 60,
       exe: Path = HYPERFLEET) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig or c.kubeconfig)}
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def hf_bg(c: Cluster, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "KUBECONFIG": str(c.kubeconfig)}
    return subprocess.Popen([str(HYPERFLEET), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    """The process failed with ``code`` and said why in exactly one line, no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def spec_of(c: Cluster, name: str) -> dict[str, Any]:
    body = c.get("hvm", name)
    assert body is not None
    return dict(body["spec"])


def patch_status(c: Cluster, kind: str, name: str, status: dict[str, Any]) -> None:
    c.kubectl("patch", kind, name, "--subresource=status", "--type=merge", "-p",
              json.dumps({"status": status}))


def test_version_also_as_a_kubectl_plugin(cluster: Cluster) -> None:
    from importlib.metadata import version

    r = hf(cluster, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"hyperfleet {version('hyperfleet')}"
    # kubectl runs `kubectl-hyperfleet` from PATH for `kubectl hyperfleet ...`.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "KUBECONFIG": str(cluster.kubeconfig)}
    cluster.apply(vm_manifest("plugged"))
    kubectl = shutil.which("kubectl")
    assert kubectl
    r2 = subprocess.run([kubectl, "hyperfleet", "get", "vms", "-n", cluster.namespace, "-o",
                         "json"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r2.returncode == 0, r2.stderr
    assert [i["metadata"]["name"] for i in json.loads(r2.stdout)["items"]] == ["plugged"]


def test_get_formats_and_namespaces(cluster: Cluster, tmp_path: Path) -> None:
    c, ns = cluster, cluster.namespace
    for name in ("web-2", "web-1"):
        assert c.apply(vm_manifest(name)).returncode == 0
    patch_status(c, "hvm", "web-1", {"phase": "Running", "nodeName": "n1",
                                     "hypervisor": {"state": "Running"}, "restartCount": 3,
                                     "conditions": [{"type": "Ready", "status": "True",
                                                     "reason": "Running", "message": "up"}]})

    r = hf(c, "get", "vms", "-n", ns, "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kind"] == "List" and [i["metadata"]["name"] for i in doc["items"]] == ["web-1", "web-2"]

    r = hf(c, "get", "hvm", "web-1", "-n", ns, "-o", "yaml")
    one = yaml.safe_load(r.stdout)
    assert r.returncode == 0 and one["kind"] == "VirtualMachine" and one["status"]["nodeName"] == "n1"

    table = hf(c, "get", "vms", "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "NODE", "READY", "CPUS", "MEMORY", "AGE"]
    assert table[1].split()[:6] == ["web-1", "Running", "n1", "True", "1", "256Mi"]
    wide = hf(c, "get", "vms", "-n", ns, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "NODE", "READY", "CPUS", "MEMORY", "STATE",
                               "RESTARTS", "AGE"]
    assert wide[1].split()[6:8] == ["Running", "3"]

    everywhere = hf(c, "get", "vms", "-A").stdout.splitlines()
    assert everywhere[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert [ns, "web-1"] in [line.split()[:2] for line in everywhere[1:]]

    # No -n: the namespace of the kubeconfig's current context, as kubectl does.
    kc = yaml.safe_load(c.kubeconfig.read_text())
    kc["contexts"][0]["context"]["namespace"] = ns
    mine = tmp_path / "kubeconfig"
    mine.write_text(yaml.safe_dump(kc))
    r = hf(c, "get", "vms", "-o", "json", kubeconfig=mine)
    assert [i["metadata"]["name"] for i in json.loads(r.stdout)["items"]] == ["web-1", "web-2"]
    r = hf(c, "stop", "web-2", kubeconfig=mine)
    assert r.returncode == 0, r.stderr
    assert spec_of(c, "web-2")["powerState"] == "Stopped"
    # ... and the job commands too.
    r = hf(c, "job", "status", "nope", kubeconfig=mine)
    assert f"{ns}/nope" in one_line_error(r, 4)

    node = c.node("a")
    c.apply(f"apiVersion: hyperfleet.dev/v1alpha1\nkind: WorkerNode\nmetadata: {{name: {node}}}\n"
            "spec: {pool: gpu}\n")
    try:
        r = hf(c, "get", "nodes", node)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[1].split()[:2] == [node, "gpu"]
    finally:
        c.kubectl("delete", "wn", node, namespaced=False, check=False)


def test_power_verbs_patch_power_state(cluster: Cluster) -> None:
    c, ns = cluster, cluster.namespace
    c.apply(vm_manifest("db", strategy="Halted", power="Stopped"))
    r = hf(c, "start", "db", "-n", ns)
    assert r.returncode == 0, r.stderr
    # runStrategy Halted keeps a VM off whatever powerState says: start leaves it.
    assert {k: spec_of(c, "db")[k] for k in ("powerState", "runStrategy")} == {
        "powerState": "Running", "runStrategy": "Always"}
    assert hf(c, "vm", "pause", "db", "-n", ns).returncode == 0
    assert spec_of(c, "db")["powerState"] == "Paused"
    assert hf(c, "unpause", "db", "-n", ns).returncode == 0
    assert spec_of(c, "db")["powerState"] == "Running"
    assert hf(c, "sleep", "db", "-n", ns).returncode == 0
    assert spec_of(c, "db")["powerState"] == "Sleeping"
    assert hf(c, "wake", "db", "-n", ns).returncode == 0
    assert hf(c, "stop", "db", "-n", ns).returncode == 0
    assert spec_of(c, "db")["powerState"] == "Stopped"
    # unpause must never boot a stopped VM
    msg = one_line_error(hf(c, "unpause", "db", "-n", ns), 1)
    assert "powerState Stopped" in msg and "start it" in msg
    assert spec_of(c, "db")["powerState"] == "Stopped"


def test_restart_and_migrate_create_vm_jobs(cluster: Cluster) -> None:
    c, ns = cluster, cluster.namespace
    c.apply(vm_manifest("app"))
    r = hf(c, "restart", "app", "-n", ns, "--hard", "--reason", "stuck")
    assert r.returncode == 0, r.stderr
    jobs = json.loads(c.kubectl("get", "vmjobs", "-o", "json").stdout)["items"]
    assert len(jobs) == 1
    spec = jobs[0]["spec"]
    assert spec["operation"] == "vm.reboot" and spec["payload"]["data"] == {"mode": "hard"}
    assert spec["routing"]["targetVm"]["name"] == "app" and spec["audit"]["reason"] == "stuck"
    assert jobs[0]["metadata"]["name"].startswith("restart-app-")

    node = c.node("b")
    assert "workernode" in one_line_error(hf(c, "migrate", "app", "--to", node, "-n", ns), 4)
    r = c.apply(f"apiVersion: hyperfleet.dev/v1alpha1\nkind: WorkerNode\nmetadata: {{name: {node}}}\n"
                "spec: {pool: default}\n")
    assert r.returncode == 0, r.stderr
    try:
        r = hf(c, "vm", "migrate", "app", "--to", node, "-n", ns)
        assert r.returncode == 0, r.stderr
        ops = {j["spec"]["operation"]: j["spec"] for j in
               json.loads(c.kubectl("get", "vmjobs", "-o", "json").stdout)["items"]}
        assert ops["vm.migrate"]["payload"]["data"]["destinationNode"] == node
    finally:
        c.kubectl("delete", "wn", node, namespaced=False, check=False)


def test_not_found_is_exit_4(cluster: Cluster) -> None:
    ns = cluster.namespace
    for argv in (["start", "ghost"], ["get", "vm", "ghost"], ["restart", "ghost"],
                 ["job", "status", "ghost"], ["reconcile", "gitsource", "ghost"]):
        msg = one_line_error(hf(cluster, *argv, "-n", ns), 4)
        assert "ghost" in msg and "not found" in msg, argv


def test_api_unreachable_is_exit_3(cluster: Cluster, tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = yaml.safe_load(cluster.kubeconfig.read_text())
    kc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    dead = tmp_path / "kubeconfig"
    dead.write_text(yaml.safe_dump(kc))
    for argv in (["get", "vms"], ["stop", "x"], ["job", "list"], ["job", "status", "x"]):
        started = time.monotonic()
        msg = one_line_error(hf(cluster, *argv, kubeconfig=dead), 3)
        assert f"127.0.0.1:{port}" in msg and "connection refused" in msg, msg
        assert time.monotonic() - started < 20


def test_job_status_fails_for_a_failed_job_and_resubmit_says_it_exists(
        cluster: Cluster, tmp_path: Path) -> None:
    c, ns = cluster, cluster.namespace
    job = tmp_path / "job.yaml"
    job.write_text(hf(c, "job", "create", "vm.reboot", "--target", "app", "--name", "reboot-app",
                      "-n", ns).stdout)
    assert hf(c, "job", "submit", str(job)).returncode == 0
    again = one_line_error(hf(c, "job", "submit", str(job)), 1)
    assert "already exists" in again and f"hyperfleet job status reboot-app -n {ns}" in again

    r = hf(c, "job", "status", "reboot-app", "-n", ns)
    assert r.returncode == 0 and "Pending" in r.stdout
    patch_status(c, "vmjob", "reboot-app", {"phase": "Failed", "reason": "VmNotRunning",
                                            "lastError": "[E_STATE] only a Running VM can be rebooted"})
    r = hf(c, "job", "status", "reboot-app", "-n", ns)
    assert r.returncode == 1 and "only a Running VM can be rebooted" in r.stderr
    assert "Traceback" not in r.stderr
    # the table still says what happened
    assert "Failed" in r.stdout


def test_wait_follows_the_status_the_agent_writes(cluster: Cluster) -> None:
    c, ns = cluster, cluster.namespace
    c.apply(vm_manifest("w1", power="Stopped"))
    p = hf_bg(c, "start", "w1", "-n", ns, "--wait", "--timeout", "60")
    try:
        gen = wait_for(lambda: spec_of(c, "w1")["powerState"] == "Running"
                       and (c.get("hvm", "w1") or {})["metadata"]["generation"], 30, "start patch")
        time.sleep(1)
        assert p.poll() is None  # nothing reported yet: still waiting
        # What the agent would write once the VM booted.
        patch_status(c, "hvm", "w1", {"phase": "Running", "observedGeneration": gen})
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
    finally:
        p.kill()

    p = hf_bg(c, "sleep", "w1", "-n", ns, "--wait", "--timeout", "60")
    try:
        gen = wait_for(lambda: spec_of(c, "w1")["powerState"] == "Sleeping"
                       and (c.get("hvm", "w1") or {})["metadata"]["generation"], 30, "sleep patch")
        patch_status(c, "hvm", "w1", {"phase": "Failed", "observedGeneration": gen, "conditions": [
            {"type": "Failure", "status": "True", "reason": "HypervisorError",
             "message": "vm.snapshot: disk full"}]})
        _, err = p.communicate(timeout=30)
        assert p.returncode == 1 and err.strip().count("\n") == 0, err
        assert "HypervisorError: vm.snapshot: disk full" in err
    finally:
        p.kill()

    msg = one_line_error(hf(c, "wake", "w1", "-n", ns, "--wait", "--timeout", "1"), 1)
    assert "timed out after 1s" in msg and "phase Failed" in msg


def test_job_verb_wait_reports_the_job_outcome(cluster: Cluster) -> None:
    c, ns = cluster, cluster.namespace
    c.apply(vm_manifest("r1"))
    p = hf_bg(c, "restart", "r1", "-n", ns, "--wait", "--timeout", "60")
    try:
        name = wait_for(lambda: [j["metadata"]["name"] for j in json.loads(
            c.kubectl("get", "vmjobs", "-o", "json").stdout)["items"]], 30, "job created")[0]
        patch_status(c, "vmjob", name, {"phase": "TimedOut", "lastError": "[TIMEOUT] ran 300s"})
        out, err = p.communicate(timeout=30)
        assert p.returncode == 1, (out, err)
        assert err.strip() == f"error: vmjob {ns}/{name} TimedOut: [TIMEOUT] ran 300s"
    finally:
        p.kill()


def test_gitsource_reconcile_suspend_resume(cluster: Cluster) -> None:
    c, ns = cluster, cluster.namespace
    c.apply("apiVersion: hyperfleet.dev/v1alpha1\nkind: GitSource\nmetadata: {name: fleet}\n"
            "spec: {url: 'file:///tmp/nowhere.git'}\n")
    p = hf_bg(c, "reconcile", "gitsource", "fleet", "-n", ns, "--wait", "--timeout", "60")
    try:
        requested = wait_for(lambda: ((c.get("gitsource", "fleet") or {}).get("metadata", {})
                                      .get("annotations") or {}).get(RECONCILE_NOW_ANNOTATION),
                             30, "reconcile request")
        # What the controller writes once it handled the request.
        patch_status(c, "gitsource", "fleet", {
            "lastHandledReconcileAt": requested, "lastAppliedCommit": "a" * 40,
            "conditions": [{"type": "Ready", "status": "True", "reason": "ReconciliationSucceeded",
                            "message": "Applied revision HEAD@aaaaaaaaaaaa: 3 object(s)",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]})
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "aaaaaaaaaaaa applied" in out
    finally:
        p.kill()

    assert hf(c, "suspend", "gs", "fleet", "-n", ns).returncode == 0
    assert (c.get("gitsource", "fleet") or {})["spec"]["suspend"] is True
    msg = one_line_error(hf(c, "reconcile", "gitsource", "fleet", "-n", ns), 1)
    assert "suspended" in msg and "hyperfleet resume gitsource fleet" in msg
    assert hf(c, "resume", "gitsource", "fleet", "-n", ns).returncode == 0
    assert (c.get("gitsource", "fleet") or {})["spec"]["suspend"] is False


def test_a_gitops_owned_power_state_warns_that_it_will_be_reverted(cluster: Cluster) -> None:
    c, ns = cluster, cluster.namespace
    owner = f"{ns}.fleet"
    # Applied as the GitSource applies: server-side, its field manager, its label.
    r = c.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-",
                  input_=vm_manifest("gitvm", labels={OWNER_LABEL: owner}))
    assert r.returncode == 0, r.stderr
    r = hf(c, "stop", "gitvm", "-n", ns)
    assert r.returncode == 0
    assert r.stderr.startswith("warning: ") and r.stderr.count("\n") == 1, r.stderr
    assert "reverts this" in r.stderr and "suspend gitsource" in r.stderr
    # A VM whose Git manifest does not set powerState keeps a hand change: no warning.
    bare = yaml.safe_load(vm_manifest("gitvm2", labels={OWNER_LABEL: owner}))
    del bare["spec"]["powerState"]
    c.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-",
              input_=yaml.safe_dump(bare))
    r = hf(c, "stop", "gitvm2", "-n", ns)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_get_watch_prints_each_change_as_a_row(cluster: Cluster) -> None:
    """`hyperfleet get vms -w`, like `kubectl get -w`: the table, then one row per change."""
    c = cluster
    assert c.apply(vm_manifest("w1")).returncode == 0
    p = hf_bg(c, "get", "vms", "-n", c.namespace, "-w", "--watch-timeout", "20")
    assert p.stdout is not None
    try:
        header = p.stdout.readline()
        assert header.split()[:3] == ["NAME", "PHASE", "NODE"], header
        assert p.stdout.readline().split()[0] == "w1"
        patch_status(c, "hvm", "w1", {"phase": "Starting"})
        row = p.stdout.readline().split()
        assert row[:2] == ["w1", "Starting"], row
        assert c.apply(vm_manifest("w2")).returncode == 0
        assert p.stdout.readline().split()[0] == "w2"
    finally:
        p.kill()
        p.wait()
    r = hf(c, "get", "vms", "w1", "-n", c.namespace, "-w", "--watch-timeout", "2", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["metadata"]["name"] == "w1", r.stderr
