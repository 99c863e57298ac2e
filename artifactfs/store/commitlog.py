"""The commit log: commits acknowledged to their caller before SQLite has committed them.

Why: a SQLite COMMIT in WAL mode writes every page the transaction touched (4-5 frames for one
small artifact), which costs more than writing the artifact's file (docs/PERFORMANCE.md, Known
weak spots). Commits are therefore batched: the metadata connection keeps one write transaction open
(the *batch*) for up to ``BATCH_WINDOW`` seconds or ``BATCH_MAX`` commits, each commit runs in
a savepoint inside it, and each appends one line describing itself to this log with one
``write(2)`` before it returns. Everything reads through that same connection, so a commit is
visible to every face the moment it returns, as without the batch; only the COMMIT is shared.

What survives what (DESIGN §6; the batch changes none of it):
- A crash of the process: the kernel keeps the log's written lines; start-up replays the
  lines of the batch that had not committed (recovery.py), so no acknowledged commit is lost.
- A power loss: neither the log nor an uncommitted batch was ever promised to survive one.
  A commit becomes durable when the flusher has fsynced its blob and then the WAL holding the
  committed batch, as before; a replayed line whose blob was torn is verified and dropped or
  rolled back to the version it replaced, like any other row not yet durable.

Generations: every line carries the number of the batch it belongs to. The batch's own COMMIT
records that number in ``store_info`` ('log_applied'), in the same transaction as its rows, so
the database itself says which lines it holds: start-up replays only lines of a later batch,
and a log truncated late (a crash between the COMMIT and the truncate) or not at all replays
nothing twice.

Invariant (Metadata enforces it in one place, ``_Connection``): the open batch holds only
writes that the log describes. Any other write (a transaction, a single statement) first
commits the batch, so the order of the database's transactions is the order of the calls and a
replay of the log on top of the last committed batch rebuilds exactly what was acknowledged.

Line format: ``<Python literal tuple> <crc32 as 8 hex digits>\\n``, the tuple being
``(generation, kind, *fields)`` of str, int and None (``repr`` escapes every newline; it is
twice as fast as JSON here, and ``ast.literal_eval`` reads it back without running code). A
torn last line (a crash inside ``write``) fails its checksum and ends the replay; lines are
only ever appended, so nothing after it was acknowledged.
"""

from __future__ import annotations

import ast
import logging
import os
import zlib
from pathlib import Path
from typing import Any

log = logging.getLogger("artifactfs.store")

# How long a batch stays open at most (seconds), and how many commits it takes at most. The
# window bounds how much the log holds and how late the flusher sees a commit in the database;
# it does not delay visibility (the same connection reads the open batch).
BATCH_WINDOW = 0.05
BATCH_MAX = 1000


class CommitLog:
    """The log file of one data directory: append a line, read the lines back, start over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self.fd).st_size

    def close(self) -> None:
        os.close(self.fd)

    def append(self, generation: int, kind: str, fields: tuple[Any, ...]) -> None:
        """One line, one write: a crash leaves it whole or torn, never interleaved."""
        body = repr((generation, kind, *fields)).encode()
        line = b"%s %08x\n" % (body, zlib.crc32(body))
        n = os.write(self.fd, line)
        if n != len(line):  # a full disk can cut a write short
            os.ftruncate(self.fd, self.size)
            raise OSError(28, "short write to the commit log")
        self.size += n

    def lines(self) -> list[tuple[int, str, list[Any]]]:
        """Every whole line, in order: (generation, kind, fields). Stops at a torn line."""
        with open(self.fd, "rb", closefd=False) as f:
            f.seek(0)
            raw = f.read()
        out: list[tuple[int, str, list[Any]]] = []
        for line in raw.split(b"\n")[:-1]:
            body, _, crc = line.rpartition(b" ")
            try:
                ok = int(crc, 16) == zlib.crc32(body)
                item = ast.literal_eval(body.decode()) if ok else None
            except (ValueError, SyntaxError, UnicodeDecodeError):
                item = None
            if not isinstance(item, tuple) or len(item) < 2:
                log.warning("the commit log ends in a torn line after %d whole ones", len(out))
                break
            out.append((int(item[0]), str(item[1]), list(item[2:])))
        return out

    def reset(self) -> None:
        """Empty the log: every line in it belongs to a batch the database holds."""
        if self.size:
            os.ftruncate(self.fd, 0)
            self.size = 0
