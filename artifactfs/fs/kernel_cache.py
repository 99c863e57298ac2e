"""Tell the kernel what another face changed, so its long-lived caches stay true.

The mount lets the kernel keep names, attributes and pages for a day (attributes.py); a change
made through the HTTP face or the Python API is reported by the store (``add_listener``) and
turned here into ``invalidate_inode`` / ``invalidate_entry``.

Why a queue and a thread: the store reports changes from inside its own calls, which may run
inside a FUSE request; pyfuse3's invalidations block until related requests finish (and, with
the writeback cache, until dirty pages are written back through this very daemon), so calling
them inline could deadlock. One task drains the queue and makes each call in a worker thread,
leaving the trio loop free to answer the requests the kernel sends meanwhile.
"""

from __future__ import annotations

import errno
import logging
import math
import os

import pyfuse3
import trio

from ..store import Change

log = logging.getLogger("artifactfs.fs")


class KernelCache:
    """Queue of store changes and the task that invalidates them in the kernel."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Change](math.inf)

    def notice(self, change: Change) -> None:
        """The store's listener: never blocks (an unbounded queue), never calls the kernel."""
        self._send.send_nowait(change)

    async def run(self) -> None:
        async with self._receive:
            async for change in self._receive:
                await trio.to_thread.run_sync(invalidate, change)


def invalidate(change: Change) -> None:
    """Drop what the kernel may hold about one change (runs in a worker thread)."""
    name = os.fsencode(change.name)
    if change.kind == "content":
        # New bytes under the same inode: drop its pages and attributes, and its name, so an
        # inode nobody holds open is evicted and comes back with the new size (with the
        # writeback cache the kernel otherwise trusts the size it already has).
        _quietly(pyfuse3.invalidate_inode, change.entry_id, False)
        if change.parent_id is not None:
            _quietly(pyfuse3.invalidate_entry, change.parent_id, name)
    elif change.kind == "removed":
        if change.parent_id is not None:
            _quietly(pyfuse3.invalidate_entry, change.parent_id, name, change.entry_id)
            _quietly(pyfuse3.invalidate_inode, change.parent_id, True)
    elif change.kind == "added" and change.parent_id is not None:
        _quietly(pyfuse3.invalidate_entry, change.parent_id, name)
        _quietly(pyfuse3.invalidate_inode, change.parent_id, True)
    log.debug("kernel cache invalidated: %s", change)


def _quietly(fn: object, *args: object) -> None:
    """ENOENT means the kernel held nothing to drop: the usual case, not an error."""
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTCONN, errno.EBADF):
            log.warning("kernel cache invalidation %s%s failed: %s",
                        getattr(fn, "__name__", fn), args, exc)
