"""Tree operations for the mount: directories, names, rename, attributes, symlinks, xattrs.

A mixin of ArtifactStore (service.py): it shares the store's metadata, blobs and write sessions.
Every rule about the tree is here; the FUSE layer only translates.
"""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import time
from dataclasses import replace

from ..errors import Conflict, InvalidArgument, InvalidKey, NotEmpty, NotFound, Unsupported
from ..models import (
    MAX_COMPONENT_BYTES,
    join_key,
    mime_type_for_name,
    validate_mime_type,
    validate_name,
)
from .metadata import Entry
from .sessions import WriteSession
from .state import StoreState, log

MAX_SYMLINK_TARGET = 4095

# The times an entry can hold (schema.py: nanoseconds in a signed 64-bit integer), in whole
# seconds so that every nanosecond of the last second fits: 1677-09-21 to 2262-04-11.
TIME_MIN_SECONDS = -(2**63 // 10**9)
TIME_MAX_SECONDS = (2**63 - 1) // 10**9 - 1

# xattrs in the user. namespace that show artifact metadata (DESIGN §3).
XATTR_MIME = "user.mime_type"
XATTR_SHA256 = "user.sha256"
XATTR_CREATED = "user.created_at"
XATTR_SESSION = "user.upload_session_id"
_XATTR_NAMES = frozenset({XATTR_MIME, XATTR_SHA256, XATTR_CREATED, XATTR_SESSION})


class TreeOperations(StoreState):
    """The tree as the mount sees it: entries by id, names in directories."""

    # --- the tree (for the mount) ----------------------------------------------------------

    def entry(self, entry_id: int) -> Entry:
        """The entry as the mount shows it: a file open for writing has its live size."""
        e = self.meta.entry(entry_id)
        if e is None:
            raise NotFound(f"no entry {entry_id}")
        ws = self._writes.get(entry_id)
        return e if ws is None else _live(e, ws)

    def lookup(self, parent_id: int, name: str) -> Entry:
        if len(name.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise InvalidKey(f"name is longer than {MAX_COMPONENT_BYTES} bytes",
                             errno=errno.ENAMETOOLONG)
        e = self.meta.child(parent_id, name)
        if e is None:
            raise NotFound(f"no entry {name!r} in directory {parent_id}")
        ws = self._writes.get(e.id)
        return e if ws is None else _live(e, ws)

    def readdir(self, parent_id: int, after_id: int, limit: int) -> list[Entry]:
        """Children of a directory after a cursor (an entry id), in id order."""
        entries = self.meta.children(parent_id, after_id, limit)
        if self._writes:
            entries = [_live(e, ws) if (ws := self._writes.get(e.id)) else e
                       for e in entries]
        return entries

    def subdir_count(self, entry_id: int) -> int:
        return self.meta.count_subdirs(entry_id)

    def _dir(self, entry_id: int) -> Entry:
        d = self.meta.entry(entry_id)
        if d is None:
            raise NotFound(f"no directory {entry_id}")
        if not d.is_dir:
            raise Conflict(f"{d.key} is not a directory", errno=errno.ENOTDIR)
        return d

    def _new_name(self, parent_id: int, name: str) -> tuple[Entry, str]:
        """Check that ``name`` may be created in ``parent_id``; return the parent and key."""
        validate_name(name)
        parent = self._dir(parent_id)
        key = join_key(parent.key, name)
        existing = self.meta.child(parent_id, name)
        if existing is not None:
            raise Conflict(f"{key} already exists", errno=errno.EEXIST)
        return parent, key

    @staticmethod
    def _inherited(parent: Entry, kind: str, mode: int, gid: int) -> tuple[int, int]:
        """The mode and group of a new entry under ``parent``: in a set-group-ID directory it
        takes the directory's group, and a new directory keeps the bit, as on a Linux disk
        (the kernel leaves this to the file system; shared project directories rely on it)."""
        mode &= 0o7777
        if parent.mode & stat_mod.S_ISGID:
            gid = parent.gid
            if kind == "dir":
                mode |= stat_mod.S_ISGID
        return mode, gid

    def mkdir(self, parent_id: int, name: str, mode: int, uid: int, gid: int) -> Entry:
        with self.meta.transaction():
            parent, key = self._new_name(parent_id, name)
            mode, gid = self._inherited(parent, "dir", mode, gid)
            now = time.time_ns()
            new_id = self.meta.insert_entry(
                parent_id=parent_id, name=name, key=key, kind="dir", mode=mode,
                uid=uid, gid=gid, now_ns=now)
            self.meta.dirs_changed(now, parent_id)
        self._changed_keys()
        return self.entry(new_id)

    def symlink(self, parent_id: int, name: str, target: str, uid: int, gid: int) -> Entry:
        if not target or len(target.encode("utf-8", "surrogateescape")) > MAX_SYMLINK_TARGET:
            raise InvalidArgument(
                f"symlink target must be 1 to {MAX_SYMLINK_TARGET} bytes",
                errno=errno.ENAMETOOLONG if target else errno.ENOENT)
        with self.meta.transaction():
            parent, key = self._new_name(parent_id, name)
            _, gid = self._inherited(parent, "symlink", 0o777, gid)
            now = time.time_ns()
            new_id = self.meta.insert_entry(
                parent_id=parent_id, name=name, key=key, kind="symlink", mode=0o777,
                uid=uid, gid=gid, now_ns=now, target=target)
            self.meta.dirs_changed(now, parent_id)
        return self.entry(new_id)

    def readlink(self, entry_id: int) -> str:
        e = self.entry(entry_id)
        if not e.is_symlink or e.target is None:
            raise InvalidArgument(f"{e.key} is not a symbolic link")
        return e.target

    def rmdir(self, parent_id: int, name: str) -> None:
        with self.meta.transaction():
            e = self.meta.child(parent_id, name)
            if e is None:
                raise NotFound(f"no directory {name!r}")
            if not e.is_dir:
                raise Conflict(f"{e.key} is not a directory", errno=errno.ENOTDIR)
            if self.meta.has_children(e.id):
                raise NotEmpty(f"directory {e.key} is not empty")
            self.meta.delete_entry(e.id)
            self.meta.dirs_changed(time.time_ns(), parent_id)
        self._changed_keys()

    def unlink(self, parent_id: int, name: str) -> Entry:
        """Remove a file (committed or being written) or a symlink, as rm does; returns what
        was removed."""
        with self.meta.transaction():
            e = self.meta.child(parent_id, name)
            if e is None:
                raise NotFound(f"no entry {name!r}")
            if e.is_dir:
                raise Conflict(f"{e.key} is a directory", errno=errno.EISDIR)
            self.meta.delete_entry(e.id)
            self.meta.dirs_changed(time.time_ns(), parent_id)
        self._changed_keys()
        if e.blob_id:
            self._doom(e.blob_id)
        log.info("deleted %s", e.key)
        return e

    def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str,
               flags: int = 0) -> Entry | None:
        """Move a file, symlink or whole directory in one transaction.

        Returns the entry that was replaced (and is gone), if any.
        """
        noreplace = 1  # RENAME_NOREPLACE
        if flags & ~noreplace:
            raise InvalidArgument(f"rename flags {flags:#x} are not supported (only NOREPLACE)")
        validate_name(new_name)
        with self.meta.transaction():
            src = self.meta.child(old_parent, old_name)
            if src is None:
                raise NotFound(f"no entry {old_name!r}")
            dest_dir = self._dir(new_parent)
            new_key = join_key(dest_dir.key, new_name)
            target = self.meta.child(new_parent, new_name)
            if target is not None and target.id == src.id:
                return None
            if target is not None and flags & noreplace:
                raise Conflict(f"{target.key} exists", errno=errno.EEXIST)
            if src.is_dir:
                if new_key.startswith(src.key + "/"):
                    raise InvalidArgument(f"cannot move {src.key} into itself ({new_key})")
                if target is not None:
                    if not target.is_dir:
                        raise Conflict(f"{target.key} is not a directory", errno=errno.ENOTDIR)
                    if self.meta.has_children(target.id):
                        raise NotEmpty(f"directory {target.key} is not empty")
                longest = self.meta.longest_key_under(src.key)
                if longest and longest - len(src.key) + len(new_key) > 1024:
                    raise InvalidKey("a path under the moved directory would pass 1024 bytes",
                                     errno=errno.ENAMETOOLONG)
            elif target is not None and target.is_dir:
                raise Conflict(f"{target.key} is a directory", errno=errno.EISDIR)
            if not src.is_dir:
                self.meta.supersede_by_move(src, target)
            if target is not None:
                self.meta.delete_entry(target.id)
            now = time.time_ns()
            self.meta.move_entry(src.id, new_parent, new_name, new_key, now)
            self.meta.dirs_changed(now, old_parent, new_parent)
            if src.is_dir:
                self.meta.rekey_subtree(src.key, new_key)
        self._changed_keys()
        if target is not None and target.blob_id:
            self._doom(target.blob_id, replaced=True)
        log.info("renamed %s -> %s", src.key, new_key)
        return target

    def set_attrs(self, entry_id: int, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, mtime_ns: int | None = None,
                  atime_ns: int | None = None, ctime_ns: int | None = None) -> Entry:
        """chmod, chown, utimensat: metadata only, so cp -a, rsync -a and tar x finish. The
        times are independent (either may be left as it is); one outside the range an entry
        holds is clamped to it, as Linux clamps to a disk's range. ``ctime_ns``: the change's
        time where the kernel keeps a file's times itself and sends its own (the mount's
        writeback cache), so that the store keeps what stat showed; else now."""
        ctime = time.time_ns() if ctime_ns is None else clamp_time_ns(ctime_ns)
        columns: dict[str, int | str | None] = {}
        if atime_ns is not None:
            columns["atime_ns"] = clamp_time_ns(atime_ns)
        if mode is not None:
            columns["mode"] = stat_mod.S_IMODE(mode)
        if uid is not None:
            columns["uid"] = uid
        if gid is not None:
            columns["gid"] = gid
        if mtime_ns is not None:
            mtime_ns = clamp_time_ns(mtime_ns)
            columns["mtime_ns"] = mtime_ns
            ws = self._writes.get(entry_id)
            if ws is not None:
                ws.mtime_ns = mtime_ns
                ws.ctime_ns = ctime
                if len(columns) == 1:
                    # The mount's writeback cache sends every written file's mtime just before
                    # it closes; the commit that follows stores it, so spend no transaction.
                    return self.entry(entry_id)
        columns["ctime_ns"] = ctime
        if self.meta.entry(entry_id) is None:
            raise NotFound(f"no entry {entry_id}")
        self.meta.update_attrs(entry_id, **columns)
        return self.entry(entry_id)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.data.root)

    # --- xattrs ----------------------------------------------------------------------------

    def xattr_names(self, entry_id: int) -> list[str]:
        e = self.entry(entry_id)
        if not e.is_file:
            return []
        names = [XATTR_MIME]
        if e.is_artifact:
            names += [XATTR_SHA256, XATTR_CREATED]
        ws = self._writes.get(entry_id)
        if ws is not None and ws.being_written:
            names.append(XATTR_SESSION)
        return names

    async def read_xattr(self, entry_id: int, name: str) -> bytes:
        """``get_xattr``, after waiting for a digest that is still being computed."""
        await self._digest_known(entry_id, name)
        return self.get_xattr(entry_id, name)

    async def write_xattr(self, entry_id: int, name: str, value: bytes) -> None:
        """``set_xattr``, after waiting for a digest that is still being computed (``cp -a``
        and ``rsync -X`` set ``user.sha256`` to the value it has, just after the close)."""
        await self._digest_known(entry_id, name)
        self.set_xattr(entry_id, name, value)

    async def _digest_known(self, entry_id: int, name: str) -> None:
        if name == XATTR_SHA256:
            e = self.entry(entry_id)
            if e.blob_id is not None and e.sha256 is None:
                await self.digests.ready(e)

    def get_xattr(self, entry_id: int, name: str) -> bytes:
        # Answered without the database: the kernel asks for security.capability around every
        # write, ls -l for ACLs and SELinux labels on every entry (docs/PLATFORM.md). ENOTSUP,
        # not ENODATA, for other namespaces: ls remembers ENOTSUP per device and stops asking,
        # sparing the mount two requests per entry of every listing.
        if not name.startswith("user."):
            raise Unsupported(f"only user. attributes exist here, not {name}",
                              errno=errno.ENOTSUP)
        if name not in _XATTR_NAMES:
            raise NotFound(f"no attribute {name}", errno=errno.ENODATA)
        e = self.entry(entry_id)
        ws = self._writes.get(entry_id)
        value: object = None
        if e.is_file:
            if name == XATTR_MIME:
                s = self.meta.session(ws.id) if ws else None
                value = s.mime_type if s else e.mime_type
            elif name == XATTR_SHA256:
                value = e.sha256
            elif name == XATTR_CREATED:
                value = e.created_at
            elif name == XATTR_SESSION and ws is not None and ws.being_written:
                value = ws.id
        if value is None:
            raise NotFound(f"no attribute {name}", errno=errno.ENODATA)
        return str(value).encode()

    def set_xattr(self, entry_id: int, name: str, value: bytes) -> None:
        e = self.entry(entry_id)
        if name == XATTR_MIME and e.is_file:
            mime = validate_mime_type(value.decode("utf-8", "replace"))
            ws = self._writes.get(entry_id)
            if ws is not None:
                self.meta.set_session_mime_type(ws.id, mime)
            if e.is_artifact:
                self.meta.update_attrs(entry_id, mime_type=mime)
            return
        if name in (XATTR_SHA256, XATTR_CREATED, XATTR_SESSION, XATTR_MIME):
            try:
                current = self.get_xattr(entry_id, name)
            except NotFound:
                current = None
            if current == value:
                return  # cp -a copying our own read-only attributes: nothing to change
            raise Unsupported(f"{name} is read-only")
        raise Unsupported(f"attribute {name} is not supported", errno=errno.ENOTSUP)

    def remove_xattr(self, entry_id: int, name: str) -> None:
        e = self.entry(entry_id)
        if name == XATTR_MIME and e.is_file:
            self.set_xattr(entry_id, name, mime_type_for_name(e.name).encode())
            return
        if name in self.xattr_names(entry_id):
            raise Unsupported(f"{name} is read-only")
        raise NotFound(f"no attribute {name}", errno=errno.ENODATA)


def clamp_time_ns(ns: int) -> int:
    """``ns`` within the times an entry can hold; a time past either end becomes that end's
    whole second, as the kernel's timestamp_truncate does for a disk's range."""
    seconds = ns // 1_000_000_000
    if seconds > TIME_MAX_SECONDS:
        return TIME_MAX_SECONDS * 1_000_000_000
    if seconds < TIME_MIN_SECONDS:
        return TIME_MIN_SECONDS * 1_000_000_000
    return ns


def _live(e: Entry, ws: WriteSession) -> Entry:
    """A file open for writing as the mount shows it: its size, mtime and ctime so far (a
    write moves both times; the commit keeps them, metadata.set_content)."""
    return replace(e, size=ws.size(), mtime_ns=ws.mtime_ns,
                   ctime_ns=max(e.ctime_ns, ws.ctime_ns))
