"""Integration fixtures: the real API server, real kubectl, real Hyperfleet processes."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

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


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    api = ApiServer(tmp_path_factory.mktemp("apiserver"))
    api.start()
    try:
        install_crds(api.kubeconfig)
        yield api
    finally:
        api.stop()


@dataclass
class Cluster:
    """A namespace-isolated view of the shared API server, plus process management."""

    api: ApiServer
    namespace: str
    workdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.api.kubeconfig

    def kubectl(self, *args: str, check: bool = True, input_: str | None = None,
                namespaced: bool = True) -> subprocess.CompletedProcess[str]:
        ns = ["-n", self.namespace] if namespaced else []
        return kubectl(self.kubeconfig, *ns, *args, check=check, input_=input_)

    def apply(self, manifest: str) -> subprocess.CompletedProcess[str]:
        return self.kubectl("apply", "-f", "-", input_=manifest, check=False)

    def get(self, kind: str, name: str, namespaced: bool = True) -> dict[str, Any] | None:
        r = self.kubectl("get", kind, name, "-o", "json", check=False, namespaced=namespaced)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def start(self, name: str, *args: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        p = launch(hyperfleet_cmd(*args), self.workdir / f"{name}.log", self.kubeconfig, env)
        self.procs[name] = p
        return p

    def start_controller(self, eviction_timeout: float = 300) -> subprocess.Popen[bytes]:
        return self.start("controller", "controller", "--node-grace", "6",
                          "--eviction-timeout", str(eviction_timeout),
                          "--git-cache-dir", str(self.workdir / "git-cache"))

    def start_agent(self, node: str, cpus: int = 8, memory: str = "16Gi",
                    pool: str = "default",
                    env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start(
            f"agent-{node}", "agent", "--node-name", node, "--ch-binary", ch_double_cmd(),
            "--socket-dir", str(self.socket_dir(node)), "--cpus", str(cpus),
            "--memory", memory, "--pool", pool, "--heartbeat", "1", env=env,
        )

    def node(self, suffix: str) -> str:
        """A WorkerNode name unique to this test (WorkerNodes are cluster-scoped)."""
        return f"{self.namespace}-{suffix}"

    def socket_dir(self, node: str) -> Path:
        return self.workdir / node

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None:
            stop_process(p)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.workdir.glob("*.log"))
        )


def wait_for(pred: Callable[[], Any], timeout: float = 60, what: str = "condition",
             cluster: Cluster | None = None) -> Any:
    """Poll until ``pred`` returns something truthy; fail with the processes' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster is not None:
            dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
            if dead:
                pytest.fail(f"{', '.join(dead)} exited while waiting for {what}\n{cluster.logs()}")
        value = pred()
        if value:
            return value
        time.sleep(0.3)
    extra = f"\n{cluster.logs()}" if cluster else ""
    pytest.fail(f"timed out after {timeout}s waiting for {what}{extra}")


@contextlib.contextmanager
def new_cluster(apiserver: ApiServer) -> Iterator[Cluster]:
    """A fresh namespace; every process started through it is stopped afterwards, and the
    cluster-scoped WorkerNodes it registered are deleted."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    kubectl(apiserver.kubeconfig, "create", "namespace", ns)
    # Short, unique socket dirs: unix socket paths are limited to 107 bytes.
    work = Path("/tmp") / f"hf-{ns}"
    work.mkdir()
    c = Cluster(apiserver, ns, work)
    try:
        yield c
    finally:
        # Delete VMs while their agents still run, so finalizers are honoured; then make
        # sure nothing of this test is left for the next one's controller to schedule.
        for kind in ("vmjobs", "virtualmachines"):
            kubectl(apiserver.kubeconfig, "-n", ns, "delete", kind, "--all", "--timeout=30s",
                    check=False)
        for name in list(c.procs):
            c.stop(name)
        kill_pidfiles(work, "*/*.pid")
        left = kubectl(apiserver.kubeconfig, "-n", ns, "get", "virtualmachines", "-o", "name",
                       check=False).stdout.split()
        for obj in left:
            kubectl(apiserver.kubeconfig, "-n", ns, "patch", obj, "--type=merge", "-p",
                    '{"metadata":{"finalizers":[]}}', check=False)
        nodes = kubectl(apiserver.kubeconfig, "get", "workernodes", "-o", "name",
                        check=False).stdout.split()
        for obj in nodes:
            if obj.split("/")[-1].startswith(ns):
                kubectl(apiserver.kubeconfig, "delete", obj, "--wait=false", check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.fixture
def cluster(apiserver: ApiServer) -> Iterator[Cluster]:
    with new_cluster(apiserver) as c:
        yield c
