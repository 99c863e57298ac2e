"""mount(8), umount(8), /etc/fstab lines and systemd: the mount as the system starts it.

mount(8) runs /sbin/mount.fuse.artifactfs (scripts/setup links it there) with the minimal PATH
the system gives it; these tests call `mount` and `umount` the same way. The fstab line is read
from a file of the test's own (`mount -T`), so the machine's /etc/fstab is never touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mountutil import IN_CI, daemon_pid, free_port, is_mounted, mount_places, unmount

from artifactfs.mount_helper import UsageError, parse, split_options
from artifactfs.systemd import stderr_is_journal

# Only the tests that need no helper run on .venv-stock too: the helper runs .venv.
pytestmark = pytest.mark.mount

HELPER = Path("/sbin/mount.fuse.artifactfs")
# What mount(8) gets from a boot script or systemd: no venv, no /usr/local.
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def system(*cmd: str | os.PathLike[str], env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True,
                          timeout=120, check=False, env=env or SYSTEM_ENV, cwd="/")


def check_helper_installed() -> None:
    """The helper must be this checkout's: else the test would exercise someone else's code."""
    ours = Path(sys.prefix) / "bin" / HELPER.name
    if HELPER.exists() and HELPER.resolve() == ours.resolve():
        return
    found = f"it resolves to {HELPER.resolve()}" if HELPER.exists() else "it is missing"
    message = (f"{HELPER} must run {ours} ({found}): run ./scripts/setup as root")
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def places(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    with mount_places(tmp_path) as both:
        yield both


@pytest.fixture
def system_places(places: tuple[Path, Path]) -> tuple[Path, Path]:
    """For mount(8): the helper must be installed."""
    check_helper_installed()
    return places


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def assert_works_then_umount(mp: Path, data: Path, port: int) -> None:
    """A file written through the mount is served over HTTP; `umount` ends the daemon."""
    pid = daemon_pid(data)
    assert pid is not None, "no daemon holds the data directory after mount returned"
    (mp / "hello.txt").write_bytes(b"from the mount\n")
    r = httpx.get(f"http://127.0.0.1:{port}/v1/artifacts/hello.txt:content", timeout=30)
    assert r.status_code == 200 and r.content == b"from the mount\n", r.text
    r = system("umount", mp)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp)
    assert wait_gone(pid), f"the daemon (pid {pid}) still runs after umount"
    assert daemon_pid(data) is None
    log = (data / "mount.log").read_text()
    assert f"{mp} was unmounted" in log and "Traceback" not in log, log


def test_mount_t_and_umount(system_places: tuple[Path, Path]) -> None:
    mp, data = system_places
    port = free_port()
    r = system("mount", "-t", "fuse.artifactfs", data, mp, "-o", f"http=127.0.0.1:{port}")
    assert r.returncode == 0, r.stderr
    assert is_mounted(mp)
    assert_works_then_umount(mp, data, port)


def test_fstab_line(system_places: tuple[Path, Path], tmp_path: Path) -> None:
    mp, data = system_places
    port = free_port()
    fstab = tmp_path / "fstab"
    # The options a real line carries for systemd and mount(8) are accepted and ignored.
    fstab.write_text(f"# a comment\n{data} {mp} fuse.artifactfs http=127.0.0.1:{port},"
                     "defaults,noauto,nofail,_netdev,x-systemd.requires=network.target 0 0\n")
    r = system("mount", "-T", fstab, mp)
    assert r.returncode == 0, r.stderr
    assert is_mounted(mp)
    assert_works_then_umount(mp, data, port)


@pytest.mark.parametrize(("options", "said"), [
    ("http=127.0.0.1:1,bogus", "unknown option 'bogus'"),
    ("ro", "read-write only"),
    ("token_file=/nonexistent/token", "cannot read /nonexistent/token"),
])
def test_bad_option_mounts_nothing(system_places: tuple[Path, Path], options: str, said: str
                                   ) -> None:
    mp, data = system_places
    r = system("mount", "-t", "fuse.artifactfs", data, mp, "-o", options)
    assert r.returncode != 0
    assert said in r.stderr, r.stderr
    assert not is_mounted(mp)
    assert not data.exists()  # refused before the daemon started


def test_helper_options_map_to_mount_options(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    request = parse(["/d", "/m", "-n", "-o",
                     f"rw,http=[::1]:8321,sync,no_passthrough,token_file={token_file}",
                     "-t", "fuse.artifactfs"])
    assert request.argv == ["mount", "/m", "--data", "/d", "--http", "[::1]:8321", "--sync",
                            "--no-passthrough"]
    assert request.token == "s3cret"
    assert not request.fake
    assert parse(["/d", "/m", "-fv"]).fake
    assert parse(["/d", "/m", "-s", "-o", "mystery"]).warnings
    assert split_options(r"a,b\,c,,d") == ["a", "b,c", "d"]
    with pytest.raises(UsageError, match="DATA_DIR MOUNTPOINT"):
        parse(["/d"])


@pytest.mark.stock
def test_journal_stream_gets_the_log(places: tuple[Path, Path], tmp_path: Path) -> None:
    """With stderr the journal (JOURNAL_STREAM names it), the background daemon logs there,
    without its own time stamps, and DATA/mount.log is not written."""
    mp, data = places
    port = free_port()
    stderr_path = tmp_path / "journal"
    with open(stderr_path, "wb") as stderr:
        st = os.fstat(stderr.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        r = subprocess.run([sys.executable, "-m", "artifactfs.cli", "mount", mp, "--data", data,
                            "--http", f"127.0.0.1:{port}"], stderr=stderr, env=env,
                           timeout=120, check=False)
    said = stderr_path.read_text()
    assert r.returncode == 0, said
    assert "log the journal" in said
    pid = daemon_pid(data)
    assert pid is not None
    assert system("umount", mp).returncode == 0
    assert wait_gone(pid)
    said = stderr_path.read_text()
    assert f"INFO artifactfs.mount: {mp} was unmounted" in said, said
    assert any(line.startswith("INFO artifactfs.daemon: ready:")
               for line in said.splitlines()), said
    assert not (data / "mount.log").exists()


def test_journal_stream_must_name_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # a shell's, say
    assert not stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not stderr_is_journal()


@pytest.mark.stock
def test_foreground_notifies_systemd_when_ready(places: tuple[Path, Path], tmp_path: Path
                                               ) -> None:
    """Type=notify: READY=1 arrives once the mount answers; `umount` ends the daemon."""
    mp, data = places
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(os.fspath(sock_path))
        sock.settimeout(60)
        env = dict(os.environ, NOTIFY_SOCKET=os.fspath(sock_path))
        proc = subprocess.Popen([sys.executable, "-m", "artifactfs.cli", "mount", mp,
                                 "--data", data, "--foreground"], env=env,
                                stderr=subprocess.DEVNULL)
        try:
            message = sock.recv(4096).decode()
            assert message.startswith("READY=1\n"), message
            assert is_mounted(mp)
            (mp / "a").write_bytes(b"x")
            assert system("umount", mp).returncode == 0
            assert proc.wait(timeout=30) == 0
        finally:
            unmount(mp, proc)
