"""``artifactfs://`` for fsspec: pandas, pyarrow, dask and friends read and write the store over
the Artifacts HTTP API (docs/HTTP.md, docs/FSSPEC.md).

A path is a key (``artifactfs://datasets/v1/train.parquet`` is the key
``datasets/v1/train.parquet``); the daemon is named by the ``base_url`` option, not by the URL,
so that pandas' ``storage_options`` can carry it. Directories are what the keys imply: a key
``a/b/c`` makes ``a`` and ``a/b`` directories, and a directory with no key under it does not
exist here (the HTTP API lists artifacts, not the mount's empty directories), which is the
object-store behaviour fsspec's users expect.

Reads are ranged GETs of ``{key}:content`` pinned to the version that was opened (``If-Range``
with its sha256): a file that is replaced while it is read fails the read instead of mixing two
versions. Writes go through an upload session, which needs the size up front, so ``open(..,
"wb")`` spools the bytes (memory, then a temporary file) and uploads them at ``close`` in
resumable chunks; the artifact appears whole, or not at all, when the last byte arrives.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO, NoReturn
from urllib.parse import quote

import httpx
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from .client import PAGE, PUT_CHUNK, FileDigest, key_path
from .models import mime_type_for_name

DEFAULT_URL = "http://127.0.0.1:8321"
BULK_DELETE_BATCH = 1000  # keys per bulk delete: well under the 16 MiB JSON body cap
UPLOAD_RETRIES = 5  # lost connections survived by one upload before it gives up
BUSY_RETRIES = 20  # 409 "in flight": the daemon has not yet seen a dropped request end
RETRY_WAIT = 0.5
SPOOL_IN_MEMORY = 32 << 20  # a written file larger than this spools to a temporary file


class ArtifactFileSystem(AbstractFileSystem):
    """The artifact store of a running ``artifactfs`` daemon, through its HTTP API.

    ``base_url`` defaults to ``$ARTIFACTFS_URL`` (else http://127.0.0.1:8321) and ``token`` to
    ``$ARTIFACTFS_TOKEN``; the names are those pandas' ``storage_options`` pass through.
    """

    protocol = "artifactfs"
    root_marker = ""
    cachable = True

    def __init__(self, base_url: str | None = None, token: str | None = None,
                 timeout: float = 120.0, **storage_options: Any) -> None:
        super().__init__(base_url=base_url, token=token, timeout=timeout, **storage_options)
        self.base_url = (base_url or os.environ.get("ARTIFACTFS_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("ARTIFACTFS_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers,
                                 timeout=httpx.Timeout(timeout, connect=10.0))
        # fsspec keeps instances for reuse and never closes them: close the connections when
        # this one is collected, or at exit.
        weakref.finalize(self, self.http.close)

    # --- paths -------------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        # Keys never start with '/': artifactfs:///a/b and /a/b both name the key a/b.
        return super()._strip_protocol(path).lstrip("/")

    # --- HTTP --------------------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from exc

    def _artifacts_under(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every artifact whose key starts with ``prefix``, page by page, in key order."""
        start = 0
        while True:
            params: dict[str, Any] = {"start_index": start, "limit": PAGE}
            if prefix:
                params["prefix"] = prefix
            page = _ok(self._request("GET", "/v1/artifacts", params=params), prefix).json()
            yield from page["data"]
            start += len(page["data"])
            if not page["has_more"] or not page["data"]:
                return

    def _any_under(self, prefix: str) -> bool:
        r = self._request("GET", "/v1/artifacts", params={"limit": 1, "prefix": prefix})
        return bool(_ok(r, prefix).json()["data"])

    def _artifact(self, key: str) -> dict[str, Any] | None:
        """The artifact at ``key``, or None when there is none (a directory, or nothing)."""
        r = self._request("GET", key_path(key))
        if r.status_code == 404:
            return None
        body = _ok(r, key).json()
        # GET /v1/artifacts/sessions/X answers a live upload session X, not an artifact.
        return body if isinstance(body, dict) and body.get("key") == key else None

    # --- listing -----------------------------------------------------------------------------

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        key = self._strip_protocol(path)
        if not key:
            return _directory("")
        artifact = self._artifact(key)
        if artifact is not None:
            return _file(artifact)
        if self._any_under(key + "/"):
            return _directory(key)
        raise FileNotFoundError(errno.ENOENT, "no artifact or directory", key)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        key = self._strip_protocol(path)
        prefix = key + "/" if key else ""
        entries: dict[str, dict[str, Any]] = {}
        # The API has no delimiter: a directory's listing reads every key under it.
        for artifact in self._artifacts_under(prefix):
            child, slash, _ = artifact["key"][len(prefix):].partition("/")
            name = prefix + child
            entries[name] = _directory(name) if slash else _file(artifact)
        if not entries and key:
            entries = {key: self.info(key)}  # a file lists as itself; else FileNotFoundError
        listed = [entries[name] for name in sorted(entries)]
        return listed if detail else [e["name"] for e in listed]

    def find(self, path: str, maxdepth: int | None = None, withdirs: bool = False,
             detail: bool = False, **kwargs: Any) -> Any:
        """Every file under ``path`` (and directory, with ``withdirs``) from one prefix
        listing, rather than fsspec's default walk of one listing per directory."""
        if maxdepth is not None and maxdepth < 1:
            raise ValueError("maxdepth must be at least 1")
        key = self._strip_protocol(path)
        prefix = key + "/" if key else ""
        out: dict[str, dict[str, Any]] = {}
        for artifact in self._artifacts_under(prefix):
            parts = artifact["key"][len(prefix):].split("/")
            if withdirs:
                for depth in range(1, len(parts)):
                    if maxdepth is None or depth <= maxdepth:
                        name = prefix + "/".join(parts[:depth])
                        out[name] = _directory(name)
            if maxdepth is None or len(parts) <= maxdepth:
                out[artifact["key"]] = _file(artifact)
        if out and withdirs and key:
            out[key] = _directory(key)  # as fsspec's find: glob wants the root too
        if not out and key:
            artifact = self._artifact(key)
            if artifact is not None:
                out[key] = _file(artifact)
        names = sorted(out)
        return {n: out[n] for n in names} if detail else names

    def checksum(self, path: str) -> int:
        """The content's sha256 as an int: equal checksums mean equal bytes."""
        return int(self.ukey(path), 16)

    def ukey(self, path: str) -> str:
        info = self.info(path)
        if info["type"] != "file":
            raise IsADirectoryError(errno.EISDIR, "a directory has no checksum", info["name"])
        return str(info["sha256"])

    def created(self, path: str) -> datetime:
        return datetime.fromtimestamp(self._file_info(path)["created_at"], tz=UTC)

    def modified(self, path: str) -> datetime:
        # Every write commits a new version: its creation is the file's last modification.
        return self.created(path)

    def _file_info(self, path: str) -> dict[str, Any]:
        info = self.info(path)
        if info["type"] != "file":
            raise IsADirectoryError(errno.EISDIR, "is a directory", info["name"])
        return info

    # --- directories -------------------------------------------------------------------------

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Nothing to do: a directory exists once a key under it does (as in object stores)."""
        key = self._strip_protocol(path)
        if key and self._artifact(key) is not None:
            raise FileExistsError(errno.EEXIST, "a file is there", key)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        key = self._strip_protocol(path)
        if not exist_ok and key and self.exists(key):
            raise FileExistsError(errno.EEXIST, "already exists", key)
        self.mkdir(key)

    def rmdir(self, path: str) -> None:
        """Nothing to remove: a directory goes with the last key under it."""
        key = self._strip_protocol(path)
        if self._any_under(key + "/" if key else ""):
            raise OSError(errno.ENOTEMPTY, "directory not empty", key)

    # --- deleting ----------------------------------------------------------------------------

    def rm_file(self, path: str) -> None:
        key = self._strip_protocol(path)
        _ok(self._request("DELETE", key_path(key)), key)

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Delete files, and with ``recursive`` everything under directories, in bulk
        requests of up to a thousand keys (each all-or-nothing)."""
        keys: list[str] = []
        for name in self.expand_path(path, recursive=False):
            if recursive:
                found = self.find(name, maxdepth=maxdepth, detail=True)
                if not found:
                    raise FileNotFoundError(errno.ENOENT, "no artifact or directory", name)
                keys += [n for n, i in found.items() if i["type"] == "file"]
            elif self.info(name)["type"] == "directory":
                raise IsADirectoryError(errno.EISDIR, "is a directory; rm(..., recursive=True)"
                                        " deletes what is under it", name)
            else:
                keys.append(name)
        keys = list(dict.fromkeys(keys))
        for i in range(0, len(keys), BULK_DELETE_BATCH):
            batch = keys[i:i + BULK_DELETE_BATCH]
            r = self._request("POST", "/v1/artifacts/bulk",
                              json={"artifacts": [{"key": k} for k in batch]})
            _ok(r, batch[0])
        self.invalidate_cache()

    # --- reading -----------------------------------------------------------------------------

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        key = self._strip_protocol(path)
        if start is None and end is None:
            with self._download(key) as r:
                return r.read()
        if (start is not None and start < 0) or (end is not None and end < 0):
            size = self._file_info(key)["size"]
            start = max(0, size + start) if start is not None and start < 0 else start
            end = max(0, size + end) if end is not None and end < 0 else end
        return self._read_range(key, start or 0, end)

    def _read_range(self, key: str, start: int, end: int | None,
                    sha256: str | None = None) -> bytes:
        """Bytes [start, end) of ``key``; with ``sha256``, only of that version."""
        if end is not None and end <= start:
            return b""
        headers = {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
        if sha256:
            headers["If-Range"] = f'"{sha256}"'
        with self._download(key, headers) as r:
            if r.status_code == 416:
                return b""  # the range starts past the end: a short read, as on a file
            if r.status_code == 206:
                return r.read()
            # 200: the whole artifact, because If-Range did not match (another version).
            if sha256 and r.headers.get("etag") != f'"{sha256}"':
                raise OSError(errno.ESTALE, f"{key} was replaced while it was being read;"
                                            " open it again to read the new version")
            return r.read()[start:end]

    def _download(self, key: str, headers: dict[str, str] | None = None
                  ) -> _Download:
        return _Download(self, key, headers or {})

    def get_file(self, rpath: str, lpath: Any, callback: Callback = DEFAULT_CALLBACK,
                 outfile: IO[bytes] | None = None, **kwargs: Any) -> None:
        """Download to ``lpath`` in one streamed request; the bytes are checked against the
        artifact's sha256 (its ETag), and a mismatch raises after removing ``lpath``."""
        key = self._strip_protocol(rpath)
        if outfile is None and not isinstance(lpath, str | os.PathLike):
            outfile = lpath
        with contextlib.ExitStack() as stack:
            try:
                r = stack.enter_context(self._download(key))
            except FileNotFoundError:
                if outfile is None and self.isdir(key):
                    os.makedirs(lpath, exist_ok=True)  # a directory: fsspec's get makes it
                    return
                raise
            if outfile is None:
                os.makedirs(os.path.dirname(os.path.abspath(lpath)), exist_ok=True)
            callback.set_size(int(r.headers.get("content-length", 0)) or None)
            etag = r.headers.get("etag", "")
            out = outfile if outfile is not None else open(lpath, "wb")  # noqa: SIM115
            sha = hashlib.sha256()
            try:
                for chunk in r.iter_bytes(1 << 20):
                    out.write(chunk)
                    sha.update(chunk)
                    callback.relative_update(len(chunk))
            finally:
                if outfile is None:
                    out.close()
        if etag and etag != f'"{sha.hexdigest()}"':
            if outfile is None:
                os.unlink(lpath)
            raise OSError(errno.EIO, f"the bytes received for {key} do not match its sha256"
                                     f" {etag}", os.fspath(lpath))

    # --- writing -----------------------------------------------------------------------------

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite",
                  mime_type: str | None = None, **kwargs: Any) -> None:
        key = self._strip_protocol(path)
        if mode == "create":
            self._refuse_existing(key)
        self.upload(key, io.BytesIO(value), len(value), mime_type)

    def put_file(self, lpath: Any, rpath: str, callback: Callback = DEFAULT_CALLBACK,
                 mode: str = "overwrite", mime_type: str | None = None,
                 **kwargs: Any) -> None:
        """Upload a local file straight from disk (its size is known: no spooling)."""
        key = self._strip_protocol(rpath)
        if os.path.isdir(lpath):
            return  # directories exist through the keys put under them
        if mode == "create":
            self._refuse_existing(key)
        if mime_type is None:
            mime_type = mime_type_for_name(key.rpartition("/")[2])
            if mime_type == "application/octet-stream":
                mime_type = mime_type_for_name(os.path.basename(lpath))
        with open(lpath, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            callback.set_size(size)
            self.upload(key, f, size, mime_type, callback)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copy through this client (the API has no server-side copy), keeping the mime type."""
        info = self.info(path1)
        if info["type"] == "directory":
            return  # a directory comes with the keys copied under it
        with (self.open(path1, "rb", details=info) as src,
              self.open(path2, "wb", mime_type=info["mime_type"]) as dst):
            shutil.copyfileobj(src, dst, PUT_CHUNK)

    def _refuse_existing(self, key: str) -> None:
        # Checked, then written: another writer in between wins silently (the API has no
        # create-only upload).
        if self.exists(key):
            raise FileExistsError(errno.EEXIST, "already exists", key)

    def upload(self, key: str, f: BinaryIO, size: int, mime_type: str | None = None,
               callback: Callback = DEFAULT_CALLBACK) -> dict[str, Any]:
        """Upload ``size`` bytes of ``f`` (seekable) as ``key``; the committed artifact.

        Chunks carry ``Upload-Offset``; after a lost connection the session is asked for its
        offset and the rest is sent from there, never a byte twice. The artifact's sha256 is
        compared with the bytes read from ``f``.
        """
        mime_type = mime_type or mime_type_for_name(key.rpartition("/")[2])
        r = self._request("POST", "/v1/artifacts",
                          json={"key": key, "mime_type": mime_type, "size": size})
        session = _ok(r, key).json()
        # The session's path under our base_url, not its uri: behind a proxy or on a wildcard
        # bind, the daemon's idea of its own address may not be the one that reaches it.
        uri = f"/v1/artifacts/sessions/{quote(str(session['id']), safe='')}"
        digest = FileDigest(f)
        offset = 0
        lost = busy = 0
        resync = False
        while True:
            if resync:
                try:
                    where = self._session_offset(uri, key, digest, size)
                except ConnectionError:
                    lost += 1
                    if lost > UPLOAD_RETRIES:
                        raise
                    time.sleep(RETRY_WAIT * lost)
                    continue
                if isinstance(where, dict):
                    return where  # the lost answer was the commit
                callback.relative_update(where - offset)
                offset, resync = where, False
            f.seek(offset)
            chunk = f.read(min(PUT_CHUNK, size - offset))
            try:
                r = self.http.post(uri, content=chunk, headers={
                    "Upload-Offset": str(offset), "Content-Type": "application/octet-stream"})
            except httpx.TransportError as exc:
                # Some, all or none of the chunk arrived: the session's offset will say.
                lost += 1
                if lost > UPLOAD_RETRIES:
                    raise _unreachable(self.base_url, exc) from exc
                time.sleep(RETRY_WAIT * lost)
                resync = True
                continue
            true_offset = _error_body(r).get("offset") if r.status_code == 409 else None
            if isinstance(true_offset, int) and true_offset != offset:
                callback.relative_update(true_offset - offset)
                offset = true_offset  # bytes we thought lost did arrive: never resend them
                continue
            if isinstance(true_offset, int) and busy < BUSY_RETRIES:
                busy += 1  # a dropped request of ours is still finishing on the daemon
                time.sleep(RETRY_WAIT)
                continue
            body = _ok(r, key).json()
            digest.add(offset, chunk)
            offset += len(chunk)
            callback.relative_update(len(chunk))
            if body is not None:
                return _verified(body, digest.finish(size), key)
            if offset >= size:
                raise OSError(errno.EIO, "the daemon did not commit after the last byte", key)

    def _session_offset(self, uri: str, key: str, digest: FileDigest,
                        size: int) -> int | dict[str, Any]:
        """Where a session stands after a lost connection: its offset, or the artifact it
        committed when the lost request carried the last byte."""
        r = self._request("GET", uri)
        body = r.json() if r.status_code == 200 else None
        if isinstance(body, dict) and "offset" in body and "key" not in body:
            return int(body["offset"])
        # The session is gone: it committed if the key now holds exactly our bytes.
        artifact = self._artifact(key)
        sha = digest.finish(size)
        if artifact is not None and artifact.get("sha256") == sha:
            return artifact
        raise OSError(errno.EIO, "the upload session ended without committing the bytes"
                                 " sent; nothing was stored", key)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None,
              autocommit: bool = True, cache_options: dict[str, Any] | None = None,
              **kwargs: Any) -> ArtifactFile:
        key = self._strip_protocol(path)
        if mode == "ab":
            raise NotImplementedError("artifactfs cannot append: an artifact is written whole")
        if mode == "xb":
            self._refuse_existing(key)
        if mode == "rb" and kwargs.get("details") is None:
            kwargs["details"] = self._file_info(key)
        return ArtifactFile(self, key, mode, block_size, autocommit,
                            cache_options=cache_options, **kwargs)


class ArtifactFile(AbstractBufferedFile):
    """One artifact opened through fsspec: ranged reads of the version opened, or a write
    spooled until ``close`` (or the transaction's commit) uploads it."""

    fs: ArtifactFileSystem

    def __init__(self, fs: ArtifactFileSystem, path: str, mode: str = "rb",
                 block_size: Any = None, autocommit: bool = True,
                 cache_options: dict[str, Any] | None = None,
                 details: dict[str, Any] | None = None, mime_type: str | None = None,
                 **kwargs: Any) -> None:
        if details is not None:
            self._details = details
            kwargs["size"] = details["size"]
        self.mime_type = mime_type
        self.spool: tempfile.SpooledTemporaryFile[bytes] | None = None
        super().__init__(fs, path, mode, block_size, autocommit,
                         cache_options=cache_options, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs._read_range(self.path, start, min(end, self.size),
                                   sha256=self.details["sha256"])

    def _initiate_upload(self) -> None:
        # Closed by discard(), after the upload or when a transaction drops the file.
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115

    def _upload_chunk(self, final: bool = False) -> bool:
        assert self.spool is not None
        self.buffer.seek(0)
        shutil.copyfileobj(self.buffer, self.spool)
        if final and self.autocommit:
            self.commit()
        return True

    def commit(self) -> None:
        """Upload what was written; the artifact appears when its last byte arrives."""
        if self.spool is None:
            self._initiate_upload()
        assert self.spool is not None
        try:
            size = self.spool.tell()
            self.fs.upload(self.path, self.spool, size, self.mime_type)  # type: ignore[arg-type]
        finally:
            self.discard()

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class _Download:
    """A streamed ``GET {key}:content``: the response, or the error the status means."""

    def __init__(self, fs: ArtifactFileSystem, key: str, headers: dict[str, str]) -> None:
        self.fs, self.key, self.headers = fs, key, headers
        self.stream: Any = None

    def __enter__(self) -> httpx.Response:
        self.stream = self.fs.http.stream("GET", key_path(self.key) + ":content",
                                          headers=self.headers)
        try:
            r: httpx.Response = self.stream.__enter__()
        except httpx.TransportError as exc:
            raise _unreachable(self.fs.base_url, exc) from exc
        if r.status_code >= 400 and r.status_code != 416:
            r.read()
            self.stream.__exit__(None, None, None)
            _raise(r, self.key)
        return r

    def __exit__(self, *exc: object) -> None:
        self.stream.__exit__(*exc)


# --- answers -------------------------------------------------------------------------------


def _file(artifact: dict[str, Any]) -> dict[str, Any]:
    return {"name": artifact["key"], "size": artifact["size"], "type": "file",
            "sha256": artifact.get("sha256"), "mime_type": artifact["mime_type"],
            "created_at": artifact["created_at"]}


def _directory(name: str) -> dict[str, Any]:
    return {"name": name, "size": 0, "type": "directory"}


def _verified(artifact: dict[str, Any], sha: str, key: str) -> dict[str, Any]:
    if artifact.get("sha256") and artifact["sha256"] != sha:
        raise OSError(errno.EIO, f"the daemon stored sha256 {artifact['sha256']} but the bytes"
                                 f" sent have {sha}: did the source change during the upload?",
                      key)
    return artifact


def _error_body(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _ok(r: httpx.Response, what: str) -> httpx.Response:
    if r.status_code >= 400:
        _raise(r, what)
    return r


# The daemon's status, as the OSError Python code expects for it (DESIGN §5's table, reversed).
_ERRNO_BY_STATUS = {400: errno.EINVAL, 401: errno.EACCES, 403: errno.EACCES, 404: errno.ENOENT,
                    409: errno.EEXIST, 413: errno.EFBIG, 416: errno.EINVAL, 507: errno.ENOSPC}


def _raise(r: httpx.Response, what: str) -> NoReturn:
    detail = str(_error_body(r).get("detail") or r.text.strip() or r.reason_phrase)
    code = _ERRNO_BY_STATUS.get(r.status_code, errno.EIO)
    message = f"{detail} (HTTP {r.status_code})"
    if code == errno.ENOENT:
        raise FileNotFoundError(code, message, what)
    if code == errno.EEXIST:
        raise FileExistsError(code, message, what)
    if code == errno.EACCES:
        raise PermissionError(code, message, what)
    raise OSError(code, message, what)


def _unreachable(base_url: str, exc: Exception) -> ConnectionError:
    return ConnectionError(f"cannot reach the artifactfs daemon at {base_url} ({exc}); start"
                           " it with 'artifactfs serve' or pass base_url")
