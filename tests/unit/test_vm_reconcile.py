"""Pure VM reconcile: every observed state converges to every desired state."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperfleet.reconcilers.models.vm import Phase, VirtualMachineSpec
from hyperfleet.reconcilers.vm import Action, Observed, phase_of, reconcile, vm_config

BASE: dict[str, Any] = {"cpus": 2, "memory": "1Gi", "boot": {"kernel": "/k"}}

# Where each VMM action leads, per the upstream state machine (NOTES.md).
TRANSITIONS: dict[Action, dict[str | None, str]] = {
    Action.CREATE: {None: "Created"},
    Action.BOOT: {"Created": "Running", "Shutdown": "Running"},
    Action.PAUSE: {"Running": "Paused"},
    Action.RESUME: {"Paused": "Running", "BreakPoint": "Running"},
    Action.SHUTDOWN: {"Running": "Shutdown", "Paused": "Shutdown"},
}


def spec(**kw: Any) -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate({**BASE, **kw})


def simulate(s: VirtualMachineSpec, obs: Observed) -> Observed:
    """Apply a plan to a model of the VMM; illegal transitions fail the test."""
    for action in reconcile(s, obs):
        if action == Action.SPAWN:
            obs = Observed(process=True, socket=True, state=None)
            continue
        assert action != Action.WAIT
        table = TRANSITIONS[action]
        assert obs.state in table, f"{action} is illegal from {obs.state}"
        obs = Observed(True, True, table[obs.state])
    return obs


def test_fresh_vm_spawns_creates_boots() -> None:
    assert reconcile(spec(), Observed(process=False)) == [Action.SPAWN, Action.CREATE, Action.BOOT]


def test_socket_not_up_yet_waits() -> None:
    assert reconcile(spec(), Observed(process=True, socket=False)) == [Action.WAIT]


@pytest.mark.parametrize(
    ("power", "state", "plan"),
    [
        ("Running", "Running", []),
        ("Running", "Paused", [Action.RESUME]),
        ("Running", "Shutdown", [Action.BOOT]),
        ("Paused", "Running", [Action.PAUSE]),
        ("Paused", "Created", [Action.BOOT, Action.PAUSE]),
        ("Stopped", "Running", [Action.SHUTDOWN]),
        ("Stopped", "Paused", [Action.SHUTDOWN]),
        ("Stopped", "Shutdown", []),
    ],
)
def test_power_state_plans(power: str, state: str, plan: list[Action]) -> None:
    assert reconcile(spec(powerState=power), Observed(True, True, state)) == plan


def test_halted_keeps_it_off_whatever_power_state_says() -> None:
    s = spec(runStrategy="Halted", powerState="Running")
    assert reconcile(s, Observed(True, True, "Running")) == [Action.SHUTDOWN]
    assert reconcile(s, Observed(process=False)) == []


STATES = st.sampled_from([None, "Created", "Running", "Paused", "Shutdown", "BreakPoint"])


@given(
    power=st.sampled_from(["Running", "Paused", "Stopped"]),
    strategy=st.sampled_from(["Always", "Halted", "Manual"]),
    process=st.booleans(),
    state=STATES,
)
def test_any_state_converges_in_one_plan(power: str, strategy: str, process: bool,
                                         state: str | None) -> None:
    s = spec(powerState=power, runStrategy=strategy)
    obs = Observed(process=process, socket=process, state=state if process else None)
    final = simulate(s, obs)
    assert reconcile(s, final) == []
    want = "Off" if strategy == "Halted" or power == "Stopped" else power
    if want == "Off":
        assert final.state not in ("Running", "Paused")
        assert phase_of(s, final) == Phase.STOPPED
    else:
        assert final.state == want
        assert phase_of(s, final) == Phase(want)


def test_vm_config_matches_the_contract_shape() -> None:
    s = spec(maxCpus=4, disks=[{"name": "root", "path": "/d.raw"}],
             interfaces=[{"name": "eth0", "tap": "tap0", "mac": "52:54:00:00:00:01"}],
             vsock={"cid": 3})
    cfg = vm_config(s, vsock_socket="/run/x.vsock")
    assert cfg["cpus"] == {"boot_vcpus": 2, "max_vcpus": 4}
    assert cfg["memory"] == {"size": 1 << 30}
    assert cfg["payload"] == {"kernel": "/k"}
    assert cfg["disks"] == [{"id": "root", "path": "/d.raw", "readonly": False, "direct": False}]
    assert cfg["net"] == [{"id": "eth0", "tap": "tap0", "mac": "52:54:00:00:00:01"}]
    assert cfg["vsock"] == {"cid": 3, "socket": "/run/x.vsock"}
