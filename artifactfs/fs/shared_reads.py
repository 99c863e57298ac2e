"""Read-only opens answered in C: one read handle per inode, shared by all its readers.

Warm, a small file costs the kernel's OPEN, FLUSH and RELEASE and nothing else (its pages
and attributes are cached); through pyfuse3 and trio each request that starts a task costs
several times what it costs in a C daemon (docs/PLATFORM.md). So the mount opens one read
handle (one fd on the blob) for an inode that is a plain committed artifact, and registers it
with the patched pyfuse3 (``share_read_handle``): pyfuse3 then answers every later read-only
OPEN of that inode itself, with that handle, ``keep_cache`` and ``noflush``, and their
RELEASEs too, counting the opens, without a Python handler or a task. READs on the handle
reach ``Operations.read`` as before. On a passthrough mount (passthrough.py) the shared handle
holds the inode's backing id, registered once when the inode is shared and closed when the
handle is (unshared and no open left, FORGET, the idle bound), and pyfuse3 answers the opens
with it (FOPEN_PASSTHROUGH, no ``keep_cache``, ``direct_io`` for O_DIRECT): the kernel allows
one io mode per inode, and one backing file, so every open of a shared inode is passthrough.

What keeps it correct: a shared handle reads what a new opener of its inode must see, so the
mount unshares the inode (``unshare``) whenever that stops being so, before anything else can
open it:

- the inode no longer names the entry's bytes: another face replaced or removed the artifact,
  the mount unlinked it or renamed something over it, a commit went through a replaced inode
  (every place that calls ``ReplacedVersions.retire``);
- the file is written through the mount (a writable open, a write session, a truncate): a
  reader of a file being rewritten reads the writer's bytes, which the per-open handles of
  operations.py arrange; no inode with a writer or a write session is shared;
- the kernel forgets the inode (FORGET);
- a thread's open is the kernel's retry of one answered ESTALE (replaced.py): that thread's
  OPENs reach Python until its retry is used up (``defer_opens``).

Unsharing stops new opens at once; opens already answered keep their handle (an open file
keeps its bytes, as on a disk) and it is closed at the last one's RELEASE, which pyfuse3 then
hands to ``Operations.release``. A shared handle no one has open still holds an fd, so idle
ones are bounded (``idle_max``): past it, the oldest idle ones are unshared and closed.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable

import pyfuse3

log = logging.getLogger("artifactfs.fs")

# The patched pyfuse3 of scripts/setup; with a stock one every open reaches Python.
AVAILABLE = hasattr(pyfuse3, "share_read_handle")
# Its third patch: shared handles of a passthrough mount answered with their backing id.
PASSTHROUGH = AVAILABLE and hasattr(pyfuse3, "SHARED_READS_PASSTHROUGH")

# Shared handles no one has open are bounded: each holds one fd (and pins the blob's inode in
# the kernel), and a store of 1,000,000 artifacts read once each must not keep 1,000,000.
# Reading more files than this in a loop opens each through Python again (no worse than
# without sharing). The bound leaves room below the fd limit for writers, HTTP and SQLite.
IDLE_MAX_CAP = 16384
FDS_KEPT_FREE = 4096
IDLE_MIN = 64


def raise_fd_limit() -> None:
    """Raise the daemon's soft fd limit to its hard one (the shared handles want fds; a soft
    limit is often 1024 where the hard one is far higher). Called once by the mount."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.debug("could not raise the fd limit %d -> %d: %s", soft, hard, exc)


def fd_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


# Overrides the bound (the tests set it low to see it hold).
IDLE_MAX_ENV = "ARTIFACTFS_SHARED_READS_IDLE_MAX"


def idle_max(limit: int) -> int:
    """How many shared handles may sit idle under the fd limit ``limit``."""
    configured = os.environ.get(IDLE_MAX_ENV)
    if configured:
        return max(1, int(configured))
    return max(IDLE_MIN, min(IDLE_MAX_CAP, limit - FDS_KEPT_FREE))


class SharedReads:
    """Which inodes have a shared read handle, through the patched pyfuse3's table.

    ``close(fh)`` is the mount's: it forgets the file handle and closes its fd; called for a
    handle that pyfuse3 has forgotten and no open holds.
    """

    def __init__(self, close: Callable[[int], None], *, enabled: bool = AVAILABLE,
                 max_idle: int | None = None) -> None:
        self.enabled = enabled and AVAILABLE
        self._close = close
        self.max_idle = max_idle if max_idle is not None else idle_max(fd_limit())
        # More inodes shared than max_idle after the last share: the next share first closes
        # idle ones (before, so that it never closes the handle being shared).
        self._over = False

    def handle(self, inode: int) -> int | None:
        """The handle ``inode`` is shared with, or None."""
        if not self.enabled:
            return None
        fh: int | None = pyfuse3.shared_read_handle(inode)
        return fh

    def share(self, inode: int, fh: int, backing_id: int = 0) -> None:
        """From now on pyfuse3 answers read-only opens of ``inode`` with ``fh`` (and with
        passthrough on ``backing_id``, if not 0, which the caller keeps registered while
        ``fh`` is shared or open). The caller replies to the open at hand with ``fh`` itself
        (pyfuse3 counts that one too)."""
        if self._over:
            self._close_idle(max(1, self.max_idle // 4))
        shared = (pyfuse3.share_read_handle(inode, fh, backing_id) if backing_id
                  else pyfuse3.share_read_handle(inode, fh))
        self._over = shared > self.max_idle

    def _close_idle(self, count: int) -> None:
        """Unshare and close the ``count`` oldest shared handles no one has open (amortized:
        once per ``count`` shares)."""
        for _, fh in pyfuse3.unshare_idle_read_handles(count):
            self._close(fh)

    def unshare(self, inode: int) -> None:
        """New opens of ``inode`` reach Python again; its handle closes now if no open holds
        it, else at its last RELEASE (``Operations.release``)."""
        if not self.enabled:
            return
        result = pyfuse3.unshare_read_handle(inode)
        if result is not None and result[1] == 0:
            self._close(result[0])

    def defer_opens(self, pid: int, defer: bool) -> None:
        """While ``defer``, thread ``pid``'s opens reach Python (replaced.py's retry)."""
        if self.enabled:
            pyfuse3.defer_opens(pid, defer)

    def idle(self) -> int:
        """Shared handles no open holds (open files, less these, are really open)."""
        if not self.enabled:
            return 0
        count: int = pyfuse3.shared_read_stats()["idle"]
        return count

    def close_idle(self) -> None:
        """Unshare and close every shared handle no open holds (tests, whose handlers get
        no opens counted: pyfuse3's tables outlive one Operations)."""
        if self.enabled:
            self._close_idle(1 << 30)

    @staticmethod
    def stats() -> dict[str, int]:
        """pyfuse3's counters: OPENs and RELEASEs it answered, inodes shared, handles."""
        if not AVAILABLE:
            return {}
        stats: dict[str, int] = pyfuse3.shared_read_stats()
        return stats
