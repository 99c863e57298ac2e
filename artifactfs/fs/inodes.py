"""Kernel inode numbers: an entry id, plus a version when another face replaced its bytes.

Why not the bare entry id: with the writeback cache the kernel trusts the size it holds for a
cached inode and never takes a new one from the daemon (fs/fuse/inode.c ignores the server's
size when writeback caching is on); invalidations drop pages and attributes but not that size.
So when an artifact is replaced through the HTTP face while the kernel still holds its inode
(someone has it open), readers would see the new bytes cut or padded to the old size: a mix.

Instead, an artifact replaced behind the kernel's back gets a new inode number. To the kernel
that is the atomic rename-over a writer does on a disk: the old inode lives on, with its pages
and size, for the handles that had it open (they keep reading the old bytes, DESIGN §3), and
the name now leads to a fresh inode with the new size. Versions live only in this daemon's
memory: the kernel forgets every inode at unmount, so after a restart all are version 0.
Directories and symlinks never change version, so the root is always pyfuse3.ROOT_INODE.
"""

from __future__ import annotations

# Entry ids are SQLite rowids; 2**40 of them is far past any store. Versions use the rest.
VERSION_SHIFT = 40
ENTRY_MASK = (1 << VERSION_SHIFT) - 1
MAX_VERSION = (1 << (64 - VERSION_SHIFT)) - 1


class InodeMap:
    """Entry id <-> kernel inode number, and which inode numbers are current."""

    def __init__(self) -> None:
        self._versions: dict[int, int] = {}

    def inode(self, entry_id: int) -> int:
        return entry_id | (self._versions.get(entry_id, 0) << VERSION_SHIFT)

    @staticmethod
    def entry_id(inode: int) -> int:
        return inode & ENTRY_MASK

    def is_current(self, inode: int) -> bool:
        return self.inode(inode & ENTRY_MASK) == inode

    def replace(self, entry_id: int) -> int:
        """The entry's bytes changed behind the kernel's back: give it a new inode number.
        Returns the old one."""
        old = self.inode(entry_id)
        version = self._versions.get(entry_id, 0) + 1
        self._versions[entry_id] = version if version <= MAX_VERSION else 1
        return old

    def remove(self, entry_id: int) -> int:
        """The entry is gone; returns the inode number the kernel knew it by."""
        old = self.inode(entry_id)
        self._versions.pop(entry_id, None)
        return old
