"""FUSE passthrough for writers: the kernel writes a new file's staging file itself.

On by default (``artifactfs mount --no-passthrough-writes`` turns it off) where passthrough is
on and the data directory's file system gives every change a new ctime (below): the bytes of
``cp``, ``dd`` and a shell's ``>`` then go from the kernel to ext4 without a request to the
daemon, which otherwise spends about a second of CPU per GiB receiving, writing and hashing
them (docs/PERFORMANCE.md, "Known weak spots"). The daemon sees no write, so the commit at
close copies the staging file (store/snapshot.py says why it must, and how it knows the copy
is still the file's content) and the digest is computed from that copy after the commit
(store/digests.py); the last RELEASE needs no copy. Costs: the copy (in the kernel, page cache to
page cache), a file's pages written back twice if it stays dirty long enough, and the kernel's
writes are not held to the metadata's space reserve (the commit is).

A file created for writing only (``O_WRONLY``: ``cp``, ``dd``, shell redirections, Python's
``open(p, "wb")``) is answered with its write session's staging file as the kernel's backing
file. The FLUSH of the last writable handle commits what the file holds
(``snapshot_write``) and keeps the session open, since the kernel may write on through another
descriptor of that open file without telling the daemon; the last RELEASE commits again only
if the file changed since.

Why only ``O_WRONLY``: such a file cannot be mapped (mmap needs read access), so every change
of the staging file is a write(2) or a truncate, each of which moves the file's ctime, which is
what the store relies on. A writer that opened read-write is served as before. Why only new
files (``create``): an existing file's inode may be read through its blob or cached already
(the kernel allows one io mode and one backing file per inode, passthrough.py).

While a writer writes through its staging file, every other open of the inode must name the
same backing file: readers read the writer's bytes through it (as on a disk), and a second
write-only writer joins the session and writes into it too; a read-write opener gets a new inode
(``Operations._move_name``), as with readers of a blob.
"""

from __future__ import annotations

import logging
import os

from ..store import ArtifactStore, Entry
from ..store.blobs import fs_type
from .handles import FileHandle
from .passthrough import BackingFiles

log = logging.getLogger("artifactfs.fs")


# statfs f_type of the file systems with multigrain timestamps since Linux 6.13: a ctime read
# by fstat is followed by a different one at the next change (store/snapshot.py relies on it).
MULTIGRAIN_FS = {0xEF53, 0x58465342, 0x9123683E, 0x01021994}  # ext4, xfs, btrfs, tmpfs


def multigrain_ctime(path: os.PathLike[str] | str) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    try:
        version = (int(release[0]), int(release[1]))
    except (IndexError, ValueError):
        return False
    return version >= (6, 13) and fs_type(path) in MULTIGRAIN_FS


class PassthroughWrites:
    """Which inodes the kernel writes through a write session's staging file."""

    def __init__(self, store: ArtifactStore, backing: BackingFiles, *, enabled: bool) -> None:
        if enabled and not multigrain_ctime(store.data.root):
            # Without fine-grained ctime a same-size write in the tick after a commit's copy
            # would leave the file's state unchanged, and the last commit would miss it.
            log.info("passthrough writes off: the data directory's file system does not"
                     " give every change a new ctime (multigrain timestamps: Linux >= 6.13"
                     " on ext4, xfs, btrfs or tmpfs)")
            enabled = False
        self.enabled = enabled
        self.store = store
        self.backing = backing
        self._staging_backed: set[int] = set()

    @staticmethod
    def _write_only(flags: int) -> bool:
        return flags & os.O_ACCMODE == os.O_WRONLY

    def start(self, h: FileHandle, flags: int) -> int | None:
        """The backing id for a newly created file's first writer, or None (served by the
        daemon): not asked for, not a passthrough mount, not write-only, O_DIRECT, or the
        kernel refused."""
        ws = h.ws
        if (not self.enabled or not self.backing.enabled or ws is None
                or not self._write_only(flags) or flags & os.O_DIRECT
                or self.backing.holds(h.inode)):
            return None
        backing_id = self.backing.open(h.inode, ws.fd)
        if backing_id is None:
            return None
        self.store.pass_through(ws)
        self._staging_backed.add(h.inode)
        h.passthrough = True
        return backing_id

    def backs(self, inode: int) -> bool:
        """Whether ``inode``'s backing file is a write session's staging file (not a blob)."""
        if inode not in self._staging_backed:
            return False
        if self.backing.holds(inode):
            return True
        self._staging_backed.discard(inode)
        return False

    def join(self, inode: int, e: Entry, flags: int, h: FileHandle) -> int | None:
        """The backing id for a second writer of an inode the kernel writes through a staging
        file, which joins that session (``h`` is its new handle); None for a reader-writer,
        and when the session is ending."""
        if not self.backs(inode) or not self._write_only(flags):
            return None
        ws = self.store.active_write(e.id)
        if (ws is None or not ws.passthrough
                or not self.store.join_write(ws, truncate=bool(flags & os.O_TRUNC))):
            return None
        h.ws = ws
        h.passthrough = True
        return self.backing.share(inode)

    def released(self, inode: int) -> None:
        """A passthrough open of ``inode`` was released (after BackingFiles.release)."""
        if not self.backing.holds(inode):
            self._staging_backed.discard(inode)
