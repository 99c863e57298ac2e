"""``artifactfs fsck``: take the data directory's lock and report on it, as it is on disk.

fsck does not run start-up recovery: recovery cleans crash leftovers (orphan blobs, staging
files, lost mount writes) without a word, so the report would never show them. fsck reports
them, and ``--repair`` removes them (and what else is safe) saying what it did.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys

from .errors import ArtifactError
from .store import ArtifactStore, default_data_dir
from .store.metadata import Metadata
from .store.recovery import fsck


def run_fsck(args: argparse.Namespace) -> int:
    """Exit 0 when clean (or fully repaired), 1 when damage remains, 2 when it cannot run."""
    root = args.data or default_data_dir()
    store = ArtifactStore(root)
    if not store.data.db_path.is_file():
        print(f"fsck: {root} is not an artifactfs data directory (no meta.db)", file=sys.stderr)
        return 2
    try:
        store.data.acquire()
    except ArtifactError as exc:
        print(f"fsck: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            store.meta = Metadata(store.data.db_path)
        except sqlite3.DatabaseError as exc:
            print(f"fsck: cannot open {store.data.db_path}: {exc}; restore it from a backup",
                  file=sys.stderr)
            return 2
        try:
            # Logged commits the database does not hold yet are committed data, not damage:
            # they go in first, as at any start (commitlog.py).
            redone = store.meta.replay_log(store.replay_logged)
            if redone:
                print(f"applied {redone} commits from the commit log")
            report = fsck(store, repair=args.repair)
        except sqlite3.DatabaseError as exc:
            print(f"fsck: the database is damaged ({exc}); restore meta.db from a backup",
                  file=sys.stderr)
            return 1
        finally:
            store.meta.close()
    finally:
        store.data.release()
    counts = ", ".join(f"{n} {what}" for what, n in report.counts.items())
    print(f"checked {report.checked} artifacts" + (f" ({counts})" if counts else ""))
    for line in report.problems:
        print(f"problem: {line}")
    for line in report.repaired:
        print(f"repaired: {line}")
    for line in report.unrepaired:
        print(f"not repaired: {line}")
    if report.clean:
        print("clean")
        return 0
    if report.unrepaired or not args.repair:
        print(f"{len(report.problems)} problems" + (
            f", {len(report.unrepaired)} need you" if args.repair else
            "; run with --repair to fix what is safe"))
        return 1
    print(f"{len(report.problems)} problems, all repaired")
    return 0
