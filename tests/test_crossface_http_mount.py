"""Cross-face, from the HTTP side: the HTTP API and the command line against a real mount.

One daemon (`artifactfs mount --foreground --http`) serves both faces of one store
(tests/mountutil.py). What HTTP commits is in the mount when the request returns; what the mount
writes is an artifact when close(2) returns; deletes and overwrites over HTTP are what the next
open in the mount sees.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from mountutil import Mount, mount_fixture, workdir_fixture

pytestmark = [pytest.mark.mount, pytest.mark.timeout(120)]

mount = mount_fixture()
workdir = workdir_fixture()

ARTIFACTFS = str(Path(sys.executable).with_name("artifactfs"))


def key_of(mount: Mount, p: Path) -> str:
    return os.fspath(p.relative_to(mount.path))


def upload(c: httpx.Client, key: str, data: bytes, *, chunk: int = 1 << 20,
           mime_type: str = "application/octet-stream") -> dict:
    s = c.post("/v1/artifacts", json={"key": key, "mime_type": mime_type, "size": len(data)})
    assert s.status_code == 200, s.text
    uri = s.json()["uri"]
    r = c.post(uri, content=b"") if not data else None
    for start in range(0, len(data), chunk):
        r = c.post(uri, content=data[start:start + chunk], headers={"Upload-Offset": str(start)})
        assert r.status_code == 200, r.text
    assert r is not None
    return r.json()


def test_http_upload_is_in_the_mount_at_once(workdir: Path, mount: Mount) -> None:
    data = os.urandom(5 * (1 << 20) + 3)
    key = f"{workdir.name}/datasets/v1/train.jsonl"
    with mount.http() as c:
        s = c.post("/v1/artifacts", json={"key": key, "mime_type": "application/jsonl",
                                          "size": len(data)}).json()
        c.post(s["uri"], content=data[:1000], headers={"Upload-Offset": "0"})
        # Half uploaded over HTTP: invisible in the mount (DESIGN §2).
        assert not (mount.path / key).exists()
        art = c.post(s["uri"], content=data[1000:], headers={"Upload-Offset": "1000"}).json()
    assert art["key"] == key
    p = mount.path / key
    assert p.stat().st_size == len(data)  # no waiting: the request has returned
    assert p.read_bytes() == data
    assert os.getxattr(p, "user.sha256").decode() == hashlib.sha256(data).hexdigest()
    assert os.getxattr(p, "user.mime_type").decode() == "application/jsonl"


def test_mount_write_is_listed_over_http_after_close(workdir: Path, mount: Mount) -> None:
    data = os.urandom(2 * (1 << 20) + 11)
    p = workdir / "ckpt" / "model.safetensors"
    p.parent.mkdir()
    with open(p, "wb") as f:
        f.write(data)
    with mount.http() as c:
        page = c.get("/v1/artifacts", params={"prefix": f"{workdir.name}/"}).json()
        assert [a["key"] for a in page["data"]] == [key_of(mount, p)]
        art = page["data"][0]
        assert art["size"] == len(data) and art["sha256"] == hashlib.sha256(data).hexdigest()
        assert art["uri"] == f"{mount.url}/v1/artifacts/{key_of(mount, p)}:content"
        assert c.get(art["uri"]).content == data
        r = c.get(art["uri"], headers={"Range": "bytes=1000-1999"})
        assert r.status_code == 206 and r.content == data[1000:2000]


def test_delete_over_http_makes_the_file_vanish(workdir: Path, mount: Mount) -> None:
    p = workdir / "gone.bin"
    p.write_bytes(b"soon gone")
    assert p.read_bytes() == b"soon gone"  # the kernel caches its name and pages now
    with mount.http() as c:
        assert c.delete(f"/v1/artifacts/{key_of(mount, p)}").status_code == 204
        q = workdir / "bulk-a"
        q.write_bytes(b"a")
        r = c.post("/v1/artifacts/bulk", json={"artifacts": [{"key": key_of(mount, q)}]})
        assert r.status_code == 204
    assert not p.exists()
    assert not q.exists()
    assert os.listdir(workdir) == []


def test_overwrite_over_http_is_seen_by_the_next_open(workdir: Path, mount: Mount) -> None:
    p = workdir / "weights.bin"
    old, new = os.urandom(1 << 20), os.urandom(700_000)
    p.write_bytes(old)
    assert p.read_bytes() == old  # cached by the kernel (keep_cache, attribute timeouts)
    with mount.http() as c:
        upload(c, key_of(mount, p), new, chunk=256 * 1024)
    with open(p, "rb") as f:
        assert os.fstat(f.fileno()).st_size == len(new)
        assert f.read() == new


def test_overwrite_over_http_while_a_reader_holds_the_old_version(
        workdir: Path, mount: Mount) -> None:
    p = workdir / "held.bin"
    old, new = os.urandom(1 << 20), os.urandom(700_000)
    p.write_bytes(old)
    assert p.read_bytes() == old
    with open(p, "rb") as held:
        with mount.http() as c:
            upload(c, key_of(mount, p), new, chunk=256 * 1024)
        try:
            with open(p, "rb") as f:
                assert f.read() == new  # never old, never new padded with zeros
        finally:
            assert held.read() == old  # the handle opened before keeps its version


def test_http_cannot_upload_into_a_mount_writers_session(workdir: Path, mount: Mount) -> None:
    p = workdir / "open.bin"
    with open(p, "wb") as f:
        f.write(b"x" * 10)
        f.flush()
        session = os.getxattr(p, "user.upload_session_id").decode()
        with mount.http() as c:
            r = c.post(f"/v1/artifacts/sessions/{session}", content=b"y")
            assert r.status_code == 409 and "mount" in r.json()["detail"]
    assert p.read_bytes() == b"x" * 10


def test_command_line_against_the_mounts_daemon(
        workdir: Path, mount: Mount, tmp_path: Path) -> None:
    env = {**os.environ, "ARTIFACTFS_URL": mount.url, "XDG_CACHE_HOME": str(tmp_path / "c")}
    env.pop("ARTIFACTFS_TOKEN", None)

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run([ARTIFACTFS, *args], capture_output=True, env=env, cwd=tmp_path,
                           timeout=60, check=False)
        assert r.returncode == 0, r.stderr.decode()
        return r

    data = os.urandom(9 * (1 << 20))
    (tmp_path / "in.bin").write_bytes(data)
    key = f"{workdir.name}/from-cli.bin"
    cli("put", "in.bin", key)
    assert (mount.path / key).read_bytes() == data
    (workdir / "from-mount.txt").write_bytes(b"written in the mount\n")
    assert cli("get", f"{workdir.name}/from-mount.txt", "-").stdout == b"written in the mount\n"
    listed = cli("ls", f"{workdir.name}/").stdout.decode().split("\n")
    assert [line.split()[-1] for line in listed if line] == [
        key, f"{workdir.name}/from-mount.txt"]
    cli("rm", key, f"{workdir.name}/from-mount.txt")
    assert os.listdir(workdir) == []
