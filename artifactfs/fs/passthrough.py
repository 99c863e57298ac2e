"""FUSE passthrough: the kernel reads a committed artifact straight from its blob.

With passthrough (Linux >= 6.9, libfuse >= 3.17, the patched pyfuse3 of scripts/setup, and
CAP_SYS_ADMIN), an open reply may name a *backing file*; the kernel then serves read(2), mmap
and splice of that open file from it, at the native file system's speed, without a READ request
or a second page cache (docs/PERFORMANCE.md). What Linux requires (docs/PLATFORM.md, FUSE
passthrough; fs/fuse/iomode.c and inode.c):

- No writeback cache on the connection: the kernel does not enable passthrough when INIT asks
  for both (the backing-file ioctl then fails with EPERM), so a passthrough mount sends every
  write(2) to the daemon as it comes.
- One io mode per inode at a time: while an inode has a passthrough open, an open without
  passthrough fails with EIO, and while it has a cached open, a passthrough open fails with
  EIO. The daemon decides each open's mode, so the rule is kept here: an inode's opens are all
  passthrough or all cached, and the first open since the inode was last closed decides.
- One backing file per inode: every passthrough open of an inode must name the same backing id
  (EBUSY, seen as EIO, otherwise), so the id is kept per inode while any of its passthrough
  opens is open, and closed with the last.
- FOPEN_KEEP_CACHE is refused with passthrough; FOPEN_DIRECT_IO and FOPEN_NOFLUSH are allowed.
  A passthrough open with FOPEN_DIRECT_IO sends read and write to the daemon, but ``mmap`` still
  maps the backing file, and a shared writable mapping of it writes into that file even though
  the daemon opened it read-only (measured: it wrote into a committed blob). So no open that
  may write ever shares a backing file.

Which opens go through (operations.py): read-only, buffered opens of a committed version, when
the inode has no cached open and no writer (an O_DIRECT open joins with direct_io: through a
backing file it would take the disk's alignment rules). A change of the content through the
mount while the kernel reads the inode through its blob (an open for writing, a truncate) moves
the name to a new inode first, as another face's replacement does (inodes.py, replaced.py): the
writer's OPEN is answered ESTALE, the kernel looks the name up again and opens the new inode,
which is cached; the readers that opened before keep reading the version they opened, as
after a rename over the file, until they reopen. That is the mount's rule in either mode
(docs/SEMANTICS.md, Overwriting; operations.py moves the name whenever readers hold the inode),
so passthrough changes speed, not meaning.
Since the content of an inode changes only through its page cache (cached writes, no writeback
cache) or by moving its name away, cached opens keep ``keep_cache``.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

import pyfuse3

log = logging.getLogger("artifactfs.fs")


def available() -> bool:
    """Whether this pyfuse3 can ask for passthrough (the build of scripts/setup)."""
    return hasattr(pyfuse3, "passthrough_enabled") and hasattr(pyfuse3.FileInfo, "backing_id")


CAP_SYS_ADMIN = 21


def privileged() -> bool:
    """Whether this process may register backing files (CAP_SYS_ADMIN). Asked before INIT:
    without it every backing-file ioctl fails with EPERM, and asking the kernel for
    passthrough would only cost the writeback cache."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return os.geteuid() == 0
    return bool(int(caps.split()[1], 16) >> CAP_SYS_ADMIN & 1)


@dataclass
class _Backing:
    backing_id: int
    opens: int


class BackingFiles:
    """The backing id each inode's passthrough opens share, counted by open handle. A shared
    read handle (shared_reads.py) counts once for all the opens pyfuse3 answers with it, from
    its sharing until it is closed, so the id outlives idle spells and is registered once."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._by_inode: dict[int, _Backing] = {}

    def holds(self, inode: int) -> bool:
        """Whether the kernel reads ``inode`` through a backing file (its opens must too)."""
        return inode in self._by_inode

    def backing_id(self, inode: int) -> int:
        """The backing id ``inode``'s passthrough opens name (it must hold one)."""
        return self._by_inode[inode].backing_id

    def share(self, inode: int) -> int:
        """The backing id of an inode already in passthrough, for one more read-only open
        of it (never a writer's: the module docstring says why)."""
        b = self._by_inode[inode]
        b.opens += 1
        return b.backing_id

    def open(self, inode: int, fd: int) -> int | None:
        """A backing id for the first passthrough open of ``inode``, backed by ``fd`` (the
        kernel takes its own reference: the caller may close ``fd``). None when the kernel
        refuses: the open is then served cached, and after a refusal for want of privilege
        (EPERM: not CAP_SYS_ADMIN) the mount stops asking."""
        try:
            backing_id = pyfuse3.passthrough_open(fd)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP):
                self.enabled = False
                log.warning("passthrough refused by the kernel (%s): reads are served by the"
                            " daemon from now on", exc)
            else:
                log.warning("passthrough refused for inode %#x (%s): this open is served by"
                            " the daemon", inode, exc)
            return None
        self._by_inode[inode] = _Backing(backing_id, 1)
        return backing_id

    def release(self, inode: int) -> None:
        """One passthrough open of ``inode`` closed; the last one frees the backing id (the
        kernel dropped the inode's backing file when that file closed, before RELEASE)."""
        b = self._by_inode[inode]
        b.opens -= 1
        if b.opens:
            return
        del self._by_inode[inode]
        try:
            pyfuse3.passthrough_close(b.backing_id)
        except OSError as exc:
            log.warning("closing backing id %d of inode %#x: %s", b.backing_id, inode, exc)
