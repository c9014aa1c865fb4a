"""EventTail: the VMM's event-monitor file read as a stream, as the real VMM writes it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hyperfleet.reconcilers.hypervisor.events import EventTail, is_outcome


def _event(name: str, source: str = "vm") -> str:
    # Pretty-printed and back to back, as cloud-hypervisor writes them.
    return json.dumps({"timestamp": {"secs": 0, "nanos": 1}, "source": source, "event": name,
                       "properties": None}, indent=2) + "\n"


def test_reads_only_new_complete_events(tmp_path: Path) -> None:
    f = tmp_path / "vm.events"
    tail = EventTail(f)
    assert tail.read() == []  # no file yet
    f.write_text(_event("starting", "vmm") + _event("booting"))
    assert [e["event"] for e in tail.read()] == ["starting", "booting"]
    assert tail.read() == []
    half = _event("booted")
    with open(f, "a") as out:
        out.write(half[:20])  # the VMM is mid-write
    assert tail.read() == []
    with open(f, "a") as out:
        out.write(half[20:] + _event("pausing"))
    assert [e["event"] for e in tail.read()] == ["booted", "pausing"]


def test_a_new_vmm_file_is_read_from_the_start(tmp_path: Path) -> None:
    f = tmp_path / "vm.events"
    tail = EventTail(f)
    f.write_text(_event("starting", "vmm") + _event("booting") + _event("booted"))
    assert len(tail.read()) == 3
    os.unlink(f)  # the agent stops the VMM; a new one writes a new, shorter file
    f.write_text(_event("starting", "vmm"))
    assert [e["event"] for e in tail.read()] == ["starting"]


def test_attempts_are_not_outcomes() -> None:
    # A failed vm.boot still emits "booting"; vmm:starting comes with every process.
    assert not is_outcome({"source": "vm", "event": "booting"})
    assert not is_outcome({"source": "vmm", "event": "starting"})
    assert is_outcome({"source": "vm", "event": "shutdown"})
    assert is_outcome({"source": "vm", "event": "rebooted"})
