"""Layer 6, a real mount: POSIX edge cases and the errno of each refusal (DESIGN §1, §3, §5)."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from mountutil import Mount, mount_fixture, workdir_fixture

pytestmark = [pytest.mark.mount, pytest.mark.stock]

mount = mount_fixture()
workdir = workdir_fixture()


def fails(code: int, fn, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == code, f"{fn.__name__}{args}: {e.value}"


def test_unlink_while_open_readers_keep_reading(workdir: Path, mount: Mount) -> None:
    p = workdir / "f.bin"
    data = os.urandom(1 << 20)
    p.write_bytes(data)
    with open(p, "rb") as r1, open(p, "rb") as r2:
        assert r1.read(10) == data[:10]
        os.unlink(p)
        assert not p.exists()
        # A new file (the newest entry's id was freed: it must not come back as the inode the
        # kernel still holds for the open one) under the same name.
        p.write_bytes(b"new file")
        assert p.read_bytes() == b"new file"
        assert os.stat(p).st_ino != os.fstat(r1.fileno()).st_ino
        assert r1.read() == data[10:]
        assert r2.read() == data
        assert os.fstat(r1.fileno()).st_size == len(data)
    assert mount.get(f"{workdir.name}/f.bin").json()["size"] == len(b"new file")


def test_unlink_while_being_written(workdir: Path, mount: Mount) -> None:
    p = workdir / "w.bin"
    with open(p, "wb") as w:
        w.write(b"abc")
        os.unlink(p)
        w.write(b"def")  # still writable, as on a disk; the bytes go with the last close
    assert not p.exists()
    assert mount.get(f"{workdir.name}/w.bin").status_code == 404
    p.write_bytes(b"again")  # the name is free for a new file
    assert p.read_bytes() == b"again"


def test_overwrite_by_rename_reader_keeps_old(workdir: Path) -> None:
    p = workdir / "ckpt.bin"
    old, new = os.urandom(500_000), os.urandom(400_000)
    p.write_bytes(old)
    with open(p, "rb") as reader:
        assert reader.read(100) == old[:100]
        tmp = workdir / "ckpt.bin.tmp"
        tmp.write_bytes(new)
        os.rename(tmp, p)  # the atomic replace of save-then-rename checkpointing
        assert reader.read() == old[100:]
    assert p.read_bytes() == new
    assert sorted(os.listdir(workdir)) == ["ckpt.bin"]


def test_overwrite_in_place_leaves_a_reader_its_version(workdir: Path) -> None:
    """A reader keeps the version it opened, as after a rename over the file (SEMANTICS.md,
    Overwriting): the writer's open moves the name to a new inode."""
    p = workdir / "in_place.txt"
    p.write_bytes(b"old contents")
    with open(p, "rb") as reader:
        assert reader.read(3) == b"old"
        p.write_bytes(b"new")  # open(O_TRUNC) + write, as cp does
        reader.seek(0)
        assert reader.read() == b"old contents"
        assert os.fstat(reader.fileno()).st_nlink == 0
        assert p.read_bytes() == b"new"
        with open(p, "ab") as w:
            w.write(b"er")
        reader.seek(0)
        assert reader.read() == b"old contents"
    assert p.read_bytes() == b"newer"


def test_a_truncate_under_a_reader_leaves_the_next_open_its_own_rule(workdir: Path) -> None:
    """truncate(2) under a reader moves the name (ESTALE, the kernel retries on the new
    inode): the mark of that retry must not carry over to the thread's next open, which
    would take it for a retry (ETXTBSY, or a write under that file's readers)."""
    cut, other = workdir / "cut.bin", workdir / "other.bin"
    cut.write_bytes(b"to be cut short")
    other.write_bytes(b"other's version")
    with open(cut, "rb") as r1, open(other, "rb") as r2:
        os.truncate(cut, 5)
        with open(other, "r+b") as w:  # the same thread, at once
            w.write(b"OTHER")
        assert r1.read() == b"to be cut short"
        assert r2.read() == b"other's version"
    assert cut.read_bytes() == b"to be"
    assert other.read_bytes() == b"OTHER's version"


def test_another_process_reading_keeps_its_version_of_a_file_written(workdir: Path) -> None:
    p = workdir / "shared.bin"
    p.write_bytes(b"A" * 8192)
    code = (
        "import sys, time\n"
        "f = open(sys.argv[1], 'rb')\n"
        "print(f.read(4096)[:1].decode(), flush=True)\n"
        "sys.stdin.readline()\n"
        "f.seek(0); d = f.read()\n"
        "print(len(d), d[:1].decode(), d[-1:].decode(), flush=True)\n"
    )
    reader = subprocess.Popen([sys.executable, "-c", code, os.fspath(p)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "A"
        with open(p, "r+b") as w:
            w.seek(8192 - 1)
            w.write(b"Z")
            w.write(b"tail")
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().split() == ["8192", "A", "A"]
    finally:
        reader.kill()
        reader.wait()
    assert p.read_bytes() == b"A" * 8191 + b"Ztail"


def test_rename_over_existing_file(workdir: Path, mount: Mount) -> None:
    a, b = workdir / "a", workdir / "b"
    a.write_bytes(b"aaa")
    b.write_bytes(b"bbbbbb")
    os.rename(a, b)
    assert b.read_bytes() == b"aaa" and not a.exists()
    assert mount.get(f"{workdir.name}/b").json()["size"] == 3
    assert mount.get(f"{workdir.name}/a").status_code == 404
    d = workdir / "d"
    d.mkdir()
    fails(errno.EISDIR, os.rename, b, d)
    fails(errno.ENOTDIR, os.rename, d, b)
    (d / "x").write_bytes(b"")
    e = workdir / "e"
    e.mkdir()
    os.rename(e, d / "sub")  # into a directory
    fails(errno.EINVAL, os.rename, d, d / "sub" / "inside")
    e.mkdir()
    fails(errno.ENOTEMPTY, os.rename, e, d)
    os.rename(d, e)  # over an empty directory
    assert sorted(os.listdir(e)) == ["sub", "x"]


def test_rmdir_non_empty_and_clashes(workdir: Path) -> None:
    d = workdir / "d"
    d.mkdir()
    (d / "f").write_bytes(b"1")
    fails(errno.ENOTEMPTY, os.rmdir, d)
    fails(errno.ENOTDIR, os.rmdir, d / "f")
    fails(errno.EISDIR, os.unlink, d)
    fails(errno.EEXIST, os.mkdir, d)
    fails(errno.EEXIST, os.mkdir, d / "f")
    fails(errno.ENOTDIR, os.mkdir, d / "f" / "g")
    fails(errno.ENOTDIR, open, d / "f" / "g", "wb")
    fails(errno.EISDIR, open, d, "wb")
    fails(errno.ENOENT, os.rmdir, d / "nothing")
    fails(errno.ENOENT, os.unlink, d / "nothing")
    fails(errno.ENOENT, open, d / "nothing" / "x", "wb")
    fails(errno.EEXIST, os.open, d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


@pytest.mark.parametrize("name", ["sp ace", "col:on", "star*", "ü", "new\nline", "back\\s"])
def test_invalid_names(workdir: Path, name: str) -> None:
    fails(errno.EINVAL, open, workdir / name, "wb")
    fails(errno.EINVAL, os.mkdir, workdir / name)
    (workdir / "ok").write_bytes(b"")
    fails(errno.EINVAL, os.rename, workdir / "ok", workdir / name)
    fails(errno.EINVAL, os.symlink, "ok", workdir / name)
    fails(errno.ENOENT, os.stat, workdir / name)


def test_too_long_names(workdir: Path) -> None:
    fails(errno.ENAMETOOLONG, open, workdir / ("n" * 256), "wb")
    fails(errno.ENAMETOOLONG, os.mkdir, workdir / ("n" * 256))
    fails(errno.ENAMETOOLONG, os.stat, workdir / ("n" * 256))
    (workdir / ("n" * 255)).write_bytes(b"ok")  # 255 bytes is allowed
    # A whole key is at most 1024 bytes.
    p = workdir
    while len(os.fspath(p.relative_to(workdir.parent))) < 900:
        p = p / ("d" * 100)
        p.mkdir()
    fails(errno.ENAMETOOLONG, open, p / ("f" * 200), "wb")


def test_unsupported_link_mknod(workdir: Path, mount: Mount) -> None:
    (workdir / "f").write_bytes(b"x")
    fails(errno.EPERM, os.link, workdir / "f", workdir / "hard")
    fails(errno.EPERM, os.mkfifo, workdir / "fifo")
    fails(errno.EPERM, os.mknod, workdir / "sock", 0o600 | stat.S_IFSOCK)
    assert sorted(os.listdir(workdir)) == ["f"]
    os.mknod(workdir / "regular", 0o600 | stat.S_IFREG)  # a regular file is just a file
    assert (workdir / "regular").read_bytes() == b""
    assert mount.get(f"{workdir.name}/regular").json()["size"] == 0


def test_symlinks(workdir: Path) -> None:
    (workdir / "target.txt").write_bytes(b"pointed at")
    os.symlink("target.txt", workdir / "link")
    assert os.readlink(workdir / "link") == "target.txt"
    assert (workdir / "link").read_bytes() == b"pointed at"
    assert os.lstat(workdir / "link").st_size == len("target.txt")
    os.symlink("../elsewhere/x", workdir / "dangling")
    assert not (workdir / "dangling").exists() and (workdir / "dangling").is_symlink()
    os.unlink(workdir / "link")
    assert sorted(os.listdir(workdir)) == ["dangling", "target.txt"]


def test_chmod_chown_utime_kept(workdir: Path) -> None:
    p = workdir / "f"
    p.write_bytes(b"x")
    os.chmod(p, 0o640)
    # Only root may give a file away (the kernel checks, default_permissions).
    uid, gid = (1234, 5678) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(p, uid, gid)
    os.utime(p, ns=(1_000_000_000_000_000_000, 1_234_567_890_123_456_789))
    st = p.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, uid, gid)
    assert st.st_mtime_ns == 1_234_567_890_123_456_789


def test_huge_truncate_does_not_allocate(workdir: Path) -> None:
    p = workdir / "big"
    p.write_bytes(b"")
    try:
        os.truncate(p, 10**15)
    except OSError as e:
        assert e.errno in (errno.EFBIG, errno.EINVAL)
    else:
        assert p.stat().st_size == 10**15
    os.truncate(p, 1 << 30)
    with open(p, "rb") as f:
        f.seek((1 << 30) - 4)
        assert f.read() == b"\0" * 4
    os.truncate(p, 3)
    assert p.read_bytes() == b"\0" * 3


def test_append_and_rdwr(workdir: Path) -> None:
    p = workdir / "a.log"
    with open(p, "ab") as f:
        f.write(b"1")
    with open(p, "ab") as f:
        f.write(b"2")
    with open(p, "r+b") as f:
        f.seek(0)
        f.write(b"X")
        f.seek(0, os.SEEK_END)
        f.write(b"3")
    assert p.read_bytes() == b"X23"
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"4")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"5")  # O_APPEND writes at the end whatever the offset
    finally:
        os.close(fd)
    assert p.read_bytes() == b"X2345"


def test_fsync_and_statfs(workdir: Path) -> None:
    p = workdir / "durable"
    with open(p, "wb") as f:
        f.write(b"d" * 10000)
        f.flush()
        os.fsync(f.fileno())
    assert p.read_bytes() == b"d" * 10000
    st = os.statvfs(workdir)
    assert st.f_namemax == 255 and st.f_blocks > 0


def test_open_for_writing_without_writing_commits_nothing(workdir: Path, mount: Mount) -> None:
    p = workdir / "ro_use.bin"
    p.write_bytes(b"q" * 100_000)
    key = f"{workdir.name}/ro_use.bin"

    def commits() -> int:
        return mount.log().count(f"committed {key} ")

    assert commits() == 1
    with open(p, "r+b") as f:
        assert f.read(10) == b"q" * 10
    with open(p, "ab"):
        pass
    assert commits() == 1  # no copy, no new version
    with open(p, "r+b") as f:
        f.seek(5)
        f.write(b"W")
    assert commits() == 2
    assert p.read_bytes() == b"q" * 5 + b"W" + b"q" * 99_994


def test_rename_while_open_for_writing_commits_under_the_new_name(
        workdir: Path, mount: Mount) -> None:
    (workdir / "a").mkdir()
    with open(workdir / "a" / "f.bin", "wb") as f:
        f.write(b"first half ")
        os.rename(workdir / "a", workdir / "b")  # the whole directory moves
        os.rename(workdir / "b" / "f.bin", workdir / "b" / "g.bin")  # and the file itself
        f.write(b"second half")
    assert (workdir / "b" / "g.bin").read_bytes() == b"first half second half"
    assert mount.get(f"{workdir.name}/b/g.bin").json()["size"] == 22
    assert mount.get(f"{workdir.name}/a/f.bin").status_code == 404


def test_listing_in_creation_order_and_seekdir_returns_to_a_telldir(workdir: Path) -> None:
    """Listings come in creation order; telldir/seekdir work as on a disk, also to an offset
    from long before the last reply."""
    import ctypes
    import random

    names = [f"e{i:04d}" for i in range(400)]
    random.Random(4).shuffle(names)
    for n in names:
        (workdir / n).write_bytes(b"")
    assert os.listdir(workdir) == names

    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    name_offset = 19  # struct dirent64: d_ino (8), d_off (8), d_reclen (2), d_type (1)

    def read_all(dirp: int) -> list[str]:
        out = []
        while ent := libc.readdir(dirp):
            out.append(ctypes.string_at(ent + name_offset).decode())
        return [n for n in out if n not in (".", "..")]

    dirp = libc.opendir(os.fsencode(workdir))
    assert dirp
    try:
        marks: dict[str, int] = {}
        seen: list[str] = []
        while len(seen) < 300:
            ent = libc.readdir(dirp)
            name = ctypes.string_at(ent + name_offset).decode()
            if name not in (".", ".."):
                seen.append(name)
                marks[name] = libc.telldir(dirp)  # the place after this entry
        assert seen == names[:300]
        libc.seekdir(dirp, marks[names[20]])  # hundreds of entries back
        assert read_all(dirp) == names[21:]
        libc.seekdir(dirp, marks[names[299]])
        assert read_all(dirp) == names[300:]
    finally:
        libc.closedir(dirp)
    # Entries removed after opendir may or may not show in that stream (POSIX: unspecified;
    # the kernel's copy of the listing serves it); a new listing has them gone.
    for n in names[10:25]:
        (workdir / n).unlink()
    assert os.listdir(workdir) == names[:10] + names[25:]
