"""Command line, end to end: `artifactfs put | get | ls | info | rm` as processes against a real
server on loopback (in this test's trio loop, so a test can also look at the store)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from httputil import ARTIFACTFS, Server, run_cli, running_server

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path / "data") as srv:
        yield srv


async def cli(server: Server, tmp_path: Path, *args: str, ok: bool = True,
              token: str | None = None) -> subprocess.CompletedProcess[bytes]:
    r = await run_cli(server.url, tmp_path, *args, token=token)
    if ok:
        assert r.returncode == 0, r.stderr.decode()
        # Not a terminal: no progress bar, no log lines, only the result.
        assert r.stderr == b"", r.stderr.decode()
    return r


async def test_put_ls_info_get_rm(server: Server, tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * MiB + 17)
    (tmp_path / "model.bin").write_bytes(data)
    (tmp_path / "notes.txt").write_bytes(b"hello\n")
    r = await cli(server, tmp_path, "put", "model.bin", "ckpt/v1/model.bin")
    key, size, sha = r.stdout.decode().split()
    assert (key, int(size), sha) == ("ckpt/v1/model.bin", len(data),
                                     hashlib.sha256(data).hexdigest())
    await cli(server, tmp_path, "put", "notes.txt", "docs/notes.txt")
    await cli(server, tmp_path, "put", "notes.txt", "bulk", "--mime-type", "text/x-notes")

    lines = (await cli(server, tmp_path, "ls")).stdout.decode().splitlines()
    assert [line.split()[-1] for line in lines] == ["bulk", "ckpt/v1/model.bin",
                                                   "docs/notes.txt"]
    assert "text/x-notes" in lines[0] and "text/plain" in lines[2]
    listed = json.loads((await cli(server, tmp_path, "ls", "ckpt/", "--json")).stdout)
    assert [a["key"] for a in listed] == ["ckpt/v1/model.bin"]
    assert listed[0]["uri"] == f"{server.url}/v1/artifacts/ckpt/v1/model.bin:content"

    info = json.loads((await cli(server, tmp_path, "info", "ckpt/v1/model.bin")).stdout)
    assert info["size"] == len(data) and info["sha256"] == sha

    await cli(server, tmp_path, "get", "ckpt/v1/model.bin")
    assert (tmp_path / "model.bin").read_bytes() == data  # default name: the key's base name
    await cli(server, tmp_path, "get", "ckpt/v1/model.bin", "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == data
    (tmp_path / "out").mkdir()
    await cli(server, tmp_path, "get", "docs/notes.txt", "out")
    assert (tmp_path / "out" / "notes.txt").read_bytes() == b"hello\n"
    r = await cli(server, tmp_path, "get", "docs/notes.txt", "-")
    assert r.stdout == b"hello\n"

    await cli(server, tmp_path, "rm", "bulk", "docs/notes.txt")
    keys = [a["key"] for a in json.loads((await cli(server, tmp_path, "ls", "--json")).stdout)]
    assert keys == ["ckpt/v1/model.bin"]


async def test_errors_are_one_clear_line(server: Server, tmp_path: Path) -> None:
    await server.put("keep", b"k")
    cases = [
        (("info", "nope"), "no artifact nope"),
        (("get", "nope", "x"), "no artifact nope"),
        (("info", "a/../b"), "'..'"),
        (("info", "a b"), "allowed characters"),
        (("rm", "keep", "absent"), "nothing was deleted"),
        (("put", "missing-file", "k"), "cannot read missing-file"),
        (("ls", "bad prefix"), "no key can hold"),
        (("ls", "--url", "http://127.0.0.1:1"), "cannot reach the daemon"),
    ]
    for args, message in cases:
        r = await cli(server, tmp_path, *args, ok=False)
        assert r.returncode == 1, args
        err = r.stderr.decode()
        assert message in err, (args, err)
        assert err.startswith("artifactfs: ") and "Traceback" not in err
        assert r.stdout == b""
    assert not (tmp_path / "x").exists()  # a failed get leaves no file behind
    assert not list(tmp_path.glob(".x.*"))
    assert (await server.client.get("/v1/artifacts/keep")).status_code == 200


async def test_put_of_an_empty_file_and_overwrite(server: Server, tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"")
    await cli(server, tmp_path, "put", "e", "k")
    assert (await server.client.get("/v1/artifacts/k")).json()["size"] == 0
    (tmp_path / "e").write_bytes(b"now full")
    await cli(server, tmp_path, "put", "e", "k")
    assert (await server.client.get("/v1/artifacts/k:content")).content == b"now full"


async def test_token(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", token="tok") as srv:
        r = await cli(srv, tmp_path, "ls", ok=False)
        assert r.returncode == 1 and "missing bearer token" in r.stderr.decode()
        await cli(srv, tmp_path, "ls", token="tok")
        r = await cli(srv, tmp_path, "ls", "--token", "bad", ok=False)
        assert "wrong bearer token" in r.stderr.decode()


async def interrupted_put(server: Server, tmp_path: Path, data: bytes, key: str) -> int:
    """Run `put` of ``data`` (three chunks or more) until its second chunk is 3 MiB on the wire,
    then kill it.

    Returns the offset the server kept. The server is this test's own, so the stall is made
    in it (its upload_stream sees the network go dead) rather than by timing a kill.
    """
    (tmp_path / "big.bin").write_bytes(data)
    stalled = trio.Event()
    killed = trio.Event()
    real_upload = server.store.upload_stream
    calls = 0

    async def stalling_upload(upload_id, chunks, **kw):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls != 2:
            return await real_upload(upload_id, chunks, **kw)

        async def first_3mib_then_the_dead_connection():  # type: ignore[no-untyped-def]
            got = 0
            async for chunk in chunks:
                yield chunk
                got += len(chunk)
                if got >= 3 * MiB and not stalled.is_set():
                    stalled.set()
                    await killed.wait()  # then the rest: the client is gone

        return await real_upload(upload_id, first_3mib_then_the_dead_connection(), **kw)

    server.store.upload_stream = stalling_upload  # type: ignore[method-assign]
    env = {**os.environ, "ARTIFACTFS_URL": server.url,
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = await trio.lowlevel.open_process(
        [ARTIFACTFS, "put", "big.bin", key], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(60):
            await stalled.wait()
    finally:
        proc.kill()  # the process this test started, by its handle
        await proc.wait()
    killed.set()
    del server.store.upload_stream  # the store's own method again
    state_files = list((tmp_path / "cache" / "artifactfs" / "uploads").iterdir())
    assert len(state_files) == 1
    session_id = json.loads(state_files[0].read_text())["id"]
    for _ in range(100):  # the server notices the dropped connection
        if session_id not in server.store._uploading:
            break
        await trio.sleep(0.05)
    r = await server.client.get(f"/v1/artifacts/sessions/{session_id}")
    return int(r.json()["offset"])


async def test_interrupted_put_resumes_from_the_servers_offset(
        server: Server, tmp_path: Path) -> None:
    """Kill `put` while its second chunk is on the wire; the same command then finishes it."""
    size = 24 * MiB  # three 8 MiB chunks
    data = random.Random(5).randbytes(size)
    offset = await interrupted_put(server, tmp_path, data, "big/file.bin")
    assert 11 * MiB <= offset < size

    r = await cli(server, tmp_path, "put", "big.bin", "big/file.bin", ok=False)
    assert r.returncode == 0, r.stderr.decode()
    assert f"resuming the upload of big/file.bin at byte {offset} of {size}" in r.stderr.decode()
    assert r.stdout.decode().split()[2] == hashlib.sha256(data).hexdigest()
    assert list((tmp_path / "cache" / "artifactfs" / "uploads").iterdir()) == []
    await cli(server, tmp_path, "get", "big/file.bin", "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


async def test_resumed_put_of_a_file_changed_meanwhile_is_an_error(
        server: Server, tmp_path: Path) -> None:
    data = random.Random(6).randbytes(24 * MiB)
    await interrupted_put(server, tmp_path, data, "changed.bin")
    path = tmp_path / "big.bin"
    st = path.stat()
    with open(path, "r+b") as f:  # a byte already sent changes; size and mtime do not
        f.write(b"\xff" if data[0] != 0xFF else b"\x00")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = await cli(server, tmp_path, "put", "big.bin", "changed.bin", ok=False)
    assert r.returncode == 1
    assert "did the file change during the upload" in r.stderr.decode()
    # Run again: the file as it is now is a new upload, and then matches.
    r = await cli(server, tmp_path, "put", "big.bin", "changed.bin")
    assert r.stdout.decode().split()[2] == hashlib.sha256(path.read_bytes()).hexdigest()


def _part(tmp_path: Path, name: str, digest: str) -> Path:
    """The partial file an interrupted `get` of ``name`` leaves beside it."""
    return tmp_path / f".{name}.{digest}.artifactfs-part"


async def test_interrupted_get_resumes_with_a_range_request(
        server: Server, tmp_path: Path) -> None:
    """An interrupted get leaves `.NAME.SHA256.artifactfs-part` holding the bytes it had; the
    same get then asks only for the rest (Range + If-Range) and verifies the whole."""
    data = random.Random(7).randbytes(5 * MiB + 3)
    digest = hashlib.sha256(data).hexdigest()
    await server.store.put_artifact("ckpt/model.bin", data)
    _part(tmp_path, "model.bin", digest).write_bytes(data[:2 * MiB + 1])
    r = await cli(server, tmp_path, "get", "ckpt/model.bin", ok=False)
    assert r.returncode == 0, r.stderr.decode()
    assert f"resuming ckpt/model.bin at byte {2 * MiB + 1}" in r.stderr.decode()
    assert (tmp_path / "model.bin").read_bytes() == data
    assert not _part(tmp_path, "model.bin", digest).exists()

    # A part that already holds every byte: nothing left to fetch (416), it is verified and
    # renamed into place.
    (tmp_path / "model.bin").unlink()
    _part(tmp_path, "model.bin", digest).write_bytes(data)
    r = await cli(server, tmp_path, "get", "ckpt/model.bin", ok=False)
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "model.bin").read_bytes() == data


async def test_get_starts_over_when_the_artifact_changed_or_the_part_is_corrupt(
        server: Server, tmp_path: Path) -> None:
    old = random.Random(8).randbytes(3 * MiB)
    new = random.Random(9).randbytes(3 * MiB + 5)
    await server.store.put_artifact("data.bin", new)
    # A part of a version that was replaced since: If-Range does not match, the daemon sends
    # the whole new version and the stale part goes.
    stale = _part(tmp_path, "data.bin", hashlib.sha256(old).hexdigest())
    stale.write_bytes(old[:MiB])
    await cli(server, tmp_path, "get", "data.bin")
    assert (tmp_path / "data.bin").read_bytes() == new
    assert not stale.exists()
    assert list(tmp_path.glob(".data.bin.*")) == []

    # A part whose bytes are damaged: the digest check refuses the result, keeps the target
    # as it was, removes the part, and the next get succeeds from scratch.
    (tmp_path / "data.bin").write_bytes(b"previous")
    bad = bytearray(new[:MiB])
    bad[100] ^= 0xFF
    _part(tmp_path, "data.bin", hashlib.sha256(new).hexdigest()).write_bytes(bad)
    r = await cli(server, tmp_path, "get", "data.bin", ok=False)
    assert r.returncode == 1
    assert "do not match sha256" in r.stderr.decode()
    assert (tmp_path / "data.bin").read_bytes() == b"previous"
    assert list(tmp_path.glob(".data.bin.*")) == []
    await cli(server, tmp_path, "get", "data.bin")
    assert (tmp_path / "data.bin").read_bytes() == new
