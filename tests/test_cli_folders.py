"""Folder transfers on the command line, end to end: `artifactfs put -r`, `get -r` and `sync`
as processes against a real server on loopback, and against a daemon process that is killed
with SIGKILL mid-transfer and started again."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import SCALE
from httputil import (
    ARTIFACTFS,
    DaemonProcess,
    Server,
    daemon_process,
    run_cli,
    running_server,
)

pytestmark = pytest.mark.timeout(900)

MiB = 1 << 20


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(tmp_path / "data") as srv:
        yield srv


async def cli(url: str, tmp_path: Path, *args: str, status: int = 0
              ) -> subprocess.CompletedProcess[bytes]:
    r = await run_cli(url, tmp_path, *args)
    assert r.returncode == status, (r.stdout.decode(), r.stderr.decode())
    if status == 0:
        # Not a terminal: no progress display for a short transfer, no failures.
        assert r.stderr == b"", r.stderr.decode()
    return r


def summary(r: subprocess.CompletedProcess[bytes]) -> str:
    return r.stdout.decode().splitlines()[-1]


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


async def listing(client: httpx.AsyncClient, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every artifact under ``prefix`` by key (one pass over the pages)."""
    rows: dict[str, dict[str, Any]] = {}
    while True:
        r = await client.get("/v1/artifacts", params={"prefix": prefix, "start_index": len(rows),
                                                      "limit": 1000})
        page = r.json()
        rows.update((a["key"], a) for a in page["data"])
        if not page["has_more"]:
            return rows


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def count_calls(server: Server, name: str) -> list[int]:
    """Count the calls of the store's method ``name`` from now on (the HTTP routes call it)."""
    calls = [0]
    real = getattr(server.store, name)

    def counted(*args: Any, **kw: Any) -> Any:
        calls[0] += 1
        return real(*args, **kw)  # a coroutine for the async methods, awaited by the caller

    setattr(server.store, name, counted)
    return calls


TREE = {
    "a.txt": b"alpha\n",
    "empty": b"",
    "sub/b.json": b'{"b": 1}',
    "sub/deeper/c.bin": random.Random(1).randbytes(9 * MiB + 3),  # two upload chunks
    "sub/deeper/d.bin": random.Random(2).randbytes(1000),
}


async def test_put_get_round_trip_skips_what_matches(server: Server, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", TREE)
    r = await cli(server.url, tmp_path, "put", "-r", "src", "models/run1/")
    assert summary(r).startswith("5 files: 5 sent, 0 unchanged, 0 failed;")
    rows = await listing(server.client)
    assert {k: (a["size"], a["sha256"]) for k, a in rows.items()} == {
        f"models/run1/{rel}": (len(d), sha(d)) for rel, d in TREE.items()}
    assert rows["models/run1/sub/b.json"]["mime_type"] == "application/json"
    assert list((tmp_path / "cache" / "artifactfs" / "uploads").iterdir()) == []

    # Again: every file matches by size and sha256, so no upload session is even opened.
    sessions = count_calls(server, "create_upload_session")
    r = await cli(server.url, tmp_path, "put", "-r", "src", "models/run1")
    assert summary(r).startswith("5 files: 0 sent, 5 unchanged, 0 failed; 0 bytes moved")
    assert sessions == [0]
    assert await listing(server.client) == rows

    # A file changed in place, same size: only it is sent.
    (tmp_path / "src" / "sub" / "deeper" / "d.bin").write_bytes(b"x" * 1000)
    r = await cli(server.url, tmp_path, "put", "-r", "src", "models/run1")
    assert summary(r).startswith("5 files: 1 sent, 4 unchanged, 0 failed; 1.0 kB moved")
    assert sessions == [1]
    after = await listing(server.client)
    assert after["models/run1/sub/deeper/d.bin"]["sha256"] == sha(b"x" * 1000)

    r = await cli(server.url, tmp_path, "get", "-r", "models/run1", "dst", "-j", "2")
    assert summary(r).startswith("5 files: 5 received, 0 unchanged, 0 failed;")
    assert read_tree(tmp_path / "dst") == read_tree(tmp_path / "src")
    assert not list((tmp_path / "dst").rglob(".*"))  # no partial files left
    inodes = {p: p.stat().st_ino for p in (tmp_path / "dst").rglob("*")}
    reads = count_calls(server, "open_artifact")
    r = await cli(server.url, tmp_path, "get", "-r", "models/run1", "dst")
    assert summary(r).startswith("5 files: 0 received, 5 unchanged, 0 failed;")
    assert reads == [0]
    assert {p: p.stat().st_ino for p in (tmp_path / "dst").rglob("*")} == inodes

    # get -r without a folder: the prefix's last name, as get's default.
    r = await cli(server.url, tmp_path, "get", "-r", "models/run1")
    assert read_tree(tmp_path / "run1") == read_tree(tmp_path / "src")


async def test_dry_run_changes_nothing(server: Server, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"same.txt": b"same", "new.txt": b"new", "d/changed": b"v2"})
    await server.put("p/same.txt", b"same")
    await server.put("p/d/changed", b"v1")
    await server.put("p/extra/old", b"old")
    before = await listing(server.client)

    r = await cli(server.url, tmp_path, "sync", "src", "p", "--delete", "--dry-run")
    assert r.stdout.decode().splitlines() == [
        "put src/d/changed p/d/changed",
        "put src/new.txt p/new.txt",
        "delete p/extra/old",
        "dry run: 3 files: 2 to put, 1 unchanged, 0 failed, 1 to delete; 5 bytes to move"
        " in " + summary(r).rpartition(" in ")[2],
    ]
    assert await listing(server.client) == before
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.json"))

    write_tree(tmp_path / "dst", {"same.txt": b"same", "local-only": b"x", "d/changed": b"v0"})
    local_before = {p: (p.read_bytes(), p.stat().st_mtime_ns)
                    for p in (tmp_path / "dst").rglob("*") if p.is_file()}
    r = await cli(server.url, tmp_path, "sync", ":p", "dst", "--delete", "--dry-run")
    assert r.stdout.decode().splitlines()[:-1] == [
        "get p/d/changed dst/d/changed",
        "get p/extra/old dst/extra/old",
        "delete local-only",
    ]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in (tmp_path / "dst").rglob("*") if p.is_file()} == local_before
    assert not (tmp_path / "dst" / "extra").exists()
    # A dry run into a folder that does not exist does not create it.
    await cli(server.url, tmp_path, "get", "-r", "p", "nowhere", "--dry-run")
    assert not (tmp_path / "nowhere").exists()


async def test_sync_delete_both_ways(server: Server, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"keep": b"k", "d/new": b"n"})
    await server.put("p/keep", b"k")
    await server.put("p/gone", b"g")
    await server.put("p/old/deep/x", b"x")
    await server.put("p2/untouched", b"u")  # a sibling prefix, not under p/
    r = await cli(server.url, tmp_path, "sync", "src", "p", "--delete")
    assert summary(r).startswith("2 files: 1 sent, 1 unchanged, 0 failed, 2 deleted;")
    assert sorted(await listing(server.client)) == ["p/d/new", "p/keep", "p2/untouched"]

    # Without --delete nothing goes.
    write_tree(tmp_path / "dst", {"keep": b"old", "stale": b"s", "junk/a/b": b"j"})
    (tmp_path / "dst" / ".keep.0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
     ".artifactfs-part").write_bytes(b"o")  # a partial download of a version that is gone
    await cli(server.url, tmp_path, "sync", "p", "dst")
    assert (tmp_path / "dst" / "stale").exists()
    r = await cli(server.url, tmp_path, "sync", "p", "dst", "--delete")
    assert summary(r).startswith("2 files: 0 received, 2 unchanged, 0 failed, 4 deleted;")
    assert sorted(p.relative_to(tmp_path / "dst").as_posix()
                  for p in (tmp_path / "dst").rglob("*")) == ["d", "d/new", "keep"]
    assert read_tree(tmp_path / "dst") == {"d/new": b"n", "keep": b"k"}


async def test_failures_are_listed_and_the_exit_status_is_1(
        server: Server, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"good.txt": b"good", "bad name.txt": b"b", "clash/inner": b"c",
                     "sub/ok": b"ok"})
    (src / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1 name")
    os.mkfifo(src / "pipe")
    os.symlink("nowhere", src / "dangling")
    await server.put("p/clash", b"an artifact where the folder would go")
    await server.put("p/extra", b"would be deleted if all succeeded")

    r = await cli(server.url, tmp_path, "sync", "src", "p", "--delete", status=1)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert summary(r).startswith("7 files: 2 sent, 0 unchanged, 5 failed, 0 deleted;")
    assert "nothing deleted (2 to delete) since copies failed" in summary(r)
    failed = sorted(line for line in err.splitlines() if line.startswith("artifactfs: failed:"))
    assert len(failed) == 5, err
    assert failed[0].startswith("artifactfs: failed: bad name.txt: no key can hold this name:")
    assert "contains ' '" in failed[0]
    assert failed[1].startswith("artifactfs: failed: caf\\xe9: no key can hold this name")
    assert failed[2].startswith("artifactfs: failed: clash/inner: ") and "HTTP 409" in failed[2]
    assert failed[3] == ("artifactfs: failed: dangling: a symbolic link to a folder or to"
                         " nothing (not followed)")
    assert failed[4] == "artifactfs: failed: pipe: not a regular file"
    assert err.splitlines()[-1] == "artifactfs: 5 of 7 files failed (listed above)"
    assert "Traceback" not in err and out.count("\n") == 1
    rows = await listing(server.client)
    assert sorted(rows) == ["p/clash", "p/extra", "p/good.txt", "p/sub/ok"]


async def test_command_line_mistakes(server: Server, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "f").write_bytes(b"f")
    cases = [
        (("sync", "a", "b"), "write the store's side as :PREFIX"),
        (("sync", ":x", ":y"), "both SRC and DST name the store"),
        (("put", "a", "k"), "'put -r DIR PREFIX' uploads a folder"),
        (("put", "f", "k", "-j", "8"), "-j and --dry-run go with 'put -r'"),
        (("put", "-r", "f", "k"), "f is not a folder"),
        (("put", "-r", "a", "bad prefix"), "prefix 'bad prefix'"),
        (("get", "-r", "nothing/here", "x"), "no artifacts under 'nothing/here/'"),
        (("get", "-r", ""), "needs a destination folder"),
        (("put", "-r", "a", "p", "-j", "0"), "at least one job"),
    ]
    for args, message in cases:
        r = await cli(server.url, tmp_path, *args, status=1)
        assert message in r.stderr.decode(), (args, r.stderr.decode())
        assert "Traceback" not in r.stderr.decode()
    assert await listing(server.client) == {}
    assert not (tmp_path / "x").exists()


# --- against a daemon that dies ------------------------------------------------------------


class Background:
    """A command running while the test does something else; its result once it ends."""

    def __init__(self) -> None:
        self.result: subprocess.CompletedProcess[bytes] | None = None
        self.done = trio.Event()

    async def run(self, url: str, cwd: Path, *args: str) -> None:
        self.result = await run_cli(url, cwd, *args)
        self.done.set()


async def kill_when(daemon: DaemonProcess, ready: Callable[[httpx.AsyncClient], Any],
                    cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run the command; SIGKILL the daemon once ``ready`` says so; the command's result."""
    bg = Background()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bg.run, daemon.url, cwd, *args)
        async with httpx.AsyncClient(base_url=daemon.url, timeout=30) as c:
            with trio.fail_after(300):
                while not await ready(c):
                    assert not bg.done.is_set(), "the transfer ended before the kill"
                    await trio.sleep(0.05)
        await daemon.kill()
        with trio.fail_after(120):
            await bg.done.wait()
    assert bg.result is not None
    return bg.result


async def upload_reached(c: httpx.AsyncClient, uploads: Path, offset: int) -> bool:
    """Whether an upload session the command remembers in ``uploads`` holds ``offset`` bytes."""
    for state in uploads.glob("*.json") if uploads.exists() else ():
        try:
            sid = json.loads(state.read_text())["id"]
        except (OSError, ValueError):
            continue  # being written
        r = await c.get(f"/v1/artifacts/sessions/{sid}")
        if r.status_code == 200 and r.json().get("offset", 0) >= offset:
            return True
    return False


async def test_ctrl_c_stops_at_once_and_the_rerun_resumes(
        server: Server, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    digests = {f"p/f{i}.bin": write_big(tmp_path / "src" / f"f{i}.bin", 40 * MiB, i)
               for i in range(3)}
    uploads = tmp_path / "cache" / "artifactfs" / "uploads"
    env = {**os.environ, "ARTIFACTFS_URL": server.url, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = await trio.lowlevel.open_process(
        [ARTIFACTFS, "put", "-r", "src", "p", "-j", "2"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(120):
            while not await upload_reached(server.client, uploads, 9 * MiB):
                assert proc.poll() is None, "the transfer ended before the interrupt"
                await trio.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # the process this test started, by its handle
        with trio.fail_after(20):  # running files stop at their next chunk
            status = await proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    err = (await proc.stderr.receive_some(1 << 16)).decode()
    assert status == 130, err
    assert err.splitlines()[-1] == ("artifactfs: interrupted; run the same command again to"
                                    " continue")
    assert len(await listing(server.client, "p/")) < 3
    sessions = count_calls(server, "create_upload_session")
    r = await run_cli(server.url, tmp_path, "put", "-r", "src", "p")
    assert r.returncode == 0, r.stderr.decode()
    assert "artifactfs: resuming the upload of p/f" in r.stderr.decode()
    assert sessions[0] < 3  # at least one file went on in the session it had
    rows = await listing(server.client, "p/")
    assert {k: a["sha256"] for k, a in rows.items()} == digests


def assert_stopped(r: subprocess.CompletedProcess[bytes]) -> None:
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "stopped: lost the daemon at" in err.splitlines()[-1], err
    assert err.splitlines()[-1].endswith("run the same command again to continue")
    assert "Traceback" not in err


async def test_ten_thousand_files_daemon_killed_and_restarted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    digests: dict[str, tuple[int, str]] = {}
    for d in range(100):
        os.makedirs(src / f"{d:02d}")
        for f in range(100):
            data = f"{d}.{f}\n".encode() * (f % 5)
            fd = os.open(src / f"{d:02d}" / f"f{f:02d}.txt", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, data)
            os.close(fd)
            digests[f"tree/{d:02d}/f{f:02d}.txt"] = (len(data), sha(data))

    async def some_committed(c: httpx.AsyncClient) -> bool:
        r = await c.get("/v1/artifacts", params={"prefix": "tree/", "start_index": 1500,
                                                 "limit": 1})
        return bool(r.json()["data"])

    async with daemon_process(tmp_path / "data") as daemon:
        r = await kill_when(daemon, some_committed, tmp_path, "put", "-r", "src", "tree")
        assert_stopped(r)
        await daemon.start()
        r = await run_cli(daemon.url, tmp_path, "put", "-r", "src", "tree")
        assert r.returncode == 0, r.stderr.decode()
        counts = re.fullmatch(r"10000 files: (\d+) sent, (\d+) unchanged, 0 failed; .*",
                              summary(r))
        assert counts is not None, summary(r)
        assert int(counts[2]) >= 1500 and int(counts[1]) + int(counts[2]) == 10000
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            rows = await listing(c, "tree/")
        assert {k: (a["size"], a["sha256"]) for k, a in rows.items()} == digests
        await daemon.stop()


def write_big(path: Path, size: int, seed: int) -> str:
    """``size`` bytes of real (incompressible, no holes) content; their sha256."""
    block = random.Random(seed).randbytes(MiB)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(size // MiB):
            chunk = i.to_bytes(8, "little") + block[8:]  # every MiB differs
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


async def test_big_files_resume_after_the_daemon_is_killed(tmp_path: Path) -> None:
    """A few big files (2 GiB in all with ARTIFACTFS_TORTURE_SCALE > 1): the daemon dies in
    the middle of put -r and of get -r; the same commands then resume the partial files."""
    size = (512 if SCALE > 1 else 48) * MiB
    src = tmp_path / "src"
    src.mkdir()
    digests = {f"big/part-{i}.bin": write_big(src / f"part-{i}.bin", size, i) for i in range(4)}
    uploads = tmp_path / "cache" / "artifactfs" / "uploads"

    async def upload_under_way(c: httpx.AsyncClient) -> bool:
        return await upload_reached(c, uploads, size // 3)

    async with daemon_process(tmp_path / "data") as daemon:
        r = await kill_when(daemon, upload_under_way, tmp_path, "put", "-r", "src", "big",
                            "-j", "2")
        assert_stopped(r)
        await daemon.start()
        r = await run_cli(daemon.url, tmp_path, "put", "-r", "src", "big", "-j", "2")
        assert r.returncode == 0, r.stderr.decode()
        assert "artifactfs: resuming the upload of big/part-" in r.stderr.decode()
        async with httpx.AsyncClient(base_url=daemon.url, timeout=60) as c:
            rows = await listing(c, "big/")
        assert {k: a["sha256"] for k, a in rows.items()} == digests

        dst = tmp_path / "dst"

        async def download_under_way(c: httpx.AsyncClient) -> bool:
            return any(p.stat().st_size >= size // 3
                       for p in dst.glob(".*.artifactfs-part")) if dst.exists() else False

        r = await kill_when(daemon, download_under_way, tmp_path, "get", "-r", "big", "dst",
                            "-j", "2")
        assert_stopped(r)
        # No half file under a final name: what is there is whole.
        for p in dst.glob("part-*.bin"):
            assert file_sha(p) == digests[f"big/{p.name}"]
        await daemon.start()
        r = await run_cli(daemon.url, tmp_path, "get", "-r", "big", "dst", "-j", "2")
        assert r.returncode == 0, r.stderr.decode()
        assert "artifactfs: resuming big/part-" in r.stderr.decode()
        assert {f"big/{p.name}": file_sha(p) for p in dst.iterdir()} == digests
        await daemon.stop()


def file_sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
