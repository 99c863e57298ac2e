"""Opens that raced a replacement: the kernel's one retry, and the version it may name.

The kernel resolves a path to an inode (a LOOKUP, or a name it cached) and then sends OPEN for
that inode. If the name was replaced in between (another face's upload or delete, a rename over
it in the mount), that inode is an older version (inodes.py) or its entry is gone, and it cannot
be opened as what the name holds now. The daemon answers ESTALE, and the kernel walks the path
again, looking every name up afresh (LOOKUP_REVAL), then sends OPEN for what it found. It does
that once (fs/namei.c, do_filp_open): a name replaced again between that second LOOKUP and its
OPEN must not fail the open(2) with ESTALE, an error the user did not cause.

The rule: the first OPEN of a replaced version answers ESTALE, so an open that started after a
change reaches the newest version (after another face's change the kernel may hold the old name
for a moment, until kernel_cache.py drops it). The same thread's next OPEN is the kernel's retry
(the request header carries the calling thread's id, and the retry is made by that thread within
the same system call); if it names a replaced version, it gets that version, which was at its
name during this open(2): a serial outcome, as on a disk, where an open racing a rename opens the
inode its lookup found. The kernel may also ask GETATTR of the inode between the lookup and the
OPEN (a permission check; measured under load): the same rule holds for it, except that it does
not use the retry up, since the retried OPEN follows it.

Reading reads that version whole (the store keeps a replaced version's bytes for a grace
period, ``open_version``); writing writes into a private copy that vanishes at close, as writes
into a file renamed over do on a disk (``open_detached_write``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from ..store import Entry

# Replaced versions remembered (newest kept): the retry follows its ESTALE within a request or
# two, so this only bounds memory under a storm of replacements.
RETIRED_MAX = 1024
# A thread's pending retry is forgotten after this long (seconds), or when it opens or creates
# anything: a retry that never came (its lookups found no name) must not serve a later open.
# Not when a lookup fails: after a failed revalidation the kernel looks the name up once more
# and may still send the retry's OPEN (measured: LOOKUP, LOOKUP, then OPEN or CREATE).
RETRY_WINDOW = 5.0
RETRYING_MAX = 1024


class ReplacedVersions:
    """Which inode numbers were replaced versions, what they held, and who is retrying."""

    def __init__(self, on_retrying: Callable[[int, bool], None] | None = None) -> None:
        self._retired: OrderedDict[int, Entry] = OrderedDict()
        self._retrying: dict[int, float] = {}
        # Told when a thread starts or stops being in a retry: its opens must reach the
        # mount's Python open (shared_reads.py), which alone applies this rule.
        self._on_retrying = on_retrying or (lambda pid, retrying: None)

    def retire(self, inode: int, previous: Entry | None) -> None:
        """``inode`` no longer names what its entry holds; ``previous`` is what it held."""
        if previous is None or not previous.is_file:
            return
        self._retired[inode] = previous
        self._retired.move_to_end(inode)
        while len(self._retired) > RETIRED_MAX:
            self._retired.popitem(last=False)

    def version(self, inode: int) -> Entry | None:
        return self._retired.get(inode)

    def refused(self, pid: int) -> None:
        """An OPEN or GETATTR from thread ``pid`` was answered ESTALE: the kernel will retry
        its system call once."""
        self._retrying.pop(pid, None)
        self._retrying[pid] = time.monotonic()
        self._on_retrying(pid, True)
        while len(self._retrying) > RETRYING_MAX:
            oldest = next(iter(self._retrying))
            del self._retrying[oldest]
            self._on_retrying(oldest, False)

    def retrying(self, pid: int) -> bool:
        """Whether thread ``pid`` is in the kernel's retry of a request answered ESTALE; only
        its OPEN uses the retry up (the kernel's retried walk asks GETATTR first)."""
        refused_at = self._retrying.get(pid)
        return refused_at is not None and time.monotonic() - refused_at < RETRY_WINDOW

    def is_retry(self, pid: int) -> bool:
        """Whether an OPEN from thread ``pid`` is the kernel's retry of one answered ESTALE.
        Every OPEN asks, so a retry is used up by the thread's next open, whatever it names."""
        refused_at = self._retrying.pop(pid, None)
        if refused_at is None:
            return False
        self._on_retrying(pid, False)
        return time.monotonic() - refused_at < RETRY_WINDOW

    def forget_retry(self, pid: int) -> None:
        """Thread ``pid``'s retried open(2) created the file instead (its name was gone)."""
        if self._retrying and self._retrying.pop(pid, None) is not None:
            self._on_retrying(pid, False)
