"""Shared vocabulary of the GitOps reconciler: object references, manifests, errors, labels."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from hyperfleet.reconcilers import conventions as conv

# Declared in conventions.py; re-exported because the gitops modules read them from here.
from hyperfleet.reconcilers.conventions import ADOPT_ANNOTATION as ADOPT_ANNOTATION
from hyperfleet.reconcilers.conventions import API_VERSION
from hyperfleet.reconcilers.conventions import COMMIT_ANNOTATION as COMMIT_ANNOTATION
from hyperfleet.reconcilers.conventions import (
    CONFIRM_DELETION_ANNOTATION as CONFIRM_DELETION_ANNOTATION,
)
from hyperfleet.reconcilers.conventions import DIGEST_ANNOTATION as DIGEST_ANNOTATION
from hyperfleet.reconcilers.conventions import OWNER_LABEL as OWNER_LABEL
from hyperfleet.reconcilers.conventions import PATH_ANNOTATION as PATH_ANNOTATION
from hyperfleet.reconcilers.conventions import (
    RECONCILE_NOW_ANNOTATION as RECONCILE_NOW_ANNOTATION,
)
from hyperfleet.reconcilers.conventions import SOURCE_ANNOTATION as SOURCE_ANNOTATION

FIELD_MANAGER = "hyperfleet-gitops"


@dataclass(frozen=True)
class KindInfo:
    kind: str
    plural: str
    namespaced: bool
    order: int  # apply order (ascending); pruning goes the other way


#: The only kinds a GitSource applies: Hyperfleet's own.
KINDS: dict[str, KindInfo] = {
    k.kind: KindInfo(k.kind, k.plural, k.namespaced, order)
    for k, order in ((conv.WORKER_NODE, 0), (conv.VIRTUAL_MACHINE, 1),
                     (conv.VIRTUAL_MACHINE_POOL, 1), (conv.VM_JOB, 2))
}


@dataclass(frozen=True, order=True)
class ObjectRef:
    """Identity of an applied object; ``namespace`` is "" for cluster-scoped kinds."""

    kind: str
    namespace: str
    name: str
    api_version: str = field(default=API_VERSION, compare=False)

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{where}{self.name}"

    def sort_key(self) -> tuple[int, str, str, str]:
        info = KINDS.get(self.kind)
        return (info.order if info else 99, self.kind, self.namespace, self.name)

    def to_inventory(self) -> dict[str, str]:
        out = {"apiVersion": self.api_version, "kind": self.kind, "name": self.name}
        if self.namespace:
            out["namespace"] = self.namespace
        return out

    @classmethod
    def from_inventory(cls, entry: dict[str, Any]) -> ObjectRef:
        return cls(
            kind=str(entry["kind"]),
            namespace=str(entry.get("namespace") or ""),
            name=str(entry["name"]),
            api_version=str(entry.get("apiVersion") or API_VERSION),
        )

    @classmethod
    def of(cls, body: dict[str, Any]) -> ObjectRef:
        meta = body.get("metadata") or {}
        return cls(
            kind=str(body.get("kind")),
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name")),
            api_version=str(body.get("apiVersion") or API_VERSION),
        )


@dataclass(frozen=True)
class SourceLocation:
    """Where a document came from, for error messages and the provenance annotation."""

    file: str
    index: int | None = None  # 0-based document index inside the file
    line: int | None = None  # 1-based line

    def __str__(self) -> str:
        out = self.file
        if self.line is not None:
            out += f":{self.line}"
        if self.index is not None:
            out += f" (document {self.index})"
        return out


@dataclass(frozen=True)
class RenderError:
    """A problem with one file or document; any one of them blocks the whole commit."""

    where: SourceLocation
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Manifest:
    """One desired object as rendered from Git (namespace resolved, status dropped)."""

    ref: ObjectRef
    body: dict[str, Any]
    where: SourceLocation
    digest: str = field(default="")

    @classmethod
    def build(cls, body: dict[str, Any], where: SourceLocation) -> Manifest:
        return cls(ObjectRef.of(body), body, where, digest_of(body))


def digest_of(body: dict[str, Any]) -> str:
    """Stable hash of what Git says about an object: unchanged digest -> nothing to update."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def owner_value(namespace: str, name: str) -> str:
    """The ownership label value ``<ns>.<name>``, shortened with a hash to fit 63 characters."""
    value = f"{namespace}.{name}"
    if len(value) <= 63:
        return value
    h = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{value[:52].rstrip('.-_')}-{h}"


class GitOpsError(Exception):
    """Base of the reconciler's expected failures (they become conditions, not tracebacks)."""
