"""The metadata schema: every table, created in one place, documented where it is created.

Anyone changing the store starts here. The database is SQLite in WAL mode; all access happens
on the trio thread through one connection (see ``docs/CONCURRENCY.md``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

SCHEMA_VERSION = 1
ROOT_ID = 1

_SUPERSEDED_COLUMNS = """(
    entry_id   INTEGER PRIMARY KEY,
    blob_id    TEXT NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT,
    mime_type  TEXT,
    created_at INTEGER
)"""

_SCHEMA = """
-- One row per path in the tree: the root, directories, files and symbolic links.
--
-- id         the inode number the mount reports; 1 is the root directory (key '').
-- parent_id  id of the directory holding this entry; NULL only for the root.
-- name       the last component of the path ('' for the root).
-- key        the whole path, e.g. 'datasets/v3/shard-0007.tar'. Denormalised from the
--            (parent_id, name) chain so that get_artifact and list_artifacts are one index
--            lookup / range scan; rename rewrites the keys of a moved subtree in the same
--            transaction that moves it, so key == parent.key + '/' + name always holds.
-- kind       'dir', 'file' or 'symlink'.
-- mode, uid, gid   permission bits (& 0o7777) and owner, kept for cp -a / rsync -a / tar x.
-- atime_ns, mtime_ns, ctime_ns
--            access, modification and change times, nanoseconds since the epoch in a signed
--            64-bit integer: 1677-09-21 to 2262-04-11, nanoseconds throughout (tree.py clamps
--            what is set outside it, as Linux clamps to a disk's range). atime is set when the
--            entry is created and by an explicit utimensat only: reads never change it (the
--            mount is noatime). A directory's mtime and ctime move whenever an entry is added
--            to it, removed from it or renamed in, out or within it, by any face (one UPDATE
--            in the transaction that changes the tree); start-up's repairs do not move them.
--            atime_ns has a DEFAULT only because ALTER TABLE needs one to add it to a data
--            directory made before it (create_schema); every insert gives it.
-- blob_id    files only: the blob holding the committed bytes (blobs/<id[:2]>/<id>).
--            NULL for a file created through the mount whose first upload session has not
--            committed yet: it shows in the mount but is not an artifact (list_artifacts,
--            get_artifact and the HTTP face do not see it). Always NULL for dirs and symlinks.
-- size, sha256, mime_type, created_at
--            the committed artifact's size in bytes, content digest, mime type and commit time
--            (Unix seconds). size is 0 and the others NULL while blob_id is NULL.
--            sha256 is also NULL, "pending", for a version committed through the mount whose
--            bytes the commit did not see arrive in order (a passthrough writer's, random
--            writes): the store hashes the immutable blob right after the commit and fills it
--            in (store/digests.py); a face asked for it meanwhile waits. Start-up queues the
--            rows still pending (index below); after a power loss a pending row that was not
--            durable cannot be verified and goes like a torn one (recovery.py).
--            mime_type of a pending file lives on its session row until commit.
-- epoch      0 when the blob's bytes and its directory entry were fsynced at commit (--sync, a
--            file fsynced before close); else the number of the flush that will make them
--            durable: the version is durable once store_info 'durable_epoch' >= epoch. The
--            background flusher syncs every blob committed before it started and then raises
--            'durable_epoch' in one row, so a commit costs it no row write of its own.
--            Start-up after an unclean shutdown verifies the
--            rows above 'durable_epoch' (size and sha256), drops those whose bytes did not
--            survive and sets the others to 0.
-- target     symlinks only: the link target, as given (not a key; may be anything).
CREATE TABLE IF NOT EXISTS entries (
    id         INTEGER PRIMARY KEY,
    parent_id  INTEGER REFERENCES entries(id),
    name       TEXT NOT NULL,
    key        TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL CHECK (kind IN ('dir', 'file', 'symlink')),
    mode       INTEGER NOT NULL,
    uid        INTEGER NOT NULL DEFAULT 0,
    gid        INTEGER NOT NULL DEFAULT 0,
    mtime_ns   INTEGER NOT NULL,
    ctime_ns   INTEGER NOT NULL,
    atime_ns   INTEGER NOT NULL DEFAULT 0,
    blob_id    TEXT,
    size       INTEGER NOT NULL DEFAULT 0,
    sha256     TEXT,
    mime_type  TEXT,
    created_at INTEGER,
    epoch      INTEGER NOT NULL DEFAULT 0,
    target     TEXT
);
-- Each committed artifact costs one page write in every index below that holds it; an index
-- earns its place by turning a scan into a search (scripts/bench_store.py prints the plans).
-- Lookup of a name in a directory (the mount's lookup) and the one-name-per-directory rule.
CREATE UNIQUE INDEX IF NOT EXISTS entries_by_name ON entries(parent_id, name);
-- readdir: children of one directory in id order; the rowid is the index's implicit last
-- column, so 'WHERE parent_id = ? AND id > ? ORDER BY id' is a range scan (a stable cursor).
CREATE INDEX IF NOT EXISTS entries_by_parent ON entries(parent_id);
-- A directory's link count (2 + its subdirectories) without visiting its files: a directory
-- of 100,000 files has few subdirectories.
CREATE INDEX IF NOT EXISTS dirs_by_parent ON entries(parent_id) WHERE kind = 'dir';
-- Start-up finds files created in the mount that never committed without a full scan.
CREATE INDEX IF NOT EXISTS pending_files ON entries(id) WHERE kind = 'file' AND blob_id IS NULL;
-- Start-up finds the versions whose digest is still pending (sha256 above) without a full
-- scan. Only rows committed with a pending digest enter it, and their digest takes them out.
CREATE INDEX IF NOT EXISTS entries_digest_pending ON entries(id)
    WHERE blob_id IS NOT NULL AND sha256 IS NULL;
-- Not indexed, on purpose (an index costs a page write on every commit, and these would
-- be a large part of a small commit's time for queries that run seldom):
-- * list_artifacts pages through the key index above (sqlite_autoindex_entries_1) and skips
--   the few directories, symlinks and pending files it meets on the way;
-- * start-up's orphan-blob scan, which runs only after an unclean shutdown, reads blob_id of
--   every row once in sorted order (a sort, not an index);
-- * rows not durable yet (epoch above 'durable_epoch'): the process that committed them keeps
--   their blob ids in memory for the flusher, and start-up after an unclean shutdown finds
--   them in one pass over the table.
DROP INDEX IF EXISTS artifacts_by_key;
DROP INDEX IF EXISTS entries_by_blob;
DROP INDEX IF EXISTS entries_not_durable;

-- One row per upload session. The bytes received so far are in staging/<id>.
--
-- id         opaque, unguessable (secrets.token_urlsafe); also the staging file's name.
-- origin     'http': created by create_upload_session (any face but the mount); resumable,
--            survives restarts, expires at expires_at.
--            'mount': a file open for writing in the mount; its writer is the daemon itself,
--            so start-up discards these (no one is left to resume them).
-- key        http sessions: the key the artifact commits to. mount sessions: the key when
--            opened (informational; the commit follows entry_id, which rename keeps right).
-- entry_id   mount sessions: the entry (inode) being written. NULL for http sessions.
-- size       http sessions: the declared size; commit happens when offset reaches it.
--            mount sessions: NULL (unknown until the file is closed).
-- offset     http sessions: bytes received and acknowledged. The staging file can be longer
--            after a crash mid-request; the next upload truncates it back to offset.
--            mount sessions: 0 (the staging file's length is the truth).
-- mime_type  what the artifact will be committed with.
-- created_at, expires_at  Unix seconds; expires_at NULL for mount sessions.
-- durable_offset  http sessions: how much of the staging file the flusher has fsynced. An
--            acknowledged chunk is in the page cache, not on disk; after a power loss (a new
--            boot id, store_info 'boot_id') start-up resumes the session from here, since the
--            file's length may have survived with a page inside it lost.
--
-- Sessions are few (the ones in flight) and each lives briefly, so the table is keyed by id
-- alone (WITHOUT ROWID: one b-tree, one page write per insert or delete) and the sweeper
-- scans it rather than paying an expiry index on every commit.
CREATE TABLE IF NOT EXISTS sessions (
    id         TEXT PRIMARY KEY,
    origin     TEXT NOT NULL CHECK (origin IN ('http', 'mount')),
    key        TEXT NOT NULL,
    entry_id   INTEGER,
    size       INTEGER,
    "offset"   INTEGER NOT NULL DEFAULT 0,
    mime_type  TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    durable_offset INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- The durable version an artifact had before a replace that is not durable yet, one row per
-- entry at most. A replace commits at synchronous=NORMAL and its new blob is fsynced by the
-- flusher up to 2 s later; meanwhile any WAL fsync (the flusher's, a checkpoint, another
-- file's fsync) can make the replacing row durable ahead of its bytes. If a power loss then
-- tears those bytes, start-up puts this version back instead of losing the key
-- (docs/RELIABILITY.md §3; tests/test_power_loss.py, tests/test_store_crash.py).
--
-- entry_id   the entry replaced; blob_id, size, sha256, mime_type, created_at: its durable
--            version. Written in the replacing transaction when the entry held a durable
--            version (a second replace before the flush keeps the first one's row); moved to
--            the moved file when a rename replaces a file. Deleted in the transaction that
--            raises 'durable_epoch' to the new version's epoch, or that deletes the entry.
--            Its blob is on the doomed list (state.py), unlinked only after that
--            transaction is on disk. sha256 NULL: that version's digest was still pending
--            (its blob is durable, so start-up can trust what it holds at its size).
CREATE TABLE IF NOT EXISTS superseded """ + _SUPERSEDED_COLUMNS + """;

-- Facts about the store itself: 'schema_version'; 'boot_id' (the kernel's boot id at the last
-- start: a different one at start-up means the machine restarted, so the page cache is gone);
-- 'durable_epoch' (the last flush whose blobs are on disk: rows with an epoch up to it are
-- durable; every flush raises it, so the flusher's commit is never empty: an empty commit
-- writes no WAL frame and so fsyncs nothing); 'log_applied' (the number of the last batch of
-- logged commits this database holds, written by that batch's own COMMIT: start-up redoes
-- only the lines of commits.log with a higher number, commitlog.py).
CREATE TABLE IF NOT EXISTS store_info (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@contextlib.contextmanager
def _all_or_nothing(conn: sqlite3.Connection) -> Iterator[None]:
    """A migration in one transaction: a crash midway must not half-do it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def create_schema(conn: sqlite3.Connection, now_ns: int) -> list[tuple[int, str]]:
    """Create every table and the root directory if they are missing. Returns the (entry id,
    blob id) of rows a migration found not durable yet: the first flush must sync them."""
    not_durable: list[tuple[int, str]] = []
    conn.executescript(_SCHEMA)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}
    if "durable_offset" not in columns:  # a data directory made before the column existed
        conn.execute("ALTER TABLE sessions ADD COLUMN durable_offset INTEGER NOT NULL DEFAULT 0")
    columns = {r[1] for r in conn.execute("PRAGMA table_info(entries)")}
    if "durable" in columns:  # made before epochs: durable was 1 (fsynced) or 0 (not yet)
        with _all_or_nothing(conn):
            conn.execute("ALTER TABLE entries ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0")
            # Rows still at 0 are above any 'durable_epoch' (none was written yet): start-up
            # after an unclean shutdown verifies them, as it did, and else the first flush
            # syncs them (the caller's list), since no process has them on its list.
            not_durable = [(int(i), str(b)) for i, b in conn.execute(
                "SELECT id, blob_id FROM entries WHERE durable = 0 AND blob_id IS NOT NULL")]
            conn.execute("UPDATE entries SET epoch = 1 WHERE durable = 0")
            conn.execute("ALTER TABLE entries DROP COLUMN durable")
    if "atime_ns" not in columns:  # made when atime was reported as the mtime
        with _all_or_nothing(conn):
            conn.execute("ALTER TABLE entries ADD COLUMN atime_ns INTEGER NOT NULL DEFAULT 0")
            conn.execute("UPDATE entries SET atime_ns = mtime_ns")
    if any(r[1] == "sha256" and r[3] for r in conn.execute("PRAGMA table_info(superseded)")):
        # Made before pending digests: sha256 was NOT NULL, which SQLite cannot relax in
        # place. The table is small (replaces not durable yet): copy it, in one transaction.
        with _all_or_nothing(conn):
            conn.execute("ALTER TABLE superseded RENAME TO superseded_old")
            conn.execute("CREATE TABLE superseded " + _SUPERSEDED_COLUMNS)
            conn.execute("INSERT INTO superseded SELECT * FROM superseded_old")
            conn.execute("DROP TABLE superseded_old")
    conn.execute(
        "INSERT OR IGNORE INTO entries (id, parent_id, name, key, kind, mode, mtime_ns, ctime_ns,"
        " atime_ns) VALUES (?, NULL, '', '', 'dir', ?, ?, ?, ?)",
        (ROOT_ID, 0o755, now_ns, now_ns, now_ns),
    )
    conn.execute(
        "INSERT OR IGNORE INTO store_info (name, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )
    return not_durable
