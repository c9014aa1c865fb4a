"""The CRDs in crds/ are generated from the models and must stay in sync."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from hyperfleet.reconcilers import crdgen, kinds

CRDS = Path(__file__).resolve().parents[2] / "crds"


@pytest.mark.parametrize("kind", kinds.ALL_KINDS, ids=lambda k: k.kind)
def test_crd_file_matches_models(kind: crdgen.CrdKind) -> None:
    path = CRDS / f"{kind.plural}.hyperfleet.dev.yaml"
    assert path.exists(), f"{path} missing: run `hyperfleet crds`"
    assert path.read_text() == crdgen.render(kind), "crds/ is stale: run `hyperfleet crds`"


def _walk(node: Any, path: str = "") -> list[str]:
    """Paths of schema nodes that break Kubernetes' structural-schema rules."""
    bad: list[str] = []
    if isinstance(node, dict):
        if "$ref" in node or "anyOf" in node or "allOf" in node:
            bad.append(path)
        if "properties" in node and node.get("type") != "object":
            bad.append(f"{path} (properties without type: object)")
        if "additionalProperties" in node and "properties" in node:
            bad.append(f"{path} (additionalProperties with properties)")
        for key in ("properties",):
            for name, child in (node.get(key) or {}).items():
                bad += _walk(child, f"{path}.{name}")
        if "items" in node:
            bad += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            bad += _walk(node["additionalProperties"], f"{path}{{}}")
        if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields") \
                and not node.get("x-kubernetes-int-or-string"):
            bad.append(f"{path} (no type)")
    return bad


@pytest.mark.parametrize("kind", kinds.ALL_KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind: crdgen.CrdKind) -> None:
    crd = yaml.safe_load(crdgen.render(kind))
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["status"] == {}
    assert set(version["subresources"]) <= {"status", "scale"}
    assert _walk(version["schema"]["openAPIV3Schema"]) == []


def test_names_and_columns() -> None:
    vm = yaml.safe_load(crdgen.render(kinds.VIRTUAL_MACHINE))
    assert vm["spec"]["names"]["shortNames"] == ["hvm"]
    cols = [c["name"] for c in vm["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert cols[:3] == ["Phase", "Node", "Ready"] and cols[-1] == "Age"
    ready = vm["spec"]["versions"][0]["additionalPrinterColumns"][2]
    assert ready["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    wn = yaml.safe_load(crdgen.render(kinds.WORKER_NODE))
    wn_cols = {c["name"]: c for c in wn["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert wn_cols["Scheduling"]["jsonPath"] == ".status.scheduling"
    assert "Cordoned" not in wn_cols and "Draining" not in wn_cols  # one column says both
    assert wn["spec"]["scope"] == "Cluster"
    assert wn["spec"]["names"]["shortNames"] == ["wn"]


def test_optional_collapses_and_enums_are_typed() -> None:
    spec = crdgen.structural_schema(kinds.VIRTUAL_MACHINE.spec_model)
    assert spec["properties"]["maxCpus"]["type"] == "integer"
    rs = spec["properties"]["runStrategy"]
    assert rs["type"] == "string" and rs["enum"] == ["Always", "Halted", "Manual"]
    assert rs["default"] == "Always"
    assert spec["properties"]["cpus"]["minimum"] == 1


def test_pool_has_a_scale_subresource_and_replica_columns() -> None:
    crd = yaml.safe_load(crdgen.render(kinds.VIRTUAL_MACHINE_POOL))
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}
    cols = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert cols == ["Desired", "Ready", "Updated", "Available", "Age"]
    assert crd["spec"]["names"]["shortNames"] == ["hvmpool", "vmpool"]
    surge = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "strategy"]["properties"]["rollingUpdate"]["properties"]["maxSurge"]
    assert surge["x-kubernetes-int-or-string"] is True and "anyOf" not in surge
