"""The guest agent's wire protocol: the one module both the host client
(``reconcilers/guest.py``) and the in-guest program (``program.py``) import, so the two
cannot drift apart.

One request per connection, one JSON object per line, request then reply. A request is
``{"op": ..., "deadline": <seconds>}``: the host's total budget for it, counted by the
guest from receipt (the two clocks need not agree), so the guest stops its hooks and
answers before the host gives up. The reply is ``{"ok": true, "result": {...}}`` or
``{"ok": false, "error": "<why>"}``.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_PORT = 1024
OPS = ("ping", "checkpoint", "restore", "health")
#: What the host waits beyond the deadline it sends: the guest's KILL_GRACE for an
#: overrunning hook, plus the reply's way back.
REPLY_MARGIN = 5.0
#: SIGTERM to SIGKILL for an overrunning hook's process group (a freeze hook may trap
#: SIGTERM to thaw); must stay below REPLY_MARGIN.
KILL_GRACE = 2.0
#: Characters of a hook's output that reach the host (a condition message, not a log).
OUTPUT_CHARS = 500
#: Longest request or reply line either side reads; hook output is truncated long before.
MAX_LINE = 1 << 20


class GuestError(Exception):
    """The guest agent could not be reached or reported a failure (on the guest: a hook
    failed, which becomes the error reply)."""


def request(op: str, deadline: float) -> dict[str, Any]:
    return {"op": op, "deadline": deadline}


def ok_reply(result: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error_reply(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


def encode(message: dict[str, Any]) -> bytes:
    """One message as its line on the wire."""
    return (json.dumps(message) + "\n").encode()
