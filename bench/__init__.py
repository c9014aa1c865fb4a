"""Benchmarks: each ``*_bench.py`` prints its own figures (see README.md)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def discard(work: Path) -> None:
    """Remove a bench's work directory, or keep it (logs, etcd) when BENCH_KEEP is set."""
    if os.environ.get("BENCH_KEEP"):
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
