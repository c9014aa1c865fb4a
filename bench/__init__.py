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


def cpu_seconds(pid: int) -> float:
    """A process's own user+system CPU so far, from /proc (not its children's: the VMMs
    an agent starts are not the operator's cost). 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process (default: this one), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def print_figures(title: str, figures: list[tuple[str, str]]) -> None:
    """A bench's figures, one aligned ``key  value`` line each under a title."""
    width = max((len(key) for key, _ in figures), default=0)
    print(f"\n{title}")
    for key, value in figures:
        print(f"  {key:<{width}}  {value}")
