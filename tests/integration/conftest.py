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

from hyperfleet.reconcilers.testing.devstack import (
    REQUIRE_REAL_CH_ENV,
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
    real_vmm_required,
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
                    pool: str = "default", env: dict[str, str] | None = None,
                    ch_binary: str | None = None,
                    extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        cmd = agent_cmd(node, self.socket_dir(node), ch_binary or ch_double_cmd(),
                        *(extra or []), "--cpus", str(cpus), "--memory", memory,
                        "--pool", pool, "--heartbeat", "1")
        p = launch(cmd, self.workdir / f"agent-{node}.log", self.kubeconfig, env)
        self.procs[f"agent-{node}"] = p
        return p

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
        # Pools first, waiting for their controller to delete their members (deleting VMs
        # under a live pool would have them recreated); without a controller their
        # finalizer stays, and is stripped below.
        kubectl(apiserver.kubeconfig, "-n", ns, "delete", "virtualmachinepools", "--all",
                "--timeout=30s", check=False)
        for kind in ("vmjobs", "virtualmachines"):
            kubectl(apiserver.kubeconfig, "-n", ns, "delete", kind, "--all", "--timeout=30s",
                    check=False)
        for name in list(c.procs):
            c.stop(name)
        kill_pidfiles(work, "*/*.pid")
        left = kubectl(apiserver.kubeconfig, "-n", ns, "get", "virtualmachines,virtualmachinepools",
                       "-o", "name", check=False).stdout.split()
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


@pytest.fixture(scope="session")
def real_vmm() -> RealVmm:
    """The genuine cloud-hypervisor: skipped, saying why, where this machine has none;
    an error instead where it must run (CI, or $HYPERFLEET_REQUIRE_REAL_CH)."""
    found = find_real_vmm()
    if isinstance(found, str):
        if real_vmm_required():
            pytest.fail(f"the real cloud-hypervisor must run here (CI or "
                        f"{REQUIRE_REAL_CH_ENV}) but cannot: {found}")
        pytest.skip(f"no real cloud-hypervisor on this machine: {found}")
    return found


@dataclass(frozen=True)
class Backend:
    """The VMM an agent drives, with files a VM spec can name (the real VMM opens them)."""

    name: str  # "double" or "real"
    binary: str
    kernel: Path
    images: Path

    def disk(self, name: str, size: int = 16 << 20) -> str:
        """A sparse raw disk image of its own (the real VMM locks each one it opens)."""
        path = self.images / f"{name}.raw"
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(size)
        return str(path)

    def kernel_alias(self, name: str) -> str:
        """The same kernel under another path (a spec change the VMM must pick up)."""
        alias = self.images / name
        if not alias.exists():
            alias.symlink_to(self.kernel)
        return str(alias)


@pytest.fixture(params=["double", "real"])
def backend(request: pytest.FixtureRequest, cluster: Cluster) -> Backend:
    """Each test using it runs against the CH double and against the real VMM, unless
    marked ``double_only(reason)``: then the real run is skipped, saying why."""
    only = request.node.get_closest_marker("double_only")
    if request.param == "real" and only is not None:
        pytest.skip(only.args[0])
    images = cluster.workdir / "images"
    images.mkdir(exist_ok=True)
    if request.param == "real":
        vmm: RealVmm = request.getfixturevalue("real_vmm")
        return Backend("real", vmm.binary, Path(vmm.kernel), images)
    kernel = images / "vmlinux"
    kernel.write_bytes(b"\x7fELF not a kernel: the double opens no file")
    return Backend("double", ch_double_cmd(), kernel, images)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how many tests drove the genuine VMM, so a run that skipped them all shows."""
    stats = terminalreporter.stats
    real = {k: sum("[real" in r.nodeid for r in stats.get(k, []) if getattr(r, "when", "call")
                   in ("call", "setup"))
            for k in ("passed", "failed", "error", "skipped")}
    if any(real.values()):
        terminalreporter.write_line(
            "real cloud-hypervisor: " + ", ".join(f"{n} {k}" for k, n in real.items() if n))
