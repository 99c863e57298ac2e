"""Races on a real mount (and its HTTP face): each must end in a state some serial order of
the operations would give. Every race is run many times with its two sides released together
by a barrier, so the interleavings differ from run to run.

- two writers of one key (mount + mount, mount + HTTP): the key holds one writer's bytes,
  never a mix, and both faces agree;
- a rename racing a delete: either the rename won (the file is at its new name, the delete
  found nothing) or the delete did (no file at either name, the rename found nothing);
- a delete racing a reader: the reader either could not open the file or read all of it;
- an HTTP overwrite racing mount reads: every read returns one whole version, and versions
  never go backwards;
- an open whose name is replaced (twice, or by a rename) during the open: it opens the version
  its lookup found, whole, never ESTALE (made deterministic through /proc/self/fd);
- many clients creating, renaming and deleting in one directory: the faces agree, every file
  holds bytes one writer wrote (no content lost twice or found twice), fsck is clean.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SCALE
from mountutil import Mount, eventually, mount_fixture, mounted, workdir_fixture

pytestmark = [pytest.mark.mount, pytest.mark.stock, pytest.mark.timeout(300)]

mount = mount_fixture()
workdir = workdir_fixture()

ROUNDS = 20 * SCALE
ARTIFACTFS = str(Path(sys.executable).with_name("artifactfs"))


def together(*fns: Callable[[], Any]) -> list[Any]:
    """Run the functions at once (released by one barrier); their results or exceptions."""
    barrier = threading.Barrier(len(fns))

    def run(fn: Callable[[], Any]) -> Any:
        barrier.wait()
        time.sleep(random.uniform(0, 0.003))
        try:
            return fn()
        except Exception as exc:  # the caller decides which errors a serial order allows
            return exc

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(run, fns))


def key_of(mount: Mount, p: Path) -> str:
    return os.fspath(p.relative_to(mount.path))


def write(p: Path, data: bytes) -> None:
    with open(p, "wb") as f:
        f.write(data)


def http_put(c: httpx.Client, key: str, data: bytes) -> int:
    r = c.post("/v1/artifacts", json={"key": key, "mime_type": "application/octet-stream",
                                      "size": len(data)})
    if r.status_code != 200:
        return r.status_code
    return c.post(r.json()["uri"], content=data).status_code


def http_content(c: httpx.Client, key: str) -> bytes | None:
    r = c.get(f"/v1/artifacts/{key}:content")
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    return r.content


def test_two_mount_writers_of_one_key(workdir: Path, mount: Mount) -> None:
    p = workdir / "k.bin"
    with mount.http() as c:
        for i in range(ROUNDS):
            a, b = bytes([65 + i % 26]) * 300_000, bytes([97 + i % 26]) * 300_000
            results = together(lambda a=a: write(p, a), lambda b=b: write(p, b))
            assert results == [None, None], results
            got = p.read_bytes()
            assert got in (a, b), f"round {i}: a mix of both writers ({set(got)})"
            assert http_content(c, key_of(mount, p)) == got
            info = c.get(f"/v1/artifacts/{key_of(mount, p)}").json()
            assert info["sha256"] == hashlib.sha256(got).hexdigest()


def test_mount_writer_and_http_upload_of_one_key(workdir: Path, mount: Mount) -> None:
    p = workdir / "k.bin"
    key = key_of(mount, p)
    with mount.http() as c:
        for i in range(ROUNDS):
            a, b = os.urandom(200_000 + i), os.urandom(150_000 + i)
            r_mount, r_http = together(lambda a=a: write(p, a),
                                       lambda b=b: http_put(c, key, b))
            assert r_mount is None and r_http == 200, (r_mount, r_http)
            final = http_content(c, key)
            assert final in (a, b), f"round {i}: the key holds neither writer's bytes"
            eventually(lambda final=final: _eq(p.read_bytes(), final))


def test_rename_racing_delete(workdir: Path, mount: Mount) -> None:
    with mount.http() as c:
        for i in range(ROUNDS):
            src, dst = workdir / f"src{i}", workdir / f"dst{i}"
            data = os.urandom(5000)
            write(src, data)
            if i % 2:
                deleter = lambda src=src: os.unlink(src)  # noqa: E731
            else:
                def deleter(src: Path = src) -> None:
                    r = c.delete(f"/v1/artifacts/{key_of(mount, src)}")
                    if r.status_code == 404:
                        raise FileNotFoundError(errno.ENOENT, "404", str(src))
                    assert r.status_code == 204, r.text
            renamed, deleted = together(lambda s=src, d=dst: os.rename(s, d), deleter)
            if renamed is None:
                # The rename won: the delete found nothing at the old name, or (HTTP) came
                # too late for it.
                assert isinstance(deleted, FileNotFoundError), (renamed, deleted)
                assert dst.read_bytes() == data
                assert http_content(c, key_of(mount, dst)) == data
            else:
                assert isinstance(renamed, FileNotFoundError), (renamed, deleted)
                assert deleted is None, deleted
                assert not dst.exists() and http_content(c, key_of(mount, dst)) is None
            eventually(lambda s=src: _eq(s.exists(), False))
            assert http_content(c, key_of(mount, src)) is None


def test_delete_racing_readers(workdir: Path, mount: Mount) -> None:
    data = os.urandom(2 << 20)
    with mount.http() as c:
        for i in range(ROUNDS):
            p = workdir / f"r{i}.bin"
            write(p, data)

            def read_mount(p: Path = p) -> bytes:
                with open(p, "rb") as f:
                    out = b""
                    while chunk := f.read(256 << 10):
                        out += chunk
                        time.sleep(0.001)
                    return out

            def read_http(p: Path = p) -> bytes:
                with c.stream("GET", f"/v1/artifacts/{key_of(mount, p)}:content") as r:
                    if r.status_code == 404:
                        raise FileNotFoundError(errno.ENOENT, "404")
                    assert r.status_code == 200
                    return b"".join(r.iter_bytes())

            delete = (lambda p=p: os.unlink(p)) if i % 2 else (
                lambda p=p: mount.delete(key_of(mount, p)))
            got_mount, got_http, deleted = together(read_mount, read_http, delete)
            assert deleted is None, deleted
            for got in (got_mount, got_http):
                # A reader that got in first reads every byte; one that came late finds
                # nothing. Never a short read, never EIO.
                assert got == data or isinstance(got, FileNotFoundError), (
                    f"round {i}: {got if isinstance(got, Exception) else len(got)}")
            assert not p.exists()


def reopen(held: int, flags: int) -> int:
    """open(2) of the inode an O_PATH descriptor holds, through /proc/self/fd: the kernel sends
    OPEN for that inode without looking its name up, and retries the same inode on ESTALE."""
    return os.open(f"/proc/self/fd/{held}", flags)


def test_open_of_a_name_replaced_during_the_open(workdir: Path, mount: Mount) -> None:
    """open(2) looks the name up, then opens the inode it found. The kernel retries an open
    answered ESTALE once, looking the name up again; a name replaced twice within one open
    (once before each attempt's OPEN) must not fail it with ESTALE. Made deterministic here: an
    O_PATH descriptor taken before the replacements holds the inode the lookup found, and
    reopening it sends both attempts' OPEN for that inode, as the race does. The open gets
    that version, whole, as on a disk, where an open racing a rename opens the inode its
    lookup found; a fresh open by name gets the newest version."""
    p = workdir / "ckpt.bin"
    key = key_of(mount, p)
    first, second, third = b"1" * 70_000, b"2" * 50_000, b"3" * 90_000
    mount.put(key, first)
    os.stat(p)  # the kernel caches the name and its inode
    held = os.open(p, os.O_PATH)
    try:
        mount.put(key, second)
        mount.put(key, third)
        fd = reopen(held, os.O_RDONLY)  # ESTALE before the fix
        try:
            assert os.fstat(fd).st_size == len(first)
            assert os.pread(fd, 1 << 20, 0) == first
        finally:
            os.close(fd)
        assert p.read_bytes() == third
        # Writing into that version writes into no file any more (as on a disk, into a file
        # renamed over): close succeeds, the key keeps what replaced it.
        fd = reopen(held, os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.write(fd, b"into the old version") == 20
        finally:
            os.close(fd)
        with mount.http() as c:
            assert http_content(c, key) == third
        assert p.read_bytes() == third
    finally:
        os.close(held)

    # A rename over the name inside the mount, as checkpoint savers do.
    tmp = workdir / "ckpt.tmp"
    held = os.open(p, os.O_PATH)
    try:
        write(tmp, b"4" * 10)
        os.rename(tmp, p)
        fd = reopen(held, os.O_RDONLY)
        try:
            assert os.pread(fd, 1 << 20, 0) == third
        finally:
            os.close(fd)  # EIO before the fix: the kernel's ctime flush at the rename failed
        assert p.read_bytes() == b"4" * 10
    finally:
        os.close(held)


def test_http_overwrites_racing_mount_reads(workdir: Path, mount: Mount) -> None:
    p = workdir / "v.bin"
    key = key_of(mount, p)
    versions = [bytes([i]) * (100_000 + i * 37_000) for i in range(12 * SCALE)]
    mount.put(key, versions[0])
    done = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        last = 0
        while not done.is_set():
            got = p.read_bytes()
            assert got in versions, f"a torn read: {len(got)} bytes, {set(got)}"
            index = versions.index(got)
            # One reader's opens never go back to an older version.
            assert index >= last, f"read version {index} after version {last}"
            last = index
            seen.append(index)

    def writer() -> None:
        try:
            with mount.http() as c:
                for v in versions[1:]:
                    assert http_put(c, key, v) == 200
                    time.sleep(0.02)
        finally:
            done.set()

    results = together(reader, reader, writer)
    assert results == [None, None, None], results
    assert len(seen) > len(versions), "the readers hardly ran"
    eventually(lambda: _eq(p.read_bytes(), versions[-1]))


def test_many_clients_in_one_directory(tmp_path: Path) -> None:
    """Creates, renames, deletes, mkdir/rmdir from 6 mount threads and 2 HTTP clients."""
    names = [f"n{i}" for i in range(8)]
    written: set[bytes] = set()
    lock = threading.Lock()
    duration = 3.0 * SCALE

    def new_content(tag: str) -> bytes:
        # Every version has the same length, under a page: two threads writing one name at
        # once share its inode (one file, as on a disk), and with unequal lengths a longer
        # version's tail would survive a shorter one's write: bytes no single write made,
        # on a disk too. With equal lengths the last write() wins whole.
        data = (f"{tag}-{time.monotonic_ns()}-{random.random()}|".encode() * 100)[:1800]
        with lock:
            written.add(data)
        return data

    allowed = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR}

    with mounted(tmp_path) as m:
        d = m.path / "shared"
        d.mkdir()

        def mount_client(seed: int) -> int:
            rng = random.Random(seed)
            ops = 0
            end = time.monotonic() + duration
            while time.monotonic() < end:
                ops += 1
                a, b = rng.choice(names), rng.choice(names)
                op = rng.choice(["write", "write", "unlink", "rename", "mkdir", "rmdir"])
                try:
                    if op == "write":
                        write(d / a, new_content(f"m{seed}"))
                    elif op == "unlink":
                        os.unlink(d / a)
                    elif op == "rename":
                        os.rename(d / a, d / b)
                    elif op == "mkdir":
                        os.mkdir(d / a)
                    else:
                        os.rmdir(d / a)
                except OSError as exc:
                    # Never ESTALE, though the HTTP clients and the renames replace these
                    # names many times within some opens (fs/replaced.py).
                    assert exc.errno in allowed, (op, a, b, exc)
            return ops

        def http_client(seed: int) -> int:
            rng = random.Random(seed)
            ops = 0
            end = time.monotonic() + duration
            with m.http() as c:
                while time.monotonic() < end:
                    ops += 1
                    key = f"shared/{rng.choice(names)}"
                    if rng.random() < 0.6:
                        status = http_put(c, key, new_content(f"h{seed}"))
                        assert status in (200, 409), status
                    else:
                        status = c.delete(f"/v1/artifacts/{key}").status_code
                        assert status in (204, 404), status
            return ops

        clients = [lambda s=s: mount_client(s) for s in range(6)]
        clients += [lambda s=s: http_client(100 + s) for s in range(2)]
        counts = together(*clients)
        for n in counts:
            assert isinstance(n, int), n
        assert sum(counts) > 100, counts

        with m.http() as c:
            listed = {a["key"].removeprefix("shared/"): a for a in
                      c.get("/v1/artifacts", params={"prefix": "shared/", "limit": 1000}
                            ).json()["data"]}

        def agree() -> dict[str, bytes]:
            files = {e.name: (d / e.name).read_bytes() for e in os.scandir(d) if e.is_file()}
            assert set(files) == set(listed), (sorted(files), sorted(listed))
            return files

        files = eventually(agree)
        entries = os.listdir(d)
        assert len(entries) == len(set(entries)), f"a name listed twice: {entries}"
        contents = list(files.values())
        # A write's bytes are unique to it; a rename moves them: no file holds bytes no one
        # wrote, and no bytes are in two files.
        assert all(data in written for data in contents), "a file holds bytes no one wrote"
        assert len(set(contents)) == len(contents), "one write's bytes are in two files"
        for name, data in files.items():
            assert listed[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
        data_dir = m.data_dir
    r = subprocess.run([ARTIFACTFS, "fsck", "--data", os.fspath(data_dir)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def _eq(a: object, b: object) -> None:
    assert a == b
