"""`hyperfleet demo`: the whole stack on this machine, converging two sample VMs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .devstack import (
    REPO,
    ApiServer,
    ch_double_cmd,
    hyperfleet_cmd,
    install_crds,
    kill_pidfiles,
    kubectl,
    launch,
    stop_process,
)


def run_demo(workdir: Path, n_nodes: int, keep: bool) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    api = ApiServer(workdir / "apiserver")
    procs: list[subprocess.Popen[bytes]] = []
    print(f"==> starting API server + etcd (state in {workdir})", flush=True)
    api.start()
    try:
        kc = api.kubeconfig
        print("==> installing CRDs", flush=True)
        install_crds(kc)
        print(f"==> starting controller and {n_nodes} node agents (CH double)", flush=True)
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)

        def start(name: str, *args: str) -> None:
            procs.append(launch(hyperfleet_cmd(*args), logs / f"{name}.log", kc))

        start("controller", "controller", "--git-cache-dir", str(workdir / "git-cache"))
        for i in range(1, n_nodes + 1):
            start(f"agent-node-{i}", "agent", "--node-name", f"node-{i}",
                  "--ch-binary", ch_double_cmd(), "--socket-dir", str(workdir / f"node-{i}"),
                  "--cpus", "8", "--memory", "16Gi", "--heartbeat", "3")
        _wait_nodes_ready(kc, n_nodes, timeout=60)
        repo = _sample_repo(workdir)
        print(f"==> GitSource 'fleet' follows {repo} (examples/vms.yaml, pushed with git)",
              flush=True)
        kubectl(kc, "apply", "-f", "-", input_=GIT_SOURCE.format(url=f"file://{repo}"))
        ok = _wait_running(kc, timeout=120)
        time.sleep(2.5)  # the controller publishes node allocations every 2 s
        print(kubectl(kc, "get", "gitsources").stdout, flush=True)
        print(kubectl(kc, "get", "workernodes").stdout, flush=True)
        print(kubectl(kc, "get", "hvm", "-o", "wide").stdout, flush=True)
        if not ok:
            print(f"!! VMs did not reach Running; logs in {logs}", flush=True)
            return 1
        print("==> all VMs Running", flush=True)
        if keep:
            print(f"export KUBECONFIG={kc}   # then: kubectl get hvm,wn,gs", flush=True)
            print(f"git clone {repo} fleet && cd fleet   # edit fleet/*.yaml, commit, git push",
                  flush=True)
            print("Ctrl-C stops the stack.", flush=True)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            print("==> stopping the stack", flush=True)
        return 0
    finally:
        for p in procs:
            stop_process(p)
        api.stop()
        kill_pidfiles(workdir, "node-*/*.pid", signal.SIGTERM)


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


def _sample_repo(workdir: Path) -> Path:
    """A bare cluster repository with the sample VMs, filled by a real `git push`."""
    bare = workdir / "cluster-repo.git"
    if bare.exists():
        return bare
    _git(workdir, "init", "-q", "--bare", "-b", "main", str(bare))
    work = workdir / "cluster-repo-work"
    shutil.rmtree(work, ignore_errors=True)
    _git(workdir, "clone", "-q", str(bare), str(work))
    (work / "fleet").mkdir()
    shutil.copy(REPO / "examples" / "vms.yaml", work / "fleet" / "vms.yaml")
    _git(work, "checkout", "-q", "-b", "main")
    _git(work, "add", "fleet")
    _git(work, "commit", "-q", "-m", "Sample fleet: two VMs")
    _git(work, "push", "-q", "origin", "main")
    return bare


def _wait_nodes_ready(kc: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = kubectl(kc, "get", "workernodes", "-o", "json", check=False)
        items = json.loads(r.stdout).get("items", []) if r.returncode == 0 else []
        if sum((i.get("status") or {}).get("phase") == "Ready" for i in items) >= n:
            return
        time.sleep(0.5)


def _wait_running(kc: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = kubectl(kc, "get", "hvm", "-o", "json", check=False)
        items = json.loads(r.stdout).get("items", []) if r.returncode == 0 else []
        if items and all((i.get("status") or {}).get("phase") == "Running" for i in items):
            return True
        time.sleep(1)
    return False
