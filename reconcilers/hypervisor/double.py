"""Contract-enforcing test double of the cloud-hypervisor VMM.

There is no ``cloud-hypervisor`` binary on developer or CI machines, so the
node agent is tested against this executable instead. It has the VMM's CLI,
serves the VMM's REST API on a unix socket and, so that it cannot drift from
the real thing, checks every request and every response it sends against the
upstream OpenAPI document shipped in this package (``openapi.yaml``). The
behaviour facts it reproduces are in ``shared/cloud-hypervisor/NOTES.md``.

CLI (one process per VM, like the real VMM)::

    hyperfleet-ch-double --api-socket path=/run/vm.sock \\
        [--event-monitor path=/run/vm.events] [-v ...] [--log-file PATH]
    python -m hyperfleet.reconcilers.hypervisor.double ...   # same thing
    hyperfleet-ch-double --version    # "cloud-hypervisor v53.0.0", exit 0

``--api-socket`` also takes a bare path (older releases). Unknown flags exit
with status 1 and a message on stderr. ``--seccomp`` is accepted and ignored.

Test hooks (simulate the guest; the real VMM has no such thing):

* ``SIGUSR1``: the guest powers itself off. Running/Paused -> Shutdown, event
  ``vm/shutdown``. Ignored in any other state.
* ``SIGUSR2``: the guest reboots itself. Events ``vm/rebooting`` and
  ``vm/rebooted``; the state stays Running. Ignored unless Running.
* ``HYPERFLEET_CH_DOUBLE_SOCKET_DELAY=<seconds>``: wait that long before
  creating the API socket, to exercise clients that must wait for it.
* ``HYPERFLEET_CH_DOUBLE_GUEST_HOOKS=<dir>``: the guest runs the Hyperfleet guest
  agent (hooks from ``<dir>``) on vsock port 1024. The VM's vsock unix socket then
  answers ``CONNECT 1024`` with ``OK`` while the VM is Running (a paused or stopped
  guest does not answer, as with a real one).
* ``HYPERFLEET_CH_DOUBLE_EXIT_ON_GUEST_SHUTDOWN=1``: after a guest power-off
  (power button, SIGUSR1) the whole process exits, as an upstream VMM does when
  its guest exits. Off by default: the VM then stays in state Shutdown and can
  be booted again.

Quirks worth knowing:

* The socket path appears only once it accepts connections (bound under a
  temporary name, then renamed), so "file exists" means "ready".
* Every error body is a JSON array of strings starting with
  ``"Error from API"``, e.g. ``["Error from API", "The VM could not be
  paused", "Invalid VM state transition: Paused to Paused"]``.
* ``vm.receive-migration`` and ``vm.send-migration`` block until the
  migration ends, as upstream: call the receiver from another thread, wait
  for it to listen (``unix:<path>`` appears, ``tcp:<host>:<port>`` accepts),
  then call the sender. Both transports work, but only between two doubles
  (the wire format is a JSON line).
* No file named in a VM config (kernel, disks, sockets) is opened.
* Events: besides those in NOTES.md, ``vmm/starting`` at start,
  ``vm/device-added`` and ``vm/device-removed`` (properties ``{"id": ...}``)
  on hot plug, and ``migration-receive-{started,finished,failed}`` on the
  receiving side.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from http.server import BaseHTTPRequestHandler
from typing import Any, Final, TextIO

VERSION: Final = "53.0.0"
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
_PCI_SLOTS: Final = range(1, 32)  # slot 0 of each segment is the host bridge

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
# VM state machine (NOTES.md)
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
BOOTED_STATES: Final = frozenset({VmState.RUNNING, VmState.PAUSED, VmState.BREAKPOINT})


class ApiFailure(Exception):
    """An API error: HTTP status plus the error chain below "Error from API"."""

    def __init__(self, status: int, *chain: str) -> None:
        super().__init__(": ".join(chain))
        self.status = status
        self.chain = list(chain)


def check_transition(current: VmState, new: VmState) -> None:
    """Raise the upstream error message if ``current -> new`` is not allowed."""
    if new not in ALLOWED_TRANSITIONS[current]:
        raise ValueError(f"Invalid VM state transition: {current} to {new}")


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
_ERROR_BODY_HINT: Final = "error bodies must be a non-empty JSON array of strings"


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
        """Read the spec that ships inside the package (``../shared`` is not installed)."""
        from importlib.resources import files

        import yaml

        text = files(__package__ or "hyperfleet.reconcilers.hypervisor").joinpath(
            SPEC_RESOURCE
        ).read_text(encoding="utf-8")
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        spec = yaml.load(text, Loader=loader)
        if not isinstance(spec, dict) or "paths" not in spec:
            raise ValueError(f"{SPEC_RESOURCE} is not an OpenAPI document")
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

    def validate(self, schema: dict[str, Any], instance: Any) -> str | None:
        """Return a message naming the offending field, or None when valid."""
        from jsonschema.exceptions import best_match

        validator = self._validators.get(id(schema))
        if validator is None:
            validator = self._validators[id(schema)] = self._root.evolve(schema=schema)
        error = best_match(validator.iter_errors(instance))
        if error is None:
            return None
        where = ".".join(str(p) for p in error.absolute_path)
        return f"{where}: {error.message}" if where else str(error.message)

    def schema(self, name: str) -> dict[str, Any]:
        """A component schema by name, e.g. ``VmConfig``."""
        result: dict[str, Any] = self.spec["components"]["schemas"][name]
        return result

    def check_request(self, action: str, op: Operation, raw: bytes) -> Any:
        """Parse and validate a request body; raise 400 like upstream if it is bad."""
        if op.body_schema is None:
            return None  # upstream ignores bodies of body-less actions
        if not raw.strip():
            if op.body_required:
                raise ApiFailure(400, "Invalid request body", "Request body is required")
            return None
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiFailure(400, "Invalid request body", f"Malformed JSON: {exc}") from None
        problem = self.validate(op.body_schema, body)
        if problem is None and isinstance(body, dict):
            for name in _SERDE_REQUIRED.get(action, ()):
                if name not in body:
                    problem = f"missing field `{name}`"
                    break
        if problem is not None:
            raise ApiFailure(400, "Invalid request body", problem)
        return body

    def check_response(self, op: Operation | None, status: int, body: Any) -> str | None:
        """Why a response breaks the contract, or None.

        Success statuses must be declared for the operation with a matching
        body. Error statuses may be undeclared because the upstream document
        omits most of them (NOTES.md: every failure is a 500) but must carry
        the error-chain body.
        """
        if 200 <= status < 300:
            if op is None or status not in op.responses:
                return f"status {status} is not declared for this operation"
            schema = op.responses[status]
            if schema is None:
                return None if body is None else f"status {status} declares no content"
            if body is None:
                return f"status {status} requires a JSON body"
            return self.validate(schema, body)
        if op is not None and op.responses.get(status) is not None:
            schema = op.responses[status]
            assert schema is not None
            problem = self.validate(schema, body)
            if problem:
                return problem
        if not (isinstance(body, list) and body and all(isinstance(s, str) for s in body)):
            return _ERROR_BODY_HINT
        return None


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
        raise ValueError("Path missing when using a disk that is not vhost-user")
    if _needs_shared_memory(kind, entry) and not _memory_shared(config):
        raise ValueError("Using vhost-user requires using shared memory or huge pages")


class Conflict(ValueError):
    """Duplicate identifier or path: upstream answers 409, not 400."""


def _check_unique(entries: list[tuple[DeviceKind, dict[str, Any]]]) -> None:
    ids: set[str] = set()
    paths: set[str] = set()
    for kind, entry in entries:
        ident = entry.get("id")
        if ident is not None:
            if ident in ids:
                raise Conflict(f"Identifier {ident} is not unique")
            ids.add(ident)
        if kind.config_key in ("disks", "devices") and entry.get("path"):
            if entry["path"] in paths:
                raise Conflict(f"Device path is used twice: {entry['path']}")
            paths.add(entry["path"])


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


@dataclass
class Reply:
    """An answer to one API call; ``after`` runs once it has been sent."""

    status: int
    body: Any = None
    after: Callable[[], None] | None = None


def _error_reply(failure: ApiFailure) -> Reply:
    return Reply(failure.status, ["Error from API", *failure.chain])


@dataclass
class Vm:
    """The one VM a VMM process hosts."""

    config: dict[str, Any]
    state: VmState = VmState.CREATED
    next_device_index: int = 0  # upstream names devices _disk0, _net1, ... from one counter
    pci: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (segment, slot)
    disk_sizes: dict[str, int] = field(default_factory=dict)
    booted_at: float = 0.0
    pending_power_off: bool = False  # power button pressed while the guest was paused

    def export_state(self) -> dict[str, Any]:
        """What snapshot and migration carry besides the config."""
        return {
            "format": "hyperfleet-ch-double/1",
            "state": str(self.state),
            "next_device_index": self.next_device_index,
            "pci": {k: list(v) for k, v in self.pci.items()},
            "disk_sizes": dict(self.disk_sizes),
        }

    @classmethod
    def from_export(cls, config: dict[str, Any], state: Any, new_state: VmState) -> Vm:
        if not isinstance(state, dict) or state.get("format") != "hyperfleet-ch-double/1":
            raise ValueError("state.json was not written by this VMM")
        vm = cls(config=config, state=new_state)
        vm.next_device_index = int(state.get("next_device_index", 0))
        vm.pci = {str(k): (int(v[0]), int(v[1])) for k, v in state.get("pci", {}).items()}
        vm.disk_sizes = {str(k): int(v) for k, v in state.get("disk_sizes", {}).items()}
        vm.booted_at = time.monotonic()
        return vm

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

    def __init__(self, contract: Contract, events: EventMonitor) -> None:
        self.contract = contract
        self.events = events
        self.lock = threading.RLock()
        self.vm: Vm | None = None
        self.receiving = False
        self.receive_path: str | None = None
        self.exit_on_guest_shutdown = os.environ.get(EXIT_ON_GUEST_SHUTDOWN_ENV, "") not in (
            "",
            "0",
        )
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
        if self.vm is None:
            raise ApiFailure(404, what, "VM is not created")
        return self.vm

    def _booted(self, what: str) -> Vm:
        vm = self._vm(what)
        if vm.state not in BOOTED_STATES:
            raise ApiFailure(500, what, "VM is not running")
        return vm

    @staticmethod
    def _allow(vm: Vm, new: VmState, what: str) -> None:
        """Fail with upstream's 500 unless ``vm.state -> new`` is allowed."""
        try:
            check_transition(vm.state, new)
        except ValueError as exc:
            raise ApiFailure(500, what, str(exc)) from None

    def _exit_process(self) -> None:
        """Let the main thread run the orderly exit (it waits in sigwait)."""
        os.kill(os.getpid(), signal.SIGTERM)

    # -- VMM -------------------------------------------------------------

    def ping(self, _: Any) -> Reply:
        return Reply(
            200,
            {
                "build_version": f"v{VERSION}",
                "version": VERSION,
                "pid": os.getpid(),
                "features": ["kvm"],
            },
        )

    def vmm_shutdown(self, _: Any) -> Reply:
        with self.lock:
            self._drop_vm()
        return Reply(204, after=self._exit_process)

    # -- lifecycle ---------------------------------------------------------

    def info(self, _: Any) -> Reply:
        with self.lock:
            vm = self._vm("The VM info is not available")
            config = copy.deepcopy(vm.config)
            balloon = int((config.get("balloon") or {}).get("size", 0))
            body: dict[str, Any] = {
                "config": config,
                "state": str(vm.state),
                "memory_actual_size": max(_total_memory(config) - balloon, 0),
            }
            if vm.state in BOOTED_STATES:
                body["device_tree"] = {
                    ident: {"id": ident, "resources": [], "children": [], "pci_bdf": vm.bdf(ident)}
                    for ident in vm.pci
                }
            return Reply(200, body)

    def counters(self, _: Any) -> Reply:
        with self.lock:
            vm = self._booted("The VM counters are not available")
            ticks = int((time.monotonic() - vm.booted_at) * 1000)
            result: dict[str, dict[str, int]] = {}
            for kind, entry in _device_entries(vm.config):
                if kind.config_key == "disks":
                    result[entry["id"]] = {
                        "read_bytes": ticks * 4096,
                        "read_ops": ticks,
                        "write_bytes": ticks * 512,
                        "write_ops": ticks // 8,
                    }
                elif kind.config_key == "net":
                    result[entry["id"]] = {
                        "rx_bytes": ticks * 1500,
                        "rx_frames": ticks,
                        "tx_bytes": ticks * 750,
                        "tx_frames": ticks,
                    }
            return Reply(200, result)

    def create(self, config: dict[str, Any]) -> Reply:
        what = "The VM could not be created"
        with self.lock:
            if self.vm is not None:
                raise ApiFailure(500, what, "VM is already created")
            if self.receiving:
                raise ApiFailure(500, what, "A migration is being received")
            config = copy.deepcopy(config)
            config.setdefault("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
            config.setdefault("memory", {"size": _DEFAULT_MEMORY})
            try:
                self._validate_config(config)
            except Conflict as exc:
                raise ApiFailure(409, what, "Failed to validate config", str(exc)) from None
            except ValueError as exc:
                raise ApiFailure(400, what, "Failed to validate config", str(exc)) from None
            vm = Vm(config=config)
            vm.assign_ids()
            self.vm = vm
        return Reply(204)

    @staticmethod
    def _validate_config(config: dict[str, Any]) -> None:
        cpus = config["cpus"]
        if cpus["boot_vcpus"] > cpus["max_vcpus"]:
            raise ValueError("Max vCPUs lower than boot vCPUs")
        payload = config.get("payload") or {}
        if not any(payload.get(k) for k in ("kernel", "firmware", "igvm")):
            raise ValueError("No kernel specified")
        entries = list(_device_entries(config))
        _check_unique(entries)
        for kind, entry in entries:
            _validate_device(kind, entry, config)

    def delete(self, _: Any) -> Reply:
        with self.lock:
            self._drop_vm()
        return Reply(204)

    def _drop_vm(self) -> None:
        if self.vm is None:
            return
        if self.vm.state in BOOTED_STATES:
            self.events.emit("vm", "shutdown")
        self.vm = None
        self.events.emit("vm", "deleted")

    def boot(self, _: Any) -> Reply:
        what = "The VM could not boot"
        with self.lock:
            vm = self._vm(what)
            if vm.state in (VmState.PAUSED, VmState.BREAKPOINT):
                raise ApiFailure(500, what, "VM is already booted")
            self._allow(vm, VmState.RUNNING, what)
            self.events.emit("vm", "booting")
            vm.state = VmState.RUNNING
            try:
                vm.plug_all()
            except RuntimeError as exc:
                vm.state = VmState.SHUTDOWN
                raise ApiFailure(500, what, "Error from device manager", str(exc)) from None
            vm.booted_at = time.monotonic()
            vm.pending_power_off = False
            self.events.emit("vm", "booted")
        return Reply(204)

    def pause(self, _: Any) -> Reply:
        what = "The VM could not be paused"
        with self.lock:
            vm = self._booted(what)
            self._allow(vm, VmState.PAUSED, what)
            self.events.emit("vm", "pausing")
            vm.state = VmState.PAUSED
            self.events.emit("vm", "paused")
        return Reply(204)

    def resume(self, _: Any) -> Reply:
        what = "The VM could not resume"
        with self.lock:
            vm = self._booted(what)
            self._allow(vm, VmState.RUNNING, what)
            self.events.emit("vm", "resuming")
            vm.state = VmState.RUNNING
            self.events.emit("vm", "resumed")
            if vm.pending_power_off:
                self._power_off(vm)
        return Reply(204)

    def shutdown(self, _: Any) -> Reply:
        what = "The VM could not shutdown"
        with self.lock:
            vm = self._booted(what)
            self._allow(vm, VmState.SHUTDOWN, what)
            vm.state = VmState.SHUTDOWN
            vm.pci = {}
            self.events.emit("vm", "shutdown")
        return Reply(204)

    def reboot(self, _: Any) -> Reply:
        what = "The VM could not reboot"
        with self.lock:
            vm = self._booted(what)
            self._allow(vm, VmState.SHUTDOWN, what)  # a reboot is shutdown + boot
            self.events.emit("vm", "rebooting")
            vm.state = VmState.RUNNING
            vm.pending_power_off = False
            self.events.emit("vm", "rebooted")
        return Reply(204)

    def power_button(self, _: Any) -> Reply:
        with self.lock:
            vm = self._booted("Error triggering power button")
            if vm.state == VmState.RUNNING:
                self._power_off(vm)
            else:
                vm.pending_power_off = True  # the guest reacts once it runs again
        return Reply(204)

    def nmi(self, _: Any) -> Reply:
        with self.lock:
            self._booted("Error triggering NMI")
        return Reply(204)

    def _power_off(self, vm: Vm) -> None:
        check_transition(vm.state, VmState.SHUTDOWN)
        vm.state = VmState.SHUTDOWN
        vm.pci = {}
        vm.pending_power_off = False
        self.events.emit("vm", "shutdown")
        _log(logging.INFO, "guest powered off")
        if self.exit_on_guest_shutdown:
            self._exit_process()

    # -- guest hooks (signals) --------------------------------------------

    def guest_power_off(self) -> None:
        """SIGUSR1: the guest shuts itself down."""
        with self.lock:
            vm = self.vm
            if vm is None or vm.state not in (VmState.RUNNING, VmState.PAUSED):
                _log(logging.WARNING, "SIGUSR1 ignored: no running or paused VM")
                return
            self._power_off(vm)

    def guest_reboot(self) -> None:
        """SIGUSR2: the guest reboots itself."""
        with self.lock:
            vm = self.vm
            if vm is None or vm.state != VmState.RUNNING:
                _log(logging.WARNING, "SIGUSR2 ignored: no running VM")
                return
            self.events.emit("vm", "rebooting")
            self.events.emit("vm", "rebooted")

    # -- sizing ----------------------------------------------------------

    def resize(self, body: dict[str, Any]) -> Reply:
        what = "The VM could not be resized"
        with self.lock:
            vm = self._booted(what)
            cpus = vm.config["cpus"]
            memory = vm.config["memory"]
            vcpus = body.get("desired_vcpus")
            ram = body.get("desired_ram")
            balloon = body.get("desired_balloon")
            if vcpus is not None and vcpus > cpus["max_vcpus"]:
                raise ApiFailure(
                    500,
                    what,
                    "Error from CPU manager",
                    f"Desired vCPUs {vcpus} exceeds max_vcpus {cpus['max_vcpus']}",
                )
            if ram is not None:
                self._check_ram(memory, ram, what)
            if balloon is not None:
                if not vm.config.get("balloon"):
                    raise ApiFailure(500, what, "No balloon device configured")
                if balloon > _total_memory(vm.config):
                    raise ApiFailure(500, what, "Balloon size exceeds guest memory")
            if vcpus is None and ram is None and balloon is None:
                return Reply(204)
            self.events.emit("vm", "resizing")
            if vcpus is not None:
                cpus["boot_vcpus"] = vcpus
            if ram is not None:
                memory["hotplugged_size"] = ram - memory["size"]
            if balloon is not None:
                vm.config["balloon"]["size"] = balloon
            self.events.emit("vm", "resized")
        return Reply(204)

    @staticmethod
    def _check_ram(memory: dict[str, Any], ram: int, what: str) -> None:
        size = int(memory["size"])
        current = size + int(memory.get("hotplugged_size") or 0)
        if ram == current:
            return
        hotplug = memory.get("hotplug_size")
        if not hotplug:
            raise ApiFailure(
                500, what, "Memory manager error", "Memory hotplug is not enabled (hotplug_size)"
            )
        if ram < size or (ram < current and memory.get("hotplug_method", "Acpi") == "Acpi"):
            raise ApiFailure(
                500, what, "Memory manager error", f"Cannot shrink memory to {ram} bytes"
            )
        if ram > size + int(hotplug):
            raise ApiFailure(
                500, what, "Memory manager error", f"Desired memory {ram} exceeds size+hotplug_size"
            )

    def resize_zone(self, body: dict[str, Any]) -> Reply:
        what = "The memory zone could not be resized"
        with self.lock:
            vm = self._booted(what)
            zones = vm.config["memory"].get("zones") or []
            zone = next((z for z in zones if z.get("id") == body["id"]), None)
            if zone is None:
                raise ApiFailure(500, what, f"Unknown memory zone {body['id']}")
            self._check_ram(zone, body["desired_ram"], what)
            self.events.emit("vm", "resizing")
            zone["hotplugged_size"] = body["desired_ram"] - zone["size"]
            self.events.emit("vm", "resized")
        return Reply(204)

    def resize_disk(self, body: dict[str, Any]) -> Reply:
        what = "The disk could not be resized"
        with self.lock:
            vm = self._vm(what)
            disks = {d["id"] for d in vm.config.get("disks") or ()}
            if body["id"] not in disks:
                raise ApiFailure(404, what, f"Unknown device id {body['id']}")
            vm.disk_sizes[body["id"]] = body["desired_size"]
        return Reply(204)

    # -- devices ---------------------------------------------------------

    def _adder(self, kind: DeviceKind) -> Callable[[Any], Reply]:
        def add(body: dict[str, Any]) -> Reply:
            return self.add_device(kind, body)

        return add

    def add_device(self, kind: DeviceKind, entry: dict[str, Any]) -> Reply:
        what = f"The {kind.what} could not be added to the VM"
        with self.lock:
            vm = self._vm(what)
            entry = copy.deepcopy(entry)
            if kind.single and vm.config.get(kind.config_key):
                raise ApiFailure(
                    400, what, "Failed to validate config", f"Too many {kind.what}s"
                )
            try:
                existing = list(_device_entries(vm.config))
                _check_unique([*existing, (kind, entry)])
                _validate_device(kind, entry, vm.config)
            except Conflict as exc:
                raise ApiFailure(409, what, "Failed to validate config", str(exc)) from None
            except ValueError as exc:
                raise ApiFailure(400, what, "Failed to validate config", str(exc)) from None
            hotplug = vm.state in BOOTED_STATES
            slot = None
            if hotplug:
                try:
                    slot = vm.allocate_slot(entry)
                except RuntimeError as exc:
                    raise ApiFailure(500, what, "Error from device manager", str(exc)) from None
            if entry.get("id") is None:
                entry["id"] = f"{kind.prefix}{vm.next_device_index}"
                vm.next_device_index += 1
            if kind.single:
                vm.config[kind.config_key] = entry
            else:
                vm.config.setdefault(kind.config_key, []).append(entry)
            if slot is None:
                return Reply(204)
            vm.pci[entry["id"]] = slot
            self.events.emit("vm", "device-added", {"id": entry["id"]})
            return Reply(200, {"id": entry["id"], "bdf": vm.bdf(entry["id"])})

    def remove_device(self, body: dict[str, Any]) -> Reply:
        what = "The device could not be removed from the VM"
        with self.lock:
            vm = self._booted(what)
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
                raise ApiFailure(404, what, f"Unknown device id {ident}")
            vm.pci.pop(ident, None)
            vm.disk_sizes.pop(ident, None)
            self.events.emit("vm", "device-removed", {"id": ident})
        return Reply(204)

    # -- snapshot / restore / coredump -----------------------------------

    def snapshot(self, body: dict[str, Any]) -> Reply:
        what = "The VM could not be snapshotted"
        with self.lock:
            vm = self._booted(what)
            if vm.state != VmState.PAUSED:
                raise ApiFailure(
                    500, what, "Error snapshotting VM", "Trying to snapshot while VM is running"
                )
            try:
                directory = _file_url(body["destination_url"])
                if not os.path.isdir(directory):
                    raise ValueError(f"Snapshot directory {directory} does not exist")
                self.events.emit("vm", "snapshotting")
                self._write_json(os.path.join(directory, "config.json"), vm.config)
                self._write_json(os.path.join(directory, "state.json"), vm.export_state())
                with open(os.path.join(directory, "memory-ranges"), "wb") as ranges:
                    # upstream's MemoryRangeTable layout: (gpa, length) u64 pairs
                    ranges.write(struct.pack("<QQ", 0, _total_memory(vm.config)))
            except (ValueError, OSError) as exc:
                raise ApiFailure(500, what, "Error snapshotting VM", str(exc)) from None
            self.events.emit("vm", "snapshotted")
        return Reply(204)

    @staticmethod
    def _write_json(path: str, doc: Any) -> None:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(doc, out, indent=2)

    def restore(self, body: dict[str, Any]) -> Reply:
        what = "The VM could not be restored"
        with self.lock:
            if self.vm is not None:
                raise ApiFailure(404, what, "VM is already created")
            try:
                directory = _file_url(body["source_url"])
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
                check_transition(VmState.CREATED, VmState.PAUSED)
                vm = Vm.from_export(config, state, VmState.PAUSED)
            except (ValueError, OSError, KeyError, TypeError, IndexError) as exc:
                raise ApiFailure(500, what, "Error restoring VM", str(exc)) from None
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
        self.events.emit("vm", "migration-receive-started")
        try:
            try:
                conn, _ = listener.accept()
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
            self.events.emit("vm", "migration-receive-finished")
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
        return vm

    def send_migration(self, body: dict[str, Any]) -> Reply:
        """Hand the VM to a receiving double over ``unix:<path>``; the VM leaves."""
        what = "Error starting migration sender"
        url = body["destination_url"]
        with self.lock:
            vm = self._booted(what)
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
            if not _memory_shared(vm.config):
                raise ApiFailure(
                    500,
                    what,
                    "Error sending migration",
                    "Migration requires shared memory or hugepages enabled",
                )
            payload = json.dumps({"config": vm.config, "state": vm.export_state()}).encode()
            self.events.emit("vm", "migration-started")
            try:
                with _migration_connection(url) as sock:
                    _send_line(sock, payload)
                    answer = _recv_line(sock, 65536).strip()
                if answer != b"OK":
                    raise ValueError(answer.decode(errors="replace") or "receiver hung up")
            except (OSError, ValueError) as exc:
                self.events.emit("vm", "migration-failed")
                raise ApiFailure(500, what, "Error sending migration", str(exc)) from None
            self.vm = None
            self.events.emit("vm", "migration-finished")
        return Reply(204)


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
                raise ApiFailure(404, "Not found", f"No API endpoint {path}")
            if op is None:
                allowed = ", ".join(sorted(ops))
                raise ApiFailure(
                    400, "Bad Request", f"Method {method} is not allowed on {path} (use {allowed})"
                )
            body = self.contract.check_request(action, op, raw)
            handler = self.vmm.actions.get(action)
            if handler is None:
                raise ApiFailure(500, f"{action} is not supported by the test double")
            reply = handler(body)
        except ApiFailure as failure:
            reply = _error_reply(failure)
        except Exception as exc:  # a bug in the double must not kill the connection
            _log(logging.ERROR, "handler crashed", action=action, error=repr(exc), exc_info=True)
            reply = _error_reply(ApiFailure(500, "Internal error in the test double", repr(exc)))
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

    do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _serve(self) -> None:
        path = self.path.split("?", 1)[0]
        started = time.monotonic()
        reply = self._read_and_handle(path)
        payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        if reply.status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _ClapLikeParser(
        prog="cloud-hypervisor",
        description="Test double of the Cloud Hypervisor VMM (API only, no guest).",
        allow_abbrev=False,
    )
    parser.add_argument("--version", "-V", action="version", version=f"cloud-hypervisor v{VERSION}")
    parser.add_argument(
        "--api-socket", metavar="path=<file>", help="HTTP API unix socket (path=... or a bare path)"
    )
    parser.add_argument("--event-monitor", metavar="path=<file>", help="event sink (file or fifo)")
    parser.add_argument("-v", dest="verbose", action="count", default=0, help="more logging")
    parser.add_argument("--log-file", metavar="PATH", help="also write logs to PATH")
    parser.add_argument("--seccomp", choices=("true", "false", "log"), help="accepted, ignored")
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
    from ..guest import GuestAgent

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
    vmm = Vmm(contract, events)
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
            vmm.guest_power_off()
        elif signo == signal.SIGUSR2:
            vmm.guest_reboot()
        else:
            break

    _unlink_quietly(path)
    if vmm.receive_path is not None:  # a receiver still waiting for its sender
        _unlink_quietly(vmm.receive_path)
    events.emit("vmm", "shutdown")
    events.close()
    _log(logging.INFO, "vmm exiting", signal=signal.Signals(signo).name)
    logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
