"""HTTP layer: GET /v1/artifacts/{key}:content - streamed bytes, mime type, Range, HEAD."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from httputil import Server, running_server

from artifactfs.http.content import RangeNotSatisfiable, byte_range

pytestmark = pytest.mark.timeout(60)

DATA = bytes(range(256)) * 4  # 1024 bytes, every offset recognisable


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path / "data") as srv:
        yield srv


@pytest.mark.parametrize("mime", ["text/plain", "application/jsonl",
                                  "text/csv; charset=latin-1", "image/png"])
async def test_content_has_the_artifacts_mime_type(server: Server, mime: str) -> None:
    art = await server.put("m/x", DATA, mime)
    r = await server.client.get(art["uri"])
    assert r.status_code == 200
    assert r.headers["content-type"] == mime  # exactly, no charset added
    assert r.headers["content-length"] == str(len(DATA))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["etag"] == f'"{art["sha256"]}"'
    assert r.content == DATA


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=0-0", 0, 1),
    ("bytes=0-1023", 0, 1024),
    ("bytes=100-199", 100, 200),
    ("bytes=1000-", 1000, 1024),
    ("bytes=1000-99999", 1000, 1024),
    ("bytes=-10", 1014, 1024),
    ("bytes=-5000", 0, 1024),
    ("bytes=1023-1023", 1023, 1024),
    ("Bytes = 5 - 9", 5, 10),
])
async def test_range_gives_206_with_the_right_bytes(
        server: Server, header: str, start: int, end: int) -> None:
    art = await server.put("r", DATA)
    r = await server.client.get(art["uri"], headers={"Range": header})
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/1024"
    assert r.headers["content-length"] == str(end - start)
    assert r.content == DATA[start:end]


@pytest.mark.parametrize("header", ["bytes=1024-", "bytes=5000-6000", "bytes=-0"])
async def test_range_past_the_end_is_416(server: Server, header: str) -> None:
    art = await server.put("r", DATA)
    r = await server.client.get(art["uri"], headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */1024"
    assert "outside" in r.json()["detail"]


@pytest.mark.parametrize("header", [
    "bytes=5-2", "items=0-1", "bytes=0-1,5-6", "bytes=abc", "bytes=", "bytes=-", "garbage",
    "bytes=99999999999999999999999999-",
])
async def test_unusable_range_is_ignored(server: Server, header: str) -> None:
    art = await server.put("r", DATA)
    r = await server.client.get(art["uri"], headers={"Range": header})
    if header.startswith("bytes=9999"):
        assert r.status_code == 416  # well-formed, just past the end
        return
    assert r.status_code == 200
    assert r.content == DATA


async def test_if_range_sends_the_range_only_for_the_same_version(server: Server) -> None:
    art = await server.put("r", DATA)
    etag = f'"{art["sha256"]}"'
    r = await server.client.get(art["uri"], headers={"Range": "bytes=0-9", "If-Range": etag})
    assert r.status_code == 206 and r.content == DATA[:10]
    r = await server.client.get(art["uri"], headers={"Range": "bytes=0-9", "If-Range": '"x"'})
    assert r.status_code == 200 and r.content == DATA


async def test_empty_artifact(server: Server) -> None:
    art = await server.put("empty", b"")
    r = await server.client.get(art["uri"])
    assert r.status_code == 200 and r.content == b""
    r = await server.client.get(art["uri"], headers={"Range": "bytes=0-"})
    assert r.status_code == 416 and r.headers["content-range"] == "bytes */0"


async def test_head_gives_headers_only(server: Server) -> None:
    art = await server.put("h", DATA, "text/plain")
    r = await server.client.head(art["uri"])
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == "1024"
    assert r.headers["content-type"] == "text/plain"
    r = await server.client.head(art["uri"], headers={"Range": "bytes=0-9"})
    assert r.status_code == 206 and r.headers["content-length"] == "10"


async def test_content_errors(server: Server) -> None:
    c = server.client
    await server.put("d/f", b"x")
    r = await c.get("/v1/artifacts/nope:content")
    assert r.status_code == 404 and r.json()["detail"]
    assert (await c.get("/v1/artifacts/d:content")).status_code == 404
    assert (await c.get("/v1/artifacts/a%20b:content")).status_code == 400
    assert (await c.get("/v1/artifacts/:content")).status_code == 400
    assert (await c.get("/v1/artifacts/d/f:content:content")).status_code == 400
    assert (await c.head("/v1/artifacts/nope:content")).status_code == 404
    # A session id path with :content is a key sessions/<x>, which does not exist.
    assert (await c.get("/v1/artifacts/sessions/x:content")).status_code == 404


def test_byte_range_rules() -> None:
    assert byte_range(None, 10) is None
    assert byte_range("bytes=2-", 10) == (2, 10)
    assert byte_range("bytes=-3", 10) == (7, 10)
    assert byte_range("bytes=3-2", 10) is None
    with pytest.raises(RangeNotSatisfiable):
        byte_range("bytes=10-", 10)
    with pytest.raises(RangeNotSatisfiable):
        byte_range("bytes=-1", 0)


def _open_blobs(data_dir: Path) -> list[str]:
    """Files under the data directory this process holds open (the test runs the server)."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(data_dir)) and "blob" in target:
            held.append(target)
    return held


async def test_abandoned_downloads_close_their_files(server: Server) -> None:
    art = await server.put("big", os.urandom(8 << 20))
    for _ in range(5):
        async with server.client.stream("GET", art["uri"]) as r:
            async for _part in r.aiter_bytes():
                break  # hang up after the first bytes
    for _ in range(100):
        if not _open_blobs(server.data_dir):
            break
        await trio.sleep(0.05)
    assert _open_blobs(server.data_dir) == []
    assert (await server.client.get(art["uri"], headers={"Range": "bytes=-4"})).status_code == 206
