"""Which controller replica may schedule: kopf peering's pause rule, as a pure function.

kopf pauses a peered replica's watches while a live peer has a higher (or the same)
priority, but the controller's scheduling loop is not a kopf handler: left alone, a
paused replica would keep binding and evicting from a frozen view (a frozen view of
heartbeats looks exactly like a fleet of lost nodes). The loop asks this instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from .models.common import parse_time

#: kopf's default peer lifetime, for keep-alives that do not state theirs.
DEFAULT_LIFETIME = 60


def is_active(peers: Mapping[str, Any], identity: str, priority: int, now: datetime) -> bool:
    """``peers`` is the ClusterKopfPeering's ``status`` (identity -> keep-alive).

    Active only once kopf has announced this replica (before that kopf keeps it paused
    too) and while no live peer has a priority at least as high (equal priorities pause
    every one of them in kopf, so they must here as well)."""
    if not isinstance(peers.get(identity), Mapping):
        return False
    for peer, info in peers.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            seen = parse_time(info["lastseen"]) if info.get("lastseen") else now
            lifetime = timedelta(seconds=int(info.get("lifetime", DEFAULT_LIFETIME)))
            rank = int(info.get("priority", 0))
        except (TypeError, ValueError):
            continue  # unreadable keep-alive: kopf cannot read it either
        if seen + lifetime > now and rank >= priority:
            return False
    return True


#: How long a replica must stay eligible before it acts: longer than the interval at which
#: every replica reads the peering object (1 s), so that of two replicas starting together
#: (each announced, neither yet seen by the other) the lower one has stood by before the
#: higher one binds, and a higher one joining later finds the active one already standing by.
SETTLE_SECONDS = 2.5


class Activation:
    """``is_active`` held for ``settle`` seconds in a row before a replica acts (and dropped
    at once when it no longer holds): kopf peering alone lets two replicas that start
    together both act for up to a second."""

    def __init__(self, settle: float = SETTLE_SECONDS) -> None:
        self.settle = settle
        self._since: float | None = None

    def update(self, eligible: bool, now: float) -> bool:
        """``now``: a monotonic clock. Whether this replica may act."""
        if not eligible:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since >= self.settle
