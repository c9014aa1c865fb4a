"""Sum py-spy collapsed stacks (``scale_bench.py --profile DIR``) by where the time goes.

Prints, per file in DIR: samples per top-level package of the innermost frame (where the
CPU is spent: kopf, kubernetes, urllib3, ssl, pydantic, our own code, ...), and the
Hyperfleet functions with the most samples inclusive (what the spending is for).

Usage: python bench/profile_summary.py DIR [--top 25]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?):\d+\)$")
OURS = ("operator/", "reconcilers/", "hyperfleet/")


def package(path: str) -> str:
    """The package a frame's file belongs to (``kopf``, ``asyncio``, ``hyperfleet``)."""
    if path.startswith(OURS):
        return "hyperfleet"
    tail = path.split("site-packages/")[-1]
    head = tail.split("/")[0]
    return head.removesuffix(".py") if head else tail


def summarise(lines: list[str], top: int) -> tuple[int, Counter[str], Counter[str]]:
    leaf: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [m for f in stack.split(";") if (m := FRAME.match(f))]
        if not frames:
            continue
        leaf[package(frames[-1]["file"])] += n
        seen = {f"{m['func']} ({m['file']})" for m in frames if m["file"].startswith(OURS)}
        for name in seen:
            ours[name] += n
    return total, leaf, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    for path in sorted(args.dir.glob("*.txt")):
        total, leaf, ours = summarise(path.read_text().splitlines(), args.top)
        print(f"\n== {path.stem}: {total} samples")
        print("  innermost frame's package:")
        for name, n in leaf.most_common(12):
            print(f"    {100 * n / max(total, 1):5.1f}%  {name}")
        print("  Hyperfleet functions, inclusive:")
        for name, n in ours.most_common(args.top):
            print(f"    {100 * n / max(total, 1):5.1f}%  {name}")


if __name__ == "__main__":
    main()
