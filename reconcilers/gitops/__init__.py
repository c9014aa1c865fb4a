"""GitOps: the cluster repository is the source of truth for the fleet.

Modules: ``fetch`` (git cache per GitSource), ``render`` (YAML -> validated manifests),
``nix`` (a Nix flake -> validated manifests, evaluated in a sandbox), ``plan`` (pure diff,
prune and deletion-hold rules), ``apply`` (server-side apply, guarded pruning), ``verify``
(commit signatures against trusted keys), ``health`` (pure verdict on the applied VMs),
``webhook`` (push authentication and matching), ``reconcile`` (one pass, status).
"""

from .plan import Plan, is_subset, make_plan
from .render import RenderResult, render_yaml
from .types import FIELD_MANAGER, OWNER_LABEL, Manifest, ObjectRef, RenderError, owner_value

__all__ = [
    "FIELD_MANAGER",
    "OWNER_LABEL",
    "Manifest",
    "ObjectRef",
    "Plan",
    "RenderError",
    "RenderResult",
    "is_subset",
    "make_plan",
    "owner_value",
    "render_yaml",
]
