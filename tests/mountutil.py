"""Real mounts for the mount tests: the daemon as users run it, in a subprocess.

``mounted(base)`` starts ``artifactfs mount --foreground --http 127.0.0.1:PORT`` on a fresh
data directory and mount point under ``base``, waits for the daemon's readiness report (the same
pipe the background form uses), and on the way out unmounts (``fusermount3 -u``, then ``-z`` if
busy) and ends exactly the process it started, by its Popen handle.

A test that cannot mount fails when the CI environment variable is set and skips otherwise:
a CI run must never pass by skipping the layer it exists to test.

In a test module:  ``mount = mount_fixture()`` and ``workdir = workdir_fixture()``; each test
gets ``workdir``, its own directory in one mount shared by the module (a mount takes ~1 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest

IN_CI = bool(os.environ.get("CI"))
READY_TIMEOUT = 60.0


def cannot_mount(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"cannot mount (CI must mount): {reason}")
    pytest.skip(f"cannot mount: {reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_mounted(path: Path) -> bool:
    target = os.fspath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == target:
                return True
    return False


@dataclass
class Mount:
    path: Path
    data_dir: Path
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def put(self, key: str, data: bytes, mime_type: str = "application/octet-stream") -> dict:
        """Commit ``data`` as ``key`` through the HTTP face (behind the mount's back)."""
        with self.http() as c:
            r = c.post("/v1/artifacts", json={"key": key, "mime_type": mime_type,
                                              "size": len(data)})
            assert r.status_code == 200, r.text
            r = c.post(r.json()["uri"], content=data)
            assert r.status_code == 200, r.text
            r = c.get(f"/v1/artifacts/{key}")
            assert r.status_code == 200, r.text
            return r.json()

    def get(self, key: str) -> httpx.Response:
        with self.http() as c:
            return c.get(f"/v1/artifacts/{key}")

    def delete(self, key: str) -> None:
        with self.http() as c:
            r = c.delete(f"/v1/artifacts/{key}")
            assert r.status_code in (200, 204), r.text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_daemon(mount_point: Path, data_dir: Path, log_path: Path, *extra: str,
                 http: bool = True, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen[bytes], str]:
    """Start the foreground daemon; returns it and its readiness line ('ready URL' or why not)."""
    port = free_port()
    # ARTIFACTFS_TEST_DEBUG=1 logs every request the daemon refuses (daemon.log in the tmp dir).
    verbose = ["-v"] if os.environ.get("ARTIFACTFS_TEST_DEBUG") else []
    # ARTIFACTFS_TEST_MOUNT_OPTS="--no-passthrough" runs every mount test on such a mount
    # (tests/test_mount_no_passthrough.py covers what differs there in every run).
    extra = (*os.environ.get("ARTIFACTFS_TEST_MOUNT_OPTS", "").split(), *extra)
    argv = [sys.executable, "-m", "artifactfs.cli", *verbose, "mount", os.fspath(mount_point),
            "--data", os.fspath(data_dir), "--foreground", *extra]
    if http:
        argv += ["--http", f"127.0.0.1:{port}"]
    r, w = os.pipe()
    env = dict(os.environ, **(env or {}), ARTIFACTFS_READY_FD=str(w))
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, pass_fds=(w,), env=env)
    os.close(w)
    try:
        line = read_line(r, READY_TIMEOUT)
    finally:
        os.close(r)
    return proc, line


def read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data and time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def fusermount_u(mount_point: Path) -> None:
    """Unmount if mounted: `fusermount3 -u`, lazily (-z) if it is busy."""
    if is_mounted(mount_point):
        r = subprocess.run(["fusermount3", "-u", os.fspath(mount_point)],
                           capture_output=True, check=False)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(mount_point)],
                           capture_output=True, check=False)


def unmount(mount_point: Path, proc: subprocess.Popen[bytes] | None) -> None:
    """Unmount and end the daemon this test started; never leaves a mount behind."""
    fusermount_u(mount_point)
    if proc is not None and proc.poll() is None:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if is_mounted(mount_point):
        subprocess.run(["fusermount3", "-u", "-z", os.fspath(mount_point)],
                       capture_output=True, check=False)


def daemon_pid(data: Path) -> int | None:
    """The pid of a daemon holding ``data`` (its lock file names it), if one still runs."""
    try:
        fd = os.open(data / "lock", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    finally:
        os.close(fd)


def check_can_mount() -> None:
    if not os.path.exists("/dev/fuse"):
        cannot_mount("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        cannot_mount("fusermount3 is not installed (apt-get install fuse3)")


@contextlib.contextmanager
def mount_places(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A mount point and a data directory for a test that mounts them its own way; whatever
    it leaves mounted is unmounted, and a background daemon it started (found by the pid in
    its data directory's lock) is ended."""
    check_can_mount()
    mp, data = tmp_path / "mnt", tmp_path / "data"
    mp.mkdir()
    yield mp, data
    unmount(mp, None)
    pid = daemon_pid(data)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    assert not is_mounted(mp)


@contextlib.contextmanager
def mounted(base: Path, *extra: str, http: bool = True,
            env: dict[str, str] | None = None) -> Iterator[Mount]:
    """A mount of a fresh data directory under ``base``; ``env`` is added to the daemon's
    environment."""
    check_can_mount()
    mount_point, data_dir, log_path = base / "mnt", base / "data", base / "daemon.log"
    mount_point.mkdir(parents=True, exist_ok=True)
    proc, line = start_daemon(mount_point, data_dir, log_path, *extra, http=http, env=env)
    if not line.startswith("ready"):
        unmount(mount_point, proc)
        cannot_mount(f"the daemon said {line!r}; log:\n{log_path.read_text(errors='replace')}")
    m = Mount(path=mount_point, data_dir=data_dir, url=line.partition(" ")[2].strip(),
              proc=proc, log_path=log_path)
    try:
        yield m
    finally:
        unmount(mount_point, proc)
        assert not is_mounted(mount_point), f"{mount_point} is still mounted"
        # Whatever the tests did, the daemon must not have crashed or logged a traceback.
        log = m.log()
        assert "Traceback" not in log, log[-4000:]


def mount_fixture(*extra: str) -> object:
    """The module's mount, with ``extra`` options (after ARTIFACTFS_TEST_MOUNT_OPTS: they
    win)."""
    @pytest.fixture(scope="module", name="mount")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
        with mounted(tmp_path_factory.mktemp("mount"), *extra) as m:
            yield m

    return fixture


# The mount's modes, by the options that choose them: passthrough reads and writes (the
# default), passthrough reads only, and everything served by the daemon with the writeback
# cache. Their code paths differ most where files are reopened and rewritten.
MODES = {
    "passthrough": (),
    "no-passthrough-writes": ("--no-passthrough-writes",),
    "no-passthrough": ("--no-passthrough",),
}


def modes_mount_fixture(env: dict[str, str] | None = None, name: str = "mount") -> object:
    """The module's mount, once in each of ``MODES`` (the tests run once per mode)."""
    @pytest.fixture(scope="module", name=name, params=list(MODES))
    def fixture(tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> Iterator[Mount]:
        with mounted(tmp_path_factory.mktemp("mount"), *MODES[request.param], env=env) as m:
            yield m

    return fixture


def workdir_fixture() -> object:
    @pytest.fixture(name="workdir")
    def fixture(mount: Mount, request: pytest.FixtureRequest) -> Path:
        d = mount.path / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:200]
        d.mkdir()
        return d

    return fixture


def run(*cmd: str | os.PathLike[str], cwd: Path | None = None, check: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run an ordinary tool; on failure show what it said."""
    r = subprocess.run([os.fspath(c) for c in cmd], cwd=cwd, capture_output=True,
                       input=input, timeout=120, check=False)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
    return r


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Another face's change reaches the kernel through an invalidation queue: allow it a
    moment, no more. Returns what ``check`` returns once it stops raising."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def assert_shared_writable_map_commits(q: Path) -> None:
    """A shared writable mapping of a file in the mount (np.memmap mode r+) writes through to
    the file, whatever serves the mount's reads."""
    import numpy as np

    q.write_bytes(b"\0" * 65536)
    rw = np.memmap(q, dtype=np.uint8, mode="r+")
    rw[10:20] = 7
    rw.flush()
    del rw
    assert q.read_bytes()[8:22] == b"\0\0" + b"\7" * 10 + b"\0\0"


def assert_appends_and_shared_maps_commit(workdir: Path, mount: Mount) -> None:
    """Appends across opens and a shared writable mapping commit what they wrote, whichever
    mode the mount's writes take (with the writeback cache or without it, as passthrough
    needs); the HTTP face sees the mapped file's digest."""
    p = workdir / "log.txt"
    with open(p, "ab") as f:
        f.write(b"one\n")
    with open(p, "ab") as f:
        f.write(b"two\n")
    assert p.read_bytes() == b"one\ntwo\n"
    q = workdir / "mapped_rw.bin"
    assert_shared_writable_map_commits(q)
    got = mount.get(f"{workdir.name}/mapped_rw.bin").json()
    assert got["sha256"] == hashlib.sha256(q.read_bytes()).hexdigest()


def assert_a_truncate_leaves_a_reader_its_version(
        p: Path, also: Callable[[BinaryIO, bytes], None] | None = None) -> None:
    """truncate(2) by path of a file held open for reading: the name gets the cut file, the
    reader keeps every byte it opened (SEMANTICS.md, "Overwriting"); ``also`` checks more
    while the reader is open."""
    old = os.urandom(100_000)
    p.write_bytes(old)
    with open(p, "rb") as reader:
        assert reader.read(10) == old[:10]
        os.truncate(p, 10)
        assert os.stat(p).st_size == 10
        assert p.read_bytes() == old[:10]
        assert reader.read() == old[10:]
        if also is not None:
            also(reader, old)
