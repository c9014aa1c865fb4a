"""A node's storage for its VMs: confined host paths, the image cache, per-VM overlays.

The driver asks three things of it before a VM is created: are the spec's host paths
allowed here (``check_paths``), is the root disk ready (``prepare``: pulls the base image
in the background and makes the VM's own copy-on-write overlay over it), and where the
overlay is (``root_disk``). The overlay outlives the VMM (restarts, sleep) and goes with
the VM (``remove``), unless its reclaim policy keeps it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .images import (
    DEFAULT_ROOTS,
    ImageCache,
    ImageError,
    ImageSource,
    PathRefused,
    confine,
    create_overlay,
)
from .models.common import rfc3339
from .models.vm import ImageSpec, VirtualMachineSpec

log = logging.getLogger(__name__)

ROOT_DISK_ID = "root"
#: How many cached images a WorkerNode lists (most recently used first).
REPORTED_IMAGES = 50


class RootDiskError(Exception):
    """The root disk cannot be made: ``reason`` is the condition reason."""

    def __init__(self, reason: str, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class RootDisk:
    """Where a VM's root disk stands on this node."""

    ready: bool
    status: dict[str, Any]  # status.image
    path: Path


def image_source(image: ImageSpec) -> ImageSource:
    if image.url:
        return ImageSource("url", image.url, image.sha256)
    if image.nix_store_path:
        return ImageSource("nix", image.nix_store_path, image.sha256,
                           nix_cache=image.nix_cache, file=image.nix_file)
    return ImageSource("path", str(image.path), image.sha256)


class NodeStorage:
    """The agent's ``--state-dir`` (images/, disks/) and ``--allowed-path-root``s."""

    def __init__(self, state_dir: str | Path, allowed_roots: Sequence[str | Path] = DEFAULT_ROOTS,
                 cache_bytes: int = 20 << 30) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.disks_dir = self.state_dir / "disks"
        self.roots = [Path(r) for r in allowed_roots]
        self.cache = ImageCache(self.state_dir / "images", cache_bytes, self.roots)

    # --- host paths ---------------------------------------------------------------------
    def check_paths(self, spec: VirtualMachineSpec) -> None:
        """Raise PathRefused for the first host path in the spec outside the allowed roots
        (or into /proc, /sys, /dev, or by a symlink out of them). A missing file is left
        for the VMM to report, as it names what it could not open."""
        fields: list[tuple[str, str | None]] = [
            ("spec.boot.kernel", spec.boot.kernel),
            ("spec.boot.initramfs", spec.boot.initramfs),
            ("spec.boot.firmware", spec.boot.firmware),
            *((f"spec.disks[{i}].path", d.path) for i, d in enumerate(spec.disks)),
        ]
        if spec.image is not None and spec.image.path:
            fields.append(("spec.image.path", spec.image.path))
        for field, path in fields:
            if path:
                confine(path, self.roots, field, must_exist=False)

    # --- root disks ---------------------------------------------------------------------
    def root_disk(self, ns: str, name: str) -> Path:
        return self.disks_dir / f"{ns}_{name}" / "root.qcow2"

    def prepare(self, ns: str, name: str, image: ImageSpec) -> RootDisk:
        """Non-blocking: the root disk if it exists or can be made now; else where the pull
        stands (``ready`` False), or RootDiskError when it cannot be made."""
        disk = self.root_disk(ns, name)
        meta = disk.parent / "image.json"
        key = image.key
        made_from = _read_json(meta).get("key")
        if disk.exists() and made_from is not None and made_from != key:
            raise RootDiskError("ImageChanged", (
                f"spec.image now names {key}, but this VM's root disk was made from "
                f"{made_from} and holds what the VM wrote since: delete the VM (its disk goes "
                "with it) and create it again to start from the new image, or set spec.image "
                "back"), None)
        if disk.exists():
            self.cache.touch(key)
            return RootDisk(True, {"key": key, "phase": "Ready", "rootDisk": str(disk),
                                   "digest": _read_json(meta).get("digest")}, disk)
        pull = self.cache.request(image_source(image))
        if pull.state == "pulling":
            return RootDisk(False, {"key": key, "phase": "Pulling",
                                    "progress": pull.progress()}, disk)
        if pull.state == "failed" or pull.path is None:
            err = pull.error
            wait = None if err is None or not err.transient or pull.retry_at is None \
                else max(1.0, pull.retry_at - time.monotonic())
            reason = err.reason if err else "PullFailed"
            # One name for a refused host path, wherever in the spec it is.
            raise RootDiskError("PathNotAllowed" if reason == "PathRefused" else reason,
                                str(err) if err else "the image pull failed", wait)
        try:
            create_overlay(pull.path, disk)
        except ImageError as exc:
            raise RootDiskError(exc.reason, str(exc), None) from exc
        digest = next((e.digest for e in self.cache.entries() if e.key == key), None)
        meta.write_text(json.dumps({"key": key, "digest": digest, "base": str(pull.path),
                                    "createdAt": rfc3339_now()}))
        log.info("root disk created", extra={"vm": f"{ns}/{name}", "image": key,
                                             "disk": str(disk)})
        self.gc()
        return RootDisk(True, {"key": key, "phase": "Ready", "rootDisk": str(disk),
                               "digest": digest}, disk)

    def remove(self, ns: str, name: str) -> None:
        """The VM's disks go with it (its reclaim policy was checked by the caller)."""
        shutil.rmtree(self.root_disk(ns, name).parent, ignore_errors=True)

    def in_use(self) -> set[str]:
        """Image keys some overlay on this node is made from (never garbage-collected)."""
        keys = set()
        with contextlib.suppress(FileNotFoundError):
            for meta in self.disks_dir.glob("*/image.json"):
                key = _read_json(meta).get("key")
                if key:
                    keys.add(str(key))
        return keys

    def gc(self) -> list[str]:
        evicted = self.cache.gc(self.in_use())
        if evicted:
            log.info("image cache: evicted", extra={"images": evicted})
        return evicted

    def report(self) -> list[dict[str, Any]]:
        """status.images of the WorkerNode."""
        return [{"key": e.key, "sizeBytes": e.size_bytes,
                 "lastUsed": rfc3339_from(e.last_used)}
                for e in self.cache.entries()[:REPORTED_IMAGES]]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def rfc3339_now() -> str:
    return rfc3339_from(time.time())


def rfc3339_from(ts: float) -> str:
    return rfc3339(datetime.fromtimestamp(ts, UTC))


__all__ = [
    "ROOT_DISK_ID",
    "NodeStorage",
    "PathRefused",
    "RootDisk",
    "RootDiskError",
    "image_source",
]
