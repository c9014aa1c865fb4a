"""Apply -> Running latency for N VMs on one agent, and the CH client's per-request cost.

Runs the real stack (API server, controller, one agent per VMM kind) and prints figures
for the CH double and, in the same run, the genuine cloud-hypervisor where this machine
can run it; it asserts nothing.
Usage: python bench/lifecycle_bench.py [--sizes 1 20] [--vmm double real]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyperfleet.reconcilers.hypervisor.process import ProcessManager
from hyperfleet.reconcilers.kube import VMS, Kube, load_config
from hyperfleet.reconcilers.testing.devstack import (
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
    stop_process,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.* and tests.*
from bench import discard
from bench.fastvmm import fastvmm_binary

VM = """---
apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: b{i}, namespace: {ns}}}
spec: {{cpus: 1, memory: 256Mi, boot: {{kernel: {kernel}}},
        nodeSelector: {{hyperfleet.dev/node: {node}}}}}
"""


@dataclass(frozen=True)
class Vmm:
    kind: str  # "double" or "real"
    binary: str
    kernel: str

    @property
    def node(self) -> str:
        return f"bench-{self.kind}"

    def vms(self, ns: str, names: list[str] | range) -> str:
        return "".join(VM.format(i=i, ns=ns, kernel=self.kernel, node=self.node) for i in names)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def latency_run(api: ApiServer, vmm: Vmm, n: int) -> tuple[list[float], float]:
    """Apply n VMs at once; seconds from apply until each is seen Running."""
    ns = f"bench-{vmm.kind}-{n}"
    kc = api.kubeconfig
    kubectl(kc, "create", "namespace", ns)
    manifest = vmm.vms(ns, range(n))
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


def crash_recovery(api: ApiServer, vmm: Vmm, trials: int = 5) -> list[float]:
    """Seconds from kill -9 of a VMM to its VM reported Running again (restart counted).

    One VM per trial: a VM's first restart is immediate, later ones back off on purpose.
    """
    load_config(str(api.kubeconfig))
    kube = Kube()
    ns = f"crash-{vmm.kind}"
    kubectl(api.kubeconfig, "create", "namespace", ns)
    names = [f"c{i}" for i in range(trials)]
    kubectl(api.kubeconfig, "apply", "-f", "-", input_=vmm.vms(ns, names))
    out = []
    for n in names:
        st: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = (kube.get(VMS, f"b{n}", ns) or {}).get("status") or {}
            if st.get("phase") == "Running" and (st.get("hypervisor") or {}).get("pid"):
                break
            time.sleep(0.05)
        os.kill(st["hypervisor"]["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            st = (kube.get(VMS, f"b{n}", ns) or {}).get("status") or {}
            if st.get("restartCount", 0) == 1 and st.get("phase") == "Running":
                out.append(time.monotonic() - t0)
                break
            time.sleep(0.02)
    kubectl(api.kubeconfig, "-n", ns, "delete", "hvm", "--all", "--timeout=60s")
    return out


def client_overhead(kinds: list[str], requests: int = 300) -> None:
    """Per-request cost of vm.info: our ChClient vs curl reusing one connection, against the
    fast stand-in (bench/fastvmm) and, as asked, the CH double and the real VMM.

    ChClient: each call timed. curl: one process, one connection for all requests, timed
    two ways: its own time_total of each transfer, and the wall time of the whole run per
    request (start-up included). Prints min/median/max of each; asserts nothing."""


    targets: list[tuple[str, str, str | None]] = [("fastvmm", fastvmm_binary(), None)]
    if "double" in kinds:
        targets.append(("double", ch_double_cmd(), None))
    if "real" in kinds:
        found = find_real_vmm()
        if isinstance(found, RealVmm):
            targets.append(("real", found.binary, found.kernel))
        else:
            print(f"\nreal VMM: client cost not measured, {found}")
    curl = shutil.which("curl") or "curl"
    print(f"\nCH client per-request cost, vm.info over the unix socket ({requests} requests, ms)")
    print(f"{'VMM':>8} {'client':<22} {'min':>7} {'median':>7} {'max':>7}")
    for name, binary, kernel in targets:
        tmp = Path(tempfile.mkdtemp(prefix="hf-bench-", dir="/tmp"))
        pm = ProcessManager(binary, tmp)
        try:
            pm.spawn("bench", "vm")
            client = pm.client("bench", "vm")
            if kernel is None:
                kernel = str(tmp / "vmlinux")
                Path(kernel).write_bytes(b"the stand-ins open no kernel, but want it to exist")
            client.create({"payload": {"kernel": kernel},
                           "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
                           "memory": {"size": 256 << 20}, "serial": {"mode": "Null"},
                           "console": {"mode": "Off"}})
            client.put("vm.boot")
            for _ in range(20):
                client.info()  # warm up
            ours = []
            for _ in range(requests):
                t = time.perf_counter()
                client.info()
                ours.append(time.perf_counter() - t)
            client.close()
            sock = str(pm.paths("bench", "vm").socket)
            url = "http://localhost/api/v1/vm.info"
            subprocess.run([curl, "-s", "--unix-socket", sock, url], check=True,
                           stdout=subprocess.DEVNULL)
            t = time.perf_counter()
            subprocess.run([curl, "-s", "--unix-socket", sock, *[url] * requests], check=True,
                           stdout=subprocess.DEVNULL)
            wall = (time.perf_counter() - t) / requests
            out = subprocess.run([curl, "-s", "--unix-socket", sock, "-w", "%{time_total}\n",
                                  *(["-o", "/dev/null", url] * requests)],
                                 check=True, capture_output=True, text=True).stdout
            transfers = [float(x) for x in out.split()]
        finally:
            pm.stop("bench", "vm")
            shutil.rmtree(tmp, ignore_errors=True)
        for label, values in (("ChClient", ours), ("curl (each transfer)", transfers)):
            print(f"{name:>8} {label:<22} {min(values) * 1e3:7.3f} "
                  f"{statistics.median(values) * 1e3:7.3f} {max(values) * 1e3:7.3f}")
        print(f"{name:>8} {'curl (wall / request)':<22} {'':>7} {wall * 1e3:7.3f}")
        median = statistics.median(ours)
        print(f"{name:>8} ratio ChClient / curl: {median / statistics.median(transfers):.2f}x "
              f"per transfer, {median / wall:.2f}x per request of wall time (medians)",
              flush=True)


def vmms(kinds: list[str], work: Path) -> list[Vmm]:
    out = []
    for kind in kinds:
        if kind == "double":
            kernel = work / "vmlinux-placeholder"
            kernel.write_bytes(b"the double opens no kernel")
            out.append(Vmm("double", ch_double_cmd(), str(kernel)))
            continue
        found = find_real_vmm()
        if isinstance(found, RealVmm):
            print(f"real VMM: {found.version} ({found.binary}), kernel {found.kernel}")
            out.append(Vmm("real", found.binary, found.kernel))
        else:
            print(f"real VMM: not measured, {found}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 20])
    ap.add_argument("--vmm", nargs="+", choices=["double", "real"], default=["double", "real"])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hf-bench-", dir="/tmp"))
    api = ApiServer(work / "api").start()
    procs = []
    backends = vmms(args.vmm, work)
    try:
        install_crds(api.kubeconfig)
        procs.append(launch(hyperfleet_cmd("controller"), work / "controller.log",
                            api.kubeconfig))
        for vmm in backends:
            cmd = agent_cmd(vmm.node, work / vmm.kind, vmm.binary, "--cpus", "1000",
                            "--memory", "1Ti", "--heartbeat", "2")
            procs.append(launch(cmd, work / f"agent-{vmm.kind}.log", api.kubeconfig))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = kubectl(api.kubeconfig, "get", "wn", "-o", "jsonpath={.items[*].status.phase}",
                        check=False)
            if r.stdout.split().count("Ready") == len(backends):
                break
            time.sleep(0.2)
        print("\napply -> Running latency, one agent per VMM kind (seconds)")
        print(f"{'VMM':>7} {'N':>5} {'p50':>7} {'p95':>7} {'max':>7} {'all Running':>12} "
              f"{'done':>6}")
        for n in args.sizes:
            for vmm in backends:
                lat, total = latency_run(api, vmm, n)
                if lat:
                    print(f"{vmm.kind:>7} {n:>5} {statistics.median(lat):>7.2f} "
                          f"{pct(lat, 95):>7.2f} {max(lat):>7.2f} {total:>12.2f} "
                          f"{len(lat):>4}/{n}", flush=True)
                else:
                    print(f"{vmm.kind:>7} {n:>5} none reached Running in time", flush=True)
        for vmm in backends:
            rec = crash_recovery(api, vmm)
            if rec:
                print(f"\nkill -9 of a VMM ({vmm.kind}) -> VM Running again (restart counted), "
                      f"{len(rec)} trials: p50 {statistics.median(rec):.2f}s, "
                      f"max {max(rec):.2f}s", flush=True)
    finally:
        for p in procs:
            stop_process(p)
        api.stop()
        for vmm in backends:
            kill_pidfiles(work / vmm.kind, "*.pid")
    client_overhead(args.vmm)
    discard(work)


if __name__ == "__main__":
    main()
