"""HTTP layer: big uploads, dropped connections and resuming from get_upload_session_info."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from httputil import Server, raw_request, running_server

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path / "data") as srv:
        yield srv


async def _offset_when_idle(server: Server, uri: str) -> int:
    """The session's offset once the server has finished with a request we abandoned."""
    last = -1
    for _ in range(200):
        offset = (await server.client.get(uri)).json()["offset"]
        if offset == last:
            return offset
        last = offset
        await trio.sleep(0.05)
    raise AssertionError("the session's offset never settled")


async def test_100mib_upload_dropped_midway_resumes_byte_identical(server: Server) -> None:
    c = server.client
    size = 100 * MiB
    data = random.Random(7).randbytes(size)
    chunk = 16 * MiB
    s = (await c.post("/v1/artifacts", json={
        "key": "ckpt/model.safetensors", "mime_type": "application/octet-stream",
        "size": size})).json()
    # Two chunks go through normally.
    for start in (0, chunk):
        r = await c.post(s["uri"], content=data[start:start + chunk],
                         headers={"Upload-Offset": str(start)})
        assert r.status_code == 200 and r.json() is None
    # The third: the client promises 16 MiB, sends 5 MiB, and its connection drops.
    head = (f"POST /v1/artifacts/sessions/{s['id']} HTTP/1.1\r\nHost: x\r\n"
            f"Upload-Offset: {2 * chunk}\r\nContent-Length: {chunk}\r\n\r\n").encode()
    await raw_request(server.port, head, data[2 * chunk:2 * chunk + 5 * MiB], close_after=True)
    offset = await _offset_when_idle(server, s["uri"])
    # What arrived is kept (the server may not have read the socket's last bytes).
    assert 2 * chunk < offset <= 2 * chunk + 5 * MiB
    assert (await c.get("/v1/artifacts/ckpt/model.safetensors")).status_code == 404
    # Resume from the session's offset, as a client that lost its connection does.
    art = None
    while art is None:
        r = await c.post(s["uri"], content=data[offset:offset + chunk],
                         headers={"Upload-Offset": str(offset)})
        assert r.status_code == 200, r.text
        art = r.json()
        offset = min(offset + chunk, size)
    assert art["size"] == size
    assert art["sha256"] == hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    got = 0
    async with c.stream("GET", art["uri"]) as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str(size)
        async for part in r.aiter_bytes():
            digest.update(part)
            got += len(part)
    assert got == size and digest.hexdigest() == art["sha256"]


async def test_second_concurrent_upload_to_a_session_is_409(server: Server) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "c", "mime_type": "a/b",
                                             "size": 4 * MiB})).json()
    release = trio.Event()

    async def slow_body():
        yield b"a" * MiB
        await release.wait()
        yield b"b" * MiB

    async with trio.open_nursery() as nursery:
        results: list[int] = []

        async def first() -> None:
            r = await c.post(s["uri"], content=slow_body())
            results.append(r.status_code)

        nursery.start_soon(first)
        await trio.sleep(0.3)
        r = await c.post(s["uri"], content=b"x" * 10)
        assert r.status_code == 409
        assert "in progress" in r.json()["detail"]
        release.set()
    assert results == [200]
    assert (await c.get(s["uri"])).json()["offset"] == 2 * MiB


async def test_body_cut_short_then_repeated_chunk_is_409(server: Server) -> None:
    c = server.client
    s = (await c.post("/v1/artifacts", json={"key": "r", "mime_type": "a/b",
                                             "size": 2 * MiB})).json()
    head = (f"POST /v1/artifacts/sessions/{s['id']} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {MiB}\r\n\r\n").encode()
    await raw_request(server.port, head, b"z" * 1000, close_after=True)
    offset = await _offset_when_idle(server, s["uri"])
    assert 0 < offset <= 1000
    # A client that believes its whole chunk failed and sends it again from 0 is told where
    # the session really is, so nothing is appended twice.
    r = await c.post(s["uri"], content=b"z" * MiB, headers={"Upload-Offset": "0"})
    assert r.status_code == 409 and r.json()["offset"] == offset
    rest = b"z" * (2 * MiB - offset)
    art = (await c.post(s["uri"], content=rest, headers={"Upload-Offset": str(offset)})).json()
    assert art["sha256"] == hashlib.sha256(b"z" * 2 * MiB).hexdigest()


async def test_overwrite_over_http_is_atomic_for_readers(server: Server) -> None:
    c = server.client
    old_bytes = random.Random(1).randbytes(8 * MiB)  # more than socket buffers hold
    old = await server.put("w", old_bytes)
    async with c.stream("GET", old["uri"]) as reading:
        new = await server.put("w", b"new" * 2000)
        assert (await c.delete("/v1/artifacts/w")).status_code == 204
        body = b"".join([part async for part in reading.aiter_bytes()])
    assert body == old_bytes  # a download already running keeps its version
    assert new["size"] == 6000
    assert (await c.get(new["uri"])).status_code == 404


async def test_many_concurrent_uploads_and_downloads(server: Server) -> None:
    c = server.client
    blobs = {f"conc/{i:02d}": random.Random(i).randbytes(256 * 1024 + i) for i in range(24)}
    done: dict[str, dict] = {}

    async def upload(key: str, data: bytes) -> None:
        s = (await c.post("/v1/artifacts", json={"key": key, "mime_type": "a/b",
                                                 "size": len(data)})).json()
        step = 64 * 1024
        for start in range(0, len(data), step):
            r = await c.post(s["uri"], content=data[start:start + step],
                             headers={"Upload-Offset": str(start)})
            assert r.status_code == 200, r.text
        done[key] = r.json()

    async with trio.open_nursery() as nursery:
        for key, data in blobs.items():
            nursery.start_soon(upload, key, data)
    got: dict[str, bytes] = {}

    async def download(key: str) -> None:
        got[key] = (await c.get(done[key]["uri"])).content

    async with trio.open_nursery() as nursery:
        for key in blobs:
            nursery.start_soon(download, key)
    assert got == blobs
    listed = (await c.get("/v1/artifacts", params={"prefix": "conc/"})).json()["data"]
    assert [a["key"] for a in listed] == sorted(blobs)


async def test_upload_body_reaches_the_store_in_small_pieces(server: Server) -> None:
    """A 32 MiB request body is never held whole: the store gets it as it arrives."""
    pieces: list[int] = []
    real_upload = server.store.upload_stream

    async def measuring_upload(upload_id, chunks, **kw):  # type: ignore[no-untyped-def]
        async def measured():  # type: ignore[no-untyped-def]
            async for chunk in chunks:
                pieces.append(len(chunk))
                yield chunk

        return await real_upload(upload_id, measured(), **kw)

    server.store.upload_stream = measuring_upload  # type: ignore[method-assign]
    try:
        art = await server.put("streamed", b"s" * (32 * MiB))
    finally:
        del server.store.upload_stream
    assert art["size"] == 32 * MiB
    assert sum(pieces) == 32 * MiB and len(pieces) > 32
    assert max(pieces) <= MiB
