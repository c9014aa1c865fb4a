"""Record what a REAL cloud-hypervisor answers, as transcripts the test double is replayed against.

The double (``hyperfleet.reconcilers.testing.chdouble``) was written from documents; this
script asks the genuine VMM instead, so ``tests/unit/test_ch_transcripts.py`` can hold the
double to what the real one does. It drives the binary through a fixed list of named
scenarios over its API socket and writes ``transcripts.json``: per scenario, the ordered
steps, each call with its request, status, response body, the ``source:event`` strings the
event monitor wrote during that call and, after the call, what ``vm.info`` says.

usage::

    python -m tests.ch_transcripts.record [--ch-binary PATH] [--kernel PATH] [--out FILE]
                                          [--only NAME ...]

``--ch-binary`` defaults to ``$HYPERFLEET_CH_BINARY``; ``--kernel`` (an ELF vmlinux) to
``$HYPERFLEET_CH_KERNEL`` or whatever ``shared/cloud-hypervisor/ch-build/get-vmlinux.sh``
prints last. Runs as root with a usable ``/dev/kvm``.

Replay needs no host paths: requests are stored with placeholders (``{kernel}``,
``{workdir}``) that are substituted when driving, and response bodies are normalised back
(workdir, kernel and the VMM's pid become ``{workdir}``, ``{kernel}``, ``{pid}``). Files the
scenario needs (raw disks made like ``truncate``, snapshot directories) are steps of their
own. Every process started here is stopped again by pid, whatever happens.

Not recorded, on purpose: anything that depends on the guest running (``vm.power-button``,
``vm.nmi``, counters moving, serial output): under this machine's PVM the guest hangs, so
those answers describe PVM, not cloud-hypervisor. ``vm.add-net`` is left out too: without a
``tap`` it creates a tap device on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from hyperfleet.reconcilers.hypervisor.events import parse_events

MiB: Final = 1 << 20
API_PREFIX: Final = "/api/v1/"
KERNEL: Final = "{kernel}"
WORKDIR: Final = "{workdir}"
PID: Final = "{pid}"
HERE: Final = Path(__file__).resolve().parent
DEFAULT_OUT: Final = HERE / "transcripts.json"
GET_VMLINUX: Final = "cloud-hypervisor/ch-build/get-vmlinux.sh"
SOCKET_TIMEOUT: Final = 10.0
EXIT_TIMEOUT: Final = 10.0
# Device lists of VmConfig whose entries carry an "id" (vsock is a single object).
DEVICE_LISTS: Final = ("disks", "net", "fs", "pmem", "devices", "vdpa", "user_devices",
                       "generic_vhost_user")

Step = dict[str, Any]


# --------------------------------------------------------------------------
# Pieces the replay test shares, so both sides encode and read alike
# --------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket: the VMM's API listens on nothing else."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


@dataclass
class Answer:
    """One HTTP answer; ``body`` is parsed JSON, None when empty, else the raw text."""

    status: int
    body: Any


def http_call(sock: str, method: str, action: str, data: bytes | None,
              timeout: float = 60.0) -> Answer:
    """One request on a fresh connection (the agent's client does the same)."""
    conn = UnixHTTPConnection(sock, timeout)
    try:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, API_PREFIX + action, body=data, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
        status = resp.status
    finally:
        conn.close()
    if not text:
        return Answer(status, None)
    try:
        return Answer(status, json.loads(text))
    except ValueError:
        return Answer(status, text)


def encode_request(step: Step, mapping: dict[str, str]) -> bytes | None:
    """The bytes a call step sends: ``raw`` verbatim, else ``request`` as compact-ish JSON."""
    if "raw" in step:
        return str(substitute(step["raw"], mapping)).encode()
    if "request" in step:
        return json.dumps(substitute(step["request"], mapping)).encode()
    return None


def substitute(value: Any, mapping: dict[str, str]) -> Any:
    """Replace placeholders (keys of ``mapping``) in every string of a JSON value."""
    if isinstance(value, str):
        for key, real in mapping.items():
            value = value.replace(key, real)
        return value
    if isinstance(value, list):
        return [substitute(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, mapping) for k, v in value.items()}
    return value


def normalise(value: Any, mapping: dict[str, str], pid: int | None) -> Any:
    """The inverse of ``substitute`` for response bodies, plus the VMM's pid. Object keys
    are sorted: the VMM serialises Rust HashMaps, whose order changes from run to run."""
    reverse = {real: key for key, real in sorted(mapping.items(), key=lambda kv: -len(kv[1]))}
    out = _sorted_keys(substitute(value, reverse))
    if isinstance(out, dict) and pid is not None and out.get("pid") == pid:
        out = {**out, "pid": PID}
    return out


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def read_events(path: str) -> list[str]:
    """Events written so far, as ``source:event``; a half-written last one is left out."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    return [f"{e['source']}:{e['event']}" for e in parse_events(text)[0]]


def settle_events(path: str, seen: int, expect: str | None = None,
                  timeout: float = 10.0, quiet: float = 0.08) -> list[str]:
    """New events since ``seen``, once ``expect`` arrived and the file stayed unchanged
    for ``quiet`` seconds (the real VMM writes an event just before it answers)."""
    deadline = time.monotonic() + timeout
    events = read_events(path)
    while expect is not None and expect not in events[seen:] and time.monotonic() < deadline:
        time.sleep(0.02)
        events = read_events(path)
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet and time.monotonic() < deadline:
        time.sleep(0.02)
        now = read_events(path)
        if len(now) != len(events):
            events, quiet_since = now, time.monotonic()
    return events[seen:]


def device_ids(config: dict[str, Any]) -> list[str]:
    """Sorted ids of every device in a VmConfig."""
    ids = [str(e.get("id")) for key in DEVICE_LISTS for e in config.get(key) or ()]
    vsock = config.get("vsock")
    if isinstance(vsock, dict):
        ids.append(str(vsock.get("id")))
    return sorted(ids)


def project_info(body: Any) -> dict[str, Any]:
    """The parts of a ``vm.info`` body the double must reproduce exactly.

    The real config also carries many defaults the double does not echo (``kvm_hyperv``,
    ``rng``, ``thp``...) and a device tree with internal nodes and BAR addresses; those
    are left out on purpose.
    """
    if not isinstance(body, dict):
        return {"body": body}
    config = body.get("config") or {}
    cpus = config.get("cpus") or {}
    memory = config.get("memory") or {}
    return {
        "state": body.get("state"),
        "boot_vcpus": cpus.get("boot_vcpus"),
        "max_vcpus": cpus.get("max_vcpus"),
        "memory_size": memory.get("size"),
        "hotplug_size": memory.get("hotplug_size"),
        "hotplugged_size": memory.get("hotplugged_size"),
        "memory_actual_size": body.get("memory_actual_size"),
        "devices": device_ids(config),
        "device_tree": "device_tree" in body,
    }


def info_after(sock: str) -> dict[str, Any]:
    """What ``vm.info`` says right after a call: status, and the projection when 200."""
    answer = http_call(sock, "GET", "vm.info", None)
    if answer.status != 200:
        return {"status": answer.status}
    return {"status": 200, **project_info(answer.body)}


# --------------------------------------------------------------------------
# Driving the real VMM
# --------------------------------------------------------------------------


@dataclass
class Proc:
    """One VMM process of a scenario."""

    tag: str
    popen: subprocess.Popen[bytes]
    sock: str
    events: str
    seen: int = 0


@dataclass
class Recorder:
    """Runs scenarios against one binary and collects their steps."""

    binary: str
    kernel: str
    workdir: Path
    steps: list[Step] = field(default_factory=list)
    procs: dict[str, Proc] = field(default_factory=dict)
    current: str | None = None

    @property
    def mapping(self) -> dict[str, str]:
        return {KERNEL: self.kernel, WORKDIR: str(self.workdir)}

    def path(self, placeholder_path: str) -> str:
        return str(substitute(placeholder_path, self.mapping))

    # -- host setup ------------------------------------------------------

    def file(self, name: str, size: int) -> str:
        """A sparse raw disk image, like ``truncate -s``; returns its placeholder path."""
        placeholder = f"{WORKDIR}/{name}"
        with open(self.path(placeholder), "wb") as f:
            f.truncate(size)
        self.steps.append({"op": "file", "path": placeholder, "size": size})
        return placeholder

    def mkdir(self, name: str) -> str:
        placeholder = f"{WORKDIR}/{name}"
        os.makedirs(self.path(placeholder), exist_ok=True)
        self.steps.append({"op": "mkdir", "path": placeholder})
        return placeholder

    def listdir(self, placeholder: str) -> None:
        files = sorted(os.listdir(self.path(placeholder)))
        self.steps.append({"op": "listdir", "path": placeholder, "files": files})

    # -- processes -------------------------------------------------------

    def start(self, tag: str) -> None:
        sock = str(self.workdir / f"{tag}.sock")
        events = str(self.workdir / f"{tag}.events")
        with open(self.workdir / f"{tag}.log", "wb") as log:
            popen = subprocess.Popen(
                [self.binary, "--api-socket", f"path={sock}", "--event-monitor", f"path={events}",
                 "-v"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc = Proc(tag, popen, sock, events)
        self.procs[tag] = proc
        self.current = tag
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while not os.path.exists(sock):
            if popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{tag}: no API socket; log: {self.log_tail(tag)}")
            time.sleep(0.01)
        new = settle_events(events, 0)
        proc.seen += len(new)
        self.steps.append({"op": "start", "proc": tag, "events": new})

    def log_tail(self, tag: str) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / f"{tag}.log").read_text()[-2000:]
        return ""

    def wait_exit(self, tag: str) -> None:
        """After vmm.shutdown: the exit code and whatever was written on the way out."""
        proc = self.procs[tag]
        try:
            code: int | None = proc.popen.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
            stop(proc.popen)
        new = settle_events(proc.events, proc.seen)
        proc.seen += len(new)
        self.steps.append({"op": "exit", "proc": tag, "exit_code": code, "events": new,
                           "socket_left": os.path.exists(proc.sock)})
        if self.current == tag:
            self.current = None

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop(proc.popen)

    # -- API calls -------------------------------------------------------

    def call(self, method: str, action: str, request: Any = None, *, raw: str | None = None,
             label: str | None = None, expect_event: str | None = None) -> Answer:
        """One exchange; ``request`` uses placeholders. ``vm.info`` is asked afterwards."""
        assert self.current is not None, "no VMM process running"
        proc = self.procs[self.current]
        step: Step = {"op": "call", "proc": proc.tag, "label": label or f"{method} {action}",
                      "method": method, "action": action}
        if raw is not None:
            step["raw"] = raw
        elif request is not None:
            step["request"] = request
        answer = http_call(proc.sock, method, action, encode_request(step, self.mapping))
        new = settle_events(proc.events, proc.seen, expect_event)
        proc.seen += len(new)
        step.update(status=answer.status,
                    body=normalise(answer.body, self.mapping, proc.popen.pid),
                    events=new)
        exiting = action == "vmm.shutdown" and answer.status < 300
        if not exiting and action != "vm.info" and proc.popen.poll() is None:
            step["after"] = info_after(proc.sock)
        self.steps.append(step)
        print(f"  {proc.tag} {step['label']:<44} -> {answer.status} {json.dumps(step['body'])[:150]}"
              f" {new}", file=sys.stderr, flush=True)
        return answer

    def get(self, action: str, label: str | None = None) -> Answer:
        return self.call("GET", action, label=label)

    def put(self, action: str, request: Any = None, *, label: str | None = None,
            expect_event: str | None = None) -> Answer:
        return self.call("PUT", action, request, label=label, expect_event=expect_event)

    def shutdown_vmm(self, label: str | None = None) -> None:
        assert self.current is not None
        tag = self.current
        self.put("vmm.shutdown", label=label)
        self.wait_exit(tag)


def stop(popen: subprocess.Popen[bytes]) -> None:
    """Stop one process we started, by its pid: TERM, then KILL."""
    if popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(popen.pid, signal.SIGTERM)
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(popen.pid, signal.SIGKILL)
        popen.wait(timeout=5)


# --------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------


def vm_config(**extra: Any) -> dict[str, Any]:
    """A small guest: 1 vCPU (max 2), 256 MiB (+256 MiB hotplug), no serial or console."""
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 2},
        "memory": {"size": 256 * MiB, "hotplug_size": 256 * MiB},
        "payload": {"kernel": KERNEL, "cmdline": "console=ttyS0 panic=-1"},
        "serial": {"mode": "Null"},
        "console": {"mode": "Off"},
    }
    config.update(extra)
    return config


def lifecycle(r: Recorder) -> None:
    """create, boot, pause/resume and their refusals, reboot, shutdown -> Created, boot again,
    delete -> 404, and the process stays usable."""
    disk0 = r.file("disk0.img", 64 * MiB)
    r.start("a")
    r.get("vmm.ping")
    r.put("vm.create", vm_config(disks=[{"path": disk0, "id": "disk0"}]))
    r.get("vm.info", "vm.info after create")
    r.put("vm.boot")
    r.get("vm.info", "vm.info after boot")
    r.put("vm.boot", label="vm.boot while Running")
    r.put("vm.pause")
    r.put("vm.pause", label="vm.pause while Paused")
    r.put("vm.boot", label="vm.boot while Paused")
    r.put("vm.resume")
    r.put("vm.resume", label="vm.resume while Running")
    r.put("vm.reboot", expect_event="vm:rebooted")
    r.put("vm.shutdown")
    r.get("vm.info", "vm.info after shutdown")
    r.put("vm.shutdown", label="vm.shutdown again")
    r.put("vm.pause", label="vm.pause after shutdown")
    r.put("vm.boot", label="vm.boot after shutdown")
    r.put("vm.pause", label="vm.pause before reboot")
    r.put("vm.reboot", label="vm.reboot while Paused", expect_event="vm:rebooted")
    r.put("vm.pause", label="vm.pause before shutdown")
    r.put("vm.shutdown", label="vm.shutdown while Paused")
    r.put("vm.reboot", label="vm.reboot after shutdown")
    r.put("vm.boot", label="vm.boot once more")
    r.put("vm.delete", label="vm.delete while Running")
    r.get("vm.info", "vm.info after delete")
    r.put("vm.delete", label="vm.delete again")
    r.put("vm.create", vm_config(), label="vm.create after delete")
    r.shutdown_vmm("vmm.shutdown with a created VM")


def no_vm_errors(r: Recorder) -> None:
    """Every VM action before vm.create: which are 404, which 500, which succeed."""
    snap = r.mkdir("snap")
    r.start("a")
    r.get("vm.info")
    r.put("vm.boot")
    r.put("vm.pause")
    r.put("vm.resume")
    r.put("vm.shutdown")
    r.put("vm.reboot")
    r.put("vm.snapshot", {"destination_url": f"file://{snap}"})
    r.put("vm.power-button")
    r.put("vm.nmi")
    r.get("vm.counters")
    r.put("vm.resize", {"desired_vcpus": 2})
    r.put("vm.resize-disk", {"id": "disk0", "desired_size": 128 * MiB})
    r.put("vm.remove-device", {"id": "disk0"})
    r.put("vm.add-disk", {"path": f"{WORKDIR}/disk0.img", "id": "disk0"})
    r.put("vm.delete")
    r.shutdown_vmm()


def create_does_not_validate(r: Recorder) -> None:
    """vm.create accepts what deserializes; validation (400) and the kernel (500) come at
    vm.boot. A failed kernel load leaves a VM object behind that vm.delete shuts down."""
    disk1 = r.file("disk1.img", 64 * MiB)
    r.start("a")
    r.put("vm.create", {"cpus": {"boot_vcpus": 2, "max_vcpus": 1}, "payload": {"kernel": KERNEL}},
          label="vm.create boot_vcpus > max_vcpus")
    r.put("vm.add-disk", {"path": disk1, "id": "disk1"}, label="vm.add-disk on an invalid config")
    r.put("vm.boot", label="vm.boot invalid config")
    r.put("vm.delete", label="vm.delete invalid config")
    r.put("vm.create", {"memory": {"size": 256 * MiB}}, label="vm.create without payload")
    r.put("vm.boot", label="vm.boot without payload")
    r.put("vm.delete", label="vm.delete without payload")
    r.put("vm.create", vm_config(payload={"kernel": f"{WORKDIR}/missing/vmlinux"}),
          label="vm.create kernel file missing")
    r.put("vm.boot", label="vm.boot kernel file missing")
    r.put("vm.boot", label="vm.boot again after the failed boot")
    r.put("vm.delete", label="vm.delete after the failed boot")
    r.shutdown_vmm()


def config_errors_at_boot(r: Recorder) -> None:
    """Config problems serde cannot see (duplicate ids, reserved vsock CIDs, vhost-user
    without shared memory) pass vm.create and fail vm.boot; serde's own are 400 at once."""
    r.start("a")
    r.put("vm.create", vm_config(disks=[{"path": f"{WORKDIR}/a.img", "id": "x"},
                                        {"path": f"{WORKDIR}/b.img", "id": "x"}]),
          label="vm.create duplicate disk ids")
    r.put("vm.boot", label="vm.boot duplicate disk ids")
    r.put("vm.delete")
    r.put("vm.create", vm_config(vsock={"cid": 2, "socket": f"{WORKDIR}/v.sock"}),
          label="vm.create vsock cid 2")
    r.put("vm.boot", label="vm.boot vsock cid 2")
    r.put("vm.delete")
    r.put("vm.create", vm_config(fs=[{"tag": "t", "socket": f"{WORKDIR}/fs.sock",
                                      "num_queues": 1, "queue_size": 1024}]),
          label="vm.create virtio-fs without shared memory")
    r.put("vm.boot", label="vm.boot virtio-fs without shared memory")
    r.put("vm.delete")
    r.put("vm.remove-device", {}, label="vm.remove-device without id")
    r.shutdown_vmm()


def create_twice(r: Recorder) -> None:
    """A second vm.create is refused; the first config stays."""
    r.start("a")
    r.put("vm.create", vm_config())
    r.put("vm.create", vm_config(cpus={"boot_vcpus": 2, "max_vcpus": 2}), label="vm.create again")
    r.shutdown_vmm()


def create_without_max_vcpus(r: Recorder) -> None:
    """``cpus`` without ``max_vcpus`` does not deserialize (400, no VM)."""
    r.start("a")
    r.put("vm.create", {"cpus": {"boot_vcpus": 1}, "payload": {"kernel": KERNEL}})
    r.shutdown_vmm()


def malformed_json(r: Recorder) -> None:
    """Bodies that are not JSON, and a PUT without a body."""
    r.start("a")
    r.call("PUT", "vm.create", raw="{not json", label="vm.create malformed JSON")
    r.call("PUT", "vm.create", label="vm.create without a body")
    r.call("PUT", "vm.resize", label="vm.resize without a body")
    r.shutdown_vmm()


def unknown_action(r: Recorder) -> None:
    """Actions the router does not know."""
    r.start("a")
    r.put("vm.nosuch")
    r.get("vmm.nosuch")
    r.shutdown_vmm()


def wrong_method(r: Recorder) -> None:
    """Known actions with a method they do not take."""
    r.start("a")
    r.get("vm.create")
    r.put("vm.info")
    r.put("vmm.ping")
    r.call("POST", "vm.boot")
    r.shutdown_vmm()


def resize(r: Recorder) -> None:
    """vm.resize: config-only on a created VM, live on a running one, and its limits."""
    r.start("a")
    r.put("vm.create", vm_config())
    r.put("vm.resize", {"desired_vcpus": 2}, label="vm.resize vcpus on Created")
    r.put("vm.resize", {"desired_ram": 512 * MiB}, label="vm.resize ram on Created")
    r.put("vm.resize", {"desired_vcpus": 1, "desired_ram": 256 * MiB},
          label="vm.resize back on Created")
    r.put("vm.boot")
    r.put("vm.resize", {"desired_vcpus": 2}, label="vm.resize vcpus 1->2")
    r.put("vm.resize", {"desired_ram": 512 * MiB}, label="vm.resize ram 256->512 MiB")
    r.get("vm.info", "vm.info after resize")
    r.put("vm.resize", {"desired_vcpus": 3}, label="vm.resize vcpus over max")
    r.put("vm.resize", {"desired_ram": 1024 * MiB}, label="vm.resize ram over hotplug room")
    r.put("vm.resize", {"desired_ram": 256 * MiB}, label="vm.resize ram shrink (ACPI)")
    r.put("vm.resize", {}, label="vm.resize with nothing to do")
    r.shutdown_vmm()


def hotplug(r: Recorder) -> None:
    """Disk cold add/remove on a created VM, hot add/remove on a running one, conflicts,
    and the image lock a second disk on the same file runs into."""
    disk0 = r.file("disk0.img", 64 * MiB)
    disk1 = r.file("disk1.img", 64 * MiB)
    r.start("a")
    r.put("vm.create", vm_config(disks=[{"path": disk0, "id": "disk0"}]))
    r.put("vm.add-disk", {"path": disk1, "id": "disk1"}, label="vm.add-disk cold")
    r.put("vm.add-disk", {"path": disk1, "id": "disk1"}, label="vm.add-disk cold duplicate id")
    r.put("vm.remove-device", {"id": "disk1"}, label="vm.remove-device cold")
    r.put("vm.remove-device", {"id": "nosuch"}, label="vm.remove-device cold unknown id")
    r.put("vm.boot")
    r.get("vm.counters")
    r.put("vm.add-disk", {"path": disk1, "id": "disk1"}, label="vm.add-disk hot")
    r.put("vm.add-disk", {"path": disk1, "id": "disk1"}, label="vm.add-disk hot duplicate id")
    r.put("vm.add-disk", {"path": disk0, "id": "disk2"}, label="vm.add-disk same path as disk0")
    r.get("vm.info", "vm.info after hotplug")
    r.put("vm.remove-device", {"id": "disk1"}, label="vm.remove-device hot")
    r.put("vm.remove-device", {"id": "nosuch"}, label="vm.remove-device unknown id")
    r.put("vm.resize-disk", {"id": "disk0", "desired_size": 128 * MiB})
    # Not recorded: adding disk1 again. Under PVM the hung guest never acknowledges the
    # ejection, so the real VMM keeps the id reserved ("Invalid identifier as it is not
    # unique"); with a live guest the id is free again.
    r.shutdown_vmm()


def vsock_hotplug(r: Recorder) -> None:
    """A vsock device added to a running VM, a second one refused, then removed."""
    r.start("a")
    r.put("vm.create", vm_config())
    r.put("vm.boot")
    r.put("vm.add-vsock", {"cid": 3, "socket": f"{WORKDIR}/vm.vsock", "id": "vsock0"},
          label="vm.add-vsock hot")
    r.put("vm.add-vsock", {"cid": 4, "socket": f"{WORKDIR}/vm2.vsock", "id": "vsock1"},
          label="vm.add-vsock a second one")
    r.put("vm.remove-device", {"id": "vsock0"})
    r.get("vm.info", "vm.info after removing the vsock device")
    # Not recorded: adding vsock0 again (the ejection needs the guest; see hotplug).
    r.shutdown_vmm()


def snapshot_restore(r: Recorder) -> None:
    """Snapshot only while Paused (a bad destination still emits snapshotted); restore in a
    fresh process gives Paused, then resume; restore next to an existing VM is refused."""
    snap = r.mkdir("snap")
    r.start("a")
    r.put("vm.create", vm_config())
    r.put("vm.boot")
    r.put("vm.snapshot", {"destination_url": f"file://{snap}"}, label="vm.snapshot while Running")
    r.put("vm.pause")
    r.put("vm.snapshot", {"destination_url": f"file://{snap}"})
    r.listdir(snap)
    r.put("vm.snapshot", {"destination_url": f"file://{WORKDIR}/missing"},
          label="vm.snapshot to a missing directory")
    r.shutdown_vmm("vmm.shutdown while Paused")
    r.start("b")
    r.put("vm.restore", {"source_url": f"file://{snap}"})
    r.get("vm.info", "vm.info after restore")
    r.put("vm.restore", {"source_url": f"file://{snap}"}, label="vm.restore again")
    r.put("vm.resume")
    r.shutdown_vmm()
    r.start("c")
    r.put("vm.restore", {"source_url": f"file://{WORKDIR}/missing"},
          label="vm.restore from a missing directory")
    r.put("vm.create", vm_config())
    r.put("vm.restore", {"source_url": f"file://{snap}"}, label="vm.restore with a created VM")
    r.shutdown_vmm()


def vmm_shutdown(r: Recorder) -> None:
    """vmm.shutdown with a running VM: 200, shutdown/deleted events, the process exits 0."""
    r.start("a")
    r.put("vm.create", vm_config())
    r.put("vm.boot")
    r.shutdown_vmm("vmm.shutdown while Running")


SCENARIOS: Final[dict[str, Callable[[Recorder], None]]] = {
    "lifecycle": lifecycle,
    "no_vm_errors": no_vm_errors,
    "create_does_not_validate": create_does_not_validate,
    "config_errors_at_boot": config_errors_at_boot,
    "create_twice": create_twice,
    "create_without_max_vcpus": create_without_max_vcpus,
    "malformed_json": malformed_json,
    "unknown_action": unknown_action,
    "wrong_method": wrong_method,
    "resize": resize,
    "hotplug": hotplug,
    "vsock_hotplug": vsock_hotplug,
    "snapshot_restore": snapshot_restore,
    "vmm_shutdown": vmm_shutdown,
}


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 108 bytes), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="chrec-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def record_scenario(name: str, binary: str, kernel: str) -> dict[str, Any]:
    run = SCENARIOS[name]
    print(f"== {name}", file=sys.stderr, flush=True)
    with scratch_dir() as workdir:
        recorder = Recorder(binary, kernel, workdir)
        try:
            run(recorder)
        except Exception:
            for tag in recorder.procs:
                print(f"-- {tag}.log:\n{recorder.log_tail(tag)}", file=sys.stderr)
            raise
        finally:
            recorder.stop_all()
    return {"name": name, "about": " ".join((run.__doc__ or "").split()), "steps": recorder.steps}


def find_kernel(explicit: str | None) -> str:
    """``--kernel``, ``$HYPERFLEET_CH_KERNEL``, or the last line get-vmlinux.sh prints."""
    kernel = explicit or os.environ.get("HYPERFLEET_CH_KERNEL")
    if kernel:
        return os.path.abspath(kernel)
    shared = Path(os.environ.get("SHARED") or HERE.parents[2] / "shared")
    out = subprocess.run(["bash", str(shared / GET_VMLINUX)], check=True, capture_output=True,
                         text=True, timeout=900)
    return out.stdout.strip().splitlines()[-1]


def ch_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], check=True, capture_output=True, text=True,
                         timeout=10)
    return out.stdout.splitlines()[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ch-binary", default=os.environ.get("HYPERFLEET_CH_BINARY"),
                        help="the real cloud-hypervisor (default $HYPERFLEET_CH_BINARY)")
    parser.add_argument("--kernel", help="guest ELF vmlinux (default: get-vmlinux.sh)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="transcript file to write")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS),
                        help="record only these scenarios (the others are kept from --out)")
    args = parser.parse_args(argv)
    if not args.ch_binary:
        parser.error("give --ch-binary or set HYPERFLEET_CH_BINARY")
    binary = os.path.abspath(args.ch_binary)
    kernel = find_kernel(args.kernel)
    version = ch_version(binary)

    previous: dict[str, Any] = {}
    if args.only and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            previous = {s["name"]: s for s in json.load(f)["scenarios"]}
    scenarios = []
    for name in SCENARIOS:
        if args.only and name not in args.only:
            if name in previous:
                scenarios.append(previous[name])
            continue
        scenarios.append(record_scenario(name, binary, kernel))

    doc = {
        "about": "Recorded from a real cloud-hypervisor by tests/ch_transcripts/record.py; "
                 "replayed against the test double by tests/unit/test_ch_transcripts.py. "
                 "Do not edit by hand: re-record.",
        "recorded_with": {"version": version, "binary": os.path.basename(binary),
                          "kernel": os.path.basename(kernel)},
        "placeholders": {
            KERNEL: "the guest kernel (an existing file)",
            WORKDIR: "a scratch directory of the scenario",
            PID: "the VMM's process id",
        },
        "scenarios": scenarios,
    }
    tmp = f"{args.out}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
