"""Render the desired set from a Nix flake: its ``hyperfleet`` output, evaluated by ``nix
eval`` in a sandbox, then validated like YAML manifests (``render.py``).

Whoever can push to the repository controls the flake's code, so it is evaluated confined
to its directory, offline, with no builds and a scrubbed environment (``nix_command``,
``nix_env``), and a flake.lock naming inputs is refused before nix sees it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .render import RenderResult, render_objects
from .types import RenderError, SourceLocation

NIX_ATTRIBUTE = "hyperfleet"


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
