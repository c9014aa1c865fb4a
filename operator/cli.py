"""`hyperfleet` command: controller, agent, demo, CRD generation; the client commands
(job, vm, get, reconcile, ...) live in jobcli and vmcli and are registered here."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import kopf
import typer

from . import demo
from .clicommon import EXIT_CODES_HELP, KUBECONFIG, load_kubeconfig, package_version
from .settings import DEFAULT_EVICTION_SECONDS, DEFAULT_FENCE_AFTER

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from hyperfleet.reconcilers.kube import Kube

    from .metrics import Role
    from .settings import Peering

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Hyperfleet: GitOps for cloud-hypervisor VMs on Kubernetes.",
                  epilog=EXIT_CODES_HELP)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hyperfleet {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit")] = False,
          ) -> None:
    """Hyperfleet: GitOps for cloud-hypervisor VMs on Kubernetes."""


def _add_client_commands() -> None:
    """Every client sub-command is registered here, so jobcli and vmcli never import cli."""
    from . import jobcli, vmcli

    app.add_typer(jobcli.app, name="job")
    vmcli.register(app)


_add_client_commands()

KubeconfigOpt = Annotated[str | None, KUBECONFIG]
# Only the formats logs.setup() knows: a typo is a usage error, not silently another format.
LogFormatOpt = Annotated[Literal["json", "text"], typer.Option(help="json or text")]
LogLevelOpt = Annotated[Literal["debug", "info", "warning", "error"], typer.Option(
    envvar="HYPERFLEET_LOG_LEVEL", help="Least severe level written; debug also shows kopf's "
    "per-handler lines")]
MetricsOpt = Annotated[int, typer.Option(help="Prometheus metrics port (0: off)")]
MetricsAddrOpt = Annotated[str, typer.Option(envvar="HYPERFLEET_METRICS_ADDRESS",
                                             help="Address the metrics port binds")]
HealthOpt = Annotated[int, typer.Option(
    help="Port of kopf's liveness endpoint, GET /healthz (0: off); answers once the "
    "startup handlers finished, as long as the event loop runs")]
HealthAddrOpt = Annotated[str, typer.Option(envvar="HYPERFLEET_HEALTH_ADDRESS",
                                            help="Address the health port binds")]


def _connect(kubeconfig: str | None) -> None:
    """Point both API clients (ours and kopf's) at the same cluster before anything else."""
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig
    load_kubeconfig(kubeconfig)


def _prepare(role: Role, log_format: str, metrics_port: int, metrics_address: str,
             kubeconfig: str | None, log_level: str = "info"
             ) -> tuple[kopf.OperatorRegistry, Kube, CollectorRegistry]:
    """What every long-running process does first: logs, metrics (the role's own registry,
    to which the caller adds its state collectors), API connection."""
    from hyperfleet.reconcilers.kube import Kube

    from . import logs, metrics

    logs.setup(level=log_level, fmt=log_format)
    series = metrics.registry_for(role)
    metrics.serve(metrics_port, metrics_address, series)
    _connect(kubeconfig)
    return kopf.OperatorRegistry(), Kube(), series


def _liveness(port: int, address: str) -> str | None:
    """kopf's liveness endpoint URL, or None when off."""
    if not port:
        return None
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/healthz"


def _run_kopf(registry: kopf.OperatorRegistry, peering: Peering | None = None,
              liveness: str | None = None) -> None:
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # In a pod: the service account; elsewhere: $KUBECONFIG.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    if peering:
        # Our identity, so that the scheduling loop can find itself among the peers
        # (kopf's Identity is a NewType of str it does not export).
        coro = kopf.operator(registry=registry, clusterwide=True, standalone=False,
                             peering_name=peering.name, priority=peering.priority,
                             identity=cast(Any, peering.identity), liveness_endpoint=liveness)
    else:
        coro = kopf.operator(registry=registry, clusterwide=True, standalone=True,
                             liveness_endpoint=liveness)
    asyncio.run(coro)


@app.command()
def controller(
    kubeconfig: KubeconfigOpt = None,
    node_grace: Annotated[float, typer.Option(help="Seconds without heartbeat -> NotReady")] = 20.0,
    eviction_timeout: Annotated[float, typer.Option(
        help="Seconds without heartbeat -> node lost, its VMs are placed again; keep it "
        "well above the agents' --fence-after")] = DEFAULT_EVICTION_SECONDS,
    scheduling_policy: Annotated[str, typer.Option(
        help="spread (most free capacity first) or binpack (fill nodes up)")] = "spread",
    peering: Annotated[str | None, typer.Option(
        help="kopf peering name: run several replicas, one active (needs the peering CRDs)")
    ] = None,
    peering_lifetime: Annotated[int, typer.Option(
        help="Seconds a silent active replica keeps the role before a standby takes over")
    ] = 60,
    peering_priority: Annotated[int | None, typer.Option(
        help="This replica's peering priority, highest is active (default: random)")
    ] = None,
    gitops: Annotated[bool, typer.Option(help="Run the GitSource reconciler here")] = True,
    git_cache_dir: Annotated[str, typer.Option(
        envvar="HYPERFLEET_GIT_CACHE", help="Where Git checkouts are cached")
    ] = "/var/cache/hyperfleet/git",
    webhook_port: Annotated[int, typer.Option(
        help="Push-webhook port (0: off, polling only)")] = 0,
    webhook_host: Annotated[str, typer.Option(help="Address the webhook receiver binds")
                            ] = "0.0.0.0",
    webhook_secret_file: Annotated[Path | None, typer.Option(
        help="File with the webhook secret (or set HYPERFLEET_WEBHOOK_SECRET)")] = None,
    webhook_header_timeout: Annotated[float, typer.Option(
        help="Seconds a webhook connection may take to send its request headers "
             "(slow senders are cut off)")] = 10.0,
    webhook_body_timeout: Annotated[float, typer.Option(
        help="Seconds a webhook request may take to send its body (then 408)")] = 30.0,
    webhook_replay_window: Annotated[float, typer.Option(
        help="Seconds an accepted webhook delivery id is remembered; the same id again "
             "is refused with 409 (0: off)")] = 3600.0,
    apply_workers: Annotated[int, typer.Option(
        help="Concurrent API calls per GitSource apply")] = 16,
    cross_namespace: Annotated[bool, typer.Option(
        help="Let a GitSource apply into other namespaces and WorkerNodes (as Flux does); "
             "--no-cross-namespace confines each to its own namespace")] = True,
    log_format: LogFormatOpt = "json",
    log_level: LogLevelOpt = "info",
    metrics_port: MetricsOpt = 0,
    metrics_address: MetricsAddrOpt = "0.0.0.0",
    health_port: HealthOpt = 0,
    health_address: HealthAddrOpt = "0.0.0.0",
) -> None:
    """Run the controller (scheduling, node health, VmJob routing)."""
    from . import controller as ctl
    from . import metrics
    from .settings import ControllerConfig, Peering

    if scheduling_policy not in ("spread", "binpack"):
        typer.echo(f"--scheduling-policy {scheduling_policy!r}: use spread or binpack", err=True)
        raise typer.Exit(2)
    # Several replicas: kopf's peering keeps exactly one active, the highest priority
    # (random, so that equal priorities do not pause them all).
    # POD_ID (the chart sets it to the pod name) is what kopf would use too.
    identity = os.environ.get("POD_ID") or \
        f"{socket.gethostname()}/{os.getpid()}-{secrets.token_hex(4)}"
    priority = random.randint(1, 1_000_000) if peering_priority is None else peering_priority
    peer = Peering(peering, identity, priority) if peering else None
    cfg = ControllerConfig(node_grace_seconds=node_grace, eviction_seconds=eviction_timeout,
                           scheduling_policy=scheduling_policy, peering=peer,
                           peering_lifetime=peering_lifetime)
    git_cfg = None
    if gitops:
        from . import gitsource

        # The secret comes from a file or the environment, never argv (visible in `ps`).
        secret = (_read_secret_file(webhook_secret_file) if webhook_secret_file
                  else os.environ.get(gitsource.WEBHOOK_SECRET_ENV))
        git_cfg = gitsource.GitOpsConfig(cache_dir=git_cache_dir, webhook_port=webhook_port,
                                         webhook_host=webhook_host, webhook_secret=secret,
                                         webhook_header_timeout=webhook_header_timeout,
                                         webhook_body_timeout=webhook_body_timeout,
                                         webhook_replay_window=webhook_replay_window,
                                         apply_workers=apply_workers,
                                         cross_namespace=cross_namespace)
        try:
            git_cfg.check()
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    registry, kube, series = _prepare("controller", log_format, metrics_port, metrics_address,
                                      kubeconfig, log_level)
    scheduler = ctl.register(registry, cfg, kube)
    series.register(metrics.FleetCollector(scheduler))
    if git_cfg is not None:
        # GitOps follows the same peering role as the scheduling loop: only the active
        # replica fetches, applies, prunes and takes webhooks.
        ops = gitsource.register(registry, git_cfg, kube, active=lambda: scheduler.active,
                                 vms=scheduler.vm_snapshot)
        series.register(metrics.GitSourceCollector(ops))
    from . import pools

    # VirtualMachinePools: active replica only, like scheduling and GitOps.
    pools.register(registry, kube, scheduler.vm_subscribers, active=lambda: scheduler.active)
    _run_kopf(registry, peer, _liveness(health_port, health_address))


def _read_secret_file(path: Path) -> str:
    """The --webhook-secret-file contents, or exit 2 naming the flag (never the contents)."""
    try:
        secret = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not readable text"
        typer.echo(f"error: --webhook-secret-file {path}: {why}", err=True)
        raise typer.Exit(2) from None
    if not secret:
        typer.echo(f"error: --webhook-secret-file {path} is empty", err=True)
        raise typer.Exit(2)
    return secret


@app.command()
def agent(
    node_name: Annotated[str, typer.Option(envvar="NODE_NAME", help="This node's WorkerNode name")],
    kubeconfig: KubeconfigOpt = None,
    ch_binary: Annotated[str, typer.Option(envvar="HYPERFLEET_CH_BINARY",
                                           help="cloud-hypervisor binary")] = "cloud-hypervisor",
    socket_dir: Annotated[str, typer.Option(help="Directory of VMM API sockets")] = "/run/hyperfleet",
    pool: Annotated[str, typer.Option(help="Worker pool when registering")] = "default",
    cpus: Annotated[int | None, typer.Option(help="Advertise this many CPUs")] = None,
    memory: Annotated[str | None, typer.Option(help="Advertise this much memory (e.g. 64Gi)")] = None,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat interval, seconds")] = 5.0,
    lease_namespace: Annotated[str, typer.Option(
        envvar="POD_NAMESPACE", help="Namespace of this node's heartbeat Lease")
    ] = "hyperfleet-system",
    migration_address: Annotated[str | None, typer.Option(
        envvar="HYPERFLEET_MIGRATION_ADDRESS",
        help="This node's IP for incoming live migrations (TCP); unset: same-host only")
    ] = None,
    capability: Annotated[list[str] | None, typer.Option(
        help="Extra capability this node offers (repeatable), e.g. gpu")] = None,
    fence_after: Annotated[float, typer.Option(
        help="Pause every VM after this many seconds without reaching the API server (a "
        "watchdog process does it even if the agent is frozen or dead), so a partitioned "
        "node cannot run a VM that moved elsewhere; keep it well under the controller's "
        "--eviction-timeout (0: off)")] = DEFAULT_FENCE_AFTER,
    state_dir: Annotated[str, typer.Option(
        help="Image cache and the VMs' root disks (keep it on persistent storage)")
    ] = "/var/lib/hyperfleet",
    allowed_path_root: Annotated[list[str] | None, typer.Option(
        help="Host directory VM specs may name files under (kernel, disks, images; "
        "repeatable). Default: /var/lib/hyperfleet, /nix/store, /usr/share/cloud-hypervisor. "
        "Never /proc, /sys, /dev")
    ] = None,
    image_cache_size: Annotated[str, typer.Option(
        help="Size limit of the image cache; least recently used images not in use go "
        "first")] = "20Gi",
    vmm_arg: Annotated[list[str] | None, typer.Option(
        help="Extra cloud-hypervisor argument for every VM (repeatable), e.g. "
        "--vmm-arg=--seccomp=log")] = None,
    log_format: LogFormatOpt = "json",
    log_level: LogLevelOpt = "info",
    metrics_port: MetricsOpt = 0,
    # The agent runs on the host network: loopback unless told otherwise (docs/metrics.md).
    metrics_address: MetricsAddrOpt = "127.0.0.1",
    health_port: HealthOpt = 0,
    health_address: HealthAddrOpt = "127.0.0.1",
) -> None:
    """Run the node agent that drives cloud-hypervisor on this node."""
    from . import agent as agent_mod
    from . import metrics
    from .settings import AgentConfig

    cfg = AgentConfig(node_name=node_name, ch_binary=ch_binary, socket_dir=socket_dir, pool=pool,
                      cpus=cpus, memory=memory, heartbeat_seconds=heartbeat,
                      lease_namespace=lease_namespace, fence_after_seconds=fence_after,
                      capabilities=tuple(capability or ()),
                      migration_address=migration_address, vmm_args=tuple(vmm_arg or ()),
                      state_dir=state_dir, allowed_path_roots=tuple(allowed_path_root or ()),
                      image_cache_size=image_cache_size)
    registry, kube, series = _prepare("agent", log_format, metrics_port, metrics_address,
                                      kubeconfig, log_level)
    node_agent = agent_mod.register(registry, cfg, kube)
    series.register(metrics.NodeVmCollector(node_name, node_agent.vms))
    _run_kopf(registry, liveness=_liveness(health_port, health_address))


@app.command()
def crds(
    out: Annotated[Path, typer.Option(help="Output directory")] = Path("crds"),
    check: Annotated[bool, typer.Option(help="Fail if the files differ instead of writing")] = False,
) -> None:
    """Generate the CRD YAML from the pydantic models."""
    from hyperfleet.reconcilers import crdgen, kinds

    if check:
        stale = [
            k.plural for k in kinds.ALL_KINDS
            if not (out / f"{k.plural}.hyperfleet.dev.yaml").exists()
            or (out / f"{k.plural}.hyperfleet.dev.yaml").read_text() != crdgen.render(k)
        ]
        if stale:
            typer.echo(f"out of date: {', '.join(stale)}; run `hyperfleet crds`", err=True)
            raise typer.Exit(1)
        return
    for p in crdgen.write_all(kinds.ALL_KINDS, out):
        typer.echo(str(p))


# Registered last, so `hyperfleet --help` lists it after the process commands.
demo.register(app)


def main() -> None:
    app()


__all__ = ["app", "load_kubeconfig", "main"]


if __name__ == "__main__":
    main()
