"""Layer 6, a real mount: the kernel keeps directory listings, and they stay true.

The mount asks the kernel to keep what readdir returned (FOPEN_CACHE_DIR, through the pyfuse3
that scripts/setup builds from patches/), so a second `ls` of a directory does not reach the
daemon. These tests list a directory (so the kernel holds its listing), change it through the
mount or through the HTTP face, and check the very next listing: names, and the inode numbers
a listing reports (`d_ino`), against what `lstat` says. No waiting: a listing that starts after
a change was made (a syscall or an HTTP request returned) shows it. (A pause, where there is
one, lets the daemon's invalidation of the kernel's copy finish first, to test that path too.)

Read-only opens ask for no FLUSH (FOPEN_NOFLUSH); the last test checks that a reader's close,
among writers' closes, changes nothing a writer commits. On the stock pyfuse3 every listing
reaches the daemon, and the same tests must hold there too (the `stock` run).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from mountutil import Mount, mount_fixture, workdir_fixture

pytestmark = [pytest.mark.mount, pytest.mark.stock]

mount = mount_fixture()
workdir = workdir_fixture()


def key_of(mount: Mount, p: Path) -> str:
    return os.fspath(p.relative_to(mount.path))


def listing(d: Path) -> list[str]:
    """The directory's names, each checked against lstat: the inode number the listing
    reports (possibly from the kernel's cache) is the one the name leads to now."""
    names = []
    with os.scandir(d) as it:
        for e in it:
            assert e.inode() == os.lstat(e.path).st_ino, f"{e.name}: stale inode in listing"
            names.append(e.name)
    assert len(names) == len(set(names)), f"a name listed twice: {names}"
    return sorted(names)


def listed_twice(d: Path) -> list[str]:
    """Listed twice: the second listing comes from the kernel's cache when it keeps one."""
    first = listing(d)
    assert listing(d) == first
    return first


def test_listing_follows_changes_made_through_the_mount(workdir: Path, mount: Mount) -> None:
    d, other = workdir / "d", workdir / "other"
    d.mkdir()
    other.mkdir()
    for name in ("a", "b"):
        (d / name).write_bytes(name.encode())
    assert listed_twice(d) == ["a", "b"]

    (d / "c").write_bytes(b"c")  # create
    assert listed_twice(d) == ["a", "b", "c"]
    os.unlink(d / "a")
    assert listed_twice(d) == ["b", "c"]
    os.rename(d / "b", d / "b2")  # within the directory
    assert listed_twice(d) == ["b2", "c"]
    assert listed_twice(other) == []
    os.rename(d / "c", other / "c")  # out of it
    assert listed_twice(d) == ["b2"]
    assert listed_twice(other) == ["c"]
    os.rename(other / "c", d / "b2")  # into it, over a file (a new inode for the name)
    assert listed_twice(d) == ["b2"]
    assert listed_twice(other) == []
    assert (d / "b2").read_bytes() == b"c"
    os.mkdir(d / "sub")
    assert listed_twice(d) == ["b2", "sub"]
    os.symlink("b2", d / "link")
    assert listed_twice(d) == ["b2", "link", "sub"]
    os.mknod(d / "empty")
    assert listed_twice(d) == ["b2", "empty", "link", "sub"]
    os.rename(d / "sub", other / "sub")  # a directory moves
    assert listed_twice(d) == ["b2", "empty", "link"]
    assert listed_twice(other) == ["sub"]
    os.rmdir(other / "sub")
    assert listed_twice(other) == []
    os.truncate(d / "b2", 0)  # contents change, names do not
    assert listed_twice(d) == ["b2", "empty", "link"]


def test_listing_follows_changes_made_over_http(workdir: Path, mount: Mount) -> None:
    d = workdir
    (d / "kept").write_bytes(b"kept")
    (d / "doomed").write_bytes(b"doomed")
    (d / "bulk").write_bytes(b"bulk")
    (d / "replaced").write_bytes(b"old bytes")
    assert listed_twice(d) == ["bulk", "doomed", "kept", "replaced"]

    mount.put(f"{d.name}/new.bin", b"new")
    assert listed_twice(d) == ["bulk", "doomed", "kept", "new.bin", "replaced"]
    mount.delete(f"{d.name}/doomed")
    assert listed_twice(d) == ["bulk", "kept", "new.bin", "replaced"]
    with mount.http() as c:
        r = c.post("/v1/artifacts/bulk", json={"artifacts": [{"key": f"{d.name}/bulk"}]})
        assert r.status_code == 204, r.text
    assert listed_twice(d) == ["kept", "new.bin", "replaced"]

    # Replaced over HTTP: the same names, but the name leads to a new inode (inodes.py), and
    # the listing must say so (listing() compares d_ino with lstat).
    old_ino = os.lstat(d / "replaced").st_ino
    mount.put(f"{d.name}/replaced", b"new bytes, longer")
    assert listed_twice(d) == ["kept", "new.bin", "replaced"]
    assert os.lstat(d / "replaced").st_ino != old_ino
    assert (d / "replaced").read_bytes() == b"new bytes, longer"

    # A key under directories that did not exist: the directory appears in its parent.
    mount.put(f"{d.name}/deep/er/x.bin", b"x")
    assert listed_twice(d) == ["deep", "kept", "new.bin", "replaced"]
    assert listed_twice(d / "deep") == ["er"]
    assert listed_twice(d / "deep" / "er") == ["x.bin"]
    mount.delete(f"{d.name}/deep/er/x.bin")
    assert listed_twice(d / "deep" / "er") == []  # the directory stays (DESIGN §1)


def test_empty_directory_listed_then_filled_over_http(workdir: Path, mount: Mount) -> None:
    # The kernel's copy of an empty listing has no pages for an invalidation to drop: the
    # directory's mtime is what tells the kernel (operations.py, _dir_changes). Checked at
    # once (the invalidation still queued) and after a pause (the invalidation done).
    for pause in (0.0, 0.5):
        d = workdir / f"empty-{pause}"
        d.mkdir()
        assert listed_twice(d) == []
        mount.put(f"{key_of(mount, d)}/x.bin", b"x")
        time.sleep(pause)
        assert listed_twice(d) == ["x.bin"]
        mount.delete(f"{key_of(mount, d)}/x.bin")
        time.sleep(pause)
        assert listed_twice(d) == []
        mount.put(f"{key_of(mount, d)}/y.bin", b"y")
        time.sleep(pause)
        assert listed_twice(d) == ["y.bin"]


def test_long_listing_changed_in_its_middle(workdir: Path, mount: Mount) -> None:
    # Names of ~100 bytes: the kernel's copy spans dozens of pages and the daemon answers in
    # many readdir replies, so a change in the middle must drop all of it, not just the start.
    names = [f"{i:04d}-" + "n" * 95 for i in range(1500)]
    for n in names:
        (workdir / n).write_bytes(b"")
    assert listed_twice(workdir) == names
    gone = names[700:710]
    for n in gone:
        mount.delete(f"{workdir.name}/{n}")
    added = [f"{i:04d}-added" for i in range(5)]
    for n in added:
        mount.put(f"{workdir.name}/{n}", b"+")
    assert listed_twice(workdir) == sorted(set(names) - set(gone) | set(added))
    with os.scandir(workdir) as it:
        # Partly read through the kernel's copy, then changed: the rest of this listing and
        # the next are still whole (readdir's cursor survives the cache being dropped).
        first = [next(it).name for _ in range(300)]
        mount.delete(f"{workdir.name}/{names[1400]}")
        rest = [e.name for e in it]
    seen = first + rest
    assert len(seen) == len(set(seen))
    expected = set(names) - set(gone) | set(added)
    assert expected - {names[1400]} <= set(seen) <= expected
    assert names[1400] not in listing(workdir)


def test_a_readers_close_does_not_commit_or_hold_a_writers_commit(
        workdir: Path, mount: Mount) -> None:
    p = workdir / "shared.bin"
    p.write_bytes(b"version 1")
    first = mount.get(key_of(mount, p)).json()
    # A reader opened and closed: no FLUSH reaches the mount's handlers, nothing commits.
    with open(p, "rb") as f:
        assert f.read() == b"version 1"
    assert mount.get(key_of(mount, p)).json() == first
    # A writer with readers open around it commits at its own close, readers or not.
    reader = open(p, "rb")  # noqa: SIM115 - held across the writer's life
    try:
        with open(p, "r+b") as w:
            w.write(b"VERSION 2")
            w.flush()
            with open(p, "rb") as r:
                assert r.read() == b"VERSION 2"  # one inode, one page cache: the writer's bytes
            assert mount.get(key_of(mount, p)).json() == first  # not before its close
        got = mount.get(key_of(mount, p)).json()
        assert got["sha256"] == hashlib.sha256(b"VERSION 2").hexdigest()
        dup = os.dup(reader.fileno())
        os.close(dup)  # a FLUSH-less close of a dup'd reader
        assert os.pread(reader.fileno(), 9, 0) == b"version 1"  # the version it opened
    finally:
        reader.close()
    assert mount.get(key_of(mount, p)).json() == got
