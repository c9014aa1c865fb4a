"""What every `hyperfleet` client command shares: exit codes, one-line errors, the API
connection, the kubeconfig's namespace, and YAML loading that cannot be made to hang.

Kept apart from ``cli.py`` so that the sub-command modules (``jobcli``, ``vmcli``) import it
and ``cli.py`` imports them: the dependency runs one way."""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import ssl
import sys
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import typer
import yaml

if TYPE_CHECKING:
    from hyperfleet.reconcilers.kube import Kube


class ExitCode(IntEnum):
    """Exit statuses scripts can branch on (documented in `hyperfleet --help`)."""

    OK = 0
    FAILED = 1  # the operation failed, timed out, or the server refused it
    USAGE = 2  # bad flag, argument, file, YAML or kubeconfig
    UNREACHABLE = 3  # the Kubernetes API server could not be reached
    NOT_FOUND = 4  # the named object does not exist


EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 the operation failed or timed out; 2 usage error (bad flag, "
    "file, YAML or kubeconfig); 3 the Kubernetes API server is unreachable; 4 not found."
)

#: Seconds one API request may take before the command gives up (exit 3), so a
#: black-holed API server does not hang a terminal.
REQUEST_TIMEOUT = 30.0

#: How many YAML nodes a document may expand to through aliases (a "billion laughs"
#: document is a few hundred bytes that expand to 10^9 nodes).
MAX_YAML_NODES = 100_000

# Options, not Annotated aliases: each module writes ``Annotated[str | None, KUBECONFIG]``
# itself, so linters see the Optional.
KUBECONFIG = typer.Option(envvar="KUBECONFIG", help="kubeconfig (in-cluster config if unset)")
NAMESPACE = typer.Option("--namespace", "-n",
                         help="Namespace (default: the kubeconfig context's, like kubectl)")


class CliError(Exception):
    """An everyday failure: printed as one line, exits with ``code``."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: ExitCode = ExitCode.FAILED) -> NoReturn:
    """Print ``error: message`` (one line, stderr) and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(int(code))


def package_version() -> str:
    """The installed distribution's version (what pip and the image were built from)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hyperfleet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def load_kubeconfig(kubeconfig: str | None) -> None:
    """Load the API client configuration, or exit 2 with a message naming --kubeconfig /
    KUBECONFIG: a typo in a path is a usage error, not a traceback from the client library."""
    from kubernetes.config.config_exception import ConfigException

    from hyperfleet.reconcilers.kube import load_config

    from .logs import redact

    try:
        load_config(kubeconfig)
    except Exception as exc:
        if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
            # Not str(exc): PyYAML quotes the offending line, which may hold a token.
            mark = exc.problem_mark
            why = f"not valid YAML ({exc.problem}, line {mark.line + 1}, column {mark.column + 1})"
        elif isinstance(exc, OSError):
            why = exc.strerror or str(exc)
        elif isinstance(exc, ConfigException):
            why = str(exc)
        else:  # parsed, but not shaped like a kubeconfig (the loader trips over it)
            why = f"not a valid kubeconfig ({type(exc).__name__}: {exc})"
        where = (f"--kubeconfig/KUBECONFIG {kubeconfig}" if kubeconfig else
                 "no usable in-cluster config and no --kubeconfig/KUBECONFIG set, so ~/.kube/config")
        fail(f"cannot load the Kubernetes configuration: {where}: {redact(why)}", ExitCode.USAGE)


IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def context_namespace(kubeconfig: str | None) -> str:
    """The namespace kubectl would use: in a pod (where the in-cluster config wins, as in
    load_config) the pod's own, else the current kubeconfig context's, else ``default``.
    Never fails: loading the configuration for real is what reports its problems."""
    import os

    from kubernetes.config import kube_config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        with contextlib.suppress(OSError):
            ns = IN_CLUSTER_NAMESPACE.read_text().strip()
            if ns:
                return ns
    with contextlib.suppress(Exception):
        _, current = kube_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=kubeconfig)
        context_ns = ((current or {}).get("context") or {}).get("namespace")
        if context_ns:
            return str(context_ns)
    return "default"


def _timeout_client() -> Any:
    """An ApiClient whose requests time out unless the caller says otherwise (the generated
    client waits forever by default)."""
    from kubernetes import client

    class TimeoutApiClient(client.ApiClient):
        def call_api(self, method: Any, url: Any, header_params: Any = None, body: Any = None,
                     post_params: Any = None, _request_timeout: Any = None) -> Any:
            return super().call_api(method, url, header_params, body, post_params,
                                    _request_timeout or REQUEST_TIMEOUT)

    return TimeoutApiClient()


def connect(kubeconfig: str | None, namespace: str | None = None) -> tuple[Kube, str]:
    """The API client and the namespace to use (``namespace``, else the context's)."""
    from hyperfleet.reconcilers.kube import Kube

    load_kubeconfig(kubeconfig)
    return Kube(_timeout_client()), namespace or context_namespace(kubeconfig)


def api_message(exc: Exception) -> str:
    """The Status message of an API error, as kubectl prints it."""
    body = getattr(exc, "body", None)
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        msg = json.loads(body or "{}").get("message")
        if msg:
            return str(msg)
    return f"HTTP {getattr(exc, 'status', '?')} {getattr(exc, 'reason', '') or ''}".strip()


def _server() -> str:
    from kubernetes import client

    with contextlib.suppress(Exception):
        return str(client.Configuration.get_default_copy().host)
    return "the API server"


def _unreachable_reason(exc: BaseException) -> str | None:
    """Why the API server could not be reached, or None when ``exc`` is something else."""
    import urllib3.exceptions as u3

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cur, u3.NewConnectionError | u3.NameResolutionError):
            text = str(cur)
            if "refused" in text.lower():
                return "connection refused"
            if isinstance(cur, u3.NameResolutionError) or "resolve" in text.lower():
                return "host name not resolvable"
            return "cannot connect"
        if isinstance(cur, u3.ConnectTimeoutError | u3.ReadTimeoutError | TimeoutError
                      | socket.timeout):
            return f"no answer within {REQUEST_TIMEOUT:.0f}s"
        if isinstance(cur, u3.SSLError | ssl.SSLError):
            return "TLS handshake failed (check the kubeconfig's certificate-authority)"
        if isinstance(cur, u3.MaxRetryError):
            cur = cur.reason
            continue
        if isinstance(cur, u3.ProtocolError | ConnectionError):
            return "the connection broke"
        cur = cur.__cause__ or cur.__context__
    return None


def explain(exc: BaseException, what: str = "") -> CliError | None:
    """An API or network failure as a one-line CliError; None for anything unexpected."""
    from kubernetes.client.exceptions import ApiException

    from hyperfleet.reconcilers.kube import Conflict, Gone

    prefix = f"{what}: " if what else ""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, Gone):
        return CliError(f"{prefix}{exc}", ExitCode.NOT_FOUND)
    if isinstance(exc, Conflict):
        return CliError(f"{prefix}{exc}; try again", ExitCode.FAILED)
    if isinstance(exc, ApiException):
        msg = api_message(exc)
        if exc.status == 404:
            return CliError(f"{prefix}not found ({msg}); are the Hyperfleet CRDs installed?",
                            ExitCode.NOT_FOUND)
        if exc.status in (400, 422):
            return CliError(f"{prefix}the API server refused it: {msg}", ExitCode.USAGE)
        if exc.status in (401, 403):
            return CliError(f"{prefix}not allowed: {msg}", ExitCode.FAILED)
        return CliError(f"{prefix}{msg}", ExitCode.FAILED)
    reason = _unreachable_reason(exc)
    if reason is not None:
        return CliError(f"cannot reach the Kubernetes API server at {_server()}: {reason}",
                        ExitCode.UNREACHABLE)
    return None


P = ParamSpec("P")
R = TypeVar("R")


def one_line_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn API, network and CliError failures raised by a command into one stderr line
    and the matching exit code; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:
            err = explain(exc)
            if err is None:
                raise
            fail(str(err), err.code)

    return wrapper


# ---------------------------------------------------------------------------- YAML


class _AliasCheckingLoader(yaml.SafeLoader):
    """The safe loader; documents are checked for alias expansion before construction."""


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """Nodes ``node`` stands for once every alias is expanded, counted without expanding
    (a memo per node object); raises CliError past ``limit`` or on a recursive alias."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise CliError("a YAML alias refers to itself (a recursive document); write the "
                           "value out instead", ExitCode.USAGE)
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            children: list[yaml.Node] = list(n.value)
        elif isinstance(n, yaml.MappingNode):
            children = [x for pair in n.value for x in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(key)
        sizes[key] = total
        if total > limit:
            raise CliError(f"the YAML expands to more than {limit:,} values through aliases "
                           "(*name); a job document needs nothing like it, so it is refused "
                           "(\"billion laughs\")", ExitCode.USAGE)
        return total

    return size(node)


def safe_load_all(text: str, max_nodes: int = MAX_YAML_NODES) -> list[Any]:
    """Every document in ``text`` (yaml.safe_load_all), refusing one whose aliases expand
    past ``max_nodes``: validating or printing it would run for hours."""
    loader = _AliasCheckingLoader(text)
    try:
        docs = []
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _expanded_size(node, max_nodes)
            docs.append(loader.construct_document(node))
        return docs
    finally:
        loader.dispose()


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: the problem and where (never the quoted input)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{exc.problem or exc.context or 'syntax error'}{where}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_yaml_file(path: str) -> list[Any]:
    """The non-empty documents of a file (``-``: stdin), or a one-line usage error."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not readable text"
        raise CliError(f"{path}: {why}", ExitCode.USAGE) from None
    try:
        return [d for d in safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        raise CliError(f"{path}: not valid YAML: {yaml_problem(exc)}", ExitCode.USAGE) from None
    except RecursionError:
        raise CliError(f"{path}: the YAML is nested too deeply", ExitCode.USAGE) from None
    except CliError as exc:
        raise CliError(f"{path}: {exc}", exc.code) from None
