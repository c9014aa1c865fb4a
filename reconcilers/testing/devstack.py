"""A local control plane for the demo and the integration tests.

Runs the genuine apiextensions-apiserver + etcd (built once from Debian packages by the
project's recipe, ``tests/k8s-apiserver/build.sh``, into the cache directory) on
loopback with fresh certificates, and the Hyperfleet processes beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hyperfleet.reconcilers.conventions import ALL_KINDS

REPO = Path(__file__).resolve().parents[2]  # this file: <checkout>/reconcilers/testing/


def k8s_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("HYPERFLEET_K8S_DIR", str(Path(base) / "hyperfleet-k8s")))


def apiserver_binaries() -> tuple[Path, Path]:
    root = k8s_dir() / "chroot"
    return root / "root/out/crd-apiserver", root / "usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certs(w: Path) -> None:
    if (w / "admin.crt").exists():
        return
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.crt", "-days", "3650", "-subj", "/CN=hyperfleet-test-ca", cwd=w)
    (w / "server.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    (w / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subj, ext in (
        ("server", "/CN=localhost", "server.ext"),
        ("admin", "/O=system:masters/CN=admin", "client.ext"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                 f"{name}.csr", "-subj", subj, cwd=w)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "3650", "-extfile", ext,
                 cwd=w)


@dataclass
class ApiServer:
    """etcd + crd-apiserver on 127.0.0.1; ``kubeconfig`` is valid once started."""

    workdir: Path
    port: int = 0
    etcd_port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: Record every request in ``workdir/audit.log`` (the RBAC test reads it); off
    #: otherwise, since it costs the API server CPU on every call.
    audit: bool = False

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ApiServer:
        bin_, etcd = apiserver_binaries()
        for b in (bin_, etcd):
            if not b.exists():
                raise FileNotFoundError(
                    f"{b} is missing: build it once with `make apiserver` "
                    "(runs tests/k8s-apiserver/build.sh)"
                )
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        _make_certs(w)
        self.port = self.port or free_port()
        self.etcd_port = self.etcd_port or free_port()
        peer = free_port()
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: local, cluster: {{server: '{self.url}', "
            f"certificate-authority: '{w}/ca.crt'}}}}]\n"
            f"users: [{{name: admin, user: {{client-certificate: '{w}/admin.crt', "
            f"client-key: '{w}/admin.key'}}}}]\n"
            "contexts: [{name: local, context: {cluster: local, user: admin, "
            "namespace: default}}]\ncurrent-context: local\n"
        )
        shutil.rmtree(w / "etcd-data", ignore_errors=True)
        try:
            self._spawn_and_wait(peer, timeout)
        except BaseException:  # incl. KeyboardInterrupt: no etcd left behind by a failed start
            self.stop()
            raise
        return self

    def _spawn_and_wait(self, peer: int, timeout: float) -> None:
        bin_, etcd = apiserver_binaries()
        w = self.workdir
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        peer_url = f"http://127.0.0.1:{peer}"
        self._spawn("etcd", [
            str(etcd), "--name", "t", "--data-dir", str(w / "etcd-data"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"t={peer_url}", "--quota-backend-bytes", str(4 << 30),
            # The data directory is thrown away at every start: durability buys nothing.
            "--unsafe-no-fsync",
        ])
        kc = str(self.kubeconfig)
        self._spawn("apiserver", [
            str(bin_), f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1",
            f"--secure-port={self.port}", f"--tls-cert-file={w}/server.crt",
            f"--tls-private-key-file={w}/server.key", f"--client-ca-file={w}/ca.crt",
            f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}", "--authentication-skip-lookup",
            "--enable-priority-and-fairness=false",
            "--disable-admission-plugins=NamespaceLifecycle,MutatingAdmissionPolicy,"
            "MutatingAdmissionWebhook,ValidatingAdmissionPolicy,ValidatingAdmissionWebhook",
            *([f"--audit-log-path={w}/audit.log", "--audit-policy-file=" + self._audit_policy()]
              if self.audit else []),
        ])
        self._wait_ready(timeout)

    def _audit_policy(self) -> str:
        p = self.workdir / "audit-policy.yaml"
        p.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n"
            "  omitStages: [RequestReceived]\n"
        )
        return str(p)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        (self.workdir / f"{name}.pid").write_text(str(proc.pid))
        self.procs.append(proc)

    def _wait_ready(self, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.workdir / "ca.crt"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    tail = (self.workdir / "apiserver.log").read_text()[-2000:]
                    raise RuntimeError(f"control plane exited early: {p.args!r}\n{tail}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/readyz", context=ctx, timeout=2) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"API server not ready within {timeout}s; see {self.workdir}")

    def stop(self) -> None:
        """Stop the API server, then etcd (also after a failed start: whatever was spawned)."""
        for p in reversed(self.procs):
            stop_process(p)
        self.procs.clear()


def stop_process(p: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    stop_processes([p], grace)


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM all at once, SIGKILL whatever still runs after ``grace`` seconds in total (not
    per process: a stack of N agents stops in one grace period)."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(5)


def launch(cmd: list[str], log: Path, kubeconfig: Path,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process against the local API server, its output appended to ``log``.

    Own session, so a test or the demo can signal it alone; no stdin, so it never waits
    for a terminal."""
    out = open(log, "ab")  # noqa: SIM115 - the child keeps its own descriptor
    try:
        return subprocess.Popen(
            cmd, env={**os.environ, "KUBECONFIG": str(kubeconfig), **(env or {})},
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    finally:
        out.close()


def kill_pidfiles(root: Path, pattern: str, sig: int = signal.SIGKILL) -> None:
    """Signal every VMM recorded in a pid file under ``root`` (VMMs outlive their agent
    by design, so whoever ran a throw-away stack cleans them up)."""
    for pidfile in root.glob(pattern):
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pidfile.read_text()), sig)


def kubectl(kubeconfig: Path, *args: str, check: bool = True,
            input_: str | None = None) -> subprocess.CompletedProcess[str]:
    """The real kubectl client against the local API server."""
    return subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", *args],
        capture_output=True, text=True, check=check, input=input_, timeout=120,
    )


def install_crds(kubeconfig: Path, crd_dir: Path = REPO / "crds") -> None:
    """Apply the CRDs and wait until established (retrying the first-start 429s)."""
    deadline = time.monotonic() + 60
    while True:
        r = kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(crd_dir),
                    check=False)
        if r.returncode == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"kubectl apply of CRDs failed: {r.stderr}")
        time.sleep(0.5)
    kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
            "crd", "-l", "app.kubernetes.io/part-of=hyperfleet")
    # The first request to a new resource type may get 429 while storage initialises.
    for plural in (k.plural for k in ALL_KINDS):
        while kubectl(kubeconfig, "get", plural, "-A", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{plural} never became servable")
            time.sleep(0.2)


def hyperfleet_cmd(*args: str) -> list[str]:
    """How to start a Hyperfleet process with the same interpreter."""
    return [sys.executable, "-m", "hyperfleet.operator.cli", *args]


def dev_path_roots() -> list[str]:
    """Where a dev stack's VM specs name files: its work dirs under /tmp, this checkout
    (the tests' placeholder kernel), the guest kernel cache, and the Nix store."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return ["/tmp", str(REPO), str(cache / "hyperfleet-ch"), "/nix/store"]


def agent_cmd(node: str, socket_dir: Path, ch_binary: str, *args: str) -> list[str]:
    """A dev stack's node agent: its sockets in ``socket_dir``, its image cache and root
    disks beside them (``<socket_dir>.state``), host paths confined to dev_path_roots()."""
    roots = [a for r in dev_path_roots() for a in ("--allowed-path-root", r)]
    return hyperfleet_cmd("agent", "--node-name", node, "--ch-binary", ch_binary,
                          "--socket-dir", str(socket_dir),
                          "--state-dir", f"{socket_dir}.state", *roots, *args)


#: The team's shared folder beside the checkout: the prebuilt cloud-hypervisor and its recipes.
SHARED = Path(os.environ.get("HYPERFLEET_SHARED", str(REPO.parent / "shared")))
#: Set (CI sets it) when the tests that need the genuine VMM must run rather than skip.
REQUIRE_REAL_CH_ENV = "HYPERFLEET_REQUIRE_REAL_CH"


@dataclass(frozen=True)
class RealVmm:
    """A genuine cloud-hypervisor that runs here, and a guest kernel it accepts."""

    binary: str
    kernel: str
    version: str


def real_vmm_required() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in (REQUIRE_REAL_CH_ENV, "CI"))


def find_real_vmm() -> RealVmm | str:
    """The real VMM if this machine can run one, else the reason it cannot.

    Binary: ``$HYPERFLEET_CH_REAL`` (a path), ``cloud-hypervisor`` on PATH, or the team's
    prebuilt one in ``../shared/cloud-hypervisor/bin`` (checked against its SHA256SUMS).
    Kernel: ``$HYPERFLEET_GUEST_KERNEL``, or Debian's, extracted once by the shared
    ``get-vmlinux.sh`` into ``~/.cache/hyperfleet-ch``."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"/dev/kvm is not usable ({exc.strerror}): a VMM cannot create VMs here"
    binary = _real_ch_binary()
    if binary.startswith("!"):
        return binary[1:]
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{binary} --version failed: {exc}"
    if out.returncode != 0 or not out.stdout.startswith("cloud-hypervisor"):
        return f"{binary} --version answered {out.returncode}: {out.stderr.strip()[:200]}"
    kernel = _guest_kernel()
    if kernel.startswith("!"):
        return kernel[1:]
    return RealVmm(binary, kernel, out.stdout.splitlines()[0].strip())


def _real_ch_binary() -> str:
    """A path, or "!" and why there is none."""
    explicit = os.environ.get("HYPERFLEET_CH_REAL")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else f"!$HYPERFLEET_CH_REAL={explicit} " \
            "is not an executable"
    on_path = shutil.which("cloud-hypervisor")
    if on_path:
        return on_path
    bindir = SHARED / "cloud-hypervisor" / "bin"
    sums = bindir / "SHA256SUMS"
    if not sums.exists():
        return (f"!no cloud-hypervisor on PATH and no {sums} (set HYPERFLEET_CH_REAL to a "
                "cloud-hypervisor binary)")
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        candidate = bindir / name.lstrip("*")
        if name and candidate.exists():
            if hashlib.sha256(candidate.read_bytes()).hexdigest() != digest:
                return f"!{candidate} does not match {sums}: a damaged or changed binary"
            return str(candidate)
    return f"!{sums} names no binary that exists beside it"


def _guest_kernel() -> str:
    """A path, or "!" and why there is none."""
    explicit = os.environ.get("HYPERFLEET_GUEST_KERNEL")
    if explicit:
        return explicit if Path(explicit).is_file() else \
            f"!$HYPERFLEET_GUEST_KERNEL={explicit} is not a file"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hyperfleet-ch"
    cached = sorted(cache.glob("vmlinux-*"))
    if cached:
        return str(cached[-1])
    recipe = SHARED / "cloud-hypervisor" / "ch-build" / "get-vmlinux.sh"
    if not recipe.exists():
        return f"!no guest kernel: set HYPERFLEET_GUEST_KERNEL or provide {recipe}"
    out = subprocess.run(["bash", str(recipe)], capture_output=True, text=True, timeout=600)
    path = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode != 0 or not Path(path).is_file():
        return f"!{recipe} failed ({out.returncode}): {out.stderr.strip()[-300:]}"
    return path


def ch_double_cmd() -> str:
    """Path of the CH double console script installed next to this interpreter."""
    exe = Path(sys.executable).parent / "hyperfleet-ch-double"
    return str(exe) if exe.exists() else shutil.which("hyperfleet-ch-double") or str(exe)
