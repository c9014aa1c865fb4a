"""One kind's list + watch for a process, without kopf's per-object machinery.

kopf gives every watched object a worker, a parsed body, a patch and a diff on every event;
at a fleet of VMs that is most of the controller's and the agents' CPU and memory. An
``Informer`` lists in pages, then watches from the list's resourceVersion, passing each
object through ``each`` as it arrives (the controller keeps compact copies) and handing
the events to the asyncio loop in batches: one thread per informer, one loop wake-up per
burst of events.

A relist (at start, and when the watch's version has expired) is turned into the events
that bring a consumer up to date: every listed object as ADDED or MODIFIED, and a DELETED
for each object the informer had delivered that the list no longer has, so consumers
handle one kind of input only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .kube import Expired, Items, Resource

log = logging.getLogger(__name__)

#: (type, object): ADDED, MODIFIED or DELETED, the object as ``each`` made it.
Event = tuple[str, dict[str, Any]]
Transform = Callable[[dict[str, Any]], dict[str, Any]]

RETRY_SECONDS = 2.0  # after a failed list or watch
#: One watch request's length: the server ends it and we go on from its last version. A
#: connection that died without a word (a partition) is found by the read timeout, this
#: plus 30 s (kopf's watches: 60 s and 70 s).
WATCH_SECONDS = 60


class Watchable(Protocol):
    """What an informer needs of the API client (``Kube``)."""

    def snapshot(self, res: Resource, namespace: str | None = None,
                 field_selector: str | None = None, cached: bool = False,
                 each: Transform | None = None,
                 label_selector: str | None = None) -> tuple[Items, str]: ...

    def watch(self, res: Resource, resource_version: str, field_selector: str | None = None,
              label_selector: str | None = None, timeout: int = WATCH_SECONDS
              ) -> Iterator[tuple[str, dict[str, Any]]]: ...


def object_key(body: dict[str, Any]) -> str:
    meta = body["metadata"]
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else str(meta["name"])


class Informer:
    """List + watch of one kind (optionally filtered by field and label selectors) on a
    thread of its own; ``run`` delivers the events to ``sink`` on the asyncio loop."""

    def __init__(self, kube: Watchable, res: Resource, *, field_selector: str | None = None,
                 label_selector: str | None = None, each: Transform | None = None,
                 watch_seconds: int = WATCH_SECONDS) -> None:
        self.kube = kube
        self.res = res
        self.field_selector = field_selector
        self.label_selector = label_selector
        self.each = each or (lambda body: body)
        self.watch_seconds = watch_seconds
        #: Set once the first list has been delivered: the consumer's view is complete.
        self.synced = asyncio.Event()
        self._known: set[str] = set()  # keys delivered and not deleted (thread-owned)
        self._pending: list[Event] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._stop = threading.Event()

    async def run(self, sink: Callable[[list[Event]], None]) -> None:
        """Feed ``sink`` until cancelled. ``sink`` runs on the loop, with the events of one
        burst in order; it must not block."""
        loop = asyncio.get_running_loop()
        self._stop.clear()
        thread = threading.Thread(target=self._thread, args=(loop, sink), daemon=True,
                                  name=f"informer-{self.res.plural}")
        thread.start()
        try:
            await asyncio.Future()  # until cancelled
        finally:
            # The thread leaves at its next event or when the watch request ends.
            self._stop.set()

    def _thread(self, loop: asyncio.AbstractEventLoop,
                sink: Callable[[list[Event]], None]) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist(loop, sink)
                version = self._watch(loop, sink, version)
            except Expired:
                log.info("watch expired; listing again", extra={"kind": self.res.plural})
                version = None
            except Exception:
                if self._stop.is_set() or loop.is_closed():
                    return
                log.exception("list or watch failed; retrying", extra={"kind": self.res.plural})
                version = None  # events may have been missed: list again
                self._stop.wait(RETRY_SECONDS)

    def _relist(self, loop: asyncio.AbstractEventLoop,
                sink: Callable[[list[Event]], None]) -> str:
        items, version = self.kube.snapshot(self.res, None, self.field_selector,
                                            each=self.each, label_selector=self.label_selector)
        listed = {object_key(b) for b in items}
        events: list[Event] = [("DELETED", {"metadata": _meta_of(k)})
                               for k in self._known - listed]
        events += [("MODIFIED" if object_key(b) in self._known else "ADDED", b) for b in items]
        self._known = listed
        self._deliver(loop, sink, events, synced=True)
        return version

    def _watch(self, loop: asyncio.AbstractEventLoop, sink: Callable[[list[Event]], None],
               version: str) -> str:
        for type_, body in self.kube.watch(self.res, version, self.field_selector,
                                           self.label_selector, self.watch_seconds):
            if self._stop.is_set():
                break
            version = str((body.get("metadata") or {}).get("resourceVersion") or version)
            if type_ == "BOOKMARK":
                continue
            key = object_key(body)
            if type_ == "DELETED":
                self._known.discard(key)
            else:
                self._known.add(key)
            self._deliver(loop, sink, [(type_, self.each(body))])
        return version

    def _deliver(self, loop: asyncio.AbstractEventLoop, sink: Callable[[list[Event]], None],
                 events: list[Event], synced: bool = False) -> None:
        """Queue events for the loop; one wake-up drains whatever queued meanwhile."""
        with self._lock:
            self._pending.extend(events)
            if self._scheduled and not synced:
                return
            self._scheduled = True
        loop.call_soon_threadsafe(self._drain, sink, synced)

    def _drain(self, sink: Callable[[list[Event]], None], synced: bool) -> None:
        with self._lock:
            events, self._pending = self._pending, []
            self._scheduled = False
        if events:
            try:
                sink(events)
            except Exception:
                log.exception("handling watch events failed", extra={"kind": self.res.plural})
        if synced:
            self.synced.set()


def _meta_of(key: str) -> dict[str, str]:
    ns, _, name = key.rpartition("/")
    return {"namespace": ns, "name": name} if ns else {"name": name}
