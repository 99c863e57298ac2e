"""The file systems under test. Each shows the same data set under ``root``: the native directory
itself, bindfs and rclone mounted over it, and artifactfs mounted over a store holding the same
files as artifacts. Every mount is started in the foreground by us, so we know its pid (for
VmHWM and py-spy) and end only processes we started."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

from .system import settle

REPO = Path(__file__).resolve().parents[2]


def is_mounted(mnt: Path) -> bool:
    """From the mount table: os.path.ismount says False for a dead FUSE mount (ENOTCONN)."""
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = line.split(" ")[4].replace("\\040", " ").replace("\\011", "\t")
            if point == target:
                return True
    return False


def fuse_unmount(mnt: Path) -> None:
    """fusermount3 -u, retried while busy, then -z (lazy) as the last resort."""
    for _ in range(20):
        if not is_mounted(mnt):
            return
        r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.25)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def read_ahead_kb(path: Path) -> int | None:
    st = os.stat(path)
    p = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    try:
        return int(p.read_text())
    except OSError:
        return None


class FileSystem:
    name = "?"
    fuse = True
    available_reason: str | None = None  # why it is skipped, if it is

    def __init__(self, work: Path) -> None:
        self.work = work
        self.native = work / "native"
        self.mnt = work / "mnt" / self.name
        self.proc: subprocess.Popen | None = None
        self.log_path = work / "logs" / f"{self.name}.log"
        self.read_ahead: int | None = None

    @property
    def root(self) -> Path:
        return self.mnt

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def backing(self, rel: str) -> Path:
        """The native file whose pages back ``rel`` (warmed for daemon-served reads)."""
        return self.native / rel

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def describe(self) -> str:
        return self.name

    @classmethod
    def missing(cls) -> str | None:
        return None

    def start(self) -> None:
        if is_mounted(self.mnt):  # left by an earlier run of ours that was killed
            fuse_unmount(self.mnt)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=self.env(),
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before"
                                   f" mounting; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not mount within 60 s")
            time.sleep(0.05)
        # Touch the root once so the mount has answered its first requests.
        os.listdir(self.mnt)
        self.read_ahead = read_ahead_kb(self.mnt)

    def stop(self) -> None:
        if self.proc is None:
            return
        settle([self.proc.pid], quiet=0.2, limit=30)
        fuse_unmount(self.mnt)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if is_mounted(self.mnt):
            fuse_unmount(self.mnt)


class Native(FileSystem):
    name = "native"
    fuse = False

    @property
    def root(self) -> Path:
        return self.native

    def describe(self) -> str:
        return "the native file system that holds the data directory (ext4 here)"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class BindFS(FileSystem):
    name = "bindfs"

    @classmethod
    def missing(cls) -> str | None:
        return None if shutil.which("bindfs") else "bindfs is not installed (apt install bindfs)"

    def command(self) -> list[str]:
        return ["bindfs", "-f", str(self.native), str(self.mnt)]

    def describe(self) -> str:
        v = subprocess.run(["bindfs", "--version"], capture_output=True, text=True).stdout
        return f"{v.strip()} (libfuse 2, C), default options, over the native directory"


class Rclone(FileSystem):
    name = "rclone"

    @classmethod
    def missing(cls) -> str | None:
        return None if shutil.which("rclone") else "rclone is not installed (apt install rclone)"

    def command(self) -> list[str]:
        return ["rclone", "mount", str(self.native), str(self.mnt)]

    def env(self) -> dict[str, str]:
        cfg = self.work / "rclone.conf"
        cfg.touch()
        return {**os.environ, "RCLONE_CONFIG": str(cfg)}

    def describe(self) -> str:
        v = subprocess.run(["rclone", "version"], capture_output=True, text=True).stdout
        return (f"{v.splitlines()[0] if v else 'rclone'} (Go), `rclone mount` of the native"
                " directory, default options (--vfs-cache-mode off)")


class ArtifactFS(FileSystem):
    name = "artifactfs"

    # Set by bench.py --afs-rev: a snapshot of the package at a commit, run instead of the
    # working tree (which may be edited while the bench runs).
    src: Path | None = None
    rev: str | None = None
    # Set by bench.py --afs-opt: extra `artifactfs mount` options (e.g. --no-passthrough).
    options: list[str] = []  # noqa: RUF012 (set once, before any instance)

    def __init__(self, work: Path, data: Path | None = None, label: str = "artifactfs") -> None:
        super().__init__(work)
        self.data = data or work / "store"
        self.mnt = work / "mnt" / label
        self.log_path = work / "logs" / f"{label}.log"
        self._blob_ids: dict[str, str] = {}

    @classmethod
    def missing(cls) -> str | None:
        exe = REPO / ".venv" / "bin" / "artifactfs"
        if not exe.exists():
            return "the artifactfs command is not installed (run ./scripts/setup)"
        r = subprocess.run([str(exe), "mount", "--help"], capture_output=True, text=True)
        return None if r.returncode == 0 else "`artifactfs mount` is not available"

    def command(self) -> list[str]:
        args = ["mount", str(self.mnt), "--data", str(self.data), "--foreground",
                *self.options]
        if self.src is None:
            return [str(REPO / ".venv" / "bin" / "artifactfs"), *args]
        boot = (f"import sys; sys.path.insert(0, {str(self.src)!r}); sys.argv[0] = 'artifactfs';"
                " from artifactfs.cli import main; sys.exit(main())")
        return [str(REPO / ".venv" / "bin" / "python"), "-c", boot, *args]

    def describe(self) -> str:
        if self.rev:
            where = self.rev if self.rev.startswith("source ") else f"commit {self.rev}"
        else:
            rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                    "artifactfs"], capture_output=True, text=True).stdout.strip()
            where = f"the working tree at {rev}{' with uncommitted changes' if dirty else ''}"
        opts = "".join(f" {o}" for o in self.options)
        return (f"artifactfs from {where} (pyfuse3 on trio),"
                f" `artifactfs mount --foreground{opts}`")


def snapshot(rev: str, work: Path) -> tuple[Path, str]:
    """The artifactfs package as of ``rev``, extracted once under WORK/src/<sha> (git archive:
    nothing is added to the repository's .git)."""
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", rev],
                         capture_output=True, text=True, check=True).stdout.strip()
    dest = work / "src" / sha
    if not (dest / "artifactfs" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "artifactfs"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, sha

    def backing(self, rel: str) -> Path:
        blob_id = self._blob_ids.get(rel)
        if blob_id is None:
            # A read-only look at the WAL database while the daemon owns it: readers never
            # block the writer, and nothing here changes a row.
            uri = f"file:{self.data / 'meta.db'}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
                row = db.execute("SELECT blob_id FROM entries WHERE key = ?", (rel,)).fetchone()
            if not row or not row[0]:
                raise RuntimeError(f"no blob for {rel} in {self.data}")
            blob_id = self._blob_ids[rel] = row[0]
        return self.data / "blobs" / blob_id[:2] / blob_id


PEERS = {"native": Native, "artifactfs": ArtifactFS, "bindfs": BindFS, "rclone": Rclone}
