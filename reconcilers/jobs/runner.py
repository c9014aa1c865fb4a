"""Node side of VmJobs: claim a job routed here, run its handler, record the outcome.

Blocking code, meant for a worker thread. Claiming is a resourceVersion-conditional
status patch, so a job runs at most once per attempt even if two agents race.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ..driver import VmDriver
from ..kube import JOBS, Conflict, Kube
from ..models.common import now_utc
from .dispatch import CANCEL_ANNOTATION, current_status, parse
from .engine import JobError, JobPhase, JobStatus, advance, decide_after_failure
from .handlers import HANDLERS, Cancelled, JobContext, JobFailure
from .protocol import JobDocument, JobValidationError

log = logging.getLogger("hyperfleet.jobs")


def _now() -> datetime:
    return now_utc()


class JobRunner:
    def __init__(self, node: str, kube: Kube, driver: VmDriver,
                 migration_address: str | None = None) -> None:
        self.node = node
        self.kube = kube
        self.driver = driver
        self.running: dict[str, threading.Event] = {}  # job key -> cancel flag
        self.peers = MigrationPeers(self, migration_address)
        self.stopping = False
        self.on_finish: Callable[[JobDocument, JobStatus], None] | None = None  # metrics hook
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16,
                                                           thread_name_prefix="job")

    def wants(self, body: Mapping[str, Any]) -> bool:
        st = body.get("status") or {}
        return bool(st.get("assignedNode") == self.node and st.get("phase") == "Scheduled")

    def cancel(self, key: str) -> None:
        flag = self.running.get(key)
        if flag is not None:
            flag.set()

    def run(self, body: Mapping[str, Any]) -> None:
        """Claim and execute one job; once claimed, every exit path writes a status."""
        meta = body["metadata"]
        key = f"{meta.get('namespace') or 'default'}/{meta['name']}"
        try:
            self._run(body)
        finally:
            self.running.pop(key, None)

    def _run(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        ns, name = meta.get("namespace") or "default", meta["name"]
        key = f"{ns}/{name}"
        try:
            job = parse(body)
        except JobValidationError:
            return  # the controller fails invalid jobs
        status = current_status(body) or JobStatus()
        obs = job.observability
        adapter = logging.LoggerAdapter(log, {
            "jobId": job.job_id, "operation": job.operation, "traceId": obs.trace_id,
            "spanId": obs.span_id, "correlationId": obs.correlation_id, "node": self.node,
        })
        try:
            running = advance(status, JobPhase.RUNNING, now=_now(), node=self.node,
                              message=f"attempt {status.attempts + 1} on {self.node}")
            self._write(ns, name, running, meta["resourceVersion"])
        except Conflict:
            adapter.info("job changed before it could be claimed; leaving it")
            return
        cancel = self.running.setdefault(key, threading.Event())
        if self.stopping:
            cancel.set()
        adapter.info("job started", extra={"attempt": running.attempts})
        final = self._execute(job, running, ns, key, cancel, adapter)
        adapter.info("job finished", extra={"phase": final.phase.value,
                                            "error": final.last_error})
        try:
            self._write(ns, name, final)
        except Exception:
            adapter.exception("could not record the job outcome")
        if self.on_finish is not None:
            self.on_finish(job, final)

    def _execute(self, job: JobDocument, st: JobStatus, ns: str, key: str,
                 cancel: threading.Event,
                 adapter: logging.LoggerAdapter[logging.Logger]) -> JobStatus:
        fn = HANDLERS.get(job.operation)
        if fn is None:
            return decide_after_failure(job, st, JobError(
                f"no handler for operation {job.operation} on this agent", retryable=False),
                _now())
        last_report = [0.0]

        def report(percent: int, message: str) -> None:
            adapter.info("progress", extra={"percent": percent, "progressMessage": message})
            now = time.monotonic()
            if now - last_report[0] < 0.2 and percent < 100:
                return
            last_report[0] = now
            patch = {"status": {"progress": {"percent": percent, "message": message}}}
            try:
                self.kube.patch(JOBS, key.split("/")[1], patch, ns, status=True)
            except Exception as exc:
                adapter.debug("progress not recorded: %s", exc)

        ctx = JobContext(job=job, payload=job.typed_payload(), name=key.split("/")[1],
                         namespace=ns, node=self.node,
                         driver=self.driver, kube=self.kube, log=adapter, report=report,
                         cancelled=cancel, peers=self.peers)
        started = st.attempt_started_at or _now()
        remaining = job.execution.timeout_seconds - (_now() - started).total_seconds()
        future = self._pool.submit(fn, ctx)
        deadline = time.monotonic() + max(0.0, remaining)
        while True:
            try:
                result = future.result(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                return advance(st, JobPhase.SUCCEEDED, now=_now(), result=result,
                               message="succeeded")
            except concurrent.futures.TimeoutError:
                if cancel.is_set() and self.stopping:
                    return advance(st, JobPhase.PENDING, now=_now(),
                                   message=f"agent on {self.node} shutting down; handed back")
                if cancel.is_set():
                    return advance(st, JobPhase.CANCELLED, now=_now(),
                                   message="cancelled while running")
                if time.monotonic() >= deadline:
                    cancel.set()  # ask the handler to stop; its result no longer counts
                    return advance(st, JobPhase.TIMED_OUT, now=_now(),
                                   message=f"no result within {job.execution.timeout_seconds}s",
                                   error="timed out")
            except Cancelled:
                return advance(st, JobPhase.CANCELLED, now=_now(),
                               message="cancelled while running")
            except JobFailure as exc:
                return decide_after_failure(job, st, exc.error, _now())
            except Exception as exc:
                adapter.exception("handler crashed")
                return decide_after_failure(job, st, JobError(
                    f"{type(exc).__name__}: {exc}", retryable=True), _now())

    def _write(self, ns: str, name: str, st: JobStatus, rv: str | None = None) -> None:
        patch: dict[str, Any] = {"status": st.to_status()}
        if rv is not None:
            patch["metadata"] = {"resourceVersion": rv}
        self.kube.patch(JOBS, name, patch, ns, status=True)

    def hand_back(self, grace: float = 20.0) -> None:
        """Graceful shutdown: running jobs stop and go back to the queue (Pending)."""
        self.stopping = True
        for flag in self.running.values():
            flag.set()
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def cancelled_by_user(self, body: Mapping[str, Any]) -> bool:
        return bool((body["metadata"].get("annotations") or {}).get(CANCEL_ANNOTATION))


def receiver_urls(address: str | None,
                  unix_path: Path) -> tuple[str, str, Callable[[], bool]]:
    """(URL the receiving VMM listens on, URL the sender connects to, is-it-listening).

    Between hosts the VMMs talk TCP (``tcp:<host>:<port>``, cloud-hypervisor's own
    migration transport); on one host (a dev stack) a unix socket beside the API socket.
    The receiver binds only the node's migration address, not every interface: the
    stream carries guest memory, unauthenticated.
    """
    if not address:
        return f"unix:{unix_path}", f"unix:{unix_path}", unix_path.exists
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((address, 0))
        port = int(probe.getsockname()[1])

    url = f"tcp:[{address}]:{port}" if family == socket.AF_INET6 else f"tcp:{address}:{port}"
    return url, url, lambda: tcp_listening(port)


def tcp_listening(port: int) -> bool:
    """Whether a socket in this network namespace listens on ``port``. Read from /proc,
    not by connecting: a receiving VMM takes the first connection as its sender, and a
    probe that hangs up would fail the migration."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


class MigrationPeers:
    """Rendezvous of the two agents of a live migration, through the VmJob's status.

    The destination agent starts a VMM in receive mode and publishes its receiver URL
    in ``status.migration``; the source agent waits for it, then sends.
    """

    def __init__(self, runner: JobRunner, address: str | None = None) -> None:
        self.runner = runner
        self.address = address  # this node's address for TCP migrations (None: same host)
        self.receiving: set[str] = set()

    def await_receiver(self, ctx: JobContext, dest: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ctx.check_cancelled()
            body = self.runner.kube.get(JOBS, ctx.name, ctx.namespace) or {}
            mig = (body.get("status") or {}).get("migration") or {}
            if mig.get("node") == dest and mig.get("receiverUrl"):
                return str(mig["receiverUrl"])
            if mig.get("error"):
                raise JobFailure(f"destination {dest}: {mig['error']}", retryable=False)
            time.sleep(0.2)
        raise JobFailure(f"destination node {dest} did not get ready to receive within "
                         f"{timeout:.0f}s (is its agent running?)")

    def wants_to_receive(self, body: Mapping[str, Any]) -> bool:
        """Is this a running vm.migrate whose destination is us, not yet receiving?"""
        spec = body.get("spec") or {}
        st = body.get("status") or {}
        if spec.get("operation") != "vm.migrate" or st.get("phase") != "Running":
            return False
        data = (spec.get("payload") or {}).get("data") or {}
        key = f"{body['metadata'].get('namespace')}/{body['metadata']['name']}"
        return data.get("destinationNode") == self.runner.node and key not in self.receiving \
            and not (st.get("migration") or {}).get("receiverUrl") \
            and not (st.get("migration") or {}).get("error")

    def receive(self, body: Mapping[str, Any]) -> None:
        """Destination side: a VMM listening for the incoming VM (blocking thread)."""
        meta = body["metadata"]
        ns = meta.get("namespace") or "default"
        key = f"{ns}/{meta['name']}"
        self.receiving.add(key)
        target = ((body.get("spec") or {}).get("routing") or {}).get("targetVm") or {}
        vm_ns, vm_name = target.get("namespace") or ns, target["name"]
        pm = self.runner.driver.pm
        self.runner.driver.expect(f"{vm_ns}/{vm_name}")
        try:
            with self.runner.driver.lock(vm_ns, vm_name):
                if pm.pid(vm_ns, vm_name) is not None:
                    raise RuntimeError(f"a VMM for {vm_ns}/{vm_name} already runs here")
                pm.spawn(vm_ns, vm_name)
            listen, publish, ready = receiver_urls(
                self.address, pm.paths(vm_ns, vm_name).socket.with_suffix(".migration"))
            client = pm.client(vm_ns, vm_name)
            thread = threading.Thread(target=self._listen, args=(client, listen, key),
                                      daemon=True)
            thread.start()
            deadline = time.monotonic() + 10
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            if not ready():
                raise RuntimeError(f"the receiving VMM is not listening on {listen}")
            self.runner.kube.patch(JOBS, meta["name"], {"status": {"migration": {
                "node": self.runner.node, "receiverUrl": publish}}}, ns, status=True)
        except Exception as exc:
            log.warning("cannot receive migration", extra={"job": key, "error": str(exc)})
            self.runner.kube.patch(JOBS, meta["name"], {"status": {"migration": {
                "node": self.runner.node, "error": str(exc)}}}, ns, status=True)
            self.receiving.discard(key)

    def _listen(self, client: Any, url: str, key: str) -> None:
        try:
            client.timeout = 600
            client.request("PUT", "vm.receive-migration", {"receiver_url": url})
            log.info("migration received", extra={"job": key})
        except Exception as exc:
            log.warning("migration receive failed", extra={"job": key, "error": str(exc)})
        finally:
            client.close()
            self.receiving.discard(key)
