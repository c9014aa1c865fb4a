"""The node's image cache: content-addressed base images, pulled in the background, bounded by GC.

VM loops must never block on a multi-GiB download, so :meth:`ImageCache.request` only reports and
starts work; :meth:`ImageCache.ensure` is the blocking form for callers that may wait. Blobs are named
by their sha256, so one image reached through a URL and a path is stored once, and a VM's overlay keeps
pointing at an unchanging file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import requests
import urllib3.exceptions

from .errors import ImageError
from .paths import DEFAULT_ROOTS, PathRefused, confine
from .source import ImageSource, redact_url

__all__ = ["CachedImage", "ImageCache", "ImageError", "Pull"]

log = logging.getLogger(__name__)

MiB = 1 << 20
_CHUNK = MiB
_COPY_CHUNK = 64 * MiB
#: index.json is rewritten at most this often for last-used updates alone (structural changes: always).
_TOUCH_FLUSH_S = 30.0
_TRANSIENT_NIX = re.compile(r"unable to download|couldn't connect|timed out|timeout|couldn't resolve|"
                            r"connection (refused|reset)|temporarily|HTTP error 5\d\d|error 5\d\d", re.I)
_SIG_NIX = re.compile(r"lacks a valid signature|no signature|not signed", re.I)


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


@dataclass
class Pull:
    """The state of making one image available on this node (a snapshot when returned)."""

    key: str
    state: Literal["pulling", "ready", "failed"]
    done_bytes: int = 0
    total_bytes: int | None = None
    path: Path | None = None  # the local base image, when ready
    error: ImageError | None = None
    attempts: int = 0
    retry_at: float | None = None  # time.monotonic() after which a failed transient pull may start again
    phase: str = ""  # what a pulling pull is doing: downloading, copying, hashing, realising

    def progress(self) -> str:
        """Human progress, e.g. "12.0 MiB of 100.0 MiB (12%)" or "12.0 MiB" when the size is unknown."""
        if self.total_bytes:
            pct = min(100, self.done_bytes * 100 // self.total_bytes)
            return f"{_mib(self.done_bytes)} of {_mib(self.total_bytes)} ({pct}%)"
        return _mib(self.done_bytes)


@dataclass(frozen=True)
class CachedImage:
    """One cached image as listed by :meth:`ImageCache.entries`."""

    key: str
    digest: str
    size_bytes: int
    last_used: float  # wall clock
    source: str
    path: Path


def _net_reason(exc: BaseException) -> str:
    """A short cause of a requests failure, without the URL (which may carry credentials)."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    seen: set[int] = set()
    queue: list[BaseException] = [exc]
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, TimeoutError):
            return "timed out"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve the host ({e.strerror})"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        if isinstance(e, urllib3.exceptions.ProtocolError) and e.args and isinstance(e.args[0], str):
            return e.args[0]
        nxt = [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]
        queue.extend(n for n in nxt if isinstance(n, BaseException))
    return type(exc).__name__


def _tail(text: str, lines: int = 4) -> str:
    kept = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("warning: error:")]
    return " | ".join(kept[-lines:]) or "(no output)"


class ImageCache:
    """Base images under ``root``: ``blobs/sha256/<hex>`` (0444), ``index.json``, ``tmp/``, ``gcroots/``.

    Thread-safe. Nix images are not copied: the store path is the image and a GC root under
    ``gcroots/`` keeps nix's garbage collector away from it while it is cached.
    """

    def __init__(self, root: Path, max_bytes: int, allowed_roots: Sequence[Path | str] = DEFAULT_ROOTS,
                 *, http_timeout: float = 30.0, nix_bin_dir: str | None = None,
                 retry_base: float = 1.0, retry_max: float = 60.0, nix_trust_unsigned: bool = False,
                 nix_timeout: float = 3600.0) -> None:
        self.root = Path(root).absolute()
        self.max_bytes = max_bytes
        self.allowed_roots = tuple(str(r) for r in allowed_roots)
        self.http_timeout = http_timeout
        self.nix_bin_dir = nix_bin_dir
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.nix_trust_unsigned = nix_trust_unsigned
        self.nix_timeout = nix_timeout
        self._cond = threading.Condition()
        self._pulls: dict[str, Pull] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._images: dict[str, dict[str, Any]] = {}
        self._files: dict[str, dict[str, Any]] = {}  # resolved source path -> size, mtime_ns, ino, digest
        self._last_save = 0.0
        self._dirty = False
        for sub, mode in (("", 0o755), ("blobs", 0o755), ("blobs/sha256", 0o755), ("tmp", 0o700),
                          ("gcroots", 0o755)):
            d = self.root / sub
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, mode)
        for leftover in (self.root / "tmp").iterdir():  # partial downloads of a previous run
            with contextlib.suppress(OSError):
                leftover.unlink()
        self._load()

    # ---------------------------------------------------------------- index
    @property
    def _index_path(self) -> Path:
        return self.root / "index.json"

    def _blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest

    def _load(self) -> None:
        try:
            data = json.loads(self._index_path.read_text())
            self._images = dict(data.get("images", {}))
            self._files = dict(data.get("files", {}))
        except FileNotFoundError:
            pass
        except (ValueError, OSError, AttributeError) as exc:
            log.warning("image index %s unreadable (%s); rebuilding it from the blobs", self._index_path, exc)
            self._images, self._files = {}, {}
        changed = False
        for key, entry in list(self._images.items()):
            if not os.path.isfile(self._entry_path(entry)):
                del self._images[key]
                changed = True
        referenced = {e["digest"] for e in self._images.values() if e.get("kind") == "blob"}
        for blob in (self.root / "blobs" / "sha256").iterdir():
            if re.fullmatch(r"[0-9a-f]{64}", blob.name) and blob.name not in referenced:
                st = blob.stat()  # a blob whose index write was lost: keep it accountable to GC
                self._images[f"sha256:{blob.name}"] = {
                    "kind": "blob", "digest": blob.name, "size": st.st_size, "last_used": st.st_mtime,
                    "source": "(found in the cache)"}
                changed = True
        if changed:
            self._save()

    def _save(self) -> None:
        """Atomically rewrite index.json (tmp + fsync + rename); callers hold the lock or own the cache."""
        tmp = self._index_path.with_name(f".index.{secrets.token_hex(4)}.tmp")
        with open(tmp, "w") as f:
            json.dump({"version": 1, "images": self._images, "files": self._files}, f, indent=1,
                      sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._index_path)
        self._last_save = time.monotonic()
        self._dirty = False

    def _entry_path(self, entry: dict[str, Any]) -> Path:
        return Path(entry["path"]) if entry.get("kind") == "nix" else self._blob(entry["digest"])

    def _touch_locked(self, key: str) -> None:
        entry = self._images.get(key)
        if entry is None:
            return
        entry["last_used"] = time.time()
        self._dirty = True
        if time.monotonic() - self._last_save >= _TOUCH_FLUSH_S:
            self._save()

    # ---------------------------------------------------------------- public API
    def request(self, src: ImageSource) -> Pull:
        """The image's current state, never blocking on I/O beyond a few stats.

        Starts one background pull per key when the image is not cached (concurrent requests share it);
        a transiently failed pull starts again once ``retry_at`` has passed. Problems found without any
        transfer (an invalid source, a refused path) are re-checked on every request, so fixing them
        needs no :meth:`forget`.
        """
        key = src.key
        resolved: Path | None = None
        try:
            src.validate()
            if src.kind == "path":
                resolved = confine(src.location, self.allowed_roots, "spec.image.path")
        except ImageError as exc:
            return Pull(key, "failed", error=exc)
        except PathRefused as exc:
            with self._cond:
                cached = self._ready_locked(key, src, None)
            if exc.why == "does not exist" and cached is not None:
                return cached  # the copy outlives its origin; VMs keep booting from it
            reason: Literal["NotFound", "PathRefused"] = "NotFound" if exc.why == "does not exist" \
                else "PathRefused"
            return Pull(key, "failed", error=ImageError(reason, str(exc), transient=False))
        with self._cond:
            current = self._pulls.get(key)
            if current is not None and current.state == "pulling":
                return dataclasses.replace(current)
            ready = self._ready_locked(key, src, resolved)
            if ready is not None:
                self._pulls.pop(key, None)
                return ready
            if current is not None and current.state == "failed":
                assert current.error is not None
                if not current.error.transient or (current.retry_at or 0) > time.monotonic():
                    return dataclasses.replace(current)
            if self._stop.is_set():
                return Pull(key, "failed", error=ImageError("LocalIO", "the image cache is closed",
                                                            transient=True))
            pull = Pull(key, "pulling", attempts=(current.attempts if current else 0) + 1, phase="starting")
            self._pulls[key] = pull
            thread = threading.Thread(target=self._run, args=(key, src, pull, resolved),
                                      name=f"image-pull {key[:24]}", daemon=True)
            self._threads[key] = thread
            thread.start()
            return dataclasses.replace(pull)

    def ensure(self, src: ImageSource, timeout: float = 600) -> Path:
        """Block until the image is ready (retrying transient failures) and return its local path."""
        deadline = time.monotonic() + timeout
        key = src.key
        while True:
            pull = self.request(src)
            now = time.monotonic()
            if pull.state == "ready":
                assert pull.path is not None
                return pull.path
            if pull.state == "failed":
                assert pull.error is not None
                retry_at = pull.retry_at if pull.retry_at is not None else now
                if not pull.error.transient or retry_at > deadline or self._stop.is_set():
                    raise pull.error
                self._stop.wait(max(0.0, retry_at - now))
                continue
            if now >= deadline:
                raise ImageError("Unreachable", f"image {src.display} not ready after {timeout:g} s "
                                 f"({pull.phase}: {pull.progress()})", transient=True)
            with self._cond:
                self._cond.wait_for(lambda: (p := self._pulls.get(key)) is None or p.state != "pulling",
                                    timeout=deadline - now)

    def forget(self, key: str) -> None:
        """Forget a failed pull (and its backoff), so the next request starts afresh; cached images stay."""
        with self._cond:
            pull = self._pulls.get(key)
            if pull is not None and pull.state != "pulling":
                del self._pulls[key]

    def entries(self) -> list[CachedImage]:
        """Cached images, most recently used first."""
        with self._cond:
            items = [CachedImage(key=k, digest=e["digest"], size_bytes=e["size"], last_used=e["last_used"],
                                 source=e.get("source", ""), path=self._entry_path(e))
                     for k, e in self._images.items()]
        return sorted(items, key=lambda c: c.last_used, reverse=True)

    def touch(self, key: str) -> None:
        """Mark an image used now (LRU order for :meth:`gc`)."""
        with self._cond:
            self._touch_locked(key)

    def total_bytes(self) -> int:
        """Bytes the cache holds, counting a blob shared by several keys once."""
        with self._cond:
            return self._total_locked()

    def gc(self, in_use: Collection[str]) -> list[str]:
        """Evict least-recently-used images not in ``in_use`` until the total fits ``max_bytes``.

        ``in_use`` holds keys; ``sha256:<digest>`` also protects every key stored under that digest, so a
        caller that only knows an overlay's backing blob can still protect it. In-use images are never
        evicted, even when they alone exceed the limit. Returns the evicted keys.
        """
        evicted: list[str] = []
        with self._cond:
            protected = {k for k, e in self._images.items()
                         if k in in_use or f"sha256:{e['digest']}" in in_use}
            total = self._total_locked()
            for key, entry in sorted(self._images.items(), key=lambda kv: kv[1]["last_used"]):
                if total <= self.max_bytes:
                    break
                if key in protected:
                    continue
                del self._images[key]
                self._release_locked(entry)
                evicted.append(key)
                total = self._total_locked()
            for origin in [o for o in self._files if not os.path.exists(o)]:
                del self._files[origin]  # remembered digests of files that are gone
                self._dirty = True
            if evicted or self._dirty:
                self._save()
        for key in evicted:
            log.info("image cache: evicted %s", key)
        return evicted

    def close(self, timeout: float = 10.0) -> None:
        """Stop running pulls at their next chunk and wait for their threads (tests, agent shutdown)."""
        self._stop.set()
        with self._cond:
            threads = list(self._threads.values())
            if self._dirty:
                self._save()
        for t in threads:
            t.join(timeout)

    # ---------------------------------------------------------------- internals
    def _total_locked(self) -> int:
        seen: dict[str, int] = {}
        for e in self._images.values():
            seen[str(self._entry_path(e))] = e["size"]
        return sum(seen.values())

    def _release_locked(self, entry: dict[str, Any]) -> None:
        """Free what an index entry held, unless another entry still refers to it."""
        if entry.get("kind") == "nix":
            root = entry.get("gcroot")
            if root and not any(e.get("gcroot") == root for e in self._images.values()):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(root)  # nix drops its indirect root in gcroots/auto on its next GC
            return
        if not any(e.get("kind") != "nix" and e["digest"] == entry["digest"] for e in self._images.values()):
            with contextlib.suppress(FileNotFoundError):
                self._blob(entry["digest"]).unlink()

    def _ready_locked(self, key: str, src: ImageSource, resolved: Path | None) -> Pull | None:
        """A ready Pull when ``key`` is cached and still what the source names, else None."""
        entry = self._images.get(key)
        if entry is None and src.sha256 and self._blob(src.sha256.lower()).is_file():
            # Content-addressed hit: another source already brought these exact bytes.
            digest = src.sha256.lower()
            entry = {"kind": "blob", "digest": digest, "size": self._blob(digest).stat().st_size,
                     "last_used": time.time(), "source": src.display}
            self._images[key] = entry
            self._save()
        if entry is None:
            return None
        path = self._entry_path(entry)
        if not path.is_file():
            del self._images[key]  # removed behind our back: pull again
            self._save()
            return None
        if resolved is not None and key.startswith("path:") and not self._fresh(entry, resolved):
            return None  # the file at the path changed: import the new content
        self._touch_locked(key)
        return Pull(key, "ready", done_bytes=entry["size"], total_bytes=entry["size"], path=path)

    @staticmethod
    def _fresh(entry: dict[str, Any], resolved: Path) -> bool:
        try:
            st = os.stat(resolved)
        except OSError:
            return True  # gone: keep serving the copy
        return bool(entry.get("origin") == str(resolved)
                    and entry.get("stat") == [st.st_size, st.st_mtime_ns, st.st_ino])

    def _progress(self, pull: Pull, *, phase: str | None = None, done: int | None = None,
                  total: int | Literal[False] | None = False) -> None:
        if self._stop.is_set():
            raise ImageError("LocalIO", "the image cache was closed during the pull", transient=True)
        with self._cond:
            if phase is not None:
                pull.phase = phase
            if done is not None:
                pull.done_bytes = done
            if total is not False:
                pull.total_bytes = total

    def _run(self, key: str, src: ImageSource, pull: Pull, resolved: Path | None) -> None:
        started = time.monotonic()
        try:
            if src.kind == "url":
                entry = self._fetch_url(src, pull)
            elif src.kind == "path":
                assert resolved is not None
                entry = self._import_path(src, resolved, pull)
            else:
                entry = self._realise_nix(src, key, pull)
            error: ImageError | None = None
        except ImageError as exc:
            # Kept for a long time in the Pull: drop the frames (buffers, sockets) it would pin.
            error = exc.with_traceback(None)
            error.__context__ = error.__cause__ = None
        except Exception as exc:  # a bug or an unforeseen OS error: report it, retry later
            log.exception("image pull %s failed unexpectedly", key)
            error = ImageError("LocalIO", f"{src.display}: {type(exc).__name__}: {exc}", transient=True)
        with self._cond:
            self._threads.pop(key, None)
            if error is None:
                old = self._images.get(key)
                if (old is not None and old.get("kind") == "blob" and old["digest"] != entry["digest"]
                        and f"sha256:{old['digest']}" not in self._images):
                    # Overlays of running VMs may still point at the old bytes: keep them under their
                    # digest, where gc(in_use) can protect or evict them.
                    self._images[f"sha256:{old['digest']}"] = old
                entry["last_used"] = time.time()
                self._images[key] = entry
                self._save()
                pull.state, pull.path = "ready", self._entry_path(entry)
                pull.error = pull.retry_at = None
                pull.done_bytes = pull.total_bytes = entry["size"]
                self._pulls.pop(key, None)
                log.info("image %s ready: %s (%s in %.1f s)", key, pull.path, _mib(entry["size"]),
                         time.monotonic() - started)
            else:
                pull.state, pull.error = "failed", error
                if error.transient:
                    delay = min(self.retry_max, self.retry_base * 2 ** max(0, pull.attempts - 1))
                    pull.retry_at = time.monotonic() + delay
                log.warning("image %s: %s%s", key, error,
                            f" (retry in {pull.retry_at - time.monotonic():.0f} s)" if pull.retry_at else "")
            self._cond.notify_all()

    def _tmpfile(self) -> Path:
        return self.root / "tmp" / f"{secrets.token_hex(8)}.part"

    def _commit_blob(self, tmp: Path, digest: str) -> int:
        """Move a verified temporary file into place as the read-only blob of ``digest``."""
        os.chmod(tmp, 0o444)
        size = tmp.stat().st_size
        with self._cond:
            if self._blob(digest).is_file():
                tmp.unlink()
            else:
                os.rename(tmp, self._blob(digest))
                fd = os.open(self._blob(digest).parent, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return size

    def _hash_file(self, path: Path | str, pull: Pull, size: int) -> str:
        h = hashlib.sha256()
        done = 0
        self._progress(pull, phase="hashing", done=0, total=size)
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                done += len(chunk)
                self._progress(pull, done=done)
        return h.hexdigest()

    @staticmethod
    def _mismatch(src: ImageSource, got: str) -> ImageError:
        return ImageError("ChecksumMismatch",
                          f"spec.image.sha256 is {src.sha256} but {src.display} has sha256 {got}; "
                          "fix spec.image.sha256 or the image", transient=False)

    # ---------------------------------------------------------------- url
    def _fetch_url(self, src: ImageSource, pull: Pull) -> dict[str, Any]:
        assert src.sha256 is not None
        want = src.sha256.lower()
        shown = src.display
        tmp = self._tmpfile()
        h = hashlib.sha256()
        done = 0
        total: int | None = None
        try:
            self._progress(pull, phase="connecting")
            # identity: the declared sha256 is of the file's bytes, not of a re-encoded transfer.
            # Own session: closing it closes the connection now, not when the garbage collector runs.
            with requests.Session() as session, session.get(
                    src.location, stream=True, timeout=self.http_timeout,
                    headers={"Accept-Encoding": "identity"}) as resp:
                code = resp.status_code
                if code in (401, 403, 404, 410):
                    raise ImageError("NotFound", f"{shown}: HTTP {code} {resp.reason}", transient=False)
                if code >= 500 or code in (408, 429):
                    raise ImageError("Unreachable", f"{shown}: HTTP {code} {resp.reason}", transient=True)
                if code != 200:
                    raise ImageError("NotFound", f"{shown}: unexpected HTTP {code} {resp.reason}",
                                     transient=False)
                length = resp.headers.get("Content-Length", "")
                total = int(length) if length.isdigit() else None
                self._progress(pull, phase="downloading", done=0, total=total)
                with open(tmp, "xb") as f:
                    for chunk in resp.iter_content(_CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        self._progress(pull, done=done)
                    f.flush()
                    os.fsync(f.fileno())
            if total is not None and done != total:
                raise ImageError("Unreachable", f"{shown}: connection ended after {done} of {total} bytes",
                                 transient=True)
            got = h.hexdigest()
            if got != want:
                raise self._mismatch(src, got)
            size = self._commit_blob(tmp, want)
        except requests.RequestException as exc:
            raise ImageError("Unreachable", f"cannot download {shown}: {_net_reason(exc)}",
                             transient=True) from None
        except OSError as exc:
            raise ImageError("LocalIO", f"cannot store {shown} in {self.root}: {exc.strerror or exc}",
                             transient=True) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return {"kind": "blob", "digest": want, "size": size, "source": shown}

    # ---------------------------------------------------------------- path
    def _import_path(self, src: ImageSource, resolved: Path, pull: Pull) -> dict[str, Any]:
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a symlink since confine() looked
                raise ImageError("PathRefused", f"spec.image.path {src.location!r} became a symlink",
                                 transient=False) from None
            raise ImageError("NotFound", f"spec.image.path {src.location!r}: {exc.strerror}",
                             transient=False) from None
        tmp = self._tmpfile()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError("PathRefused", f"spec.image.path {src.location!r} is not a regular file",
                                 transient=False)
            ident = [st.st_size, st.st_mtime_ns, st.st_ino]
            known = self._files.get(str(resolved))
            digest: str | None = known["digest"] if known and known.get("stat") == ident else None
            if digest is not None and src.sha256 and digest != src.sha256.lower():
                raise self._mismatch(src, digest)
            if digest is None or not self._blob(digest).is_file():
                self._copy(fd, tmp, st.st_size, pull)
                after = os.fstat(fd)
                if [after.st_size, after.st_mtime_ns, after.st_ino] != ident:
                    raise ImageError("LocalIO", f"spec.image.path {src.location!r} changed while it was "
                                     "being copied", transient=True)
                if digest is None:  # unchanged file already hashed once: its digest is known
                    digest = self._hash_file(tmp, pull, st.st_size)
                    if src.sha256 and digest != src.sha256.lower():
                        raise self._mismatch(src, digest)
                self._commit_blob(tmp, digest)
            with self._cond:
                self._files[str(resolved)] = {"stat": ident, "digest": digest}
        except OSError as exc:
            raise ImageError("LocalIO", f"cannot copy {src.location!r} into {self.root}: "
                             f"{exc.strerror or exc}", transient=True) from None
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return {"kind": "blob", "digest": digest, "size": st.st_size, "source": src.display,
                "origin": str(resolved), "stat": ident}

    def _copy(self, fd: int, tmp: Path, size: int, pull: Pull) -> None:
        """Copy with copy_file_range (a reflink on btrfs/XFS, in-kernel elsewhere), else read/write."""
        self._progress(pull, phase="copying", done=0, total=size)
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            copied = 0
            use_cfr = hasattr(os, "copy_file_range")
            while copied < size:
                want = min(_COPY_CHUNK, size - copied)
                if use_cfr:
                    try:
                        n = os.copy_file_range(fd, out, want, copied, copied)
                    except OSError as exc:
                        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                            raise
                        use_cfr = False
                        continue
                else:
                    data = os.pread(fd, min(want, _CHUNK), copied)
                    n = os.pwrite(out, data, copied) if data else 0
                if n == 0:
                    break  # the file shrank; the caller notices the changed stat
                copied += n
                self._progress(pull, done=copied)
            os.fsync(out)
        finally:
            os.close(out)

    # ---------------------------------------------------------------- nix
    def _nix(self, tool: str) -> str:
        if self.nix_bin_dir:
            return os.path.join(self.nix_bin_dir, tool)
        return shutil.which(tool) or tool

    def _run_nix(self, args: list[str], what: str, hint: Callable[[str], str] | None = None,
                 url: str | None = None) -> str:
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=self.nix_timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError:
            raise ImageError("NixError", f"{what}: {args[0]} not found; install nix on the node or set "
                             "the nix binary directory", transient=False) from None
        except subprocess.TimeoutExpired:
            raise ImageError("NixError", f"{what}: no answer after {self.nix_timeout:g} s",
                             transient=True) from None
        if proc.returncode != 0:
            if url:  # nix prints the cache URL; it may carry credentials
                proc.stderr = proc.stderr.replace(url, redact_url(url))
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
            last_error = errors[-1] if errors else ""
            transient = bool(_TRANSIENT_NIX.search(last_error))
            extra = hint(proc.stderr) if hint else ""
            raise ImageError("NixError", f"{what} failed: {_tail(proc.stderr)}{extra}", transient=transient)
        return proc.stdout

    def _realise_nix(self, src: ImageSource, key: str, pull: Pull) -> dict[str, Any]:
        store_path = src.location
        self._progress(pull, phase="checking")
        try:
            self._run_nix([self._nix("nix-store"), "--check-validity", store_path],
                          "nix-store --check-validity")
            valid = True
        except ImageError as exc:
            if "not found; install nix" in exc.message:
                raise
            valid = False  # "path ... is not valid": realise it below
        if not valid:
            self._progress(pull, phase="realising")
            if src.nix_cache:
                cmd = [self._nix("nix"), "--extra-experimental-features", "nix-command", "copy",
                       "--from", src.nix_cache, store_path]
                if self.nix_trust_unsigned:
                    cmd.insert(-1, "--no-check-sigs")

                def sig_hint(err: str) -> str:
                    if not _SIG_NIX.search(err):
                        return ""
                    return ("; sign the cache (nix store sign --key-file) and add its public key to the "
                            "node's trusted-public-keys, or let the agent trust unsigned nix caches")

                self._run_nix(cmd, f"nix copy --from {redact_url(src.nix_cache)} {store_path}", sig_hint,
                              url=src.nix_cache)
            else:
                self._run_nix([self._nix("nix-store"), "--realise", store_path],
                              f"nix-store --realise {store_path}")
        gcroot = self.root / "gcroots" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-" \
                                         f"{os.path.basename(store_path)}"
        # Root it before use: outside /nix/var/nix/gcroots nix records an indirect root (gcroots/auto).
        self._run_nix([self._nix("nix-store"), "--add-root", str(gcroot), "--realise", store_path],
                      f"nix-store --add-root for {store_path}")
        try:
            image = os.path.join(store_path, src.file) if src.file else store_path
            try:
                real = confine(image, [store_path], "spec.image.file")
            except PathRefused as exc:
                raise ImageError("NotFound" if exc.why == "does not exist" else "PathRefused", str(exc),
                                 transient=False) from None
            if not real.is_file():
                raise ImageError("Invalid", f"{image} is not a file; set spec.image.file to the disk image "
                                 "inside the store path", transient=False)
            size = real.stat().st_size
            digest = self._hash_file(real, pull, size)
            if src.sha256 and digest != src.sha256.lower():
                raise self._mismatch(src, digest)
        except BaseException:
            with self._cond:
                if not any(e.get("gcroot") == str(gcroot) for e in self._images.values()):
                    with contextlib.suppress(FileNotFoundError):
                        gcroot.unlink()
            raise
        return {"kind": "nix", "digest": digest, "size": size, "source": src.display, "path": str(real),
                "gcroot": str(gcroot)}
