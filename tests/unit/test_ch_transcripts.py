"""The test double replays what the REAL cloud-hypervisor answered.

``tests/ch_transcripts/transcripts.json`` was recorded from a genuine v54 binary by
``tests/ch_transcripts/record.py``. For every scenario in it this test starts the double
as a subprocess (like ``test_ch_double.py`` does), sends the very same requests, with the
placeholders pointing into a scratch directory, and requires the same status for every
call, the same ``vm.info`` after it, the same event-monitor events and the same error
chain. Where the double cannot reproduce a value exactly, only its shape is compared; each
such place says why. When the real VMM changes, re-record; never edit the transcripts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.ch_transcripts.record import (
    KERNEL,
    WORKDIR,
    encode_request,
    http_call,
    info_after,
    normalise,
    project_info,
    settle_events,
)

DOUBLE = [sys.executable, "-m", "hyperfleet.reconcilers.testing.chdouble"]
TRANSCRIPTS = Path(__file__).resolve().parents[1] / "ch_transcripts" / "transcripts.json"
DOC: dict[str, Any] = json.loads(TRANSCRIPTS.read_text())
SCENARIOS: dict[str, dict[str, Any]] = {s["name"]: s for s in DOC["scenarios"]}
BDF = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
# The double answers synchronously, events included, so a short quiet spell is enough.
QUIET = 0.02


@dataclass
class Replay:
    """The doubles of one scenario, by the transcript's process tag."""

    workdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    current: str | None = None

    @property
    def mapping(self) -> dict[str, str]:
        return {KERNEL: str(self.workdir / "vmlinux"), WORKDIR: str(self.workdir)}

    def sock(self, tag: str) -> str:
        return str(self.workdir / f"{tag}.sock")

    def events(self, tag: str) -> str:
        return str(self.workdir / f"{tag}.events")

    def new_events(self, tag: str, expect: str | None = None) -> list[str]:
        new = settle_events(self.events(tag), self.seen[tag], expect, quiet=QUIET)
        self.seen[tag] += len(new)
        return new

    def start(self, tag: str) -> None:
        with open(self.workdir / f"{tag}.stderr", "wb") as err:
            self.procs[tag] = subprocess.Popen(
                [*DOUBLE, "--api-socket", f"path={self.sock(tag)}",
                 "--event-monitor", f"path={self.events(tag)}"], stderr=err)
        self.seen[tag] = 0
        self.current = tag
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock(tag)):
            assert self.procs[tag].poll() is None, self.stderr(tag)
            assert time.monotonic() < deadline, "the double's socket did not appear"
            time.sleep(0.005)

    def stderr(self, tag: str) -> str:
        return (self.workdir / f"{tag}.stderr").read_text()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def replay() -> Iterator[Replay]:
    path = Path(tempfile.mkdtemp(prefix="cht-", dir="/tmp"))  # sun_path is 108 bytes
    run = Replay(path)
    (path / "vmlinux").write_bytes(b"")  # the double only checks that the kernel exists
    try:
        yield run
    finally:
        run.stop_all()
        shutil.rmtree(path, ignore_errors=True)


def check_body(step: dict[str, Any], body: Any, where: str) -> None:
    """The response body against the recorded one (already normalised on both sides)."""
    want = step["body"]
    action = step["action"]
    if action == "vm.info" and isinstance(want, dict):
        # The real config echoes many defaults the double does not fill in, and its
        # device tree has internal nodes (rng, serial, ioapic, PCI parents) with BAR
        # addresses: compare what the agent reads.
        assert project_info(body) == project_info(want), where
        return
    if action.startswith("vm.add-") and step["status"] == 200:
        # PciDeviceInfo: the real VMM puts built-in devices (virtio-rng, ...) on the PCI
        # bus that the double does not model, so slot numbers differ; the id must match
        # and the bdf must be a PCI address.
        assert isinstance(body, dict) and set(body) == set(want), (where, body)
        assert body["id"] == want["id"], where
        assert BDF.fullmatch(body["bdf"]), (where, body)
        return
    # Everything else is deterministic and reproduced exactly: error chains (all
    # elements), vmm.ping (pid normalised), vm.counters of a guest doing no I/O (the real
    # u64::MAX latency sentinels included), empty bodies, micro_http's raw text.
    assert body == want, where


def replay_call(run: Replay, step: dict[str, Any], where: str) -> None:
    tag = step["proc"]
    sock = run.sock(tag)
    answer = http_call(sock, step["method"], step["action"], encode_request(step, run.mapping))
    expect = step["events"][-1] if step["events"] else None
    events = run.new_events(tag, expect)
    body = normalise(answer.body, run.mapping, run.procs[tag].pid)
    assert answer.status == step["status"], (where, answer.status, body)
    check_body(step, body, where)
    assert events == step["events"], where
    if "after" in step:
        assert info_after(sock) == step["after"], where


def replay_exit(run: Replay, step: dict[str, Any], where: str) -> None:
    tag = step["proc"]
    try:
        code: int | None = run.procs[tag].wait(timeout=10)
    except subprocess.TimeoutExpired:
        code = None
    assert code == step["exit_code"], (where, run.stderr(tag))
    assert run.new_events(tag) == step["events"], where
    assert os.path.exists(run.sock(tag)) == step["socket_left"], where


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_double_replays_the_real_vmm(name: str, replay: Replay) -> None:
    for index, step in enumerate(SCENARIOS[name]["steps"]):
        where = f"{name} step {index}: {step.get('label', step['op'])}"
        op = step["op"]
        if op == "file":
            with open(replay.mapping[WORKDIR] + step["path"][len(WORKDIR):], "wb") as f:
                f.truncate(step["size"])
        elif op == "mkdir":
            os.makedirs(replay.mapping[WORKDIR] + step["path"][len(WORKDIR):], exist_ok=True)
        elif op == "listdir":
            path = replay.mapping[WORKDIR] + step["path"][len(WORKDIR):]
            assert sorted(os.listdir(path)) == step["files"], where
        elif op == "start":
            replay.start(step["proc"])
            assert replay.new_events(step["proc"]) == step["events"], where
        elif op == "call":
            replay_call(replay, step, where)
        elif op == "exit":
            replay_exit(replay, step, where)
        else:
            raise AssertionError(f"{where}: unknown step {op!r}")


def test_transcripts_cover_the_required_scenarios() -> None:
    """The transcript file was recorded by the real VMM, with every scenario in it."""
    assert DOC["recorded_with"]["version"].startswith("cloud-hypervisor v54.")
    assert {"lifecycle", "no_vm_errors", "create_does_not_validate", "create_twice",
            "create_without_max_vcpus", "malformed_json", "unknown_action", "wrong_method",
            "resize", "hotplug", "snapshot_restore", "vmm_shutdown",
            "vsock_hotplug"} <= set(SCENARIOS)
    text = TRANSCRIPTS.read_text()
    assert "/tmp/" not in text and "/root/" not in text  # placeholders only
