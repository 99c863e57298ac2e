"""Start, control and unmount tests/lazyfs.py (the power-cut file system) from a test.

``lazy_mounted(backing, mount_point)`` runs lazyfs over ``backing`` in a subprocess and yields a
:class:`Lazy` to send it commands (``stats``, ``crash``). On the way out it unmounts
(``fusermount3 -u``, then ``-z``) and ends exactly the process it started. A test that cannot
mount fails in CI and skips elsewhere (mountutil.cannot_mount).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mountutil import (
    READY_TIMEOUT,
    cannot_mount,
    check_can_mount,
    fusermount_u,
    is_mounted,
    read_line,
    unmount,
)

LAZYFS = Path(__file__).with_name("lazyfs.py")


class Lazy:
    """A running lazyfs: one command at a time (a lock: the writer threads ask too)."""

    def __init__(self, proc: subprocess.Popen[bytes], mount_point: Path) -> None:
        self.proc = proc
        self.mount_point = mount_point
        self._lock = threading.Lock()

    def command(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        if not answer:
            raise AssertionError(f"lazyfs ended (exit {self.proc.poll()}) on {line!r}")
        return json.loads(answer)

    def fsyncs(self, path: str) -> int:
        """How many fsyncs of ``path`` (relative to the mount) have completed."""
        return int(self.command("stats")["fsyncs"].get(path, 0))

    def crash(self, seed: int) -> dict[str, Any]:
        """Cut the power: every later operation fails with EIO, and the backing directory
        holds only what was durable (plus seeded background writeback of file pages)."""
        return self.command(f"crash {seed}")


def unmount_lazy(mount_point: Path, proc: subprocess.Popen[bytes]) -> None:
    fusermount_u(mount_point)
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # lazyfs unmounts itself when its stdin closes
    unmount(mount_point, proc)  # waits for it, then ends it, and never leaves a mount behind


@contextlib.contextmanager
def lazy_mounted(backing: Path, mount_point: Path, log_path: Path) -> Iterator[Lazy]:
    check_can_mount()
    mount_point.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, os.fspath(LAZYFS), os.fspath(backing),
                                 os.fspath(mount_point)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file)
    assert proc.stdout is not None
    line = read_line(proc.stdout.fileno(), READY_TIMEOUT)
    if not line.startswith('{"ready": true}'):
        unmount_lazy(mount_point, proc)
        cannot_mount(f"lazyfs said {line!r}; log:\n{log_path.read_text(errors='replace')}")
    try:
        yield Lazy(proc, mount_point)
    finally:
        unmount_lazy(mount_point, proc)
        assert not is_mounted(mount_point), f"{mount_point} is still mounted"
        assert proc.returncode == 0, (
            f"lazyfs exited {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
