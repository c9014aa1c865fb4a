"""Contract-enforcing test double of the cloud-hypervisor VMM, faithful to the real v54.

Developer and CI machines run the node agent against this executable instead of the real
VMM. It has the VMM's CLI, serves the VMM's REST API on a unix socket, checks every request
and response against the upstream OpenAPI document shipped in this package
(``openapi.yaml``, with the corrections listed in ``REAL_VMM_OVERRIDES``) and answers the way
a genuine cloud-hypervisor v54 does: ``tests/unit/test_ch_transcripts.py`` replays the
transcripts recorded from the real binary (``tests/ch_transcripts/``) against it. Where the
real VMM and its documents disagree, the real VMM wins.

CLI (one process per VM, like the real VMM)::

    hyperfleet-ch-double --api-socket path=/run/vm.sock \\
        [--event-monitor path=/run/vm.events] [--no-shutdown] [-v ...] [--log-file PATH]
    python -m hyperfleet.reconcilers.testing.chdouble ...   # same thing
    hyperfleet-ch-double --version    # "cloud-hypervisor v54.0.0-ae44c297-hyperfleet", exit 0

``--api-socket`` also takes a bare path (older releases). Unknown flags exit with status 1
and a message on stderr. ``--seccomp`` is accepted and ignored.

Real-VMM facts it reproduces (the transcripts hold each one):

* ``vm.create`` only stores the config: whatever deserializes is accepted (204), even
  boot_vcpus > max_vcpus, no payload, a missing kernel or duplicate ids. ``vm.boot``
  validates: 400/409 "Failed to validate config", or 500 "Cannot open kernel file" when
  ``payload.kernel`` does not exist. A failed kernel load leaves a VM object behind (state
  Created, "VM is already created" on the next boot). ``vm.add-*`` re-validates the whole
  config first.
* Deserialization errors are 400 ``["Failed to deserialize JSON", "missing field `x` at line
  L column C"]`` (no "Error from API"); routing errors are ``["Not Found"]`` and
  ``["Bad Request"]``; vm.create without a body is a 400 without a body, and a method
  micro_http does not know (POST) gets micro_http's raw-text error.
* Without a VM, vm.info/boot/reboot/resize/resize-disk/remove-device/add-* are 404 and the
  rest 500 "VM is not running"; vm.delete is 204. State errors are 500 with upstream's chain
  (``... "Invalid transition: InvalidStateTransition(Paused, Paused)"``), never 405.
* vm.shutdown drops the VM object: vm.info says ``Created`` (never ``Shutdown``) and vm.boot
  works again. vm.delete of a booted VM shuts it down first.
* vmm.shutdown answers 200 with an empty body, then the process exits 0.
* vm.resize and vm.remove-device also work on a created VM (config only). On a running VM a
  memory resize with ACPI hotplug rewrites ``memory.size`` (``hotplug_size`` unchanged, no
  ``hotplugged_size``); shrinking is accepted and only changes the config.
* A second disk on the path of a running VM's disk fails (500) on the image lock.
* Events: ``vmm/starting`` first; a failed action still emits its "-ing" event (booting,
  pausing, resuming, snapshotting, resizing, rebooting); vm.snapshot to a bad destination
  emits ``snapshotted`` and answers 500; device add/remove emit nothing.
* vm.counters reports what a guest that did no I/O shows, u64::MAX latency sentinels
  included.
* ``serial: {mode: Socket, socket: P}``: vm.create binds P (a file already there fails it with
  500 ``[..., "Error creating console devices", "Error creating console device", "Address
  already in use (os error 98)"]``, the config still stored, vm.boot retrying the bind);
  vm.shutdown, vm.delete and the process's exit remove P, vm.boot and vm.reboot bind it anew
  (a reboot disconnects the client). One client at a time: a new connection makes the
  previous one read EOF. The hung guest writes nothing, so a client reads nothing.
* When the guest powers off, the VMM exits (events vm/shutdown, vm/deleted, vmm/shutdown;
  code 0) unless ``--no-shutdown``, which keeps the VM, as ``Created``.

Test hooks (they simulate the guest; the real VMM has no such thing):

* ``SIGUSR1``: the guest powers itself off (Running or Paused), with the outcome above.
  ``vm.power-button`` makes a running guest do the same (a paused one once resumed).
* ``SIGUSR2``: the guest reboots itself: events ``vm/rebooting``, ``vm/rebooted``; the state
  stays Running. Ignored unless Running.
* ``HYPERFLEET_CH_DOUBLE_EXIT_ON_GUEST_SHUTDOWN=0``: the double's pre-v54 behaviour, for tests
  written against it: after a guest power-off the process stays and vm.info reports
  ``Shutdown`` (a state the real VMM never reports) until the VM boots again. Unset or ``1``:
  exit, as upstream.
* ``HYPERFLEET_CH_DOUBLE_SOCKET_DELAY=<seconds>``: wait that long before creating the API
  socket, to exercise clients that must wait for it.
* ``HYPERFLEET_CH_DOUBLE_GUEST_HOOKS=<dir>``: the guest runs the Hyperfleet guest agent (hooks
  from ``<dir>``) on vsock port 1024. The VM's vsock unix socket then answers ``CONNECT 1024``
  with ``OK`` while the VM is Running (a paused or stopped guest does not answer, as with a
  real one).

Quirks worth knowing:

* The socket path appears only once it accepts connections (bound under a temporary name,
  then renamed), so "file exists" means "ready".
* No file named in a VM config is opened; only ``payload.kernel`` must exist at boot.
  Snapshots are in the double's own format (``config.json``, ``state.json``,
  ``memory-ranges``, the real file names).
* ``vm.receive-migration`` and ``vm.send-migration`` block until the migration ends, as
  upstream: call the receiver from another thread, wait for it to listen (``unix:<path>``
  appears, ``tcp:<host>:<port>`` accepts), then call the sender. Both transports work, but
  only between two doubles (the wire format is a JSON line). Events
  ``migration-receive-{started,finished,failed}`` on the receiving side.
* Not reproduced: PCI slot numbers (the real VMM also puts built-in devices such as
  virtio-rng on the bus), the many defaults the real vm.info echoes in its config, the
  internal nodes of its device tree, serde's wording for errors other than a missing field
  or a syntax error, and what needs a live guest (hot-unplug completes at once here; a real
  guest must eject the device first). The real VMM takes ``boot_vcpus: 0`` and
  ``desired_vcpus: 0`` (a resize to 0 vCPUs killed it); the double keeps requests to the
  spec's minimums, except in VM configs, which it validates at boot.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from http.server import BaseHTTPRequestHandler
from typing import Any, Final, TextIO

VERSION: Final = "54.0.0"
BUILD_VERSION: Final = f"v{VERSION}-ae44c297-hyperfleet"  # the build the transcripts come from
API_PREFIX: Final = "/api/v1/"
MAX_BODY: Final = 4 * 1024 * 1024  # micro_http rejects request bodies above 4 MiB
_DRAIN_LIMIT: Final = 64 * 1024 * 1024  # read and drop oversized bodies up to this much
_MIGRATION_LIMIT: Final = 64 * 1024 * 1024
_MIGRATION_TIMEOUT: Final = 30.0
SOCKET_DELAY_ENV: Final = "HYPERFLEET_CH_DOUBLE_SOCKET_DELAY"
EXIT_ON_GUEST_SHUTDOWN_ENV: Final = "HYPERFLEET_CH_DOUBLE_EXIT_ON_GUEST_SHUTDOWN"
GUEST_HOOKS_ENV: Final = "HYPERFLEET_CH_DOUBLE_GUEST_HOOKS"
SPEC_RESOURCE: Final = "openapi.yaml"
_HANDLED_SIGNALS: Final = frozenset(
    {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}
)
_DEFAULT_MEMORY: Final = 512 * 1024 * 1024  # upstream default when "memory" is absent
_ACPI_DIMM: Final = 128 * 1024 * 1024  # ACPI hot-added RAM comes in multiples of this
_PCI_SLOTS: Final = range(1, 32)  # slot 0 of each segment is the host bridge
_U64_MAX: Final = 2**64 - 1
# vm.counters of a guest that did no I/O: the block device's latency minimum and maximum
# start at u64::MAX and its averages are that divided by LATENCY_SCALE (10000).
_IDLE_DISK_COUNTERS: Final = {
    "read_bytes": 0, "write_bytes": 0, "read_ops": 0, "write_ops": 0,
    "read_latency_min": _U64_MAX, "read_latency_max": _U64_MAX,
    "read_latency_avg": _U64_MAX // 10000,
    "write_latency_min": _U64_MAX, "write_latency_max": _U64_MAX,
    "write_latency_avg": _U64_MAX // 10000,
}
_IDLE_NET_COUNTERS: Final = {"rx_bytes": 0, "rx_frames": 0, "tx_bytes": 0, "tx_frames": 0}
# micro_http's own answer to a method it cannot parse (it knows GET, PUT, PATCH, DELETE).
_UNSUPPORTED_METHOD_BODY: Final = (
    b'{ "error": "Invalid HTTP Method: Unsupported HTTP method.\n'
    b'All previous unanswered requests will be dropped." }'
)
_DESERIALIZE: Final = "Failed to deserialize JSON"

_STARTED_NS: Final = time.monotonic_ns()  # event timestamps count from VMM start

log = logging.getLogger("hyperfleet.ch_double")

def _log(level: int, msg: str, *, exc_info: bool = False, **fields: Any) -> None:
    """Log one structured record; ``fields`` end up as JSON keys."""
    log.log(level, msg, exc_info=exc_info, extra={"fields": fields})


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, so logs of hundreds of doubles stay greppable."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "pid": record.process,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# --------------------------------------------------------------------------
# VM state machine (upstream's VmState::valid_transition)
# --------------------------------------------------------------------------


class VmState(StrEnum):
    """States reported by ``vm.info``; the values are the wire strings."""

    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"
    BREAKPOINT = "BreakPoint"


ALLOWED_TRANSITIONS: Final[dict[VmState, frozenset[VmState]]] = {
    VmState.CREATED: frozenset(
        {VmState.RUNNING, VmState.PAUSED, VmState.SHUTDOWN, VmState.BREAKPOINT}
    ),
    VmState.RUNNING: frozenset({VmState.PAUSED, VmState.SHUTDOWN, VmState.BREAKPOINT}),
    VmState.PAUSED: frozenset({VmState.RUNNING, VmState.SHUTDOWN}),
    VmState.SHUTDOWN: frozenset({VmState.RUNNING}),
    VmState.BREAKPOINT: frozenset({VmState.CREATED, VmState.RUNNING}),
}


class ApiFailure(Exception):
    """An API error: HTTP status plus the error chain below "Error from API"."""

    def __init__(self, status: int, *chain: str) -> None:
        super().__init__(": ".join(chain))
        self.status = status
        self.chain = list(chain)


class HttpFailure(Exception):
    """An error of the HTTP layer (routing, serde): the chain is the whole body.

    An empty chain means a response without a body, which micro_http sends for some
    malformed requests.
    """

    def __init__(self, status: int, *chain: str) -> None:
        super().__init__(": ".join(chain) or str(status))
        self.status = status
        self.chain = list(chain)


class ConfigInvalid(Exception):
    """Upstream's config ValidationError: 400, or 409 for duplicate ids and paths."""

    def __init__(self, *chain: str, status: int = 400) -> None:
        super().__init__(": ".join(chain))
        self.status = status
        self.chain = list(chain)


def check_transition(current: VmState, new: VmState) -> None:
    """Raise upstream's error (its Debug form) unless ``current -> new`` is allowed."""
    if new not in ALLOWED_TRANSITIONS[current]:
        raise ValueError(f"InvalidStateTransition({current}, {new})")


# --------------------------------------------------------------------------
# The OpenAPI contract
# --------------------------------------------------------------------------

_HTTP_METHODS: Final = ("get", "put", "post", "delete", "patch", "head", "options")
# OpenAPI integer formats used by the spec; serde rejects out-of-range values.
_INT_FORMATS: Final = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}
# Fields that upstream's Rust request structs require although the OpenAPI
# document does not mark them required (serde fails with "missing field").
_SERDE_REQUIRED: Final = {
    "vm.remove-device": ("id",),
    "vm.resize-disk": ("id", "desired_size"),
    "vm.resize-zone": ("id", "desired_ram"),
    "vm.snapshot": ("destination_url",),
    "vm.coredump": ("destination_url",),
    "vm.add-device": ("path",),  # fds passed over SCM_RIGHTS are not emulated
}
# Schema keywords serde does not check: in a VM config they are validation, which upstream
# runs at vm.boot / vm.add-* ("Failed to validate config"), not when deserializing.
_VALIDATION_KEYWORDS: Final = frozenset(
    {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
)
_ERROR_BODY_HINT: Final = "error bodies must be a non-empty JSON array of strings"


def _deserializable(error: Any) -> bool:
    """Whether serde itself would reject what this jsonschema error is about."""
    return error.validator not in _VALIDATION_KEYWORDS


def _override_vmm_shutdown(spec: dict[str, Any]) -> None:
    spec["paths"]["/vmm.shutdown"]["put"]["responses"] = {
        200: {"description": "The VMM is shutting down (the real VMM answers 200, not 204)."}
    }


def _override_payload_optional(spec: dict[str, Any]) -> None:
    schema = spec["components"]["schemas"]["VmConfig"]
    schema["required"] = [r for r in schema.get("required", []) if r != "payload"]


def _override_counters_u64(spec: dict[str, Any]) -> None:
    spec["components"]["schemas"]["VmCounters"]["additionalProperties"][
        "additionalProperties"]["format"] = "uint64"


#: Where the real VMM contradicts ``openapi.yaml``, in one place (BUILD.md, "Where real CH
#: differs"). The shipped document stays upstream's; these edits are applied when loading.
REAL_VMM_OVERRIDES: Final[dict[str, Callable[[dict[str, Any]], None]]] = {
    "vmm.shutdown answers 200 with an empty body (the spec says 204)": _override_vmm_shutdown,
    "VmConfig.payload may be left out of vm.create (vm.boot then fails validation)":
        _override_payload_optional,
    "vm.counters values are u64 (latency sentinels are u64::MAX; the spec says int64)":
        _override_counters_u64,
}


@dataclass(frozen=True)
class Operation:
    """What the spec says about one ``method /action`` pair."""

    body_schema: dict[str, Any] | None
    body_required: bool
    responses: dict[int, dict[str, Any] | None]  # status -> JSON schema, None = no content


def _int_format(lo: int, hi: int) -> Callable[[object], bool]:
    def check(instance: object) -> bool:
        if isinstance(instance, bool) or not isinstance(instance, int):
            return True  # "type" reports non-integers
        return lo <= instance <= hi

    return check


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _value_end(text: str, path: Sequence[str | int]) -> int | None:
    """Index just past the JSON value at ``path`` in ``text``, None if it is not there."""
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    try:
        for key in path:
            opener, closer = ("{", "}") if isinstance(key, str) else ("[", "]")
            if text[pos] != opener:
                return None
            pos = _skip_ws(text, pos + 1)
            index = 0
            while text[pos] != closer:
                if isinstance(key, str):
                    name, pos = decoder.raw_decode(text, pos)
                    pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past the ':'
                    found = name == key
                else:
                    found = index == key
                if found:
                    break
                _, pos = decoder.raw_decode(text, pos)
                pos = _skip_ws(text, pos)
                if text[pos] == ",":
                    pos = _skip_ws(text, pos + 1)
                index += 1
            else:
                return None
        _, end = decoder.raw_decode(text, pos)
        return int(end)
    except (IndexError, ValueError):
        return None


def _line_column(text: str, end: int) -> tuple[int, int]:
    """serde_json's position after consuming ``text[:end]``: 1-based line, column."""
    line = text.count("\n", 0, end) + 1
    return line, end - (text.rfind("\n", 0, end) + 1)


# Python's json messages -> serde_json's, for the syntax errors a client can make.
_SERDE_SYNTAX: Final = (
    ("Expecting property name enclosed in double quotes", "key must be a string"),
    ("Expecting value", "expected value"),
    ("Extra data", "trailing characters"),
    ("Unterminated string", "EOF while parsing a string"),
    ("Expecting ':' delimiter", "expected `:`"),
    ("Expecting ',' delimiter", "expected `,` or `}`"),
    ("Invalid control character", "control character (\\u0000-\\u001F) found while parsing a string"),
)


def _serde_syntax_message(exc: json.JSONDecodeError) -> str:
    message = next((serde for py, serde in _SERDE_SYNTAX if exc.msg.startswith(py)), exc.msg)
    return f"{message} at line {exc.lineno} column {exc.colno}"


class Contract:
    """The upstream OpenAPI 3.0 document, compiled for validation.

    jsonschema's Draft 4 validator (the JSON Schema dialect OpenAPI 3.0 is
    built on) is extended with ``nullable`` and the OpenAPI integer formats and
    validates against the spec's own schemas, ``$ref``s resolved inside the
    document; nothing is copied by hand. Importing openapi-core costs about
    four times the time and twice the memory of jsonschema here (~380 ms,
    +40 MB vs ~95 ms, +9 MB), which matters for hundreds of doubles.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.operations: dict[str, dict[str, Operation]] = {}
        for raw_path, item in spec["paths"].items():
            ops: dict[str, Operation] = {}
            for method, op in item.items():
                if method.lower() in _HTTP_METHODS:
                    ops[method.upper()] = self._operation(op)
            self.operations[raw_path.lstrip("/")] = ops
        self._root = self._root_validator(spec)
        self._validators: dict[int, Any] = {}

    @classmethod
    def load(cls) -> Contract:
        """Read the spec that ships inside the package (``../shared`` is not installed)
        and correct it where the real VMM says otherwise (``REAL_VMM_OVERRIDES``)."""
        from importlib.resources import files

        import yaml

        text = files(__package__ or "hyperfleet.reconcilers.testing").joinpath(
            SPEC_RESOURCE
        ).read_text(encoding="utf-8")
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        spec = yaml.load(text, Loader=loader)
        if not isinstance(spec, dict) or "paths" not in spec:
            raise ValueError(f"{SPEC_RESOURCE} is not an OpenAPI document")
        for override in REAL_VMM_OVERRIDES.values():
            override(spec)
        return cls(spec)

    @staticmethod
    def _root_validator(spec: dict[str, Any]) -> Any:
        from jsonschema import (
            Draft4Validator,
            FormatChecker,
            validators,
        )

        draft4_type = Draft4Validator.VALIDATORS["type"]
        draft4_enum = Draft4Validator.VALIDATORS["enum"]

        def oas_type(v: Any, types: Any, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
            if instance is None and schema.get("nullable") is True:
                return
            yield from draft4_type(v, types, instance, schema)

        def oas_enum(v: Any, enums: Any, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
            if instance is None and schema.get("nullable") is True:
                return
            yield from draft4_enum(v, enums, instance, schema)

        oas30 = validators.extend(Draft4Validator, {"type": oas_type, "enum": oas_enum})  # type: ignore[no-untyped-call]
        checker = FormatChecker(formats=())
        for name, (lo, hi) in _INT_FORMATS.items():
            checker.checks(name)(_int_format(lo, hi))
        # The whole document is the root resource, so "#/components/..." resolves.
        return oas30(spec, format_checker=checker)

    def _deref(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.spec
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
        return node

    def _operation(self, op: dict[str, Any]) -> Operation:
        body_schema = None
        required = False
        if "requestBody" in op:
            rb = self._deref(op["requestBody"])
            required = bool(rb.get("required", False))
            media = (rb.get("content") or {}).get("application/json")
            body_schema = media.get("schema") if media else None
        responses: dict[int, dict[str, Any] | None] = {}
        for code, resp in (op.get("responses") or {}).items():
            if str(code).isdigit():
                media = (self._deref(resp).get("content") or {}).get("application/json")
                responses[int(code)] = media.get("schema") if media else None
        return Operation(body_schema, required, responses)

    def first_error(self, schema: dict[str, Any], instance: Any,
                    only: Callable[[Any], bool] | None = None) -> Any:
        """jsonschema's best error (optionally among those ``only`` keeps), or None."""
        from jsonschema.exceptions import best_match

        validator = self._validators.get(id(schema))
        if validator is None:
            validator = self._validators[id(schema)] = self._root.evolve(schema=schema)
        errors = validator.iter_errors(instance)
        return best_match(e for e in errors if only is None or only(e))

    def validate(self, schema: dict[str, Any], instance: Any,
                 only: Callable[[Any], bool] | None = None) -> str | None:
        """Return a message naming the offending field, or None when valid."""
        error = self.first_error(schema, instance, only)
        if error is None:
            return None
        where = ".".join(str(p) for p in error.absolute_path)
        return f"{where}: {error.message}" if where else str(error.message)

    def schema(self, name: str) -> dict[str, Any]:
        """A component schema by name, e.g. ``VmConfig``."""
        result: dict[str, Any] = self.spec["components"]["schemas"][name]
        return result

    def check_request(self, action: str, op: Operation, raw: bytes) -> Any:
        """Parse and validate a request body; raise 400 like upstream's HTTP layer if bad."""
        if op.body_schema is None:
            return None  # upstream ignores bodies of body-less actions
        if not raw.strip():
            if op.body_required:
                # vm.create has its own handler, which answers without a body.
                raise HttpFailure(400) if action == "vm.create" else HttpFailure(400, "Bad Request")
            return None
        try:
            text = raw.decode("utf-8")
            body = json.loads(text)
        except UnicodeDecodeError as exc:
            raise HttpFailure(400, _DESERIALIZE, f"invalid unicode: {exc.reason}") from None
        except json.JSONDecodeError as exc:
            raise HttpFailure(400, _DESERIALIZE, _serde_syntax_message(exc)) from None
        config_body = action == "vm.create" or action.startswith("vm.add-")
        error = self.first_error(op.body_schema, body, _deserializable if config_body else None)
        if error is not None:
            raise HttpFailure(400, _DESERIALIZE, self._serde_message(error, text))
        if isinstance(body, dict):
            for name in _SERDE_REQUIRED.get(action, ()):
                if name not in body:
                    raise HttpFailure(400, _DESERIALIZE, _missing_field(name, text, []))
        return body

    @staticmethod
    def _serde_message(error: Any, text: str) -> str:
        """serde's wording for a missing field; the field and jsonschema's words otherwise."""
        if error.validator == "required" and isinstance(error.instance, dict):
            missing = next((n for n in error.validator_value if n not in error.instance), "?")
            return _missing_field(missing, text, list(error.absolute_path))
        where = ".".join(str(p) for p in error.absolute_path)
        return f"{where}: {error.message}" if where else str(error.message)

    def check_response(self, op: Operation | None, status: int, body: Any) -> str | None:
        """Why a response breaks the contract, or None.

        Success statuses must be declared for the operation with a matching
        body. Error statuses may be undeclared because the upstream document
        omits most of them but must carry the error-chain body. The spec's
        minimums are not enforced on answers: vm.info echoes a config exactly as
        vm.create accepted it, and that is unvalidated until vm.boot.
        """
        if 200 <= status < 300:
            if op is None or status not in op.responses:
                return f"status {status} is not declared for this operation"
            schema = op.responses[status]
            if schema is None:
                return None if body is None else f"status {status} declares no content"
            if body is None:
                return f"status {status} requires a JSON body"
            return self.validate(schema, body, _deserializable)
        if op is not None and op.responses.get(status) is not None:
            schema = op.responses[status]
            assert schema is not None
            problem = self.validate(schema, body)
            if problem:
                return problem
        if not (isinstance(body, list) and body and all(isinstance(s, str) for s in body)):
            return _ERROR_BODY_HINT
        return None


def _missing_field(name: str, text: str, path: list[str | int]) -> str:
    """serde's message: the position is just past the object that lacks the field."""
    end = _value_end(text, path)
    if end is None:
        return f"missing field `{name}`"
    line, column = _line_column(text, end)
    return f"missing field `{name}` at line {line} column {column}"


# --------------------------------------------------------------------------
# Event monitor
# --------------------------------------------------------------------------


class EventMonitor:
    """Writes upstream-style events (pretty JSON objects) to a file or fifo."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    @classmethod
    def open(cls, option: str | None) -> EventMonitor:
        """Open ``path=...`` / ``fd=...``; opening a fifo blocks until a reader exists."""
        if option is None:
            return cls(None)
        opts = _parse_options(option, "path")
        if "fd" in opts:
            return cls(os.fdopen(int(opts["fd"]), "a", encoding="utf-8"))
        if "path" not in opts:
            raise ValueError(f"--event-monitor needs path=<file> or fd=<fd>, got {option!r}")
        return cls(open(opts["path"], "a", encoding="utf-8"))

    def emit(self, source: str, event: str, properties: dict[str, str] | None = None) -> None:
        """Append one event; the timestamp is the time since the VMM started."""
        if self._stream is None:
            return
        elapsed = time.monotonic_ns() - _STARTED_NS
        doc = {
            "timestamp": {"secs": elapsed // 1_000_000_000, "nanos": elapsed % 1_000_000_000},
            "source": source,
            "event": event,
            "properties": properties,
        }
        text = json.dumps(doc, indent=2) + "\n\n"
        with self._lock:
            try:
                self._stream.write(text)
                self._stream.flush()
            except OSError as exc:  # a fifo whose reader went away
                _log(logging.WARNING, "event monitor write failed", error=str(exc))
                self._stream = None

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                with contextlib.suppress(OSError):
                    self._stream.close()
                self._stream = None


# --------------------------------------------------------------------------
# The emulated VMM
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceKind:
    """One ``vm.add-*`` flavour: where it lives in VmConfig and how it is named."""

    action: str
    config_key: str
    prefix: str
    what: str  # outer error message: f"The {what} could not be added to the VM"
    single: bool = False  # VmConfig holds one object, not a list


DEVICE_KINDS: Final = (
    DeviceKind("vm.add-disk", "disks", "_disk", "disk"),
    DeviceKind("vm.add-net", "net", "_net", "network device"),
    DeviceKind("vm.add-fs", "fs", "_fs", "fs"),
    DeviceKind("vm.add-pmem", "pmem", "_pmem", "pmem device"),
    DeviceKind("vm.add-vsock", "vsock", "_vsock", "vsock device", single=True),
    DeviceKind("vm.add-vdpa", "vdpa", "_vdpa", "vDPA device"),
    DeviceKind("vm.add-device", "devices", "_vfio", "device"),
    DeviceKind("vm.add-user-device", "user_devices", "_vfio_user", "user device"),
    DeviceKind(
        "vm.add-generic-vhost-user",
        "generic_vhost_user",
        "_generic_vhost_user",
        "generic vhost-user device",
    ),
)


def _device_entries(config: dict[str, Any]) -> Iterator[tuple[DeviceKind, dict[str, Any]]]:
    for kind in DEVICE_KINDS:
        value = config.get(kind.config_key)
        if kind.single:
            if isinstance(value, dict):
                yield kind, value
        else:
            for entry in value or ():
                yield kind, entry


def _memory_shared(config: dict[str, Any]) -> bool:
    memory = config.get("memory") or {}
    if memory.get("shared") or memory.get("hugepages"):
        return True
    zones = memory.get("zones") or []
    return bool(zones) and all(z.get("shared") or z.get("hugepages") for z in zones)


def _needs_shared_memory(kind: DeviceKind, entry: dict[str, Any]) -> bool:
    return kind.config_key in ("fs", "generic_vhost_user") or bool(entry.get("vhost_user"))


def _validate_device(kind: DeviceKind, entry: dict[str, Any], config: dict[str, Any]) -> None:
    """Upstream's ValidationError checks that the schema cannot express (400)."""
    if kind.config_key == "disks" and not entry.get("path") and not entry.get("vhost_user"):
        raise ConfigInvalid("Path missing when using a disk that is not vhost-user")
    if _needs_shared_memory(kind, entry) and not _memory_shared(config):
        raise ConfigInvalid("Using vhost-user requires using shared memory or huge pages")


def _check_unique(entries: list[tuple[DeviceKind, dict[str, Any]]]) -> None:
    """Duplicate ids, and VFIO devices on one path, are 409 (disk paths are not checked
    here: the image lock refuses them when the device is created)."""
    ids: set[str] = set()
    paths: set[str] = set()
    for kind, entry in entries:
        ident = entry.get("id")
        if ident is not None:
            if ident in ids:
                raise ConfigInvalid(f"Identifier {ident} is not unique", status=409)
            ids.add(ident)
        if kind.config_key == "devices" and entry.get("path"):
            if entry["path"] in paths:
                raise ConfigInvalid(f"Duplicated device path: {entry['path']}", status=409)
            paths.add(entry["path"])


_SPECIAL_VSOCK_CIDS: Final = frozenset({0, 1, 2, 2**32 - 1})


def validate_config(contract: Contract, config: dict[str, Any]) -> None:
    """Upstream's VmConfig::validate, run by vm.boot and vm.add-* (not vm.create)."""
    cpus = config.get("cpus") or {}
    boot, most = int(cpus.get("boot_vcpus", 1)), int(cpus.get("max_vcpus", 1))
    if boot > most:
        raise ConfigInvalid(f"Max CPUs ({most}) lower than boot CPUs ({boot})")
    payload = config.get("payload") or {}
    if not any(payload.get(k) for k in ("kernel", "firmware", "igvm")):
        raise ConfigInvalid("Payload configuration is not bootable",
                            "No bootitem provided: neither firmware nor kernel")
    entries = list(_device_entries(config))
    _check_unique(entries)
    for kind, entry in entries:
        _validate_device(kind, entry, config)
    vsock = config.get("vsock")
    if isinstance(vsock, dict) and vsock.get("cid") in _SPECIAL_VSOCK_CIDS:
        raise ConfigInvalid(f"{vsock['cid']} is a special VSOCK CID")
    problem = contract.validate(contract.schema("VmConfig"), config)
    if problem is not None:  # the spec's minimums, which serde let through at vm.create
        raise ConfigInvalid(problem)


def _total_memory(config: dict[str, Any]) -> int:
    memory = config.get("memory") or {}
    total = int(memory.get("size", 0)) + int(memory.get("hotplugged_size") or 0)
    for zone in memory.get("zones") or ():
        total += int(zone.get("size", 0)) + int(zone.get("hotplugged_size") or 0)
    return total


def _file_url(url: str) -> str:
    if not url.startswith("file://") or not url[len("file://") :].startswith("/"):
        raise ValueError(f"Invalid URL {url!r}: expected file:///<absolute path>")
    return url[len("file://") :]


def _not_a_directory(path: str) -> str:
    """Upstream's message, with the path in Rust's Debug quoting."""
    return f"Destination is not a directory: {json.dumps(path)}"


@dataclass
class Reply:
    """An answer to one API call; ``after`` runs once it has been sent.

    ``raw`` replaces the JSON body with bytes sent verbatim, for the few answers that come
    from the HTTP layer rather than the API (micro_http's own errors)."""

    status: int
    body: Any = None
    after: Callable[[], None] | None = None
    raw: bytes | None = None
    close: bool = False


def _error_reply(failure: ApiFailure | HttpFailure) -> Reply:
    if isinstance(failure, HttpFailure):
        return Reply(failure.status, failure.chain or None)
    return Reply(failure.status, ["Error from API", *failure.chain])


@dataclass
class Vm:
    """The VM of a VMM process: its config, and the VM object once vm.boot built one.

    Upstream keeps the two apart: vm.create stores a config, vm.boot builds a VM object
    (kept even when loading the kernel then fails), vm.shutdown drops the object and keeps
    the config. Without an object vm.info reports ``Created``.
    """

    config: dict[str, Any]
    state: VmState = VmState.CREATED  # of the VM object; CREATED while there is none
    instance: bool = False  # a VM object exists
    next_device_index: int = 0  # upstream names devices _disk0, _net1, ... from one counter
    pci: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (segment, slot)
    disk_sizes: dict[str, int] = field(default_factory=dict)
    boot_ram: int = 0  # RAM the VM object started with; ACPI hotplug adds above it
    current_ram: int = 0  # RAM the guest has (an ACPI shrink only changes the config)
    booted_at: float = 0.0
    pending_power_off: bool = False  # power button pressed while the guest was paused
    guest_stopped: bool = False  # pre-v54 hook: report Shutdown after a guest power-off

    @property
    def reported_state(self) -> VmState:
        if self.guest_stopped:
            return VmState.SHUTDOWN
        return self.state if self.instance else VmState.CREATED

    def start_instance(self, state: VmState) -> None:
        """The VM object exists, its devices on the PCI bus."""
        self.plug_all()
        self.instance = True
        self.state = state
        self.boot_ram = self.current_ram = int((self.config.get("memory") or {}).get("size", 0))
        self.booted_at = time.monotonic()
        self.pending_power_off = False
        self.guest_stopped = False

    def drop_instance(self) -> None:
        self.instance = False
        self.state = VmState.CREATED
        self.pci = {}
        self.pending_power_off = False

    def export_state(self) -> dict[str, Any]:
        """What snapshot and migration carry besides the config."""
        return {
            "format": "hyperfleet-ch-double/1",
            "state": str(self.state),
            "next_device_index": self.next_device_index,
            "pci": {k: list(v) for k, v in self.pci.items()},
            "disk_sizes": dict(self.disk_sizes),
            "boot_ram": self.boot_ram,
            "current_ram": self.current_ram,
        }

    @classmethod
    def from_export(cls, config: dict[str, Any], state: Any, new_state: VmState) -> Vm:
        if not isinstance(state, dict) or state.get("format") != "hyperfleet-ch-double/1":
            raise ValueError("state.json was not written by this VMM")
        vm = cls(config=config, state=new_state, instance=True)
        vm.next_device_index = int(state.get("next_device_index", 0))
        vm.pci = {str(k): (int(v[0]), int(v[1])) for k, v in state.get("pci", {}).items()}
        vm.disk_sizes = {str(k): int(v) for k, v in state.get("disk_sizes", {}).items()}
        size = int((config.get("memory") or {}).get("size", 0))
        vm.boot_ram = int(state.get("boot_ram") or size)
        vm.current_ram = int(state.get("current_ram") or size)
        vm.booted_at = time.monotonic()
        return vm

    def memory_actual_size(self) -> int:
        """Upstream: the configured RAM; with a VM object, minus the balloon, plus what
        virtio-mem plugged (all of it here: the simulated guest always cooperates)."""
        memory = self.config.get("memory") or {}
        zones = memory.get("zones") or ()
        size = int(memory.get("size", 0)) + sum(int(z.get("size", 0)) for z in zones)
        if not self.instance:
            return size
        plugged = int(memory.get("hotplugged_size") or 0) + sum(
            int(z.get("hotplugged_size") or 0) for z in zones)
        balloon = int((self.config.get("balloon") or {}).get("size", 0))
        return max(size + plugged - balloon, 0)

    def assign_ids(self) -> None:
        for kind, entry in _device_entries(self.config):
            if entry.get("id") is None:
                entry["id"] = f"{kind.prefix}{self.next_device_index}"
                self.next_device_index += 1

    def allocate_slot(self, entry: dict[str, Any]) -> tuple[int, int]:
        segment = int(entry.get("pci_segment") or 0)
        used = {slot for seg, slot in self.pci.values() if seg == segment}
        wanted = entry.get("pci_device_id")
        if wanted is not None:
            if wanted not in _PCI_SLOTS or wanted in used:
                raise RuntimeError(f"Invalid PCI device identifier: {wanted}")
            return segment, int(wanted)
        for slot in _PCI_SLOTS:
            if slot not in used:
                return segment, slot
        raise RuntimeError(f"No free PCI slot left on segment {segment}")

    def plug_all(self) -> None:
        self.pci = {}
        for _, entry in _device_entries(self.config):
            self.pci[entry["id"]] = self.allocate_slot(entry)

    def bdf(self, ident: str) -> str:
        segment, slot = self.pci[ident]
        return f"{segment:04x}:00:{slot:02x}.0"


def _send_line(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload + b"\n")


def _recv_line(sock: socket.socket, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
        if size > limit:
            raise ValueError("migration message too large")
    return b"".join(chunks)


class Vmm:
    """The emulated VMM thread: one lock serialises API calls, like upstream."""

    def __init__(self, contract: Contract, events: EventMonitor, *,
                 no_shutdown: bool = False) -> None:
        self.contract = contract
        self.events = events
        self.lock = threading.RLock()
        self.vm: Vm | None = None
        self.receiving = False
        self.receive_path: str | None = None
        self.serial: SerialSocket | None = None  # upstream's console_info, serial part
        self.no_shutdown = no_shutdown
        # Unset or "1": upstream (exit on guest power-off). "0": the pre-v54 double.
        self.exit_on_guest_shutdown = os.environ.get(EXIT_ON_GUEST_SHUTDOWN_ENV, "1") != "0"
        self.shutdown_emitted = False  # vmm/shutdown written; the process is on its way out
        self.actions: dict[str, Callable[[Any], Reply]] = {
            "vmm.ping": self.ping,
            "vmm.shutdown": self.vmm_shutdown,
            "vm.info": self.info,
            "vm.counters": self.counters,
            "vm.create": self.create,
            "vm.delete": self.delete,
            "vm.boot": self.boot,
            "vm.pause": self.pause,
            "vm.resume": self.resume,
            "vm.shutdown": self.shutdown,
            "vm.reboot": self.reboot,
            "vm.power-button": self.power_button,
            "vm.nmi": self.nmi,
            "vm.resize": self.resize,
            "vm.resize-zone": self.resize_zone,
            "vm.resize-disk": self.resize_disk,
            "vm.remove-device": self.remove_device,
            "vm.snapshot": self.snapshot,
            "vm.restore": self.restore,
            "vm.coredump": self.coredump,
            "vm.send-migration": self.send_migration,
            "vm.receive-migration": self.receive_migration,
        }
        for kind in DEVICE_KINDS:
            self.actions[kind.action] = self._adder(kind)

    # -- helpers ---------------------------------------------------------

    def _vm(self, what: str) -> Vm:
        """The VM's config exists (vm.create ran): else 404 "VM is not created"."""
        if self.vm is None:
            raise ApiFailure(404, what, "VM is not created")
        return self.vm

    def _booted(self, what: str) -> Vm:
        """A VM object exists (vm.boot ran): else 500 "VM is not running"."""
        if self.vm is None or not self.vm.instance:
            raise ApiFailure(500, what, "VM is not running")
        return self.vm

    def _exit_process(self) -> None:
        """Let the main thread run the orderly exit (it waits in sigwait)."""
        os.kill(os.getpid(), signal.SIGTERM)

    def _serial_up(self, config: dict[str, Any], what: str) -> None:
        """Bind ``serial.socket`` as upstream's pre_create_console_devices does: at vm.create
        (the config is stored even when this fails), again at vm.boot after a shutdown
        dropped it, at reboot, restore and migration receive."""
        serial = config.get("serial") or {}
        if self.serial is not None or serial.get("mode") != "Socket":
            return
        path = serial.get("socket")
        if not path:  # upstream unwraps the path here (a panic): refuse instead
            raise ApiFailure(500, what, "Error creating console devices",
                             "Error creating console device", "serial socket path missing")
        try:
            self.serial = SerialSocket(str(path))
        except OSError as exc:
            raise ApiFailure(500, what, "Error creating console devices",
                             "Error creating console device",
                             f"{os.strerror(exc.errno or 0)} (os error {exc.errno})") from None

    def drop_serial(self) -> None:
        """The VM object went (shutdown, reboot, delete, exit): its socket file goes too."""
        if self.serial is not None:
            self.serial.close()
            self.serial = None

    def _validate(self, config: dict[str, Any], what: str) -> None:
        try:
            validate_config(self.contract, config)
        except ConfigInvalid as exc:
            raise ApiFailure(exc.status, what, "Failed to validate config", *exc.chain) from None

    # -- VMM -------------------------------------------------------------

    def ping(self, _: Any) -> Reply:
        return Reply(
            200,
            {
                "build_version": BUILD_VERSION,
                "version": VERSION,
                "pid": os.getpid(),
                "features": ["kvm"],
            },
        )

    def vmm_shutdown(self, _: Any) -> Reply:
        """Upstream deletes the VM, writes vmm/shutdown, answers 200 (not the spec's 204)."""
        with self.lock:
            self._drop_vm()
            self.emit_vmm_shutdown()
        return Reply(200, after=self._exit_process)

    def emit_vmm_shutdown(self) -> None:
        if not self.shutdown_emitted:
            self.shutdown_emitted = True
            self.events.emit("vmm", "shutdown")

    # -- lifecycle ---------------------------------------------------------

    def info(self, _: Any) -> Reply:
        with self.lock:
            vm = self._vm("The VM info is not available")
            body: dict[str, Any] = {
                "config": copy.deepcopy(vm.config),
                "state": str(vm.reported_state),
                "memory_actual_size": vm.memory_actual_size(),
            }
            if vm.instance:
                body["device_tree"] = {
                    ident: {"id": ident, "resources": [], "children": [], "pci_bdf": vm.bdf(ident)}
                    for ident in vm.pci
                }
            return Reply(200, body)

    def counters(self, _: Any) -> Reply:
        with self.lock:
            vm = self._booted("The VM info is not available")  # sic: upstream's wording
            result: dict[str, dict[str, int]] = {}
            for kind, entry in _device_entries(vm.config):
                if kind.config_key == "disks":
                    result[entry["id"]] = dict(_IDLE_DISK_COUNTERS)
                elif kind.config_key == "net":
                    result[entry["id"]] = dict(_IDLE_NET_COUNTERS)
            return Reply(200, result)

    def create(self, config: dict[str, Any]) -> Reply:
        """Store the config; upstream validates nothing until vm.boot."""
        what = "The VM could not be created"
        with self.lock:
            if self.vm is not None:
                raise ApiFailure(500, what, "VM is already created")
            if self.receiving:
                raise ApiFailure(500, what, "A migration is being received")
            config = copy.deepcopy(config)
            config.setdefault("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
            config.setdefault("memory", {"size": _DEFAULT_MEMORY})
            self.vm = Vm(config=config)  # device ids stay unset until vm.boot names them
            self._serial_up(config, what)
        return Reply(204)

    def delete(self, _: Any) -> Reply:
        with self.lock:
            self._drop_vm()
        return Reply(204)

    def _drop_vm(self) -> None:
        """vm.delete: shut a VM object down first (event vm/shutdown), then forget it all."""
        if self.vm is None:
            return
        if self.vm.instance:
            self.events.emit("vm", "shutdown")
        self.vm = None
        self.drop_serial()
        self.events.emit("vm", "deleted")

    def boot(self, _: Any) -> Reply:
        what = "The VM could not boot"
        with self.lock:
            if self.vm is not None and self.vm.instance:
                raise ApiFailure(500, what, "VM is already created")  # before any event
            self.events.emit("vm", "booting")
            if self.vm is None:
                raise ApiFailure(404, what, "VM config is missing")
            vm = self.vm
            self._serial_up(vm.config, what)
            self._validate(vm.config, what)
            vm.assign_ids()
            self._load_kernel(vm, what)
            try:
                vm.start_instance(VmState.RUNNING)
            except RuntimeError as exc:
                vm.drop_instance()
                raise ApiFailure(500, what, "Error from device manager", str(exc)) from None
            self.events.emit("vm", "booted")
        return Reply(204)

    @staticmethod
    def _load_kernel(vm: Vm, what: str) -> None:
        """The one file the double looks at: a missing kernel fails the boot after the VM
        object was built, as upstream (the object stays, state Created)."""
        kernel = (vm.config.get("payload") or {}).get("kernel")
        if kernel and not os.path.exists(kernel):
            vm.drop_instance()
            vm.instance = True
            vm.guest_stopped = False
            raise ApiFailure(500, what, "Cannot open kernel file",
                             "No such file or directory (os error 2)")

    def pause(self, _: Any) -> Reply:
        what = "The VM could not be paused"
        with self.lock:
            vm = self._booted(what)
            self.events.emit("vm", "pausing")
            self._transition(vm, VmState.PAUSED, what, "Cannot pause VM",
                             "Failed to pause migratable component")
            self.events.emit("vm", "paused")
        return Reply(204)

    def resume(self, _: Any) -> Reply:
        what = "The VM could not resume"
        with self.lock:
            vm = self._booted(what)
            self.events.emit("vm", "resuming")
            self._transition(vm, VmState.RUNNING, what, "Cannot resume VM",
                             "Failed to resume migratable component")
            self.events.emit("vm", "resumed")
            if vm.pending_power_off and self._guest_powered_off(vm):
                return Reply(204, after=self._exit_process)
        return Reply(204)

    @staticmethod
    def _transition(vm: Vm, new: VmState, *chain: str) -> None:
        try:
            check_transition(vm.state, new)
        except ValueError as exc:
            raise ApiFailure(500, *chain, f"Invalid transition: {exc}") from None
        vm.state = new

    def shutdown(self, _: Any) -> Reply:
        """The VM object goes, the config stays: vm.info says Created, vm.boot works."""
        what = "The VM could not shutdown"
        with self.lock:
            vm = self._booted(what)
            self._transition(vm, VmState.SHUTDOWN, what)
            vm.drop_instance()
            self.drop_serial()
            self.events.emit("vm", "shutdown")
        return Reply(204)

    def reboot(self, _: Any) -> Reply:
        """Shut the VM object down and build and boot a new one from the same config."""
        what = "The VM could not reboot"
        with self.lock:
            self.events.emit("vm", "rebooting")
            vm = self.vm
            if vm is None or not vm.instance:
                raise ApiFailure(404, what, "VM is not created")
            self._transition(vm, VmState.SHUTDOWN, what)
            vm.drop_instance()
            self.drop_serial()  # the client is cut off, the socket bound anew
            self._serial_up(vm.config, what)
            kernel = (vm.config.get("payload") or {}).get("kernel")
            if kernel and not os.path.exists(kernel):
                raise ApiFailure(500, what, "Cannot open kernel file",
                                 "No such file or directory (os error 2)")
            vm.start_instance(VmState.RUNNING)
            self.events.emit("vm", "rebooted")
        return Reply(204)

    def power_button(self, _: Any) -> Reply:
        """The simulated guest reacts to the ACPI power button by powering off."""
        with self.lock:
            vm = self._booted("Error triggering power button")
            if vm.state == VmState.RUNNING:
                if self._guest_powered_off(vm):
                    return Reply(204, after=self._exit_process)  # answer first, then exit
            elif vm.state == VmState.PAUSED:
                vm.pending_power_off = True  # the guest reacts once it runs again
        return Reply(204)

    def nmi(self, _: Any) -> Reply:
        with self.lock:
            self._booted("Error triggering NMI")
        return Reply(204)

    def _guest_powered_off(self, vm: Vm) -> bool:
        """Upstream's guest-exit path: the whole VMM shuts down unless --no-shutdown.
        True when the process is to exit (the caller makes that happen)."""
        _log(logging.INFO, "guest powered off")
        if not self.exit_on_guest_shutdown:  # the pre-v54 double: stay, report Shutdown
            vm.drop_instance()
            self.drop_serial()
            vm.guest_stopped = True
            self.events.emit("vm", "shutdown")
            return False
        if self.no_shutdown:
            vm.drop_instance()
            self.drop_serial()
            self.events.emit("vm", "shutdown")
            return False
        self._drop_vm()
        self.emit_vmm_shutdown()
        return True

    # -- guest hooks (signals) --------------------------------------------

    def guest_power_off(self) -> bool:
        """SIGUSR1: the guest shuts itself down. True when the VMM is to exit now."""
        with self.lock:
            vm = self.vm
            if vm is None or not vm.instance or vm.state not in (VmState.RUNNING, VmState.PAUSED):
                _log(logging.WARNING, "SIGUSR1 ignored: no running or paused VM")
                return False
            return self._guest_powered_off(vm)

    def guest_reboot(self) -> None:
        """SIGUSR2: the guest reboots itself (upstream rebuilds the VM object)."""
        with self.lock:
            vm = self.vm
            if vm is None or not vm.instance or vm.state != VmState.RUNNING:
                _log(logging.WARNING, "SIGUSR2 ignored: no running VM")
                return
            self.events.emit("vm", "rebooting")
            self.drop_serial()
            try:
                self._serial_up(vm.config, "guest reboot")
            except ApiFailure as exc:
                _log(logging.WARNING, "serial socket not rebound", error=str(exc))
            vm.start_instance(VmState.RUNNING)
            self.events.emit("vm", "rebooted")

    # -- sizing ----------------------------------------------------------

    def resize(self, body: dict[str, Any]) -> Reply:
        what = "The VM could not be resized"
        with self.lock:
            vm = self._vm(what)
            cpus = vm.config["cpus"]
            memory = vm.config["memory"]
            vcpus = body.get("desired_vcpus")
            ram = body.get("desired_ram")
            balloon = body.get("desired_balloon")
            if not vm.instance:  # a created VM: only the config changes, unchecked
                if vcpus is not None:
                    cpus["boot_vcpus"] = vcpus
                if ram is not None:
                    memory["size"] = ram
                if balloon is not None and vm.config.get("balloon"):
                    vm.config["balloon"]["size"] = balloon
                return Reply(204)
            self.events.emit("vm", "resizing")
            if vcpus is not None:
                if vcpus > cpus["max_vcpus"]:
                    raise ApiFailure(500, what, "Error from CPU manager",
                                     "Requested vCPUs exceed maximum")
                cpus["boot_vcpus"] = vcpus
            if ram is not None:
                self._resize_ram(vm, ram, what)
            if balloon is not None:
                self._resize_balloon(vm, balloon, what)
            self.events.emit("vm", "resized")
        return Reply(204)

    @staticmethod
    def _resize_ram(vm: Vm, ram: int, what: str) -> None:
        """Upstream's MemoryManager::resize, then the config update it always does."""
        memory = vm.config["memory"]
        if memory.get("zones"):
            raise ApiFailure(500, what, "Memory manager error", "Impossible to resize guest "
                             "memory if it is backed by user defined memory regions")
        size = int(memory["size"])
        hotplug = int(memory.get("hotplug_size") or 0)
        if memory.get("hotplug_method", "Acpi") == "VirtioMem":
            if ram < size:
                raise ApiFailure(500, what, "Memory manager error", "Invalid resize request: "
                                 f"desired_size = {ram} below boot size = {size}")
            if ram - size > hotplug:
                raise ApiFailure(500, what, "Memory manager error", "Failed to virtio-mem resize")
            if ram > size:
                memory["hotplugged_size"] = ram - size
            else:
                memory.pop("hotplugged_size", None)
            return
        if ram > vm.current_ram:  # ACPI: a DIMM is added; shrinking does nothing live
            if (ram - vm.current_ram) % _ACPI_DIMM:
                raise ApiFailure(500, what, "Memory manager error",
                                 "The requested hotplug memory addition is not a valid size")
            if ram > vm.boot_ram + hotplug:
                raise ApiFailure(500, what, "Memory manager error",
                                 "Not enough space in the hotplug RAM region")
            vm.current_ram = ram
        memory["size"] = ram  # a reboot comes up with the last size asked for

    @staticmethod
    def _resize_balloon(vm: Vm, size: int, what: str) -> None:
        balloon = vm.config.get("balloon")
        if not balloon:
            raise ApiFailure(500, what, "Error from device manager",
                             "Missing virtio-balloon, can't proceed as expected")
        if size > vm.memory_actual_size() + int(balloon.get("size", 0)):
            raise ApiFailure(500, what, "Error from device manager",
                             "Failed to resize virtio-balloon")
        balloon["size"] = size

    def resize_zone(self, body: dict[str, Any]) -> Reply:
        what = "The memory zone could not be resized"
        with self.lock:
            vm = self._vm(what)
            zones = vm.config["memory"].get("zones") or []
            zone = next((z for z in zones if z.get("id") == body["id"]), None)
            if zone is None:
                raise ApiFailure(500, what, "Failed resizing a memory zone")
            ram = body["desired_ram"]
            if not vm.instance:
                zone["size"] = ram
                return Reply(204)
            if ram < zone["size"]:
                raise ApiFailure(500, what, "Memory manager error", "Invalid resize request: "
                                 f"desired_size = {ram} below boot size = {zone['size']}")
            if ram - zone["size"] > int(zone.get("hotplug_size") or 0):
                raise ApiFailure(500, what, "Memory manager error", "Failed to virtio-mem resize")
            zone["hotplugged_size"] = ram - zone["size"]
        return Reply(204)

    def resize_disk(self, body: dict[str, Any]) -> Reply:
        what = "The disk could not be resized"
        with self.lock:
            vm = self._vm(what)
            if not vm.instance:
                raise ApiFailure(500, what, "Failed resizing a disk image")
            disks = {d["id"] for d in vm.config.get("disks") or ()}
            if body["id"] not in disks:
                raise ApiFailure(404, what, "Error from device manager",
                                 "Failed to find device corresponding to the given "
                                 f"identifier: {body['id']}")
            vm.disk_sizes[body["id"]] = body["desired_size"]
        return Reply(204)

    # -- devices ---------------------------------------------------------

    def _adder(self, kind: DeviceKind) -> Callable[[Any], Reply]:
        def add(body: dict[str, Any]) -> Reply:
            return self.add_device(kind, body)

        return add

    def add_device(self, kind: DeviceKind, entry: dict[str, Any]) -> Reply:
        """Cold (config only, 204) on a created VM, hot (200 + PCI address) on a booted one.
        The whole config is validated again first; no event either way."""
        what = f"The {kind.what} could not be added to the VM"
        with self.lock:
            vm = self._vm(what)
            entry = copy.deepcopy(entry)
            if kind.single and vm.config.get(kind.config_key):
                raise ApiFailure(500, what, "Too many virtio-vsock devices")
            candidate = copy.deepcopy(vm.config)
            if kind.single:
                candidate[kind.config_key] = entry
            else:
                candidate.setdefault(kind.config_key, []).append(entry)
            self._validate(candidate, what)
            slot = None
            if vm.instance:
                self._lock_image(vm, kind, entry, what)
                try:
                    slot = vm.allocate_slot(entry)
                except RuntimeError as exc:
                    raise ApiFailure(500, what, "Error from device manager", str(exc)) from None
            if slot is not None and entry.get("id") is None:  # cold: named at vm.boot
                entry["id"] = f"{kind.prefix}{vm.next_device_index}"
                vm.next_device_index += 1
            if kind.single:
                vm.config[kind.config_key] = entry
            else:
                vm.config.setdefault(kind.config_key, []).append(entry)
            if slot is None:
                return Reply(204)
            vm.pci[entry["id"]] = slot
            return Reply(200, {"id": entry["id"], "bdf": vm.bdf(entry["id"])})

    @staticmethod
    def _lock_image(vm: Vm, kind: DeviceKind, entry: dict[str, Any], what: str) -> None:
        """The real VMM locks a disk image when it opens it (shared for read-only disks),
        so a second disk on the file of a running one fails."""
        if kind.config_key != "disks" or not entry.get("path"):
            return
        readonly = bool(entry.get("readonly"))
        for other in vm.config.get("disks") or ():
            if other.get("path") == entry["path"] and not (readonly and other.get("readonly")):
                mode = "Read" if readonly else "Write"
                raise ApiFailure(500, what, "Error from device manager",
                                 "Cannot lock images of all block devices",
                                 f"Failed to get {mode} lock for disk image: {entry['path']}",
                                 "The file is already locked")

    def remove_device(self, body: dict[str, Any]) -> Reply:
        """Hot or cold; the simulated guest ejects at once. No event."""
        what = "The device could not be removed from the VM"
        with self.lock:
            vm = self._vm(what)
            ident = body["id"]
            for kind in DEVICE_KINDS:
                value = vm.config.get(kind.config_key)
                if kind.single and isinstance(value, dict) and value.get("id") == ident:
                    del vm.config[kind.config_key]
                    break
                if not kind.single and value:
                    kept = [e for e in value if e.get("id") != ident]
                    if len(kept) != len(value):
                        vm.config[kind.config_key] = kept
                        break
            else:
                if vm.instance:
                    raise ApiFailure(404, what, "Error from device manager",
                                     "Failed to find device corresponding to the given "
                                     f"identifier: {ident}")
                raise ApiFailure(404, what, f"No device with id {json.dumps(ident)} to remove")
            vm.pci.pop(ident, None)
            vm.disk_sizes.pop(ident, None)
        return Reply(204)

    # -- snapshot / restore / coredump -----------------------------------

    def snapshot(self, body: dict[str, Any]) -> Reply:
        """Only while Paused. ``snapshotted`` is written before the files are, so a bad
        destination still emits it (and answers 500), as upstream."""
        what = "The VM could not be snapshotted"
        with self.lock:
            vm = self._booted(what)
            self.events.emit("vm", "snapshotting")
            if vm.state != VmState.PAUSED:
                raise ApiFailure(500, what, "Cannot snapshot VM",
                                 "Failed to snapshot migratable component",
                                 "Trying to snapshot while VM is running")
            self.events.emit("vm", "snapshotted")
            send = ("Cannot send VM snapshot", "Failed to send migratable component snapshot")
            try:
                directory = _file_url(body["destination_url"])
            except ValueError as exc:
                raise ApiFailure(500, what, *send, str(exc)) from None
            if not os.path.isdir(directory):
                raise ApiFailure(500, what, *send, _not_a_directory(directory))
            try:
                self._write_json(os.path.join(directory, "config.json"), vm.config)
                self._write_json(os.path.join(directory, "state.json"), vm.export_state())
                with open(os.path.join(directory, "memory-ranges"), "wb") as ranges:
                    # upstream's MemoryRangeTable layout: (gpa, length) u64 pairs
                    ranges.write(struct.pack("<QQ", 0, _total_memory(vm.config)))
            except OSError as exc:
                raise ApiFailure(500, what, *send, str(exc)) from None
        return Reply(204)

    @staticmethod
    def _write_json(path: str, doc: Any) -> None:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(doc, out, indent=2)

    def restore(self, body: dict[str, Any]) -> Reply:
        """Into a fresh process only; the VM comes up Paused (or resumed on request)."""
        what = "The VM could not be restored"
        with self.lock:
            if self.vm is not None:
                raise ApiFailure(500, what, "VM is already created")
            fail = (what, "Cannot restore VM", "Failed to send migratable component snapshot")
            try:
                directory = _file_url(body["source_url"])
            except ValueError as exc:
                raise ApiFailure(500, *fail, str(exc)) from None
            if not os.path.isdir(directory):
                raise ApiFailure(500, *fail, _not_a_directory(directory))
            try:
                with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
                    config = json.load(f)
                with open(os.path.join(directory, "state.json"), encoding="utf-8") as f:
                    state = json.load(f)
                if not os.path.isfile(os.path.join(directory, "memory-ranges")):
                    raise ValueError(f"{directory}/memory-ranges is missing")
                problem = self.contract.validate(self.contract.schema("VmConfig"), config)
                if problem:
                    raise ValueError(f"config.json: {problem}")
                self.events.emit("vm", "restoring")
                vm = Vm.from_export(config, state, VmState.PAUSED)
            except (ValueError, OSError, KeyError, TypeError, IndexError) as exc:
                raise ApiFailure(500, what, "Cannot restore VM", str(exc)) from None
            self._serial_up(config, what)
            self.vm = vm
            self.events.emit("vm", "restored")
            if body.get("resume"):
                self.events.emit("vm", "resuming")
                vm.state = VmState.RUNNING
                self.events.emit("vm", "resumed")
        return Reply(204)

    def coredump(self, body: dict[str, Any]) -> Reply:
        what = "The VM could not be coredumped"
        with self.lock:
            vm = self._booted(what)
            if vm.state != VmState.PAUSED:
                raise ApiFailure(
                    500, what, "Error coredumping VM", "Trying to coredump while VM is running"
                )
            try:
                with open(_file_url(body["destination_url"]), "wb") as out:
                    out.write(b"\x7fELF\x02\x01\x01")  # an ELF header stub, no guest memory
            except (ValueError, OSError) as exc:
                raise ApiFailure(500, what, "Error coredumping VM", str(exc)) from None
        return Reply(204)

    # -- live migration --------------------------------------------------

    def receive_migration(self, body: dict[str, Any]) -> Reply:
        """Listen on ``unix:<path>``, take one VM from a sending double, run it.

        Blocks until the migration ends, like upstream, but without holding
        the VMM lock, so ``vm.info``/``vmm.shutdown`` still answer meanwhile.
        """
        what = "Error starting migration receiver"
        url = body["receiver_url"]
        with self.lock:
            if self.vm is not None:
                raise ApiFailure(500, what, "VM is already created")
            if self.receiving:
                raise ApiFailure(500, what, "A migration is already being received")
            try:
                listener, path = _migration_listener(url)
            except ValueError as exc:
                raise ApiFailure(500, what, "Error parsing receiver_url", str(exc)) from None
            except OSError as exc:
                raise ApiFailure(500, what, "Error binding migration listener", str(exc)) from None
            self.receiving = True
            self.receive_path = path
        self.events.emit("vm", "migration-receive-ready")
        try:
            try:
                conn, _ = listener.accept()
                self.events.emit("vm", "migration-receive-started")
            finally:
                listener.close()
                if path:
                    _unlink_quietly(path)
                self.receive_path = None
            with conn:
                conn.settimeout(_MIGRATION_TIMEOUT)
                try:
                    vm = self._accept_migrated_vm(_recv_line(conn, _MIGRATION_LIMIT))
                    _send_line(conn, b"OK")
                except (ValueError, OSError, KeyError, TypeError, IndexError) as exc:
                    self.events.emit("vm", "migration-receive-failed")
                    with contextlib.suppress(OSError):
                        _send_line(conn, b"ERR " + str(exc).encode())
                    raise ApiFailure(500, what, "Error receiving migration", str(exc)) from None
            with self.lock:
                self.vm = vm
            for event in ("restoring", "restored", "resuming", "resumed",
                          "migration-receive-finished"):
                self.events.emit("vm", event)
            return Reply(204)
        finally:
            with self.lock:
                self.receiving = False

    def _accept_migrated_vm(self, raw: bytes) -> Vm:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("migration payload is not a JSON object")
        config = doc["config"]
        problem = self.contract.validate(self.contract.schema("VmConfig"), config)
        if problem:
            raise ValueError(f"migrated config: {problem}")
        vm = Vm.from_export(config, doc["state"], VmState.RUNNING)  # keeps PCI addresses
        with self.lock:
            if self.vm is not None:
                raise ValueError("VM is already created")
            try:
                self._serial_up(config, "Error creating console devices")
            except ApiFailure as exc:
                raise ValueError(": ".join(exc.chain[1:])) from None
        return vm

    def send_migration(self, body: dict[str, Any]) -> Reply:
        """Hand the VM to a receiving double; answers at once, as upstream does.

        The real VMM validates, answers 204 and migrates in a worker thread: the outcome is
        an event (``migration-finished``, after which the VMM deletes the VM and exits, or
        ``migration-failed``, after which the VM runs on here). Non-local migrations need no
        shared memory; ``local: true`` does."""
        what = "Error starting migration sender"
        url = body["destination_url"]
        with self.lock:
            self._booted(what)
            if not _migration_url_ok(url):
                raise ApiFailure(
                    400,
                    what,
                    "Error validating send migration parameters",
                    "destination_url must use tcp:<host>:<port> or unix:<path>.",
                )
            if url.startswith("unix:") and body.get("connections", 1) > 1:
                raise ApiFailure(
                    400,
                    what,
                    "Error validating send migration parameters",
                    "UNIX sockets and connections option cannot be used at the same time.",
                )
            if body.get("local") and not _memory_shared(self._booted(what).config):
                raise ApiFailure(
                    500,
                    what,
                    "Error sending migration",
                    "Migration requires shared memory or hugepages enabled",
                )
            self.events.emit("vm", "migration-started")
        threading.Thread(target=self._migrate, args=(url,), name="migration-worker",
                         daemon=True).start()
        return Reply(204)

    def _migrate(self, url: str) -> None:
        """The migration worker: send, then leave (success) or run on (failure)."""
        with self.lock:
            vm = self.vm
            if vm is None or not vm.instance:
                self.events.emit("vm", "migration-failed")
                return
            payload = json.dumps({"config": vm.config, "state": vm.export_state()}).encode()
        try:
            with _migration_connection(url) as sock:
                self.events.emit("vm", "migration-memory-iteration")
                _send_line(sock, payload)
                answer = _recv_line(sock, 65536).strip()
            if answer != b"OK":
                raise ValueError(answer.decode(errors="replace") or "receiver hung up")
        except (OSError, ValueError) as exc:
            _log(logging.WARNING, "migration failed", error=str(exc))
            self.events.emit("vm", "migration-failed")
            return
        with self.lock:
            for event in ("pausing", "paused", "snapshotting", "snapshotted",
                          "migration-finished"):
                self.events.emit("vm", event)
            self.vm = None
            self.events.emit("vm", "deleted")
            self.emit_vmm_shutdown()
        self._exit_process()


def _migration_url_ok(url: str) -> bool:
    if url.startswith("unix:"):
        return len(url) > len("unix:")
    return url.startswith("tcp:") and _tcp_address(url) is not None


def _tcp_address(url: str) -> tuple[str, int] | None:
    """``tcp:<host>:<port>`` (IPv6 hosts in brackets) as (host, port), None if malformed."""
    host, sep, port = url[len("tcp:") :].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def _migration_listener(url: str) -> tuple[socket.socket, str | None]:
    """A listening socket for ``receiver_url``, and the unix path to remove afterwards."""
    if not _migration_url_ok(url):
        raise ValueError(f"{url!r}: use tcp:<host>:<port> or unix:<path>")
    if url.startswith("unix:"):
        path: str | None = url[len("unix:") :]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = path
    else:
        path, target = None, _tcp_address(url)
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(target)
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock, path


def _migration_connection(url: str) -> socket.socket:
    """A connected socket to a receiver (``url`` already validated)."""
    if url.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(_MIGRATION_TIMEOUT)
        try:
            sock.connect(url[len("unix:") :])
        except OSError:
            sock.close()
            raise
        return sock
    address = _tcp_address(url)
    assert address is not None
    return socket.create_connection(address, timeout=_MIGRATION_TIMEOUT)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class SerialSocket:
    """``serial: {mode: Socket}``: the guest's serial port on a listening unix socket.

    As upstream (recorded with the real v54, see the module docstring): bound in place (an
    existing file fails with EADDRINUSE), one client at a time (a new connection disconnects
    the previous one), the client's bytes go to the guest, and the guest, which the double
    does not run, writes nothing back. :meth:`close` removes the socket file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
            self._listener.listen(8)
        except OSError:
            self._listener.close()
            raise
        self._lock = threading.Lock()
        self._client: socket.socket | None = None
        self._closed = False
        threading.Thread(target=self._serve, name="serial", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                previous, self._client = self._client, conn
            if previous is not None:
                with contextlib.suppress(OSError):
                    previous.shutdown(socket.SHUT_RDWR)
            threading.Thread(target=self._drain, args=(conn,), name="serial-in",
                             daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        """Input for the guest's UART, which the double has no guest to read."""
        with conn:
            while True:
                try:
                    if not conn.recv(4096):
                        break
                except OSError:
                    break
            with self._lock:
                if self._client is conn:
                    self._client = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        _unlink_quietly(self.path)


# --------------------------------------------------------------------------
# HTTP over the unix socket
# --------------------------------------------------------------------------


class Api:
    """Request -> Reply with the contract checked on both sides (no HTTP here)."""

    def __init__(self, contract: Contract, vmm: Vmm) -> None:
        self.contract = contract
        self.vmm = vmm

    def handle(self, method: str, path: str, raw: bytes) -> Reply:
        action = path[len(API_PREFIX) :] if path.startswith(API_PREFIX) else None
        ops = self.contract.operations.get(action) if action else None
        op = ops.get(method) if ops else None
        try:
            if action is None or ops is None:
                raise HttpFailure(404, "Not Found")
            if op is None:
                if method in ("GET", "PUT") or action == "vm.create":
                    raise HttpFailure(400, "Bad Request")
                raise HttpFailure(400)  # PATCH/DELETE: upstream's generic handler, no body
            body = self.contract.check_request(action, op, raw)
            handler = self.vmm.actions.get(action)
            if handler is None:
                raise ApiFailure(500, f"{action} is not supported by the test double")
            reply = handler(body)
        except (ApiFailure, HttpFailure) as failure:
            reply = _error_reply(failure)
        except Exception as exc:  # a bug in the double must not kill the connection
            _log(logging.ERROR, "handler crashed", action=action, error=repr(exc), exc_info=True)
            reply = _error_reply(ApiFailure(500, "Internal error in the test double", repr(exc)))
        if reply.status == 400 and reply.body is None:
            return reply  # the HTTP layer's bare 400: nothing to check
        problem = self.contract.check_response(op, reply.status, reply.body)
        if problem is not None:
            _log(
                logging.ERROR,
                "response violates the OpenAPI contract",
                method=method,
                path=path,
                status=reply.status,
                body=reply.body,
                problem=problem,
            )
            reply = _error_reply(
                ApiFailure(500, "The test double sent a response outside the contract", problem)
            )
        return reply


class DoubleServer(socketserver.ThreadingUnixStreamServer):
    """One thread per connection; daemon threads so exit never waits on clients."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: str, api: Api) -> None:
        self.api = api
        super().__init__(address, ApiHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log as JSON instead of socketserver's traceback dump on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            _log(logging.DEBUG, "client went away", error=repr(exc))
        else:
            _log(logging.ERROR, "connection handler failed", error=repr(exc), exc_info=True)


class ApiHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, like micro_http; all routing lives in ``Api``."""

    protocol_version = "HTTP/1.1"
    wbufsize = -1  # buffered: status, headers and body leave in one write
    server: DoubleServer

    def version_string(self) -> str:
        return "Cloud Hypervisor API"

    def log_message(self, format: str, *args: Any) -> None:
        _log(logging.DEBUG, format % args)

    def do_GET(self) -> None:
        self._serve()

    do_PUT = do_PATCH = do_DELETE = do_GET

    def do_POST(self) -> None:
        """micro_http parses GET, PUT, PATCH and DELETE only; anything else gets its own
        raw-text 400 and the connection is dropped."""
        self.close_connection = True
        self._send(Reply(400, raw=_UNSUPPORTED_METHOD_BODY, close=True), time.monotonic(),
                   self.path.split("?", 1)[0])

    do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = do_POST

    def _serve(self) -> None:
        path = self.path.split("?", 1)[0]
        started = time.monotonic()
        self._send(self._read_and_handle(path), started, path)

    def _send(self, reply: Reply, started: float, path: str) -> None:
        if reply.raw is not None:
            payload = reply.raw
        else:
            payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        if payload or reply.status not in (204, 400):
            self.send_header("Content-Type", "application/json")
        if reply.status != 204:
            self.send_header("Content-Length", str(len(payload)))
        if self.close_connection or reply.close:
            self.close_connection = True
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        finally:  # a client that hung up must not cancel vmm.shutdown
            _log(
                logging.INFO,
                "request",
                method=self.command,
                path=path,
                status=reply.status,
                ms=round((time.monotonic() - started) * 1000, 2),
            )
            if reply.after is not None:
                reply.after()

    def _read_and_handle(self, path: str) -> Reply:
        encoding = self.headers.get("Transfer-Encoding", "identity").lower()
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True
            return _error_reply(ApiFailure(400, "Bad Request", "Invalid Content-Length"))
        if encoding != "identity":
            self.close_connection = True
            return _error_reply(
                ApiFailure(400, "Bad Request", f"Transfer-Encoding {encoding} is not supported")
            )
        if length > MAX_BODY:
            if length <= _DRAIN_LIMIT:
                self.rfile.read(length)
            else:
                self.close_connection = True
            return _error_reply(
                ApiFailure(
                    400,
                    "Invalid request body",
                    f"Request body of {length} bytes exceeds the limit of {MAX_BODY} bytes",
                )
            )
        raw = self.rfile.read(length) if length else b""
        return self.server.api.handle(self.command, path, raw)


# --------------------------------------------------------------------------
# Process
# --------------------------------------------------------------------------


def _parse_options(value: str, bare_key: str) -> dict[str, str]:
    """Parse upstream's ``key=value,key=value`` syntax; a bare value means ``bare_key``."""
    if "=" not in value:
        return {bare_key: value}
    opts: dict[str, str] = {}
    for part in value.split(","):
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError(f"invalid option {part!r} in {value!r}")
        opts[key.strip()] = val
    return opts


class _ClapLikeParser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors; the VMM exits 1."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(1, f"error: {message}\n")


class _VersionAction(argparse.Action):
    """The real VMM's two lines (argparse's own version action would rewrap them)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(f"cloud-hypervisor {BUILD_VERSION}\nMigration Protocol Versions: 0")
        parser.exit(0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _ClapLikeParser(
        prog="cloud-hypervisor",
        description="Test double of the Cloud Hypervisor VMM (API only, no guest).",
        allow_abbrev=False,
    )
    parser.add_argument("--version", "-V", action=_VersionAction, nargs=0,
                        help="print the version and exit")
    parser.add_argument(
        "--api-socket", metavar="path=<file>", help="HTTP API unix socket (path=... or a bare path)"
    )
    parser.add_argument("--event-monitor", metavar="path=<file>", help="event sink (file or fifo)")
    parser.add_argument("-v", dest="verbose", action="count", default=0, help="more logging")
    parser.add_argument("--log-file", metavar="PATH", help="also write logs to PATH")
    parser.add_argument("--seccomp", choices=("true", "false", "log"), help="accepted, ignored")
    parser.add_argument("--no-shutdown", action="store_true",
                        help="do not exit the VMM when the guest shuts down")
    args = parser.parse_args(argv)
    if not args.api_socket:
        parser.error("the test double needs --api-socket path=<file>")
    opts = _parse_options(args.api_socket, "path")
    if set(opts) != {"path"} or not opts["path"]:
        parser.error(f"--api-socket: only path=<file> is supported, got {args.api_socket!r}")
    args.socket_path = opts["path"]
    return args


def _configure_logging(verbose: int, log_file: str | None) -> None:
    formatter = _JsonFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)
    log.setLevel((logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)])
    log.propagate = False


def _bind(path: str, api: Api) -> DoubleServer:
    """Bind under a temporary name and rename, so the path exists only when listening."""
    _unlink_quietly(path)
    directory, name = os.path.split(path)
    temp = os.path.join(directory, f".{name}.{os.getpid()}")
    if len(os.fsencode(temp)) >= 108:  # sun_path limit: bind in place instead
        return DoubleServer(path, api)
    _unlink_quietly(temp)
    server = DoubleServer(temp, api)
    os.rename(temp, path)
    return server


def _socket_delay() -> float:
    raw = os.environ.get(SOCKET_DELAY_ENV, "")
    try:
        return max(float(raw), 0.0) if raw else 0.0
    except ValueError:
        _log(logging.WARNING, "ignoring invalid socket delay", value=raw)
        return 0.0


GUEST_AGENT_PORT: Final = 1024


def _emulate_guest_vsock(vmm: Vmm, hooks_dir: str) -> None:
    """The VM's vsock device, with the Hyperfleet guest agent listening inside the guest."""
    from ..guestagent.program import GuestAgent

    agent = GuestAgent(hooks_dir, os.path.join(hooks_dir, "state"))
    listener: socket.socket | None = None
    bound: str | None = None
    while True:
        vm = vmm.vm
        wanted = ((vm.config.get("vsock") or {}).get("socket") if vm else None)
        if wanted != bound:
            if listener is not None:
                listener.close()
                _unlink_quietly(bound or "")
            listener, bound = None, wanted
            if wanted:
                _unlink_quietly(wanted)
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(wanted)
                listener.listen(16)
                listener.settimeout(0.1)
        if listener is None:
            time.sleep(0.1)
            continue
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_guest_connection, args=(vmm, agent, conn),
                         daemon=True).start()


def _guest_connection(vmm: Vmm, agent: Any, conn: socket.socket) -> None:
    """One host connection. A host that hangs up or stalls is routine (it gave up on a
    slow guest): logged, never a thread traceback."""
    with conn:
        conn.settimeout(30)
        f = conn.makefile("rwb")
        try:
            hello = f.readline(256).decode(errors="replace").split()
            vm = vmm.vm
            running = vm is not None and vm.state == VmState.RUNNING
            if len(hello) != 2 or hello[0] != "CONNECT" or hello[1] != str(GUEST_AGENT_PORT) \
                    or not running:
                return  # nothing listens on that guest port (or the guest is not running)
            f.write(b"OK 1073741824\n")
            f.flush()
            agent.serve_connection(f, f)
        except OSError as exc:
            _log(logging.INFO, "vsock connection closed early", error=str(exc))
        finally:
            with contextlib.suppress(OSError):
                f.close()  # flushes: a reply the host no longer reads must not raise here


def main(argv: list[str] | None = None) -> int:
    """Run one VMM: serve the API until SIGTERM/SIGINT or ``vmm.shutdown``."""
    started = time.monotonic()
    args = parse_args(argv)
    _configure_logging(args.verbose, args.log_file)
    try:  # before masking signals: opening a fifo blocks until a reader appears
        events = EventMonitor.open(args.event_monitor)
    except (OSError, ValueError) as exc:
        print(f"Error: cannot open the event monitor: {exc}", file=sys.stderr)
        return 1
    # Signals go to the main thread's sigwait only; threads inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
    events.emit("vmm", "starting")
    contract = Contract.load()
    vmm = Vmm(contract, events, no_shutdown=args.no_shutdown)
    path: str = args.socket_path

    delay = _socket_delay()
    deadline = time.monotonic() + delay
    while (remaining := deadline - time.monotonic()) > 0:
        sig = signal.sigtimedwait(_HANDLED_SIGNALS, remaining)
        if sig is not None and sig.si_signo in (signal.SIGTERM, signal.SIGINT):
            events.emit("vmm", "shutdown")
            events.close()
            return 0

    try:
        server = _bind(path, Api(contract, vmm))
    except OSError as exc:
        print(f"Error: cannot bind the API socket {path}: {exc}", file=sys.stderr)
        return 1
    threading.Thread(
        target=server.serve_forever, args=(3600.0,), name="api", daemon=True
    ).start()
    hooks = os.environ.get(GUEST_HOOKS_ENV)
    if hooks:
        threading.Thread(target=_emulate_guest_vsock, args=(vmm, hooks), name="vsock",
                         daemon=True).start()
    _log(
        logging.INFO,
        "api socket ready",
        socket=path,
        startup_ms=round((time.monotonic() - started) * 1000, 1),
    )

    while True:
        signo = signal.sigwait(_HANDLED_SIGNALS)
        if signo == signal.SIGUSR1:
            if vmm.guest_power_off():
                break
        elif signo == signal.SIGUSR2:
            vmm.guest_reboot()
        else:
            break

    _unlink_quietly(path)
    with vmm.lock:
        vmm.drop_serial()
    if vmm.receive_path is not None:  # a receiver still waiting for its sender
        _unlink_quietly(vmm.receive_path)
    with vmm.lock:
        vmm.emit_vmm_shutdown()  # unless vmm.shutdown or a guest power-off already did
    events.close()
    _log(logging.INFO, "vmm exiting", signal=signal.Signals(signo).name)
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
