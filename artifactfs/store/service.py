"""The artifact store: the one place where artifactfs's semantics live.

The Artifacts API's seven operations (async, trio) and the tree operations the mount needs
(directories, rename, attributes, symlinks, files open for writing). The mount and the HTTP
face translate requests into these calls and errors out of them; they decide nothing.

Concurrency (see docs/CONCURRENCY.md): everything runs on one trio thread. Code between two
awaits does not interleave with other tasks, and SQLite calls never await, so each
``with self.meta.transaction():`` block is atomic with respect to every other task. Only
hashing big files, copying big blobs and fsync go to worker threads; those touch files, never
the database, and every method re-reads the rows it needs after such an await.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterable, Iterable
from typing import Any, BinaryIO

import trio

from ..errors import (
    ArtifactError,
    Conflict,
    InvalidArgument,
    InvalidKey,
    NotFound,
    from_os_error,
)
from ..models import (
    ArtifactResponse,
    ArtifactUploadResponse,
    BulkDeleteRequest,
    PaginatedResponse,
    key_range_end,
    validate_key,
    validate_mime_type,
    validate_size,
)
from .commitlog import BATCH_WINDOW
from .digests import PendingDigests
from .metadata import Entry, Metadata, SessionRow
from .schema import ROOT_ID
from .state import INLINE_IO_BYTES, Change, log
from .writes import MountWrites

DEFAULT_PAGE = 100
MAX_PAGE = 1000


def _ancestors(key: str) -> list[str]:
    """'a/b/c' -> ['a/b', 'a']: nearest first."""
    out = []
    while "/" in key:
        key = key.rpartition("/")[0]
        out.append(key)
    return out


def _refuse_non_file(key: str, e: Entry | None) -> None:
    """An artifact can replace a file at its key, never a directory or a symlink."""
    if e is not None and e.is_dir:
        raise Conflict(f"{key} is a directory", errno=errno.EISDIR)
    if e is not None and e.is_symlink:
        raise Conflict(f"{key} is a symbolic link")


def _hash_inline(hasher: Any, chunk: bytes) -> Any:
    """Hash a chunk as it goes by, unless it is big enough to stall the trio thread: then
    give up, and the commit hashes the staging file in a worker thread instead."""
    if hasher is not None:
        if len(chunk) > INLINE_IO_BYTES:
            return None
        hasher.update(chunk)
    return hasher



class ArtifactStore(MountWrites):
    """One data directory's artifacts. Create it with :func:`artifactfs.open_store`."""

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        from .recovery import recover  # recovery needs the whole store; import late

        self.data.acquire()
        try:
            self.meta = Metadata(self.data.db_path, synchronous_full=self.sync)
            self.meta.redo = self.replay_logged
            self.digests = PendingDigests(self.meta, self.data)
            recover(self)
            self.digests.add_all(self.meta.pending_digests())
        except BaseException:
            self.data.release()
            raise

    def close(self) -> None:
        try:
            for ws in list(self._writes.values()):
                self._discard_write(ws)
            self.flush()
            (self.data.root / "clean").touch()
        except (OSError, sqlite3.Error, ArtifactError) as exc:
            # A full or failing disk: leave no clean marker, so the next start recovers in
            # full; the lock must still go, or no one could open the store again.
            log.error("could not shut the store down cleanly (%s); the next start recovers"
                      " it", exc)
        finally:
            self.meta.close()
            self.data.release()

    async def commit_complete_sessions(self) -> None:
        """Finish uploads whose last byte arrived but whose commit a crash interrupted.

        A size-0 session has no last byte: it waits for its first upload call (DESIGN §2),
        which would otherwise find the session gone.
        """
        for s in self.meta.all_sessions():
            if s.origin == "http" and s.size and s.offset == s.size:
                try:
                    await self._commit_upload(s)
                except ArtifactError as exc:
                    log.warning("could not finish the upload of %s: %s", s.key, exc)

    # --- uris ------------------------------------------------------------------------------

    def session_uri(self, session_id: str) -> str:
        return f"{self.uri_base}/v1/artifacts/sessions/{session_id}"

    def content_uri(self, key: str) -> str:
        return f"{self.uri_base}/v1/artifacts/{key}:content"

    def _artifact(self, e: Entry) -> ArtifactResponse:
        assert e.mime_type is not None and e.created_at is not None
        return ArtifactResponse(
            key=e.key, mime_type=e.mime_type, uri=self.content_uri(e.key), size=e.size,
            created_at=e.created_at, sha256=e.sha256,
        )

    def _artifact_dict(self, e: Entry) -> dict[str, Any]:
        """``self._artifact(e).model_dump()``, without building the model."""
        return {"key": e.key, "mime_type": e.mime_type, "uri": self.content_uri(e.key),
                "size": e.size, "created_at": e.created_at, "sha256": e.sha256}

    def _session_response(self, s: SessionRow) -> ArtifactUploadResponse:
        if s.origin == "mount":
            ws = self._writes.get(s.entry_id or 0)
            size = ws.size() if ws else 0
            return ArtifactUploadResponse(
                id=s.id, uri=self.session_uri(s.id), offset=size, size=size)
        assert s.size is not None
        return ArtifactUploadResponse(
            id=s.id, uri=self.session_uri(s.id), offset=s.offset, size=s.size)

    # --- the Artifacts API's operations ------------------------------------------------------

    async def create_upload_session(
        self, key: str, mime_type: str, size: int
    ) -> ArtifactUploadResponse:
        validate_key(key)
        validate_mime_type(mime_type)
        validate_size(size)
        now = int(time.time())
        row = SessionRow(
            id=secrets.token_urlsafe(18), origin="http", key=key, entry_id=None, size=size,
            offset=0, mime_type=mime_type, created_at=now, expires_at=now + self.session_ttl,
        )
        # No staging file yet: the first bytes make it (_receive), and an upload that brings
        # all of them at once never needs one (upload_stream). A session at offset 0 without
        # its file is one that has received nothing.
        # The check and the insert share one transaction: one lock round instead of one per
        # statement.
        with self.meta.logged("session", row.fields()):
            self._check_can_hold_file(key)
            self.meta.insert_session(row)
        log.info("upload session %s opened for %s (%d bytes)", row.id, key, size)
        return self._session_response(row)

    async def upload_content_to_session(
        self, upload_id: str, content: bytes, offset: int | None = None
    ) -> ArtifactResponse | None:
        if not isinstance(content, bytes | bytearray | memoryview):
            raise InvalidArgument(f"content must be bytes, not {type(content).__name__}")
        return await self.upload_stream(upload_id, [content], offset=offset, length=len(content))

    async def upload_stream(
        self,
        upload_id: str,
        chunks: AsyncIterable[bytes] | Iterable[bytes],
        *,
        offset: int | None = None,
        length: int | None = None,
    ) -> ArtifactResponse | None:
        """Append a request body, chunk by chunk, at the session's offset.

        A body that would pass the declared size is refused whole (nothing of it is kept).
        A body cut short (the client went away) keeps what arrived: the offset moves on and
        the client resumes from get_upload_session_info, as in tus.
        """
        s = self._live_session(upload_id)
        if s.origin != "http":
            raise Conflict(f"session {upload_id} is a file being written in the mount")
        assert s.size is not None
        if offset is not None:
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise InvalidArgument(f"offset must be an integer >= 0, got {offset!r}")
            if offset != s.offset:
                raise Conflict(
                    f"offset {offset} does not match the session's offset {s.offset}",
                    offset=s.offset)
        remaining = s.size - s.offset
        if length is not None and length > remaining:
            raise InvalidArgument(
                f"body of {length} bytes exceeds the session's remaining {remaining} bytes")
        if upload_id in self._uploading:
            raise Conflict(f"another upload to session {upload_id} is in progress",
                           offset=s.offset)
        self._uploading.add(upload_id)
        try:
            if (s.offset == 0 and length == s.size and s.size <= INLINE_IO_BYTES
                    and isinstance(chunks, list) and len(chunks) == 1
                    and isinstance(chunks[0], bytes | bytearray | memoryview)
                    and len(chunks[0]) == s.size):
                # The whole artifact, in memory (upload_content_to_session): straight to its
                # blob, as put_artifact, with no staging file to write, link and unlink.
                return await self._commit_upload(s, content=chunks[0])
            pos, digest = await self._receive(s, chunks)
            if pos == s.size:
                return await self._commit_upload(s, digest)
            return None
        finally:
            self._uploading.discard(upload_id)

    async def _receive(
        self, s: SessionRow, chunks: AsyncIterable[bytes] | Iterable[bytes]
    ) -> tuple[int, tuple[str, int] | None]:
        """Append the chunks; return the new offset, and the content's (sha256, size) when
        this request carried all of it in small chunks (the commit then need not re-read it).

        The offset is recorded only if the session stays open: a request that completes it
        commits, and a crash before that commit leaves the old offset, which the client
        (never acknowledged) resumes from.
        """
        assert s.size is not None
        try:
            fd = self.data.open_staging(s.id, create=s.offset == 0)
        except FileNotFoundError:
            raise NotFound(f"upload session {s.id} lost its bytes; create a new one") from None
        pos = s.offset
        # Small sessions only: hashing a big upload on the trio thread, chunk by chunk, would
        # take the loop from every other request for as long; the commit hashes those in a
        # worker thread instead.
        hasher = hashlib.sha256() if pos == 0 and s.size <= INLINE_IO_BYTES else None
        try:
            # Drop a torn tail left by a crash mid-request, only if there is one: on ext4 a
            # truncate (even of an empty file, to 0) makes the next close() start writeback
            # of the file (auto_da_alloc), a large part of a small upload's cost.
            if os.fstat(fd).st_size != s.offset:
                os.ftruncate(fd, s.offset)
            if isinstance(chunks, AsyncIterable):
                async for chunk in chunks:
                    pos = self._append(fd, s, pos, chunk)
                    hasher = _hash_inline(hasher, chunk)
            else:
                for chunk in chunks:
                    pos = self._append(fd, s, pos, chunk)
                    hasher = _hash_inline(hasher, chunk)
        except InvalidArgument:
            os.ftruncate(fd, s.offset)
            raise
        except OSError as exc:
            os.ftruncate(fd, s.offset)
            raise from_os_error(exc, f"upload session {s.id}") from exc
        except BaseException:
            # Client gone (or cancelled): keep what arrived, so it can resume from there.
            if pos != s.offset:
                self.meta.set_session_offset(s.id, pos)
            raise
        finally:
            os.close(fd)
        if pos == s.size:
            return pos, (hasher.hexdigest(), pos) if hasher is not None else None
        if pos != s.offset:
            self.meta.set_session_offset(s.id, pos)
        return pos, None

    def _append(self, fd: int, s: SessionRow, pos: int, chunk: bytes) -> int:
        assert s.size is not None
        if pos + len(chunk) > s.size:
            raise InvalidArgument(
                f"body exceeds the session's declared size {s.size}"
                f" ({s.size - s.offset} bytes remained at offset {s.offset})")
        # A full disk is 507 and the bytes that arrived stay: the client resumes once there
        # is room (get_upload_session_info tells it where).
        self.data.check_space(len(chunk), f"upload session {s.id}")
        view = memoryview(chunk)
        while view:
            n = os.pwrite(fd, view, pos)
            pos += n
            view = view[n:]
        return pos

    async def get_upload_session_info(self, upload_id: str) -> ArtifactUploadResponse:
        return self._session_response(self._live_session(upload_id))

    async def list_artifacts(
        self, start_index: int | None = None, limit: int | None = None,
        prefix: str | None = None,
    ) -> PaginatedResponse:
        start = 0 if start_index is None else start_index
        count = DEFAULT_PAGE if limit is None else limit
        for name, value in (("start_index", start), ("limit", count)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{name} must be an integer >= 0, got {value!r}")
        if start > 2**63 - 1:
            # SQLite cannot even take it as an OFFSET; no store holds that many artifacts.
            raise InvalidArgument(f"start_index {start} is too large (at most 2**63-1)")
        count = min(count, MAX_PAGE)
        prefix = prefix or ""
        if prefix and (len(prefix) > 1024 or not all(
                c.isascii() and (c.isalnum() or c in "_./-") for c in prefix)):
            raise InvalidKey(f"prefix {prefix[:80]!r} contains characters no key can hold")
        hi = key_range_end(prefix) if prefix else None
        cursor = self._cursors.get((prefix, start))
        if cursor is not None and cursor[0] == self._generation:
            rows = self.meta.artifacts_page(
                after_key=cursor[1], lo=prefix, hi=hi, offset=0, limit=count + 1)
        else:
            rows = self.meta.artifacts_page(
                after_key=None, lo=prefix, hi=hi, offset=start, limit=count + 1)
        has_more = len(rows) > count
        rows = rows[:count]
        if rows:
            if len(self._cursors) > 256:
                self._cursors.clear()
            self._cursors[(prefix, start + len(rows))] = (self._generation, rows[-1].key)
        query = f"start_index={start}&limit={count}" + (f"&prefix={prefix}" if prefix else "")
        # Plain dicts, built once: ArtifactResponse models dumped back to dicts and validated
        # again by PaginatedResponse would cost a large part of a 1000-row page's time.
        rows = await self.digests.ready_all(rows)
        return PaginatedResponse.model_construct(
            data=[self._artifact_dict(e) for e in rows], has_more=has_more,
            url=f"{self.uri_base}/v1/artifacts?{query}",
        )

    async def get_artifact(self, key: str) -> ArtifactResponse:
        while True:  # again if it was deleted while its digest was computed
            e = await self.digests.ready(self._artifact_entry(key))
            if e is not None:
                return self._artifact(e)

    async def delete_artifact(self, key: str) -> None:
        e = self._artifact_entry(key)
        with self.meta.transaction():
            self.meta.delete_entry(e.id)
            self.meta.dirs_changed(time.time_ns(), e.parent_id)
        self._after_delete([e])

    async def bulk_delete_artifacts(self, request: BulkDeleteRequest | Iterable[str]) -> None:
        if isinstance(request, str | bytes):
            # A str is an Iterable[str] of its characters: "ab" would delete 'a' and 'b'.
            raise InvalidArgument("bulk_delete_artifacts takes a list of keys, not one key")
        keys = ([a.key for a in request.artifacts] if isinstance(request, BulkDeleteRequest)
                else list(request))
        for key in keys:
            validate_key(key)
        keys = list(dict.fromkeys(keys))
        with self.meta.transaction():
            entries = [self.meta.entry_by_key(k) for k in keys]
            absent = [k for k, e in zip(keys, entries, strict=True)
                      if e is None or not e.is_artifact]
            if absent:
                shown = ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else "")
                raise NotFound(f"{len(absent)} of the keys are not artifacts, nothing was"
                               f" deleted: {shown}")
            for e in entries:
                assert e is not None
                self.meta.delete_entry(e.id)
            self.meta.dirs_changed(time.time_ns(), *(e.parent_id for e in entries if e))
        self._after_delete([e for e in entries if e is not None])

    def open_artifact(self, key: str) -> BinaryIO:
        """A readable binary file of the artifact's bytes; it keeps them if the key changes."""
        e = self._artifact_entry(key)
        assert e.blob_id is not None
        return os.fdopen(self.data.open_blob(e.blob_id), "rb")

    # --- shared checks ---------------------------------------------------------------------

    def _live_session(self, upload_id: str) -> SessionRow:
        s = self.meta.session(upload_id) if isinstance(upload_id, str) else None
        if s is None:
            raise NotFound(f"no upload session {str(upload_id)[:80]!r}")
        if s.expires_at is not None and s.expires_at <= time.time():
            self._drop_session(s)
            raise NotFound(f"upload session {upload_id} has expired")
        return s

    def _artifact_entry(self, key: str) -> Entry:
        validate_key(key)
        e = self.meta.entry_by_key(key)
        if e is None or not e.is_artifact:
            what = "a directory" if e is not None and e.is_dir else "no artifact"
            raise NotFound(f"{key} is {what}" if e is not None else f"no artifact {key}")
        return e

    def _check_can_hold_file(self, key: str) -> None:
        """Fail early if committing ``key`` would clash with the tree as it is now."""
        ancestors = _ancestors(key)
        found = self.meta.entries_by_keys([key, *ancestors])
        e = found.get(key)
        _refuse_non_file(key, e)
        for parent_key in ancestors:
            p = found.get(parent_key)
            if p is not None:
                if not p.is_dir:
                    raise Conflict(f"{parent_key} is a file, so {key} cannot be created",
                                   errno=errno.ENOTDIR)
                return

    def _ensure_parents(self, key: str) -> int:
        """Directory rows for every ancestor of ``key`` (in the caller's transaction)."""
        parent_key, _, _ = key.rpartition("/")
        if not parent_key:
            return ROOT_ID
        p = self.meta.entry_by_key(parent_key)
        if p is not None:
            if not p.is_dir:
                raise Conflict(f"{parent_key} is a file, so {key} cannot be created",
                               errno=errno.ENOTDIR)
            return p.id
        parent_id = self._ensure_parents(parent_key)
        now = time.time_ns()
        new_id = self.meta.insert_entry(
            parent_id=parent_id, name=parent_key.rpartition("/")[2], key=parent_key,
            kind="dir", mode=0o755, uid=self.uid, gid=self.gid, now_ns=now)
        self.meta.dirs_changed(now, parent_id)
        self._changed_keys()
        self._notify(Change("added", new_id, parent_id, parent_key.rpartition("/")[2]))
        return new_id

    def _after_delete(self, entries: list[Entry]) -> None:
        self._changed_keys()
        for e in entries:
            if e.blob_id:
                self._doom(e.blob_id)
            log.info("deleted %s", e.key)
            self._notify(Change("removed", e.id, e.parent_id, e.name, previous=e))

    # --- commit ----------------------------------------------------------------------------

    async def _commit_upload(
        self, s: SessionRow, digest: tuple[str, int] | None = None, *,
        content: bytes | None = None,
    ) -> ArtifactResponse:
        """An http session is complete: its bytes become the artifact at s.key, atomically.

        ``digest`` is the (sha256, size) the request computed as the bytes went by, if it did;
        ``content`` the whole artifact, when one call brought it all (no staging file).
        """
        if content is not None:
            blob_id, sha, size = await self._write_blob(content, f"upload session {s.id}")
        else:
            if digest is None:
                fd = self.data.open_staging(s.id)
                try:
                    digest = await self._digest(fd)
                finally:
                    os.close(fd)
            sha, size = digest
            blob_id = await self._publish(s.id, self.sync)
        try:
            artifact = self._install(s.key, blob_id, sha, size, s.mime_type, session_id=s.id)
        except ArtifactError:
            # The key cannot take the artifact (a directory appeared meanwhile): nothing to
            # resume, so the session goes with its bytes.
            self.data.remove_blob(blob_id)
            self._drop_session(s)
            raise
        except BaseException:
            self.data.remove_blob(blob_id)
            raise
        # Also after a whole upload in one call: an earlier request may have left a file.
        self.data.remove_staging(s.id)
        return artifact

    async def put_artifact(
        self, key: str, content: bytes, mime_type: str = "application/octet-stream"
    ) -> ArtifactResponse:
        """Commit a whole artifact held in memory, in one step (our Python extension).

        The Artifacts API's way (create_upload_session, then upload_content_to_session) needs
        a session row that survives restarts, so two transactions; content already whole in
        memory (an eval result, a config, a small shard) needs no resumable session. Same
        rules, same atomic replace, same crash safety: the bytes go straight to a new blob,
        and a crash before the row points at it leaves an orphan that start-up removes.
        """
        validate_key(key)
        validate_mime_type(mime_type)
        if not isinstance(content, bytes | bytearray | memoryview):
            raise InvalidArgument(f"content must be bytes, not {type(content).__name__}")
        blob_id, sha, size = await self._write_blob(content, f"artifact {key}")
        try:
            return self._install(key, blob_id, sha, size, mime_type)
        except BaseException:
            self.data.remove_blob(blob_id)
            raise

    async def _write_blob(self, content: bytes | bytearray | memoryview,
                          what: str) -> tuple[str, str, int]:
        """A new blob holding ``content``, not yet pointed at: (blob id, sha256, size). A
        crash before a row points at it leaves an orphan that start-up removes."""
        size = len(content)
        self.data.check_space(size, what)
        if size <= INLINE_IO_BYTES:
            sha = hashlib.sha256(content).hexdigest()
        else:
            sha = await trio.to_thread.run_sync(lambda: hashlib.sha256(content).hexdigest())
        blob_id = self.data.new_blob_id()
        if self.sync:
            await trio.to_thread.run_sync(
                lambda: self.data.write_blob(blob_id, content, durable=True))
        else:
            self.data.write_blob(blob_id, content, durable=False)
        return blob_id, sha, size

    def _install(self, key: str, blob_id: str, sha: str, size: int, mime_type: str, *,
                 session_id: str | None = None, redo_at: int | None = None
                 ) -> ArtifactResponse:
        """Point ``key`` at a published blob in one logged commit (commitlog.py), ending its
        session if any. ``redo_at`` is the commit's time when its log line is redone: then
        the blob it replaced is not doomed. At start-up recovery decides that blob's fate (it
        is the version put back if the new bytes were lost, else an orphan it removes), and
        after a batch SQLite dropped the first run of the commit doomed it already."""
        now_ns = time.time_ns() if redo_at is None else redo_at
        created_at = now_ns // 1_000_000_000
        with self.meta.logged("install", (key, blob_id, sha, size, mime_type, session_id,
                                          now_ns)):
            if session_id is not None and not self.meta.delete_session(session_id):
                raise NotFound(f"upload session {session_id} was removed while committing")
            parent_key, _, name = key.rpartition("/")

            def insert(parent: int | str) -> tuple[int, int] | None:
                return self.meta.insert_artifact(
                    parent=parent, name=name, key=key, mode=0o644, uid=self.uid,
                    gid=self.gid, now_ns=now_ns, blob_id=blob_id, size=size, sha256=sha,
                    mime_type=mime_type, created_at=created_at, durable=self.sync)

            # Commonly a new key in a directory that is there: one statement, and one more
            # for the directory's times below (a new entry). Else look.
            e = None
            placed = insert(parent_key)
            if placed is None:
                e = self.meta.entry_by_key(key)
                _refuse_non_file(key, e)
                if e is None:
                    placed = insert(self._ensure_parents(key))
                    assert placed is not None
                else:
                    self.meta.set_content(
                        e.id, blob_id=blob_id, size=size, sha256=sha,
                        mime_type=mime_type, created_at=created_at, mtime_ns=now_ns,
                        ctime_ns=now_ns, durable=self.sync)
            if e is None:
                assert placed is not None
                self.meta.dirs_changed(now_ns, placed[1])
        if e is None:
            assert placed is not None
            self._changed_keys()
            if self._listeners:
                self._notify(Change("added", placed[0], placed[1], name))
        else:
            if e.blob_id:
                if redo_at is None:
                    self._doom(e.blob_id, replaced=True)
            else:
                self._changed_keys()  # a file still being written in the mount joins the list
            self._notify(Change("content", e.id, e.parent_id, e.name, previous=e))
        log.info("committed %s (%d bytes, sha256 %s)", key, size, sha[:12])
        return ArtifactResponse(
            key=key, mime_type=mime_type, uri=self.content_uri(key), size=size,
            created_at=created_at, sha256=sha)

    def replay_logged(self, kind: str, fields: list[Any]) -> None:
        """Redo one line of the commit log (Metadata.replay_log): the statements of the
        logged commit that wrote it, with the values it had then."""
        if kind == "install":
            key, blob_id, sha, size, mime_type, session_id, now_ns = fields
            self._install(key, blob_id, sha, size, mime_type, session_id=session_id,
                          redo_at=now_ns)
        elif kind == "session":
            self.meta.insert_session(SessionRow(*fields))
        else:
            raise ValueError(f"unknown kind of logged commit {kind!r}")

    # --- durability and expiry (background) -----------------------------------------------

    def flush(self) -> int:
        """Make committed artifacts durable, then free the blobs of deleted ones, and of
        replaced ones at once (this is the close path: no open can race a replacement any
        more; the background flush_async waits out their grace).

        Runs the fsyncs inline: call it from a thread-tolerant place (close) or through
        flush_async. Returns how many blobs it synced (where it fsyncs each) or had to.
        """
        self._end_grace(everything=True)
        grown = self.meta.sessions_grown()
        doomed, epoch, blobs = self._begin_flush()
        try:
            self.data.fsync_staging([i for i, _ in grown])
            self.data.fsync_blobs(blobs)
            # One FULL-synchronous commit fsyncs the WAL with every earlier transaction in
            # it, so after it no row can come back pointing at a blob unlinked below.
            self.meta.conn.execute("PRAGMA synchronous = FULL")
            try:
                self.meta.end_flush(epoch, grown)
            finally:
                if not self.sync:
                    self.meta.conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            self._abort_flush(doomed, blobs)
            raise
        return self._flushed(doomed, blobs)

    async def flush_async(self) -> int:
        """flush() for the background task: every wait on the disk happens in a thread.

        The epoch is recorded at synchronous=NORMAL and the WAL is then fsynced in a worker
        thread (_sync_metadata), which makes that commit and every earlier one durable as a
        FULL commit would, without the trio thread (and every request) waiting on the fsync:
        under another process's heavy writes it took hundreds of ms."""
        self._end_grace()
        grown = self.meta.sessions_grown()
        if not self._doomed and not self.meta.has_unflushed() and not grown:
            self.meta.retry_redo()  # commits a dropped batch left in the log, if any
            return 0
        doomed, epoch, blobs = self._begin_flush()
        try:
            await trio.to_thread.run_sync(self.data.fsync_staging, [i for i, _ in grown])
            await trio.to_thread.run_sync(self.data.fsync_blobs, blobs)
            self.meta.end_flush(epoch, grown)
            await self._sync_metadata()
        except BaseException:
            self._abort_flush(doomed, blobs)
            raise
        return self._flushed(doomed, blobs)

    def _begin_flush(self) -> tuple[list[str], int, list[str]]:
        """What one flush finishes: the blobs doomed so far, which it may unlink once the
        versions committed so far are durable; and those versions' epoch and blobs.

        Both taken together here, before any wait: a blob is doomed by a delete or a replace,
        and a replace's new bytes must be durable before the old blob goes, or a power loss
        could find the new row durable, its bytes torn and the old blob gone
        (tests/test_power_loss.py). A replace committed while the flush waits on the disk is
        in the next epoch, and dooms its old blob for the next flush.
        """
        doomed, self._doomed = self._doomed, []
        epoch, blobs = self.meta.begin_flush()
        return doomed, epoch, blobs

    def _abort_flush(self, doomed: list[str], blobs: list[str]) -> None:
        self._doomed[:0] = doomed  # unlinked by the next flush that gets this far
        self.meta.abort_flush(blobs)

    def _flushed(self, doomed: list[str], blobs: list[str]) -> int:
        if not self.meta.retry_redo():
            # Commits the database dropped are in the log only, and the rows they replaced
            # point at doomed blobs now: keep those until the commits are redone.
            self._doomed[:0] = doomed
            return len(blobs)
        # A version kept to fall back to (`superseded`) stays, even if doomed: a replace
        # committed while this flush waited on the disk keeps the older durable version's
        # row, and the flush of that replace frees it (docs/RELIABILITY.md).
        kept = self.meta.superseded_blobs() if doomed else set()
        for blob_id in doomed:
            if blob_id in kept:
                self._doomed.append(blob_id)
            else:
                self.data.remove_blob(blob_id)
        return len(blobs)

    def sweep_expired(self) -> int:
        expired = self.meta.expired_sessions(int(time.time()))
        for s in expired:
            if s.id not in self._uploading:
                self._drop_session(s)
        return len(expired)

    async def commit_batches(self) -> None:
        """Commit each batch of logged commits BATCH_WINDOW after it opened (commitlog.py);
        a transaction, the flusher or close() commit it sooner. Sleeps while no batch is
        open. Runs until cancelled."""
        while True:
            opened = trio.Event()
            self.meta.on_batch_open = opened.set
            if not self.meta.batch_open:
                await opened.wait()
            await trio.sleep(BATCH_WINDOW)
            try:
                self.meta.commit_batch(if_due=True)
            except (sqlite3.Error, ArtifactError) as exc:
                # A full disk is expected here, not a bug: one line, no traceback. Its
                # commits are in the log (commit_batch says what became of them).
                log.error("could not commit a batch of logged commits (%s); will retry", exc)

    async def run_background(self, *, flush_interval: float = 2.0,
                             sweep_interval: float = 60.0) -> None:
        """The flusher, the WAL checkpointer and the session sweeper; runs until cancelled."""
        next_sweep = trio.current_time()
        while True:
            await trio.sleep(flush_interval)
            try:
                await self.flush_async()
                await trio.to_thread.run_sync(self.meta.checkpoint)
                if trio.current_time() >= next_sweep:
                    self.sweep_expired()
                    next_sweep = trio.current_time() + sweep_interval
            except (ArtifactError, OSError, sqlite3.OperationalError) as exc:
                # The disk (full, failing): one line each time, no traceback.
                log.error("background flush failed (%s); will retry", exc)
            except Exception:
                log.exception("background flush failed; will retry")
