"""Tests of the cloud-hypervisor test double, run as the real executable.

Each test starts ``python -m hyperfleet.reconcilers.testing.chdouble`` in a
short temporary directory (unix socket paths are limited to 108 bytes) and
talks to it over its API socket, the way the node agent will. The behaviour
asserted is the real VMM's (v54, see ``test_ch_transcripts.py`` for the
recorded proof); the hooks that simulate a guest are the double's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
import requests_unixsocket

from hyperfleet.reconcilers.guest import GuestClient
from hyperfleet.reconcilers.hypervisor.events import parse_events as events_in
from hyperfleet.reconcilers.testing import chdouble

DOUBLE = [sys.executable, "-m", "hyperfleet.reconcilers.testing.chdouble"]
GiB = 1024**3
U64_MAX = 2**64 - 1
# vm.boot fails with "Cannot open kernel file" unless the kernel exists (like the real VMM).
KERNEL_FILE = Path(tempfile.gettempdir()) / "hyperfleet-ch-double-test-vmlinux"
KERNEL = {"kernel": str(KERNEL_FILE), "cmdline": "console=ttyS0"}


class Double:
    """A running double plus an HTTP session on its socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: str, workdir: Path) -> None:
        self.proc = proc
        self.socket = sock
        self.workdir = workdir
        self.events_path = workdir / "events"
        self.session = requests_unixsocket.Session()

    def url(self, action: str) -> str:
        return f"http+unix://{quote(self.socket, safe='')}/api/v1/{action}"

    def get(self, action: str) -> requests.Response:
        resp: requests.Response = self.session.get(self.url(action), timeout=10)
        return resp

    def put(self, action: str, body: Any = None) -> requests.Response:
        kwargs: dict[str, Any] = {} if body is None else {"json": body}
        resp: requests.Response = self.session.put(self.url(action), timeout=10, **kwargs)
        return resp

    def ok(self, action: str, body: Any = None, status: int = 204) -> requests.Response:
        resp = self.put(action, body)
        assert resp.status_code == status, (action, resp.status_code, resp.text)
        return resp

    def info(self) -> dict[str, Any]:
        resp = self.get("vm.info")
        assert resp.status_code == 200, resp.text
        result: dict[str, Any] = resp.json()
        return result

    def state(self) -> str:
        return str(self.info()["state"])

    def events(self) -> list[dict[str, Any]]:
        return parse_events(self.events_path.read_text())

    def stderr(self) -> str:
        return (self.workdir / "stderr").read_text()


def parse_events(text: str) -> list[dict[str, Any]]:
    """Split the monitor stream: pretty-printed JSON objects back to back."""
    return events_in(text)[0]


def names(events: list[dict[str, Any]]) -> list[str]:
    return [f"{e['source']}/{e['event']}" for e in events]


def error_chain(resp: requests.Response) -> list[str]:
    """The upstream error body: a JSON array of strings, outermost first."""
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert isinstance(body, list) and body and all(isinstance(s, str) for s in body), body
    assert body[0] == "Error from API"
    return body


def http_chain(resp: requests.Response) -> list[str]:
    """An error of the HTTP layer (routing, serde): the whole body is the chain."""
    body = resp.json()
    assert isinstance(body, list) and body and all(isinstance(s, str) for s in body), body
    assert body[0] != "Error from API", body
    return body


@pytest.fixture(autouse=True, scope="module")
def kernel_file() -> None:
    """The guest kernel the configs name; the double only checks that it exists."""
    if not KERNEL_FILE.exists():
        tmp = KERNEL_FILE.with_name(f"{KERNEL_FILE.name}.{os.getpid()}")
        tmp.write_bytes(b"\x7fELF not a kernel: the double opens no file")
        tmp.replace(KERNEL_FILE)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spawn(workdir: Path) -> Iterator[Callable[..., Double]]:
    """Start doubles on demand; every one is killed when the test ends."""
    procs: list[subprocess.Popen[bytes]] = []
    counter = iter(range(100))

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        bare_socket: str | None = None,
        wait: bool = True,
    ) -> Double:
        sub = workdir / f"d{next(counter)}"
        sub.mkdir()
        sock = bare_socket or str(sub / "api.sock")
        argv = [*DOUBLE, "--api-socket", bare_socket or f"path={sock}"]
        argv += ["--event-monitor", f"path={sub / 'events'}", *args]
        with open(sub / "stderr", "wb") as err:
            proc = subprocess.Popen(argv, stderr=err, env={**os.environ, **(env or {})})
        procs.append(proc)
        handle = Double(proc, sock, sub)
        if wait:
            deadline = time.monotonic() + 10
            while not Path(sock).is_socket():
                assert proc.poll() is None, handle.stderr()
                assert time.monotonic() < deadline, "socket did not appear"
                time.sleep(0.005)
        return handle

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def base_config(**extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 4},
        "memory": {"size": GiB},
        "payload": dict(KERNEL),
    }
    config.update(extra)
    return config


# -- CLI ---------------------------------------------------------------------


def test_version_flag_prints_vmm_version() -> None:
    out = subprocess.run([*DOUBLE, "--version"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0
    assert out.stdout == f"cloud-hypervisor {chdouble.BUILD_VERSION}\nMigration Protocol Versions: 0\n"
    assert re.fullmatch(r"v54\.\d+\.\d+-\w+-hyperfleet", chdouble.BUILD_VERSION)


def test_unknown_flag_exits_1_like_clap() -> None:
    out = subprocess.run(
        [*DOUBLE, "--api-socket", "path=/tmp/x.sock", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.returncode == 1
    assert "--no-such-flag" in out.stderr


def test_bare_socket_path_and_stale_socket_file(spawn: Callable[..., Double], workdir: Path) -> None:
    sock = workdir / "old.sock"
    sock.write_text("stale")  # left over by a crashed VMM
    d = spawn("-v", "-v", "--log-file", str(workdir / "vmm.log"), bare_socket=str(sock))
    assert sock.is_socket()
    assert d.get("vmm.ping").status_code == 200
    wait_for(lambda: '"msg": "request"' in (workdir / "vmm.log").read_text())  # JSON lines


# -- basics ------------------------------------------------------------------


def test_ping(spawn: Callable[..., Double]) -> None:
    d = spawn()
    resp = d.get("vmm.ping")
    assert resp.status_code == 200
    body = resp.json()
    assert body["version"] == chdouble.VERSION == "54.0.0"
    assert body["build_version"] == chdouble.BUILD_VERSION
    assert body["pid"] == d.proc.pid
    assert body["features"] == ["kvm"]


def test_errors_before_create_are_404_or_500_like_upstream(spawn: Callable[..., Double]) -> None:
    d = spawn()
    for method, action, status, last in [
        ("GET", "vm.info", 404, "VM is not created"),
        ("PUT", "vm.boot", 404, "VM config is missing"),
        ("PUT", "vm.reboot", 404, "VM is not created"),
        ("PUT", "vm.pause", 500, "VM is not running"),
        ("PUT", "vm.shutdown", 500, "VM is not running"),
        ("GET", "vm.counters", 500, "VM is not running"),
    ]:
        resp = d.get(action) if method == "GET" else d.put(action)
        assert resp.status_code == status, action
        assert error_chain(resp)[-1] == last
    resp = d.put("vm.resize", {"desired_vcpus": 2})
    assert resp.status_code == 404
    resp = d.put("vm.add-disk", {"path": "/img"})
    assert resp.status_code == 404
    assert error_chain(resp) == [
        "Error from API",
        "The disk could not be added to the VM",
        "VM is not created",
    ]
    d.ok("vm.delete")  # always allowed


def test_create_boot_info(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config(disks=[{"path": "/img/root.raw"}], net=[{"tap": "tap0"}]))
    info = d.info()
    assert info["state"] == "Created"
    assert info["config"]["disks"] == [{"path": "/img/root.raw"}]  # named at boot
    assert "device_tree" not in info
    d.ok("vm.boot")
    info = d.info()
    assert info["state"] == "Running"
    assert info["config"]["disks"] == [{"path": "/img/root.raw", "id": "_disk0"}]
    assert info["config"]["net"] == [{"tap": "tap0", "id": "_net1"}]
    assert info["config"]["cpus"] == {"boot_vcpus": 2, "max_vcpus": 4}
    assert info["config"]["payload"] == KERNEL
    assert info["memory_actual_size"] == GiB
    assert info["device_tree"]["_disk0"]["pci_bdf"] == "0000:00:01.0"
    assert info["device_tree"]["_net1"]["pci_bdf"] == "0000:00:02.0"


def test_create_fills_upstream_defaults(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", {"payload": KERNEL})
    info = d.info()
    assert info["config"]["cpus"] == {"boot_vcpus": 1, "max_vcpus": 1}
    assert info["memory_actual_size"] == 512 * 1024**2


# -- state machine -----------------------------------------------------------

NOTES_TABLE = {  # shared/cloud-hypervisor/NOTES.md, "VM state machine"
    "Created": {"Running", "Paused", "Shutdown", "BreakPoint"},
    "Running": {"Paused", "Shutdown", "BreakPoint"},
    "Paused": {"Running", "Shutdown"},
    "Shutdown": {"Running"},
    "BreakPoint": {"Created", "Running"},
}


@pytest.mark.parametrize("current", sorted(NOTES_TABLE))
def test_transition_table_matches_notes(current: str) -> None:
    for new in NOTES_TABLE:
        if new in NOTES_TABLE[current]:
            chdouble.check_transition(chdouble.VmState(current), chdouble.VmState(new))
        else:
            with pytest.raises(ValueError, match=rf"InvalidStateTransition\({current}, {new}\)"):
                chdouble.check_transition(chdouble.VmState(current), chdouble.VmState(new))


def test_allowed_transitions_through_the_api(spawn: Callable[..., Double]) -> None:
    d = spawn("--no-shutdown")  # a guest power-off keeps the VMM (and the VM, as Created)
    d.ok("vm.create", base_config())
    steps = [
        ("vm.boot", "Running"),  # Created -> Running
        ("vm.pause", "Paused"),  # Running -> Paused
        ("vm.resume", "Running"),  # Paused -> Running
        ("vm.pause", "Paused"),
        ("vm.shutdown", "Created"),  # the VM object goes, the config stays
        ("vm.boot", "Running"),  # and boots again
        ("vm.reboot", "Running"),
        ("vm.pause", "Paused"),
        ("vm.reboot", "Running"),  # a paused VM reboots too
        ("vm.nmi", "Running"),
        ("vm.shutdown", "Created"),  # Running -> shut down
        ("vm.boot", "Running"),
        ("vm.power-button", "Created"),  # the guest powers off
        ("vm.boot", "Running"),
        ("vm.pause", "Paused"),
        ("vm.power-button", "Paused"),  # a paused guest reacts once resumed
        ("vm.resume", "Created"),
    ]
    for action, expected in steps:
        d.ok(action)
        assert d.state() == expected, action
    d.ok("vm.delete")
    assert d.get("vm.info").status_code == 404
    d.ok("vm.create", base_config())  # the process stays usable
    assert d.state() == "Created"


def test_forbidden_transitions_are_500(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config())

    def refused(action: str, last: str, state: str) -> None:
        resp = d.put(action)
        assert resp.status_code == 500, (action, resp.text)
        chain = error_chain(resp)
        assert len(chain) >= 3 and chain[-1] == last, (action, chain)
        assert d.state() == state

    for action in ("vm.pause", "vm.resume", "vm.shutdown", "vm.power-button"):
        refused(action, "VM is not running", "Created")
    resp = d.put("vm.reboot")  # upstream: 404, not 500
    assert resp.status_code == 404 and error_chain(resp)[1:] == [
        "The VM could not reboot", "VM is not created"]
    resp = d.put("vm.create", base_config())
    assert resp.status_code == 500
    assert error_chain(resp)[1:] == ["The VM could not be created", "VM is already created"]

    d.ok("vm.boot")
    refused("vm.boot", "VM is already created", "Running")
    refused("vm.resume", "Invalid transition: InvalidStateTransition(Running, Running)", "Running")
    resp = d.put("vm.snapshot", {"destination_url": f"file://{d.workdir}"})
    assert resp.status_code == 500
    assert error_chain(resp)[-1] == "Trying to snapshot while VM is running"

    d.ok("vm.pause")
    refused("vm.pause", "Invalid transition: InvalidStateTransition(Paused, Paused)", "Paused")
    refused("vm.boot", "VM is already created", "Paused")
    assert error_chain(d.put("vm.pause"))[1:4] == [
        "The VM could not be paused", "Cannot pause VM", "Failed to pause migratable component"]

    d.ok("vm.shutdown")
    for action in ("vm.shutdown", "vm.pause", "vm.resume", "vm.nmi"):
        refused(action, "VM is not running", "Created")
    assert d.put("vm.reboot").status_code == 404


# -- request validation ------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c["memory"].update(size="1G"), "memory.size"),
        (lambda c: c.update(disks=[{"path": "/a", "pci_device_id": 300}]), "disks.0.pci_device_id"),
        (lambda c: c["cpus"].update(boot_vcpus=True), "cpus.boot_vcpus"),
    ],
)
def test_undeserializable_create_body_is_400_naming_the_field(
    spawn: Callable[..., Double], mutate: Callable[[dict[str, Any]], Any], field: str
) -> None:
    """What serde rejects (types, integer ranges) is refused at once, by the HTTP layer."""
    d = spawn()
    config = base_config()
    mutate(config)
    resp = d.put("vm.create", config)
    assert resp.status_code == 400
    chain = http_chain(resp)
    assert chain[0] == "Failed to deserialize JSON"
    assert field in chain[-1]
    assert d.get("vm.info").status_code == 404  # nothing was created


@pytest.mark.parametrize(
    ("mutate", "status", "last"),
    [
        (lambda c: c["cpus"].update(boot_vcpus=8, max_vcpus=4), 400,
         "Max CPUs (4) lower than boot CPUs (8)"),
        (lambda c: c.pop("payload"), 400, "No bootitem provided: neither firmware nor kernel"),
        (lambda c: c.update(vsock={"cid": 2, "socket": "/v"}), 400, "2 is a special VSOCK CID"),
        (lambda c: c["cpus"].update(boot_vcpus=0), 400, "cpus.boot_vcpus"),
        (lambda c: c.update(disks=[{"path": "/a", "id": "x"}, {"path": "/b", "id": "x"}]), 409,
         "Identifier x is not unique"),
        (lambda c: c.update(fs=[{"tag": "t", "socket": "/s", "num_queues": 1, "queue_size": 1024}]),
         400, "Using vhost-user requires using shared memory or huge pages"),
    ],
)
def test_create_accepts_what_boot_refuses(
    spawn: Callable[..., Double], mutate: Callable[[dict[str, Any]], Any], status: int, last: str
) -> None:
    """vm.create only stores the config; validation is vm.boot's (and vm.add-*'s) job."""
    d = spawn()
    config = base_config()
    mutate(config)
    d.ok("vm.create", config)
    assert d.state() == "Created"
    resp = d.put("vm.boot")
    assert resp.status_code == status
    chain = error_chain(resp)
    assert chain[1:3] == ["The VM could not boot", "Failed to validate config"]
    assert last in chain[-1]
    assert d.state() == "Created"
    assert names(d.events())[-1] == "vm/booting"  # the failed boot still announced itself
    resp = d.put("vm.add-disk", {"path": "/other", "id": "other"})  # re-validates it all
    assert resp.status_code == status and last in error_chain(resp)[-1]


def test_missing_kernel_fails_the_boot_and_leaves_a_vm_object(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config(payload={"kernel": "/nonexistent/vmlinux"}))
    resp = d.put("vm.boot")
    assert resp.status_code == 500
    assert error_chain(resp)[1:] == ["The VM could not boot", "Cannot open kernel file",
                                     "No such file or directory (os error 2)"]
    info = d.info()
    assert info["state"] == "Created" and "device_tree" in info
    assert error_chain(d.put("vm.boot"))[-1] == "VM is already created"
    d.ok("vm.delete")
    assert names(d.events())[-2:] == ["vm/shutdown", "vm/deleted"]


def test_malformed_missing_and_oversized_bodies(spawn: Callable[..., Double]) -> None:
    d = spawn()
    url = d.url("vm.create")
    resp = d.session.put(url, data=b"{not json", timeout=10)
    assert resp.status_code == 400
    assert http_chain(resp) == ["Failed to deserialize JSON", "key must be a string at line 1 column 2"]
    resp = d.session.put(url, data=b'{"cpus": {"boot_vcpus": 1}}', timeout=10)
    assert resp.status_code == 400
    assert http_chain(resp) == ["Failed to deserialize JSON",
                                "missing field `max_vcpus` at line 1 column 26"]
    resp = d.put("vm.create")
    assert resp.status_code == 400 and resp.content == b""  # vm.create's handler: no body
    resp = d.put("vm.resize")
    assert resp.status_code == 400 and http_chain(resp) == ["Bad Request"]
    resp = d.session.put(url, data=b" " * (4 * 1024 * 1024 + 1), timeout=10)
    assert resp.status_code == 400
    assert "exceeds the limit" in error_chain(resp)[-1]
    resp = d.put("vm.remove-device", {})  # serde needs `id`
    assert resp.status_code == 400
    assert http_chain(resp)[-1] == "missing field `id` at line 1 column 2"
    assert d.get("vmm.ping").status_code == 200  # the connection survived


def test_serde_positions_of_missing_fields() -> None:
    """serde_json reports a missing field just past the object that lacks it."""
    text = '{"cpus":\n  {"boot_vcpus": 1},\n "memory": {"size": 1}}'
    assert chdouble._missing_field("max_vcpus", text, ["cpus"]) == (
        "missing field `max_vcpus` at line 2 column 19")
    assert chdouble._missing_field("id", "[]", ["x"]) == "missing field `id`"
    assert chdouble._value_end('{"a": [1, {"b": 2}]}', ["a", 1]) == 18


def test_unknown_endpoint_404_and_wrong_method_400(spawn: Callable[..., Double]) -> None:
    d = spawn()
    resp = d.put("vm.frobnicate")
    assert resp.status_code == 404
    assert http_chain(resp) == ["Not Found"]
    resp = d.session.get(d.url("vm.info").replace("/api/v1/vm.info", "/metrics"), timeout=10)
    assert resp.status_code == 404
    resp = d.get("vm.boot")
    assert resp.status_code == 400
    assert http_chain(resp) == ["Bad Request"]
    assert d.put("vm.info").status_code == 400
    resp = d.session.post(d.url("vmm.ping"), timeout=10)  # micro_http knows no POST
    assert resp.status_code == 400
    assert resp.content == chdouble._UNSUPPORTED_METHOD_BODY
    assert d.get("vmm.ping").status_code == 200


# -- devices -----------------------------------------------------------------


def test_cold_add_204_hotplug_200_and_conflicts_409(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config())
    cold = d.ok("vm.add-disk", {"path": "/img/a.raw"})
    assert cold.content == b""
    d.ok("vm.add-net", {"tap": "tap0", "id": "mynet"})
    d.ok("vm.boot")

    resp = d.ok("vm.add-disk", {"path": "/img/b.raw"}, status=200)
    assert resp.json() == {"id": "_disk1", "bdf": "0000:00:03.0"}
    resp = d.ok("vm.add-vsock", {"cid": 3, "socket": "/tmp/v.vsock"}, status=200)
    assert resp.json()["id"] == "_vsock2"
    assert re.fullmatch(r"[0-9a-f]{4}:00:[0-9a-f]{2}\.0", resp.json()["bdf"])
    d.ok("vm.add-pmem", {"file": "/img/p", "id": "pm"}, status=200)

    resp = d.put("vm.add-net", {"tap": "tap1", "id": "mynet"})
    assert resp.status_code == 409
    assert error_chain(resp)[1:] == ["The network device could not be added to the VM",
                                     "Failed to validate config", "Identifier mynet is not unique"]
    resp = d.put("vm.add-disk", {"path": "/img/a.raw"})  # the image is locked by _disk0
    assert resp.status_code == 500
    assert error_chain(resp)[2:] == [
        "Error from device manager", "Cannot lock images of all block devices",
        "Failed to get Write lock for disk image: /img/a.raw", "The file is already locked"]
    resp = d.put("vm.add-vsock", {"cid": 4, "socket": "/tmp/w"})
    assert resp.status_code == 500
    assert error_chain(resp)[-1] == "Too many virtio-vsock devices"
    assert [e["event"] for e in d.events()] == ["starting", "booting", "booted"]  # no device events

    info = d.info()
    assert [x["id"] for x in info["config"]["disks"]] == ["_disk0", "_disk1"]
    assert info["config"]["net"] == [{"tap": "tap0", "id": "mynet"}]
    assert info["config"]["vsock"]["id"] == "_vsock2"
    assert set(info["device_tree"]) == {"_disk0", "mynet", "_disk1", "_vsock2", "pm"}


def test_remove_device(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config(disks=[{"path": "/a"}, {"path": "/b"}, {"path": "/c", "id": "c"}]))
    resp = d.put("vm.remove-device", {"id": "_disk0"})  # devices get their names at boot
    assert resp.status_code == 404
    assert error_chain(resp)[-1] == 'No device with id "_disk0" to remove'
    d.ok("vm.remove-device", {"id": "c"})  # cold: the config only
    assert [x.get("id") for x in d.info()["config"]["disks"]] == [None, None]
    d.ok("vm.boot")
    resp = d.put("vm.remove-device", {"id": "nope"})
    assert resp.status_code == 404
    assert error_chain(resp)[-2:] == [
        "Error from device manager",
        "Failed to find device corresponding to the given identifier: nope"]
    d.ok("vm.remove-device", {"id": "_disk0"})
    info = d.info()
    assert [x["id"] for x in info["config"]["disks"]] == ["_disk1"]
    assert "_disk0" not in info["device_tree"]
    # the simulated guest ejects at once, so the freed slot is reused
    assert d.ok("vm.add-disk", {"path": "/c"}, status=200).json()["bdf"] == "0000:00:01.0"
    assert [e["event"] for e in d.events()] == ["starting", "booting", "booted"]  # no device events


def test_counters(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config(disks=[{"path": "/a"}], net=[{"tap": "t"}]))
    resp = d.get("vm.counters")
    assert resp.status_code == 500
    assert error_chain(resp)[1:] == ["The VM info is not available", "VM is not running"]
    d.ok("vm.boot")
    resp = d.get("vm.counters")
    assert resp.status_code == 200
    counters = resp.json()
    assert set(counters) == {"_disk0", "_net1"}
    # a guest that did no I/O, as the real VMM reports it (beyond int64, unlike the spec)
    assert counters["_disk0"] == {
        "read_bytes": 0, "write_bytes": 0, "read_ops": 0, "write_ops": 0,
        "read_latency_min": U64_MAX, "read_latency_max": U64_MAX,
        "read_latency_avg": 1844674407370955, "write_latency_min": U64_MAX,
        "write_latency_max": U64_MAX, "write_latency_avg": 1844674407370955}
    assert counters["_net1"] == {"rx_bytes": 0, "rx_frames": 0, "tx_bytes": 0, "tx_frames": 0}


# -- sizing ------------------------------------------------------------------


def test_resize(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config(memory={"size": GiB, "hotplug_size": GiB},
                                  disks=[{"path": "/a", "id": "a"}]))
    d.ok("vm.resize", {"desired_vcpus": 3})  # a created VM: the config only, no events
    assert d.info()["config"]["cpus"]["boot_vcpus"] == 3
    resp = d.put("vm.resize-disk", {"id": "a", "desired_size": 10 * GiB})
    assert resp.status_code == 500
    assert error_chain(resp)[-1] == "Failed resizing a disk image"
    d.ok("vm.boot")
    d.ok("vm.resize-disk", {"id": "a", "desired_size": 10 * GiB})
    assert d.put("vm.resize-disk", {"id": "nope", "desired_size": GiB}).status_code == 404
    d.ok("vm.resize", {"desired_vcpus": 4})
    assert d.info()["config"]["cpus"]["boot_vcpus"] == 4
    resp = d.put("vm.resize", {"desired_vcpus": 5})
    assert resp.status_code == 500
    assert error_chain(resp)[-2:] == ["Error from CPU manager", "Requested vCPUs exceed maximum"]
    assert names(d.events())[-1] == "vm/resizing"  # announced, then failed
    resp = d.put("vm.resize", {"desired_vcpus": 0})  # the spec's minimum (the real VMM dies)
    assert resp.status_code == 400
    assert "desired_vcpus" in http_chain(resp)[-1]
    # ACPI hotplug: memory.size becomes the new size, hotplug_size stays, no hotplugged_size
    d.ok("vm.resize", {"desired_ram": GiB + GiB // 2})
    info = d.info()
    assert info["memory_actual_size"] == GiB + GiB // 2
    assert info["config"]["memory"] == {"size": GiB + GiB // 2, "hotplug_size": GiB}
    resp = d.put("vm.resize", {"desired_ram": 3 * GiB})
    assert resp.status_code == 500
    assert error_chain(resp)[-1] == "Not enough space in the hotplug RAM region"
    resp = d.put("vm.resize", {"desired_ram": GiB + GiB // 2 + 1024**2})
    assert resp.status_code == 500 and "not a valid size" in error_chain(resp)[-1]
    d.ok("vm.resize", {"desired_ram": GiB})  # ACPI cannot shrink: only the config changes
    assert d.info()["config"]["memory"]["size"] == GiB
    d.ok("vm.resize", {"desired_ram": 2 * GiB})  # grows from the 1.5 GiB the guest still has
    assert d.info()["config"]["cpus"]["boot_vcpus"] == 4


def test_resize_virtio_mem(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config(memory={"size": GiB, "hotplug_size": GiB,
                                          "hotplug_method": "VirtioMem"}))
    d.ok("vm.boot")
    d.ok("vm.resize", {"desired_ram": GiB + GiB // 2})
    info = d.info()
    assert info["config"]["memory"]["size"] == GiB
    assert info["config"]["memory"]["hotplugged_size"] == GiB // 2
    assert info["memory_actual_size"] == GiB + GiB // 2
    assert d.put("vm.resize", {"desired_ram": GiB // 2}).status_code == 500  # below boot size
    d.ok("vm.resize", {"desired_ram": GiB})
    assert "hotplugged_size" not in d.info()["config"]["memory"]


# -- snapshot / restore / migration -----------------------------------------


def test_snapshot_then_restore_into_fresh_double(
    spawn: Callable[..., Double], workdir: Path
) -> None:
    src = spawn()
    src.ok("vm.create", base_config(disks=[{"path": "/a"}]))
    src.ok("vm.boot")
    src.ok("vm.add-net", {"tap": "tap9"}, status=200)
    src.ok("vm.pause")
    resp = src.put("vm.snapshot", {"destination_url": f"file://{workdir}/missing"})
    assert resp.status_code == 500
    assert error_chain(resp)[2:] == [
        "Cannot send VM snapshot", "Failed to send migratable component snapshot",
        f'Destination is not a directory: "{workdir}/missing"']
    assert names(src.events())[-2:] == ["vm/snapshotting", "vm/snapshotted"]  # sic
    snap = workdir / "snap"
    snap.mkdir()
    src.ok("vm.snapshot", {"destination_url": f"file://{snap}"})
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "memory-ranges", "state.json"]
    source_config = src.info()["config"]
    assert json.loads((snap / "config.json").read_text()) == source_config
    src.ok("vm.coredump", {"destination_url": f"file://{workdir}/core"})
    assert (workdir / "core").read_bytes().startswith(b"\x7fELF")

    dst = spawn()
    resp = dst.put("vm.restore", {"source_url": f"file://{workdir}/missing"})
    assert resp.status_code == 500
    assert error_chain(resp)[1:3] == ["The VM could not be restored", "Cannot restore VM"]
    dst.ok("vm.restore", {"source_url": f"file://{snap}", "prefault": True})
    info = dst.info()
    assert info["state"] == "Paused"
    assert info["config"] == source_config
    assert info["device_tree"]["_net1"]["pci_bdf"] == src.info()["device_tree"]["_net1"]["pci_bdf"]
    dst.ok("vm.resume")
    assert dst.state() == "Running"
    resp = dst.put("vm.restore", {"source_url": f"file://{snap}"})
    assert resp.status_code == 500
    assert error_chain(resp)[-1] == "VM is already created"
    assert names(dst.events())[-4:] == ["vm/restoring", "vm/restored", "vm/resuming", "vm/resumed"]


def test_live_migration_between_two_doubles(spawn: Callable[..., Double]) -> None:
    src = spawn()
    src.ok("vm.create", base_config())
    src.ok("vm.boot")
    dst = spawn()
    # Only a local migration needs shared memory; the transport ones copy it.
    resp = src.put("vm.send-migration", {"destination_url": f"unix:{dst.workdir}/mig.sock",
                                         "local": True})
    assert resp.status_code == 500
    assert "shared memory" in error_chain(resp)[-1]
    # The real VMM answers at once and reports the outcome as an event; the VM runs on.
    src.ok("vm.send-migration", {"destination_url": f"unix:{dst.workdir}/nowhere.sock"})
    wait_for(lambda: "vm/migration-failed" in names(src.events()))
    assert src.info()["state"] == "Running"
    src.ok("vm.delete")
    src.ok("vm.create", base_config(memory={"size": GiB}, disks=[{"path": "/a"}]))
    src.ok("vm.boot")
    src.ok("vm.add-net", {"tap": "tap1"}, status=200)
    before = src.info()

    mig = str(dst.workdir / "mig.sock")
    received: dict[str, requests.Response] = {}

    def receive() -> None:
        session = requests_unixsocket.Session()
        received["resp"] = session.put(
            dst.url("vm.receive-migration"), json={"receiver_url": f"unix:{mig}"}, timeout=30
        )

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        wait_for(lambda: os.path.exists(mig))
        assert dst.get("vm.info").status_code == 404  # still waiting, API still answers
        src.ok("vm.send-migration", {"destination_url": f"unix:{mig}"})
    finally:
        thread.join(timeout=30)
    assert received["resp"].status_code == 204, received["resp"].text
    # After migration-finished the source VMM deletes the VM and exits, as upstream.
    wait_for(lambda: src.proc.poll() is not None)
    assert src.proc.returncode == 0
    assert names(src.events())[-8:] == [
        "vm/migration-memory-iteration", "vm/pausing", "vm/paused", "vm/snapshotting",
        "vm/snapshotted", "vm/migration-finished", "vm/deleted", "vmm/shutdown"]
    info = dst.info()
    assert info["state"] == "Running"
    assert info["config"] == before["config"]
    assert info["config"]["disks"] == [{"path": "/a", "id": "_disk0"}]
    assert info["device_tree"] == before["device_tree"]  # same guest PCI addresses
    assert not os.path.exists(mig)
    assert "vm/migration-finished" in names(src.events())
    assert "vm/migration-receive-finished" in names(dst.events())


def test_live_migration_over_tcp(spawn: Callable[..., Double]) -> None:
    """Between hosts the agents use cloud-hypervisor's TCP transport. The receiver takes
    the first connection as its sender, so a connection that hangs up fails the receive
    (which is why the agent checks for the listener in /proc instead of connecting)."""
    from hyperfleet.reconcilers.jobs.runner import tcp_listening

    src, dst = spawn(), spawn()
    src.ok("vm.create", base_config(memory={"size": GiB}))
    src.ok("vm.boot")
    bad = src.put("vm.send-migration", {"destination_url": "tcp:127.0.0.1"})
    assert bad.status_code == 400 and "tcp:<host>:<port>" in error_chain(bad)[-1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"tcp:127.0.0.1:{port}"
    received: list[requests.Response] = []

    def receive() -> threading.Thread:
        thread = threading.Thread(target=lambda: received.append(
            requests_unixsocket.Session().put(
                dst.url("vm.receive-migration"), json={"receiver_url": url}, timeout=30)))
        thread.start()
        wait_for(lambda: tcp_listening(port))
        return thread

    thread = receive()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    thread.join(timeout=30)
    assert received[-1].status_code == 500
    assert "vm/migration-receive-failed" in names(dst.events())
    assert not tcp_listening(port)

    thread = receive()
    try:
        src.ok("vm.send-migration", {"destination_url": url})
    finally:
        thread.join(timeout=30)
    assert received[-1].status_code == 204, received[-1].text
    wait_for(lambda: src.proc.poll() is not None)  # the source VMM leaves with its VM
    assert dst.info()["state"] == "Running"
    assert "vm/migration-finished" in names(src.events())
    assert names(dst.events())[-5:] == [
        "vm/restoring", "vm/restored", "vm/resuming", "vm/resumed",
        "vm/migration-receive-finished"]


# -- events, hooks, process --------------------------------------------------


def test_event_monitor_stream(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config(memory={"size": GiB, "hotplug_size": GiB}))
    for action in ("vm.boot", "vm.pause", "vm.resume", "vm.reboot"):
        d.ok(action)
    d.ok("vm.resize", {"desired_vcpus": 3})
    d.ok("vm.add-disk", {"path": "/x", "id": "hot"}, status=200)  # no event
    d.ok("vm.remove-device", {"id": "hot"})  # no event either
    d.ok("vm.shutdown")
    d.ok("vmm.shutdown", status=200)
    assert d.proc.wait(timeout=5) == 0
    events = d.events()
    assert names(events) == [
        "vmm/starting",
        "vm/booting",
        "vm/booted",
        "vm/pausing",
        "vm/paused",
        "vm/resuming",
        "vm/resumed",
        "vm/rebooting",
        "vm/rebooted",
        "vm/resizing",
        "vm/resized",
        "vm/shutdown",
        "vm/deleted",
        "vmm/shutdown",
    ]
    for event in events:
        assert set(event) == {"timestamp", "source", "event", "properties"}
        assert set(event["timestamp"]) == {"secs", "nanos"}
        assert event["properties"] is None
    stamps = [e["timestamp"]["secs"] * 10**9 + e["timestamp"]["nanos"] for e in events]
    assert stamps == sorted(stamps)
    assert d.events_path.read_text().startswith('{\n  "timestamp": {\n    "secs": 0,')


def test_sigusr1_guest_power_off_ends_the_vmm_and_sigusr2_reboots(
        spawn: Callable[..., Double]) -> None:
    """Upstream: when the guest powers off, the whole VMM shuts down and exits 0."""
    d = spawn()
    d.ok("vm.create", base_config())
    d.ok("vm.boot")
    d.proc.send_signal(signal.SIGUSR2)
    wait_for(lambda: names(d.events())[-1] == "vm/rebooted")
    assert d.state() == "Running"
    d.proc.send_signal(signal.SIGUSR1)
    assert d.proc.wait(timeout=5) == 0
    assert names(d.events())[-3:] == ["vm/shutdown", "vm/deleted", "vmm/shutdown"]
    assert not os.path.exists(d.socket)


def test_power_button_powers_the_guest_off(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config())
    d.ok("vm.boot")
    d.ok("vm.power-button")
    assert d.proc.wait(timeout=5) == 0
    assert names(d.events())[-3:] == ["vm/shutdown", "vm/deleted", "vmm/shutdown"]


def test_no_shutdown_flag_keeps_the_vm_after_a_guest_power_off(
        spawn: Callable[..., Double]) -> None:
    d = spawn("--no-shutdown")
    d.ok("vm.create", base_config())
    d.ok("vm.boot")
    d.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: names(d.events())[-1] == "vm/shutdown")
    assert d.state() == "Created"  # as after vm.shutdown
    d.ok("vm.boot")
    assert d.state() == "Running"


@pytest.mark.parametrize("value", ["1", "0"])
def test_exit_on_guest_shutdown_option(spawn: Callable[..., Double], value: str) -> None:
    """``1`` is upstream's behaviour (the default); ``0`` the double's pre-v54 one, which
    reports a Shutdown state the real VMM never does."""
    d = spawn(env={chdouble.EXIT_ON_GUEST_SHUTDOWN_ENV: value})
    d.ok("vm.create", base_config())
    d.ok("vm.boot")
    d.proc.send_signal(signal.SIGUSR1)
    if value == "1":
        assert d.proc.wait(timeout=5) == 0
        assert names(d.events())[-3:] == ["vm/shutdown", "vm/deleted", "vmm/shutdown"]
        return
    wait_for(lambda: d.state() == "Shutdown")
    assert names(d.events())[-1] == "vm/shutdown"
    d.ok("vm.boot")  # the VM can be started again
    assert d.state() == "Running"


def test_guest_vsock_host_hanging_up_is_not_a_traceback(
        spawn: Callable[..., Double], workdir: Path) -> None:
    """A host that gives up on a slow guest is routine; the relay keeps serving."""
    hooks = workdir / "hooks"
    (hooks / "checkpoint.d").mkdir(parents=True)
    slow = hooks / "checkpoint.d" / "10-slow"
    slow.write_text("#!/bin/sh\nsleep 0.3\n")
    slow.chmod(0o755)
    d = spawn(env={chdouble.GUEST_HOOKS_ENV: str(hooks)})
    vsock = str(workdir / "vm.vsock")
    d.ok("vm.create", base_config(vsock={"cid": 3, "socket": vsock}))
    d.ok("vm.boot")
    wait_for(lambda: os.path.exists(vsock))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(vsock)
        s.sendall(b"CONNECT 1024\n")
        assert s.recv(64).startswith(b"OK")
        s.sendall(b'{"op": "checkpoint"}\n')  # and hang up before the reply
    wait_for(lambda: (hooks / "state" / "last-checkpoint.json").exists())
    wait_for(lambda: "hung up" in d.stderr())
    assert GuestClient(vsock).call("ping")["pid"] == d.proc.pid
    assert "Traceback" not in d.stderr()


def test_vmm_shutdown_answers_then_exits_and_removes_socket(spawn: Callable[..., Double]) -> None:
    d = spawn()
    resp = d.ok("vmm.shutdown", status=200)  # the spec says 204; the real VMM answers 200
    assert resp.content == b""
    assert d.proc.wait(timeout=5) == 0
    assert not os.path.exists(d.socket)


def test_sigterm_exits_cleanly(spawn: Callable[..., Double]) -> None:
    d = spawn()
    d.ok("vm.create", base_config())
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=5) == 0
    assert not os.path.exists(d.socket)
    assert names(d.events())[-1] == "vmm/shutdown"


def test_socket_delay_env(spawn: Callable[..., Double]) -> None:
    started = time.monotonic()
    d = spawn(env={chdouble.SOCKET_DELAY_ENV: "0.6"}, wait=False)
    time.sleep(0.3)
    assert not os.path.exists(d.socket)
    assert d.proc.poll() is None
    wait_for(lambda: os.path.exists(d.socket))
    assert time.monotonic() - started >= 0.6
    assert d.get("vmm.ping").status_code == 200


# -- the contract checks themselves (in process) -----------------------------


@pytest.fixture(scope="module")
def contract() -> chdouble.Contract:
    return chdouble.Contract.load()


def test_every_spec_operation_has_an_emulation(contract: chdouble.Contract) -> None:
    vmm = chdouble.Vmm(contract, chdouble.EventMonitor(None))
    assert set(contract.operations) == set(vmm.actions)


def test_response_checker_catches_drift(contract: chdouble.Contract) -> None:
    info = contract.operations["vm.info"]["GET"]
    good = {"config": {"payload": {}}, "state": "Running"}
    assert contract.check_response(info, 200, good) is None
    assert "config" in (contract.check_response(info, 200, {"state": "Running"}) or "")
    assert "state" in (contract.check_response(info, 200, {**good, "state": "Up"}) or "")
    assert contract.check_response(info, 204, None) is not None  # undeclared success
    assert contract.check_response(info, 404, ["Error from API", "x"]) is None
    assert contract.check_response(info, 500, {"error": "x"}) is not None
    boot = contract.operations["vm.boot"]["PUT"]
    assert contract.check_response(boot, 204, {"unexpected": 1}) is not None


def test_real_vmm_overrides_of_the_spec(contract: chdouble.Contract) -> None:
    assert contract.operations["vmm.shutdown"]["PUT"].responses == {200: None}
    assert contract.validate(contract.schema("VmConfig"), {}) is None  # payload optional
    counters = contract.operations["vm.counters"]["GET"]
    assert contract.check_response(counters, 200, {"d": {"read_latency_min": U64_MAX}}) is None
    assert len(chdouble.REAL_VMM_OVERRIDES) == 3


def test_drifting_reply_becomes_500(contract: chdouble.Contract) -> None:
    vmm = chdouble.Vmm(contract, chdouble.EventMonitor(None))
    api = chdouble.Api(contract, vmm)
    vmm.actions["vmm.ping"] = lambda _: chdouble.Reply(200, {"build_version": "x"})  # no version
    reply = api.handle("GET", "/api/v1/vmm.ping", b"")
    assert reply.status == 500
    assert reply.body[0] == "Error from API"
    assert "version" in reply.body[-1]


# -- serial console socket (recorded from the real v54: see double's docstring) ---------


def _recv_or_timeout(s: socket.socket, timeout: float = 0.3) -> bytes | None:
    """What the peer sent (b"" at EOF), or None when it sent nothing in time."""
    s.settimeout(timeout)
    try:
        return s.recv(100)
    except TimeoutError:
        return None


def test_serial_socket_lifecycle_matches_the_real_vmm(spawn: Callable[..., Double],
                                                      workdir: Path) -> None:
    d = spawn()
    path = workdir / "vm.console"
    d.ok("vm.create", base_config(serial={"mode": "Socket", "socket": str(path)}))
    assert path.is_socket()  # bound at vm.create, before any boot
    assert d.info()["config"]["serial"] == {"mode": "Socket", "socket": str(path)}
    first = socket.socket(socket.AF_UNIX)
    first.connect(str(path))
    d.ok("vm.boot")
    first.sendall(b"root\r")
    assert _recv_or_timeout(first) is None  # the guest echoes nothing
    second = socket.socket(socket.AF_UNIX)
    second.connect(str(path))
    assert _recv_or_timeout(first, 2) == b""  # the newcomer takes the port over
    d.ok("vm.reboot")
    assert _recv_or_timeout(second, 2) == b""  # a reboot cuts the client off
    assert path.is_socket()
    d.ok("vm.shutdown")
    assert not path.exists()
    d.ok("vm.boot")
    assert path.is_socket()
    d.ok("vm.delete")
    assert not path.exists()
    for s in (first, second):
        s.close()


def test_serial_socket_path_taken_fails_create_like_the_real_vmm(
        spawn: Callable[..., Double], workdir: Path) -> None:
    d = spawn()
    path = workdir / "vm.console"
    path.touch()
    resp = d.put("vm.create", base_config(serial={"mode": "Socket", "socket": str(path)}))
    assert resp.status_code == 500
    assert error_chain(resp) == ["Error from API", "The VM could not be created",
                                 "Error creating console devices",
                                 "Error creating console device",
                                 "Address already in use (os error 98)"]
    resp = d.put("vm.boot")  # the config was stored: boot retries the bind
    assert error_chain(resp)[1:] == ["The VM could not boot", "Error creating console devices",
                                     "Error creating console device",
                                     "Address already in use (os error 98)"]
    path.unlink()
    d.ok("vm.boot")
    assert path.is_socket()
    d.ok("vmm.shutdown", status=200)
    d.proc.wait(timeout=5)
    assert not path.exists()  # the exiting VMM removes it
