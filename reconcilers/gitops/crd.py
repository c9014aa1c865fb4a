"""The GitSource CRD kind (printer columns included), ready for ``reconcilers/kinds.py``."""

from __future__ import annotations

from hyperfleet.reconcilers import conventions as conv
from hyperfleet.reconcilers.crdgen import CrdKind
from hyperfleet.reconcilers.models.gitsource import GitSourceSpec, GitSourceStatus

GIT_SOURCE = CrdKind(
    conv.GIT_SOURCE,
    spec_model=GitSourceSpec,
    status_model=GitSourceStatus,
    columns=[
        {"name": "URL", "type": "string", "jsonPath": ".spec.url"},
        {"name": "Commit", "type": "string", "jsonPath": ".status.lastAppliedCommit"},
        {"name": "Ready", "type": "string", "jsonPath": conv.condition_path(conv.CONDITION_READY)},
        {"name": "Status", "type": "string",
         "jsonPath": conv.condition_path(conv.CONDITION_READY, "message"), "priority": 1},
        {"name": "Suspended", "type": "boolean", "jsonPath": ".spec.suspend"},
    ],
)
