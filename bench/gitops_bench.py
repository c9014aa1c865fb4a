"""GitOps figures on the real stack: one commit of N VMs -> all objects exist; git push ->
reconcile start (via webhook) -> object updated; pruning N; push of M VMs -> all Running on
K agents (CH doubles). Prints figures; asserts nothing.

Usage: python bench/gitops_bench.py [--vms 1000] [--running-vms 100] [--agents 10] [--rounds 5]

`--running-vms 1000` runs one CH double process per VM: about 11 MB each, so it needs about
12 GB free on top of the stack (measured: 206 s until all 1,000 Running on a 2-core machine,
dominated by starting 1,000 Python processes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from kubernetes import watch

from hyperfleet.reconcilers import crdgen
from hyperfleet.reconcilers.gitops.crd import GIT_SOURCE
from hyperfleet.reconcilers.gitops.webhook import push_payload, sign_github
from hyperfleet.reconcilers.kube import Kube, load_config
from hyperfleet.reconcilers.models.common import GROUP, VERSION
from hyperfleet.reconcilers.testing.devstack import (
    ApiServer,
    agent_cmd,
    ch_double_cmd,
    free_port,
    hyperfleet_cmd,
    install_crds,
    kill_pidfiles,
    kubectl,
    launch,
    stop_process,
)

SECRET = "bench-secret"
SECRET_ENV = {"HYPERFLEET_WEBHOOK_SECRET": SECRET}
NS = "bench"
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@example.com",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "b@example.com"}


#: The CH double refuses vm.boot when the kernel file does not exist (as the real VMM does).
KERNEL = Path(tempfile.gettempdir()) / "hyperfleet-bench-vmlinux"
KERNEL.write_bytes(b"placeholder: the CH double reads nothing from it")


def vm(i: int, cpus: int = 1) -> str:
    return (f"apiVersion: hyperfleet.dev/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: vm-{i:04d}}}\n"
            f"spec: {{cpus: {cpus}, memory: 64Mi, boot: {{kernel: {KERNEL}}}}}\n")


class Repo:
    def __init__(self, root: Path) -> None:
        self.bare, self.work = root / "remote.git", root / "work"
        root.mkdir(parents=True)
        self.git("init", "-q", "--bare", "-b", "main", str(self.bare), cwd=root)
        self.git("init", "-q", "-b", "main", str(self.work), cwd=root)
        self.git("remote", "add", "origin", str(self.bare))

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return subprocess.run(["git", *args], cwd=cwd or self.work, env={**os.environ, **GIT_ENV},
                              capture_output=True, text=True, check=True).stdout.strip()

    def set_fleet(self, docs: dict[str, str]) -> None:
        fleet = self.work / "fleet"
        fleet.mkdir(exist_ok=True)
        for p in fleet.glob("*.yaml"):
            if p.name not in docs:
                p.unlink()
        for name, text in docs.items():
            (fleet / name).write_text(text)
        (fleet / "README.md").write_text("the fleet\n")

    def commit(self, msg: str) -> str:
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", msg)
        return self.git("rev-parse", "HEAD")

    def push(self) -> None:
        self.git("push", "-q", "origin", "HEAD:main")


class VmWatch:
    """The VMs of the bench namespace as a watch stream keeps them: exact, and far lighter on
    the 2 shared cores than listing 1,000 objects every poll."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.objects: dict[str, dict[str, Any]] = {}
        self.writes = 0  # new versions seen: each is one write of a VM (any field)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                w: Any = watch.Watch()  # type: ignore[no-untyped-call]
                for ev in w.stream(self.kube.api.list_namespaced_custom_object, GROUP, VERSION, NS,
                                   "virtualmachines", timeout_seconds=30):
                    obj = ev["object"]
                    with self.lock:
                        seen = self.objects.get(obj["metadata"]["name"])
                        if seen is None or seen["metadata"]["resourceVersion"] \
                                != obj["metadata"]["resourceVersion"]:
                            self.writes += 1  # not a re-list after the watch timed out
                        if ev["type"] == "DELETED":
                            self.objects.pop(obj["metadata"]["name"], None)
                        else:
                            self.objects[obj["metadata"]["name"]] = obj
                    if self.stop.is_set():
                        return
            except Exception:
                time.sleep(0.2)

    def count(self, phase: str | None = None) -> int:
        with self.lock:
            return sum(1 for o in self.objects.values()
                       if phase is None or (o.get("status") or {}).get("phase") == phase)

    def cpus(self, name: str) -> int | None:
        with self.lock:
            o = self.objects.get(name)
            return int(o["spec"]["cpus"]) if o else None


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.api = ApiServer(work / "apiserver")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = free_port()
        self.repo = Repo(work / "repo")
        self.kube: Kube | None = None
        self.vms: VmWatch | None = None

    @property
    def kc(self) -> Path:
        return self.api.kubeconfig

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.procs[name] = launch(cmd, self.work / f"{name}.log", self.kc, env)

    def gitops_args(self, cache_flag: str = "--cache-dir") -> list[str]:
        """The GitOps flags of a process whose receiver this bench's webhooks reach (the
        controller calls its cache flag ``--git-cache-dir``)."""
        return [cache_flag, str(self.work / "cache"), "--webhook-host", "127.0.0.1",
                "--webhook-port", str(self.port)]

    def up(self, gitops: bool = True) -> None:
        """The API server and CRDs, and (``gitops``) a GitOps process of its own; without
        it, the caller starts a process with ``gitops_args`` (the controller, as the chart
        runs it) and then calls ``wait_receiver``."""
        self.api.start()
        install_crds(self.kc)
        kubectl(self.kc, "apply", "--server-side", "-f", "-", input_=crdgen.render(GIT_SOURCE))
        kubectl(self.kc, "wait", "--for=condition=Established", "crd/gitsources.hyperfleet.dev")
        while kubectl(self.kc, "get", "gitsources", "-A", check=False).returncode:
            time.sleep(0.2)
        kubectl(self.kc, "create", "namespace", NS)
        load_config(str(self.kc))
        self.kube = Kube()
        self.vms = VmWatch(self.kube)
        if gitops:
            self.start("gitops", [sys.executable, "-m", "hyperfleet.operator.gitsource",
                                  "--namespace", NS, *self.gitops_args()], SECRET_ENV)
            self.wait_receiver()

    def wait_receiver(self) -> None:
        wait(lambda: _get(f"http://127.0.0.1:{self.port}/healthz"), 30, "webhook receiver")

    def down(self) -> None:
        """Stop everything this run started, whatever state it is in."""
        if self.vms is not None:
            self.vms.stop.set()
        for p in self.procs.values():
            stop_process(p)
        kill_pidfiles(self.work, "node-*/*.pid")
        self.api.stop()

    def follow_empty_fleet(self) -> None:
        """Push an empty fleet and point GitSource ``fleet`` at it (webhooks trigger it)."""
        self.repo.set_fleet({})
        empty = self.repo.commit("empty fleet")
        self.repo.push()
        kubectl(self.kc, "apply", "-f", "-", input_=(
            "apiVersion: hyperfleet.dev/v1alpha1\nkind: GitSource\n"
            f"metadata: {{name: fleet, namespace: {NS}}}\n"
            f"spec: {{url: {self.repo.bare}, ref: {{branch: main}}, path: fleet, interval: 1h}}\n"))
        wait(lambda: self.status().get("lastAppliedCommit") == empty, 60, "empty fleet applied")

    def status(self) -> dict[str, Any]:
        out = kubectl(self.kc, "-n", NS, "get", "gitsource", "fleet", "-o", "json").stdout
        return dict(json.loads(out).get("status") or {})

    def webhook(self, sha: str) -> float:
        body = json.dumps(push_payload(str(self.repo.bare), "refs/heads/main", sha)).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/hook", data=body,
                                     headers=sign_github(SECRET.encode(), body), method="POST")
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 202, r.status
        return time.perf_counter() - t

    def push_and_notify(self, sha: str) -> float:
        """Push, then deliver the webhook a forge would send; returns the wall clock at push."""
        t0 = time.time()
        self.repo.push()
        self.webhook(sha)
        return t0

    def reconcile_started_after(self, t0: float) -> float | None:
        """Seconds from t0 to the first webhook-triggered 'reconcile started' log line."""
        for line in (self.work / "gitops.log").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "reconcile started" and str(rec.get("trigger", "")).startswith("webhook"):
                ts = datetime.fromisoformat(rec["ts"]).timestamp()
                if ts >= t0:
                    return ts - t0
        return None


def _get(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def wait(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--running-vms", type=int, default=100)
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, etcd)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hf-gitops-bench-", dir="/tmp"))
    b = Bench(work)
    figures: list[tuple[str, str]] = []

    def report(key: str, value: str) -> None:
        figures.append((key, value))
        print(f"  {key}: {value}", flush=True)

    try:
        b.up()
        b.follow_empty_fleet()

        # 1. One commit with N VirtualMachines (one file each) -> every object exists.
        n = args.vms
        b.repo.set_fleet({f"vm-{i:04d}.yaml": vm(i) for i in range(n)})
        big = b.repo.commit(f"{n} VMs")
        t0 = b.push_and_notify(big)
        vms = b.vms
        assert vms is not None
        wait(lambda: vms.count() >= n, 600, f"{n} VMs exist", every=0.05)
        t_exist = time.time() - t0
        wait(lambda: b.status().get("lastAppliedCommit") == big, 120, "status at the big commit")
        t_ready = time.time() - t0
        report(f"push of {n} VMs -> all {n} objects exist", f"{t_exist:.1f} s ({n / t_exist:.0f} objects/s)")
        report(f"push of {n} VMs -> GitSource Ready", f"{t_ready:.1f} s")

        # 2. Push -> webhook -> reconcile start -> the edited object updated (fleet of N).
        starts, updates, hooks = [], [], []
        for r in range(args.rounds):
            b.repo.set_fleet({f"vm-{i:04d}.yaml": vm(i, cpus=2 if (i == 0 and r % 2 == 0) else 1)
                              for i in range(n)})
            sha = b.repo.commit(f"edit {r}")
            t0 = time.time()
            b.repo.push()
            hooks.append(b.webhook(sha))
            want = 2 if r % 2 == 0 else 1

            def edited(want: int = want) -> bool:
                return vms.cpus("vm-0000") == want

            def at(sha: str = sha) -> bool:
                return bool(b.status().get("lastAppliedCommit") == sha)

            wait(edited, 120, "edit applied", every=0.05)
            updates.append(time.time() - t0)
            start = b.reconcile_started_after(t0)
            if start is not None:
                starts.append(start)
            wait(at, 60, "round applied")
        report("webhook POST round trip (median)", f"{statistics.median(hooks) * 1000:.0f} ms")
        report("git push -> reconcile started (median, via webhook)",
               f"{statistics.median(starts):.2f} s (min {min(starts):.2f}, max {max(starts):.2f})"
               if starts else "n/a")
        report(f"git push -> edited VM updated, fleet of {n} (median)",
               f"{statistics.median(updates):.2f} s (min {min(updates):.2f}, max {max(updates):.2f})")

        # 3. Delete the whole fleet: held, confirmed, pruned.
        b.repo.set_fleet({})
        wipe = b.repo.commit("wipe")
        t0 = b.push_and_notify(wipe)
        wait(lambda: (b.status().get("heldDeletion") or {}).get("commit") == wipe, 60, "hold")
        t_hold = time.time() - t0
        t1 = time.time()
        kubectl(b.kc, "-n", NS, "annotate", "gitsource", "fleet", f"hyperfleet.dev/confirm-deletion={wipe}")
        wait(lambda: vms.count() == 0, 600, "all pruned", every=0.05)
        report(f"push deleting {n} -> held", f"{t_hold:.2f} s")
        report(f"confirm -> all {n} pruned", f"{time.time() - t1:.1f} s")

        # 4. M VMs on K agents (CH doubles) -> all Running.
        m, k = args.running_vms, args.agents
        b.start("controller", hyperfleet_cmd("controller"))
        for i in range(k):
            b.start(f"agent-{i}", agent_cmd(
                f"node-{i}", work / f"node-{i}", ch_double_cmd(),
                # room for all m one-CPU VMs, with headroom
                "--cpus", str(max(32, 2 * -(-m // k))), "--memory", "1Ti",
                "--heartbeat", "3"))

        def nodes_ready() -> bool:
            out = json.loads(kubectl(b.kc, "get", "wn", "-o", "json").stdout)["items"]
            return bool(sum((x.get("status") or {}).get("phase") == "Ready" for x in out) >= k)

        wait(nodes_ready, 120, f"{k} WorkerNodes Ready", every=0.5)
        b.repo.set_fleet({f"vm-{i:04d}.yaml": vm(i) for i in range(m)})
        run = b.repo.commit(f"{m} VMs to run")
        t0 = b.push_and_notify(run)

        wait(lambda: vms.count("Running") >= m, 900, f"{m} VMs Running", every=0.1)
        report(f"push of {m} VMs -> all Running on {k} agents (CH double)", f"{time.time() - t0:.1f} s")
    finally:
        b.down()
        if args.keep:
            print(f"\nlogs: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    width = max(len(k) for k, _ in figures)
    print("\nGitOps benchmark (2-core machine, real API server + etcd on loopback)")
    for key, value in figures:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
