"""Layer 6, a real mount with ``--passthrough``: new files opened write-only are written by the
kernel into their staging files (artifactfs/fs/passthrough_writes.py), and every commit copies
the file and hashes the copy (artifactfs/store/snapshot.py).

The observable that the bytes skip the daemon: a write completes while the daemon is stopped
(SIGSTOP), which a write the daemon must answer cannot. Where the kernel cannot offer
passthrough (Linux < 6.9, not root) that test checks the fallback instead; every other test
holds either way.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import Mount, eventually, mounted, workdir_fixture
from test_mount_passthrough import passthrough_expected

pytestmark = pytest.mark.mount

BIG = 9 << 20  # above INLINE_IO_BYTES: the commit copies and hashes in a worker thread


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("ptwrites"), "--passthrough",
                 "--passthrough-writes") as m:
        yield m


workdir = workdir_fixture()


def key_of(mount: Mount, p: Path) -> str:
    return os.fspath(p.relative_to(mount.path))


def assert_artifact(mount: Mount, p: Path, data: bytes) -> None:
    """Right after close(2): the file, its digest and the HTTP face all hold ``data``."""
    sha = hashlib.sha256(data).hexdigest()
    info = mount.get(key_of(mount, p)).json()
    assert (info["size"], info["sha256"]) == (len(data), sha)
    assert os.getxattr(p, "user.sha256").decode() == sha
    with mount.http() as c:
        assert c.get(f"/v1/artifacts/{key_of(mount, p)}:content").content == data
    assert p.read_bytes() == data


def assert_no_staging(mount: Mount) -> None:
    assert os.listdir(mount.data_dir / "staging") == []


def daemon_rchar(mount: Mount) -> int:
    with open(f"/proc/{mount.proc.pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_a_new_file_is_written_without_the_daemon(workdir: Path, mount: Mount) -> None:
    data = os.urandom(BIG)
    p = workdir / "direct.bin"
    with open(p, "wb") as f:
        before = daemon_rchar(mount)
        f.write(data)
        f.flush()
        # A WRITE the daemon answers is read by it from /dev/fuse; the commit at close reads
        # the file (so this is counted before it).
        received = daemon_rchar(mount) - before
    if passthrough_expected():
        assert received < len(data) // 8, f"{received} bytes reached the daemon"
    else:
        assert received >= len(data)
    assert_artifact(mount, p, data)
    # The observable sees bytes a writer sends through the daemon (read-write: not passed
    # through).
    with open(workdir / "rw.bin", "w+b") as f:
        before = daemon_rchar(mount)
        f.write(data)
        f.flush()
        assert daemon_rchar(mount) - before >= len(data)


def test_cp_and_dd_conv_fsync(workdir: Path, mount: Mount, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = os.urandom(BIG + 12345)
    src.write_bytes(data)
    subprocess.run(["cp", src, workdir / "cp.bin"], check=True)
    assert_artifact(mount, workdir / "cp.bin", data)
    subprocess.run(["dd", f"if={src}", f"of={workdir / 'dd.bin'}", "bs=1M", "conv=fsync",
                    "status=none"], check=True)
    assert_artifact(mount, workdir / "dd.bin", data)
    # The same through the shell's redirection (open, dup2, close: a commit of nothing first).
    subprocess.run(f"cat {src} > {workdir / 'sh.bin'}", shell=True, check=True)
    assert_artifact(mount, workdir / "sh.bin", data)
    # Once released (after close(2) returns), nothing is left in staging.
    eventually(lambda: assert_no_staging(mount))


def test_a_write_after_fsync_then_close(workdir: Path, mount: Mount) -> None:
    a, b = os.urandom(BIG), os.urandom(1 << 20)
    p = workdir / "after_fsync.bin"
    with open(p, "wb") as f:
        f.write(a)
        f.flush()
        os.fsync(f.fileno())
        f.seek(4096)
        f.write(b)  # over bytes the fsync made durable
        f.write(b"tail")
    assert_artifact(mount, p, a[:4096] + b + b"tail" + a[4096 + len(b) + 4:])
    # The copy the fsync made for the commit went unused, and is gone.
    eventually(lambda: assert_no_staging(mount))


def test_a_committed_version_is_never_written_by_a_descriptor_left_open(
        workdir: Path, mount: Mount) -> None:
    """close(2) of one descriptor commits, while another descriptor of the same open file
    (dup, fork) writes on: the committed version keeps its bytes and digest, and the next
    close commits the rest."""
    first, more = os.urandom(BIG), os.urandom(3 << 20)
    p = workdir / "dup.bin"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, first)
    fd2 = os.dup(fd)
    os.close(fd)  # FLUSH: commits `first`
    assert_artifact(mount, p, first)
    os.write(fd2, more)
    info = mount.get(key_of(mount, p)).json()
    assert info["sha256"] == hashlib.sha256(first).hexdigest()
    with mount.http() as c:
        assert c.get(f"/v1/artifacts/{key_of(mount, p)}:content").content == first
    os.close(fd2)
    assert_artifact(mount, p, first + more)
    # A forked child closing its copy commits what is there; the parent writes on.
    q = workdir / "fork.bin"
    fd = os.open(q, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, first)
    subprocess.run(["true"], pass_fds=(fd,), check=True)
    assert_artifact(mount, q, first)
    os.write(fd, more)
    os.close(fd)
    assert_artifact(mount, q, first + more)


def test_a_reader_during_the_write_reads_the_writers_bytes(workdir: Path, mount: Mount
                                                           ) -> None:
    a, b = os.urandom(BIG), os.urandom(2 << 20)
    p = workdir / "growing.bin"
    with open(p, "wb") as w:
        w.write(a)
        w.flush()
        with open(p, "rb") as r:
            assert r.read() == a
            w.write(b)
            w.flush()
            assert r.read() == b
            r.seek(0)
            digest = hashlib.sha256(r.read()).hexdigest()
        assert os.path.getsize(p) == len(a) + len(b)
    assert digest == hashlib.sha256(a + b).hexdigest()
    assert_artifact(mount, p, a + b)


def test_more_writers_of_a_file_being_written(workdir: Path, mount: Mount) -> None:
    p = workdir / "two.bin"
    with open(p, "wb") as w1:
        w1.write(b"1" * BIG)
        w1.flush()
        with open(p, "r+b") as w2:  # no O_TRUNC; written through the daemon
            w2.seek(10)
            w2.write(b"2" * 10)
        with open(p, "ab") as w3:  # write-only: joins the file the kernel writes
            w3.write(b"3" * 10)
        w1.seek(BIG - 5)
        w1.write(b"4" * 5)
    expected = b"1" * 10 + b"2" * 10 + b"1" * (BIG - 25) + b"4" * 5 + b"3" * 10
    assert_artifact(mount, p, expected)


def test_truncate_and_mtime_of_a_file_being_written(workdir: Path, mount: Mount,
                                                    tmp_path: Path) -> None:
    p = workdir / "trunc.bin"
    with open(p, "wb") as f:
        f.write(b"x" * 100_000)
        f.flush()
        f.truncate(1000)
        f.seek(0, os.SEEK_END)
        f.write(b"y")
        f.flush()
        assert os.stat(p).st_size == 1001
    assert_artifact(mount, p, b"x" * 1000 + b"y")
    src = tmp_path / "old.bin"
    src.write_bytes(os.urandom(1 << 20))
    os.utime(src, ns=(1_000_000_000_123_456_789, 1_000_000_000_123_456_789))
    subprocess.run(["cp", "--preserve=timestamps", src, workdir / "old.bin"], check=True)
    assert os.stat(workdir / "old.bin").st_mtime_ns == 1_000_000_000_123_456_789
    with open(workdir / "new.bin", "wb") as f:
        f.write(b"z")
    assert abs(os.stat(workdir / "new.bin").st_mtime_ns - os.stat(p).st_mtime_ns) < 60e9
