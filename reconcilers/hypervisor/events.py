"""Follow a VMM's ``--event-monitor`` file: the events written since the last look.

cloud-hypervisor writes one pretty-printed JSON object per event, back to back, so the
file is read as a stream of JSON values; a value still being written waits for the next
read. A new VMM for the same VM writes a new file (new inode): reading starts over.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_DECODER = json.JSONDecoder()


@dataclass
class EventTail:
    path: Path
    _inode: int | None = None
    _offset: int = 0
    _pending: str = ""
    _events: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> list[dict[str, Any]]:
        """Events completed since the previous call ([] if the file is gone)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._inode, self._offset, self._pending = None, 0, ""
            return []
        if st.st_ino != self._inode or st.st_size < self._offset:
            self._inode, self._offset, self._pending = st.st_ino, 0, ""
        if st.st_size == self._offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(st.st_size - self._offset)
        self._offset += len(chunk)
        text = self._pending + chunk.decode("utf-8", errors="replace")
        events, used = parse_events(text)
        self._pending = text[used:]
        return events


def parse_events(text: str) -> tuple[list[dict[str, Any]], int]:
    """The complete events at the start of ``text`` and how much of it they took: the
    rest is an event still being written."""
    events: list[dict[str, Any]] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return events, pos
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return events, pos  # incomplete: the VMM is still writing it
        pos = end
        if isinstance(value, dict):
            events.append(value)


def is_outcome(event: dict[str, Any]) -> bool:
    """An event that reports something that happened, not an attempt: cloud-hypervisor
    emits the "-ing" event (booting, pausing, resizing, ...) even when the action then fails,
    and ``vmm:starting`` at every start, so only the others say the VM changed."""
    return not str(event.get("event", "")).endswith("ing")
