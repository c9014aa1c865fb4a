"""`hyperfleet job ...`: write, check, submit and follow VmJobs from a terminal."""

from __future__ import annotations

import difflib
import json
import os
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from hyperfleet.reconcilers.conventions import CONDITION_FAILED
from hyperfleet.reconcilers.jobs.builder import JobBuilder, to_manifest
from hyperfleet.reconcilers.jobs.parse import JobValidationError, from_manifest
from hyperfleet.reconcilers.jobs.registry import REGISTRY

from .clicommon import (
    KUBECONFIG,
    NAMESPACE,
    CliError,
    ExitCode,
    connect,
    context_namespace,
    fail,
    one_line_errors,
    read_yaml_file,
)

if TYPE_CHECKING:
    from hyperfleet.reconcilers.kube import Kube

app = typer.Typer(no_args_is_help=True, help="VmJob documents: create, validate, submit, follow.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

KubeconfigOpt = Annotated[str | None, KUBECONFIG]
NamespaceOpt = Annotated[str | None, NAMESPACE]
#: Phases after which a job never runs again, and which of them are a success.
TERMINAL = ("Succeeded", "Failed", "Cancelled", "TimedOut")


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


def check_set_keys(operation: str, keys: list[str]) -> None:
    """Refuse a --set key the operation's payload model does not have: the models keep
    unknown fields (forward compatibility), so a typo would otherwise be sent silently."""
    spec = REGISTRY.latest(operation)
    if spec is None:
        return  # an unknown operation: the builder says so, naming the known ones
    fields = spec.model.model_fields
    valid = sorted(info.alias or name for name, info in fields.items())
    accepted = set(valid) | set(fields)
    for key in keys:
        if key in accepted:
            continue
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise CliError(f"--set {key}: {spec.type_name} has no field {key!r}; {hint}valid fields: "
                       f"{', '.join(valid) or '(none)'}", ExitCode.USAGE)


@app.command()
def create(
    operation: Annotated[str, typer.Argument(help="e.g. vm.snapshot, vm.resize, vm.migrate")],
    target: Annotated[str | None, typer.Option(help="Target VirtualMachine name")] = None,
    namespace: NamespaceOpt = None,
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
    # Offline, so the kubeconfig is read only for its namespace, never loaded.
    namespace = namespace or context_namespace(os.environ.get("KUBECONFIG") or None)
    b = JobBuilder(operation)
    data: dict[str, Any] = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            err.print(Text.assemble((f"--set {item!r}", "red"),
                                    ": use key=value, e.g. --set desiredCpus=4"))
            raise typer.Exit(2)
        data[key] = _value(key, value)
    try:
        check_set_keys(operation, list(data))
    except CliError as exc:
        fail(str(exc), exc.code)
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


def _load(path: str) -> list[Any]:
    """The documents of a file (``-``: stdin); a missing file, broken YAML or an alias bomb
    is one line and exit 2."""
    try:
        return read_yaml_file(path)
    except CliError as exc:
        fail(str(exc), exc.code)


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


def create_jobs(kube: Kube, docs: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Create each VmJob in order, printing kubectl's line for each; the first refusal stops
    (a second submit of the same file names the job that exists, and how to see it)."""
    from kubernetes.client.exceptions import ApiException

    from hyperfleet.reconcilers.kube import JOBS

    created = []
    for doc in docs:
        meta = doc.get("metadata") or {}
        name, ns = meta.get("name"), meta.get("namespace") or "default"
        try:
            body = kube.create(JOBS, dict(doc))
        except ApiException as exc:
            if exc.status == 409:
                raise CliError(f"vmjob {ns}/{name} already exists (a VmJob runs once; submit "
                               f"it again under another name): see it with `hyperfleet job "
                               f"status {name} -n {ns}`") from None
            raise
        m = body["metadata"]
        out.print(f"vmjob.hyperfleet.dev/{m['name']} created in {m['namespace']}")
        created.append(body)
    return created


@app.command()
@one_line_errors
def submit(
    file: Annotated[str, typer.Argument(help="YAML file (- for stdin)")],
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
) -> None:
    """Validate, then create every VmJob in the file (in its metadata.namespace, else -n,
    else the context's)."""
    docs = _load(file)
    for i, doc in enumerate(docs):
        try:
            from_manifest(doc)
        except JobValidationError as exc:
            _fail(exc, f"{file} document {i + 1}")
    kube, ns = connect(kubeconfig, namespace)
    for i, doc in enumerate(docs):
        meta = doc.setdefault("metadata", {})
        if namespace and meta.get("namespace") not in (None, namespace):
            # As kubectl: a file saying one namespace and a flag another is a mistake.
            fail(f"{file} document {i + 1}: metadata.namespace is {meta['namespace']!r} but -n "
                 f"says {namespace!r}; drop one", ExitCode.USAGE)
        meta.setdefault("namespace", ns)
    create_jobs(kube, docs)


def job_outcome(body: Mapping[str, Any]) -> tuple[str, str]:
    """(phase, one-line reason) of a VmJob: its lastError, reason or Failed condition."""
    st = body.get("status") or {}
    phase = str(st.get("phase") or "Pending")
    failed: Mapping[str, Any] = next(
        (c for c in st.get("conditions") or [] if c.get("type") == CONDITION_FAILED), {})
    why = st.get("lastError") or failed.get("message") or st.get("reason") or ""
    return phase, " ".join(str(why).split())


def wait_job(kube: Kube, name: str, namespace: str, timeout: float,
             poll: float = 0.5) -> dict[str, Any]:
    """Poll until the job is terminal; CliError (exit 1) when it did not succeed or time
    ran out, saying its phase and why."""
    from hyperfleet.reconcilers.kube import JOBS

    deadline = time.monotonic() + timeout
    while True:
        body = kube.get(JOBS, name, namespace)
        if body is None:
            raise CliError(f"vmjob {namespace}/{name} was deleted while waiting",
                           ExitCode.NOT_FOUND)
        phase, why = job_outcome(body)
        if phase == "Succeeded":
            return body
        if phase in TERMINAL:
            raise CliError(f"vmjob {namespace}/{name} {phase}" + (f": {why}" if why else ""))
        if time.monotonic() >= deadline:
            raise CliError(f"timed out after {timeout:g}s waiting for vmjob {namespace}/{name}: "
                           f"still {phase}" + (f" ({why})" if why else ""))
        time.sleep(poll)


@app.command()
@one_line_errors
def status(
    name: Annotated[str, typer.Argument(help="VmJob name")],
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    wait: Annotated[bool, typer.Option(help="Wait until the job has finished")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds --wait waits")] = 300.0,
) -> None:
    """Phase, node, progress, result and errors of one VmJob; exit 1 when it ended without
    succeeding (Failed, TimedOut, Cancelled), 4 when there is no such job."""
    from hyperfleet.reconcilers.kube import JOBS

    kube, ns = connect(kubeconfig, namespace)
    body = kube.get(JOBS, name, ns)
    if body is None:
        fail(f"vmjob {ns}/{name} not found (list them with `hyperfleet get jobs -n {ns}`)",
             ExitCode.NOT_FOUND)
    if wait:
        try:
            body = wait_job(kube, name, ns, timeout)
        except CliError:
            body = kube.get(JOBS, name, ns) or body
    st = body.get("status") or {}
    spec = body["spec"]
    out.print(f"[bold]{escape(name)}[/bold] {escape(str(spec['operation']))} "
              f"({escape(str(spec['payload']['type']))})")
    out.print(f"  phase:    {st.get('phase', 'Pending')}  reason: {st.get('reason', '-')}")
    out.print(f"  node:     {st.get('assignedNode', '-')}  attempts: {st.get('attempts', 0)}")
    progress = st.get("progress") or {}
    if progress:
        out.print(f"  progress: {progress.get('percent', 0)}% {escape(str(progress.get('message', '')))}")
    if st.get("lastError"):
        out.print(f"  error:    [red]{escape(str(st['lastError']))}[/red]")
    if st.get("result") is not None:
        out.print(f"  result:   {escape(json.dumps(st['result']))}")
    phase, why = job_outcome(body)
    if phase in TERMINAL and phase != "Succeeded":
        fail(f"vmjob {ns}/{name} {phase}" + (f": {why}" if why else ""))
    if wait and phase not in TERMINAL:
        fail(f"timed out after {timeout:g}s waiting for vmjob {ns}/{name}: still {phase}")


@app.command("list")
@one_line_errors
def list_(namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None) -> None:
    """VmJobs in a namespace, highest priority first."""
    from hyperfleet.reconcilers.kube import JOBS

    kube, ns = connect(kubeconfig, namespace)
    items = kube.list(JOBS, ns)
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


__all__ = ["TERMINAL", "app", "check_set_keys", "create_jobs", "job_outcome", "wait_job"]
