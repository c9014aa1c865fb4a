"""Backend providers: discovered at runtime, probed in parallel, slow or broken ones reported."""

from __future__ import annotations

import os
import shutil
import time

from hyperfleet.reconcilers import providers
from hyperfleet.reconcilers.models.node import Provider
from hyperfleet.reconcilers.testing.devstack import ch_double_cmd


class Slow:
    name = "slow"

    def probe(self) -> Provider:
        time.sleep(3)
        return Provider(name=self.name, available=True, capabilities=["never"])


class Broken:
    name = "broken"

    def probe(self) -> Provider:
        raise RuntimeError("driver exploded")


def test_cloud_hypervisor_provider_asks_a_live_vmm() -> None:
    report = providers.CloudHypervisorProvider(ch_double_cmd()).probe()
    assert report.available and report.healthy
    assert report.version == "54.0.0"
    assert {"provision", "snapshot", "hot-resize", "migration"} <= set(report.capabilities)


def test_missing_binary_is_unavailable_with_the_reason() -> None:
    report = providers.CloudHypervisorProvider("/nonexistent/cloud-hypervisor").probe()
    assert not report.available and "No such file" in (report.message or "")


def test_discover_runs_in_parallel_and_reports_timeouts_and_crashes() -> None:
    t0 = time.monotonic()
    reports = {r.name: r for r in providers.discover(
        [Slow(), Broken(), providers.StaticProvider(["gpu"])], timeout=0.5)}
    assert time.monotonic() - t0 < 2.5  # did not wait for the slow one
    assert not reports["slow"].available and reports["slow"].message == "timed out"
    assert not reports["broken"].healthy and "driver exploded" in (reports["broken"].message or "")
    assert providers.capabilities(list(reports.values())) == ["gpu"]


def test_default_providers_match_the_host() -> None:
    reports = {r.name: r for r in providers.discover(
        providers.default_providers(ch_double_cmd(), ["gpu"]))}
    assert set(reports) == {"cloud-hypervisor", "kvm", "disk-overlay", "network-overlay",
                            "custom"}
    assert reports["kvm"].available == os.path.exists("/dev/kvm")
    assert reports["disk-overlay"].available == (shutil.which("qemu-img") is not None)
    caps = providers.capabilities(list(reports.values()))
    assert "gpu" in caps and "provision" in caps
    assert ("clone" in caps) == reports["disk-overlay"].available
