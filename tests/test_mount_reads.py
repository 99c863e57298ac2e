"""Layer 6, a real mount: Python reading paths the way training jobs do."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from mountutil import Mount, assert_shared_writable_map_commits, mount_fixture, workdir_fixture

pytestmark = [pytest.mark.mount, pytest.mark.stock]

mount = mount_fixture()
workdir = workdir_fixture()

SIZE = 8 * (1 << 20) + 12345  # past several read-ahead windows, not page aligned


@pytest.fixture(scope="module")
def shards(mount: Mount, tmp_path_factory: pytest.TempPathFactory) -> dict[Path, bytes]:
    """A few committed artifacts, half written through the mount, half through HTTP."""
    d = mount.path / "shards"
    d.mkdir()
    out = {}
    rng = random.Random(7)
    for i in range(4):
        data = rng.randbytes(SIZE + i * 4099)
        p = d / f"shard-{i:04d}.bin"
        if i % 2:
            mount.put(f"shards/{p.name}", data)
        else:
            p.write_bytes(data)
        out[p] = data
    return out


def test_open_read_and_seek(shards: dict[Path, bytes]) -> None:
    for p, data in shards.items():
        with open(p, "rb") as f:
            assert f.read() == data
        with open(p, "rb") as f:
            for off in (0, 1, 4095, 4096, 131071, 1 << 20, len(data) - 3, len(data) + 10):
                f.seek(off)
                assert f.read(5000) == data[off:off + 5000]
            f.seek(-100, os.SEEK_END)
            assert f.read() == data[-100:]


def test_mmap_and_np_memmap(shards: dict[Path, bytes]) -> None:
    p, data = next(iter(shards.items()))
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert len(m) == len(data)
        assert m[:100] == data[:100]
        assert m[len(data) // 2:len(data) // 2 + 7777] == data[len(data) // 2:len(data) // 2 + 7777]
        assert hashlib.sha256(m).hexdigest() == hashlib.sha256(data).hexdigest()
    arr = np.memmap(p, dtype=np.uint8, mode="r")
    assert arr.shape == (len(data),)
    assert bytes(arr[1000:2000]) == data[1000:2000]
    assert int(arr.astype(np.uint64).sum()) == sum(data)
    del arr
    # A shared writable mapping of a file in the mount (np.memmap mode r+) also works.
    q = p.parent / "mapped_rw.bin"
    assert_shared_writable_map_commits(q)


def _read_ranges(args: tuple[str, int, int]) -> str:
    path, seed, count = args
    rng = random.Random(seed)
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for _ in range(count):
            off = rng.randrange(0, size)
            f.seek(off)
            h.update(f.read(rng.randrange(1, 300_000)))
    return h.hexdigest()


def _expected_ranges(data: bytes, seed: int, count: int) -> str:
    rng = random.Random(seed)
    h = hashlib.sha256()
    for _ in range(count):
        off = rng.randrange(0, len(data))
        h.update(data[off:off + rng.randrange(1, 300_000)])
    return h.hexdigest()


def test_many_threads_same_and_different_files(shards: dict[Path, bytes]) -> None:
    items = list(shards.items())
    jobs = [(os.fspath(items[i % len(items)][0]), i, 40) for i in range(16)]
    jobs += [(os.fspath(items[0][0]), 100 + i, 40) for i in range(8)]  # all on one file
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(_read_ranges, jobs))
    for (path, seed, count), digest in zip(jobs, got, strict=True):
        assert digest == _expected_ranges(shards[Path(path)], seed, count)


def test_many_processes_whole_files(shards: dict[Path, bytes]) -> None:
    paths = [os.fspath(p) for p in shards] * 2
    with ProcessPoolExecutor(4) as pool:
        got = list(pool.map(_sha256_file, paths))
    assert got == [hashlib.sha256(shards[Path(p)]).hexdigest() for p in paths]
    jobs = [(os.fspath(p), 7 + i, 30) for i, p in enumerate(list(shards) * 2)]
    with ProcessPoolExecutor(4) as pool:
        got = list(pool.map(_read_ranges, jobs))
    for (path, seed, count), digest in zip(jobs, got, strict=True):
        assert digest == _expected_ranges(shards[Path(path)], seed, count)


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_read_while_being_written_by_its_writer(workdir: Path) -> None:
    p = workdir / "growing.bin"
    with open(p, "w+b") as f:
        f.write(b"a" * 5000)
        f.flush()
        f.seek(0)
        assert f.read() == b"a" * 5000
        f.write(b"b" * 10)
        f.flush()
        with open(p, "rb") as other:
            assert other.read() == b"a" * 5000 + b"b" * 10
    assert p.read_bytes() == b"a" * 5000 + b"b" * 10


def _signed(file_no: int, size: int) -> bytes:
    """Bytes that say where they belong: each 8-byte word holds its file's number (top byte)
    and its own offset, so a reply carrying another file's bytes, another range's, or stale
    bytes of an earlier reply cannot compare equal."""
    words = np.arange(0, -(-size // 8) * 8, 8, dtype=np.uint64) | np.uint64(file_no << 56)
    return words.tobytes()[:size]


def _read_uncached(path: Path, data: bytes, seed: int, rounds: int) -> list[str]:
    """Reads that all reach the daemon: O_DIRECT (the kernel sends a READ of each read's own
    size, bypassing the mount's page cache) and buffered reads after dropping the mount's
    pages of the file. Returns a description of every read that came back wrong."""
    rng = random.Random(seed)
    bad = []
    buf = mmap.mmap(-1, 3 << 20)  # page aligned, for O_DIRECT
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        for _ in range(rounds):
            off = rng.choice([0, rng.randrange(len(data)), len(data) - rng.randrange(1, 5000)])
            size = rng.choice([4096, 131072, 1 << 20, 3 << 20, rng.randrange(1, 3 << 20)])
            view = memoryview(buf)[:size]
            n = os.preadv(fd, [view], off)
            if view[:n] != data[off:off + size]:
                bad.append(f"O_DIRECT {path.name} [{off}:+{size}] got {n} bytes")
            view.release()
    finally:
        os.close(fd)
        buf.close()
    with open(path, "rb", buffering=0) as f:
        for _ in range(max(1, rounds // 8)):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.seek(0)
            if f.read() != data:
                bad.append(f"buffered {path.name}: whole file differs")
    return bad


def test_concurrent_daemon_served_reads_of_different_files_are_never_mixed(
        workdir: Path) -> None:
    """Eight readers of eight files at once, every read served by the daemon (large READs
    come from a mapping of the file, small ones from a copy: reading.py), two of the files
    still open for writing (read from their staging files). A reply mixed with another
    file's or another read's bytes fails the comparison."""
    files = {}
    writers = []
    for i in range(8):
        data = _signed(i, (5 << 20) + 4099 * i + 123)
        p = workdir / f"signed-{i}.bin"
        if i < 6:
            p.write_bytes(data)
        else:
            f = open(p, "wb")  # noqa: SIM115 (held open for the whole test)
            f.write(data)
            f.flush()
            writers.append(f)
        files[p] = data
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda item: _read_uncached(item[1][0], item[1][1],
                                                                item[0], 48),
                                    enumerate(files.items())))
    finally:
        for f in writers:
            f.close()
    assert [b for r in results for b in r] == []
