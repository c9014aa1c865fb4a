"""The applier reads the VMs from the process's own watch when it has one."""

from __future__ import annotations

from typing import Any, cast

from hyperfleet.reconcilers.gitops.apply import Applier
from hyperfleet.reconcilers.gitops.types import OWNER_LABEL, ObjectRef
from hyperfleet.reconcilers.kube import Kube


class Recording(Applier):
    """No API server: every list the applier would send is recorded and answered empty."""

    def __init__(self, view: list[dict[str, Any]] | None) -> None:
        super().__init__(Kube(), workers=1, vms=lambda: view)
        self.sent: list[str] = []
        me = cast(Any, self)
        me._list = lambda plural: self._record(f"list {plural}")
        me._list_labelled = lambda plural, sel: self._record(f"list {plural} {sel}")

    def _record(self, call: str) -> list[dict[str, Any]]:
        self.sent.append(call)
        return []


def _vm(name: str, owner: str | None = None, kind: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "hyperfleet.dev/v1alpha1", "metadata": {
        "name": name, "namespace": "ns", "labels": {OWNER_LABEL: owner} if owner else {}}}
    if kind:
        body["kind"] = "VirtualMachine"
    return body


def test_until_the_view_is_complete_the_vms_are_listed() -> None:
    a = Recording(None)
    assert a.list_live(["VirtualMachine"]) == {}
    assert a.list_owned("VirtualMachine", "ns.fleet") == []
    assert a.sent == ["list virtualmachines", f"list virtualmachines {OWNER_LABEL}=ns.fleet"]


def test_with_a_complete_view_the_vms_come_from_it_and_other_kinds_are_listed() -> None:
    view = [_vm("web", "ns.fleet"), _vm("db", "ns.other"), _vm("bare", kind=False)]
    a = Recording(view)
    live = a.list_live(["VirtualMachine", "WorkerNode"])
    assert sorted(r.name for r in live) == ["bare", "db", "web"]
    assert live[ObjectRef("VirtualMachine", "ns", "bare")]["kind"] == "VirtualMachine"
    assert "kind" not in view[2]  # the view's own copy is never changed
    assert [b["metadata"]["name"] for b in a.list_owned("VirtualMachine", "ns.fleet")] == ["web"]
    assert a.sent == ["list workernodes"]
