"""lazyfs: a FUSE file system for tests that can lose what was never made durable.

In the spirit of LazyFS (INESC TEC) and CrashMonkey, for machines without device-mapper
(dm-flakey, dm-log-writes). ``python tests/lazyfs.py BACKING MOUNTPOINT`` serves the tree in
the directory BACKING at MOUNTPOINT and keeps two images of it in memory:

- the **live** image: what every process sees, changed by every operation;
- the **durable** image: what a disk would still hold after a power cut.

Everything on BACKING when lazyfs starts is durable (it is the disk). Operations change only
the live image; the durable image changes only as follows.

The model (POSIX, read strictly; stricter than ext4, XFS or btrfs):

- **File data and attributes** (write, truncate, chmod, chown, utimes) become durable at
  ``fsync`` or ``fdatasync`` of that file, through any descriptor of it: its whole content,
  length and attributes are copied to the durable image. fdatasync is taken as fsync (POSIX
  lets it skip only metadata not needed to read the data back; we copy more, never less).
- **Directory entries** (create, mknod, mkdir, symlink, link, unlink, rmdir, rename) become
  durable only at ``fsync`` of the directory holding them, and then all of that directory's
  entries at once. fsync of a new file does NOT make its name durable (ext4 in ordered mode
  does, as a side effect of its journal; POSIX does not promise it, and a store that relies
  on it breaks on other file systems: we chose the strict model so such reliance shows up).
  A rename across directories is two entry changes, one per parent: it is durable when both
  parents were fsynced; if only one was, the durable image has the file in both places or in
  neither (no journaling file system does that; a program that needs the file in exactly
  one place after a crash must fsync both parents, which is what POSIX asks).
  A name that becomes durable before its inode's data is a file of the data last fsynced,
  or empty if it never was.
- **syncfs(2) and sync(2) do nothing**: the kernel does not send them to a FUSE daemon
  (FUSE_SYNCFS is sent only to virtiofs), so lazyfs never learns of them. That is the truth
  about FUSE file systems in general, not only about this one (see docs/RELIABILITY.md).
- **Background writeback**: at a power cut, a disk may already hold some data that was
  never fsynced, since the kernel writes dirty pages back whenever it likes. ``crash SEED``
  lets a seeded random choice of each file's unsynced 4 KiB pages (and of its unsynced
  length) reach the durable image; directory entries never do (losing all unsynced entry
  changes is one of the outcomes POSIX allows, and the harshest). So after a power cut a
  file whose data was not fsynced may be complete, empty, or torn.
- ``statfs`` reports the backing directory's file system; locks (fcntl, flock) are left to
  the kernel, which handles them locally when a FUSE file system does not; no xattrs.

Control: one command per line on stdin, one JSON answer per line on stdout:

- ``stats``: counts of operations, and ``fsyncs``: {path: how many fsyncs of it completed}.
- ``crash SEED``: the power cut. From then on every operation fails with EIO (the programs
  above can make no more progress); the durable image, with the seeded writeback, replaces
  the contents of BACKING. The caller then kills the programs using the mount and unmounts
  it; a new lazyfs over BACKING sees only what survived.

On a clean unmount (no crash) the live image is written to BACKING, as a file system flushes
everything when it is unmounted. The first line on stdout is ``{"ready": true}`` once mounted.
File contents are held in memory: meant for test data directories of tens of MB.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

PAGE = 4096
ZERO_PAGE = bytes(PAGE)
TIMEOUT = 60.0  # nothing but the kernel changes the tree, so its caches stay right


@dataclass(slots=True)
class Node:
    """One inode: a file's pages, a directory's entries or a symlink's target, and attributes.

    Pages are immutable ``bytes`` of PAGE bytes (a missing page reads as zeros), so a copy of
    a node for the durable image shares them: fsync costs a dict copy, not the data.
    """

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    size: int = 0
    pages: dict[int, bytes] = field(default_factory=dict)
    # name -> (inode, position): positions only grow, so readdir cookies stay valid.
    entries: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    next_pos: int = 1
    target: bytes = b""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def copy(self) -> Node:
        return Node(mode=self.mode, uid=self.uid, gid=self.gid, atime_ns=self.atime_ns,
                    mtime_ns=self.mtime_ns, ctime_ns=self.ctime_ns, size=self.size,
                    pages=dict(self.pages), entries=dict(self.entries),
                    next_pos=self.next_pos, target=self.target)

    def read(self, off: int, size: int) -> bytes:
        end = min(off + size, self.size)
        if off >= end:
            return b""
        out = bytearray()
        pos = off
        while pos < end:
            index, start = divmod(pos, PAGE)
            page = self.pages.get(index, ZERO_PAGE)
            take = min(PAGE - start, end - pos)
            out += page[start:start + take]
            pos += take
        return bytes(out)

    def write(self, off: int, buf: bytes) -> None:
        pos, view = off, memoryview(buf)
        while view:
            index, start = divmod(pos, PAGE)
            take = min(PAGE - start, len(view))
            old = self.pages.get(index, ZERO_PAGE)
            self.pages[index] = old[:start] + bytes(view[:take]) + old[start + take:]
            pos += take
            view = view[take:]
        self.size = max(self.size, off + len(buf))

    def truncate(self, size: int) -> None:
        if size < self.size:
            last, keep = divmod(size, PAGE)
            for index in [i for i in self.pages if i > last or (i == last and keep == 0)]:
                del self.pages[index]
            if keep and last in self.pages:
                self.pages[last] = self.pages[last][:keep] + bytes(PAGE - keep)
        self.size = size

    def add(self, name: bytes, ino: int) -> None:
        self.entries[name] = (ino, self.next_pos)
        self.next_pos += 1


def fuse_error(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class LazyFS(pyfuse3.Operations):
    """The file system: a live image served to the kernel, a durable image kept beside it."""

    supports_dot_lookup = False

    def __init__(self, backing: Path) -> None:
        super().__init__()
        self.backing = backing
        self.live: dict[int, Node] = {}
        self.durable: dict[int, Node] = {}
        self.nlink: dict[int, int] = {}
        self.opens: dict[int, int] = {}
        self.parents: dict[int, dict[tuple[int, bytes], None]] = {}
        self.handles: dict[int, int] = {}  # fh -> inode
        self.dir_handles: dict[int, int] = {}
        self._next_ino = pyfuse3.ROOT_INODE
        self._next_fh = 1
        self.frozen = False
        self.ops = 0
        self.fsyncs: dict[str, int] = {}
        self._load()

    # --- the disk image on BACKING ------------------------------------------------------

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _load(self) -> None:
        """Read BACKING into both images: at mount time everything on it is durable."""
        seen: dict[int, int] = {}  # backing st_ino -> our inode (hard links)

        def node_of(path: Path, st: os.stat_result) -> Node:
            return Node(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                        atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns,
                        ctime_ns=st.st_ctime_ns)

        def load(path: Path) -> int:
            st = os.lstat(path)
            if st.st_ino in seen and not stat.S_ISDIR(st.st_mode):
                return seen[st.st_ino]
            ino = self._new_ino()
            seen[st.st_ino] = ino
            n = node_of(path, st)
            self.live[ino] = n
            if stat.S_ISDIR(st.st_mode):
                self.nlink[ino] = self.nlink.get(ino, 0) + 1  # its own '.'
                for child in sorted(os.listdir(path)):
                    cino = load(path / child)
                    n.add(os.fsencode(child), cino)
                    self._linked(cino, ino, os.fsencode(child))
                    if self.live[cino].is_dir:
                        self.nlink[ino] += 1  # the child's '..'
            elif stat.S_ISLNK(st.st_mode):
                n.target = os.fsencode(os.readlink(path))
                n.size = len(n.target)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    index = 0
                    while chunk := f.read(PAGE):
                        if chunk != ZERO_PAGE[:len(chunk)]:
                            n.pages[index] = chunk.ljust(PAGE, b"\0")
                        index += 1
                n.size = st.st_size
            return ino

        root = load(self.backing)
        assert root == pyfuse3.ROOT_INODE
        self.nlink[root] += 1  # its name in the directory it is mounted on
        self.durable = {ino: n.copy() for ino, n in self.live.items()}

    def _linked(self, ino: int, parent: int, name: bytes) -> None:
        self.nlink[ino] = self.nlink.get(ino, 0) + 1
        self.parents.setdefault(ino, {})[(parent, name)] = None

    def _unlinked(self, ino: int, parent: int, name: bytes) -> None:
        self.nlink[ino] -= 1
        self.parents.get(ino, {}).pop((parent, name), None)
        self._maybe_free(ino)

    def _maybe_free(self, ino: int) -> None:
        """An inode with no name and no open handle is gone from the live image (its durable
        copy, if any, stays until a directory fsync drops the last durable name)."""
        if self.nlink.get(ino, 0) <= 0 and self.opens.get(ino, 0) <= 0:
            self.live.pop(ino, None)
            self.nlink.pop(ino, None)
            self.parents.pop(ino, None)
            self.opens.pop(ino, None)

    def write_image(self, image: dict[int, Node]) -> None:
        """Replace BACKING's contents by ``image`` (the tree reachable from the root)."""
        for child in os.listdir(self.backing):
            path = self.backing / child
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        written: dict[int, Path] = {pyfuse3.ROOT_INODE: self.backing}
        dirs: list[tuple[Path, Node]] = []

        def write(ino: int, path: Path) -> None:
            n = image[ino]
            if ino in written:
                if n.is_dir:
                    return  # a directory durable in two places (a half-durable rename)
                os.link(written[ino], path)
                return
            written[ino] = path
            if n.is_dir:
                path.mkdir()
                for name, (cino, _) in n.entries.items():
                    if cino in image:
                        write(cino, path / os.fsdecode(name))
                dirs.append((path, n))
                return
            if stat.S_ISLNK(n.mode):
                os.symlink(n.target, path)
                os.lchown(path, n.uid, n.gid)
                return
            with open(path, "wb") as f:
                for index in sorted(n.pages):
                    if index * PAGE < n.size:
                        f.seek(index * PAGE)
                        f.write(n.pages[index][:n.size - index * PAGE])
                f.truncate(n.size)
            self._attrs_to(path, n)

        root = image[pyfuse3.ROOT_INODE]
        for name, (cino, _) in root.entries.items():
            if cino in image:
                write(cino, self.backing / os.fsdecode(name))
        for path, n in dirs:
            self._attrs_to(path, n)

    @staticmethod
    def _attrs_to(path: Path, n: Node) -> None:
        os.chown(path, n.uid, n.gid)
        os.chmod(path, stat.S_IMODE(n.mode))
        os.utime(path, ns=(n.atime_ns, n.mtime_ns))

    def crash(self, seed: int) -> dict[str, Any]:
        """The power cut: freeze, let seeded background writeback reach the durable image,
        and write that image to BACKING."""
        self.frozen = True
        rng = random.Random(seed)
        torn = 0
        for ino in sorted(self.durable):
            d, n = self.durable[ino], self.live.get(ino)
            if n is None or n.is_dir or stat.S_ISLNK(n.mode) or rng.random() < 0.5:
                continue
            dirty = [i for i in set(n.pages) | set(d.pages)
                     if n.pages.get(i) != d.pages.get(i)]
            if not dirty and n.size == d.size:
                continue
            for index in dirty:
                if rng.random() < 0.5:
                    if index in n.pages:
                        d.pages[index] = n.pages[index]
                    else:
                        d.pages.pop(index, None)
            if rng.random() < 0.5:
                d.size = n.size
            torn += 1
        self.write_image(self.durable)
        return {"crashed": True, "files_partly_written_back": torn}

    # --- helpers --------------------------------------------------------------------------

    def _check(self) -> None:
        if self.frozen:
            raise fuse_error(errno.EIO)
        self.ops += 1

    def _node(self, ino: int) -> Node:
        n = self.live.get(ino)
        if n is None:
            raise fuse_error(errno.ENOENT)
        return n

    def _dir(self, ino: int) -> Node:
        n = self._node(ino)
        if not n.is_dir:
            raise fuse_error(errno.ENOTDIR)
        return n

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        n = self._node(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = n.mode
        a.st_nlink = max(0, self.nlink.get(ino, 0))
        a.st_uid = n.uid
        a.st_gid = n.gid
        a.st_rdev = 0
        a.st_size = n.size
        a.st_blksize = PAGE
        a.st_blocks = len(n.pages) * (PAGE // 512)
        a.st_atime_ns = n.atime_ns
        a.st_mtime_ns = n.mtime_ns
        a.st_ctime_ns = n.ctime_ns
        return a

    def path_of(self, ino: int) -> str:
        """One name of a live inode, relative to the mount (for the fsync counts)."""
        parts: list[str] = []
        while ino != pyfuse3.ROOT_INODE:
            links = self.parents.get(ino)
            if not links:
                return "<unlinked>/" + "/".join(reversed(parts))
            parent, name = next(iter(links))
            parts.append(os.fsdecode(name))
            ino = parent
        return "/".join(reversed(parts)) or "."

    def _new_node(self, ctx: pyfuse3.RequestContext, mode: int, parent: Node) -> Node:
        now = time.time_ns()
        gid = parent.gid if parent.mode & stat.S_ISGID else ctx.gid
        if stat.S_ISDIR(mode) and parent.mode & stat.S_ISGID:
            mode |= stat.S_ISGID
        return Node(mode=mode & ~ctx.umask if not stat.S_ISLNK(mode) else mode, uid=ctx.uid,
                    gid=gid, atime_ns=now, mtime_ns=now, ctime_ns=now)

    def _enter(self, parent_ino: int, name: bytes, n: Node) -> int:
        parent = self._dir(parent_ino)
        if name in parent.entries:
            raise fuse_error(errno.EEXIST)
        if len(name) > 255:
            raise fuse_error(errno.ENAMETOOLONG)
        ino = self._new_ino()
        self.live[ino] = n
        parent.add(name, ino)
        self._linked(ino, parent_ino, name)
        if n.is_dir:
            self.nlink[ino] += 1  # its own '.'
            self.nlink[parent_ino] += 1  # its '..'
        parent.mtime_ns = parent.ctime_ns = time.time_ns()
        return ino

    def _open_fh(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = ino
        self.opens[ino] = self.opens.get(ino, 0) + 1
        return fh

    def _count_fsync(self, ino: int) -> None:
        path = self.path_of(ino)
        self.fsyncs[path] = self.fsyncs.get(path, 0) + 1

    # --- durability -----------------------------------------------------------------------

    def _sync_file(self, ino: int) -> None:
        self.durable[ino] = self._node(ino).copy()

    def _sync_dir(self, ino: int) -> None:
        n = self._dir(ino)
        self.durable[ino] = n.copy()
        # A directory's fsync makes its entries and attributes durable; the inodes it names
        # keep their own durable state (data waits for their fsync, as do a subdirectory's
        # entries), and a name that is new on the disk gets a stub of what the disk has.
        for cino, _ in n.entries.values():
            if cino not in self.durable:
                c = self.live[cino]
                stub = c.copy()
                if not c.is_dir and not stat.S_ISLNK(c.mode):
                    stub.pages, stub.size = {}, 0  # never fsynced: no data on the disk
                if c.is_dir:
                    stub.entries, stub.next_pos = {}, 1  # its own entries wait for its fsync
                self.durable[cino] = stub

    # --- the operations -------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check()
        entry = self._dir(parent_inode).entries.get(name)
        if entry is None:
            raise fuse_error(errno.ENOENT)
        return self._attrs(entry[0])

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        return None

    async def getattr(self, inode: int,
                      ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        self._check()
        return self._attrs(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check()
        n = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            if n.is_dir:
                raise fuse_error(errno.EISDIR)
            n.truncate(attr.st_size)
            n.mtime_ns = now
        if fields.update_mode:
            n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            n.uid = attr.st_uid
        if fields.update_gid:
            n.gid = attr.st_gid
        if fields.update_atime:
            n.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            n.mtime_ns = attr.st_mtime_ns
        n.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
        return self._attrs(inode)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self._check()
        n = self._node(inode)
        if not stat.S_ISLNK(n.mode):
            raise fuse_error(errno.EINVAL)
        return n.target

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check()
        if not stat.S_ISREG(mode):
            raise fuse_error(errno.EPERM)  # no device nodes, fifos or sockets
        parent = self._dir(parent_inode)
        return self._attrs(self._enter(parent_inode, name, self._new_node(ctx, mode, parent)))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check()
        parent = self._dir(parent_inode)
        n = self._new_node(ctx, stat.S_IFDIR | stat.S_IMODE(mode), parent)
        return self._attrs(self._enter(parent_inode, name, n))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check()
        parent = self._dir(parent_inode)
        n = self._new_node(ctx, stat.S_IFLNK | 0o777, parent)
        n.target, n.size = target, len(target)
        return self._attrs(self._enter(parent_inode, name, n))

    def _remove(self, parent_ino: int, name: bytes, *, want_dir: bool) -> None:
        parent = self._dir(parent_ino)
        entry = parent.entries.get(name)
        if entry is None:
            raise fuse_error(errno.ENOENT)
        ino = entry[0]
        n = self._node(ino)
        if want_dir and not n.is_dir:
            raise fuse_error(errno.ENOTDIR)
        if not want_dir and n.is_dir:
            raise fuse_error(errno.EISDIR)
        if n.is_dir and n.entries:
            raise fuse_error(errno.ENOTEMPTY)
        del parent.entries[name]
        parent.mtime_ns = parent.ctime_ns = time.time_ns()
        n.ctime_ns = parent.ctime_ns
        if n.is_dir:
            self.nlink[parent_ino] -= 1
            self.nlink[ino] -= 1
        self._unlinked(ino, parent_ino, name)

    async def unlink(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> None:
        self._check()
        self._remove(parent_inode, name, want_dir=False)

    async def rmdir(self, parent_inode: int, name: bytes,
                    ctx: pyfuse3.RequestContext) -> None:
        self._check()
        self._remove(parent_inode, name, want_dir=True)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._check()
        old_parent, new_parent = self._dir(parent_inode_old), self._dir(parent_inode_new)
        entry = old_parent.entries.get(name_old)
        if entry is None:
            raise fuse_error(errno.ENOENT)
        ino = entry[0]
        target = new_parent.entries.get(name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if target is None:
                raise fuse_error(errno.ENOENT)
            old_parent.add(name_old, target[0])
            new_parent.add(name_new, ino)
            for moved, frm, to in ((ino, (parent_inode_old, name_old),
                                    (parent_inode_new, name_new)),
                                   (target[0], (parent_inode_new, name_new),
                                    (parent_inode_old, name_old))):
                links = self.parents[moved]
                links.pop(frm, None)
                links[to] = None
            return
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise fuse_error(errno.EEXIST)
            if target[0] == ino:
                return
            self._remove(parent_inode_new, name_new, want_dir=self._node(ino).is_dir)
        n = self._node(ino)
        if n.is_dir and parent_inode_new != parent_inode_old:
            # No directory into its own subtree.
            up = parent_inode_new
            while up != pyfuse3.ROOT_INODE:
                if up == ino:
                    raise fuse_error(errno.EINVAL)
                up = next(iter(self.parents[up]))[0]
            self.nlink[parent_inode_old] -= 1
            self.nlink[parent_inode_new] += 1
        del old_parent.entries[name_old]
        new_parent.add(name_new, ino)
        links = self.parents[ino]
        links.pop((parent_inode_old, name_old), None)
        links[(parent_inode_new, name_new)] = None
        now = time.time_ns()
        old_parent.mtime_ns = old_parent.ctime_ns = now
        new_parent.mtime_ns = new_parent.ctime_ns = now
        n.ctime_ns = now

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._check()
        n = self._node(inode)
        if n.is_dir:
            raise fuse_error(errno.EPERM)
        parent = self._dir(new_parent_inode)
        if new_name in parent.entries:
            raise fuse_error(errno.EEXIST)
        parent.add(new_name, inode)
        self._linked(inode, new_parent_inode, new_name)
        n.ctime_ns = parent.mtime_ns = parent.ctime_ns = time.time_ns()
        return self._attrs(inode)

    async def open(self, inode: int, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._check()
        n = self._node(inode)
        if n.is_dir:
            raise fuse_error(errno.EISDIR)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            n.truncate(0)
            n.mtime_ns = n.ctime_ns = time.time_ns()
        # Never direct_io: SQLite maps its -shm file shared, which needs the page cache.
        return pyfuse3.FileInfo(fh=self._open_fh(inode), keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check()
        parent = self._dir(parent_inode)
        ino = self._enter(parent_inode, name,
                          self._new_node(ctx, stat.S_IFREG | stat.S_IMODE(mode), parent))
        return pyfuse3.FileInfo(fh=self._open_fh(ino), keep_cache=True), self._attrs(ino)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._check()
        return self._node(self.handles[fh]).read(off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._check()
        n = self._node(self.handles[fh])
        n.write(off, buf)
        n.mtime_ns = n.ctime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        self._check()

    async def release(self, fh: int) -> None:
        ino = self.handles.pop(fh, None)
        if ino is not None:
            self.opens[ino] = self.opens.get(ino, 1) - 1
            self._maybe_free(ino)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._check()
        ino = self.handles[fh]
        self._sync_file(ino)
        self._count_fsync(ino)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._check()
        self._dir(inode)
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles[fh] = inode
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self._check()
        n = self._dir(self.dir_handles[fh])
        for pos, name, ino in sorted((pos, name, ino)
                                     for name, (ino, pos) in n.entries.items()):
            if pos <= start_id or ino not in self.live:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino), pos):
                return

    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self._check()
        ino = self.dir_handles[fh]
        self._sync_dir(ino)
        self._count_fsync(ino)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self._check()
        st = os.statvfs(self.backing)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail"):
            setattr(out, name, getattr(st, name))
        out.f_namemax = 255
        return out


# --- the process ------------------------------------------------------------------------

def answer(obj: dict[str, Any]) -> None:
    os.write(1, (json.dumps(obj) + "\n").encode())


async def control(fs: LazyFS) -> None:
    """Commands from stdin (see the module docstring); returns when stdin closes."""
    stream = trio.lowlevel.FdStream(os.dup(0))
    buf = b""
    async with stream:
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                words = line.decode().split()
                if not words:
                    continue
                if words[0] == "stats":
                    answer({"ops": fs.ops, "fsyncs": fs.fsyncs, "frozen": fs.frozen,
                            "inodes": len(fs.live)})
                elif words[0] == "crash":
                    answer(fs.crash(int(words[1]) if len(words) > 1 else 0))
                else:
                    answer({"error": f"unknown command {words[0]!r}"})


async def serve(fs: LazyFS, mountpoint: str) -> None:
    options = set(pyfuse3.default_options) | {"fsname=lazyfs", "subtype=lazyfs"}
    options.discard("default_permissions")  # root runs the tests; lazyfs checks no modes
    pyfuse3.init(fs, mountpoint, options)
    answer({"ready": True})
    unmounted = False
    try:
        async with trio.open_nursery() as nursery:

            async def until_stdin_closes() -> None:
                # The test that started us is gone: unmount rather than leave a mount behind.
                await control(fs)
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_stdin_closes)
            await pyfuse3.main()
            unmounted = True
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=not unmounted)
    if not fs.frozen:
        fs.write_image(fs.live)  # a clean unmount: everything reaches the disk


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: lazyfs.py BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    fs = LazyFS(Path(argv[0]).resolve())
    trio.run(serve, fs, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
