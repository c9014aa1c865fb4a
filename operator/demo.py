"""`hyperfleet demo`: the whole stack on this machine, converging two sample VMs."""

from __future__ import annotations

import json
import os
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
        env = {**os.environ, "KUBECONFIG": str(kc)}
        print("==> installing CRDs", flush=True)
        install_crds(kc)
        print(f"==> starting controller and {n_nodes} node agents (CH double)", flush=True)
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)

        def start(name: str, *args: str) -> None:
            out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
            procs.append(subprocess.Popen(hyperfleet_cmd(*args), env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))

        start("controller", "controller", "--git-cache-dir", str(workdir / "git-cache"))
        for i in range(1, n_nodes + 1):
            start(f"agent-node-{i}", "agent", "--node-name", f"node-{i}",
                  "--ch-binary", ch_double_cmd(), "--socket-dir", str(workdir / f"node-{i}"),
                  "--cpus", "8", "--memory", "16Gi", "--heartbeat", "3")
        print("==> applying examples/vms.yaml", flush=True)
        kubectl(kc, "apply", "-f", str(REPO / "examples" / "vms.yaml"))
        ok = _wait_running(kc, timeout=120)
        print(kubectl(kc, "get", "workernodes").stdout, flush=True)
        print(kubectl(kc, "get", "hvm", "-o", "wide").stdout, flush=True)
        if not ok:
            print(f"!! VMs did not reach Running; logs in {logs}", flush=True)
            return 1
        print("==> all VMs Running", flush=True)
        if keep:
            print(f"export KUBECONFIG={kc}   # then: kubectl get hvm,wn", flush=True)
            print("Ctrl-C stops the stack.", flush=True)
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for p in procs:
            stop_process(p)
        api.stop()
        kill_pidfiles(workdir, "node-*/*.pid", signal.SIGTERM)


def _wait_running(kc: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = kubectl(kc, "get", "hvm", "-o", "json", check=False)
        items = json.loads(r.stdout).get("items", []) if r.returncode == 0 else []
        if items and all((i.get("status") or {}).get("phase") == "Running" for i in items):
            return True
        time.sleep(1)
    return False
