"""Store layer: the digest kept while a mount writer's bytes arrive must equal the file's.

Writes in order feed a running sha256 so the commit need not read the file again; any other
pattern (a gap, an overwrite, a truncate, a copy of the old version) must fall back to hashing
the whole file. Either way the recorded sha256 is that of the committed bytes.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from artifactfs import open_store
from artifactfs.store.schema import ROOT_ID

# Each step: ("w", offset, length) writes random bytes; ("t", size) truncates.
PATTERNS: dict[str, list[tuple[int, ...]]] = {
    "sequential": [("w", 0, 4096), ("w", 4096, 1 << 20), ("w", 4096 + (1 << 20), 7)],
    "gap": [("w", 0, 100), ("w", 200, 50)],
    "overwrite": [("w", 0, 1000), ("w", 10, 20)],
    "rewrite from zero": [("w", 0, 1000), ("t", 0), ("w", 0, 300)],
    "shrink": [("w", 0, 1000), ("t", 500)],
    "grow sparse": [("w", 0, 100), ("t", 5000)],
    "grow then write on": [("w", 0, 100), ("t", 200), ("w", 200, 10)],
    "out of order pages": [("w", 4096, 4096), ("w", 0, 4096)],
}

IN_ORDER = {"sequential", "rewrite from zero"}


def apply(store, ws, steps, rng: random.Random) -> bytearray:  # type: ignore[no-untyped-def]
    model = bytearray()
    for step in steps:
        if step[0] == "w":
            _, off, n = step
            data = rng.randbytes(n)
            store.write(ws, data, off)
            if len(model) < off:
                model.extend(bytes(off - len(model)))
            model[off:off + n] = data
        else:
            size = step[1]
            store._ftruncate(ws, size)
            del model[size:]
            model.extend(bytes(size - len(model)))
    return model


@pytest.mark.parametrize("name", sorted(PATTERNS))
async def test_recorded_digest_is_the_committed_bytes(tmp_path: Path, name: str) -> None:
    rng = random.Random(name)
    async with open_store(tmp_path / "data") as store:
        _, ws = store.create_file(ROOT_ID, "f.bin", 0o644, 0, 0)
        model = apply(store, ws, PATTERNS[name], rng)
        # In-order writes take the fast path (no second read); the rest must fall back.
        fast = ws.running_digest(len(model)) is not None
        assert fast == (name in IN_ORDER), name
        await store.release_write(ws)
        a = await store.get_artifact("f.bin")
        with store.open_artifact("f.bin") as f:
            assert f.read() == model
        assert (a.size, a.sha256) == (len(model), hashlib.sha256(model).hexdigest())


async def test_rewrite_of_a_committed_artifact_without_truncate(tmp_path: Path) -> None:
    """The session starts from a copy of the old bytes: appending must not hash only the
    appended part."""
    async with open_store(tmp_path / "data") as store:
        await store.put_artifact("log.txt", b"first line\n")
        e = store.lookup(ROOT_ID, "log.txt")
        ws = await store.open_write(e.id, truncate=False)
        store.write(ws, b"second line\n", 11)
        await store.release_write(ws)
        a = await store.get_artifact("log.txt")
        want = b"first line\nsecond line\n"
        assert (a.size, a.sha256) == (len(want), hashlib.sha256(want).hexdigest())


async def test_random_write_sequences(tmp_path: Path) -> None:
    rng = random.Random(7)
    async with open_store(tmp_path / "data") as store:
        for i in range(40):
            steps: list[tuple[int, ...]] = []
            end = 0
            for _ in range(rng.randrange(1, 8)):
                r = rng.random()
                if r < 0.6:  # mostly in order, as real writers are
                    n = rng.randrange(1, 9000)
                    steps.append(("w", end, n))
                    end += n
                elif r < 0.85:
                    off = rng.randrange(0, end + 100)
                    n = rng.randrange(1, 3000)
                    steps.append(("w", off, n))
                    end = max(end, off + n)
                else:
                    end = rng.randrange(0, end + 2000)
                    steps.append(("t", end))
            _, ws = store.create_file(ROOT_ID, f"f{i}", 0o644, 0, 0)
            model = apply(store, ws, steps, rng)
            await store.release_write(ws)
            a = await store.get_artifact(f"f{i}")
            assert (a.size, a.sha256) == (len(model), hashlib.sha256(model).hexdigest()), steps


async def test_writes_after_an_empty_commit_keep_the_running_digest(tmp_path: Path) -> None:
    """`dd of=F` opens F, dup2()s the descriptor and closes the first one, which commits F
    empty; its writes then start a new session from that empty artifact. Nothing was copied,
    so the running digest covers every byte and the commit need not read the file again."""
    async with open_store(tmp_path / "data") as store:
        e, ws = store.create_file(ROOT_ID, "dd.bin", 0o644, 0, 0)
        await store.release_write(ws)  # the close of the first descriptor
        ws = await store.open_write(e.id, truncate=False)
        data = random.Random(3).randbytes(3 << 20)
        for off in range(0, len(data), 1 << 20):
            store.write(ws, data[off:off + (1 << 20)], off)
        assert ws.running_digest(len(data)) is not None
        await store.release_write(ws)
        a = await store.get_artifact("dd.bin")
        assert (a.size, a.sha256) == (len(data), hashlib.sha256(data).hexdigest())
