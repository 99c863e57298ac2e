"""Layer 5, without a kernel: when the mount shares an inode's read handle with pyfuse3.

pyfuse3 answers read-only opens of a shared inode in C (fs/shared_reads.py); what these tests
check is the mount's side of it: which opens share, and that every change which makes the
shared handle wrong for a new opener unshares the inode first (another face's replace or
delete through the Python store API, a writer, a truncate, unlink, rename over it, FORGET, a
thread in the kernel's ESTALE retry), and that idle handles are bounded. Handlers are called
directly, so no open is ever counted by pyfuse3's C side: an unshared handle closes at once.
The real mount shows the rest (test_mount_shared_reads.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
from storeutil import put

from artifactfs import ArtifactStore, open_store
from artifactfs.fs import shared_reads
from artifactfs.fs.kernel_cache import KernelCache
from artifactfs.fs.operations import Operations

pytestmark = pytest.mark.skipif(not shared_reads.AVAILABLE,
                                reason="pyfuse3 without the patch of scripts/setup")

ROOT = pyfuse3.ROOT_INODE
CTX = pyfuse3.RequestContext()  # uid 0, gid 0, pid 0


class QuietCache(KernelCache):
    def queue(self, item: object) -> None:  # type: ignore[override]
        pass


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ArtifactStore]:
    async with open_store(tmp_path / "data") as s:
        yield s


def _make(store: ArtifactStore, max_idle: int | None = None) -> Operations:
    ops = Operations(store, QuietCache())
    if max_idle is not None:
        ops.shared.max_idle = max_idle
    return ops


@pytest.fixture
def ops(store: ArtifactStore) -> Iterator[Operations]:
    made = _make(store)
    yield made
    # pyfuse3's table is the module's, not the Operations': leave it empty for the next test.
    made.shared.close_idle()
    assert SharedStats.now()["shared"] == 0


class SharedStats:
    @staticmethod
    def now() -> dict[str, int]:
        return pyfuse3.shared_read_stats()


async def inode_of(ops: Operations, name: str) -> int:
    return (await ops.lookup(ROOT, name.encode(), CTX)).st_ino


async def open_ro(ops: Operations, inode: int) -> int:
    return (await ops.open(inode, os.O_RDONLY, CTX)).fh


async def test_read_only_opens_of_a_committed_artifact_share_one_handle(
        ops: Operations, store: ArtifactStore) -> None:
    await put(store, "a.bin", b"hello")
    inode = await inode_of(ops, "a.bin")
    fh = await open_ro(ops, inode)
    assert pyfuse3.shared_read_handle(inode) == fh
    assert await open_ro(ops, inode) == fh  # a thread whose opens reach Python gets it too
    assert await ops.read(fh, 0, 100) == b"hello"
    info = await ops.open(inode, os.O_RDONLY, CTX)
    assert info.keep_cache and info.noflush
    # O_TRUNC (even read-only) and writers never get it.
    assert (await ops.open(inode, os.O_RDONLY | os.O_TRUNC, CTX)).fh != fh


async def test_another_faces_replace_and_delete_unshare(
        ops: Operations, store: ArtifactStore) -> None:
    await put(store, "a.bin", b"one")
    inode = await inode_of(ops, "a.bin")
    fh = await open_ro(ops, inode)
    await store.put_artifact("a.bin", b"two, longer")  # the Python store API
    assert pyfuse3.shared_read_handle(inode) is None
    assert fh not in ops._handles  # no open held it: closed at once
    new_inode = await inode_of(ops, "a.bin")
    assert new_inode != inode
    fh2 = await open_ro(ops, new_inode)
    assert await ops.read(fh2, 0, 100) == b"two, longer"
    await store.delete_artifact("a.bin")
    assert pyfuse3.shared_read_handle(new_inode) is None and fh2 not in ops._handles


async def test_writers_truncates_unlinks_renames_and_forget_unshare(
        ops: Operations, store: ArtifactStore) -> None:
    names = ["w", "t", "u", "r", "f", "src"]
    for n in names:
        await put(store, n, b"data of " + n.encode())
    inodes = {n: await inode_of(ops, n) for n in names}
    for n in names:
        await open_ro(ops, inodes[n])
    assert all(pyfuse3.shared_read_handle(i) is not None for i in inodes.values())

    w = await ops.open(inodes["w"], os.O_RDWR, CTX)
    assert pyfuse3.shared_read_handle(inodes["w"]) is None
    # While the writer is open, readers get handles of their own (they follow its bytes).
    assert (await open_ro(ops, inodes["w"])) != w.fh
    assert pyfuse3.shared_read_handle(inodes["w"]) is None

    await ops.release(w.fh)

    attr = pyfuse3.EntryAttributes()
    attr.st_size = 2
    names_ = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
              "update_gid")
    fields = SimpleNamespace(update_size=True, **dict.fromkeys(names_, False))
    await ops.setattr(inodes["t"], attr, fields, None, CTX)  # type: ignore[arg-type]
    assert pyfuse3.shared_read_handle(inodes["t"]) is None

    await ops.unlink(ROOT, b"u", CTX)
    assert pyfuse3.shared_read_handle(inodes["u"]) is None

    await ops.rename(ROOT, b"src", ROOT, b"r", 0, CTX)  # r is replaced
    assert pyfuse3.shared_read_handle(inodes["r"]) is None
    assert pyfuse3.shared_read_handle(inodes["src"]) is not None  # moved, same bytes

    await ops.forget([(inodes["f"], 1)])
    assert pyfuse3.shared_read_handle(inodes["f"]) is None


async def test_a_thread_in_the_kernels_retry_has_its_opens_deferred(
        ops: Operations, store: ArtifactStore) -> None:
    ops.replaced.refused(4242)
    assert SharedStats.now()["deferred"] == 1
    assert not ops.replaced.is_retry(4243)
    assert ops.replaced.is_retry(4242)  # its retried open came: used up
    assert SharedStats.now()["deferred"] == 0
    ops.replaced.refused(4242)
    ops.replaced.forget_retry(4242)  # it created the file instead
    assert SharedStats.now()["deferred"] == 0


async def test_idle_shared_handles_are_bounded(store: ArtifactStore) -> None:
    ops = _make(store, max_idle=8)
    try:
        for i in range(40):
            await put(store, f"f{i:02d}", b"x" * i)
        for i in range(40):
            inode = await inode_of(ops, f"f{i:02d}")
            fh = await open_ro(ops, inode)
            assert await ops.read(fh, 0, 100) == b"x" * i  # the handle just shared is open
            assert SharedStats.now()["shared"] <= 9
        assert len(ops._handles) <= 9  # the others were closed
    finally:
        ops.shared.close_idle()
    assert SharedStats.now()["shared"] == 0 and not ops._handles
