"""Store layer: digests after the commit (artifactfs/store/digests.py).

A mount commit whose bytes did not arrive in order stores sha256 NULL ("pending") and the
store hashes the immutable blob afterwards. These tests pin down what every face shows
meanwhile (the digest of the committed bytes, never a wrong one), what a restart, an unclean
shutdown on the same boot and one after a reboot do with a pending row, what fsck says of
it, and the migration of the old ``superseded`` table whose sha256 was NOT NULL.

Most tests open the store with ``ArtifactStore(...).open()``, which runs no background work:
no digest worker, so a pending row stays pending until a face (or a test) asks for it.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
from pathlib import Path

import pytest
import trio
from storeutil import all_artifacts, check_invariants, read, run_fsck, sha

from artifactfs import open_store
from artifactfs.errors import NotFound
from artifactfs.store import ArtifactStore, digests
from artifactfs.store.metadata import Metadata
from artifactfs.store.schema import ROOT_ID
from artifactfs.store.tree import XATTR_SHA256

pytestmark = pytest.mark.timeout(60)


# --- helpers --------------------------------------------------------------------------------

def plain_store(data_dir: Path) -> ArtifactStore:
    """A store opened (recovery runs, pending rows are queued) without its background work:
    no worker computes a pending digest unless a face waits for it."""
    store = ArtifactStore(data_dir)
    store.open()
    return store


def content(seed: int, size: int = 50_000) -> bytes:
    return random.Random(seed).randbytes(size)


def write_out_of_order(store: ArtifactStore, ws: object, data: bytes) -> None:
    """The second half first, then the first: the running digest cannot follow."""
    half = len(data) // 2
    store.write(ws, data[half:], half)  # type: ignore[arg-type]
    store.write(ws, data[:half], 0)  # type: ignore[arg-type]


async def commit_out_of_order(store: ArtifactStore, name: str, data: bytes,
                              parent: int = ROOT_ID) -> int:
    """A new file in the mount written out of order and closed: the entry's id."""
    e, ws = store.create_file(parent, name, 0o644, 0, 0)
    write_out_of_order(store, ws, data)
    await store.release_write(ws)
    return e.id


async def rewrite_out_of_order(store: ArtifactStore, entry_id: int, data: bytes, *,
                               fsync: bool = False) -> None:
    """A new version of an existing file, written out of order (``fsync``: durable)."""
    ws = await store.open_write(entry_id, truncate=True)
    write_out_of_order(store, ws, data)
    if fsync:
        await store.sync_write(ws)
    await store.release_write(ws)


def row(store: ArtifactStore, entry_id: int) -> tuple[str | None, str | None, int]:
    """(blob_id, sha256, size) of the entry as the database holds it now."""
    e = store.meta.entry(entry_id)
    assert e is not None, f"entry {entry_id} is gone"
    return e.blob_id, e.sha256, e.size


def unclean_shutdown(store: ArtifactStore) -> Path:
    """Stop as a killed daemon does: no flush, no clean marker (test_store_crash.py)."""
    root = store.data.root
    store.meta.close()
    store.data.release()
    assert not (root / "clean").exists()
    return root


def pretend_reboot(data_dir: Path) -> None:
    """Make start-up see another boot: the page cache, and what was not fsynced, is gone."""
    db = sqlite3.connect(data_dir / "meta.db")
    db.execute("UPDATE store_info SET value = 'an-earlier-boot' WHERE name = 'boot_id'")
    assert db.total_changes == 1
    db.commit()
    db.close()


def db_pending(data_dir: Path) -> list[tuple[str, str | None]]:
    """(key, sha256) of every committed row, read from the file with a connection of its
    own (what a restart will find)."""
    db = sqlite3.connect(data_dir / "meta.db")
    try:
        return db.execute("SELECT key, sha256 FROM entries WHERE blob_id IS NOT NULL"
                          " ORDER BY key").fetchall()
    finally:
        db.close()


def gate_hashing(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the digest worker hash in a thread (any size) and hold it there: ``entered`` is
    set when a hash starts, and it finishes once ``release`` is set."""
    entered, release = threading.Event(), threading.Event()
    real = digests.sha256_of_path

    def held(path: Path) -> tuple[str, int] | None:
        entered.set()
        assert release.wait(20), "the test never released the hash"
        return real(path)

    monkeypatch.setattr(digests, "INLINE_HASH_BYTES", 0)
    monkeypatch.setattr(digests, "sha256_of_path", held)
    return entered, release


# --- 1, 2: a commit out of order is pending; every face waits for its digest ----------------

async def test_out_of_order_commit_is_pending_and_every_face_gives_its_digest(
        tmp_path: Path) -> None:
    store = plain_store(tmp_path / "data")
    try:
        files = {name: content(i) for i, name in enumerate(["x.bin", "g.bin", "l.bin"])}
        ids = {name: await commit_out_of_order(store, name, data)
               for name, data in files.items()}
        # Right after close(2) returned: committed, bytes in place, digest pending.
        for name, data in files.items():
            blob_id, digest, size = row(store, ids[name])
            assert blob_id is not None and digest is None and size == len(data)
            assert read(store, name) == data
        assert len(store.digests) == 3
        assert sorted(store.meta.pending_digests()) == sorted(
            (ids[n], row(store, ids[n])[0]) for n in files)

        # The mount's getxattr waits (here: hashes inline, no worker runs) for its own file.
        got = await store.read_xattr(ids["x.bin"], XATTR_SHA256)
        assert got == sha(files["x.bin"]).encode()
        assert row(store, ids["x.bin"])[1] == sha(files["x.bin"])  # recorded, not just shown
        assert row(store, ids["g.bin"])[1] is None and row(store, ids["l.bin"])[1] is None

        a = await store.get_artifact("g.bin")
        assert (a.size, a.sha256) == (len(files["g.bin"]), sha(files["g.bin"]))
        assert row(store, ids["l.bin"])[1] is None

        listed = {a["key"]: (a["size"], a["sha256"]) for a in await all_artifacts(store)}
        assert listed == {n: (len(d), sha(d)) for n, d in files.items()}
        assert store.meta.pending_digests() == [] and len(store.digests) == 0
        check_invariants(store)
    finally:
        store.close()


@pytest.mark.parametrize("how", ["append to a committed file", "overwrite inside",
                                 "out of order"])
async def test_each_kind_of_disordered_write_leaves_the_digest_pending(
        tmp_path: Path, how: str) -> None:
    store = plain_store(tmp_path / "data")
    try:
        first = content(1, 10_000)
        e, ws = store.create_file(ROOT_ID, "f.bin", 0o644, 0, 0)
        store.write(ws, first, 0)
        await store.release_write(ws)
        assert row(store, e.id)[1] == sha(first)  # in order: the digest came with the commit
        ws = await store.open_write(e.id, truncate=how == "out of order")
        if how == "append to a committed file":
            store.write(ws, b"appended", len(first))
            want = first + b"appended"
        elif how == "overwrite inside":
            store.write(ws, b"patch", 100)
            want = first[:100] + b"patch" + first[105:]
        else:
            want = content(2, 10_000)
            write_out_of_order(store, ws, want)
        await store.release_write(ws)
        assert row(store, e.id)[1] is None
        assert read(store, "f.bin") == want
        a = await store.get_artifact("f.bin")
        assert (a.size, a.sha256) == (len(want), sha(want))
    finally:
        store.close()


async def test_in_order_writes_have_their_digest_at_the_commit(tmp_path: Path) -> None:
    store = plain_store(tmp_path / "data")
    try:
        data = content(3, 300_000)
        e, ws = store.create_file(ROOT_ID, "seq.bin", 0o644, 0, 0)
        for off in range(0, len(data), 65536):
            store.write(ws, data[off:off + 65536], off)
        await store.release_write(ws)
        assert row(store, e.id)[1] == sha(data)
        assert len(store.digests) == 0 and store.meta.pending_digests() == []
    finally:
        store.close()


async def test_a_big_pending_blob_is_hashed_in_a_thread_without_a_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No worker runs: the face that waits hashes the blob itself, in a thread when it is
    big (here every blob counts as big)."""
    monkeypatch.setattr(digests, "INLINE_HASH_BYTES", 0)
    in_threads: list[str] = []
    real = digests.sha256_of_path

    def recording(path: Path) -> tuple[str, int] | None:
        in_threads.append(threading.current_thread().name)
        return real(path)

    monkeypatch.setattr(digests, "sha256_of_path", recording)
    store = plain_store(tmp_path / "data")
    try:
        data = content(4, 200_000)
        await commit_out_of_order(store, "big.bin", data)
        a = await store.get_artifact("big.bin")
        assert a.sha256 == sha(data)
        assert len(in_threads) == 1 and in_threads[0] != threading.main_thread().name
    finally:
        store.close()


async def test_the_worker_records_a_pending_digest_unasked(tmp_path: Path) -> None:
    async with open_store(tmp_path / "data") as store:
        data = content(5)
        entry = await commit_out_of_order(store, "w.bin", data)
        # release_write returns before the worker had a turn: still pending...
        assert row(store, entry)[1] is None
        # ...and the worker records it without any face asking.
        with trio.fail_after(10):
            while row(store, entry)[1] is None:
                await trio.sleep(0.005)
        assert row(store, entry)[1] == sha(data)
        assert len(store.digests) == 0


# --- 3: a version replaced or deleted while its digest is computed ---------------------------

async def test_a_waiter_whose_version_is_replaced_meanwhile_gets_the_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """v1 pending, the worker hashing it in a thread; meanwhile v2 (pending too) replaces
    it. The worker must not put v1's digest on v2's row (set_digest names the blob), and
    the waiter gets v2 with v2's digest."""
    entered, release = gate_hashing(monkeypatch)
    store = plain_store(tmp_path / "data")
    v1, v2 = content(6, 40_000), content(7, 30_000)
    try:
        entry = await commit_out_of_order(store, "r.bin", v1)
        blob1 = row(store, entry)[0]
        got: list[object] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.digests.run)

            async def wait_for_it() -> None:
                got.append(await store.get_artifact("r.bin"))

            nursery.start_soon(wait_for_it)
            with trio.fail_after(10):
                # v1 is being hashed now
                await trio.to_thread.run_sync(entered.wait, abandon_on_cancel=True)
            await rewrite_out_of_order(store, entry, v2)
            blob2, digest, size = row(store, entry)
            assert digest is None and size == len(v2)
            # set_digest names the version: v1's digest cannot land on v2, pending too.
            with store.meta.transaction():
                store.meta.set_digest(entry, blob1, sha(v1))  # type: ignore[arg-type]
            assert row(store, entry) == (blob2, None, len(v2))
            release.set()
            with trio.fail_after(10):
                while not got:
                    await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
        (a,) = got
        assert (a.size, a.sha256) == (len(v2), sha(v2))  # type: ignore[attr-defined]
        assert row(store, entry) == (blob2, sha(v2), len(v2))
        assert read(store, "r.bin") == v2
    finally:
        release.set()
        store.close()


async def test_a_waiter_whose_artifact_is_deleted_meanwhile_gets_not_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Deleted, and its blob freed by a flush, while the worker is about to hash it: every
    waiter learns it is gone, and nothing is logged as damage (a blob missing)."""
    caplog.set_level(logging.WARNING, logger="artifactfs")
    entered, release = gate_hashing(monkeypatch)
    store = plain_store(tmp_path / "data")
    gone, kept = content(8), content(9)
    try:
        gone_id = await commit_out_of_order(store, "gone.bin", gone)
        _, ws = store.create_file(ROOT_ID, "kept.bin", 0o644, 0, 0)
        store.write(ws, kept, 0)  # in order: its digest is known
        await store.release_write(ws)
        results: dict[str, object] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.digests.run)

            async def get() -> None:
                try:
                    results["get"] = await store.get_artifact("gone.bin")
                except NotFound as exc:
                    results["get"] = exc

            async def xattr() -> None:
                try:
                    results["xattr"] = await store.read_xattr(gone_id, XATTR_SHA256)
                except NotFound as exc:
                    results["xattr"] = exc

            async def listing() -> None:
                results["list"] = await all_artifacts(store)

            for task in (get, xattr, listing):
                nursery.start_soon(task)
            with trio.fail_after(10):
                await trio.to_thread.run_sync(entered.wait, abandon_on_cancel=True)
            await trio.sleep(0.01)  # let every waiter reach its wait
            assert results == {}
            gone_blob = store.data.blob_path(row(store, gone_id)[0])  # type: ignore[arg-type]
            await store.delete_artifact("gone.bin")
            store.flush()  # frees the deleted version's blob
            assert not gone_blob.exists()
            release.set()
            with trio.fail_after(10):
                while len(results) < 3:
                    await trio.sleep(0.005)
            nursery.cancel_scope.cancel()
        assert isinstance(results["get"], NotFound), results["get"]
        assert isinstance(results["xattr"], NotFound), results["xattr"]
        assert [(a["key"], a["sha256"]) for a in results["list"]] == [  # type: ignore[attr-defined]
            ("kept.bin", sha(kept))]
        assert store.meta.entry(gone_id) is None
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        release.set()
        store.close()


async def test_a_version_replaced_before_its_turn_is_not_hashed_onto_the_new_one(
        tmp_path: Path) -> None:
    store = plain_store(tmp_path / "data")
    try:
        v1, v2 = content(10), content(11)
        entry = await commit_out_of_order(store, "k.bin", v1)
        blob1 = row(store, entry)[0]
        await store.put_artifact("k.bin", v2)  # replaced over HTTP: digest known
        assert row(store, entry)[1] == sha(v2)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.digests.run)
                while len(store.digests):
                    await trio.sleep(0.005)
                nursery.cancel_scope.cancel()
        assert row(store, entry)[1:] == (sha(v2), len(v2))
        # And set_digest itself only touches the version it names.
        assert blob1 is not None
        with store.meta.transaction():
            store.meta.set_digest(entry, blob1, "0" * 64)
        assert row(store, entry)[1] == sha(v2)
        assert (await store.get_artifact("k.bin")).sha256 == sha(v2)
    finally:
        store.close()


# --- 4: a clean restart with a row still pending ---------------------------------------------

async def test_a_digest_pending_at_a_clean_shutdown_is_filled_in_after_restart(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data = content(12, 120_000)
    store = plain_store(data_dir)
    entry = await commit_out_of_order(store, "restart.bin", data,
                                      parent=store.mkdir(ROOT_ID, "d", 0o755, 0, 0).id)
    store.close()
    assert (data_dir / "clean").exists()
    assert db_pending(data_dir) == [("d/restart.bin", None)]  # the shutdown did not hash it
    async with open_store(data_dir) as store:
        assert len(store.digests) == 1  # start-up queued it
        with trio.fail_after(10):  # the worker records it without any face asking
            while row(store, entry)[1] is None:
                await trio.sleep(0.005)
        assert row(store, entry)[1:] == (sha(data), len(data))
        a = await store.get_artifact("d/restart.bin")
        assert a.sha256 == sha(data)
    assert db_pending(data_dir) == [("d/restart.bin", sha(data))]


# --- 5: an unclean shutdown, on the same boot and after a reboot -----------------------------

async def test_unclean_shutdown_same_boot_keeps_a_pending_row_with_its_digest(
        tmp_path: Path) -> None:
    store = plain_store(tmp_path / "data")
    data = content(13)
    entry = await commit_out_of_order(store, "crash.bin", data)
    e = store.meta.entry(entry)
    assert e is not None and e.sha256 is None and not store.meta.is_durable(e)
    data_dir = unclean_shutdown(store)
    store = plain_store(data_dir)
    try:
        # Recovery itself filled it in from the blob (no worker runs in this store).
        assert row(store, entry)[1:] == (sha(data), len(data))
        assert store.meta.pending_digests() == [] and len(store.digests) == 0
        assert read(store, "crash.bin") == data
        check_invariants(store)
    finally:
        store.close()


async def test_fsck_repair_never_fills_the_digest_of_a_version_not_durable(
        tmp_path: Path) -> None:
    """After a power loss a non-durable pending row may hold torn bytes: fsck (which does
    not know whether the machine restarted) must not record their digest, or start-up would
    then verify the torn bytes against it and keep them."""
    store = plain_store(tmp_path / "data")
    data = content(21)
    entry = await commit_out_of_order(store, "t.bin", data)
    blob_id = row(store, entry)[0]
    assert blob_id is not None
    data_dir = unclean_shutdown(store)
    with open(ArtifactStore(data_dir).data.blob_path(blob_id), "r+b") as f:
        f.seek(4096)
        f.write(bytes(4096))  # a page inside the surviving length lost
    pretend_reboot(data_dir)
    run_fsck(data_dir, repair=True)
    assert db_pending(data_dir) == [("t.bin", None)]
    store = plain_store(data_dir)
    try:
        assert store.meta.entry_by_key("t.bin") is None  # start-up dropped it
    finally:
        store.close()


async def test_a_start_interrupted_after_a_reboot_verifies_as_after_a_reboot_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The boot id is recorded only once start-up's verification is done: a first start
    after a reboot that dies part-way must not make the second one trust the page cache."""
    store = plain_store(tmp_path / "data")
    entry = await commit_out_of_order(store, "lost.bin", content(22))
    assert row(store, entry)[1] is None
    data_dir = unclean_shutdown(store)
    pretend_reboot(data_dir)

    def die(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the first start is killed while it verifies

    from artifactfs.store import recovery
    monkeypatch.setattr(recovery, "_verify_not_durable", die)
    with pytest.raises(KeyboardInterrupt):
        plain_store(data_dir)
    monkeypatch.undo()
    store = plain_store(data_dir)
    try:
        assert store.meta.entry_by_key("lost.bin") is None
    finally:
        store.close()


async def test_reboot_drops_a_pending_row_that_was_not_durable(tmp_path: Path) -> None:
    store = plain_store(tmp_path / "data")
    data = content(14)
    entry = await commit_out_of_order(store, "lost.bin", data)
    blob_id = row(store, entry)[0]
    assert blob_id is not None
    data_dir = unclean_shutdown(store)
    pretend_reboot(data_dir)
    store = plain_store(data_dir)
    try:
        # Its bytes could be torn anywhere and nothing tells: it goes like a torn row.
        assert store.meta.entry(entry) is None
        assert store.meta.entry_by_key("lost.bin") is None
        assert not store.data.blob_path(blob_id).exists()
        with pytest.raises(NotFound):
            await store.get_artifact("lost.bin")
        check_invariants(store)
    finally:
        store.close()


@pytest.mark.parametrize("previous_pending", [False, True],
                         ids=["previous digest known", "previous digest pending"])
async def test_reboot_puts_back_the_durable_version_a_pending_row_replaced(
        tmp_path: Path, previous_pending: bool) -> None:
    store = plain_store(tmp_path / "data")
    old, new = content(15, 30_000), content(16, 45_000)
    if previous_pending:
        entry = await commit_out_of_order(store, "m.bin", old)
    else:
        await store.put_artifact("m.bin", old)
        entry = store.lookup(ROOT_ID, "m.bin").id
    store.flush()
    e = store.meta.entry(entry)
    assert e is not None and store.meta.is_durable(e)
    assert e.sha256 == (None if previous_pending else sha(old))
    await rewrite_out_of_order(store, entry, new)  # pending, not durable
    assert row(store, entry)[1] is None
    assert store.meta.superseded(entry) == (e.blob_id, e.sha256, len(old))
    data_dir = unclean_shutdown(store)
    pretend_reboot(data_dir)
    store = plain_store(data_dir)
    try:
        assert row(store, entry)[0] == e.blob_id
        assert read(store, "m.bin") == old
        a = await store.get_artifact("m.bin")  # a pending one is hashed for the face
        assert (a.size, a.sha256) == (len(old), sha(old))
        assert row(store, entry)[1] == sha(old)
        check_invariants(store)
    finally:
        store.close()


async def test_reboot_keeps_a_pending_row_that_was_fsynced(tmp_path: Path) -> None:
    """fsync before close makes the commit durable: the reboot must not drop it, though its
    digest is still pending; start-up queues it."""
    store = plain_store(tmp_path / "data")
    data = content(17)
    e, ws = store.create_file(ROOT_ID, "synced.bin", 0o644, 0, 0)
    write_out_of_order(store, ws, data)
    await store.sync_write(ws)
    await store.release_write(ws)
    got = store.meta.entry(e.id)
    assert got is not None and got.sha256 is None and store.meta.is_durable(got)
    data_dir = unclean_shutdown(store)
    pretend_reboot(data_dir)
    store = plain_store(data_dir)
    try:
        assert row(store, e.id)[1:] == (None, len(data))
        assert store.meta.pending_digests() == [(e.id, got.blob_id)]
        assert (await store.get_artifact("synced.bin")).sha256 == sha(data)
        assert read(store, "synced.bin") == data
    finally:
        store.close()


# --- 6: fsck ----------------------------------------------------------------------------------

async def test_fsck_does_not_call_a_pending_digest_damage_and_repair_fills_it(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = plain_store(data_dir)
    data = content(18)
    await commit_out_of_order(store, "p.bin", data)
    store.close()
    assert db_pending(data_dir) == [("p.bin", None)]

    report = run_fsck(data_dir)
    assert report.clean, report.problems
    assert db_pending(data_dir) == [("p.bin", None)]  # a check alone changes nothing

    report = run_fsck(data_dir, repair=True)
    assert report.clean, report.problems
    assert db_pending(data_dir) == [("p.bin", sha(data))]


async def test_fsck_reports_a_pending_row_whose_blob_has_the_wrong_length(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = plain_store(data_dir)
    data = content(19)
    entry = await commit_out_of_order(store, "torn.bin", data)
    blob = store.data.blob_path(row(store, entry)[0])  # type: ignore[arg-type]
    store.close()
    with open(blob, "r+b") as f:
        f.truncate(len(data) // 2)
    for repair in (False, True):
        report = run_fsck(data_dir, repair=repair)
        assert not report.clean
        assert any("torn.bin" in p for p in report.problems)
        assert db_pending(data_dir) == [("torn.bin", None)]  # no digest of torn bytes


# --- 7: the superseded table of a store made before pending digests --------------------------

OLD_SUPERSEDED = """CREATE TABLE superseded (
    entry_id   INTEGER PRIMARY KEY,
    blob_id    TEXT NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    mime_type  TEXT,
    created_at INTEGER
)"""


def to_old_superseded(data_dir: Path) -> list[tuple[object, ...]]:
    """Rebuild ``superseded`` as stores made before pending digests had it; its rows."""
    db = sqlite3.connect(data_dir / "meta.db", isolation_level=None)
    try:
        rows = db.execute("SELECT * FROM superseded").fetchall()
        db.execute("DROP TABLE superseded")
        db.execute(OLD_SUPERSEDED)
        db.executemany("INSERT INTO superseded VALUES (?, ?, ?, ?, ?, ?)", rows)
        notnull = {r[1]: r[3] for r in db.execute("PRAGMA table_info(superseded)")}
        assert notnull["sha256"] == 1
        return rows
    finally:
        db.close()


def superseded_table(conn: sqlite3.Connection) -> tuple[dict[str, int], list[tuple[object, ...]]]:
    notnull = {r[1]: r[3] for r in conn.execute("PRAGMA table_info(superseded)")}
    return notnull, conn.execute("SELECT * FROM superseded").fetchall()


async def _old_store_with_a_kept_version(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    """A durable version replaced by one not durable yet (kept in `superseded`), left by an
    unclean shutdown, its table rebuilt as before pending digests."""
    store = plain_store(tmp_path / "data")
    old, new = content(20, 20_000), content(21, 25_000)
    await store.put_artifact("old/m.bin", old)
    store.flush()
    await store.put_artifact("old/m.bin", new)
    data_dir = unclean_shutdown(store)
    rows = to_old_superseded(data_dir)
    assert len(rows) == 1 and rows[0][3] == sha(old)
    return data_dir, old, new


async def test_the_old_superseded_table_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    data_dir, _, _ = await _old_store_with_a_kept_version(tmp_path)
    db = sqlite3.connect(data_dir / "meta.db")
    _, before = superseded_table(db)
    db.close()
    meta = Metadata(data_dir / "meta.db")  # the schema is set up (and migrated) here
    try:
        notnull, after = superseded_table(meta.conn)
        assert notnull == {"entry_id": 0, "blob_id": 1, "size": 1, "sha256": 0,
                           "mime_type": 0, "created_at": 0}
        assert after == before
        tables = {r[0] for r in meta.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "superseded_old" not in tables
        # Pending digests can go into it now.
        meta.conn.execute("UPDATE superseded SET sha256 = NULL")
    finally:
        meta.close()
    meta = Metadata(data_dir / "meta.db")  # opened again: nothing to migrate, nothing lost
    try:
        notnull, again = superseded_table(meta.conn)
        assert notnull["sha256"] == 0 and len(again) == 1 and again[0][3] is None
    finally:
        meta.close()


async def test_a_migrated_kept_version_comes_back_after_a_power_loss(tmp_path: Path) -> None:
    data_dir, old, new = await _old_store_with_a_kept_version(tmp_path)
    db = sqlite3.connect(data_dir / "meta.db")
    (blob_id,) = db.execute("SELECT blob_id FROM entries WHERE key = 'old/m.bin'").fetchone()
    db.close()
    blob = data_dir / "blobs" / blob_id[:2] / blob_id
    with open(blob, "r+b") as f:  # the newest bytes torn by the power loss
        f.truncate(len(new) // 3)
    pretend_reboot(data_dir)
    store = plain_store(data_dir)
    try:
        notnull, _ = superseded_table(store.meta.conn)
        assert notnull["sha256"] == 0
        a = await store.get_artifact("old/m.bin")
        assert (a.size, a.sha256) == (len(old), sha(old))
        assert read(store, "old/m.bin") == old
        check_invariants(store)
    finally:
        store.close()
