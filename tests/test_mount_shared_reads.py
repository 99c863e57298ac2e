"""Layer 6, a real mount: read-only opens answered in C by the patched pyfuse3.

The mount shares one read handle per inode among its readers and lets pyfuse3 answer their
OPEN and RELEASE without Python (fs/shared_reads.py). These tests show it in use (pyfuse3's
counter, logged at unmount, and the daemon's fds: many readers, one fd) and never where it
must not be: after another face replaced the name, while the file is open for writing through
the mount, after a truncate or an unlink; and that its fds do not pile up.

Reads are made to reach the daemon (POSIX_FADV_DONTNEED drops the mount's clean pages), so
that the bytes checked are those of the handle the open got, not the kernel's cache (with
passthrough, the default, they are read from the backing file the open got instead). The module
runs on the default mount; ``ARTIFACTFS_TEST_MOUNT_OPTS=--no-passthrough`` runs it without.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from mountutil import Mount, mount_fixture, mounted, workdir_fixture

from artifactfs.fs.shared_reads import AVAILABLE, IDLE_MAX_ENV

pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(not AVAILABLE and not os.environ.get("CI"),
                                 reason="pyfuse3 without the patch of scripts/setup")]

mount = mount_fixture()
workdir = workdir_fixture()


def blob_fds(m: Mount) -> int:
    """How many fds the daemon holds on committed blobs (shared handles among them)."""
    blobs = os.path.realpath(m.data_dir / "blobs") + "/"
    count = 0
    fd_dir = f"/proc/{m.proc.pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except FileNotFoundError:
            continue
        count += target.startswith(blobs)
    return count


def barrier(m: Mount) -> None:
    """A request that reaches the daemon (an OPENDIR): it reads requests in order, so the
    RELEASEs queued before it (the kernel sends them after close(2) returns) are done."""
    os.listdir(m.path)


def daemon_read(fd: int, size: int = 1 << 20) -> bytes:
    """The bytes of an open file as the daemon serves them: the mount's pages dropped."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return os.pread(fd, size, 0)


def test_read_only_opens_are_answered_by_pyfuse3_with_one_fd(tmp_path: Path) -> None:
    data = os.urandom(4096)
    with mounted(tmp_path) as m:
        p = m.path / "small.bin"
        p.write_bytes(data)
        for _ in range(3):  # the first open through Python shares the handle
            assert p.read_bytes() == data
        assert blob_fds(m) == 1
        for _ in range(100):
            assert p.read_bytes() == data
        held = [os.open(p, os.O_RDONLY) for _ in range(20)]
        try:
            assert blob_fds(m) == 1  # twenty open files, one shared handle
            assert all(daemon_read(fd) == data for fd in held)
        finally:
            for fd in held:
                os.close(fd)
        assert blob_fds(m) == 1  # idle, kept for the next reader
    answered = re.search(r"shared read handles: (\d+) opens and (\d+) releases", m.log())
    assert answered, m.log()[-2000:]
    assert int(answered.group(1)) >= 120 and int(answered.group(2)) >= 120


def test_open_after_another_face_replaced_the_name_reads_the_new_bytes(
        workdir: Path, mount: Mount) -> None:
    key = f"{workdir.name}/weights.bin"
    p = mount.path / key
    first = b"v0" * 3000
    mount.put(key, first)
    for _ in range(3):
        assert p.read_bytes() == first
    held = os.open(p, os.O_RDONLY)
    try:
        for i in range(1, 6):
            data = f"v{i}".encode() * (3000 + 7 * i)  # a new size each time
            mount.put(key, data)
            # At once, not eventually: an open that starts after the change reaches the new
            # version (replaced.py), so the old inode's shared handle must be gone already.
            assert p.read_bytes() == data
            assert p.read_bytes() == data
            with open(p, "rb", buffering=0) as f:
                assert daemon_read(f.fileno()) == data
        # The fd opened before every replacement keeps its bytes, as on a disk.
        assert daemon_read(held) == first
        assert os.fstat(held).st_size == len(first)
    finally:
        os.close(held)


def test_reader_of_a_file_open_for_writing_reads_the_writers_bytes(
        workdir: Path, mount: Mount) -> None:
    p = workdir / "rewritten.bin"
    p.write_bytes(b"a" * 8192)
    for _ in range(3):
        assert p.read_bytes() == b"a" * 8192
    before = os.open(p, os.O_RDONLY)  # holds the shared handle
    expected = b"B" * 4096 + b"a" * 4096
    try:
        with open(p, "r+b", buffering=0) as w:
            w.write(b"B" * 4096)
            os.fsync(w.fileno())  # the writer's pages reach the daemon and become clean
            during = os.open(p, os.O_RDONLY)
            try:
                assert daemon_read(during) == expected
                assert daemon_read(before) == b"a" * 8192  # the version it opened
                assert p.read_bytes() == expected
            finally:
                os.close(during)
        # Committed at close: new readers read the new version, the early one its own.
        assert p.read_bytes() == expected
        assert daemon_read(before) == b"a" * 8192
        with open(p, "rb", buffering=0) as f:
            assert daemon_read(f.fileno()) == expected
    finally:
        os.close(before)


def test_open_after_a_truncate_reads_the_new_version(workdir: Path, mount: Mount) -> None:
    p = workdir / "truncated.bin"
    p.write_bytes(b"X" * 8192)
    for _ in range(3):
        assert p.read_bytes() == b"X" * 8192
    os.truncate(p, 0)
    os.truncate(p, 8192)  # same size, other bytes: only a new handle reads them
    with open(p, "rb", buffering=0) as f:
        assert daemon_read(f.fileno()) == bytes(8192)
    assert p.read_bytes() == bytes(8192)


def test_unlink_while_open_keeps_the_bytes_and_frees_the_fd(
        workdir: Path, mount: Mount) -> None:
    data = os.urandom(10_000)
    p = workdir / "gone.bin"
    p.write_bytes(data)
    for _ in range(3):
        assert p.read_bytes() == data
    baseline = blob_fds(mount)
    fd = os.open(p, os.O_RDONLY)
    try:
        p.unlink()
        assert not p.exists()
        assert daemon_read(fd) == data
        assert os.fstat(fd).st_nlink == 0
        assert blob_fds(mount) == baseline  # still the one shared handle, unshared now
    finally:
        os.close(fd)
    # Its last RELEASE closed the handle.
    barrier(mount)
    assert blob_fds(mount) == baseline - 1


def test_many_files_read_and_removed_leave_no_fds(workdir: Path, mount: Mount) -> None:
    baseline = blob_fds(mount)
    paths = [workdir / f"f{i:03d}" for i in range(300)]
    for i, p in enumerate(paths):
        p.write_bytes(b"%d" % i)
    for _ in range(3):
        for i, p in enumerate(paths):
            assert p.read_bytes() == b"%d" % i
    assert baseline < blob_fds(mount) <= baseline + 300
    for p in paths:
        p.unlink()
    barrier(mount)
    assert blob_fds(mount) == baseline


def test_idle_shared_handles_are_bounded(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IDLE_MAX_ENV, "20")
    with mounted(tmp_path) as m:
        paths = [m.path / f"f{i:03d}" for i in range(200)]
        for i, p in enumerate(paths):
            p.write_bytes(b"%d" % i)
        for _ in range(2):
            for i, p in enumerate(paths):
                assert p.read_bytes() == b"%d" % i
                assert blob_fds(m) <= 22  # 20, one over until the next share, one open
        assert blob_fds(m) >= 10  # kept, up to the bound
