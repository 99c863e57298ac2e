"""Entry rows as the kernel sees them: ``EntryAttributes`` and the cache timeouts.

Entries are immutable once committed and every change made by another face is pushed to the
kernel as an invalidation (kernel_cache.py), so the kernel may keep names and attributes for a
long time: with timeouts of 0 every ``stat`` and ``ls -l`` reaches the daemon (docs/PLATFORM.md).
"""

from __future__ import annotations

import stat

import pyfuse3

from ..store import Entry

# A day: nothing expires on its own while the mount runs; invalidations keep the cache true.
CACHE_TIMEOUT = 86400.0
# st_blksize: tools size their buffers from it (cp uses max(st_blksize, 128 KiB)); the
# kernel's largest FUSE write is 1 MiB.
BLOCK_SIZE = 1 << 20

_KIND_BITS = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK}


def entry_attributes(e: Entry, *, inode: int, subdirs: int = 0, nlink: int | None = None
                     ) -> pyfuse3.EntryAttributes:
    """The kernel's view of one entry under its inode number (inodes.py); ``subdirs`` gives a
    directory its POSIX link count."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = inode
    attr.generation = 0
    attr.entry_timeout = CACHE_TIMEOUT
    attr.attr_timeout = CACHE_TIMEOUT
    attr.st_mode = _KIND_BITS[e.kind] | (e.mode & 0o7777)
    if nlink is not None:
        attr.st_nlink = nlink
    else:
        attr.st_nlink = 2 + subdirs if e.is_dir else 1
    attr.st_uid = e.uid
    attr.st_gid = e.gid
    attr.st_rdev = 0
    if e.is_symlink:
        attr.st_size = len((e.target or "").encode("utf-8", "surrogateescape"))
    elif e.is_dir:
        attr.st_size = 0
    else:
        attr.st_size = e.size
    attr.st_blksize = BLOCK_SIZE
    attr.st_blocks = (attr.st_size + 511) // 512
    attr.st_mtime_ns = e.mtime_ns
    # Reads never move atime (the mount is noatime): it changes by utimensat only.
    attr.st_atime_ns = e.atime_ns
    attr.st_ctime_ns = e.ctime_ns
    return attr
