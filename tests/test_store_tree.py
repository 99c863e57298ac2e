"""Store layer, the tree: directories, clashes, rename, unlink, mount writes, paging."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import SCALE
from storeutil import all_artifacts, check_invariants, entry_id, put, read, sha

from artifactfs import Conflict, InvalidArgument, InvalidKey, NotEmpty, NotFound, open_store
from artifactfs.store import ArtifactStore
from artifactfs.store.schema import ROOT_ID


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ArtifactStore]:
    async with open_store(tmp_path / "data") as s:
        yield s


async def test_keys_create_their_directories_and_deleting_leaves_them(
    store: ArtifactStore,
) -> None:
    await put(store, "a/b/c.bin", b"1")
    a = store.lookup(ROOT_ID, "a")
    b = store.lookup(a.id, "b")
    assert a.is_dir and b.is_dir and b.key == "a/b"
    await store.delete_artifact("a/b/c.bin")
    assert store.lookup(a.id, "b").is_dir
    assert (await store.list_artifacts()).data == []
    with pytest.raises(NotEmpty):
        store.rmdir(ROOT_ID, "a")
    store.rmdir(a.id, "b")
    store.rmdir(ROOT_ID, "a")
    with pytest.raises(NotFound):
        store.lookup(ROOT_ID, "a")


async def test_file_directory_clashes_carry_their_errno(store: ArtifactStore) -> None:
    await put(store, "f", b"file")
    store.mkdir(ROOT_ID, "d", 0o755, 0, 0)
    f = store.lookup(ROOT_ID, "f")
    cases = [
        (lambda: store.mkdir(ROOT_ID, "f", 0o755, 0, 0), errno.EEXIST),
        (lambda: store.mkdir(f.id, "x", 0o755, 0, 0), errno.ENOTDIR),
        (lambda: store.create_file(ROOT_ID, "d", 0o644, 0, 0), errno.EEXIST),
        (lambda: store.rmdir(ROOT_ID, "f"), errno.ENOTDIR),
        (lambda: store.unlink(ROOT_ID, "d"), errno.EISDIR),
        (lambda: store.rename(ROOT_ID, "f", ROOT_ID, "d"), errno.EISDIR),
        (lambda: store.rename(ROOT_ID, "d", ROOT_ID, "f"), errno.ENOTDIR),
        (lambda: store.rename(ROOT_ID, "d", f.id, "x"), errno.ENOTDIR),
    ]
    for call, err in cases:
        with pytest.raises(Conflict) as info:
            call()
        assert info.value.errno == err
    for key, err in (("d", errno.EISDIR), ("f/x", errno.ENOTDIR), ("f/x/y", errno.ENOTDIR)):
        with pytest.raises(Conflict) as info:
            await store.create_upload_session(key, "text/plain", 1)
        assert info.value.errno == err
    assert read(store, "f") == b"file"
    check_invariants(store)


async def test_names_are_validated_with_their_rule(store: ArtifactStore) -> None:
    for name, err in (("a b", errno.EINVAL), (".", errno.EINVAL), ("..", errno.EINVAL),
                      ("x" * 256, errno.ENAMETOOLONG), ("a:b", errno.EINVAL)):
        with pytest.raises(InvalidKey) as info:
            store.mkdir(ROOT_ID, name, 0o755, 0, 0)
        assert info.value.errno == err
        with pytest.raises(InvalidKey):
            store.create_file(ROOT_ID, name, 0o644, 0, 0)
    assert store.readdir(ROOT_ID, 0, 100) == []
    assert list(store.data.iter_staging_ids()) == []


async def test_paths_longer_than_1024_bytes_are_refused(store: ArtifactStore) -> None:
    parent = ROOT_ID
    for _ in range(4):
        parent = store.mkdir(parent, "d" * 250, 0o755, 0, 0).id
    with pytest.raises(InvalidKey) as info:  # 4 * 251 + 30 > 1024
        store.mkdir(parent, "x" * 30, 0o755, 0, 0)
    assert info.value.errno == errno.ENAMETOOLONG
    # Moving a directory deeper must not push a key under it past the limit either.
    store.mkdir(ROOT_ID, "m", 0o755, 0, 0)
    await put(store, "m/" + "y" * 200, b"1")
    with pytest.raises(InvalidKey):
        store.rename(ROOT_ID, "m", parent, "m")
    assert read(store, "m/" + "y" * 200) == b"1"


async def test_rename_file_replaces_its_target_atomically(store: ArtifactStore) -> None:
    await put(store, "src", b"new")
    await put(store, "dst", b"old")
    reader = store.open_artifact("dst")
    replaced = store.rename(ROOT_ID, "src", ROOT_ID, "dst")
    assert replaced is not None and replaced.key == "dst"
    assert read(store, "dst") == b"new"
    with pytest.raises(NotFound):
        await store.get_artifact("src")
    store.flush()
    assert reader.read() == b"old"
    reader.close()
    assert [a["key"] for a in await all_artifacts(store)] == ["dst"]
    check_invariants(store)


async def test_rename_noreplace_and_unsupported_flags(store: ArtifactStore) -> None:
    await put(store, "a", b"a")
    await put(store, "b", b"b")
    with pytest.raises(Conflict) as info:
        store.rename(ROOT_ID, "a", ROOT_ID, "b", 1)
    assert info.value.errno == errno.EEXIST
    with pytest.raises(InvalidArgument):
        store.rename(ROOT_ID, "a", ROOT_ID, "b", 2)  # RENAME_EXCHANGE
    store.rename(ROOT_ID, "a", ROOT_ID, "c", 1)
    assert read(store, "c") == b"a" and read(store, "b") == b"b"
    assert store.rename(ROOT_ID, "c", ROOT_ID, "c") is None  # onto itself: nothing happens
    with pytest.raises(NotFound):
        store.rename(ROOT_ID, "nope", ROOT_ID, "x")


async def test_rename_directory_moves_every_key_under_it(store: ArtifactStore) -> None:
    keys = [f"src/{sub}/f{i}" for sub in ("x", "y/z") for i in range(5)]
    for k in keys:
        await put(store, k, k.encode())
    await put(store, "src0", b"neighbour")  # '0' sorts right after '/': must not move
    await put(store, "src-x", b"neighbour")
    store.mkdir(ROOT_ID, "dest", 0o755, 0, 0)
    store.mkdir(entry_id(store, "dest"), "inner", 0o755, 0, 0)  # an empty target is replaced
    store.rename(ROOT_ID, "src", entry_id(store, "dest"), "inner")
    listed = [a["key"] for a in await all_artifacts(store)]
    moved = [k.replace("src/", "dest/inner/", 1) for k in keys]
    assert listed == sorted([*moved, "src0", "src-x"])
    for k in moved:
        assert read(store, k) == k.replace("dest/inner/", "src/", 1).encode()
    assert store.lookup(entry_id(store, "dest/inner/y"), "z").key == "dest/inner/y/z"
    # Into itself, over a non-empty directory, over a file: refused, nothing moves.
    with pytest.raises(InvalidArgument):
        store.rename(entry_id(store, "dest"), "inner", entry_id(store, "dest/inner/x"), "q")
    store.mkdir(ROOT_ID, "full", 0o755, 0, 0)
    await put(store, "full/f", b"1")
    with pytest.raises(NotEmpty):
        store.rename(entry_id(store, "dest"), "inner", ROOT_ID, "full")
    assert [a["key"] for a in await all_artifacts(store)] == sorted([*listed, "full/f"])
    check_invariants(store)


async def test_mount_write_session_becomes_an_artifact_on_last_release(
    store: ArtifactStore,
) -> None:
    e, ws = store.create_file(ROOT_ID, "out.jsonl", 0o644, 0, 0)
    os.pwrite(ws.fd, b"line1\n", 0)
    assert store.entry(e.id).size == 6  # the mount sees its live size at once
    with pytest.raises(NotFound):
        await store.get_artifact("out.jsonl")  # but it is not an artifact yet
    info = await store.get_upload_session_info(ws.id)
    assert info.offset == 6
    second = await store.open_write(e.id, truncate=False)  # a second writer joins
    assert second is ws
    os.pwrite(ws.fd, b"line2\n", 6)
    assert await store.release_write(ws) is None
    committed = await store.release_write(ws)
    assert committed is not None and committed.size == 12
    art = await store.get_artifact("out.jsonl")
    assert art.mime_type == "application/jsonl" and art.sha256 == sha(b"line1\nline2\n")
    # Opening without O_TRUNC starts from a copy of the bytes; O_TRUNC from nothing.
    ws = await store.open_write(e.id, truncate=False)
    os.pwrite(ws.fd, b"L", 0)
    await store.release_write(ws)
    assert read(store, "out.jsonl") == b"Line1\nline2\n"
    ws = await store.open_write(e.id, truncate=True)
    await store.release_write(ws)
    assert read(store, "out.jsonl") == b""
    await store.truncate(e.id, 3)
    assert read(store, "out.jsonl") == b"\0\0\0"
    check_invariants(store)


async def test_unlink_while_open_for_writing_drops_the_bytes(store: ArtifactStore) -> None:
    await put(store, "k", b"old")
    e = store.lookup(ROOT_ID, "k")
    ws = await store.open_write(e.id, truncate=True)
    os.pwrite(ws.fd, b"new", 0)
    store.unlink(ROOT_ID, "k")
    assert await store.release_write(ws) is None
    with pytest.raises(NotFound):
        await store.get_artifact("k")
    store.flush()
    check_invariants(store)
    assert list(store.data.iter_blob_ids()) == []


async def test_mount_session_lost_in_a_crash_keeps_the_previous_artifact(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path / "d") as store:
        await put(store, "k", b"old")
        ws = await store.open_write(store.lookup(ROOT_ID, "k").id, truncate=True)
        os.pwrite(ws.fd, b"half-written", 0)
        store.create_file(ROOT_ID, "new", 0o644, 0, 0)
        # Simulate the crash: the process dies with both files open (close() would discard
        # them cleanly; recovery must do the same from the rows alone).
        store._writes.clear()
    async with open_store(tmp_path / "d") as store:
        assert read(store, "k") == b"old"
        with pytest.raises(NotFound):
            store.lookup(ROOT_ID, "new")
        assert store.meta.all_sessions() == []
        check_invariants(store)


async def test_readdir_pages_by_cursor(store: ArtifactStore) -> None:
    names = [f"n{i:04d}" for i in range(250)]
    random.Random(1).shuffle(names)
    for n in names:
        store.mkdir(ROOT_ID, n, 0o755, 0, 0)
    seen: list[str] = []
    after = 0
    while page := store.readdir(ROOT_ID, after, 64):
        seen += [e.name for e in page]
        after = page[-1].id
    assert seen == names  # creation (id) order, each once
    assert store.subdir_count(ROOT_ID) == 250


async def test_paging_over_thousands_of_keys(store: ArtifactStore) -> None:
    rng = random.Random(7)
    keys = {f"p{rng.randrange(10**6):06d}/{rng.choice('abc')}-{i}" for i in range(3000 * SCALE)}
    for k in keys:
        await put(store, k, b"")
    store.mkdir(ROOT_ID, "zz-a-directory", 0o755, 0, 0)
    expected = sorted(keys, key=str.encode)
    for limit in (1, 7, 100, 1000):
        if limit == 1 and len(expected) > 500:
            got: list[str] = []
            for start in range(0, 500):
                page = await store.list_artifacts(start, 1)
                got += [a["key"] for a in page.data]
                assert page.has_more
            assert got == expected[:500]
            continue
        got = []
        start = 0
        while True:
            page = await store.list_artifacts(start, limit)
            got += [a["key"] for a in page.data]
            start += len(page.data)
            assert page.has_more == (start < len(expected))
            if not page.has_more:
                break
        assert got == expected
    # Random access (no cursor to reuse) gives the same slices.
    for start in rng.sample(range(len(expected)), 20):
        page = await store.list_artifacts(start, 50)
        assert [a["key"] for a in page.data] == expected[start:start + 50]
    # A prefix pages the same way.
    prefix = expected[0][:3]
    under = [k for k in expected if k.startswith(prefix)]
    got = []
    while True:
        page = await store.list_artifacts(len(got), 3, prefix=prefix)
        got += [a["key"] for a in page.data]
        if not page.has_more:
            break
    assert got == under


async def test_http_commit_over_a_file_open_in_the_mount(store: ArtifactStore) -> None:
    """Last writer wins; and the key joining the listing invalidates cached page cursors."""
    for k in ("k1", "k2", "k3", "k4"):
        await put(store, k, k.encode())
    e, ws = store.create_file(ROOT_ID, "k0", 0o644, 0, 0)  # pending: not an artifact yet
    os.pwrite(ws.fd, b"from the mount", 0)
    first = await store.list_artifacts(0, 2)
    assert [a["key"] for a in first.data] == ["k1", "k2"]
    await put(store, "k0", b"from http")
    assert read(store, "k0") == b"from http"
    second = await store.list_artifacts(2, 2)  # offsets now count k0
    assert [a["key"] for a in second.data] == ["k2", "k3"]
    await store.release_write(ws)
    assert read(store, "k0") == b"from the mount"
    assert store.lookup(ROOT_ID, "k0").id == e.id
    store.flush()
    check_invariants(store)


async def test_paging_by_cursor_costs_the_same_at_any_depth(store: ArtifactStore) -> None:
    """The cursor cache makes page k cost O(limit), not O(k * limit): counted in SQLite VM
    steps, so the test does not depend on the machine's speed."""
    n = 20_000
    conn = store.meta.conn
    with store.meta.transaction():
        conn.executemany(
            "INSERT INTO entries (parent_id, name, key, kind, mode, mtime_ns, ctime_ns,"
            " blob_id, size, sha256, mime_type, created_at) VALUES"
            " (1, ?, ?, 'file', 420, 0, 0, ?, 0, '', 'a/b', 0)",
            ((f"k{i:06d}", f"k{i:06d}", f"{i:032x}") for i in range(n)))
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    cost: dict[int, int] = {}
    start = 0
    while start < n:
        steps = 0
        conn.set_progress_handler(count, 100)
        page = await store.list_artifacts(start, 500)
        conn.set_progress_handler(None, 0)
        assert page.data[0]["key"] == f"k{start:06d}"
        cost[start] = steps
        start += len(page.data)
    first, last = cost[500], cost[n - 500]
    assert last <= 2 * first + 10, f"page at {n - 500} cost {last} steps, page at 500 {first}"
