"""Hostile input the HTTP fuzzer (tests/test_http_fuzz.py) and the route tests do not send,
and the mount's side of the same.

HTTP, over a raw socket (httpx would normalise or refuse these): bodies that dribble in,
clients that never finish their headers, a JSON body cut short, paths with ``..``,
``%2e%2e``, ``//``, NUL and keys far past 1024 bytes. Each gets a 4xx (never a 500, never a
hang), changes nothing in the store, and the server keeps serving everyone else meanwhile.

Mount: names and paths that break the key rules through the less common calls (rename onto
them, symlink targets, xattrs), and ``..`` in paths (the kernel resolves it; the daemon never
sees a name it could climb with).
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from httputil import Server, raw_request, running_server
from mountutil import Mount, mount_fixture, workdir_fixture
from storeutil import snapshot

pytestmark = pytest.mark.timeout(120)

mount = mount_fixture()
workdir = workdir_fixture()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path / "data") as srv:
        await srv.put("k.txt", b"kept")
        await srv.put("dir/inner.txt", b"inner")
        yield srv


async def responsive(server: Server, *, within: float = 2.0) -> None:
    """Another client is served promptly while the hostile one hangs around."""
    with trio.fail_after(within):
        r = await server.client.get("/v1/artifacts/k.txt:content")
    assert r.status_code == 200 and r.content == b"kept"


async def test_a_body_that_dribbles_in_does_not_stall_others(server: Server) -> None:
    data = os.urandom(20_000)
    s = (await server.client.post("/v1/artifacts", json={
        "key": "slow.bin", "mime_type": "a/b", "size": len(data)})).json()
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(
            f"POST /v1/artifacts/sessions/{s['id']} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode())
        for pos in range(0, len(data), 2000):
            await stream.send_all(data[pos:pos + 2000])
            await trio.sleep(0.15)
            await responsive(server)
            if pos + 2000 < len(data):  # nothing is visible before the last byte
                assert (await server.client.get("/v1/artifacts/slow.bin")).status_code == 404
        answer = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                answer += await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert (await server.client.get("/v1/artifacts/slow.bin:content")).content == data


async def test_clients_that_never_finish_their_headers(server: Server) -> None:
    before = snapshot(server.store)
    streams = []
    try:
        for i in range(50):
            st = await trio.open_tcp_stream("127.0.0.1", server.port)
            await st.send_all(b"POST /v1/artifacts HTTP/1.1\r\nHost: x\r\nX-Slow-" +
                              str(i).encode() + b": ")
            streams.append(st)
        await responsive(server)
    finally:
        for st in streams:
            await st.aclose()
    await responsive(server)
    assert snapshot(server.store) == before


async def test_a_json_body_cut_short_opens_no_session(server: Server) -> None:
    before = snapshot(server.store)
    body = b'{"key": "cut.bin", "mime_type": "a/b", "size": 10}'
    head = (b"POST /v1/artifacts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    await raw_request(server.port, head, body[:20], close_after=True)
    await trio.sleep(0.3)
    await responsive(server)
    assert snapshot(server.store) == before


RAW_TARGETS = [
    b"/v1/artifacts/../../../../etc/passwd",
    b"/v1/artifacts/..",
    b"/v1/artifacts/%2e%2e/%2e%2e/etc/passwd",
    b"/v1/artifacts/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd:content",
    b"/v1/artifacts/dir/../k.txt",
    b"/v1/artifacts/dir/./inner.txt",
    b"/v1/artifacts//k.txt",
    b"/v1/artifacts/dir//inner.txt:content",
    b"/v1/artifacts/k.txt%00.jpg",
    b"/v1/artifacts/k%00",
    b"/v1/artifacts/" + b"a" * 1025,
    b"/v1/artifacts/" + b"/".join([b"b" * 255] * 5),
    b"/v1/artifacts/" + b"c" * 256 + b":content",
    b"/v1/artifacts/%" + b"ff" * 10,
    b"/v1/artifacts/sessions/../k.txt",
    b"/v1/artifacts/k.txt:content:content",
    b"/v1/artifacts/" + "é".encode() + b".txt",
]


@pytest.mark.parametrize("method", [b"GET", b"DELETE", b"HEAD", b"POST"])
async def test_path_tricks_get_4xx_and_change_nothing(server: Server, method: bytes) -> None:
    before = snapshot(server.store)
    for target in RAW_TARGETS:
        head = (method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n")
        answer = await raw_request(server.port, head)
        status = answer[9:12]
        assert status.startswith(b"4"), (method, target[:80], answer[:200])
        if method != b"HEAD":
            assert b'"detail"' in answer or status in (b"400", b"414", b"431"), answer[:200]
        assert b"root:" not in answer  # no /etc/passwd, in whatever form
    # A raw NUL in the request line is not HTTP at all.
    answer = await raw_request(server.port, method + b" /v1/artifacts/k\x00.txt HTTP/1.1\r\n"
                                                      b"Host: x\r\nConnection: close\r\n\r\n")
    assert not answer.startswith(b"HTTP/1.1 2") and not answer.startswith(b"HTTP/1.1 5")
    await responsive(server)
    assert snapshot(server.store) == before


@pytest.mark.parametrize("key", [
    "a/../b", "../k.txt", "./k.txt", "a//b", "/k.txt", "k.txt/", "a\x00b", "k.txt\x00",
    "x" * 1025, "y" * 100_000, "a/" + "b" * 256, "dir/inner.txt/under", "dir", "é", "a b",
    "k.txt:content", "%2e%2e/x",
])
async def test_hostile_keys_in_json_bodies(server: Server, key: str) -> None:
    before = snapshot(server.store)
    r = await server.client.post("/v1/artifacts",
                                 json={"key": key, "mime_type": "a/b", "size": 1})
    assert r.status_code in (400, 409), (key[:80], r.status_code, r.text[:200])
    assert isinstance(r.json()["detail"], str) and len(r.json()["detail"]) < 2000
    r = await server.client.post("/v1/artifacts/bulk",
                                 json={"artifacts": [{"key": "k.txt"}, {"key": key}]})
    assert r.status_code in (400, 404), (key[:80], r.status_code)
    assert snapshot(server.store) == before  # k.txt survived the refused bulk delete


# --- the mount ----------------------------------------------------------------------------

def fails(err: int, fn, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as exc:
        fn(*args)
    assert exc.value.errno == err, (fn, args, exc.value)


@pytest.mark.mount
def test_dotdot_in_mount_paths_is_the_kernels(workdir: Path, mount: Mount) -> None:
    (workdir / "a").mkdir()
    (workdir / "a" / ".." / "b").mkdir()  # the kernel resolves ..: this is workdir/b
    (workdir / "a" / ".." / "b" / "f.txt").write_bytes(b"f")
    assert sorted(os.listdir(workdir)) == ["a", "b"]
    # Above the mount's root, .. is the directory the mount point lives in, not the store.
    assert (mount.path / "..").resolve() == mount.path.parent.resolve()
    with mount.http() as c:
        keys = [a["key"] for a in c.get("/v1/artifacts", params={"limit": 1000}
                                        ).json()["data"]]
    assert not [k for k in keys if ".." in k.split("/") or "." in k.split("/")], keys
    assert os.path.relpath(workdir / "b" / "f.txt", mount.path) in keys


@pytest.mark.mount
def test_names_refused_by_every_call(workdir: Path, mount: Mount) -> None:
    (workdir / "ok").write_bytes(b"ok")
    (workdir / "d").mkdir()
    long = "n" * 256
    fails(errno.ENAMETOOLONG, os.rename, workdir / "ok", workdir / long)
    fails(errno.ENAMETOOLONG, os.rename, workdir / "d", workdir / long)
    fails(errno.ENAMETOOLONG, os.symlink, "ok", workdir / long)
    fails(errno.ENAMETOOLONG, os.mkdir, workdir / "d" / long)
    fails(errno.EINVAL, os.rename, workdir / "d", workdir / "bad name")
    # Symlink targets are the link's business (any bytes up to PATH_MAX), never a key.
    os.symlink("../../../../etc/passwd", workdir / "up")
    assert os.readlink(workdir / "up") == "../../../../etc/passwd"
    fails(errno.ENAMETOOLONG, os.symlink, "t" * 5000, workdir / "toolong")
    # xattrs: a mime type must be type/subtype; other namespaces are not ours.
    fails(errno.EINVAL, os.setxattr, workdir / "ok", "user.mime_type", b"not a mime type")
    fails(errno.EINVAL, os.setxattr, workdir / "ok", "user.mime_type", b"a/b" * 10_000)
    fails(errno.EINVAL, os.setxattr, workdir / "ok", "user.mime_type", b"a/b\x00c")
    assert os.getxattr(workdir / "ok", "user.mime_type") == b"application/octet-stream"
    assert sorted(os.listdir(workdir)) == ["d", "ok", "up"]
    assert (workdir / "ok").read_bytes() == b"ok"
    assert mount.proc.poll() is None
