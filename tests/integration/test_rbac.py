"""The chart's RBAC is exactly what the processes use: no call is refused, no rule is idle.

The test API server authorises only client certificates whose O is system:masters, and its
audit log records the certificate's CN as ``user.username``. So each component gets a
certificate named like its ServiceAccount in the chart (CN=system:serviceaccount:<ns>:<sa>,
O=system:masters); the real `hyperfleet controller`, two `hyperfleet agent`s, the GitSource
reconciler and a kopf peering replica run with them through a representative workload driven
with kubectl; then every (apiGroup, resource[/subresource], verb[, namespace]) in the audit log
is checked against the rules the chart grants to that ServiceAccount, and every granted rule
must have been used at least once.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import helm_python  # noqa: F401 - dev dependency: a missing install must fail, not skip
import pytest
import yaml

from hyperfleet.reconcilers.testing.devstack import (
    ApiServer,
    agent_cmd,
    ch_double_cmd,
    hyperfleet_cmd,
    install_crds,
    kill_pidfiles,
    kubectl,
    launch,
    stop_process,
)
from tests import PLACEHOLDER_KERNEL
from tests import chartutil as cu

pytestmark = pytest.mark.integration

#: Requests outside any resource: discovery, which the built-in system:discovery ClusterRole
#: grants to every authenticated client, so the chart need not (and does not) grant them.
DISCOVERY = re.compile(r"^/(api|apis)(/[^/?]+){0,2}/?(\?.*)?$|^/(version|openapi/v[23])(/.*)?$")
PEERING = "hyperfleet-controller"
#: Granted for an admission plugin's authorisation check, which makes no request of its own
#: (so the audit log cannot show it): OwnerReferencesPermissionEnforcement lets a client set
#: blockOwnerDeletion only with update on the owner's finalizers (pool members do).
ADMISSION_ONLY = {("hyperfleet.dev", "virtualmachinepools/finalizers", "update")}
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "GIT_CONFIG_NOSYSTEM": "1"}

#: kopf with peering and nothing else, for as long as `hyperfleet controller` has no --peering
#: flag: it makes exactly the peering calls a peered controller replica adds.
PEERING_REPLICA = """
import asyncio, sys
import kopf

registry = kopf.OperatorRegistry()

@kopf.on.login(registry=registry)
def login(**kwargs):
    return kopf.login_with_kubeconfig(**kwargs)

asyncio.run(kopf.operator(registry=registry, clusterwide=True, peering_name=sys.argv[1],
                          priority=int(sys.argv[2])))
"""


@dataclass(frozen=True)
class Call:
    """One API request as the audit log recorded it."""

    api_group: str
    resource: str  # with "/subresource"
    verb: str
    namespace: str | None

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.verb} {self.api_group or 'core'}/{self.resource}{where}"


@dataclass
class Stack:
    api: ApiServer
    work: Path
    values: dict[str, Any]
    objs: list[dict[str, Any]]
    kubeconfigs: dict[str, Path]  # username -> kubeconfig
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def controller_user(self) -> str:
        return cu.service_account_of(self.objs, "Deployment")

    @property
    def agent_user(self) -> str:
        return cu.service_account_of(self.objs, "DaemonSet")

    def kubectl(self, *args: str, input_: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return kubectl(self.api.kubeconfig, *args, input_=input_, check=check)

    def apply(self, docs: list[dict[str, Any]] | str) -> None:
        text = docs if isinstance(docs, str) else yaml.safe_dump_all(docs)
        r = self.kubectl("apply", "-f", "-", input_=text, check=False)
        assert r.returncode == 0, r.stderr

    def get(self, *args: str) -> dict[str, Any]:
        r = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else {}

    def start(self, name: str, user: str, cmd: list[str]) -> None:
        self.procs[name] = launch(cmd, self.work / f"{name}.log", self.kubeconfigs[user])

    def logs(self) -> str:
        state = self.kubectl("get", "hvm,hvmpool,vmjob,wn,gitsource", "-A", "-o", "wide", check=False).stdout
        return state + "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                                  for p in sorted(self.work.glob("*.log")))

    def wait(self, pred: Callable[[], Any], what: str, timeout: float = 90) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                pytest.fail(f"{', '.join(dead)} exited while waiting for {what}\n{self.logs()}")
            value = pred()
            if value:
                return value
            time.sleep(0.3)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")


def _client_kubeconfig(api: ApiServer, user: str, stem: str) -> Path:
    """A kubeconfig whose client certificate says CN=<user>, O=system:masters."""
    w = api.workdir

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=w, check=True, capture_output=True)

    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
            "-subj", f"/O=system:masters/CN={user}")
    openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{stem}.crt", "-days", "2", "-extfile", "client.ext")
    text = api.kubeconfig.read_text()
    path = w / f"{stem}.kubeconfig"
    text = text.replace(f"{w}/admin.crt", f"{w}/{stem}.crt").replace(f"{w}/admin.key", f"{w}/{stem}.key")
    path.write_text(text)
    return path


def _cli_flags(command: str) -> set[str]:
    import typer.main

    from hyperfleet.operator.cli import app

    commands: dict[str, Any] = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    return {opt for p in commands[command].params for opt in p.opts}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private API server (its own audit log), the chart's CRDs, and per-role identities."""
    api = ApiServer(tmp_path_factory.mktemp("rbac-apiserver"), audit=True)
    # Short: unix socket paths are limited to 107 bytes.
    work = Path("/tmp") / f"hf-rbac-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        api.start()
        install_crds(api.kubeconfig, cu.CHART / "crds")  # also proves the API server takes them
        deadline = time.monotonic() + 60
        while kubectl(api.kubeconfig, "get", "gitsources,clusterkopfpeerings", "-A",
                      check=False).returncode != 0:
            assert time.monotonic() < deadline, "the chart's extra CRDs never became servable"
            time.sleep(0.2)
        kubectl(api.kubeconfig, "create", "namespace", cu.NAMESPACE)
        values: dict[str, Any] = {
            "controller": {"replicas": 2},
            "gitSource": {"enabled": True, "url": f"file://{work}/remote.git", "path": "fleet",
                          "secretRef": "fleet-git", "interval": "5s", "maxDeletionRatio": 1.0},
        }
        objs = cu.objects(values)
        s = Stack(api, work, values, objs, {}, procs)
        for user, stem in ((s.controller_user, "controller"), (s.agent_user, "agent")):
            s.kubeconfigs[user] = _client_kubeconfig(api, user, stem)
        yield s
    finally:
        for p in procs.values():
            stop_process(p)
        kill_pidfiles(work, "*/*.pid")
        api.stop()
        shutil.rmtree(work, ignore_errors=True)


def _git(work: Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=work, env={**os.environ, **GIT_ENV},
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr}"
    return r.stdout.strip()


def _vm(name: str, namespace: str | None = None) -> str:
    meta = f"{{name: {name}, namespace: {namespace}}}" if namespace else f"{{name: {name}}}"
    return (f"apiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {meta}\n"
            "spec:\n  cpus: 1\n  maxCpus: 2\n  memory: 128Mi\n  liveMigration: true\n"
            # The drain live-migrates it between two agents on this one host: the receiving
            # VMM would bind the sender's console socket path (docs/console.md).
            '  serial: "Null"\n'
            f"  boot: {{kernel: {PLACEHOLDER_KERNEL}}}\n")


def _pool(name: str, namespace: str | None = None, cpus: int = 1, replicas: int = 2) -> str:
    meta = f"{{name: {name}, namespace: {namespace}}}" if namespace else f"{{name: {name}}}"
    return (f"apiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachinePool\nmetadata: {meta}\n"
            f"spec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n"
            f"  template:\n    metadata: {{labels: {{app: {name}}}}}\n"
            f"    spec: {{cpus: {cpus}, memory: 128Mi, boot: {{kernel: {PLACEHOLDER_KERNEL}}}}}\n")


def _job(builder: Any, name: str, namespace: str) -> dict[str, Any]:
    from hyperfleet.reconcilers.jobs.builder import to_manifest

    return to_manifest(builder.build(now=datetime.now(UTC)), name=name, namespace=namespace)


def _run_workload(s: Stack, ns: str) -> None:
    from hyperfleet.reconcilers.jobs.builder import JobBuilder

    ctl, agent = s.controller_user, s.agent_user
    ctl_flags = _cli_flags("controller")
    peered = "--peering" in ctl_flags
    gitops_inside = "--webhook-port" in ctl_flags
    ctl_args = ["controller", "--node-grace", "6", "--log-format", "text"]
    cache = [f for f in sorted(ctl_flags) if "cache" in f]
    if gitops_inside and cache:
        ctl_args += [cache[0], str(s.work / "git-cache")]
    s.start("controller", ctl, hyperfleet_cmd(*ctl_args, *(["--peering", PEERING] if peered else [])))
    if peered:  # the second replica of the Deployment
        s.start("controller-2", ctl, hyperfleet_cmd(*ctl_args, "--peering", PEERING))
    else:
        script = s.work / "peering_replica.py"
        script.write_text(PEERING_REPLICA)
        s.start("peering-replica", ctl, [sys.executable, str(script), PEERING, "100"])
    if not gitops_inside:  # the GitSource reconciler, as the controller process will run it
        s.start("gitops", ctl, [sys.executable, "-m", "hyperfleet.operator.gitsource",
                                "--cache-dir", str(s.work / "git-cache"), "--log-format", "text"])
    nodes = [f"{ns}-a", f"{ns}-b"]
    for node in nodes:
        s.start(f"agent-{node}", agent, agent_cmd(
            node, s.work / node[-1], ch_double_cmd(), "--log-format", "text",
            "--cpus", "8", "--memory", "16Gi", "--heartbeat", "1",
            "--lease-namespace", cu.NAMESPACE))  # as the chart's POD_NAMESPACE does
    # What the chart installs besides workloads and RBAC: the peering object, the GitSource.
    custom = [o for o in s.objs if o["apiVersion"].startswith(("kopf.dev/", "hyperfleet.dev/"))]
    assert {o["kind"] for o in custom} == {"ClusterKopfPeering", "GitSource"}
    s.apply([o for o in custom if o["kind"] == "ClusterKopfPeering"])
    def node_ready(node: str) -> bool:
        return bool(s.get("wn", node).get("status", {}).get("phase") == "Ready")

    for node in nodes:
        s.wait(functools.partial(node_ready, node), f"WorkerNode {node} Ready")

    # A VM's life: create, run, stop and start, a job on it, drain its node, delete.
    s.apply(_vm("web", ns))

    def vm_status() -> dict[str, Any]:
        st: dict[str, Any] = s.get("hvm", "web", "-n", ns).get("status") or {}
        return st

    first = s.wait(lambda: vm_status().get("phase") == "Running" and vm_status()["nodeName"], "web Running")
    s.kubectl("-n", ns, "patch", "hvm", "web", "--type=merge", "-p",
              '{"spec": {"runStrategy": "Manual", "powerState": "Stopped"}}')
    s.wait(lambda: vm_status().get("phase") == "Stopped", "web Stopped")
    s.kubectl("-n", ns, "patch", "hvm", "web", "--type=merge", "-p", '{"spec": {"powerState": "Running"}}')
    s.wait(lambda: vm_status().get("phase") == "Running", "web Running again")
    other = next(n for n in nodes if n != first)
    jobs = {
        "reboot": JobBuilder("vm.reboot").target("web"),
        "resize": JobBuilder("vm.resize").payload(desired_cpus=2).target("web"),
        "snapshot": JobBuilder("vm.snapshot").target("web"),
        "health": JobBuilder("system.health-check"),
    }

    def run_job(name: str, builder: Any) -> None:  # one at a time: each acts on the same VM
        s.apply([_job(builder, name, ns)])
        s.wait(lambda: s.get("vmjob", name, "-n", ns).get("status", {}).get("phase")
               in ("Succeeded", "Failed", "TimedOut"), f"VmJob {name} finished")

    for name, builder in jobs.items():
        run_job(name, builder)
    s.kubectl("patch", "wn", first, "--type=merge", "-p", '{"spec": {"drain": true}}')
    s.wait(lambda: vm_status().get("phase") == "Running" and vm_status().get("nodeName") == other,
           "web moved off the drained node", timeout=120)
    s.kubectl("patch", "wn", first, "--type=merge", "-p", '{"spec": {"drain": false}}')
    run_job("migrate", JobBuilder("vm.migrate").payload(destination_node=first).target("web"))
    s.wait(lambda: vm_status().get("phase") == "Running" and vm_status().get("nodeName") == first,
           "web migrated back")
    s.kubectl("-n", ns, "delete", "hvm", "web", "--timeout=60s")

    # A VirtualMachinePool: members made, rolled to a new template, deleted with the pool.
    s.apply(_pool("web-pool", ns, cpus=1))

    def pool_members(cpus: int) -> bool:
        items = s.get("hvm", "-n", ns, "-l", "hyperfleet.dev/pool=web-pool").get("items") or []
        return len(items) == 2 and all(
            i["spec"]["cpus"] == cpus and (i.get("status") or {}).get("phase") == "Running"
            and not i["metadata"].get("deletionTimestamp") for i in items)

    s.wait(lambda: pool_members(1), "pool members Running")
    s.apply(_pool("web-pool", ns, cpus=2))
    s.wait(lambda: pool_members(2), "pool members rolled")
    s.kubectl("-n", ns, "delete", "hvmpool", "web-pool", "--timeout=60s")
    s.wait(lambda: not s.get("hvm", "-n", ns, "-l", "hyperfleet.dev/pool=web-pool").get("items"),
           "pool members deleted with the pool")

    # GitOps: a commit with one object of each kind, then a commit that prunes most of them.
    remote, clone = s.work / "remote.git", s.work / "clone"
    _git(s.work, "init", "-q", "--bare", "-b", "main", str(remote))
    _git(s.work, "clone", "-q", str(remote), str(clone))
    (clone / "fleet").mkdir()
    (clone / "fleet" / "vms.yaml").write_text(_vm("git-1") + "---\n" + _vm("git-2"))
    (clone / "fleet" / "pool.yaml").write_text(_pool("git-pool", replicas=0))
    (clone / "fleet" / "node.yaml").write_text(
        "apiVersion: hyperfleet.dev/v1alpha1\nkind: WorkerNode\nmetadata: {name: "
        f"{ns}-git}}\nspec: {{pool: spare, unschedulable: true}}\n")
    job = _job(JobBuilder("system.health-check"), "git-health", cu.NAMESPACE)
    del job["metadata"]["namespace"]
    (clone / "fleet" / "job.yaml").write_text(yaml.safe_dump(job))
    _git(clone, "add", "-A")
    _git(clone, "commit", "-q", "-m", "fleet")
    _git(clone, "push", "-q", "origin", "HEAD:main")
    first_commit = _git(clone, "rev-parse", "HEAD")
    s.kubectl("-n", cu.NAMESPACE, "create", "secret", "generic", "fleet-git", "--from-literal=token=t0ken")
    s.apply([o for o in custom if o["kind"] == "GitSource"])

    def gitsource() -> dict[str, Any]:
        st: dict[str, Any] = s.get("gitsource", "fleet", "-n", cu.NAMESPACE).get("status") or {}
        return st

    s.wait(lambda: gitsource().get("lastAppliedCommit") == first_commit, "the first commit applied")
    s.wait(lambda: s.get("hvm", "git-1", "-n", cu.NAMESPACE).get("status", {}).get("phase") == "Running",
           "git-1 Running")
    (clone / "fleet" / "vms.yaml").write_text(_vm("git-2"))
    (clone / "fleet" / "node.yaml").unlink()
    (clone / "fleet" / "job.yaml").unlink()
    (clone / "fleet" / "pool.yaml").unlink()
    _git(clone, "add", "-A")
    _git(clone, "commit", "-q", "-m", "prune")
    _git(clone, "push", "-q", "origin", "HEAD:main")
    second = _git(clone, "rev-parse", "HEAD")
    s.kubectl("-n", cu.NAMESPACE, "annotate", "--overwrite", "gitsource", "fleet",
              f"hyperfleet.dev/reconcile-now={time.time()}")
    s.wait(lambda: gitsource().get("lastAppliedCommit") == second, "the pruning commit applied")
    s.wait(lambda: not s.get("hvm", "git-1", "-n", cu.NAMESPACE) and not s.get("wn", f"{ns}-git")
           and not s.get("hvmpool", "git-pool", "-n", cu.NAMESPACE), "pruned objects gone")

    # kopf peering: the replicas' keep-alives in the chart's ClusterKopfPeering.
    s.wait(lambda: s.get("clusterkopfpeering", PEERING).get("status"), "a peering keep-alive")


def _audit(s: Stack, users: set[str]) -> tuple[dict[str, set[Call]], dict[str, set[str]]]:
    """Per user: the resource calls made, and the non-resource paths requested."""
    calls: dict[str, set[Call]] = {u: set() for u in users}
    paths: dict[str, set[str]] = {u: set() for u in users}
    seen: set[str] = set()
    for line in (s.api.workdir / "audit.log").read_text().splitlines():
        e = json.loads(line)
        user = e["user"]["username"]
        if user not in users or e["auditID"] in seen:
            continue
        seen.add(e["auditID"])
        ref = e.get("objectRef")
        if not ref or not ref.get("resource"):
            paths[user].add(e["requestURI"])
            continue
        res = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        calls[user].add(Call(ref.get("apiGroup", ""), res, e["verb"], ref.get("namespace")))
    return calls, paths


def test_chart_rbac_is_exactly_what_the_processes_use(stack: Stack) -> None:
    s = stack
    ns = f"t-{uuid.uuid4().hex[:6]}"
    s.kubectl("create", "namespace", ns)
    try:
        _run_workload(s, ns)
    finally:
        for name in list(s.procs):  # SIGTERM: kopf's clean-up calls count too
            stop_process(s.procs.pop(name))
    grants = cu.grants_by_subject(s.objs)
    users = {s.controller_user, s.agent_user}
    assert set(grants) == users
    calls, paths = _audit(s, users)
    problems: list[str] = []
    for user in sorted(users):
        role = user.rpartition(":")[2]
        assert calls[user], f"no audited call by {user}: are the identities wired up?"
        for path in sorted(paths[user]):
            if not DISCOVERY.match(path):
                problems.append(f"{role}: non-resource request {path} (only discovery is expected)")
        for call in sorted(calls[user], key=str):
            if not cu.allowed(grants[user], call.api_group, call.resource, call.verb, call.namespace):
                problems.append(f"{role}: {call} is used but not granted by the chart "
                                "(charts/hyperfleet/templates/rbac.yaml)")
        for grant in sorted(grants[user]):
            if (grant.api_group, grant.resource, grant.verb) in ADMISSION_ONLY:
                continue
            used = [c for c in calls[user] if grant in cu.allowed(
                [grant], c.api_group, c.resource, c.verb, c.namespace)]
            if not used:
                problems.append(f"{role}: the chart grants {grant} but nothing used it "
                                "(remove it from charts/hyperfleet/templates/rbac.yaml)")
    assert not problems, "\n".join(problems) + "\n\ncalls:\n" + "\n".join(
        f"{u.rpartition(':')[2]}: {c}" for u in sorted(users) for c in sorted(calls[u], key=str))
