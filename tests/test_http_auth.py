"""HTTP layer: bearer tokens, the loopback default, and `artifactfs serve` as a process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from httputil import free_port, running_server

from artifactfs import InvalidArgument, open_store
from artifactfs.http.server import is_loopback, serve_http

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token"
ARTIFACTFS = str(Path(sys.executable).with_name("artifactfs"))


async def test_every_route_wants_the_token(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", token=TOKEN) as srv:
        art = await srv.put("k", b"bytes")  # srv.client sends the token
        s = (await srv.client.post("/v1/artifacts", json={
            "key": "k2", "mime_type": "a/b", "size": 2})).json()
        requests = [
            ("GET", "/v1/artifacts", None), ("GET", "/v1/artifacts/k", None),
            ("GET", "/v1/artifacts/k:content", None), ("DELETE", "/v1/artifacts/k", None),
            ("POST", "/v1/artifacts/bulk", b'{"artifacts": [{"key": "k"}]}'),
            ("POST", "/v1/artifacts", b'{"key": "x", "mime_type": "a/b", "size": 1}'),
            ("POST", f"/v1/artifacts/sessions/{s['id']}", b"ab"),
            ("GET", f"/v1/artifacts/sessions/{s['id']}", None),
            ("GET", "/openapi.json", None), ("GET", "/docs", None), ("GET", "/nope", None),
        ]
        async with httpx.AsyncClient(base_url=srv.url) as anon:
            for auth in (None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN):
                headers = {"Authorization": auth} if auth else {}
                for method, path, body in requests:
                    r = await anon.request(method, path, content=body, headers=headers)
                    assert r.status_code == 401, (auth, method, path)
                    assert r.headers["www-authenticate"].startswith("Bearer")
                    assert "token" in r.json()["detail"]
            # A big upload with a wrong token reads its 401, not a connection reset.
            r = await anon.post(s["uri"], content=b"z" * (20 << 20),
                                headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
        doc = (await srv.client.get("/openapi.json")).json()
        assert doc["security"] == [{"bearer": []}]
        # Nothing changed.
        assert (await srv.client.get("/v1/artifacts/k")).json() == art
        assert (await srv.client.get(s["uri"])).json()["offset"] == 0
        listed = (await srv.client.get("/v1/artifacts")).json()["data"]
        assert [a["key"] for a in listed] == ["k"]
        assert (await srv.client.post(s["uri"], content=b"ab")).status_code == 200


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
async def test_binding_beyond_loopback_needs_a_token(tmp_path: Path, host: str) -> None:
    assert not is_loopback(host)
    async with open_store(tmp_path / "data") as store:
        with pytest.raises(InvalidArgument, match="needs a bearer token"):
            await serve_http(store, host, 0)


async def test_binding_beyond_loopback_with_a_token(tmp_path: Path) -> None:
    async with running_server(tmp_path / "data", token=TOKEN, host="0.0.0.0") as srv:
        # uris name this machine, not the wildcard address (which no client can use)
        assert srv.url.startswith(f"http://{socket.gethostname()}:")
        async with httpx.AsyncClient() as anon:
            url = f"http://127.0.0.1:{srv.port}/v1/artifacts"
            assert (await anon.get(url)).status_code == 401
            r = await anon.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200


def test_loopback_names() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.8.9.10")


async def test_serve_command_runs_and_stops(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "ARTIFACTFS_TOKEN": ""}
    proc = await trio.lowlevel.open_process(
        [ARTIFACTFS, "serve", "--http", f"127.0.0.1:{port}", "--data", str(tmp_path / "d")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            for _ in range(100):
                try:
                    r = await c.post("/v1/artifacts", json={
                        "key": "p", "mime_type": "a/b", "size": 0})
                    break
                except httpx.ConnectError:
                    await trio.sleep(0.1)
            assert r.status_code == 200
            assert r.json()["uri"].startswith(f"http://127.0.0.1:{port}/v1/artifacts/sessions/")
            art = (await c.post(r.json()["uri"], content=b"")).json()
            assert art["uri"] == f"http://127.0.0.1:{port}/v1/artifacts/p:content"
    finally:
        proc.terminate()  # only the process this test started
        with trio.fail_after(20):
            await proc.wait()


def test_serve_command_refuses_a_public_bind_without_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ARTIFACTFS_TOKEN"}
    r = subprocess.run(
        [ARTIFACTFS, "serve", "--http", f"0.0.0.0:{free_port()}", "--data", str(tmp_path)],
        capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode != 0
    assert "needs a bearer token" in r.stderr
    assert "Traceback" not in r.stderr


async def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    async with running_server(tmp_path / "a") as first, open_store(tmp_path / "b") as store:
        with pytest.raises(InvalidArgument, match=r"cannot listen on 127\.0\.0\.1"):
            await serve_http(store, "127.0.0.1", first.port)
