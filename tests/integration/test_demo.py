"""`hyperfleet demo` against an existing cluster (what `make demo` does with KUBECONFIG
set), on a machine without the team's shared folder: only the repository is needed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from hyperfleet.reconcilers.testing.devstack import REPO, ApiServer, hyperfleet_cmd, kubectl


def test_demo_converges_on_an_existing_cluster_without_the_shared_folder(
        tmp_path: Path) -> None:
    cluster = ApiServer(tmp_path / "existing-cluster")  # stands in for the user's cluster
    cluster.start()
    try:
        kc = cluster.kubeconfig
        demo = tmp_path / "demo"
        env = {k: v for k, v in os.environ.items()
               if k not in ("KUBECONFIG", "HYPERFLEET_REQUIRE_REAL_CH")}
        env["HYPERFLEET_SHARED"] = str(tmp_path / "no-shared-folder")
        run = subprocess.run(
            [*hyperfleet_cmd("demo", "--kubeconfig", str(kc), "--workdir", str(demo),
                             "--no-keep")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out
        assert f"using the existing cluster of {kc}" in out
        assert "the test double" in out  # no shared folder: no prebuilt cloud-hypervisor
        assert not (demo / "apiserver").exists()  # no API server of its own
        vms = json.loads(kubectl(kc, "get", "hvm", "-A", "-o", "json").stdout)["items"]
        assert vms and all(v["status"]["phase"] == "Running" for v in vms), out
        assert kubectl(kc, "get", "namespace", "hyperfleet-system").returncode == 0
        assert kubectl(kc, "get", "gitsource", "fleet", "-o", "json").returncode == 0
    finally:
        cluster.stop()


def test_demo_refuses_a_missing_kubeconfig(tmp_path: Path) -> None:
    run = subprocess.run(hyperfleet_cmd("demo", "--kubeconfig", str(tmp_path / "nope"),
                                        "--workdir", str(tmp_path / "demo"), "--no-keep"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: --kubeconfig {tmp_path / 'nope'}: no such file"
