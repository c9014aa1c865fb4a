"""Shared helpers for the Helm chart tests: rendering with the real Helm (Go) engine, the CRDs
the chart must ship, and a small RBAC evaluator.

``python -m tests.chartutil sync-crds`` copies the generated CRDs into the chart.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hyperfleet.reconcilers import crdgen, kinds

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "hyperfleet"
CRDS = REPO / "crds"
RELEASE = "hyperfleet"
NAMESPACE = "hyperfleet"
#: CRDs the chart ships beyond the Hyperfleet kinds: kopf's peering (controller replicas).
KOPF_PEERING_CRDS = ("clusterkopfpeerings.kopf.dev.yaml", "kopfpeerings.kopf.dev.yaml")


def code_kinds() -> list[crdgen.CrdKind]:
    """Every Hyperfleet kind defined in code: kinds.ALL_KINDS plus kinds still being wired in
    (the GitSource kind lives in reconcilers/gitops/crd.py until it joins ALL_KINDS)."""
    out = list(kinds.ALL_KINDS)
    try:
        from hyperfleet.reconcilers.gitops.crd import GIT_SOURCE
    except ImportError:  # pragma: no cover - the GitOps package is optional here
        return out
    if all(k.plural != GIT_SOURCE.plural for k in out):
        out.append(GIT_SOURCE)
    return out


def expected_hyperfleet_crds() -> dict[str, str]:
    """file name -> text of every Hyperfleet CRD the chart must ship: the committed file in
    crds/ where there is one (byte for byte), else what the generator renders from the code."""
    out = {p.name: p.read_text() for p in sorted(CRDS.glob("*.yaml"))}
    for k in code_kinds():
        out.setdefault(f"{k.plural}.hyperfleet.dev.yaml", crdgen.render(k))
    return out


def sync_crds() -> list[Path]:
    """Write the chart's copies of the Hyperfleet CRDs; drop stale ones (kopf's stay)."""
    want = expected_hyperfleet_crds()
    target = CHART / "crds"
    written = []
    for p in target.glob("*.hyperfleet.dev.yaml"):
        if p.name not in want:
            p.unlink()
    for name, text in want.items():
        p = target / name
        if not p.exists() or p.read_text() != text:
            p.write_text(text)
            written.append(p)
    return written


# ---------------------------------------------------------------------------- rendering


def render(values: Mapping[str, Any] | None = None, *, release: str = RELEASE,
           namespace: str = NAMESPACE) -> dict[str, list[dict[str, Any]]]:
    """Template path -> the objects it renders (empty documents dropped), with Helm itself."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(dict(values or {}), name=release, namespace=namespace, is_install=True)
    docs: dict[str, list[dict[str, Any]]] = {}
    for path, text in sorted(out.items()):
        if path.endswith(".txt"):
            continue
        docs[path] = [d for d in yaml.safe_load_all(text) if d]
    return docs


def notes(values: Mapping[str, Any] | None = None) -> str:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(dict(values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in out.items() if path.endswith("NOTES.txt"))


def objects(values: Mapping[str, Any] | None = None, **kw: Any) -> list[dict[str, Any]]:
    return [d for docs in render(values, **kw).values() for d in docs]


def chart_crd_files() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((CHART / "crds").glob("*.yaml"))}


def one(objs: Iterable[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    names = [o["metadata"]["name"] for o in found]
    assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {names}"
    return found[0]


# ---------------------------------------------------------------------------- RBAC


@dataclass(frozen=True, order=True)
class Grant:
    """One (apiGroup, resource[/subresource], verb) a subject may use, cluster-wide
    (``namespace`` None) or in one namespace (through a Role)."""

    api_group: str
    resource: str
    verb: str
    namespace: str | None = None

    def __str__(self) -> str:
        where = f" in namespace {self.namespace}" if self.namespace else ""
        group = self.api_group or "core"
        return f"{self.verb} {group}/{self.resource}{where}"


def _expand(rule: Mapping[str, Any], namespace: str | None) -> Iterator[Grant]:
    assert not rule.get("resourceNames"), "resourceNames are not modelled by these tests"
    for group in rule.get("apiGroups") or []:
        for res in rule.get("resources") or []:
            for verb in rule.get("verbs") or []:
                yield Grant(group, res, verb, namespace)


def grants_by_subject(objs: Iterable[dict[str, Any]]) -> dict[str, set[Grant]]:
    """``system:serviceaccount:<ns>:<name>`` -> what the chart's bindings grant it."""
    objs = list(objs)
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objs if o["kind"] in ("ClusterRole", "Role")}
    out: dict[str, set[Grant]] = {}
    for b in objs:
        if b["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
            continue
        ref = b["roleRef"]
        scope = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        role_ns = scope if ref["kind"] == "Role" else None
        role = roles[(ref["kind"], role_ns, ref["name"])]
        for s in b["subjects"]:
            assert s["kind"] == "ServiceAccount", s
            user = f"system:serviceaccount:{s['namespace']}:{s['name']}"
            for rule in role.get("rules") or []:
                out.setdefault(user, set()).update(_expand(rule, scope))
    return out


def allowed(grants: Iterable[Grant], api_group: str, resource: str, verb: str,
            namespace: str | None) -> list[Grant]:
    """The grants that authorise one request (a Role only inside its namespace)."""
    return [g for g in grants
            if g.api_group == api_group and g.resource == resource and g.verb == verb
            and (g.namespace is None or g.namespace == namespace)]


def service_account_of(objs: Iterable[dict[str, Any]], kind: str) -> str:
    """The username of the ServiceAccount the chart's Deployment/DaemonSet runs as."""
    w = one(objs, kind)
    sa = w["spec"]["template"]["spec"]["serviceAccountName"]
    return f"system:serviceaccount:{w['metadata']['namespace']}:{sa}"


def main(argv: list[str]) -> int:
    if argv[1:] == ["sync-crds"]:
        for p in sync_crds():
            print(p.relative_to(REPO))
        return 0
    print("usage: python -m tests.chartutil sync-crds", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
