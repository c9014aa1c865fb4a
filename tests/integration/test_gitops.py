"""Issue 4: GitOps end to end with real git repositories, real `git push`, the real API server,
and the GitSource reconciler running as its own process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hyperfleet.reconcilers import crdgen
from hyperfleet.reconcilers.gitops.crd import GIT_SOURCE
from hyperfleet.reconcilers.gitops.types import COMMIT_ANNOTATION, OWNER_LABEL, PATH_ANNOTATION
from hyperfleet.reconcilers.gitops.webhook import push_payload, sign_gitea, sign_github, sign_gitlab
from hyperfleet.reconcilers.testing.devstack import ApiServer, free_port, kubectl, launch
from tests import PLACEHOLDER_KERNEL

from ..unit.test_gitops_fetch import GitHttpServer
from .conftest import Cluster, wait_for

SECRET = "it-is-a-secret"
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "GIT_CONFIG_NOSYSTEM": "1"}


def vm(name: str, cpus: int = 1, extra: str = "") -> str:
    return (
        "apiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachine\n"
        f"metadata:\n  name: {name}\n  labels: {{app: demo}}\n"
        f"spec:\n  cpus: {cpus}\n  memory: 256Mi\n"
        f"  boot: {{kernel: {PLACEHOLDER_KERNEL}, cmdline: console=ttyS0}}\n{extra}"
    )


@dataclass
class Repo:
    """A bare 'remote' and a working clone, driven with the git CLI."""

    root: Path

    @property
    def remote(self) -> Path:
        return self.root / "remote.git"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def git(self, *args: str, cwd: Path | None = None) -> str:
        r = subprocess.run(["git", *args], cwd=cwd or self.work, env={**os.environ, **GIT_ENV},
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr}"
        return r.stdout.strip()

    def init(self) -> Repo:
        self.root.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "--bare", "-b", "main", str(self.remote), cwd=self.root)
        self.git("init", "-q", "-b", "main", str(self.work), cwd=self.root)
        self.git("remote", "add", "origin", str(self.remote))
        return self

    def write(self, rel: str, text: str) -> None:
        p = self.work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def remove(self, rel: str) -> None:
        (self.work / rel).unlink()

    def push(self, message: str, force: bool = False) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        self.git("push", "-q", *(["--force"] if force else []), "origin", "HEAD:main")
        return self.git("rev-parse", "HEAD")


@pytest.fixture(scope="module")
def gitsource_crd(apiserver: ApiServer) -> None:
    """Install the GitSource CRD (until it is part of crds/)."""
    deadline = time.monotonic() + 60
    while kubectl(apiserver.kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", "-",
                  input_=crdgen.render(GIT_SOURCE), check=False).returncode != 0:
        assert time.monotonic() < deadline, "GitSource CRD not accepted"
        time.sleep(0.5)
    kubectl(apiserver.kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
            "crd/gitsources.hyperfleet.dev")
    while kubectl(apiserver.kubeconfig, "get", "gitsources", "-A", check=False).returncode != 0:
        assert time.monotonic() < deadline, "gitsources never became servable"
        time.sleep(0.2)


@dataclass
class GitOpsProc:
    cluster: Cluster
    port: int

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/hook", data=body,
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def logs(self) -> str:
        return (self.cluster.workdir / "gitops.log").read_text()


@pytest.fixture
def gitops(cluster: Cluster, gitsource_crd: None, tmp_path: Path) -> Iterator[GitOpsProc]:
    """The GitSource reconciler as its own process, watching only this test's namespace;
    stopped (and its GitSources deleted) before the cluster fixture cleans up the VMs."""
    port = free_port()
    proc = launch(
        [sys.executable, "-m", "hyperfleet.operator.gitsource", "--namespace", cluster.namespace,
         "--cache-dir", str(cluster.workdir / "git-cache"), "--webhook-port", str(port),
         "--webhook-host", "127.0.0.1"],
        cluster.workdir / "gitops.log", cluster.kubeconfig,
        {"HYPERFLEET_WEBHOOK_SECRET": SECRET})
    cluster.procs["gitops"] = proc
    g = GitOpsProc(cluster, port)

    def listening() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        wait_for(listening, 30, "webhook receiver up", cluster)
        yield g
    finally:
        cluster.stop("gitops")
        shutil.copy(cluster.workdir / "gitops.log", tmp_path / "gitops.log")  # kept by pytest
        cluster.kubectl("delete", "gitsources", "--all", "--wait=false", check=False)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "repo").init()


def gitsource(cluster: Cluster, name: str, url: str, *, interval: str = "1s", path: str = "fleet",
              extra: str = "", health: bool = False) -> None:
    """``health``: keep spec.healthCheck on (the default); off where no agent runs the VMs, so
    Ready means "applied" (test_gitops_verify covers health checks)."""
    checks = "" if health else "  healthCheck: {enabled: false}\n"
    r = cluster.apply(
        f"apiVersion: hyperfleet.dev/v1alpha1\nkind: GitSource\nmetadata: {{name: {name}}}\n"
        f"spec:\n  url: {url}\n  ref: {{branch: main}}\n  path: {path}\n  interval: {interval}\n"
        f"{checks}{extra}")
    assert r.returncode == 0, r.stderr


def gs_status(cluster: Cluster, name: str = "fleet") -> dict[str, Any]:
    return dict((cluster.get("gitsource", name) or {}).get("status") or {})


def condition(cluster: Cluster, type_: str, name: str = "fleet") -> dict[str, Any]:
    conds = {c["type"]: c for c in gs_status(cluster, name).get("conditions", [])}
    return dict(conds.get(type_) or {})


def applied(cluster: Cluster, sha: str, name: str = "fleet") -> bool:
    st = gs_status(cluster, name)
    return st.get("lastAppliedCommit") == sha and condition(cluster, "Ready", name).get("status") == "True"


def cpus(cluster: Cluster, name: str) -> int | None:
    obj = cluster.get("hvm", name)
    return int(obj["spec"]["cpus"]) if obj else None


def names(cluster: Cluster) -> set[str]:
    out = cluster.kubectl("get", "hvm", "-o", "name").stdout.split()
    return {n.split("/")[-1] for n in out}


def events(cluster: Cluster, reason: str) -> list[str]:
    out = cluster.kubectl("get", "events", "-o", "json").stdout
    return [e.get("message", "") for e in json.loads(out)["items"] if e.get("reason") == reason]


def test_push_create_edit_delete_and_vms_run(cluster: Cluster, gitops: GitOpsProc, repo: Repo) -> None:
    node = cluster.node("a")
    cluster.start_controller()
    cluster.start_agent(node)
    repo.write("fleet/web.yaml", vm("web-1") + "---\n" + vm("web-2"))
    repo.write("fleet/db/db.yml", vm("db-1"))
    repo.write("README.md", "not a manifest\n")
    sha1 = repo.push("three VMs")
    gitsource(cluster, "fleet", str(repo.remote), health=True)  # Ready only once they run

    def all_running() -> bool:
        phases = {n: ((cluster.get("hvm", n) or {}).get("status") or {}).get("phase")
                  for n in ("web-1", "web-2", "db-1")}
        return all(p == "Running" for p in phases.values())

    wait_for(all_running, 90, "the three VMs from Git Running", cluster)
    wait_for(lambda: applied(cluster, sha1), 30, "GitSource Ready at the first commit", cluster)
    web1 = cluster.get("hvm", "web-1")
    assert web1 is not None
    meta = web1["metadata"]
    assert meta["labels"][OWNER_LABEL] == f"{cluster.namespace}.fleet"
    assert meta["labels"]["app"] == "demo"
    assert meta["annotations"][COMMIT_ANNOTATION] == sha1
    assert meta["annotations"][PATH_ANNOTATION] == "fleet/web.yaml"
    full = json.loads(cluster.kubectl("get", "hvm", "web-1", "-o", "json", "--show-managed-fields").stdout)
    managers = {m["manager"]: m["operation"] for m in full["metadata"]["managedFields"]}
    assert managers.get("hyperfleet-gitops") == "Apply"
    st = gs_status(cluster)
    assert {e["name"] for e in st["inventory"]} == {"web-1", "web-2", "db-1"}
    assert condition(cluster, "Stalled")["status"] == "False"

    # An edit: the spec follows Git; the untouched object keeps its provenance.
    repo.write("fleet/web.yaml", vm("web-1", cpus=2) + "---\n" + vm("web-2"))
    sha2 = repo.push("web-1 gets 2 CPUs")
    wait_for(lambda: cpus(cluster, "web-1") == 2, 30, "web-1 updated from Git", cluster)
    wait_for(lambda: applied(cluster, sha2), 30, "GitSource at the edit", cluster)
    web1, web2 = cluster.get("hvm", "web-1"), cluster.get("hvm", "web-2")
    assert web1 is not None and web2 is not None
    assert web1["metadata"]["annotations"][COMMIT_ANNOTATION] == sha2
    assert web2["metadata"]["annotations"][COMMIT_ANNOTATION] == sha1
    assert web1["status"]["nodeName"] == node  # status stays the controller's and agent's

    # A deletion: pruned (the agent's finalizer lets it stop the VM first).
    repo.remove("fleet/db/db.yml")
    sha3 = repo.push("drop the database")
    wait_for(lambda: "db-1" not in names(cluster), 60, "db-1 pruned", cluster)
    wait_for(lambda: applied(cluster, sha3), 30, "GitSource at the deletion", cluster)
    assert {e["name"] for e in gs_status(cluster)["inventory"]} == {"web-1", "web-2"}
    assert names(cluster) == {"web-1", "web-2"}
    assert any("db-1" in m for m in events(cluster, "Pruned"))
    assert events(cluster, "Applied")


def test_hand_edit_is_reverted_and_other_fields_kept(cluster: Cluster, gitops: GitOpsProc,
                                                     repo: Repo) -> None:
    repo.write("fleet/web.yaml", vm("web-1"))
    sha = repo.push("web-1")
    gitsource(cluster, "fleet", str(repo.remote))
    wait_for(lambda: applied(cluster, sha), 30, "first apply", cluster)

    cluster.kubectl("patch", "hvm", "web-1", "--type=merge", "-p",
                    '{"spec":{"cpus":4},"metadata":{"labels":{"team":"ops","app":"hacked"}}}')
    cluster.kubectl("patch", "hvm", "web-1", "--subresource=status", "--type=merge", "-p",
                    '{"status":{"message":"written by a controller"}}')
    wait_for(lambda: cpus(cluster, "web-1") == 1, 30, "hand edit of spec.cpus reverted", cluster)
    obj = cluster.get("hvm", "web-1")
    assert obj is not None
    assert obj["metadata"]["labels"]["app"] == "demo"  # Git-owned label reverted too
    assert obj["metadata"]["labels"]["team"] == "ops"  # a field Git does not set is left alone
    assert obj["status"]["message"] == "written by a controller"
    wait_for(lambda: any("reverted drift" in m for m in events(cluster, "Applied")), 15,
             "drift event", cluster)


def test_an_object_made_by_hand_is_left_alone_until_annotated(cluster: Cluster, gitops: GitOpsProc,
                                                              repo: Repo) -> None:
    assert cluster.apply(vm("db", cpus=3)).returncode == 0  # kubectl apply, no GitSource label
    repo.write("fleet/vms.yaml", vm("db") + "---\n" + vm("web-1"))
    sha = repo.push("db and web-1")
    gitsource(cluster, "fleet", str(repo.remote))
    wait_for(lambda: condition(cluster, "Ready").get("reason") == "OwnershipConflict", 30,
             "conflict reported", cluster)
    msg = condition(cluster, "Ready")["message"]
    assert f"VirtualMachine/{cluster.namespace}/db (fleet/vms.yaml:1 (document 0)) already exists" in msg
    assert f"kubectl annotate virtualmachines -n {cluster.namespace} db hyperfleet.dev/adopt=true" in msg
    db = cluster.get("hvm", "db")
    assert db is not None and OWNER_LABEL not in db["metadata"].get("labels", {})
    assert cpus(cluster, "db") == 3 and names(cluster) == {"db"}  # nothing of the commit applied

    cluster.kubectl("annotate", "hvm", "db", "hyperfleet.dev/adopt=true")
    cluster.kubectl("annotate", "gitsource", "fleet", "--overwrite", "hyperfleet.dev/reconcile-now=1")
    wait_for(lambda: applied(cluster, sha), 30, "applied once adopted", cluster)
    db = cluster.get("hvm", "db")
    assert db is not None and db["metadata"]["labels"][OWNER_LABEL] == f"{cluster.namespace}.fleet"
    assert cpus(cluster, "db") == 1 and names(cluster) == {"db", "web-1"}
    assert any("adopted 1" in m for m in events(cluster, "Applied"))


def test_a_node_its_agent_registered_is_taken_over_from_git(cluster: Cluster, gitops: GitOpsProc,
                                                            repo: Repo) -> None:
    """Agents register their WorkerNodes as adoptable placeholders: declaring one in Git
    needs no manual annotation (a node made by hand would be an OwnershipConflict)."""
    node = cluster.node("reg")
    cluster.start_agent(node)
    wait_for(lambda: cluster.get("wn", node, namespaced=False), 30, "agent registered", cluster)
    repo.write("fleet/node.yaml", "apiVersion: hyperfleet.dev/v1alpha1\nkind: WorkerNode\n"
                                  f"metadata: {{name: {node}}}\nspec: {{pool: gpu}}\n")
    sha = repo.push("manage the node from Git")
    gitsource(cluster, "fleet", str(repo.remote))
    wait_for(lambda: applied(cluster, sha), 30, "node taken over", cluster)
    wn = cluster.get("wn", node, namespaced=False)
    assert wn is not None and wn["spec"]["pool"] == "gpu"
    assert wn["metadata"]["labels"][OWNER_LABEL] == f"{cluster.namespace}.fleet"


def test_bad_commit_applies_nothing_and_names_the_file(cluster: Cluster, gitops: GitOpsProc,
                                                       repo: Repo) -> None:
    repo.write("fleet/web.yaml", vm("web-1"))
    good = repo.push("web-1")
    gitsource(cluster, "fleet", str(repo.remote))
    wait_for(lambda: applied(cluster, good), 30, "first apply", cluster)

    # A good edit and a broken file in one commit: neither is applied.
    repo.write("fleet/web.yaml", vm("web-1", cpus=2))
    repo.write("fleet/broken.yaml", "apiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachine\n"
                                    "metadata: {name: x\nspec: {}\n")
    bad = repo.push("oops")
    wait_for(lambda: gs_status(cluster).get("lastAttemptedCommit") == bad, 30, "bad commit seen",
             cluster)
    stalled = condition(cluster, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ValidationFailed"
    assert "fleet/broken.yaml:" in stalled["message"], stalled
    assert "invalid YAML" in stalled["message"]
    assert condition(cluster, "Ready")["status"] == "False"
    assert gs_status(cluster)["lastAppliedCommit"] == good
    assert cpus(cluster, "web-1") == 1

    # Schema error and a foreign kind, each named with file and document index.
    repo.remove("fleet/broken.yaml")
    repo.write("fleet/more.yaml", vm("web-2", cpus=0) + "---\napiVersion: apps/v1\nkind: Deployment\n"
                                  "metadata: {name: nginx}\n")
    bad2 = repo.push("still wrong")
    wait_for(lambda: gs_status(cluster).get("lastAttemptedCommit") == bad2, 30, "second bad commit",
             cluster)
    msg = condition(cluster, "Stalled")["message"]
    assert "fleet/more.yaml:1 (document 0)" in msg and "spec.cpus" in msg, msg
    assert "(document 1)" in msg and "'Deployment'" in msg and "not a Hyperfleet kind" in msg, msg
    assert names(cluster) == {"web-1"} and cpus(cluster, "web-1") == 1
    assert events(cluster, "ValidationFailed")

    repo.write("fleet/more.yaml", vm("web-2"))
    fixed = repo.push("fixed")
    wait_for(lambda: applied(cluster, fixed), 30, "fixed commit applied", cluster)
    assert cpus(cluster, "web-1") == 2 and names(cluster) == {"web-1", "web-2"}
    assert condition(cluster, "Stalled")["status"] == "False"
    assert "lastError" not in gs_status(cluster)


def test_webhook_needs_a_valid_signature_and_triggers_promptly(cluster: Cluster, gitops: GitOpsProc,
                                                               repo: Repo) -> None:
    repo.write("fleet/web.yaml", vm("web-1"))
    first = repo.push("web-1")
    gitsource(cluster, "fleet", str(repo.remote), interval="1h")  # only a trigger can explain
    wait_for(lambda: applied(cluster, first), 30, "initial reconcile", cluster)

    repo.write("fleet/web.yaml", vm("web-1", cpus=2))
    second = repo.push("2 cpus")
    body = json.dumps(push_payload(f"file://{repo.remote}", "refs/heads/main", second)).encode()
    wrong = sign_github(b"not-the-secret", body)
    assert gitops.post(body, wrong)[0] == 401
    assert gitops.post(body, {"X-GitHub-Event": "push", "Content-Type": "application/json"})[0] == 401
    assert gitops.post(body, sign_gitlab(b"nope", body))[0] == 401
    assert gitops.post(body, {**sign_gitea(SECRET.encode(), body), "X-Gitea-Signature": "00" * 32})[0] \
        == 401
    time.sleep(3)
    assert gs_status(cluster)["lastFetchedCommit"] == first, "a rejected webhook caused a reconcile"
    assert cpus(cluster, "web-1") == 1

    t0 = time.monotonic()
    code, answer = gitops.post(body, sign_github(SECRET.encode(), body))
    assert code == 202 and answer["triggered"] == [f"{cluster.namespace}/fleet"], answer
    wait_for(lambda: applied(cluster, second), 15, "reconcile after the webhook", cluster)
    print(f"\nwebhook -> applied: {time.monotonic() - t0:.2f}s")
    assert cpus(cluster, "web-1") == 2

    # Gitea and GitLab deliveries work too; a push to another branch triggers nothing.
    repo.write("fleet/web.yaml", vm("web-1", cpus=3))
    third = repo.push("3 cpus")
    other = json.dumps(push_payload(str(repo.remote), "refs/heads/feature", third)).encode()
    code, answer = gitops.post(other, sign_github(SECRET.encode(), other))
    assert code == 202 and answer["triggered"] == []
    body = json.dumps({"ref": "refs/heads/main", "after": third,
                       "repository": {"ssh_url": "git@elsewhere:x/y.git",
                                      "clone_url": f"{repo.remote}"}}).encode()
    assert gitops.post(body, sign_gitea(SECRET.encode(), body))[0] == 202
    wait_for(lambda: applied(cluster, third), 15, "reconcile after the Gitea webhook", cluster)

    repo.write("fleet/web.yaml", vm("web-1", cpus=4))
    fourth = repo.push("4 cpus")
    body = json.dumps({"object_kind": "push", "ref": "refs/heads/main", "checkout_sha": fourth,
                       "project": {"git_http_url": f"file://{repo.remote}/"}}).encode()
    assert gitops.post(body, sign_gitlab(SECRET.encode(), body))[0] == 202
    wait_for(lambda: applied(cluster, fourth), 15, "reconcile after the GitLab webhook", cluster)

    # The reconcile-now annotation is the manual trigger.
    repo.write("fleet/web.yaml", vm("web-1", cpus=5))
    fifth = repo.push("5 cpus")
    cluster.kubectl("annotate", "gitsource", "fleet", "--overwrite", "hyperfleet.dev/reconcile-now=1")
    wait_for(lambda: applied(cluster, fifth), 15, "reconcile after reconcile-now", cluster)
    assert gs_status(cluster)["lastHandledReconcileAt"] == "1"
    assert SECRET not in gitops.logs()


def test_mass_deletion_is_held_until_confirmed(cluster: Cluster, gitops: GitOpsProc, repo: Repo) -> None:
    for i in range(4):
        repo.write(f"fleet/vm-{i}.yaml", vm(f"vm-{i}"))
    first = repo.push("four VMs")
    gitsource(cluster, "fleet", str(repo.remote))
    wait_for(lambda: applied(cluster, first), 30, "four VMs applied", cluster)

    for i in range(1, 4):
        repo.remove(f"fleet/vm-{i}.yaml")
    repo.write("fleet/vm-9.yaml", vm("vm-9"))  # held commits apply nothing, additions included
    wipe = repo.push("delete three of four")
    wait_for(lambda: condition(cluster, "Stalled").get("reason") == "DeletionHeld", 30, "held", cluster)
    st = gs_status(cluster)
    assert st["heldDeletion"]["commit"] == wipe and st["heldDeletion"]["count"] == 3
    assert "confirm-deletion" in condition(cluster, "Stalled")["message"]
    time.sleep(2)  # a few more intervals: still nothing deleted or added
    assert names(cluster) == {"vm-0", "vm-1", "vm-2", "vm-3"}
    assert gs_status(cluster)["lastAppliedCommit"] == first
    assert events(cluster, "DeletionHeld")

    cluster.kubectl("annotate", "gitsource", "fleet", f"hyperfleet.dev/confirm-deletion={wipe}")
    wait_for(lambda: applied(cluster, wipe), 30, "confirmed commit applied", cluster)
    wait_for(lambda: names(cluster) == {"vm-0", "vm-9"}, 30, "three pruned", cluster)
    assert "heldDeletion" not in gs_status(cluster)


def test_force_push_unreachable_remote_and_suspend(cluster: Cluster, gitops: GitOpsProc,
                                                   repo: Repo) -> None:
    repo.write("fleet/a.yaml", vm("web-1") + "---\n" + vm("web-2"))
    base = repo.push("two")
    repo.write("fleet/b.yaml", vm("web-3"))
    second = repo.push("three")
    gitsource(cluster, "fleet", str(repo.remote))
    wait_for(lambda: applied(cluster, second), 30, "three applied", cluster)

    # Rewrite history: drop the last commit, change web-1 instead, force-push.
    repo.git("reset", "-q", "--hard", base)
    repo.write("fleet/a.yaml", vm("web-1", cpus=3) + "---\n" + vm("web-2"))
    rewritten = repo.push("rewritten", force=True)
    wait_for(lambda: applied(cluster, rewritten), 30, "rewritten history applied", cluster)
    assert names(cluster) == {"web-1", "web-2"} and cpus(cluster, "web-1") == 3
    assert events(cluster, "HistoryRewritten")

    # The remote disappears: condition, nothing pruned, nothing changed.
    moved = repo.root / "moved.git"
    shutil.move(repo.remote, moved)
    wait_for(lambda: condition(cluster, "Ready").get("reason") == "FetchFailed", 30, "fetch failure",
             cluster)
    assert condition(cluster, "Stalled")["status"] == "False"
    assert "nothing is pruned" in condition(cluster, "Ready")["message"]
    assert names(cluster) == {"web-1", "web-2"}
    assert gs_status(cluster)["lastAppliedCommit"] == rewritten
    shutil.move(moved, repo.remote)
    wait_for(lambda: applied(cluster, rewritten), 30, "recovered", cluster)

    # Suspended: nothing is applied until resumed.
    cluster.kubectl("patch", "gitsource", "fleet", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(lambda: condition(cluster, "Reconciling").get("reason") == "Suspended", 15, "suspended",
             cluster)
    repo.write("fleet/a.yaml", vm("web-1", cpus=4) + "---\n" + vm("web-2"))
    later = repo.push("while suspended")
    time.sleep(3)
    assert cpus(cluster, "web-1") == 3
    cluster.kubectl("patch", "gitsource", "fleet", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for(lambda: applied(cluster, later), 30, "resumed", cluster)
    assert cpus(cluster, "web-1") == 4


def test_private_repo_over_http_with_a_token_secret(cluster: Cluster, gitops: GitOpsProc,
                                                     repo: Repo) -> None:
    token = "glpat-PrivateTokenValue42"
    repo.write("fleet/web.yaml", vm("web-1"))
    sha = repo.push("web-1")
    with GitHttpServer(repo.root, token) as srv:
        gitsource(cluster, "fleet", f"{srv.url}/remote.git", extra="  secretRef: {name: git-auth}\n")
        wait_for(lambda: condition(cluster, "Stalled").get("reason") == "SecretNotFound", 30,
                 "missing Secret reported", cluster)
        assert "create it or fix spec.secretRef" in condition(cluster, "Stalled")["message"]
        cluster.kubectl("create", "secret", "generic", "git-auth", "--from-literal=token=wrong-one")
        wait_for(lambda: condition(cluster, "Stalled").get("reason") == "AuthenticationFailed", 30,
                 "wrong token reported", cluster)
        cluster.kubectl("delete", "secret", "git-auth")
        cluster.kubectl("create", "secret", "generic", "git-auth", f"--from-literal=token={token}")
        wait_for(lambda: applied(cluster, sha), 30, "applied with the token", cluster)
        assert all(token not in p for p in srv.paths)
    assert names(cluster) == {"web-1"}
    source = cluster.kubectl("get", "gitsource", "fleet", "-o", "json").stdout
    all_events = cluster.kubectl("get", "events", "-o", "json").stdout
    for text in (gitops.logs(), source, all_events):
        assert token not in text and "wrong-one" not in text
