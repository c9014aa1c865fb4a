"""Fetch a GitSource's revision into a per-GitSource bare cache, and read files out of it.

Secrets never reach the command line, the URL, logs or status: an HTTPS token is handed to
git through GIT_ASKPASS reading an environment variable of the git process only, and an SSH
key lives in a 0600 file of a private temporary directory for the duration of one fetch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import git

from hyperfleet.reconcilers.models.gitsource import GitRef

from .render import is_manifest_file
from .types import GitOpsError

log = logging.getLogger("hyperfleet.gitops.fetch")

TARGET_REF = "refs/hyperfleet/target"
_ALL_REFS = ("+refs/heads/*:refs/hyperfleet/heads/*", "+refs/tags/*:refs/hyperfleet/tags/*")
_ASKPASS = """#!/bin/sh
case "$1" in
  Username*|username*) printf '%s\\n' "$HYPERFLEET_GIT_USERNAME" ;;
  *) printf '%s\\n' "$HYPERFLEET_GIT_PASSWORD" ;;
esac
"""
_URL_CREDENTIALS = re.compile(r"(\w+://)[^/@\s]+@")


class FetchError(GitOpsError):
    """The remote could not be read. ``transient``: network-like, retry at the interval;
    otherwise the user must fix spec or Secret (wrong ref, authentication)."""

    def __init__(self, message: str, transient: bool = True, reason: str = "FetchFailed") -> None:
        super().__init__(message)
        self.transient = transient
        self.reason = reason


class PathNotFound(GitOpsError):
    """spec.path is missing (or not a directory) in the fetched commit."""


class ExportError(GitOpsError):
    """A file of the commit cannot be written out for ``nix eval``; ``file`` names it."""

    def __init__(self, file: str, message: str) -> None:
        super().__init__(f"{file}: {message}")
        self.file = file
        self.message = message


@dataclass(frozen=True)
class Credentials:
    """What a GitSource's Secret provides; ``repr`` never shows the secret values."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity: str | None = field(default=None, repr=False)
    known_hosts: str | None = None

    def secrets(self) -> list[str]:
        return [s for s in (self.password, self.identity) if s]

    @classmethod
    def from_secret_data(cls, data: dict[str, str], secret: str, url: str) -> Credentials:
        """Check the keys against the URL's transport and say which one is missing."""
        ssh = is_ssh_url(url)
        if ssh:
            if not data.get("identity"):
                raise FetchError(f"Secret {secret} has no `identity` key (SSH private key) for the "
                                 f"SSH url; add it", transient=False, reason="SecretInvalid")
            if not data.get("known_hosts"):
                raise FetchError(f"Secret {secret} has no `known_hosts` key: add the server's host "
                                 "key (ssh-keyscan <host>) so it can be verified",
                                 transient=False, reason="SecretInvalid")
            identity = data["identity"]
            return cls(identity=identity if identity.endswith("\n") else identity + "\n",
                       known_hosts=data["known_hosts"])
        password = data.get("token") or data.get("password")
        if not password:
            raise FetchError(f"Secret {secret} has no `token` (or `password`) key for the HTTPS url;"
                             " add it", transient=False, reason="SecretInvalid")
        return cls(username=data.get("username") or "git", password=password)


@dataclass(frozen=True)
class Fetched:
    commit: str
    previous: str | None  # what the cache's target ref pointed at before this fetch
    rewritten: bool  # previous is not an ancestor of commit: history was force-pushed


def is_ssh_url(url: str) -> bool:
    return url.startswith("ssh://") or ("://" not in url and not url.startswith("/") and ":" in url)


def scrub(text: str, secrets: list[str]) -> str:
    """Remove secret values and URL userinfo from text bound for logs, status or events."""
    for s in secrets:
        for line in s.splitlines() or [s]:
            if len(line.strip()) >= 4:
                text = text.replace(line.strip(), "***")
    return _URL_CREDENTIALS.sub(r"\1***@", text)


def url_secrets(url: str) -> list[str]:
    """Credentials written into a URL's user part, for :func:`scrub`: the password, and a
    user name long enough to be a token (``https://ghp_xxx@github.com``), raw and decoded,
    since a server may echo either back on its own (``remote: invalid token ghp_xxx``)."""
    if "://" not in url:
        return []
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    if parts.username and (parts.password is None and len(parts.username) >= 16):
        found.append(parts.username)
    return [v for raw in found for v in {raw, unquote(raw)}]


def _remote_url(url: str) -> str:
    """Local paths as file:// URLs: git applies --depth only to real transports."""
    return f"file://{url}" if url.startswith("/") else url


class GitFetcher:
    """Per-GitSource bare repositories under ``cache_root``; not thread-safe per key
    (the operator runs one worker per GitSource).

    Fetches pass ``--no-auto-gc`` (git's own thresholds would let a force-pushed history
    linger for thousands of objects); instead ``fetch`` runs ``git gc --prune=now`` after a
    history rewrite or once ``gc_loose_objects`` loose objects or ``gc_packs`` packs piled up.
    """

    def __init__(self, cache_root: Path | str, git_binary: str = "git", *,
                 gc_loose_objects: int = 500, gc_packs: int = 20) -> None:
        self.root = Path(cache_root)
        self.git_binary = git_binary
        self.gc_loose_objects = gc_loose_objects
        self.gc_packs = gc_packs

    def cache_path(self, key: str, url: str) -> Path:
        """A new URL gets a new cache, so a changed spec.url never mixes histories."""
        ns, _, name = key.partition("/")
        digest = hashlib.sha256(url.encode()).hexdigest()[:12]
        return self.root / ns / f"{name}-{digest}"

    def caches(self, key: str) -> list[Path]:
        """Every cache of this GitSource (one per URL it used); matched exactly, so GitSource
        ``prod`` never claims ``prod-eu``'s caches."""
        ns, _, name = key.partition("/")
        own = re.compile(re.escape(name) + r"-[0-9a-f]{12}")
        base = self.root / ns
        if not base.is_dir():
            return []
        return sorted(p for p in base.iterdir() if own.fullmatch(p.name) and p.is_dir())

    def remove(self, key: str) -> None:
        for p in self.caches(key):
            shutil.rmtree(p, ignore_errors=True)

    def _drop_other_urls(self, key: str, url: str) -> None:
        """spec.url changed: the caches of the old URLs are never read again."""
        keep = self.cache_path(key, url)
        for p in self.caches(key):
            if p != keep:
                log.info("removing the git cache of a previous spec.url",
                         extra={"gitsource": key, "cache": p.name})
                shutil.rmtree(p, ignore_errors=True)

    def repo(self, key: str, url: str) -> git.Repo:
        path = self.cache_path(key, url)
        if (path / "HEAD").exists():
            return git.Repo(path)
        path.mkdir(parents=True, exist_ok=True)
        return git.Repo.init(path, bare=True)

    @contextmanager
    def _env(self, creds: Credentials | None) -> Iterator[dict[str, str]]:
        with tempfile.TemporaryDirectory(prefix="hf-git-") as tmp:
            os.chmod(tmp, 0o700)
            askpass = Path(tmp) / "askpass"
            askpass.write_text(_ASKPASS)
            askpass.chmod(stat.S_IRWXU)
            env = {
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_ASKPASS": str(askpass),
                "SSH_ASKPASS": "/bin/false",
                "GCM_INTERACTIVE": "never",
                "HYPERFLEET_GIT_USERNAME": "",
                "HYPERFLEET_GIT_PASSWORD": "",
                "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
            }
            if creds and creds.password:
                env["HYPERFLEET_GIT_USERNAME"] = creds.username or "git"
                env["HYPERFLEET_GIT_PASSWORD"] = creds.password
            if creds and creds.identity:
                key_file = Path(tmp) / "identity"
                key_file.touch(0o600)
                key_file.write_text(creds.identity)
                hosts = Path(tmp) / "known_hosts"
                hosts.write_text(creds.known_hosts or "")
                env["GIT_SSH_COMMAND"] = (
                    f"ssh -i {key_file} -o IdentitiesOnly=yes -o BatchMode=yes "
                    f"-o UserKnownHostsFile={hosts} -o StrictHostKeyChecking=yes"
                )
            yield env

    def _git(self, repo: git.Repo, args: list[str], env: dict[str, str], timeout: float) -> str:
        cmd = [self.git_binary, "-c", "credential.helper=", *args]
        out: Any = repo.git.execute(cmd, env=env, kill_after_timeout=timeout)
        return str(out)

    def _rev(self, repo: git.Repo, ref: str) -> str | None:
        try:
            return str(repo.git.rev_parse("--verify", "--quiet", f"{ref}^{{commit}}")).strip() or None
        except git.GitCommandError:
            return None

    def fetch(self, key: str, url: str, ref: GitRef | None, creds: Credentials | None = None,
              timeout: float = 60.0) -> Fetched:
        """Bring ``ref`` of ``url`` into the cache (shallow on first use, forced so a rewritten
        history replaces the old one) and return its commit."""
        repo = self.repo(key, url)
        previous = self._rev(repo, TARGET_REF)
        ref = ref or GitRef()
        if ref.commit and self._rev(repo, ref.commit) == ref.commit:
            repo.git.update_ref(TARGET_REF, ref.commit)
            self._drop_other_urls(key, url)
            return Fetched(ref.commit, previous, False)
        src = (f"refs/heads/{ref.branch}" if ref.branch else f"refs/tags/{ref.tag}" if ref.tag
               else ref.commit or "HEAD")
        remote = _remote_url(url)
        secrets = [*(creds.secrets() if creds else []), *url_secrets(url)]
        with self._env(creds) as env:
            depth = [] if previous else ["--depth=1"]
            args = ["fetch", "--no-tags", "--force", "--no-write-fetch-head", "--no-auto-gc"]
            try:
                try:
                    self._git(repo, [*args, *depth, remote, f"+{src}:{TARGET_REF}"], env, timeout)
                except git.GitCommandError as exc:
                    err = str(exc.stderr or exc)
                    if depth and "shallow" in err:  # e.g. the dumb HTTP transport
                        self._git(repo, [*args, remote, f"+{src}:{TARGET_REF}"], env, timeout)
                    elif ref.commit and ("not our ref" in err or "unadvertised" in err
                                         or "couldn't find remote ref" in err):
                        unshallow = ["--unshallow"] if (Path(repo.git_dir) / "shallow").exists() else []
                        self._git(repo, [*args, *unshallow, remote, *_ALL_REFS], env, timeout)
                        if self._rev(repo, ref.commit) != ref.commit:
                            raise FetchError(f"commit {ref.commit} is not in {url}: check spec.ref.commit",
                                             transient=False, reason="RevisionNotFound") from None
                        repo.git.update_ref(TARGET_REF, ref.commit)
                    else:
                        raise
            except git.GitCommandError as exc:
                raise _classify(exc, url, ref, secrets) from None
        commit = self._rev(repo, TARGET_REF)
        if commit is None:
            raise FetchError(f"{ref.describe()} of {url} does not point at a commit",
                             transient=False, reason="RevisionNotFound")
        rewritten = bool(previous and previous != commit and not self._is_ancestor(repo, previous, commit))
        if rewritten:
            log.warning("history rewritten (force-push)",
                        extra={"gitsource": key, "previous": previous, "commit": commit})
        self._maybe_gc(repo, key, rewritten, timeout)
        self._drop_other_urls(key, url)
        return Fetched(commit, previous, rewritten)

    def _maybe_gc(self, repo: git.Repo, key: str, rewritten: bool, timeout: float) -> None:
        """Bound the cache: a rewritten history leaves the old one unreachable, and every
        small fetch leaves loose objects. A failed gc is logged, never fails the fetch."""
        try:
            counts = dict(line.split(": ", 1) for line in
                          str(repo.git.count_objects("-v")).splitlines() if ": " in line)
            loose, packs = int(counts.get("count", 0)), int(counts.get("packs", 0))
            if not (rewritten or loose >= self.gc_loose_objects or packs >= self.gc_packs):
                return
            repo.git.execute([self.git_binary, "-c", "gc.auto=0", "gc", "--prune=now", "--quiet"],
                             kill_after_timeout=max(timeout, 60.0))
            log.info("git cache compacted", extra={"gitsource": key, "loose": loose, "packs": packs,
                                                   "rewritten": rewritten})
        except (git.GitCommandError, ValueError) as exc:
            log.warning("git gc failed; the cache keeps its garbage until the next try",
                        extra={"gitsource": key, "error": str(exc)[-500:]})

    def _is_ancestor(self, repo: git.Repo, old: str, new: str) -> bool:
        try:
            repo.git.merge_base("--is-ancestor", old, new)
            return True
        except git.GitCommandError:
            return False

    def _subtree(self, repo: git.Repo, commit: str, path: str) -> git.Tree:
        tree = repo.commit(commit).tree
        if path in ("", "."):
            return tree
        try:
            sub = tree / path
        except KeyError:
            raise PathNotFound(f"spec.path {path!r} does not exist in commit {commit[:12]}: "
                               "check the directory name, or push it") from None
        if not isinstance(sub, git.Tree):
            raise PathNotFound(f"spec.path {path!r} is a file in commit {commit[:12]}; "
                               "point it at the directory that holds the manifests")
        return sub

    def manifest_files(self, key: str, url: str, commit: str, path: str) -> dict[str, bytes]:
        """Repository-relative path -> content of every YAML file under ``path``."""
        repo = self.repo(key, url)
        sub = self._subtree(repo, commit, path)
        prefix = "" if path in ("", ".") else path + "/"
        out: dict[str, bytes] = {}
        for item in sub.traverse():
            if not isinstance(item, git.Blob) or item.mode == 0o120000:  # skip symlinks
                continue
            rel = str(item.path)
            if is_manifest_file(rel.removeprefix(prefix)):
                out[rel] = item.data_stream.read()
        return out

    def has_file(self, key: str, url: str, commit: str, path: str, name: str) -> bool:
        sub = self._subtree(self.repo(key, url), commit, path)
        try:
            return isinstance(sub / name, git.Blob)
        except KeyError:
            return False

    def export(self, key: str, url: str, commit: str, dest: Path, path: str = ".") -> list[str]:
        """``path`` of ``commit`` as plain files under ``dest/path`` (for ``nix eval``, which
        reads nothing outside it). Returns the symlinks left out: absolute ones or ones leaving
        the tree (a committed ``result`` link of ``nix build``) could only point at files of
        the reconciler's host. Anything else that cannot be written raises ExportError."""
        repo = self.repo(key, url)
        self._subtree(repo, commit, path)  # PathNotFound with the usual message
        spec = [] if path in ("", ".") else ["--", path]
        r = subprocess.run([self.git_binary, "--literal-pathspecs", "-C", str(repo.git_dir), "archive",
                            "--format=tar", commit, *spec], capture_output=True, check=False)
        if r.returncode != 0:
            raise ExportError(path, f"git archive failed: {r.stderr.decode(errors='replace').strip()}")
        skipped: list[str] = []

        def only_safe(member: tarfile.TarInfo, where: str) -> tarfile.TarInfo | None:
            try:
                return tarfile.data_filter(member, where)
            except (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError):
                skipped.append(member.name)
                return None
            except tarfile.FilterError as exc:
                raise ExportError(member.name, f"cannot be exported for nix eval ({exc}); "
                                  "remove it from the repository") from None

        with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
            tar.extractall(dest, filter=only_safe)
        if skipped:
            log.info("symlinks pointing outside the repository were not exported",
                     extra={"gitsource": key, "commit": commit, "files": skipped[:20]})
        return skipped


#: git's words for an HTTP 401/403 ("The requested URL returned error: 403"), not any 403 in
#: the text: a path such as /tmp/pytest-403/gone.git is no authentication failure.
_HTTP_DENIED = re.compile(r"returned error: (?:401|403)\b")


def _classify(exc: git.GitCommandError, url: str, ref: GitRef, secrets: list[str]) -> FetchError:
    err = scrub(str(exc.stderr or "").strip() or str(exc), secrets)
    lines = [ln.strip().removeprefix("stderr: ").strip("'").strip() for ln in err.splitlines()]
    lines = [ln for ln in lines if ln]
    last = next((ln for ln in lines if ln.startswith(("fatal:", "error:"))), lines[-1] if lines else err)
    low = err.lower()
    if "couldn't find remote ref" in low or "not our ref" in low:
        return FetchError(f"{ref.describe()} not found in {url}: check spec.ref", transient=False,
                          reason="RevisionNotFound")
    if ("authentication failed" in low or "could not read username" in low
            or "could not read password" in low or "permission denied" in low
            or _HTTP_DENIED.search(low)):
        return FetchError(f"authentication to {url} failed: check spec.secretRef and its token or "
                          f"identity ({last})", transient=False, reason="AuthenticationFailed")
    if "host key verification failed" in low:
        return FetchError(f"the SSH host key of {url} does not match known_hosts in the Secret: "
                          "update it (ssh-keyscan <host>)", transient=False, reason="AuthenticationFailed")
    if "timeout" in low and "did not complete" in low:
        return FetchError(f"fetching {url} timed out: raise spec.timeout or check the network")
    return FetchError(f"cannot fetch {ref.describe()} from {url}: {last}")
