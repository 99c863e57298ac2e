"""The ``artifactfs`` command: parses options and hands them to the module that does the work.

    artifactfs mount MOUNTPOINT [--data DIR] [--http ADDR] [--token T] [--foreground] [--sync]
                     [--no-passthrough] [--no-passthrough-writes]
    artifactfs umount MOUNTPOINT
    artifactfs serve --http ADDR [--data DIR] [--token T]
    artifactfs put FILE KEY | get KEY [FILE] | ls [PREFIX] | info KEY | rm KEY...   (over HTTP)
    artifactfs put -r DIR PREFIX | get -r PREFIX [DIR] | sync SRC DST [--delete]  (folders)
    artifactfs fsck [--data DIR] [--repair]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_HTTP = "127.0.0.1:8321"
DEFAULT_JOBS = 4  # files at once in a folder transfer: enough to hide per-file round trips


def _data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="data directory (default: ~/.local/share/artifactfs)")


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("ARTIFACTFS_URL", f"http://{DEFAULT_HTTP}"),
                   help="the daemon's HTTP URL (default: $ARTIFACTFS_URL or the local daemon)")
    p.add_argument("--token", default=os.environ.get("ARTIFACTFS_TOKEN"),
                   help="bearer token (default: $ARTIFACTFS_TOKEN)")


def _folder_args(p: argparse.ArgumentParser, *, recursive: bool = True) -> None:
    only = "with -r: " if recursive else ""
    if recursive:
        p.add_argument("-r", "--recursive", action="store_true",
                       help="a folder: every file below it, keys joined with '/'")
    p.add_argument("-j", "--jobs", type=int, default=DEFAULT_JOBS,
                   help=f"{only}files transferred at once (default {DEFAULT_JOBS})")
    p.add_argument("--dry-run", action="store_true",
                   help=f"{only}print what would be sent (and deleted); change nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="artifactfs", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mount", help="mount the store (and optionally serve HTTP)")
    p.add_argument("mountpoint", type=Path)
    _data_arg(p)
    p.add_argument("--http", metavar="ADDR", default=None,
                   help="also serve the HTTP API at HOST:PORT from the same daemon")
    p.add_argument("--token", default=os.environ.get("ARTIFACTFS_TOKEN"),
                   help="bearer token required on every HTTP route (needed off loopback)")
    p.add_argument("--foreground", action="store_true", help="stay attached, log to stderr")
    p.add_argument("--sync", action="store_true", help="fsync every commit before it returns")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users see the mount (default: only the mounting user)")
    p.add_argument("--passthrough", action=argparse.BooleanOptionalAction, default=True,
                   help="the kernel reads committed artifacts straight from their blobs (the"
                        " default; Linux >= 6.9 and CAP_SYS_ADMIN, else the mount says so in"
                        " its log and the daemon serves reads); --no-passthrough: the daemon"
                        " serves every read, with the kernel's writeback cache")
    p.add_argument("--passthrough-writes", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="with passthrough, the kernel also writes files created write-only"
                        " (cp, dd, a shell's >) straight into their staging files, and the"
                        " commit at close copies the file (the default where the data"
                        " directory's file system has multigrain timestamps: Linux >= 6.13 on"
                        " ext4, xfs, btrfs or tmpfs); --no-passthrough-writes: the daemon"
                        " receives every write (docs/PERFORMANCE.md, Known weak spots)")

    p = sub.add_parser("umount", help="unmount a mount point")
    p.add_argument("mountpoint", type=Path)

    p = sub.add_parser("serve", help="serve the HTTP API alone")
    p.add_argument("--http", metavar="ADDR", default=DEFAULT_HTTP)
    _data_arg(p)
    p.add_argument("--token", default=os.environ.get("ARTIFACTFS_TOKEN"))
    p.add_argument("--sync", action="store_true")

    p = sub.add_parser("put", help="upload FILE as KEY, or with -r the folder DIR under PREFIX"
                                   " (resumable: run again to continue)")
    p.add_argument("file", metavar="FILE|DIR")
    p.add_argument("key", metavar="KEY|PREFIX")
    p.add_argument("--mime-type", default=None)
    _folder_args(p)
    _client_args(p)

    p = sub.add_parser("get", help="download KEY to FILE (default: its base name; - = stdout),"
                                   " or with -r every artifact under PREFIX into DIR")
    p.add_argument("key", metavar="KEY|PREFIX")
    p.add_argument("file", metavar="FILE|DIR", nargs="?", default=None)
    _folder_args(p)
    _client_args(p)

    p = sub.add_parser("sync", help="make DST hold what SRC holds, one side a local folder and"
                                    " the other a prefix (:PREFIX always names the store)")
    p.add_argument("src", metavar="SRC", help="a local folder, or a prefix (:PREFIX)")
    p.add_argument("dst", metavar="DST", help="a prefix (:PREFIX), or a local folder")
    p.add_argument("--delete", action="store_true",
                   help="after every copy succeeded, delete what DST holds and SRC lacks")
    _folder_args(p, recursive=False)
    _client_args(p)

    p = sub.add_parser("ls", help="list artifacts")
    p.add_argument("prefix", nargs="?", default="")
    p.add_argument("--json", action="store_true")
    _client_args(p)

    p = sub.add_parser("info", help="show one artifact")
    p.add_argument("key")
    _client_args(p)

    p = sub.add_parser("rm", help="delete artifacts (all or nothing)")
    p.add_argument("keys", nargs="+")
    _client_args(p)

    p = sub.add_parser("fsck", help="check (and --repair) a data directory")
    _data_arg(p)
    p.add_argument("--repair", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .systemd import stderr_is_journal

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        # The journal stamps each line itself.
        format=("" if stderr_is_journal() else "%(asctime)s ")
        + "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command in ("mount", "umount", "serve"):
        from . import daemon

        return daemon.run_command(args)
    if args.command == "fsck":
        from .fsck_command import run_fsck

        return run_fsck(args)
    from . import client

    return client.run_command(args)


if __name__ == "__main__":
    sys.exit(main())
