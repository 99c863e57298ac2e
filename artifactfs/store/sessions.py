"""In-memory state of files open for writing in the mount.

A ``WriteSession`` is the daemon's half of a mount upload session (the other half is its row in
``sessions``). All writable handles on one inode share one ``WriteSession``, as they share one
file on a local disk; the artifact commits when the last of them is released.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .metadata import Entry


@dataclass(eq=False)
class WriteSession:
    id: str
    entry_id: int
    fd: int  # the staging file, O_RDWR; the mount pwrite()s into it directly
    writers: int = 1
    # fsync was called: the commit must be durable too (DESIGN §6).
    synced: bool = False
    # What mtime the artifact commits with: the last write's time, or a time set after it
    # (the ``mtime_ns`` property).
    _mtime_ns: int = field(default_factory=time.time_ns)
    # And its ctime: the time of the last write or of the last time set (``ctime_ns``).
    _ctime_ns: int = field(default_factory=time.time_ns)
    # A passthrough session's staging file's mtime just after a time was set on it: while
    # it is still that (no write since), the time set is the session's, whole, since the
    # staging file's disk may keep less (ext4: no nanoseconds at its first second, 1901).
    _staged_mtime_ns: int | None = None
    # Set once the staging file holds its starting bytes (a copy of the artifact can take a
    # while, in a thread); openers that join meanwhile wait on it.
    ready: trio.Event = field(default_factory=trio.Event)
    # Set when the commit (or abort) after the last release has finished.
    closed: trio.Event = field(default_factory=trio.Event)
    committing: bool = False
    # A write failed for want of space: the file lacks bytes its writer was told are lost,
    # so it must not commit (DESIGN §2: a commit is whole or nothing); close reports ENOSPC.
    nospace: bool = False
    failed: BaseException | None = None
    # Writes into a version no longer at its name (open_detached_write): never commits.
    detached: bool = False
    # The committed entry the commit replaced (set by the commit): a version an open that
    # raced it may still get (fs/replaced.py).
    replaced: Entry | None = None
    # sha256 of bytes [0, hashed), fed by writes that arrived in order (cp, dd, a training
    # job saving a checkpoint), so the commit need not read the whole file again. None once
    # a write lands anywhere but at ``hashed``, or the file was truncated or copied into:
    # then the digest is computed from the blob after the commit (store/digests.py).
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0
    # The kernel writes the staging file itself (FUSE passthrough, fs/passthrough_writes.py):
    # the daemon sees no write, so there is no running digest, the file's own mtime is the
    # session's, and each commit copies the file (store/snapshot.py says why).
    passthrough: bool = False
    # The staging file's state when the last commit of a passthrough session started copying
    # it (snapshot.FileState): the same state later means nothing was written since.
    committed_state: Any = None
    # Its last writer closed and the close committed it; the next writer to join clears it.
    closed_by_writers: bool = False
    # A passthrough session's fsync copies the file for its commit, durably (writes.py
    # ``sync_write``): (state, staging id of the copy, size). Once such a
    # copy went unused (the file changed after it), later fsyncs just fsync the file.
    prepared: Any = None
    prepare_wasted: bool = False
    # The staging file became a committed version's blob (published as itself, not copied):
    # from then on nothing may truncate or write ``fd``, even if the rest of the commit fails.
    fd_is_blob: bool = False

    @property
    def being_written(self) -> bool:
        """Whether a writer still has the file open, as far as anyone outside can tell: a
        passthrough session committed at the close of its last writer lives on only until
        the kernel's RELEASE (a descriptor it cannot see may write on, snapshot.py)."""
        return not self.closed_by_writers

    @property
    def mtime_ns(self) -> int:
        if self.passthrough:
            mtime = os.fstat(self.fd).st_mtime_ns
            return self._mtime_ns if mtime == self._staged_mtime_ns else mtime
        return self._mtime_ns

    @mtime_ns.setter
    def mtime_ns(self, value: int) -> None:
        self._mtime_ns = value
        self._ctime_ns = time.time_ns()
        if self.passthrough:
            # Kept on the staging file, which the kernel's writes move on from here.
            os.utime(self.fd, ns=(value, value))
            self._staged_mtime_ns = os.fstat(self.fd).st_mtime_ns

    @property
    def ctime_ns(self) -> int:
        if self.passthrough:
            # Not the staging file's ctime, which its publication as a blob moves (a link).
            mtime = os.fstat(self.fd).st_mtime_ns
            if mtime != self._staged_mtime_ns:  # the kernel wrote it since, at its mtime
                return max(mtime, self._ctime_ns)
        return self._ctime_ns

    @ctime_ns.setter
    def ctime_ns(self, value: int) -> None:
        self._ctime_ns = value

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def fed(self, buf: bytes, offset: int, n: int) -> None:
        """Account ``n`` bytes of ``buf`` written at ``offset`` in the running digest."""
        if self.hasher is None:
            return
        if offset == self.hashed:
            self.hasher.update(buf if n == len(buf) else memoryview(buf)[:n])
            self.hashed += n
        else:
            self.hasher = None

    def truncated(self, size: int) -> None:
        if size == 0:
            self.hasher, self.hashed = hashlib.sha256(), 0
        elif self.hasher is not None and size != self.hashed:
            self.hasher = None

    def running_digest(self, size: int) -> tuple[str, int] | None:
        """(sha256, size) if every byte of a ``size``-byte file went through the digest."""
        if self.hasher is not None and self.hashed == size:
            return self.hasher.hexdigest(), size
        return None

    def wrote(self) -> None:
        """Record a write: on a local disk a write moves mtime to now."""
        self.mtime_ns = time.time_ns()
