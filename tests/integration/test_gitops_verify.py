"""Issue 16: GitSource commit verification and health-gated Ready, end to end: real git
repositories with commits signed by keys made here with ssh-keygen, real `git push`, the
real API server, the GitSource reconciler as its own process; for health, the real
controller and agent (CH double) running the VMs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests import PLACEHOLDER_KERNEL
from tests.signing import SigningKey, ssh_key

from .conftest import Cluster, wait_for
from .test_gitops import (
    GitOpsProc,
    Repo,
    condition,
    cpus,
    events,
    gitsource,
    gs_status,
    names,
    vm,
)
from .test_gitops import gitops as gitops  # the fixtures, re-exported for pytest
from .test_gitops import gitsource_crd as gitsource_crd
from .test_gitops import repo as repo


def push_signed(repo: Repo, message: str, key: SigningKey | None) -> str:
    """Commit everything (signed with ``key``, or not at all) and push it."""
    repo.git("add", "-A")
    repo.git(*(key.git_args() if key else []), "commit", "-q", "--allow-empty", "-m", message)
    repo.git("push", "-q", "origin", "HEAD:main")
    return repo.git("rev-parse", "HEAD")


def fingerprint(public: str) -> str:
    r = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=public, capture_output=True,
                       text=True, check=True)
    return r.stdout.split()[1]


def flow(text: str) -> str:
    """A YAML flow scalar holding ``text`` (JSON strings are YAML)."""
    return json.dumps(text.strip())


def test_only_commits_signed_by_a_listed_key_are_applied(cluster: Cluster, gitops: GitOpsProc,
                                                         repo: Repo, tmp_path: Path) -> None:
    alice = ssh_key(tmp_path / "keys", "alice")
    mallory = ssh_key(tmp_path / "keys", "mallory")
    repo.write("fleet/web.yaml", vm("web-1"))
    good = push_signed(repo, "web-1, signed", alice)
    gitsource(cluster, "fleet", str(repo.remote), extra=(
        f"  verify:\n    provider: ssh\n    publicKeys: [{flow(alice.public)}]\n"))

    def applied(sha: str) -> bool:
        return (gs_status(cluster).get("lastAppliedCommit") == sha
                and condition(cluster, "Ready").get("status") == "True")

    wait_for(lambda: applied(good), 30, "the signed commit applied", cluster)
    sv = condition(cluster, "SourceVerified")
    assert sv["status"] == "True" and fingerprint(alice.public) in sv["message"], sv

    # Unsigned, then signed by a key nobody listed: neither is applied, and both say why.
    for key, reason in ((None, "UnsignedCommit"), (mallory, "UntrustedKey")):
        repo.write("fleet/web.yaml", vm("web-1", cpus=3) + "---\n" + vm("web-2"))
        bad = push_signed(repo, f"refused: {reason}", key)
        wait_for(lambda: condition(cluster, "SourceVerified").get("reason") == reason, 30,  # noqa: B023
                 f"{reason} reported", cluster)
        ready, sv = condition(cluster, "Ready"), condition(cluster, "SourceVerified")
        assert ready["status"] == "False" and ready["reason"] == reason, ready
        assert sv["status"] == "False"
        msg = ready["message"]
        assert bad[:12] in msg and "spec.verify.publicKeys" in msg, msg
        assert f"the last applied commit {good[:12]} stays in place" in msg, msg
        if key is mallory:
            assert fingerprint(mallory.public) in msg, msg
        assert condition(cluster, "Stalled")["status"] == "True"
        assert any(bad[:12] in m for m in events(cluster, reason)), f"no {reason} Warning event"
        st = gs_status(cluster)
        assert st["lastAppliedCommit"] == good and st["lastAttemptedCommit"] == bad
        # Nothing of it reached the cluster: no web-2, web-1 unchanged.
        assert names(cluster) == {"web-1"} and cpus(cluster, "web-1") == 1
        web1 = cluster.get("hvm", "web-1")
        assert web1 is not None and web1["metadata"]["annotations"]["gitops.hyperfleet.dev/commit"] == good

    # Trusting mallory through a Secret (kept beside alice's inline key) lets it through.
    cluster.kubectl("create", "secret", "generic", "more-signers",
                    f"--from-literal=mallory={mallory.public}")
    cluster.kubectl("patch", "gitsource", "fleet", "--type=merge", "-p",
                    json.dumps({"spec": {"verify": {"secretRef": {"name": "more-signers"}}}}))
    wait_for(lambda: applied(bad), 30, "mallory's commit applied once trusted", cluster)
    assert names(cluster) == {"web-1", "web-2"} and cpus(cluster, "web-1") == 3
    assert fingerprint(mallory.public) in condition(cluster, "SourceVerified")["message"]
    assert alice.public.split()[1] not in gitops.logs()  # key material never logged


def test_a_bad_key_is_refused_with_the_field_named(cluster: Cluster, gitops: GitOpsProc, repo: Repo,
                                                    tmp_path: Path) -> None:
    alice = ssh_key(tmp_path / "keys", "alice")
    repo.write("fleet/web.yaml", vm("web-1"))
    push_signed(repo, "web-1", alice)
    # The API server refuses a verify without keys, saying how to fix it.
    r = cluster.apply("apiVersion: hyperfleet.dev/v1alpha1\nkind: GitSource\nmetadata: {name: nokeys}\n"
                      f"spec: {{url: {repo.remote}, verify: {{provider: ssh}}}}\n")
    assert r.returncode != 0 and "set publicKeys or secretRef" in r.stderr, r.stderr
    r = cluster.apply("apiVersion: hyperfleet.dev/v1alpha1\nkind: GitSource\nmetadata: {name: x509}\n"
                      f"spec: {{url: {repo.remote}, verify: {{provider: x509, publicKeys: [k]}}}}\n")
    assert r.returncode != 0 and "provider" in r.stderr, r.stderr
    # A truncated key passes the schema but not the reconciler, which names the entry.
    kind, data = alice.public.split()[:2]
    gitsource(cluster, "fleet", str(repo.remote), extra=(
        f"  verify:\n    provider: ssh\n    publicKeys: [{flow(kind + ' ' + data[:40])}]\n"))
    wait_for(lambda: condition(cluster, "Stalled").get("reason") == "InvalidSpec", 30,
             "the bad key reported", cluster)
    msg = condition(cluster, "Stalled")["message"]
    assert "spec.verify.publicKeys[0]" in msg and "copy the whole .pub line" in msg, msg
    assert names(cluster) == set()


# ---------------------------------------------------------------------- health


def test_ready_follows_the_health_of_the_applied_vms(cluster: Cluster, gitops: GitOpsProc,
                                                     repo: Repo) -> None:
    """The real path: controller and agent (CH double) run the VMs; a VM whose kernel does
    not exist fails in the agent, and the GitSource's Ready says so, naming it. An interval
    of 1h: every Ready change after the first apply comes from the health timer."""
    node = cluster.node("h")
    cluster.start_controller()
    cluster.start_agent(node)
    repo.write("fleet/web.yaml", vm("web-1"))
    first = repo.push("web-1")
    gitsource(cluster, "fleet", str(repo.remote), interval="1h", health=True,
              extra="  healthCheck: {timeout: 2m}\n")

    def ready() -> dict[str, Any]:
        return condition(cluster, "Ready")

    wait_for(lambda: gs_status(cluster).get("lastAppliedCommit") == first, 30, "applied", cluster)
    wait_for(lambda: ready().get("status") == "True", 60, "Ready once web-1 runs", cluster)
    assert ready()["reason"] == "ReconciliationSucceeded"
    assert "all 1 VirtualMachines healthy" in ready()["message"]
    assert condition(cluster, "Healthy")["status"] == "True"
    assert ((cluster.get("hvm", "web-1") or {}).get("status") or {}).get("phase") == "Running"

    missing = f"/tmp/hf-{cluster.namespace}/no-such-kernel"
    repo.write("fleet/broken.yaml", vm("broken-1").replace(PLACEHOLDER_KERNEL, missing))
    second = repo.push("broken-1, whose kernel does not exist")
    cluster.kubectl("annotate", "gitsource", "fleet", "--overwrite", "hyperfleet.dev/reconcile-now=1")
    wait_for(lambda: ready().get("reason") == "HealthCheckFailed", 90, "HealthCheckFailed", cluster)
    r = ready()
    assert r["status"] == "False" and gs_status(cluster)["lastAppliedCommit"] == second
    assert f"{cluster.namespace}/broken-1 (Failed" in r["message"], r
    assert "1 of 2 VirtualMachines unhealthy" in r["message"], r
    assert "web-1" not in r["message"].split("unhealthy;", 1)[1]
    assert condition(cluster, "Healthy")["reason"] == "HealthCheckFailed"
    assert any("broken-1" in m for m in events(cluster, "HealthCheckFailed"))

    # Fixed in Git: Progressing while the agent boots it, then Ready again.
    repo.write("fleet/broken.yaml", vm("broken-1"))
    third = repo.push("broken-1 gets a kernel")
    cluster.kubectl("annotate", "gitsource", "fleet", "--overwrite", "hyperfleet.dev/reconcile-now=2")
    wait_for(lambda: gs_status(cluster).get("lastAppliedCommit") == third, 30, "fix applied", cluster)
    wait_for(lambda: ready().get("status") == "True", 60, "Ready after the fix", cluster)
    assert "all 2 VirtualMachines healthy" in ready()["message"]


def test_a_vm_that_fails_later_turns_ready_false(cluster: Cluster, gitops: GitOpsProc,
                                                 repo: Repo) -> None:
    """No agent here: the test writes VM status as the agent would (kubectl patch of the
    status subresource), to reach states the CH double cannot be made to show on cue."""
    repo.write("fleet/vms.yaml", vm("web-1") + "---\n" + vm("web-2"))
    sha = repo.push("two VMs")
    gitsource(cluster, "fleet", str(repo.remote), interval="1h", health=True)
    wait_for(lambda: condition(cluster, "Ready").get("reason") == "Progressing", 30, "Progressing",
             cluster)
    r = condition(cluster, "Ready")
    assert r["status"] == "Unknown" and "waiting for 2 of 2 VirtualMachines" in r["message"], r
    assert gs_status(cluster)["lastAppliedCommit"] == sha

    def set_status(name: str, phase: str, **extra: Any) -> None:
        gen = (cluster.get("hvm", name) or {})["metadata"]["generation"]
        cluster.kubectl("patch", "hvm", name, "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"phase": phase, "observedGeneration": gen, **extra}}))

    set_status("web-1", "Running")
    set_status("web-2", "Running")
    wait_for(lambda: condition(cluster, "Ready").get("status") == "True", 30, "Ready", cluster)
    set_status("web-2", "Failed", message="vm.boot: the VMM exited with status 1", conditions=[{
        "type": "Failure", "status": "True", "reason": "HypervisorError",
        "message": "vm.boot: the VMM exited with status 1", "lastTransitionTime": "2026-01-01T00:00:00Z"}])
    wait_for(lambda: condition(cluster, "Ready").get("reason") == "HealthCheckFailed", 30,
             "HealthCheckFailed", cluster)
    msg = condition(cluster, "Ready")["message"]
    assert (f"{cluster.namespace}/web-2 (Failed: HypervisorError: vm.boot: the VMM exited with "
            "status 1)") in msg, msg
    set_status("web-2", "Running")
    wait_for(lambda: condition(cluster, "Ready").get("status") == "True", 30, "recovered", cluster)

