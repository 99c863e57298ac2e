"""Folder transfers: ``artifactfs put -r DIR PREFIX``, ``get -r PREFIX DIR`` and ``sync SRC DST``.

A folder transfer is many single-file transfers of artifactfs.client (``put_file``,
``get_file``) run by a thread pool (``-j``), so each file keeps their guarantees: uploads resume
through their upload sessions, downloads through their partial files, and every file is
checked against its sha256. Before sending a file, the transfer compares it with what the
destination already holds: a file of the same size and sha256 is skipped, so running the same
command again after an interruption sends only what is missing.

Keys are the folder's relative paths joined with ``/`` under the prefix. A local name that no
key can hold, a file that cannot be read, a file the daemon refuses: each is one failure with
its reason, listed at the end; the exit status is 0 only when every file arrived. Losing the
daemon stops the transfer (every later file would fail the same way) and says to run the
command again.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import httpx
from rich.console import Console
from rich.filesize import decimal
from rich.progress import Progress, TextColumn

from .client import (
    CommandError,
    all_artifacts,
    byte_columns,
    delete_keys,
    get_file,
    part_target,
    put_file,
    upload_state_file,
)
from .errors import InvalidKey
from .models import validate_key

PLAIN_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal
DELETE_BATCH = 1000  # keys per bulk delete: well under the daemon's 16 MiB JSON limit


class Outcome(Enum):
    SENT = "sent"
    SKIPPED = "unchanged"
    WOULD = "would send"
    FAILED = "failed"
    NOT_RUN = "not started"


@dataclass
class Item:
    """One file of the source and where it goes."""

    rel: str  # its path under the folder and under the prefix, '/'-separated
    path: Path  # the local file
    key: str  # the artifact
    size: int  # the source's size
    sha256: str | None = None  # the source's digest, when the source is the store


@dataclass
class LocalTree:
    """What a local folder holds, from one walk."""

    files: dict[str, int]  # rel -> size of every regular file (symlinks to files included)
    others: dict[str, str]  # rel -> why it is no file we can send (special files, dead links)
    dirs: list[str]  # rel of every folder below the root
    parts: dict[str, list[Path]]  # rel of a file -> its partial downloads


def scan(root: Path) -> tuple[LocalTree, list[tuple[str, str]]]:
    """Walk ``root`` (not following links to folders); the tree and the folders it could not
    list, as failures."""
    tree = LocalTree({}, {}, [], {})
    failures: list[tuple[str, str]] = []
    stack = [("", root)]
    while stack:
        rel_dir, folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            failures.append((rel_dir or ".", f"cannot list the folder: {exc.strerror}"))
            continue
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                if e.is_dir(follow_symlinks=False):
                    tree.dirs.append(rel)
                    stack.append((rel, Path(e.path)))
                elif e.is_file(follow_symlinks=True):
                    tree.files[rel] = e.stat(follow_symlinks=True).st_size
                    target = part_target(e.name)
                    if target is not None:
                        target_rel = f"{rel_dir}/{target}" if rel_dir else target
                        tree.parts.setdefault(target_rel, []).append(Path(e.path))
                elif e.is_symlink():
                    tree.others[rel] = "a symbolic link to a folder or to nothing (not followed)"
                else:
                    tree.others[rel] = "not a regular file"
            except OSError as exc:
                tree.others[rel] = f"cannot read it: {exc.strerror}"
    return tree, failures


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def shown(rel: str) -> str:
    """A local relative path as text that prints (undecodable bytes as \\x escapes)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def normal_prefix(prefix: str) -> str:
    """The prefix without trailing '/', checked against the key rules ('' is the whole store)."""
    prefix = prefix.rstrip("/")
    if prefix:
        try:
            validate_key(prefix)
        except InvalidKey as exc:
            raise CommandError(f"prefix {prefix!r}: {exc}") from None
    return prefix


def under(prefix: str) -> str:
    """The listing prefix of the keys below ``prefix`` (not ``prefix2/...``)."""
    return f"{prefix}/" if prefix else ""


# --- the progress display ------------------------------------------------------------------


class Display:
    """One progress display for the whole transfer: files done of all, bytes, rate, time left.

    On a terminal it is a rich progress bar; otherwise a plain line every PLAIN_EVERY seconds,
    so a log shows that a long transfer is alive and a short one prints nothing. The byte total
    counts only bytes this run has to move: skipped files, the part a resumed file already had
    and the rest of a failed file are taken off it as they become known.
    """

    def __init__(self, what: str, files: int, total: int) -> None:
        self.console = Console(stderr=True)
        self.lock = threading.Lock()
        self.files_total, self.files_done = files, 0
        self.total, self.moved = total, 0
        self.started = self.last_line = time.monotonic()
        self.progress: Progress | None = None
        if self.console.is_terminal:
            self.progress = Progress(TextColumn(what), TextColumn("{task.fields[files]}"),
                                     *byte_columns(), console=self.console)
            self.task = self.progress.add_task(what, total=total, files=self._files())
            self.progress.start()

    def _files(self) -> str:
        return f"{self.files_done}/{self.files_total} files"

    def advance(self, n: int) -> None:
        with self.lock:
            self.moved += n
            self._show()

    def drop(self, n: int) -> None:
        """Take ``n`` bytes off the total: they will not move in this run."""
        with self.lock:
            self.total -= n
            self._show()

    def file_done(self) -> None:
        with self.lock:
            self.files_done += 1
            self._show()

    def note(self, message: str) -> None:
        self.console.print(f"artifactfs: {message}", markup=False, highlight=False,
                           soft_wrap=True)

    def _show(self) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=self.moved, total=self.total,
                                 files=self._files())
            return
        now = time.monotonic()
        if now - self.last_line < PLAIN_EVERY:
            return
        self.last_line = now
        rate = self.moved / (now - self.started)
        left = f", {round((self.total - self.moved) / rate)} s left" if rate > 0 else ""
        print(f"artifactfs: {self._files()}, {decimal(self.moved)} of {decimal(self.total)},"
              f" {decimal(int(rate))}/s{left}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class Stopped(Exception):
    """The transfer is stopping (the daemon is gone, or the user pressed Ctrl-C)."""


class FileShare:
    """One file's part of the Display, handed to put_file/get_file as their progress bar."""

    def __init__(self, display: Display, size: int, stop: threading.Event) -> None:
        self.display, self.size, self.stop = display, size, stop
        self.accounted = 0  # bytes moved or taken off the total so far

    def __call__(self, description: str, total: int | None, done: int) -> FileShare:
        # A resumed file: the bytes it already has are not part of this run.
        self.display.drop(done)
        self.accounted += done
        return self

    def advance(self, n: int) -> None:
        if self.stop.is_set():
            raise Stopped
        self.accounted += n
        self.display.advance(n)

    def finish(self) -> None:
        self.display.drop(self.size - self.accounted)
        self.display.file_done()

    def __enter__(self) -> FileShare:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# --- running a transfer --------------------------------------------------------------------


@dataclass
class Result:
    item: Item
    outcome: Outcome
    why: str = ""


def run_all(items: list[Item], work: Callable[[Item, FileShare], Outcome], display: Display,
            jobs: int, url: str) -> tuple[list[Result], str | None]:
    """Run ``work`` on every item, ``jobs`` at a time; the results and why the run stopped
    early (None when it did not)."""
    stop = threading.Event()
    stopped_why: list[str] = []

    def one(item: Item) -> Result:
        if stop.is_set():
            return Result(item, Outcome.NOT_RUN)
        share = FileShare(display, item.size, stop)
        try:
            return Result(item, work(item, share))
        except Stopped:
            return Result(item, Outcome.NOT_RUN, "stopped")
        except httpx.TransportError as exc:
            if not stop.is_set():
                stopped_why.append(f"lost the daemon at {url} ({exc or type(exc).__name__})")
                stop.set()
            return Result(item, Outcome.FAILED, f"lost the daemon: {exc or type(exc).__name__}")
        except (CommandError, httpx.HTTPError, OSError) as exc:
            return Result(item, Outcome.FAILED, str(exc) or type(exc).__name__)
        finally:
            share.finish()

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="transfer")
    try:
        results = list(pool.map(one, items))
    except KeyboardInterrupt:
        # The running files stop at their next block; the rest never start. What arrived
        # stays resumable.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        display.close()
        raise
    pool.shutdown()
    return results, (stopped_why[0] if stopped_why else None)


@dataclass
class Plan:
    """A folder transfer worked out before any byte moves."""

    verb: str  # "put" or "get": the command each item is
    items: list[Item]
    failures: list[tuple[str, str]]  # (what, why) found while planning: nothing to run
    extra: list[str]  # what the destination holds that the source lacks (keys, or local rels)


def finish(args: argparse.Namespace, plan: Plan, results: list[Result],
           stopped: str | None, delete: Callable[[list[str]], list[tuple[str, str]]] | None,
           moved: int, started: float) -> None:
    """Print what was done (or, with --dry-run, would be); delete the extras when asked and
    every copy succeeded; raise CommandError when anything failed. ``moved``: the bytes this
    run sent or received."""
    dry = args.dry_run
    failures = list(plan.failures) + [(shown(r.item.rel), r.why) for r in results
                                       if r.outcome is Outcome.FAILED]
    count = {o: 0 for o in Outcome}
    for r in results:
        count[r.outcome] += 1
        if r.outcome is Outcome.WOULD:
            moved += r.item.size
    if dry:
        for r in sorted(results, key=lambda r: r.item.rel):
            if r.outcome is Outcome.WOULD:
                src, dst = ((r.item.path, r.item.key) if plan.verb == "put"
                            else (r.item.key, r.item.path))
                print(f"{plan.verb} {shown(str(src))} {shown(str(dst))}")
    deleted = 0
    delete_note = ""
    if delete is not None and plan.extra:
        if failures or stopped:
            delete_note = f"; nothing deleted ({len(plan.extra)} to delete) since copies failed"
        elif dry:
            for what in plan.extra:
                print(f"delete {shown(what)}")
            deleted = len(plan.extra)
        else:
            delete_failures = delete(plan.extra)
            failures += delete_failures
            deleted = len(plan.extra) - len(delete_failures)
    total = len(results) + len(plan.failures)
    parts = [f"{count[Outcome.WOULD]} to {plan.verb}" if dry else
             f"{count[Outcome.SENT]} {'sent' if plan.verb == 'put' else 'received'}",
             f"{count[Outcome.SKIPPED]} unchanged", f"{len(failures)} failed"]
    if count[Outcome.NOT_RUN]:
        parts.append(f"{count[Outcome.NOT_RUN]} not started")
    if delete is not None:
        parts.append(f"{deleted} {'to delete' if dry else 'deleted'}")
    elapsed = time.monotonic() - started
    print(f"{'dry run: ' if dry else ''}{total} files: {', '.join(parts)};"
          f" {decimal(moved)} {'to move' if dry else 'moved'} in {elapsed:.1f} s"
          f"{delete_note}", flush=True)
    for what, why in failures:
        print(f"artifactfs: failed: {what}: {why}", file=sys.stderr)
    if stopped:
        raise CommandError(f"stopped: {stopped}; run the same command again to continue")
    if failures:
        raise CommandError(f"{len(failures)} of {total} files failed (listed above)")


def transfer(args: argparse.Namespace, plan: Plan,
             work: Callable[[Item, FileShare], Outcome],
             delete: Callable[[list[str]], list[tuple[str, str]]] | None) -> None:
    started = time.monotonic()
    jobs = args.jobs
    if jobs < 1:
        raise CommandError(f"-j {jobs}: at least one job")
    display = Display(plan.verb, len(plan.items), sum(i.size for i in plan.items))
    try:
        results, stopped = run_all(plan.items, work, display, jobs, args.url)
    finally:
        display.close()
    finish(args, plan, results, stopped, delete, display.moved, started)


# --- put -r: a folder into the store -------------------------------------------------------


def put_folder(http: httpx.Client, args: argparse.Namespace, *, delete: bool = False) -> None:
    root = Path(args.file)
    if not root.is_dir():
        raise CommandError(f"{args.file} is not a folder")
    prefix = normal_prefix(args.key)
    tree, failures = scan(root)
    failures += [(shown(rel), why) for rel, why in sorted(tree.others.items())]
    items: list[Item] = []
    for rel, size in sorted(tree.files.items()):
        key = f"{under(prefix)}{rel}"
        try:
            validate_key(key)
        except InvalidKey as exc:
            failures.append((shown(rel), f"no key can hold this name: {exc}"))
            continue
        items.append(Item(rel, root / rel, key, size))
    remote = {a["key"]: a for a in all_artifacts(http, under(prefix))}
    wanted = {i.key for i in items}
    plan = Plan("put", items, failures, sorted(k for k in remote if k not in wanted))

    def work(item: Item, share: FileShare) -> Outcome:
        there = remote.get(item.key)
        if (there is not None and there["size"] == item.size and there.get("sha256")
                and there["sha256"] == sha256_of(item.path)):
            # An earlier run may have sent it all and died before it heard so.
            path = item.path.resolve()
            upload_state_file(path, path.stat(), item.key, args.url).unlink(missing_ok=True)
            return Outcome.SKIPPED
        if args.dry_run:
            return Outcome.WOULD
        put_file(http, item.path, item.key, args.url, mime_type=args.mime_type, bar=share,
                 note=share.display.note)
        return Outcome.SENT

    def delete_extra(keys: list[str]) -> list[tuple[str, str]]:
        failed: list[tuple[str, str]] = []
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i:i + DELETE_BATCH]
            try:
                delete_keys(http, batch)
            except CommandError as exc:
                failed += [(k, f"not deleted: {exc}") for k in batch]
        return failed

    transfer(args, plan, work, delete_extra if delete else None)


# --- get -r: a prefix into a folder --------------------------------------------------------


def get_folder(http: httpx.Client, args: argparse.Namespace, *, delete: bool = False) -> None:
    prefix = normal_prefix(args.key)
    if args.file is None and not prefix:
        raise CommandError("get -r of the whole store needs a destination folder")
    root = Path(args.file if args.file is not None else prefix.rpartition("/")[2])
    if root.exists() and not root.is_dir():
        raise CommandError(f"{root} exists and is not a folder")
    listing = list(all_artifacts(http, under(prefix)))
    if not listing:
        raise CommandError(f"no artifacts under {under(prefix) or 'the store'!r}")
    items: list[Item] = []
    failures: list[tuple[str, str]] = []
    for a in listing:
        rel = a["key"][len(under(prefix)):]
        if any(part in ("", ".", "..") for part in rel.split("/")):
            failures.append((a["key"], "not a path this client writes"))  # the daemon forbids it
            continue
        items.append(Item(rel, root / rel, a["key"], int(a["size"]), a.get("sha256")))
    tree, scan_failures = scan(root) if root.is_dir() else (LocalTree({}, {}, [], {}), [])
    failures += scan_failures
    wanted = {i.rel for i in items}
    needed_dirs = {i.rel.rsplit("/", n)[0] for i in items for n in range(1, i.rel.count("/") + 1)}
    extra = sorted(rel for rel in [*tree.files, *tree.others] if rel not in wanted)
    # Folders emptied by the deletes go too, deepest first.
    extra += sorted((f"{d}/" for d in tree.dirs if d not in needed_dirs),
                    key=lambda d: -d.count("/"))
    plan = Plan("get", items, failures, extra)

    def work(item: Item, share: FileShare) -> Outcome:
        if (tree.files.get(item.rel) == item.size and item.sha256
                and os.path.isfile(item.path) and sha256_of(item.path) == item.sha256):
            return Outcome.SKIPPED
        if item.path.is_dir():
            raise CommandError(f"a folder is in the way of {item.key}")
        if args.dry_run:
            return Outcome.WOULD
        item.path.parent.mkdir(parents=True, exist_ok=True)
        get_file(http, item.key, item.path, bar=share, note=share.display.note,
                 parts=tree.parts.get(item.rel, []))
        return Outcome.SENT

    def delete_extra(rels: list[str]) -> list[tuple[str, str]]:
        failed: list[tuple[str, str]] = []
        for rel in rels:
            try:
                if rel.endswith("/"):
                    os.rmdir(root / rel)
                else:
                    os.unlink(root / rel)
            except FileNotFoundError:
                pass  # a partial download its file's get has used up meanwhile
            except OSError as exc:
                failed.append((shown(rel), f"not deleted: {exc.strerror}"))
        return failed

    transfer(args, plan, work, delete_extra if delete else None)


# --- sync ----------------------------------------------------------------------------------


def sync(http: httpx.Client, args: argparse.Namespace) -> None:
    """``sync SRC DST``: one side a local folder, the other a prefix of the store.

    ``:PREFIX`` always names the store. Otherwise a SRC that is an existing folder is uploaded
    to the prefix DST, and any other SRC is a prefix downloaded into the folder DST. Both sides
    existing folders is ambiguous and refused.
    """
    src, dst = args.src, args.dst
    store_src, store_dst = src.startswith(":"), dst.startswith(":")
    if store_src and store_dst:
        raise CommandError("both SRC and DST name the store; one side must be a local folder")
    if not store_src and not store_dst and Path(src).is_dir() and Path(dst).is_dir():
        raise CommandError(f"{src} and {dst} are both local folders; write the store's side"
                           " as :PREFIX")
    upload = store_dst or (not store_src and Path(src).is_dir())
    one = argparse.Namespace(**vars(args))
    one.mime_type = None
    if upload:
        one.file, one.key = src, dst.removeprefix(":")
        put_folder(http, one, delete=args.delete)
    else:
        one.key, one.file = src.removeprefix(":"), dst
        get_folder(http, one, delete=args.delete)

