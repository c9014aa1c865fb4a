"""Randomized, seeded fault injection for issue #11: a VM never runs twice, and none is lost.

One harness for the integration test (which asserts the invariants) and the benchmark
(which prints the figures). Given a running API server and the means to (re)start the
controller and one agent per node, :class:`FaultRun` deploys a fleet, then injects one
fault per round, chosen up front by ``random.Random(seed)``:

* ``kill-controller``: kill -9, restart after a short outage;
* ``kill-agent``: kill -9 one agent (its VMMs and fencing watchdog live on), restart it;
* ``kill-vmm``: kill -9 one VM's VMM process;
* ``freeze-short`` / ``freeze-long``: SIGSTOP one agent for less / more than the
  controller's eviction timeout (a partition that heals), then SIGCONT.

After each fault it waits, bounded, for the fleet to converge, and times it. A sampler
thread watches the whole time for a VM executing twice; at the end the harness counts
lost VMs. Processes and their nodes are found from /proc, never from pid files: a pid
file is what the product believes, and the product is what is under test.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import config as k8s_config

from hyperfleet.reconcilers.hypervisor.process import pid_alive
from hyperfleet.reconcilers.kube import NODES, VMS, Kube
from hyperfleet.reconcilers.testing.devstack import kubectl
from tests import PLACEHOLDER_KERNEL
from tests.ch_transcripts.record import UnixHTTPConnection

FAULT_KINDS = ("kill-controller", "kill-agent", "kill-vmm", "freeze-short", "freeze-long")

VM = """---
apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}, namespace: {ns}}}
spec: {{cpus: 1, memory: 64Mi, boot: {{kernel: {kernel}}}}}
"""

#: What a VMM says when it positively runs no guest code. Anything else, including no
#: answer in time, counts as executing (see :class:`ExecutionJudge` for a missing socket).
NOT_EXECUTING = frozenset({"Paused", "Created", "Shutdown", "NoVm"})


def vm_names(n: int) -> list[str]:
    return [f"v{i:02d}" for i in range(n)]


def fleet_manifest(namespace: str, names: list[str]) -> str:
    return "".join(VM.format(name=n, ns=namespace, kernel=PLACEHOLDER_KERNEL) for n in names)


@dataclass(frozen=True)
class Vmm:
    """A live VMM process: the node is its socket's directory."""

    vm: str
    node: str
    pid: int
    socket: Path


def find_vmms(workdir: Path, namespace: str) -> dict[str, list[Vmm]]:
    """Every live VMM of ``namespace``'s VMs whose API socket lies under ``workdir``,
    by VM name, read from /proc (the ``--api-socket path=<dir>/<ns>_<name>.sock`` arg)."""
    roots = {f"{workdir}/", f"{workdir.resolve()}/"}
    prefix = f"{namespace}_"
    found: dict[str, list[Vmm]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for raw in args:
            arg = raw.decode(errors="replace").removeprefix("path=")
            if not arg.endswith(".sock") or not any(arg.startswith(r) for r in roots):
                continue
            sock = Path(arg)
            if not sock.stem.startswith(prefix) or not pid_alive(int(entry.name)):
                continue
            name = sock.stem.removeprefix(prefix)
            found.setdefault(name, []).append(Vmm(name, sock.parent.name, int(entry.name), sock))
            break
    return found


def vm_state(sock: Path, timeout: float = 0.5) -> str | None:
    """The VM's state as its VMM reports it (``Running``, ``Paused``, ``Created``,
    ``Shutdown``; ``NoVm`` while it holds none; ``NoSocket`` if its socket file is not
    there); None if it does not answer in time.

    Raw HTTP with a short timeout rather than the product's client, so a bug there
    cannot hide a duplicate here."""
    conn = UnixHTTPConnection(str(sock), timeout)
    try:
        conn.request("GET", "/api/v1/vm.info", headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    except FileNotFoundError:  # mid-start, or unlinked under a live VMM: still counts
        return "NoSocket"
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    if resp.status == 404:
        return "NoVm"
    if resp.status >= 400:
        return f"HTTP {resp.status}"
    try:
        return str(json.loads(body).get("state"))
    except (ValueError, AttributeError):
        return f"unreadable vm.info: {body[:80]!r}"


def process_age(pid: int) -> float:
    """Seconds since ``pid`` started (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0.0
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")


class ExecutionJudge:
    """Whether each VMM copy may be running guest code, from what it says now and said
    before. Anything unclear counts as executing (a duplicate is reported, not missed),
    except a VMM without its API socket: none of create, boot or resume can reach it,
    so it is in the last state it answered (it is shutting down), or, if it never
    answered and is young, it is still starting and has booted nothing."""

    START_GRACE = 10.0  # seconds a VMM may take to open its API socket on a loaded host

    def __init__(self) -> None:
        self.last: dict[int, str] = {}  # pid -> the last state it answered

    def forget_all_but(self, live: set[int]) -> None:
        self.last = {pid: st for pid, st in self.last.items() if pid in live}

    def judge(self, copies: list[Vmm]) -> list[tuple[Vmm, str, bool]]:
        """(copy, what it said, executing) for each copy. Two live processes on one
        socket path cannot both be asked (the path leads to the newer one): both count."""
        paths = Counter(v.socket for v in copies)
        out = []
        for v in copies:
            if paths[v.socket] > 1:
                out.append((v, "shares its socket path", True))
                continue
            state = vm_state(v.socket)
            if state is None:
                out.append((v, "no answer", True))
            elif state != "NoSocket":
                self.last[v.pid] = state
                out.append((v, state, state not in NOT_EXECUTING))
            elif v.pid in self.last:
                last = self.last[v.pid]
                out.append((v, f"NoSocket, last {last}", last not in NOT_EXECUTING))
            elif process_age(v.pid) < self.START_GRACE:
                out.append((v, "NoSocket, starting", False))
            else:
                out.append((v, "NoSocket, never answered", True))
        return out


@dataclass(frozen=True)
class Fault:
    kind: str
    target: str  # a VM name, "controller", or "" for an agent: see ``pick``
    hold: float  # seconds frozen, or seconds down before the restart (0 for kill-vmm)
    #: Which agent, when injected, among the nodes that host VMMs then: a node emptied by
    #: an earlier eviction stays empty (nothing rebalances), and faulting it tests nothing.
    pick: float = 0.0

    def describe(self, target: str | None = None) -> str:
        how = {"freeze-short": "frozen", "freeze-long": "frozen", "kill-vmm": ""}.get(
            self.kind, "down")
        where = target or self.target or "agent"
        return f"{self.kind} {where}" + (f" ({how} {self.hold:.1f}s)" if how else "")

    def __str__(self) -> str:
        return self.describe()


@dataclass
class Round:
    index: int
    fault: Fault
    target: str = ""  # what it was applied to
    detail: str = ""  # what the fault hit (e.g. the VMM's node and pid)
    converged_after: float | None = None  # seconds from the fault's end; None: never
    first_waiting_on: str = ""  # what the fault visibly did (the first reason not converged)
    waiting_on: str = ""  # the last reason the fleet was not converged
    paused: set[int] = field(default_factory=set)  # VMMs the sampler saw paused (fenced)

    def __str__(self) -> str:
        done = (f"converged in {self.converged_after:.1f}s" if self.converged_after is not None
                else f"NOT converged: {self.waiting_on}")
        detail = f" [{self.detail}]" if self.detail else ""
        seen = f" (first seen: {self.first_waiting_on})" if self.first_waiting_on else ""
        paused = f", {len(self.paused)} VMMs seen paused" if self.paused else ""
        return (f"round {self.index}: {self.fault.describe(self.target)}{detail}: "
                f"{done}{paused}{seen}")


@dataclass
class Duplicate:
    """A VM seen executing on two copies in two consecutive samples."""

    vm: str
    copies: list[str]  # "node:pid:state"
    round: int
    first_seen: float  # seconds since the run started
    last_seen: float


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class Report:
    seed: int
    vms: int
    nodes: int
    rounds: list[Round] = field(default_factory=list)
    duplicates: list[Duplicate] = field(default_factory=list)
    lost: dict[str, str] = field(default_factory=dict)  # VM -> why
    setup_seconds: float = 0.0
    wall_seconds: float = 0.0
    samples: int = 0
    sampler_errors: list[str] = field(default_factory=list)

    @property
    def convergence(self) -> list[float]:
        return [r.converged_after for r in self.rounds if r.converged_after is not None]

    def summary(self) -> str:
        kinds = Counter(r.fault.kind for r in self.rounds)
        conv = self.convergence
        lines = [f"seed {self.seed}: {self.vms} VMs on {self.nodes} nodes, "
                 f"{len(self.rounds)} rounds ("
                 + ", ".join(f"{k} {kinds[k]}" for k in FAULT_KINDS if kinds[k]) + ")",
                 f"fleet up in {self.setup_seconds:.1f}s",
                 *(str(r) for r in self.rounds)]
        if conv:
            lines.append(f"convergence p50 {pct(conv, 50):.1f}s, p95 {pct(conv, 95):.1f}s, "
                         f"max {max(conv):.1f}s over {len(conv)} converged rounds")
        unconverged = len(self.rounds) - len(conv)
        if unconverged:
            lines.append(f"rounds not converged: {unconverged}")
        lines.append(f"duplicates {len(self.duplicates)}")
        lines += [f"  {d.vm} in round {d.round}, {d.first_seen:.1f}-{d.last_seen:.1f}s: "
                  + ", ".join(d.copies) for d in self.duplicates]
        lines.append(f"lost {len(self.lost)}")
        lines += [f"  {vm}: {why}" for vm, why in sorted(self.lost.items())]
        lines.append(f"wall {self.wall_seconds:.1f}s, {self.samples} samples")
        lines += [f"sampler error: {e}" for e in self.sampler_errors]
        return "\n".join(lines)


def kill_strays(workdir: Path) -> list[int]:
    """SIGKILL every process whose command line names ``workdir`` (VMMs, fencing
    watchdogs, anything left of a run there): they outlive their agents by design, and
    a VMM whose pid file was overwritten is not found by pid-file clean-ups."""
    roots = {str(workdir), str(workdir.resolve())}
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(f"{r}/" in cmdline for r in roots):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
    return killed


@dataclass
class Fleet:
    """A running cluster as the harness needs it. ``procs`` holds the controller as
    "controller" and each agent as "agent-<node>"; the start callables (re)start one
    and put it there."""

    kubeconfig: Path
    namespace: str
    workdir: Path  # each node's socket directory is workdir/<node>
    nodes: list[str]
    procs: dict[str, subprocess.Popen[bytes]]
    start_controller: Callable[[], object]
    start_agent: Callable[[str], object]
    eviction_timeout: float


class FaultRun:
    """Seeded fault rounds over a fleet, with a duplicate sampler running throughout."""

    def __init__(self, fleet: Fleet, seed: int, vms: int = 30, converge_timeout: float = 120,
                 sample_every: float = 0.3, log: Callable[[str], None] = print) -> None:
        self.fleet = fleet
        self.seed = seed
        self.rng = random.Random(seed)
        self.names = vm_names(vms)
        self.converge_timeout = converge_timeout
        self.sample_every = sample_every
        self.log = log
        self.report = Report(seed, vms, len(fleet.nodes))
        self.kube = Kube(k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(fleet.kubeconfig)))
        self.round = 0
        self.current: Round | None = None
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._open: dict[tuple[str, frozenset[int]], Duplicate] = {}
        self.judge = ExecutionJudge()  # the sampler thread's alone

    # -- the plan ------------------------------------------------------------------
    def plan(self, rounds: int) -> list[Fault]:
        """Every kind once per block of len(FAULT_KINDS) rounds, in seeded order, so a
        short run still covers them all; targets and durations seeded too. Drawn round by
        round, so a shorter run with the same seed is a prefix of a longer one."""
        evict = self.fleet.eviction_timeout
        out: list[Fault] = []
        kinds: list[str] = []
        while len(out) < rounds:
            if not kinds:
                kinds = list(FAULT_KINDS)
                self.rng.shuffle(kinds)
            kind = kinds.pop(0)
            pick = self.rng.random()
            if kind == "kill-controller":
                out.append(Fault(kind, "controller", self.rng.uniform(0, 3)))
            elif kind == "kill-agent":
                out.append(Fault(kind, "", self.rng.uniform(0, 6), pick))
            elif kind == "kill-vmm":
                out.append(Fault(kind, self.rng.choice(self.names), 0))
            elif kind == "freeze-short":  # below and above a few seconds' --fence-after
                out.append(Fault(kind, "", self.rng.uniform(1, 0.75 * evict), pick))
            else:  # past the eviction timeout: the controller places its VMs again
                out.append(Fault(kind, "", evict + self.rng.uniform(4, 10), pick))
        return out

    # -- observing -----------------------------------------------------------------
    def vmms(self) -> dict[str, list[Vmm]]:
        return find_vmms(self.fleet.workdir, self.fleet.namespace)

    def sample(self, prev: dict[str, frozenset[int]], full: bool) -> dict[str, frozenset[int]]:
        """One look at every VM with more than one live VMM (at every VM if ``full``, so
        the judge knows each copy's state before its socket goes); a duplicate is two
        copies executing in this sample and the one before."""
        now = time.monotonic() - self.t0
        current: dict[str, frozenset[int]] = {}
        vmms = self.vmms()
        self.judge.forget_all_but({v.pid for copies in vmms.values() for v in copies})
        for name, copies in vmms.items():
            if len(copies) < 2 and not full:
                continue
            judged = self.judge.judge(copies)
            if self.current is not None:
                self.current.paused.update(v.pid for v, said, _ in judged if said == "Paused")
            running = [(v, said) for v, said, executing in judged if executing]
            pids = frozenset(v.pid for v, _ in running)
            if len(pids) < 2:
                continue
            current[name] = pids
            both = pids & prev.get(name, frozenset())
            if len(both) < 2:
                continue
            key = (name, frozenset(both))
            dup = self._open.get(key)
            if dup is None:
                dup = Duplicate(name, [f"{v.node}:{v.pid}:{said}" for v, said in running
                                       if v.pid in both], self.round, now, now)
                self._open[key] = dup
                self.report.duplicates.append(dup)
                self.log(f"DUPLICATE {name}: {', '.join(dup.copies)}")
            dup.last_seen = now
        return current

    def _sampler(self) -> None:
        prev: dict[str, frozenset[int]] = {}
        tick = 0
        while not self._stop.wait(self.sample_every):
            tick += 1
            try:
                prev = self.sample(prev, full=tick % 4 == 1)
                self.report.samples += 1
            except Exception as exc:  # a sampler that died silently would report 0
                self.report.sampler_errors.append(repr(exc))
                if len(self.report.sampler_errors) > 20:
                    return

    def not_converged(self) -> str:
        """Why the fleet is not converged, or "" if it is: every WorkerNode Ready with a
        live agent, every VM Running on one of them, with exactly one live VMM (and that
        one executing) on its node."""
        f = self.fleet
        if "controller" not in f.procs or f.procs["controller"].poll() is not None:
            return "controller down"
        for node in f.nodes:
            p = f.procs.get(f"agent-{node}")
            if p is None or p.poll() is not None:
                return f"agent {node} down"
            phase = ((self.kube.get(NODES, node) or {}).get("status") or {}).get("phase")
            if phase != "Ready":
                return f"node {node} {phase}"
        items = {vm["metadata"]["name"]: vm for vm in self.kube.list(VMS, f.namespace)}
        vmms = self.vmms()
        for name in self.names:
            vm = items.get(name)
            if vm is None:
                return f"{name} missing"
            st = vm.get("status") or {}
            copies = vmms.get(name, [])
            where = ", ".join(f"{v.node}:{v.pid}" for v in copies) or "none"
            if st.get("phase") != "Running" or st.get("nodeName") not in f.nodes:
                return f"{name} {st.get('phase')} on {st.get('nodeName')}; VMMs {where}"
            if len(copies) != 1 or copies[0].node != st["nodeName"]:
                return f"{name} bound to {st['nodeName']}; VMMs {where}"
            state = vm_state(copies[0].socket, timeout=2.0)
            if state != "Running":
                return f"{name} VMM on {copies[0].node} says {state}"
        return ""

    def converge(self, timeout: float, stable: float = 1.5) -> tuple[float | None, str, str]:
        """Seconds until the fleet converged and stayed so for ``stable`` seconds
        (counted to the start of that stretch), or None after ``timeout``; the first and
        the last reason it was not converged."""
        start = time.monotonic()
        since: float | None = None
        why = first = ""
        while time.monotonic() - start < timeout:
            # Killed processes are taken out of procs first: one that exited crashed.
            dead = [f"{n} exited ({p.returncode})" for n, p in self.fleet.procs.items()
                    if p.poll() is not None]
            if dead:
                return None, first, ", ".join(dead)
            why = self.not_converged()
            first = first or why
            now = time.monotonic()
            if why:
                since = None
            elif since is None:
                since = now
            elif now - since >= stable:
                return since - start, first, ""
            time.sleep(0.4)
        return None, first, why

    # -- faults --------------------------------------------------------------------
    def _kill(self, name: str) -> None:
        p = self.fleet.procs.pop(name)  # first: a dead entry fails the test's waits
        p.kill()
        p.wait(10)

    def pick_node(self, pick: float) -> tuple[str, int]:
        """The node ``pick`` falls on among those hosting VMMs now (all if none do), and
        how many VMMs it hosts."""
        hosted = Counter(v.node for copies in self.vmms().values() for v in copies)
        nodes = sorted(n for n in self.fleet.nodes if hosted[n]) or sorted(self.fleet.nodes)
        node = nodes[min(len(nodes) - 1, int(pick * len(nodes)))]
        return node, hosted[node]

    def inject(self, fault: Fault) -> tuple[str, str]:
        """Apply one fault and heal it (restart, thaw): what to and what it hit."""
        f = self.fleet
        if fault.kind == "kill-controller":
            self._kill("controller")
            time.sleep(fault.hold)
            f.start_controller()
            return fault.target, ""
        if fault.kind == "kill-vmm":
            copies = self.vmms().get(fault.target, [])
            for v in copies:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(v.pid, signal.SIGKILL)
            return fault.target, ", ".join(f"{v.node}:{v.pid}" for v in copies) or "no VMM"
        node, hosted = self.pick_node(fault.pick)
        if fault.kind == "kill-agent":
            self._kill(f"agent-{node}")
            time.sleep(fault.hold)
            f.start_agent(node)
            return node, f"{hosted} VMMs"
        pid = f.procs[f"agent-{node}"].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(fault.hold)
        finally:
            os.kill(pid, signal.SIGCONT)
        return node, f"{hosted} VMMs"

    # -- the run -------------------------------------------------------------------
    def setup(self, timeout: float = 240) -> None:
        """Start the controller and the agents, create the VMs, wait until converged."""
        f = self.fleet
        t = time.monotonic()
        f.start_controller()
        for node in f.nodes:
            f.start_agent(node)
        kubectl(f.kubeconfig, "-n", f.namespace, "apply", "-f", "-",
                input_=fleet_manifest(f.namespace, self.names))
        took, _, why = self.converge(timeout)
        if took is None:
            raise RuntimeError(f"the fleet never came up within {timeout}s: {why}")
        self.report.setup_seconds = time.monotonic() - t
        self.log(f"fleet up: {len(self.names)} VMs on {len(f.nodes)} nodes in "
                 f"{self.report.setup_seconds:.1f}s")

    def run(self, rounds: int, settle: float = 5.0) -> Report:
        """Set up, then the rounds; stops at the first round that does not converge (the
        fleet is broken: later rounds would measure nothing). Then ``settle`` seconds more
        of sampling, for a copy that comes back late, and the count of lost VMs."""
        faults = self.plan(rounds)
        self.log(f"seed {self.seed}: " + "; ".join(map(str, faults)))
        self.t0 = time.monotonic()
        sampler = threading.Thread(target=self._sampler, name="dup-sampler", daemon=True)
        sampler.start()
        try:
            self.setup()
            for i, fault in enumerate(faults, 1):
                self.round = i
                r = self.current = Round(i, fault)
                self.report.rounds.append(r)
                r.target, r.detail = self.inject(fault)
                r.converged_after, r.first_waiting_on, r.waiting_on = self.converge(
                    self.converge_timeout)
                self.log(str(r))
                if r.converged_after is None:
                    break
            self._stop.wait(settle)
            self.report.lost = self.lost()
        finally:
            self._stop.set()
            sampler.join(10)
            self.report.wall_seconds = time.monotonic() - self.t0
        return self.report

    def lost(self) -> dict[str, str]:
        """Each VM missing, not Running, or with no VMM that says it runs it, and why."""
        items = {vm["metadata"]["name"]: vm for vm in self.kube.list(VMS, self.fleet.namespace)}
        vmms = self.vmms()
        out = {}
        for name in self.names:
            vm: dict[str, Any] | None = items.get(name)
            if vm is None:
                out[name] = "VirtualMachine object missing"
                continue
            phase = (vm.get("status") or {}).get("phase")
            copies = vmms.get(name, [])
            if phase != "Running":
                out[name] = f"phase {phase}"
            elif not copies:
                out[name] = "no VMM"
            elif "Running" not in (states := [vm_state(v.socket, timeout=2.0) for v in copies]):
                out[name] = f"no VMM executing it (they say {states})"
        return out
