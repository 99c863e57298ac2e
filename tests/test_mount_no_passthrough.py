"""Layer 6, a real mount with ``--no-passthrough``: the daemon serves every read, through the
kernel's page cache (``keep_cache``), and writes go through the kernel's writeback cache.

Passthrough is the mount's default, so the other mount tests run with it where the kernel
allows it (``ARTIFACTFS_TEST_MOUNT_OPTS=--no-passthrough ./scripts/test`` runs them all in this
mode). This module keeps, in every run, what works differently here: who serves the reads, the
log line, and the rules whose mechanism differs in this mode. A reader keeping the version it
opened under an in-place rewrite or a truncate rests here on the kernel's page cache of the old
inode (and on the daemon's fd on the old blob when those pages are dropped), not on a backing
file; appends and shared writable maps go through the writeback cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

import pytest
from mountutil import (
    Mount,
    assert_a_truncate_leaves_a_reader_its_version,
    assert_appends_and_shared_maps_commit,
    mount_fixture,
    workdir_fixture,
)

pytestmark = [pytest.mark.mount, pytest.mark.stock]

mount = mount_fixture("--no-passthrough")
workdir = workdir_fixture()


def daemon_wchar(mount: Mount) -> int:
    with open(f"/proc/{mount.proc.pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def daemon_read(fd: int, size: int) -> bytes:
    """The bytes of an open file as the daemon serves them: the mount's pages dropped."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return os.pread(fd, size, 0)


def test_the_mount_says_passthrough_is_off(mount: Mount) -> None:
    assert "passthrough off (--no-passthrough)" in mount.log()
    assert "passthrough on" not in mount.log()


def test_reads_are_served_by_the_daemon(workdir: Path, mount: Mount) -> None:
    p = workdir / "big.bin"
    data = os.urandom(4 << 20)
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        before = daemon_wchar(mount)
        assert daemon_read(fd, len(data)) == data
        assert daemon_wchar(mount) - before >= len(data)  # READ replies, written by the daemon
    finally:
        os.close(fd)


def test_a_reader_keeps_its_version_of_a_file_rewritten_in_place(workdir: Path,
                                                                  mount: Mount) -> None:
    p = workdir / "ckpt.bin"
    old = os.urandom(1 << 20)
    p.write_bytes(old)
    early = os.open(p, os.O_RDONLY)
    try:
        assert os.pread(early, 1000, 0) == old[:1000]
        with open(p, "r+b") as w:
            w.write(b"NEW!")
            w.flush()
            during = os.open(p, os.O_RDONLY)
            try:
                assert daemon_read(during, 8) == b"NEW!" + old[4:8]  # the writer's bytes
            finally:
                os.close(during)
            assert os.pread(early, 8, 0) == old[:8]
        new = b"NEW!" + old[4:]
        assert p.read_bytes() == new
        assert mount.get(f"{workdir.name}/ckpt.bin").json()["sha256"] == (
            hashlib.sha256(new).hexdigest())
        assert os.pread(early, len(old), 0) == old  # from the old inode's pages
        assert daemon_read(early, len(old)) == old  # and from the daemon: the old blob
        assert os.fstat(early).st_nlink == 0
    finally:
        os.close(early)


def test_a_truncate_under_a_reader(workdir: Path) -> None:
    def from_the_daemon(reader: BinaryIO, old: bytes) -> None:
        assert daemon_read(reader.fileno(), len(old)) == old

    assert_a_truncate_leaves_a_reader_its_version(workdir / "cut.bin", also=from_the_daemon)


def test_writes_through_the_writeback_cache(workdir: Path, mount: Mount) -> None:
    assert_appends_and_shared_maps_commit(workdir, mount)
