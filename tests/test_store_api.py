"""Store layer, the Artifacts API's seven operations: what they answer and what bad input does.

Every refused request must leave the store exactly as it was (rows, blobs, staging files).
"""

from __future__ import annotations

import errno
import multiprocessing
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from storeutil import all_artifacts, check_invariants, put, read, sha, snapshot

from artifactfs import (
    BulkDeleteRequest,
    Conflict,
    InvalidArgument,
    InvalidKey,
    NotFound,
    StoreLocked,
    open_store,
)
from artifactfs.models import ArtifactDeleteRequest
from artifactfs.store import ArtifactStore

# One bad key per rule of DESIGN §1, with the errno the mount reports for it.
BAD_KEYS: list[tuple[object, str, int]] = [
    ("", "empty", errno.EINVAL),
    ("a b", "contains ' '", errno.EINVAL),
    ("a:b", "contains ':'", errno.EINVAL),
    ("caf\u00e9", "contains", errno.EINVAL),
    ("a\x00b", "contains", errno.EINVAL),
    ("/abs", "start or end", errno.EINVAL),
    ("dir/", "start or end", errno.EINVAL),
    ("a//b", "empty component", errno.EINVAL),
    ("a/./b", "'.'", errno.EINVAL),
    ("a/../b", "'..'", errno.EINVAL),
    ("..", "'..'", errno.EINVAL),
    ("x" * 256, "component is 256 bytes", errno.ENAMETOOLONG),
    ("a/" * 512 + "b", "1025 bytes", errno.ENAMETOOLONG),
    (None, "must be a string", errno.EINVAL),
    (7, "must be a string", errno.EINVAL),
]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ArtifactStore]:
    async with open_store(tmp_path / "data") as s:
        yield s


async def seeded(store: ArtifactStore) -> None:
    await put(store, "datasets/v1/train.jsonl", b'{"a": 1}\n' * 10, "application/jsonl")
    await put(store, "models/ckpt.bin", b"\x00\x01" * 100)
    # A session in flight, so that refused requests are seen not to touch it either.
    s = await store.create_upload_session("pending/part.bin", "application/octet-stream", 10)
    await store.upload_content_to_session(s.id, b"01234")


# --- create_upload_session -----------------------------------------------------------------

async def test_create_upload_session_returns_a_fresh_session(store: ArtifactStore) -> None:
    s = await store.create_upload_session("a/b.txt", "text/plain", 12)
    assert (s.offset, s.size) == (0, 12)
    assert len(s.id) >= 20 and s.id in s.uri
    other = await store.create_upload_session("a/b.txt", "text/plain", 12)
    assert other.id != s.id
    info = await store.get_upload_session_info(s.id)
    assert info == s
    # A session is not an artifact until it commits.
    with pytest.raises(NotFound):
        await store.get_artifact("a/b.txt")
    assert (await store.list_artifacts()).data == []


@pytest.mark.parametrize(("key", "rule", "err"), BAD_KEYS)
async def test_create_upload_session_refuses_bad_keys(
    store: ArtifactStore, key: object, rule: str, err: int
) -> None:
    await seeded(store)
    before = snapshot(store)
    with pytest.raises(InvalidKey, match=rule) as info:
        await store.create_upload_session(key, "text/plain", 3)  # type: ignore[arg-type]
    assert info.value.errno == err and info.value.http_status == 400
    assert snapshot(store) == before


@pytest.mark.parametrize("mime", ["", "text", "text/", "/plain", "text/pl ain", None, 3])
async def test_create_upload_session_refuses_bad_mime_types(
    store: ArtifactStore, mime: object
) -> None:
    await seeded(store)
    before = snapshot(store)
    with pytest.raises(InvalidArgument, match="type/subtype"):
        await store.create_upload_session("k", mime, 3)  # type: ignore[arg-type]
    assert snapshot(store) == before


@pytest.mark.parametrize(("size", "rule"), [
    (-1, ">= 0"), (-(2**40), ">= 0"), (2**63, "too large"), (1.5, "integer"),
    ("3", "integer"), (True, "integer"), (None, "integer"),
])
async def test_create_upload_session_refuses_bad_sizes(
    store: ArtifactStore, size: object, rule: str
) -> None:
    await seeded(store)
    before = snapshot(store)
    with pytest.raises(InvalidArgument, match=rule):
        await store.create_upload_session("k", "text/plain", size)  # type: ignore[arg-type]
    assert snapshot(store) == before


async def test_create_upload_session_refuses_file_directory_clashes(
    store: ArtifactStore,
) -> None:
    await seeded(store)
    before = snapshot(store)
    with pytest.raises(Conflict) as info:  # a directory holds the key
        await store.create_upload_session("datasets/v1", "text/plain", 1)
    assert info.value.errno == errno.EISDIR and info.value.http_status == 409
    with pytest.raises(Conflict) as info:  # an artifact holds a parent
        await store.create_upload_session("models/ckpt.bin/x", "text/plain", 1)
    assert info.value.errno == errno.ENOTDIR
    assert snapshot(store) == before


async def test_commit_fails_cleanly_when_a_clash_appears_meanwhile(
    store: ArtifactStore,
) -> None:
    s = await store.create_upload_session("late/x", "text/plain", 2)
    await put(store, "late/x/inner", b"1")  # 'late/x' became a directory
    with pytest.raises(Conflict):
        await store.upload_content_to_session(s.id, b"ab")
    with pytest.raises(NotFound):
        await store.get_upload_session_info(s.id)
    assert [a["key"] for a in await all_artifacts(store)] == ["late/x/inner"]
    check_invariants(store)


# --- upload_content_to_session -------------------------------------------------------------

async def test_upload_in_chunks_commits_on_the_last_byte(store: ArtifactStore) -> None:
    content = os.urandom(1000)
    s = await store.create_upload_session("ckpt/model.bin", "application/octet-stream", 1000)
    assert await store.upload_content_to_session(s.id, content[:300]) is None
    assert (await store.get_upload_session_info(s.id)).offset == 300
    assert await store.upload_content_to_session(s.id, content[300:700], 300) is None
    art = await store.upload_content_to_session(s.id, content[700:], 700)
    assert art is not None
    assert (art.key, art.size, art.sha256) == ("ckpt/model.bin", 1000, sha(content))
    assert art.mime_type == "application/octet-stream"
    assert art.uri.endswith("/v1/artifacts/ckpt/model.bin:content")
    assert await store.get_artifact("ckpt/model.bin") == art
    assert read(store, "ckpt/model.bin") == content
    # The session is gone with its staging file.
    with pytest.raises(NotFound):
        await store.get_upload_session_info(s.id)
    with pytest.raises(NotFound):
        await store.upload_content_to_session(s.id, b"")
    check_invariants(store)


@pytest.mark.parametrize("upload_id", ["nope", "", "x" * 5000, None, 12])
async def test_upload_to_unknown_session_is_not_found(
    store: ArtifactStore, upload_id: object
) -> None:
    await seeded(store)
    before = snapshot(store)
    with pytest.raises(NotFound):
        await store.upload_content_to_session(upload_id, b"abc")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await store.get_upload_session_info(upload_id)  # type: ignore[arg-type]
    assert snapshot(store) == before


async def test_offset_mismatch_is_a_conflict_carrying_the_true_offset(
    store: ArtifactStore,
) -> None:
    s = await store.create_upload_session("k", "text/plain", 10)
    await store.upload_content_to_session(s.id, b"01234", 0)
    before = snapshot(store)
    for wrong in (0, 3, 6, 10):
        with pytest.raises(Conflict) as info:
            await store.upload_content_to_session(s.id, b"56789", wrong)
        assert info.value.offset == 5 and info.value.http_status == 409
    for bad in (-1, 1.5, True, "5"):
        with pytest.raises(InvalidArgument):
            await store.upload_content_to_session(s.id, b"56789", bad)  # type: ignore[arg-type]
    assert snapshot(store) == before
    art = await store.upload_content_to_session(s.id, b"56789", 5)
    assert art is not None and read(store, "k") == b"0123456789"


async def test_bytes_past_the_declared_size_are_refused_whole(store: ArtifactStore) -> None:
    s = await store.create_upload_session("k", "text/plain", 10)
    await store.upload_content_to_session(s.id, b"0123")
    before = snapshot(store)
    with pytest.raises(InvalidArgument, match="exceeds"):
        await store.upload_content_to_session(s.id, b"456789X")
    with pytest.raises(InvalidArgument, match="exceeds"):
        await store.upload_content_to_session(s.id, b"456789X", 4)
    # A streamed body with no declared length is caught chunk by chunk and rolled back.
    with pytest.raises(InvalidArgument, match="exceeds"):
        await store.upload_stream(s.id, [b"456", b"789", b"X"])
    assert snapshot(store) == before
    assert (await store.get_upload_session_info(s.id)).offset == 4
    art = await store.upload_content_to_session(s.id, b"456789")
    assert art is not None and read(store, "k") == b"0123456789"


async def test_size_zero_session_commits_on_its_first_upload(store: ArtifactStore) -> None:
    s = await store.create_upload_session("empty/marker", "text/plain", 0)
    with pytest.raises(InvalidArgument):
        await store.upload_content_to_session(s.id, b"x")
    art = await store.upload_content_to_session(s.id, b"")
    assert art is not None and art.size == 0 and art.sha256 == sha(b"")
    assert read(store, "empty/marker") == b""
    check_invariants(store)


async def test_empty_chunk_keeps_the_session_open(store: ArtifactStore) -> None:
    s = await store.create_upload_session("k", "text/plain", 2)
    assert await store.upload_content_to_session(s.id, b"") is None
    assert (await store.get_upload_session_info(s.id)).offset == 0


# --- get_artifact ----------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "rule", "err"), BAD_KEYS)
async def test_get_and_delete_refuse_bad_keys(
    store: ArtifactStore, key: object, rule: str, err: int
) -> None:
    await seeded(store)
    before = snapshot(store)
    with pytest.raises(InvalidKey, match=rule):
        await store.get_artifact(key)  # type: ignore[arg-type]
    with pytest.raises(InvalidKey, match=rule):
        await store.delete_artifact(key)  # type: ignore[arg-type]
    assert snapshot(store) == before


async def test_get_artifact_of_absent_keys_directories_and_sessions(
    store: ArtifactStore,
) -> None:
    await seeded(store)
    for key in ("nope", "datasets", "datasets/v1", "pending/part.bin", "models/ckpt.bin/x"):
        with pytest.raises(NotFound):
            await store.get_artifact(key)
    art = await store.get_artifact("models/ckpt.bin")
    assert art.size == 200 and art.created_at > 1_600_000_000


# --- delete_artifact -------------------------------------------------------------------------

async def test_delete_artifact_removes_the_key_but_keeps_its_directory(
    store: ArtifactStore,
) -> None:
    await seeded(store)
    await store.delete_artifact("models/ckpt.bin")
    with pytest.raises(NotFound):
        await store.get_artifact("models/ckpt.bin")
    assert store.lookup(1, "models").is_dir  # the directory stays (rm -r works as on a disk)
    before = snapshot(store)
    for key in ("models/ckpt.bin", "models", "nope/x"):
        with pytest.raises(NotFound):
            await store.delete_artifact(key)
    assert snapshot(store) == before
    store.flush()
    check_invariants(store)


# --- bulk_delete_artifacts -----------------------------------------------------------------

async def test_bulk_delete_is_all_or_nothing(store: ArtifactStore) -> None:
    await seeded(store)
    await put(store, "x/1", b"1")
    await put(store, "x/2", b"2")
    before = snapshot(store)

    def req(*keys: str) -> BulkDeleteRequest:
        return BulkDeleteRequest(artifacts=[ArtifactDeleteRequest(key=k) for k in keys])

    with pytest.raises(NotFound, match="absent1") as info:
        await store.bulk_delete_artifacts(req("x/1", "absent1", "x/2", "absent2"))
    assert "absent2" in str(info.value) and "x/1," not in str(info.value)
    with pytest.raises(NotFound, match="datasets"):  # a directory is not an artifact
        await store.bulk_delete_artifacts(req("x/1", "datasets"))
    with pytest.raises(NotFound, match="pending"):  # nor is a session in flight
        await store.bulk_delete_artifacts(req("x/1", "pending/part.bin"))
    for bad, _rule, _ in BAD_KEYS[:13]:
        with pytest.raises(InvalidKey):
            await store.bulk_delete_artifacts(req("x/1", bad))  # type: ignore[arg-type]
    with pytest.raises(InvalidKey):
        await store.bulk_delete_artifacts(["x/1", "a//b"])
    assert snapshot(store) == before

    with pytest.raises(InvalidArgument, match="list of keys"):
        await store.bulk_delete_artifacts("x/1")  # a str is not a list of one-letter keys
    assert snapshot(store) == before

    await store.bulk_delete_artifacts(req("x/1", "x/2", "x/1"))  # duplicates are one delete
    assert [a["key"] for a in await all_artifacts(store)] == [
        "datasets/v1/train.jsonl", "models/ckpt.bin"]
    await store.bulk_delete_artifacts(req())  # nothing to do is not an error
    store.flush()
    check_invariants(store)


# --- list_artifacts --------------------------------------------------------------------------

async def test_list_artifacts_lists_artifacts_only_in_byte_order(store: ArtifactStore) -> None:
    for key in ("b", "a/z", "a-b", "a.b", "A", "a/b/c", "_x"):
        await put(store, key, key.encode())
    store.mkdir(1, "emptydir", 0o755, 0, 0)
    await store.create_upload_session("zz-pending", "text/plain", 4)
    keys = [a["key"] for a in (await store.list_artifacts()).data]
    assert keys == sorted(["b", "a/z", "a-b", "a.b", "A", "a/b/c", "_x"], key=str.encode)
    page = await store.list_artifacts(start_index=2, limit=3)
    assert [a["key"] for a in page.data] == keys[2:5] and page.has_more
    last = await store.list_artifacts(start_index=5, limit=2)
    assert [a["key"] for a in last.data] == keys[5:] and not last.has_more
    assert (await store.list_artifacts(start_index=7)).data == []
    assert (await store.list_artifacts(start_index=100)).has_more is False
    zero = await store.list_artifacts(limit=0)
    assert zero.data == [] and zero.has_more
    pre = await store.list_artifacts(prefix="a/")
    assert [a["key"] for a in pre.data] == ["a/b/c", "a/z"]
    assert set(pre.data[0]) >= {"key", "mime_type", "uri", "size", "created_at", "sha256"}


@pytest.mark.parametrize(("start", "limit"), [
    (-1, 10), (0, -1), ("1", 10), (0, 1.5), (True, 1), (2**63, 1),
])
async def test_list_artifacts_refuses_bad_paging(
    store: ArtifactStore, start: object, limit: object
) -> None:
    await seeded(store)
    with pytest.raises(InvalidArgument):
        await store.list_artifacts(start, limit)  # type: ignore[arg-type]


async def test_list_artifacts_clamps_huge_limits(store: ArtifactStore) -> None:
    await seeded(store)
    page = await store.list_artifacts(0, 2**70)
    assert len(page.data) == 2 and not page.has_more


async def test_list_artifacts_refuses_impossible_prefixes(store: ArtifactStore) -> None:
    with pytest.raises(InvalidKey):
        await store.list_artifacts(prefix="a b")


async def test_paging_sees_changes_between_pages(store: ArtifactStore) -> None:
    """The cursor cache must not serve a stale position once keys were added or removed."""
    for i in range(10):
        await put(store, f"k{i}", b"x")
    first = await store.list_artifacts(start_index=0, limit=5)
    assert [a["key"] for a in first.data] == [f"k{i}" for i in range(5)]
    await store.delete_artifact("k0")
    second = await store.list_artifacts(start_index=5, limit=5)
    assert [a["key"] for a in second.data] == [f"k{i}" for i in range(6, 10)]
    await put(store, "a", b"x")
    await put(store, "k3", b"replaced")  # a replace keeps the key set
    third = await store.list_artifacts(start_index=5, limit=5)
    assert [a["key"] for a in third.data] == [f"k{i}" for i in range(5, 10)]


# --- atomic replace and readers --------------------------------------------------------------

@pytest.mark.parametrize("sync", [False, True])
async def test_reader_keeps_the_old_version_after_replace_and_delete(
    tmp_path: Path, sync: bool
) -> None:
    async with open_store(tmp_path / "d", sync=sync) as store:
        old = os.urandom(200_000)
        await put(store, "ckpt", old)
        f1 = store.open_artifact("ckpt")
        head = f1.read(1000)
        new = os.urandom(150_000)
        art = await put(store, "ckpt", new, chunks=3)
        assert art.sha256 == sha(new) and read(store, "ckpt") == new
        f2 = store.open_artifact("ckpt")
        await store.delete_artifact("ckpt")
        store.flush()  # frees the unreferenced blobs: open readers must not notice
        assert head + f1.read() == old
        assert f2.read() == new
        f1.close()
        f2.close()
        with pytest.raises(NotFound):
            store.open_artifact("ckpt")
        check_invariants(store)
        assert list(store.data.iter_blob_ids()) == []


async def test_replace_keeps_created_at_fresh_and_mime_from_the_session(
    store: ArtifactStore,
) -> None:
    await put(store, "r", b"1", "text/plain")
    art = await put(store, "r", b"22", "application/json")
    assert (art.size, art.mime_type) == (2, "application/json")
    assert len((await store.list_artifacts()).data) == 1


# --- the lock --------------------------------------------------------------------------------

async def test_second_store_on_the_same_directory_is_locked(tmp_path: Path) -> None:
    async with open_store(tmp_path / "d") as store:
        await put(store, "k", b"v")
        with pytest.raises(StoreLocked, match="in use by another artifactfs process") as info:
            async with open_store(tmp_path / "d"):
                pass
        assert str(os.getpid()) in str(info.value)
        # The failed opener changed nothing and the owner still works.
        await put(store, "k2", b"v2")
        assert read(store, "k") == b"v"
    async with open_store(tmp_path / "d") as again:  # released on close
        assert read(again, "k2") == b"v2"


def _try_open(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    import trio

    async def main() -> None:
        try:
            async with open_store(path):
                queue.put("opened")
        except StoreLocked as exc:
            queue.put(f"locked: {exc}")

    trio.run(main)


async def test_second_process_gets_store_locked(tmp_path: Path) -> None:
    async with open_store(tmp_path / "d"):
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        p = ctx.Process(target=_try_open, args=(str(tmp_path / "d"), queue))
        p.start()
        p.join(60)
        assert queue.get(timeout=5).startswith("locked: data directory")
