"""`hyperfleet job ...`: write, check, submit and follow VmJobs from a terminal."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from hyperfleet.reconcilers.jobs.protocol import (
    JobBuilder,
    JobValidationError,
    from_manifest,
    to_manifest,
)

app = typer.Typer(no_args_is_help=True, help="VmJob documents: create, validate, submit, follow.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

NamespaceOpt = Annotated[str, typer.Option("--namespace", "-n", help="Namespace of the VmJob")]
KubeconfigOpt = Annotated[str | None, typer.Option(envvar="KUBECONFIG", help="kubeconfig")]


def _fail(exc: JobValidationError, where: str = "") -> None:
    err.print(f"[red]invalid VmJob{' in ' + escape(where) if where else ''}:[/red]")
    for path, message in exc.errors:
        err.print(f"  [bold]{escape(path or '(document)')}[/bold]: {escape(message)}")
    raise typer.Exit(2)


def _value(key: str, text: str) -> Any:
    """`4` -> 4, `true` -> True, `[a, b]` -> list; anything else stays a string.

    Values are YAML so lists and numbers can be typed; broken YAML is the user's typo,
    reported against its --set key rather than as a parser traceback.
    """
    if not text:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        err.print(Text.assemble((f"--set {key}", "red"), (
            f": {text!r} is not a valid YAML value ({problem}); fix it, or quote it to pass "
            f"it as a string, e.g. --set '{key}=\"...\"'")))
        raise typer.Exit(2) from None


@app.command()
def create(
    operation: Annotated[str, typer.Argument(help="e.g. vm.snapshot, vm.resize, vm.migrate")],
    target: Annotated[str | None, typer.Option(help="Target VirtualMachine name")] = None,
    namespace: NamespaceOpt = "default",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Payload field, camelCase key=value (repeatable)")] = None,
    priority: Annotated[int | None, typer.Option(help="0-10, higher runs first")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Same key, same result")] = None,
    require: Annotated[list[str] | None, typer.Option(help="Required capability")] = None,
    timeout: Annotated[int | None, typer.Option(help="Seconds per attempt")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts before Failed")] = None,
    pool: Annotated[str | None, typer.Option(help="Worker pool")] = None,
    node: Annotated[list[str] | None, typer.Option(help="Allowed node (affinity)")] = None,
    reason: Annotated[str | None, typer.Option(help="Audit: why")] = None,
    submitted_by: Annotated[str | None, typer.Option(help="Audit: who")] = None,
    name: Annotated[str | None, typer.Option(help="Object name (default: the jobId)")] = None,
    output: Annotated[str, typer.Option("-o", help="yaml or json")] = "yaml",
) -> None:
    """Print a complete, validated VmJob manifest (pipe it to kubectl or `job submit -`)."""
    b = JobBuilder(operation)
    data: dict[str, Any] = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            err.print(Text.assemble((f"--set {item!r}", "red"),
                                    ": use key=value, e.g. --set desiredCpus=4"))
            raise typer.Exit(2)
        data[key] = _value(key, value)
    if data:
        b.payload_data(data)
    if target:
        b.target(target, namespace=namespace)
    if priority is not None:
        b.priority(priority)
    if idempotency_key:
        b.idempotency_key(idempotency_key)
    if require:
        b.require(*require)
    if timeout is not None:
        b.timeout(timeout)
    if max_attempts is not None:
        b.max_attempts(max_attempts)
    if pool:
        b.worker_pool(pool)
    if node:
        b.affinity(node)
    if submitted_by or reason:
        b.submitted_by(submitted_by or "hyperfleet-cli", reason=reason)
    try:
        job = b.build(now=datetime.now(UTC))
    except JobValidationError as exc:
        _fail(exc)
        return
    manifest = to_manifest(job, name=name, namespace=namespace)
    if output == "json":
        out.print_json(json.dumps(manifest))
    else:
        sys.stdout.write(yaml.safe_dump(manifest, sort_keys=False))


def _load(path: str) -> list[dict[str, Any]]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        err.print(f"[red]{path}: not valid YAML[/red]: {exc}")
        raise typer.Exit(2) from None
    return docs


@app.command()
def validate(file: Annotated[str, typer.Argument(help="YAML file (- for stdin)")]) -> None:
    """Check every VmJob in a file against the protocol; exit 2 naming each bad field."""
    docs = _load(file)
    for i, doc in enumerate(docs):
        try:
            job = from_manifest(doc)
        except JobValidationError as exc:
            _fail(exc, f"{file} document {i + 1}")
            return
        out.print(f"[green]ok[/green] {file} document {i + 1}: {job.operation} "
                  f"({job.payload.type})")


@app.command()
def submit(
    file: Annotated[str, typer.Argument(help="YAML file (- for stdin)")],
    kubeconfig: KubeconfigOpt = None,
) -> None:
    """Validate, then create every VmJob in the file."""
    from hyperfleet.reconcilers.kube import JOBS, Kube

    from .cli import load_kubeconfig

    docs = _load(file)
    for i, doc in enumerate(docs):
        try:
            from_manifest(doc)
        except JobValidationError as exc:
            _fail(exc, f"{file} document {i + 1}")
    load_kubeconfig(kubeconfig)
    kube = Kube()
    for doc in docs:
        created = kube.create(JOBS, doc)
        meta = created["metadata"]
        out.print(f"vmjob.hyperfleet.dev/{meta['name']} created in {meta['namespace']}")


@app.command()
def status(
    name: Annotated[str, typer.Argument(help="VmJob name")],
    namespace: NamespaceOpt = "default",
    kubeconfig: KubeconfigOpt = None,
) -> None:
    """Phase, node, progress, result and errors of one VmJob."""
    from hyperfleet.reconcilers.kube import JOBS, Kube

    from .cli import load_kubeconfig

    load_kubeconfig(kubeconfig)
    body = Kube().get(JOBS, name, namespace)
    if body is None:
        err.print(f"[red]vmjob {namespace}/{name} not found[/red]")
        raise typer.Exit(1)
    st = body.get("status") or {}
    spec = body["spec"]
    out.print(f"[bold]{name}[/bold] {spec['operation']} ({spec['payload']['type']})")
    out.print(f"  phase:    {st.get('phase', 'Pending')}  reason: {st.get('reason', '-')}")
    out.print(f"  node:     {st.get('assignedNode', '-')}  attempts: {st.get('attempts', 0)}")
    progress = st.get("progress") or {}
    if progress:
        out.print(f"  progress: {progress.get('percent', 0)}% {progress.get('message', '')}")
    if st.get("lastError"):
        out.print(f"  error:    [red]{st['lastError']}[/red]")
    if st.get("result") is not None:
        out.print(f"  result:   {json.dumps(st['result'])}")


@app.command("list")
def list_(namespace: NamespaceOpt = "default", kubeconfig: KubeconfigOpt = None) -> None:
    """VmJobs in a namespace, highest priority first."""
    from hyperfleet.reconcilers.kube import JOBS, Kube

    from .cli import load_kubeconfig

    load_kubeconfig(kubeconfig)
    items = Kube().list(JOBS, namespace)
    table = Table("NAME", "OPERATION", "PHASE", "NODE", "PRIORITY", "ATTEMPTS")
    items.sort(key=lambda b: (-((b["spec"].get("execution") or {}).get("priority", 5)),
                              b["metadata"]["name"]))
    for b in items:
        st = b.get("status") or {}
        table.add_row(b["metadata"]["name"], b["spec"]["operation"], st.get("phase", "Pending"),
                      st.get("assignedNode", ""),
                      str((b["spec"].get("execution") or {}).get("priority", 5)),
                      str(st.get("attempts", 0)))
    out.print(table)
