"""Backend providers: what this node can do, discovered at runtime (not configured).

Each provider probes its backend; the agent runs them in parallel with a timeout and
publishes the union of healthy providers' capabilities on its WorkerNode.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Protocol

from .hypervisor.client import ChError
from .hypervisor.process import ProcessManager
from .models.node import Provider


class BackendProvider(Protocol):
    name: str

    def probe(self) -> Provider: ...


class CloudHypervisorProvider:
    """Asks the configured binary for its version and a live VMM for its features."""

    name = "cloud-hypervisor"

    #: What every supported release can do through the REST API.
    BASE_CAPABILITIES = (
        "provision",
        "snapshot",
        "restore",
        "hot-resize",
        "disk-hotplug",
        "net-hotplug",
        "vsock",
        "serial-console",
        "migration",
    )

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def probe(self) -> Provider:
        try:
            out = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=5, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return Provider(name=self.name, available=False, healthy=False, message=str(exc))
        m = re.search(r"v?(\d+\.\d+(?:\.\d+)?)", out)
        version = m.group(1) if m else out.strip()
        features: list[str] = []
        with tempfile.TemporaryDirectory(prefix="hf-probe-", dir="/tmp") as tmp:
            pm = ProcessManager(self.binary, tmp)
            try:
                pm.spawn("probe", "ping")
                client = pm.client("probe", "ping", wait_socket=5)
                ping = client.ping()
                client.close()
                features = list(ping.get("features") or [])
                version = str(ping.get("version") or version).lstrip("v")
            except (ChError, OSError) as exc:
                return Provider(
                    name=self.name, available=False, healthy=False, version=version,
                    message=f"vmm.ping failed: {exc}",
                )
            finally:
                pm.stop("probe", "ping", grace=2)
        caps = list(self.BASE_CAPABILITIES)
        kvm = os.path.exists("/dev/kvm")
        message = f"features: {', '.join(features) or 'none'}; /dev/kvm {'present' if kvm else 'absent'}"
        return Provider(
            name=self.name, available=True, healthy=True, version=version,
            capabilities=caps, message=message,
        )


class KvmProvider:
    """Hardware virtualisation: what a real cloud-hypervisor needs from the host."""

    name = "kvm"

    def __init__(self, device: str = "/dev/kvm") -> None:
        self.device = device

    def probe(self) -> Provider:
        if not os.path.exists(self.device):
            return Provider(name=self.name, available=False, message=f"{self.device} absent")
        usable = os.access(self.device, os.R_OK | os.W_OK)
        return Provider(name=self.name, available=True, healthy=usable,
                        capabilities=["kvm"] if usable else [],
                        message=None if usable else f"{self.device} not read/writable")


class ToolProvider:
    """A capability that exists when a host tool runs (e.g. qemu-img for disk overlays)."""

    def __init__(self, name: str, command: list[str], capabilities: list[str],
                 paths: tuple[str, ...] = ()) -> None:
        self.name = name
        self.command = command
        self.capabilities = capabilities
        self.paths = paths

    def probe(self) -> Provider:
        missing = [p for p in self.paths if not os.path.exists(p)]
        if missing:
            return Provider(name=self.name, available=False, message=f"missing {missing[0]}")
        try:
            out = subprocess.run(self.command, capture_output=True, text=True, timeout=5,
                                 check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            return Provider(name=self.name, available=False, message=str(exc)[:200])
        m = re.search(r"(\d+\.\d+(?:\.\d+)?)", out)
        return Provider(name=self.name, available=True, version=m.group(1) if m else None,
                        capabilities=list(self.capabilities))


class StaticProvider:
    """Capabilities an operator declares for the node (``--capability``), e.g. ``gpu``."""

    name = "custom"

    def __init__(self, capabilities: list[str]) -> None:
        self.capabilities = capabilities

    def probe(self) -> Provider:
        return Provider(name=self.name, available=bool(self.capabilities),
                        capabilities=sorted(self.capabilities))


def default_providers(ch_binary: str, custom: list[str] | None = None) -> list[BackendProvider]:
    """The providers every agent runs."""
    return [
        CloudHypervisorProvider(ch_binary),
        KvmProvider(),
        ToolProvider("disk-overlay", ["qemu-img", "--version"], ["clone", "disk-overlay"]),
        ToolProvider("network-overlay", ["ip", "-V"], ["network-overlay", "tap"],
                     paths=("/dev/net/tun",)),
        StaticProvider(list(custom or [])),
    ]


def discover(providers: Sequence[BackendProvider], timeout: float = 15.0) -> list[Provider]:
    """Probe every provider concurrently; a slow or crashing one is reported, not fatal."""
    results: list[Provider] = []
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(providers)),
                                               thread_name_prefix="probe")
    futures = {ex.submit(p.probe): p for p in providers}
    done, _ = concurrent.futures.wait(futures, timeout=timeout)
    ex.shutdown(wait=False)  # a hung probe must not hold up the agent
    for fut, p in futures.items():
        if fut in done and fut.exception() is None:
            results.append(fut.result())
        else:
            why = "timed out" if fut not in done else f"crashed: {fut.exception()}"
            results.append(Provider(name=p.name, available=False, healthy=False, message=why))
    return sorted(results, key=lambda r: r.name)


def capabilities(reports: Sequence[Provider]) -> list[str]:
    return sorted({c for r in reports if r.available and r.healthy for c in r.capabilities})
