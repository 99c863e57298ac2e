"""The command line's HTTP client: ``artifactfs put | get | ls | info | rm`` against a daemon.

Every command is one or a few calls of the Artifacts API (docs/HTTP.md); the daemon decides
every rule and this module only shows its answers. ``put`` is resumable: it remembers the
upload session in a small state file keyed by (absolute path, size, mtime, key, url), so running
the same command again after an interruption asks the session for its offset and sends only
the rest. Transfers show a progress bar (rich) on a terminal once they take longer than a
moment; when stderr is not a terminal nothing but results and errors are printed.

``put -r``, ``get -r`` and ``sync`` (folders) live in artifactfs.transfer, on top of this
module's single-file ``put_file`` and ``get_file``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from .cli import DEFAULT_JOBS
from .models import mime_type_for_name

log = logging.getLogger("artifactfs.client")

PUT_CHUNK = 8 << 20  # one request per 8 MiB: a lost connection costs at most one chunk's resend
GET_CHUNK = 1 << 20
PAGE = 1000
PROGRESS_DELAY = 0.5
BUSY_RETRIES = 20
BUSY_WAIT = 0.5  # seconds before a bar appears: short transfers stay silent


class CommandError(Exception):
    """What went wrong, in words for the user; the command exits 1."""


def run_command(args: argparse.Namespace) -> int:
    """Run put, get, ls, info or rm as parsed by artifactfs.cli; the exit status."""
    commands = {"put": put, "get": get, "ls": ls, "info": info, "rm": rm, "sync": sync}
    if not getattr(args, "verbose", False):
        # httpx logs every request at INFO; a command's output is its result, not its traffic.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    timeout = httpx.Timeout(120.0, connect=10.0)
    try:
        # A folder transfer runs -j files at once: keep a connection alive for each.
        limits = httpx.Limits(max_keepalive_connections=max(20, getattr(args, "jobs", 1)))
        with httpx.Client(base_url=args.url.rstrip("/"), headers=headers,
                          timeout=timeout, limits=limits) as http:
            commands[args.command](http, args)
        return 0
    except CommandError as exc:
        print(f"artifactfs: {exc}", file=sys.stderr)
        return 1
    except httpx.ConnectError as exc:
        print(f"artifactfs: cannot reach the daemon at {args.url} ({exc}); start it with"
              " 'artifactfs serve' or 'artifactfs mount --http', or pass --url",
              file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"artifactfs: HTTP error talking to {args.url}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = "; run the same command again to continue" if (
            args.command == "put" or getattr(args, "recursive", False)
            or args.command == "sync") else ""
        print(f"artifactfs: interrupted{hint}", file=sys.stderr)
        return 130


# --- helpers -------------------------------------------------------------------------------


def key_path(key: str) -> str:
    """``key`` as a URL path under /v1/artifacts, every byte of it reaching the server.

    HTTP clients drop ``.`` and ``..`` path segments (RFC 3986 normalisation), which would
    silently name another key; percent-encoding them lets the server see, and refuse, the key
    as typed.
    """
    parts = [quote(p, safe="") if p not in (".", "..") else p.replace(".", "%2E")
             for p in key.split("/")]
    return "/v1/artifacts/" + "/".join(parts)


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text.strip() or r.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return json.dumps(body)


def _check(r: httpx.Response) -> httpx.Response:
    if r.status_code >= 400:
        raise CommandError(f"{_detail(r)} (HTTP {r.status_code})")
    return r


class Bar(Protocol):
    """The progress display of one file's transfer: told each block that moved."""

    def advance(self, n: int) -> None: ...

    def __enter__(self) -> Bar: ...

    def __exit__(self, *exc: object) -> None: ...


# (description, total bytes or None, bytes already there) -> the file's Bar
BarFactory = Callable[[str, "int | None", int], Bar]


def byte_columns() -> tuple[ProgressColumn, ...]:
    """A transfer's progress after its label: the bar, bytes, rate and time left."""
    return (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())


class Transfer:
    """A progress bar that appears only if the transfer is still running after a moment."""

    def __init__(self, description: str, total: int | None, done: int = 0) -> None:
        self.console = Console(stderr=True)
        self.enabled = self.console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), *byte_columns(),
                                 console=self.console, transient=False)
        self.task = self.progress.add_task(description, total=total, completed=done)
        self.started_at = time.monotonic()
        self.shown = False

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)
        if (self.enabled and not self.shown
                and time.monotonic() - self.started_at >= PROGRESS_DELAY):
            self.progress.start()
            self.shown = True

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shown:
            self.progress.stop()


# --- put -----------------------------------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "artifactfs" / "uploads"


def upload_state_file(path: Path, st: os.stat_result, key: str, url: str) -> Path:
    """Where put remembers the session of ``path`` (absolute) going to ``key`` at ``url``."""
    # A changed file (size or mtime) or another target is another upload: a fresh session.
    ident = json.dumps([str(path), st.st_size, st.st_mtime_ns, key, url.rstrip("/")])
    return _cache_dir() / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".json")


def _resumable_session(http: httpx.Client, state: Path, size: int) -> dict[str, Any] | None:
    """The session a previous run of this same put left, if the daemon still has it."""
    try:
        saved = json.loads(state.read_text())
        session_id = saved["id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    r = http.get(f"/v1/artifacts/sessions/{quote(str(session_id), safe='')}")
    if r.status_code == 404:
        log.info("upload session %s is gone; starting over", session_id)
        return None
    body = _check(r).json()
    # The route answers with an artifact when no such session lives (key sessions/<id>).
    if body.get("id") != session_id or body.get("size") != size:
        return None
    return dict(body)


def _single_file_only(args: argparse.Namespace) -> None:
    if args.dry_run or args.jobs != DEFAULT_JOBS:
        raise CommandError(f"-j and --dry-run go with '{args.command} -r' (folders)")


def sync(http: httpx.Client, args: argparse.Namespace) -> None:
    from . import transfer

    transfer.sync(http, args)


def put(http: httpx.Client, args: argparse.Namespace) -> None:
    if args.recursive:
        from . import transfer

        transfer.put_folder(http, args)
        return
    _single_file_only(args)
    if Path(args.file).is_dir():
        raise CommandError(f"{args.file} is a directory; 'put -r DIR PREFIX' uploads a folder")
    artifact = put_file(http, Path(args.file), args.key, args.url, mime_type=args.mime_type)
    print(f"{artifact['key']}\t{artifact['size']}\t{artifact.get('sha256') or ''}")


def _say(message: str) -> None:
    print(f"artifactfs: {message}", file=sys.stderr)


def put_file(http: httpx.Client, file: Path, key: str, url: str, *,
             mime_type: str | None = None, bar: BarFactory | None = None,
             note: Callable[[str], None] = _say) -> dict[str, Any]:
    """Upload ``file`` as ``key``, resuming the session an interrupted run left; the artifact.

    ``bar`` makes the progress display (default: a bar of this file alone); ``note`` tells the
    user about a resumed upload.
    """
    path = file.resolve()
    try:
        st = path.stat()
        f: BinaryIO = path.open("rb")
    except OSError as exc:
        raise CommandError(f"cannot read {file}: {exc.strerror}") from None
    mime = mime_type or mime_type_for_name(key.rpartition("/")[2])
    if mime == "application/octet-stream" and not mime_type:
        mime = mime_type_for_name(path.name)
    state = upload_state_file(path, st, key, url)
    with f:
        session = _resumable_session(http, state, st.st_size)
        if session is None:
            session = _check(http.post("/v1/artifacts", json={
                "key": key, "mime_type": mime, "size": st.st_size})).json()
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text(json.dumps({"id": session["id"], "file": str(path),
                                         "key": key, "url": url}))
        elif session["offset"]:
            note(f"resuming the upload of {key} at byte {session['offset']} of {st.st_size}")
        digest = FileDigest(f)
        artifact = _send(http, f, session, key, digest, bar or Transfer)
        local_sha = digest.finish(st.st_size)
    state.unlink(missing_ok=True)
    if artifact.get("sha256") and artifact["sha256"] != local_sha:
        raise CommandError(
            f"{key} was stored with sha256 {artifact['sha256']} but {file} has"
            f" {local_sha}: did the file change during the upload? Run put again")
    return artifact


class FileDigest:
    """The sha256 of the file being put, computed from the chunks as they are sent.

    The bytes an earlier, interrupted run sent (before a resumed offset) are read back from the
    file, so the digest always covers the whole file and proves the stored artifact is it.
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.upto = 0

    def add(self, offset: int, chunk: bytes) -> None:
        if offset > self.upto:
            self._read(offset)
        if offset <= self.upto < offset + len(chunk):
            self.sha.update(memoryview(chunk)[self.upto - offset:])
            self.upto = offset + len(chunk)

    def finish(self, size: int) -> str:
        self._read(size)
        return self.sha.hexdigest()

    def _read(self, end: int) -> None:
        self.f.seek(self.upto)
        while self.upto < end:
            block = self.f.read(min(PUT_CHUNK, end - self.upto))
            if not block:
                break
            self.sha.update(block)
            self.upto += len(block)


def _send(http: httpx.Client, f: BinaryIO, session: dict[str, Any], key: str,
          digest: FileDigest, bar_factory: BarFactory) -> dict[str, Any]:
    """Send the file from the session's offset in chunks; the committed artifact."""
    size = int(session["size"])
    offset = int(session["offset"])
    # The session's own path under our --url, not its uri: behind a proxy or on a wildcard
    # bind the daemon's idea of its address may not be the one that reaches it from here.
    uri = f"/v1/artifacts/sessions/{quote(str(session['id']), safe='')}"
    busy = 0
    with bar_factory(f"put {key}", size, offset) as bar:
        while True:
            f.seek(offset)
            chunk = f.read(min(PUT_CHUNK, size - offset))
            r = http.post(uri, content=chunk, headers={"Upload-Offset": str(offset),
                                                       "Content-Type":
                                                       "application/octet-stream"})
            true_offset = _conflict_offset(r)
            if true_offset is not None and true_offset != offset:
                # Bytes we thought lost did arrive: follow the server, never resend them.
                bar.advance(true_offset - offset)
                offset = true_offset
                continue
            if true_offset is not None and busy < BUSY_RETRIES:
                # The daemon is still finishing a request of an interrupted run (it has not
                # yet seen that connection drop): wait for it rather than fail.
                busy += 1
                time.sleep(BUSY_WAIT)
                continue
            body = _check(r).json()
            digest.add(offset, chunk)
            offset += len(chunk)
            bar.advance(len(chunk))
            if body is not None:
                return dict(body)
            if offset >= size:
                raise CommandError(f"the daemon did not commit {key} after its last byte")


def _conflict_offset(r: httpx.Response) -> int | None:
    """The session's true offset when the daemon refused a chunk with 409, else None."""
    if r.status_code != 409:
        return None
    with contextlib.suppress(ValueError, AttributeError):
        offset = r.json().get("offset")
        if isinstance(offset, int):
            return offset
    return None


# --- get -----------------------------------------------------------------------------------


PART_SUFFIX = ".artifactfs-part"


def _part_files(dest: Path) -> list[Path]:
    """Partial downloads of ``dest`` left by an interrupted get: `.NAME.SHA256.artifactfs-part`,
    named by the digest of the version they hold, so a resume asks for that version only."""
    return sorted(dest.parent.glob(f".{glob.escape(dest.name)}.*{PART_SUFFIX}"))


def part_target(name: str) -> str | None:
    """The name of the file a partial download named ``name`` is for, or None if it is none."""
    if not (name.startswith(".") and name.endswith(PART_SUFFIX)):
        return None
    target, dot, digest = name[1:-len(PART_SUFFIX)].rpartition(".")
    return target if dot and target and len(digest) == 64 else None


def _digest_of(etag: str | None) -> str | None:
    """The sha256 the daemon's ETag carries (a quoted hex digest), else None."""
    if etag and len(etag) == 66 and etag[0] == etag[-1] == '"':
        return etag[1:-1]
    return None


def get(http: httpx.Client, args: argparse.Namespace) -> None:
    if args.recursive:
        from . import transfer

        transfer.get_folder(http, args)
        return
    _single_file_only(args)
    target = args.file if args.file is not None else args.key.rpartition("/")[2]
    if target == "-":
        with http.stream("GET", key_path(args.key) + ":content") as r:
            if r.status_code >= 400:
                r.read()
                _check(r)
            total = int(r.headers.get("content-length", 0)) or None
            with Transfer(f"get {args.key}", total) as bar:
                for chunk in r.iter_bytes(GET_CHUNK):
                    sys.stdout.buffer.write(chunk)
                    bar.advance(len(chunk))
            sys.stdout.buffer.flush()
        return
    dest = Path(target)
    if dest.is_dir():
        dest = dest / args.key.rpartition("/")[2]
    get_file(http, args.key, dest)


def get_file(http: httpx.Client, key: str, dest: Path, *, bar: BarFactory | None = None,
             note: Callable[[str], None] = log.info, parts: list[Path] | None = None) -> str:
    """Download ``key`` to the file ``dest``, resumably; the sha256 of what it wrote.

    The bytes go to a partial file beside the target, named by the version's sha256, and
    are renamed over the target only once complete and verified against that digest. An
    interrupted get leaves the partial file; the next get of the same key asks for the rest
    with Range and If-Range, so it continues only if the artifact is still that version
    (else it starts over and removes the stale part). ``parts`` are the partial files of
    ``dest`` when the caller has listed its folder already (else they are looked up).
    """
    bar_factory = bar or Transfer
    parts = _part_files(dest) if parts is None else sorted(parts)
    part = parts[-1] if parts else None
    have = part.stat().st_size if part is not None else 0
    part_digest = part.name[:-len(PART_SUFFIX)].rpartition(".")[2] if part else None
    headers: dict[str, str] = {}
    if part is not None and have > 0:
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{part_digest}"'}
    with http.stream("GET", key_path(key) + ":content", headers=headers) as r:
        if r.status_code == 416 and part_digest is not None:
            # If-Range matched and nothing is left past the part: it holds every byte (the
            # check below says whether they are the right ones).
            r.read()
            digest: str | None = part_digest
            length = 0
        else:
            if r.status_code >= 400:
                r.read()
                _check(r)
            digest = _digest_of(r.headers.get("etag"))
            length = int(r.headers.get("content-length", 0))
        if digest is None:
            raise CommandError(f"{key}: the daemon sent no sha256 ETag; cannot verify")
        resumed = r.status_code in (206, 416)
        if resumed:
            note(f"resuming {key} at byte {have}")
        else:
            have = 0
        for stale in parts:
            if not (resumed and stale == part):
                stale.unlink(missing_ok=True)
        part = dest.parent / f".{dest.name}.{digest}{PART_SUFFIX}"
        hasher = hashlib.sha256()
        with open(part, "ab" if resumed else "wb") as out:
            if resumed:
                with open(part, "rb") as prefix:
                    while block := prefix.read(GET_CHUNK):
                        hasher.update(block)
            with bar_factory(f"get {key}", (have + length) or None, have) as progress:
                for chunk in r.iter_bytes(GET_CHUNK) if r.status_code != 416 else ():
                    out.write(chunk)
                    hasher.update(chunk)
                    progress.advance(len(chunk))
    if hasher.hexdigest() != digest:
        part.unlink(missing_ok=True)
        raise CommandError(f"{key}: the downloaded bytes do not match sha256"
                           f" {digest[:12]}; the partial file was removed, run get again")
    os.replace(part, dest)
    return digest


# --- ls, info, rm --------------------------------------------------------------------------


def all_artifacts(http: httpx.Client, prefix: str) -> Iterator[dict[str, Any]]:
    start = 0
    while True:
        params: dict[str, Any] = {"start_index": start, "limit": PAGE}
        if prefix:
            params["prefix"] = prefix
        page = _check(http.get("/v1/artifacts", params=params)).json()
        yield from page["data"]
        start += len(page["data"])
        if not page["has_more"] or not page["data"]:
            return


def _when(created_at: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created_at))


def ls(http: httpx.Client, args: argparse.Namespace) -> None:
    rows = list(all_artifacts(http, args.prefix))
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    console = Console()
    if console.is_terminal:
        table = Table("size", "created", "mime type", "key", box=None, header_style="bold")
        table.columns[0].justify = "right"
        for a in rows:
            table.add_row(str(a["size"]), _when(a["created_at"]), a["mime_type"], a["key"])
        console.print(table)
        return
    # Not a terminal: plain aligned columns that cut, awk and sort read.
    width = max((len(str(a["size"])) for a in rows), default=1)
    for a in rows:
        print(f"{a['size']:>{width}}  {_when(a['created_at'])}  {a['mime_type']}  {a['key']}")


def info(http: httpx.Client, args: argparse.Namespace) -> None:
    body = _check(http.get(key_path(args.key))).json()
    json.dump(body, sys.stdout, indent=2)
    sys.stdout.write("\n")


def rm(http: httpx.Client, args: argparse.Namespace) -> None:
    delete_keys(http, args.keys)


def delete_keys(http: httpx.Client, keys: list[str]) -> None:
    """Delete every key or, when one cannot go (absent, invalid), none of them."""
    _check(http.post("/v1/artifacts/bulk", json={"artifacts": [{"key": k} for k in keys]}))
