"""Mount point lifecycle: what is mounted where, dead mounts, unmounting, read-ahead.

Nothing here stats a path inside our own mount from the daemon process: the daemon would be
asking itself a question its loop is not yet (or no longer) running to answer. What is mounted
comes from /proc/self/mountinfo instead.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
import subprocess
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

log = logging.getLogger("artifactfs.mount")

FSTYPE = "fuse.artifactfs"
# READ requests grow from 128 KiB to 1 MiB: fewer requests per byte the daemon serves
# (docs/PLATFORM.md, Request sizes and read-ahead).
READ_AHEAD_KB = 1024


class State(Enum):
    FREE = "free"  # a directory with nothing mounted on it
    MOUNTED = "mounted"  # something answers there (see MountInfo.fstype for what)
    DEAD = "dead"  # a FUSE mount whose daemon is gone: "Transport endpoint is not connected"
    MISSING = "missing"  # no such directory
    NOT_A_DIRECTORY = "not a directory"


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_point: str
    device: str  # "major:minor", the name of the mount's bdi in /sys/class/bdi
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...).
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountInfo]:
    result = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) < 5 or len(rest) < 2:
                continue
            result.append(MountInfo(mount_point=_unescape(fields[4]), device=fields[2],
                                    fstype=rest[0], source=_unescape(rest[1])))
    return result


def find_mount(path: str | os.PathLike[str]) -> MountInfo | None:
    """The topmost mount at exactly ``path`` (an absolute path), if any."""
    found = None
    for m in mounts():
        if m.mount_point == os.fspath(path):
            found = m  # later lines are mounted on top of earlier ones
    return found


def state(path: str | os.PathLike[str]) -> State:
    """What is at ``path`` right now; stats the path, so never call it on our own mount."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return State.DEAD
        if exc.errno == errno.ENOENT:
            return State.MISSING
        if exc.errno == errno.ENOTDIR:
            return State.NOT_A_DIRECTORY
        raise
    if not stat_mod.S_ISDIR(st.st_mode):
        return State.NOT_A_DIRECTORY
    return State.MOUNTED if find_mount(path) is not None else State.FREE


def fusermount(path: str | os.PathLike[str], *, lazy: bool = False) -> tuple[bool, str]:
    """``fusermount3 -u [-z] path``; returns (success, what it said)."""
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), os.fspath(path)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        return False, "fusermount3 is not installed (Debian: apt-get install fuse3)"
    except subprocess.TimeoutExpired:
        return False, f"{' '.join(cmd)} did not finish in 30 s"
    return r.returncode == 0, (r.stderr or r.stdout).strip()


def recover_dead_mount(path: str | os.PathLike[str]) -> str | None:
    """Detach a dead mount left by a killed daemon; None on success, else how to fix it."""
    ok, said = fusermount(path, lazy=True)
    if ok and state(path) != State.DEAD:
        log.info("recovered the dead mount at %s (its daemon had gone)", path)
        return None
    return (f"{path} is a dead mount (Transport endpoint is not connected) and could not be"
            f" detached: {said or 'unknown error'}; run: fusermount3 -u -z {path}")


def raise_read_ahead(path: str | os.PathLike[str], kb: int = READ_AHEAD_KB) -> bool:
    """Raise the read-ahead of the mount's bdi (root only) so READs come in 1 MiB requests.

    Must run after mounting and before files are opened; reads mountinfo, never the mount.
    """
    if os.geteuid() != 0:
        return False
    m = find_mount(path)
    if m is None:
        log.warning("read-ahead not raised: %s is not in mountinfo", path)
        return False
    knob = Path("/sys/class/bdi") / m.device / "read_ahead_kb"
    try:
        knob.write_text(f"{kb}\n")
    except OSError as exc:
        log.warning("read-ahead not raised (%s): %s", knob, exc)
        return False
    log.info("read-ahead of %s raised to %d KiB", path, kb)
    return True
