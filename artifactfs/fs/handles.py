"""The mount's open files and open directories: state only the mount has."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from ..store import Entry, WriteSession

# How long entries fetched for one readdir reply may wait for the next (seconds).
PENDING_TTL = 1.0


@dataclass(eq=False)
class FileHandle:
    """One open file description of the kernel (one open(2), shared by dup and fork)."""

    inode: int  # the kernel's inode number (entry id and version)
    entry_id: int
    # What the file was when opened (last known row): stat on a file unlinked while open.
    entry: Entry
    # Read-only fd this handle owns: the version it reads when no one is writing the inode.
    fd: int | None = None
    # The inode's write session while this handle is one of its writers.
    ws: WriteSession | None = None
    writable: bool = False
    # Opened as a version no longer at its name (replaced.py): writes never commit.
    detached: bool = False
    # Answered with passthrough: the kernel reads (or maps) the backing file, not the daemon.
    passthrough: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass(eq=False)
class DirHandle:
    """One opendir: the directory and the entries a batch fetched beyond the last reply."""

    entry_id: int
    after: int = -1
    pending: list[Entry] = field(default_factory=list)
    complete: bool = False
    fetched_at: float = 0.0
    removals: int = 0

    def keep(self, after: int, entries: list[Entry], complete: bool, removals: int) -> None:
        self.after, self.pending, self.complete = after, entries, complete
        self.fetched_at, self.removals = time.monotonic(), removals

    def take(self, after: int, removals: int) -> list[Entry] | None:
        """The kept entries if the kernel continues where the last reply stopped, soon, and
        nothing was removed, renamed or replaced since they were read (readdirplus hands the
        kernel a name and attributes it caches for a day: they must be true when sent)."""
        if (after != self.after or not self.pending or removals != self.removals
                or time.monotonic() - self.fetched_at > PENDING_TTL):
            return None
        entries, self.pending, self.after = self.pending, [], -1
        return entries
