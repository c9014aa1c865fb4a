"""Controller pass cost and memory against fleet size, in process (no API server).

Fills the real ``Controller``'s view with N VirtualMachines shaped like the API server
returns them (managedFields of three managers, GitOps annotations, the agent's status with
conditions) bound to N/10 WorkerNodes, then times ``pass_once``: a steady pass (nothing
changed) and a pass after one VM arrives (one to place). Memory: the Python heap the view
holds (tracemalloc) and the process RSS. Writes go to the in-memory API of the unit tests.

With ``--real N``: a real controller process against the real API server holding N VMs
(bound to WorkerNodes that do not exist, so it only holds them), its RSS and idle CPU once
the initial listing is digested.

Usage: python bench/controller_bench.py [--vms 1000 10000] [--repeats 15] [--real 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import statistics
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import rss_mib
from hyperfleet.operator.controller import Controller
from hyperfleet.operator.settings import ControllerConfig
from hyperfleet.reconcilers.kube import NODES, VMS
from hyperfleet.reconcilers.models.common import rfc3339
from hyperfleet.reconcilers.testing.fakekube import FakeKube
from tests.unit.test_controller import node

NOW = datetime.now(UTC)


def fields(*keys: str) -> dict[str, Any]:
    return {f"f:{k}": {} for k in keys}


def vm_body(i: int, node_name: str | None) -> dict[str, Any]:
    """A VM as a watch event delivers it after a GitOps apply, binding and a start."""
    name, ts = f"vm-{i:05d}", rfc3339(NOW)
    return {
        "apiVersion": "hyperfleet.dev/v1alpha1", "kind": "VirtualMachine",
        "metadata": {
            "name": name, "namespace": "fleet", "uid": f"6f1c9a2e-0000-4000-8000-{i:012d}",
            "resourceVersion": str(1000 + i), "generation": 1, "creationTimestamp": ts,
            "labels": {"app": f"svc-{i % 50}", "hyperfleet.dev/gitsource": "fleet.fleet"},
            "annotations": {"gitops.hyperfleet.dev/commit": "0315a091d2698f0074fa411a8aa9e790a13d8fa4",
                            "gitops.hyperfleet.dev/digest": "sha256:" + "ab" * 32,
                            "gitops.hyperfleet.dev/path": f"fleet/{name}.yaml",
                            "gitops.hyperfleet.dev/source": "fleet/fleet"},
            "finalizers": ["hyperfleet.dev/agent"],
            "managedFields": [
                {"manager": "hyperfleet-gitops", "operation": "Apply",
                 "apiVersion": "hyperfleet.dev/v1alpha1", "time": ts, "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:annotations": fields("gitops.hyperfleet.dev/commit",
                                                                     "gitops.hyperfleet.dev/digest",
                                                                     "gitops.hyperfleet.dev/path",
                                                                     "gitops.hyperfleet.dev/source"),
                                             "f:labels": fields("app", "hyperfleet.dev/gitsource")},
                              "f:spec": {**fields("cpus", "memory", "runStrategy", "powerState"),
                                         "f:boot": fields("kernel", "cmdline"),
                                         "f:image": fields("path", "onMove")}}},
                {"manager": "OpenAPI-Generator", "operation": "Update", "subresource": "status",
                 "apiVersion": "hyperfleet.dev/v1alpha1", "time": ts, "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:status": fields("nodeName", "phase", "restartCount",
                                                 "consecutiveRestarts", "conditions")}},
                {"manager": "kopf", "operation": "Update",
                 "apiVersion": "hyperfleet.dev/v1alpha1", "time": ts, "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:finalizers": {".": {},
                                                              'v:"hyperfleet.dev/agent"': {}}}}},
            ],
        },
        "spec": {"cpus": 1 + i % 4, "memory": f"{1 + i % 8}Gi", "runStrategy": "Always",
                 "powerState": "Running", "liveMigration": False,
                 "boot": {"kernel": "/var/lib/hyperfleet/images/vmlinux",
                          "cmdline": "console=ttyS0 root=/dev/vda1 rw"},
                 "image": {"path": "/var/lib/hyperfleet/images/debian-12.qcow2",
                           "onMove": "Recreate", "reclaimPolicy": "Delete"}},
        "status": {} if node_name is None else {
            "nodeName": node_name, "phase": "Running", "restartCount": 0,
            "consecutiveRestarts": 0, "observedGeneration": 1, "bootTime": ts,
            "apiSocket": f"/run/hyperfleet/fleet_{name}.sock",
            "hypervisor": {"pid": 10000 + i, "state": "Running", "version": "v54.0.0"},
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m,
                 "lastTransitionTime": ts, "observedGeneration": 1}
                for t, r, m in (("Scheduled", "Bound", f"placed on {node_name}"),
                                ("Ready", "Running", "hypervisor state Running"),
                                ("LiveMigratable", "SharedMemory", "can move live"),
                                ("Failure", "Recovered", ""))]},
    }


def controller(n_vms: int) -> tuple[Controller, FakeKube]:
    kube = FakeKube()
    ctl = Controller(ControllerConfig(), kube)
    n_nodes = max(1, n_vms // 10)
    for j in range(n_nodes):
        body = node(f"node-{j:04d}", 64, NOW)
        body["status"]["allocatable"] = {"cpus": 64, "memory": "16Gi"}
        ctl.nodes[body["metadata"]["name"]] = kube.put(NODES, body)
        ctl.leases[body["metadata"]["name"]] = NOW
    for i in range(n_vms):
        body = vm_body(i, f"node-{i % n_nodes:04d}")
        ctl.observe(ctl.vms, f"fleet/{body['metadata']['name']}", {"type": "ADDED", "object": {}},
                    cast(Any, body))
    return ctl, kube


def timed(ctl: Controller, kube: FakeKube, loop: asyncio.AbstractEventLoop, repeats: int,
          change: bool) -> list[float]:
    out = []
    loop.run_until_complete(ctl.pass_once())  # warm: allocations, caches
    for r in range(repeats):
        if change:  # one new VM to place
            body = kube.put(VMS, vm_body(10_000_000 + r + 1000 * change, None))
            ctl.observe(ctl.vms, f"fleet/{body['metadata']['name']}", {"type": "ADDED", "object": {}},
                        cast(Any, body))
        t = time.perf_counter()
        loop.run_until_complete(ctl.pass_once())
        out.append(time.perf_counter() - t)
    loop.run_until_complete(settle(ctl))
    return out


async def settle(ctl: Controller) -> None:
    """Let the Events the passes posted in the background finish."""
    await asyncio.gather(*ctl._background)


def real_process(n: int, settle: float) -> tuple[float, float, float]:
    """(seconds to create the VMs, controller RSS MiB, idle CPU ms/s) for ``n`` VMs."""
    import concurrent.futures
    import tempfile

    from bench import cpu_seconds, discard
    from hyperfleet.reconcilers.kube import Kube, load_config
    from hyperfleet.reconcilers.testing.devstack import (
        ApiServer,
        hyperfleet_cmd,
        install_crds,
        kubectl,
        launch,
        stop_process,
    )

    work = Path(tempfile.mkdtemp(prefix="hf-bench-ctl-", dir="/tmp"))
    api = ApiServer(work / "api").start()
    try:
        install_crds(api.kubeconfig)
        kubectl(api.kubeconfig, "create", "namespace", "fleet")
        load_config(str(api.kubeconfig))
        kube = Kube()

        def create(i: int) -> None:
            body = vm_body(i, f"node-{i % max(1, n // 10):04d}")
            status = body.pop("status")
            body["metadata"] = {k: v for k, v in body["metadata"].items()
                                if k in ("name", "namespace", "labels", "annotations")}
            kube.create(VMS, body)
            kube.patch(VMS, body["metadata"]["name"], {"status": status}, "fleet", status=True)

        t = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(n)))
        made = time.monotonic() - t
        proc = launch(hyperfleet_cmd("controller", "--no-gitops"), work / "controller.log",
                      api.kubeconfig)
        try:
            time.sleep(settle)
            c0 = cpu_seconds(proc.pid)
            time.sleep(10)
            idle = (cpu_seconds(proc.pid) - c0) * 100  # ms/s over 10 s
            return made, rss_mib(proc.pid), idle
        finally:
            stop_process(proc)
    finally:
        api.stop()
        discard(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, nargs="+", default=[0, 1000, 10000])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--real", type=int, nargs="*", default=[],
                    help="also a real controller process holding this many VMs")
    ap.add_argument("--settle", type=float, default=60.0,
                    help="seconds the real controller gets to digest its initial listing")
    args = ap.parse_args()
    rows = []
    for n in args.vms:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        ctl, kube = controller(n)
        view = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        loop = asyncio.new_event_loop()
        steady = timed(ctl, kube, loop, args.repeats, change=False)
        one = timed(ctl, kube, loop, args.repeats, change=True)
        loop.close()
        body = copy.deepcopy(vm_body(0, "node-0000"))
        rows.append((n, steady, one, view, rss_mib(), len(repr(body))))
        del ctl, kube
    print(f"\nController pass and view memory (in process; {args.repeats} passes each; "
          "min / median / max)")
    print(f"{'VMs':>7}  {'steady pass ms':>22}  {'pass placing 1 VM ms':>22}  "
          f"{'view MiB':>9}  {'per VM KiB':>10}  {'RSS MiB':>8}")
    for n, steady, one, view, rss, _ in rows:
        def f(xs: list[float]) -> str:
            return " / ".join(f"{1e3 * x:.1f}" for x in (min(xs), statistics.median(xs), max(xs)))
        print(f"{n:>7}  {f(steady):>22}  {f(one):>22}  {view / 2**20:>9.1f}  "
              f"{(view / n / 1024 if n else 0):>10.1f}  {rss:>8.0f}")
    for n in args.real:
        made, rss, idle = real_process(n, args.settle)
        print(f"\nreal controller process, {n} VMs on the API server (created in {made:.0f} s): "
              f"RSS {rss:.0f} MiB, idle CPU after {args.settle:g} s {idle:.0f} ms/s")


if __name__ == "__main__":
    main()
