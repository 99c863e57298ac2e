"""In-memory state of files open for writing in the mount.

A ``WriteSession`` is the daemon's half of a mount upload session (the other half is its row in
``sessions``). All writable handles on one inode share one ``WriteSession``, as they share one
file on a local disk; the artifact commits when the last of them is released.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import trio


@dataclass(eq=False)
class WriteSession:
    id: str
    entry_id: int
    fd: int  # the staging file, O_RDWR; the mount pwrite()s into it directly
    writers: int = 1
    # fsync was called: the commit must be durable too (DESIGN §6).
    synced: bool = False
    # What mtime the artifact commits with: the last write's time, or a time set after it.
    mtime_ns: int = field(default_factory=time.time_ns)
    # Set once the staging file holds its starting bytes (a copy of the artifact can take a
    # while, in a thread); openers that join meanwhile wait on it.
    ready: trio.Event = field(default_factory=trio.Event)
    # Set when the commit (or abort) after the last release has finished.
    closed: trio.Event = field(default_factory=trio.Event)
    committing: bool = False
    # A write failed for want of space: the file lacks bytes its writer was told are lost,
    # so it must not commit (DESIGN §5: nothing half-committed); close reports ENOSPC.
    nospace: bool = False
    failed: BaseException | None = None

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def wrote(self) -> None:
        """Record a write: on a local disk a write moves mtime to now."""
        self.mtime_ns = time.time_ns()
