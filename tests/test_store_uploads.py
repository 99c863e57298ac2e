"""Store layer, resumable uploads: chunks, retries, restarts, expiry and interrupted requests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from storeutil import check_invariants, fsck_clean, put, read, sha, snapshot

from artifactfs import Conflict, InvalidArgument, NotFound, open_store
from artifactfs.store import ArtifactStore


def expire(store: ArtifactStore, session_id: str) -> None:
    """Let a session's time run out without waiting for it."""
    store.meta.conn.execute("UPDATE sessions SET expires_at = 1 WHERE id = ?", (session_id,))


async def test_many_chunks_with_a_repeated_chunk_refused_by_offset(tmp_path: Path) -> None:
    content = os.urandom(64 * 1024 + 17)
    async with open_store(tmp_path / "d") as store:
        s = await store.create_upload_session("big/blob.bin", "application/octet-stream",
                                              len(content))
        step = 4096
        pos = 0
        while pos < len(content):
            chunk = content[pos:pos + step]
            result = await store.upload_content_to_session(s.id, chunk, pos)
            if pos:
                # The client retries the previous chunk (its ack was lost): refused, not
                # appended twice, and the conflict tells where to resume.
                prev = content[pos - step:pos]
                if result is None:
                    with pytest.raises(Conflict) as info:
                        await store.upload_content_to_session(s.id, prev, pos - step)
                    assert info.value.offset == pos + len(chunk)
            pos += len(chunk)
        assert result is not None and result.sha256 == sha(content)
        assert read(store, "big/blob.bin") == content
        check_invariants(store)


async def test_session_resumes_after_the_store_is_closed_and_reopened(tmp_path: Path) -> None:
    content = os.urandom(10_000)
    async with open_store(tmp_path / "d") as store:
        s = await store.create_upload_session("r/k", "text/plain", 10_000)
        await store.upload_content_to_session(s.id, content[:4000])
    async with open_store(tmp_path / "d") as store:
        info = await store.get_upload_session_info(s.id)
        assert (info.offset, info.size) == (4000, 10_000)
        with pytest.raises(Conflict):
            await store.upload_content_to_session(s.id, content[:4000], 0)
        await store.upload_content_to_session(s.id, content[4000:7000], info.offset)
    async with open_store(tmp_path / "d") as store:
        art = await store.upload_content_to_session(s.id, content[7000:], 7000)
        assert art is not None and art.sha256 == sha(content)
        assert read(store, "r/k") == content
        check_invariants(store)


async def test_torn_tail_of_a_crashed_request_is_dropped(tmp_path: Path) -> None:
    async with open_store(tmp_path / "d") as store:
        s = await store.create_upload_session("k", "text/plain", 8)
        await store.upload_content_to_session(s.id, b"abcd")
        staging = store.data.staging_path(s.id)
    with open(staging, "ab") as f:  # a request that died before its offset was recorded
        f.write(b"XYZ")
    async with open_store(tmp_path / "d") as store:
        assert (await store.get_upload_session_info(s.id)).offset == 4
        art = await store.upload_content_to_session(s.id, b"efgh", 4)
        assert art is not None and read(store, "k") == b"abcdefgh"


async def test_acknowledged_bytes_lost_in_a_power_cut_resume_from_what_survived(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path / "d") as store:
        s = await store.create_upload_session("k", "text/plain", 8)
        await store.upload_content_to_session(s.id, b"abcdef")
        staging = store.data.staging_path(s.id)
    os.truncate(staging, 2)
    async with open_store(tmp_path / "d") as store:
        assert (await store.get_upload_session_info(s.id)).offset == 2
        with pytest.raises(Conflict) as info:
            await store.upload_content_to_session(s.id, b"gh", 6)
        assert info.value.offset == 2
        art = await store.upload_content_to_session(s.id, b"cdefgh", 2)
        assert art is not None and read(store, "k") == b"abcdefgh"


async def test_complete_upload_whose_commit_was_interrupted_commits_at_open(
    tmp_path: Path,
) -> None:
    async with open_store(tmp_path / "d") as store:
        s = await store.create_upload_session("done/k", "text/plain", 4)
        await store.upload_content_to_session(s.id, b"ab")
        with open(store.data.staging_path(s.id), "ab") as f:
            f.write(b"cd")
        store.meta.set_session_offset(s.id, 4)  # the crash came right after this
    async with open_store(tmp_path / "d") as store:
        assert read(store, "done/k") == b"abcd"
        with pytest.raises(NotFound):
            await store.get_upload_session_info(s.id)
        check_invariants(store)


async def test_size_zero_session_survives_a_restart_and_commits(tmp_path: Path) -> None:
    async with open_store(tmp_path / "d") as store:
        s = await store.create_upload_session("zero", "text/plain", 0)
        assert (await store.get_upload_session_info(s.id)).size == 0
    async with open_store(tmp_path / "d") as store:
        art = await store.upload_content_to_session(s.id, b"", 0)
        assert art is not None and art.size == 0
        assert read(store, "zero") == b""


async def test_a_whole_upload_in_one_call_needs_no_staging_file(tmp_path: Path) -> None:
    """A session's staging file is made by its first bytes; one call bringing them all
    writes the blob directly. A session that received nothing has no file, survives a
    restart and fsck as it is, and takes its bytes later."""
    content = os.urandom(3000)
    async with open_store(tmp_path / "d") as store:
        s = await store.create_upload_session("whole/a.bin", "application/x-a", len(content))
        later = await store.create_upload_session("whole/later.bin", "text/plain", 5)
        assert list(store.data.iter_staging_ids()) == []
        art = await store.upload_content_to_session(s.id, content, 0)
        assert art is not None and (art.size, art.sha256) == (len(content), sha(content))
        assert art.mime_type == "application/x-a"
        assert list(store.data.iter_staging_ids()) == []
        with pytest.raises(NotFound):
            await store.get_upload_session_info(s.id)
    fsck_clean(tmp_path / "d")
    async with open_store(tmp_path / "d") as store:
        assert read(store, "whole/a.bin") == content
        assert (await store.get_upload_session_info(later.id)).offset == 0
        assert await store.upload_content_to_session(later.id, b"ab", 0) is None
        assert list(store.data.iter_staging_ids()) == [later.id]  # made by its first bytes
        assert await store.upload_content_to_session(later.id, b"cde", 2) is not None
        assert read(store, "whole/later.bin") == b"abcde"
        check_invariants(store)


async def test_a_whole_upload_whose_commit_fails_can_be_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with open_store(tmp_path / "d") as store:
        s = await store.create_upload_session("again/a.bin", "text/plain", 4)

        def broken(*args: object, **kwargs: object) -> None:
            raise OSError(5, "Input/output error")

        with monkeypatch.context() as m:
            m.setattr(store, "_install", broken)
            with pytest.raises(OSError):
                await store.upload_content_to_session(s.id, b"abcd", 0)
        assert list(store.data.iter_blob_ids()) == []  # the new blob went with the failure
        assert (await store.get_upload_session_info(s.id)).offset == 0
        with pytest.raises(InvalidArgument):
            await store.upload_content_to_session(s.id, "abcd", 0)  # type: ignore[arg-type]
        assert await store.upload_content_to_session(s.id, b"abcd", 0) is not None
        assert read(store, "again/a.bin") == b"abcd"
        check_invariants(store)


async def test_a_body_shorter_than_its_stated_length_does_not_commit(tmp_path: Path) -> None:
    """upload_stream trusts the bytes, not ``length``: 3 bytes said to be 5 leave the
    session at offset 3, as any short body does."""
    async with open_store(tmp_path / "d") as store:
        s = await store.create_upload_session("short/a", "text/plain", 5)
        assert await store.upload_stream(s.id, [b"abc"], length=5) is None
        assert (await store.get_upload_session_info(s.id)).offset == 3
        assert await store.upload_content_to_session(s.id, b"de", 3) is not None
        assert read(store, "short/a") == b"abcde"


async def test_expired_sessions_are_refused_and_swept_with_their_bytes(tmp_path: Path) -> None:
    async with open_store(tmp_path / "d") as store:
        await put(store, "keep", b"kept")
        a = await store.create_upload_session("a", "text/plain", 10)
        b = await store.create_upload_session("b", "text/plain", 10)
        c = await store.create_upload_session("c", "text/plain", 10)
        live = await store.create_upload_session("live", "text/plain", 10)
        for s in (a, b, c, live):
            await store.upload_content_to_session(s.id, b"12345")
        for s in (a, b, c):
            expire(store, s.id)
        # Touching an expired session removes it and says so.
        with pytest.raises(NotFound, match="expired"):
            await store.upload_content_to_session(a.id, b"67890", 5)
        assert not store.data.staging_path(a.id).exists()
        with pytest.raises(NotFound):
            await store.get_upload_session_info(a.id)
        # The sweeper removes the others.
        assert store.sweep_expired() == 2
        for s in (b, c):
            assert not store.data.staging_path(s.id).exists()
            with pytest.raises(NotFound):
                await store.get_upload_session_info(s.id)
        assert (await store.get_upload_session_info(live.id)).offset == 5
        assert sorted(store.data.iter_staging_ids()) == [live.id]
        expire(store, live.id)
    # Start-up removes what expired while the store was closed.
    async with open_store(tmp_path / "d") as store:
        with pytest.raises(NotFound):
            await store.get_upload_session_info(live.id)
        assert list(store.data.iter_staging_ids()) == []
        assert read(store, "keep") == b"kept"
        check_invariants(store)


async def test_session_ttl_is_configurable(tmp_path: Path) -> None:
    async with open_store(tmp_path / "d", session_ttl=0) as store:
        s = await store.create_upload_session("k", "text/plain", 1)
        with pytest.raises(NotFound, match="expired"):
            await store.upload_content_to_session(s.id, b"x")
    async with open_store(tmp_path / "d", session_ttl=7200) as store:
        s = await store.create_upload_session("k", "text/plain", 1)
        row = store.meta.session(s.id)
        assert row is not None and row.expires_at is not None
        assert row.expires_at - row.created_at == 7200


async def test_background_sweeper_removes_expired_sessions(tmp_path: Path) -> None:
    async with open_store(tmp_path / "d", flush_interval=0.01) as store:
        s = await store.create_upload_session("k", "text/plain", 10)
        expire(store, s.id)
        with trio.fail_after(10):
            while store.meta.session(s.id) is not None:
                await trio.sleep(0.01)
        assert not store.data.staging_path(s.id).exists()


async def test_a_second_concurrent_request_to_one_session_is_a_conflict(
    store_dir: Path,
) -> None:
    async with open_store(store_dir) as store:
        s = await store.create_upload_session("k", "text/plain", 6)
        gate = trio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield b"abc"
            await gate.wait()
            yield b"def"

        async with trio.open_nursery() as nursery:
            results: list[object] = []

            async def first() -> None:
                results.append(await store.upload_stream(s.id, slow_body()))

            nursery.start_soon(first)
            await trio.sleep(0.05)
            before = snapshot(store)
            with pytest.raises(Conflict, match="in progress"):
                await store.upload_content_to_session(s.id, b"xyz")
            assert snapshot(store) == before
            gate.set()
        assert results[0] is not None and read(store, "k") == b"abcdef"


async def test_a_client_that_goes_away_keeps_what_arrived(store_dir: Path) -> None:
    async with open_store(store_dir) as store:
        s = await store.create_upload_session("k", "text/plain", 9)

        async def dying_body() -> AsyncIterator[bytes]:
            yield b"abc"
            yield b"def"
            await trio.sleep_forever()

        with trio.move_on_after(0.1):
            await store.upload_stream(s.id, dying_body())
        assert (await store.get_upload_session_info(s.id)).offset == 6
        art = await store.upload_content_to_session(s.id, b"ghi", 6)
        assert art is not None and read(store, "k") == b"abcdefghi"


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.mark.parametrize("chunks", [1, 3])
async def test_uploads_past_the_inline_size_hash_right(tmp_path: Path, chunks: int) -> None:
    """Small sessions are hashed as the bytes go by; bigger ones from the staging file in a
    worker thread at commit. Both must give the content's digest."""
    content = os.urandom((4 << 20) + 12345)
    async with open_store(tmp_path / "d") as store:
        art = await put(store, "big", content, chunks=chunks)
        assert art.sha256 == sha(content) and art.size == len(content)
        assert read(store, "big") == content
        check_invariants(store)
