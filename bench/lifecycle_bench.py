"""Apply -> Running latency for N VMs on one agent, and the CH client's per-request cost.

Runs the real stack (API server, controller, one agent, CH doubles) and prints figures;
it asserts nothing. Usage: python bench/lifecycle_bench.py [--sizes 1 10 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from hyperfleet.operator.devstack import (
    ApiServer,
    ch_double_cmd,
    hyperfleet_cmd,
    install_crds,
    kill_pidfiles,
    kubectl,
    launch,
    stop_process,
)
from hyperfleet.reconcilers.hypervisor.process import ProcessManager
from hyperfleet.reconcilers.kube import VMS, Kube, load_config

VM = """---
apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: b{i}, namespace: {ns}}}
spec: {{cpus: 1, memory: 64Mi, boot: {{kernel: /k}}}}
"""


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def latency_run(api: ApiServer, work: Path, n: int) -> tuple[list[float], float]:
    """Apply n VMs at once; seconds from apply until each is seen Running."""
    ns = f"bench-{n}"
    kc = api.kubeconfig
    kubectl(kc, "create", "namespace", ns)
    manifest = "".join(VM.format(i=i, ns=ns) for i in range(n))
    t0 = time.monotonic()
    kubectl(kc, "apply", "-f", "-", input_=manifest)
    seen: dict[str, float] = {}
    deadline = t0 + 60 + 2 * n
    while len(seen) < n and time.monotonic() < deadline:
        out = kubectl(kc, "-n", ns, "get", "hvm", "-o", "json").stdout
        now = time.monotonic()
        for item in json.loads(out)["items"]:
            if (item.get("status") or {}).get("phase") == "Running":
                seen.setdefault(item["metadata"]["name"], now - t0)
        time.sleep(0.1)
    total = time.monotonic() - t0
    kubectl(kc, "-n", ns, "delete", "hvm", "--all", "--timeout=300s")
    return list(seen.values()), total


def crash_recovery(api: ApiServer, trials: int = 5) -> list[float]:
    """Seconds from kill -9 of a VMM to its VM reported Running again (restart counted).

    One VM per trial: a VM's first restart is immediate, later ones back off on purpose.
    """
    load_config(str(api.kubeconfig))
    kube = Kube()
    kubectl(api.kubeconfig, "create", "namespace", "crash")
    names = [f"c{i}" for i in range(trials)]
    kubectl(api.kubeconfig, "apply", "-f", "-",
            input_="".join(VM.format(i=n, ns="crash") for n in names))
    out = []
    for n in names:
        st: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = (kube.get(VMS, f"b{n}", "crash") or {}).get("status") or {}
            if st.get("phase") == "Running" and (st.get("hypervisor") or {}).get("pid"):
                break
            time.sleep(0.05)
        os.kill(st["hypervisor"]["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            st = (kube.get(VMS, f"b{n}", "crash") or {}).get("status") or {}
            if st.get("restartCount", 0) == 1 and st.get("phase") == "Running":
                out.append(time.monotonic() - t0)
                break
            time.sleep(0.02)
    kubectl(api.kubeconfig, "-n", "crash", "delete", "hvm", "--all", "--timeout=60s")
    return out


def client_overhead(requests: int = 300) -> tuple[float, float]:
    """Mean seconds per vm.info: our ChClient vs curl reusing one connection."""
    tmp = Path(tempfile.mkdtemp(prefix="hf-bench-", dir="/tmp"))
    pm = ProcessManager(ch_double_cmd(), tmp)
    try:
        pm.spawn("bench", "vm")
        client = pm.client("bench", "vm")
        client.create({"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
                       "memory": {"size": 64 << 20}})
        client.put("vm.boot")
        for _ in range(20):
            client.info()  # warm up
        t = time.perf_counter()
        for _ in range(requests):
            client.info()
        ours = (time.perf_counter() - t) / requests
        client.close()
        sock = str(pm.paths("bench", "vm").socket)
        urls = ["http://localhost/api/v1/vm.info"] * requests
        curl = shutil.which("curl") or "curl"
        subprocess.run([curl, "-s", "--unix-socket", sock, urls[0]], check=True,
                       stdout=subprocess.DEVNULL)
        t = time.perf_counter()
        subprocess.run([curl, "-s", "--unix-socket", sock, *urls], check=True,
                       stdout=subprocess.DEVNULL)
        raw = (time.perf_counter() - t) / requests
    finally:
        pm.stop("bench", "vm")
        shutil.rmtree(tmp, ignore_errors=True)
    return ours, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hf-bench-", dir="/tmp"))
    api = ApiServer(work / "api").start()
    procs = []
    try:
        install_crds(api.kubeconfig)
        for name, cmd in (
            ("controller", hyperfleet_cmd("controller")),
            ("agent", hyperfleet_cmd("agent", "--node-name", "bench-node", "--ch-binary",
                                     ch_double_cmd(), "--socket-dir", str(work / "n"),
                                     "--cpus", "1000", "--memory", "1Ti", "--heartbeat", "2")),
        ):
            procs.append(launch(cmd, work / f"{name}.log", api.kubeconfig))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = kubectl(api.kubeconfig, "get", "wn", "bench-node", "-o",
                        "jsonpath={.status.phase}", check=False)
            if r.stdout == "Ready":
                break
            time.sleep(0.2)
        print("apply -> Running latency, one agent, CH double (seconds)")
        print(f"{'N':>5} {'p50':>7} {'p95':>7} {'max':>7} {'all Running':>12} {'done':>6}")
        for n in args.sizes:
            lat, total = latency_run(api, work, n)
            if lat:
                print(f"{n:>5} {statistics.median(lat):>7.2f} {pct(lat, 95):>7.2f} "
                      f"{max(lat):>7.2f} {total:>12.2f} {len(lat):>4}/{n}")
            else:
                print(f"{n:>5} none reached Running in time")
        rec = crash_recovery(api)
        if rec:
            print(f"\nkill -9 of a VMM -> VM Running again (restart counted), {len(rec)} trials: "
                  f"p50 {statistics.median(rec):.2f}s, max {max(rec):.2f}s")
    finally:
        for p in procs:
            stop_process(p)
        api.stop()
        kill_pidfiles(work / "n", "*.pid")
    ours, raw = client_overhead()
    print("\nCH client per-request cost (vm.info over the unix socket)")
    print(f"  ChClient (requests-unixsocket): {ours * 1e3:7.3f} ms")
    print(f"  curl --unix-socket (one conn):  {raw * 1e3:7.3f} ms")
    print(f"  ratio ChClient / curl:          {ours / raw:7.2f}x")
    if os.environ.get("BENCH_KEEP"):
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
