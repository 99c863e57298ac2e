"""Security: who can reach the store, and that no face reaches outside the data directory.

- By default the mount is the mounting user's alone: another uid gets EACCES on the mount
  point (no allow_other), while the same directory tree without the mount is open to it;
  ``--allow-other`` is the way to share, and then the mode bits decide.
- The mount daemon's HTTP face binds beyond loopback only with a token, and then every route
  wants it (the HTTP-only server's checks are tests/test_http_auth.py).
- Nothing outside DATA is ever read or written because of a key: hostile keys through every
  HTTP route, and symbolic links in the mount that point outside, while strace watches every
  path the daemon touches.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from httputil import raw_request
from mountutil import IN_CI, free_port, is_mounted, mounted, unmount

pytestmark = [pytest.mark.mount, pytest.mark.timeout(180)]

NOBODY = 65534
TOKEN = "sec-" + os.urandom(8).hex()


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A directory every user may traverse (pytest's tmp dirs are 0700, which would make any
    other uid fail for the wrong reason)."""
    base = Path(tempfile.mkdtemp(prefix="afs-security-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for mp in base.glob("*/mnt"):
            unmount(mp, None)
        shutil.rmtree(base, ignore_errors=True)


def as_nobody(*code: str) -> subprocess.CompletedProcess[str]:
    """Run Python as uid/gid 65534 (a forked child that drops root before exec). The
    system's interpreter: the project's venv may not be readable by that user."""
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    return subprocess.run([python, "-c", "\n".join(code)], user=NOBODY, group=NOBODY,
                          extra_groups=[], capture_output=True, text=True, timeout=60,
                          check=False)


def mount_options(mp: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.fspath(mp):
                return set(fields[5].split(",")) | set(line.split(" - ")[1].split()[2]
                                                       .split(","))
    raise AssertionError(f"{mp} is not mounted")


def probe(path: Path) -> str:
    """What uid 65534 gets from listing, stat-ing and reading under ``path``."""
    r = as_nobody(
        "import os, errno",
        f"p = {os.fspath(path)!r}",
        "out = []",
        "for what, fn in (('list', lambda: os.listdir(p)), ('stat', lambda: os.stat(p)),",
        "                 ('read', lambda: open(os.path.join(p, 'f.txt'), 'rb').read())):",
        "    try:",
        "        fn(); out.append(what + ':ok')",
        "    except OSError as e:",
        "        out.append(what + ':' + errno.errorcode[e.errno])",
        "print(' '.join(out))")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_mount_is_private_to_the_user_who_mounted_it(open_base: Path) -> None:
    plain = open_base / "plain"
    plain.mkdir(mode=0o755)
    (plain / "f.txt").write_bytes(b"readable")
    (plain / "f.txt").chmod(0o644)
    # The control: without a mount, uid 65534 can list, stat and read here.
    assert probe(plain) == "list:ok stat:ok read:ok"

    with mounted(open_base / "private") as m:
        (m.path / "f.txt").write_bytes(b"secret")
        os.chmod(m.path / "f.txt", 0o644)
        assert "allow_other" not in mount_options(m.path)
        # Setuid bits are metadata only (the kernel leaves clearing them on write to the
        # daemon, operations.py enable_killpriv_v2): the mount must never honour them.
        assert {"nosuid", "nodev"} <= mount_options(m.path)
        assert probe(m.path) == "list:EACCES stat:EACCES read:EACCES"
        # setpriv as a second, independent way in: the same answer.
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                            "--clear-groups", "cat", os.fspath(m.path / "f.txt")],
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr, r
        assert (m.path / "f.txt").read_bytes() == b"secret"  # its owner still can

    with mounted(open_base / "shared", "--allow-other") as m:
        (m.path / "f.txt").write_bytes(b"shared")
        os.chmod(m.path / "f.txt", 0o644)
        assert "allow_other" in mount_options(m.path)
        assert probe(m.path) == "list:ok stat:ok read:ok"
        # Shared, the mode bits rule (default_permissions): 0600 keeps others out.
        os.chmod(m.path / "f.txt", 0o600)
        assert probe(m.path) == "list:ok stat:ok read:EACCES"


def test_mount_http_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    env_token = os.environ.pop("ARTIFACTFS_TOKEN", None)
    try:
        argv = [sys.executable, "-m", "artifactfs.cli", "mount", os.fspath(mp), "--data",
                os.fspath(tmp_path / "data"), "--foreground", "--http",
                f"0.0.0.0:{free_port()}"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode != 0, r
        assert "needs a bearer token" in r.stderr, r.stderr
        assert not is_mounted(mp)
    finally:
        if env_token is not None:
            os.environ["ARTIFACTFS_TOKEN"] = env_token
        unmount(mp, None)

    with mounted(tmp_path / "tok", "--token", TOKEN) as m:
        (m.path / "k.txt").write_bytes(b"x")
        routes = [("GET", "/v1/artifacts"), ("GET", "/v1/artifacts/k.txt"),
                  ("GET", "/v1/artifacts/k.txt:content"), ("DELETE", "/v1/artifacts/k.txt"),
                  ("POST", "/v1/artifacts"), ("POST", "/v1/artifacts/bulk"),
                  ("GET", "/v1/artifacts/sessions/x"), ("POST", "/v1/artifacts/sessions/x"),
                  ("GET", "/openapi.json")]
        with httpx.Client(base_url=m.url, timeout=30) as c:
            for method, path in routes:
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    r = c.request(method, path, headers=headers, content=b"{}")
                    assert r.status_code == 401, (method, path, headers, r.status_code)
            r = c.get("/v1/artifacts/k.txt:content",
                      headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200 and r.content == b"x"
        assert (m.path / "k.txt").read_bytes() == b"x"  # the refused DELETE changed nothing


# --- nothing outside DATA -----------------------------------------------------------------

HOSTILE_KEYS = [
    "../outside/secret.txt", "../../outside/secret.txt", "a/../../outside/secret.txt",
    "/outside/secret.txt", "outside/../../secret.txt", "..", ".", "//etc/passwd",
    "%2e%2e/outside/secret.txt", "..%2Foutside%2Fsecret.txt", "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "link", "link/x", "dirlink/secret.txt", "dirlink/new.txt", "a\x00b", "etc/passwd\x00.txt",
]
RAW_PATHS = [
    b"/v1/artifacts/../../../../etc/passwd", b"/v1/artifacts/..%2f..%2f..%2fetc%2fpasswd",
    b"/v1/artifacts/%2e%2e/%2e%2e/outside/secret.txt:content",
    b"/v1/artifacts//etc/passwd:content", b"/v1/artifacts/dirlink/secret.txt:content",
    b"/v1/artifacts/link:content", b"/v1/artifacts/./../outside/secret.txt:content",
]


@contextlib.contextmanager
def traced(pid: int, out: Path, syscalls: str = "trace=%file,%desc") -> Iterator[None]:
    """strace every thread of ``pid`` (file syscalls, fds shown as paths) for the block."""
    tids = [f"-p{t}" for t in os.listdir(f"/proc/{pid}/task")]
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-y", "-e", syscalls,
                               "-e", "signal=none", "-o", os.fspath(out), *tids],
                              stderr=subprocess.PIPE)
    try:
        # strace says nothing when attached; give it a moment to seize every thread.
        time.sleep(1.0)
        assert tracer.poll() is None, tracer.stderr.read() if tracer.stderr else ""
        yield
    finally:
        tracer.terminate()  # only the tracer this test started; it detaches
        tracer.wait(30)


def test_no_face_reads_or_writes_outside_the_data_directory(tmp_path: Path) -> None:
    if shutil.which("strace") is None:
        if IN_CI:
            pytest.fail("strace is needed (apt-get install strace)")
        pytest.skip("strace is not installed")
    outside = tmp_path / "outside"
    outside.mkdir()
    canary = b"CANARY-" + os.urandom(16).hex().encode()
    (outside / "secret.txt").write_bytes(canary)
    before = sorted(os.listdir(outside))
    with mounted(tmp_path / "m") as m:
        # Symbolic links are metadata; the kernel follows them, never the daemon.
        os.symlink(outside / "secret.txt", m.path / "link")
        os.symlink(outside, m.path / "dirlink")
        (m.path / "a").mkdir()
        (m.path / "a" / "inside.txt").write_bytes(b"inside")
        trace = tmp_path / "strace.out"
        answers: list[bytes] = []
        with traced(m.proc.pid, trace), httpx.Client(base_url=m.url, timeout=30) as c:
            port = int(m.url.rpartition(":")[2])
            for key in HOSTILE_KEYS:
                q = key.replace("\x00", "%00")
                for method, path, body in (
                        ("GET", f"/v1/artifacts/{q}", None),
                        ("GET", f"/v1/artifacts/{q}:content", None),
                        ("DELETE", f"/v1/artifacts/{q}", None),
                        ("GET", "/v1/artifacts", None),
                ):
                    try:
                        r = c.request(method, path, content=body,
                                      params={"prefix": key} if method == "GET" and
                                      path == "/v1/artifacts" else None)
                    except (httpx.InvalidURL, httpx.LocalProtocolError):
                        continue
                    assert r.status_code < 500, (method, path, r.status_code)
                    answers.append(r.content)
                r = c.post("/v1/artifacts", json={"key": key, "mime_type": "a/b", "size": 3})
                assert r.status_code in (400, 409), (key, r.status_code, r.text)
                answers.append(r.content)
                r = c.post("/v1/artifacts/bulk", json={"artifacts": [{"key": key}]})
                assert r.status_code in (400, 404), (key, r.status_code)
            for path in RAW_PATHS:
                answer = trio.run(raw_request, port,
                                  b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                assert answer.startswith(b"HTTP/1.1 4"), (path, answer[:200])
                answers.append(answer)
            # Through the mount: names with .. are the kernel's (it resolves them before
            # the daemon sees a request); what the daemon gets is one component at a time.
            assert (m.path / "a" / ".." / "a" / "inside.txt").read_bytes() == b"inside"
            assert os.readlink(m.path / "link") == os.fspath(outside / "secret.txt")
            # An upload below a symlink is a clash (409), not a write through the link.
            assert c.get("/v1/artifacts/link").status_code == 404
        for answer in answers:
            assert canary not in answer, "a response carried bytes from outside DATA"
        data_dir = os.path.realpath(m.data_dir)
    assert sorted(os.listdir(outside)) == before, "something was created outside DATA"
    assert (outside / "secret.txt").read_bytes() == canary

    touched = paths_in_trace(trace.read_text(errors="replace"))
    assert touched, "strace saw no file access at all: the trace proves nothing"
    assert any(p.startswith(data_dir) for p in touched), sorted(touched)[:20]
    forbidden = [p for p in touched if p.startswith(os.fspath(outside))
                 or p.startswith("/etc/passwd") or p.startswith("/etc/shadow")]
    assert not forbidden, f"the daemon touched paths outside DATA: {forbidden}"


def paths_in_trace(text: str) -> set[str]:
    """Every path a traced syscall named, as an argument or as a decoded fd (-y)."""
    paths: set[str] = set()
    for line in text.splitlines():
        paths.update(re.findall(r'"(/[^"]*)"', line))
        paths.update(re.findall(r"<(/[^>]*)>", line))
    return paths
