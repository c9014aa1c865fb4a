"""Host path confinement: a VM spec may only name host files under the node's allowed roots.

A VM spec is written by whoever may create VirtualMachines, not by the node's administrator, so every
host path it names (an image, a kernel, a disk) is checked here before the agent opens it: otherwise a
spec could hand the guest /etc/shadow, the agent's service-account token or a raw host disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

#: Where image files may live unless the agent is started with other roots.
DEFAULT_ROOTS: tuple[str, ...] = ("/var/lib/hyperfleet", "/nix/store", "/usr/share/cloud-hypervisor")
#: Kernel and device interfaces: refused even when a root contains them (e.g. a root of "/").
FORBIDDEN = ("/proc", "/sys", "/dev")

_FIX_ROOTS = "move the file under one of the allowed roots or start the agent with --allowed-path-root"


class PathRefused(ValueError):
    """A host path named by a spec field was refused; the message says which, why and how to fix it."""

    def __init__(self, field: str, path: str, why: str, roots: Sequence[Path | str],
                 *, fix: str | None = None) -> None:
        self.field = field
        self.path = path
        self.why = why
        self.roots = tuple(str(r) for r in roots)
        self.fix = fix or _FIX_ROOTS
        shown = ", ".join(self.roots) or "(none)"
        # repr() keeps the message on one line even for paths holding newlines or NUL bytes.
        super().__init__(f"{field}: host path {path!r} refused: {why} (allowed roots: {shown}); "
                         f"fix: {self.fix}")


def _within(path: str, root: str) -> bool:
    """Containment by whole components: /var/lib/hyperfleet-evil is not inside /var/lib/hyperfleet."""
    if root == "/":
        return path.startswith("/")
    return path == root or path.startswith(root + "/")


def _forbidden_prefix(path: str) -> str | None:
    return next((f for f in FORBIDDEN if _within(path, f)), None)


def confine(path: str, roots: Sequence[Path | str], field: str, *, must_exist: bool = True,
            allowed_devices: Sequence[str] = ()) -> Path:
    """Return the real (symlink-free) path of ``path`` if it lies inside one of ``roots``.

    Raises :class:`PathRefused` otherwise. ``allowed_devices`` are exact paths under /proc, /sys or /dev
    the administrator has explicitly allowed (compared after resolving symlinks on both sides); they are
    allowed whatever the roots.
    """
    root_list = [str(r) for r in roots]
    for r in root_list:
        if not os.path.isabs(r):
            raise ValueError(f"allowed root {r!r} is not an absolute path")

    def refuse(why: str, fix: str | None = None) -> PathRefused:
        return PathRefused(field, path, why, root_list, fix=fix)

    if not isinstance(path, str) or not path:
        raise refuse("is empty", f"set {field} to an absolute path")
    if "\0" in path:
        raise refuse("contains a NUL byte", f"set {field} to an absolute path")
    if not os.path.isabs(path):
        raise refuse("is not an absolute path", f"set {field} to an absolute path under an allowed root")
    if ".." in path.split("/"):
        raise refuse("contains a '..' component", "name the file without '..'")

    real_roots = [os.path.realpath(r) for r in root_list]
    resolved = os.path.realpath(path)  # follows every symlink, also one in a middle component
    devices = {os.path.realpath(d) for d in allowed_devices}
    lexical = os.path.normpath(path)
    if resolved not in devices:
        for candidate in (lexical, resolved):
            prefix = _forbidden_prefix(candidate)
            if prefix is not None:
                via = "" if candidate == lexical else f" (it is a symlink leading to {resolved})"
                raise refuse(f"is under {prefix}, which is never allowed{via}",
                             "name a regular file; kernel and device interfaces cannot be used here")
        if not any(_within(resolved, r) for r in real_roots):
            # Compare against the roots as written, too: the root itself may be a symlink.
            if any(_within(lexical, r) for r in (*root_list, *real_roots)):
                raise refuse(f"is a symlink leading to {resolved} outside the allowed roots")
            raise refuse("is outside the allowed roots")
    if must_exist and not os.path.exists(resolved):
        raise refuse("does not exist", f"create the file or correct {field}")
    return Path(resolved)
