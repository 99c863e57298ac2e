"""fsck, end to end: damage a real data directory in each way and run `artifactfs fsck` on it.

Each test builds a data directory through the store (artifacts, directories, a resumable
upload), closes it, damages it the way a crash, a full disk or a careless hand would, and runs
the command as a user does. It checks the report names the damage, the exit status (0 clean,
1 damage left, 2 cannot run), what ``--repair`` fixes and what it refuses to touch, and that
the repaired directory opens and still holds every artifact the damage did not hit.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from storeutil import check_invariants, put, read

from artifactfs import open_store
from artifactfs.store import ArtifactStore
from artifactfs.store.schema import ROOT_ID

pytestmark = pytest.mark.timeout(120)

ARTIFACTFS = str(Path(sys.executable).with_name("artifactfs"))

CONTENT = {
    "models/v1/weights.bin": b"w" * 70_000,
    "models/v1/config.json": b'{"layers": 3}',
    "datasets/train/shard-0.jsonl": b'{"x": 1}\n' * 500,
    "top.txt": b"top",
    "empty.bin": b"",
}


def build(data: Path) -> dict[str, str]:
    """A data directory with artifacts, an empty directory and a half-done upload."""

    async def go() -> dict[str, str]:
        async with open_store(data) as store:
            for key, content in CONTENT.items():
                await put(store, key, content)
            store.mkdir(ROOT_ID, "emptydir", 0o755, 0, 0)
            s = await store.create_upload_session("uploads/partial.bin", "a/b", 10)
            await store.upload_content_to_session(s.id, b"12345")
            return s.id

    return {"session": trio.run(go)}


def fsck(data: Path, *args: str) -> tuple[int, str]:
    r = subprocess.run([ARTIFACTFS, "fsck", "--data", str(data), *args],
                       capture_output=True, text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout + r.stderr


def db(data: Path) -> sqlite3.Connection:
    return sqlite3.connect(data / "meta.db", isolation_level=None)


def blob_of(data: Path, key: str) -> Path:
    (blob_id,) = db(data).execute("SELECT blob_id FROM entries WHERE key = ?", (key,)).fetchone()
    return data / "blobs" / blob_id[:2] / blob_id


def assert_intact(data: Path, keys: list[str]) -> None:
    """The directory opens (recovery runs), keeps its invariants, and ``keys`` read back."""

    async def go() -> None:
        async with open_store(data) as store:
            check_invariants(store)
            for key in keys:
                assert read(store, key) == CONTENT[key], key

    trio.run(go)


def damage_then_repair(data: Path, expect: str, *, repaired: str) -> None:
    """fsck sees ``expect`` and exits 1, changes nothing; --repair fixes it; fsck is clean."""
    before = sorted(p.relative_to(data) for p in data.rglob("*") if "meta.db" not in p.name)
    rc, out = fsck(data)
    assert rc == 1, out
    assert expect in out, out
    assert "run with --repair" in out, out
    after = sorted(p.relative_to(data) for p in data.rglob("*") if "meta.db" not in p.name)
    assert after == before, "fsck without --repair changed the data directory"
    rc, out = fsck(data, "--repair")
    assert rc == 0, out
    assert f"repaired: {repaired}" in out, out
    rc, out = fsck(data)
    assert (rc, out.splitlines()[-1]) == (0, "clean"), out


def test_a_fresh_directory_is_clean(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)
    rc, out = fsck(data)
    assert rc == 0, out
    assert f"checked {len(CONTENT)} artifacts" in out
    assert out.splitlines()[-1] == "clean"
    rc, out = fsck(data, "--repair")
    assert rc == 0 and "repaired" not in out, out
    assert_intact(data, list(CONTENT))


def test_orphan_blob(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)
    orphan = data / "blobs" / "ff" / ("ff" + "0" * 30)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"left by a commit a crash interrupted")
    damage_then_repair(data, "1 blobs no artifact points at", repaired="removed 1 orphan blobs")
    assert not orphan.exists()
    assert_intact(data, list(CONTENT))


def test_staging_file_without_session(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)
    (data / "staging" / "nosuchsession").write_bytes(b"x" * 100)
    damage_then_repair(data, "staging file nosuchsession has no session",
                       repaired="removed staging file nosuchsession")
    assert not (data / "staging" / "nosuchsession").exists()
    assert_intact(data, list(CONTENT))


def test_expired_session(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sid = build(data)["session"]
    db(data).execute("UPDATE sessions SET expires_at = ? WHERE id = ?",
                     (int(time.time()) - 1, sid))
    damage_then_repair(data, f"upload session {sid} for uploads/partial.bin has expired",
                       repaired=f"removed session {sid}")
    assert not (data / "staging" / sid).exists()
    assert db(data).execute("SELECT count(*) FROM sessions").fetchone() == (0,)
    assert_intact(data, list(CONTENT))


def test_session_without_its_bytes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sid = build(data)["session"]
    (data / "staging" / sid).unlink()
    damage_then_repair(data, f"upload session {sid} for uploads/partial.bin has no staging",
                       repaired=f"removed session {sid}")
    assert_intact(data, list(CONTENT))


def test_session_lost_acknowledged_bytes_resumes_from_what_survived(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sid = build(data)["session"]
    os.truncate(data / "staging" / sid, 3)  # a power loss took the unsynced tail
    damage_then_repair(data, f"upload session {sid} for uploads/partial.bin: 5 bytes"
                             " acknowledged, 3 on disk", repaired=f"session {sid} resumes at 3")

    async def resume() -> None:
        async with open_store(data) as store:
            info = await store.get_upload_session_info(sid)
            assert info.offset == 3
            await store.upload_content_to_session(sid, b"4567890", offset=3)
            assert read(store, "uploads/partial.bin") == b"1234567890"

    trio.run(resume)


def test_mount_write_left_by_a_crash(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)

    async def crash_while_writing() -> None:
        store = ArtifactStore(data)
        store.open()
        # A new file and a rewrite of an artifact, both open when the daemon dies.
        d = store.lookup(ROOT_ID, "models")
        _, ws = store.create_file(d.id, "new.bin", 0o644, 0, 0)
        os.pwrite(ws.fd, b"half", 0)
        e = store.lookup(ROOT_ID, "top.txt")
        ws2 = await store.open_write(e.id, truncate=True)
        os.pwrite(ws2.fd, b"torn", 0)
        # kill -9: no close(), no clean marker; the lock goes with the process's fds.
        store.meta.close()
        store.data.release()

    trio.run(crash_while_writing)
    rc, out = fsck(data)
    assert rc == 1, out
    assert out.count("outlived its daemon") == 2, out
    rc, out = fsck(data, "--repair")
    assert rc == 0 and out.count("repaired: removed session") == 2, out
    assert db(data).execute("SELECT count(*) FROM entries WHERE key = 'models/new.bin'"
                            ).fetchone() == (0,)
    assert_intact(data, list(CONTENT))  # top.txt keeps its old bytes


def test_pending_file_without_session(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)
    now = time.time_ns()
    db(data).execute(
        "INSERT INTO entries (parent_id, name, key, kind, mode, mtime_ns, ctime_ns)"
        " VALUES (?, 'ghost.bin', 'ghost.bin', 'file', 420, ?, ?)", (ROOT_ID, now, now))
    damage_then_repair(data, "ghost.bin: a file being written with no write session",
                       repaired="removed the unfinished file ghost.bin")
    assert_intact(data, list(CONTENT))


@pytest.mark.parametrize("how", ["missing", "truncated", "altered"])
def test_damaged_blob_is_reported_and_left_to_the_user(tmp_path: Path, how: str) -> None:
    data = tmp_path / "data"
    build(data)
    key = "models/v1/weights.bin"
    blob = blob_of(data, key)
    if how == "missing":
        blob.unlink()
        expect = f"{key}: blob {blob.name} is missing"
    elif how == "truncated":
        os.truncate(blob, 1000)
        expect = f"{key}: blob has 1000 bytes"
    else:
        with open(blob, "r+b") as f:
            f.seek(500)
            f.write(b"X")
        expect = f"{key}: blob has 70000 bytes sha256"
    for args in ((), ("--repair",)):
        rc, out = fsck(data, *args)
        assert rc == 1, out
        assert f"problem: {expect}" in out, out
        assert f"not repaired: {key}:" in out and "re-upload" in out, out
        assert out.count("problem:") == 1, out
    # The row is still there for the user to decide; the other artifacts are untouched.
    others = [k for k in CONTENT if k != key]

    async def user_deletes_it() -> None:
        async with open_store(data) as store:
            for k in others:
                assert read(store, k) == CONTENT[k]
            await store.delete_artifact(key)

    trio.run(user_deletes_it)
    rc, out = fsck(data)
    assert rc == 0, out
    assert_intact(data, others)


def test_lost_directory_rows_are_recreated(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)
    # Both ancestors of models/v1/* gone: the children's rows point at nothing.
    db(data).execute("DELETE FROM entries WHERE key IN ('models', 'models/v1')")
    rc, out = fsck(data)
    assert rc == 1, out
    assert "problem: models/v1/weights.bin: its parent directory is missing" in out, out
    damage_then_repair(data, "models/v1/config.json: its parent directory is missing",
                       repaired="models/v1/config.json: recreated its parent directories")

    async def walk() -> None:
        async with open_store(data) as store:
            models = store.lookup(ROOT_ID, "models")
            v1 = store.lookup(models.id, "v1")
            assert v1.is_dir
            names = {e.name for e in store.readdir(v1.id, 0, 100)}
            assert names == {"weights.bin", "config.json"}

    trio.run(walk)
    assert_intact(data, list(CONTENT))


def test_file_directory_clash_is_not_repaired(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)
    conn = db(data)
    (top_id,) = conn.execute("SELECT id FROM entries WHERE key = 'top.txt'").fetchone()
    # An entry filed under an artifact: top.txt would be a file and a directory at once.
    conn.execute("UPDATE entries SET parent_id = ?, key = 'top.txt/config.json'"
                 " WHERE key = 'models/v1/config.json'", (top_id,))
    for args in ((), ("--repair",)):
        rc, out = fsck(data, *args)
        assert rc == 1, out
        assert "problem: top.txt/config.json: its parent top.txt is a file" in out, out
        assert "not repaired: top.txt/config.json: file/directory clash" in out, out


def test_key_out_of_step_with_the_tree(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)
    db(data).execute("UPDATE entries SET key = 'elsewhere.txt' WHERE key = 'top.txt'")
    rc, out = fsck(data, "--repair")
    assert rc == 1, out
    assert "problem: elsewhere.txt: key does not match its place /top.txt" in out, out


def test_invalid_name_in_the_tree(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)
    db(data).execute("UPDATE entries SET name = '..', key = '..' WHERE key = 'top.txt'")
    rc, out = fsck(data)
    assert rc == 1, out
    assert "problem: ..: name '..' breaks a key rule" in out, out


def test_several_kinds_of_damage_in_one_report(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sid = build(data)["session"]
    (data / "staging" / "stray").write_bytes(b"s")
    os.truncate(blob_of(data, "top.txt"), 1)
    db(data).execute("DELETE FROM entries WHERE key = 'datasets'")
    db(data).execute("UPDATE sessions SET expires_at = 1 WHERE id = ?", (sid,))
    rc, out = fsck(data, "--repair")
    # Everything safe is repaired; the torn artifact is left and keeps the status at 1.
    assert rc == 1, out
    assert out.count("problem:") == 4, out
    assert out.count("repaired:") - out.count("not repaired:") == 3, out
    assert "not repaired: top.txt: torn or altered bytes" in out, out
    rc, out = fsck(data)
    assert rc == 1 and out.count("problem:") == 1, out


def test_damaged_database_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)
    with open(data / "meta.db", "r+b") as f:
        f.write(b"this is not sqlite" * 10)
    for name in ("meta.db-wal", "meta.db-shm"):
        (data / name).unlink(missing_ok=True)
    rc, out = fsck(data)
    assert rc == 2, out
    assert "restore" in out and "meta.db" in out, out


def test_not_a_data_directory(tmp_path: Path) -> None:
    rc, out = fsck(tmp_path / "nowhere")
    assert rc == 2 and "not an artifactfs data directory" in out, out
    assert not (tmp_path / "nowhere").exists(), "fsck must not create a data directory"


async def test_a_running_daemon_keeps_fsck_out(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_store(data) as store:
        await put(store, "k", b"v")
        r = await trio.run_process([ARTIFACTFS, "fsck", "--data", str(data), "--repair"],
                                   capture_stdout=True, capture_stderr=True, check=False)
        assert r.returncode == 2, r
        assert b"in use by another artifactfs process" in r.stderr, r.stderr
        assert read(store, "k") == b"v"
    rc, out = fsck(data)
    assert rc == 0, out


def test_a_damaged_page_of_the_database_is_reported_not_a_traceback(tmp_path: Path) -> None:
    data = tmp_path / "data"
    build(data)
    size = (data / "meta.db").stat().st_size
    assert size >= 4 * 4096, size  # the header page stays; a later page is garbage
    with open(data / "meta.db", "r+b") as f:
        f.seek(size - 2 * 4096)
        f.write(os.urandom(4096))
    rc, out = fsck(data)
    assert rc in (1, 2), out
    assert "restore" in out and "meta.db" in out, out
    assert "clean" not in out.splitlines()[-1], out


def test_commits_left_in_the_commit_log_are_applied_not_reported(tmp_path: Path) -> None:
    """A daemon killed with its batch of commits still open leaves them in commits.log
    (artifactfs/store/commitlog.py): committed data, which fsck puts in, as start-up does,
    instead of calling their blobs orphans."""
    data = tmp_path / "data"
    build(data)
    child = (
        "import os, signal, sys, trio\n"
        "from artifactfs import open_store\n"
        "async def main(root):\n"
        "    async with open_store(root) as store:\n"
        "        for i in range(5):\n"
        "            await store.put_artifact(f'late/{i}.bin', b'late' * i)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "trio.run(main, sys.argv[1])\n")
    r = subprocess.run([sys.executable, "-c", child, str(data)], capture_output=True, timeout=60)
    assert r.returncode == -9, r.stderr
    assert (data / "commits.log").stat().st_size > 0
    rc, out = fsck(data)
    assert rc == 0, out
    assert "applied 5 commits from the commit log" in out
    assert f"checked {len(CONTENT) + 5} artifacts" in out
    assert_intact(data, list(CONTENT))

    async def late() -> None:
        async with open_store(data) as store:
            for i in range(5):
                assert read(store, f"late/{i}.bin") == b"late" * i

    trio.run(late)
