"""Render and validate the desired set: YAML manifests under ``path``, and the check every
object goes through whichever renderer produced it (a Nix flake's: ``nix.py``).

Everything here is checked before anything is applied, and every problem names the file
(and the line for YAML, the document index for multi-document files) and the fix: one bad
document blocks the whole commit, so the cluster keeps the last good state.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hyperfleet.reconcilers.jobs.parse import JobValidationError, parse_job
from hyperfleet.reconcilers.models.common import API_VERSION
from hyperfleet.reconcilers.models.node import WorkerNodeSpec
from hyperfleet.reconcilers.models.pool import VirtualMachinePoolSpec
from hyperfleet.reconcilers.models.vm import VirtualMachineSpec

from .types import KINDS, Manifest, ObjectRef, RenderError, SourceLocation

YAML_SUFFIXES = (".yaml", ".yml")
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NS_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_METADATA_KEYS = {"name", "namespace", "labels", "annotations"}
_TOP_KEYS = {"apiVersion", "kind", "metadata", "spec", "status"}
_SPEC_MODELS: dict[str, type[BaseModel]] = {
    "VirtualMachine": VirtualMachineSpec,
    "WorkerNode": WorkerNodeSpec,
    "VirtualMachinePool": VirtualMachinePoolSpec,
}
_SPEC_REQUIRED = {"VirtualMachine", "VmJob", "VirtualMachinePool"}


@dataclass
class RenderResult:
    manifests: list[Manifest] = field(default_factory=list)
    errors: list[RenderError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# libyaml's parser is ~10x faster than the pure-Python one: it matters for 1,000-file fleets.
_SafeBase = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


class _Loader(_SafeBase):  # type: ignore[valid-type,misc]
    """Safe YAML without timestamps (the API wants strings) and with duplicate keys refused,
    as kubectl does, instead of silently keeping the last one."""


_Loader.yaml_implicit_resolvers = {
    ch: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1}); keep only one",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    mapping: dict[Any, Any] = loader.construct_mapping(node, deep=deep)
    return mapping


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def is_manifest_file(rel: str) -> bool:
    """YAML files, skipping hidden files and directories (.github workflows are not fleet)."""
    return rel.endswith(YAML_SUFFIXES) and not any(p.startswith(".") for p in rel.split("/"))


_YAML = "tag:yaml.org,2002:"
_JSON_SCALARS = {f"{_YAML}{t}" for t in ("str", "int", "float", "bool", "null", "merge")}
_NOT_FINITE = {".nan", ".inf", "+.inf", "-.inf"}
#: Values one document may expand to through aliases before it is refused ("billion laughs").
MAX_DOCUMENT_VALUES = 100_000
_TAG_FIX = {
    "set": "write a list",
    "omap": "write a mapping",
    "pairs": "write a mapping or a list",
    "binary": "write the base64 text as a plain string",
    "timestamp": "quote the date so it stays a string",
}


def _json_problem(node: yaml.Node) -> tuple[int, str] | None:
    """(line, message) of the first value a Kubernetes object (JSON) cannot hold: YAML tags
    such as !!set or !!binary, .nan / .inf, or aliases expanding without bound."""
    budget = MAX_DOCUMENT_VALUES
    stack = [node]
    while stack:
        n = stack.pop()
        budget -= 1
        if budget < 0:
            return (node.start_mark.line + 1, f"the document expands to more than "
                    f"{MAX_DOCUMENT_VALUES} values through aliases (*name); write it out plainly")
        tag = str(n.tag)
        if isinstance(n, yaml.ScalarNode):
            ok = tag in _JSON_SCALARS
            if ok and tag == f"{_YAML}float" and str(n.value).lower() in _NOT_FINITE:
                return (n.start_mark.line + 1, f"{n.value} is not a JSON number; quote it if a "
                        "string is meant")
        elif isinstance(n, yaml.SequenceNode):
            ok = tag == f"{_YAML}seq"
            stack.extend(reversed(n.value))
        else:
            ok = tag == f"{_YAML}map"
            for key, value in reversed(n.value):
                stack += [value, key]
        if not ok:
            short = tag.removeprefix(_YAML)
            fix = _TAG_FIX.get(short, "remove the tag")
            shown = f"!!{short}" if tag.startswith(_YAML) else tag
            return (n.start_mark.line + 1, f"YAML tag {shown} is not allowed: a Kubernetes object "
                    f"holds only strings, numbers, booleans, null, lists and mappings; {fix}")
    return None


def load_documents(text: str, file: str) -> tuple[list[tuple[int, int, Any]], RenderError | None]:
    """(index, line, data) of each non-empty document, or the YAML error with its line."""
    docs: list[tuple[int, int, Any]] = []
    loader = _Loader(text)
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                break
            line = node.start_mark.line + 1
            problem = _json_problem(node)
            if problem is not None:
                return docs, RenderError(SourceLocation(file, index, problem[0]), problem[1])
            data = loader.construct_document(node)
            if data is not None:
                docs.append((index, line, data))
            index += 1
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        msg = f"invalid YAML: {getattr(exc, 'problem', None) or exc}"
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context and cmark is not None:
            msg += f" ({context} started on line {cmark.line + 1})"
        return docs, RenderError(SourceLocation(file, index, line), msg)
    finally:
        loader.dispose()
    return docs, None


def _loc(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def pydantic_messages(exc: ValidationError, prefix: str) -> list[str]:
    """'spec.cpus: Input should be ...' lines, with a hint for unknown fields."""
    out = []
    for err in exc.errors():
        path = _loc((prefix, *err["loc"])) if err["loc"] else prefix
        if err["type"] == "extra_forbidden":
            out.append(f"{path}: unknown field; check the spelling against the CRD "
                       "(kubectl explain) or remove it")
        else:
            out.append(f"{path}: {err['msg']}")
    return out


def _validate_vmjob(spec: Any) -> list[str]:
    try:
        parse_job(spec)
    except JobValidationError as exc:
        return [f"spec.{p}: {m}" if p else f"spec: {m}" for p, m in exc.errors]
    return []


def _str_map(value: Any, path: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"{path} must be a mapping of strings"]
    return [
        f"{path}.{k}: value must be a string (quote it: \"{v}\")"
        for k, v in value.items()
        if not isinstance(k, str) or not isinstance(v, str)
    ]


def validate_object(
    data: Any, where: SourceLocation, default_namespace: str, target_namespace: str | None,
    home_namespace: str | None = None,
) -> tuple[Manifest | None, list[RenderError]]:
    """Check one document and normalise it into what will be applied (minus provenance).

    ``home_namespace``: when set (cross-namespace applies disabled), every object must land
    in that namespace and cluster-scoped kinds are refused."""

    def fail(*msgs: str) -> tuple[None, list[RenderError]]:
        return None, [RenderError(where, m) for m in msgs]

    if not isinstance(data, dict):
        return fail(f"a document must be a Kubernetes object (mapping), got {type(data).__name__}")
    kind, api_version = data.get("kind"), data.get("apiVersion")
    if kind not in KINDS:
        allowed = ", ".join(sorted(KINDS))
        return fail(
            f"kind {kind!r} (apiVersion {api_version!r}) is not a Hyperfleet kind; only "
            f"{allowed} are applied from Git: remove it or move it out of spec.path"
        )
    if api_version != API_VERSION:
        return fail(f"{kind}: apiVersion must be {API_VERSION!r}, got {api_version!r}")
    errors: list[str] = [
        f"unknown top-level field {k!r}; a {kind} has apiVersion, kind, metadata, spec"
        for k in data if k not in _TOP_KEYS
    ]
    meta = data.get("metadata")
    if not isinstance(meta, dict):
        return fail(f"{kind}: metadata is required (with metadata.name)", *errors)
    errors += [
        f"metadata.{k} is not allowed in Git (the API server owns it); remove it"
        for k in meta if k not in _METADATA_KEYS
    ]
    name = meta.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 253:
        errors.append(f"metadata.name {name!r} must be a lowercase DNS name, e.g. web-1")
    errors += _str_map(meta.get("labels"), "metadata.labels")
    errors += _str_map(meta.get("annotations"), "metadata.annotations")
    info = KINDS[kind]
    namespace = ""
    if info.namespaced:
        ns = target_namespace or meta.get("namespace") or default_namespace
        if not isinstance(ns, str) or not _NS_RE.match(ns) or len(ns) > 63:
            errors.append(f"metadata.namespace {ns!r} must be a lowercase DNS label")
        elif home_namespace is not None and ns != home_namespace:
            errors.append(f"metadata.namespace {ns!r} is not the GitSource's namespace "
                          f"{home_namespace!r}, and this reconciler applies only into a "
                          "GitSource's own namespace: remove metadata.namespace, or deploy it "
                          f"from a GitSource in {ns!r}")
        else:
            namespace = ns
    elif meta.get("namespace"):
        errors.append(f"{kind} is cluster-scoped: remove metadata.namespace")
    elif home_namespace is not None:
        errors.append(f"{kind} is cluster-scoped, and this reconciler applies only into a "
                      "GitSource's own namespace: manage it outside this GitSource")
    spec = data.get("spec")
    if spec is None and kind in _SPEC_REQUIRED:
        errors.append(f"spec is required for a {kind}")
    elif spec is not None and not isinstance(spec, dict):
        errors.append("spec must be a mapping")
    elif kind in _SPEC_MODELS:
        try:
            _SPEC_MODELS[kind].model_validate_json(json.dumps(spec or {}, allow_nan=False), strict=True)
        except ValidationError as exc:
            errors += pydantic_messages(exc, "spec")
        except (TypeError, ValueError) as exc:  # guarded by the loaders; never a traceback
            errors.append(f"spec cannot be written as JSON ({exc}); use only strings, numbers, "
                          "booleans, null, lists and mappings")
    elif kind == "VmJob":
        errors += _validate_vmjob(spec)
    if errors:
        return fail(*[f"{kind} {name}: {e}" for e in errors])
    out_meta: dict[str, Any] = {"name": name}
    if namespace:
        out_meta["namespace"] = namespace
    for key in ("labels", "annotations"):
        if meta.get(key):
            out_meta[key] = dict(meta[key])
    body: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind, "metadata": out_meta}
    if spec is not None:
        body["spec"] = spec
    return Manifest.build(body, where), []


def _check_duplicates(manifests: list[Manifest]) -> list[RenderError]:
    first: dict[ObjectRef, Manifest] = {}
    errors = []
    for m in manifests:
        if m.ref in first:
            errors.append(RenderError(
                m.where, f"{m.ref} is also defined in {first[m.ref].where}; keep one definition"
            ))
        else:
            first[m.ref] = m
    return errors


def render_objects(
    objects: Iterable[tuple[SourceLocation, Any]], default_namespace: str, target_namespace: str | None,
    home_namespace: str | None = None,
) -> RenderResult:
    out = RenderResult()
    for where, data in objects:
        manifest, errors = validate_object(data, where, default_namespace, target_namespace,
                                           home_namespace)
        out.errors += errors
        if manifest is not None:
            out.manifests.append(manifest)
    out.errors += _check_duplicates(out.manifests)
    out.manifests.sort(key=lambda m: m.ref.sort_key())
    return out


def render_yaml(
    files: Mapping[str, bytes], default_namespace: str, target_namespace: str | None = None,
    home_namespace: str | None = None,
) -> RenderResult:
    """Every document of every YAML file (sorted by path) -> validated manifests."""
    objects: list[tuple[SourceLocation, Any]] = []
    load_errors: list[RenderError] = []
    for rel in sorted(files):
        try:
            text = files[rel].decode("utf-8")
        except UnicodeDecodeError as exc:
            load_errors.append(RenderError(SourceLocation(rel), f"not UTF-8 text ({exc.reason})"))
            continue
        docs, err = load_documents(text, rel)
        if err is not None:
            load_errors.append(err)
        objects += [(SourceLocation(rel, index, line), data) for index, line, data in docs]
    out = render_objects(objects, default_namespace, target_namespace, home_namespace)
    out.errors = load_errors + out.errors
    return out
