"""Per-VM copy-on-write disks: a qcow2 overlay over a shared, read-only base image.

A VM never writes its base image: every VM gets its own small qcow2 whose backing file is the cached
base, so N VMs of one image cost one copy plus their own writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal, cast

from .errors import ImageError

QEMU_IMG = "qemu-img"


def _qemu_img(*args: str, what: str) -> str:
    try:
        proc = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, timeout=300)
    except FileNotFoundError:
        raise ImageError("Invalid", f"{what}: qemu-img is not installed on this node (apt-get install "
                         "qemu-utils)", transient=False) from None
    if proc.returncode != 0:
        err = " | ".join(ln.strip() for ln in proc.stderr.splitlines() if ln.strip()) or "(no output)"
        raise ImageError("Invalid", f"{what}: {err}", transient=False)
    return proc.stdout


def image_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` as a dict; ``-U`` so an image a running VM holds locked can still be read."""
    if not os.path.exists(path):
        raise ImageError("NotFound", f"image {path} does not exist", transient=False)
    out = _qemu_img("info", "-U", "--output=json", str(path), what=f"qemu-img info {path}")
    return cast(dict[str, Any], json.loads(out))


def image_format(path: Path, *, allow_backing: bool = False) -> Literal["qcow2", "raw"]:
    """The format of a base image: qcow2 or raw, anything else is refused.

    A qcow2 that names its own backing file or external data file is refused too (unless
    ``allow_backing``): such a header, in an image downloaded from anywhere, would make the VMM open a
    host file of the image author's choosing (say /etc/shadow or /dev/sda) and show it to the guest.
    """
    info = image_info(path)
    fmt = info.get("format")
    if fmt not in ("qcow2", "raw"):
        raise ImageError("Invalid", f"image {path} is {fmt!r}; only qcow2 and raw images are supported "
                         f"(convert it: qemu-img convert -O qcow2 {path} <out>)", transient=False)
    if not allow_backing:
        backing = info.get("backing-filename")
        data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
        if backing or data_file:
            named = backing or data_file
            raise ImageError("Invalid", f"image {path} refers to another file ({named!r}); base images "
                             f"must be self-contained (flatten it: qemu-img convert -O qcow2 {path} <out>)",
                             transient=False)
    return cast(Literal["qcow2", "raw"], fmt)


def overlay_backing(path: Path) -> Path | None:
    """The backing file an image names (absolute), or None for a self-contained image."""
    info = image_info(path)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    return Path(backing) if backing else None


def _mkdirs(d: Path) -> None:
    """Create missing directories as 0700: a VM's disks are only the agent's business."""
    missing: list[Path] = []
    while not d.exists():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        with contextlib.suppress(FileExistsError):
            m.mkdir()
            os.chmod(m, 0o700)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def create_overlay(base: Path, dest: Path, *, base_format: str | None = None,
                   size_bytes: int | None = None) -> bool:
    """Create ``dest``, a qcow2 whose backing file is ``base``; True if created, False if it already was.

    Idempotent for the agent's retries, but never replaces a VM's disk: an existing ``dest`` over another
    base raises ImageError("Invalid"). ``size_bytes`` (>= the base's virtual size) grows the disk.
    """
    base = Path(os.path.abspath(base))
    dest = Path(os.path.abspath(dest))
    if dest.exists() or dest.is_symlink():
        info = image_info(dest)
        current = info.get("full-backing-filename") or info.get("backing-filename")
        if info.get("format") == "qcow2" and current and _same_file(Path(current), base):
            return False
        raise ImageError("Invalid", f"disk {dest} already exists with backing file {current!r}, not {base}; "
                         "refusing to replace a VM's disk (delete it to start from the new image)",
                         transient=False)
    fmt = base_format or image_format(base)
    if fmt not in ("qcow2", "raw"):
        raise ImageError("Invalid", f"base format {fmt!r} is not qcow2 or raw", transient=False)
    args = ["create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base)]
    if size_bytes is not None:
        virtual = int(image_info(base).get("virtual-size", 0))
        if size_bytes < virtual:
            raise ImageError("Invalid", f"disk size {size_bytes} bytes is smaller than the image's "
                             f"{virtual} bytes; a disk cannot shrink below its image", transient=False)
    _mkdirs(dest.parent)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    try:
        _qemu_img(*args, str(tmp), *([str(size_bytes)] if size_bytes is not None else []),
                  what=f"qemu-img create {dest}")
        os.chmod(tmp, 0o600)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, dest)  # unlike rename, never replaces a disk another caller just made
        except FileExistsError:
            return create_overlay(base, dest, base_format=base_format, size_bytes=size_bytes)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return True


def remove_disks(dir: Path) -> None:
    """Delete a VM's disk directory (its overlays); a missing directory is fine."""
    d = Path(os.path.abspath(dir))
    if len(d.parts) < 3:
        raise ValueError(f"refusing to remove {d}: not a VM disk directory")
    if d.is_symlink():
        d.unlink()  # never follow a link into someone else's files
        return
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(d)
