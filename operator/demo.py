"""`hyperfleet demo`: the command only. What it runs (the local stack, the sample fleet) is dev
tooling, ``hyperfleet.reconcilers.testing.demo``; this is the one product module allowed to
import that package (import-linter, pyproject.toml)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its state")] = Path(".demo"),
    nodes: Annotated[int, typer.Option(help="Simulated worker nodes")] = 2,
    keep: Annotated[bool | None, typer.Option(help="Keep running after convergence "
                                              "(default: only on a terminal)")] = None,
    kubeconfig: Annotated[Path | None, typer.Option(
        help="Run against this existing cluster instead of a local API server")] = None,
) -> None:
    """Local stack: API server, CRDs, controller, agents, sample VMs from a Git push.

    The agents drive the real cloud-hypervisor where this machine can run it (and says
    so), the CH double otherwise."""
    # Here, not at the top: no other command loads the test tooling.
    from hyperfleet.reconcilers.testing.demo import run_demo

    if kubeconfig is not None and not kubeconfig.is_file():
        typer.echo(f"error: --kubeconfig {kubeconfig}: no such file", err=True)
        raise typer.Exit(2)
    sys.exit(run_demo(workdir.resolve(), nodes, sys.stdin.isatty() if keep is None else keep,
                      kubeconfig))
