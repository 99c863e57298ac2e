"""SQL over the schema of ``schema.py``: rows in, dataclasses out.

This module knows tables and indexes, not rules: the service decides what may happen and calls
these in the order it chose. Every function is one short statement (no I/O but SQLite), so a
run of them between two awaits is a critical section on the trio thread.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from ..errors import NoSpace, from_os_error
from .commitlog import BATCH_MAX, BATCH_WINDOW, CommitLog
from .schema import ROOT_ID, create_schema

ENTRY_COLUMNS = (
    "id, parent_id, name, key, kind, mode, uid, gid, mtime_ns, ctime_ns, atime_ns, blob_id,"
    " size, sha256, mime_type, created_at, epoch, target"
)
log = logging.getLogger("artifactfs.store")

SESSION_COLUMNS = 'id, origin, key, entry_id, size, "offset", mime_type, created_at, expires_at'


@dataclass(slots=True)
class Entry:
    """One path in the tree (a row of ``entries``).

    Treat it as immutable: one Entry is shared by handles, replies and caches, so a change is
    a copy (``dataclasses.replace``). Not ``frozen=True``, which enforces that at several times
    the cost of a construction: listing 100,000 entries builds 100,000 of them.
    """

    id: int
    parent_id: int | None
    name: str
    key: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    blob_id: str | None
    size: int
    sha256: str | None
    mime_type: str | None
    created_at: int | None
    epoch: int
    target: str | None

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @property
    def is_symlink(self) -> bool:
        return self.kind == "symlink"

    @property
    def is_artifact(self) -> bool:
        """A committed artifact: what the Artifacts API sees."""
        return self.kind == "file" and self.blob_id is not None


@dataclass(frozen=True, slots=True)
class SessionRow:
    """One row of ``sessions``."""

    id: str
    origin: str
    key: str
    entry_id: int | None
    size: int | None
    offset: int
    mime_type: str
    created_at: int
    expires_at: int | None

    def fields(self) -> tuple[Any, ...]:
        """The row's values in column order (SessionRow(*fields) is the row again)."""
        return (self.id, self.origin, self.key, self.entry_id, self.size, self.offset,
                self.mime_type, self.created_at, self.expires_at)


class _Connection(sqlite3.Connection):
    """A full disk is NoSpace (ENOSPC / 507 in the error table), not an unexpected failure:
    the user frees space and retries. The blob reserve (blobs.py) makes it rare: it happens
    when something else fills the file system.

    ``idle_batch`` is the Metadata whose batch of logged commits is open while no logged
    commit runs (commitlog.py), else None. A statement other than a SELECT run then (a
    transaction's BEGIN, a single-statement update, a PRAGMA) commits that batch first: the
    batch must hold only writes that the commit log describes (commitlog.py, the invariant).
    """

    idle_batch: Metadata | None = None

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if self.idle_batch is not None and not sql.startswith("SELECT"):
            self.idle_batch.commit_batch()
        return _full_is_no_space(super().execute, sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
        if self.idle_batch is not None:
            self.idle_batch.commit_batch()
        return _full_is_no_space(super().executemany, sql, *args)


def _full_is_no_space(call: Callable[..., sqlite3.Cursor], *args: Any) -> sqlite3.Cursor:
    try:
        return call(*args)
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
            raise _no_space(exc) from exc
        raise


def _no_space(exc: sqlite3.OperationalError) -> NoSpace:
    return NoSpace(f"no space left for the metadata database ({exc}); free space on its"
                   " file system")


class _Logged:
    """The ``with`` block of Metadata.logged. A class, not a generator: contextlib's
    generator context manager costs several times more, on every commit."""

    __slots__ = ("fields", "kind", "meta", "mode")

    def __init__(self, meta: Metadata, kind: str, fields: tuple[Any, ...]) -> None:
        self.meta, self.kind, self.fields = meta, kind, fields
        self.mode = ""

    def __enter__(self) -> None:
        m = self.meta
        conn = m.conn
        if conn.in_transaction and not m._batch_open:
            self.mode = "inside"  # the caller's transaction commits it (start-up replay)
        elif not m._batching:
            self.mode = "alone"
            conn.execute("BEGIN IMMEDIATE")
        else:
            if m._batch_open and conn.idle_batch is None:
                raise RuntimeError("logged commits do not nest: the log would hold both")
            self.mode = "batch"
            if not m._batch_open and m.redo_pending and not m.retry_redo():
                raise NoSpace("commits acknowledged before the disk filled are not in the"
                              " database yet; free space on the data directory's file"
                              " system and retry")
            # Straight to sqlite3: through _Connection these would commit the idle batch.
            if not m._batch_open:
                sqlite3.Connection.execute(conn, "BEGIN IMMEDIATE")
                m._batch_open = True
                m._batch_due = time.monotonic() + BATCH_WINDOW
                if m.on_batch_open is not None:
                    m.on_batch_open()
            sqlite3.Connection.execute(conn, "SAVEPOINT logged")
            conn.idle_batch = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> None:
        m = self.meta
        conn = m.conn
        if self.mode == "alone":
            conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        if self.mode != "batch":
            return
        execute = sqlite3.Connection.execute
        if exc_type is None:
            try:
                m.log.append(m.generation, self.kind, self.fields)
            except OSError as error:
                self._undo()
                raise from_os_error(error, "writing the commit log") from error
            execute(conn, "RELEASE logged")
            conn.idle_batch = m
            m._batch_commits += 1
            if m._batch_commits >= BATCH_MAX:
                m.commit_batch()
        else:
            self._undo()

    def _undo(self) -> None:
        m = self.meta
        conn = m.conn
        if conn.in_transaction:
            sqlite3.Connection.execute(conn, "ROLLBACK TO logged")
            sqlite3.Connection.execute(conn, "RELEASE logged")
            conn.idle_batch = m
        else:
            m._batch_lost()  # SQLite undid the whole batch (a full disk, an I/O error)


class Metadata:
    """The metadata database: one connection, used only from the trio thread."""

    def __init__(self, path: Path, *, synchronous_full: bool = False) -> None:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so a transaction's extent is
        # visible in the code (see transaction()).
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                    factory=_Connection)
        # A second connection used only by checkpoint(), in a worker thread (opened lazily).
        self._checkpointer: sqlite3.Connection | None = None
        self.db = sqlite_utils.Database(self.conn)
        self.db.enable_wal()
        # NORMAL in WAL survives a process crash; a power loss may roll back the newest
        # transactions, which recovery handles (orphan blobs are removed). FULL for --sync.
        self.conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous_full else 'NORMAL'}")
        self.conn.execute("PRAGMA foreign_keys = OFF")
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.conn.execute("PRAGMA cache_size = -16000")
        # A checkpoint costs two fsyncs; at the default 1000 pages a burst of small commits
        # checkpointed every ~100 commits. The background task checkpoints in a worker thread
        # (checkpoint()); this threshold is the safety net if it falls behind: 10000 pages
        # (40 MiB of WAL).
        self.conn.execute("PRAGMA wal_autocheckpoint = 10000")
        # Idempotent (IF NOT EXISTS / OR IGNORE); migrates a data directory made earlier.
        migrated_not_durable = create_schema(self.conn, time.time_ns())
        # Entry ids are the mount's inode numbers, and SQLite hands the largest rowid out again
        # once its row is deleted; the kernel may still hold that inode (a file unlinked while
        # open) and would take a new file for the old one. Ids only grow while this process
        # runs; across restarts reuse is harmless (the kernel forgets inodes at unmount).
        self._last_id = int(self.conn.execute("SELECT coalesce(max(id), 0) FROM entries")
                            .fetchone()[0])
        # Durability by epochs (schema.py, entries.epoch): rows committed without fsync get
        # `flush_epoch`, the number of the next flush; `durable_epoch` is the last flush that
        # synced its blobs. `_unflushed` holds the blob ids this process committed without
        # fsync since the last flush began, for file systems where the flusher must fsync
        # each (blobs.py, fsync_blobs); a blob gone since (replaced, deleted, rolled back) is
        # skipped there. Every one, not the newest per entry: a later commit of the entry
        # that rolls back must not take an earlier, committed one's blob off the list (its
        # row would be covered by the flush's epoch with its bytes never synced).
        # No index and no per-row write: the flush is one row.
        self.durable_epoch = int(self.info("durable_epoch") or 0)
        self.flush_epoch = self.durable_epoch + 1
        self._unflushed: list[str] = [b for _, b in migrated_not_durable]
        # Batched commits (commitlog.py): not with --sync, whose every commit is durable at
        # once. `generation` numbers the batch that logged commits go into now; the database
        # holds every batch before it ('log_applied').
        # The log is opened in either mode: a run without --sync may have left lines in it.
        self.log = CommitLog(path.with_name("commits.log"))
        self._batching = not synchronous_full
        self.generation = int(self.info("log_applied") or 0) + 1
        self._batch_open = False
        self._batch_commits = 0
        self._batch_due = 0.0
        # The service's replay of one line (ArtifactStore.replay_logged), for _batch_lost;
        # and what wakes its batch committer (ArtifactStore.commit_batches).
        self.redo: Callable[[str, list[Any]], None] | None = None
        self.on_batch_open: Callable[[], None] | None = None
        # A dropped batch that could not be redone at once: its commits are in the log only.
        # Until they are redone (retry_redo) no new batch opens, since the next batch's COMMIT
        # would empty the log, and no doomed blob is freed, since the database may point at
        # the blobs those commits replaced (ArtifactStore._flushed).
        self.redo_pending = False

    def close(self) -> None:
        """Commit the open batch, if the database still can, and close. A batch that cannot
        commit stays in the commit log for the next start."""
        try:
            self.commit_batch()
        finally:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
            self.conn.close()
            self.log.close()

    def checkpoint(self) -> tuple[int, int, int]:
        """Copy the WAL back into the database file: runs in a worker thread.

        A checkpoint fsyncs the WAL and the database file; done by the autocheckpoint it
        stalled the trio thread (and the commit that crossed the threshold) for tens of ms.
        It uses a connection of its own, never ``self.conn``: WAL lets a checkpointer run
        beside the writer, and PASSIVE never waits for a lock. Returns SQLite's
        (busy, frames in the WAL, frames checkpointed).
        """
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False)
        row = self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception. Never spans an await.
        Commits an open batch of logged commits first (its BEGIN does, see _Connection)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def logged(self, kind: str, fields: tuple[Any, ...]) -> _Logged:
        """A commit that the commit log describes as ``(kind, *fields)``: its statements run
        in a savepoint of the open batch, and the log's line is written before it returns
        (commitlog.py). The caller's replay of that line must redo exactly these statements.

        With --sync (no batching) it is a transaction of its own; inside a caller's
        transaction (start-up replay) it is part of that one.
        """
        return _Logged(self, kind, fields)

    @property
    def batch_open(self) -> bool:
        return self._batch_open

    def commit_batch(self, *, if_due: bool = False) -> None:
        """COMMIT the open batch (with its generation, in the same transaction), then empty
        the log. ``if_due``: only once the batch has been open for BATCH_WINDOW."""
        if not self._batch_open or (if_due and time.monotonic() < self._batch_due):
            return
        self.conn.idle_batch = None
        if not self.conn.in_transaction:
            # Already undone by SQLite (a statement's error): the INSERT below would commit
            # on its own and claim the batch's lines as held.
            self._batch_lost()
            raise sqlite3.OperationalError("the batch of logged commits was rolled back")
        try:
            _full_is_no_space(
                sqlite3.Connection.execute, self.conn,
                "INSERT OR REPLACE INTO store_info (name, value) VALUES ('log_applied', ?)",
                (str(self.generation),))
            _full_is_no_space(sqlite3.Connection.execute, self.conn, "COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.idle_batch = self  # still open: the next commit_batch retries
            else:
                self._batch_lost()
            raise
        self._batch_open = False
        self._batch_commits = 0
        self.generation += 1
        self.log.reset()

    def _batch_lost(self) -> None:
        """SQLite rolled the open batch back (it does on a full disk or an I/O error): its
        commits, acknowledged, are in the log only. Redo them at once if the database can
        take them now; if not, they stay in the log and the next start redoes them."""
        count = self._batch_commits
        self._batch_open, self._batch_commits = False, 0
        self.conn.idle_batch = None
        self.generation += 1
        log.error("the database dropped a batch of %d commits; redoing them from the log",
                  count)
        self.redo_pending = True
        self.retry_redo()

    def retry_redo(self) -> bool:
        """Redo the commits of a dropped batch (_batch_lost) if the database takes them now.
        Returns whether none is left to redo. Tried again by the next logged commit and by
        every flush; the next start redoes them in any case."""
        if not self.redo_pending:
            return True
        if self.redo is None:
            return False
        try:
            self.replay_log(self.redo)
        except (sqlite3.Error, NoSpace, OSError) as exc:
            log.error("could not redo the dropped commits now (%s): they stay in the commit"
                      " log, and are tried again", exc)
            return False
        self.redo_pending = False
        log.info("redid the dropped commits from the log")
        return True

    def replay_log(self, apply: Callable[[str, list[Any]], None]) -> int:
        """Redo the logged commits of batches the database does not hold (start-up, fsck):
        ``apply(kind, fields)`` repeats one commit's statements. All in one transaction that
        also records the generation; a line that no longer applies (a power loss took an
        earlier transaction it built on) is skipped with a warning. Returns lines redone."""
        applied = int(self.info("log_applied") or 0)
        lines = [line for line in self.log.lines() if line[0] > applied]
        if not lines:
            self.log.reset()
            return 0
        last = max([self.generation, *(gen for gen, _, _ in lines)])
        done = 0
        with self.transaction():
            for _, kind, fields in lines:
                self.conn.execute("SAVEPOINT replay")
                try:
                    apply(kind, fields)
                except Exception as exc:
                    self.conn.execute("ROLLBACK TO replay")
                    log.warning("skipped a logged %s commit that no longer applies: %s",
                                kind, exc)
                else:
                    done += 1
                self.conn.execute("RELEASE replay")
            self.set_info("log_applied", str(last))
        self.generation = last + 1
        self.log.reset()
        return done

    # --- entries ---------------------------------------------------------------------------

    def entry(self, entry_id: int) -> Entry | None:
        row = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE id = ?", (entry_id,)
        ).fetchone()
        return Entry(*row) if row else None

    def entry_by_key(self, key: str) -> Entry | None:
        row = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE key = ?", (key,)
        ).fetchone()
        return Entry(*row) if row else None

    def entries_by_keys(self, keys: list[str]) -> dict[str, Entry]:
        """The entries at any of ``keys`` (a key and its ancestors in one index search each,
        one statement)."""
        marks = ", ".join("?" * len(keys))
        rows = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE key IN ({marks})", keys
        ).fetchall()
        return {r[3]: Entry(*r) for r in rows}

    def child(self, parent_id: int, name: str) -> Entry | None:
        row = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE parent_id = ? AND name = ?",
            (parent_id, name),
        ).fetchone()
        return Entry(*row) if row else None

    def children(self, parent_id: int, after_id: int, limit: int) -> list[Entry]:
        rows = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE parent_id = ? AND id > ?"
            " ORDER BY id LIMIT ?",
            (parent_id, after_id, limit),
        ).fetchall()
        return [Entry(*r) for r in rows]

    def has_children(self, parent_id: int) -> bool:
        row = self.conn.execute(
            "SELECT 1 FROM entries WHERE parent_id = ? LIMIT 1", (parent_id,)
        ).fetchone()
        return row is not None

    def count_subdirs(self, parent_id: int) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM entries WHERE parent_id = ? AND kind = 'dir'", (parent_id,)
        ).fetchone()
        return int(row[0])

    def insert_entry(
        self,
        *,
        parent_id: int,
        name: str,
        key: str,
        kind: str,
        mode: int,
        uid: int,
        gid: int,
        now_ns: int,
        target: str | None = None,
    ) -> int:
        new_id = self._new_id()
        self.conn.execute(
            "INSERT INTO entries (id, parent_id, name, key, kind, mode, uid, gid, mtime_ns,"
            " ctime_ns, atime_ns, target) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (new_id, parent_id, name, key, kind, mode, uid, gid, now_ns, now_ns, now_ns,
             target),
        )
        return new_id

    def dirs_changed(self, now_ns: int, *dir_ids: int | None) -> None:
        """The directories whose entries changed get mtime = ctime = ``now_ns`` (schema.py),
        in the transaction that changed them: one statement for the usual one directory."""
        sql = "UPDATE entries SET mtime_ns = ?, ctime_ns = ? WHERE id = ?"
        if len(dir_ids) == 1:
            self.conn.execute(sql, (now_ns, now_ns, dir_ids[0]))
        else:
            self.conn.executemany(sql, [(now_ns, now_ns, i) for i in set(dir_ids)])

    def _new_id(self) -> int:
        self._last_id += 1
        return self._last_id

    def insert_artifact(
        self,
        *,
        parent: int | str,
        name: str,
        key: str,
        mode: int,
        uid: int,
        gid: int,
        now_ns: int,
        blob_id: str,
        size: int,
        sha256: str | None,
        mime_type: str,
        created_at: int,
        durable: bool,
    ) -> tuple[int, int] | None:
        """A new committed file in one statement; returns (its id, its parent's id).

        ``parent`` is the directory's id, or its key: the statement then finds the directory
        itself, which makes a commit under an existing directory one statement instead of a
        lookup and an insert, and returns None, changing nothing, when no directory has that
        key or ``key`` is taken (the caller then looks why)."""
        new_id = self._last_id + 1
        values = (new_id, name, key, mode, uid, gid, now_ns, now_ns, now_ns, blob_id, size,
                  sha256, mime_type, created_at, 0 if durable else self.flush_epoch)
        columns = ("INSERT INTO entries (id, name, key, kind, mode, uid, gid, mtime_ns,"
                   " ctime_ns, atime_ns, blob_id, size, sha256, mime_type, created_at, epoch,"
                   " parent_id) SELECT ?, ?, ?, 'file', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ")
        if isinstance(parent, int):
            self.conn.execute(columns + "?", (*values, parent))
            parent_id = parent
        else:
            try:
                rows = self.conn.execute(
                    columns + "id FROM entries WHERE key = ? AND kind = 'dir'"
                    " RETURNING parent_id", (*values, parent)).fetchall()
            except sqlite3.IntegrityError:
                return None
            if not rows:
                return None
            parent_id = rows[0][0]
        self._last_id = new_id
        if not durable:
            self._unflushed.append(blob_id)
        return new_id, parent_id

    def set_content(
        self,
        entry_id: int,
        *,
        blob_id: str,
        size: int,
        sha256: str | None,
        mime_type: str,
        created_at: int,
        mtime_ns: int,
        ctime_ns: int,
        durable: bool,
    ) -> None:
        """The entry holds a new version. ``ctime_ns`` is that version's last change; a later
        one the row holds (an attribute set while the file was written) stays."""
        if durable:
            self.conn.execute("DELETE FROM superseded WHERE entry_id = ?", (entry_id,))
        else:
            # Keep the durable version this replaces until the new one is durable (schema.py);
            # after an earlier replace that is not durable yet, keep that one's row.
            self.conn.execute(
                "INSERT OR IGNORE INTO superseded (entry_id, blob_id, size, sha256, mime_type,"
                " created_at) SELECT id, blob_id, size, sha256, mime_type, created_at"
                " FROM entries WHERE id = ? AND epoch <= ? AND blob_id IS NOT NULL",
                (entry_id, self.durable_epoch))
        self.conn.execute(
            "UPDATE entries SET blob_id = ?, size = ?, sha256 = ?, mime_type = ?,"
            " created_at = ?, mtime_ns = ?, ctime_ns = max(ctime_ns, ?), epoch = ?"
            " WHERE id = ?",
            (blob_id, size, sha256, mime_type, created_at, mtime_ns, ctime_ns,
             0 if durable else self.flush_epoch, entry_id),
        )
        if not durable:
            self._unflushed.append(blob_id)

    def delete_entry(self, entry_id: int) -> None:
        self.conn.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        self.conn.execute("DELETE FROM superseded WHERE entry_id = ?", (entry_id,))

    def supersede_by_move(self, moved: Entry, target: Entry | None) -> None:
        """``moved`` (a file) takes a new name, replacing ``target`` if any. The version to
        fall back to, if ``moved`` is not durable yet, is then the target's durable one, if
        any; never ``moved``'s own previous one, which belonged to the name it left."""
        self.conn.execute("DELETE FROM superseded WHERE entry_id = ?", (moved.id,))
        if (target is None or self.is_durable(moved) or moved.blob_id is None
                or target.blob_id is None):
            return
        if self.is_durable(target):
            self.conn.execute(
                "INSERT INTO superseded (entry_id, blob_id, size, sha256, mime_type,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (moved.id, target.blob_id, target.size, target.sha256, target.mime_type,
                 target.created_at))
        else:
            self.conn.execute(
                "INSERT INTO superseded (entry_id, blob_id, size, sha256, mime_type,"
                " created_at) SELECT ?, blob_id, size, sha256, mime_type, created_at"
                " FROM superseded WHERE entry_id = ?", (moved.id, target.id))

    def superseded_blobs(self) -> set[str]:
        """The blobs of every version kept to fall back to (the table is small: replaces not
        yet durable)."""
        return {b for (b,) in self.conn.execute("SELECT blob_id FROM superseded")}

    def is_durable(self, e: Entry) -> bool:
        """Whether ``e``'s version (as read) was on disk, bytes and row, when read."""
        return e.epoch <= self.durable_epoch

    def superseded(self, entry_id: int) -> tuple[str, str | None, int] | None:
        """(blob_id, sha256, size) of the durable version kept for ``entry_id``, if any."""
        row = self.conn.execute(
            "SELECT blob_id, sha256, size FROM superseded WHERE entry_id = ?",
            (entry_id,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def restore_superseded(self, entry_id: int) -> None:
        """Put the kept durable version back into the entry (start-up, after a power loss
        tore the newer bytes)."""
        self.conn.execute(
            "UPDATE entries SET (blob_id, size, sha256, mime_type, created_at, epoch) ="
            " (SELECT blob_id, size, sha256, mime_type, created_at, 0 FROM superseded"
            "  WHERE entry_id = ?) WHERE id = ?", (entry_id, entry_id))
        self.conn.execute("DELETE FROM superseded WHERE entry_id = ?", (entry_id,))

    def clear_superseded(self) -> None:
        """Start-up, once every row not yet durable is settled: nothing left to fall back to."""
        self.conn.execute("DELETE FROM superseded")

    def update_attrs(self, entry_id: int, **columns: int | str | None) -> None:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        self.conn.execute(
            f"UPDATE entries SET {assignments} WHERE id = ?", (*columns.values(), entry_id)
        )

    def move_entry(self, entry_id: int, parent_id: int, name: str, key: str, now_ns: int) -> None:
        self.conn.execute(
            "UPDATE entries SET parent_id = ?, name = ?, key = ?, ctime_ns = ? WHERE id = ?",
            (parent_id, name, key, now_ns, entry_id),
        )

    def rekey_subtree(self, old_key: str, new_key: str) -> None:
        """Rewrite the keys of everything under directory ``old_key`` to live under ``new_key``.

        '/' is 0x2F and '0' is 0x30, so ``old/ <= key < old0`` is exactly the subtree: a range
        scan of the key index.
        """
        self.conn.execute(
            "UPDATE entries SET key = ? || substr(key, ?) WHERE key >= ? AND key < ?",
            (new_key + "/", len(old_key) + 2, old_key + "/", old_key + "0"),
        )

    def longest_key_under(self, key: str) -> int:
        row = self.conn.execute(
            "SELECT max(length(key)) FROM entries WHERE key >= ? AND key < ?",
            (key + "/", key + "0"),
        ).fetchone()
        return int(row[0] or 0)

    def artifacts_page(
        self, *, after_key: str | None, lo: str, hi: str | None, offset: int, limit: int
    ) -> list[Entry]:
        """Committed artifacts with ``lo <= key < hi`` in key order, from a cursor or offset."""
        # One lower bound only: given both 'key >= lo' and 'key > after', SQLite starts the
        # index range at the first and filters by the second, so every cursor page scanned
        # from lo again and paging was O(n^2) (scripts/bench_store.py, section 3).
        if after_key is not None and after_key >= lo:
            where = ["kind = 'file'", "blob_id IS NOT NULL", "key > ?"]
            params: list[object] = [after_key]
        else:
            where = ["kind = 'file'", "blob_id IS NOT NULL", "key >= ?"]
            params = [lo]
        if hi is not None:
            where.append("key < ?")
            params.append(hi)
        params += [limit, offset]
        rows = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries INDEXED BY sqlite_autoindex_entries_1"
            f" WHERE {' AND '.join(where)} ORDER BY key LIMIT ? OFFSET ?",
            params,
        ).fetchall()
        return [Entry(*r) for r in rows]

    def begin_flush(self) -> tuple[int, list[str]]:
        """A flush starts: it will make durable every version committed before now. Returns
        its epoch and the blobs to fsync (where the flusher cannot syncfs); versions
        committed from now on belong to the next flush."""
        epoch, blobs = self.flush_epoch, self._unflushed
        self.flush_epoch += 1
        self._unflushed = []
        return epoch, blobs

    def has_unflushed(self) -> bool:
        return bool(self._unflushed)

    def abort_flush(self, blobs: list[str]) -> None:
        """The flush failed before end_flush: the next one takes its blobs over (its epoch is
        higher, so it covers this one's rows too)."""
        self._unflushed[:0] = blobs

    def end_flush(self, epoch: int, grown: list[tuple[str, int]]) -> None:
        """Every blob of ``epoch`` and before is on disk, and so are the first ``offset``
        bytes of each (session id, offset) in ``grown``: one transaction says so. The
        versions of those epochs no longer need what they superseded."""
        with self.transaction():
            # Every flush raises it, so this commit is never empty (schema.py, store_info).
            self.conn.execute(
                "INSERT OR REPLACE INTO store_info (name, value) VALUES ('durable_epoch', ?)",
                (str(epoch),))
            # One pass over `superseded` (it holds only replacements not yet durable, usually
            # none), not a statement per row.
            self.conn.execute(
                "DELETE FROM superseded WHERE EXISTS (SELECT 1 FROM entries"
                " WHERE id = superseded.entry_id AND epoch <= ?)", (epoch,))
            self.set_durable_offsets(grown)
        self.durable_epoch = epoch

    def not_durable_after(self, after_id: int, limit: int) -> list[Entry]:
        """Rows above the durable epoch in id order, for start-up after an unclean shutdown:
        one pass over the table by rowid (no index, see schema.py), resumed from
        ``after_id``."""
        rows = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE id > ? AND epoch > ?"
            " ORDER BY id LIMIT ?", (after_id, self.durable_epoch, limit)
        ).fetchall()
        return [Entry(*r) for r in rows]

    def mark_verified(self, pairs: list[tuple[int, str]]) -> None:
        """Start-up: these (entry id, blob id) versions were verified and fsynced; they are
        durable whatever the epochs say from now on."""
        self.conn.executemany(
            "UPDATE entries SET epoch = 0 WHERE id = ? AND blob_id = ?", pairs)

    def set_digest(self, entry_id: int, blob_id: str, sha256: str) -> None:
        """The pending digest of ``entry_id``'s version ``blob_id`` (digests.py); nothing if
        the entry holds another version by now. Also on the version kept to fall back to."""
        self.conn.execute(
            "UPDATE entries SET sha256 = ? WHERE id = ? AND blob_id = ? AND sha256 IS NULL",
            (sha256, entry_id, blob_id))
        self.conn.execute(
            "UPDATE superseded SET sha256 = ? WHERE blob_id = ? AND sha256 IS NULL",
            (sha256, blob_id))

    def pending_digests(self) -> list[tuple[int, str]]:
        """(entry id, blob id) of every version whose digest is pending, oldest entry first
        (schema.py, ``entries_digest_pending``)."""
        return [(int(i), str(b)) for i, b in self.conn.execute(
            "SELECT id, blob_id FROM entries WHERE blob_id IS NOT NULL AND sha256 IS NULL"
            " ORDER BY id")]

    def blob_ids_sorted(self) -> Iterator[str]:
        """Every blob id a row points at, in order: the orphan scan merges it with the sorted
        blob directories, so memory stays flat at any size (one sort, no index)."""
        for (blob_id,) in self.conn.execute(
                "SELECT blob_id FROM entries WHERE blob_id IS NOT NULL"
                " UNION SELECT blob_id FROM superseded ORDER BY 1"):
            yield blob_id

    def iter_artifacts(self) -> Iterator[Entry]:
        cur = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE kind = 'file' AND blob_id IS NOT NULL"
        )
        for row in cur:
            yield Entry(*row)

    def pending_files_without_session(self) -> list[Entry]:
        rows = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE kind = 'file' AND blob_id IS NULL"
            " AND id NOT IN (SELECT entry_id FROM sessions WHERE entry_id IS NOT NULL)"
        ).fetchall()
        return [Entry(*r) for r in rows]

    # --- sessions --------------------------------------------------------------------------

    def session(self, session_id: str) -> SessionRow | None:
        row = self.conn.execute(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        return SessionRow(*row) if row else None

    def session_for_entry(self, entry_id: int) -> SessionRow | None:
        row = self.conn.execute(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE entry_id = ? LIMIT 1", (entry_id,)
        ).fetchone()
        return SessionRow(*row) if row else None

    def insert_session(self, s: SessionRow) -> None:
        self.conn.execute(
            f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (s.id, s.origin, s.key, s.entry_id, s.size, s.offset, s.mime_type, s.created_at,
             s.expires_at),
        )

    def set_session_offset(self, session_id: str, offset: int) -> None:
        self.conn.execute('UPDATE sessions SET "offset" = ? WHERE id = ?', (offset, session_id))

    def sessions_grown(self) -> list[tuple[str, int]]:
        """(id, offset) of the http sessions with bytes the flusher has not fsynced yet."""
        return [(r[0], r[1]) for r in self.conn.execute(
            'SELECT id, "offset" FROM sessions WHERE origin = \'http\''
            ' AND "offset" > durable_offset')]

    def set_durable_offsets(self, pairs: list[tuple[str, int]]) -> None:
        self.conn.executemany(
            "UPDATE sessions SET durable_offset = ? WHERE id = ?", [(o, i) for i, o in pairs])

    def durable_offset(self, session_id: str) -> int:
        row = self.conn.execute(
            "SELECT durable_offset FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return int(row[0]) if row else 0

    def info(self, name: str) -> str | None:
        row = self.conn.execute(
            "SELECT value FROM store_info WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_info(self, name: str, value: str) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO store_info (name, value) VALUES (?, ?)", (name, value))

    def set_session_mime_type(self, session_id: str, mime_type: str) -> None:
        self.conn.execute("UPDATE sessions SET mime_type = ? WHERE id = ?", (mime_type, session_id))

    def delete_session(self, session_id: str) -> bool:
        """Remove a session row; False if there was none."""
        return self.conn.execute(
            "DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0

    def expired_sessions(self, now: int) -> list[SessionRow]:
        rows = self.conn.execute(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE expires_at IS NOT NULL"
            " AND expires_at <= ?",
            (now,),
        ).fetchall()
        return [SessionRow(*r) for r in rows]

    def all_sessions(self) -> list[SessionRow]:
        rows = self.conn.execute(f"SELECT {SESSION_COLUMNS} FROM sessions").fetchall()
        return [SessionRow(*r) for r in rows]


__all__ = ["ROOT_ID", "Entry", "Metadata", "SessionRow"]
