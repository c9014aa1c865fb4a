"""Pure planning: what to apply, what to prune, and whether a commit must be held.

No I/O here, so the safety rules (only inventory objects that still carry our ownership label
are pruned; a commit deleting too much of the fleet is held) are unit-tested directly.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .types import (
    ADOPT_ANNOTATION,
    COMMIT_ANNOTATION,
    DIGEST_ANNOTATION,
    KINDS,
    OWNER_LABEL,
    PATH_ANNOTATION,
    SOURCE_ANNOTATION,
    Manifest,
    ObjectRef,
)


class Reason(StrEnum):
    CREATE = "create"
    UPDATE = "update"  # Git changed the object
    DRIFT = "drift"  # Git did not change, the live object did: put it back
    ADOPT = "adopt"  # existed without us; its owner annotated it hyperfleet.dev/adopt


@dataclass(frozen=True)
class Apply:
    manifest: Manifest
    body: dict[str, Any]  # with ownership label and provenance annotations
    reason: Reason


@dataclass(frozen=True)
class Conflict:
    """Git defines an object that exists but is not ours: made by hand, registered by an agent
    (``other_owner`` None), or managed by another GitSource. It is left alone."""

    manifest: Manifest
    other_owner: str | None
    source: str = ""  # this GitSource, "<namespace>/<name>"

    def _adopt(self, value: str) -> str:
        ref = self.manifest.ref
        where = f" -n {ref.namespace}" if ref.namespace else ""
        plural = KINDS[ref.kind].plural if ref.kind in KINDS else ref.kind.lower()
        return f"kubectl annotate {plural}{where} {ref.name} {ADOPT_ANNOTATION}={value}"

    def __str__(self) -> str:
        m = self.manifest
        if self.other_owner is None:
            return (f"{m.ref} ({m.where}) already exists and was not created by a GitSource; it is "
                    f"left alone. Rename it in Git, or let this GitSource take it over: "
                    f"{self._adopt('true')}")
        return (f"{m.ref} ({m.where}) is managed by GitSource {self.other_owner}; remove it from one "
                f"of the two sources, or move it here: {self._adopt(self.source or 'NAMESPACE/NAME')}")


@dataclass(frozen=True)
class Hold:
    """The commit's deletions exceed maxDeletionRatio and nobody confirmed them yet."""

    commit: str
    deletions: list[ObjectRef]
    total: int
    max_ratio: float

    @property
    def ratio(self) -> float:
        return len(self.deletions) / self.total if self.total else 0.0

    def message(self, gitsource: str, namespace: str) -> str:
        names = ", ".join(str(r) for r in self.deletions[:10])
        more = f" and {len(self.deletions) - 10} more" if len(self.deletions) > 10 else ""
        return (
            f"commit {self.commit[:12]} would delete {len(self.deletions)} of {self.total} objects "
            f"({self.ratio:.0%} > maxDeletionRatio {self.max_ratio:.0%}): {names}{more}. Nothing "
            f"was applied; the last applied state is kept. If this is intended, run: kubectl -n "
            f"{namespace} annotate gitsource {gitsource} --overwrite "
            f"hyperfleet.dev/confirm-deletion={self.commit}"
        )


@dataclass
class Plan:
    applies: list[Apply] = field(default_factory=list)
    unchanged: list[Manifest] = field(default_factory=list)
    prunes: list[ObjectRef] = field(default_factory=list)
    forgotten: list[ObjectRef] = field(default_factory=list)  # left inventory, nothing to delete
    conflicts: list[Conflict] = field(default_factory=list)
    hold: Hold | None = None
    inventory: list[ObjectRef] = field(default_factory=list)  # once the plan is carried out

    @property
    def changes(self) -> bool:
        return bool(self.applies or self.prunes or self.forgotten)


def with_provenance(m: Manifest, *, owner: str, source: str, commit: str) -> dict[str, Any]:
    """The object as applied: Git's fields + ownership label + provenance annotations."""
    body = copy.deepcopy(m.body)
    meta = body.setdefault("metadata", {})
    meta.setdefault("labels", {})[OWNER_LABEL] = owner
    meta.setdefault("annotations", {}).update({
        SOURCE_ANNOTATION: source,
        COMMIT_ANNOTATION: commit,
        PATH_ANNOTATION: m.where.file,
        DIGEST_ANNOTATION: m.digest,
    })
    return body


def is_subset(want: Any, have: Any) -> bool:
    """Whether every field Git sets has Git's value live (extra live fields are fine:
    defaults and fields other managers own are not drift)."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return False
        for k, v in want.items():
            if v is None:
                if have.get(k) is not None:
                    return False
            elif k not in have or not is_subset(v, have[k]):
                return False
        return True
    if isinstance(want, list):
        return (isinstance(have, list) and len(want) == len(have)
                and all(is_subset(a, b) for a, b in zip(want, have, strict=True)))
    if isinstance(want, bool) or isinstance(have, bool):
        return want is have
    return bool(want == have)


def confirms(annotation: str | None, commit: str) -> bool:
    """The confirm-deletion annotation names this commit (full SHA or a 7+ digit prefix)."""
    if not annotation:
        return False
    value = annotation.strip().lower()
    return value == commit or (len(value) >= 7 and commit.startswith(value))


def _owner_of(body: Mapping[str, Any]) -> str | None:
    labels = (body.get("metadata") or {}).get("labels") or {}
    value = labels.get(OWNER_LABEL)
    return str(value) if value is not None else None


def may_adopt(body: Mapping[str, Any], source: str) -> bool:
    """Whether the live object's own annotation hands it to GitSource ``source``: "true" for an
    object no GitSource owns, or the GitSource's "<namespace>/<name>" (needed to take it from
    another GitSource, so two sources never hand it back and forth)."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    value = str(annotations.get(ADOPT_ANNOTATION) or "").strip()
    if value == source:
        return True
    return value.lower() == "true" and _owner_of(body) is None


def make_plan(
    desired: Iterable[Manifest],
    inventory: Iterable[ObjectRef],
    live: Mapping[ObjectRef, Mapping[str, Any]],
    *,
    owner: str,
    source: str,
    commit: str,
    prune: bool = True,
    max_deletion_ratio: float = 0.5,
    confirmed: str | None = None,
) -> Plan:
    """Diff Git (``desired``) against what we applied before (``inventory``) and what is in
    the cluster now (``live``: every object of these kinds, whoever made it).

    ``live`` must be complete for every kind in ``desired`` and ``inventory``: an object
    missing from it is taken as gone (never deleted, just dropped from the inventory), and
    an object in it that is not ours (no label, and not in the inventory; or another
    GitSource's label) is a conflict unless it is annotated for adoption.
    """
    plan = Plan()
    desired = list(desired)
    inventory = list(dict.fromkeys(inventory))
    known = set(inventory)
    wanted = {m.ref for m in desired}
    for m in desired:
        have = live.get(m.ref)
        if have is None:
            body = with_provenance(m, owner=owner, source=source, commit=commit)
            plan.applies.append(Apply(m, body, Reason.CREATE))
            continue
        other = _owner_of(have)
        # Ours: our label, or no label on an object we applied before (removed by hand).
        if other != owner and not (other is None and m.ref in known):
            if may_adopt(have, source):
                body = with_provenance(m, owner=owner, source=source, commit=commit)
                plan.applies.append(Apply(m, body, Reason.ADOPT))
            else:
                plan.conflicts.append(Conflict(m, None if other is None else _source_name(have, other),
                                               source))
            continue
        annotations = (have.get("metadata") or {}).get("annotations") or {}
        same_git = annotations.get(DIGEST_ANNOTATION) == m.digest
        # Provenance says which commit last changed the object, not which one was fetched last:
        # an unchanged object keeps its annotation, so a new commit does not rewrite the fleet.
        stamp = annotations.get(COMMIT_ANNOTATION) if same_git else None
        body = with_provenance(m, owner=owner, source=source, commit=stamp or commit)
        if same_git and is_subset(body, have):
            plan.unchanged.append(m)
        else:
            plan.applies.append(Apply(m, body, Reason.DRIFT if same_git else Reason.UPDATE))
    for ref in inventory:
        if ref in wanted:
            continue
        have = live.get(ref)
        if have is None or _owner_of(have) != owner or not prune:
            plan.forgotten.append(ref)  # gone, adopted by someone else, or pruning is off
        else:
            plan.prunes.append(ref)
    plan.prunes.sort(key=lambda r: r.sort_key(), reverse=True)
    if plan.prunes and inventory:
        ratio = len(plan.prunes) / len(inventory)
        if ratio > max_deletion_ratio and not confirms(confirmed, commit):
            plan.hold = Hold(commit, list(plan.prunes), len(inventory), max_deletion_ratio)
    # What is not ours never enters the inventory, so no later commit can prune it.
    plan.inventory = sorted(wanted - {c.manifest.ref for c in plan.conflicts}, key=lambda r: r.sort_key())
    return plan


def _source_name(body: Mapping[str, Any], fallback: str) -> str:
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(SOURCE_ANNOTATION) or fallback)
