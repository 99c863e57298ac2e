"""Layer 6, a real mount: the mount and the HTTP face are one store.

What the mount writes is, after close, an artifact the service lists with the right size and
sha256; what the service commits or deletes behind the mount's back shows in the mount, even
where the kernel had cached the old name, attributes and pages.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import time
from pathlib import Path

import pytest
from mountutil import Mount, eventually, mount_fixture, workdir_fixture

pytestmark = [pytest.mark.mount, pytest.mark.stock]

mount = mount_fixture()
workdir = workdir_fixture()


def key_of(mount: Mount, p: Path) -> str:
    return os.fspath(p.relative_to(mount.path))


def test_written_through_mount_is_an_artifact_after_close(workdir: Path, mount: Mount) -> None:
    data = os.urandom(3 * (1 << 20) + 5)
    p = workdir / "model.safetensors"
    with open(p, "wb") as f:
        f.write(data[:1000])
        # While open: a file in the mount, not yet an artifact.
        assert mount.get(key_of(mount, p)).status_code == 404
        f.write(data[1000:])
    info = mount.get(key_of(mount, p)).json()  # right after close(2), no waiting
    assert info["size"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    with mount.http() as c:
        listed = c.get("/v1/artifacts", params={"prefix": workdir.name + "/"}).json()["data"]
        assert [a["key"] for a in listed] == [key_of(mount, p)]
        content = c.get(f"/v1/artifacts/{key_of(mount, p)}:content")
        assert content.status_code == 200 and content.content == data


def test_many_small_files_each_listed_right_after_close(workdir: Path, mount: Mount) -> None:
    expected = {}
    for i in range(30):
        data = os.urandom(i * 37)
        (workdir / f"f{i:02d}").write_bytes(data)
        expected[f"{workdir.name}/f{i:02d}"] = (len(data), hashlib.sha256(data).hexdigest())
    with mount.http() as c:
        listed = c.get("/v1/artifacts", params={"prefix": workdir.name + "/"}).json()["data"]
    assert {a["key"]: (a["size"], a["sha256"]) for a in listed} == expected


def test_service_commit_and_delete_show_in_mount(workdir: Path, mount: Mount) -> None:
    key = f"{workdir.name}/sub/new.bin"
    p = mount.path / key
    assert not p.exists()
    assert sorted(os.listdir(workdir)) == []
    mount.put(key, b"first version")
    eventually(lambda: _assert_bytes(p, b"first version"))
    assert sorted(os.listdir(workdir)) == ["sub"]
    # The kernel now caches the name, attributes and pages: replace with another size.
    assert p.stat().st_size == 13
    mount.put(key, b"second, longer version")
    eventually(lambda: _assert_bytes(p, b"second, longer version"))
    assert p.stat().st_size == 22
    mount.put(key, b"3rd")
    eventually(lambda: _assert_bytes(p, b"3rd"))
    mount.delete(key)
    eventually(lambda: _assert_gone(p))
    assert os.listdir(p.parent) == []  # the directory stays (DESIGN §1)


def test_service_replace_while_mount_reader_holds_old(workdir: Path, mount: Mount) -> None:
    key = f"{workdir.name}/weights.bin"
    old, new = os.urandom(300_000), os.urandom(200_000)
    mount.put(key, old)
    p = mount.path / key
    with open(p, "rb") as reader:
        assert reader.read(1000) == old[:1000]
        mount.put(key, new)
        time.sleep(0.2)  # let the invalidation land: the reader must still see its version
        # A new opener meanwhile sees the new version whole (size and bytes), never the new
        # bytes under the old size, and its reads do not leak into the old reader's.
        eventually(lambda: _assert_bytes(p, new))
        assert reader.read() == old[1000:]
        reader.seek(0)
        assert reader.read() == old
        assert os.fstat(reader.fileno()).st_size == len(old)
        longer = new + os.urandom(100_000)
        mount.put(key, longer)  # and again, while both versions are cached
        eventually(lambda: _assert_bytes(p, longer))
        reader.seek(0)
        assert reader.read() == old
    eventually(lambda: _assert_bytes(p, longer))
    new = longer
    with open(p, "rb") as reader:
        mount.delete(key)
        time.sleep(0.2)
        assert reader.read() == new  # deleted behind its back: still readable until closed
    eventually(lambda: _assert_gone(p))


def test_mount_writer_session_is_visible_over_http(workdir: Path, mount: Mount) -> None:
    p = workdir / "open.bin"
    with open(p, "wb") as f:
        f.write(b"x" * 100)
        f.flush()
        session = os.getxattr(p, "user.upload_session_id").decode()
        with mount.http() as c:
            r = c.get(f"/v1/artifacts/sessions/{session}")
            assert r.status_code == 200, r.text
    with pytest.raises(OSError) as e:
        os.getxattr(p, "user.upload_session_id")
    assert e.value.errno == errno.ENODATA


def _assert_bytes(p: Path, data: bytes) -> None:
    assert p.stat().st_size == len(data)
    assert p.read_bytes() == data


def _assert_gone(p: Path) -> None:
    assert not p.exists()
    assert p.name not in os.listdir(p.parent)


def test_many_writers_at_once_each_commit_is_right(workdir: Path, mount: Mount) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def write(i: int) -> tuple[str, int, str]:
        rng = random.Random(i)
        data = rng.randbytes(rng.choice([0, 1, 4096, 70_000, 1 << 20]) + i)
        p = workdir / f"w{i:03d}.bin"
        with open(p, "wb") as f:
            for off in range(0, len(data), 65536):
                f.write(data[off:off + 65536])
        return key_of(mount, p), len(data), hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(8) as pool:
        expected = {k: (n, h) for k, n, h in pool.map(write, range(48))}
    with mount.http() as c:
        listed = c.get("/v1/artifacts", params={"prefix": workdir.name + "/",
                                                "limit": 1000}).json()["data"]
    assert {a["key"]: (a["size"], a["sha256"]) for a in listed} == expected
