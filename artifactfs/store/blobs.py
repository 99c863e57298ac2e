"""The data directory on disk: the lock, staging files and blobs.

Layout::

    DATA/lock                 flock'ed by the owning process; holds its pid
    DATA/meta.db              the metadata database (schema.py)
    DATA/commits.log          commits acknowledged but not yet in meta.db (commitlog.py)
    DATA/staging/<session>    bytes of an upload session, written in place (made by its first
                              bytes; a session given all of them at once never has one)
    DATA/blobs/<id[:2]>/<id>  committed bytes, named by a random id, never by key

A commit hard-links the staging file into blobs/ before the database points at it, and unlinks
the staging name after: a crash between any two steps leaves either an orphan blob (removed at
start-up) or a staging file with its session (resumable), never a row without its bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import NoSpace, StoreLocked, from_os_error

HASH_CHUNK = 1 << 20
# Artifact bytes stop this far short of a full file system (1% of it, 1 to 64 MiB), so the
# metadata always has room to change: a delete, the very thing that frees space, must never
# fail for want of it, nor a commit or the shutdown that follows a full disk.
RESERVE_MIN, RESERVE_MAX = 1 << 20, 64 << 20
# How long one statvfs answers check_space: statvfs cost more than the rest of a small
# commit's file operations. Within this window the bytes granted since are subtracted from
# what it found, and a claim that comes within twice the reserve of the end looks again.
SPACE_CHECK_INTERVAL = 0.5


class DataDir:
    """Paths and file operations of one data directory. Holds no metadata."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.staging = root / "staging"
        self.db_path = root / "meta.db"
        self._lock_fd: int | None = None
        # Whether one syncfs(2) may stand for many fsyncs here: set by acquire().
        self.syncfs_works = False
        self.reserve = RESERVE_MIN
        self._free_seen = 0  # bytes free at the last statvfs
        self._free_seen_at = -SPACE_CHECK_INTERVAL  # time.monotonic() of it
        self._granted = 0  # bytes check_space allowed since
        # The commit path names files as plain strings: pathlib costs more than the syscall.
        self._blobs_s = str(self.blobs)
        self._staging_s = str(self.staging)

    # --- ownership -------------------------------------------------------------------------

    def acquire(self) -> None:
        """Create the layout and take the lock, or raise StoreLocked naming the owner."""
        created = [d for d in (self.root, self.blobs, self.staging) if not d.is_dir()]
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(exist_ok=True)
        self.staging.mkdir(exist_ok=True)
        # A new directory's name is durable only once its parent is fsynced (POSIX); until
        # then a power loss may take the whole layout, and every blob in it, with it.
        for parent in dict.fromkeys(d.parent for d in created):
            fsync_path(parent)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLocked(
                f"data directory {self.root} is in use by another artifactfs process"
                f" (pid {owner}); stop it or use another --data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._make_fanout()
        self.syncfs_works = _syncfs is not None and fs_type(self.root) in SYNCFS_WORKS_ON
        st = os.statvfs(self.root)
        self.reserve = min(RESERVE_MAX, max(RESERVE_MIN, st.f_blocks * st.f_frsize // 100))

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def check_space(self, nbytes: int, what: str | Callable[[], str]) -> None:
        """Raise NoSpace unless ``nbytes`` more fit and leave the reserve free. ``what`` names
        the work in the message; a function is called only if the message is needed."""
        now = time.monotonic()
        if (now - self._free_seen_at < SPACE_CHECK_INTERVAL
                and self._free_seen - self._granted - nbytes >= 2 * self.reserve):
            self._granted += nbytes
            return
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        self._free_seen, self._free_seen_at, self._granted = free, now, 0
        if free - nbytes < self.reserve:
            if callable(what):
                what = what()
            raise NoSpace(
                f"no space left for {what}: {free >> 20} MiB free on the file system of"
                f" {self.root}, {self.reserve >> 20} MiB of it kept for the metadata;"
                " delete artifacts or free space there")
        self._granted = nbytes

    # --- names -----------------------------------------------------------------------------

    @staticmethod
    def new_blob_id() -> str:
        # 128 random bits as 32 lowercase hex digits, the form of uuid4().hex (which older
        # data directories hold) at a fraction of its cost.
        return os.urandom(16).hex()

    def blob_path(self, blob_id: str) -> Path:
        return self.blobs / blob_id[:2] / blob_id

    def staging_path(self, session_id: str) -> Path:
        return self.staging / session_id

    def _blob(self, blob_id: str) -> str:
        return f"{self._blobs_s}/{blob_id[:2]}/{blob_id}"

    def _staged(self, session_id: str) -> str:
        return f"{self._staging_s}/{session_id}"

    # --- staging ---------------------------------------------------------------------------

    def create_staging(self, session_id: str) -> None:
        try:
            os.close(os.open(self._staged(session_id),
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise from_os_error(exc, "a new upload session") from exc

    def open_staging(self, session_id: str, *, create: bool = False) -> int:
        """Open a staging file read-write (the kernel's writeback cache may read it back);
        ``create``: make it if it is not there yet (an upload session's first bytes)."""
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        return os.open(self._staged(session_id), flags, 0o600)

    def staging_exists(self, session_id: str) -> bool:
        return self.staging_path(session_id).exists()

    def remove_staging(self, session_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._staged(session_id))

    def copy_blob_to_staging(self, blob_id: str, session_id: str) -> None:
        """Start a session from an artifact's bytes; copy_file_range lets the kernel share or
        copy extents without passing them through user space. Runs in a thread (it can be GBs).
        """
        src = os.open(self.blob_path(blob_id), os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst = os.open(self.staging_path(session_id), os.O_WRONLY | os.O_CLOEXEC)
            try:
                remaining = os.fstat(src).st_size
                while remaining > 0:
                    n = os.copy_file_range(src, dst, min(remaining, 1 << 30))
                    if n == 0:
                        break
                    remaining -= n
            finally:
                os.close(dst)
        except OSError as exc:
            raise from_os_error(exc, "copying an artifact into an upload session") from exc
        finally:
            os.close(src)

    # --- blobs -----------------------------------------------------------------------------

    def publish(self, session_id: str, blob_id: str, *, durable: bool) -> None:
        """Give the staging file its blob name (a hard link: both names until the commit ends)."""
        path = self._blob(blob_id)
        try:
            try:
                os.link(self._staged(session_id), path)
            except FileNotFoundError:
                self._make_blob_dir(path)
                os.link(self._staged(session_id), path)
            if durable:
                fsync_path(path)
                fsync_path(os.path.dirname(path))
        except OSError as exc:
            raise from_os_error(exc, "committing an artifact") from exc

    def write_blob(self, blob_id: str, content: bytes | bytearray | memoryview, *,
                   durable: bool) -> None:
        """A new blob straight from memory (put_artifact): no staging name is needed, since
        a crash before its row commits leaves an orphan that start-up removes."""
        path = self._blob(blob_id)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:
                self._make_blob_dir(path)
                fd = os.open(path, flags, 0o600)
            try:
                written = os.write(fd, content)  # all of it, but for a full disk
                if written < len(content):
                    view = memoryview(content)[written:]
                    while view:
                        view = view[os.write(fd, view):]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if durable:
                fsync_path(os.path.dirname(path))
        except OSError as exc:
            self.remove_blob(blob_id)
            raise from_os_error(exc, "writing an artifact") from exc

    def _make_fanout(self) -> None:
        """All 256 blobs/<xx> directories, made once in a data directory's life. Made one
        at a time as blob ids come, each would cost the commit that needs it an fsync of
        blobs/ (_make_blob_dir): most of the time of a new store's first few hundred small
        commits."""
        have = set(os.listdir(self.blobs))
        missing = [f"{i:02x}" for i in range(256) if f"{i:02x}" not in have]
        for name in missing:
            os.makedirs(self.blobs / name, exist_ok=True)
        if missing:
            fsync_path(self._blobs_s)

    def _make_blob_dir(self, path: str) -> None:
        """Create blobs/<id[:2]> and make its name durable at once: fsyncing a blob and its
        directory (the flusher, fsync before close) does not make the directory's own entry
        in blobs/ durable (POSIX asks for an fsync of blobs/), so a power loss could take a
        durable blob with its directory. The power-loss test on lazyfs found it. Once per
        prefix in a data directory's life: at most 256 times."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fsync_path(self._blobs_s)

    def open_blob(self, blob_id: str) -> int:
        return os.open(self._blob(blob_id), os.O_RDONLY | os.O_CLOEXEC)

    def remove_blob(self, blob_id: str) -> None:
        # Open handles keep the bytes alive (POSIX unlink semantics): readers of the old
        # version finish with the old bytes, and the space is freed on their last close.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._blob(blob_id))

    def blob_size(self, blob_id: str) -> int | None:
        try:
            return os.stat(self.blob_path(blob_id)).st_size
        except FileNotFoundError:
            return None

    def iter_blob_ids(self) -> Iterator[str]:
        for sub in self.blobs.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    yield f.name

    def iter_staging_ids(self) -> Iterator[str]:
        for f in self.staging.iterdir():
            yield f.name

    def fsync_staging(self, session_ids: list[str]) -> None:
        """fsync the staging files of upload sessions (those gone meanwhile are skipped)."""
        for session_id in session_ids:
            with contextlib.suppress(FileNotFoundError):
                fsync_path(self._staged(session_id))

    def fsync_blobs(self, blob_ids: list[str]) -> None:
        """fsync each blob and the directories holding them; a blob gone since (deleted,
        replaced, rolled back) has nothing left to keep.

        Many blobs at once (a burst of small commits) take one syncfs instead: on ext4 every
        fsync is a journal commit, and 10,000 of them take longer than the burst itself.
        Only where syncfs is known to reach the disk
        (SYNCFS_WORKS_ON): on a FUSE file system it returns at once having synced nothing.
        """
        if len(blob_ids) >= SYNCFS_AT and self.syncfs_works:
            syncfs(self._blobs_s)
            return
        dirs: set[Path] = set()
        for blob_id in blob_ids:
            path = self.blob_path(blob_id)
            try:
                fsync_path(path)
            except FileNotFoundError:
                continue
            dirs.add(path.parent)
        for d in dirs:
            fsync_path(d)


# From this many blobs on, one syncfs(2) of the data directory's file system beats an fsync each.
SYNCFS_AT = 32
# File systems (statfs f_type) whose syncfs writes back and waits for every dirty page and
# inode and commits their journal or log. Elsewhere syncfs may make nothing durable: the
# kernel never sends a FUSE daemon a syncfs (FUSE_SYNCFS goes to virtiofs only), so on sshfs,
# gocryptfs, s3fs or the tests' lazyfs only an fsync of each file reaches the daemon, and a
# network file system's syncfs need not reach its server. There, fsync each blob.
SYNCFS_WORKS_ON = {
    0xEF53: "ext2/ext3/ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0xF2F52010: "f2fs",
    0x01021994: "tmpfs",  # nothing to reach: tmpfs holds nothing across a power loss
}


def fs_type(path: str | Path) -> int | None:
    """statfs(2) f_type of the file system holding ``path``; None if it cannot be read."""
    statfs = getattr(_libc, "statfs", None) if _libc is not None else None
    if statfs is None:
        return None
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if statfs(os.fsencode(path), buf) != 0:
        return None
    # f_type comes first, a C long (__fsword_t); magic numbers are 32-bit.
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_libc = _load_libc()


def _load_syncfs() -> Any:
    try:
        fn = _libc.syncfs
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def syncfs(path: str | Path) -> None:
    """Flush every dirty page and inode of the file system holding ``path`` (Linux syncfs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _load_sync_file_range() -> Any:
    fn = getattr(_libc, "sync_file_range", None) if _libc is not None else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range's dirty pages to disk without waiting (Linux sync_file_range);
    the fsync that follows waits for them. A hint: nothing happens where it is missing."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of_fd(fd: int) -> tuple[str, int]:
    """Digest and length of a whole file, read with large preads (runs in a thread if big)."""
    h = hashlib.sha256()
    pos = 0
    while True:
        chunk = os.pread(fd, HASH_CHUNK, pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest(), pos


def sha256_of_path(path: Path) -> tuple[str, int] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return sha256_of_fd(fd)
    finally:
        os.close(fd)


def is_no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
