"""Committing a staging file the kernel writes by itself (a passthrough writer's).

With FUSE passthrough for writers (fs/passthrough_writes.py) the kernel writes the session's
staging file directly: the daemon sees no WRITE, so it keeps no running digest, and it cannot
stop the kernel writing: a handle that a commit at close(2) made an artifact may still be
written through another descriptor of the same open file (``dd`` and shells dup2() and close
the first descriptor; a forked child closes its copy; the kernel cannot tell the daemon which
close is the last). So the staging file never becomes the blob while the kernel may write it:
each commit **copies** it into a fresh file and hashes what the copy holds. The digest is
therefore always that of the blob's bytes, whatever the writers do meanwhile; and whether the
copy is still the staging file's content is told by the file's state (size, mtime, ctime):

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
import hashlib
import os
import queue
import threading
from typing import NamedTuple

# Ranges copied by one copy_file_range call (the kernel copies page cache to page cache on
# ext4), each hashed by a second thread as soon as it is in the copy: hashing (the slower
# half, ~1.5-2 GB/s with SHA-NI) overlaps copying on the other core.
COPY_CHUNK = 16 << 20
HASH_READ = 4 << 20


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


def copy_hashed(src: int, dst: int) -> tuple[str, int]:
    """Copy all of ``src`` into the empty file ``dst``; (sha256, size) of what ``dst`` got.

    Blocking: run it in a worker thread. The digest is read back from ``dst``, which only
    this function writes, so it is the copy's even if ``src`` changes meanwhile.
    """
    ranges: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
    h = hashlib.sha256()
    failed: list[BaseException] = []

    def hash_ranges() -> None:
        buf = bytearray(HASH_READ)
        view = memoryview(buf)
        try:
            while (r := ranges.get()) is not None:
                pos, end = r
                while pos < end:
                    n = os.preadv(dst, [view[:min(HASH_READ, end - pos)]], pos)
                    if n <= 0:
                        raise OSError(f"the copy ended at {pos} of {end} bytes")
                    h.update(view[:n])  # hashlib releases the GIL for large buffers
                    pos += n
        except BaseException as exc:
            failed.append(exc)
            while ranges.get() is not None:  # let the copier finish its puts
                pass

    hasher = threading.Thread(target=hash_ranges, name="artifactfs-copy-hash")
    hasher.start()
    pos = 0
    try:
        while not failed:
            n = os.copy_file_range(src, dst, COPY_CHUNK, pos, pos)
            if n == 0:
                break
            ranges.put((pos, pos + n))
            pos += n
    finally:
        ranges.put(None)
        hasher.join()
    if failed:
        raise failed[0]
    return h.hexdigest(), pos
