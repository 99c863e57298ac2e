"""A random-operation exerciser of file data, run side by side on the mount and a local disk.

In the manner of fsx: a few files of up to ``MAX_SIZE`` bytes, several descriptors open on
them at once (``O_RDONLY``, ``O_WRONLY``, ``O_RDWR``, ``O_APPEND``, ``O_TRUNC``), and a random
mix of read, write (past the end too, leaving holes), mmap read, mmap write (``MAP_SHARED``,
msync), ftruncate and truncate up and down, copy_file_range within a file, fsync, fstat and
stat, close and reopen. Every operation runs on both trees and must answer alike: the same
bytes, size or errno. A full read of each file through a fresh descriptor follows every close
of its last descriptor.

The one documented difference (docs/SEMANTICS.md, Overwriting): a file that descriptors hold
open for reading, and none for writing, moves to a new inode when it is opened for writing or
truncated by name, so those readers keep the version they opened. On the disk that is a copy
renamed over the file just before the operation (``_keep_readers_version``).

A run is a list of operations (``generate`` draws one from a seed and the files' current
sizes; ``apply`` runs it), so a failing sequence can be replayed and shrunk (``shrink``).
Run as a script it exercises a directory pair: ``python tests/random_io.py MNT_DIR DISK_DIR
--seed 7 --ops 1000``; a SIGBUS kills the process, so each operation is written to ``--log``
before it runs.
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import random
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_SIZE = 256 * 1024
NAMES = ("f0", "f1")
SLOTS = 4  # descriptors open at once, at most
OPEN_FLAGS = (
    os.O_RDONLY, os.O_RDONLY, os.O_RDWR, os.O_RDWR, os.O_WRONLY,
    os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_APPEND, os.O_RDWR | os.O_TRUNC,
    os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
)
# Operations on an open descriptor and their weights.
FD_OPS = {"read": 20, "write": 20, "mapread": 10, "mapwrite": 10, "ftruncate": 6,
          "truncate": 3, "copy": 6, "fsync": 3, "fstat": 4, "stat": 4}

Op = tuple[Any, ...]


@dataclass
class Descriptor:
    name: str
    flags: int
    mnt: int
    disk: int

    @property
    def readable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_WRONLY

    @property
    def writable(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY


class Mismatch(AssertionError):
    pass


def attempt(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except OSError as e:
        return ("error", errno.errorcode.get(e.errno or 0, e.errno))


def flag_names(flags: int) -> str:
    acc = {os.O_RDONLY: "RDONLY", os.O_WRONLY: "WRONLY", os.O_RDWR: "RDWR"}
    extra = "".join(f"|{n}" for f, n in ((os.O_APPEND, "APPEND"), (os.O_TRUNC, "TRUNC"),
                                          (os.O_CREAT, "CREAT")) if flags & f)
    return acc[flags & os.O_ACCMODE] + extra


def describe(op: Op) -> str:
    """One line for a log: offsets and lengths in hex, as fsx prints them."""
    kind, *args = op
    if kind == "open":
        return f"open [{args[0]}] {args[1]} {flag_names(args[2])}"
    if kind in ("write", "mapwrite"):
        return f"{kind} [{args[0]}] {args[1]:#x}+{args[3]:#x}"
    if kind in ("read", "mapread"):
        return f"{kind} [{args[0]}] {args[1]:#x}+{args[2]:#x}"
    if kind in ("ftruncate", "truncate"):
        return f"{kind} [{args[0]}] -> {args[1]:#x}"
    if kind == "copy":
        return f"copy_file_range [{args[0]}] {args[2]:#x} -> [{args[1]}] {args[3]:#x} +{args[4]:#x}"
    return f"{kind} " + " ".join(f"[{a}]" if isinstance(a, int) else str(a) for a in args)


class RandomIO:
    """The exerciser over ``mnt`` (a directory in the mount) and ``disk`` (the reference)."""

    def __init__(self, mnt: Path, disk: Path, *, names: Callable[[], list[str]] | None = None,
                 others: Callable[[], list[tuple[int, bool]]] | None = None,
                 reopen_every: int = 20, log: Callable[[str], None] | None = None) -> None:
        """``names`` gives the paths (relative to both roots) operations may open, and
        ``others`` the descriptors held on the disk's files by someone else, as (fd,
        writable), for the readers' rule; by default the exerciser makes ``NAMES`` empty
        files and is alone."""
        self.mnt, self.disk = mnt, disk
        self.names = names or (lambda: list(NAMES))
        self.others = others or list
        self.reopen_every = reopen_every
        self.fds: dict[int, Descriptor] = {}
        self.done: list[Op] = []
        self.log = log
        if names is None:
            for root in (mnt, disk):
                root.mkdir(parents=True, exist_ok=True)
                for name in NAMES:
                    (root / name).write_bytes(b"")

    # --- running ---------------------------------------------------------------------------

    def run(self, seed: int, n: int) -> None:
        """``n`` operations drawn from ``seed``; every descriptor closed at the end."""
        rng = random.Random(seed)
        try:
            for _ in range(n):
                self.apply(self.generate(rng))
        finally:
            self.close_all()

    def replay(self, ops: list[Op]) -> None:
        try:
            for op in ops:
                self.apply(op)
        finally:
            self.close_all()

    def close_all(self) -> None:
        for slot in sorted(self.fds):
            self.apply(("close", slot))

    def apply(self, op: Op) -> None:
        """Run one operation on both trees; one that names a slot not open is skipped (a
        shrunk sequence may have lost the open)."""
        kind, *args = op
        if kind == "stat" and not args[0]:
            return
        if kind not in ("open", "stat") and args[0] not in self.fds:
            return
        if kind == "copy" and args[1] not in self.fds:
            return
        if kind == "open" and args[0] in self.fds:
            return
        self.done.append(op)
        if self.log is not None:
            self.log(describe(op))
        getattr(self, f"do_{kind}")(*args)

    # --- drawing an operation --------------------------------------------------------------

    def generate(self, rng: random.Random) -> Op:
        free = [s for s in range(SLOTS) if s not in self.fds]
        if not self.fds or rng.random() < 1 / self.reopen_every:
            if self.fds and (not free or rng.random() < 0.5):
                return ("close", rng.choice(sorted(self.fds)))
            names = self.names()
            if not names:
                return ("stat", "")
            return ("open", rng.choice(free), rng.choice(names), rng.choice(OPEN_FLAGS))
        slot = rng.choice(sorted(self.fds))
        d = self.fds[slot]
        kind = rng.choices(list(FD_OPS), weights=list(FD_OPS.values()))[0]
        size = os.fstat(d.disk).st_size
        if kind in ("read", "mapread"):
            return (kind, slot, _offset(rng, size), _length(rng))
        if kind in ("write", "mapwrite"):
            return (kind, slot, _offset(rng, size), rng.randrange(2**32), _length(rng))
        if kind in ("ftruncate", "truncate"):
            return (kind, slot, _new_length(rng, size))
        if kind == "copy":
            src = rng.choice(sorted(self.fds))
            n = _length(rng)
            return ("copy", src, slot, rng.randrange(max(1, size)),
                    rng.randrange(MAX_SIZE - n + 1), n)
        if kind == "stat":
            return ("stat", d.name)
        return (kind, slot)

    # --- comparing -------------------------------------------------------------------------

    def same(self, on_mnt: Callable[[], Any], on_disk: Callable[[], Any]) -> Any:
        got, want = attempt(on_mnt), attempt(on_disk)
        if got != want:
            raise Mismatch(f"{describe(self.done[-1])}: mount {_short(got)}, local disk "
                           f"{_short(want)}{_first_difference(got, want)}")
        return got

    # --- the readers' rule -----------------------------------------------------------------

    def _keep_readers_version(self, name: str) -> None:
        """Before a writable open or a truncate by name: where only readers hold the file,
        the mount gives the name a new inode; on the disk, a copy renamed over the file."""
        held = [(d.disk, d.writable) for d in self.fds.values()] + self.others()
        keep_readers_version(self.disk / name, held)

    # --- operations ------------------------------------------------------------------------

    def do_open(self, slot: int, name: str, flags: int) -> None:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self._keep_readers_version(name)
        fds: dict[Path, int] = {}

        def opener(root: Path) -> Callable[[], None]:
            def go() -> None:
                fds[root] = os.open(root / name, flags, 0o644)
            return go

        if self.same(opener(self.mnt), opener(self.disk))[0] == "ok":
            self.fds[slot] = Descriptor(name, flags, fds[self.mnt], fds[self.disk])

    def do_close(self, slot: int) -> None:
        d = self.fds.pop(slot)
        self.same(lambda: os.close(d.mnt), lambda: os.close(d.disk))
        if not any(e.name == d.name for e in self.fds.values()):
            self.do_whole(d.name)

    def do_whole(self, name: str) -> None:
        """Every byte of the file through a fresh descriptor, and its size by name."""
        def read_all(root: Path) -> Callable[[], tuple[int, bytes]]:
            def go() -> tuple[int, bytes]:
                with open(root / name, "rb") as f:
                    return os.stat(root / name).st_size, f.read()
            return go

        self.same(read_all(self.mnt), read_all(self.disk))

    def do_read(self, slot: int, off: int, n: int) -> None:
        d = self.fds[slot]
        self.same(lambda: os.pread(d.mnt, n, off), lambda: os.pread(d.disk, n, off))

    def do_write(self, slot: int, off: int, seed: int, n: int) -> None:
        d = self.fds[slot]
        size = os.fstat(d.disk).st_size
        end = size if d.flags & os.O_APPEND else off
        body = random.Random(seed).randbytes(max(0, min(n, MAX_SIZE - end)))
        if d.flags & os.O_APPEND:  # at the end, whatever the offset
            self.same(lambda: os.write(d.mnt, body), lambda: os.write(d.disk, body))
        else:
            self.same(lambda: os.pwrite(d.mnt, body, off), lambda: os.pwrite(d.disk, body, off))

    def do_mapread(self, slot: int, off: int, n: int) -> None:
        """A shared read mapping of the whole file (the size fstat gives), read in range."""
        d = self.fds[slot]
        size = os.fstat(d.disk).st_size
        if not d.readable or size == 0:
            return
        off %= size
        n = min(n, size - off)

        def go(fd: int) -> Callable[[], bytes]:
            def inner() -> bytes:
                with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                    return m[off:off + n]
            return inner

        self.same(go(d.mnt), go(d.disk))

    def do_mapwrite(self, slot: int, off: int, seed: int, n: int) -> None:
        """A shared writable mapping of the whole file, written in range and msync'd."""
        d = self.fds[slot]
        size = os.fstat(d.disk).st_size
        if d.flags & os.O_ACCMODE != os.O_RDWR or size == 0:
            return
        off %= size
        body = random.Random(seed).randbytes(min(n, size - off))

        def go(fd: int) -> Callable[[], None]:
            def inner() -> None:
                with mmap.mmap(fd, size, mmap.MAP_SHARED) as m:
                    m[off:off + len(body)] = body
                    m.flush()
            return inner

        self.same(go(d.mnt), go(d.disk))

    def do_ftruncate(self, slot: int, n: int) -> None:
        d = self.fds[slot]
        self.same(lambda: os.ftruncate(d.mnt, n), lambda: os.ftruncate(d.disk, n))

    def do_truncate(self, slot: int, n: int) -> None:
        name = self.fds[slot].name
        self._keep_readers_version(name)
        self.same(lambda: os.truncate(self.mnt / name, n),
                  lambda: os.truncate(self.disk / name, n))

    def do_copy(self, src_slot: int, dst_slot: int, a: int, b: int, n: int) -> None:
        """copy_file_range between descriptors of one file, ranges apart (the kernel refuses
        overlapping ranges within a file); both must be able to (else EBADF on both)."""
        src, dst = self.fds[src_slot], self.fds[dst_slot]
        if (a < b + n and b < a + n) or dst.flags & os.O_APPEND or src.name != dst.name:
            return
        self.same(lambda: os.copy_file_range(src.mnt, dst.mnt, n, a, b),
                  lambda: os.copy_file_range(src.disk, dst.disk, n, a, b))

    def do_fsync(self, slot: int) -> None:
        d = self.fds[slot]
        self.same(lambda: os.fsync(d.mnt), lambda: os.fsync(d.disk))

    def do_fstat(self, slot: int) -> None:
        d = self.fds[slot]
        self.same(lambda: os.fstat(d.mnt).st_size, lambda: os.fstat(d.disk).st_size)

    def do_stat(self, name: str) -> None:
        self.same(lambda: os.stat(self.mnt / name).st_size,
                  lambda: os.stat(self.disk / name).st_size)


def keep_readers_version(path: Path, held: list[tuple[int, bool]]) -> None:
    """The mount's rule that a disk lacks (docs/SEMANTICS.md, Overwriting), played on the
    disk: before the file at ``path`` is opened for writing or truncated, if descriptors
    ``held`` (fd, writable) have it open for reading and none for writing, it moves to a
    new inode (a copy renamed over it), so that those readers keep the version they
    opened."""
    try:
        st_ = os.stat(path)
    except OSError:
        return
    if not stat.S_ISREG(st_.st_mode):
        return
    on_it = [writable for fd, writable in held if os.fstat(fd).st_ino == st_.st_ino]
    if not on_it or any(on_it):
        return
    real = path.resolve()
    tmp = real.with_name(real.name + ".moved")
    shutil.copyfile(real, tmp)
    os.chown(tmp, st_.st_uid, st_.st_gid)
    os.chmod(tmp, stat.S_IMODE(st_.st_mode))
    os.rename(tmp, real)


def _offset(rng: random.Random, size: int) -> int:
    """Mostly inside the file, sometimes at or past its end."""
    if size and rng.random() < 0.8:
        return rng.randrange(size)
    return rng.randrange(min(MAX_SIZE, size + 4096) + 1)


def _length(rng: random.Random) -> int:
    return rng.choice((1, 17, 4095, 4096, 4097, rng.randrange(1, 65536)))


def _new_length(rng: random.Random, size: int) -> int:
    size = min(size, MAX_SIZE)
    if rng.random() < 0.5:
        return rng.randrange(size + 1)
    return rng.randrange(size, MAX_SIZE + 1)


def _short(outcome: tuple[str, Any]) -> str:
    kind, value = outcome
    if isinstance(value, bytes) and len(value) > 16:
        return f"{kind} {len(value)} bytes"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bytes):
        return f"{kind} size {value[0]:#x}, {len(value[1]):#x} bytes"
    return f"{kind} {value!r}"


def _first_difference(got: tuple[str, Any], want: tuple[str, Any]) -> str:
    """Where two reads part (the mount's bytes against the disk's), for the report."""
    a, b = got[1], want[1]
    if isinstance(a, tuple) and isinstance(b, tuple):
        a, b = a[-1], b[-1]
    if not (isinstance(a, bytes) and isinstance(b, bytes)) or a == b:
        return ""
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
              min(len(a), len(b)))
    end = at
    while end < min(len(a), len(b)) and a[end] != b[end]:
        end += 1
    return (f"; they part at {at:#x} (to {end:#x}): mount {a[at:at + 8].hex()}, "
            f"disk {b[at:at + 8].hex()}")


def fails(make: Callable[[], RandomIO], ops: list[Op]) -> bool:
    """Whether replaying ``ops`` on a fresh pair fails (a mismatch)."""
    try:
        make().replay(ops)
    except Mismatch:
        return True
    return False


def shrink(make: Callable[[], RandomIO], ops: list[Op]) -> list[Op]:
    """A shorter sequence that still fails: delta debugging by chunks, then one by one."""
    chunk = max(1, len(ops) // 2)
    while chunk >= 1:
        i = 0
        while i < len(ops):
            trial = ops[:i] + ops[i + chunk:]
            if trial and fails(make, trial):
                ops = trial
            else:
                i += chunk
        chunk //= 2
    return ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("mnt", type=Path)
    parser.add_argument("disk", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--log", type=Path, help="each operation, written before it runs")
    parser.add_argument("--shrink", action="store_true", help="shrink a failing sequence")
    parser.add_argument("--replay", type=Path,
                        help="run the operations of this JSON file (a list of lists) instead")
    args = parser.parse_args()
    log_fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if args.log else None

    def log(line: str) -> None:
        if log_fd is not None:
            os.write(log_fd, (line + "\n").encode())

    counter = iter(range(1, 1 << 30))

    def fresh() -> RandomIO:
        n = next(counter)
        return RandomIO(args.mnt.with_name(f"{args.mnt.name}.{n}"),
                        args.disk.with_name(f"{args.disk.name}.{n}"))

    rio = RandomIO(args.mnt, args.disk, log=log)
    try:
        if args.replay:
            rio.replay([tuple(op) for op in json.loads(args.replay.read_text())])
        else:
            rio.run(args.seed, args.ops)
    except Mismatch as e:
        where = "replay" if args.replay else f"seed {args.seed}"
        print(f"{where}, operation {len(rio.done)}: {e}")
        ops = rio.done[-30:]
        if args.shrink:
            ops = shrink(fresh, rio.done)
            try:
                fresh().replay(ops)
            except Mismatch as again:
                print(f"shrunk to {len(ops)} operations: {again}")
        print("\n".join(describe(op) for op in ops))
        return 1
    print(f"{len(rio.done)} operations alike")
    return 0


if __name__ == "__main__":
    sys.exit(main())
