"""Kernel cache control and process helpers shared by every workload."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_caches() -> bool:
    """Only root may write drop_caches; a container may not let even root do it."""
    try:
        with DROP_CACHES.open("w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    """Drop the page cache, dentries and inodes of every file system (FUSE ones included: the
    kernel sends FORGETs, so the next access reaches the daemon)."""
    os.sync()
    with DROP_CACHES.open("w") as f:
        f.write("3")


def drop_file_cache(path: Path | str) -> None:
    """Evict one file's pages. On a FUSE file this drops the mount's copy only; the backing
    file's pages stay, so the next read is served by the daemon from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_file(path: Path | str, bufsize: int = 1 << 20) -> int:
    """Read a file sequentially with one preallocated buffer; returns the bytes read."""
    buf = memoryview(bytearray(bufsize))
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                return total
            total += n


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def run_timed(argv: list[str], **kwargs) -> float:
    """Wall time of a command whose output is thrown away; fails loudly if the command does."""
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - t0


def cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def settle(pids: list[int], quiet: float = 0.15, limit: float = 60.0) -> None:
    """Wait until the daemons stop using CPU (a commit or write-back after close is async)."""
    if not pids:
        return
    deadline = time.monotonic() + limit
    last = [cpu_ticks(p) for p in pids]
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = [cpu_ticks(p) for p in pids]
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def mem_kib(pid: int, field: str) -> int | None:
    v = proc_status(pid).get(field)
    return int(v.split()[0]) if v else None
