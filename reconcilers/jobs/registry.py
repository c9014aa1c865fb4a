"""The payload-version registry: which ``<operation>.v<N>`` payload types exist.

Each type maps to its typed model (:mod:`.payloads`) and to what routing needs to
know about it (capabilities, whether it acts on a VM). The built-in types are
registered into :data:`REGISTRY` at import; plugins add theirs with
:func:`register_payload`. This module also owns the grammar of operation and
payload type names, since registering is where a type name is first checked.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar, overload

from .payloads import BUILTIN_PAYLOADS, DNS_LABEL_PATTERN, PayloadData, quote

__all__ = [
    "OPERATION_PATTERN",
    "OPERATION_RE",
    "PAYLOAD_TYPE_RE",
    "REGISTRY",
    "PayloadRegistry",
    "PayloadSpec",
    "register_payload",
]

# RE2-compatible so it can be copied into CRD ``pattern`` fields.
OPERATION_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$"

OPERATION_RE = re.compile(OPERATION_PATTERN)
PAYLOAD_TYPE_RE = re.compile(r"^(?P<operation>.+)\.v(?P<version>[1-9][0-9]*)$")
_DNS_LABEL_RE = re.compile(DNS_LABEL_PATTERN)

M = TypeVar("M", bound=PayloadData)


@dataclass(frozen=True)
class PayloadSpec:
    """Everything the system knows about one payload type.

    ``targets_vm``: the job must name ``routing.targetVm`` and runs on its host node.
    ``requires_running_vm``: routing fails while the target VM is not running
    (``False`` lets e.g. a restore run on any eligible node).
    """

    type_name: str
    operation: str
    version: int
    model: type[PayloadData]
    required_capabilities: frozenset[str]
    targets_vm: bool
    requires_running_vm: bool


class PayloadRegistry:
    """Maps payload type names to :class:`PayloadSpec`; plugins add types at import time."""

    def __init__(self, specs: Iterable[PayloadSpec] = ()) -> None:
        self._specs: dict[str, PayloadSpec] = {}
        for spec in specs:
            self._specs[spec.type_name] = spec

    def register(
        self,
        type_name: str,
        model: type[PayloadData],
        *,
        required_capabilities: Iterable[str] = (),
        targets_vm: bool | None = None,
        requires_running_vm: bool | None = None,
        replace: bool = False,
    ) -> PayloadSpec:
        """Register ``model`` for ``type_name`` (``"<operation>.v<N>"``).

        ``targets_vm`` defaults to ``True`` for the ``vm`` namespace;
        ``requires_running_vm`` defaults to ``targets_vm``. Re-registering a type
        raises unless ``replace=True`` so two plugins cannot silently fight.
        """
        match = PAYLOAD_TYPE_RE.match(type_name)
        if match is None or not OPERATION_RE.match(match.group("operation")):
            raise ValueError(
                f"payload type {quote(type_name)} must look like '<namespace>.<name>.v<N>', "
                "e.g. 'vm.snapshot.v1'"
            )
        if not (isinstance(model, type) and issubclass(model, PayloadData)):
            raise TypeError(f"payload model for {type_name!r} must subclass PayloadData")
        capabilities = frozenset(required_capabilities)
        for capability in capabilities:
            if not _DNS_LABEL_RE.match(capability):
                raise ValueError(f"capability {capability!r} of {type_name!r} is not a DNS label")
        if type_name in self._specs and not replace:
            raise ValueError(f"payload type {type_name!r} is already registered")
        operation = match.group("operation")
        targets = operation.split(".", 1)[0] == "vm" if targets_vm is None else targets_vm
        spec = PayloadSpec(
            type_name=type_name,
            operation=operation,
            version=int(match.group("version")),
            model=model,
            required_capabilities=capabilities,
            targets_vm=targets,
            requires_running_vm=targets if requires_running_vm is None else requires_running_vm,
        )
        self._specs[type_name] = spec
        return spec

    def unregister(self, type_name: str) -> None:
        """Remove a type (tests, plugin unload)."""
        self._specs.pop(type_name, None)

    def get(self, type_name: str) -> PayloadSpec | None:
        """The spec for ``type_name`` or ``None``."""
        return self._specs.get(type_name)

    def types_for(self, operation: str) -> list[str]:
        """Registered payload types of ``operation``, oldest version first."""
        specs = [s for s in self._specs.values() if s.operation == operation]
        return [s.type_name for s in sorted(specs, key=lambda s: s.version)]

    def latest(self, operation: str) -> PayloadSpec | None:
        """Highest registered version for ``operation`` (what the builder uses)."""
        types = self.types_for(operation)
        return self._specs[types[-1]] if types else None

    def operations(self) -> list[str]:
        """All operations with at least one payload type, sorted."""
        return sorted({s.operation for s in self._specs.values()})

    def copy(self) -> PayloadRegistry:
        """An independent registry with the same types (isolate plugin experiments)."""
        return PayloadRegistry(self._specs.values())

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._specs

    def __iter__(self) -> Iterator[PayloadSpec]:
        return iter(sorted(self._specs.values(), key=lambda s: s.type_name))

    def __len__(self) -> int:
        return len(self._specs)


REGISTRY = PayloadRegistry()
for _builtin in BUILTIN_PAYLOADS:
    REGISTRY.register(
        _builtin.type_name,
        _builtin.model,
        required_capabilities=_builtin.required_capabilities,
        targets_vm=_builtin.targets_vm,
        requires_running_vm=_builtin.requires_running_vm,
    )


@overload
def register_payload(
    type_name: str,
    model: type[M],
    *,
    required_capabilities: Iterable[str] = (),
    targets_vm: bool | None = None,
    requires_running_vm: bool | None = None,
    replace: bool = False,
    registry: PayloadRegistry | None = None,
) -> type[M]: ...


@overload
def register_payload(
    type_name: str,
    model: None = None,
    *,
    required_capabilities: Iterable[str] = (),
    targets_vm: bool | None = None,
    requires_running_vm: bool | None = None,
    replace: bool = False,
    registry: PayloadRegistry | None = None,
) -> Callable[[type[M]], type[M]]: ...


def register_payload(
    type_name: str,
    model: type[M] | None = None,
    *,
    required_capabilities: Iterable[str] = (),
    targets_vm: bool | None = None,
    requires_running_vm: bool | None = None,
    replace: bool = False,
    registry: PayloadRegistry | None = None,
) -> type[M] | Callable[[type[M]], type[M]]:
    """Register a payload model in ``registry`` (default :data:`REGISTRY`).

    Usable directly, ``register_payload("acme.flush.v1", FlushV1)``, or as a class
    decorator, ``@register_payload("acme.flush.v1", required_capabilities={"acme"})``.
    """
    reg = registry or REGISTRY
    caps = tuple(required_capabilities)

    def decorate(cls: type[M]) -> type[M]:
        reg.register(
            type_name,
            cls,
            required_capabilities=caps,
            targets_vm=targets_vm,
            requires_running_vm=requires_running_vm,
            replace=replace,
        )
        return cls

    return decorate if model is None else decorate(model)

