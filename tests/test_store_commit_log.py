"""Store layer: batched commits and the commit log (artifactfs/store/commitlog.py).

A commit returns before SQLite has committed it; the log is what makes it survive the process.
These tests stop the store with its batch uncommitted and check what start-up makes of it:
every acknowledged commit back, none twice, a torn line and a line that no longer applies
handled, and nothing but logged commits ever riding in a batch.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
from storeutil import check_invariants, fsck_clean, read, sha

from artifactfs import open_store
from artifactfs.errors import Conflict, NoSpace
from artifactfs.store import ArtifactStore

MIME = "application/octet-stream"


def _opened(root: Path, *, sync: bool = False) -> ArtifactStore:
    store = ArtifactStore(root, sync=sync)
    store.open()
    return store


def _crash(store: ArtifactStore) -> None:
    """Stop as a killed process does: the open batch is never committed (closing the
    connection rolls it back), nothing is flushed, no clean marker is left."""
    store.meta.conn.close()
    store.meta.log.close()
    store.data.release()


def _committed_keys(root: Path) -> set[str]:
    """The artifact keys meta.db holds on its own (what SQLite committed), read as another
    process would."""
    with sqlite3.connect(f"file:{root / 'meta.db'}?mode=ro", uri=True) as db:
        return {k for (k,) in db.execute(
            "SELECT key FROM entries WHERE kind = 'file' AND blob_id IS NOT NULL")}


CHILD = textwrap.dedent("""
    import os, signal, sys, trio
    from artifactfs import open_store

    async def main(root):
        async with open_store(root) as store:
            # No await here yields to the batch committer: the batch is still open at the kill.
            s = await store.create_upload_session("up/whole.bin", "text/plain", 5)
            await store.upload_content_to_session(s.id, b"hello")
            for i in range(50):
                await store.put_artifact(f"put/{i:02d}.bin", bytes([i]) * (i + 1))
            await store.put_artifact("put/00.bin", b"replaced")
            open_ = await store.create_upload_session("up/open.bin", "text/plain", 10)
            print(open_.id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    trio.run(main, sys.argv[1])
""")


def test_commits_acknowledged_before_a_kill_come_back_from_the_log(tmp_path: Path) -> None:
    """A real SIGKILL right after the calls returned, before their batch committed."""
    root = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    open_session = proc.stdout.split()[0]
    # The database alone does not have them: this test is about the log.
    assert not _committed_keys(root) & {"put/01.bin", "up/whole.bin"}
    assert (root / "commits.log").stat().st_size > 0

    store = _opened(root)
    try:
        assert read(store, "up/whole.bin") == b"hello"
        for i in range(1, 50):
            assert read(store, f"put/{i:02d}.bin") == bytes([i]) * (i + 1)
        assert read(store, "put/00.bin") == b"replaced"
        info = trio.run(store.get_upload_session_info, open_session)
        assert (info.offset, info.size) == (0, 10)
        check_invariants(store)
        assert (root / "commits.log").stat().st_size == 0
    finally:
        store.close()
    assert {"put/01.bin", "up/whole.bin"} <= _committed_keys(root)
    fsck_clean(root)


def test_a_torn_last_line_ends_the_replay(tmp_path: Path) -> None:
    root = tmp_path / "data"
    store = _opened(root)
    for name in ("a", "b", "c"):
        trio.run(store.put_artifact, f"k/{name}", name.encode() * 10)
    _crash(store)
    log_path = root / "commits.log"
    lines = log_path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    log_path.write_bytes(b"".join(lines[:2]) + lines[2][:-20])  # a write cut short

    store = _opened(root)
    try:
        assert read(store, "k/a") == b"a" * 10
        assert read(store, "k/b") == b"b" * 10
        with pytest.raises(Exception, match="no artifact"):
            trio.run(store.get_artifact, "k/c")
        check_invariants(store)  # k/c's blob went as an orphan
    finally:
        store.close()
    fsck_clean(root)


def test_lines_of_a_batch_the_database_holds_are_not_redone(tmp_path: Path) -> None:
    """A crash between a batch's COMMIT and the log's truncation leaves its lines in the log:
    the generation in meta.db says they are in, so a later delete is not undone."""
    root = tmp_path / "data"
    store = _opened(root)
    trio.run(store.put_artifact, "gen/x", b"x")
    stale = (root / "commits.log").read_bytes()
    store.meta.commit_batch()
    (root / "commits.log").write_bytes(stale)  # as if the truncate never happened
    store.meta.log.size = len(stale)
    trio.run(store.delete_artifact, "gen/x")  # a transaction of its own
    trio.run(store.put_artifact, "gen/y", b"y")  # the next batch, in the log after the stale
    _crash(store)

    store = _opened(root)
    try:
        with pytest.raises(Exception, match="no artifact"):
            trio.run(store.get_artifact, "gen/x")
        assert read(store, "gen/y") == b"y"
        check_invariants(store)
    finally:
        store.close()


def test_a_refused_commit_in_a_batch_undoes_only_itself(tmp_path: Path) -> None:
    root = tmp_path / "data"
    store = _opened(root)
    trio.run(store.put_artifact, "r/file", b"1")
    with pytest.raises(Conflict):
        trio.run(store.put_artifact, "r/file/under", b"2")  # a file is not a directory
    trio.run(store.put_artifact, "r/other", b"3")
    assert read(store, "r/file") == b"1" and read(store, "r/other") == b"3"
    _crash(store)

    store = _opened(root)
    try:
        assert read(store, "r/file") == b"1" and read(store, "r/other") == b"3"
        with pytest.raises(Exception, match="no artifact"):
            trio.run(store.get_artifact, "r/file/under")
        check_invariants(store)
    finally:
        store.close()
    fsck_clean(root)


def test_other_writes_commit_the_batch_before_them(tmp_path: Path) -> None:
    """The invariant of commitlog.py: a write the log does not describe never rides in a
    batch. A mkdir (a transaction) after a logged commit finds the batch committed, and a
    crash then loses neither."""
    root = tmp_path / "data"
    store = _opened(root)
    trio.run(store.put_artifact, "w/a", b"a")
    assert "w/a" not in _committed_keys(root)
    store.mkdir(store.lookup(1, "w").id, "sub", 0o755, 0, 0)
    assert "w/a" in _committed_keys(root)
    assert (root / "commits.log").stat().st_size == 0
    _crash(store)
    store = _opened(root)
    try:
        assert read(store, "w/a") == b"a"
        assert store.lookup(store.lookup(1, "w").id, "sub").is_dir
    finally:
        store.close()


def test_a_line_that_no_longer_applies_is_skipped(tmp_path: Path) -> None:
    """After a power loss the database may miss a transaction a logged line was built on; a
    line that cannot be redone then is skipped, and start-up goes on."""
    root = tmp_path / "data"
    store = _opened(root)
    trio.run(store.put_artifact, "x/y", b"under x")
    stale = (root / "commits.log").read_bytes()
    store.close()
    store = _opened(root)
    trio.run(store.delete_artifact, "x/y")
    store.rmdir(1, "x")
    trio.run(store.put_artifact, "x", b"x is a file now")
    store.close()
    (root / "commits.log").write_bytes(stale)
    with sqlite3.connect(root / "meta.db") as db:  # the batch of x/y counted as not in
        db.execute("UPDATE store_info SET value = '0' WHERE name = 'log_applied'")
    store = _opened(root)
    try:
        assert read(store, "x") == b"x is a file now"
        check_invariants(store)
    finally:
        store.close()


def test_a_sync_store_redoes_a_log_left_by_a_batched_run(tmp_path: Path) -> None:
    root = tmp_path / "data"
    store = _opened(root)
    trio.run(store.put_artifact, "s/a", b"a" * 100)
    _crash(store)
    store = _opened(root, sync=True)
    try:
        assert read(store, "s/a") == b"a" * 100
        got = trio.run(store.get_artifact, "s/a")
        assert got.sha256 == sha(b"a" * 100)
        # --sync commits each one at once: nothing waits in a batch.
        trio.run(store.put_artifact, "s/b", b"b")
        assert "s/b" in _committed_keys(root)
        assert not os.path.getsize(root / "commits.log")
    finally:
        store.close()


def test_a_batch_the_database_dropped_is_redone_from_the_log(tmp_path: Path) -> None:
    """On a full disk or an I/O error SQLite rolls a whole transaction back: the batch's
    acknowledged commits are then in the log only, and the store redoes them at once."""
    root = tmp_path / "data"
    store = _opened(root)
    try:
        trio.run(store.put_artifact, "lost/a", b"a")
        trio.run(store.put_artifact, "lost/b", b"b")
        sqlite3.Connection.execute(store.meta.conn, "ROLLBACK")  # what SQLite does then
        with pytest.raises(sqlite3.OperationalError):
            store.meta.commit_batch()
        assert read(store, "lost/a") == b"a" and read(store, "lost/b") == b"b"
        assert {"lost/a", "lost/b"} <= _committed_keys(root)
        trio.run(store.put_artifact, "lost/c", b"c")  # and the store goes on batching
        check_invariants(store)
    finally:
        store.close()
    fsck_clean(root)


def test_a_dropped_batch_that_cannot_be_redone_yet_holds_back_commits_and_frees(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch is dropped and the database still refuses its redo (the disk stays full):
    its commits are in the log only. Until they are redone, a new commit is refused (the
    next batch's COMMIT would empty the log) and the blob a dropped replace doomed is kept
    (the database points at it again); once the database takes them, all is back."""
    root = tmp_path / "data"
    store = _opened(root)
    try:
        trio.run(store.put_artifact, "kept/a", b"before")
        store.meta.commit_batch()
        trio.run(store.put_artifact, "kept/a", b"after")  # dooms the blob of "before"
        trio.run(store.put_artifact, "kept/b", b"b")
        real_replay = store.meta.replay_log

        def refused(apply: object) -> int:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(store.meta, "replay_log", refused)
        sqlite3.Connection.execute(store.meta.conn, "ROLLBACK")  # what SQLite does then
        with pytest.raises(sqlite3.OperationalError):
            store.meta.commit_batch()
        assert read(store, "kept/a") == b"before" and store.meta.redo_pending
        with pytest.raises(NoSpace):
            trio.run(store.put_artifact, "kept/c", b"c")
        store.flush()
        assert read(store, "kept/a") == b"before"  # its blob outlived the flush
        monkeypatch.setattr(store.meta, "replay_log", real_replay)
        trio.run(store.put_artifact, "kept/c", b"c")  # redoes the dropped ones first
        assert not store.meta.redo_pending
        assert [read(store, k) for k in ("kept/a", "kept/b", "kept/c")] == [
            b"after", b"b", b"c"]
        store.flush()
        check_invariants(store)
    finally:
        store.close()
    fsck_clean(root)


def test_an_idle_batch_is_committed_by_the_background_task(tmp_path: Path) -> None:
    """With nothing else to commit it, the batch reaches meta.db on its own (after
    BATCH_WINDOW), and the log empties."""
    root = tmp_path / "data"

    async def go() -> None:
        async with open_store(root) as store:
            await store.put_artifact("idle/a", b"a")
            assert store.meta.batch_open
            with trio.fail_after(10):  # a liveness bound, not a speed claim
                while "idle/a" not in _committed_keys(root):
                    await trio.sleep(0.01)
            assert not store.meta.batch_open
            assert (root / "commits.log").stat().st_size == 0

    trio.run(go)


def test_a_redone_replacement_whose_bytes_were_lost_gives_back_the_durable_version(
        tmp_path: Path) -> None:
    """A durable artifact replaced by a logged commit, then a power loss that takes the new
    bytes: start-up redoes the line, finds the bytes torn and puts the durable version back;
    that version's blob must then outlive a clean stop: a redo that doomed the old blob, as
    the first run of the commit did, would let close() free the version just put back."""
    root = tmp_path / "data"
    store = _opened(root)
    trio.run(store.put_artifact, "p/a", b"old" * 100)
    store.flush()  # durable: blob fsynced, row marked
    trio.run(store.put_artifact, "p/a", b"new" * 100)
    new_blob = store.meta.entry_by_key("p/a").blob_id
    _crash(store)
    torn = store.data.blob_path(new_blob)
    torn.write_bytes(torn.read_bytes()[:150])  # the page cache's copy did not all survive

    store = _opened(root)
    try:
        assert read(store, "p/a") == b"old" * 100
    finally:
        store.close()  # a clean stop frees the blobs doomed since the start
    fsck_clean(root)
    store = _opened(root)
    try:
        assert read(store, "p/a") == b"old" * 100
    finally:
        store.close()
