"""The data set every file system shows: the same relative paths as plain files in WORK/native
and as artifacts (keys) in the store WORK/store, plus WORK/memstore with many tiny artifacts for
the memory workload. Artifacts are committed through the service API (create_upload_session +
upload_content_to_session), so every row has its own blob and digest, as in real use.

Building is slow at full size (1M artifacts: minutes), so each part is reused while its sizes are
unchanged: WORK/manifest.json records what was built, and a part is rebuilt only when it differs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

MIB = 1 << 20
CHUNK = 8 * MIB
MIME = "application/octet-stream"


@dataclass(frozen=True)
class Sizes:
    big_mib: int  # each large artifact (sequential read, cp/dd source, 4 readers)
    flat: int  # entries of the flat directory (ls -l, stat)
    tree: int  # artifacts of the tree (find)
    tree_dirs: int  # directories they are spread over
    small: int  # 4 KiB artifacts (open+read+close)
    mem: int  # artifacts of the memory store (listing while watching VmHWM)
    big_count: int = 4
    small_size: int = 4096

    def big(self, i: int) -> str:
        return f"big/large-{i}.bin"

    def flat_names(self) -> list[str]:
        return [f"e{i:07d}" for i in range(self.flat)]

    def tree_paths(self) -> Iterator[str]:
        per_dir = -(-self.tree // self.tree_dirs)
        for i in range(self.tree):
            yield f"tree/d{i // per_dir:04d}/f{i:07d}"

    def small_names(self) -> list[str]:
        return [f"s{i:06d}" for i in range(self.small)]

    def mem_dirs(self) -> list[str]:
        return [f"m/d{d:04d}" for d in range(-(-self.mem // 1000))]

    def mem_paths(self) -> Iterator[str]:
        for i in range(self.mem):
            yield f"m/d{i // 1000:04d}/a{i:07d}"

    def main_part(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("mem")
        return d


@functools.cache
def _pad() -> bytes:
    return random.Random(20261127).randbytes(CHUNK)


def big_chunks(index: int, size: int) -> Iterator[bytes]:
    """Incompressible bytes, different in every chunk and file, the same on every call."""
    pad = _pad()
    off = 0
    while off < size:
        n = min(CHUNK, size - off)
        head = f"{index:08d}:{off:016d}:".encode()
        yield head + pad[len(head):n]
        off += n


class Manifest:
    def __init__(self, work: Path) -> None:
        self.path = work / "manifest.json"
        self.parts = json.loads(self.path.read_text()) if self.path.exists() else {}

    def matches(self, part: str, spec: dict) -> bool:
        return self.parts.get(part) == spec

    def record(self, part: str, spec: dict | None) -> None:
        if spec is None:
            self.parts.pop(part, None)
        else:
            self.parts[part] = spec
        self.path.write_text(json.dumps(self.parts, indent=1))


def _progress(what: str, done: int, total: int, t0: float) -> None:
    if done and (done % 50_000 == 0 or done == total):
        rate = done / max(time.perf_counter() - t0, 1e-9)
        print(f"  {what}: {done}/{total} ({rate:,.0f}/s)", flush=True)


def build_native(work: Path, sizes: Sizes) -> None:
    man = Manifest(work)
    spec = sizes.main_part()
    root = work / "native"
    if man.matches("native", spec) and root.is_dir():
        return
    print(f"building the native data set in {root}", flush=True)
    man.record("native", None)
    shutil.rmtree(root, ignore_errors=True)
    (root / "big").mkdir(parents=True)
    for i in range(sizes.big_count):
        with open(root / sizes.big(i), "wb") as f:
            for chunk in big_chunks(i, sizes.big_mib * MIB):
                f.write(chunk)
    for sub, names, data in (("flat", sizes.flat_names(), b"x"),
                             ("small", sizes.small_names(), b"s" * sizes.small_size)):
        d = root / sub
        d.mkdir()
        for n in names:
            with open(d / n, "wb") as f:
                f.write(data)
    for rel in sizes.tree_paths():
        p = root / rel
        if not p.parent.is_dir():
            p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    (root / "incoming").mkdir()
    os.sync()
    man.record("native", spec)


async def _put(store, key: str, chunks, size: int) -> None:
    s = await store.create_upload_session(key, MIME, size)
    if size == 0:
        await store.upload_content_to_session(s.id, b"")
        return
    off = 0
    for chunk in chunks:
        await store.upload_content_to_session(s.id, chunk, offset=off)
        off += len(chunk)


async def _fill_store(data: Path, sizes: Sizes) -> None:
    from artifactfs import open_store

    async with open_store(data) as store:
        for i in range(sizes.big_count):
            await _put(store, sizes.big(i), big_chunks(i, sizes.big_mib * MIB),
                       sizes.big_mib * MIB)
        t0 = time.perf_counter()
        for n, name in enumerate(sizes.flat_names(), 1):
            await _put(store, f"flat/{name}", [b"x"], 1)
            _progress("flat", n, sizes.flat, t0)
        small = b"s" * sizes.small_size
        for name in sizes.small_names():
            await _put(store, f"small/{name}", [small], len(small))
        t0 = time.perf_counter()
        for n, key in enumerate(sizes.tree_paths(), 1):
            await _put(store, key, [b"x"], 1)
            _progress("tree", n, sizes.tree, t0)
        # incoming/ for the write workloads: a directory row, made by committing and
        # deleting a placeholder (directories stay when their last artifact goes).
        await _put(store, "incoming/.placeholder", [b""], 0)
        await store.delete_artifact("incoming/.placeholder")


async def _fill_memstore(data: Path, sizes: Sizes) -> None:
    from artifactfs import open_store

    async with open_store(data) as store:
        t0 = time.perf_counter()
        for n, key in enumerate(sizes.mem_paths(), 1):
            await _put(store, key, [b"x"], 1)
            _progress("memory store", n, sizes.mem, t0)


def _schema() -> int:
    from artifactfs.store.schema import SCHEMA_VERSION

    return SCHEMA_VERSION


def build_store(work: Path, sizes: Sizes) -> None:
    man = Manifest(work)
    spec = {**sizes.main_part(), "schema": _schema()}
    data = work / "store"
    if man.matches("store", spec) and (data / "meta.db").exists():
        return
    print(f"building the artifactfs store in {data} (through the service API)", flush=True)
    man.record("store", None)
    shutil.rmtree(data, ignore_errors=True)
    trio.run(_fill_store, data, sizes)
    man.record("store", spec)


def build_memstore(work: Path, sizes: Sizes) -> None:
    man = Manifest(work)
    spec = {"mem": sizes.mem, "schema": _schema()}
    data = work / "memstore"
    if man.matches("memstore", spec) and (data / "meta.db").exists():
        return
    print(f"building the memory store in {data}: {sizes.mem:,} artifacts of 1 byte,"
          " committed one by one through the service API", flush=True)
    man.record("memstore", None)
    shutil.rmtree(data, ignore_errors=True)
    trio.run(_fill_memstore, data, sizes)
    man.record("memstore", spec)
