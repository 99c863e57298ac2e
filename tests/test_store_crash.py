"""Store layer, crash safety: a child process works on a store and is killed with SIGKILL.

The child (``child_main``) commits, replaces, renames (files and directories), deletes, bulk
deletes and writes through mount sessions, logging each operation before it starts ("begin",
with its full effect) and after it returns ("done"). The parent kills it at a random moment,
reopens the store (recovery runs) and checks that:

- the artifacts are exactly those of the replayed log, with the one operation in flight either
  wholly applied or not at all;
- every artifact reads back byte-identical with its recorded sha256 (no torn or missing blob);
- no orphan blob and no staging file without its session is left.

Rounds accumulate on one data directory: each child starts from what the last crash left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import SCALE
from storeutil import all_artifacts, check_invariants, entry_id, put, read, sha

from artifactfs import ArtifactError, open_store
from artifactfs.store import ArtifactStore
from artifactfs.store.schema import ROOT_ID

DIRS = [f"d{i}" for i in range(6)]
NAMES = [f"f{i}.bin" for i in range(6)]
ROUNDS = 20 * SCALE

State = tuple[dict[str, str], frozenset[str]]  # key -> sha256, top-level directories


# --- the child ------------------------------------------------------------------------------

def _content(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, 100, 4096, 30_000, 200_000, 1 << 20])
    return rng.randbytes(rng.randint(size // 2, size) if size else 0)


async def _child(data_dir: str, log_path: str, seed: int) -> None:
    rng = random.Random(seed)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(obj: dict[str, Any]) -> None:
        # One write() per line: a killed process never tears it; fsync as a client would.
        os.write(log_fd, (json.dumps(obj) + "\n").encode())
        os.fsync(log_fd)

    async with open_store(data_dir, sync=seed % 3 == 0, flush_interval=0.02) as store:
        files = {a["key"]: a["sha256"] for a in await all_artifacts(store)}
        dirs = {e.name for e in store.readdir(ROOT_ID, 0, 1000) if e.is_dir}
        print("ready", flush=True)
        seq = 0
        while True:
            seq += 1
            op = rng.choice(["put", "put", "put", "replace", "mount", "delete", "bulk",
                             "rename", "rename", "renamedir", "abandon"])
            if op in ("replace", "delete", "rename", "bulk") and not files:
                op = "put"
            if op == "renamedir" and (not dirs or len(dirs) == len(DIRS)):
                op = "put"
            if op == "mount" and not dirs:
                op = "put"
            if op in ("put", "replace", "abandon", "mount"):
                if op == "replace":
                    key = rng.choice(sorted(files))
                elif op == "mount":
                    key = f"{rng.choice(sorted(dirs))}/{rng.choice(NAMES)}"
                else:
                    key = f"{rng.choice(DIRS)}/{rng.choice(NAMES)}"
                content = _content(rng)
                if op == "abandon":
                    # A session left half-way: it must survive as a resumable session.
                    s = await store.create_upload_session(key, "text/plain", len(content) + 1)
                    await store.upload_content_to_session(s.id, content)
                    continue
                record({"seq": seq, "op": "put", "key": key, "sha": sha(content)})
                if op == "mount":
                    d, _, name = key.partition("/")
                    try:
                        e = store.lookup(entry_id(store, d), name)
                        ws = await store.open_write(e.id, truncate=True)
                    except Exception:
                        _, ws = store.create_file(entry_id(store, d), name, 0o644, 0, 0)
                    os.pwrite(ws.fd, content, 0)
                    ws.wrote()
                    if rng.random() < 0.3:
                        await store.sync_write(ws)
                    await store.release_write(ws)
                else:
                    await put(store, key, content, chunks=rng.choice([1, 1, 2, 3]))
                files[key] = sha(content)
                dirs.add(key.partition("/")[0])
            elif op == "delete":
                key = rng.choice(sorted(files))
                record({"seq": seq, "op": "delete", "keys": [key]})
                await store.delete_artifact(key)
                del files[key]
            elif op == "bulk":
                keys = rng.sample(sorted(files), min(len(files), rng.randint(1, 4)))
                record({"seq": seq, "op": "delete", "keys": keys})
                await store.bulk_delete_artifacts(keys)
                for key in keys:
                    del files[key]
            elif op == "rename":
                src = rng.choice(sorted(files))
                dst = f"{rng.choice(sorted(dirs))}/{rng.choice(NAMES)}"
                if dst == src:
                    continue
                record({"seq": seq, "op": "rename", "src": src, "dst": dst})
                sd, _, sn = src.partition("/")
                dd, _, dn = dst.partition("/")
                store.rename(entry_id(store, sd), sn, entry_id(store, dd), dn)
                files[dst] = files.pop(src)
            else:
                src = rng.choice(sorted(dirs))
                dst = rng.choice(sorted(set(DIRS) - dirs))
                record({"seq": seq, "op": "renamedir", "src": src, "dst": dst})
                store.rename(ROOT_ID, src, ROOT_ID, dst)
                dirs = (dirs - {src}) | {dst}
                files = {(dst + k[len(src):] if k.startswith(src + "/") else k): v
                         for k, v in files.items()}
            record({"seq": seq, "done": True})
            await trio.sleep(0)


def child_main(data_dir: str, log_path: str, seed: int) -> None:
    trio.run(_child, data_dir, log_path, seed)


# --- the parent -----------------------------------------------------------------------------

def apply(state: State, op: dict[str, Any]) -> State:
    files, dirs = dict(state[0]), set(state[1])
    if op["op"] == "put":
        files[op["key"]] = op["sha"]
        dirs.add(op["key"].partition("/")[0])
    elif op["op"] == "delete":
        for key in op["keys"]:
            del files[key]
    elif op["op"] == "rename":
        files[op["dst"]] = files.pop(op["src"])
    elif op["op"] == "renamedir":
        src, dst = op["src"], op["dst"]
        dirs = (dirs - {src}) | {dst}
        files = {(dst + k[len(src):] if k.startswith(src + "/") else k): v
                 for k, v in files.items()}
    return files, frozenset(dirs)


def replay(state: State, log_path: Path) -> tuple[State, dict[str, Any] | None, int]:
    """The state after every finished operation, the one in flight (if any), and how many
    operations finished."""
    pending: dict[str, Any] | None = None
    done = 0
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("done"):
                assert pending is not None and pending["seq"] == rec["seq"]
                state = apply(state, pending)
                pending = None
                done += 1
            else:
                assert pending is None, "two operations in flight"
                pending = rec
    return state, pending, done


async def observe(store: ArtifactStore) -> State:
    files: dict[str, str] = {}
    for a in await all_artifacts(store):
        with store.open_artifact(a["key"]) as f:
            content = f.read()
        assert len(content) == a["size"], f"{a['key']} is torn"
        assert sha(content) == a["sha256"], f"{a['key']} does not match its sha256"
        files[a["key"]] = a["sha256"]
    dirs = frozenset(e.name for e in store.readdir(ROOT_ID, 0, 1000) if e.is_dir)
    return files, dirs


def run_child(data_dir: Path, log_path: Path, seed: int, rng: random.Random) -> None:
    tests_dir = Path(__file__).parent
    proc = subprocess.Popen(
        [sys.executable, "-c",
         f"import test_store_crash as t; t.child_main({str(data_dir)!r}, {str(log_path)!r},"
         f" {seed})"],
        cwd=tests_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tests_dir), *sys.path])},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            proc.wait(30)
            raise AssertionError(f"child failed to start: {proc.stderr.read().decode()[-3000:]}"
                                 if proc.stderr else "child failed to start")
        time.sleep(rng.uniform(0.02, 0.6))
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"child died on its own:\n{err[-3000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_sigkill_at_random_points_loses_nothing_committed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    rng = random.Random(20261127)
    # A few artifacts to start with, so that the first child has something to replace.
    async with open_store(data_dir) as store:
        for i in range(4):
            await put(store, f"{DIRS[i]}/{NAMES[i]}", rng.randbytes(1000 * i))
        state = await observe(store)
    total_done = 0
    applied_in_flight = 0
    for round_no in range(ROUNDS):
        log_path = tmp_path / f"log-{round_no}.jsonl"
        await trio.to_thread.run_sync(run_child, data_dir, log_path, rng.randrange(2**32), rng)
        expected, in_flight, done = replay(state, log_path)
        total_done += done
        async with open_store(data_dir) as store:
            actual = await observe(store)
            if actual != expected:
                assert in_flight is not None, f"round {round_no}: state differs from the log"
                assert actual == apply(expected, in_flight), (
                    f"round {round_no}: {in_flight} is neither applied nor absent")
                applied_in_flight += 1
            check_invariants(store)
            state = actual
    # The kills must have landed amid real work, or the test proves nothing.
    assert total_done >= ROUNDS, f"only {total_done} operations finished in {ROUNDS} rounds"
    print(f"{ROUNDS} kills, {total_done} operations finished,"
          f" {applied_in_flight} in-flight operations found applied")


# --- a power loss that tears the bytes of a replacement ---------------------------------------
# The crash above cannot lose bytes the kernel holds; tests/test_power_loss.py cuts the power
# for real. These two make its worst case certain: the replacing row reached the disk (some
# other WAL fsync took it along) and its bytes did not; start-up must fall back to the durable
# version it replaced, never lose the key.

def _power_loss(store: ArtifactStore, torn_key: str) -> ArtifactStore:
    """Stop without a clean shutdown (no flush, no clean marker), tear the bytes ``torn_key``
    points at now as a lost page cache would, and open the store again (recovery runs)."""
    (torn_blob,) = store.meta.conn.execute(  # plain SQL: a test may have changed the schema
        "SELECT blob_id FROM entries WHERE key = ?", (torn_key,)).fetchone()
    store.meta.close()
    store.data.release()
    path = store.data.blob_path(torn_blob)
    with open(path, "r+b") as f:
        f.truncate(max(0, path.stat().st_size // 2))
    again = ArtifactStore(store.data.root)
    again.open()
    return again


async def test_torn_replacement_falls_back_to_the_durable_version(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "data")
    store.open()
    old, first, second = b"durable " * 500, b"first replacement " * 400, b"second " * 700
    await store.put_artifact("ckpt/model.bin", old)
    assert store.flush() == 1  # now durable
    await store.put_artifact("ckpt/model.bin", first)  # not durable yet...
    await store.put_artifact("ckpt/model.bin", second)  # ...nor this one
    store = _power_loss(store, "ckpt/model.bin")
    try:
        got = await store.get_artifact("ckpt/model.bin")
        assert (got.size, got.sha256) == (len(old), sha(old))
        with store.open_artifact("ckpt/model.bin") as f:
            assert f.read() == old
        check_invariants(store)  # no orphan: the torn and the intermediate blobs are gone
        assert store.meta.conn.execute("SELECT count(*) FROM superseded").fetchone()[0] == 0
    finally:
        store.close()


async def test_torn_file_renamed_over_a_durable_one_falls_back_to_that(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "data")
    store.open()
    old, new = b"the durable target " * 300, b"moved over it " * 500
    await store.put_artifact("d/target.bin", old)
    store.flush()
    await store.put_artifact("d/incoming.bin", new)  # not durable
    d = store.meta.entry_by_key("d")
    assert d is not None
    store.rename(d.id, "incoming.bin", d.id, "target.bin")  # as `mv` in the mount
    store = _power_loss(store, "d/target.bin")
    try:
        with store.open_artifact("d/target.bin") as f:
            assert f.read() == old
        assert store.meta.entry_by_key("d/incoming.bin") is None  # the rename stands
        check_invariants(store)
    finally:
        store.close()


# --- durability epochs (schema.py, entries.epoch) ------------------------------------------
# A flush makes every version committed before it durable by raising one number; start-up
# after a power loss verifies only the versions above it.

def _epochs(store: ArtifactStore, keys: list[str]) -> list[int]:
    return [store.meta.conn.execute("SELECT epoch FROM entries WHERE key = ?", (k,))
            .fetchone()[0] for k in keys]


def _durable_epoch(store: ArtifactStore) -> int:
    return int(store.meta.conn.execute(
        "SELECT value FROM store_info WHERE name = 'durable_epoch'").fetchone()[0])


async def test_a_flush_makes_a_burst_durable_by_one_number(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "data")
    store.open()
    keys = [f"burst/a{i:03d}.bin" for i in range(100)]  # more than SYNCFS_AT: one syncfs
    for k in keys:
        await store.put_artifact(k, k.encode() * 50)
    (epoch,) = set(_epochs(store, keys))
    assert epoch > 0 and not any(store.meta.is_durable(store.meta.entry_by_key(k))
                                 for k in keys)
    assert store.flush() == len(keys)
    assert _durable_epoch(store) == epoch
    assert set(_epochs(store, keys)) == {epoch}  # no row was written by the flush
    late = b"committed after the flush " * 40
    await store.put_artifact("burst/late.bin", late)
    late_entry = store.meta.entry_by_key("burst/late.bin")
    assert late_entry is not None and late_entry.blob_id is not None
    assert late_entry.epoch == epoch + 1 and not store.meta.is_durable(late_entry)
    store = _power_loss(store, "burst/late.bin")
    try:
        # The burst was below the durable epoch: trusted, not read again (still its epoch);
        # the late one was verified, found torn and dropped.
        assert set(_epochs(store, keys)) == {epoch}
        assert store.meta.entry_by_key("burst/late.bin") is None
        for k in keys:
            with store.open_artifact(k) as f:
                assert f.read() == k.encode() * 50
        check_invariants(store)
    finally:
        store.close()


async def test_a_failed_flush_leaves_its_versions_to_the_next(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "data")
    store.open()
    try:
        for i in range(3):
            await store.put_artifact(f"f/a{i}", b"x" * (i + 1))
        real = store.data.fsync_blobs

        def failing(blob_ids: list[str]) -> None:
            raise OSError(5, "Input/output error")

        store.data.fsync_blobs = failing  # type: ignore[method-assign]
        with pytest.raises(OSError):
            store.flush()
        assert not any(store.meta.is_durable(store.meta.entry_by_key(f"f/a{i}"))
                       for i in range(3))
        store.data.fsync_blobs = real  # type: ignore[method-assign]
        await store.put_artifact("f/a3", b"later")
        assert store.flush() == 4  # the failed flush's three, and the later one
        assert all(store.meta.is_durable(store.meta.entry_by_key(f"f/a{i}"))
                   for i in range(4))
        assert _durable_epoch(store) == max(_epochs(store, [f"f/a{i}" for i in range(4)]))
    finally:
        store.close()


def _assert_the_next_flush_syncs(store: ArtifactStore, key: str, blob_id: str) -> None:
    """The next flush fsyncs ``blob_id`` (one by one: few blobs, no syncfs to cover a slip)
    and then counts ``key``'s version as durable."""
    synced: list[str] = []
    real = store.data.fsync_blobs

    def record(blob_ids: list[str]) -> None:
        synced.extend(blob_ids)
        real(blob_ids)

    store.data.fsync_blobs = record  # type: ignore[method-assign]
    store.flush()
    assert blob_id in synced
    e = store.meta.entry_by_key(key)
    assert e is not None and e.blob_id == blob_id and store.meta.is_durable(e)


async def test_a_commit_that_rolls_back_leaves_the_flush_the_one_before_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version committed without fsync, then a second commit of the same key that fails
    and rolls back: the flush that raises the epoch over the first must still fsync its
    blob (fewer than SYNCFS_AT blobs: one fsync each, no syncfs to cover a slip)."""
    store = ArtifactStore(tmp_path / "data")
    store.open()
    try:
        await store.put_artifact("k/a.bin", b"first " * 100)
        first = store.meta.entry_by_key("k/a.bin")
        assert first is not None and first.blob_id is not None
        with monkeypatch.context() as m:
            def full(*args: object) -> None:
                raise OSError(28, "No space left on device")

            m.setattr(store.meta.log, "append", full)
            with pytest.raises(ArtifactError):
                await store.put_artifact("k/a.bin", b"second " * 100)
        assert read(store, "k/a.bin") == b"first " * 100  # rolled back
        _assert_the_next_flush_syncs(store, "k/a.bin", first.blob_id)
    finally:
        store.close()


async def test_a_version_kept_to_fall_back_to_outlives_a_flush_it_raced(
        tmp_path: Path) -> None:
    """A durable b0 replaced by b1 (b0 kept in `superseded`), a flush begins, and while it
    waits on the disk b1 is replaced by b2: that flush covers b1 but not b2, so the row kept
    for the entry still names b0, and b0 must outlive the flush. A power loss that then
    tears b2 gives b0 back, not nothing."""
    store = ArtifactStore(tmp_path / "data")
    store.open()
    v0, v1, v2 = b"v0 durable " * 300, b"v1 " * 400, b"v2 " * 500
    await store.put_artifact("race/m.bin", v0)
    store.flush()
    await store.put_artifact("race/m.bin", v1)
    store._end_grace(everything=True)
    doomed, epoch, blobs = store._begin_flush()  # the flush begins...
    await store.put_artifact("race/m.bin", v2)  # ...a replace lands while it waits
    store.data.fsync_blobs(blobs)
    store.meta.end_flush(epoch, [])
    store._flushed(doomed, blobs)  # ...and it ends
    store = _power_loss(store, "race/m.bin")
    try:
        with store.open_artifact("race/m.bin") as f:
            assert f.read() == v0
        check_invariants(store)
    finally:
        store.close()


async def test_a_store_made_before_epochs_is_migrated(tmp_path: Path) -> None:
    """The earlier schema kept a flag per row (durable 1 or 0). Its rows at 0 are verified
    after an unclean shutdown, as before; the others are durable."""
    store = ArtifactStore(tmp_path / "data")
    store.open()
    await store.put_artifact("old/kept.bin", b"fsynced " * 100)
    store.flush()
    await store.put_artifact("old/torn.bin", b"not fsynced " * 100)
    conn = store.meta.conn
    conn.execute("ALTER TABLE entries ADD COLUMN durable INTEGER NOT NULL DEFAULT 1")
    conn.execute("UPDATE entries SET durable = 0 WHERE epoch > ?", (_durable_epoch(store),))
    conn.execute("ALTER TABLE entries DROP COLUMN epoch")
    conn.execute("DELETE FROM store_info WHERE name = 'durable_epoch'")
    store = _power_loss(store, "old/torn.bin")
    try:
        columns = {r[1] for r in store.meta.conn.execute("PRAGMA table_info(entries)")}
        assert "epoch" in columns and "durable" not in columns
        assert store.meta.entry_by_key("old/torn.bin") is None
        with store.open_artifact("old/kept.bin") as f:
            assert f.read() == b"fsynced " * 100
        check_invariants(store)
    finally:
        store.close()


async def test_a_migrated_row_not_durable_yet_is_synced_by_the_first_flush(
        tmp_path: Path) -> None:
    """An earlier schema's row at durable = 0 in a store that then closed cleanly (no
    start-up check follows): the first flush of the migrated store syncs its blob before
    its epoch counts as durable."""
    store = ArtifactStore(tmp_path / "data")
    store.open()
    await store.put_artifact("old/pending.bin", b"never synced " * 50)
    store.close()
    conn = sqlite3.connect(tmp_path / "data" / "meta.db")
    conn.execute("ALTER TABLE entries ADD COLUMN durable INTEGER NOT NULL DEFAULT 1")
    conn.execute("UPDATE entries SET durable = 0 WHERE key = 'old/pending.bin'")
    conn.execute("ALTER TABLE entries DROP COLUMN epoch")
    conn.execute("DELETE FROM store_info WHERE name = 'durable_epoch'")
    conn.commit()
    conn.close()
    store = ArtifactStore(tmp_path / "data")
    store.open()
    try:
        e = store.meta.entry_by_key("old/pending.bin")
        assert e is not None and e.blob_id is not None and not store.meta.is_durable(e)
        _assert_the_next_flush_syncs(store, "old/pending.bin", e.blob_id)
    finally:
        store.close()


# --- a power loss during a resumable upload ---------------------------------------------------

async def _torn_upload(tmp_path: Path, *, reboot: bool) -> tuple[ArtifactStore, str, bytes]:
    """A 3 MiB session: its first MiB acknowledged and fsynced by a flush, its second only
    acknowledged; then the process dies, and with ``reboot`` the machine too, taking a page
    of the second MiB with it (the file keeps its length, as writeback may leave it)."""
    MiB = 1 << 20
    data = random.Random(11).randbytes(3 * MiB)
    store = ArtifactStore(tmp_path / "data")
    store.open()
    s = await store.create_upload_session("up/big.bin", "application/octet-stream", len(data))
    await store.upload_content_to_session(s.id, data[:MiB])
    store.flush()
    await store.upload_content_to_session(s.id, data[MiB:2 * MiB])
    store.meta.close()  # no clean shutdown
    store.data.release()
    if reboot:
        with open(store.data.staging_path(s.id), "r+b") as f:
            f.seek(MiB + 8192)
            f.write(bytes(4096))  # the lost page reads back as zeros
        import sqlite3

        db = sqlite3.connect(store.data.db_path)
        db.execute("UPDATE store_info SET value = 'an-earlier-boot' WHERE name = 'boot_id'")
        db.commit()
        db.close()
    again = ArtifactStore(tmp_path / "data")
    again.open()
    return again, s.id, data


async def test_upload_resumes_from_what_was_fsynced_after_a_power_loss(tmp_path: Path) -> None:
    store, sid, data = await _torn_upload(tmp_path, reboot=True)
    try:
        info = await store.get_upload_session_info(sid)
        assert info.offset == 1 << 20  # not 2 MiB: the second MiB was never on disk for sure
        done = await store.upload_content_to_session(sid, data[info.offset:], offset=info.offset)
        assert done is not None and done.sha256 == sha(data)  # what the client sent, no hole
        with store.open_artifact("up/big.bin") as f:
            assert f.read() == data
    finally:
        store.close()


async def test_upload_keeps_every_acknowledged_byte_after_a_process_crash(
        tmp_path: Path) -> None:
    store, sid, data = await _torn_upload(tmp_path, reboot=False)
    try:
        info = await store.get_upload_session_info(sid)
        assert info.offset == 2 << 20  # same boot: the page cache kept them
        done = await store.upload_content_to_session(sid, data[info.offset:], offset=info.offset)
        assert done is not None and done.sha256 == sha(data)
    finally:
        store.close()
