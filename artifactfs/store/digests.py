"""Digests a commit did not compute: hashed from the blob right after the commit.

A mount commit whose bytes did not reach the daemon in order (a passthrough writer's, which
the daemon never sees; random writes; an append to an existing file) would have to read the
whole file back to hash it before close(2) could return, which takes longer than a native
``cp`` of the file takes in all (sha256 runs slower than the kernel copies pages).
Such a commit stores sha256 NULL, "pending" (schema.py), and ``PendingDigests`` hashes the
blob on a worker thread, oldest first, and records the digest. Blobs are immutable, so the
digest computed later is the one the commit would have computed.

Every face still shows a digest: a face that needs a pending one (get_artifact,
list_artifacts, the content route's ETag, the mount's ``user.sha256``, setting it to its own
value) waits for it, and hashes that blob itself if the worker has not begun it. Start-up
queues every row still pending.

Concurrency (docs/CONCURRENCY.md): the queue and the events live on the trio thread; the
worker thread only reads a blob. The digest is written by one short transaction that names
the version (entry id and blob id), so a version replaced or deleted meanwhile is not
touched; its blob, opened by path in the thread, may be gone by then, which is no damage.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable

import trio

from ..errors import ArtifactError
from .blobs import DataDir, sha256_of_path
from .metadata import Entry, Metadata

log = logging.getLogger("artifactfs.store")

# Below this a blob is hashed on the trio thread (a thread hop costs more, docs/PLATFORM.md).
INLINE_HASH_BYTES = 4 << 20


class PendingDigests:
    """The versions whose digest is pending, in commit order, and who waits for which."""

    def __init__(self, meta: Metadata, data: DataDir) -> None:
        self.meta = meta
        self.data = data
        self._queue: OrderedDict[str, int] = OrderedDict()  # blob id -> entry id
        self._done: dict[str, trio.Event] = {}
        self._wakeup = trio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, entry_id: int, blob_id: str) -> None:
        """Queue a version committed with a pending digest (after its transaction)."""
        if blob_id not in self._done:
            self._queue[blob_id] = entry_id
            self._done[blob_id] = trio.Event()
            self._wakeup.set()

    def add_all(self, versions: Iterable[tuple[int, str]]) -> None:
        """Queue what start-up found pending."""
        for entry_id, blob_id in versions:
            self.add(entry_id, blob_id)

    async def ready(self, e: Entry) -> Entry | None:
        """``e`` as it is once its digest is known: read again, since it may have been
        replaced or deleted meanwhile (None then). ``e`` itself if its digest was known."""
        while e.blob_id is not None and e.sha256 is None:
            blob_id = e.blob_id
            done = self._done.get(blob_id)
            if done is None:
                # Not queued: recorded meanwhile (read the row again), or a row this process
                # did not queue (none should be; hash it rather than wait for nothing).
                self.add(e.id, blob_id)
                done = self._done[blob_id]
            if blob_id in self._queue:
                # Someone waits: hash it now, beside whatever the worker is hashing (a face
                # must not wait behind a 50 GiB blob committed just before this one).
                await self._hash(blob_id)
            await done.wait()
            now = self.meta.entry(e.id)
            if now is None or not now.is_artifact:
                return None
            if now.blob_id == blob_id and now.sha256 is None:
                return now  # the blob could not be hashed (logged): show no digest
            e = now
        return e

    async def ready_all(self, entries: list[Entry]) -> list[Entry]:
        """``entries`` with their digests, those deleted while waiting left out."""
        if all(e.sha256 is not None or e.blob_id is None for e in entries):
            return entries
        out = []
        for e in entries:
            now = await self.ready(e)
            if now is not None:
                out.append(now)
        return out

    async def run(self) -> None:
        """Hash the queued blobs, oldest first (a face hashes the one it waits for itself);
        runs until cancelled. Rows still pending at shutdown are queued at the next start."""
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            await self._hash(next(iter(self._queue)))

    async def _hash(self, blob_id: str) -> None:
        entry_id = self._queue.pop(blob_id)
        done = self._done[blob_id]
        try:
            e = self.meta.entry(entry_id)
            if e is None or e.blob_id != blob_id or e.sha256 is not None:
                return  # replaced or deleted before its turn: nothing to record
            path = self.data.blob_path(blob_id)
            if e.size <= INLINE_HASH_BYTES:
                found = sha256_of_path(path)
            else:
                found = await trio.to_thread.run_sync(sha256_of_path, path,
                                                      abandon_on_cancel=True)
            now = self.meta.entry(entry_id)
            if now is None or now.blob_id != blob_id or now.sha256 is not None:
                return  # replaced or deleted while hashed (its blob maybe freed): no damage
            if found is None or found[1] != e.size:
                # The row and its blob disagree: damage that fsck reports; no digest to show.
                log.error("cannot record the digest of %s: its blob %s %s", e.key, blob_id,
                          "is missing" if found is None
                          else f"has {found[1]} bytes, the row says {e.size}")
                return
            with self.meta.transaction():
                self.meta.set_digest(entry_id, blob_id, found[0])
            log.debug("digest of %s: sha256 %s", e.key, found[0][:12])
        except (OSError, sqlite3.Error, ArtifactError) as exc:
            # A failing disk: the row stays pending and start-up queues it again.
            log.error("could not record the digest of blob %s (%s)", blob_id, exc)
        finally:
            del self._done[blob_id]
            done.set()
