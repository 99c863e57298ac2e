"""Layer 5, the file system API without a kernel: pyfuse3 handlers called directly.

What only the mount decides, tested fast and deterministically: when a file commits (at the
flush of its last writer), lazy sessions, inode versions after another face's replace, files
unlinked while open, errno translation, readdir batches. The real-mount tests
(test_mount_*.py) show the same through the kernel.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
from opsutil import fields, fuse_errno
from storeutil import put, sha

from artifactfs import ArtifactStore, open_store
from artifactfs.fs import operations as ops_module
from artifactfs.fs.inodes import VERSION_SHIFT
from artifactfs.fs.kernel_cache import Invalidation, KernelCache
from artifactfs.fs.operations import Operations

ROOT = pyfuse3.ROOT_INODE
CTX = pyfuse3.RequestContext()  # uid 0, gid 0


class RecordingCache(KernelCache):
    """The invalidations the mount would send, kept for the test to look at."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[Invalidation] = []

    def queue(self, item: Invalidation) -> None:
        self.items.append(item)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ArtifactStore]:
    async with open_store(tmp_path / "data") as s:
        yield s


@pytest.fixture
def ops(store: ArtifactStore) -> Operations:
    # Shared read handles (shared_reads.py) need pyfuse3's C side to count the opens it
    # answers, which handlers called directly do not have: they are tested below on their
    # own and through real mounts (test_mount_shared_reads.py).
    return Operations(store, RecordingCache(), share_reads=False)


async def write_file(ops: Operations, name: str, data: bytes) -> int:
    info, attr = await ops.create(ROOT, name.encode(), 0o100644, os.O_WRONLY, CTX)
    if data:
        assert await ops.write(info.fh, 0, data) == len(data)
    await ops.flush(info.fh)
    await ops.release(info.fh)
    return attr.st_ino


async def test_commit_happens_at_the_flush_of_the_last_writer(
        ops: Operations, store: ArtifactStore) -> None:
    info, _ = await ops.create(ROOT, b"a.bin", 0o100644, os.O_WRONLY, CTX)
    await ops.write(info.fh, 0, b"hello")
    assert (await store.list_artifacts()).data == []
    await ops.flush(info.fh)  # close(2) returns after this: the artifact must exist already
    a = await store.get_artifact("a.bin")
    assert (a.size, a.sha256) == (5, sha(b"hello"))
    # Written again through the same handle (a dup'd descriptor): a new version at release.
    await ops.write(info.fh, 5, b" world")
    await ops.release(info.fh)
    a = await store.get_artifact("a.bin")
    assert (a.size, a.sha256) == (11, sha(b"hello world"))


async def test_two_writers_commit_once_both_are_done(
        ops: Operations, store: ArtifactStore) -> None:
    ino = await write_file(ops, "f", b"0123456789")
    h1 = await ops.open(ino, os.O_WRONLY, CTX)
    h2 = await ops.open(ino, os.O_RDWR, CTX)
    await ops.write(h1.fh, 0, b"A")
    await ops.write(h2.fh, 9, b"Z")
    await ops.flush(h1.fh)
    await ops.release(h1.fh)
    assert (await store.get_artifact("f")).sha256 == sha(b"0123456789")
    await ops.flush(h2.fh)
    assert (await store.get_artifact("f")).sha256 == sha(b"A12345678Z")
    await ops.release(h2.fh)


async def test_opened_for_writing_but_not_written_commits_nothing(
        ops: Operations, store: ArtifactStore) -> None:
    ino = await write_file(ops, "f", b"data")
    before = await store.get_artifact("f")
    h = await ops.open(ino, os.O_RDWR, CTX)
    assert store.active_write(ino) is None  # no copy yet
    assert await ops.read(h.fh, 0, 10) == b"data"
    await ops.flush(h.fh)
    await ops.release(h.fh)
    after = await store.get_artifact("f")
    assert after == before


async def test_reader_of_a_file_rewritten_in_the_mount_keeps_its_version(
        ops: Operations, store: ArtifactStore) -> None:
    ino = await write_file(ops, "f", b"old bytes")
    r = await ops.open(ino, os.O_RDONLY, CTX)
    # The writer's open moves the name to a new inode (ESTALE: the kernel looks the name up
    # again and retries), so the reader keeps the version it opened.
    assert await fuse_errno(ops.open(ino, os.O_WRONLY | os.O_TRUNC, CTX)) == errno.ESTALE
    moved = (await ops.lookup(ROOT, b"f", CTX)).st_ino
    assert moved != ino
    w = await ops.open(moved, os.O_WRONLY | os.O_TRUNC, CTX)
    # A reader needs no FLUSH; a writer commits at its last FLUSH.
    assert r.noflush and not w.noflush
    await ops.write(w.fh, 0, b"new")
    during = await ops.open(moved, os.O_RDONLY, CTX)  # opened while written: the writer's
    assert await ops.read(during.fh, 0, 100) == b"new"
    assert await ops.read(r.fh, 0, 100) == b"old bytes"
    await ops.flush(w.fh)
    await ops.release(w.fh)
    assert (await store.get_artifact("f")).sha256 == sha(b"new")
    assert await ops.read(r.fh, 0, 100) == b"old bytes"
    assert (await ops.getattr(ino, CTX)).st_nlink == 0  # as after a rename over the file
    assert await ops.read(during.fh, 0, 100) == b"new"
    await ops.release(during.fh)
    await ops.release(r.fh)
    # With no reader left, a writer keeps the inode.
    w = await ops.open(moved, os.O_WRONLY | os.O_TRUNC, CTX)
    await ops.release(w.fh)


async def test_replace_by_another_face_gives_a_new_inode(
        ops: Operations, store: ArtifactStore) -> None:
    ino = await write_file(ops, "ckpt", b"version one")
    r = await ops.open(ino, os.O_RDONLY, CTX)
    await put(store, "ckpt", b"version two, longer")
    cache = ops.cache
    assert isinstance(cache, RecordingCache)
    assert cache.items == [Invalidation("name", ROOT, "ckpt")]
    new = await ops.lookup(ROOT, b"ckpt", CTX)
    assert new.st_ino == ino | (1 << VERSION_SHIFT) and new.st_size == 19
    # The old inode is what the open reader holds: its own size and bytes, no links.
    old = await ops.getattr(ino, CTX)
    assert (old.st_size, old.st_nlink) == (11, 0)
    assert await ops.read(r.fh, 0, 100) == b"version one"
    # A new open through a name the kernel has not dropped yet: look it up again (the
    # kernel's retry then opens the new inode).
    assert await fuse_errno(ops.open(ino, os.O_RDONLY, CTX)) == errno.ESTALE
    h = await ops.open(new.st_ino, os.O_RDONLY, CTX)
    assert await ops.read(h.fh, 0, 100) == b"version two, longer"
    await ops.release(h.fh)
    # close(2) of the old version flushes its times: that must not fail.
    await ops.setattr(ino, pyfuse3.EntryAttributes(), fields(update_mtime=True), r.fh, CTX)
    await ops.release(r.fh)
    # Closed, the old inode is gone for a stat (the kernel looks the name up again) ...
    assert await fuse_errno(ops.getattr(ino, CTX)) == errno.ESTALE
    # ... though the kernel's own ctime flush on it still succeeds (replaced.py).
    await ops.setattr(ino, pyfuse3.EntryAttributes(), fields(update_ctime=True), None, CTX)
    await store.delete_artifact("ckpt")
    assert cache.items[-1] == Invalidation("removed", ROOT, "ckpt", new.st_ino)


async def test_only_the_kernels_retry_opens_a_replaced_version(
        ops: Operations, store: ArtifactStore) -> None:
    """The kernel retries an OPEN answered ESTALE once, from the same thread, after looking
    the name up again; if the name was replaced again meanwhile, that retry gets the version
    it names (replaced.py). Any other open of a replaced version is told to look again."""
    ino = await write_file(ops, "f", b"one")
    await put(store, "f", b"two")
    a, b = SimpleNamespace(pid=101), SimpleNamespace(pid=202)
    assert await fuse_errno(ops.open(ino, os.O_RDONLY, a)) == errno.ESTALE
    assert await fuse_errno(ops.getattr(ino, b)) == errno.ESTALE  # b's permission check
    # a's retry: the permission check, then the open, of the version it names.
    assert (await ops.getattr(ino, a)).st_nlink == 0
    h = await ops.open(ino, os.O_RDONLY, a)
    assert await ops.read(h.fh, 0, 100) == b"one"
    await ops.release(h.fh)
    # a's retry is used up: its next open of the replaced version is a new open(2) (which
    # the kernel retries in turn; any open by a uses that retry up).
    assert await fuse_errno(ops.open(ino, os.O_RDONLY, a)) == errno.ESTALE
    current = await ops.lookup(ROOT, b"f", CTX)
    await ops.release((await ops.open(current.st_ino, os.O_RDONLY, a)).fh)
    assert await fuse_errno(ops.open(ino, os.O_RDONLY, a)) == errno.ESTALE
    await ops.release((await ops.open(current.st_ino, os.O_RDONLY, a)).fh)
    # b's retry writes: into that version, which is no file any more (as on a disk after a
    # rename over it), so the bytes go at close and the key keeps what replaced it.
    w = await ops.open(ino, os.O_WRONLY | os.O_TRUNC, b)
    assert await ops.write(w.fh, 0, b"lost") == 4
    assert await ops.read(w.fh, 0, 100) == b"lost"
    await ops.flush(w.fh)
    await ops.release(w.fh)
    assert (await store.get_artifact("f")).sha256 == sha(b"two")
    # A rename over a file retires it the same way.
    target = await write_file(ops, "t", b"target")
    await write_file(ops, "s", b"source")
    await ops.rename(ROOT, b"s", ROOT, b"t", 0, CTX)
    assert await fuse_errno(ops.open(target, os.O_RDONLY, a)) == errno.ESTALE
    h = await ops.open(target, os.O_RDONLY, a)
    assert await ops.read(h.fh, 0, 100) == b"target"
    await ops.release(h.fh)
    # A deleted version's bytes are not kept (a delete frees its space at once).
    await store.delete_artifact("f")
    await store.flush_async()
    assert await fuse_errno(ops.open(current.st_ino, os.O_RDONLY, a)) == errno.ESTALE
    assert await fuse_errno(ops.open(current.st_ino, os.O_RDONLY, a)) == errno.ENOENT


async def test_unlinked_while_open(ops: Operations, store: ArtifactStore) -> None:
    ino = await write_file(ops, "f", b"still here")
    r = await ops.open(ino, os.O_RDONLY, CTX)
    await ops.unlink(ROOT, b"f", CTX)
    attr = await ops.getattr(ino, CTX)
    assert (attr.st_size, attr.st_nlink) == (10, 0)
    await ops.setattr(ino, pyfuse3.EntryAttributes(), fields(update_mtime=True), r.fh, CTX)
    assert await ops.read(r.fh, 0, 100) == b"still here"
    await ops.release(r.fh)
    # Gone: a stat through a name the kernel still holds looks it up again.
    assert await fuse_errno(ops.getattr(ino, CTX)) == errno.ESTALE
    # A new entry never takes the inode number the kernel may still hold.
    assert await write_file(ops, "g", b"") != ino


async def test_errors_carry_their_errno(ops: Operations) -> None:
    assert await fuse_errno(ops.lookup(ROOT, b"missing", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.lookup(ROOT, b"x" * 256, CTX)) == errno.ENAMETOOLONG
    assert await fuse_errno(ops.create(ROOT, b"bad name", 0o644, 0, CTX)) == errno.EINVAL
    assert await fuse_errno(ops.mkdir(ROOT, b"a:b", 0o755, CTX)) == errno.EINVAL
    d = await ops.mkdir(ROOT, b"d", 0o755, CTX)
    await write_file(ops, "f", b"")
    assert await fuse_errno(ops.mkdir(ROOT, b"d", 0o755, CTX)) == errno.EEXIST
    assert await fuse_errno(ops.rmdir(ROOT, b"f", CTX)) == errno.ENOTDIR
    assert await fuse_errno(ops.unlink(ROOT, b"d", CTX)) == errno.EISDIR
    assert await fuse_errno(ops.rename(ROOT, b"f", ROOT, b"d", 0, CTX)) == errno.EISDIR
    assert await fuse_errno(ops.rename(ROOT, b"f", ROOT, b"g", 2, CTX)) == errno.EINVAL
    await ops.mkdir(d.st_ino, b"sub", 0o755, CTX)
    assert await fuse_errno(ops.rmdir(ROOT, b"d", CTX)) == errno.ENOTEMPTY
    assert await fuse_errno(ops.link(d.st_ino, ROOT, b"h", CTX)) == errno.EPERM
    assert await fuse_errno(ops.mknod(ROOT, b"p", 0o10644, 0, CTX)) == errno.EPERM
    assert await fuse_errno(ops.getxattr(ROOT, b"security.selinux", CTX)) == errno.ENOTSUP
    assert await fuse_errno(ops.read(12345, 0, 1)) == errno.EBADF
    assert (await ops.getattr(d.st_ino, CTX)).st_nlink == 3


async def test_directory_changed_elsewhere_is_listed_afresh(store: ArtifactStore) -> None:
    ops = Operations(store, KernelCache(), share_reads=False)  # the real queue, not drained
    sub = await ops.mkdir(ROOT, b"sub", 0o755, CTX)
    fi = await ops.opendir(sub.st_ino, CTX)
    assert fi.cache_readdir and fi.keep_cache
    await ops.releasedir(fi.fh)
    await put(store, "sub/new.bin", b"new")
    # Until the kernel has been told, opendir has it list from the daemon and drop its copy;
    # the directory's mtime moved, so a copy the kernel kept is found stale at its next opendir.
    fi = await ops.opendir(sub.st_ino, CTX)
    assert not fi.cache_readdir and not fi.keep_cache
    await ops.releasedir(fi.fh)
    after = await ops.getattr(sub.st_ino, CTX)
    assert after.st_mtime_ns > sub.st_mtime_ns
    await put(store, "sub/new.bin", b"replaced")
    assert (await ops.getattr(sub.st_ino, CTX)).st_mtime_ns > after.st_mtime_ns


async def test_readdir_resumes_where_each_reply_stopped(
        ops: Operations, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"f{i:04d}" for i in range(1200)]
    for n in names:
        await write_file(ops, n, b"")
    replies: list[tuple[str, int]] = []
    room = 0

    def reply(token: object, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        nonlocal room
        if room == 0:
            return False
        room -= 1
        replies.append((name.decode(), next_id))
        return True

    monkeypatch.setattr(ops_module.pyfuse3, "readdir_reply", reply)
    fi = await ops.opendir(ROOT, CTX)
    assert isinstance(fi, pyfuse3.FileInfo) and fi.cache_readdir and fi.keep_cache
    fh = fi.fh
    start = 0
    while True:
        room = 25  # about what a 4 KiB READDIRPLUS reply holds
        before = len(replies)
        await ops.readdir(fh, start, None)  # type: ignore[arg-type]
        if len(replies) == before:
            break
        start = replies[-1][1]
        if len(replies) == 600:
            await ops.unlink(ROOT, names[1000].encode(), CTX)  # listing while entries go
    await ops.releasedir(fh)
    listed = [n for n, _ in replies]
    assert listed == [n for n in names if n != names[1000]]
