"""Layer 6, a real mount: mounting and unmounting as a user does, and a killed daemon."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import daemon_pid, is_mounted, mount_places, start_daemon, unmount

pytestmark = [pytest.mark.mount, pytest.mark.stock]


def artifactfs(*args: str | os.PathLike[str], timeout: float = 120
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "artifactfs.cli",
                           *[os.fspath(a) for a in args]],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def places(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    with mount_places(tmp_path) as both:
        yield both


def test_background_mount_umount_and_remount(places: tuple[Path, Path]) -> None:
    mp, data = places
    r = artifactfs("mount", mp, "--data", data)
    assert r.returncode == 0, r.stderr
    assert "mounted" in r.stderr
    assert is_mounted(mp)
    (mp / "kept.txt").write_bytes(b"across mounts")
    # A second mount of the same mount point is a no-op; of the same store, a clear error.
    again = artifactfs("mount", mp, "--data", data)
    assert again.returncode == 0 and "already mounted" in again.stderr
    other = mp.parent / "other"
    other.mkdir()
    locked = artifactfs("mount", other, "--data", data)
    assert locked.returncode != 0 and "in use by another artifactfs process" in locked.stderr
    assert not is_mounted(other)
    r = artifactfs("umount", mp)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp)
    assert daemon_pid(data) is None  # umount waited for the daemon to let the store go
    r = artifactfs("mount", mp, "--data", data)
    assert r.returncode == 0, r.stderr
    assert (mp / "kept.txt").read_bytes() == b"across mounts"
    assert artifactfs("umount", mp).returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(places: tuple[Path, Path], sig: signal.Signals) -> None:
    mp, data = places
    proc, line = start_daemon(mp, data, mp.parent / "daemon.log", http=False)
    try:
        assert line.startswith("ready"), line
        (mp / "f").write_bytes(b"x")
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        assert not is_mounted(mp)
    finally:
        unmount(mp, proc)
    assert "Traceback" not in (mp.parent / "daemon.log").read_text()


def test_fusermount_from_outside_ends_the_daemon(places: tuple[Path, Path]) -> None:
    mp, data = places
    proc, line = start_daemon(mp, data, mp.parent / "daemon.log", http=False)
    try:
        assert line.startswith("ready"), line
        subprocess.run(["fusermount3", "-u", os.fspath(mp)], check=True)
        assert proc.wait(timeout=30) == 0
    finally:
        unmount(mp, proc)


def test_umount_busy_says_what_to_do(places: tuple[Path, Path]) -> None:
    mp, data = places
    proc, line = start_daemon(mp, data, mp.parent / "daemon.log", http=False)
    try:
        assert line.startswith("ready"), line
        with open(mp / "held", "wb"):
            r = artifactfs("umount", mp)
            if r.returncode != 0:  # busy: the message names the fix
                assert "fusermount3 -u -z" in r.stderr, r.stderr
                assert is_mounted(mp)
        r = artifactfs("umount", mp)
        assert r.returncode == 0 or not is_mounted(mp), r.stderr
        assert proc.wait(timeout=30) == 0
    finally:
        unmount(mp, proc)


def test_killed_daemon_leaves_dead_mount_that_next_mount_recovers(
        places: tuple[Path, Path]) -> None:
    mp, data = places
    proc, line = start_daemon(mp, data, mp.parent / "daemon.log", http=False)
    try:
        assert line.startswith("ready"), line
        (mp / "survivor.bin").write_bytes(b"committed before the kill")
        proc.kill()
        proc.wait(timeout=30)
        with pytest.raises(OSError) as e:
            os.stat(mp)
        assert e.value.errno == errno.ENOTCONN
        r = artifactfs("mount", mp, "--data", data)
        assert r.returncode == 0, r.stderr
        assert (mp / "survivor.bin").read_bytes() == b"committed before the kill"
        assert artifactfs("umount", mp).returncode == 0
        # umount also clears a dead mount.
        proc2, line = start_daemon(mp, data, mp.parent / "daemon2.log", http=False)
        assert line.startswith("ready"), line
        proc2.kill()
        proc2.wait(timeout=30)
        r = artifactfs("umount", mp)
        assert r.returncode == 0 and "dead mount" in r.stderr, r.stderr
        assert not is_mounted(mp)
        os.stat(mp)
    finally:
        unmount(mp, proc)


def test_mount_errors_are_clear(places: tuple[Path, Path], tmp_path: Path) -> None:
    mp, data = places
    r = artifactfs("mount", tmp_path / "nowhere", "--data", data)
    assert r.returncode != 0 and "mkdir -p" in r.stderr
    r = artifactfs("umount", mp)
    assert r.returncode != 0 and "not mounted" in r.stderr
    (tmp_path / "file").write_bytes(b"")
    r = artifactfs("mount", tmp_path / "file", "--data", data)
    assert r.returncode != 0 and "not a directory" in r.stderr


def test_http_address_in_use_is_a_clear_error(places: tuple[Path, Path]) -> None:
    import socket

    mp, data = places
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = artifactfs("mount", mp, "--data", data, "--http", f"127.0.0.1:{port}")
    assert r.returncode != 0 and "Address already in use" in r.stderr, r.stderr
    assert not is_mounted(mp)
    assert daemon_pid(data) is None
