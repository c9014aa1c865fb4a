"""The webhook receiver's probes: /healthz (liveness) on every replica, /readyz (readiness)
only on the active one, so that a Service never routes a push to a standby (which answers 503)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp

from hyperfleet.operator.gitsource import GitOps, GitOpsConfig
from hyperfleet.reconcilers.kube import Kube
from tests import chartutil as cu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chart_probe_paths() -> tuple[str, str]:
    """The paths the chart's controller probes, with the webhook receiver on (readiness, liveness)."""
    values = {"controller": {"replicas": 2}, "gitops": {"webhook": {"enabled": True, "secret": "x"}}}
    (c,) = cu.one(cu.objects(values), "Deployment")["spec"]["template"]["spec"]["containers"]
    return c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]


def test_only_the_active_replica_is_ready_but_every_replica_is_live(tmp_path: Path) -> None:
    ready, live = _chart_probe_paths()
    role = {"active": False}

    async def scenario() -> None:
        port = _free_port()
        ops = GitOps(GitOpsConfig(cache_dir=str(tmp_path), webhook_port=port, webhook_host="127.0.0.1",
                                  webhook_secret="s3cret"), Kube(), active=lambda: role["active"])
        await ops.start()  # the receiver as the controller runs it, routes included
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
                async def status(path: str) -> int:
                    async with http.get(path) as r:
                        return r.status

                assert (await status(live), await status(ready)) == (200, 503)
                async with http.post("/hook", data=b"{}") as r:
                    assert r.status == 503  # what a not-ready standby would do with a push
                role["active"] = True
                assert (await status(live), await status(ready)) == (200, 200)
                role["active"] = False  # lost the role: out of the Service again
                assert await status(ready) == 503
        finally:
            await ops.stop()

    asyncio.run(scenario())


def test_an_unanswerable_active_check_is_not_ready(tmp_path: Path) -> None:
    def broken() -> bool:
        raise RuntimeError("peering object unreadable")

    async def scenario() -> int:
        ops = GitOps(GitOpsConfig(cache_dir=str(tmp_path)), Kube(), active=broken)
        try:
            return (await ops.handle_readyz(None)).status  # type: ignore[arg-type]
        finally:
            await ops.stop()

    assert asyncio.run(scenario()) == 503
