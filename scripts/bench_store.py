#!/usr/bin/env python3
"""Benchmark of the store layer; docs/PERFORMANCE.md (Method, The store) says what it shows.

    .venv/bin/python scripts/bench_store.py [--artifacts 1000000] [--big-dir 100000]
                                            [--commits 10000] [--dir /var/tmp]

1. Commits: N small artifacts through the real service API, both put_artifact and the API's
   create_upload_session + upload_content_to_session, against writing and renaming the same
   files on the native disk, in the same run, on the same file system, taking turns in blocks
   of 500. Prints the ratios (target: < 3).
2. Query plans: a metadata database with 1,000,000 artifacts (rows inserted directly with one
   executemany, since the point is the plans, not the commit path), one directory of them with
   100,000 children. Prints EXPLAIN QUERY PLAN of every query a lookup, a readdir and a listing
   use, and times them: nothing may SCAN the table.
3. Paging: list_artifacts through 100k+ artifacts page by page; the first and the last pages
   must cost the same (the cursor cache keyed by start_index), i.e. paging is not O(n^2).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from artifactfs import open_store
from artifactfs.store import ArtifactStore
from artifactfs.store.metadata import ENTRY_COLUMNS, Metadata
from artifactfs.store.schema import ROOT_ID


def plan(store: ArtifactStore, sql: str, params: tuple[object, ...]) -> list[str]:
    return [r[3] for r in store.meta.conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


def show_plan(name: str, lines: list[str]) -> None:
    scan = any(line.startswith("SCAN entries") and "INDEX" not in line for line in lines)
    print(f"  {name:<34} {' | '.join(lines)}{'   <-- FULL SCAN' if scan else ''}")


# --- 1. commits ----------------------------------------------------------------------------

BLOCK = 500  # commits per block; the three ways take turns block by block


def _key(i: int) -> str:
    return f"files/d{i // 100:03d}/a{i:06d}.bin"


def native_block(root: Path, payloads: list[bytes], lo: int, hi: int) -> tuple[float, float]:
    """Write each file under a temporary name and rename it into place, as a careful tool does
    (the directories exist already: made before the clock starts)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(lo, hi):
        tmp = f"{root}/tmp/{i}.part"
        with open(tmp, "wb") as f:
            f.write(payloads[i])
        os.rename(tmp, f"{root}/{_key(i)}")
    return time.perf_counter() - t0, time.process_time() - c0


async def session_block(store: ArtifactStore, payloads: list[bytes], lo: int,
                        hi: int) -> tuple[float, float]:
    """The Artifacts API's way: create_upload_session, then upload_content_to_session."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(lo, hi):
        s = await store.create_upload_session(_key(i), "application/octet-stream",
                                              len(payloads[i]))
        await store.upload_content_to_session(s.id, payloads[i])
    return time.perf_counter() - t0, time.process_time() - c0


async def put_block(store: ArtifactStore, payloads: list[bytes], lo: int,
                    hi: int) -> tuple[float, float]:
    """put_artifact: one call, one transaction, no session row."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(lo, hi):
        await store.put_artifact(_key(i), payloads[i])
    return time.perf_counter() - t0, time.process_time() - c0


async def one_round(base: Path, payloads: list[bytes]) -> dict[str, tuple[float, float]]:
    """One round of N commits each way, interleaved in blocks of BLOCK: the machine's load
    changes by the second (other test suites share it), and taking turns puts the three ways
    under the same load; whole runs back to back gave ratios from 0.5x to 10x."""
    n = len(payloads)
    native = base / "native"
    (native / "tmp").mkdir(parents=True)
    for d in range(n // 100 + 1):
        (native / "files" / f"d{d:03d}").mkdir(parents=True)
    totals = {"native": [0.0, 0.0], "session": [0.0, 0.0], "put": [0.0, 0.0]}
    async with open_store(base / "session") as sessions, open_store(base / "put") as puts:
        for b, lo in enumerate(range(0, n, BLOCK)):
            hi = min(n, lo + BLOCK)
            ways = [("native", None), ("session", sessions), ("put", puts)]
            for name, store in ways[b % 3:] + ways[:b % 3]:
                if store is None:
                    w, c = native_block(native, payloads, lo, hi)
                elif name == "session":
                    w, c = await session_block(store, payloads, lo, hi)
                else:
                    w, c = await put_block(store, payloads, lo, hi)
                totals[name][0] += w
                totals[name][1] += c
        for store in (sessions, puts):
            assert (await store.get_artifact(_key(1))).size == len(payloads[1])
    return {k: (v[0], v[1]) for k, v in totals.items()}


async def bench_commits(base: Path, n: int, size: int, repeats: int) -> None:
    print(f"\n== 1. committing {n} artifacts of {size} bytes ({repeats} rounds,"
          f" interleaved in blocks of {BLOCK}) ==")
    payloads = [os.urandom(size) for _ in range(n)]
    rounds: list[dict[str, tuple[float, float]]] = []
    floors: list[float] = []
    # Nothing is deleted until every round is done: ext4 scans past recently deleted inodes
    # when it allocates one (recently_deleted() in perf), which made whichever side ran right
    # after a cleanup pay for it.
    for r in range(repeats):
        rounds.append(await one_round(base / f"round{r}", payloads))
        floors.append(sql_floor(base / f"floor{r}", n))
    for r in range(repeats):
        shutil.rmtree(base / f"round{r}")
        shutil.rmtree(base / f"floor{r}")

    def per(name: str, i: int) -> str:
        return f"{min(x[name][i] for x in rounds) / n * 1e6:.0f}"

    def ratio(name: str, i: int) -> str:
        rs = sorted(x[name][i] / x["native"][i] for x in rounds)
        return f"{statistics.median(rs):.2f} (min {rs[0]:.2f}, max {rs[-1]:.2f})"

    print(f"  native write+rename: best {per('native', 0)} us/file (cpu {per('native', 1)} us)")
    for name, label in (("put", "put_artifact (one call per artifact)"),
                        ("session", "create_upload_session + upload_content_to_session")):
        print(f"  {label}: best {per(name, 0)} us/artifact (cpu {per(name, 1)} us)")
        print(f"    ratio to native, median of {repeats} rounds: wall {ratio(name, 0)},"
              f" cpu {ratio(name, 1)}  (target < 3)")
    print("  per round (wall s): "
          + ", ".join(f"{k} {[round(x[k][0], 3) for x in rounds]}"
                      for k in ("native", "put", "session")))
    print(f"  statements per session commit: {await statements_per_commit(base / 'count')}")
    floor = sorted(f / x["native"][0] for f, x in zip(floors, rounds, strict=True))
    print(f"  floor: the SQL of the session path alone (same statements, no files, no service):"
          f" best {min(floors) / n * 1e6:.0f} us/artifact, median {statistics.median(floor):.2f}x"
          f" native (min {floor[0]:.2f})")


def sql_floor(root: Path, n: int) -> float:
    """What the two write transactions of a commit cost by themselves, on the machine it runs on."""
    root.mkdir()
    meta = Metadata(root / "meta.db")
    conn = meta.conn
    cols = ENTRY_COLUMNS
    t0 = time.perf_counter()
    for i in range(n):
        sid, key, parent = f"s{i:08d}", f"files/d{i // 100:03d}/a{i:06d}.bin", "files"
        with meta.transaction():
            conn.execute(f"SELECT {cols} FROM entries WHERE key IN (?, ?, ?)",
                         (key, key.rpartition("/")[0], parent)).fetchall()
            conn.execute(
                'INSERT INTO sessions (id, origin, key, size, "offset", mime_type, created_at,'
                " expires_at) VALUES (?, 'http', ?, 1024, 0, 'a/b', 1, 2)", (sid, key))
        conn.execute("SELECT * FROM sessions WHERE id = ?", (sid,)).fetchone()
        with meta.transaction():
            conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
            conn.execute(f"SELECT {cols} FROM entries WHERE key IN (?, ?)",
                         (key, key.rpartition("/")[0])).fetchall()
            conn.execute(
                "INSERT INTO entries (parent_id, name, key, kind, mode, mtime_ns, ctime_ns,"
                " blob_id, size, sha256, mime_type, created_at, epoch) VALUES"
                " (1, ?, ?, 'file', 420, 1, 1, ?, 1024, ?, 'a/b', 1, 1)",
                (key.rpartition("/")[2], key, os.urandom(16).hex(), "0" * 64))
    elapsed = time.perf_counter() - t0
    meta.close()
    return elapsed


async def statements_per_commit(root: Path) -> str:
    async with open_store(root) as store:
        await store.upload_content_to_session(
            (await store.create_upload_session("warm/x", "text/plain", 1)).id, b"x")
        seen: list[str] = []
        store.meta.conn.set_trace_callback(seen.append)
        for i in range(100):
            s = await store.create_upload_session(f"warm/a{i}", "text/plain", 1)
            await store.upload_content_to_session(s.id, b"x")
        store.meta.conn.set_trace_callback(None)
    kinds: dict[str, int] = {}
    for stmt in seen:
        kinds[stmt.split()[0]] = kinds.get(stmt.split()[0], 0) + 1
    return f"{len(seen) / 100:.1f} " + str({k: v / 100 for k, v in kinds.items()})


# --- 2. query plans on 1M artifacts --------------------------------------------------------

def build_million(store: ArtifactStore, n_artifacts: int, big_dir: int) -> None:
    """Directory rows and artifact rows straight into the tables, in one transaction."""
    conn = store.meta.conn
    now = time.time_ns()
    rest = n_artifacts - big_dir
    per_dir = 1000
    n_dirs = rest // per_dir
    with store.meta.transaction():
        top = conn.execute(
            "INSERT INTO entries (parent_id, name, key, kind, mode, mtime_ns, ctime_ns)"
            " VALUES (?, 'datasets', 'datasets', 'dir', 493, ?, ?)",
            (ROOT_ID, now, now)).lastrowid
        big = conn.execute(
            "INSERT INTO entries (parent_id, name, key, kind, mode, mtime_ns, ctime_ns)"
            " VALUES (?, 'big', 'big', 'dir', 493, ?, ?)", (ROOT_ID, now, now)).lastrowid
        dir_ids = []
        for d in range(n_dirs):
            dir_ids.append(conn.execute(
                "INSERT INTO entries (parent_id, name, key, kind, mode, mtime_ns, ctime_ns)"
                " VALUES (?, ?, ?, 'dir', 493, ?, ?)",
                (top, f"shard{d:04d}", f"datasets/shard{d:04d}", now, now)).lastrowid)

        def rows():  # type: ignore[no-untyped-def]
            digest = "0" * 64
            for d, did in enumerate(dir_ids):
                for i in range(per_dir):
                    name = f"part-{i:05d}.jsonl"
                    yield (did, name, f"datasets/shard{d:04d}/{name}", now, now,
                           f"{d:04x}{i:05x}{'0' * 23}", 1234, digest, now // 10**9)
            for i in range(big_dir):
                name = f"f{i:06d}.bin"
                yield (big, name, f"big/{name}", now, now, f"b{i:07x}{'0' * 24}", 1, digest,
                       now // 10**9)

        conn.executemany(
            "INSERT INTO entries (parent_id, name, key, kind, mode, mtime_ns, ctime_ns,"
            " blob_id, size, sha256, mime_type, created_at)"
            " VALUES (?, ?, ?, 'file', 420, ?, ?, ?, ?, ?, 'application/jsonl', ?)", rows())
    conn.execute("ANALYZE")


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


async def bench_queries(base: Path, n_artifacts: int, big_dir: int) -> None:
    print(f"\n== 2. query plans with {n_artifacts} artifacts, one directory of {big_dir} ==")
    root = base / "million"
    async with open_store(root) as store:
        t0 = time.perf_counter()
        build_million(store, n_artifacts, big_dir)
        print(f"  built in {time.perf_counter() - t0:.1f} s")
    (root / "clean").unlink()  # open as after a crash: the full recovery runs
    t0 = time.perf_counter()
    async with open_store(root) as store:
        print(f"  open after a crash (full recovery): {time.perf_counter() - t0:.3f} s")
        count = store.meta.conn.execute(
            "SELECT count(*) FROM entries WHERE kind = 'file'").fetchone()[0]
        print(f"  artifacts: {count}")
        big = store.lookup(ROOT_ID, "big")
        rng = random.Random(1)
        shards = (n_artifacts - big_dir) // 1000
        keys = [f"datasets/shard{rng.randrange(shards):04d}/part-"
                f"{rng.randrange(1000):05d}.jsonl" for _ in range(2000)]
        print("  EXPLAIN QUERY PLAN:")
        E = ENTRY_COLUMNS
        show_plan("get_artifact (entry_by_key)",
                  plan(store, f"SELECT {E} FROM entries WHERE key = ?", (keys[0],)))
        show_plan("lookup (child)", plan(
            store, f"SELECT {E} FROM entries WHERE parent_id = ? AND name = ?", (big.id, "x")))
        show_plan("readdir (children)", plan(
            store, f"SELECT {E} FROM entries WHERE parent_id = ? AND id > ? ORDER BY id LIMIT ?",
            (big.id, 0, 1000)))
        show_plan("getattr nlink (count_subdirs)", plan(
            store, "SELECT count(*) FROM entries WHERE parent_id = ? AND kind = 'dir'",
            (big.id,)))
        show_plan("rmdir (has_children)", plan(
            store, "SELECT 1 FROM entries WHERE parent_id = ? LIMIT 1", (big.id,)))
        page_sql = (f"SELECT {E} FROM entries INDEXED BY sqlite_autoindex_entries_1"
                    " WHERE kind = 'file' AND blob_id IS NOT NULL AND key > ? AND key < ?"
                    " ORDER BY key LIMIT ? OFFSET ?")
        show_plan("list_artifacts (prefix, cursor)",
                  plan(store, page_sql, ("big/f000100.bin", "big0", 101, 0)))
        show_plan("rename dir (rekey_subtree)", plan(
            store, "UPDATE entries SET key = ? || substr(key, ?) WHERE key >= ? AND key < ?",
            ("x/", 5, "big/", "big0")))
        # The next two run only after an unclean shutdown, once each: one pass over the table
        # (schema.py says why they have no index: every commit would pay for it).
        show_plan("start-up after a crash (not_durable)", plan(
            store, f"SELECT {E} FROM entries WHERE id > ? AND epoch > ? ORDER BY id LIMIT ?",
            (0, 0, 1000)))
        show_plan("start-up after a crash (orphan blobs)", plan(
            store, "SELECT blob_id FROM entries WHERE blob_id IS NOT NULL ORDER BY blob_id", ()))
        show_plan("start-up (pending files)", plan(
            store, f"SELECT {E} FROM entries WHERE kind = 'file' AND blob_id IS NULL AND id NOT IN"
            " (SELECT entry_id FROM sessions WHERE entry_id IS NOT NULL)", ()))

        it = iter(keys * 2)

        async def lookups() -> float:
            t0 = time.perf_counter()
            for _ in range(2000):
                await store.get_artifact(next(it))
            return (time.perf_counter() - t0) / 2000

        print(f"  get_artifact of a random key among {count}: {await lookups() * 1e6:.1f} us")

        t0 = time.perf_counter()
        after, seen, pages = 0, 0, []
        while True:
            p0 = time.perf_counter()
            page = store.readdir(big.id, after, 1000)
            pages.append(time.perf_counter() - p0)
            if not page:
                break
            seen += len(page)
            after = page[-1].id
        total = time.perf_counter() - t0
        print(f"  readdir of the {seen}-entry directory, 1000 per call: {total:.3f} s;"
              f" first page {pages[0] * 1e3:.2f} ms, last full page {pages[-2] * 1e3:.2f} ms")
        t = timed(lambda: store.subdir_count(big.id), 20)
        print(f"  subdir_count (nlink) of that directory: {t * 1e6:.0f} us")
        t = timed(lambda: store.lookup(big.id, "f054321.bin"), 2000)
        print(f"  lookup of one name in it: {t * 1e6:.1f} us")
        await bench_paging(store, "big/", big_dir)
        await bench_paging(store, "", min(count, 300_000))


async def bench_paging(store: ArtifactStore, prefix: str, n: int) -> None:
    limit = 1000
    label = f"prefix {prefix!r}" if prefix else "no prefix"
    times: list[float] = []
    got = 0
    t0 = time.perf_counter()
    while got < n:
        p0 = time.perf_counter()
        page = await store.list_artifacts(got, limit, prefix=prefix or None)
        times.append(time.perf_counter() - p0)
        got += len(page.data)
        if not page.has_more:
            break
    total = time.perf_counter() - t0
    first = statistics.mean(times[:10])
    last = statistics.mean(times[-10:])
    print(f"\n== 3. list_artifacts paging, {label}: {got} artifacts in {len(times)} pages"
          f" of {limit} ==")
    print(f"  total {total:.2f} s; first 10 pages {first * 1e3:.2f} ms/page,"
          f" last 10 pages {last * 1e3:.2f} ms/page (ratio {last / first:.2f})")
    # The same walk with the cursor cache emptied before every page: each page then skips
    # start_index rows with OFFSET, which is what makes paging O(n^2) without the cache.
    t0 = time.perf_counter()
    pos = 0
    while pos < got:
        store._cursors.clear()
        pos += len((await store.list_artifacts(pos, limit, prefix=prefix or None)).data)
    print(f"  the same walk with no cursor cache (OFFSET every page): "
          f"{time.perf_counter() - t0:.2f} s")
    # Deterministic: SQLite VM steps (x100) for the first and the last page, reached by the
    # cursor (a walk from 0) and by OFFSET (a client jumping there with no cursor).
    conn = store.meta.conn
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0

    async def cost(start: int) -> int:
        nonlocal steps
        steps = 0
        conn.set_progress_handler(tick, 100)
        try:
            await store.list_artifacts(start, limit, prefix=prefix or None)
        finally:
            conn.set_progress_handler(None, 0)
        return steps

    last_start = (got - 1) // limit * limit
    pos = 0
    while pos < last_start:  # re-walk so the last page's cursor is cached
        pos += len((await store.list_artifacts(pos, limit, prefix=prefix or None)).data)
    by_cursor = await cost(last_start)
    store._cursors.clear()
    by_offset = await cost(last_start)
    first = await cost(0)
    print(f"  SQLite VM steps (x100): first page {first}; last page by cursor {by_cursor},"
          f" by OFFSET {by_offset}")
    store._cursors.clear()  # what a client jumping straight to a deep page pays
    p0 = time.perf_counter()
    await store.list_artifacts(got - limit, limit, prefix=prefix or None)
    print(f"  one deep page without a cached cursor (OFFSET {got - limit}):"
          f" {(time.perf_counter() - p0) * 1e3:.1f} ms")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", type=int, default=1_000_000)
    ap.add_argument("--big-dir", type=int, default=100_000)
    ap.add_argument("--commits", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to work (default: a temp dir)")
    ap.add_argument("--skip", choices=["commits", "queries"], default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-store-") as tmp:
        base = Path(tmp)
        st = os.statvfs(base)
        print(f"working in {base} (python {sys.version.split()[0]}, {os.cpu_count()} cpus,"
              f" {st.f_bavail * st.f_frsize // 2**30} GiB free)")
        if args.skip != "commits":
            await bench_commits(base, args.commits, args.size, args.repeats)
        if args.skip != "queries":
            await bench_queries(base, args.artifacts, args.big_dir)


if __name__ == "__main__":
    trio.run(main)
