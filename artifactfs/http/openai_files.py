"""The OpenAI Files API (``/v1/files``) over the same artifacts as the Artifacts API.

Every artifact is a file, and every file is an artifact:

- A file's id is ``file-`` and the base64url of its key, unpadded: stable, the same after a
  restart, the same whichever face made the artifact, and turned back into the key with no
  table to keep. ``datasets/train.jsonl`` is ``file-ZGF0YXNldHMvdHJhaW4uanNvbmw``.
- An upload with ``purpose=P`` and file name ``N`` is the artifact ``files/P/N``; its mime
  type comes from the name's extension, as for a file written in the mount. ``P`` is one of
  OpenAI's upload purposes and ``N`` must be a valid key component (docs/SEMANTICS.md
  "Names"), else 400 and nothing is stored. A second upload of the same name and purpose
  replaces the first (same key, same id).
- A file's ``purpose`` is ``P`` for the artifacts under ``files/P/``, and ``user_data`` for
  every other artifact; its ``filename`` is the key's last component.
- A listing covers every artifact in key order (``order=asc``) or its reverse (``desc``, the
  default, as in OpenAI's reference); ``purpose=P`` lists those under ``files/P/``. ``after``
  is a file id, as OpenAI's clients send it; the key it names need not exist any more.

A translation only: the store decides keys, sizes and clashes, and its errors come out in
OpenAI's error shape (artifactfs.http.errors).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Header, Path, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from ..errors import InvalidArgument, InvalidKey, NotFound
from ..models import (
    MAX_KEY_BYTES,
    NAME_SCHEMA,
    ArtifactResponse,
    mime_type_for_name,
    validate_key,
    validate_name,
)
from ..store import ArtifactStore
from ..store.service import MAX_PAGE
from .content import CHUNK, CONTENT_RESPONSES, download
from .errors import OpenAIErrorBody

ID_PREFIX = "file-"
KEY_PREFIX = "files"
DEFAULT_PURPOSE = "user_data"
# The purposes OpenAI's reference takes on an upload.
Purpose = Literal["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]
# OpenAI's bounds on ``limit``; a page holds at most the store's page size (1000) of them,
# and ``has_more`` says that more follow.
MAX_LIMIT = 10_000

# Ids as JSON Schema: what file_id can be for some key (base64url, never 1 mod 4 long).
_B64 = "[A-Za-z0-9_-]"
ID_SCHEMA: dict[str, Any] = {
    "pattern": f"^{ID_PREFIX}(?:{_B64}{{4}})*(?:{_B64}{{2,3}})?$",
    "minLength": len(ID_PREFIX) + 2,
    "maxLength": len(ID_PREFIX) + (MAX_KEY_BYTES * 4 + 2) // 3,
}

FileIdPath = Annotated[str, Path(description="A file id", json_schema_extra=ID_SCHEMA)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorBody, "description": "Bad purpose, file name, or parameter"},
    404: {"model": OpenAIErrorBody, "description": "No such file"},
    409: {"model": OpenAIErrorBody, "description": "File/directory clash in the store"},
}


class FileObject(BaseModel):
    """OpenAI's File object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    expires_at: int | None = None


class FileList(BaseModel):
    """One page of files, in OpenAI's cursor-page shape."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None
    last_id: str | None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_id(key: str) -> str:
    """The file id of the artifact ``key``."""
    return ID_PREFIX + base64.urlsafe_b64encode(key.encode()).rstrip(b"=").decode()


def key_of(ident: str) -> str | None:
    """The key a file id names, or None if it names none (not an id of ours)."""
    if not ident.startswith(ID_PREFIX):
        return None
    encoded = ident[len(ID_PREFIX):]
    try:
        key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        validate_key(key)
    except (ValueError, InvalidKey):  # bad base64 (binascii.Error), not UTF-8, not a key
        return None
    # One id per key: padding bits that decode to the same key make another spelling.
    return key if ident == file_id(key) else None


def _key(ident: str) -> str:
    key = key_of(ident)
    if key is None:
        raise NotFound(f"No such File object: {ident[:80]}")
    return key


def file_object(artifact: ArtifactResponse | dict[str, Any]) -> FileObject:
    """The File object of an artifact (a model, or a listing's dict)."""
    a = artifact if isinstance(artifact, dict) else artifact.model_dump()
    key: str = a["key"]
    parts = key.split("/")
    purpose = parts[1] if len(parts) >= 3 and parts[0] == KEY_PREFIX else DEFAULT_PURPOSE
    return FileObject(id=file_id(key), bytes=a["size"], created_at=a["created_at"],
                      filename=parts[-1], purpose=purpose)


async def _upload_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


async def _count_before(store: ArtifactStore, prefix: str, bound: str | None,
                        inclusive: bool) -> int:
    """How many artifacts under ``prefix`` sort before ``bound`` (or at it, if
    ``inclusive``); with no bound, how many there are.

    The store pages by index; a cursor is a key. An exponential then binary search over
    one-row pages finds the index in O(log n) listings, and stays right when keys come and go
    between pages (a saved index would not).
    """
    async def before(index: int) -> bool:
        page = await store.list_artifacts(index, 1, prefix)
        if not page.data:
            return False
        key: str = page.data[0]["key"]
        return bound is None or key < bound or (inclusive and key == bound)

    lo, hi = 0, 1
    while await before(hi - 1):
        lo, hi = hi, hi * 2
    hi -= 1  # before(lo - 1) holds (or lo == 0), before(hi) does not
    while lo < hi:
        mid = (lo + hi) // 2
        if await before(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def add_files_routes(app: FastAPI, store: ArtifactStore) -> None:
    """Add the Files API's routes over ``store`` to ``app`` (as routes of the app itself, so
    that a 405's ``Allow`` sees them beside the Artifacts API's)."""
    route = {"tags": ["files"], "responses": _ERRORS}

    @app.post("/v1/files", response_model=FileObject, **route)
    async def create_file(
        request: Request,
        file: Annotated[UploadFile, File(description="The file's bytes")],
        purpose: Annotated[Purpose, Form(description="Stored under files/<purpose>/")],
    ) -> FileObject:
        """Store an uploaded file as the artifact ``files/<purpose>/<filename>``."""
        form = await request.form()  # parsed once already, for the parameters above
        if any(name.startswith("expires_after") for name in form):
            raise InvalidArgument("expires_after is not supported: files are kept until"
                                  " deleted")
        name = file.filename or ""
        try:
            validate_name(name)
        except InvalidKey as exc:
            raise InvalidKey(f"filename {name[:80]!r} cannot be an artifact name: {exc}"
                             ) from None
        # The multipart body has been spooled (to disk past 1 MiB), so its size is known
        # before the store opens a session for it; the bytes then stream into the session.
        size = file.size if file.size is not None else len(await file.read())
        await file.seek(0)
        key = f"{KEY_PREFIX}/{purpose}/{name}"
        session = await store.create_upload_session(key, mime_type_for_name(name), size)
        artifact = await store.upload_stream(session.id, _upload_chunks(file), offset=0,
                                             length=size)
        if artifact is None:  # the spooled file is shorter than it said: never expected
            raise InvalidArgument(f"the upload of {name!r} ended before its {size} bytes")
        return file_object(artifact)

    @app.get("/v1/files", response_model=FileList, **route)
    async def list_files(
        after: Annotated[str | None, Query(
            description="The id of the last file of the previous page",
            json_schema_extra=ID_SCHEMA)] = None,
        limit: Annotated[int, Query(
            description="How many files (a page holds at most 1000)",
            json_schema_extra={"minimum": 1, "maximum": MAX_LIMIT})] = MAX_LIMIT,
        order: Annotated[Literal["asc", "desc"], Query(
            description="By key: asc, or desc")] = "desc",
        purpose: Annotated[str | None, Query(
            description="Only the files uploaded with this purpose (under files/<purpose>/)",
            json_schema_extra=NAME_SCHEMA)] = None,
    ) -> FileList:
        """One page of files, by key; pass the last id as ``after`` for the next."""
        if isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
            raise InvalidArgument(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
        prefix = ""
        if purpose is not None:
            validate_name(purpose)
            prefix = f"{KEY_PREFIX}/{purpose}/"
        bound = None
        if after is not None:
            bound = key_of(after)
            if bound is None:
                raise NotFound(f"No such File object: {after[:80]} (after)")
        if order == "asc":
            start = 0 if bound is None else await _count_before(store, prefix, bound, True)
            page = await store.list_artifacts(start, limit, prefix)
            rows, has_more = page.data, page.has_more
            rows = [a for a in rows if bound is None or a["key"] > bound]
        else:
            end = await _count_before(store, prefix, bound, False)
            count = min(limit, end, MAX_PAGE)
            page = await store.list_artifacts(end - count, count, prefix)
            rows = [a for a in reversed(page.data) if bound is None or a["key"] < bound]
            has_more = end - count > 0
        data = [file_object(a) for a in rows]
        return FileList(data=data, has_more=has_more,
                        first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)

    @app.get("/v1/files/{file_id}", response_model=FileObject, **route)
    async def retrieve_file(file_id: FileIdPath) -> FileObject:
        """The File object of the artifact this id names."""
        return file_object(await store.get_artifact(_key(file_id)))

    @app.delete("/v1/files/{file_id}", response_model=FileDeleted, **route)
    async def delete_file(file_id: FileIdPath) -> FileDeleted:
        """Delete the artifact this id names, from every face."""
        await store.delete_artifact(_key(file_id))
        return FileDeleted(id=file_id, deleted=True)

    @app.head("/v1/files/{file_id}/content", include_in_schema=False)
    @app.get("/v1/files/{file_id}/content", response_class=Response, tags=["files"],
             responses={**_ERRORS, **CONTENT_RESPONSES})
    async def retrieve_file_content(
        file_id: FileIdPath,
        request: Request,
        byte_range: Annotated[str | None, Header(alias="Range")] = None,
        if_range: Annotated[str | None, Header()] = None,
    ) -> Response:
        """The file's bytes, streamed; Range is honoured as on the Artifacts API."""
        return await download(store, _key(file_id), request, byte_range, if_range)
