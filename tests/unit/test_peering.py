"""Which controller replica schedules (kopf peering's rule), and how a replica that takes
over folds a fresh list into a view its paused watches left stale."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hyperfleet.reconcilers.fleet import merge
from hyperfleet.reconcilers.peering import Activation, is_active

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def peer(priority: int, seen: datetime = NOW, lifetime: int = 60) -> dict[str, Any]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_the_highest_live_priority_is_the_only_active_replica() -> None:
    peers = {"a": peer(10), "b": peer(20)}
    assert not is_active(peers, "a", 10, NOW)
    assert is_active(peers, "b", 20, NOW)


def test_not_active_before_kopf_has_announced_this_replica() -> None:
    assert not is_active({}, "a", 10, NOW)
    assert not is_active({"b": peer(5)}, "a", 10, NOW)


def test_a_dead_peer_no_longer_holds_the_role() -> None:
    stale = NOW - timedelta(seconds=61)
    assert is_active({"a": peer(10), "b": peer(20, seen=stale)}, "a", 10, NOW)
    assert not is_active({"a": peer(10), "b": peer(20, seen=NOW - timedelta(seconds=59))},
                         "a", 10, NOW)


def test_equal_priorities_pause_both_as_kopf_does() -> None:
    peers = {"a": peer(10), "b": peer(10)}
    assert not is_active(peers, "a", 10, NOW) and not is_active(peers, "b", 10, NOW)


def test_unreadable_keep_alives_are_ignored() -> None:
    peers = {"a": peer(10), "b": {"priority": "high", "lastseen": NOW.isoformat()}, "c": None}
    assert is_active(peers, "a", 10, NOW)
    # kopf takes a keep-alive without lastseen as seen just now.
    assert not is_active({"a": peer(10), "b": {"priority": 11}}, "a", 10, NOW)


def obj(name: str, rv: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": str(rv)}}


def test_merge_drops_what_the_list_no_longer_has_and_keeps_newer_watch_events() -> None:
    store = {"deleted": obj("deleted", 5), "stale": obj("stale", 6), "fresh": obj("fresh", 30),
             "created-after-list": obj("created-after-list", 25)}
    merge(store, {"stale": obj("stale", 12), "fresh": obj("fresh", 14), "new": obj("new", 15)}, "20")
    assert {k: v["metadata"]["resourceVersion"] for k, v in store.items()} == {
        "stale": "12", "fresh": "30", "new": "15", "created-after-list": "25"}


def test_a_replica_acts_only_after_staying_eligible_for_the_settle_time() -> None:
    a = Activation(settle=2.5)
    assert not a.update(True, 100.0)  # just announced: the other replica may not see it yet
    assert not a.update(True, 101.0)
    assert a.update(True, 102.5)
    assert a.update(True, 103.5)  # stays active while eligible, no new wait
    assert not a.update(False, 104.5)  # a higher peer appeared: stand by at once
    assert not a.update(True, 105.5)  # eligible again: the wait starts over
    assert a.update(True, 108.0)


def test_two_replicas_starting_together_never_both_act() -> None:
    """Each reads the peering object once a second; the lower one sees the higher one's
    keep-alive a second after it announced, and stands by before the settle time is up."""
    low, high = Activation(), Activation()
    acted: list[tuple[float, str]] = []
    for tick in range(10):
        t = float(tick)
        sees_high = t >= 1.0  # the higher replica's keep-alive shows from t=1
        if low.update(not sees_high, t):
            acted.append((t, "low"))
        if high.update(True, t):
            acted.append((t, "high"))
    assert acted and {who for _, who in acted} == {"high"}
