"""The daemon: one process, one store, the mount and/or the HTTP face on one trio loop.

``artifactfs mount`` runs in the background by default: the command starts a child process
running ``mount --foreground`` (logging to DATA/mount.log, or under systemd to the journal that
is its stderr), waits until the child reports the mount ready over a pipe
(``ARTIFACTFS_READY_FD``), and exits 0; if the child fails it prints why and exits 1.
``--foreground`` stays attached with logs on stderr, and tells systemd when it is ready
(Type=notify). SIGINT and SIGTERM unmount cleanly; so do ``artifactfs umount``, ``umount`` and
``fusermount3 -u`` from outside.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from . import systemd
from .errors import ArtifactError
from .store import default_data_dir, open_store

log = logging.getLogger("artifactfs.daemon")

READY_FD_ENV = "ARTIFACTFS_READY_FD"
# How long `artifactfs mount` waits for its child: opening a store recovers it first, which
# can take a while on a large one.
READY_TIMEOUT = 300.0
UMOUNT_WAIT = 30.0


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"artifactfs: --http wants HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


async def serve_only(args: argparse.Namespace) -> None:
    from .http.server import serve_http

    host, port = parse_addr(args.http)
    async with open_store(args.data, sync=args.sync) as store:
        # SIGTERM (systemd, kill) stops as SIGINT does: the store closes cleanly (flushed,
        # marked clean) instead of dying as in a crash.
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(serve_http, store, host, port, token=args.token))
                nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
        except BaseExceptionGroup as group:
            raise _innermost(group) from None


# --- mount -------------------------------------------------------------------------------


async def _stop_on_signals(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("%s received: unmounting", signal.Signals(signum).name)
            cancel_scope.cancel()
            return


async def mount_daemon(args: argparse.Namespace, mountpoint: str, data_dir: Path,
                       ready: Callable[[str], None]) -> None:
    """The foreground daemon: store, optional HTTP face and the mount in one nursery."""
    from .fs.mount import serve_mount

    async with open_store(data_dir, sync=args.sync) as store, trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
        url = ""
        if args.http:
            from .http.server import serve_http

            host, port = parse_addr(args.http)
            url = await nursery.start(partial(serve_http, store, host, port, token=args.token))

        async def mount_until_unmounted(task_status: trio.TaskStatus[None]) -> None:
            await serve_mount(store, mountpoint, allow_other=args.allow_other,
                              passthrough=args.passthrough,
                              passthrough_writes=args.passthrough_writes,
                              task_status=task_status)
            nursery.cancel_scope.cancel()  # unmounted from outside: the daemon's work is done

        await nursery.start(mount_until_unmounted)
        log.info("ready: %s mounted at %s%s", data_dir, mountpoint,
                 f", HTTP at {url}" if url else "")
        ready(f"ready {url}")


def _ready_reporter() -> Callable[[str], None]:
    """Report once to whoever waits: the `artifactfs mount` that started this daemon (its
    background form) over the pipe, and systemd (a Type=notify unit) when the mount is ready."""
    fd_text = os.environ.pop(READY_FD_ENV, None)
    fd = int(fd_text) if fd_text and fd_text.isdigit() else None
    reported = False

    def report(message: str) -> None:
        nonlocal fd, reported
        if reported:
            return
        reported = True
        if message.startswith("ready"):
            systemd.notify(f"READY=1\nSTATUS={message}")
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, (message.replace("\n", " ") + "\n").encode())
            os.close(fd)
        fd = None

    return report


def mount_command(args: argparse.Namespace) -> int:
    from .fs import mountpoint as mp_mod

    mountpoint = os.path.abspath(os.path.expanduser(os.fspath(args.mountpoint)))
    data_dir = Path(os.path.abspath(os.path.expanduser(os.fspath(
        args.data if args.data is not None else default_data_dir()))))
    report = _ready_reporter()

    def fail(message: str) -> int:
        report(f"error {message}")
        print(f"artifactfs: {message}", file=sys.stderr)
        return 1

    state = mp_mod.state(mountpoint)
    if state == mp_mod.State.DEAD:
        problem = mp_mod.recover_dead_mount(mountpoint)
        if problem:
            return fail(problem)
        state = mp_mod.state(mountpoint)
    if state == mp_mod.State.MISSING:
        return fail(f"mount point {mountpoint} does not exist; create it: mkdir -p {mountpoint}")
    if state == mp_mod.State.NOT_A_DIRECTORY:
        return fail(f"mount point {mountpoint} is not a directory")
    if state == mp_mod.State.MOUNTED:
        info = mp_mod.find_mount(mountpoint)
        if info is not None and info.fstype == mp_mod.FSTYPE:
            report("ready already mounted")
            print(f"artifactfs: {mountpoint} is already mounted ({info.source})",
                  file=sys.stderr)
            return 0
        return fail(f"{mountpoint} already has a {info.fstype if info else 'file system'}"
                    " mounted on it; unmount it or choose another mount point")
    if not args.foreground:
        return _mount_in_background(args, mountpoint, data_dir)
    try:
        trio.run(mount_daemon, args, mountpoint, data_dir, report)
    except Exception as exc:
        cause = _innermost(exc)
        if isinstance(cause, ArtifactError):
            return fail(str(cause))
        log.error("the mount failed", exc_info=cause)
        return fail(f"the mount failed: {cause!r}")
    report("error the daemon stopped before the mount was ready")
    return 0


def _innermost(exc: BaseException) -> BaseException:
    """The error a nursery wrapped (trio groups what its tasks raise), for the user."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _child_argv(args: argparse.Namespace, mountpoint: str, data_dir: Path) -> list[str]:
    argv = [sys.executable, "-m", "artifactfs.cli"]
    if args.verbose:
        argv.append("-v")
    argv += ["mount", mountpoint, "--foreground", "--data", os.fspath(data_dir)]
    if args.http:
        argv += ["--http", args.http]
    if args.sync:
        argv.append("--sync")
    if args.allow_other:
        argv.append("--allow-other")
    argv.append("--passthrough" if args.passthrough else "--no-passthrough")
    argv.append("--passthrough-writes" if args.passthrough_writes
                else "--no-passthrough-writes")
    return argv


def _mount_in_background(args: argparse.Namespace, mountpoint: str, data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    # Under systemd (a service, or the mount unit of an fstab line) the daemon keeps this
    # process's stderr, the journal; elsewhere it has no terminal to write to.
    to_journal = systemd.stderr_is_journal()
    log_path = data_dir / "mount.log"
    log_name = "the journal" if to_journal else os.fspath(log_path)
    r, w = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(w)})
    # systemd accepts readiness from the process it started, not from this child.
    env.pop("NOTIFY_SOCKET", None)
    if args.token:
        env["ARTIFACTFS_TOKEN"] = args.token  # not on the command line, where ps shows it
    with contextlib.ExitStack() as stack:
        log_file = sys.stderr if to_journal else stack.enter_context(open(log_path, "ab"))
        child = subprocess.Popen(
            _child_argv(args, mountpoint, data_dir), stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=log_file, pass_fds=(w,), env=env, cwd="/",
            start_new_session=True)  # the terminal's Ctrl-C is not the daemon's
    os.close(w)
    try:
        message = _read_line(r, READY_TIMEOUT)
    finally:
        os.close(r)
    if message.startswith("ready"):
        url = message.partition(" ")[2].strip()
        print(f"artifactfs: mounted {data_dir} at {mountpoint} (pid {child.pid}"
              f"{', HTTP at ' + url if url.startswith('http') else ''}; log {log_name})",
              file=sys.stderr)
        return 0
    try:
        # It reported its error (or closed the pipe): let it finish cleaning up.
        child.wait(timeout=30 if message else 5)
    except subprocess.TimeoutExpired:
        log.warning("the mount daemon (pid %d) did not become ready; stopping it", child.pid)
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
    reason = message.partition(" ")[2].strip() if message.startswith("error") else (
        "the daemon exited before the mount was ready")
    print(f"artifactfs: {reason} (log: {log_name})", file=sys.stderr)
    return 1


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            return ""
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            return ""
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


# --- umount ------------------------------------------------------------------------------


def umount_command(args: argparse.Namespace) -> int:
    from .fs import mountpoint as mp_mod

    mountpoint = os.path.abspath(os.path.expanduser(os.fspath(args.mountpoint)))
    state = mp_mod.state(mountpoint)
    if state == mp_mod.State.DEAD:
        problem = mp_mod.recover_dead_mount(mountpoint)
        if problem:
            print(f"artifactfs: {problem}", file=sys.stderr)
            return 1
        print(f"artifactfs: detached the dead mount at {mountpoint}", file=sys.stderr)
        return 0
    info = mp_mod.find_mount(mountpoint) if state == mp_mod.State.MOUNTED else None
    if info is None:
        print(f"artifactfs: {mountpoint} is not mounted", file=sys.stderr)
        return 1
    if info.fstype != mp_mod.FSTYPE:
        print(f"artifactfs: {mountpoint} is a {info.fstype} mount, not artifactfs",
              file=sys.stderr)
        return 1
    ok, said = mp_mod.fusermount(mountpoint)
    if not ok:
        print(f"artifactfs: could not unmount {mountpoint}: {said}. If files are open there,"
              f" close them (see: fuser -vm {mountpoint}), or detach it now and let it go when"
              f" they close: fusermount3 -u -z {mountpoint}", file=sys.stderr)
        return 1
    if not _wait_for_store_release(Path(info.source), UMOUNT_WAIT):
        print(f"artifactfs: unmounted {mountpoint}, but its daemon still holds {info.source}",
              file=sys.stderr)
        return 0
    print(f"artifactfs: unmounted {mountpoint}", file=sys.stderr)
    return 0


def _wait_for_store_release(data_dir: Path, timeout: float) -> bool:
    """Wait until the daemon let go of its data directory (it flushes, then exits), so the
    next `artifactfs mount` of that store does not find it locked."""
    lock = data_dir / "lock"
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return True  # not a data directory we can see: nothing to wait for
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.command == "serve":
            trio.run(serve_only, args)
            return 0
        if args.command == "mount":
            return mount_command(args)
        if args.command == "umount":
            return umount_command(args)
        raise SystemExit(f"artifactfs: {args.command} is not implemented yet")
    except ArtifactError as exc:
        print(f"artifactfs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
