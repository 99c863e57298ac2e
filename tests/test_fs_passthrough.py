"""Layer 5, without a kernel: which opens the mount answers with passthrough, and the rules of
Linux it must keep (artifactfs/fs/passthrough.py): one io mode per inode, one backing id per
inode while any of its passthrough opens is open, no keep_cache with passthrough, and today's
path when the kernel or pyfuse3 cannot. pyfuse3's backing-file calls are replaced by a
recorder; tests/test_mount_passthrough.py shows the same through a real kernel.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pyfuse3
import pytest
from opsutil import fields, fuse_errno

from artifactfs import ArtifactStore, open_store
from artifactfs.fs import operations as ops_module
from artifactfs.fs import shared_reads
from artifactfs.fs.operations import Operations

ROOT = pyfuse3.ROOT_INODE
CTX = pyfuse3.RequestContext()


class Kernel:
    """Stands in for the backing-file ioctls: hands out ids, records what is open."""

    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse
        self.open_ids: set[int] = set()
        self.next_id = 1

    def passthrough_open(self, fd: int) -> int:
        os.fstat(fd)  # a real fd
        if self.refuse is not None:
            raise OSError(self.refuse, os.strerror(self.refuse))
        self.next_id += 1
        self.open_ids.add(self.next_id)
        return self.next_id

    def passthrough_close(self, backing_id: int) -> None:
        self.open_ids.remove(backing_id)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ArtifactStore]:
    async with open_store(tmp_path / "data") as s:
        yield s


def mount_ops(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, kernel: Kernel, *,
              agreed: bool = True, share_reads: bool = False) -> Operations:
    monkeypatch.setattr(pyfuse3, "passthrough_enabled", lambda: agreed)
    monkeypatch.setattr(ops_module, "passthrough_privileged", lambda: True)
    monkeypatch.setattr(pyfuse3, "passthrough_open", kernel.passthrough_open)
    monkeypatch.setattr(pyfuse3, "passthrough_close", kernel.passthrough_close)
    # share_reads off: handlers called directly get no opens counted by pyfuse3's C side
    # (test_fs_operations.py says why); without passthrough they would share read handles.
    ops = Operations(store, passthrough=True, share_reads=share_reads)
    assert ops.enable_passthrough  # what pyfuse3 reads at INIT
    ops.init()
    return ops


async def commit(ops: Operations, name: str, data: bytes) -> int:
    info, attr = await ops.create(ROOT, name.encode(), 0o100644, os.O_WRONLY, CTX)
    await ops.write(info.fh, 0, data)
    await ops.flush(info.fh)
    await ops.release(info.fh)
    return attr.st_ino


async def test_readers_share_one_backing_id_and_the_last_close_frees_it(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = Kernel()
    ops = mount_ops(store, monkeypatch, kernel)
    ino = await commit(ops, "a.bin", b"abc")
    first = await ops.open(ino, os.O_RDONLY, CTX)
    second = await ops.open(ino, os.O_RDONLY, CTX)
    assert first.backing_id and first.backing_id == second.backing_id
    assert not first.keep_cache and not first.direct_io and first.noflush
    await ops.release(first.fh)
    assert kernel.open_ids == {first.backing_id}
    await ops.release(second.fh)
    assert kernel.open_ids == set()
    third = await ops.open(ino, os.O_RDONLY, CTX)
    assert third.backing_id not in (0, first.backing_id)
    await ops.release(third.fh)


async def test_an_inode_with_a_cached_open_is_not_read_through(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = mount_ops(store, monkeypatch, Kernel())
    ino = await commit(ops, "a.bin", b"abc")
    writer = await ops.open(ino, os.O_RDWR, CTX)  # no one reads through it: cached
    assert writer.backing_id == 0
    await ops.write(writer.fh, 0, b"X")
    reader = await ops.open(ino, os.O_RDONLY, CTX)
    assert reader.backing_id == 0
    assert reader.keep_cache and writer.keep_cache
    assert await ops.read(reader.fh, 0, 10) == b"Xbc"  # the writer's bytes
    direct = await ops.open(ino, os.O_RDONLY | os.O_DIRECT, CTX)
    assert direct.backing_id == 0
    for fi in (writer, reader, direct):
        await ops.flush(fi.fh)
        await ops.release(fi.fh)
    after = await ops.open(ino, os.O_RDONLY, CTX)  # all closed: read through again
    assert after.backing_id
    await ops.release(after.fh)


async def test_a_writer_moves_the_name_off_an_inode_read_through(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer never shares the readers' backing file (its shared mapping would write into
    the blob): its OPEN is answered ESTALE after the name moved to a new inode, and the
    kernel's retry opens that one, cached."""
    kernel = Kernel()
    ops = mount_ops(store, monkeypatch, kernel)
    ino = await commit(ops, "a.bin", b"old")
    early = await ops.open(ino, os.O_RDONLY, CTX)
    assert early.backing_id
    assert await fuse_errno(ops.open(ino, os.O_RDWR, CTX)) == errno.ESTALE
    moved = (await ops.lookup(ROOT, b"a.bin", CTX)).st_ino
    assert moved != ino
    writer = await ops.open(moved, os.O_RDWR, CTX)  # the kernel's retry
    assert writer.backing_id == 0 and writer.keep_cache
    await ops.write(writer.fh, 0, b"NEW")
    during = await ops.open(moved, os.O_RDONLY, CTX)
    assert during.backing_id == 0 and await ops.read(during.fh, 0, 10) == b"NEW"
    await ops.flush(writer.fh)
    await ops.release(writer.fh)
    await ops.release(during.fh)
    assert (await ops.getattr(ino, CTX)).st_nlink == 0  # the early reader's fstat
    await ops.release(early.fh)
    assert kernel.open_ids == set()
    assert (await ops.getattr(moved, CTX)).st_size == 3
    fresh = await ops.open(moved, os.O_RDONLY, CTX)  # nothing open: read through again
    assert fresh.backing_id
    # The retry itself finding the new inode read through (a reader came in between) fails
    # rather than share: text file busy.
    assert await fuse_errno(ops.open(ino, os.O_RDWR, CTX)) == errno.ESTALE  # old inode
    assert await fuse_errno(ops.open(moved, os.O_RDWR, CTX)) == errno.ETXTBSY
    await ops.release(fresh.fh)


async def test_a_truncate_under_a_reader_moves_its_name_first(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = mount_ops(store, monkeypatch, Kernel())
    ino = await commit(ops, "a.bin", b"abcdef")
    reader = await ops.open(ino, os.O_RDONLY, CTX)
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 2
    # truncate(2) by path: the name moves first, and the kernel's retry truncates the new
    # inode; the reader's inode keeps its size and bytes.
    assert await fuse_errno(ops.setattr(ino, attr, fields(update_size=True), None, CTX)
                            ) == errno.ESTALE
    moved = await ops.lookup(ROOT, b"a.bin", CTX)
    assert moved.st_ino != ino and moved.st_size == 6
    got = await ops.setattr(moved.st_ino, attr, fields(update_size=True), None, CTX)
    assert got.st_ino == moved.st_ino and got.st_size == 2
    assert (await ops.getattr(ino, CTX)).st_size == 6
    assert await ops.read(reader.fh, 0, 10) == b"abcdef"
    await ops.release(reader.fh)


async def test_new_files_and_o_direct_opens_are_served_by_the_daemon(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = mount_ops(store, monkeypatch, Kernel())
    info, _ = await ops.create(ROOT, b"new.bin", 0o100644, os.O_WRONLY, CTX)
    assert info.backing_id == 0
    await ops.flush(info.fh)
    await ops.release(info.fh)
    ino = await commit(ops, "b.bin", b"b" * 5000)
    direct = await ops.open(ino, os.O_RDONLY | os.O_DIRECT, CTX)
    assert direct.backing_id == 0
    through = await ops.open(ino, os.O_RDONLY, CTX)  # the O_DIRECT open holds it cached
    assert through.backing_id == 0
    for fi in (direct, through):
        await ops.release(fi.fh)


@pytest.mark.parametrize("why", ["pyfuse3", "kernel", "privilege"])
async def test_without_passthrough_the_mount_serves_reads_as_before(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        why: str) -> None:
    kernel = Kernel(refuse=errno.EPERM if why == "privilege" else None)
    if why == "pyfuse3":
        monkeypatch.delattr(pyfuse3, "passthrough_enabled")
        ops = Operations(store, passthrough=True, share_reads=False)
        assert not ops.enable_passthrough  # not asked at INIT: the writeback cache stays
        with caplog.at_level(logging.INFO, "artifactfs.fs"):
            ops.init()
    else:
        with caplog.at_level(logging.INFO, "artifactfs.fs"):
            ops = mount_ops(store, monkeypatch, kernel, agreed=why != "kernel")
    ino = await commit(ops, "a.bin", b"abc")
    infos = []
    with caplog.at_level(logging.INFO, "artifactfs.fs"):
        for _ in range(3):
            infos.append(await ops.open(ino, os.O_RDONLY, CTX))
    assert all(fi.backing_id == 0 for fi in infos)
    assert await ops.read(infos[0].fh, 0, 10) == b"abc"
    for fi in infos:
        await ops.release(fi.fh)
    said = [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "passthrough" in r.getMessage()]
    assert len(said) == 1, said  # once: at mount, or at the kernel's first refusal


@pytest.mark.skipif(not shared_reads.PASSTHROUGH,
                    reason="pyfuse3 without the shared-passthrough patch of scripts/setup")
async def test_a_shared_read_handle_holds_its_inodes_backing_id_until_it_closes(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyfuse3 answers later opens of a shared inode in C with the backing id the shared
    handle holds (shared_reads.py): registered once, kept while the handle is shared (no
    opens are counted here: handlers are called directly), closed when it is unshared."""
    kernel = Kernel()
    ops = mount_ops(store, monkeypatch, kernel, share_reads=True)
    try:
        ino = await commit(ops, "a.bin", b"abc")
        first = await ops.open(ino, os.O_RDONLY, CTX)
        assert first.backing_id and not first.keep_cache and first.noflush
        assert pyfuse3.shared_read_handle(ino) == first.fh
        direct = await ops.open(ino, os.O_RDONLY | os.O_DIRECT, CTX)
        assert (direct.fh, direct.backing_id, direct.direct_io) == (
            first.fh, first.backing_id, True)
        assert kernel.open_ids == {first.backing_id}  # one id, idle or not
        # A writer unshares the inode first: the idle handle closes, and its backing id.
        writer = await ops.open(ino, os.O_RDWR, CTX)
        assert writer.backing_id == 0 and kernel.open_ids == set()
        await ops.release(writer.fh)
        again = await ops.open(ino, os.O_RDONLY, CTX)
        assert again.backing_id and kernel.open_ids == {again.backing_id}
        await ops.forget([(ino, 1)])  # FORGET closes it too
        assert kernel.open_ids == set() and pyfuse3.shared_read_handle(ino) is None
    finally:
        ops.shared.close_idle()


async def test_with_passthrough_writes_new_write_only_files_get_their_staging_file(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """--passthrough-writes (passthrough_writes.py): only a file created write-only and
    buffered is written by the kernel; the others are served by the daemon."""
    kernel = Kernel()
    monkeypatch.setattr(pyfuse3, "passthrough_enabled", lambda: True)
    monkeypatch.setattr(pyfuse3, "passthrough_open", kernel.passthrough_open)
    monkeypatch.setattr(pyfuse3, "passthrough_close", kernel.passthrough_close)
    ops = Operations(store, passthrough=True, passthrough_writes=True, share_reads=False)
    ops.init()
    for name, flags in ((b"rw.bin", os.O_RDWR), (b"direct.bin", os.O_WRONLY | os.O_DIRECT),
                        (b"wo.bin", os.O_WRONLY)):
        info, _ = await ops.create(ROOT, name, 0o100644, flags, CTX)
        assert (info.backing_id != 0) == (flags == os.O_WRONLY), name
        await ops.flush(info.fh)
        await ops.release(info.fh)
    assert kernel.open_ids == set()
    assert await store.read_xattr(store.lookup(1, "wo.bin").id, "user.sha256") == (
        b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
