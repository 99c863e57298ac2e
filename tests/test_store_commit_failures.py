"""Store layer: a mount commit that fails part-way, or that something races, never changes the
bytes of a committed version, never leaves a staging file behind, and never stalls the loop.

A passthrough session (the kernel writes the staging file itself, fs/passthrough_writes.py)
is driven here as the mount drives it: ``pass_through`` and then writes straight into
``ws.fd``, ``sync_write`` for fsync, ``snapshot_write`` for the FLUSH at close, and
``release_write`` for the last RELEASE, which publishes the staging file itself as the blob.
Each test fails if the guard it names is taken away.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from artifactfs.errors import NoSpace, NotFound, Unsupported
from artifactfs.store import ArtifactStore
from artifactfs.store.schema import ROOT_ID
from artifactfs.store.tree import XATTR_SESSION, XATTR_SHA256

DATA = random.Random(1).randbytes(300_000)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ArtifactStore]:
    """Without open_store's background work: no digest worker, so pending stays pending."""
    s = ArtifactStore(tmp_path / "data")
    s.open()
    try:
        yield s
    finally:
        s.close()


def blob_bytes(store: ArtifactStore, entry_id: int) -> bytes:
    e = store.meta.entry(entry_id)
    assert e is not None and e.blob_id is not None
    return store.data.blob_path(e.blob_id).read_bytes()


def staged(store: ArtifactStore) -> list[str]:
    return sorted(store.data.iter_staging_ids())


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "daemon"])
async def test_a_failure_after_the_commit_leaves_the_committed_bytes_whole(
        store: ArtifactStore, passthrough: bool) -> None:
    """The last release publishes the staging file itself as the blob; a failure after the
    commit's transaction (the WAL's fsync, EIO) must not "abandon" the session, truncating
    that file: the row would say 300,000 bytes and the blob hold 0."""
    e, ws = store.create_file(ROOT_ID, "x.bin", 0o644, 0, 0)
    want = bytearray(DATA)
    if passthrough:
        store.pass_through(ws)
        os.pwrite(ws.fd, DATA, 0)
    else:
        store.write(ws, DATA, 0)
    await store.sync_write(ws)  # fsync before close: the commit is durable, so it syncs the WAL
    if passthrough:
        os.pwrite(ws.fd, b"!", 10)  # after the fsync: its copy goes unused
        want[10:11] = b"!"

    async def eio() -> None:
        raise OSError(errno.EIO, "fsync of the WAL failed")

    store._sync_metadata = eio  # type: ignore[method-assign]
    with pytest.raises(OSError):
        await store.release_write(ws)
    e2 = store.meta.entry(e.id)
    assert e2 is not None and e2.size == len(want)
    assert blob_bytes(store, e.id) == bytes(want)


async def test_a_truncate_racing_the_last_release_never_changes_the_committed_bytes(
        store: ArtifactStore) -> None:
    """truncate(2) by path waited for the session to be ready (a checkpoint, even when it
    is), then truncated the staging file, which the release had meanwhile published as the
    blob: the row said 300,000 bytes, the blob held 1,000."""
    for i in range(6):
        e, ws = store.create_file(ROOT_ID, f"t{i}.bin", 0o644, 0, 0)
        store.pass_through(ws)
        os.pwrite(ws.fd, DATA, 0)
        ws.synced = True  # the commit fsyncs its blob in a thread: the truncate runs then
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.truncate, e.id, 1000)
            nursery.start_soon(store.release_write, ws)
        row = store.meta.entry(e.id)
        assert row is not None
        got = blob_bytes(store, e.id)
        assert len(got) == row.size == 1000, (i, len(got), row.size)
        assert got == DATA[:1000]
        a = await store.get_artifact(f"t{i}.bin")
        assert a.sha256 == hashlib.sha256(got).hexdigest()
    assert staged(store) == []


async def test_setting_a_pending_digest_to_its_own_value_is_accepted(
        store: ArtifactStore) -> None:
    """``cp -a`` and ``rsync -X`` set ``user.sha256`` to the value they read, right after
    the close: while the digest was pending that was EPERM."""
    e, ws = store.create_file(ROOT_ID, "x.bin", 0o644, 0, 0)
    store.pass_through(ws)
    os.pwrite(ws.fd, DATA, 0)
    await store.release_write(ws)
    row = store.meta.entry(e.id)
    assert row is not None and row.sha256 is None  # pending: no worker runs here
    await store.write_xattr(e.id, XATTR_SHA256, hashlib.sha256(DATA).hexdigest().encode())
    with pytest.raises(Unsupported):
        await store.write_xattr(e.id, XATTR_SHA256, b"0" * 64)


async def test_a_copy_made_by_fsync_commits_at_close_on_a_full_disk(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """``dd conv=fsync`` on a nearly full disk: the fsync made the commit's copy, durable; the
    close must commit it (it needs no room) and not leak it in staging."""
    e, ws = store.create_file(ROOT_ID, "x.bin", 0o644, 0, 0)
    store.pass_through(ws)
    os.pwrite(ws.fd, DATA, 0)
    await store.sync_write(ws)

    def full(nbytes: int, what: object) -> None:
        raise NoSpace("the kernel's writes took the last of the space")

    monkeypatch.setattr(store.data, "check_space", full)
    assert await store.snapshot_write(ws) is not None  # the FLUSH at close commits
    await store.release_write(ws)
    assert blob_bytes(store, e.id) == DATA
    assert staged(store) == []


async def test_no_room_for_the_copy_at_close_fails_the_close_and_keeps_nothing(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit at close copies the file and needs its room again: without it the close
    fails with ENOSPC, as a failed write would, and the file is not kept at the release
    either (close(2) returning 0 must mean committed)."""
    e, ws = store.create_file(ROOT_ID, "big.bin", 0o644, 0, 0)
    store.pass_through(ws)
    os.pwrite(ws.fd, DATA, 0)

    def tight(nbytes: int, what: object) -> None:
        if nbytes > 0:
            raise NoSpace("no room for the copy")

    monkeypatch.setattr(store.data, "check_space", tight)
    with pytest.raises(NoSpace):
        await store.snapshot_write(ws)
    with pytest.raises(NoSpace):
        await store.release_write(ws)
    assert store.meta.entry(e.id) is None
    assert staged(store) == []


async def test_the_fsync_of_a_small_file_never_blocks_the_loop(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A passthrough fsync copies the file and fsyncs the copy: the copy of a small file may
    run inline, its fsync (the disk's time) must not."""
    calls: list[bool] = []
    real = os.fsync

    def spy(fd: int) -> None:
        calls.append(threading.current_thread() is threading.main_thread())
        real(fd)

    e, ws = store.create_file(ROOT_ID, "x.bin", 0o644, 0, 0)
    store.pass_through(ws)
    os.pwrite(ws.fd, DATA, 0)
    monkeypatch.setattr(os, "fsync", spy)
    await store.sync_write(ws)
    monkeypatch.setattr(os, "fsync", real)
    assert calls and not any(calls), calls
    await store.release_write(ws)
    assert blob_bytes(store, e.id) == DATA


async def test_a_file_closed_by_its_writers_shows_no_upload_session(
        store: ArtifactStore) -> None:
    """A passthrough session committed at the close of its last writer lives on until the
    kernel's RELEASE, which may come after the next request: the file is closed and
    committed, so it no longer names an upload session; a writer joining names it again."""
    e, ws = store.create_file(ROOT_ID, "x.bin", 0o644, 0, 0)
    store.pass_through(ws)
    os.pwrite(ws.fd, DATA, 0)
    assert XATTR_SESSION in store.xattr_names(e.id)
    assert await store.snapshot_write(ws) is not None  # the FLUSH at close
    assert XATTR_SESSION not in store.xattr_names(e.id)
    with pytest.raises(NotFound):
        await store.read_xattr(e.id, XATTR_SESSION)
    assert store.join_write(ws, truncate=False)  # another write-only open of the file
    assert (await store.read_xattr(e.id, XATTR_SESSION)).decode() == ws.id
    await store.release_write(ws)
    await store.release_write(ws)
    assert blob_bytes(store, e.id) == DATA
