"""Tell the kernel what another face changed, so its long-lived caches stay true.

The mount lets the kernel keep names, attributes and pages for a day (attributes.py); a change
made through the HTTP face or the Python API is reported by the store (``add_listener``), mapped
to kernel inode numbers by the mount (operations.py, inodes.py) and turned here into
``invalidate_entry`` / ``invalidate_inode``.

Why a queue and a thread: the store reports changes from inside its own calls, which may run
inside a FUSE request; pyfuse3's invalidations block until related requests finish (and, with
the writeback cache, until dirty pages are written back through this very daemon), so calling
them inline could deadlock. One task drains the queue and makes each call in a worker thread,
leaving the trio loop free to answer the requests the kernel sends meanwhile.

Directory listings: the kernel keeps them (FOPEN_CACHE_DIR, operations.py ``opendir``) in the
directory's pages and serves them without asking. Between a change and the moment the worker
thread has dropped those pages, ``listing_stale`` tells ``opendir`` to have the kernel drop them
at once, so a listing that starts after another face's request returned shows its change.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass

import pyfuse3
import trio

log = logging.getLogger("artifactfs.fs")


@dataclass(frozen=True, slots=True)
class Invalidation:
    """What the kernel must drop, in its own inode numbers.

    kind: 'name' (``name`` in ``parent`` now leads elsewhere: a replaced artifact's new inode,
    or a new entry), 'removed' (``name`` is gone; ``inode`` was its inode).
    """

    kind: str
    parent: int
    name: str
    inode: int = 0


class KernelCache:
    """Queue of invalidations and the task that makes them."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Invalidation](math.inf)
        # Directory inode -> invalidations of it queued or running (bounded by the queue).
        self._pending: Counter[int] = Counter()
        # Whether a kernel is connected (``run`` started): handlers called without one (the
        # tests of layer 5) must not reach pyfuse3's notifications.
        self._live = False

    def queue(self, item: Invalidation) -> None:
        """Never blocks (an unbounded queue), never calls the kernel."""
        self._pending[item.parent] += 1
        self._send.send_nowait(item)

    def listing_stale(self, dir_inode: int) -> bool:
        """Whether the kernel may still hold a listing of this directory from before a
        change (its invalidation is queued or running)."""
        return dir_inode in self._pending

    def drop_attributes(self, inode: int) -> None:
        """Make the kernel ask the daemon for ``inode``'s attributes again, now, inline (a
        reader's inode whose name moved away: its fstat must show nlink 0 once the request
        that moved it is answered). Safe in a handler, unlike the queued kinds: an
        attribute-only invalidation takes no inode lock and waits for no writeback
        (fuse_reverse_inval_inode with offset -1)."""
        if self._live:
            _quietly(pyfuse3.invalidate_inode, inode, True)

    async def run(self) -> None:
        self._live = True
        async with self._receive:
            async for item in self._receive:
                try:
                    # Abandoned on cancel: at shutdown the kernel may hold the call until the
                    # unmount aborts the requests no one will answer any more.
                    await trio.to_thread.run_sync(invalidate, item, abandon_on_cancel=True)
                finally:
                    self._pending[item.parent] -= 1
                    if self._pending[item.parent] <= 0:
                        del self._pending[item.parent]


def invalidate(item: Invalidation) -> None:
    """Drop what the kernel may hold about one change (runs in a worker thread)."""
    name = os.fsencode(item.name)
    if item.kind == "removed":
        _quietly(pyfuse3.invalidate_entry, item.parent, name, item.inode)
    else:
        # The old inode keeps its pages and size for whoever has it open; only the name and
        # the directory change.
        _quietly(pyfuse3.invalidate_entry, item.parent, name)
    # The directory's attributes and its pages: those hold the listing the kernel keeps
    # (FOPEN_CACHE_DIR, operations.py opendir), names and inode numbers, all now stale. A
    # directory has no dirty pages, so this does not wait for writeback.
    _quietly(pyfuse3.invalidate_inode, item.parent, False)
    log.debug("kernel cache invalidated: %s", item)


def _quietly(fn: object, *args: object) -> None:
    """ENOENT means the kernel held nothing to drop: the usual case, not an error."""
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTCONN, errno.EBADF):
            log.warning("kernel cache invalidation %s%s failed: %s",
                        getattr(fn, "__name__", fn), args, exc)
