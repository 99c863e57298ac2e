"""Summarise a py-spy ``--format raw`` profile (collapsed stacks): where the daemon's samples
go, by function, self and inclusive. ``python scripts/benchlib/pyspy.py FILE [N]``."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def summarise(path: str, top: int = 25) -> str:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    out = [f"{path}: {total} samples"]
    out.append("  self:")
    out += [f"    {c / total:6.1%}  {f}" for f, c in self_c.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {c / total:6.1%}  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25))
