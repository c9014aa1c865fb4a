"""Pure VM reconcile: every observed state converges to every desired state, legally."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperfleet.reconcilers.models.vm import Phase, VirtualMachineSpec
from hyperfleet.reconcilers.vm import (
    Action,
    Desired,
    Observed,
    live_migratable,
    phase_of,
    reconcile,
    recreate_reasons,
    vm_config,
)

BASE: dict[str, Any] = {"cpus": 2, "memory": "1Gi", "boot": {"kernel": "/k"}}

# Where each VMM action may go, per the upstream state machine (NOTES.md).
TRANSITIONS: dict[Action, dict[str | None, str | None]] = {
    Action.CREATE: {None: "Created"},
    Action.BOOT: {"Created": "Running", "Shutdown": "Running"},
    Action.PAUSE: {"Running": "Paused"},
    Action.RESUME: {"Paused": "Running", "BreakPoint": "Running"},
    Action.SHUTDOWN: {"Running": "Shutdown", "Paused": "Shutdown"},
    Action.DELETE: {s: None for s in ("Created", "Running", "Paused", "Shutdown", "BreakPoint")},
    Action.SNAPSHOT: {"Paused": "Paused"},
    Action.RESTORE: {None: "Paused"},
    Action.RESIZE: {"Running": "Running", "Paused": "Paused"},
    Action.ADD_DISK: {s: s for s in ("Created", "Running", "Paused")},
    Action.ADD_NET: {s: s for s in ("Created", "Running", "Paused")},
    Action.REMOVE_DEVICE: {"Running": "Running", "Paused": "Paused"},
}


def spec(**kw: Any) -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate({**BASE, **kw})


def want(s: VirtualMachineSpec, **kw: Any) -> Desired:
    return Desired(spec=s, snapshot_url="file:///snap", **kw)


def simulate(d: Desired, obs: Observed) -> Observed:
    """Run a plan against a model of the VMM; an illegal step fails the test."""
    config = copy.deepcopy(obs.config)
    state, process, snapshot = obs.state, obs.process, obs.snapshot
    for step in reconcile(d, obs):
        a = step.action
        assert a != Action.WAIT
        if a == Action.SPAWN:
            assert not process
            process, state, config = True, None, None
            continue
        if a == Action.KILL:
            process, state, config = False, None, None
            continue
        if a == Action.DISCARD_SNAPSHOT:
            snapshot = False
            continue
        if a in (Action.GUEST_CHECKPOINT, Action.GUEST_RESTORE):
            assert state == "Running", f"{a} needs a running guest, not {state}"
            continue
        assert process, f"{a} without a process"
        assert state in TRANSITIONS[a], f"{a} is illegal from {state}"
        if a == Action.SNAPSHOT:
            snapshot = True
        if a == Action.RESTORE:
            assert snapshot
            config = vm_config(d.spec)
        if a == Action.CREATE:
            config = step.body
        if a == Action.RESIZE and config is not None and step.body:
            config["cpus"]["boot_vcpus"] = step.body.get("desired_vcpus",
                                                         config["cpus"]["boot_vcpus"])
        state = TRANSITIONS[a][state]
    return Observed(process, process, state, config, snapshot)


def test_fresh_vm_spawns_creates_boots() -> None:
    plan = reconcile(want(spec()), Observed(process=False))
    assert [s.action for s in plan] == [Action.SPAWN, Action.CREATE, Action.BOOT]
    assert plan[1].body == vm_config(spec())


def test_socket_not_up_yet_waits() -> None:
    assert [s.action for s in reconcile(want(spec()), Observed(True, False))] == [Action.WAIT]


@pytest.mark.parametrize(
    ("power", "state", "plan"),
    [
        ("Running", "Running", []),
        ("Running", "Paused", [Action.RESUME]),
        ("Running", "Shutdown", [Action.BOOT]),
        ("Running", "BreakPoint", [Action.RESUME]),
        ("Paused", "Running", [Action.PAUSE]),
        ("Paused", "Created", [Action.BOOT, Action.PAUSE]),
        ("Stopped", "Running", [Action.SHUTDOWN]),
        ("Stopped", "Paused", [Action.SHUTDOWN]),
        ("Stopped", "Shutdown", []),
        ("Sleeping", "Running", [Action.PAUSE, Action.SNAPSHOT, Action.KILL]),
        ("Sleeping", "Paused", [Action.SNAPSHOT, Action.KILL]),
        ("Sleeping", "Shutdown", [Action.KILL]),
    ],
)
def test_power_state_plans(power: str, state: str, plan: list[Action]) -> None:
    s = spec(powerState=power)
    obs = Observed(True, True, state, vm_config(s))
    assert [x.action for x in reconcile(want(s), obs)] == plan


def test_sleep_snapshot_goes_to_the_vm_directory() -> None:
    plan = reconcile(want(spec(powerState="Sleeping")), Observed(True, True, "Paused",
                                                                 vm_config(spec())))
    assert plan[0].body == {"destination_url": "file:///snap"}


def test_wake_restores_then_discards_the_snapshot_before_the_guest_runs() -> None:
    plan = reconcile(want(spec()), Observed(process=False, snapshot=True))
    assert [s.action for s in plan] == [
        Action.SPAWN, Action.RESTORE, Action.DISCARD_SNAPSHOT, Action.RESUME]
    assert plan[1].body == {"source_url": "file:///snap"}


@pytest.mark.parametrize("power", ["Running", "Paused", "Stopped"])
@pytest.mark.parametrize("state", ["Paused", "Running", "Shutdown", "Created"])
def test_a_snapshot_beside_a_live_vm_is_discarded(power: str, state: str) -> None:
    """A wake-up interrupted after vm.restore (vm.resume failed, the agent restarted)
    leaves the VM in the VMM and the snapshot on disk; restoring that snapshot after a
    later crash would resurrect memory older than the disks, so it goes first."""
    s = spec(powerState=power)
    plan = reconcile(want(s), Observed(True, True, state, vm_config(s), snapshot=True))
    assert plan[0].action == Action.DISCARD_SNAPSHOT
    assert Action.RESTORE not in [x.action for x in plan]


def test_a_sleeping_vm_keeps_its_snapshot_while_stopped() -> None:
    """No VM in the VMM: the snapshot is the VM, whatever powerState says meanwhile."""
    for power in ("Stopped", "Sleeping"):
        assert reconcile(want(spec(powerState=power)),
                         Observed(process=False, snapshot=True)) == []
        plan = reconcile(want(spec(powerState=power)), Observed(True, True, snapshot=True))
        assert Action.DISCARD_SNAPSHOT not in [x.action for x in plan]


def test_halted_keeps_it_off_whatever_power_state_says() -> None:
    s = spec(runStrategy="Halted", powerState="Running")
    assert [x.action for x in reconcile(want(s), Observed(True, True, "Running"))] == [
        Action.SHUTDOWN]
    assert reconcile(want(s), Observed(process=False)) == []


def test_manual_stays_off_after_the_guest_stopped_itself() -> None:
    s = spec(runStrategy="Manual")
    assert reconcile(want(s, halted=True), Observed(True, True, "Shutdown", vm_config(s))) == []
    assert [x.action for x in reconcile(want(s), Observed(True, True, "Shutdown",
                                                          vm_config(s)))] == [Action.BOOT]


def test_cpu_change_within_max_is_a_live_resize() -> None:
    old, new = spec(cpus=2, maxCpus=8), spec(cpus=4, maxCpus=8)
    plan = reconcile(want(new), Observed(True, True, "Running", vm_config(old)))
    assert [(s.action, s.body) for s in plan] == [(Action.RESIZE, {"desired_vcpus": 4})]


def test_memory_change_within_max_memory_is_a_live_resize() -> None:
    old = spec(memory="1Gi", maxMemory="4Gi")
    new = spec(memory="2Gi", maxMemory="4Gi")
    plan = reconcile(want(new), Observed(True, True, "Running", vm_config(old)))
    assert [(s.action, s.body) for s in plan] == [(Action.RESIZE, {"desired_ram": 2 << 30})]
    # ... but the same change without maxMemory headroom needs a new VM.
    assert recreate_reasons(vm_config(spec(memory="1Gi")), vm_config(spec(memory="2Gi")))


def test_disk_and_nic_hotplug_and_unplug() -> None:
    root = {"name": "root", "path": "/r.raw"}
    old = spec(disks=[root, {"name": "old", "path": "/o.raw"}])
    new = spec(disks=[root, {"name": "data", "path": "/d.raw"}],
               interfaces=[{"name": "eth0", "tap": "tap0"}])
    plan = reconcile(want(new), Observed(True, True, "Running", vm_config(old)))
    assert [(s.action, s.body) for s in plan] == [
        (Action.REMOVE_DEVICE, {"id": "old"}),
        (Action.ADD_DISK, {"id": "data", "path": "/d.raw", "readonly": False, "direct": False}),
        (Action.ADD_NET, {"id": "eth0", "tap": "tap0"}),
    ]


def test_vmm_defaults_in_vm_info_do_not_look_like_changes() -> None:
    s = spec(disks=[{"name": "root", "path": "/r.raw"}])
    info_config = vm_config(s)
    info_config["disks"][0].update({"num_queues": 1, "queue_size": 128, "iommu": False})
    info_config["cpus"]["kvm_hyperv"] = False
    assert reconcile(want(s), Observed(True, True, "Running", info_config)) == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"boot": {"kernel": "/k2"}}, "payload changed"),
        ({"maxCpus": 4}, "maxCpus changed"),
        ({"disks": [{"name": "root", "path": "/other.raw"}]}, "root disk changed"),
        ({"vsock": {"cid": 7}}, "vsock changed"),
    ],
)
def test_cold_changes_recreate_the_vm(change: dict[str, Any], reason: str) -> None:
    old = spec(disks=[{"name": "root", "path": "/r.raw"}])
    new = spec(**{"disks": [{"name": "root", "path": "/r.raw"}], **change})
    d = Desired(spec=new, vsock_socket="/v.sock")
    plan = reconcile(d, Observed(True, True, "Running", vm_config(old, "/v.sock")))
    assert [s.action for s in plan] == [
        Action.SHUTDOWN, Action.DELETE, Action.CREATE, Action.BOOT]
    assert reason in plan[1].why and "cannot apply this live" in plan[1].why


STATES = st.sampled_from([None, "Created", "Running", "Paused", "Shutdown", "BreakPoint"])


@given(
    power=st.sampled_from(["Running", "Paused", "Stopped", "Sleeping"]),
    strategy=st.sampled_from(["Always", "Halted", "Manual"]),
    process=st.booleans(),
    state=STATES,
    snapshot=st.booleans(),
    old_cpus=st.integers(1, 4),
    cpus=st.integers(1, 4),
)
def test_any_state_converges_in_one_plan(power: str, strategy: str, process: bool,
                                         state: str | None, snapshot: bool, old_cpus: int,
                                         cpus: int) -> None:
    s = spec(powerState=power, runStrategy=strategy, cpus=cpus, maxCpus=4)
    d = want(s)
    config = vm_config(spec(cpus=old_cpus, maxCpus=4)) if process and state else None
    obs = Observed(process, process, state if process else None, config, snapshot)
    final = simulate(d, obs)
    assert reconcile(d, final) == [], f"not converged after one plan: {final}"
    goal = d.state
    if goal != "Sleeping" and final.state is not None:
        assert not final.snapshot, "a snapshot outlived the VM it was restored into"
    if goal == "Off":
        assert final.state not in ("Running", "Paused")
        assert phase_of(d, final) == Phase.STOPPED
    elif goal == "Sleeping":
        assert not final.process
        assert phase_of(d, final) == Phase.SLEEPING
    else:
        assert final.state == goal
        assert phase_of(d, final) == Phase(goal)
        assert final.config is not None and final.config["cpus"]["boot_vcpus"] == cpus


def test_vm_config_matches_the_contract_shape() -> None:
    s = spec(maxCpus=4, maxMemory="2Gi", liveMigration=True,
             disks=[{"name": "root", "path": "/d.raw"}],
             interfaces=[{"name": "eth0", "tap": "tap0", "mac": "52:54:00:00:00:01"}],
             vsock={"cid": 3})
    cfg = vm_config(s, vsock_socket="/run/x.vsock")
    assert cfg["cpus"] == {"boot_vcpus": 2, "max_vcpus": 4}
    assert cfg["memory"] == {"size": 1 << 30, "hotplug_size": 1 << 30, "shared": True}
    assert cfg["payload"] == {"kernel": "/k"}
    assert cfg["disks"] == [{"id": "root", "path": "/d.raw", "readonly": False, "direct": False}]
    assert cfg["net"] == [{"id": "eth0", "tap": "tap0", "mac": "52:54:00:00:00:01"}]
    assert cfg["vsock"] == {"cid": 3, "socket": "/run/x.vsock"}


def test_guest_agent_checkpoints_before_sleep_and_restores_after_wake() -> None:
    asleep = spec(vsock={"cid": 3}, guestAgent={}, powerState="Sleeping")
    plan = reconcile(want(asleep), Observed(True, True, "Running", vm_config(asleep)))
    assert [s.action for s in plan] == [
        Action.GUEST_CHECKPOINT, Action.PAUSE, Action.SNAPSHOT, Action.KILL]
    awake = spec(vsock={"cid": 3}, guestAgent={})
    plan = reconcile(want(awake), Observed(process=False, snapshot=True))
    assert [s.action for s in plan] == [
        Action.SPAWN, Action.RESTORE, Action.DISCARD_SNAPSHOT, Action.RESUME,
        Action.GUEST_RESTORE]
    # Without a guest agent, nothing is asked of the guest.
    plain = spec(vsock={"cid": 3}, powerState="Sleeping")
    assert Action.GUEST_CHECKPOINT not in [
        s.action for s in reconcile(want(plain), Observed(True, True, "Running",
                                                          vm_config(plain)))]


def test_guest_agent_needs_vsock() -> None:
    with pytest.raises(ValueError, match=r"spec\.vsock"):
        spec(guestAgent={})


def test_resized_vm_keeps_its_boot_ceiling() -> None:
    """cloud-hypervisor rewrites memory.size on an ACPI resize and keeps hotplug_size: the
    reported size plus hotplug_size overstates the ceiling, so the boot size decides."""
    created = spec(memory="256Mi", maxMemory="1Gi")
    reported = vm_config(created)
    reported["memory"]["size"] = 512 << 20  # after a live resize to 512 MiB (real VMM)
    grow = spec(memory="768Mi", maxMemory="1Gi")
    plan = reconcile(want(grow), Observed(True, True, "Running", reported,
                                          boot_memory=256 << 20))
    assert [(s.action, s.body) for s in plan] == [(Action.RESIZE, {"desired_ram": 768 << 20})]
    # Without the boot size the ceiling looks like 512 MiB + 768 MiB: a needless recreate.
    assert "maxMemory changed" in recreate_reasons(reported, vm_config(grow))
    # Below the boot size still needs a new VM, whatever the VMM reports now.
    shrink = spec(memory="128Mi", maxMemory="1Gi")
    assert recreate_reasons(reported, vm_config(shrink), 256 << 20) == [
        "memory below the boot size"]
    # A Created VM after vm.shutdown (the real VMM never reports Shutdown) boots again.
    assert [s.action for s in reconcile(want(created), Observed(
        True, True, "Created", vm_config(created), boot_memory=256 << 20))] == [Action.BOOT]


@pytest.mark.parametrize(("live", "config", "status", "reason"), [
    (False, {"memory": {"size": 1 << 30}}, False, "LiveMigrationDisabled"),
    (False, None, False, "LiveMigrationDisabled"),
    (True, {"memory": {"size": 1 << 30}}, False, "RecreatePending"),
    (True, {"memory": {"size": 1 << 30, "shared": True}}, True, "SharedMemory"),
    (True, None, True, "SharedMemory"),  # not created yet: it will be created shared
])
def test_live_migratable_condition(live: bool, config: dict[str, Any] | None, status: bool,
                                   reason: str) -> None:
    ok, why, message = live_migratable(spec(liveMigration=live),
                                       Observed(process=config is not None, config=config))
    assert (ok, why) == (status, reason)
    assert "spec.liveMigration" in message or ok


def test_ready_condition_follows_kubevirt() -> None:
    from hyperfleet.reconcilers.models.common import Condition
    from hyperfleet.reconcilers.vm import ready_condition, ready_settled

    def desired(**spec: Any) -> Desired:
        return Desired(VirtualMachineSpec.model_validate({**BASE, **spec}))

    up = Observed(process=True, socket=True, state="Running")
    assert ready_condition(desired(), up, True) == (
        True, "Running", "running (hypervisor state Running)")
    assert ready_condition(desired(), Observed(process=False), False)[:2] == (False, "Converging")
    manual = Desired(VirtualMachineSpec.model_validate({**BASE, "runStrategy": "Manual"}),
                     halted=True)
    status, reason, message = ready_condition(manual, Observed(process=False), True)
    assert (status, reason) == (False, "Stopped") and "runStrategy Manual" in message
    sick = [Condition(type="GuestHealthy", status="False", reason="CheckFailed",
                      message="nginx is down")]
    guest = desired(vsock={"cid": 3}, guestAgent={})
    assert ready_condition(guest, up, True, sick) == (
        False, "GuestUnhealthy", "running, but the guest reports unhealthy: nginx is down")
    assert ready_condition(desired(), up, True, sick)[0] is True  # no guest agent: stale
    # Settled: what a resize job waits for; Converging or a failure is not.
    assert ready_settled({"status": "True"})
    assert ready_settled({"status": "False", "reason": "Stopped"})
    assert not ready_settled({"status": "False", "reason": "Converging"})
    assert not ready_settled({"status": "False", "reason": "HypervisorError"})
    assert not ready_settled(None)
