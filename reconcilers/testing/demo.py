"""What `hyperfleet demo` runs: the whole stack on this machine, converging two sample VMs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from hyperfleet.operator.settings import AgentConfig
from hyperfleet.reconcilers import conventions as conv

from .devstack import (
    REPO,
    ApiServer,
    RealVmm,
    agent_cmd,
    ch_double_cmd,
    find_real_vmm,
    hyperfleet_cmd,
    install_crds,
    kill_pidfiles,
    kubectl,
    launch,
    stop_processes,
)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
LEASE_NAMESPACE = AgentConfig("").lease_namespace


class Stopped(BaseException):  # like KeyboardInterrupt: not an error, never swallowed
    """Raised by the SIGTERM/SIGHUP handler so that ``finally`` stops the stack: the children
    run in their own sessions (so a terminal's Ctrl-C reaches only us), so nobody else will."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def _set_handlers(sigs: tuple[signal.Signals, ...], handler: Any) -> dict[signal.Signals, Any]:
    """Install ``handler`` for ``sigs``; the previous handlers. Only the main thread may."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in sigs}


def run_demo(workdir: Path, n_nodes: int, keep: bool, kubeconfig: Path | None = None) -> int:
    """The stack on a local API server, or on the cluster ``kubeconfig`` names (then only
    the Hyperfleet processes run here; what they create stays in that cluster)."""
    workdir.mkdir(parents=True, exist_ok=True)
    api = ApiServer(workdir / "apiserver")
    procs: list[subprocess.Popen[bytes]] = []
    previous = _set_handlers(_STOP_SIGNALS, _raise_stopped)
    try:
        return _run(workdir, n_nodes, keep, api, procs, kubeconfig)
    except Stopped as stop:
        print(f"==> {signal.Signals(stop.signum).name}: stopping the stack", flush=True)
        return 128 + stop.signum
    finally:
        # Cleanup runs to the end: a second Ctrl-C or SIGTERM must not leave half the stack up.
        previous = {**_set_handlers((signal.SIGINT, *_STOP_SIGNALS), signal.SIG_IGN), **previous}
        try:
            stop_processes(procs)
            api.stop()  # also after a failed start (etcd up, API server not)
            kill_pidfiles(workdir, "node-*/*.pid", signal.SIGTERM)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _run(workdir: Path, n_nodes: int, keep: bool, api: ApiServer,
         procs: list[subprocess.Popen[bytes]], kubeconfig: Path | None) -> int:
    """Start the stack (appending every process to ``procs``) and converge the sample VMs;
    run_demo stops it all whatever happens here."""
    if kubeconfig is None:
        print(f"==> starting API server + etcd (state in {workdir})", flush=True)
        api.start()
        kc = api.kubeconfig
    else:
        kc = kubeconfig.resolve()
        print(f"==> using the existing cluster of {kc}", flush=True)
        # The agents' Leases live there; a real API server refuses them in a missing one.
        if kubectl(kc, "get", "namespace", LEASE_NAMESPACE, check=False).returncode:
            kubectl(kc, "create", "namespace", LEASE_NAMESPACE)
    print("==> installing CRDs", flush=True)
    install_crds(kc)
    binary = _pick_vmm(workdir)
    print(f"==> starting controller and {n_nodes} node agents", flush=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)

    def start(name: str, *args: str) -> None:
        procs.append(launch(hyperfleet_cmd(*args), logs / f"{name}.log", kc))

    start("controller", "controller", "--git-cache-dir", str(workdir / "git-cache"))
    for i in range(1, n_nodes + 1):
        procs.append(launch(agent_cmd(f"node-{i}", workdir / f"node-{i}", binary,
                                      "--cpus", "8", "--memory", "16Gi", "--heartbeat", "3"),
                            logs / f"agent-node-{i}.log", kc))
    _wait_nodes_ready(kc, n_nodes, timeout=60)
    repo = _sample_repo(workdir, real=binary != ch_double_cmd())
    print(f"==> GitSource 'fleet' follows {repo} (examples/vms.yaml, pushed with git)",
          flush=True)
    kubectl(kc, "apply", "-f", "-", input_=GIT_SOURCE.format(url=f"file://{repo}"))
    ok = _wait_running(kc, timeout=120) and _wait_source_healthy(kc, timeout=60)
    time.sleep(2.5)  # the controller publishes node allocations every 2 s
    print(kubectl(kc, "get", conv.GIT_SOURCE.plural).stdout, flush=True)
    print(kubectl(kc, "get", conv.WORKER_NODE.plural).stdout, flush=True)
    print(kubectl(kc, "get", "hvm", "-o", "wide").stdout, flush=True)
    if not ok:
        print(f"!! VMs did not reach Running (or GitSource 'fleet' not Ready); logs in {logs}",
              flush=True)
        return 1
    print("==> all VMs Running", flush=True)
    if keep:
        print(f"export KUBECONFIG={kc}   # then: kubectl get hvm,wn,gs", flush=True)
        print(f"git clone {repo} fleet && cd fleet   # edit fleet/*.yaml, commit, git push",
              flush=True)
        print("Ctrl-C stops the stack.", flush=True)
        try:
            while True:
                signal.pause()
        except (KeyboardInterrupt, Stopped):
            print("==> stopping the stack", flush=True)
    return 0


GIT_SOURCE = """
apiVersion: hyperfleet.dev/v1alpha1
kind: GitSource
metadata: {{name: fleet, namespace: default}}
spec:
  url: {url}
  ref: {{branch: main}}
  path: fleet
  interval: 10s
"""


def _git(cwd: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "demo", "GIT_AUTHOR_EMAIL": "demo@hyperfleet.dev",
           "GIT_COMMITTER_NAME": "demo", "GIT_COMMITTER_EMAIL": "demo@hyperfleet.dev"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


IMAGES = "/var/lib/hyperfleet/images/"


def _pick_vmm(workdir: Path) -> str:
    """The genuine cloud-hypervisor where it can run here, else the double; says which.

    Either way the sample VMs' kernel and disks are files in ``workdir/images`` (the real
    VMM opens them): the kernel the real VMM boots, or a placeholder for the double."""
    images = workdir / "images"
    images.mkdir(exist_ok=True)
    kernel = images / "vmlinux"
    kernel.unlink(missing_ok=True)
    found = find_real_vmm()
    if isinstance(found, RealVmm):
        print(f"==> cloud-hypervisor: the real VMM, {found.version} ({found.binary});"
              f" guest kernel {found.kernel}", flush=True)
        kernel.symlink_to(found.kernel)
        return found.binary
    print(f"==> cloud-hypervisor: the test double (no real VMM here: {found})", flush=True)
    kernel.write_bytes(b"placeholder: the double opens no kernel")
    return ch_double_cmd()


def _sample_vms(workdir: Path, real: bool) -> str:
    """examples/vms.yaml with its image paths in ``workdir/images`` (raw disks created).

    With the real VMM the sample NIC is left out: a tap device is a change to this host's
    network that a demo has no business making."""
    images = workdir / "images"
    docs = list(yaml.safe_load_all((REPO / "examples" / "vms.yaml").read_text()))
    for doc in docs:
        spec = doc["spec"]
        for disk in spec.get("disks", []):
            disk["path"] = disk["path"].replace(IMAGES, f"{images}/")
            with open(disk["path"], "ab") as f:
                f.truncate(64 << 20)
        spec["boot"]["kernel"] = spec["boot"]["kernel"].replace(IMAGES, f"{images}/")
        if real:
            spec.pop("interfaces", None)
    return yaml.safe_dump_all(docs, sort_keys=False)


def _sample_repo(workdir: Path, real: bool) -> Path:
    """A bare cluster repository with the sample VMs, filled by a real `git push`."""
    bare = workdir / "cluster-repo.git"
    if bare.exists():
        return bare
    _git(workdir, "init", "-q", "--bare", "-b", "main", str(bare))
    work = workdir / "cluster-repo-work"
    shutil.rmtree(work, ignore_errors=True)
    _git(workdir, "clone", "-q", str(bare), str(work))
    (work / "fleet").mkdir()
    (work / "fleet" / "vms.yaml").write_text(_sample_vms(workdir, real))
    _git(work, "checkout", "-q", "-b", "main")
    _git(work, "add", "fleet")
    _git(work, "commit", "-q", "-m", "Sample fleet: two VMs")
    _git(work, "push", "-q", "origin", "main")
    return bare


def _wait_nodes_ready(kc: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = kubectl(kc, "get", conv.WORKER_NODE.plural, "-o", "json", check=False)
        items = json.loads(r.stdout).get("items", []) if r.returncode == 0 else []
        if sum((i.get("status") or {}).get("phase") == "Ready" for i in items) >= n:
            return
        time.sleep(0.5)


def _wait_source_healthy(kc: Path, timeout: float) -> bool:
    """The GitSource's health check has seen the VMs it applied Running (Ready=True)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = kubectl(kc, "get", "gitsource", "fleet", "-o",
                    "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False)
        if r.returncode == 0 and r.stdout.strip() == "True":
            return True
        time.sleep(1)
    return False


def _wait_running(kc: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = kubectl(kc, "get", "hvm", "-o", "json", check=False)
        items = json.loads(r.stdout).get("items", []) if r.returncode == 0 else []
        if items and all((i.get("status") or {}).get("phase") == "Running" for i in items):
            return True
        time.sleep(1)
    return False
