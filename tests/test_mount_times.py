"""Layer 6, a real mount: timestamps, each checked against the local disk (docs/SEMANTICS.md,
Attributes and Directories).

Each check runs the same steps in a directory of the mount and in one of ``tmp_path`` (a Linux
disk) and compares what ``stat`` shows: a directory's mtime and ctime after each change of its
entries, the three times after ``utimensat`` with ``UTIME_OMIT`` and ``UTIME_NOW``, and times
around 2**31, 2**32 and 2**33 seconds and before 1970. Where the mount differs on purpose
(noatime, the range of times it keeps) the expected values are written out instead.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mountutil import Mount, eventually, mount_fixture, mounted, workdir_fixture

pytestmark = pytest.mark.mount

mount = mount_fixture()
workdir = workdir_fixture()

S = 1_000_000_000
OLD_ATIME = 981_173_106 * S + 111  # 2001-02-03
OLD_MTIME = 981_173_106 * S + 222
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) with (seconds, nanoseconds) or (0, UTIME_NOW / UTIME_OMIT) for each."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(path))


def local(tmp_path: Path) -> Path:
    d = tmp_path / "local"
    d.mkdir()
    return d


def both(workdir: Path, tmp_path: Path, observe: Callable[[Path], object]) -> object:
    """``observe`` in the mount and on the local disk: the same answer from both."""
    on_disk = observe(local(tmp_path))
    in_mount = observe(workdir)
    assert in_mount == on_disk, f"mount {in_mount} != local disk {on_disk}"
    return in_mount


# --- a directory's times move with its entries ----------------------------------------------

def _file(p: Path) -> None:
    p.write_bytes(b"x")


PARENT_CHANGES: dict[str, tuple[Callable[[Path], None], Callable[[Path], None]]] = {
    # name: (set-up inside the directory, the change)
    "create": (lambda d: None, lambda d: _file(d / "f")),
    "create_excl": (lambda d: None,
                    lambda d: os.close(os.open(d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY))),
    "mkdir": (lambda d: None, lambda d: (d / "sub").mkdir()),
    "symlink": (lambda d: None, lambda d: (d / "l").symlink_to("target")),
    "mknod": (lambda d: None, lambda d: os.mknod(d / "n", 0o644)),
    "rmdir": (lambda d: (d / "sub").mkdir(), lambda d: (d / "sub").rmdir()),
    "unlink": (lambda d: _file(d / "f"), lambda d: (d / "f").unlink()),
    "unlink_symlink": (lambda d: (d / "l").symlink_to("t"), lambda d: (d / "l").unlink()),
    "rename": (lambda d: _file(d / "f"), lambda d: (d / "f").rename(d / "g")),
    "rename_over": (lambda d: (_file(d / "f"), _file(d / "g")),
                    lambda d: (d / "f").rename(d / "g")),
    "rename_dir": (lambda d: (d / "sub").mkdir(), lambda d: (d / "sub").rename(d / "dir")),
    # Not a change of the directory's entries: its times stay.
    "open_existing_o_creat": (lambda d: _file(d / "f"),
                              lambda d: os.close(os.open(d / "f", os.O_CREAT | os.O_WRONLY))),
    "write_a_file": (lambda d: _file(d / "f"), lambda d: (d / "f").write_bytes(b"more")),
    "utime_a_file": (lambda d: _file(d / "f"), lambda d: os.utime(d / "f", ns=(S, S))),
}


@pytest.mark.parametrize("change", list(PARENT_CHANGES))
def test_a_directory_times_move_with_its_entries(workdir: Path, tmp_path: Path,
                                                 change: str) -> None:
    set_up, act = PARENT_CHANGES[change]

    def observe(base: Path) -> tuple[bool, bool, bool, bool]:
        d = base / "d"
        d.mkdir()
        set_up(d)
        os.utime(d, ns=(OLD_ATIME, OLD_MTIME))
        before = os.stat(d)
        time.sleep(0.02)  # past the disk's clock granularity, for its ctime
        start = time.time_ns()
        act(d)
        after = os.stat(d)
        moved = after.st_mtime_ns != OLD_MTIME
        if moved:
            assert start - S < after.st_mtime_ns <= time.time_ns() + S
        return (moved, after.st_ctime_ns > before.st_ctime_ns,
                after.st_mtime_ns == after.st_ctime_ns, after.st_atime_ns == OLD_ATIME)

    moved, ctime_moved, same, atime_kept = both(workdir, tmp_path, observe)  # type: ignore[misc]
    entries_changed = change not in ("open_existing_o_creat", "write_a_file", "utime_a_file")
    assert (moved, ctime_moved, same) == (entries_changed,) * 3
    assert atime_kept


def test_rename_across_directories_moves_both_and_the_entry_ctime(
        workdir: Path, tmp_path: Path) -> None:
    def observe(base: Path) -> tuple[bool, ...]:
        src, dst = base / "src", base / "dst"
        src.mkdir()
        dst.mkdir()
        _file(src / "f")
        for d in (src, dst):
            os.utime(d, ns=(OLD_ATIME, OLD_MTIME))
        os.utime(src / "f", ns=(OLD_ATIME, OLD_MTIME))
        f_before = os.stat(src / "f")
        time.sleep(0.02)
        (src / "f").rename(dst / "f")
        f_after = os.stat(dst / "f")
        return (os.stat(src).st_mtime_ns != OLD_MTIME, os.stat(dst).st_mtime_ns != OLD_MTIME,
                os.stat(src).st_ctime_ns == os.stat(src).st_mtime_ns,
                f_after.st_ctime_ns > f_before.st_ctime_ns,
                (f_after.st_atime_ns, f_after.st_mtime_ns) == (OLD_ATIME, OLD_MTIME))

    assert both(workdir, tmp_path, observe) == (True,) * 5


def test_a_kept_listing_and_the_new_parent_times_agree(workdir: Path) -> None:
    """The kernel keeps a directory's attributes for a day: after each change through the
    mount it asks for them again (and drops the listing it kept)."""
    d = workdir / "d"
    d.mkdir()
    seen = {os.stat(d).st_mtime_ns}
    for step in (lambda: _file(d / "a"), lambda: (d / "s").mkdir(),
                 lambda: (d / "a").rename(d / "b"), lambda: (d / "b").unlink(),
                 lambda: (d / "s").rmdir()):
        os.listdir(d)
        time.sleep(0.002)
        step()
        mtime = os.stat(d).st_mtime_ns
        assert mtime not in seen
        seen.add(mtime)
    assert os.listdir(d) == []


# --- utimensat: each time on its own ---------------------------------------------------------

def test_utimensat_sets_atime_and_mtime_independently(workdir: Path, tmp_path: Path) -> None:
    def observe(base: Path) -> list[tuple[int, int] | bool]:
        f = base / "f"
        _file(f)
        seen = []
        os.utime(f, ns=(1 * S + 5, 2 * S + 7))
        seen.append(os.stat(f))
        utimensat(f, (3, 9), (0, UTIME_OMIT))
        seen.append(os.stat(f))
        utimensat(f, (0, UTIME_OMIT), (4, 11))
        seen.append(os.stat(f))
        utimensat(f, (0, UTIME_OMIT), (0, UTIME_OMIT))  # changes nothing, not even ctime
        seen.append(os.stat(f))
        return [*((st.st_atime_ns, st.st_mtime_ns) for st in seen),
                seen[-1].st_ctime_ns == seen[-2].st_ctime_ns]

    assert both(workdir, tmp_path, observe) == [
        (1 * S + 5, 2 * S + 7), (3 * S + 9, 2 * S + 7), (3 * S + 9, 4 * S + 11),
        (3 * S + 9, 4 * S + 11), True]


@pytest.mark.parametrize("which", ["atime", "mtime"])
def test_utime_now_moves_only_the_time_asked_for_and_ctime(
        workdir: Path, tmp_path: Path, which: str) -> None:
    def observe(base: Path) -> tuple[bool, bool, bool]:
        f = base / "f"
        _file(f)
        os.utime(f, ns=(OLD_ATIME, OLD_MTIME))
        before = os.stat(f)
        time.sleep(0.02)
        start = time.time_ns() - S
        now = (0, UTIME_NOW)
        omit = (0, UTIME_OMIT)
        utimensat(f, *((now, omit) if which == "atime" else (omit, now)))
        st = os.stat(f)
        moved = st.st_atime_ns if which == "atime" else st.st_mtime_ns
        kept = (st.st_mtime_ns == OLD_MTIME if which == "atime"
                else st.st_atime_ns == OLD_ATIME)
        return (start < moved < time.time_ns() + S, kept,
                st.st_ctime_ns > before.st_ctime_ns)

    assert both(workdir, tmp_path, observe) == (True, True, True)


def test_a_directory_mtime_set_is_reported_exactly_after_another_face_changed_it(
        workdir: Path, mount: Mount) -> None:
    """Another face's change adds a few nanoseconds to what the mount reports (the kernel's
    listing cache, SEMANTICS.md); a time set afterwards is shown as set."""
    d = workdir / "d"
    d.mkdir()
    os.listdir(d)
    mount.put(f"{workdir.name}/d/new.bin", b"new")
    eventually(lambda: _assert_equal(os.listdir(d), ["new.bin"]))
    os.utime(d, ns=(OLD_ATIME, OLD_MTIME))
    st = os.stat(d)
    assert (st.st_atime_ns, st.st_mtime_ns) == (OLD_ATIME, OLD_MTIME)


# --- the range of times ----------------------------------------------------------------------

IN_RANGE = [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**33, 0, -1, -(2**31)]


@pytest.mark.parametrize("seconds", IN_RANGE)
def test_times_around_2038_and_before_1970_are_kept(workdir: Path, tmp_path: Path,
                                                     seconds: int) -> None:
    atime, mtime = seconds * S + 123_456_789, seconds * S + 987_654_321

    def observe(base: Path) -> list[tuple[int, int]]:
        f, d = base / "f", base / "d"
        _file(f)
        d.mkdir()
        out = []
        for p in (f, d):
            os.utime(p, ns=(atime, mtime))
            st = os.stat(p)
            out.append((st.st_atime_ns, st.st_mtime_ns))
        return out

    if seconds == -(2**31):
        # ext4 keeps 1901-12-13T20:45:52 as its first second, without nanoseconds.
        in_mount = observe(workdir)
        assert in_mount == [(atime, mtime)] * 2
    else:
        assert both(workdir, tmp_path, observe) == [(atime, mtime)] * 2


FAR = [
    (2**34, 9_223_372_035 * S),         # 2514: the last second the mount keeps (2262-04-11)
    (2**62, 9_223_372_035 * S),
    (-(2**34), -9_223_372_036 * S),     # 1425: the first second it keeps (1677-09-21)
]


@pytest.mark.parametrize(("seconds", "kept"), FAR)
def test_times_out_of_range_are_clamped_as_on_a_disk(workdir: Path, seconds: int,
                                                     kept: int) -> None:
    """A Linux disk clamps a time it cannot hold to its range (ext4: 1901 to 2446); the
    mount's range is that of 64-bit nanoseconds. Never EIO, and a file written meanwhile
    still commits (test_times_survive_a_restart shows the file's time the store kept: with
    the writeback cache the kernel shows a file's times as it set them)."""
    d, f = workdir / "d", workdir / "f"
    d.mkdir()
    os.utime(d, ns=(seconds * S + 5, seconds * S + 5))
    st = os.stat(d)
    assert (st.st_atime_ns, st.st_mtime_ns) == (kept, kept)
    with open(f, "wb", buffering=0) as w:
        w.write(b"abc")
        os.utime(w.fileno(), ns=(seconds * S + 5, seconds * S + 5))
    assert f.read_bytes() == b"abc"


# --- noatime ---------------------------------------------------------------------------------

def test_reads_never_move_atime(workdir: Path) -> None:
    """The mount is noatime: reads (plain, mapped, listings) leave atime as created or set."""
    f, d = workdir / "f", workdir / "d"
    f.write_bytes(b"x" * 10_000)
    d.mkdir()
    os.utime(f, ns=(OLD_ATIME, OLD_MTIME))
    os.utime(d, ns=(OLD_ATIME, OLD_MTIME))
    time.sleep(0.01)
    assert f.read_bytes() == b"x" * 10_000
    os.listdir(d)
    assert (os.stat(f).st_atime_ns, os.stat(d).st_atime_ns) == (OLD_ATIME, OLD_ATIME)
    fresh = workdir / "fresh"
    fresh.write_bytes(b"y")
    st = os.stat(fresh)
    assert abs(st.st_atime_ns - time.time_ns()) < 60 * S  # set when the file was created


# --- other faces -----------------------------------------------------------------------------

def test_another_face_adding_or_removing_a_key_moves_the_directory_times(
        workdir: Path, mount: Mount) -> None:
    d = workdir / "d"
    d.mkdir()
    key = f"{workdir.name}/d/new.bin"

    def reset() -> os.stat_result:
        os.utime(d, ns=(OLD_ATIME, OLD_MTIME))
        return os.stat(d)

    def moved_from(before: os.stat_result) -> os.stat_result:
        st = os.stat(d)
        assert st.st_mtime_ns - before.st_mtime_ns > S  # not just the listing's nanoseconds
        assert st.st_ctime_ns > before.st_ctime_ns and st.st_atime_ns == OLD_ATIME
        return st

    before = reset()
    mount.put(key, b"new")  # a new entry
    eventually(lambda: moved_from(before))
    before = reset()
    mount.put(key, b"replaced")  # new content for an entry: the directory is unchanged
    eventually(lambda: _assert_equal((d / "new.bin").stat().st_size, 8))
    st = os.stat(d)
    assert abs(st.st_mtime_ns - OLD_MTIME) < 1_000_000  # the listing's nanoseconds at most
    before = reset()
    mount.delete(key)
    eventually(lambda: moved_from(before))
    before = reset()
    mount.put(f"{workdir.name}/d/deeper/new.bin", b"new")  # a new directory in d
    eventually(lambda: moved_from(before))


def test_times_survive_a_restart(tmp_path: Path) -> None:
    """What stat showed is what the store kept: the same after the daemon starts again."""
    def times(p: Path) -> tuple[int, int, int]:
        st = os.lstat(p)
        return st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns

    names = ("", "d", "d/f", "d/l", "d/sub")
    with mounted(tmp_path) as m:
        (m.path / "d").mkdir()
        (m.path / "d/f").write_bytes(b"f")
        (m.path / "d/l").symlink_to("f")
        os.utime(m.path / "d/f", ns=(2**33 * S + 1, -(2**31) * S + 2))
        os.utime(m.path / "d/l", ns=(5 * S, 6 * S), follow_symlinks=False)
        for i, (seconds, _) in enumerate(FAR):
            with open(m.path / f"d/far{i}", "wb", buffering=0) as w:
                w.write(b"far")
                os.utime(w.fileno(), ns=(seconds * S + 5, seconds * S + 5))
        (m.path / "d/sub").mkdir()
        before = {p: times(m.path / p) for p in names}
    with mounted(tmp_path) as m:
        after = {p: times(m.path / p) for p in names}
        far = [times(m.path / f"d/far{i}")[:2] for i in range(len(FAR))]
    assert after == before
    assert before["d"][1] == before["d"][2] >= before["d/sub"][1]
    assert before["d/f"][:2] == (2**33 * S + 1, -(2**31) * S + 2)
    assert before["d/l"][:2] == (5 * S, 6 * S)
    assert far == [(kept, kept) for _, kept in FAR]


def _assert_equal(got: object, expected: object) -> None:
    assert got == expected
