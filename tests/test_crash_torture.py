"""Crash torture: the real daemon (mount + HTTP) under a writer load, killed with SIGKILL.

Each round:

1. start ``artifactfs mount --foreground --http`` on the data directory the last kill left
   (start-up recovery runs in the daemon, as it would for a user);
2. check, through both faces, that the store holds exactly what the writers were told:
   every artifact whose commit was acknowledged (close returned, the last chunk answered)
   reads back byte-identical; the one operation each writer had in flight at the kill is
   wholly applied or wholly absent (a rename moves both names or neither, a bulk delete takes
   every key or none); no file the writers never committed shows up (a file open in the mount
   at the kill is gone and its key keeps its previous artifact); the mount and the HTTP
   listing agree;
3. resume every HTTP upload session left unfinished (the session answers with an offset no
   smaller than what was acknowledged) and finish it;
4. every few rounds, unmount cleanly and run fsck, which must find nothing, and start again;
5. run writers through the mount (threads doing open/write/close, fsync, rename of files and
   of whole directories, unlink, a file held open) and the HTTP face (single and chunked
   uploads, replaces, deletes, bulk deletes, abandoned sessions), and SIGKILL it at a random
   moment.

Writers own disjoint keys, so each key's history is serial and the expected state is exact
(the races between writers of one key are tests/test_races.py's).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
from conftest import IN_CI, SCALE
from httputil import free_port
from mountutil import cannot_mount, check_can_mount, eventually, mounted, start_daemon, unmount
from storeutil import fsck_clean
from test_security import traced

pytestmark = [pytest.mark.timeout(600), pytest.mark.mount, pytest.mark.slow]

ROUNDS = 30 * SCALE
FSCK_EVERY = 3  # rounds; fsck needs the daemon stopped, and a restart costs ~1 s
HTTP_WRITERS = 3
MOUNT_WRITERS = 3
KEYS_PER_WRITER = 5
SIZES = [0, 1, 700, 40_000, 130_000, 600_000]
Content = bytes | None  # None: the key holds no artifact


@dataclass
class Pending:
    """An HTTP upload session left unfinished: the server must still have it."""

    id: str
    key: str
    content: bytes
    acked: int  # bytes the server acknowledged
    most: int  # bytes it may have received (a chunk was in flight at the kill)


@dataclass
class Writer:
    """One writer's keys: what each holds for sure, and the operation cut by the kill."""

    name: str
    keys: list[str]
    state: dict[str, Content]
    in_flight: dict[str, tuple[Content, Content]] | None = None  # key -> (before, after)
    sessions: list[Pending] = field(default_factory=list)
    ops: int = 0
    held: int = 0  # files left open in the mount when the daemon died
    dir_renames: int = 0

    def cut(self, change: dict[str, Content]) -> None:
        self.in_flight = {k: (self.state[k], v) for k, v in change.items()}

    def present(self) -> list[str]:
        return [k for k in self.keys if self.state[k] is not None]


def content(rng: random.Random) -> bytes:
    size = rng.choice(SIZES)
    return rng.randbytes(rng.randint(size // 2, size) if size else 0)


# --- the writers --------------------------------------------------------------------------

class Stopping(Exception):
    """The kill came: the operation in flight has an unknown outcome."""


async def http_writer(w: Writer, client: httpx.AsyncClient, rng: random.Random,
                      stop: threading.Event) -> None:
    async def call(method: str, url: str, **kw: object) -> httpx.Response:
        try:
            r = await client.request(method, url, **kw)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            if stop.is_set():
                raise Stopping from exc
            raise
        assert r.status_code < 400, f"{method} {url}: {r.status_code} {r.text}"
        return r

    try:
        while not stop.is_set():
            w.ops += 1
            op = rng.choice(["put", "put", "put", "chunked", "delete", "bulk", "abandon"])
            present = w.present()
            if op in ("delete", "bulk") and not present:
                op = "put"
            if op == "abandon" and len(w.sessions) >= 2:
                op = "chunked"
            if op in ("put", "chunked", "abandon"):
                key = rng.choice(w.keys)
                data = content(rng)
                if op == "abandon":
                    data = data + rng.randbytes(2)
                r = await call("POST", "/v1/artifacts", json={
                    "key": key, "mime_type": "application/octet-stream", "size": len(data)})
                sid, uri = r.json()["id"], r.json()["uri"]
                n = 1 if op == "put" or len(data) < 3 else rng.randint(2, 3)
                cuts = sorted(rng.sample(range(1, len(data)), n - 1)) if n > 1 else []
                bounds = [0, *cuts, len(data)]
                if op == "abandon":
                    bounds = [0, len(data) // 2]  # the rest comes after the next restart
                for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                    last = hi == len(data) and op != "abandon"
                    try:
                        r = await call("POST", uri, content=data[lo:hi],
                                       headers={"Upload-Offset": str(lo)})
                    except Stopping:
                        w.sessions.append(Pending(sid, key, data, acked=lo, most=hi))
                        if last:
                            w.cut({key: data})
                        raise
                    if last:
                        assert r.json() is not None and r.json()["key"] == key, r.text
                        w.state[key] = data
                    else:
                        assert r.json() is None, (i, r.text)
                if op == "abandon":
                    w.sessions.append(Pending(sid, key, data, acked=bounds[1],
                                              most=bounds[1]))
            elif op == "delete":
                key = rng.choice(present)
                try:
                    await call("DELETE", f"/v1/artifacts/{key}")
                except Stopping:
                    w.cut({key: None})
                    raise
                w.state[key] = None
            else:
                keys = rng.sample(present, min(len(present), rng.randint(1, 3)))
                try:
                    await call("POST", "/v1/artifacts/bulk",
                               json={"artifacts": [{"key": k} for k in keys]})
                except Stopping:
                    w.cut(dict.fromkeys(keys))
                    raise
                for k in keys:
                    w.state[k] = None
            await trio.sleep(0)
    except Stopping:
        pass


def mount_writer(w: Writer, mnt: Path, rng: random.Random, stop: threading.Event,
                 dead: threading.Event) -> None:
    """Blocking file I/O through the mount, in a thread, as a user's program does it."""
    try:
        try:
            os.makedirs(mnt / w.name, exist_ok=True)
        except OSError:
            if stop.is_set():
                return
            raise
        while not stop.is_set():
            w.ops += 1
            op = rng.choice(["write", "write", "write", "fsync", "unlink", "rename", "hold",
                             "renamedir"])
            present = w.present()
            if op in ("unlink", "rename") and not present:
                op = "write"
            moves = _dir_moves(w)
            if op == "renamedir" and not moves:
                op = "write"
            if op == "hold" and rng.random() < 0.7:
                op = "write"
            key = rng.choice(w.keys)
            path = mnt / key
            try:
                if op in ("write", "fsync"):
                    data = content(rng)
                    w.cut({key: data})
                    path.parent.mkdir(exist_ok=True)
                    with open(path, "wb") as f:
                        for pos in range(0, len(data), 65536):
                            f.write(data[pos:pos + 65536])
                        if op == "fsync":
                            f.flush()
                            os.fsync(f.fileno())
                    w.state[key] = data
                elif op == "unlink":
                    key = rng.choice(present)
                    w.cut({key: None})
                    os.unlink(mnt / key)
                    w.state[key] = None
                elif op == "rename":
                    src = rng.choice(present)
                    dst = rng.choice([k for k in w.keys if k != src])
                    w.cut({src: None, dst: w.state[src]})
                    (mnt / dst).parent.mkdir(exist_ok=True)
                    os.rename(mnt / src, mnt / dst)
                    w.state[dst], w.state[src] = w.state[src], None
                elif op == "renamedir":
                    # A directory with its files moves in one transaction: after a kill, all
                    # of them are at the old names or all at the new.
                    src, dst, change = rng.choice(moves)
                    w.cut(change)
                    os.rename(mnt / w.name / src, mnt / w.name / dst)
                    w.state.update(change)
                    w.dir_renames += 1
                else:
                    # A file open for writing when the daemon dies: no one can finish it, so
                    # the key must keep its previous artifact.
                    w.in_flight = None
                    w.held += 1
                    path.parent.mkdir(exist_ok=True)
                    f = open(path, "wb")  # noqa: SIM115
                    f.write(rng.randbytes(5000))
                    f.flush()
                    dead.wait()
                    with contextlib.suppress(OSError):
                        f.close()
                    return
                w.in_flight = None
            except OSError:
                if stop.is_set():
                    return
                raise
    except BaseException:
        stop.set()  # a writer that failed stops the round (its error fails the test)
        raise


def _dir_moves(w: Writer) -> list[tuple[str, str, dict[str, Content]]]:
    """Renames of one of the writer's directories onto another that holds no file."""
    moves = []
    for src, dst in itertools.permutations("abc", 2):
        inside = {k: v for k, v in w.state.items() if k.startswith(f"{w.name}/{src}/")}
        target = [k for k, v in w.state.items()
                  if k.startswith(f"{w.name}/{dst}/") and v is not None]
        if any(v is not None for v in inside.values()) and not target:
            change: dict[str, Content] = dict.fromkeys(inside)
            change |= {k.replace(f"/{src}/", f"/{dst}/"): v for k, v in inside.items()}
            moves.append((src, dst, change))
    return moves


# --- a round --------------------------------------------------------------------------------

async def observe(mnt: Path, url: str) -> dict[str, bytes]:
    """Every file in the mount with its bytes; checked against the HTTP face's listing."""

    def walk() -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for dirpath, _, files in os.walk(mnt):
            for name in files:
                p = Path(dirpath) / name
                found[str(p.relative_to(mnt))] = p.read_bytes()
        return found

    in_mount = await trio.to_thread.run_sync(walk)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        listed: dict[str, tuple[int, str]] = {}
        while True:
            r = await c.get("/v1/artifacts", params={"start_index": len(listed), "limit": 1000})
            assert r.status_code == 200, r.text
            listed |= {a["key"]: (a["size"], a["sha256"]) for a in r.json()["data"]}
            if not r.json()["has_more"]:
                break
        for key in list(listed)[:5]:
            r = await c.get(f"/v1/artifacts/{key}:content")
            assert r.status_code == 200 and r.content == in_mount.get(key), key
    assert listed == {k: (len(v), hashlib.sha256(v).hexdigest()) for k, v in in_mount.items()}, (
        "the mount and the HTTP face disagree")
    return in_mount


def settle(writers: list[Writer], found: dict[str, bytes], round_no: int) -> None:
    """Check what survived against each writer's history; then it is the new truth."""
    owned = {k for w in writers for k in w.keys}
    stray = set(found) - owned
    assert not stray, f"round {round_no}: files no writer committed: {sorted(stray)}"
    for w in writers:
        now = {k: found.get(k) for k in w.keys}
        expected = dict(w.state)
        if w.in_flight:
            before = {**expected, **{k: b for k, (b, _) in w.in_flight.items()}}
            after = {**expected, **{k: a for k, (_, a) in w.in_flight.items()}}
            assert now in (before, after), (
                f"round {round_no}: {w.name}'s operation {sorted(w.in_flight)} cut by the kill"
                f" is torn or half-applied: {_diff(now, before)} / {_diff(now, after)}")
        else:
            assert now == expected, f"round {round_no}: {w.name}: {_diff(now, expected)}"
        w.state, w.in_flight = now, None


def _diff(a: dict[str, Content], b: dict[str, Content]) -> dict[str, str]:
    def show(v: Content) -> str:
        return "absent" if v is None else f"{len(v)} bytes"

    return {k: f"{show(a.get(k))} != {show(b.get(k))}" for k in b if a.get(k) != b.get(k)}


async def resume_sessions(writers: list[Writer], url: str) -> int:
    """Finish every unfinished upload from the offset the server reports."""
    resumed = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for w in writers:
            live: list[tuple[Pending, dict]] = []
            for p in w.sessions:
                r = await c.get(f"/v1/artifacts/sessions/{p.id}")
                if r.status_code == 404:
                    # Only a session whose last byte had arrived may be gone: start-up
                    # committed it, and settle() found the new bytes at its key.
                    assert p.most == len(p.content), f"session {p.id} for {p.key} was lost"
                    assert w.state[p.key] == p.content, f"{p.key}: committed session lost"
                else:
                    assert r.status_code == 200 and r.json()["id"] == p.id, r.text
                    live.append((p, r.json()))
            for p, info in live:
                assert p.acked <= info["offset"] <= p.most, (p, info)
                r = await c.post(f"/v1/artifacts/sessions/{p.id}",
                                 content=p.content[info["offset"]:],
                                 headers={"Upload-Offset": str(info["offset"])})
                assert r.status_code == 200 and r.json()["sha256"], r.text
                r = await c.get(f"/v1/artifacts/{p.key}:content")
                assert r.content == p.content, f"{p.key}: resumed upload reads back wrong"
                w.state[p.key] = p.content
                resumed += 1
            w.sessions = []
    return resumed


def daemon(base: Path, *extra: str):  # type: ignore[no-untyped-def]
    proc, line = start_daemon(base / "mnt", base / "data", base / "daemon.log", *extra)
    if not line.startswith("ready"):
        unmount(base / "mnt", proc)
        cannot_mount(f"the daemon said {line!r}:\n{(base / 'daemon.log').read_text()[-3000:]}")
    return proc, line.partition(" ")[2].strip()


async def test_sigkill_under_load_loses_nothing_committed(tmp_path: Path) -> None:
    check_can_mount()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rng = random.Random(20261127)
    writers = [Writer(f"h{i}", [], {}) for i in range(HTTP_WRITERS)]
    writers += [Writer(f"m{i}", [], {}) for i in range(MOUNT_WRITERS)]
    for w in writers:
        if w.name.startswith("h"):
            w.keys = [f"{w.name}/k{j}.bin" for j in range(KEYS_PER_WRITER)]
        else:  # three directories, so that whole directories can be renamed
            w.keys = [f"{w.name}/{d}/k{j}.bin" for d in "abc" for j in range(2)]
        w.state = dict.fromkeys(w.keys)
    stats = {"ops": 0, "cut": 0, "resumed": 0, "held": 0, "fsck": 0}
    started = time.monotonic()
    proc = None
    try:
        for round_no in range(ROUNDS):
            # Recover, check, resume, and prove the store clean.
            proc, url = daemon(tmp_path)
            found = await observe(mnt, url)
            settle(writers, found, round_no)
            stats["resumed"] += await resume_sessions(writers, url)
            settle(writers, await observe(mnt, url), round_no)
            sync = rng.random() < 0.2
            if round_no % FSCK_EVERY == 0 or sync:
                await trio.to_thread.run_sync(unmount, mnt, proc)
                assert proc.returncode == 0, f"round {round_no}: daemon exited {proc.returncode}"
                fsck_clean(tmp_path / "data")
                stats["fsck"] += 1
                proc, url = daemon(tmp_path, *(["--sync"] if sync else []))

            # Load, then kill -9 at a random moment.
            stop, dead = threading.Event(), threading.Event()
            async with httpx.AsyncClient(base_url=url, timeout=60) as client, \
                    trio.open_nursery() as nursery:
                for w in writers:
                    wrng = random.Random(rng.randrange(2**32))
                    if w.name.startswith("h"):
                        nursery.start_soon(http_writer, w, client, wrng, stop)
                    else:
                        nursery.start_soon(trio.to_thread.run_sync, mount_writer, w, mnt,
                                           wrng, stop, dead)
                try:
                    await trio.sleep(rng.uniform(0.1, 0.9))
                finally:
                    # Also when a writer failed: the threads must see the end of the round.
                    stop.set()
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    dead.set()
            await trio.to_thread.run_sync(unmount, mnt, proc)
            stats["cut"] += sum(1 for w in writers if w.in_flight)
            log = (tmp_path / "daemon.log").read_text(errors="replace")
            assert "Traceback" not in log, log[-4000:]
        proc, url = daemon(tmp_path)
        settle(writers, await observe(mnt, url), ROUNDS)
        stats["resumed"] += await resume_sessions(writers, url)
        await trio.to_thread.run_sync(unmount, mnt, proc)
        fsck_clean(tmp_path / "data")
        r = await trio.run_process(
            [str(Path(sys.executable).with_name("artifactfs")), "fsck", "--data",
             str(tmp_path / "data")], capture_stdout=True, check=False)
        assert r.returncode == 0 and r.stdout.endswith(b"clean\n"), r.stdout
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        unmount(mnt, None)
    stats["ops"] = sum(w.ops for w in writers)
    stats["held"] = sum(w.held for w in writers)
    stats["dir_renames"] = sum(w.dir_renames for w in writers)
    # The kills must land amid real work, or the test proves nothing.
    assert stats["ops"] >= 10 * ROUNDS, stats
    assert stats["cut"] >= ROUNDS // 2, stats
    assert stats["held"] >= 1 and stats["resumed"] >= ROUNDS // 2, stats
    assert stats["dir_renames"] >= ROUNDS // 3, f"too few directory renames: {stats}"
    print(f"{ROUNDS} kills in {time.monotonic() - started:.0f} s: {stats}")


def test_fsync_then_close_is_on_disk_when_close_returns(tmp_path: Path) -> None:
    """A power loss cannot be simulated here, so watch the syscalls (strace): between the
    writer's fsync and the moment its close returns, the daemon fsyncs the bytes, the blob's
    directory and the metadata's WAL. Without fsync, close does not wait for the disk."""
    if shutil.which("strace") is None:
        if IN_CI:
            pytest.fail("strace is needed (apt-get install strace)")
        pytest.skip("strace is not installed")
    with mounted(tmp_path) as m:
        (m.path / "marker.bin").write_bytes(b"m")
        trace = tmp_path / "strace.out"
        with traced(m.proc.pid, trace, "trace=fsync,fdatasync,openat"):
            with open(m.path / "durable.bin", "wb") as f:
                f.write(os.urandom(300_000))
                f.flush()
                os.fsync(f.fileno())
            # A syscall of ours the daemon answers with an openat we can find: after close.
            (m.path / "marker.bin").read_bytes()
        lines = trace.read_text(errors="replace").splitlines()
        import sqlite3

        with contextlib.closing(sqlite3.connect(m.data_dir / "meta.db")) as db:
            (blob_id,) = db.execute(
                "SELECT blob_id FROM entries WHERE key = 'marker.bin'").fetchone()
    marker = next(i for i, line in enumerate(lines) if "openat" in line and blob_id in line)

    def before(pattern: str) -> bool:
        return any(re.search(pattern, line) for line in lines[:marker])

    assert before(r"fsync\(\d+</[^>]*/staging/"), "the writer's fsync did not reach the bytes"
    assert before(r"fsync\(\d+</[^>]*/blobs/[0-9a-f]{2}/[0-9a-f]+>"), "the blob was not synced"
    assert before(r"fsync\(\d+</[^>]*/blobs/[0-9a-f]{2}>"), "the blob's directory was not"
    assert before(r"f(data)?sync\(\d+</[^>]*meta\.db(-wal)?>"), (
        "close returned before the commit's metadata was on disk:\n" + "\n".join(lines[:marker]))


def test_replaced_blob_is_unlinked_only_after_the_metadata_is_on_disk(tmp_path: Path) -> None:
    """The flusher frees a replaced artifact's old blob only once the row that stopped
    pointing at it is on disk (the WAL fsynced), so a power loss can never bring back a row
    whose blob is gone. Watched with strace, as above."""
    if shutil.which("strace") is None:
        if IN_CI:
            pytest.fail("strace is needed (apt-get install strace)")
        pytest.skip("strace is not installed")
    import sqlite3

    with mounted(tmp_path) as m:
        (m.path / "ckpt.bin").write_bytes(b"old" * 1000)
        with contextlib.closing(sqlite3.connect(m.data_dir / "meta.db")) as db:
            (old_blob,) = db.execute(
                "SELECT blob_id FROM entries WHERE key = 'ckpt.bin'").fetchone()
        old_path = m.data_dir / "blobs" / old_blob[:2] / old_blob
        trace = tmp_path / "strace.out"
        with traced(m.proc.pid, trace, "trace=fsync,fdatasync,unlink,unlinkat"):
            (m.path / "ckpt.bin").write_bytes(b"new" * 1000)
            def freed() -> None:
                assert not old_path.exists(), "the flusher has not freed the replaced blob"

            eventually(freed, timeout=30)
        lines = trace.read_text(errors="replace").splitlines()
    gone = next(i for i, line in enumerate(lines)
                if re.match(r"\d+ +unlink(at)?\(", line) and old_blob in line)
    assert any(re.search(r"f(data)?sync\(\d+</[^>]*meta\.db(-wal)?>", line)
               for line in lines[:gone]), (
        "the old blob was unlinked before the metadata was synced:\n"
        + "\n".join(lines[:gone + 1]))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """`kill` (or systemd stopping it) is not a crash: the store flushes and closes."""
    port = free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("artifactfs")), "serve", "--http",
         f"127.0.0.1:{port}", "--data", str(data)],
        stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/artifacts", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "serve did not start"
                time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            s = c.post("/v1/artifacts", json={"key": "k", "mime_type": "a/b", "size": 2}).json()
            assert c.post(s["uri"], content=b"ab").status_code == 200
        proc.send_signal(sig)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (data / "clean").exists(), "stopped like a crash: no clean marker"
    fsck_clean(data)
