"""Node side of VmJobs: claim a job routed here, run its handler, record the outcome.

Blocking code, meant for a worker thread. Claiming is a resourceVersion-conditional
status patch, so a job runs at most once per attempt even if two agents race. Later
writes (progress, outcome) re-read the job and go only over this node's own attempt:
the controller may have handed it back or timed it out meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..driver import VmDriver
from ..kube import JOBS, VMS, Conflict, Gone, KubeApi
from ..models.common import now_utc
from ..text import error_text
from .dispatch import CANCEL_ANNOTATION, current_status, job_key, parse
from .envelope import JobDocument
from .handlers import HANDLERS, Cancelled, JobContext, JobFailure
from .parse import JobValidationError
from .retries import JobError, check_deadline, decide_after_failure, hand_back
from .status import JobPhase, JobStatus, advance, finished_event

log = logging.getLogger("hyperfleet.jobs")
#: Seconds a receiving VMM waits for the whole incoming migration.
RECEIVE_TIMEOUT = 600.0

# Why a running handler was asked to stop; decides what its end is recorded as.
CANCELLED = "cancelled"  # by the user (annotation) or the object's deletion
TIMED_OUT = "timed out"
SHUTDOWN = "agent shutdown"
SUPERSEDED = "superseded"  # handed back, timed out or re-routed by the controller: not ours


def _now() -> datetime:
    return now_utc()


class JobLog(logging.LoggerAdapter[logging.Logger]):
    """Stamps the job's identity (job, trace and correlation ids) on every record.

    The stdlib adapter replaces a call's ``extra`` with its own, which dropped the
    attempt, phase and error of the lines that carry them; this one merges the two,
    the identity winning so a call cannot mislabel the job.
    """

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]
                ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **(self.extra or {})}
        return msg, kwargs


def job_log(job: JobDocument | None, node: str, key: str) -> JobLog:
    """The logger of one job; without a parsed document, only what the object says."""
    if job is None:
        return JobLog(log, {"job": key, "node": node})
    obs = job.observability
    return JobLog(log, {
        "job": key, "jobId": job.job_id, "operation": job.operation, "traceId": obs.trace_id,
        "spanId": obs.span_id, "correlationId": obs.correlation_id, "node": node,
    })


@dataclass(frozen=True)
class Attempt:
    """The attempt this agent claimed: only while the object still shows exactly this
    attempt, Running here, may the agent write the job's status."""

    uid: str | None
    node: str
    attempts: int
    started_at: datetime | None

    @classmethod
    def of(cls, body: Mapping[str, Any], status: JobStatus) -> Attempt:
        return cls(body["metadata"].get("uid"), status.assigned_node or "", status.attempts,
                   status.attempt_started_at)

    def owns(self, body: Mapping[str, Any] | None) -> bool:
        """Whether ``body`` (freshly read) still shows this attempt running here."""
        if body is None or body["metadata"].get("uid") != self.uid:
            return False
        st = current_status(body)
        return (st is not None and st.phase is JobPhase.RUNNING and st.assigned_node == self.node
                and st.attempts == self.attempts and st.attempt_started_at == self.started_at)

    def superseded_by(self, body: Mapping[str, Any]) -> bool:
        """Whether a watch event shows this attempt ended by someone else. Events may be
        older than the claim (fewer attempts): those say nothing."""
        if body["metadata"].get("uid") != self.uid:
            return True
        st = current_status(body) or JobStatus()
        if st.attempts != self.attempts:
            return st.attempts > self.attempts
        return not (st.phase is JobPhase.RUNNING and st.assigned_node == self.node
                    and st.attempt_started_at == self.started_at)


class JobRunner:
    def __init__(self, node: str, kube: KubeApi, driver: VmDriver,
                 migration_address: str | None = None, stop_grace: float = 10.0) -> None:
        self.node = node
        self.kube = kube
        self.driver = driver
        self.running: dict[str, threading.Event] = {}  # job key -> cancel flag
        self.attempts: dict[str, Attempt] = {}  # job key -> the attempt running here
        self.why: dict[str, str] = {}  # job key -> why its handler was asked to stop
        self.stop_grace = stop_grace  # how long a stopping handler is waited for
        self.peers = MigrationPeers(self, migration_address)
        self.stopping = False
        self.on_finish: Callable[[JobDocument, JobStatus], None] | None = None  # metrics hook
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16,
                                                           thread_name_prefix="job")

    def wants(self, body: Mapping[str, Any]) -> bool:
        st = body.get("status") or {}
        return bool(st.get("assignedNode") == self.node and st.get("phase") == "Scheduled")

    def cancel(self, key: str, why: str = CANCELLED) -> None:
        """Ask the job's handler to stop; the first reason counts, except that a
        superseded attempt never records anything."""
        flag = self.running.get(key)
        if flag is None:
            return
        if why == SUPERSEDED:
            self.why[key] = why
        else:
            self.why.setdefault(key, why)
        flag.set()

    def observe(self, body: Mapping[str, Any]) -> None:
        """Watch-event hook: stop an attempt the object no longer assigns to this node.

        The controller hands a job back from a node it thinks lost, or times it out,
        without this agent's involvement; the handler here must not go on (a second
        copy may already run elsewhere) and its outcome must not be written.
        """
        key = job_key(body)
        attempt = self.attempts.get(key)
        if attempt is not None and attempt.superseded_by(body):
            self.cancel(key, SUPERSEDED)

    def run(self, body: Mapping[str, Any]) -> None:
        """Claim and execute one job; once claimed, every exit path writes a status
        unless the attempt stopped being this node's."""
        key = job_key(body)
        try:
            self._run(body)
        finally:
            self.running.pop(key, None)
            self.attempts.pop(key, None)
            self.why.pop(key, None)

    def _run(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        ns, name = meta.get("namespace") or "default", meta["name"]
        key = job_key(body)
        flag = self.running.get(key)
        if self.stopping or not self.wants(body) or (flag is not None and flag.is_set()):
            return  # shutting down, not ours, or cancelled before it started
        try:
            job = parse(body)
        except JobValidationError:
            return  # the controller fails invalid jobs
        status = current_status(body) or JobStatus()
        adapter = job_log(job, self.node, key)
        late = check_deadline(job, status, _now())
        if late.phase is not status.phase:
            # The same verdict the controller gives, in case the agent sees the job first
            # (the controller was down, or this agent restarted).
            try:
                self._write(ns, name, late, body.get("status"), meta["resourceVersion"])
                self._announce(body, job, late)
                adapter.warning("deadline passed before the job could start",
                                extra={"deadline": str(job.execution.deadline)})
            except Conflict:
                adapter.info("job changed before it could be failed; leaving it")
            return
        try:
            running = advance(status, JobPhase.RUNNING, now=_now(), node=self.node,
                              message=f"attempt {status.attempts + 1} on {self.node}")
            self._write(ns, name, running, body.get("status"), meta["resourceVersion"])
        except Conflict:
            adapter.info("job changed before it could be claimed; leaving it")
            return
        attempt = Attempt.of(body, running)
        self.attempts[key] = attempt
        cancel = self.running.setdefault(key, threading.Event())
        if self.stopping:
            self.cancel(key, SHUTDOWN)
        adapter.info("job started", extra={"attempt": running.attempts})
        final = self._execute(job, running, ns, key, cancel, adapter)
        if final is None:
            adapter.info("job stopped; its outcome is not recorded",
                         extra={"why": self.why.get(key)})
            return
        adapter.info("job finished", extra={"phase": final.phase.value,
                                            "error": final.last_error})
        try:
            recorded = self._record(ns, name, attempt, final)
        except Exception:  # API unreachable: keep waiting, judge later
            adapter.exception("could not record the job outcome")
            return
        if recorded:
            self._announce(body, job, final)
        if not recorded:
            adapter.warning("job no longer runs here (handed back, timed out or deleted); "
                            "its outcome is not recorded", extra={"phase": final.phase.value})
        elif self.on_finish is not None:
            self.on_finish(job, final)

    def _execute(self, job: JobDocument, st: JobStatus, ns: str, key: str,
                 cancel: threading.Event, adapter: JobLog) -> JobStatus | None:
        """Run the handler; the status to record, or None when nothing may be."""
        fn = HANDLERS.get(job.operation)
        if fn is None:
            return decide_after_failure(job, st, JobError(
                f"no handler for operation {job.operation} on this agent", retryable=False),
                _now())
        attempt = self.attempts[key]
        last_report = [0.0]

        def report(percent: int, message: str) -> None:
            adapter.info("progress", extra={"percent": percent, "progressMessage": message})
            now = time.monotonic()
            if now - last_report[0] < 0.2 and percent < 100:
                return
            last_report[0] = now
            try:
                fresh = self.kube.get(JOBS, key.split("/")[1], ns)
                if not attempt.owns(fresh):
                    self.cancel(key, SUPERSEDED)
                    return
                assert fresh is not None
                patch = {"metadata": {"resourceVersion": fresh["metadata"]["resourceVersion"]},
                         "status": {"progress": {"percent": percent, "message": message}}}
                self.kube.patch(JOBS, key.split("/")[1], patch, ns, status=True)
            except Exception as exc:  # reported below, whatever it was
                adapter.debug("progress not recorded: %s", exc)

        ctx = JobContext(job=job, payload=job.typed_payload(), name=key.split("/")[1],
                         namespace=ns, node=self.node,
                         driver=self.driver, kube=self.kube, log=adapter, report=report,
                         cancelled=cancel, peers=self.peers)
        started = st.attempt_started_at or _now()
        remaining = job.execution.timeout_seconds - (_now() - started).total_seconds()
        future = self._pool.submit(fn, ctx)
        deadline = time.monotonic() + max(0.0, remaining)
        give_up: float | None = None  # when waiting for a stopping handler ends
        while True:
            concurrent.futures.wait([future], timeout=0.1)
            if future.done():
                return self._outcome(job, st, future, self.why.get(key), adapter)
            now = time.monotonic()
            if now >= deadline and self.why.get(key) in (None, CANCELLED):
                self.why[key] = TIMED_OUT
                cancel.set()
            if not cancel.is_set():
                continue
            why = self.why.setdefault(key, CANCELLED)
            if why == CANCELLED and not self.stopping:
                continue  # the attempt's timeout bounds how long a cancel is waited for
            if give_up is None:
                give_up = now + self.stop_grace
            elif now >= give_up:
                return self._abandon(job, st, why, adapter)

    def _outcome(self, job: JobDocument, st: JobStatus,
                 future: concurrent.futures.Future[dict[str, Any]], why: str | None,
                 adapter: JobLog) -> JobStatus | None:
        """What the finished handler actually did, given why it was asked to stop."""
        now = _now()
        exc = future.exception()
        if why == SUPERSEDED:
            return None
        if exc is None:
            done = "succeeded" if why is None else f"succeeded; it finished before it stopped ({why})"
            return advance(st, JobPhase.SUCCEEDED, now=now, result=future.result(), message=done)
        if why == TIMED_OUT:
            return advance(st, JobPhase.TIMED_OUT, now=now, error="timed out",
                           message=f"no result within {job.execution.timeout_seconds}s")
        if why == CANCELLED or (why is None and isinstance(exc, Cancelled)):
            return advance(st, JobPhase.CANCELLED, now=now, message="cancelled while running")
        if why == SHUTDOWN and isinstance(exc, Cancelled):
            return hand_back(job, st, now, f"the agent on {self.node} shut down during the job; "
                                           "it stopped and was handed back")
        if isinstance(exc, JobFailure):
            return decide_after_failure(job, st, exc.error, now)
        adapter.error("handler crashed", exc_info=exc)
        crash = f"the handler crashed: {type(exc).__name__}: {error_text(exc)}"
        return decide_after_failure(job, st, JobError(crash, retryable=True), now)

    def _abandon(self, job: JobDocument, st: JobStatus, why: str,
                 adapter: JobLog) -> JobStatus | None:
        """The handler ignored a stop request for ``stop_grace`` seconds."""
        adapter.warning("handler did not stop", extra={"why": why, "seconds": self.stop_grace})
        if why == TIMED_OUT:  # the controller records the same once the time is up
            return advance(st, JobPhase.TIMED_OUT, now=_now(), error="timed out",
                           message=f"no result within {job.execution.timeout_seconds}s; the "
                                   f"handler had not stopped {self.stop_grace:g}s later")
        # Shutdown (or a cancel during it): handing back now could run the job twice. Left
        # Running, it is handed back once this node's lease lapses (or times out), counting
        # the attempt.
        return None

    def _record(self, ns: str, name: str, attempt: Attempt, final: JobStatus) -> bool:
        """Write the outcome only over this node's attempt, never over a later one or a
        controller verdict (TimedOut, hand-back). False when it was not ours to write."""
        for _ in range(5):
            fresh = self.kube.get(JOBS, name, ns)
            if not attempt.owns(fresh):
                return False
            assert fresh is not None
            try:
                self._write(ns, name, final, fresh.get("status"),
                            fresh["metadata"]["resourceVersion"])
                return True
            except Gone:
                return False
            except Conflict:
                continue  # e.g. the migration receiver wrote meanwhile: look again
        raise Conflict(f"vmjobs/{ns}/{name} kept changing; outcome not recorded")

    def _announce(self, body: Mapping[str, Any], job: JobDocument, final: JobStatus) -> None:
        """The job's outcome Event, after the write that made it final (that write is
        conditional on resourceVersion, so this runs once per job, here or in the
        controller)."""
        if final.terminal:
            type_, reason, message = finished_event(final, job.operation)
            self.kube.event(dict(body), reason, message, type_, f"hyperfleet-agent/{self.node}")

    def _write(self, ns: str, name: str, st: JobStatus, current: Mapping[str, Any] | None,
               rv: str) -> None:
        patch: dict[str, Any] = {"status": st.to_patch(current),
                                 "metadata": {"resourceVersion": rv}}
        self.kube.patch(JOBS, name, patch, ns, status=True)

    def hand_back(self, grace: float = 20.0) -> None:
        """Graceful shutdown: running jobs are asked to stop, and each goes back to the
        queue once its handler has stopped (see ``stop_grace``)."""
        self.stopping = True
        for key in list(self.running):
            self.cancel(key, SHUTDOWN)
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
        self.poll_interval = 1.0  # seconds between looks at a job being received

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
        try:
            job: JobDocument | None = parse(body)
        except JobValidationError:
            job = None
        adapter = job_log(job, self.runner.node, key)
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
            thread = threading.Thread(target=self._listen,
                                      args=(client, listen, key, adapter, vm_ns, vm_name),
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
            adapter.warning("cannot receive migration", extra={"error": str(exc)})
            self.runner.kube.patch(JOBS, meta["name"], {"status": {"migration": {
                "node": self.runner.node, "error": str(exc)}}}, ns, status=True)
            self.receiving.discard(key)

    def _listen(self, client: Any, url: str, key: str, adapter: JobLog, vm_ns: str,
                vm_name: str) -> None:
        """Receive, while watching the job: a source that gives up (its attempt failed,
        timed out, was cancelled or deleted) sends nothing more, and the receiving VMM
        would otherwise wait for RECEIVE_TIMEOUT and refuse this VM's next start here."""
        outcome: list[BaseException | None] = []

        def receive() -> None:
            try:
                client.timeout = RECEIVE_TIMEOUT
                client.request("PUT", "vm.receive-migration", {"receiver_url": url})
                outcome.append(None)
            except Exception as exc:  # reported below, whatever it was
                outcome.append(exc)

        worker = threading.Thread(target=receive, daemon=True, name=f"receive-{vm_name}")
        worker.start()
        driver = self.runner.driver
        abandoned: str | None = None
        try:
            while worker.is_alive():
                worker.join(self.poll_interval)
                if worker.is_alive() and (abandoned := self._abandoned(key)):
                    break
            if abandoned is None and outcome and outcome[0] is None:
                adapter.info("migration received")
                self._take_binding(key, vm_ns, vm_name, adapter)
                return
            why = abandoned or str(outcome[0] if outcome else "no answer")
            # Nothing (complete) arrived: the receiving VMM holds no VM and would refuse
            # this VM's next start here ("a migration is being received"), so it goes now.
            adapter.warning("migration not received; stopping the receiving VMM",
                            extra={"error": why})
            with driver.lock(vm_ns, vm_name):
                driver.pm.stop(vm_ns, vm_name, grace=2)
                with contextlib.suppress(FileNotFoundError):
                    driver.pm.paths(vm_ns, vm_name).socket.with_suffix(".migration").unlink()
            driver.not_coming(f"{vm_ns}/{vm_name}")
        finally:
            worker.join(5)
            client.close()
            self.receiving.discard(key)

    def _take_binding(self, key: str, vm_ns: str, vm_name: str, adapter: JobLog) -> None:
        """The whole VM is here now, and the source VMM exits: bind the VM to this node at
        once, rather than rely on the source agent living long enough to do it (if it
        died first, its successor would find the VM bound to it with no VMM and boot a
        second copy)."""
        ns, _, name = key.partition("/")
        job = self.runner.kube.get(JOBS, name, ns) or {}
        source = (job.get("status") or {}).get("assignedNode")
        for _ in range(3):
            vm = self.runner.kube.get(VMS, vm_name, vm_ns)
            if vm is None or (vm.get("status") or {}).get("nodeName") != source:
                return  # deleted, or already rebound (by the source, or the controller)
            try:
                self.runner.kube.patch(VMS, vm_name, {
                    "metadata": {"resourceVersion": vm["metadata"]["resourceVersion"]},
                    "status": {"nodeName": self.runner.node,
                               "message": f"migrated from {source}"}}, vm_ns, status=True)
                return
            except Conflict:
                continue
        adapter.warning("could not bind the received VM here; the source agent will",
                        extra={"vm": f"{vm_ns}/{vm_name}"})

    def _abandoned(self, key: str) -> str | None:
        """Why the migration job ``key`` will send nothing more, or None."""
        ns, _, name = key.partition("/")
        try:
            body = self.runner.kube.get(JOBS, name, ns)
        except Exception:  # API unreachable: keep waiting, judge later
            return None
        if body is None:
            return "the migration job was deleted"
        phase = (body.get("status") or {}).get("phase")
        if phase in ("Failed", "TimedOut", "Cancelled"):
            return f"the migration job ended {phase}"
        if phase in ("Pending", "Scheduled"):
            return f"the migration job is {phase} again (its attempt was handed back)"
        return None  # Running, or Succeeded just before our answer arrived
