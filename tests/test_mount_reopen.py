"""Layer 6, real mounts in each of the mount's modes (mountutil.MODES): files reopened and
rewritten while other descriptors hold them, checked against the local disk.

- ``test_random_io_like_local_disk``: the fsx-style exerciser of tests/random_io.py (several
  descriptors on one file, read, write past the end, mmap read and write, truncate up and
  down, copy_file_range, fsync, close and reopen) on the mount and on the disk side by side.
  It runs in a child process, so that a SIGBUS is a failure with the last operations, not the
  end of the test run. CI runs 10,000 operations per mode; ``ARTIFACTFS_TORTURE_SCALE=10``
  runs 100,000.
- A close's RELEASE reaches the daemon after close(2) has returned, and may still be in the
  works when the next opens arrive: the mount held every RELEASE back
  (``ARTIFACTFS_RELEASE_DELAY``), so that the losing interleaving happens every time. A
  reader that opens the file after that close keeps the version it opened, as when no
  RELEASE is late (docs/SEMANTICS.md, Overwriting).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCALE
from mountutil import Mount, modes_mount_fixture

pytestmark = pytest.mark.mount

mount = modes_mount_fixture()
late_release_mount = modes_mount_fixture(env={"ARTIFACTFS_RELEASE_DELAY": "0.5"},
                                         name="late_release_mount")

EXERCISER = Path(__file__).with_name("random_io.py")
OPS_PER_RUN = 2000
RUNS = 5 * SCALE  # 10,000 operations per mode; 100,000 at ARTIFACTFS_TORTURE_SCALE=10


def run_exerciser(mnt: Path, disk: Path, *args: str) -> int:
    """Run tests/random_io.py in a child; a signal (SIGBUS on a mapped read) fails the test
    with the operations that led to it."""
    log = disk.with_name(disk.name + ".log")
    r = subprocess.run([sys.executable, os.fspath(EXERCISER), os.fspath(mnt), os.fspath(disk),
                        "--log", os.fspath(log), *args],
                       capture_output=True, text=True, timeout=600, check=False)
    if r.returncode < 0:
        last = log.read_text().splitlines()[-30:]
        pytest.fail(f"the exerciser died of signal {-r.returncode}; its last operations:\n"
                    + "\n".join(last) + "\n" + r.stderr[-2000:])
    assert r.returncode == 0, f"{r.stdout}{r.stderr[-2000:]}"
    return int(r.stdout.split()[0])  # "N operations alike"


@pytest.mark.parametrize("seed", range(RUNS))
def test_random_io_like_local_disk(mount: Mount, tmp_path: Path, seed: int) -> None:
    """Replay a failure and shrink it: ``python tests/random_io.py MNT_DIR DISK_DIR --seed S
    --ops 2000 --shrink`` on a mount."""
    mnt = mount.path / "random_io" / f"seed{seed}"
    mnt.parent.mkdir(exist_ok=True)
    ran = run_exerciser(mnt, tmp_path / "disk", "--seed", str(seed), "--ops", str(OPS_PER_RUN))
    assert ran >= OPS_PER_RUN


def rewrite_under_a_reader(d: Path, rewrite: str) -> tuple[bytes, bytes]:
    """Commit ``old-version``, open a reader, rewrite the file as ``rewrite`` says; what the
    reader reads, and what the name holds then."""
    p = d / f"v-{rewrite}.txt"
    p.write_bytes(b"old-version")  # close(2) returns; its RELEASE is held back
    with open(p, "rb") as reader:
        if rewrite == "truncate":
            os.truncate(p, 3)
        else:
            flags = os.O_TRUNC | (os.O_RDWR if rewrite == "rdwr" else os.O_WRONLY)
            fd = os.open(p, flags)
            os.write(fd, b"new")
            os.close(fd)
        return reader.read(), p.read_bytes()


@pytest.mark.parametrize("rewrite", ["wronly", "rdwr", "truncate"])
def test_reader_opened_after_a_close_keeps_its_version(
        late_release_mount: Mount, rewrite: str) -> None:
    """The shell's ``echo -n old-version > v; exec 3< v; echo -n new > v; cat <&3`` while
    the first writer's RELEASE is late: the reader reads the version it opened."""
    seen, now = rewrite_under_a_reader(late_release_mount.path, rewrite)
    assert seen == b"old-version"
    assert now == (b"old" if rewrite == "truncate" else b"new")
    got = late_release_mount.get(f"v-{rewrite}.txt").json()
    assert got["size"] == 3


def test_reader_opened_while_a_duplicate_writes_shares_the_file(mount: Mount) -> None:
    """A descriptor still open for writing (a duplicate kept after the first close, as a
    forked child keeps one) keeps the file open for writing: a reader that opens then shares
    the writer's file, as on a disk, and reads what the next writer writes."""
    p = mount.path / "shared.txt"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"old-version")
    kept = os.dup(fd)
    os.close(fd)  # commits: the file's only writable descriptor closed a copy
    try:
        assert mount.get("shared.txt").json()["size"] == 11
        with open(p, "rb") as reader:
            w = os.open(p, os.O_WRONLY | os.O_TRUNC)
            os.write(w, b"new")
            os.close(w)
            assert reader.read() == b"new"
    finally:
        os.close(kept)
    assert p.read_bytes() == b"new"


# Sequences that returned wrong bytes (or none) before, as tests/random_io.py operations:
# each truncate, mmap or reopen left a descriptor reading an older version of the file.
PINNED = {
    "truncate-down-up-after-reopen": [
        ("open", 0, "f0", os.O_RDWR), ("write", 0, 0, 1, 0x3A2F5), ("close", 0),
        ("open", 0, "f0", os.O_RDWR), ("ftruncate", 0, 0xFD21),
        ("write", 0, 0x14F60, 2, 0x232F8 - 0x14F60), ("mapread", 0, 0x2C78, 0x1284E - 0x2C78),
        ("close", 0), ("open", 0, "f0", os.O_RDWR), ("read", 0, 0x20A57, 0x232F8 - 0x20A57),
        ("ftruncate", 0, 0x39D01), ("ftruncate", 0, 0x195D), ("close", 0),
        ("open", 0, "f0", os.O_RDWR), ("read", 0, 0x1653, 0x195C - 0x1653),
        ("ftruncate", 0, 0x2945E), ("ftruncate", 0, 0x61B6), ("read", 0, 0x1EB0, 0x4306),
    ],
    "mapped-write-then-cut-then-grow": [
        ("open", 3, "f1", os.O_RDWR), ("write", 3, 0x183, 3, 0x98E3),
        ("mapwrite", 3, 0x6591, 4, 0x11), ("ftruncate", 3, 0x89F1),
        ("write", 3, 0x93CD, 5, 0x1000), ("mapread", 3, 0x6844, 0x1001),
    ],
    "append-after-truncate-by-name": [
        ("open", 1, "f0", os.O_RDWR | os.O_APPEND), ("truncate", 1, 0x1720),
        ("mapwrite", 1, 0x454, 6, 0x1000), ("ftruncate", 1, 0xCD9), ("write", 1, 0x6C5, 7, 1),
        ("truncate", 1, 0x2B724),
    ],
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_pinned_sequence(mount: Mount, tmp_path: Path, name: str) -> None:
    mnt = mount.path / "pinned" / name
    mnt.parent.mkdir(exist_ok=True)
    ops = tmp_path / "ops.json"
    ops.write_text(json.dumps(PINNED[name]))
    ran = run_exerciser(mnt, tmp_path / "disk", "--replay", os.fspath(ops))
    assert ran >= len(PINNED[name]), "operations of the sequence were skipped"
