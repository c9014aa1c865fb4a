"""Render and validate the desired set: YAML manifests under ``path``, or a Nix flake.

Everything here is checked before anything is applied, and every problem names the file
(and the line for YAML, the document index for multi-document files) and the fix: one bad
document blocks the whole commit, so the cluster keeps the last good state.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
NIX_ATTRIBUTE = "hyperfleet"
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


class NixUnavailable(Exception):
    """The repository asks for Nix rendering but ``nix`` is not on PATH."""


def nix_objects(raw: Any, label: str) -> tuple[list[tuple[SourceLocation, Any]], list[RenderError]]:
    """Accept a list of objects, or an attribute set of them (taken in key order)."""
    if isinstance(raw, list):
        return [(SourceLocation(label, i), o) for i, o in enumerate(raw)], []
    if isinstance(raw, dict):
        return [(SourceLocation(f"{label}.{k}"), raw[k]) for k in sorted(raw)], []
    return [], [RenderError(SourceLocation(label), f"must evaluate to a list (or attribute set) "
                                                   f"of objects, got {type(raw).__name__}")]


#: Evaluates the flake the way ``nix eval <dir>#hyperfleet`` would, minus the flake machinery:
#: with the ``flakes`` feature off, ``builtins.fetchTree`` and ``builtins.getFlake`` do not
#: exist (in Nix 2.8 they copy any local path into the store even under restrict-eval).
_NIX_WRAPPER = """
let
  dir = /. + @DIR@;
  flake = import (dir + "/flake.nix");
  declared = builtins.filter (n: n != "self") (builtins.attrNames (flake.inputs or { }));
  outputs = flake.outputs { inherit self; };
  self = outputs // { outPath = dir; inputs = { }; inherit outputs; _type = "flake"; };
in
  if !(builtins.isAttrs flake && flake ? outputs) then
    throw "flake.nix must be an attribute set with `outputs = { self }: { ... }`"
  else if declared != [ ] then
    throw ("flake.nix declares inputs (" + builtins.concatStringsSep ", " declared
      + "): the GitSource evaluates the flake offline and fetches no inputs; vendor them "
      + "into spec.path and import them with a relative path (import ./lib { })")
  else if !(outputs ? hyperfleet) then
    throw "the flake has no `hyperfleet` output: add `hyperfleet = [ ... ];` to outputs"
  else outputs.hyperfleet
"""

#: Environment variables nix may see: where its store is, nothing of the controller's.
_NIX_ENV_KEEP = ("PATH", "NIX_REMOTE", "NIX_STORE_DIR", "NIX_STATE_DIR", "NIX_LOG_DIR",
                 "NIX_CONF_DIR", "NIX_DATA_DIR", "LANG", "LC_ALL", "TZ")
_URL_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")


def nix_string(value: str) -> str:
    """``value`` as a Nix string literal (nothing in it is interpolated)."""
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
               .replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def nix_command(nix: str, flake_dir: Path) -> list[str]:
    """``nix eval`` confined to ``flake_dir``: restrict-eval with it as the only allowed path
    (no absolute paths, no <nixpkgs>, no URLs: allowed-uris is empty), no
    import-from-derivation (no builds, so no programs run), no builtins.exec, no flake
    inputs. pure-eval stays off only because Nix 2.8 then refuses the -I path itself;
    restrict-eval already blocks getEnv and every read outside it."""
    expr = _NIX_WRAPPER.replace("@DIR@", nix_string(str(flake_dir)))
    options = {
        "experimental-features": "nix-command",
        "restrict-eval": "true",
        "pure-eval": "false",
        "allowed-uris": "",
        "nix-path": "",
        "allow-import-from-derivation": "false",
        "allow-unsafe-native-code-during-evaluation": "false",
        "accept-flake-config": "false",
        "substituters": "",
        "builders": "",
        "max-jobs": "0",
    }
    cmd = [nix]
    for name, value in options.items():
        cmd += ["--option", name, value]
    # --read-only: nothing is written to the (world-readable) store, not even a .drv or a
    # copy of the checkout for "${self}".
    return [*cmd, "eval", "--read-only", "--json", "-I", str(flake_dir), "--expr", expr]


def nix_env(home: Path) -> dict[str, str]:
    """A scrubbed environment: no Kubernetes service-account or API variables, no proxy or
    cloud credentials, and a private empty HOME (no user nix.conf, registry or git config)."""
    env = {k: v for k in _NIX_ENV_KEEP if (v := os.environ.get(k)) is not None}
    env.setdefault("PATH", "/usr/bin:/bin")
    env.update({
        "HOME": str(home),
        "TMPDIR": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_STATE_HOME": str(home / ".local/state"),
        "NIX_CONFIG": "",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ALLOW_PROTOCOL": "none",  # builtins.fetchGit cannot reach anything
    })
    return env


def _lock_source(node: Mapping[str, Any]) -> tuple[str, bool]:
    """How a flake.lock node names its source, and whether that is on the local host."""
    local = False
    described = ""
    for part in ("locked", "original"):
        src = node.get(part)
        if not isinstance(src, dict):
            continue
        kind = str(src.get("type") or "")
        url = str(src.get("url") or src.get("path") or "")
        if kind == "path" or (kind in ("git", "hg", "mercurial", "tarball", "file")
                              and url.startswith(("file:", "/"))):
            local = True
        if not described:
            where = f"{src.get('owner')}/{src.get('repo')}" if src.get("owner") else url
            described = _URL_USERINFO.sub(r"\1***@", f"{kind}:{where}" if kind else where)
    return described or "unknown source", local


def _nix_hint(stderr: str) -> str:
    """What a confinement error means for the author of the flake."""
    if "feature 'flakes' is disabled" in stderr:
        return (" (builtins.fetchTree and builtins.getFlake are not available: the flake may read "
                "only the files under spec.path)")
    if "forbidden in restricted mode" in stderr:
        return " (the flake may read only the files under spec.path; use relative paths)"
    if ".drv' is not valid" in stderr or "allow-import-from-derivation" in stderr:
        return (" (the flake reads the output of a derivation: nothing is built during a "
                "GitSource's evaluation; compute the objects in plain Nix)")
    return ""


def check_flake_lock(flake_dir: Path, rel_dir: str) -> list[RenderError]:
    """Refuse a flake.lock with inputs before nix sees it: the reconciler fetches none, and
    a local one (path:, git+file:, file://) would read the controller's own files."""
    lock = flake_dir / "flake.lock"
    if not lock.is_file():
        return []
    label = f"{rel_dir}/flake.lock".removeprefix("./")
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
        nodes = data["nodes"]
        root = data.get("root", "root")
        if not isinstance(nodes, dict):
            raise TypeError("nodes is not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return [RenderError(SourceLocation(label), f"not a valid flake.lock ({exc}): delete it (the "
                                                   "flake must have no inputs)")]
    errors = []
    for name in sorted(n for n in nodes if n != root):
        node = nodes[name] if isinstance(nodes[name], dict) else {}
        source, local = _lock_source(node)
        if local:
            why = ("is a local path on the reconciler's host, which a GitSource may not read; "
                   "copy the files into spec.path and import them with a relative path")
        else:
            why = ("would have to be fetched, but the GitSource evaluates the flake offline; "
                   "vendor it into spec.path and import it with a relative path")
        errors.append(RenderError(SourceLocation(label), f"input {name!r} ({source}) {why}, then "
                                                         "remove it from flake.nix and flake.lock"))
    return errors


def render_nix(
    flake_dir: Path,
    rel_dir: str,
    default_namespace: str,
    target_namespace: str | None = None,
    timeout: float = 60.0,
    nix: str | None = None,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
    home_namespace: str | None = None,
) -> RenderResult:
    """The flake's ``hyperfleet`` output -> validated manifests (``nix``: its path, None when
    it is not installed). Whoever can push to the repository controls this code, so it is
    evaluated confined to ``flake_dir`` (see ``nix_command``) with a scrubbed environment."""
    if not nix:
        raise NixUnavailable(
            f"{rel_dir}/flake.nix selects the Nix renderer but `nix` is not on the reconciler's "
            "PATH: install Nix there, or set spec.renderer: Yaml to use the YAML files"
        )
    label = f"{rel_dir}/flake.nix#{NIX_ATTRIBUTE}".removeprefix("./")
    lock_errors = check_flake_lock(flake_dir, rel_dir)
    if lock_errors:
        return RenderResult(errors=lock_errors)
    flake_dir = flake_dir.resolve()
    with tempfile.TemporaryDirectory(prefix="hf-nix-home-") as home:
        os.chmod(home, 0o700)
        try:
            r = run(nix_command(nix, flake_dir), capture_output=True, text=True,
                    timeout=timeout, env=nix_env(Path(home)), check=False)
        except subprocess.TimeoutExpired:
            return RenderResult(errors=[RenderError(SourceLocation(label), f"nix eval did not finish "
                                                    f"within {timeout:g}s; raise spec.timeout")])
    if r.returncode != 0:
        lines = [ln for ln in r.stderr.strip().splitlines() if "--show-trace" not in ln]
        tail = "\n".join(lines[-8:]).replace(str(flake_dir), rel_dir.removeprefix("./") or ".")
        return RenderResult(errors=[RenderError(SourceLocation(label),
                                                f"nix eval failed: {tail}{_nix_hint(tail)}")])
    try:
        raw = json.loads(r.stdout)
    except json.JSONDecodeError as exc:
        return RenderResult(errors=[RenderError(SourceLocation(label), f"nix eval printed no JSON: {exc}")])
    objects, errors = nix_objects(raw, label)
    out = render_objects(objects, default_namespace, target_namespace, home_namespace)
    out.errors = errors + out.errors
    return out
