"""Load: 8 writers and 8 readers through the mount and 4 HTTP clients, for a bounded time
(~15 s; 60 s with ARTIFACTFS_TORTURE_SCALE > 1).

- no error a user did not cause (a reader may find a key gone that a writer just deleted;
  nothing else);
- nothing lost or corrupted: every read returns a whole version some writer committed to that
  key, and at the end the store holds exactly what the writers were last told, through both
  faces, and fsck is clean;
- the daemon's memory stays flat (VmRSS sampled through the run; the last part of the run may
  not sit far above the early part).

Writers replace shared keys the way careful programs do (write a temporary name, then rename
it over the key) so that readers of those keys see whole versions; they also write private
files in place, with fsync now and then, delete and rename.
"""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from conftest import SCALE
from mountutil import mounted

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.timeout(400)]

DURATION = 60.0 if SCALE > 1 else 15.0
WRITERS, READERS, HTTP_CLIENTS = 8, 8, 4
SIZES = [0, 100, 4096, 65_536, 300_000, 1_500_000]
ARTIFACTFS = str(Path(sys.executable).with_name("artifactfs"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Model:
    """What every key holds now (exact: each key has one owner) and every version it held."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: dict[str, str | None] = {}
        self.versions: dict[str, set[str]] = defaultdict(set)

    def set(self, key: str, digest: str | None) -> None:
        with self.lock:
            self.now[key] = digest
            if digest is not None:
                self.versions[key].add(digest)

    def may_become(self, key: str, digest: str) -> None:
        """A commit is under way: readers may see its bytes from now on."""
        with self.lock:
            self.versions[key].add(digest)

    def readable(self) -> list[str]:
        with self.lock:
            return [k for k, v in self.now.items() if v is not None]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_load_through_mount_and_http(tmp_path: Path) -> None:
    model = Model()
    stop = threading.Event()
    errors: list[BaseException] = []
    counts: dict[str, int] = defaultdict(int)

    def guarded(name: str, fn, *args) -> threading.Thread:  # type: ignore[no-untyped-def]
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t

    with mounted(tmp_path) as m:
        mnt = m.path

        def writer(w: int) -> None:
            rng = random.Random(w)
            d = mnt / f"w{w}"
            d.mkdir()
            shared = [f"w{w}/s{j}.bin" for j in range(6)]
            private = [f"w{w}/p{j}.bin" for j in range(6)]
            while not stop.is_set():
                data = rng.randbytes(rng.choice(SIZES))
                op = rng.random()
                if op < 0.5:  # replace a shared key: temp name, then rename over it
                    key = rng.choice(shared)
                    tmp = d / f".tmp{rng.randrange(1000)}"
                    tmp.write_bytes(data)
                    model.may_become(key, sha(data))
                    os.rename(tmp, mnt / key)
                    model.set(key, sha(data))
                elif op < 0.8:  # a private file written in place
                    key = rng.choice(private)
                    with open(mnt / key, "wb") as f:
                        f.write(data)
                        if rng.random() < 0.2:
                            f.flush()
                            os.fsync(f.fileno())
                    model.set(key, sha(data))
                elif op < 0.9:
                    key = rng.choice(private)
                    if model.now.get(key) is not None:
                        os.unlink(mnt / key)
                        model.set(key, None)
                else:
                    src, dst = rng.sample(private, 2)
                    if model.now.get(src) is not None:
                        os.rename(mnt / src, mnt / dst)
                        model.set(dst, model.now[src])
                        model.set(src, None)
                counts["writes"] += 1

        def reader(r: int) -> None:
            rng = random.Random(1000 + r)
            while not stop.is_set():
                keys = [k for k in model.readable() if "/s" in k or k.startswith("h")]
                if not keys:
                    time.sleep(0.01)
                    continue
                key = rng.choice(keys)
                try:
                    data = (mnt / key).read_bytes()
                except FileNotFoundError:
                    if key.startswith("h"):  # an HTTP client may have deleted it
                        continue
                    raise
                # Nothing else: not even ESTALE for a name replaced twice within one open(2)
                # (the kernel retries once; fs/replaced.py answers its retry).
                with model.lock:
                    known = sha(data) in model.versions[key]
                assert known, (
                    f"{key}: read {len(data)} bytes that no writer committed")
                counts["reads"] += 1
                if rng.random() < 0.05:
                    os.listdir(mnt / key.partition("/")[0])

        def http_client(h: int) -> None:
            rng = random.Random(2000 + h)
            keys = [f"h{h}/k{j}.bin" for j in range(6)]
            with httpx.Client(base_url=m.url, timeout=60) as c:
                while not stop.is_set():
                    key = rng.choice(keys)
                    op = rng.random()
                    if op < 0.5:
                        data = rng.randbytes(rng.choice(SIZES))
                        r = c.post("/v1/artifacts", json={"key": key, "size": len(data),
                                                          "mime_type": "a/b"})
                        assert r.status_code == 200, r.text
                        model.may_become(key, sha(data))
                        r = c.post(r.json()["uri"], content=data)
                        assert r.status_code == 200, r.text
                        model.set(key, sha(data))
                    elif op < 0.8:
                        r = c.get(f"/v1/artifacts/{key}:content")
                        want = model.now.get(key)
                        if want is None:
                            assert r.status_code == 404, r.text
                        else:
                            assert r.status_code == 200 and sha(r.content) == want, key
                    elif op < 0.9:
                        if model.now.get(key) is not None:
                            r = c.delete(f"/v1/artifacts/{key}")
                            assert r.status_code == 204, r.text
                            model.set(key, None)
                    else:
                        r = c.get("/v1/artifacts", params={"limit": 1000})
                        assert r.status_code == 200, r.text
                    counts["http"] += 1

        rss: list[int] = []
        threads = [guarded(f"writer{w}", writer, w) for w in range(WRITERS)]
        threads += [guarded(f"reader{r}", reader, r) for r in range(READERS)]
        threads += [guarded(f"http{h}", http_client, h) for h in range(HTTP_CLIENTS)]
        end = time.monotonic() + DURATION
        while time.monotonic() < end and not stop.is_set():
            rss.append(rss_kib(m.proc.pid))
            time.sleep(0.25)
        stop.set()
        for t in threads:
            t.join(60)
            assert not t.is_alive(), f"{t.name} is stuck"
        if errors:
            raise errors[0]
        assert m.proc.poll() is None, "the daemon died under load"

        # Nothing lost, nothing corrupted: the store holds exactly the model, in both faces.
        with httpx.Client(base_url=m.url, timeout=60) as c:
            listed: dict[str, str] = {}
            while True:
                page = c.get("/v1/artifacts", params={"start_index": len(listed),
                                                      "limit": 1000}).json()
                listed |= {a["key"]: a["sha256"] for a in page["data"]}
                if not page["has_more"]:
                    break
        expected = {k: v for k, v in model.now.items() if v is not None}
        assert listed == expected
        for key, digest in expected.items():
            assert sha((mnt / key).read_bytes()) == digest, key
        stray = [p for p in mnt.rglob("*") if p.is_file() and str(p.relative_to(mnt))
                 not in expected]
        assert not stray, f"files no writer kept: {stray[:10]}"
        data_dir = m.data_dir

    r = subprocess.run([ARTIFACTFS, "fsck", "--data", os.fspath(data_dir)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr

    assert counts["writes"] > 100 and counts["reads"] > 100 and counts["http"] > 50, counts
    # Memory is flat: after warm-up, the last quarter of the run does not sit well above
    # the second quarter (allocator noise and caches settle in the first).
    q = len(rss) // 4
    early, late = statistics.median(rss[q:2 * q]), statistics.median(rss[3 * q:])
    print(f"load: {dict(counts)}; VmRSS KiB early {early:.0f} late {late:.0f} max {max(rss)}")
    assert late <= early * 1.25 + 16 * 1024, f"daemon memory grew: {early} -> {late} KiB"
