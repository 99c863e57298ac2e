"""The benchmark's workloads. Each loops ``for rep: for fs:`` so every repetition measures every
file system under the same conditions, minutes apart at most; ratios are taken per repetition
(fs / native of the same repetition), which is what keeps them meaningful on a busy machine.

Every metric is a rate (higher is better) except the memory ones (MiB, lower is better).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import MIB, Sizes
from .filesystems import ArtifactFS, FileSystem
from .system import (
    drop_caches,
    drop_file_cache,
    mem_kib,
    read_file,
    run_timed,
    settle,
    timed,
)

GB = 1e9


@dataclass(frozen=True)
class Metric:
    id: str
    group: str
    title: str
    unit: str
    target: str | None = None  # e.g. ">= 0.95" (ratio to native), ">= bindfs", ">= 1.0 (self)"
    kind: str = "ratio"  # ratio: to native; self: the fs's own factor; abs: absolute value


METRICS = [
    Metric("read_cold", "read", "sequential read, cold (caches dropped)", "GB/s", ">= 0.85"),
    Metric("read_warm", "read", "sequential read, warm (second read)", "GB/s", ">= 0.95"),
    Metric("read_served", "read", "sequential read, served by the daemon (native: warm)",
           "GB/s", ">= 0.25"),
    Metric("cp_in", "write", "cp of a large file into the file system", "GB/s", ">= 0.25"),
    Metric("dd_fsync", "write", "dd bs=1M conv=fsync into the file system", "GB/s", ">= 0.75"),
    Metric("ls_cold", "meta", "ls -l of the flat directory, cold", "entries/s"),
    Metric("ls_warm", "meta", "ls -l of the flat directory, warm", "entries/s", ">= 0.45"),
    Metric("stat_cold", "meta", "stat of every entry of the flat directory, cold", "entries/s"),
    Metric("stat_warm", "meta", "stat of every entry of the flat directory, warm", "entries/s",
           ">= 0.9"),
    Metric("find_cold", "meta", "find over the tree, cold", "entries/s"),
    Metric("find_warm", "meta", "find over the tree, warm", "entries/s"),
    Metric("small_cold", "small", "open+read+close of 4 KiB files, cold", "files/s"),
    Metric("small_warm", "small", "open+read+close of 4 KiB files, warm", "files/s",
           ">= bindfs"),
    Metric("readers1_served", "readers", "1 reader, served by the daemon (native: warm)", "GB/s"),
    Metric("readers4_served", "readers", "4 readers of 4 files at once, served by the daemon,"
           " aggregate", "GB/s"),
    Metric("scaling4_served", "readers", "4 readers' aggregate / 1 reader, served by the daemon",
           "x", ">= 1.0", kind="self"),
    Metric("readers1_cold", "readers", "1 reader, cold", "GB/s"),
    Metric("readers4_cold", "readers", "4 readers of 4 files at once, cold, aggregate", "GB/s"),
    Metric("scaling4_cold", "readers", "4 readers' aggregate / 1 reader, cold", "x", ">= 1.0",
           kind="self"),
    Metric("mem_mounted", "memory", "daemon VmHWM after mounting the memory store", "MiB",
           "< 200", kind="abs"),
    Metric("mem_tenth", "memory", "daemon VmHWM after listing 10% of its artifacts", "MiB",
           "< 200", kind="abs"),
    Metric("mem_all", "memory", "daemon VmHWM after listing all its artifacts (per pass)",
           "MiB", "< 200", kind="abs"),
    Metric("mem_growth", "memory", "VmHWM growth from 10% to all listed (per pass)", "MiB",
           "< 10", kind="abs"),
    Metric("mem_list_rate", "memory", "listing rate (scandir + lstat) of the memory store",
           "entries/s", kind="abs"),
]
BY_ID = {m.id: m for m in METRICS}
GROUPS = ["read", "write", "meta", "small", "readers", "memory"]


@dataclass
class Run:
    """What a workload needs, and where it records: values[metric][fs] = one per repetition."""

    work: Path
    sizes: Sizes
    reps: int
    fses: list[FileSystem]
    cold_ok: bool
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profile_dir: Path | None = None
    readers_cold: bool = True  # --quick leaves the cold 4-reader case out (time)
    readers_mib: int | None = None  # --quick reads only the head of each file (time)
    min_seconds: float = 1.0  # warm measurements repeat for at least this long (median kept)

    def record(self, metric: str, fs: FileSystem | str, value: float) -> None:
        name = fs if isinstance(fs, str) else fs.name
        self.values.setdefault(metric, {}).setdefault(name, []).append(value)
        m = BY_ID[metric]
        print(f"    {name:<11} {metric:<16} {value:>12,.3f} {m.unit}", flush=True)

    def fail(self, metric: str, fs: FileSystem, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"[:300]
        self.errors.setdefault(metric, {})[fs.name] = msg
        print(f"    {fs.name:<11} {metric:<16} FAILED {msg}", flush=True)

    def attempt(self, metric: str, fs: FileSystem, fn: Callable[[], float],
                repeat: bool = False) -> None:
        """Record fn()'s rate. ``repeat`` (warm cases only, which a rerun does not change):
        rerun it until min_seconds have passed and keep the median, so an operation of a few
        milliseconds is not one scheduler hiccup away from a wrong ratio."""
        if fs.name in self.errors.get(metric, {}):
            return  # failed once: do not keep hammering a broken path
        try:
            t0 = time.perf_counter()
            rates = [fn()]
            while repeat and time.perf_counter() - t0 < self.min_seconds:
                rates.append(fn())
            self.record(metric, fs, statistics.median(rates))
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            self.fail(metric, fs, exc)

    def cold(self) -> None:
        drop_caches()


# --- 1. sequential read ----------------------------------------------------------------------

def seq_read(run: Run) -> None:
    rel = run.sizes.big(0)
    for rep in range(run.reps):
        print(f"  read, repetition {rep + 1}/{run.reps}", flush=True)
        for fs in run.fses:
            path = fs.root / rel

            def rate(p: Path = path) -> float:
                dt, n = timed(read_file, p)
                return n / dt / GB

            if run.cold_ok:
                run.cold()
                run.attempt("read_cold", fs, rate)
            read_file(path)  # (after a failed cold read, still make it warm)
            run.attempt("read_warm", fs, rate, repeat=True)
            read_file(fs.backing(rel))
            if fs.fuse:
                drop_file_cache(path)
            run.attempt("read_served", fs, rate)


# --- 2. writes into the file system ----------------------------------------------------------

def writes(run: Run) -> None:
    src = run.work / "native" / run.sizes.big(0)
    size = src.stat().st_size
    for rep in range(run.reps):
        print(f"  write, repetition {rep + 1}/{run.reps}", flush=True)
        for fs in run.fses:
            dst = fs.root / "incoming" / "copy.bin"
            pids = [fs.pid] if fs.pid else []
            for metric, argv in (
                ("cp_in", ["cp", str(src), str(dst)]),
                ("dd_fsync", ["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fsync",
                              "status=none"]),
            ):
                read_file(src)
                os.sync()
                run.attempt(metric, fs, lambda argv=argv: size / run_timed(argv) / GB)
                settle(pids)  # a FUSE release (the commit) runs after close() returns
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(dst)
                os.sync()
                settle(pids)


# --- 3. metadata: ls -l, stat, find ----------------------------------------------------------

def stat_all(directory: Path, names: list[str]) -> int:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            os.stat(n, dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(dfd)
    return len(names)


def metadata(run: Run) -> None:
    names = run.sizes.flat_names()
    n_flat = len(names)
    n_tree = run.sizes.tree + run.sizes.tree_dirs + 1
    env = {**os.environ, "LC_ALL": "C"}
    for rep in range(run.reps):
        print(f"  metadata, repetition {rep + 1}/{run.reps}", flush=True)
        for fs in run.fses:
            flat, tree = fs.root / "flat", fs.root / "tree"
            ls = ["ls", "-l", str(flat)]
            find = ["find", str(tree)]

            def ls_rate(ls: list[str] = ls) -> float:
                return n_flat / run_timed(ls, env=env)

            def stat_rate(flat: Path = flat) -> float:
                dt, n = timed(stat_all, flat, names)
                return n / dt

            def find_rate(find: list[str] = find) -> float:
                return n_tree / run_timed(find, env=env)

            for kind, fn in (("ls", ls_rate), ("stat", stat_rate), ("find", find_rate)):
                if run.cold_ok:
                    run.cold()
                    run.attempt(f"{kind}_cold", fs, fn)
                run.attempt(f"{kind}_warm", fs, fn, repeat=True)


# --- 4. small files --------------------------------------------------------------------------

def open_read_close(directory: Path, names: list[str]) -> int:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in names:
            fd = os.open(n, os.O_RDONLY, dir_fd=dfd)
            while os.read(fd, 65536):
                pass
            os.close(fd)
    finally:
        os.close(dfd)
    return len(names)


def small_files(run: Run) -> None:
    names = run.sizes.small_names()
    for rep in range(run.reps):
        print(f"  small files, repetition {rep + 1}/{run.reps}", flush=True)
        for fs in run.fses:
            def rate(d: Path = fs.root / "small") -> float:
                dt, n = timed(open_read_close, d, names)
                return n / dt

            if run.cold_ok:
                run.cold()
                run.attempt("small_cold", fs, rate)
            run.attempt("small_warm", fs, rate, repeat=True)


# --- 5. concurrent readers -------------------------------------------------------------------

def dd_all(paths: list[Path], mib: int) -> float:
    """Wall time for dd readers of the first ``mib`` MiB of ``paths``, started together."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["dd", f"if={p}", "of=/dev/null", "bs=1M", f"count={mib}",
                               "status=none"]) for p in paths]
    codes = [p.wait() for p in procs]
    dt = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError(f"dd exited with {codes}")
    return dt


def readers(run: Run) -> None:
    rels = [run.sizes.big(i) for i in range(run.sizes.big_count)]
    mib = min(run.sizes.big_mib, run.readers_mib or run.sizes.big_mib)
    size = mib * MIB
    for rep in range(run.reps):
        print(f"  concurrent readers, repetition {rep + 1}/{run.reps}", flush=True)
        for fs in run.fses:
            paths = [fs.root / r for r in rels]
            states = ["served"] + (["cold"] if run.cold_ok and run.readers_cold else [])
            for state in states:
                def prepare(ps: list[Path], state: str = state, fs: FileSystem = fs) -> None:
                    if state == "cold":
                        run.cold()
                        return
                    for p, r in zip(ps, rels, strict=False):
                        read_file(fs.backing(r))
                        if fs.fuse:
                            drop_file_cache(p)

                one = four = None
                with contextlib.suppress(OSError, RuntimeError, subprocess.SubprocessError):
                    prepare(paths)
                    one = size / dd_all(paths[:1], mib) / GB
                    prepare(paths)
                    four = len(paths) * size / dd_all(paths, mib) / GB
                if one is None or four is None:
                    run.fail(f"readers4_{state}", fs, RuntimeError("a dd reader failed"))
                    continue
                run.record(f"readers1_{state}", fs, one)
                run.record(f"readers4_{state}", fs, four)
                run.record(f"scaling4_{state}", fs, four / one)


# --- 6. the daemon's memory while listing many artifacts -------------------------------------

def list_dirs(root: Path, dirs: list[str]) -> int:
    n = 0
    for d in dirs:
        with os.scandir(root / d) as it:
            for e in it:
                e.stat(follow_symlinks=False)
                n += 1
    return n


def memory(run: Run) -> None:
    fs = ArtifactFS(run.work, data=run.work / "memstore", label="artifactfs-mem")
    dirs = run.sizes.mem_dirs()
    tenth = max(1, len(dirs) // 10)
    fs.start()
    try:
        assert fs.pid
        mib = lambda: (mem_kib(fs.pid, "VmHWM") or 0) / 1024  # noqa: E731
        run.record("mem_mounted", "artifactfs", mib())
        for rep in range(run.reps):
            print(f"  memory, pass {rep + 1}/{run.reps}"
                  f" ({'cold' if rep != 1 and run.cold_ok else 'warm'})", flush=True)
            if rep != 1 and run.cold_ok:
                run.cold()  # passes 1 and 3 make the kernel look every entry up again
            t0 = time.perf_counter()
            n = list_dirs(fs.root, dirs[:tenth])
            at_tenth = mib()
            n += list_dirs(fs.root, dirs[tenth:])
            dt = time.perf_counter() - t0
            at_all = mib()
            run.record("mem_tenth", "artifactfs", at_tenth)
            run.record("mem_all", "artifactfs", at_all)
            run.record("mem_growth", "artifactfs", at_all - at_tenth)
            run.record("mem_list_rate", "artifactfs", n / dt)
            if n != run.sizes.mem:
                run.notes.append(f"the memory pass listed {n} artifacts, expected"
                                 f" {run.sizes.mem}")
    finally:
        fs.stop()


WORKLOADS: dict[str, Callable[[Run], None]] = {
    "read": seq_read, "write": writes, "meta": metadata, "small": small_files,
    "readers": readers, "memory": memory,
}


@contextlib.contextmanager
def profiling(run: Run, group: str, fs: FileSystem | None):
    """py-spy record of the artifactfs daemon while one workload group runs (--profile)."""
    if run.profile_dir is None or fs is None or fs.pid is None:
        yield
        return
    run.profile_dir.mkdir(parents=True, exist_ok=True)
    out = run.profile_dir / f"{group}.txt"
    spy = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "py-spy"
    proc = subprocess.Popen([str(spy), "record", "-p", str(fs.pid), "--format", "raw",
                             "--rate", "200", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
