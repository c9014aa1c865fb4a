"""The guest agent over vsock: checkpoint before sleep, restore on wake, health checks.

On the CH double only: the guest agent runs inside the guest, and under this machine's KVM
(PVM) the genuine cloud-hypervisor's guest kernel hangs before userspace, so no guest
program ever answers on vsock. The VMM side of vsock (the device, its hot-plug) is tested
against the real VMM in the transcripts (tests/ch_transcripts).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from tests import PLACEHOLDER_KERNEL

from .conftest import Cluster, wait_for

VM = """
apiVersion: hyperfleet.dev/v1alpha1
kind: VirtualMachine
metadata: {name: db}
spec:
  cpus: 1
  memory: 256Mi
  boot: {kernel: {kernel}}
  vsock: {cid: 3}
  guestAgent: {healthIntervalSeconds: 5}
"""
VM = VM.replace("{kernel}", PLACEHOLDER_KERNEL)


def hook(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def conditions(c: Cluster) -> dict[str, dict[str, Any]]:
    st = (c.get("hvm", "db") or {}).get("status") or {}
    return {x["type"]: x for x in st.get("conditions", [])}


def test_sleep_and_wake_go_through_the_guest(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    hooks = tmp_path / "hooks"
    log = tmp_path / "workload.log"
    hook(hooks / "checkpoint.d" / "10-flush", f"echo flushed >> {log}")
    hook(hooks / "restore.d" / "10-reconnect", f"echo reconnected >> {log}")
    hook(hooks / "health.d" / "10-db", f"test ! -e {tmp_path / 'sick'} || "
         "{ echo 'db replica lagging'; exit 1; }")
    c.start_controller()
    c.start_agent(c.node("a"), env={"HYPERFLEET_CH_DOUBLE_GUEST_HOOKS": str(hooks)})
    assert c.apply(VM).returncode == 0

    healthy = wait_for(lambda: conditions(c).get("GuestHealthy", {}).get("status") == "True"
                       and conditions(c)["GuestHealthy"], 60, "GuestHealthy", c)
    assert "checks passed" in healthy["message"]

    (tmp_path / "sick").touch()
    sick = wait_for(lambda: conditions(c).get("GuestHealthy", {}).get("status") == "False"
                    and conditions(c)["GuestHealthy"], 30, "GuestHealthy False", c)
    assert "db replica lagging" in sick["message"]
    (tmp_path / "sick").unlink()

    c.kubectl("patch", "hvm", "db", "--type=merge", "-p", '{"spec":{"powerState":"Sleeping"}}')
    wait_for(lambda: ((c.get("hvm", "db") or {}).get("status") or {}).get("phase")
             == "Sleeping", 30, "Sleeping", c)
    assert log.read_text().split() == ["flushed"]
    assert conditions(c)["GuestCheckpointed"]["status"] == "True"
    state = json.loads((hooks / "state" / "last-checkpoint.json").read_text())
    assert state["hooks"] == ["10-flush"]

    c.kubectl("patch", "hvm", "db", "--type=merge", "-p", '{"spec":{"powerState":"Running"}}')
    wait_for(lambda: conditions(c).get("GuestRestored", {}).get("status") == "True",
             30, "GuestRestored", c)
    assert log.read_text().split() == ["flushed", "reconnected"]
    assert ((c.get("hvm", "db") or {}).get("status") or {}).get("phase") == "Running"


def test_silent_guest_does_not_block_sleep(cluster: Cluster) -> None:
    c = cluster
    c.start_controller()
    c.start_agent(c.node("a"))  # no guest agent inside this VM's guest
    assert c.apply(VM).returncode == 0
    unreachable = wait_for(lambda: conditions(c).get("GuestHealthy", {}).get("reason")
                           == "GuestAgentUnreachable" and conditions(c)["GuestHealthy"],
                           60, "GuestAgentUnreachable", c)
    assert unreachable["status"] == "False"
    c.kubectl("patch", "hvm", "db", "--type=merge", "-p", '{"spec":{"powerState":"Sleeping"}}')
    wait_for(lambda: ((c.get("hvm", "db") or {}).get("status") or {}).get("phase")
             == "Sleeping", 30, "Sleeping", c)
    failed = conditions(c)["GuestCheckpointed"]
    assert failed["status"] == "False" and "continuing without it" in failed["message"]
