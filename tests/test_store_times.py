"""Store layer, timestamps: a directory's times move with its entries through every face, atime
is its own, times are clamped to the range an entry holds, and a data directory made before
atime was kept is migrated (schema.py)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from storeutil import check_invariants, entry_id, fsck_clean, put

from artifactfs import open_store
from artifactfs.store import ArtifactStore, Entry
from artifactfs.store.schema import ROOT_ID
from artifactfs.store.tree import TIME_MAX_SECONDS, TIME_MIN_SECONDS, clamp_time_ns

S = 1_000_000_000
OLD = 981_173_106 * S  # 2001-02-03


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ArtifactStore]:
    async with open_store(tmp_path / "data") as s:
        yield s


def aged(store: ArtifactStore, key: str) -> Entry:
    """The directory at ``key`` with its times set in 2001 (atime apart from mtime)."""
    d = store.set_attrs(entry_id(store, key), atime_ns=OLD + 1, mtime_ns=OLD)
    store.meta.update_attrs(d.id, ctime_ns=OLD)
    return store.entry(d.id)


def assert_moved(store: ArtifactStore, before: Entry, start: int) -> None:
    d = store.entry(before.id)
    assert start <= d.mtime_ns == d.ctime_ns <= time.time_ns()
    assert d.atime_ns == before.atime_ns == OLD + 1


def assert_kept(store: ArtifactStore, before: Entry) -> None:
    d = store.entry(before.id)
    assert (d.atime_ns, d.mtime_ns, d.ctime_ns) == (before.atime_ns, OLD, OLD)


async def test_every_change_of_its_entries_moves_a_directory(store: ArtifactStore) -> None:
    store.mkdir(ROOT_ID, "d", 0o755, 0, 0)
    store.mkdir(ROOT_ID, "e", 0o755, 0, 0)

    async def create_file() -> None:
        _, ws = store.create_file(entry_id(store, "d"), "m.bin", 0o644, 0, 0)
        await store.release_write(ws)

    d = entry_id(store, "d")
    steps: list[tuple[str, Callable[[], object]]] = [
        ("http new key", lambda: put(store, "d/a.bin", b"a")),
        ("mount create", create_file),
        ("mkdir", lambda: store.mkdir(d, "sub", 0o755, 0, 0)),
        ("symlink", lambda: store.symlink(d, "l", "a.bin", 0, 0)),
        ("rename within", lambda: store.rename(d, "l", d, "l2")),
        ("rename over", lambda: store.rename(d, "l2", d, "m.bin")),
        ("unlink", lambda: store.unlink(d, "m.bin")),
        ("rmdir", lambda: store.rmdir(d, "sub")),
        ("http delete", lambda: store.delete_artifact("d/a.bin")),
        ("http new key and directory", lambda: put(store, "d/deep/x.bin", b"x")),
        ("put_artifact", lambda: store.put_artifact("d/p.bin", b"p")),
        ("bulk delete", lambda: store.bulk_delete_artifacts(["d/p.bin", "d/deep/x.bin"])),
    ]
    for what, step in steps:
        before = aged(store, "d")
        start = time.time_ns()
        result = step()
        if hasattr(result, "__await__"):
            await result  # type: ignore[misc]
        try:
            assert_moved(store, before, start)
        except AssertionError as exc:
            raise AssertionError(f"{what}: {exc}") from exc
    deep = store.entry(entry_id(store, "d/deep"))
    assert deep.mtime_ns == deep.ctime_ns >= store.entry(d).mtime_ns  # bulk delete, there too
    await put(store, "d/q.bin", b"q")
    before = aged(store, "d")
    await put(store, "d/q.bin", b"new content")  # not a change of d's entries
    assert_kept(store, before)
    check_invariants(store)


async def test_a_rename_across_directories_moves_both_and_the_entry_ctime(
        store: ArtifactStore) -> None:
    await put(store, "src/f.bin", b"f")
    store.mkdir(ROOT_ID, "dst", 0o755, 0, 0)
    src, dst = aged(store, "src"), aged(store, "dst")
    f = store.set_attrs(entry_id(store, "src/f.bin"), atime_ns=OLD + 1, mtime_ns=OLD)
    start = time.time_ns()
    store.rename(src.id, "f.bin", dst.id, "f.bin")
    assert_moved(store, src, start)
    assert_moved(store, dst, start)
    moved = store.entry(f.id)
    assert (moved.atime_ns, moved.mtime_ns) == (OLD + 1, OLD)
    assert moved.ctime_ns >= start


async def test_atime_is_set_at_creation_and_then_only_when_asked(store: ArtifactStore) -> None:
    await put(store, "f.bin", b"f")
    e = store.entry(entry_id(store, "f.bin"))
    assert e.atime_ns == e.mtime_ns == e.ctime_ns
    e = store.set_attrs(e.id, atime_ns=3 * S + 9)
    assert (e.atime_ns, e.mtime_ns) == (3 * S + 9, store.entry(e.id).mtime_ns)
    e = store.set_attrs(e.id, mtime_ns=4 * S + 11)
    assert (e.atime_ns, e.mtime_ns) == (3 * S + 9, 4 * S + 11)
    await put(store, "f.bin", b"new content")  # a new version: atime stays, as a write's
    e = store.entry(e.id)
    assert e.atime_ns == 3 * S + 9 and e.mtime_ns > 4 * S + 11
    response = await store.get_artifact("f.bin")
    assert abs(response.created_at - time.time()) < 60  # the HTTP face's times as they were


def test_times_are_clamped_to_what_an_entry_holds() -> None:
    assert clamp_time_ns(2**33 * S + 5) == 2**33 * S + 5
    assert clamp_time_ns(-(2**31) * S + 5) == -(2**31) * S + 5
    last = TIME_MAX_SECONDS * S + 999_999_999
    assert clamp_time_ns(last) == last < 2**63
    assert clamp_time_ns(last + 1) == TIME_MAX_SECONDS * S
    first = TIME_MIN_SECONDS * S
    assert clamp_time_ns(first) == first >= -(2**63)
    assert clamp_time_ns(first - 1) == first
    assert clamp_time_ns(2**100) == TIME_MAX_SECONDS * S


async def test_times_out_of_range_are_kept_clamped(store: ArtifactStore) -> None:
    await put(store, "f.bin", b"f")
    e = store.set_attrs(entry_id(store, "f.bin"), atime_ns=-(2**70), mtime_ns=2**70)
    assert (e.atime_ns, e.mtime_ns) == (TIME_MIN_SECONDS * S, TIME_MAX_SECONDS * S)
    assert store.meta.entry(e.id) == e


async def test_a_new_key_redone_from_the_commit_log_moves_its_directory_as_it_did(
        tmp_path: Path) -> None:
    """A commit acknowledged but not yet in the database (commitlog.py) is redone at start-up
    with the times it had: its directory shows the same times as before the crash."""
    root = tmp_path / "data"
    store = ArtifactStore(root)
    store.open()
    store.mkdir(ROOT_ID, "d", 0o755, 0, 0)
    await store.put_artifact("d/a.bin", b"a")
    shown = store.entry(entry_id(store, "d"))
    assert store.meta.batch_open  # the commit is in the log only
    store.meta.conn.close()  # killed: the open batch is rolled back
    store.meta.log.close()
    store.data.release()
    store = ArtifactStore(root)
    store.open()
    try:
        d = store.entry(entry_id(store, "d"))
        assert store.lookup(d.id, "a.bin").is_artifact
        assert (d.atime_ns, d.mtime_ns, d.ctime_ns) == (
            shown.atime_ns, shown.mtime_ns, shown.ctime_ns)
        assert shown.mtime_ns > shown.atime_ns  # moved by the new key, not left as made
    finally:
        store.close()


# --- a data directory made before atime was kept --------------------------------------------

async def test_a_store_made_before_atime_is_migrated(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with open_store(data_dir) as store:
        await put(store, "old/a.bin", b"a")
        store.mkdir(ROOT_ID, "empty", 0o755, 0, 0)
        store.symlink(ROOT_ID, "link", "old/a.bin", 0, 0)
        store.set_attrs(entry_id(store, "old/a.bin"), mtime_ns=2**32 * S + 7)
    conn = sqlite3.connect(data_dir / "meta.db")
    conn.execute("ALTER TABLE entries DROP COLUMN atime_ns")
    conn.commit()
    rows = conn.execute("SELECT id, mtime_ns, ctime_ns FROM entries ORDER BY id").fetchall()
    conn.close()
    fsck_clean(data_dir)  # fsck opens (and migrates) it as start-up does
    async with open_store(data_dir) as store:
        got = store.meta.conn.execute(
            "SELECT id, mtime_ns, ctime_ns, atime_ns FROM entries ORDER BY id").fetchall()
        assert got == [(i, m, c, m) for i, m, c in rows]  # atime as it was shown: the mtime
        assert store.entry(entry_id(store, "old/a.bin")).atime_ns == 2**32 * S + 7
        # New rows and new times go on as in a store made now.
        await put(store, "old/b.bin", b"b")
        b = store.entry(entry_id(store, "old/b.bin"))
        assert b.atime_ns == b.mtime_ns
        assert store.set_attrs(b.id, atime_ns=5 * S).atime_ns == 5 * S
        check_invariants(store)
    async with open_store(data_dir) as store:  # opened again: nothing more to migrate
        assert store.entry(entry_id(store, "old/b.bin")).atime_ns == 5 * S
    fsck_clean(data_dir)
