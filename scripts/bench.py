"""The artifactfs benchmark: each workload on the native file system that holds the
data directory, on artifactfs, and on the peer FUSE file systems present (bindfs, rclone), in
one run, repeated, reported as ratios to native taken in the same run.

    ./scripts/bench            full sizes (1 GiB files, 100k entries, 1M artifacts): ~15 min
    ./scripts/bench --quick    smaller sizes, under two minutes once the data set is built
    ./scripts/bench --only read,meta --fs native,artifactfs     a part (results not in docs/)

Writes docs/bench/<full|quick>.json and .png and its block of docs/PERFORMANCE.md. Needs root
for cold-cache runs (drop_caches); without it the cold workloads are skipped and the report
says so. The data set is built once in --workdir and reused while its sizes are unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import dataset, report
from benchlib.filesystems import PEERS, ArtifactFS, FileSystem, is_mounted, snapshot
from benchlib.system import can_drop_caches
from benchlib.workloads import GROUPS, WORKLOADS, Run, profiling

REPO = Path(__file__).resolve().parents[1]

FULL = dataset.Sizes(big_mib=1024, flat=100_000, tree=100_000, tree_dirs=1000, small=10_000,
                     mem=1_000_000)
QUICK = dataset.Sizes(big_mib=128, flat=10_000, tree=10_000, tree_dirs=100, small=2_000,
                      mem=20_000)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--quick", action="store_true", help="smaller sizes (see QUICK in bench.py)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3, at least 3"
                   " for the docs)")
    p.add_argument("--only", default=",".join(GROUPS),
                   help=f"workload groups, comma-separated (default all: {','.join(GROUPS)})")
    p.add_argument("--fs", default=",".join(PEERS),
                   help=f"file systems, comma-separated (default all: {','.join(PEERS)})")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the data set and mounts live; must be on the disk to compare"
                   " against (default /var/tmp/artifactfs-bench/<full|quick>)")
    p.add_argument("--afs-rev", default=None, metavar="REV",
                   help="run artifactfs as of this git commit (e.g. HEAD) instead of the working"
                   " tree, which others may be editing")
    p.add_argument("--afs-opt", action="append", default=[], metavar="OPT",
                   help="an option for `artifactfs mount`, e.g. --afs-opt=--no-passthrough"
                        " (repeatable)")
    p.add_argument("--afs-src", type=Path, default=None, metavar="DIR",
                   help="run artifactfs from DIR/artifactfs (a variant being evaluated)")
    p.add_argument("--prepare", action="store_true",
                   help="only build (or check) the data set, then exit")
    p.add_argument("--no-docs", action="store_true",
                   help="write results to bench-results/ instead of docs/")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="py-spy record the artifactfs daemon during each workload group into"
                   " DIR/<group>.txt (collapsed stacks)")
    for name in ("big_mib", "flat", "tree", "tree_dirs", "small", "mem"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"override the size {name}")
    return p.parse_args(argv)


def sizes_text(s: dataset.Sizes) -> str:
    return (f"{s.big_count} x {s.big_mib} MiB files, {s.flat:,} entries in a directory,"
            f" {s.tree:,} in {s.tree_dirs:,} directories, {s.small:,} small files,"
            f" {s.mem:,} artifacts for memory")


def git_rev() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "artifactfs"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    profile = "quick" if args.quick else "full"
    sizes = QUICK if args.quick else FULL
    overrides = {k: v for k in ("big_mib", "flat", "tree", "tree_dirs", "small", "mem")
                 if (v := getattr(args, k)) is not None}
    sizes = dataclasses.replace(sizes, **overrides)
    groups = [g for g in args.only.split(",") if g]
    names = [f for f in args.fs.split(",") if f]
    for g in groups:
        if g not in WORKLOADS:
            raise SystemExit(f"bench: unknown workload group {g!r} (know {', '.join(GROUPS)})")
    for n in names:
        if n not in PEERS:
            raise SystemExit(f"bench: unknown file system {n!r} (know {', '.join(PEERS)})")
    if "native" not in names:
        names.insert(0, "native")
    partial = set(groups) != set(GROUPS) or set(names) != set(PEERS) or bool(overrides)
    to_docs = not (partial or args.no_docs)
    work = args.workdir or Path("/var/tmp/artifactfs-bench") / profile
    work.mkdir(parents=True, exist_ok=True)

    skipped: dict[str, str] = {}
    for n in names:
        why = PEERS[n].missing()
        if why:
            skipped[n] = why
            print(f"bench: skipping {n}: {why}", flush=True)
    names = [n for n in names if n not in skipped]
    cold_ok = can_drop_caches()
    notes = []
    if not cold_ok:
        notes.append("cold workloads skipped: cannot write /proc/sys/vm/drop_caches"
                     " (needs root outside a restricted container)")

    # SIGTERM (or a CI time-out) must still unmount: turn it into KeyboardInterrupt.
    signal.signal(signal.SIGTERM, interrupted)

    if args.afs_rev:
        ArtifactFS.src, ArtifactFS.rev = snapshot(args.afs_rev, work)
    elif args.afs_src:
        ArtifactFS.src, ArtifactFS.rev = args.afs_src.resolve(), f"source {args.afs_src}"
    ArtifactFS.options = list(args.afs_opt)
    if ArtifactFS.src:
        sys.path.insert(0, str(ArtifactFS.src))  # the store is built by the same code
    t_start = time.time()
    load_before = load()
    dataset.build_native(work, sizes)
    if "artifactfs" in names:
        dataset.build_store(work, sizes)
        if "memory" in groups:
            dataset.build_memstore(work, sizes)
    if args.prepare:
        print(f"bench: data set ready in {work}")
        return 0

    fses: list[FileSystem] = [PEERS[n](work) for n in names]
    run = Run(work=work, sizes=sizes, reps=args.reps, fses=[], cold_ok=cold_ok, notes=notes,
              profile_dir=args.profile, readers_cold=not args.quick,
              min_seconds=0.2 if args.quick else 0.5, readers_mib=64 if args.quick else 512)
    notes.append(f"each concurrent reader reads the first {run.readers_mib} MiB of its file"
                 " (time: rclone serves ~0.1-0.2 GB/s)")
    notes.append(f"warm cases rerun for at least {run.min_seconds} s and keep the median of"
                 " their reruns as the repetition's value")
    if args.quick:
        notes.append("--quick leaves out the cold case of the concurrent readers")
    described = {}
    group_seconds: dict[str, float] = {}
    t_measure = time.time()
    try:
        for fs in fses:
            try:
                fs.start()
            except RuntimeError as exc:
                skipped[fs.name] = str(exc)
                print(f"bench: skipping {fs.name}: {exc}", flush=True)
                continue
            run.fses.append(fs)
            described[fs.name] = fs.describe() + (
                f"; read-ahead {fs.read_ahead} KiB" if fs.fuse and fs.read_ahead else "")
        afs = next((f for f in run.fses if f.name == "artifactfs"), None)
        for g in groups:
            if g == "memory":
                continue
            print(f"workload group {g}", flush=True)
            t0 = time.time()
            with profiling(run, g, afs):
                WORKLOADS[g](run)
            group_seconds[g] = round(time.time() - t0, 1)
    finally:
        for fs in run.fses:
            fs.stop()
    if "memory" in groups and "artifactfs" in described:
        print("workload group memory", flush=True)
        t0 = time.time()
        WORKLOADS["memory"](run)
        group_seconds["memory"] = round(time.time() - t0, 1)
    elif "memory" in groups:
        notes.append("memory workload skipped: artifactfs did not mount")

    left = [str(fs.mnt) for fs in fses if fs.fuse and is_mounted(fs.mnt)]
    if left:
        notes.append(f"mounts left behind: {left}")
    out_dir = REPO / "docs" / "bench" if to_docs else REPO / "bench-results"
    result = {
        "meta": {
            "profile": profile, "reps": args.reps, "sizes": dataclasses.asdict(sizes),
            "sizes_text": sizes_text(sizes), "mem_artifacts": sizes.mem,
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": time.time() - t_start, "measure_seconds": time.time() - t_measure,
            "git": git_rev(), "artifactfs_rev": ArtifactFS.rev or "working tree",
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "load_before": load_before, "load_after": load(), "workdir": str(work),
            "cold_caches": cold_ok, "group_seconds": group_seconds,
        },
        "filesystems": described, "skipped": skipped, "notes": notes,
        "errors": run.errors, "values": run.values, "summary": report.summarise(run.values),
        "json_rel": str((out_dir / f"{profile}.json").relative_to(REPO)),
        "png_rel": str((out_dir / f"{profile}.png").relative_to(REPO)),
    }
    report.write_json(result, out_dir / f"{profile}.json")
    report.chart(result, out_dir / f"{profile}.png")
    body = report.markdown(result)
    if to_docs:
        report.update_performance_md(REPO / "docs" / "PERFORMANCE.md", profile, body)
    print()
    print(body)
    print(f"\nbench: wrote {out_dir / (profile + '.json')} and .png"
          + (" and docs/PERFORMANCE.md" if to_docs else ""))
    if left:
        print(f"bench: WARNING: mounts left behind: {left}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("bench: interrupted; mounts were unmounted", file=sys.stderr)
        sys.exit(130)
