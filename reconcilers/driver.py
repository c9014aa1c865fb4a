"""Node-side VM driver: observe a VM's VMM, run the planned actions, report status.

This is the I/O half of :mod:`.vm`; the kopf agent calls :meth:`VmDriver.converge`
from a worker thread for each VM bound to its node.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .hypervisor.client import ChClient, ChError
from .hypervisor.process import ProcessManager, UnsafeNameError
from .models.common import Condition, now_utc, set_condition
from .models.vm import Phase, VirtualMachine
from .vm import Action, Observed, desired_state, phase_of, reconcile, vm_config

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one converge pass learned: the status patch and events worth recording."""

    status: dict[str, Any]
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    converged: bool = False


class VmDriver:
    def __init__(self, pm: ProcessManager, node_name: str, socket_wait: float = 5.0) -> None:
        self.pm = pm
        self.node_name = node_name
        self.socket_wait = socket_wait
        self._clients: dict[str, ChClient] = {}

    def _client(self, ns: str, name: str) -> ChClient:
        key = f"{ns}/{name}"
        c = self._clients.get(key)
        if c is None:
            c = self.pm.client(ns, name, wait_socket=self.socket_wait)
            self._clients[key] = c
        return c

    def observe(self, ns: str, name: str) -> tuple[Observed, dict[str, Any] | None, int | None]:
        pid = self.pm.pid(ns, name)
        if pid is None:
            return Observed(process=False), None, None
        socket = self.pm.paths(ns, name).socket.exists()
        if not socket:
            return Observed(process=True, socket=False), None, pid
        info = self._client(ns, name).info()
        return Observed(True, True, info["state"] if info else None), info, pid

    def converge(self, vm: VirtualMachine) -> Outcome:
        ns, name = vm.metadata.namespace or "default", vm.metadata.name
        st = vm.status
        events: list[tuple[str, str, str]] = []
        conditions = list(st.conditions)
        gen = vm.metadata.generation
        boot_time: datetime | None = st.boot_time
        restarts = st.restart_count
        try:
            observed, _, pid = self.observe(ns, name)
            plan = reconcile(vm.spec, observed)
            if (
                Action.SPAWN in plan
                and st.hypervisor is not None
                and st.hypervisor.pid is not None
                and st.phase in (Phase.RUNNING, Phase.PAUSED)
            ):
                restarts += 1
                events.append(("Warning", "Restarted", "VMM process was gone; started a new one"))
            for action in plan:
                self._execute(vm, action)
                if action == Action.BOOT:
                    boot_time = now_utc()
                    events.append(("Normal", "Booted", f"VM booted on node {self.node_name}"))
                elif action in (Action.PAUSE, Action.RESUME, Action.SHUTDOWN):
                    events.append(("Normal", _past(action), f"{action.value} succeeded"))
            if plan:
                observed, _, pid = self.observe(ns, name)
            phase = phase_of(vm.spec, observed)
            converged = not reconcile(vm.spec, observed)
            conditions = set_condition(
                conditions,
                "Ready",
                converged,
                "Converged" if converged else "Converging",
                f"hypervisor state {observed.state or 'none'}, desired {desired_state(vm.spec)}",
                gen,
            )
            conditions = _clear_error(conditions, gen)
            message = None
        except (ChError, UnsafeNameError, OSError, ValueError) as exc:
            reason = "InvalidName" if isinstance(exc, UnsafeNameError) else "HypervisorError"
            log.warning("converge failed", extra={"vm": vm.key, "error": str(exc)})
            conditions = set_condition(
                conditions, "Ready", False, reason, str(exc), gen
            )
            conditions = set_condition(conditions, "Failure", True, reason, str(exc), gen)
            events.append(("Warning", reason, str(exc)))
            phase = Phase.FAILED
            message = str(exc)
            converged = False
            observed, pid = Observed(process=False), None
            with contextlib.suppress(ChError, UnsafeNameError, OSError):
                observed, _, pid = self.observe(ns, name)
        paths_socket: str | None
        try:
            paths_socket = str(self.pm.paths(ns, name).socket)
        except UnsafeNameError:
            paths_socket = None
        status: dict[str, Any] = {
            "phase": phase.value,
            "nodeName": self.node_name,
            "message": message,
            "observedGeneration": gen,
            "hypervisor": {"state": observed.state, "pid": pid},
            "apiSocket": paths_socket if pid else None,
            "bootTime": boot_time.isoformat().replace("+00:00", "Z") if boot_time else None,
            "restartCount": restarts,
            "conditions": [c.wire() for c in conditions],
        }
        return Outcome(status=status, events=events, converged=converged)

    def _execute(self, vm: VirtualMachine, action: Action) -> None:
        ns, name = vm.metadata.namespace or "default", vm.metadata.name
        log.info("action", extra={"vm": vm.key, "action": action.value})
        if action == Action.SPAWN:
            self._drop_client(ns, name)
            self.pm.spawn(ns, name)
            return
        if action == Action.WAIT:
            return
        client = self._client(ns, name)
        if action == Action.CREATE:
            client.create(vm_config(vm.spec))
        else:
            client.put(action.value)

    def destroy(self, ns: str, name: str) -> None:
        self._drop_client(ns, name)
        self.pm.stop(ns, name)

    def _drop_client(self, ns: str, name: str) -> None:
        c = self._clients.pop(f"{ns}/{name}", None)
        if c is not None:
            c.close()


def _past(action: Action) -> str:
    return {
        Action.PAUSE: "Paused",
        Action.RESUME: "Resumed",
        Action.SHUTDOWN: "Stopped",
    }.get(action, action.value)


def _clear_error(conditions: list[Condition], gen: int | None) -> list[Condition]:
    if any(c.type == "Failure" and c.status == "True" for c in conditions):
        return set_condition(conditions, "Failure", False, "Recovered", "", gen)
    return conditions
