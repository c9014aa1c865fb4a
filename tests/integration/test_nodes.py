"""Issue 5: cordon, drain and lost nodes with several agents; a VM never runs twice."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hyperfleet.operator.settings import DEFAULT_EVICTION_SECONDS, DEFAULT_FENCE_AFTER, AgentConfig
from hyperfleet.reconcilers.hypervisor.process import pid_alive as alive
from hyperfleet.reconcilers.nodes import lease_name
from hyperfleet.reconcilers.testing.devstack import agent_cmd, ch_double_cmd, kill_pidfiles, launch
from tests import PLACEHOLDER_KERNEL
from tests.faults import find_vmms, vm_state

from .conftest import Cluster, wait_for

VM = """
apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}}}
spec: {{cpus: 2, memory: 256Mi, boot: {{kernel: {kernel}}}}}
"""
VM = VM.replace("{kernel}", PLACEHOLDER_KERNEL)


def vmm_pids(c: Cluster, name: str) -> list[tuple[str, int]]:
    """Every live VMM process of VM `name`, on any simulated node."""
    found = []
    for pidfile in c.workdir.glob(f"*/{c.namespace}_{name}.pid"):
        pid = int(pidfile.read_text())
        if alive(pid):
            found.append((pidfile.parent.name, pid))
    return found


def status(c: Cluster, name: str) -> dict[str, Any]:
    return (c.get("hvm", name) or {}).get("status") or {}


def start(c: Cluster, nodes: list[str], eviction: float = 300,
          agent_args: list[str] | None = None) -> None:
    c.start_controller(eviction_timeout=eviction)
    for n in nodes:
        c.start_agent(c.node(n), extra=agent_args)
    wait_for(lambda: all((c.get("wn", c.node(n), namespaced=False) or {})
                         .get("status", {}).get("phase") == "Ready" for n in nodes),
             60, "nodes Ready", c)


def running_on(c: Cluster, name: str, node: str, timeout: float = 60) -> dict[str, Any]:
    st: dict[str, Any] = wait_for(
        lambda: (s := status(c, name)).get("phase") == "Running"
        and s.get("nodeName") == c.node(node) and s, timeout, f"{name} Running on {node}", c)
    return st


def patch_node(c: Cluster, node: str, spec: dict[str, Any]) -> None:
    c.kubectl("patch", "wn", c.node(node), "--type=merge", "-p", json.dumps({"spec": spec}),
              namespaced=False)


def test_cordon_and_unschedulable_reason(cluster: Cluster) -> None:
    c = cluster
    start(c, ["a", "b"])
    patch_node(c, "a", {"unschedulable": True})
    wait_for(lambda: (c.get("wn", c.node("a"), namespaced=False) or {})["spec"]
             .get("unschedulable"), 10, "cordon recorded")
    assert c.apply(VM.format(name="v1")).returncode == 0
    running_on(c, "v1", "b")

    patch_node(c, "b", {"unschedulable": True})
    assert c.apply(VM.format(name="v2")).returncode == 0
    st = wait_for(lambda: (s := status(c, "v2")).get("phase") == "Unschedulable" and s,
                  30, "v2 Unschedulable", c)
    assert "0/" in st["message"] and "cordoned" in st["message"]
    cond = {x["type"]: x for x in st["conditions"]}["Scheduled"]
    assert cond["status"] == "False" and cond["reason"] == "Unschedulable"
    patch_node(c, "a", {"unschedulable": False})  # capacity appears: retried
    running_on(c, "v2", "a")


# serial Null: both agents share this host, and a receiving VMM binds the migrated config's
# console socket, which here is still the sender's (distinct nodes each have their own).
LIVE_VM = VM.replace("memory: 256Mi,", "memory: 256Mi, liveMigration: true, serial: 'Null',")


def condition(body: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((x for x in ((body or {}).get("status") or {}).get("conditions") or []
                 if x["type"] == type_), {})


def test_drain_moves_live_cold_moves_where_it_fits_and_holds_the_rest(
        cluster: Cluster) -> None:
    """Like kubectl drain with a PodDisruptionBudget: the VM that can move live is
    migrated by a VmJob, the other restarts elsewhere only once a node can take it, and
    meanwhile the drain holds it, saying so on the WorkerNode. One copy at a time."""
    c = cluster
    c.start_controller()
    c.start_agent(c.node("a"))
    wait_for(lambda: (c.get("wn", c.node("a"), namespaced=False) or {})
             .get("status", {}).get("phase") == "Ready", 60, "a Ready", c)
    assert c.apply(LIVE_VM.format(name="live")).returncode == 0
    assert c.apply(VM.format(name="cold")).returncode == 0
    running_on(c, "live", "a")
    running_on(c, "cold", "a")
    assert condition(c.get("hvm", "live"), "LiveMigratable")["status"] == "True"
    cond = condition(c.get("hvm", "cold"), "LiveMigratable")
    assert cond["status"] == "False" and "spec.liveMigration" in cond["message"]
    c.start_agent(c.node("b"), cpus=2)  # room for one of the two
    wait_for(lambda: (c.get("wn", c.node("b"), namespaced=False) or {})
             .get("status", {}).get("capacity"), 60, "b registered", c)
    live_pid = dict(vmm_pids(c, "live"))[c.node("a")]
    cold_pid = dict(vmm_pids(c, "cold"))[c.node("a")]
    copies: set[int] = set()

    def watch(pred: Any) -> Any:
        def check() -> Any:
            copies.update(len(executing(c, n)) for n in ("live", "cold"))
            return pred()
        return check

    patch_node(c, "a", {"drain": True})
    wait_for(watch(lambda: status(c, "live").get("nodeName") == c.node("b")
                   and status(c, "live").get("phase") == "Running"), 60, "live migrated", c)
    jobs = json.loads(c.kubectl("get", "vmjobs", "-o", "json").stdout)["items"]
    assert [(j["spec"]["operation"], j["status"]["phase"]) for j in jobs] == [
        ("vm.migrate", "Succeeded")]
    assert "Migrating" in event_reasons(c, "live")

    # No room for the VM that can only restart: it stays up on a, and a says why.
    blocked = wait_for(lambda: condition(c.get("wn", c.node("a"), namespaced=False),
                                         "DrainBlocked").get("status") == "True"
                       and condition(c.get("wn", c.node("a"), namespaced=False),
                                     "DrainBlocked"), 30, "DrainBlocked", c)
    assert f"{c.namespace}/cold" in blocked["message"] and "0/" in blocked["message"]
    assert "DrainBlocked" in event_reasons(c, "cold")
    assert alive(cold_pid) and status(c, "cold")["nodeName"] == c.node("a")
    row = c.kubectl("get", "wn", c.node("a"), namespaced=False).stdout
    assert "Draining" in row.splitlines()[1]  # the SCHEDULING column

    c.start_agent(c.node("c"))  # capacity arrives: the drain goes on
    wait_for(watch(lambda: status(c, "cold").get("nodeName") == c.node("c")
                   and status(c, "cold").get("phase") == "Running"), 60, "cold moved", c)
    assert "Evicted" in event_reasons(c, "cold") and not alive(cold_pid)
    assert not alive(live_pid)
    done = wait_for(lambda: (d := condition(c.get("wn", c.node("a"), namespaced=False),
                                            "DrainBlocked")).get("reason") == "Drained" and d,
                    30, "Drained", c)
    assert done["status"] == "False"
    assert max(copies) <= 1, "a VM executed on two nodes at once"


def test_a_workernode_deleted_under_its_live_agent_comes_back(cluster: Cluster) -> None:
    """As a kubelet re-registers its Node: otherwise the VMs stay bound to a node that no
    longer exists, which nothing can drain."""
    c = cluster
    start(c, ["a"])
    assert c.apply(VM.format(name="k1")).returncode == 0
    running_on(c, "k1", "a")
    uid = (c.get("wn", c.node("a"), namespaced=False) or {})["metadata"]["uid"]
    c.kubectl("delete", "wn", c.node("a"), namespaced=False)
    wait_for(lambda: (wn := c.get("wn", c.node("a"), namespaced=False)) is not None
             and wn["metadata"]["uid"] != uid and wn.get("status", {}).get("phase") == "Ready",
             90, "the WorkerNode registered again and Ready", c)
    assert status(c, "k1").get("nodeName") == c.node("a")


def test_lost_node_and_returning_agent_is_fenced(cluster: Cluster) -> None:
    """The agent dies with a VMM still running (a partition rather than a crash): its
    watchdog pauses the VMM before the controller places the VM elsewhere, and the agent,
    back, stops the stale copy before anything else."""
    c = cluster
    start(c, ["a", "b"], eviction=8, agent_args=["--fence-after", "3"])
    patch_node(c, "b", {"unschedulable": True})
    assert c.apply(VM.format(name="l1")).returncode == 0
    assert c.apply(VM.format(name="l2")).returncode == 0
    running_on(c, "l1", "a")
    running_on(c, "l2", "a")
    patch_node(c, "b", {"unschedulable": False})
    old = dict(vmm_pids(c, "l1"))[c.node("a")]

    # Node a's agent dies; l2's VMM dies with the "node", l1's VMM keeps running
    # (a partition rather than a crash).
    agent = c.procs.pop(f"agent-{c.node('a')}")
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    kill_pidfiles(c.socket_dir(c.node("a")), f"{c.namespace}_l2.pid")
    wait_for(lambda: (c.get("wn", c.node("a"), namespaced=False) or {})
             .get("status", {}).get("phase") == "NotReady", 30, "a NotReady", c)
    running_on(c, "l1", "b", timeout=60)
    running_on(c, "l2", "b", timeout=60)
    events = json.loads(c.kubectl("get", "events", "-o", "json").stdout)["items"]
    assert "NodeLost" in [e["reason"] for e in events if e["involvedObject"]["name"] == "l1"]
    assert alive(old) and executing(c, "l1") == [c.node("b")]  # a's copy is paused

    # The partitioned agent returns: before anything else it stops the stale copy.
    c.start_agent(c.node("a"), extra=["--fence-after", "3"])
    wait_for(lambda: not alive(old), 30, "stale VMM on a stopped", c)
    assert [n for n, _ in vmm_pids(c, "l1")] == [c.node("b")]
    assert [n for n, _ in vmm_pids(c, "l2")] == [c.node("b")]


class Partition:
    """A loopback TCP relay to the API server that can be cut and restored: one agent's
    view of a network partition, while everything else still reaches the API server."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open.clear()
        for sock in self.conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.conns = []

    def heal(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.cut()
        self.server.close()


def partitioned_agent(c: Cluster, relay: Partition, node: str, *args: str) -> None:
    """Start node's agent reaching the API server only through ``relay``."""
    url = urllib.parse.urlsplit(c.api.url)
    kubeconfig = c.workdir / f"partitioned-{node}.kubeconfig"
    kubeconfig.write_text(c.kubeconfig.read_text().replace(
        c.api.url, f"{url.scheme}://127.0.0.1:{relay.port}"))
    c.procs[f"agent-{c.node(node)}"] = launch(
        agent_cmd(c.node(node), c.socket_dir(c.node(node)), ch_double_cmd(), "--cpus", "8",
                  "--memory", "16Gi", "--heartbeat", "1", *args),
        c.workdir / f"agent-{c.node(node)}.log", kubeconfig)


def api_relay(c: Cluster) -> Partition:
    url = urllib.parse.urlsplit(c.api.url)
    return Partition((url.hostname or "127.0.0.1", url.port or 443))


def test_a_partitioned_agent_pauses_its_vms_and_resumes_them_when_back(
        cluster: Cluster) -> None:
    """--fence-after: an agent cut off from the API server pauses its VMs (the controller
    may place them elsewhere) and runs none until it can read their bindings again; a VM
    still bound here then resumes in the same process, its memory intact."""
    c = cluster
    relay = api_relay(c)
    try:
        c.start_controller()
        partitioned_agent(c, relay, "a", "--fence-after", "3")
        assert c.apply(VM.format(name="f1")).returncode == 0
        running_on(c, "f1", "a")
        first = dict(vmm_pids(c, "f1"))[c.node("a")]

        relay.cut()
        wait_for(lambda: not executing(c, "f1"), 30, "the fenced node pauses f1", c)
        time.sleep(6)  # a fenced agent that resumed its VMs would have done so by now
        assert vmm_pids(c, "f1") == [(c.node("a"), first)] and executing(c, "f1") == []
        log = (c.workdir / f"agent-{c.node('a')}.log").read_text()
        assert "fencing: pausing every VM" in log

        relay.heal()  # still bound to a (eviction timeout 300 s): it resumes here
        wait_for(lambda: executing(c, "f1") == [c.node("a")], 60, "f1 resumed on a", c)
        st = wait_for(lambda: (s := status(c, "f1")).get("phase") == "Running" and s, 30,
                      "f1 Running", c)
        assert st["nodeName"] == c.node("a") and st["hypervisor"]["pid"] == first
        assert "lifting the fence" in (c.workdir / f"agent-{c.node('a')}.log").read_text()
        reasons = wait_for(lambda: "FencePaused" in (r := event_reasons(c, "f1")) and r, 30,
                           "a FencePaused event", c)
        assert "Fenced" not in reasons  # it was not stopped: it is still bound here
    finally:
        relay.close()


def test_with_default_timeouts_a_partition_longer_than_eviction_never_runs_a_vm_twice(
        cluster: Cluster) -> None:
    """Neither --eviction-timeout nor --fence-after given: a node partitioned for longer
    than the eviction timeout has paused its VMs before the controller starts them
    elsewhere, and stops its copies when the partition heals. Sampled every second
    throughout: no VM ever executes on two nodes. (About six minutes.)"""
    c = cluster
    relay = api_relay(c)
    names = ("d1", "d2")
    try:
        c.start("controller", "controller", "--node-grace", "6",
                "--git-cache-dir", str(c.workdir / "git-cache"))
        partitioned_agent(c, relay, "a")
        c.start_agent(c.node("b"))
        wait_for(lambda: all((c.get("wn", c.node(n), namespaced=False) or {})
                             .get("status", {}).get("phase") == "Ready" for n in "ab"),
                 60, "nodes Ready", c)
        patch_node(c, "b", {"unschedulable": True})
        for n in names:
            assert c.apply(VM.format(name=n)).returncode == 0
        for n in names:
            running_on(c, n, "a")
        patch_node(c, "b", {"unschedulable": False})

        relay.cut()
        cut_at = time.monotonic()
        # The controller counts from a's last heartbeat, which may precede the cut (a slow
        # beat on a loaded machine): measure the eviction from there.
        lease = c.kubectl("get", "lease", "-n", AgentConfig("").lease_namespace,
                          lease_name(c.node("a")), "-o", "json", namespaced=False)
        renewed = datetime.fromisoformat(json.loads(lease.stdout)["spec"]["renewTime"])
        silent_before_cut = (datetime.now(UTC) - renewed).total_seconds() \
            - (time.monotonic() - cut_at)
        twice: list[tuple[float, str]] = []
        paused_at = moved_at = None
        while time.monotonic() - cut_at < DEFAULT_EVICTION_SECONDS + 90:
            where = {n: executing(c, n) for n in names}
            twice += [(time.monotonic() - cut_at, n) for n, nodes in where.items()
                      if len(nodes) > 1]
            if paused_at is None and not any(where.values()):
                paused_at = time.monotonic() - cut_at
            if all(status(c, n).get("nodeName") == c.node("b") and where[n] == [c.node("b")]
                   for n in names):
                moved_at = time.monotonic() - cut_at
                break
            time.sleep(1)
        assert not twice, f"VMs executing on two nodes at once: {twice}\n{c.logs()}"
        assert paused_at is not None and DEFAULT_FENCE_AFTER - 5 < paused_at \
            < DEFAULT_EVICTION_SECONDS, f"paused at {paused_at}"
        assert moved_at is not None \
            and moved_at + silent_before_cut > DEFAULT_EVICTION_SECONDS, c.logs()
        assert all(len(vmms_in_proc(c, n)) == 2 for n in names)  # a's paused copies

        relay.heal()
        wait_for(lambda: all([node for node, _ in vmms_in_proc(c, n)] == [c.node("b")]
                             for n in names), 30, "a's stale copies stopped", c)
        for n in names:
            assert "Fenced" in event_reasons(c, n)
    finally:
        relay.close()


def test_two_controllers_never_bind_a_vm_twice(cluster: Cluster) -> None:
    """Binding is a resourceVersion-conditional write: racing controllers cannot both win.
    (They also agree on placement, because the scheduler is deterministic; in production
    the chart runs replicas with kopf peering, so only one of them is active at a time.)"""
    c = cluster
    start(c, ["a", "b"])
    c.start("controller-2", "controller", "--node-grace", "6",
            "--git-cache-dir", str(c.workdir / "git-cache-2"))
    # 8 VMs of 2 CPUs fill the two 8-CPU nodes exactly: a race would over-commit one.
    manifest = "".join("---" + VM.format(name=f"r{i}") for i in range(8))
    assert c.apply(manifest).returncode == 0
    first: dict[str, str] = {}
    moved: list[str] = []

    def all_bound() -> bool:
        items = json.loads(c.kubectl("get", "hvm", "-o", "json").stdout)["items"]
        for vm in items:
            node = (vm.get("status") or {}).get("nodeName")
            name = vm["metadata"]["name"]
            if node and first.setdefault(name, node) != node:
                moved.append(name)
        return len(first) == 8

    wait_for(all_bound, 60, "all 8 VMs bound", c)
    for _ in range(10):  # keep watching while both controllers keep reconciling
        all_bound()
    assert moved == []
    per_node = {n: list(first.values()).count(n) for n in set(first.values())}
    assert per_node == {c.node("a"): 4, c.node("b"): 4}
    bound = sum(1 for line in (c.workdir / "controller.log").read_text().splitlines()
                + (c.workdir / "controller-2.log").read_text().splitlines()
                if '"bound VM"' in line)
    assert bound == 8  # exactly one successful bind per VM across both controllers
    # A controller that starts while VMs are being bound must not take the nodes it has not
    # yet seen for lost ones (it did: it unbound VMs the other had just placed).
    assert '"evicting VM"' not in (c.workdir / "controller-2.log").read_text()


def test_peered_replicas_schedule_from_one_and_a_standby_takes_over(cluster: Cluster) -> None:
    """With kopf peering only the active replica binds, evicts or marks nodes. A replica
    that yields keeps its last view of the cluster (its watches pause): acting on it would
    see every heartbeat lapse and evict the fleet. When the active one dies, the standby
    re-reads the cluster and takes over without disturbing a placed VM."""
    c = cluster
    crd = Path(__file__).parents[2] / "charts/hyperfleet/crds/clusterkopfpeerings.kopf.dev.yaml"
    c.kubectl("apply", "-f", str(crd), namespaced=False)
    c.kubectl("wait", "--for=condition=established", "crd/clusterkopfpeerings.kopf.dev",
              namespaced=False)
    peering = f"{c.namespace}-peering"
    c.apply(f"apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata: {{name: {peering}}}\n")

    def start_replica(name: str, priority: int) -> None:
        # A short node grace and eviction timeout: a frozen view would act within seconds.
        c.start(name, "controller", "--node-grace", "4", "--eviction-timeout", "8",
                "--peering", peering, "--peering-lifetime", "8",
                "--peering-priority", str(priority),
                "--git-cache-dir", str(c.workdir / f"git-{name}"))

    def log(name: str) -> str:
        return (c.workdir / f"{name}.log").read_text()

    def says(name: str, what: str) -> bool:
        """Whether the replica's latest word on its role is ``what``."""
        text = log(name)
        active = text.rfind('"active replica: scheduling here"')
        standby = text.rfind('"another replica is active; standing by"')
        return max(active, standby) >= 0 and (active > standby) == (what == "active")

    start_replica("ctl-1", 10)
    for n in ("a", "b"):
        c.start_agent(c.node(n))
    wait_for(lambda: all((c.get("wn", c.node(n), namespaced=False) or {})
                         .get("status", {}).get("phase") == "Ready" for n in ("a", "b")),
             60, "nodes Ready", c)
    assert c.apply("".join("---" + VM.format(name=f"p{i}") for i in range(4))).returncode == 0
    wait_for(lambda: all(status(c, f"p{i}").get("phase") == "Running" for i in range(4)),
             60, "p0..p3 Running", c)
    assert says("ctl-1", "active")

    start_replica("ctl-2", 20)  # higher priority: ctl-1 yields, with a full view to freeze
    wait_for(lambda: says("ctl-1", "standby") and says("ctl-2", "active"), 30,
             "ctl-2 active and ctl-1 standing by", c)
    quiet_from = len(log("ctl-1"))
    c.kubectl("delete", "hvm", "p3")  # ctl-1 cannot see this while it stands by
    assert c.apply(VM.format(name="q")).returncode == 0
    wait_for(lambda: status(c, "q").get("phase") == "Running", 60, "q Running", c)
    time.sleep(10)  # past the node grace and the eviction timeout of a frozen view
    placed = {n: status(c, n).get("nodeName") for n in ("p0", "p1", "p2", "q")}
    assert all(placed.values()), placed
    for line in ('"bound VM"', '"node Ready"', '"node NotReady"', '"evicting VM"'):
        assert line not in log("ctl-1")[quiet_from:], f"the standby wrote: {line}"

    proc = c.procs.pop("ctl-2")  # kill -9: no goodbye in the peering object
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert c.apply(VM.format(name="after")).returncode == 0
    wait_for(lambda: status(c, "after").get("phase") == "Running", 60,
             "ctl-1 takes over and places a new VM", c)
    assert says("ctl-1", "active")
    taken_over = log("ctl-1")[quiet_from:]
    assert '"bound VM"' in taken_over and '"evicting VM"' not in taken_over
    assert {n: status(c, n).get("nodeName") for n in placed} == placed
    assert c.get("hvm", "p3") is None


def vmms_in_proc(c: Cluster, name: str) -> list[tuple[str, int]]:
    """Every live VMM of VM `name` on this machine, from /proc (no pid file trusted):
    (node, pid), the node being the socket directory on its command line."""
    return [(v.node, v.pid) for v in find_vmms(c.workdir, c.namespace).get(name, [])]


def executing(c: Cluster, name: str) -> list[str]:
    """Nodes where VM `name` executes: a live VMM (from /proc) whose vm.info says Running.
    A VMM without its API socket yet has created no VM; one whose socket does not answer
    counts as executing (it cannot be shown idle)."""
    return sorted(v.node for v in find_vmms(c.workdir, c.namespace).get(name, [])
                  if vm_state(v.socket, timeout=2) in ("Running", None))


def event_reasons(c: Cluster, name: str) -> list[str]:
    events = json.loads(c.kubectl("get", "events", "-o", "json").stdout)["items"]
    return [e["reason"] for e in events if e["involvedObject"]["name"] == name]


def test_a_frozen_agent_stops_its_stale_copies_when_it_thaws(cluster: Cluster) -> None:
    """A node agent frozen (SIGSTOP) past the eviction timeout, then thawed: a partition
    that heals. Its VMs were placed again elsewhere; its stale VMMs must go at once, judged
    from a fresh read, although its VM loops still hold "bound here"."""
    c = cluster
    start(c, ["a", "b"], eviction=6, agent_args=["--fence-after", "3"])
    patch_node(c, "b", {"unschedulable": True})
    names = ("z1", "z2", "z3")
    for n in names:
        assert c.apply(VM.format(name=n)).returncode == 0
    for n in names:
        running_on(c, n, "a")
    patch_node(c, "b", {"unschedulable": False})
    agent = c.procs[f"agent-{c.node('a')}"]
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        for n in names:
            running_on(c, n, "b", timeout=90)
        # Frozen, a's agent cannot stop its copies, but its watchdog has paused them: two
        # processes, one executing.
        assert all(len(vmms_in_proc(c, n)) == 2 for n in names)
        assert all(executing(c, n) == [c.node("b")] for n in names)
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    wait_for(lambda: all(vmms_in_proc(c, n) and {node for node, _ in vmms_in_proc(c, n)}
                         == {c.node("b")} for n in names),
             30, "one VMM per VM, on b only", c)
    time.sleep(3)  # and it stays so: no VM loop of a starts one again from its old copy
    for n in names:
        assert [node for node, _ in vmms_in_proc(c, n)] == [c.node("b")]
        assert status(c, n)["nodeName"] == c.node("b")
    assert all("Fenced" in event_reasons(c, n) for n in names)
