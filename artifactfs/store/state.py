"""What every part of ArtifactStore shares: its state, change notices, and the publish step.

ArtifactStore is one object built from layers, each a module a reader can take in one sitting:
state.py (this) <- tree.py (the mount's tree operations) <- writes.py (files open for writing in
the mount) <- service.py (the Artifacts API's operations, lifecycle, background work).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from .blobs import DataDir, sha256_of_fd
from .digests import PendingDigests
from .metadata import Entry, Metadata, SessionRow
from .sessions import WriteSession

log = logging.getLogger("artifactfs.store")

# Below this, hashing or copying inline is cheaper than a thread hop (docs/PLATFORM.md).
INLINE_IO_BYTES = 4 << 20
DEFAULT_SESSION_TTL = 24 * 3600
# How long the bytes of a replaced version stay openable after the replacement (seconds).
# An open(2) in the mount that raced the replacement names that version (the kernel looked the
# name up just before), and the kernel retries an open only once (fs/replaced.py). Time-bound,
# so the space it holds is bounded by the rate of replacements.
REPLACED_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class Change:
    """A change made by a face other than the mount; the mount drops what the kernel cached.

    kind: 'content' (entry_id's bytes changed), 'removed' (name left parent_id),
    'added' (name appeared in parent_id). ``previous`` is the entry as it was before a
    'content' or 'removed' change: the version an open racing the change may still get
    (``open_version``).
    """

    kind: str
    entry_id: int
    parent_id: int | None
    name: str
    previous: Entry | None = None


class StoreState:
    """The state of one open data directory, and the steps every operation shares."""

    def __init__(
        self,
        data_dir: Path,
        *,
        sync: bool = False,
        session_ttl: int = DEFAULT_SESSION_TTL,
        uri_base: str | None = None,
    ) -> None:
        self.data = DataDir(Path(data_dir))
        self.sync = sync
        self.session_ttl = session_ttl
        # Where uris point: the HTTP face sets its absolute URL here when it serves.
        self.uri_base = uri_base or "artifactfs://local"
        self.meta: Metadata  # opened by open()
        self.digests: PendingDigests  # made by open()
        self._writes: dict[int, WriteSession] = {}
        self._uploading: set[str] = set()
        self._listeners: list[Callable[[Change], None]] = []
        # Blobs no row points at any more; unlinked once the change is durable (flush()).
        self._doomed: list[str] = []
        # Blobs of replaced versions, openable until their deadline (time.monotonic()), then
        # doomed; in deadline order (insertion order: the grace is a constant).
        self._replaced: dict[str, float] = {}
        # list_artifacts cursors: (prefix, start_index) -> last key before that index, valid
        # while the set of keys is unchanged (generation), so paging is not O(n^2).
        self._generation = 0
        self._cursors: dict[tuple[str, int], tuple[int, str]] = {}
        self.uid = os.getuid()
        self.gid = os.getgid()

    def add_listener(self, listener: Callable[[Change], None]) -> None:
        self._listeners.append(listener)

    def _notify(self, change: Change) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception("change listener failed")

    def _changed_keys(self) -> None:
        self._generation += 1

    def _doom(self, blob_id: str, *, replaced: bool = False) -> None:
        """No row points at ``blob_id`` any more: free it once that change is durable.

        A ``replaced`` version's bytes stay openable for REPLACED_GRACE first (open_version):
        an open racing the replacement still gets them. A deleted one's do not: a delete
        frees space at once (the way out of a full disk).
        """
        if replaced:
            self._replaced[blob_id] = time.monotonic() + REPLACED_GRACE
        elif self.sync:
            self.data.remove_blob(blob_id)
        else:
            self._doomed.append(blob_id)

    def _end_grace(self, *, everything: bool = False) -> None:
        """Doom the replaced versions whose grace is over (all of them at close)."""
        now = time.monotonic()
        while self._replaced:
            blob_id, deadline = next(iter(self._replaced.items()))
            if deadline > now and not everything:
                return
            del self._replaced[blob_id]
            self._doomed.append(blob_id)

    def _drop_session(self, s: SessionRow) -> None:
        self.meta.delete_session(s.id)
        self.data.remove_staging(s.id)
        log.info("upload session %s for %s removed", s.id, s.key)

    # --- publishing bytes -----------------------------------------------------------------

    async def _digest(self, fd: int) -> tuple[str, int]:
        size = os.fstat(fd).st_size
        if size <= INLINE_IO_BYTES:
            return sha256_of_fd(fd)
        return await trio.to_thread.run_sync(sha256_of_fd, fd)

    async def _publish(self, session_id: str, durable: bool) -> str:
        blob_id = self.data.new_blob_id()
        if durable:
            await trio.to_thread.run_sync(
                lambda: self.data.publish(session_id, blob_id, durable=True))
        else:
            self.data.publish(session_id, blob_id, durable=False)
        return blob_id
