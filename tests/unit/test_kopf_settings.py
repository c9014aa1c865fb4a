"""kopf keeps no diff base for our objects (``NoDiffBase``): that is only sound while no
role registers creation, update or resume handlers, which would then fire on every event."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest

from hyperfleet.operator import agent, controller, gitsource, pools
from hyperfleet.operator.gitsource import GitOpsConfig
from hyperfleet.operator.settings import (
    CHANGE_HANDLERS_FORBIDDEN,
    AgentConfig,
    ControllerConfig,
    NoDiffBase,
    configure_kopf,
)
from hyperfleet.reconcilers.kube import Kube


def changing_reasons(registry: kopf.OperatorRegistry) -> set[str]:
    # kopf registers resume handlers with no reason, as "initial" ones.
    return {"resume" if h.reason is None and h.initial else str(getattr(h.reason, "value", h.reason))
            for h in registry._changing.get_all_handlers()}


def test_controller_and_gitsource_register_no_change_handlers(tmp_path: Path) -> None:
    registry = kopf.OperatorRegistry()
    controller.register(registry, ControllerConfig(), Kube())
    gitsource.register(registry, GitOpsConfig(cache_dir=str(tmp_path)), Kube(),
                       active=lambda: True)
    pools.register(registry, Kube(), [], active=lambda: True)
    assert not changing_reasons(registry) & set(CHANGE_HANDLERS_FORBIDDEN)


def test_the_agent_registers_no_vm_handlers(tmp_path: Path) -> None:
    """kopf would give each VM a worker, a daemon, a diff and a patch per event: the agent's
    VMs (their loops, finalizer and deletion) come from its own informer, watching only
    the VMs bound to its node, so kopf does not watch VMs in the agent at all."""
    registry = kopf.OperatorRegistry()
    node = agent.register(registry, AgentConfig("n1", socket_dir=str(tmp_path / "run"),
                                                state_dir=str(tmp_path / "state")), Kube())
    assert not changing_reasons(registry)
    assert not registry._spawning.get_all_handlers()  # no daemon per VM
    handlers = [*registry._watching.get_all_handlers(), *registry._changing.get_all_handlers(),
                *registry._spawning.get_all_handlers()]
    watched = {h.selector.any_name for h in handlers if h.selector is not None}
    assert "virtualmachines" not in watched and "vmjobs" in watched
    informer = node.vm_informer
    assert informer is not None and informer.res.plural == "virtualmachines"
    assert informer.field_selector == "status.nodeName=n1"


@pytest.mark.parametrize("handler", CHANGE_HANDLERS_FORBIDDEN)
def test_the_check_sees_a_forbidden_handler(handler: str) -> None:
    registry = kopf.OperatorRegistry()
    decorator: Any = getattr(kopf.on, handler)
    decorator("hyperfleet.dev", "v1alpha1", "virtualmachines", registry=registry)(
        lambda **_: None)
    assert changing_reasons(registry) == {handler}


def test_no_diff_base_is_configured_and_stores_nothing() -> None:
    settings = kopf.OperatorSettings()
    configure_kopf(settings, "agent")
    store = settings.persistence.diffbase_storage
    assert isinstance(store, NoDiffBase)
    body = kopf.Body({"metadata": {"name": "x"}, "spec": {"cpus": 1}})
    assert store.build(body=body) is None and store.fetch(body=body) is None


def test_the_controller_process_leaves_the_vm_watch_to_its_own_informer(tmp_path: Path) -> None:
    """kopf would give each of thousands of VMs a worker, a body and a patch per event: the
    controller, GitOps and pools register no VM handler, so kopf does not watch VMs at all."""
    registry = kopf.OperatorRegistry()
    ctl = controller.register(registry, ControllerConfig(), Kube())
    gitsource.register(registry, GitOpsConfig(cache_dir=str(tmp_path)), Kube(),
                       active=lambda: True)
    pools.register(registry, Kube(), ctl.vm_subscribers, active=lambda: True)
    handlers = [*registry._watching.get_all_handlers(), *registry._changing.get_all_handlers(),
                *registry._spawning.get_all_handlers()]
    watched = {h.selector.any_name for h in handlers if h.selector is not None}
    assert "virtualmachines" not in watched and "workernodes" in watched
    assert ctl.vm_informer is not None and ctl.vm_subscribers  # pools hear the VMs from it
