"""Kind identity is declared once, in reconcilers/conventions.py: no other module spells a
plural, and every place that needs one (CRDs, API resources, gitops kinds) agrees with it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from hyperfleet.reconcilers import conventions as conv
from hyperfleet.reconcilers import kinds, kube
from hyperfleet.reconcilers.gitops.types import KINDS

REPO = Path(__file__).resolve().parents[2]
PLURALS = re.compile(r"""(["'])(virtualmachines|workernodes|vmjobs|gitsources|virtualmachinepools)\1""")
#: A line that must spell a plural (e.g. a typing.Literal) says so with this comment.
PRAGMA = "# conventions: ok"


def test_no_plural_literals_outside_conventions() -> None:
    found = []
    for top in ("operator", "reconcilers"):
        for path in sorted((REPO / top).rglob("*.py")):
            if path == REPO / "reconcilers" / "conventions.py":
                continue
            for no, line in enumerate(path.read_text().splitlines(), 1):
                if PLURALS.search(line) and PRAGMA not in line:
                    found.append(f"{path.relative_to(REPO)}:{no}: {line.strip()}")
    assert not found, "use reconcilers/conventions.py instead of:\n" + "\n".join(found)


def test_conventions_imports_nothing_from_hyperfleet() -> None:
    """The bottom layer: anything may read it, so it may read nothing of ours."""
    tree = ast.parse((REPO / "reconcilers" / "conventions.py").read_text())
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert all(m in ("__future__", "dataclasses", "typing") for m in modules), modules


def test_every_declaration_reads_conventions() -> None:
    assert [k.identity for k in kinds.ALL_KINDS] == list(conv.ALL_KINDS)
    for crd in kinds.ALL_KINDS:
        assert (crd.kind, crd.plural, crd.scope) == (
            crd.identity.kind, crd.identity.plural, crd.identity.scope)
    assert kube.Resource("virtualmachines", True) == kube.VMS  # conventions: ok
    assert kube.Resource("workernodes", False) == kube.NODES  # conventions: ok
    assert kube.Resource.of(conv.VM_JOB) == kube.JOBS
    for name, info in KINDS.items():
        ident = conv.BY_KIND[name]
        assert (info.kind, info.plural, info.namespaced) == (
            ident.kind, ident.plural, ident.namespaced)
