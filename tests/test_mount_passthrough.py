"""Layer 6, a real mount with passthrough (the default; ``--passthrough`` here, so that
``ARTIFACTFS_TEST_MOUNT_OPTS=--no-passthrough`` leaves this module as it is): the kernel reads
committed artifacts from their blobs (artifactfs/fs/passthrough.py), and what the mount promises
still holds.

The observable: a READ the daemon answers is written by the daemon to /dev/fuse, so it counts in
the daemon's ``wchar`` (/proc/PID/io); a read the kernel passes through to the blob does not.
Each test that checks the absence of that traffic also makes the daemon serve the same bytes
(O_DIRECT, which passthrough leaves to the daemon) and sees them counted, so it cannot pass by
measuring nothing. Where the kernel cannot offer passthrough (Linux < 6.9, not root), the mount
logs why and serves reads as without the option; the tests then check that instead.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mountutil import (
    Mount,
    assert_a_truncate_leaves_a_reader_its_version,
    assert_appends_and_shared_maps_commit,
    mounted,
    workdir_fixture,
)

pytestmark = pytest.mark.mount

SIZE = 16 << 20


def passthrough_expected() -> bool:
    """Root on Linux >= 6.9 (CONFIG_FUSE_PASSTHROUGH, as Debian's kernels and this one have)."""
    release = os.uname().release.split("-")[0].split(".")
    return os.geteuid() == 0 and (int(release[0]), int(release[1])) >= (6, 9)


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("passthrough"), "--passthrough") as m:
        yield m


workdir = workdir_fixture()


def daemon_wchar(mount: Mount) -> int:
    with open(f"/proc/{mount.proc.pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def served_by_daemon(mount: Mount, read: object) -> int:
    """Bytes the daemon wrote (READ replies, mostly) while ``read()`` ran."""
    before = daemon_wchar(mount)
    read()  # type: ignore[operator]
    return daemon_wchar(mount) - before


def read_direct(path: Path) -> bytes:
    """The whole file with O_DIRECT: the daemon serves it, passthrough or not."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    out = bytearray()
    try:
        while n := os.readv(fd, [buf]):
            out += buf[:n]
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def assert_read_through(mount: Mount, path: Path, data: bytes) -> None:
    """Reading ``path`` whole gives ``data`` without the daemon (with passthrough) or through
    it (without), and the daemon's traffic is seen when it serves the same bytes."""
    got: list[bytes] = []
    passed = served_by_daemon(mount, lambda: got.append(path.read_bytes()))
    assert got == [data]
    direct = served_by_daemon(mount, lambda: got.append(read_direct(path)))
    assert got[1] == data
    assert direct >= len(data)  # the observable sees a daemon-served read
    if passthrough_expected():
        assert passed < len(data) // 8, f"{passed} bytes through the daemon"
    else:
        assert passed >= len(data)


def test_the_mount_says_whether_passthrough_is_on(mount: Mount) -> None:
    if passthrough_expected():
        assert "passthrough on" in mount.log()
    else:
        assert "passthrough unavailable" in mount.log()


def test_reads_and_maps_of_a_committed_file_skip_the_daemon(workdir: Path, mount: Mount) -> None:
    data = os.urandom(SIZE + 4099)
    key = f"{workdir.name}/weights.bin"
    mount.put(key, data)  # committed behind the mount's back: nothing of it cached
    p = mount.path / key
    assert_read_through(mount, p, data)
    q = workdir / "through-mount.bin"
    q.write_bytes(data[::-1])  # written through the mount (served by the daemon), then read
    assert_read_through(mount, q, data[::-1])

    def mapped() -> None:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert hashlib.sha256(m).digest() == hashlib.sha256(data).digest()
        arr = np.memmap(p, dtype=np.uint8, mode="r")
        assert bytes(arr[SIZE - 10:SIZE + 10]) == data[SIZE - 10:SIZE + 10]
        del arr

    served = served_by_daemon(mount, mapped)
    if passthrough_expected():
        assert served < SIZE // 8


def test_many_readers_of_one_file_share_its_backing_file(workdir: Path) -> None:
    p = workdir / "shared.bin"
    data = os.urandom(3 << 20)
    p.write_bytes(data)
    files = [open(p, "rb") for _ in range(6)]  # noqa: SIM115 (closed below)
    try:
        for i, f in enumerate(files):
            f.seek(i * 4096)
            assert f.read(100_000) == data[i * 4096:i * 4096 + 100_000]
        code = "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())"
        out = subprocess.run([sys.executable, "-c", code, os.fspath(p)], capture_output=True,
                             check=True).stdout
        assert out == data
    finally:
        for f in files:
            f.close()
    assert p.read_bytes() == data  # the last close freed the backing id; a new one works


def test_a_reader_opened_while_a_file_is_written_reads_the_writers_bytes(
        workdir: Path, mount: Mount) -> None:
    p = workdir / "growing.bin"
    p.write_bytes(b"old" * 1000)
    with open(p, "r+b") as w:
        w.write(b"a" * 5000)
        w.flush()
        with open(p, "rb") as r:
            assert r.read() == b"a" * 5000
            w.write(b"b" * 10)
            w.flush()
            r.seek(0)
            assert r.read() == b"a" * 5000 + b"b" * 10  # one inode: the writer's bytes
    new = b"a" * 5000 + b"b" * 10
    assert p.read_bytes() == new
    assert mount.get(f"{workdir.name}/growing.bin").json()["size"] == len(new)
    big = os.urandom(SIZE)
    p.write_bytes(big)  # nothing open any more: the next reader goes through again
    assert_read_through(mount, p, big)


def test_an_in_place_rewrite_under_a_reader_that_reads_through(workdir: Path,
                                                                mount: Mount) -> None:
    """The rule of this mode (passthrough.py): readers that opened before an in-place writer
    keep the version they opened, as after a rename over the file; opens made during the
    write read the writer's bytes, opens after its commit the new version."""
    p = workdir / "ckpt.bin"
    old = os.urandom(1 << 20)
    p.write_bytes(old)
    with open(p, "rb") as early:
        assert early.read(1000) == old[:1000]
        with open(p, "r+b") as w:
            w.write(b"NEW!")
            w.flush()
            with open(p, "rb") as during:
                assert during.read(8) == b"NEW!" + old[4:8]
            assert w.read(4) == old[4:8]  # the writer reads its own file
        assert p.read_bytes() == b"NEW!" + old[4:]  # after the commit: the new version
        got = mount.get(f"{workdir.name}/ckpt.bin").json()
        assert got["sha256"] == hashlib.sha256(b"NEW!" + old[4:]).hexdigest()
        early.seek(0)
        assert early.read() == old  # the version it opened, whole
    assert_read_through(mount, p, b"NEW!" + old[4:])  # all closed: passthrough again


def test_a_writers_shared_map_never_writes_into_the_readers_blob(workdir: Path,
                                                                 mount: Mount) -> None:
    """A passthrough open's mmap maps its backing file even with direct_io, writably if the
    open may write: a writer sharing the readers' backing file would write into their
    committed blob. Writers get an inode of their own instead."""
    p = workdir / "mapped.bin"
    old = os.urandom(8192)
    p.write_bytes(old)
    with open(p, "rb") as reader:
        assert reader.read(4) == old[:4]
        with open(p, "r+b") as w, mmap.mmap(w.fileno(), 8192) as m:
            m[0:4] = b"ZZZZ"
            m.flush()
        reader.seek(0)
        assert reader.read() == old  # its blob, untouched
    new = b"ZZZZ" + old[4:]
    assert p.read_bytes() == new
    got = mount.get(f"{workdir.name}/mapped.bin").json()
    assert got["sha256"] == hashlib.sha256(new).hexdigest()


def test_a_truncate_under_a_reader_that_reads_through(workdir: Path) -> None:
    assert_a_truncate_leaves_a_reader_its_version(workdir / "cut.bin")


def test_unaligned_o_direct_reads_are_served(workdir: Path) -> None:
    """O_DIRECT through a backing file would take the disk's alignment rules (EINVAL); the
    daemon serves O_DIRECT opens, alone or beside readers that read through."""
    p = workdir / "direct.bin"
    data = os.urandom(2 << 20)
    p.write_bytes(data)
    with open(p, "rb") as through:
        assert through.read(10) == data[:10]
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, 1000, 12345) == data[12345:13345]
        finally:
            os.close(fd)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.pread(fd, 777, 3) == data[3:780]
    finally:
        os.close(fd)


def test_writes_without_the_writeback_cache(workdir: Path, mount: Mount) -> None:
    """Passthrough turns the writeback cache off: appends, shared writable maps and the
    commit at close still work."""
    assert_appends_and_shared_maps_commit(workdir, mount)


def test_small_files_are_opened_in_c_and_read_through(tmp_path: Path) -> None:
    """Read-only opens of a shared inode are answered by pyfuse3 with the inode's backing id
    (shared_reads.py): counted at unmount, and their reads still skip the daemon; an O_DIRECT
    open among them is served by the daemon (direct_io), unaligned reads included."""
    data = os.urandom(SIZE)
    with mounted(tmp_path, "--passthrough") as m:
        p = m.path / "small.bin"
        p.write_bytes(data)
        for _ in range(3):  # the first open through Python shares the handle
            assert p.read_bytes() == data

        def reads() -> None:
            for _ in range(20):
                assert p.read_bytes() == data

        served = served_by_daemon(m, reads)
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(fd, 1000, 12345) == data[12345:13345]
        finally:
            os.close(fd)
        if passthrough_expected():
            assert served < SIZE // 8, f"{served} bytes through the daemon"
    answered = re.search(r"shared read handles: (\d+) opens and (\d+) releases", m.log())
    assert answered, m.log()[-2000:]
    if passthrough_expected():
        assert int(answered.group(1)) >= 20 and int(answered.group(2)) >= 20
