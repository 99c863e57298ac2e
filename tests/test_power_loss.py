"""Power loss: the real daemon with its data directory on lazyfs, and the power cut for real.

tests/lazyfs.py is a FUSE file system that keeps what was never fsynced apart from what was,
and at a "power cut" throws the former away (its model is in its docstring: POSIX, strictly).
Each round of test_power_cut_loses_nothing_durable:

1. mount lazyfs over the backing directory (what the last cut left on "disk");
2. start ``artifactfs mount --foreground --http`` on DATA inside it: start-up recovery runs;
3. check, through HTTP and the mount, every key against its history: every present key reads
   back complete, with the sha256 the listing gives (never torn), and is one of the versions
   written to it, no older than the last one known durable; a key is absent only if a
   version from there on was an absence. Known durable: acknowledged by a close after fsync
   through the mount, or committed before a flush that completed (below);
4. stop the daemon cleanly and fsck DATA (clean); start it again;
5. a seeded random workload in two threads: HTTP uploads, overwrites and deletes, bursts of
   small uploads, and mount writes with and without fsync before close, unlinks and renames
   over other keys; now and then a thread settles: it waits until the flusher has completed
   a cycle that began after its last acknowledged operation, which makes everything it did
   before durable. Every third round the daemon runs with --sync, and every acknowledged
   change is known durable at once;
6. after a seeded number of operations cut the power (lazyfs freezes: EIO from then on, and
   its backing directory keeps only what was durable, with seeded writeback of unsynced
   pages), SIGKILL the daemon, unmount both.

"A flush that completed" is seen from outside, on lazyfs: the background task flushes (blobs
fsynced, rows marked, WAL fsynced) and then checkpoints, and only the checkpoint fsyncs
meta.db. Of two fsyncs of meta.db that complete after an acknowledgement, the second ends a
cycle that began after it (the first may end the cycle that was running).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import SCALE
from lazyutil import Lazy, lazy_mounted
from mountutil import cannot_mount, start_daemon, unmount
from storeutil import fsck_clean

pytestmark = [pytest.mark.timeout(900), pytest.mark.mount, pytest.mark.slow]

ROUNDS = 6 * SCALE
SIZES = [0, 1, 3000, 70_000, 300_000]
BURST = 40  # small uploads in a row: more than the flusher's syncfs threshold (SYNCFS_AT)
SETTLE_WAIT = 120.0  # a settle that sees no flush by then gives up (claims nothing)
Content = bytes | None  # None: the key holds no artifact


@dataclass
class History:
    """What one key held, in order. versions[floor] is the last one known durable."""

    versions: list[Content]
    floor: int = 0
    in_flight: list[Content] = field(default_factory=list)  # cut by the power loss

    def allowed(self) -> list[Content]:
        return self.versions[self.floor:] + self.in_flight


@dataclass
class Stats:
    ops: int = 0
    fsync_closes: int = 0
    settles: int = 0
    settle_timeouts: int = 0
    bursts: int = 0
    durable_checked: int = 0  # keys whose known-durable version had to survive
    lost: int = 0  # keys that went back to an older (allowed) version
    cut_in_flight: int = 0
    renames: int = 0
    sync_rounds: int = 0


class PowerCut(Exception):
    """The power went: the operation in flight has an unknown outcome."""


class Workload:
    """Two writer threads over disjoint keys; each key's history is serial."""

    def __init__(self, lazy: Lazy, mnt: Path, url: str, history: dict[str, History],
                 rng: random.Random, stats: Stats, cut_after: int, *, sync: bool) -> None:
        self.lazy, self.mnt, self.url = lazy, mnt, url
        self.sync = sync  # the daemon runs with --sync: every acknowledged change is durable
        self.history, self.stats = history, stats
        self.cut_after = cut_after
        self.started = 0
        self.lock = threading.Lock()
        self.reached = threading.Event()  # the operation that the power cut lands in began
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.seeds = [rng.randrange(2**32) for _ in range(2)]

    def begin(self) -> None:
        if self.stop.is_set():
            raise PowerCut
        with self.lock:
            self.started += 1
            self.stats.ops += 1
            if self.started >= self.cut_after:
                self.reached.set()

    def attempt(self, key: str, value: Content, op: Callable[[], None]) -> None:
        """Run one change of ``key``; acknowledged, it is the key's newest version."""
        self.attempt_many({key: value}, op)

    def attempt_many(self, change: dict[str, Content], op: Callable[[], None]) -> None:
        """One operation that changes several keys (a rename: two)."""
        for key, value in change.items():
            self.history[key].in_flight = [value]
        try:
            op()
        except (OSError, httpx.TransportError, AssertionError) as exc:
            if self.stop.is_set():
                raise PowerCut from exc
            raise
        for key, value in change.items():
            h = self.history[key]
            h.in_flight = []
            h.versions.append(value)
            if self.sync:
                h.floor = len(h.versions) - 1  # --sync: durable when acknowledged

    def settle(self, keys: list[str], nudge: Callable[[], None]) -> None:
        """Make everything this thread did so far known durable, by waiting for a flush
        cycle that began after it (see the module docstring). ``nudge`` commits one more
        change before each of the two cycles waited for, so that the flusher has work in
        them (a cycle with nothing to flush fsyncs nothing)."""
        before = self.lazy.fsyncs("data/meta.db")
        marks = {k: len(self.history[k].versions) - 1 for k in keys}
        deadline = time.monotonic() + SETTLE_WAIT
        for cycles in (1, 2):
            nudge()
            while self.lazy.fsyncs("data/meta.db") < before + cycles:
                if self.stop.is_set():
                    raise PowerCut
                if time.monotonic() > deadline:
                    self.stats.settle_timeouts += 1
                    return
                time.sleep(0.05)
        for k, mark in marks.items():
            self.history[k].floor = max(self.history[k].floor, mark)
        self.stats.settles += 1

    # --- the HTTP writer --------------------------------------------------------------------

    def http_writer(self) -> None:
        rng = random.Random(self.seeds[0])
        keys = [k for k in self.history if k.startswith("h/")]
        burst_keys = [k for k in self.history if k.startswith("b/")]
        with httpx.Client(base_url=self.url, timeout=60) as c:

            def put(key: str, data: bytes) -> None:
                r = c.post("/v1/artifacts", json={
                    "key": key, "mime_type": "application/octet-stream", "size": len(data)})
                assert r.status_code == 200, r.text
                r = c.post(r.json()["uri"], content=data)
                assert r.status_code == 200, r.text
                if data:
                    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest(), r.text

            def delete(key: str) -> None:
                r = c.delete(f"/v1/artifacts/{key}")
                assert r.status_code in (200, 204), r.text

            while True:
                self.begin()
                op = rng.choice(["put", "put", "put", "delete", "burst", "settle"])
                key = rng.choice(keys)
                if op == "delete" and self.history[key].versions[-1] is not None:
                    self.attempt(key, None, lambda key=key: delete(key))
                elif op == "burst":
                    self.stats.bursts += 1
                    for k in burst_keys:
                        data = rng.randbytes(rng.randint(1, 2000))
                        self.attempt(k, data, lambda k=k, data=data: put(k, data))
                elif op == "settle":

                    def nudge() -> None:
                        data = rng.randbytes(100)
                        self.attempt("h/nudge", data, lambda: put("h/nudge", data))

                    self.settle(keys + burst_keys, nudge)
                else:
                    data = rng.randbytes(rng.randint(0, rng.choice(SIZES)))
                    self.attempt(key, data, lambda key=key, data=data: put(key, data))

    # --- the mount writer -------------------------------------------------------------------

    def mount_writer(self) -> None:
        rng = random.Random(self.seeds[1])
        keys = [k for k in self.history if k.startswith("m/")]

        def write(key: str, data: bytes, sync: bool) -> None:
            path = self.mnt / key
            path.parent.mkdir(exist_ok=True)
            with open(path, "wb") as f:
                for pos in range(0, len(data), 65536):
                    f.write(data[pos:pos + 65536])
                if sync:
                    f.flush()
                    os.fsync(f.fileno())

        while True:
            self.begin()
            op = rng.choice(["write", "write", "fsync", "fsync", "unlink", "rename", "settle"])
            key = rng.choice(keys)
            data = rng.randbytes(rng.randint(0, rng.choice(SIZES)))
            if op == "unlink" and self.history[key].versions[-1] is not None:
                self.attempt(key, None, lambda key=key: os.unlink(self.mnt / key))
            elif op == "rename" and self.history[key].versions[-1] is not None:
                # Over another key, which may hold an artifact: one transaction moves the
                # row and removes the one it replaces.
                dst = rng.choice([k for k in keys if k != key])
                self.attempt_many(
                    {key: None, dst: self.history[key].versions[-1]},
                    lambda key=key, dst=dst: os.rename(self.mnt / key, self.mnt / dst))
                self.stats.renames += 1
            elif op == "fsync":
                self.attempt(key, data, lambda key=key, data=data: write(key, data, True))
                # close returned after fsync: durable from now on (RELIABILITY.md §1)
                self.history[key].floor = len(self.history[key].versions) - 1
                self.stats.fsync_closes += 1
            elif op == "settle":

                def nudge() -> None:
                    data = rng.randbytes(100)
                    self.attempt("m/nudge", data, lambda: write("m/nudge", data, False))

                self.settle(keys, nudge)
            else:
                self.attempt(key, data, lambda key=key, data=data: write(key, data, False))

    def run(self, writer: Callable[[], None]) -> None:
        try:
            writer()
        except PowerCut:
            pass
        except BaseException as exc:
            self.errors.append(exc)
            self.reached.set()  # end the round: the error fails the test


def observe(mnt: Path, url: str) -> dict[str, bytes]:
    """Every artifact with its bytes, read over HTTP; each must match its listed sha256 and
    size (never torn), and read the same through the mount."""
    found: dict[str, bytes] = {}
    with httpx.Client(base_url=url, timeout=60) as c:
        listed: dict[str, tuple[int, str]] = {}
        while True:
            r = c.get("/v1/artifacts", params={"start_index": len(listed), "limit": 1000})
            assert r.status_code == 200, r.text
            listed |= {a["key"]: (a["size"], a["sha256"]) for a in r.json()["data"]}
            if not r.json()["has_more"]:
                break
        for key, (size, sha) in listed.items():
            r = c.get(f"/v1/artifacts/{key}:content")
            assert r.status_code == 200, f"{key}: listed but reads {r.status_code} {r.text}"
            assert (len(r.content), hashlib.sha256(r.content).hexdigest()) == (size, sha), (
                f"{key}: torn: reads {len(r.content)} bytes that do not match its sha256")
            assert (mnt / key).read_bytes() == r.content, f"{key}: the mount reads other bytes"
            found[key] = r.content
    return found


def check(history: dict[str, History], found: dict[str, bytes], round_no: int,
          stats: Stats) -> None:
    """Every key holds a version it is allowed to after the cut; that is its new history."""
    stray = set(found) - set(history)
    assert not stray, f"round {round_no}: keys no one wrote: {sorted(stray)}"

    def show(v: Content) -> str:
        return "absent" if v is None else f"{len(v)} bytes {hashlib.sha256(v).hexdigest()[:12]}"

    for key, h in history.items():
        now = found.get(key)
        allowed = h.allowed()
        if h.floor > 0 or len(h.versions) == 1:
            stats.durable_checked += 1
        assert now in allowed, (
            f"round {round_no}: {key} holds {show(now)}; after the power cut it may hold only"
            f" {[show(v) for v in allowed]} (the first is its last version known durable;"
            f" all versions: {[show(v) for v in h.versions]})")
        if now != h.versions[-1] and not (h.in_flight and now == h.in_flight[0]):
            stats.lost += 1
        if h.in_flight:
            stats.cut_in_flight += 1
        history[key] = History([now])


def daemon(mnt: Path, data: Path, log: Path, *extra: str
           ) -> tuple[subprocess.Popen[bytes], str]:
    proc, line = start_daemon(mnt, data, log, *extra)
    if not line.startswith("ready"):
        unmount(mnt, proc)
        cannot_mount(f"the daemon said {line!r}:\n{log.read_text(errors='replace')[-3000:]}")
    return proc, line.partition(" ")[2].strip()


def clean_log(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-4000:]


def test_power_cut_loses_nothing_durable(tmp_path: Path) -> None:
    rng = random.Random(20261127)
    backing, lazy_mnt, mnt = tmp_path / "disk", tmp_path / "lazy", tmp_path / "mnt"
    (backing / "data").mkdir(parents=True)  # made by the user, durable before we start
    mnt.mkdir()
    data = lazy_mnt / "data"
    keys = ([f"h/k{i}.bin" for i in range(6)] + [f"m/k{i}.bin" for i in range(6)]
            + [f"b/k{i}.bin" for i in range(BURST)] + ["h/nudge", "m/nudge"])
    history = {k: History([None]) for k in keys}
    stats = Stats()
    started = time.monotonic()
    for round_no in range(ROUNDS + 1):
        log = tmp_path / f"daemon-{round_no}.log"
        with lazy_mounted(backing, lazy_mnt, tmp_path / "lazyfs.log") as lazy:
            # Recover, check, prove clean.
            proc, url = daemon(mnt, data, log)
            try:
                found = observe(mnt, url)
                check(history, found, round_no, stats)
            finally:
                unmount(mnt, proc)
            assert proc.returncode == 0, f"round {round_no}: daemon exited {proc.returncode}"
            clean_log(log)
            fsck_clean(data)
            if round_no == ROUNDS:
                r = subprocess.run([str(Path(sys.executable).with_name("artifactfs")), "fsck",
                                    "--data", str(data)], capture_output=True, check=False)
                assert r.returncode == 0 and r.stdout.endswith(b"clean\n"), r.stdout
                break

            # Work, then cut the power amid it.
            # Every third round with --sync: then every acknowledged change is durable.
            sync = round_no % 3 == 2
            stats.sync_rounds += sync
            proc, url = daemon(mnt, data, tmp_path / f"daemon-{round_no}-cut.log",
                               *(["--sync"] if sync else []))
            w = Workload(lazy, mnt, url, history, rng, stats, cut_after=rng.randint(5, 60),
                         sync=sync)
            threads = [threading.Thread(target=w.run, args=(f,))
                       for f in (w.http_writer, w.mount_writer)]
            try:
                for t in threads:
                    t.start()
                w.reached.wait(timeout=600)
                time.sleep(rng.uniform(0, 0.05))  # somewhere inside that operation
            finally:
                w.stop.set()
                try:
                    lazy.crash(rng.randrange(2**32))
                finally:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    unmount(mnt, proc)
                    for t in threads:
                        t.join(timeout=120)
            assert not w.errors, w.errors
    print(f"{ROUNDS} power cuts in {time.monotonic() - started:.0f} s: {stats}")
    # The cuts must land amid real work, and the durable claims must have been tested.
    assert stats.ops >= 5 * ROUNDS, stats
    assert stats.fsync_closes >= 1 and stats.settles >= 1 and stats.bursts >= 1, stats
    assert stats.renames >= 1 and stats.sync_rounds >= 1, stats
    assert stats.durable_checked >= ROUNDS, stats


# --- the model itself ----------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_lazyfs_keeps_only_what_was_made_durable(tmp_path: Path) -> None:
    """The rules of tests/lazyfs.py, each shown by a power cut: data needs the file's fsync,
    a name its directory's fsync (a rename both directories'), and syncfs does nothing on a
    FUSE file system, so lazyfs, like any FUSE daemon, never hears of it."""
    backing, mnt = tmp_path / "disk", tmp_path / "lazy"
    backing.mkdir()
    (backing / "old.txt").write_bytes(b"old")
    with lazy_mounted(backing, mnt, tmp_path / "lazyfs.log") as lazy:
        (mnt / "a").mkdir()
        (mnt / "b").mkdir()
        _fsync_dir(mnt)
        with open(mnt / "a" / "synced", "wb") as f:  # data and name durable
            f.write(b"1" * 10_000)
            os.fsync(f.fileno())
        with open(mnt / "a" / "named", "wb") as f:  # name durable, data never fsynced
            f.write(b"2" * 10_000)
        with open(mnt / "a" / "tmp", "wb") as f:  # data not yet fsynced
            f.write(b"3" * 10_000)
        _fsync_dir(mnt / "a")
        os.rename(mnt / "a" / "tmp", mnt / "a" / "final")  # after the fsync: lost
        with open(mnt / "a" / "final", "r+b") as f:
            os.fsync(f.fileno())  # the data of tmp, and not the new name
        with open(mnt / "b" / "moved", "wb") as f:
            f.write(b"4")
            os.fsync(f.fileno())
        _fsync_dir(mnt / "b")
        os.rename(mnt / "b" / "moved", mnt / "a" / "moved")
        _fsync_dir(mnt / "b")  # one parent of the rename only: the file is in neither
        (mnt / "old.txt").write_bytes(b"new, not synced")
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        fd = os.open(mnt / "old.txt", os.O_RDONLY)
        try:
            assert syncfs(fd) == 0
        finally:
            os.close(fd)
        assert lazy.fsyncs("old.txt") == 0, "syncfs reached the FUSE daemon after all"
        lazy.crash(0)
    assert sorted(os.listdir(backing)) == ["a", "b", "old.txt"]
    # Unsynced pages and length may each have been written back, or not.
    assert (backing / "old.txt").read_bytes() in (b"old", b"new", b"old" + bytes(12),
                                                  b"new, not synced")
    assert sorted(os.listdir(backing / "a")) == ["named", "synced", "tmp"]
    assert sorted(os.listdir(backing / "b")) == []
    assert (backing / "a" / "synced").read_bytes() == b"1" * 10_000
    assert set((backing / "a" / "named").read_bytes()) <= {ord("2"), 0}  # empty or torn
    assert (backing / "a" / "tmp").read_bytes() == b"3" * 10_000
    with lazy_mounted(backing, mnt, tmp_path / "lazyfs.log"):
        assert (mnt / "a" / "synced").read_bytes() == b"1" * 10_000
        assert sorted(os.listdir(mnt / "a")) == ["named", "synced", "tmp"]
