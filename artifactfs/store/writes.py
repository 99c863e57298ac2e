"""Files open for writing in the mount: the mount's upload sessions.

A mixin of ArtifactStore (service.py). All writable handles of one inode share one
WriteSession (sessions.py); the last release commits it through the same publish step as an
HTTP upload. See docs/CONCURRENCY.md for why each await is safe.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import time

import trio

from ..errors import (
    ArtifactError,
    Conflict,
    InvalidArgument,
    NoSpace,
    NotFound,
    from_os_error,
)
from ..models import mime_type_for_name, validate_size
from .blobs import fsync_path, is_no_space
from .metadata import Entry, SessionRow
from .sessions import WriteSession
from .snapshot import copy_file, settled_state
from .state import INLINE_IO_BYTES, Change, log
from .tree import TreeOperations


class MountWrites(TreeOperations):
    """Files open for writing: create, open, truncate, fsync, release (commit)."""

    async def truncate(self, entry_id: int, size: int) -> Entry:
        """Set a file's length: in its open write session, or through a new one."""
        validate_size(size)
        ws = self._writes.get(entry_id)
        if ws is not None and not ws.committing:
            if not ws.ready.is_set():
                await ws.ready.wait()
            # Again after the wait: a commit that began meanwhile may have made the staging
            # file the blob (a committed version's bytes must never change).
            if self._writes.get(entry_id) is ws and not ws.committing and ws.failed is None:
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
            # Not when the length is already right (O_TRUNC of a new, empty file): on ext4 a
            # truncate to 0 makes the staging file's last close start its writeback
            # (auto_da_alloc), a cost on every small file created with O_TRUNC.
            if os.fstat(ws.fd).st_size != size:
                os.ftruncate(ws.fd, size)
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                raise InvalidArgument(f"size {size} is larger than the store can hold",
                                      errno=errno.EFBIG) from exc
            raise from_os_error(exc, "truncate") from exc
        ws.truncated(size)
        ws.wrote()

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
                parent, key = self._new_name(parent_id, name)
                mode, gid = self._inherited(parent, "file", mode, gid)
                now = time.time_ns()
                entry_id = self.meta.insert_entry(
                    parent_id=parent_id, name=name, key=key, kind="file", mode=mode,
                    uid=uid, gid=gid, now_ns=now)
                self.meta.dirs_changed(now, parent_id)
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

    async def open_write(self, entry_id: int, *, truncate: bool,
                         unlinked_from: int | None = None) -> WriteSession:
        """Open an existing file for writing: join its write session or start one.

        Without truncate the session starts from a copy of the artifact's bytes. A handle
        that opened the file before it was unlinked or replaced, and writes to it only now,
        passes ``unlinked_from``, an fd on the bytes it has open (entry ids are never reused,
        so a missing entry is that file).
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
            if unlinked_from is None:
                raise NotFound(f"no entry {entry_id}")
            return await self._open_unlinked_write(entry_id, unlinked_from)
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
            # An empty artifact has nothing to copy, so the running digest still covers every
            # byte: `dd of=F` opens F, dup2()s it and closes the first fd, which commits F
            # empty; dd's writes then start this session, whose digest can then be taken
            # as the bytes arrive.
            if e.blob_id and not truncate and e.size > 0:
                ws.hasher = None  # starts from a copy: its digest follows the commit
                self.data.check_space(e.size, f"rewriting {e.key}")
                if e.size <= INLINE_IO_BYTES:
                    self.data.copy_blob_to_staging(e.blob_id, session_id)
                else:
                    blob_id = e.blob_id
                    await trio.to_thread.run_sync(
                        lambda: self.data.copy_blob_to_staging(blob_id, session_id))
        except BaseException as exc:
            self._fail_open(ws, exc)
            raise
        ws.ready.set()
        return ws

    def join_write(self, ws: WriteSession, *, truncate: bool) -> bool:
        """Join a write session that is ready and not committing, without waiting (the
        mount's passthrough writers: the kernel's backing file must still be its file when
        the open is answered). False if it cannot be joined now."""
        if ws.committing or not ws.ready.is_set() or ws.failed is not None:
            return False
        if truncate:
            self._ftruncate(ws, 0)
        ws.writers += 1
        ws.closed_by_writers = False
        return True

    def _fail_open(self, ws: WriteSession, exc: BaseException) -> None:
        """The session could not get its starting bytes: forget it, and tell the openers that
        joined it meanwhile why (they wait on ws.ready)."""
        ws.failed = exc if isinstance(exc, ArtifactError) else ArtifactError(str(exc))
        self._discard_write(ws)
        ws.ready.set()

    async def open_detached_write(self, entry_id: int, source_fd: int | None) -> WriteSession:
        """Writes into a version of ``entry_id`` that is no longer at its name: an open(2) in
        the mount that raced a replacement names it (fs/replaced.py). As on a disk after a
        rename over the file, they go to that version, which is no file any more: a private
        copy of ``source_fd`` (empty if None, for O_TRUNC) that vanishes at close. It is not
        the entry's session (the entry may live on with newer bytes), so no one joins it."""
        return await self._open_unlinked_write(entry_id, source_fd, detached=True)

    async def _open_unlinked_write(self, entry_id: int, source_fd: int | None, *,
                                   detached: bool = False) -> WriteSession:
        """As on a disk, a file unlinked (or replaced by rename) while open stays writable
        through the handles that have it open, and goes when the last one closes. The session
        starts from the bytes the handle has open; it has no row (no key to resume it under),
        and the commit drops it, since its entry is gone."""
        session_id = secrets.token_urlsafe(18)
        self.data.create_staging(session_id)
        fd = self.data.open_staging(session_id)
        ws = WriteSession(id=session_id, entry_id=entry_id, fd=fd, detached=detached)
        if not detached:
            self._writes[entry_id] = ws
        if source_fd is None:  # O_TRUNC: it starts empty
            ws.ready.set()
            return ws
        ws.hasher = None  # starts from a copy: its digest follows the commit
        try:
            size = os.fstat(source_fd).st_size
            self.data.check_space(size, f"rewriting unlinked entry {entry_id}")

            def copy() -> None:
                done = 0
                while done < size:
                    n = os.copy_file_range(source_fd, fd, size - done, done, done)
                    if n == 0:
                        break
                    done += n

            if size <= INLINE_IO_BYTES:
                copy()
            else:
                await trio.to_thread.run_sync(copy)
        except BaseException as exc:
            self._fail_open(ws, exc)
            raise
        ws.ready.set()
        return ws

    def pass_through(self, ws: WriteSession) -> None:
        """The kernel writes this session's staging file itself from now on (the mount gave
        it to the kernel as a backing file before any write): no running digest, and every
        commit copies the file (snapshot.py)."""
        ws.hasher = None
        ws.passthrough = True

    def write(self, ws: WriteSession, buf: bytes, offset: int) -> int:
        """Write into a file open for writing; a full disk fails the write and the file."""
        try:
            # The key only for the message, if it is needed: a query per WRITE otherwise.
            self.data.check_space(len(buf), lambda: f"writing {self._key_of(ws)}")
            n = os.pwrite(ws.fd, buf, offset)
            ws.fed(buf, offset, n)
        except (NoSpace, OSError) as exc:
            if isinstance(exc, NoSpace) or is_no_space(exc):
                ws.nospace = True
            if isinstance(exc, OSError):
                raise from_os_error(exc, f"writing {self._key_of(ws)}") from exc
            raise
        ws.wrote()
        return n

    def _key_of(self, ws: WriteSession) -> str:
        e = self.meta.entry(ws.entry_id)
        return e.key if e is not None else f"entry {ws.entry_id}"

    async def sync_write(self, ws: WriteSession) -> None:
        """fsync: the bytes written so far are durable, and so will be the commit."""
        if ws.passthrough and not ws.prepare_wasted and await self._prepare_commit(ws):
            ws.synced = True
            return
        await trio.to_thread.run_sync(os.fsync, ws.fd)
        ws.synced = True

    async def _prepare_commit(self, ws: WriteSession) -> bool:
        """fsync of a passthrough session: make the commit's copy now, durable, instead of
        fsyncing the staging file. The bytes written so far are then as durable as fsync
        promises (a session nobody commits is discarded after a crash anyway, so only what
        a commit will publish needs the disk), and a close that follows (``dd conv=fsync``)
        finds its copy made (snapshot.py). The copy's writeback overlaps the copying.
        False if a copy made for an earlier fsync went unused."""
        state = settled_state(ws.fd)
        if ws.prepared is not None:
            if ws.prepared[0] == state:
                return True  # that copy holds these bytes, durably
            self._forget_prepared(ws)
            ws.prepare_wasted = True
            return False
        self.data.check_space(state.size, lambda: f"syncing {self._key_of(ws)}")
        copy_id = secrets.token_urlsafe(18)
        self.data.create_staging(copy_id)
        try:
            size = await self._copy(ws.fd, copy_id, state.size, durable=True)
        except BaseException:
            self.data.remove_staging(copy_id)
            raise
        ws.prepared = (state, copy_id, size)
        return True

    def _forget_prepared(self, ws: WriteSession) -> None:
        if ws.prepared is not None:
            self.data.remove_staging(ws.prepared[1])
            ws.prepared = None

    async def release_write(self, ws: WriteSession) -> Entry | None:
        """One writable handle closed; the last one commits the file as an artifact."""
        if not self.leave_write(ws):
            return None
        return await self.commit_write(ws)

    def leave_write(self, ws: WriteSession) -> bool:
        """One writable handle closed: True if it was the last, and the session now commits
        (``commit_write``, which the caller must await). Never awaits, so that the requests
        that follow find the session as this close left it: committing, not to be joined."""
        ws.writers -= 1
        if ws.writers > 0:
            return False
        ws.committing = True
        return True

    async def commit_write(self, ws: WriteSession) -> Entry | None:
        """Commit a session its last writer left (``leave_write``)."""
        try:
            return await self._commit_write(ws)
        except Exception:
            # No writer is left to retry (the fd closes below): a session that failed to
            # commit (a full disk, an I/O error) must not hold its bytes' space until restart.
            # Not once its staging file is a committed blob (a failure after the commit's
            # transaction, such as the WAL's fsync): those bytes are the artifact's.
            if not ws.fd_is_blob:
                with contextlib.suppress(Exception):
                    self._abandon_write(ws)
            raise
        finally:
            if self._writes.get(ws.entry_id) is ws:
                del self._writes[ws.entry_id]
            os.close(ws.fd)
            ws.closed.set()

    async def snapshot_write(self, ws: WriteSession) -> Entry | None:
        """Commit what a passthrough session's file holds now, and keep the session open.

        For the FLUSH of its last writable handle: close(2) commits (DESIGN §2), but the
        kernel may go on writing the file through another descriptor of the same open file
        and sends no request when it does; the release commits again if it did (snapshot.py).
        None if nothing changed since the last commit, or the file is gone."""
        return await self._commit_passthrough(ws, final=False)

    async def _commit_passthrough(self, ws: WriteSession, *, final: bool) -> Entry | None:
        """Commit a copy of a passthrough session's staging file (snapshot.py); ``final``
        (the last RELEASE: no descriptor is left to write the file) ends the session,
        commits only if the file changed since its last commit, and needs no copy: the
        staging file itself becomes the blob."""
        if ws.detached or self.meta.entry(ws.entry_id) is None:
            if final:
                self._drop_write_session(ws)
            return None
        state = settled_state(ws.fd)
        if state == ws.committed_state:
            if final:
                self._drop_write_session(ws)
            else:
                ws.closed_by_writers = True  # nothing new since the commit at a close
            return None
        if ws.nospace:
            key = self._key_of(ws)
            if final:
                self._abandon_write(ws)
            raise NoSpace(f"{key} was not saved: a write to it failed for want of space;"
                          " it keeps its previous content")
        durable = ws.synced or self.sync
        prepared = ws.prepared
        reuse = prepared is not None and prepared[0] == state
        if prepared is not None and not reuse:
            self._forget_prepared(ws)
            ws.prepare_wasted = True
        copied = not reuse and not final
        if copied:
            # The kernel's writes reached the disk without the space check each WRITE gets,
            # and the copy needs their room again: a file system without it refuses the
            # commit, as a failed write would have, and the file is not kept (nospace).
            try:
                self.data.check_space(state.size, lambda: f"committing {self._key_of(ws)}")
            except NoSpace:
                ws.nospace = True
                raise
        ws.prepared = None
        if prepared is not None and reuse:
            _, copy_id, size = prepared  # made by fsync: durable already
        elif final:
            copy_id, size = ws.id, state.size  # no descriptor is left to write it
        else:
            copy_id = secrets.token_urlsafe(18)
            self.data.create_staging(copy_id)
        try:
            if copied:
                size = await self._copy(ws.fd, copy_id, state.size)
            blob_id = await self._publish(copy_id, durable)
        finally:
            if copy_id != ws.id:
                self.data.remove_staging(copy_id)
        # The digest follows the commit (digests.py): the copy is the blob, immutable now.
        e = self._set_content(ws, blob_id, None, size, durable, end_session=final)
        if e is None:
            if final:
                self._drop_write_session(ws)
            return None
        ws.committed_state = state
        ws.closed_by_writers = not final
        ws.fd_is_blob = copy_id == ws.id
        if final:
            self.data.remove_staging(ws.id)  # its blob name stays (publish links it)
        return await self._committed(ws, e, blob_id, size, None, durable)

    async def _copy(self, src: int, copy_id: str, size: int, *, durable: bool = False) -> int:
        """Copy a passthrough session's staging file into the staging file ``copy_id``."""
        copy_fd = self.data.open_staging(copy_id)
        try:
            if size <= INLINE_IO_BYTES and not durable:  # an fsync never runs on the loop
                return copy_file(src, copy_fd)
            return await trio.to_thread.run_sync(
                lambda: copy_file(src, copy_fd, durable=durable))
        finally:
            os.close(copy_fd)

    def _set_content(self, ws: WriteSession, blob_id: str, sha: str | None, size: int,
                     durable: bool, *, end_session: bool = True) -> Entry | None:
        """The commit's one transaction: the entry gets the blob. Returns the entry as it
        was before (None, the blob removed, if the entry or the session went meanwhile)."""
        try:
            with self.meta.transaction():
                e = self.meta.entry(ws.entry_id)
                s = self.meta.session(ws.id)
                if e is None or s is None:
                    raise NotFound(f"{ws.id}: entry {ws.entry_id} was removed while committing")
                self.meta.set_content(
                    e.id, blob_id=blob_id, size=size, sha256=sha, mime_type=s.mime_type,
                    created_at=int(time.time()), mtime_ns=ws.mtime_ns,
                    ctime_ns=ws.ctime_ns, durable=durable)
                if end_session:
                    self.meta.delete_session(ws.id)
        except NotFound:
            self.data.remove_blob(blob_id)
            return None
        except BaseException:
            self.data.remove_blob(blob_id)
            raise
        return e

    async def _committed(self, ws: WriteSession, e: Entry, blob_id: str, size: int,
                         sha: str | None, durable: bool) -> Entry | None:
        """After the commit's transaction: the listing, the version it replaced, the digest
        (if the commit left it pending), the WAL."""
        if e.blob_id is None:
            self._changed_keys()  # a new artifact joins the listing
        else:
            self._doom(e.blob_id, replaced=True)
            ws.replaced = e
        if sha is None:
            self.digests.add(e.id, blob_id)
        log.info("committed %s (%d bytes, sha256 %s) from the mount", e.key, size,
                 sha[:12] if sha else "to follow")
        if durable and not self.sync:
            await self._sync_metadata()
        return self.meta.entry(e.id)

    async def _commit_write(self, ws: WriteSession) -> Entry | None:
        if ws.passthrough:
            return await self._commit_passthrough(ws, final=True)
        if ws.detached or self.meta.entry(ws.entry_id) is None:
            # Unlinked (or replaced) while open: as on a disk, the bytes go with the last
            # handle.
            self._drop_write_session(ws)
            return None
        if ws.nospace:
            key = self._key_of(ws)
            self._abandon_write(ws)
            raise NoSpace(f"{key} was not saved: a write to it failed for want of space;"
                          " it keeps its previous content")
        # Writes that arrived in order were hashed as they came; else the digest follows
        # the commit (digests.py) instead of holding close(2) while the file is read back.
        size = os.fstat(ws.fd).st_size
        digest = ws.running_digest(size)
        sha = digest[0] if digest else None
        durable = ws.synced or self.sync
        blob_id = await self._publish(ws.id, durable)
        e = self._set_content(ws, blob_id, sha, size, durable)
        if e is None:
            self._drop_write_session(ws)
            return None
        ws.fd_is_blob = True
        self.data.remove_staging(ws.id)
        return await self._committed(ws, e, blob_id, size, sha, durable)

    async def _sync_metadata(self) -> None:
        """fsync the WAL holding the commit just made: synchronous=NORMAL leaves that to the
        next flush (<= 2 s), but a file fsynced before close must survive a power loss from
        the moment close returns (DESIGN §6). In a thread: the loop never waits on the disk.
        A checkpoint that moved the frames into meta.db meanwhile synced that file first."""
        wal = self.data.db_path.with_name(self.data.db_path.name + "-wal")
        with contextlib.suppress(FileNotFoundError):
            await trio.to_thread.run_sync(fsync_path, wal)

    def _drop_write_session(self, ws: WriteSession) -> None:
        self.meta.delete_session(ws.id)
        self.data.remove_staging(ws.id)
        self._forget_prepared(ws)

    def _abandon_write(self, ws: WriteSession) -> None:
        """A write session that cannot commit: its bytes go (freeing their space) and a file
        that was never committed goes with them; a committed one keeps its artifact."""
        self.data.remove_staging(ws.id)
        self._forget_prepared(ws)
        # Its space now, not when its fd closes: the transaction below needs some, and a file
        # the kernel wrote by itself (passthrough_writes.py) may have taken the last of it.
        if not ws.fd_is_blob:
            with contextlib.suppress(OSError):
                os.ftruncate(ws.fd, 0)
        with self.meta.transaction():
            self.meta.delete_session(ws.id)
            e = self.meta.entry(ws.entry_id)
            gone = e is not None and e.is_file and e.blob_id is None
            if gone:
                self.meta.delete_entry(e.id)
        # Not changes the kernel made: it still holds the name, or pages of the bytes that
        # were not kept, and must drop them.
        if gone:
            assert e is not None
            self._changed_keys()
            self._notify(Change("removed", e.id, e.parent_id, e.name, previous=e))
        elif e is not None and e.is_artifact:
            self._notify(Change("content", e.id, e.parent_id, e.name, previous=e))

    def _discard_write(self, ws: WriteSession) -> None:
        """Forget a write session without committing (failed open, or shutdown)."""
        if self._writes.get(ws.entry_id) is ws:
            del self._writes[ws.entry_id]
        with contextlib.suppress(OSError):
            os.close(ws.fd)
        self._drop_write_session(ws)

    def open_read(self, entry_id: int) -> int:
        """A read-only fd on what a new opener should see: the writer's bytes while the file
        is open for writing (as on a disk), else the committed blob (also once its writers
        closed it and only their RELEASE is still to come). The caller closes it."""
        ws = self._writes.get(entry_id)
        if ws is not None and ws.being_written:
            try:
                return os.open(self.data.staging_path(ws.id), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                pass  # committed a moment ago (its commit still finishing): the blob below
        e = self.meta.entry(entry_id)
        if e is None:
            raise NotFound(f"no entry {entry_id}")
        if not e.is_file:
            raise Conflict(f"{e.key} is a directory", errno=errno.EISDIR)
        if e.blob_id is None:
            raise NotFound(f"{e.key} has no content yet")
        return self.data.open_blob(e.blob_id)

    def open_version(self, e: Entry) -> int:
        """A read-only fd on the bytes ``e`` held when it was read: a version that was at its
        name a moment ago (Change.previous, or what rename replaced). Its bytes are kept while
        the entry still holds them and for REPLACED_GRACE after a replacement; NotFound once
        they are gone, and for a deleted version (a delete frees its space at once)."""
        blob_id = e.blob_id
        if blob_id is not None and blob_id not in self._replaced:
            now = self.meta.entry(e.id)
            if now is None or now.blob_id != blob_id:
                blob_id = None
        if blob_id is None:
            raise NotFound(f"the version of {e.key} that was opened is gone")
        return self.data.open_blob(blob_id)

