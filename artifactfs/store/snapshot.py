"""Committing a staging file the kernel writes by itself (a passthrough writer's).

With FUSE passthrough for writers (fs/passthrough_writes.py) the kernel writes the session's
staging file directly: the daemon sees no WRITE, so it keeps no running digest, and it cannot
stop the kernel writing: a handle that a commit at close(2) made an artifact may still be
written through another descriptor of the same open file (``dd`` and shells dup2() and close
the first descriptor; a forked child closes its copy; the kernel cannot tell the daemon which
close is the last). So the staging file never becomes the blob while the kernel may write it:
each commit **copies** it into a fresh file, which becomes the blob (its digest is computed
from it after the commit, digests.py, so it is always that of the blob's bytes, whatever the
writers do meanwhile); and whether the copy is still the staging file's content is told by
the file's state (size, mtime, ctime):

- ext4 on Linux >= 6.13 has multigrain timestamps: once a ctime has been read (fstat), the next
  change of the file gets a ctime that differs from it (measured: 20,000 of 20,000 writes
  right after an fstat moved it), so an unchanged state means no write started since;
- a buffered write holds the inode's lock exclusively from its timestamp update to the end of
  its copy, and ``lseek(SEEK_HOLE)`` takes it shared (fs/ext4/file.c ``ext4_llseek``): the
  lseek after the fstat waits for a write that was under way, so the copy never sees half of
  one that the state already counts.

A write during the copy leaves the copy a mix of before and after (as a reader racing a
writer on a disk sees), and a state that differs: the session commits again when it is next
flushed or released, so the last commit is the file's final content.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

from .blobs import start_writeback

# Bytes copied by one copy_file_range call (the kernel copies page cache to page cache on
# ext4); an fsync's copy starts writing each range back as soon as it is copied, so the disk
# writes while the next range is copied (the fsync at the end waits for the last ones).
COPY_CHUNK = 16 << 20


class FileState(NamedTuple):
    size: int
    mtime_ns: int
    ctime_ns: int


def settled_state(fd: int) -> FileState:
    """The file's state, read before waiting out any write under way (module docstring)."""
    st = os.fstat(fd)
    with contextlib.suppress(OSError):  # ENXIO for an empty file, after taking the lock
        os.lseek(fd, 0, os.SEEK_HOLE)
    return FileState(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def copy_file(src: int, dst: int, *, durable: bool = False) -> int:
    """Copy all of ``src`` into the empty file ``dst``; the number of bytes copied.

    Blocking: run it in a worker thread if the file is big. ``durable``: ``dst`` is fsynced
    when it returns, its writeback started range by range as the copy goes (an fsync of a
    written file, ``dd conv=fsync``: the disk's time then overlaps the copy's instead of
    following it).
    """
    pos = 0
    while True:
        n = os.copy_file_range(src, dst, COPY_CHUNK, pos, pos)
        if n == 0:
            break
        if durable:
            start_writeback(dst, pos, n)
        pos += n
    if durable:
        os.fsync(dst)
    return pos
