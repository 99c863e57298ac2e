"""The artifact store: the one place where artifactfs's semantics live.

The seed's seven operations (async, trio) and the tree operations the mount needs (directories,
rename, attributes, symlinks, files open for writing). The mount and the HTTP face translate
requests into these calls and errors out of them; they decide nothing.

Concurrency (see docs/CONCURRENCY.md): everything runs on one trio thread. Code between two
awaits does not interleave with other tasks, and SQLite calls never await, so each
``with self.meta.transaction():`` block is atomic with respect to every other task. Only
hashing big files, copying big blobs and fsync go to worker threads; those touch files, never
the database, and every method re-reads the rows it needs after such an await.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat as stat_mod
import time
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import trio

from ..errors import (
    ArtifactError,
    Conflict,
    InvalidArgument,
    InvalidKey,
    NotEmpty,
    NotFound,
    Unsupported,
    from_os_error,
)
from ..models import (
    MAX_COMPONENT_BYTES,
    ArtifactResponse,
    ArtifactUploadResponse,
    BulkDeleteRequest,
    PaginatedResponse,
    join_key,
    key_range_end,
    mime_type_for_name,
    validate_key,
    validate_mime_type,
    validate_name,
    validate_size,
)
from .blobs import DataDir, sha256_of_fd
from .metadata import Entry, Metadata, SessionRow
from .schema import ROOT_ID
from .sessions import WriteSession

log = logging.getLogger("artifactfs.store")

# Below this, hashing or copying inline is cheaper than a thread hop (PLATFORM.md).
INLINE_IO_BYTES = 4 << 20
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_SYMLINK_TARGET = 4095
DEFAULT_SESSION_TTL = 24 * 3600

# xattrs in the user. namespace that show artifact metadata (DESIGN §3).
XATTR_MIME = "user.mime_type"
XATTR_SHA256 = "user.sha256"
XATTR_CREATED = "user.created_at"
XATTR_SESSION = "user.upload_session_id"


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


class ArtifactStore:
    """One data directory's artifacts. Create it with :func:`artifactfs.open_store`."""

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

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        from .recovery import recover  # recovery needs the whole store; import late

        self.data.acquire()
        try:
            self.meta = Metadata(self.data.db_path, synchronous_full=self.sync)
            recover(self)
        except BaseException:
            self.data.release()
            raise

    def close(self) -> None:
        for ws in list(self._writes.values()):
            self._discard_write(ws)
        self.flush()
        (self.data.root / "clean").touch()
        self.meta.close()
        self.data.release()

    async def commit_complete_sessions(self) -> None:
        """Finish uploads whose last byte arrived but whose commit a crash interrupted."""
        for s in self.meta.all_sessions():
            if s.origin == "http" and s.size is not None and s.offset == s.size:
                try:
                    await self._commit_upload(s)
                except ArtifactError as exc:
                    log.warning("could not finish the upload of %s: %s", s.key, exc)

    def add_listener(self, listener: Callable[[Change], None]) -> None:
        self._listeners.append(listener)

    def _notify(self, change: Change) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception("change listener failed")

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

    def _session_response(self, s: SessionRow) -> ArtifactUploadResponse:
        if s.origin == "mount":
            ws = self._writes.get(s.entry_id or 0)
            size = ws.size() if ws else 0
            return ArtifactUploadResponse(
                id=s.id, uri=self.session_uri(s.id), offset=size, size=size)
        assert s.size is not None
        return ArtifactUploadResponse(
            id=s.id, uri=self.session_uri(s.id), offset=s.offset, size=s.size)

    # --- the seed's operations -------------------------------------------------------------

    async def create_upload_session(
        self, key: str, mime_type: str, size: int
    ) -> ArtifactUploadResponse:
        validate_key(key)
        validate_mime_type(mime_type)
        validate_size(size)
        self._check_can_hold_file(key)
        now = int(time.time())
        row = SessionRow(
            id=secrets.token_urlsafe(18), origin="http", key=key, entry_id=None, size=size,
            offset=0, mime_type=mime_type, created_at=now, expires_at=now + self.session_ttl,
        )
        self.data.create_staging(row.id)
        self.meta.insert_session(row)
        log.info("upload session %s opened for %s (%d bytes)", row.id, key, size)
        return self._session_response(row)

    async def upload_content_to_session(
        self, upload_id: str, content: bytes, offset: int | None = None
    ) -> ArtifactResponse | None:
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
            pos = await self._receive(s, chunks)
            if pos == s.size:
                return await self._commit_upload(s)
            return None
        finally:
            self._uploading.discard(upload_id)

    async def _receive(self, s: SessionRow, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> int:
        assert s.size is not None
        try:
            fd = self.data.open_staging(s.id)
        except FileNotFoundError:
            raise NotFound(f"upload session {s.id} lost its bytes; create a new one") from None
        pos = s.offset
        try:
            os.ftruncate(fd, s.offset)  # drop a torn tail left by a crash mid-request
            if isinstance(chunks, AsyncIterable):
                async for chunk in chunks:
                    pos = self._append(fd, s, pos, chunk)
            else:
                for chunk in chunks:
                    pos = self._append(fd, s, pos, chunk)
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
        if pos != s.offset:
            self.meta.set_session_offset(s.id, pos)
        return pos

    @staticmethod
    def _append(fd: int, s: SessionRow, pos: int, chunk: bytes) -> int:
        assert s.size is not None
        if pos + len(chunk) > s.size:
            raise InvalidArgument(
                f"body exceeds the session's declared size {s.size}"
                f" ({s.size - s.offset} bytes remained at offset {s.offset})")
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
        return PaginatedResponse(
            data=[self._artifact(e).model_dump() for e in rows], has_more=has_more,
            url=f"{self.uri_base}/v1/artifacts?{query}",
        )

    async def get_artifact(self, key: str) -> ArtifactResponse:
        return self._artifact(self._artifact_entry(key))

    async def delete_artifact(self, key: str) -> None:
        e = self._artifact_entry(key)
        with self.meta.transaction():
            self.meta.delete_entry(e.id)
        self._after_delete([e])

    async def bulk_delete_artifacts(self, request: BulkDeleteRequest | Iterable[str]) -> None:
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
        e = self.meta.entry_by_key(key)
        if e is not None and e.is_dir:
            raise Conflict(f"{key} is a directory", errno=errno.EISDIR)
        if e is not None and e.is_symlink:
            raise Conflict(f"{key} is a symbolic link")
        parent_key = key.rpartition("/")[0]
        while parent_key:
            p = self.meta.entry_by_key(parent_key)
            if p is not None:
                if not p.is_dir:
                    raise Conflict(f"{parent_key} is a file, so {key} cannot be created",
                                   errno=errno.ENOTDIR)
                return
            parent_key = parent_key.rpartition("/")[0]

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
        self._changed_keys()
        self._notify(Change("added", new_id, parent_id, parent_key.rpartition("/")[2]))
        return new_id

    def _changed_keys(self) -> None:
        self._generation += 1

    def _after_delete(self, entries: list[Entry]) -> None:
        self._changed_keys()
        for e in entries:
            if e.blob_id:
                self._doom(e.blob_id)
            log.info("deleted %s", e.key)
            self._notify(Change("removed", e.id, e.parent_id, e.name))

    def _doom(self, blob_id: str) -> None:
        if self.sync:
            self.data.remove_blob(blob_id)
        else:
            self._doomed.append(blob_id)

    def _drop_session(self, s: SessionRow) -> None:
        self.meta.delete_session(s.id)
        self.data.remove_staging(s.id)
        log.info("upload session %s for %s removed", s.id, s.key)

    # --- commit ----------------------------------------------------------------------------

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

    async def _commit_upload(self, s: SessionRow) -> ArtifactResponse:
        """An http session is complete: its bytes become the artifact at s.key, atomically."""
        fd = self.data.open_staging(s.id)
        try:
            sha, size = await self._digest(fd)
        finally:
            os.close(fd)
        blob_id = await self._publish(s.id, self.sync)
        now_ns = time.time_ns()
        try:
            with self.meta.transaction():
                if self.meta.session(s.id) is None:
                    raise NotFound(f"upload session {s.id} was removed while committing")
                e = self.meta.entry_by_key(s.key)
                if e is not None and e.is_dir:
                    raise Conflict(f"{s.key} is a directory", errno=errno.EISDIR)
                if e is not None and e.is_symlink:
                    raise Conflict(f"{s.key} is a symbolic link")
                if e is None:
                    parent_id = self._ensure_parents(s.key)
                    entry_id = self.meta.insert_entry(
                        parent_id=parent_id, name=s.key.rpartition("/")[2], key=s.key,
                        kind="file", mode=0o644, uid=self.uid, gid=self.gid, now_ns=now_ns)
                else:
                    entry_id = e.id
                self.meta.set_content(
                    entry_id, blob_id=blob_id, size=size, sha256=sha, mime_type=s.mime_type,
                    created_at=now_ns // 1_000_000_000, mtime_ns=now_ns, durable=self.sync)
                self.meta.delete_session(s.id)
        except ArtifactError:
            # The key cannot take the artifact (a directory appeared meanwhile): nothing to
            # resume, so the session goes with its bytes.
            self.data.remove_blob(blob_id)
            self._drop_session(s)
            raise
        except BaseException:
            self.data.remove_blob(blob_id)
            raise
        self.data.remove_staging(s.id)
        if e is None:
            self._changed_keys()
            self._notify(Change("added", entry_id, parent_id, s.key.rpartition("/")[2]))
        else:
            if e.blob_id:
                self._doom(e.blob_id)
            self._notify(Change("content", entry_id, e.parent_id, e.name))
        log.info("committed %s (%d bytes, sha256 %s)", s.key, size, sha[:12])
        entry = self.meta.entry(entry_id)
        assert entry is not None
        return self._artifact(entry)

    # --- durability and expiry (background) -----------------------------------------------

    def flush(self) -> int:
        """Make committed artifacts durable, then free the blobs of deleted ones.

        Runs the fsyncs inline: call it from a thread-tolerant place (close) or through
        flush_async. Returns how many rows became durable.
        """
        rows = self.meta.not_durable(10_000)
        done = set(self.data.fsync_blobs([e.blob_id for e in rows if e.blob_id]))
        return self._mark_flushed(rows, done)

    async def flush_async(self) -> int:
        rows = self.meta.not_durable(10_000)
        if not rows and not self._doomed:
            return 0
        ids = [e.blob_id for e in rows if e.blob_id]
        done = set(await trio.to_thread.run_sync(self.data.fsync_blobs, ids))
        return self._mark_flushed(rows, done)

    def _mark_flushed(self, rows: list[Entry], done: set[str]) -> int:
        doomed, self._doomed = self._doomed, []
        # One FULL-synchronous commit fsyncs the WAL with every earlier transaction in it, so
        # after it no row can come back pointing at a blob we are about to unlink.
        self.meta.conn.execute("PRAGMA synchronous = FULL")
        try:
            with self.meta.transaction():
                self.meta.mark_durable([(e.id, e.blob_id) for e in rows
                                        if e.blob_id in done])
        finally:
            if not self.sync:
                self.meta.conn.execute("PRAGMA synchronous = NORMAL")
        for blob_id in doomed:
            self.data.remove_blob(blob_id)
        return len(done)

    def sweep_expired(self) -> int:
        expired = self.meta.expired_sessions(int(time.time()))
        for s in expired:
            if s.id not in self._uploading:
                self._drop_session(s)
        return len(expired)

    async def run_background(self, *, flush_interval: float = 2.0,
                             sweep_interval: float = 60.0) -> None:
        """The flusher and the session sweeper; runs until cancelled."""
        next_sweep = trio.current_time()
        while True:
            await trio.sleep(flush_interval)
            try:
                await self.flush_async()
                if trio.current_time() >= next_sweep:
                    self.sweep_expired()
                    next_sweep = trio.current_time() + sweep_interval
            except Exception:
                log.exception("background flush failed; will retry")

    # --- the tree (for the mount) ----------------------------------------------------------

    def entry(self, entry_id: int) -> Entry:
        """The entry as the mount shows it: a file open for writing has its live size."""
        e = self.meta.entry(entry_id)
        if e is None:
            raise NotFound(f"no entry {entry_id}")
        ws = self._writes.get(entry_id)
        if ws is not None:
            return replace(e, size=ws.size(), mtime_ns=ws.mtime_ns)
        return e

    def lookup(self, parent_id: int, name: str) -> Entry:
        if len(name.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise InvalidKey(f"name is longer than {MAX_COMPONENT_BYTES} bytes",
                             errno=errno.ENAMETOOLONG)
        e = self.meta.child(parent_id, name)
        if e is None:
            raise NotFound(f"no entry {name!r} in directory {parent_id}")
        ws = self._writes.get(e.id)
        if ws is not None:
            return replace(e, size=ws.size(), mtime_ns=ws.mtime_ns)
        return e

    def readdir(self, parent_id: int, after_id: int, limit: int) -> list[Entry]:
        """Children of a directory after a cursor (an entry id), in id order."""
        entries = self.meta.children(parent_id, after_id, limit)
        if self._writes:
            entries = [replace(e, size=ws.size(), mtime_ns=ws.mtime_ns)
                       if (ws := self._writes.get(e.id)) else e for e in entries]
        return entries

    def subdir_count(self, entry_id: int) -> int:
        return self.meta.count_subdirs(entry_id)

    def _dir(self, entry_id: int) -> Entry:
        d = self.meta.entry(entry_id)
        if d is None:
            raise NotFound(f"no directory {entry_id}")
        if not d.is_dir:
            raise Conflict(f"{d.key} is not a directory", errno=errno.ENOTDIR)
        return d

    def _new_name(self, parent_id: int, name: str) -> tuple[Entry, str]:
        """Check that ``name`` may be created in ``parent_id``; return the parent and key."""
        validate_name(name)
        parent = self._dir(parent_id)
        key = join_key(parent.key, name)
        existing = self.meta.child(parent_id, name)
        if existing is not None:
            raise Conflict(f"{key} already exists", errno=errno.EEXIST)
        return parent, key

    def mkdir(self, parent_id: int, name: str, mode: int, uid: int, gid: int) -> Entry:
        with self.meta.transaction():
            _, key = self._new_name(parent_id, name)
            new_id = self.meta.insert_entry(
                parent_id=parent_id, name=name, key=key, kind="dir", mode=mode & 0o7777,
                uid=uid, gid=gid, now_ns=time.time_ns())
        self._changed_keys()
        return self.entry(new_id)

    def symlink(self, parent_id: int, name: str, target: str, uid: int, gid: int) -> Entry:
        if not target or len(target.encode("utf-8", "surrogateescape")) > MAX_SYMLINK_TARGET:
            raise InvalidArgument(
                f"symlink target must be 1 to {MAX_SYMLINK_TARGET} bytes",
                errno=errno.ENAMETOOLONG if target else errno.ENOENT)
        with self.meta.transaction():
            _, key = self._new_name(parent_id, name)
            new_id = self.meta.insert_entry(
                parent_id=parent_id, name=name, key=key, kind="symlink", mode=0o777,
                uid=uid, gid=gid, now_ns=time.time_ns(), target=target)
        return self.entry(new_id)

    def readlink(self, entry_id: int) -> str:
        e = self.entry(entry_id)
        if not e.is_symlink or e.target is None:
            raise InvalidArgument(f"{e.key} is not a symbolic link")
        return e.target

    def rmdir(self, parent_id: int, name: str) -> None:
        with self.meta.transaction():
            e = self.meta.child(parent_id, name)
            if e is None:
                raise NotFound(f"no directory {name!r}")
            if not e.is_dir:
                raise Conflict(f"{e.key} is not a directory", errno=errno.ENOTDIR)
            if self.meta.has_children(e.id):
                raise NotEmpty(f"directory {e.key} is not empty")
            self.meta.delete_entry(e.id)
        self._changed_keys()

    def unlink(self, parent_id: int, name: str) -> None:
        """Remove a file (committed or being written) or a symlink, as rm does."""
        with self.meta.transaction():
            e = self.meta.child(parent_id, name)
            if e is None:
                raise NotFound(f"no entry {name!r}")
            if e.is_dir:
                raise Conflict(f"{e.key} is a directory", errno=errno.EISDIR)
            self.meta.delete_entry(e.id)
        self._changed_keys()
        if e.blob_id:
            self._doom(e.blob_id)
        log.info("deleted %s", e.key)

    def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str,
               flags: int = 0) -> Entry | None:
        """Move a file, symlink or whole directory in one transaction.

        Returns the entry that was replaced (and is gone), if any.
        """
        noreplace = 1  # RENAME_NOREPLACE
        if flags & ~noreplace:
            raise InvalidArgument(f"rename flags {flags:#x} are not supported (only NOREPLACE)")
        validate_name(new_name)
        with self.meta.transaction():
            src = self.meta.child(old_parent, old_name)
            if src is None:
                raise NotFound(f"no entry {old_name!r}")
            dest_dir = self._dir(new_parent)
            new_key = join_key(dest_dir.key, new_name)
            target = self.meta.child(new_parent, new_name)
            if target is not None and target.id == src.id:
                return None
            if target is not None and flags & noreplace:
                raise Conflict(f"{target.key} exists", errno=errno.EEXIST)
            if src.is_dir:
                if new_key.startswith(src.key + "/"):
                    raise InvalidArgument(f"cannot move {src.key} into itself ({new_key})")
                if target is not None:
                    if not target.is_dir:
                        raise Conflict(f"{target.key} is not a directory", errno=errno.ENOTDIR)
                    if self.meta.has_children(target.id):
                        raise NotEmpty(f"directory {target.key} is not empty")
                longest = self.meta.longest_key_under(src.key)
                if longest and longest - len(src.key) + len(new_key) > 1024:
                    raise InvalidKey("a path under the moved directory would pass 1024 bytes",
                                     errno=errno.ENAMETOOLONG)
            elif target is not None and target.is_dir:
                raise Conflict(f"{target.key} is a directory", errno=errno.EISDIR)
            if target is not None:
                self.meta.delete_entry(target.id)
            self.meta.move_entry(src.id, new_parent, new_name, new_key, time.time_ns())
            if src.is_dir:
                self.meta.rekey_subtree(src.key, new_key)
        self._changed_keys()
        if target is not None and target.blob_id:
            self._doom(target.blob_id)
        log.info("renamed %s -> %s", src.key, new_key)
        return target

    def set_attrs(self, entry_id: int, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, mtime_ns: int | None = None) -> Entry:
        """chmod, chown, utimens: metadata only, so cp -a, rsync -a and tar x finish."""
        columns: dict[str, int | str | None] = {}
        if mode is not None:
            columns["mode"] = stat_mod.S_IMODE(mode)
        if uid is not None:
            columns["uid"] = uid
        if gid is not None:
            columns["gid"] = gid
        if mtime_ns is not None:
            columns["mtime_ns"] = mtime_ns
            ws = self._writes.get(entry_id)
            if ws is not None:
                ws.mtime_ns = mtime_ns
        columns["ctime_ns"] = time.time_ns()
        if self.meta.entry(entry_id) is None:
            raise NotFound(f"no entry {entry_id}")
        self.meta.update_attrs(entry_id, **columns)
        return self.entry(entry_id)

    async def truncate(self, entry_id: int, size: int) -> Entry:
        """Set a file's length: in its open write session, or through a new one."""
        validate_size(size)
        ws = self._writes.get(entry_id)
        if ws is not None and not ws.committing:
            await ws.ready.wait()
            self._ftruncate(ws, size)
            return self.entry(entry_id)
        ws = await self.open_write(entry_id, truncate=size == 0)
        try:
            self._ftruncate(ws, size)
        finally:
            await self.release_write(ws)
        return self.entry(entry_id)

    @staticmethod
    def _ftruncate(ws: WriteSession, size: int) -> None:
        try:
            os.ftruncate(ws.fd, size)
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                raise InvalidArgument(f"size {size} is larger than the store can hold",
                                      errno=errno.EFBIG) from exc
            raise from_os_error(exc, "truncate") from exc
        ws.wrote()

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.data.root)

    # --- files open for writing (the mount's upload sessions) ------------------------------

    def active_write(self, entry_id: int) -> WriteSession | None:
        return self._writes.get(entry_id)

    def create_file(self, parent_id: int, name: str, mode: int, uid: int,
                    gid: int) -> tuple[Entry, WriteSession]:
        """A new file in the mount: an entry (not yet an artifact) and its write session."""
        session_id = secrets.token_urlsafe(18)
        self.data.create_staging(session_id)
        try:
            with self.meta.transaction():
                _, key = self._new_name(parent_id, name)
                entry_id = self.meta.insert_entry(
                    parent_id=parent_id, name=name, key=key, kind="file", mode=mode & 0o7777,
                    uid=uid, gid=gid, now_ns=time.time_ns())
                self.meta.insert_session(SessionRow(
                    id=session_id, origin="mount", key=key, entry_id=entry_id, size=None,
                    offset=0, mime_type=mime_type_for_name(name),
                    created_at=int(time.time()), expires_at=None))
            fd = self.data.open_staging(session_id)
        except BaseException:
            self.data.remove_staging(session_id)
            raise
        self._changed_keys()
        ws = WriteSession(id=session_id, entry_id=entry_id, fd=fd)
        ws.ready.set()
        self._writes[entry_id] = ws
        return self.entry(entry_id), ws

    async def open_write(self, entry_id: int, *, truncate: bool) -> WriteSession:
        """Open an existing file for writing: join its write session or start one.

        Without truncate the session starts from a copy of the artifact's bytes.
        """
        while True:
            ws = self._writes.get(entry_id)
            if ws is None:
                break
            if ws.committing:
                await ws.closed.wait()
                continue
            ws.writers += 1
            await ws.ready.wait()
            if ws.failed is not None:
                ws.writers -= 1
                raise ws.failed
            if truncate:
                self._ftruncate(ws, 0)
            return ws
        e = self.meta.entry(entry_id)
        if e is None:
            raise NotFound(f"no entry {entry_id}")
        if not e.is_file:
            raise Conflict(f"{e.key} is a directory", errno=errno.EISDIR)
        session_id = secrets.token_urlsafe(18)
        self.data.create_staging(session_id)
        fd = self.data.open_staging(session_id)
        ws = WriteSession(id=session_id, entry_id=entry_id, fd=fd)
        self._writes[entry_id] = ws
        try:
            self.meta.insert_session(SessionRow(
                id=session_id, origin="mount", key=e.key, entry_id=entry_id, size=None,
                offset=0, mime_type=e.mime_type or mime_type_for_name(e.name),
                created_at=int(time.time()), expires_at=None))
            if e.blob_id and not truncate:
                if e.size <= INLINE_IO_BYTES:
                    self.data.copy_blob_to_staging(e.blob_id, session_id)
                else:
                    blob_id = e.blob_id
                    await trio.to_thread.run_sync(
                        lambda: self.data.copy_blob_to_staging(blob_id, session_id))
        except BaseException as exc:
            ws.failed = exc if isinstance(exc, ArtifactError) else ArtifactError(str(exc))
            self._discard_write(ws)
            ws.ready.set()
            raise
        ws.ready.set()
        return ws

    async def sync_write(self, ws: WriteSession) -> None:
        """fsync: the bytes written so far are durable, and so will be the commit."""
        await trio.to_thread.run_sync(os.fsync, ws.fd)
        ws.synced = True

    async def release_write(self, ws: WriteSession) -> Entry | None:
        """One writable handle closed; the last one commits the file as an artifact."""
        ws.writers -= 1
        if ws.writers > 0:
            return None
        ws.committing = True
        try:
            return await self._commit_write(ws)
        finally:
            if self._writes.get(ws.entry_id) is ws:
                del self._writes[ws.entry_id]
            os.close(ws.fd)
            ws.closed.set()

    async def _commit_write(self, ws: WriteSession) -> Entry | None:
        if self.meta.entry(ws.entry_id) is None:
            # Unlinked while open: as on a disk, the bytes go with the last handle.
            self._drop_write_session(ws)
            return None
        sha, size = await self._digest(ws.fd)
        durable = ws.synced or self.sync
        blob_id = await self._publish(ws.id, durable)
        try:
            with self.meta.transaction():
                e = self.meta.entry(ws.entry_id)
                s = self.meta.session(ws.id)
                if e is None or s is None:
                    raise NotFound(f"{ws.id}: entry {ws.entry_id} was removed while committing")
                self.meta.set_content(
                    e.id, blob_id=blob_id, size=size, sha256=sha, mime_type=s.mime_type,
                    created_at=int(time.time()), mtime_ns=ws.mtime_ns, durable=durable)
                self.meta.delete_session(ws.id)
        except NotFound:
            self.data.remove_blob(blob_id)
            self._drop_write_session(ws)
            return None
        except BaseException:
            self.data.remove_blob(blob_id)
            raise
        self.data.remove_staging(ws.id)
        if e.blob_id is None:
            self._changed_keys()  # a new artifact joins the listing
        else:
            self._doom(e.blob_id)
        log.info("committed %s (%d bytes, sha256 %s) from the mount", e.key, size, sha[:12])
        return self.meta.entry(e.id)

    def _drop_write_session(self, ws: WriteSession) -> None:
        self.meta.delete_session(ws.id)
        self.data.remove_staging(ws.id)

    def _discard_write(self, ws: WriteSession) -> None:
        """Forget a write session without committing (failed open, or shutdown)."""
        if self._writes.get(ws.entry_id) is ws:
            del self._writes[ws.entry_id]
        with contextlib.suppress(OSError):
            os.close(ws.fd)
        self._drop_write_session(ws)

    def open_read(self, entry_id: int) -> int:
        """A read-only fd on what a new opener should see: the writer's bytes while the file
        is open for writing (as on a disk), else the committed blob. The caller closes it."""
        ws = self._writes.get(entry_id)
        if ws is not None:
            return os.open(self.data.staging_path(ws.id), os.O_RDONLY | os.O_CLOEXEC)
        e = self.meta.entry(entry_id)
        if e is None:
            raise NotFound(f"no entry {entry_id}")
        if not e.is_file:
            raise Conflict(f"{e.key} is a directory", errno=errno.EISDIR)
        if e.blob_id is None:
            raise NotFound(f"{e.key} has no content yet")
        return self.data.open_blob(e.blob_id)

    # --- xattrs ----------------------------------------------------------------------------

    def xattr_names(self, entry_id: int) -> list[str]:
        e = self.entry(entry_id)
        if not e.is_file:
            return []
        names = [XATTR_MIME]
        if e.is_artifact:
            names += [XATTR_SHA256, XATTR_CREATED]
        if entry_id in self._writes:
            names.append(XATTR_SESSION)
        return names

    def get_xattr(self, entry_id: int, name: str) -> bytes:
        e = self.entry(entry_id)
        ws = self._writes.get(entry_id)
        value: object = None
        if e.is_file:
            if name == XATTR_MIME:
                s = self.meta.session(ws.id) if ws else None
                value = s.mime_type if s else e.mime_type
            elif name == XATTR_SHA256:
                value = e.sha256
            elif name == XATTR_CREATED:
                value = e.created_at
            elif name == XATTR_SESSION and ws is not None:
                value = ws.id
        if value is None:
            raise NotFound(f"no attribute {name}", errno=errno.ENODATA)
        return str(value).encode()

    def set_xattr(self, entry_id: int, name: str, value: bytes) -> None:
        e = self.entry(entry_id)
        if name == XATTR_MIME and e.is_file:
            mime = validate_mime_type(value.decode("utf-8", "replace"))
            ws = self._writes.get(entry_id)
            if ws is not None:
                self.meta.set_session_mime_type(ws.id, mime)
            if e.is_artifact:
                self.meta.update_attrs(entry_id, mime_type=mime)
            return
        if name in (XATTR_SHA256, XATTR_CREATED, XATTR_SESSION, XATTR_MIME):
            try:
                current = self.get_xattr(entry_id, name)
            except NotFound:
                current = None
            if current == value:
                return  # cp -a copying our own read-only attributes: nothing to change
            raise Unsupported(f"{name} is read-only")
        raise Unsupported(f"attribute {name} is not supported", errno=errno.ENOTSUP)

    def remove_xattr(self, entry_id: int, name: str) -> None:
        e = self.entry(entry_id)
        if name == XATTR_MIME and e.is_file:
            self.set_xattr(entry_id, name, mime_type_for_name(e.name).encode())
            return
        if name in self.xattr_names(entry_id):
            raise Unsupported(f"{name} is read-only")
        raise NotFound(f"no attribute {name}", errno=errno.ENODATA)
