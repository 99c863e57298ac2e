"""The Artifacts API of DESIGN §4 as a FastAPI app over one ArtifactStore.

A thin adapter: each route reads its request, calls one store operation and writes the answer;
artifactfs.http.errors turns the store's errors into statuses. Rules about keys, sizes, offsets
and pages live in the store, never here.

The proposal's routes overlap, and the order of the routes below is how the overlap is settled:

- ``GET /v1/artifacts/{key}:content`` comes first; ``:`` is not a key character, so it cannot
  shadow a key.
- ``GET /v1/artifacts/sessions/{id}`` is the session when ``id`` is a live one, else the
  artifact whose key is ``sessions/{id}``; deeper keys (``sessions/a/b``) never match it.
  ``DELETE`` there is the artifact ``sessions/{id}``, and 409 while ``id`` is a live session.
- ``POST /v1/artifacts/bulk`` is bulk delete; ``GET`` and ``DELETE /v1/artifacts/bulk`` are
  the artifact whose key is ``bulk`` (no artifact route takes POST).

The overlapping paths have routes of their own for the artifact's methods, so that the OpenAPI
document lists every method each path takes, and a 405's ``Allow`` says the same.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Body, FastAPI, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BeforeValidator, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect

from .. import models
from ..errors import Conflict, NotFound
from ..models import (
    KEY_SCHEMA,
    NAME_SCHEMA,
    PREFIX_SCHEMA,
    SIZE_SCHEMA,
    ArtifactResponse,
    ArtifactUploadResponse,
    BulkDeleteRequest,
    PaginatedResponse,
)
from ..store import ArtifactStore
from .body import DrainRefusedBodies
from .content import CONTENT_RESPONSES, download
from .errors import OFFSET_HEADER, ErrorBody, install_error_handlers
from .guards import BearerToken, JsonBodyLimit
from .openai_files import add_files_routes

log = logging.getLogger("artifactfs.http")

# JSON bodies (create, bulk delete) are parsed whole, so they are capped; 16 MiB holds a bulk
# delete of ~15,000 keys of the longest kind. Upload bodies are streamed and capped by the
# session's remaining size instead (the store checks it).
MAX_JSON_BODY = 16 << 20

def _whole_number(value: Any) -> Any:
    """JSON (and JSON Schema's ``integer``) does not tell 5 from 5.0: both are the number 5."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class CreateUploadSessionRequest(models.CreateUploadSessionRequest):
    """The body of POST /v1/artifacts, taken as JSON types are: ``"size": true`` or ``"5"`` is
    not a size (pydantic's lax mode would make them 1 and 5); ``5.0`` is 5."""

    model_config = ConfigDict(strict=True)

    size: Annotated[int, BeforeValidator(_whole_number),
                    Field(json_schema_extra=SIZE_SCHEMA)]


_RAW_BODY = {
    "requestBody": {
        "required": True,
        "description": "The next bytes of the artifact, from the session's offset.",
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}},
    }
}

class KeyConvertor(Convertor[str]):
    """``{key:key}`` in a route: like ``path``, but never ending in ``:content``, so that a
    download's URL matches the download route alone (DELETE on it is 405, not a bad key)."""

    regex = r".*(?<!:content)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("key", KeyConvertor())

# Path parameters: a key (which may hold '/') and an upload session id (one key component, so
# that sessions/{id} is a key too).
KeyPath = Annotated[str, Path(description="The artifact's key", json_schema_extra=KEY_SCHEMA)]
SessionPath = Annotated[str, Path(description="An upload session's id",
                                  json_schema_extra=NAME_SCHEMA)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Bad key, mime type, size, offset, page or body"},
    404: {"model": ErrorBody, "description": "No such artifact or upload session"},
    409: {"model": ErrorBody, "description": "File/directory clash or offset mismatch"},
}


def _truthful_openapi(app: FastAPI, *, bearer: bool) -> None:
    """Make the OpenAPI document say what the server does: validation errors are 400 here,
    never FastAPI's 422; with a token, every route wants it."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
                for parameter in operation.get("parameters", []):
                    _drop_null(parameter)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        if bearer:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_null(parameter: dict[str, Any]) -> None:
    """An optional query or header parameter is one the client leaves out; it cannot be sent
    as null, so its schema is the value's alone (FastAPI writes ``anyOf: [T, null]``)."""
    schema = parameter.get("schema", {})
    choices = schema.get("anyOf")
    if choices is None:
        return
    kept = [c for c in choices if c.get("type") != "null"]
    if len(kept) == 1:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        parameter["schema"] = {**kept[0], **rest}


def create_app(store: ArtifactStore, *, token: str | None = None) -> FastAPI:
    """An ASGI app serving ``store``; with ``token``, every route wants it as a bearer token."""
    app = FastAPI(
        title="artifactfs Artifacts API",
        version="1.0",
        description=(
            "The llama-stack Artifacts API over an artifactfs store, plus our extensions: "
            "`prefix` on listings, `GET /v1/artifacts/{key}:content` with Range, and "
            "`Upload-Offset` on uploads; and the OpenAI Files API (`/v1/files`) over the same "
            "artifacts. See docs/HTTP.md."),
        redoc_url=None,
        responses=_ERRORS,
    )
    install_error_handlers(app)
    _truthful_openapi(app, bearer=bool(token))
    app.add_middleware(JsonBodyLimit, limit=MAX_JSON_BODY,
                       paths=frozenset({"/v1/artifacts", "/v1/artifacts/bulk"}))
    if token:
        app.add_middleware(BearerToken, token=token)
    app.add_middleware(DrainRefusedBodies)  # outermost: it sees every refusal

    @app.post("/v1/artifacts", response_model=ArtifactUploadResponse)
    async def create_upload_session(
        request: Annotated[CreateUploadSessionRequest, Body()],
    ) -> ArtifactUploadResponse:
        """Open an upload session for ``key``; upload its bytes to the returned ``uri``."""
        return await store.create_upload_session(
            request.key, request.mime_type, request.size)

    @app.post("/v1/artifacts/bulk", status_code=204)
    async def bulk_delete_artifacts(request: Annotated[BulkDeleteRequest, Body()]) -> Response:
        """Delete every listed key, or none of them if any is invalid or absent."""
        await store.bulk_delete_artifacts(request)
        return Response(status_code=204)

    @app.get("/v1/artifacts/bulk", response_model=ArtifactResponse)
    async def get_artifact_bulk() -> ArtifactResponse:
        """The artifact whose key is ``bulk`` (POST on this path is bulk delete)."""
        return await store.get_artifact("bulk")

    @app.delete("/v1/artifacts/bulk", status_code=204)
    async def delete_artifact_bulk() -> Response:
        """Delete the artifact whose key is ``bulk``."""
        await store.delete_artifact("bulk")
        return Response(status_code=204)

    @app.post("/v1/artifacts/sessions/{upload_id}",
              response_model=ArtifactResponse | None, openapi_extra=_RAW_BODY)
    async def upload_content_to_session(
        upload_id: SessionPath,
        request: Request,
        upload_offset: Annotated[int | None, Header(
            description="The offset the client believes the session is at",
            json_schema_extra=SIZE_SCHEMA)] = None,
        offset: Annotated[int | None, Query(
            description="Same as the Upload-Offset header, for clients that cannot set one",
            json_schema_extra=SIZE_SCHEMA)] = None,
    ) -> Response:
        """Append the raw request body at the session's offset, streaming it to disk.

        Returns ``null`` while bytes are missing (``Upload-Offset`` says how many arrived) and
        the artifact once the last byte commits it.
        """
        if upload_offset is not None and offset is not None and upload_offset != offset:
            # At most one of them is the session's offset: a mismatch, answered as one.
            info = await store.get_upload_session_info(upload_id)
            raise Conflict(
                f"Upload-Offset header ({upload_offset}) and offset query ({offset}) disagree;"
                f" the session is at offset {info.offset}", offset=info.offset)
        claimed = upload_offset if upload_offset is not None else offset
        length_header = request.headers.get("content-length")
        length = int(length_header) if length_header is not None else None
        try:
            # request.stream() hands the body over as it arrives (hypercorn reads 64 KiB at a
            # time and holds at most a few such messages): never the whole body in memory.
            artifact = await store.upload_stream(
                upload_id, request.stream(), offset=claimed, length=length)
        except ClientDisconnect:
            # The store kept what arrived; the client resumes from get_upload_session_info.
            log.info("client went away during an upload to session %s", upload_id)
            return Response(status_code=400)
        if artifact is not None:
            return JSONResponse(artifact.model_dump())
        info = await store.get_upload_session_info(upload_id)
        return JSONResponse(None, headers={OFFSET_HEADER: str(info.offset)})

    @app.head("/v1/artifacts/{key:path}:content", include_in_schema=False)
    @app.get("/v1/artifacts/{key:path}:content", response_class=Response,
             responses=CONTENT_RESPONSES)
    async def get_artifact_content(
        key: KeyPath,
        request: Request,
        byte_range: Annotated[str | None, Header(alias="Range")] = None,
        if_range: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Stream the artifact's bytes with its mime type; honours Range."""
        return await download(store, key, request, byte_range, if_range)

    @app.get("/v1/artifacts/sessions/{upload_id}",
             response_model=ArtifactUploadResponse | ArtifactResponse)
    async def get_upload_session_info(
        upload_id: SessionPath,
    ) -> ArtifactUploadResponse | ArtifactResponse:
        """The live session ``upload_id``; else the artifact whose key is ``sessions/{id}``."""
        try:
            return await store.get_upload_session_info(upload_id)
        except NotFound as no_session:
            try:
                return await store.get_artifact(f"sessions/{upload_id}")
            except NotFound:
                raise NotFound(f"{no_session}, and no artifact sessions/{upload_id}") from None

    @app.delete("/v1/artifacts/sessions/{upload_id}", status_code=204)
    async def delete_artifact_in_sessions(upload_id: SessionPath) -> Response:
        """Delete the artifact whose key is ``sessions/{id}``; 409 while ``id`` is a live
        upload session, which this path names first (as for GET) and which cannot be deleted
        (it expires unless completed)."""
        try:
            await store.get_upload_session_info(upload_id)
        except NotFound:
            await store.delete_artifact(f"sessions/{upload_id}")
            return Response(status_code=204)
        raise Conflict(f"{upload_id} is a live upload session, which cannot be deleted: it"
                       " expires unless completed")

    @app.get("/v1/artifacts", response_model=PaginatedResponse)
    async def list_artifacts(
        start_index: Annotated[int | None, Query(description="Index of the first artifact",
                                                 json_schema_extra=SIZE_SCHEMA)] = None,
        limit: Annotated[int | None, Query(
            description="How many artifacts (a page holds at most 1000)",
            json_schema_extra={"minimum": 0})] = None,
        prefix: Annotated[str | None, Query(description="Only keys starting with this",
                                            json_schema_extra=PREFIX_SCHEMA)] = None,
    ) -> PaginatedResponse:
        """One page of artifacts in bytewise key order."""
        return await store.list_artifacts(start_index, limit, prefix)

    @app.get("/v1/artifacts/{key:key}", response_model=ArtifactResponse)
    async def get_artifact(key: KeyPath) -> ArtifactResponse:
        """The artifact's info; its ``uri`` is where its content downloads."""
        return await store.get_artifact(key)

    @app.delete("/v1/artifacts/{key:key}", status_code=204)
    async def delete_artifact(key: KeyPath) -> Response:
        """Delete the artifact at once; downloads already running finish with its bytes."""
        await store.delete_artifact(key)
        return Response(status_code=204)

    add_files_routes(app, store)
    return app
