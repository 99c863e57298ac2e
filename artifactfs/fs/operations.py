"""The pyfuse3 ``Operations`` of the mount: a thin adapter over the store.

Each handler turns a kernel request into one store call and the store's errors into their
errno (errors.py, DESIGN §5). No rule about keys, the tree or commits is decided here; what
lives here is the state of open files (file handles) that only the mount has.

Open files: a read handle holds an fd on what the file was when it was opened (open_read);
a writable handle shares its inode's ``WriteSession`` and writes into its staging file with
``os.pwrite`` inline (a thread hop per request costs more than it saves: docs/PLATFORM.md). Large
READs are answered from a mapping of the file, not a copy (reading.py). Read-only opens of a
plain committed artifact share one read handle per inode, and after the first the patched
pyfuse3 answers their OPEN and RELEASE itself (shared_reads.py says when it must not).

Commit timing: the kernel sends RELEASE *after* close(2) has returned (asynchronously), so a
program that closes a file and then asks the HTTP face for it could race the commit. The commit
therefore happens at the FLUSH of the last writable handle (flush is synchronous with close),
and a handle written to again after that (a dup'd descriptor, a shared mapping) joins a fresh
session that commits at its own last flush or release.

A reader keeps the version it opened (docs/SEMANTICS.md, Overwriting): when a file that
descriptors hold open for reading is opened for writing or truncated through the mount, its
name first moves to a new inode (``_move_name``; the kernel's retry of the ESTALE answer reaches
the new one), as when the name is replaced by rename or by another face (inodes.py) or the file
is unlinked. Handles opened while a writer has the inode open share its page cache and read the
writer's bytes, and after the commit they follow the new version. An open racing a replacement
gets one whole version, old or new, never ESTALE (replaced.py).

Inode numbers are entry ids plus a version (inodes.py); every handler maps the kernel's inode to
the entry id before asking the store.

With ``passthrough`` (the mount's default, where kernel, pyfuse3 and privilege allow it),
read-only opens of committed versions are answered with the blob as a backing file and the
kernel reads it without the daemon; the writeback cache is then off. passthrough.py says which
opens.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from dataclasses import replace

import pyfuse3
import trio

from ..errors import ArtifactError
from ..models import MAX_COMPONENT_BYTES
from ..store import ArtifactStore, Change, Entry, WriteSession
from .attributes import entry_attributes
from .handles import DirHandle, FileHandle
from .inodes import InodeMap
from .kernel_cache import Invalidation, KernelCache
from .passthrough import BackingFiles
from .passthrough import available as passthrough_available
from .passthrough import privileged as passthrough_privileged
from .passthrough_writes import PassthroughWrites
from .reading import read_reply
from .replaced import ReplacedVersions
from .shared_reads import PASSTHROUGH as SHARED_PASSTHROUGH
from .shared_reads import SharedReads
from .translate import translated

log = logging.getLogger("artifactfs.fs")

# Entries per store query while listing a directory: one query per batch (docs/PLATFORM.md).
READDIR_BATCH = 512

# Seconds every RELEASE waits before its commit. Zero but in tests: they set it to hold a
# close's RELEASE back while other opens run, as a busy daemon may (tests/test_mount_reopen.py).
RELEASE_DELAY = float(os.environ.get("ARTIFACTFS_RELEASE_DELAY", "0"))

# pyfuse3 as built by scripts/setup (patches/) can set FOPEN_CACHE_DIR and FOPEN_NOFLUSH in
# open replies; a stock pyfuse3 cannot, and the mount then works as before, only slower.
OPEN_FLAGS = hasattr(pyfuse3.FileInfo, "cache_readdir") and hasattr(pyfuse3.FileInfo, "noflush")
# The stock release (a plain `pip install .`): none of the fork's features (patches/README.md).
STOCK_PYFUSE3 = not OPEN_FLAGS and not passthrough_available()

class Operations(pyfuse3.Operations):
    """The mount's request handlers (see the module docstring for open-file semantics)."""

    # docs/PLATFORM.md, The writeback cache: larger WRITEs, faster cp; the kernel may read files
    # opened write-only and turns O_APPEND into positioned writes (staging files are O_RDWR).
    # Not asked for when passthrough is (the kernel refuses the two together; passthrough.py).
    enable_writeback_cache = True
    # The kernel otherwise asks for security.capability (a GETXATTR round trip) before every
    # write(2), passthrough writes included (docs/PLATFORM.md, Extended attributes).
    # In exchange the file system clears setuid/setgid on writes itself; the mount is nosuid
    # (mount.py, mount_options), so those bits mean nothing here and are kept as set.
    enable_killpriv_v2 = True

    def __init__(self, store: ArtifactStore, cache: KernelCache | None = None, *,
                 passthrough: bool = False, passthrough_writes: bool = False,
                 share_reads: bool = True) -> None:
        super().__init__()
        self.store = store
        # Read by the patched pyfuse3 at INIT (passthrough.py): when the kernel offers
        # passthrough it is asked for instead of the writeback cache.
        self._passthrough_asked = passthrough
        self._privileged = passthrough and passthrough_privileged()
        self.enable_passthrough = passthrough and passthrough_available() and self._privileged
        self.backing = BackingFiles(enabled=False)
        # New write-only files written by the kernel into their staging files (an option).
        self.pt_writes = PassthroughWrites(store, self.backing, enabled=passthrough_writes)
        self.cache = cache or KernelCache()
        self.inodes = InodeMap()
        # Read-only opens of plain committed artifacts answered in C (shared_reads.py).
        self.shared = SharedReads(self._close_handle, enabled=share_reads and OPEN_FLAGS)
        self.replaced = ReplacedVersions(on_retrying=self.shared.defer_opens)
        self._handles: dict[int, FileHandle] = {}
        self._by_inode: dict[int, set[FileHandle]] = {}
        self._dirs: dict[int, DirHandle] = {}
        # Directories removed while the kernel still holds their inode (an open fd, a cwd):
        # fstat answers what they were, with nlink 0, as on a disk, until the kernel forgets
        # the inode.
        self._removed_dirs: dict[int, Entry] = {}
        # Directory entry id -> the number of the last change another face made to its
        # entries, from one counter. Added to the mtime the mount reports (in ns): the kernel
        # checks a kept listing against the directory's mtime at each opendir, and a listing
        # kept of an empty directory has no pages for an invalidation to drop, so the mtime is
        # what tells it. The store moves a directory's mtime when entries come and go, not
        # when another face replaces an artifact's content (a new inode in the listing): this
        # moves it by nanoseconds then too. One counter, so that a number forgotten with its
        # inode (forget) is never reported again for that directory: FORGET may come after the
        # kernel looked the directory up anew. One int per directory changed and not yet forgotten.
        self._dir_changes: dict[int, int] = {}
        self._change_numbers = itertools.count(1)
        # Counts names that went or changed (unlink, rmdir, rename, another face's change):
        # entries a readdir batch read before such a change are not handed to the kernel.
        self._removals = 0
        self._next_fh = itertools.count(1)
        self.initialized = trio.Event()
        store.add_listener(self._changed_elsewhere)

    def init(self) -> None:
        # Called when the kernel's INIT arrives: from here on the mount answers requests.
        self.initialized.set()
        log.info("the kernel connected to the mount")
        if STOCK_PYFUSE3:
            # One line for all the stock release lacks (_init_passthrough adds none of its own).
            log.warning("pyfuse3 %s is the stock release, not the fork scripts/setup builds"
                        " (patches/README.md): no passthrough, and every listing, open and"
                        " close reaches the daemon; reads are served by the daemon, with the"
                        " writeback cache", pyfuse3.__version__)
        elif not OPEN_FLAGS:
            log.warning("pyfuse3 %s cannot keep directory listings in the kernel or skip "
                        "FLUSH (not the build of scripts/setup): every listing and close "
                        "reaches the daemon", pyfuse3.__version__)
        self._init_passthrough()

    def _init_passthrough(self) -> None:
        """Log once, in one line, what the mount's reads will use: where passthrough cannot
        be had, the daemon serves reads with the writeback cache, as with --no-passthrough."""
        if not self._passthrough_asked:
            log.info("passthrough off (--no-passthrough): reads are served by the daemon,"
                     " with the writeback cache")
        elif STOCK_PYFUSE3:
            pass  # init() said it
        elif not self._privileged:
            log.warning("passthrough unavailable: the daemon lacks CAP_SYS_ADMIN, which the"
                        " kernel's backing files need; reads are served by the daemon, with"
                        " the writeback cache")
        elif not self.enable_passthrough:
            log.warning("passthrough unavailable: pyfuse3 %s cannot ask the kernel for it"
                        " (not the build of scripts/setup, libfuse >= 3.17): reads are served"
                        " by the daemon, with the writeback cache", pyfuse3.__version__)
        elif not pyfuse3.passthrough_enabled():
            log.warning("passthrough unavailable: the kernel does not offer it (Linux >= 6.9"
                        " with CONFIG_FUSE_PASSTHROUGH): reads are served by the daemon, with"
                        " the writeback cache")
        else:
            self.backing.enabled = True
            if not SHARED_PASSTHROUGH:
                # Passthrough opens carry a backing id, which this pyfuse3's C path of shared
                # read handles does not give (shared_reads.py): every open reaches Python.
                self.shared.enabled = False
            log.info("passthrough on: the kernel reads committed artifacts from their blobs"
                     " (no writeback cache)")

    def _changed_elsewhere(self, change: Change) -> None:
        """The store's listener for changes made by another face. Runs inside the store's
        call on the trio thread: bookkeeping and a queue only (kernel_cache.py says why)."""
        self._removals += 1
        if change.parent_id is None:
            return
        self._dir_changes[change.parent_id] = next(self._change_numbers)
        parent = self.inodes.inode(change.parent_id)
        if change.kind == "content":
            self._retire(self.inodes.replace(change.entry_id), change.previous)
            self.cache.queue(Invalidation("name", parent, change.name))
        elif change.kind == "removed":
            old = self.inodes.remove(change.entry_id)
            self._retire(old, change.previous)
            self.cache.queue(Invalidation("removed", parent, change.name, old))
        else:
            self.cache.queue(Invalidation("name", parent, change.name))

    def _retire(self, inode: int, previous: Entry | None) -> None:
        """``inode`` no longer names what its entry holds (replaced or removed): opens of it
        reach Python again, which answers them as replaced.py says."""
        self.shared.unshare(inode)
        self.replaced.retire(inode, previous)

    # --- attributes and names --------------------------------------------------------------

    def _attrs(self, e: Entry) -> pyfuse3.EntryAttributes:
        if not e.is_dir:
            return entry_attributes(e, inode=self.inodes.inode(e.id))
        changed = self._dir_changes.get(e.id)
        if changed:  # ctime too, which is never older than the mtime (but one set ahead)
            e = replace(e, mtime_ns=e.mtime_ns + changed, ctime_ns=e.ctime_ns + changed)
        return entry_attributes(e, inode=self.inodes.inode(e.id),
                                subdirs=self.store.subdir_count(e.id))

    def _current_entry(self, inode: int) -> Entry:
        """The entry behind a kernel inode that is still what the kernel thinks it is."""
        if not self.inodes.is_current(inode):
            raise ArtifactError(f"inode {inode:#x} is an older version", errno=errno.ESTALE)
        return self.store.entry(self.inodes.entry_id(inode))

    @translated
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        parent = self.inodes.entry_id(parent_inode)
        return self._attrs(self.store.lookup(parent, os.fsdecode(name)))

    @translated
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        try:
            return self._attrs(self._current_entry(inode))
        except ArtifactError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            removed = self._removed_dirs.get(inode)
            if removed is not None:
                return entry_attributes(removed, inode=inode, nlink=0)
            if not self._by_inode.get(inode):
                self._getattr_replaced(inode, ctx, exc)
        return self._detached_attrs(inode)

    def _getattr_replaced(self, inode: int, ctx: pyfuse3.RequestContext | None,
                          exc: ArtifactError) -> None:
        """GETATTR of a replaced version no one has open. The kernel asks it between the
        lookup and the OPEN of an open(2) (a permission check), and for stat(2): as for OPEN
        (replaced.py), the first time is ESTALE, so a stat through a name the kernel has not
        dropped yet looks again and finds the name gone or replaced; on the kernel's retry it
        answers for that version (nlink 0), so the retried OPEN can follow. Returns only by
        letting the caller answer; raises otherwise."""
        if self.replaced.version(inode) is None or ctx is None:
            raise exc
        if not self.replaced.retrying(ctx.pid):
            self.replaced.refused(ctx.pid)
            raise ArtifactError(f"inode {inode:#x} was replaced (the kernel will retry,"
                                f" thread {ctx.pid})", errno=errno.ESTALE)

    def _detached_attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        """fstat on a file unlinked or replaced while open (what its handles still read), or
        on a replaced version: with nlink 0."""
        handles = self._by_inode.get(inode)
        if not handles:
            previous = self.replaced.version(inode)
            assert previous is not None
            return entry_attributes(previous, inode=inode, nlink=0)
        h = next(iter(handles))
        fd = h.ws.fd if h.ws is not None else h.fd
        e = h.entry if fd is None else replace(h.entry, size=os.fstat(fd).st_size)
        return entry_attributes(e, inode=inode, nlink=0)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        # Inode numbers are derived from entry ids, not allocated: nothing to count or free
        # but what is kept of removed directories.
        for inode, _ in inode_list:
            self.shared.unshare(inode)
            self._removed_dirs.pop(inode, None)
            # The kernel's listing went with the inode: the next one starts afresh.
            self._dir_changes.pop(self.inodes.entry_id(inode), None)

    @translated
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            return await self._setattr(inode, attr, fields, ctx)
        except ArtifactError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESTALE) or not (
                    self._by_inode.get(inode) or self.replaced.version(inode)):
                raise
        # Unlinked (or replaced) while open, or a replaced version an open may yet get
        # (replaced.py): no row is left to keep attributes on, yet with the writeback cache
        # the kernel flushes the ctime it bumped at unlink (or at a rename over the file), at
        # once or when the file closes, and a failure here would fail every later close(2) of
        # the inode with EIO (the kernel keeps it as the mapping's error).
        return self._detached_attrs(inode)

    async def _setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                       fields: pyfuse3.SetattrFields, ctx: pyfuse3.RequestContext | None
                       ) -> pyfuse3.EntryAttributes:
        if not self.inodes.is_current(inode):
            raise ArtifactError(f"inode {inode:#x} is an older version", errno=errno.ESTALE)
        entry_id = self.inodes.entry_id(inode)
        e: Entry | None = None
        if fields.update_size:
            self.shared.unshare(inode)  # a new version: new opens must not get the old fd
            # Asked first, whatever follows: a retry's marker not used up here would make the
            # thread's next open (of any file) count as a retry (replaced.is_retry).
            retry = ctx is not None and self.replaced.is_retry(ctx.pid)
            if self._readers_keep_version(inode) and ctx is not None and not retry:
                # A truncate by path under readers: they keep the version they opened, as
                # under a writer (``open``); truncate(2) retries ESTALE on the new inode.
                self._move_name(self.store.entry(entry_id))
                self.replaced.refused(ctx.pid)
                log.debug("setattr: inode %#x has readers: its name moved to a new inode (the"
                          " kernel will retry, thread %d)", inode, ctx.pid)
                raise pyfuse3.FUSEError(errno.ESTALE)  # not the unlinked-while-open answer
            e = await self.store.truncate(entry_id, attr.st_size)
            if self.store.active_write(entry_id) is None:
                # No session was open: the truncate committed a version of its own, which the
                # inode's handles read from now on (they share the kernel's pages of it).
                self._follow_new_version(None, e)
        if (fields.update_mode or fields.update_uid or fields.update_gid
                or fields.update_mtime or fields.update_atime):
            # One of these arrives before every written file closes (the writeback cache's
            # mtime): each query saved here counts (docs/PLATFORM.md, The cost of a request).
            e = self.store.set_attrs(
                entry_id,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                # Sent by the kernel only where it keeps a file's times (writeback cache).
                ctime_ns=attr.st_ctime_ns if fields.update_ctime else None,
            )
            if fields.update_mtime and e.is_dir:
                # The mtime set is the one to report, without a change number (_attrs): it
                # differs from the one the kernel listed under, which drops that listing.
                self._dir_changes.pop(entry_id, None)
        return self._attrs(e if e is not None else self.store.entry(entry_id))

    # --- directories -----------------------------------------------------------------------

    @translated
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.FileInfo | int:
        fh = next(self._next_fh)
        self._dirs[fh] = DirHandle(self.inodes.entry_id(inode))
        if not OPEN_FLAGS:
            return fh
        if self.cache.listing_stale(inode):
            # Another face changed the directory and the kernel has not yet been told
            # (kernel_cache.py, a moment later): this listing comes from the daemon, and the
            # kernel drops the pages of its copy (no keep_cache).
            return pyfuse3.FileInfo(fh=fh, keep_cache=False)
        # The kernel keeps what readdir returned (cache_readdir) across opendirs (keep_cache)
        # and serves the next listing itself. It starts afresh when the directory changed
        # through the mount (fuse_dir_changed) or when the mtime it gets after another face's
        # change differs from the one it listed under (_dir_changes; the invalidation drops
        # its attributes and pages).
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)

    @translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # The cursor is the last entry id reported: stable while entries come and go, and
        # each batch is one indexed query (no O(n^2) paging over a 100k-entry directory).
        # The kernel asks in 4 KiB replies (~25 entries with attributes), so what a batch
        # held beyond one reply waits on the handle for the next request.
        d = self._dirs[fh]
        after = start_id
        batch = d.take(after, self._removals)
        while True:
            if batch is None:
                batch = self.store.readdir(d.entry_id, after, READDIR_BATCH)
                complete = len(batch) < READDIR_BATCH
            else:
                complete = d.complete
            for i, e in enumerate(batch):
                if not pyfuse3.readdir_reply(token, os.fsencode(e.name), self._attrs(e), e.id):
                    d.keep(after, batch[i:], complete, self._removals)
                    return
                after = e.id
            if complete:
                return
            batch = None

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @translated
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        e = self.store.mkdir(self.inodes.entry_id(parent_inode), os.fsdecode(name), mode,
                             ctx.uid, ctx.gid)
        return self._attrs(e)

    @translated
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._removals += 1
        parent = self.inodes.entry_id(parent_inode)
        removed = self.store.lookup(parent, os.fsdecode(name))
        self.store.rmdir(parent, os.fsdecode(name))
        self._removed_dirs[self.inodes.inode(removed.id)] = removed
        self._dir_changes.pop(removed.id, None)

    @translated
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._removals += 1
        removed = self.store.unlink(self.inodes.entry_id(parent_inode), os.fsdecode(name))
        self._retire(self.inodes.inode(removed.id), removed)

    @translated
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self._removals += 1
        replaced = self.store.rename(
            self.inodes.entry_id(parent_inode_old), os.fsdecode(name_old),
            self.inodes.entry_id(parent_inode_new), os.fsdecode(name_new), flags)
        if replaced is not None and replaced.is_dir:
            self._removed_dirs[self.inodes.inode(replaced.id)] = replaced
        elif replaced is not None:
            self._retire(self.inodes.inode(replaced.id), replaced)

    @translated
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        e = self.store.symlink(self.inodes.entry_id(parent_inode), os.fsdecode(name),
                               os.fsdecode(target), ctx.uid, ctx.gid)
        return self._attrs(e)

    @translated
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(self.store.readlink(self.inodes.entry_id(inode)))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        # DESIGN §3: hard links are not offered; fail at once, not with ENOSYS.
        raise pyfuse3.FUSEError(errno.EPERM)

    @translated
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            # DESIGN §3: device nodes, FIFOs and sockets are not offered.
            raise pyfuse3.FUSEError(errno.EPERM)
        # mknod(S_IFREG) makes an empty file, as create followed by close does.
        e, ws = self.store.create_file(self.inodes.entry_id(parent_inode), os.fsdecode(name),
                                       mode, ctx.uid, ctx.gid)
        committed = await self.store.release_write(ws)
        return self._attrs(committed or e)

    @translated
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.store.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = MAX_COMPONENT_BYTES
        return out

    # --- open files ------------------------------------------------------------------------

    def _add_handle(self, h: FileHandle) -> int:
        fh = next(self._next_fh)
        self._handles[fh] = h
        self._by_inode.setdefault(h.inode, set()).add(h)
        return fh

    @translated
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self.replaced.forget_retry(ctx.pid)  # an O_CREAT open retried: it creates instead
        e, ws = self.store.create_file(self.inodes.entry_id(parent_inode), os.fsdecode(name),
                                       mode, ctx.uid, ctx.gid)
        h = FileHandle(inode=self.inodes.inode(e.id), entry_id=e.id, entry=e, ws=ws,
                       writable=True)
        fh = self._add_handle(h)
        backing_id = self.pt_writes.start(h, flags)  # passthrough_writes.py
        if backing_id is not None:
            return (pyfuse3.FileInfo(fh=fh, keep_cache=False, backing_id=backing_id),
                    self._attrs(e))
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attrs(e)

    @translated
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        retry = self.replaced.is_retry(ctx.pid)
        try:
            e = self._current_entry(inode)
        except ArtifactError as exc:
            # An older version's inode, or its entry is gone: the name was replaced (by
            # another face, or a rename over it) or removed since the kernel looked it up.
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                raise
            return await self._open_replaced(inode, flags, ctx.pid, retry)
        read_only = flags & os.O_ACCMODE == os.O_RDONLY
        if not read_only and self.pt_writes.backs(inode):
            # The kernel writes this new file into its staging file (passthrough_writes.py).
            joined = self._join_staging_writer(inode, e, flags)
            if joined is not None:
                return joined
            if retry:
                raise ArtifactError(f"{e.key} is written through its staging file, and its"
                                    " name moved to a new inode, which is too",
                                    errno=errno.ETXTBSY)
            else:
                # A read-write opener may map the file, and must not share that staging
                # file: the name moves to a new inode, whose open joins the session through
                # the daemon.
                self._move_name(e)
                self.replaced.refused(ctx.pid)
                raise ArtifactError(f"{e.key} is written through its staging file: its name"
                                    f" moved to a new inode (the kernel will retry, thread"
                                    f" {ctx.pid})", errno=errno.ESTALE)
        if not read_only:
            self.shared.unshare(inode)  # new readers of the inode must read the writer's bytes
        if not read_only and self._readers_keep_version(inode):
            # Readers keep the version they opened (SEMANTICS.md, Overwriting): the name moves
            # to a new inode, and the kernel's retry opens that one for the writer.
            if retry and self.backing.holds(inode):
                # Readers opened the new inode through its blob since (passthrough.py): a
                # writer must not share that blob, and the kernel retries only once.
                raise ArtifactError(f"{e.key} is being read through its blob; it moved to a"
                                    " new inode, which is read through too", errno=errno.ETXTBSY)
            if not retry:
                self._move_name(e)
                self.replaced.refused(ctx.pid)
                raise ArtifactError(f"{e.key} has readers: its name moved to a new inode"
                                    f" (the kernel will retry, thread {ctx.pid})",
                                    errno=errno.ESTALE)
            # The retry found readers that opened the new inode during this open(2): they
            # read this writer's bytes, as opens made while a file is written do.
        if read_only and not flags & os.O_TRUNC:
            shared = self._open_shared(inode, e, flags)
            if shared is not None:
                return shared
        if read_only:
            fd = self.store.open_read(e.id)
            h = FileHandle(inode=inode, entry_id=e.id, entry=e, fd=fd)
            return self._opened(h, flags)
        if flags & os.O_TRUNC:
            ws = await self.store.open_write(e.id, truncate=True)
            h = FileHandle(inode=inode, entry_id=e.id, entry=self.store.entry(e.id), ws=ws,
                           writable=True)
        else:
            # The session (a copy of the artifact) starts at the first write: a file opened
            # read-write only to be read or mapped (np.memmap r+) costs no copy and no commit.
            # The fd keeps the bytes it opened: if the file is unlinked or replaced before
            # that first write, the handle writes on into them, as on a disk.
            h = FileHandle(inode=inode, entry_id=e.id, entry=e, fd=self.store.open_read(e.id),
                           writable=True)
        return self._opened(h, flags)

    def _open_shared(self, inode: int, e: Entry, flags: int) -> pyfuse3.FileInfo | None:
        """A read-only open answered with the inode's shared handle (shared_reads.py),
        sharing one now if the inode is a plain committed artifact no one is writing through
        the mount; None if it is not. Nothing here awaits: pyfuse3 counts the reply as an
        open of the handle, which must still be shared then."""
        fh = self.shared.handle(inode)
        if fh is None:
            if (not self.shared.enabled or self.store.active_write(e.id) is not None
                    or any(h.writable for h in self._by_inode.get(inode, ()))):
                return None
            h = FileHandle(inode=inode, entry_id=e.id, entry=e, fd=self.store.open_read(e.id))
            backing_id = 0
            if self.backing.holds(inode):
                backing_id = self.backing.share(inode)
            elif self.backing.enabled:
                if inode in self._by_inode:
                    # Cached opens of the inode (one io mode per inode, passthrough.py): the
                    # per-open path serves this one, cached too.
                    os.close(h.fd)
                    return None
                backing_id = self.backing.open(inode, h.fd) or 0
            h.passthrough = backing_id != 0
            fh = self._add_handle(h)
            self.shared.share(inode, fh, backing_id)
        elif self._handles[fh].passthrough:
            backing_id = self.backing.backing_id(inode)
        else:
            backing_id = 0
        if backing_id:
            # As pyfuse3 answers the next ones: no keep_cache (refused with passthrough), and
            # O_DIRECT served by the daemon (``_opened`` says why).
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, noflush=True,
                                    direct_io=bool(flags & os.O_DIRECT), backing_id=backing_id)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, noflush=True)

    def _join_staging_writer(self, inode: int, e: Entry, flags: int) -> pyfuse3.FileInfo | None:
        """A write-only open of an inode the kernel writes through a session's staging file
        joins that session with the same backing file; None if it cannot (a reader-writer,
        or the session is ending)."""
        h = FileHandle(inode=inode, entry_id=e.id, entry=e, writable=True)
        backing_id = self.pt_writes.join(inode, e, flags, h)
        if backing_id is None:
            return None
        # O_DIRECT: its reads and writes come to the daemon, which writes that file.
        return pyfuse3.FileInfo(fh=self._add_handle(h), keep_cache=False,
                                direct_io=bool(flags & os.O_DIRECT), backing_id=backing_id)

    def _opened(self, h: FileHandle, flags: int) -> pyfuse3.FileInfo:
        # O_DIRECT through a backing file has the disk's alignment rules (EINVAL for a read of
        # 1000 bytes); the daemon has none, so it serves O_DIRECT opens, as it serves writers.
        direct = bool(flags & os.O_DIRECT)
        backing_id = self._backing_id(h, direct)
        fh = self._add_handle(h)
        if backing_id is not None:
            h.passthrough = True
            # The kernel refuses keep_cache with passthrough. An O_DIRECT reader that joins
            # readers that read through takes direct_io: the daemon serves its reads.
            fi = pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=direct,
                                  backing_id=backing_id)
        else:
            # keep_cache: a committed artifact never changes under its inode except through
            # this mount (the kernel saw it); another face's change gets a new inode
            # (inodes.py), and so does a change through the mount while the kernel reads the
            # inode through its blob (passthrough.py).
            fi = pyfuse3.FileInfo(fh=fh, keep_cache=True)
        if OPEN_FLAGS and not h.writable:
            # A reader never commits, so its FLUSH has nothing to do: with the writeback cache
            # the kernel sends it anyway, and the patched pyfuse3 answers it without a task.
            # Writable handles keep FLUSH: a file commits at its last writer's flush.
            fi.noflush = True
        return fi

    def _backing_id(self, h: FileHandle, direct: bool) -> int | None:
        """The backing id if this open is to be answered with passthrough (passthrough.py).
        Every open of an inode the kernel reads through must be (writers never reach here:
        ``open`` moves the name off such an inode first); otherwise only a read-only, buffered
        open of a committed version that nothing else has open, cached or for writing."""
        if self.backing.holds(h.inode):
            assert not h.writable, "a writer must not share a backing file (passthrough.py)"
            return self.backing.share(h.inode)
        if (not self.backing.enabled or direct or h.writable or h.fd is None
                or self._by_inode.get(h.inode)
                or (self.inodes.is_current(h.inode)
                    and self.store.active_write(h.entry_id) is not None)):
            return None
        return self.backing.open(h.inode, h.fd)

    def _readers_keep_version(self, inode: int) -> bool:
        """Whether a change of ``inode``'s content through the mount must first move its name
        to a new inode: descriptors opened for reading hold it (a shared handle an open
        holds included; call after ``shared.unshare``) and no writer does. Readers keep the
        version they opened (DESIGN §2, §3); readers that opened while a writer had the file
        open read the writer's bytes, and a second writer joins the first's session."""
        handles = self._by_inode.get(inode, ())
        return bool(handles) and not any(h.writable for h in handles)

    def _move_name(self, e: Entry) -> None:
        """Give ``e``'s name a new inode number, leaving the kernel's readers of the old one
        (its pages and size, or its blob as backing file) the version they opened; the kernel
        is told to drop the name, as after another face's replacement (``_changed_elsewhere``).
        The old number is not retired (replaced.py): an open that still names it fails with
        ESTALE rather than write into a detached copy."""
        self._removals += 1
        if e.parent_id is not None:
            self._dir_changes[e.parent_id] = next(self._change_numbers)
            self.cache.queue(Invalidation("name", self.inodes.inode(e.parent_id), e.name))
        old = self.inodes.replace(e.id)
        self.shared.unshare(old)
        for h in self._by_inode.get(old, ()):
            h.entry = e  # fstat of the old inode: its attributes as they were at the move
        self.cache.drop_attributes(old)  # and nlink 0, as after a rename over the file

    async def _open_replaced(self, inode: int, flags: int, pid: int, retry: bool
                             ) -> pyfuse3.FileInfo:
        """OPEN of a replaced version: ESTALE the first time, so the kernel looks the name up
        again and opens what it holds now (never new bytes under the old inode's size); on the
        kernel's one retry, that version itself (replaced.py says why)."""
        previous = self.replaced.version(inode) if retry else None
        if previous is None:
            if not retry:
                self.replaced.refused(pid)
            raise ArtifactError(f"inode {inode:#x} was replaced ("
                                + ("version unknown" if retry else "the kernel will retry")
                                + f", thread {pid})", errno=errno.ESTALE)
        if flags & os.O_ACCMODE != os.O_RDONLY and self.pt_writes.backs(inode):
            # That version is a file a writer writes through its staging file (the name was
            # replaced while it wrote, and the kernel's retry found the old inode again before
            # the invalidation): as on a disk, this writer opens that file, joining its session.
            joined = self._join_staging_writer(inode, previous, flags)
            if joined is not None:
                return joined
        if flags & os.O_ACCMODE != os.O_RDONLY and self.backing.holds(inode):
            # Readers read this version through its blob (passthrough.py): a writer must not
            # share that file, and the kernel retries only once.
            raise ArtifactError(f"{previous.key}: this version is being read through its blob",
                                errno=errno.ETXTBSY)
        if flags & os.O_ACCMODE != os.O_RDONLY and flags & os.O_TRUNC:
            ws = await self.store.open_detached_write(previous.id, None)
            h = FileHandle(inode=inode, entry_id=previous.id, entry=previous, ws=ws,
                           writable=True, detached=True)
        else:
            h = FileHandle(inode=inode, entry_id=previous.id, entry=previous,
                           fd=self.store.open_version(previous),
                           writable=flags & os.O_ACCMODE != os.O_RDONLY, detached=True)
        log.debug("open of replaced inode %#x (%s) on the kernel's retry", inode, previous.key)
        return self._opened(h, flags)

    def _read_fd(self, h: FileHandle) -> int:
        if h.ws is not None:
            return h.ws.fd
        ws = self.store.active_write(h.entry_id)
        if ws is not None and ws.being_written and self.inodes.is_current(h.inode):
            return ws.fd  # being rewritten through the mount: read what the writer wrote
        if h.fd is None:
            h.fd = self.store.open_read(h.entry_id)
        return h.fd

    @translated
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        # Nothing may await between this and the return: reading.py says why.
        return read_reply(self._read_fd(self._handles[fh]), off, size)

    @translated
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self._handles[fh]
        if h.ws is None:
            # The first write of a handle opened without O_TRUNC, or one written again after
            # its commit at flush (a dup'd fd, a shared mapping).
            async with h.lock:
                if h.ws is None and h.detached:
                    h.ws = await self.store.open_detached_write(h.entry_id, h.fd)
                elif h.ws is None:
                    self.shared.unshare(h.inode)
                    h.ws = await self.store.open_write(h.entry_id, truncate=False,
                                                       unlinked_from=h.fd)
        return self.store.write(h.ws, buf, off)

    @translated
    async def flush(self, fh: int) -> None:
        h = self._handles[fh]
        if h.ws is not None and h.ws.writers == 1:
            if h.ws.passthrough:
                await self._snapshot(h)
            else:
                await self._commit(h)

    @translated
    async def fsync(self, fh: int, datasync: bool) -> None:
        h = self._handles[fh]
        if h.ws is not None:
            await self.store.sync_write(h.ws)

    @translated
    async def release(self, fh: int) -> None:
        h = self._handles.pop(fh)
        # Before any await: the kernel sent this RELEASE after close(2) returned, and the
        # opens that follow (a reader, then a writer) must find the file closed while the
        # commit below runs (a reader keeps the version it opened after the close).
        self._unlist_handle(h)
        if h.passthrough:
            self.backing.release(h.inode)
            self.pt_writes.released(h.inode)
        ws, h.ws = h.ws, None
        try:
            last = ws is not None and self.store.leave_write(ws)
            if RELEASE_DELAY:
                await trio.sleep(RELEASE_DELAY)
            if last:
                assert ws is not None
                self._after_commit(h, await self.store.commit_write(ws), ws)
        finally:
            self._forget_handle(h)

    def _close_handle(self, fh: int) -> None:
        """Close a handle no open holds any more without a RELEASE of its own: a shared read
        handle pyfuse3 let go of (shared_reads.py), and with it its backing id."""
        h = self._handles.pop(fh)
        if h.passthrough:
            self.backing.release(h.inode)
        self._forget_handle(h)

    def _unlist_handle(self, h: FileHandle) -> None:
        handles = self._by_inode.get(h.inode)
        if handles is not None:
            handles.discard(h)
            if not handles:
                del self._by_inode[h.inode]

    def _forget_handle(self, h: FileHandle) -> None:
        self._unlist_handle(h)
        if h.fd is not None:
            os.close(h.fd)
            h.fd = None

    async def _commit(self, h: FileHandle) -> None:
        """This handle stops writing; if it was the last writer, the file commits."""
        async with h.lock:
            ws, h.ws = h.ws, None
            if ws is None:
                return
            # The staging file becomes the blob (a hard link), so this fd reads what the
            # handle committed (an fd it had on the version before would read that).
            old_fd, h.fd = h.fd, os.dup(ws.fd)
            if old_fd is not None:
                os.close(old_fd)
            committed = await self.store.release_write(ws)
        self._after_commit(h, committed, ws)

    async def _snapshot(self, h: FileHandle) -> None:
        """The last writable handle of a file the kernel writes itself was closed: commit
        what it holds, and keep writing it (passthrough_writes.py)."""
        async with h.lock:
            ws = h.ws
            if ws is None:
                return
            committed = await self.store.snapshot_write(ws)
        self._after_commit(h, committed, ws)

    def _after_commit(self, h: FileHandle, committed: Entry | None, ws: WriteSession) -> None:
        if committed is None:
            return
        if self.inodes.is_current(h.inode):
            self._follow_new_version(h, committed)
        else:
            # Written through an inode another face had replaced meanwhile: the kernel's
            # current inode for the name holds the other version's size.
            old = self.inodes.replace(committed.id)
            self._retire(old, ws.replaced)
            self.cache.queue(Invalidation("name", self.inodes.inode(committed.parent_id or 0),
                                          committed.name, old))

    def _follow_new_version(self, writer: FileHandle | None, e: Entry) -> None:
        """The handles of an inode rewritten through the mount (by ``writer``, or by a
        truncate) read the new version: the kernel's pages of the inode, which they share,
        hold it, and a page read from an older version would bring back bytes the new one
        cut (past its end, where the kernel expects zeros)."""
        inode = self.inodes.inode(e.id)
        for other in self._by_inode.get(inode, ()):
            other.entry = e
            if other is not writer and other.ws is None and other.fd is not None:
                old, other.fd = other.fd, self.store.open_read(e.id)
                os.close(old)

    # --- extended attributes ---------------------------------------------------------------

    @translated
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.store.read_xattr(self.inodes.entry_id(inode), os.fsdecode(name))

    @translated
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in self.store.xattr_names(self.inodes.entry_id(inode))]

    @translated
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self.store.write_xattr(self.inodes.entry_id(inode), os.fsdecode(name), value)

    @translated
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.store.remove_xattr(self.inodes.entry_id(inode), os.fsdecode(name))

    def open_handles(self) -> int:
        """How many files are open (logged at shutdown: a busy mount was detached)."""
        return len(self._handles) - self.shared.idle()
