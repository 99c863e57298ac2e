"""The bytes of a READ reply, without copying them through the daemon.

A READ answered with ``pread`` costs two copies of every byte on one Python thread: ``pread``
into a fresh ``bytes``, then pyfuse3's reply (``writev`` to /dev/fuse) into the mount's page
cache. On a VM the first copy is the dear one after a cache drop: a fresh 1 MiB buffer is
memory the host may have reclaimed (free page reporting), and touching it costs a host fault
per page (docs/PLATFORM.md, Virtual machines). So a large READ is answered with a
read-only mapping of the file's range instead: the kernel copies straight from the file's page
cache into the reply, and nothing is allocated per byte.

Why this is safe:

- pyfuse3 hands the returned buffer to ``fuse_reply_buf`` (a ``writev``) as soon as the handler
  returns, with no checkpoint in between (``fuse_read_async`` in pyfuse3 3.5's handlers.pxi),
  and drops its reference right after; the mapping is unmapped when that reference goes, so no
  mapping outlives its reply and the daemon's memory does not grow with what it serves.
- Only the kernel reads the mapped bytes, inside ``writev``: were a page not backed by the file
  (the file shorter than the mapping), that ``writev`` would fail with EFAULT; no Python code
  touches them, so there is no SIGBUS to kill the daemon.
- The file cannot shrink between the ``fstat`` that bounds the mapping and the reply: every
  truncate of a file the mount reads (a staging file, ``WriteSession``) runs on the trio thread,
  and committed blobs never change (docs/CONCURRENCY.md, invariant 6).

Small READs (small files, the tail of a file) take ``pread``: mapping costs more than copying a
few pages. So does a range not yet in the page cache (a cold read): ``pread`` keeps the fd's
sequential read-ahead ahead of the reader, which faulting a mapping in does not.
"""

from __future__ import annotations

import errno
import mmap
import os

# From this many bytes on, a READ is answered from a mapping. Of a cached file, mapping
# (MAP_POPULATE) and unmapping a range costs a fixed few microseconds, so it loses to a
# pread of a few pages and wins once pread's copy into a fresh buffer grows past that
# (re-measure by timing both on a cached file at 16 KiB to 1 MiB).
MAP_MIN_BYTES = 128 << 10
_PAGE_MASK = ~(mmap.ALLOCATIONGRANULARITY - 1)


def read_reply(fd: int, offset: int, size: int) -> bytes | memoryview:
    """Up to ``size`` bytes of ``fd`` from ``offset``, as pyfuse3's READ reply.

    The result must go straight back to pyfuse3 (see the module docstring): a memoryview of a
    mapping is valid only until the file changes.
    """
    if size < MAP_MIN_BYTES:
        return os.pread(fd, size, offset)
    end = min(offset + size, os.fstat(fd).st_size)
    if end - offset < MAP_MIN_BYTES:
        return os.pread(fd, size, offset) if end > offset else b""
    if not _resident(fd, end - 1):
        # Not in the page cache yet (a cold read): pread, whose sequential read-ahead keeps
        # the disk busy while the daemon replies; faulting a mapping in reads around each
        # fault instead, and cold files read slower that way.
        return os.pread(fd, size, offset)
    base = offset & _PAGE_MASK
    # MAP_POPULATE maps every page in the mmap call, instead of one fault per 64 KiB while
    # the kernel copies the reply.
    m = mmap.mmap(fd, end - base, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                  prot=mmap.PROT_READ, offset=base)
    return memoryview(m)[offset - base:end - base]


_probe = memoryview(bytearray(1))


def _resident(fd: int, offset: int) -> bool:
    """Whether the byte at ``offset`` is in the page cache (a 1-byte read that may not wait);
    read-ahead fills a range from its start, so its last byte stands for all of it."""
    try:
        return os.preadv(fd, [_probe], offset, os.RWF_NOWAIT) == 1
    except BlockingIOError:
        return False
    except OSError as exc:
        # A data directory on tmpfs refuses RWF_NOWAIT (EOPNOTSUPP): its pages are memory,
        # always resident. Any other error is left to the read that follows to report.
        return exc.errno == errno.EOPNOTSUPP
