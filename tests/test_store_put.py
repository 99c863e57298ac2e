"""Store layer: put_artifact, the one-step commit of content already in memory.

It must keep every rule of the session path (keys, mime types, clashes, atomic replace) and
leave nothing behind when it refuses.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
from storeutil import check_invariants, snapshot

from artifactfs import Conflict, InvalidArgument, InvalidKey, open_store


async def test_put_commits_an_artifact_every_face_sees(tmp_path: Path) -> None:
    async with open_store(tmp_path / "data") as store:
        a = await store.put_artifact("evals/run1/scores.json", b'{"acc": 0.9}',
                                     "application/json")
        assert a.size == 12
        assert a.sha256 == hashlib.sha256(b'{"acc": 0.9}').hexdigest()
        assert (await store.get_artifact("evals/run1/scores.json")) == a
        listed = (await store.list_artifacts(prefix="evals/")).data
        assert [d["key"] for d in listed] == ["evals/run1/scores.json"]
        with store.open_artifact("evals/run1/scores.json") as f:
            assert f.read() == b'{"acc": 0.9}'
        # The parents are real directories, as with an upload session.
        run1 = store.lookup(store.lookup(1, "evals").id, "run1")
        assert run1.is_dir
        check_invariants(store)


async def test_put_replaces_atomically_and_old_readers_keep_their_bytes(
        tmp_path: Path) -> None:
    async with open_store(tmp_path / "data") as store:
        await store.put_artifact("ckpt/model.bin", b"old" * 1000)
        with store.open_artifact("ckpt/model.bin") as old_reader:
            new = await store.put_artifact("ckpt/model.bin", b"new" * 2000)
            assert old_reader.read() == b"old" * 1000
        assert new.size == 6000
        with store.open_artifact("ckpt/model.bin") as f:
            assert f.read() == b"new" * 2000
    # Reopened: the replaced version's blob is gone, the new one reads back.
    async with open_store(tmp_path / "data") as store:
        with store.open_artifact("ckpt/model.bin") as f:
            assert hashlib.sha256(f.read()).hexdigest() == new.sha256
        check_invariants(store)


@pytest.mark.parametrize(
    ("key", "content", "mime", "error", "code"),
    [
        ("a//b", b"x", "text/plain", InvalidKey, errno.EINVAL),
        ("x" * 256, b"x", "text/plain", InvalidKey, errno.ENAMETOOLONG),
        ("ok", b"x", "not a mime", InvalidArgument, errno.EINVAL),
        ("ok", "a str, not bytes", "text/plain", InvalidArgument, errno.EINVAL),
        ("dir", b"x", "text/plain", Conflict, errno.EISDIR),
        ("file/below", b"x", "text/plain", Conflict, errno.ENOTDIR),
    ],
)
async def test_put_refuses_bad_input_and_changes_nothing(
        tmp_path: Path, key: str, content: bytes, mime: str, error: type[Exception],
        code: int) -> None:
    async with open_store(tmp_path / "data") as store:
        await store.put_artifact("dir/inside", b"1")
        await store.put_artifact("file", b"2")
        before = snapshot(store)
        with pytest.raises(error) as info:
            await store.put_artifact(key, content, mime)
        assert getattr(info.value, "errno", None) == code
        assert snapshot(store) == before
        blobs = [p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()]
        assert len(blobs) == 2, "a refused put left a blob behind"
        check_invariants(store)


async def test_put_of_a_large_artifact_hashes_off_the_loop(tmp_path: Path) -> None:
    content = os.urandom(6 << 20)  # past the inline-hash size
    async with open_store(tmp_path / "data") as store:
        a = await store.put_artifact("big.bin", content)
        assert a.sha256 == hashlib.sha256(content).hexdigest()
        with store.open_artifact("big.bin") as f:
            assert f.read() == content
