"""A real HTTP server on a free loopback port, for the HTTP and command-line tests.

The server runs in the test's own trio loop (open_store + serve_http in a nursery this module
opens), so a test can look at the store directly while it talks HTTP to it. Teardown cancels
that nursery, which ends exactly the server it started, then closes the store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio
from mountutil import free_port

from artifactfs import ArtifactStore, open_store
from artifactfs.http.server import serve_http

ARTIFACTFS = str(Path(sys.executable).with_name("artifactfs"))


@dataclass
class Server:
    url: str
    store: ArtifactStore
    data_dir: Path
    client: httpx.AsyncClient

    @property
    def port(self) -> int:
        return int(self.url.rpartition(":")[2])

    async def put(self, key: str, data: bytes, mime_type: str = "application/octet-stream"
                  ) -> dict:
        """Upload ``data`` as ``key`` in one request; the committed artifact's JSON."""
        r = await self.client.post("/v1/artifacts",
                                   json={"key": key, "mime_type": mime_type, "size": len(data)})
        assert r.status_code == 200, r.text
        session = r.json()
        r = await self.client.post(session["uri"], content=data)
        assert r.status_code == 200, r.text
        if data:
            assert r.json() is not None
        return r.json() if r.json() is not None else (await self.client.get(
            f"/v1/artifacts/{key}")).json()


@contextlib.asynccontextmanager
async def running_server(data_dir: Path, *, token: str | None = None,
                         host: str = "127.0.0.1") -> AsyncIterator[Server]:
    """Serve a store in ``data_dir`` on a free port of ``host`` until the block ends."""
    async with open_store(data_dir) as store, trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_http, store, host, 0, token=token))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers,
                                     event_hooks={"response": [_no_server_error]}) as client:
            yield Server(url=url, store=store, data_dir=data_dir, client=client)
            # Whatever the test sent, the server must still answer.
            r = await client.get("/v1/artifacts", params={"limit": 1})
            assert r.status_code == 200, r.text
        nursery.cancel_scope.cancel()


async def _no_server_error(response: httpx.Response) -> None:
    """No request a test makes may get a 500: bad input is the client's error, never ours."""
    assert response.status_code < 500 or response.status_code == 507, (
        f"{response.request.method} {response.request.url} got {response.status_code}")


async def raw_request(port: int, head: bytes, body: bytes = b"", *, close_after: bool = False,
                      read: bool = True) -> bytes:
    """Send bytes the way no well-behaved client would (a body cut short, bad framing).

    Returns what the server answered (up to its close or 5 s of silence), or b"" when the
    caller asks to hang up without reading.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(head + body)
        if close_after:
            return b""
        if not read:
            return b""
        answer = b""
        with trio.move_on_after(5):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer and _complete(answer):
                    break
        return answer
    finally:
        await stream.aclose()


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


@contextlib.contextmanager
def server_in_thread(data_dir: Path, *, token: str | None = None) -> Iterator[str]:
    """``running_server`` in a thread of its own trio loop, for synchronous tests (fsspec,
    pandas) that block while the server answers; yields the server's URL."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        async with running_server(data_dir, token=token) as srv:
            state["url"] = srv.url
            state["trio_token"] = trio.lowlevel.current_trio_token()
            state["stop"] = stop = trio.Event()
            started.set()
            await stop.wait()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:
            state["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, name="http-server", daemon=True)
    thread.start()
    started.wait(60)
    if "url" not in state:
        thread.join(5)
        raise RuntimeError(f"the HTTP server did not start: {state.get('error')!r}")
    try:
        yield state["url"]
    finally:
        trio.from_thread.run_sync(state["stop"].set, trio_token=state["trio_token"])
        thread.join(60)
        assert not thread.is_alive(), "the HTTP server did not stop"
        if "error" in state:
            raise state["error"]

async def run_cli(url: str, cwd: Path, *args: str, token: str | None = None
                  ) -> subprocess.CompletedProcess[bytes]:
    """Run the `artifactfs` command against ``url`` in ``cwd`` (its upload state kept in
    ``cwd/cache``); its exit status, stdout and stderr, whatever they are."""
    env = {**os.environ, "ARTIFACTFS_URL": url, "XDG_CACHE_HOME": str(cwd / "cache"),
           "COLUMNS": "200"}
    env.pop("ARTIFACTFS_TOKEN", None)
    if token:
        env["ARTIFACTFS_TOKEN"] = token
    return await trio.run_process([ARTIFACTFS, *args], capture_stdout=True,
                                  capture_stderr=True, check=False, env=env, cwd=cwd)


class DaemonProcess:
    """`artifactfs serve` as a process of its own on a fixed port, so a test can SIGKILL it and
    start it again on the same data directory and address."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        with open(self.data_dir.parent / "serve.log", "ab") as log:  # the child keeps a copy
            self.proc = await trio.lowlevel.open_process(
                [ARTIFACTFS, "serve", "--http", f"127.0.0.1:{self.port}", "--data",
                 str(self.data_dir)], stdout=subprocess.DEVNULL, stderr=log)
        async with httpx.AsyncClient(base_url=self.url) as c:
            with trio.fail_after(30):
                while True:
                    try:
                        await c.get("/v1/artifacts", params={"limit": 1})
                        return
                    except httpx.TransportError:
                        assert self.proc.poll() is None, "artifactfs serve exited at start"
                        await trio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or closed."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)  # the process this helper started, by handle
        await self.proc.wait()
        self.proc = None

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with trio.fail_after(30):
                await self.proc.wait()
            self.proc = None


@contextlib.asynccontextmanager
async def daemon_process(data_dir: Path) -> AsyncIterator[DaemonProcess]:
    d = DaemonProcess(data_dir)
    await d.start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            await d.proc.wait()
