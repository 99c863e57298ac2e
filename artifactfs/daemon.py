"""The daemon: one process, one store, the mount and/or the HTTP face on one trio loop."""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from .errors import ArtifactError
from .store import open_store

log = logging.getLogger("artifactfs.daemon")


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"artifactfs: --http wants HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


async def serve_only(args: argparse.Namespace) -> None:
    from .http.server import serve_http

    host, port = parse_addr(args.http)
    async with open_store(args.data, sync=args.sync) as store:
        await serve_http(store, host, port, token=args.token)


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.command == "serve":
            trio.run(serve_only, args)
            return 0
        raise SystemExit(f"artifactfs: {args.command} is not implemented yet")
    except ArtifactError as exc:
        print(f"artifactfs: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
