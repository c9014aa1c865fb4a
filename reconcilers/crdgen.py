"""CustomResourceDefinitions generated from the pydantic models (the one source of truth).

Pydantic emits JSON Schema with ``$ref``/``anyOf`` for optionals; Kubernetes wants a
*structural* OpenAPI v3 schema (every node typed, no refs). This module rewrites one
into the other so that ``kubectl apply`` rejects bad input with the field's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .conventions import GROUP, VERSION, KindId

_DROP_KEYS = {"title", "examples"}


@dataclass(frozen=True)
class CrdKind:
    """What a CRD needs beyond the kind's identity (which comes from conventions.py)."""

    identity: KindId
    spec_model: type[BaseModel]
    status_model: type[BaseModel]
    columns: list[dict[str, Any]] = field(default_factory=list)
    categories: list[str] = field(default_factory=lambda: ["hyperfleet"])
    spec_preserve_unknown: bool = False
    #: JSON paths usable in field selectors, so agents watch only their own objects.
    selectable_fields: list[str] = field(default_factory=list)
    #: The scale subresource (specReplicasPath, statusReplicasPath, labelSelectorPath),
    #: so `kubectl scale` and autoscalers can resize the kind.
    scale: dict[str, str] | None = None

    @property
    def kind(self) -> str:
        return self.identity.kind

    @property
    def plural(self) -> str:
        return self.identity.plural

    @property
    def singular(self) -> str:
        return self.identity.singular

    @property
    def short_names(self) -> list[str]:
        return list(self.identity.short_names)

    @property
    def scope(self) -> str:
        return self.identity.scope


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    """Inline refs, collapse Optional[X] to X, drop keys Kubernetes rejects."""
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(branches) == 1:
            merged = {**_resolve(branches[0], defs), **_resolve(rest, defs)}
            if merged.get("default", 0) is None:
                merged.pop("default")
            return merged
        raise ValueError(f"cannot express anyOf with several types in a CRD: {node}")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS or key == "$defs":
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            # JSON Schema's numeric form; OpenAPI v3.0 (CRDs) wants the boolean form.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {k: _resolve(v, defs) for k, v in value.items()}
        else:
            out[key] = _resolve(value, defs)
    if out.get("default", 0) is None:
        out.pop("default")
    if out.get("additionalProperties") is False:
        out.pop("additionalProperties")  # structural schemas forbid it; pruning does the job
    if out.get("additionalProperties") is True:
        out.pop("additionalProperties")
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="serialization")
    schema: dict[str, Any] = _resolve(raw, raw.get("$defs", {}))
    if model.model_config.get("extra") == "allow":
        schema["x-kubernetes-preserve-unknown-fields"] = True
    return schema


def build_crd(k: CrdKind) -> dict[str, Any]:
    spec_schema = structural_schema(k.spec_model)
    if k.spec_preserve_unknown:
        spec_schema["x-kubernetes-preserve-unknown-fields"] = True
    status_schema = structural_schema(k.status_model)
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    columns = [*k.columns, {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{k.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "hyperfleet"},
        },
        "spec": {
            "group": GROUP,
            "scope": k.scope,
            "names": {
                "kind": k.kind,
                "listKind": f"{k.kind}List",
                "plural": k.plural,
                "singular": k.singular,
                "shortNames": k.short_names,
                "categories": k.categories,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}, **({"scale": k.scale} if k.scale else {})},
                    "additionalPrinterColumns": columns,
                    **({"selectableFields": [{"jsonPath": p} for p in k.selectable_fields]}
                       if k.selectable_fields else {}),
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render(k: CrdKind) -> str:
    header = "# Generated from the pydantic models by `hyperfleet crds`; do not edit.\n"
    return header + yaml.safe_dump(build_crd(k), sort_keys=False, width=100)


def write_all(kinds: list[CrdKind], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in kinds:
        path = out_dir / f"{k.plural}.{GROUP}.yaml"
        path.write_text(render(k))
        paths.append(path)
    return paths
