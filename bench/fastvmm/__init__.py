"""fastvmm: a small C stand-in for cloud-hypervisor, so benchmarks measure the operator.

The faithful test double is ``hyperfleet.reconcilers.testing.chdouble`` (Python, checks
every call against the OpenAPI contract); this one answers the calls of a normal lifecycle
in microseconds and needs no /dev/kvm. Nothing compiled is committed: the source is built
with ``cc -O2`` on first use into a cache directory named by the source's hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("fastvmm.c")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hyperfleet-bench"


def fastvmm_binary() -> str:
    """Path of the compiled stand-in VMM, building it first if this source is new."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    target = cache_dir() / f"fastvmm-{digest}" / "fastvmm"
    if os.access(target, os.X_OK):
        return str(target)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("fastvmm: no C compiler (cc or gcc) on PATH; set $CC")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses never see half a binary.
    fd, tmp = tempfile.mkstemp(prefix=".fastvmm-", dir=target.parent)
    os.close(fd)
    try:
        out = subprocess.run([cc, "-O2", "-std=gnu11", "-o", tmp, str(SOURCE)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"fastvmm: {cc} failed ({out.returncode}): {out.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)
