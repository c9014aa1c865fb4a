"""virtctl-class verbs: power a VM on and off, pause, restart, migrate it; list the fleet;
nudge, suspend and resume GitSources.

Power verbs change ``spec.powerState`` (the agent converges on it, so the change survives
restarts of everything); restart and migrate are VmJobs (one-off operations, with retries,
timeouts and an audit trail). ``--wait`` follows status until the VM or job got there.
"""

from __future__ import annotations

import getpass
import io
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
import yaml
from rich.console import Console
from rich.table import Table

from hyperfleet.reconcilers.conventions import (
    CONDITION_FAILURE,
    CONDITION_READY,
    CONDITION_RECONCILING,
    REASON_PROGRESSING,
)

from .clicommon import (
    KUBECONFIG,
    NAMESPACE,
    CliError,
    ExitCode,
    connect,
    fail,
    one_line_errors,
    warn,
)
from .jobcli import create_jobs, wait_job

if TYPE_CHECKING:
    from hyperfleet.reconcilers.crdgen import CrdKind
    from hyperfleet.reconcilers.kube import Kube, Resource

out = Console(soft_wrap=True, highlight=False)

KubeconfigOpt = Annotated[str | None, KUBECONFIG]
NamespaceOpt = Annotated[str | None, NAMESPACE]
WaitOpt = Annotated[bool, typer.Option(
    help="Wait until the VM reached the state (or the job finished); exit 1 if it failed or "
    "--timeout passed")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds --wait waits")]
NameArg = Annotated[str, typer.Argument(help="VirtualMachine name")]

POWER_PANEL = "VirtualMachines"
VIEW_PANEL = "Inspect"
GITOPS_PANEL = "GitOps"


# ----------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Kind:
    """A kind as `get` knows it: its API resource, its CRD (printer columns), its names."""

    singular: str
    resource: Resource
    crd: CrdKind
    aliases: tuple[str, ...]


def kinds() -> list[Kind]:
    from hyperfleet.reconcilers import kinds as k
    from hyperfleet.reconcilers.gitops.crd import GIT_SOURCE
    from hyperfleet.reconcilers.kube import Resource

    def kind(crd: CrdKind, *cli_words: str) -> Kind:
        # CLI words first (the usage error shows the second), then kubectl's names.
        words = (*cli_words, *crd.short_names, crd.singular, crd.plural)
        return Kind(crd.singular, Resource.of(crd.identity), crd, tuple(dict.fromkeys(words)))

    return [kind(k.VIRTUAL_MACHINE, "vm", "vms"), kind(k.WORKER_NODE, "node", "nodes"),
            kind(k.VM_JOB, "job", "jobs"), kind(GIT_SOURCE)]


def resolve_kind(word: str) -> Kind:
    """The kind a user typed (kubectl's plural, singular or short name), or a usage error
    listing the accepted words."""
    for kind in kinds():
        if word.lower() in kind.aliases:
            return kind
    valid = ", ".join(k.aliases[1] for k in kinds())
    raise CliError(f"unknown kind {word!r}: use one of {valid}", ExitCode.USAGE)


def gitsource_kind() -> Kind:
    return resolve_kind("gitsource")


# ----------------------------------------------------------------------- output


def column_value(body: Mapping[str, Any], path: str) -> Any:
    """Evaluate a CRD printer column's JSONPath: dotted fields, plus the one filter form
    the CRDs use, ``[?(@.type=="Ready")]`` (kubectl's full JSONPath is not needed)."""
    cur: Any = body
    rest = path.lstrip(".")
    while rest and cur is not None:
        if rest.startswith("[?(@."):
            end = rest.index(")]")
            field, _, want = rest[5:end].partition("==")
            want = want.strip().strip("\"'")
            items = cur if isinstance(cur, list) else []
            cur = next((i for i in items if isinstance(i, Mapping)
                        and str(i.get(field.strip())) == want), None)
            rest = rest[end + 2:].lstrip(".")
            continue
        key, dot, tail = rest.partition(".")
        if "[" in key:
            key, bracket, more = key.partition("[")
            tail = bracket + more + (dot + tail if dot else "")
        cur = cur.get(key) if isinstance(cur, Mapping) else None
        rest = tail
    return cur


def show(value: Any) -> str:
    """A cell as kubectl prints it: booleans lowercase, nothing for missing values."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def age(timestamp: str | None, now: datetime) -> str:
    """kubectl's AGE (its HumanDuration): 42s, 2m30s, 65m, 4h1m, 30h, 3d5h, 20d, 2y70d."""
    if not timestamp:
        return ""
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return ""
    s = max(0, int((now - then).total_seconds()))
    m, h, d = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if h < 192:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if d < 730:
        return f"{d}d"
    y = d // 365
    return f"{y}y{d % 365}d" if d % 365 else f"{y}y"


def table_rows(kind: Kind, items: Sequence[Mapping[str, Any]], *, wide: bool,
               all_namespaces: bool, now: datetime) -> tuple[list[str], list[list[str]]]:
    """Header and rows as `kubectl get` prints them for this CRD (its printer columns;
    priority 1 ones only with ``wide``), with NAMESPACE first under -A and AGE last."""
    columns = [c for c in kind.crd.columns if wide or not c.get("priority")]
    ns_col = all_namespaces and kind.resource.namespaced
    header = (["NAMESPACE"] if ns_col else []) + ["NAME"] + \
        [str(c["name"]).upper() for c in columns] + ["AGE"]
    rows = []
    for body in items:
        meta = body.get("metadata") or {}
        row = ([str(meta.get("namespace") or "")] if ns_col else []) + [str(meta.get("name"))]
        row += [show(column_value(body, str(c["jsonPath"]))) for c in columns]
        row.append(age(meta.get("creationTimestamp"), now))
        rows.append(row)
    return header, rows


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns separated by three spaces, no borders, never wrapped or cut: what scripts
    and `column`/`awk` expect from kubectl, whatever the terminal width."""
    table = Table(*header, box=None, pad_edge=False, padding=(0, 3, 0, 0), show_edge=False,
                  header_style="", highlight=False)
    for row in rows:
        table.add_row(*row)
    buf = io.StringIO()
    Console(file=buf, width=100_000, color_system=None, highlight=False).print(table)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def render(kind: Kind, items: list[dict[str, Any]], output: str, *, single: bool,
           all_namespaces: bool, now: datetime | None = None) -> str:
    """What `get` prints for ``items`` in ``output`` format (json/yaml: the objects as the
    API server returns them; a list is a kubectl-style ``List``)."""
    if output in ("json", "yaml"):
        doc: Any = items[0] if single else {
            "apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}}
        if output == "json":
            return json.dumps(doc, indent=4) + "\n"
        return str(yaml.safe_dump(doc, sort_keys=False))
    header, rows = table_rows(kind, items, wide=output == "wide", all_namespaces=all_namespaces,
                              now=now or datetime.now(UTC))
    return render_table(header, rows)


OutputOpt = Annotated[Literal["table", "wide", "json", "yaml"], typer.Option(
    "--output", "-o", help="table, wide (more columns), json or yaml")]


@one_line_errors
def get(
    kind: Annotated[str, typer.Argument(help="vms (hvm), nodes (wn), jobs or gitsources (gs)")],
    name: Annotated[str | None, typer.Argument(help="One object (default: all)")] = None,
    output: OutputOpt = "table",
    all_namespaces: Annotated[bool, typer.Option(
        "--all-namespaces", "-A", help="Every namespace")] = False,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    watch: Annotated[bool, typer.Option(
        "--watch", "-w", help="After the list, print each change as it happens (Ctrl-C stops)")
    ] = False,
    watch_timeout: Annotated[float | None, typer.Option(
        help="Stop watching after this many seconds (default: until Ctrl-C)")] = None,
) -> None:
    """List VMs, worker nodes, VmJobs or GitSources, or show one (kubectl get's columns)."""
    k = resolve_kind(kind)
    if name and all_namespaces:
        fail("a name and -A do not go together: name the namespace with -n", ExitCode.USAGE)
    kube, ns = connect(kubeconfig, namespace)
    scope = None if all_namespaces or not k.resource.namespaced else ns
    if name:
        body = kube.get(k.resource, name, scope)
        if body is None:
            where = f"{ns}/" if k.resource.namespaced else ""
            fail(f"{k.singular} {where}{name} not found", ExitCode.NOT_FOUND)
        items, since = [body], str(body["metadata"]["resourceVersion"])
    else:
        items, since = kube.snapshot(k.resource, scope)
        items.sort(key=lambda b: (b["metadata"].get("namespace") or "", b["metadata"]["name"]))
        if not items and output in ("table", "wide"):
            where = f" in {ns} namespace" if scope else ""
            typer.echo(f"No {k.crd.plural} found{where}.", err=True)
            if not watch:
                return
    if items:
        sys.stdout.write(render(k, items, output, single=bool(name),
                                all_namespaces=all_namespaces))
        sys.stdout.flush()
    if watch:
        watch_changes(kube, k, scope, name, since, output, all_namespaces, watch_timeout)


def watch_changes(kube: Kube, k: Kind, scope: str | None, name: str | None, since: str,
                  output: str, all_namespaces: bool, timeout: float | None) -> None:
    """`kubectl get -w`: one more row (or object) per change after ``since``, until Ctrl-C
    or ``timeout``. A watch the API server expires (410) resumes from a fresh list."""
    from kubernetes import watch as k8s_watch
    from kubernetes.client.exceptions import ApiException

    from hyperfleet.reconcilers.conventions import GROUP, VERSION

    api = kube.api
    fn = api.list_namespaced_custom_object if scope else api.list_cluster_custom_object
    args = (GROUP, VERSION, scope, k.resource.plural) if scope else \
        (GROUP, VERSION, k.resource.plural)
    selector = {"field_selector": f"metadata.name={name}"} if name else {}
    deadline = None if timeout is None else time.monotonic() + timeout
    w: Any = k8s_watch.Watch()  # type: ignore[no-untyped-call]
    try:
        while deadline is None or time.monotonic() < deadline:
            left = 300.0 if deadline is None else min(300.0, deadline - time.monotonic())
            try:
                for ev in w.stream(fn, *args, resource_version=since,
                                   timeout_seconds=max(1, int(left)), **selector):
                    obj = ev["object"]
                    since = obj["metadata"]["resourceVersion"]
                    text = render(k, [obj], output, single=True, all_namespaces=all_namespaces)
                    if output in ("table", "wide"):
                        text = text.split("\n", 1)[1]  # the row only, as kubectl get -w
                    sys.stdout.write(text)
                    sys.stdout.flush()
                    if deadline is not None and time.monotonic() >= deadline:
                        return
            except ApiException as exc:
                if exc.status != 410:
                    raise
                since = kube.snapshot(k.resource, scope)[1]  # expired: carry on from now
    except KeyboardInterrupt:
        return


# ----------------------------------------------------------------------- GitOps ownership


def git_reverts(vm: Mapping[str, Any], fields: Sequence[str]) -> str | None:
    """The GitSource ("<namespace>/<name>") that will set ``spec.<field>`` back, or None.

    A GitSource applies with server-side apply, so the live object's managedFields say which
    spec fields Git sets: only those are reverted (drift correction); a VM whose Git
    manifest leaves powerState out keeps whatever is patched here. Without managedFields
    (stripped by a tool) a GitSource-labelled VM is assumed to be reverted."""
    from hyperfleet.reconcilers.gitops.types import FIELD_MANAGER, OWNER_LABEL, SOURCE_ANNOTATION

    meta = vm.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(OWNER_LABEL)
    if not owner:
        return None
    source = str((meta.get("annotations") or {}).get(SOURCE_ANNOTATION) or owner)
    entries = [m for m in meta.get("managedFields") or [] if m.get("manager") == FIELD_MANAGER]
    if not entries:
        return source
    for entry in entries:
        spec = ((entry.get("fieldsV1") or {}).get("f:spec")) or {}
        if any(f"f:{f}" in spec for f in fields):
            return source
    return None


def warn_if_reverted(kube: Kube, vm: Mapping[str, Any], fields: Sequence[str]) -> None:
    """One line when GitOps will undo this change at its next reconcile."""
    source = git_reverts(vm, fields)
    if source is None:
        return
    # "<namespace>/<name>" from the annotation, else the label's "<namespace>.<name>"
    # (a namespace is a DNS label: its first dot ends it).
    gs_ns, _, gs_name = source.partition("/") if "/" in source else source.partition(".")
    meta = vm["metadata"]
    gs = kube.get(gitsource_kind().resource, gs_name, gs_ns or meta.get("namespace"))
    suspended = bool(((gs or {}).get("spec") or {}).get("suspend"))
    when = "when it is resumed (it is suspended now)" if suspended else "at its next reconcile"
    warn(f"virtualmachine {meta.get('namespace')}/{meta['name']} is managed by GitSource "
         f"{source}, whose Git sets spec.{'/'.join(fields)}: it reverts this {when}; change "
         f"it in Git, or `hyperfleet suspend gitsource {gs_name} -n {gs_ns}` first")


# ----------------------------------------------------------------------- power verbs


@dataclass(frozen=True)
class PowerVerb:
    """A verb that sets spec.powerState; ``allowed_from``: the powerStates it acts on
    (None: any), so that e.g. `unpause` never boots a stopped VM."""

    verb: str
    target: str  # the powerState it sets
    allowed_from: tuple[str, ...] | None
    help: str


POWER_VERBS = {
    v.verb: v for v in (
        PowerVerb("start", "Running", None, "Start a VM (powerState Running)"),
        PowerVerb("stop", "Stopped", None, "Shut a VM down (powerState Stopped)"),
        PowerVerb("pause", "Paused", ("Running",), "Pause a running VM's vCPUs (powerState Paused)"),
        PowerVerb("unpause", "Running", ("Paused",), "Resume a paused VM (powerState Running)"),
        PowerVerb("sleep", "Sleeping", ("Running", "Paused"),
                  "Snapshot a VM to disk and stop its VMM (powerState Sleeping)"),
        PowerVerb("wake", "Running", ("Sleeping",), "Restore a sleeping VM (powerState Running)"),
    )
}

#: The phase a VM reports once it reached each powerState.
PHASE_FOR = {"Running": "Running", "Stopped": "Stopped", "Paused": "Paused", "Sleeping": "Sleeping"}


def power_patches(verb: PowerVerb, vm: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The merge patches, in order, that make ``vm`` do ``verb``; [] when it already says
    so. CliError when the verb does not apply to the VM's current powerState."""
    spec = vm.get("spec") or {}
    status = vm.get("status") or {}
    meta = vm.get("metadata") or {}
    current = spec.get("powerState") or "Running"
    strategy = spec.get("runStrategy") or "Always"
    name = meta.get("name")
    if verb.allowed_from is not None and current not in verb.allowed_from and \
            current != verb.target:
        hint = {"Stopped": "start it", "Sleeping": "wake it", "Paused": "unpause it"}.get(current)
        raise CliError(f"virtualmachine {name} has powerState {current}, so `{verb.verb}` does "
                       f"not apply" + (f"; {hint} instead" if hint else ""))
    patch: dict[str, Any] = {}
    if current != verb.target:
        patch["powerState"] = verb.target
    if verb.target == "Running" and strategy == "Halted":
        # runStrategy Halted keeps a VM off whatever powerState says (as in KubeVirt,
        # starting it means leaving Halted).
        patch["runStrategy"] = "Always"
    if not patch:
        halted = status.get("haltedGeneration")
        if verb.target == "Running" and strategy == "Manual" and halted is not None \
                and halted == meta.get("generation"):
            # Manual: the guest shut itself down and stays off until the spec changes, so
            # step through Stopped to give the agent a new generation to act on.
            return [{"spec": {"powerState": "Stopped"}}, {"spec": {"powerState": "Running"}}]
        return []
    return [{"spec": patch}]


def vm_settled(vm: Mapping[str, Any], target: str, generation: int) -> tuple[bool, str | None]:
    """(done, failure) for a VM asked for powerState ``target`` at ``generation``: done once
    the agent observed that generation and reports the phase; a failure is the agent's
    Failure condition (or Failed phase) at or after it."""
    st = vm.get("status") or {}
    if target == "Stopped" and not st.get("nodeName"):
        return True, None  # placed nowhere, so nothing runs it (no agent will say Stopped)
    seen = st.get("observedGeneration")
    if seen is None or int(seen) < generation:
        return False, None
    if st.get("phase") == PHASE_FOR[target]:
        return True, None
    conds = {c.get("type"): c for c in st.get("conditions") or []}
    failure = conds.get(CONDITION_FAILURE) or {}
    if st.get("phase") == "Failed" or failure.get("status") == "True":
        why = failure.get("message") or st.get("message") or "the agent reported phase Failed"
        return False, f"{failure.get('reason') or 'Failed'}: {' '.join(str(why).split())}"
    return False, None


def describe_vm_status(vm: Mapping[str, Any]) -> str:
    """Phase and the Ready condition's reason/message, for a timeout message."""
    st = vm.get("status") or {}
    ready = {c.get("type"): c for c in st.get("conditions") or []}.get(CONDITION_READY) or {}
    why = ready.get("message") or st.get("message") or ""
    text = f"phase {st.get('phase') or 'Pending'}"
    if ready:
        text += f", Ready {ready.get('status')} ({ready.get('reason')}"
        text += f": {' '.join(str(why).split())})" if why else ")"
    elif why:
        text += f" ({' '.join(str(why).split())})"
    return text


def wait_vm(kube: Kube, name: str, ns: str, target: str, generation: int, timeout: float,
            poll: float = 0.5) -> dict[str, Any]:
    from hyperfleet.reconcilers.kube import VMS

    deadline = time.monotonic() + timeout
    while True:
        vm = kube.get(VMS, name, ns)
        if vm is None:
            raise CliError(f"virtualmachine {ns}/{name} was deleted while waiting",
                           ExitCode.NOT_FOUND)
        done, failure = vm_settled(vm, target, generation)
        if done:
            return vm
        if failure:
            raise CliError(f"virtualmachine {ns}/{name} did not reach {target}: {failure}")
        if time.monotonic() >= deadline:
            raise CliError(f"timed out after {timeout:g}s waiting for virtualmachine {ns}/{name} "
                           f"to be {PHASE_FOR[target]}: {describe_vm_status(vm)}")
        time.sleep(poll)


def get_vm(kube: Kube, name: str, ns: str) -> dict[str, Any]:
    from hyperfleet.reconcilers.kube import VMS

    vm = kube.get(VMS, name, ns)
    if vm is None:
        raise CliError(f"virtualmachine {ns}/{name} not found (list them with `hyperfleet get "
                       f"vms -n {ns}`)", ExitCode.NOT_FOUND)
    return vm


def run_power_verb(verb: PowerVerb, name: str, namespace: str | None, kubeconfig: str | None,
                   wait: bool, timeout: float) -> None:
    from hyperfleet.reconcilers.kube import VMS

    kube, ns = connect(kubeconfig, namespace)
    vm = get_vm(kube, name, ns)
    patches = power_patches(verb, vm)
    generation = int(vm["metadata"].get("generation") or 0)
    if not patches:
        out.print(f"virtualmachine.hyperfleet.dev/{name}: powerState is already {verb.target}")
    else:
        warn_if_reverted(kube, vm, sorted({k for p in patches for k in p["spec"]}))
        for patch in patches:
            vm = kube.patch(VMS, name, patch, ns)
        generation = int(vm["metadata"].get("generation") or 0)
        extra = " (runStrategy Halted -> Always)" if any(
            "runStrategy" in p["spec"] for p in patches) else ""
        out.print(f"virtualmachine.hyperfleet.dev/{name}: powerState {verb.target}{extra}")
    if wait:
        wait_vm(kube, name, ns, verb.target, generation, timeout)
        out.print(f"virtualmachine.hyperfleet.dev/{name} is {PHASE_FOR[verb.target]}")


def power_command(verb: PowerVerb) -> Callable[..., None]:
    """A typer command for one power verb (the same function serves `vm X` and `X`)."""

    @one_line_errors
    def command(name: NameArg, namespace: NamespaceOpt = None, kubeconfig: KubeconfigOpt = None,
                wait: WaitOpt = False, timeout: TimeoutOpt = 300.0) -> None:
        run_power_verb(verb, name, namespace, kubeconfig, wait, timeout)

    command.__doc__ = f"{verb.help}."
    command.__name__ = verb.verb
    return command


# ----------------------------------------------------------------------- job verbs


def submitter() -> str:
    """Who asked, for the job's audit record (the local user; the API server knows the
    authenticated identity)."""
    try:
        return f"{getpass.getuser()} (hyperfleet cli)"
    except (KeyError, OSError):
        return "hyperfleet cli"


def vm_job(operation: str, vm: str, ns: str, data: dict[str, Any], verb: str, *,
           idempotency_key: str | None, reason: str | None,
           now: datetime | None = None) -> dict[str, Any]:
    """A validated VmJob manifest for ``operation`` on ``vm``, named ``<verb>-<vm>-<id>``
    so `get jobs` says what it is; CliError (exit 2) naming a bad field."""
    from hyperfleet.reconcilers.jobs.builder import JobBuilder, to_manifest
    from hyperfleet.reconcilers.jobs.parse import JobValidationError

    b = JobBuilder(operation).payload_data(data).target(vm, namespace=ns)
    b.submitted_by(submitter(), reason=reason or f"hyperfleet {verb} {vm}")
    if idempotency_key:
        b.idempotency_key(idempotency_key)
    try:
        job = b.build(now=now or datetime.now(UTC))
    except JobValidationError as exc:
        raise CliError("; ".join(f"{p or 'job'}: {m}" for p, m in exc.errors), ExitCode.USAGE) from None
    suffix = (job.job_id or "").lower()[-8:]
    name = f"{verb}-{vm}"[: 253 - len(suffix) - 1].rstrip("-.") + f"-{suffix}"
    return to_manifest(job, name=name, namespace=ns)


def run_job_verb(manifest: dict[str, Any], kube: Kube, wait: bool, timeout: float) -> None:
    body = create_jobs(kube, [manifest])[0]
    meta = body["metadata"]
    if not wait:
        out.print(f"follow it with `hyperfleet job status {meta['name']} -n {meta['namespace']}`")
        return
    done = wait_job(kube, meta["name"], meta["namespace"], timeout)
    result = (done.get("status") or {}).get("result")
    out.print(f"vmjob.hyperfleet.dev/{meta['name']} Succeeded"
              + (f": {json.dumps(result)}" if result is not None else ""))


IdemOpt = Annotated[str | None, typer.Option(
    help="Run at most once per key and namespace (a repeat mirrors the first outcome)")]
ReasonOpt = Annotated[str | None, typer.Option(help="Audit: why (recorded in the job)")]


@one_line_errors
def restart(
    name: NameArg,
    hard: Annotated[bool, typer.Option(help="Reset without asking the guest (default: ACPI)")
                    ] = False,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 300.0,
    idempotency_key: IdemOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Reboot a running VM (a vm.reboot VmJob)."""
    kube, ns = connect(kubeconfig, namespace)
    get_vm(kube, name, ns)
    manifest = vm_job("vm.reboot", name, ns, {"mode": "hard" if hard else "soft"}, "restart",
                      idempotency_key=idempotency_key, reason=reason)
    run_job_verb(manifest, kube, wait, timeout)


@one_line_errors
def migrate(
    name: NameArg,
    to: Annotated[str, typer.Option("--to", help="Destination WorkerNode")],
    migration_timeout: Annotated[int | None, typer.Option(
        help="Seconds the migration itself may take (default: the agent's, 300)")] = None,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 300.0,
    idempotency_key: IdemOpt = None,
    reason: ReasonOpt = None,
) -> None:
    """Live-migrate a running VM to another WorkerNode (a vm.migrate VmJob)."""
    from hyperfleet.reconcilers.kube import NODES

    kube, ns = connect(kubeconfig, namespace)
    vm = get_vm(kube, name, ns)
    if kube.get(NODES, to) is None:
        fail(f"workernode {to} not found (list them with `hyperfleet get nodes`)",
             ExitCode.NOT_FOUND)
    if (vm.get("status") or {}).get("nodeName") == to:
        fail(f"virtualmachine {ns}/{name} already runs on {to}", ExitCode.USAGE)
    data: dict[str, Any] = {"destinationNode": to}
    if migration_timeout is not None:
        data["timeoutSeconds"] = migration_timeout
    manifest = vm_job("vm.migrate", name, ns, data, "migrate",
                      idempotency_key=idempotency_key, reason=reason)
    run_job_verb(manifest, kube, wait, timeout)


# ----------------------------------------------------------------------- GitSources

# A Literal (typer builds the choices from it) cannot be computed: hence the pragma.
GitSourceArg = Annotated[Literal["gitsource", "gitsources", "gs"], typer.Argument(  # conventions: ok
    help="gitsource (gs)", metavar="gitsource")]
GitSourceName = Annotated[str, typer.Argument(help="GitSource name")]


def get_gitsource(kube: Kube, name: str, ns: str) -> dict[str, Any]:
    body = kube.get(gitsource_kind().resource, name, ns)
    if body is None:
        raise CliError(f"gitsource {ns}/{name} not found (list them with `hyperfleet get gs -n "
                       f"{ns}`)", ExitCode.NOT_FOUND)
    return body


def reconcile_outcome(gs: Mapping[str, Any], requested: str) -> tuple[bool, str | None]:
    """(handled, failure) of the reconcile requested with annotation value ``requested``:
    handled once status says it took that request and is no longer mid-apply or waiting for
    the applied VMs' health; a failure is the Ready condition's reason and message when that
    run did not succeed."""
    st = gs.get("status") or {}
    if st.get("lastHandledReconcileAt") != requested:
        return False, None
    conds = {c.get("type"): c for c in st.get("conditions") or []}
    if (conds.get(CONDITION_RECONCILING) or {}).get("status") == "True" and \
            (conds.get(CONDITION_RECONCILING) or {}).get("reason") == REASON_PROGRESSING:
        return False, None
    ready = conds.get(CONDITION_READY) or {}
    if ready.get("status") == "True":
        return True, None
    if ready.get("status") == "Unknown":
        return False, None  # applied; a health check still waits for the VMs
    why = " ".join(str(ready.get("message") or st.get("lastError") or "not Ready").split())
    return True, f"{ready.get('reason') or 'NotReady'}: {why}"


@one_line_errors
def reconcile(
    kind: GitSourceArg,
    name: GitSourceName,
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    wait: Annotated[bool, typer.Option(
        help="Wait until the controller handled the request; exit 1 if it did not apply")
    ] = False,
    timeout: TimeoutOpt = 300.0,
) -> None:
    """Fetch and apply a GitSource now instead of at its next interval."""
    from hyperfleet.reconcilers.gitops.types import RECONCILE_NOW_ANNOTATION

    kube, ns = connect(kubeconfig, namespace)
    res = gitsource_kind().resource
    gs = get_gitsource(kube, name, ns)
    if (gs.get("spec") or {}).get("suspend"):
        fail(f"gitsource {ns}/{name} is suspended, so it would not reconcile: resume it first "
             f"(`hyperfleet resume gitsource {name} -n {ns}`)")
    # A fresh value every time: the controller acts on a value it has not handled yet.
    requested = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    kube.patch(res, name, {"metadata": {"annotations": {RECONCILE_NOW_ANNOTATION: requested}}}, ns)
    out.print(f"gitsource.hyperfleet.dev/{name} reconcile requested ({RECONCILE_NOW_ANNOTATION}"
              f"={requested})")
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while True:
        gs = get_gitsource(kube, name, ns)
        handled, failure = reconcile_outcome(gs, requested)
        if failure:
            fail(f"gitsource {ns}/{name} reconciled but did not apply: {failure}")
        if handled:
            st = gs.get("status") or {}
            commit = str(st.get("lastAppliedCommit") or "")[:12]
            out.print(f"gitsource.hyperfleet.dev/{name} reconciled: commit {commit or '-'} applied")
            return
        if time.monotonic() >= deadline:
            fail(f"timed out after {timeout:g}s waiting for gitsource {ns}/{name} to handle the "
                 "request (is the controller running with GitOps on?)")
        time.sleep(0.5)


def set_suspend(name: str, namespace: str | None, kubeconfig: str | None, value: bool) -> None:
    kube, ns = connect(kubeconfig, namespace)
    gs = get_gitsource(kube, name, ns)
    word = "suspended" if value else "resumed"
    if bool((gs.get("spec") or {}).get("suspend")) == value:
        out.print(f"gitsource.hyperfleet.dev/{name} is already {word if value else 'active'}")
        return
    kube.patch(gitsource_kind().resource, name, {"spec": {"suspend": value}}, ns)
    out.print(f"gitsource.hyperfleet.dev/{name} {word}")


@one_line_errors
def suspend(kind: GitSourceArg, name: GitSourceName, namespace: NamespaceOpt = None,
            kubeconfig: KubeconfigOpt = None) -> None:
    """Stop a GitSource fetching, applying and pruning (spec.suspend).

    E.g. to hand-edit a VM it manages without the change being reverted."""
    set_suspend(name, namespace, kubeconfig, True)


@one_line_errors
def resume(kind: GitSourceArg, name: GitSourceName, namespace: NamespaceOpt = None,
           kubeconfig: KubeconfigOpt = None) -> None:
    """Let a suspended GitSource reconcile again (it applies Git's state at once)."""
    set_suspend(name, namespace, kubeconfig, False)


# ----------------------------------------------------------------------- registration

vm_app = typer.Typer(no_args_is_help=True,
                     help="Act on one VirtualMachine: power state, restart, migrate.")


def register(app: typer.Typer) -> None:
    """Add the verbs to the root command: `hyperfleet vm start web` and, as virtctl has it,
    `hyperfleet start web`; `get`, `reconcile`, `suspend`, `resume` at the top."""
    for verb in POWER_VERBS.values():
        cmd = power_command(verb)
        vm_app.command(verb.verb)(cmd)
        app.command(verb.verb, rich_help_panel=POWER_PANEL)(cmd)
    job_verbs: list[Callable[..., None]] = [restart, migrate]
    for fn in job_verbs:
        vm_app.command(fn.__name__)(fn)
        app.command(fn.__name__, rich_help_panel=POWER_PANEL)(fn)
    app.add_typer(vm_app, name="vm", rich_help_panel=POWER_PANEL)
    app.command("get", rich_help_panel=VIEW_PANEL)(get)
    from .console import console  # console imports get_vm from here

    vm_app.command("console")(console)
    app.command("console", rich_help_panel=VIEW_PANEL)(console)
    gitops_verbs: list[Callable[..., None]] = [reconcile, suspend, resume]
    for fn in gitops_verbs:
        app.command(fn.__name__, rich_help_panel=GITOPS_PANEL)(fn)


__all__ = ["POWER_VERBS", "column_value", "git_reverts", "power_patches", "reconcile_outcome",
           "register", "render", "resolve_kind", "vm_job", "vm_settled"]
