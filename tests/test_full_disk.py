"""A full disk: the data directory on a small tmpfs (mounted by the test as root).

What must hold (DESIGN §5, docs/RELIABILITY.md): a write through the mount fails with ENOSPC
and an upload with 507; nothing half-written becomes an artifact (a new file is not there, a
rewritten one keeps its previous bytes); the daemon stays up and keeps serving reads; deleting
works on the full disk (the store keeps a reserve for its metadata); once space is freed,
writing works again and an upload cut by the full disk resumes where it stopped.

Every test mounts the tmpfs and the FUSE mount itself and takes both down in teardown.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mountutil import IN_CI, cannot_mount, check_can_mount, eventually, start_daemon, unmount

from artifactfs.store.blobs import RESERVE_MIN

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180)]

MiB = 1 << 20
FS_SIZE = 24 * MiB
ARTIFACTFS = str(Path(sys.executable).with_name("artifactfs"))


@dataclass
class Small:
    fs: Path  # the tmpfs
    mnt: Path
    data: Path
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def free(self) -> int:
        st = os.statvfs(self.fs)
        return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        os.fspath(path)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        msg = f"cannot mount a tmpfs (needs root): {r.stderr.strip()}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield path
    finally:
        if subprocess.run(["umount", os.fspath(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", os.fspath(path)], check=False)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Small]:
    check_can_mount()
    with tmpfs(tmp_path / "small", FS_SIZE) as fs:
        mnt, log = tmp_path / "mnt", tmp_path / "daemon.log"  # the log is not on the tmpfs
        mnt.mkdir()
        proc, line = start_daemon(mnt, fs / "data", log)
        try:
            if not line.startswith("ready"):
                cannot_mount(f"the daemon said {line!r}: {log.read_text()[-3000:]}")
            yield Small(fs, mnt, fs / "data", line.partition(" ")[2].strip(), proc, log)
        finally:
            (fs / "ballast").unlink(missing_ok=True)  # a test that failed half-way
            unmount(mnt, proc)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-4000:]
        # Teardown proves the store whole: a clean shutdown and a clean fsck.
        r = subprocess.run([ARTIFACTFS, "fsck", "--data", os.fspath(fs / "data")],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert proc.returncode == 0, f"the daemon exited {proc.returncode}"


def write_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = (seed.to_bytes(4, "little") * (size // 4 + 1))[:size]
    with open(path, "wb") as f:
        for pos in range(0, size, MiB):
            f.write(data[pos:pos + MiB])
    return data


def put(c: httpx.Client, key: str, data: bytes) -> httpx.Response:
    r = c.post("/v1/artifacts", json={"key": key, "mime_type": "application/octet-stream",
                                      "size": len(data)})
    if r.status_code != 200:
        return r
    return c.post(r.json()["uri"], content=data)


def no_staging_left(s: Small, allowed: int = 0) -> None:
    staged = list((s.data / "staging").iterdir())
    assert len(staged) <= allowed, f"staging files left: {staged}"


def test_full_disk_through_both_faces(small: Small) -> None:
    s = small
    precious = write_file(s.mnt / "precious.bin", 200_000, seed=1)
    with s.http() as c:
        filler = b"f" * (8 * MiB)
        assert put(c, "filler.bin", filler).status_code == 200
        assert s.free() < FS_SIZE - 8 * MiB

        # A new file bigger than what is left: ENOSPC at a write or at close, and no file.
        with pytest.raises(OSError) as exc:
            write_file(s.mnt / "big.bin", 32 * MiB, seed=2)
        assert exc.value.errno == errno.ENOSPC, exc.value
        assert c.get("/v1/artifacts/big.bin").status_code == 404
        eventually(lambda: _assert(not (s.mnt / "big.bin").exists(), "big.bin lingers"))
        no_staging_left(s)

        # Rewriting an artifact in place: ENOSPC, and it keeps its previous bytes.
        with pytest.raises(OSError) as exc:
            write_file(s.mnt / "precious.bin", 32 * MiB, seed=3)
        assert exc.value.errno == errno.ENOSPC, exc.value
        r = c.get("/v1/artifacts/precious.bin:content")
        assert r.status_code == 200 and r.content == precious
        eventually(lambda: _assert((s.mnt / "precious.bin").read_bytes() == precious,
                                   "the mount shows a half-written precious.bin"))
        no_staging_left(s)

        # An upload too big for what is left: 507 as JSON, nothing committed, resumable.
        upload = os.urandom(17 * MiB)
        r = c.post("/v1/artifacts", json={"key": "up/load.bin", "mime_type": "a/b",
                                          "size": len(upload)})
        assert r.status_code == 200, r.text
        sid = r.json()["id"]
        r = c.post(f"/v1/artifacts/sessions/{sid}", content=upload)
        assert r.status_code == 507, r.text
        assert "no space" in r.json()["detail"]
        assert c.get("/v1/artifacts/up/load.bin").status_code == 404
        assert not (s.mnt / "up" / "load.bin").exists()
        offset = c.get(f"/v1/artifacts/sessions/{sid}").json()["offset"]
        assert 0 <= offset < len(upload)

        # The daemon is up and serves what it holds, through both faces.
        assert s.proc.poll() is None
        assert (s.mnt / "precious.bin").read_bytes() == precious
        assert c.get("/v1/artifacts/filler.bin:content").content == filler
        assert sorted(a["key"] for a in c.get("/v1/artifacts").json()["data"]) == [
            "filler.bin", "precious.bin"]

        # Deleting works on the full disk, and frees the space (within the flush interval).
        os.unlink(s.mnt / "filler.bin")
        eventually(lambda: _assert(s.free() > 6 * MiB, f"only {s.free()} bytes free"))

        # The cut upload resumes where it stopped; the mount writes again.
        r = c.post(f"/v1/artifacts/sessions/{sid}", content=upload[offset:],
                   headers={"Upload-Offset": str(offset)})
        assert r.status_code == 200, r.text
        assert c.get("/v1/artifacts/up/load.bin:content").content == upload
        again = write_file(s.mnt / "again.bin", 2 * MiB, seed=4)
        assert c.get("/v1/artifacts/again.bin:content").content == again
        assert (s.mnt / "precious.bin").read_bytes() == precious
    no_staging_left(s)


def test_disk_filled_by_someone_else(small: Small) -> None:
    """Another program takes every last block: even the metadata cannot grow."""
    s = small
    kept = write_file(s.mnt / "kept.bin", 100_000, seed=5)
    ballast = s.fs / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for block in (MiB, 4096):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * block)
    finally:
        os.close(fd)
    assert s.free() < MiB
    with s.http() as c:
        with pytest.raises(OSError) as exc:
            write_file(s.mnt / "new.bin", 3 * MiB, seed=6)
        assert exc.value.errno == errno.ENOSPC, exc.value
        r = put(c, "new2.bin", b"x" * MiB)
        assert r.status_code == 507, (r.status_code, r.text)
        assert r.json()["detail"]
        for key in ("new.bin", "new2.bin"):
            assert c.get(f"/v1/artifacts/{key}").status_code == 404
        # Reads go on; the daemon is up.
        assert (s.mnt / "kept.bin").read_bytes() == kept
        assert c.get("/v1/artifacts/kept.bin:content").content == kept
        assert s.proc.poll() is None
        ballast.unlink()
        again = eventually(lambda: write_file(s.mnt / "new.bin", 3 * MiB, seed=7))
        assert c.get("/v1/artifacts/new.bin:content").content == again
        assert put(c, "new2.bin", b"y" * MiB).status_code == 200
    no_staging_left(s)


def _assert(cond: bool, msg: str) -> None:
    assert cond, msg


def test_a_file_with_no_room_for_its_copy_fails_its_close(small: Small) -> None:
    """A file the kernel writes itself (passthrough writes, the default) is copied by the
    commit at close (store/snapshot.py), which needs its room again. Without it the close
    fails with ENOSPC, as a failed write does: nothing is committed, nothing is left, and
    close(2) returning 0 still always means committed."""
    s = small
    if "passthrough writes off" in s.log.read_text():
        pytest.skip("this kernel or file system cannot have passthrough writes")
    size = (s.free() - RESERVE_MIN) * 2 // 3  # fits once, not twice, above the reserve
    with pytest.raises(OSError) as exc:
        write_file(s.mnt / "big.bin", size - size % 4, seed=7)
    assert exc.value.errno == errno.ENOSPC, exc.value
    with s.http() as c:
        assert c.get("/v1/artifacts/big.bin").status_code == 404
    eventually(lambda: _assert(not (s.mnt / "big.bin").exists(), "big.bin lingers"))
    no_staging_left(s)
    # What fits once and its copy too commits as always.
    again = write_file(s.mnt / "half.bin", size // 3 - size // 3 % 4, seed=8)
    with s.http() as c:
        r = c.get("/v1/artifacts/half.bin")
        assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(again).hexdigest()
