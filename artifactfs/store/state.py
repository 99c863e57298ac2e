"""What every part of ArtifactStore shares: its state, change notices, and the publish step.

ArtifactStore is one object built from layers, each a module a reader can take in one sitting:
state.py (this) <- tree.py (the mount's tree operations) <- writes.py (files open for writing in
the mount) <- service.py (the seed's operations, lifecycle, background work).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from .blobs import DataDir, sha256_of_fd
from .metadata import Metadata, SessionRow
from .sessions import WriteSession

log = logging.getLogger("artifactfs.store")

# Below this, hashing or copying inline is cheaper than a thread hop (PLATFORM.md).
INLINE_IO_BYTES = 4 << 20
DEFAULT_SESSION_TTL = 24 * 3600


@dataclass(frozen=True, slots=True)
class Change:
    """A change made by a face other than the mount; the mount drops what the kernel cached.

    kind: 'content' (entry_id's bytes changed), 'removed' (name left parent_id),
    'added' (name appeared in parent_id).
    """

    kind: str
    entry_id: int
    parent_id: int | None
    name: str


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
        self._writes: dict[int, WriteSession] = {}
        self._uploading: set[str] = set()
        self._listeners: list[Callable[[Change], None]] = []
        # Blobs no row points at any more; unlinked once the change is durable (flush()).
        self._doomed: list[str] = []
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

    def _doom(self, blob_id: str) -> None:
        if self.sync:
            self.data.remove_blob(blob_id)
        else:
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
