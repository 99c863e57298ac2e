"""``artifactfs fsck``: open the data directory (taking its lock) and report on it."""

from __future__ import annotations

import argparse
import sys

from .errors import ArtifactError
from .store import ArtifactStore, default_data_dir
from .store.recovery import fsck


def run_fsck(args: argparse.Namespace) -> int:
    """Exit 0 when clean (or fully repaired), 1 when damage remains, 2 when it cannot run."""
    store = ArtifactStore(args.data or default_data_dir())
    try:
        store.open()
    except ArtifactError as exc:
        print(f"fsck: {exc}", file=sys.stderr)
        return 2
    try:
        report = fsck(store, repair=args.repair)
    finally:
        store.close()
    print(f"checked {report.checked} artifacts")
    for line in report.problems:
        print(f"problem: {line}")
    for line in report.repaired:
        print(f"repaired: {line}")
    for line in report.unrepaired:
        print(f"not repaired: {line}")
    if report.clean:
        print("clean")
        return 0
    return 1 if report.unrepaired or not args.repair else 0
