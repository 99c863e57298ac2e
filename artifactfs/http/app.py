"""The Artifacts API of DESIGN §4 as a FastAPI app over one ArtifactStore.

A thin adapter: each route reads its request, calls one store operation and writes the answer;
artifactfs.http.errors turns the store's errors into statuses. Rules about keys, sizes, offsets
and pages live in the store, never here.

The proposal's routes overlap, and the order of the routes below is how the overlap is settled:

- ``GET /v1/artifacts/{key}:content`` comes first; ``:`` is not a key character, so it cannot
  shadow a key.
- ``GET /v1/artifacts/sessions/{id}`` is the session when ``id`` is a live one, else the
  artifact whose key is ``sessions/{id}``; deeper keys (``sessions/a/b``) never match it.
- ``POST /v1/artifacts/bulk`` is bulk delete; ``GET`` and ``DELETE /v1/artifacts/bulk`` are
  the artifact whose key is ``bulk`` (no artifact route takes POST).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Body, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict
from starlette.requests import ClientDisconnect

from .. import models
from ..errors import InvalidArgument, NotFound
from ..models import (
    ArtifactResponse,
    ArtifactUploadResponse,
    BulkDeleteRequest,
    PaginatedResponse,
)
from ..store import ArtifactStore
from .body import DrainRefusedBodies
from .content import content_response
from .errors import OFFSET_HEADER, ErrorBody, install_error_handlers
from .guards import BearerToken, JsonBodyLimit

log = logging.getLogger("artifactfs.http")

# JSON bodies (create, bulk delete) are parsed whole, so they are capped; 16 MiB holds a bulk
# delete of ~15,000 keys of the longest kind. Upload bodies are streamed and capped by the
# session's remaining size instead (the store checks it).
MAX_JSON_BODY = 16 << 20

class CreateUploadSessionRequest(models.CreateUploadSessionRequest):
    """The body of POST /v1/artifacts, taken as JSON types are: ``"size": true`` or ``"5"`` is
    not a size (pydantic's lax mode would make them 1 and 5)."""

    model_config = ConfigDict(strict=True)


_RAW_BODY = {
    "requestBody": {
        "required": True,
        "description": "The next bytes of the artifact, from the session's offset.",
        "content": {"application/octet-stream": {"schema": {"type": "string",
                                                            "format": "binary"}}},
    }
}

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
        schema = generate()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        if bearer:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(store: ArtifactStore, *, token: str | None = None) -> FastAPI:
    """An ASGI app serving ``store``; with ``token``, every route wants it as a bearer token."""
    app = FastAPI(
        title="artifactfs Artifacts API",
        version="1.0",
        description=(
            "The llama-stack Artifacts API over an artifactfs store, plus our extensions: "
            "`prefix` on listings, `GET /v1/artifacts/{key}:content` with Range, and "
            "`Upload-Offset` on uploads. See docs/HTTP.md."),
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

    @app.post("/v1/artifacts/sessions/{upload_id}",
              response_model=ArtifactResponse | None, openapi_extra=_RAW_BODY)
    async def upload_content_to_session(
        upload_id: str,
        request: Request,
        upload_offset: Annotated[int | None, Header(
            description="The offset the client believes the session is at")] = None,
        offset: Annotated[int | None, Query(
            description="Same as the Upload-Offset header, for clients that cannot set one",
        )] = None,
    ) -> Response:
        """Append the raw request body at the session's offset, streaming it to disk.

        Returns ``null`` while bytes are missing (``Upload-Offset`` says how many arrived) and
        the artifact once the last byte commits it.
        """
        if upload_offset is not None and offset is not None and upload_offset != offset:
            raise InvalidArgument(
                f"Upload-Offset header ({upload_offset}) and offset query ({offset}) disagree")
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
             responses={200: {"content": {"application/octet-stream": {}},
                              "description": "The artifact's bytes"},
                        206: {"description": "The bytes of the requested Range"},
                        416: {"description": "Range outside the artifact"}})
    async def get_artifact_content(
        key: str,
        request: Request,
        byte_range: Annotated[str | None, Header(alias="Range")] = None,
        if_range: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Stream the artifact's bytes with its mime type; honours Range."""
        # In this order, with no await between: get_artifact may wait for a digest being
        # computed, and the key may hold another version after that wait.
        artifact = await store.get_artifact(key)
        f = store.open_artifact(key)
        try:
            return content_response(f, artifact, range_header=byte_range, if_range=if_range,
                                    head=request.method == "HEAD")
        except BaseException:
            f.close()
            raise

    @app.get("/v1/artifacts/sessions/{upload_id}",
             response_model=ArtifactUploadResponse | ArtifactResponse)
    async def get_upload_session_info(
        upload_id: str,
    ) -> ArtifactUploadResponse | ArtifactResponse:
        """The live session ``upload_id``; else the artifact whose key is ``sessions/{id}``."""
        try:
            return await store.get_upload_session_info(upload_id)
        except NotFound as no_session:
            try:
                return await store.get_artifact(f"sessions/{upload_id}")
            except NotFound:
                raise NotFound(f"{no_session}, and no artifact sessions/{upload_id}") from None

    @app.get("/v1/artifacts", response_model=PaginatedResponse)
    async def list_artifacts(
        start_index: Annotated[int | None, Query(description="Index of the first artifact")]
        = None,
        limit: Annotated[int | None, Query(description="How many artifacts (at most 1000)")]
        = None,
        prefix: Annotated[str | None, Query(description="Only keys starting with this")]
        = None,
    ) -> PaginatedResponse:
        """One page of artifacts in bytewise key order."""
        return await store.list_artifacts(start_index, limit, prefix)

    @app.get("/v1/artifacts/{key:path}", response_model=ArtifactResponse)
    async def get_artifact(key: str) -> ArtifactResponse:
        """The artifact's info; its ``uri`` is where its content downloads."""
        return await store.get_artifact(key)

    @app.delete("/v1/artifacts/{key:path}", status_code=204)
    async def delete_artifact(key: str) -> Response:
        """Delete the artifact at once; downloads already running finish with its bytes."""
        await store.delete_artifact(key)
        return Response(status_code=204)

    return app
