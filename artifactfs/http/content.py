"""``GET /v1/artifacts/{key}:content``: stream an artifact's bytes, honouring ``Range``.

The bytes come from the file object ``store.open_artifact`` returns, read with ``pread`` in a
worker thread one chunk at a time, so a download never holds a whole artifact in memory and
never blocks the trio loop on a slow disk. The open descriptor keeps the version it opened:
a download that races a replace or a delete finishes with the old bytes
(docs/CONCURRENCY.md, invariant 6).

Range handling follows RFC 9110 §14: one ``bytes=`` range is served as 206; a range that starts
past the end is 416 with ``Content-Range: bytes */size``; a header we cannot parse, a set of
several ranges, or an ``If-Range`` that no longer matches is ignored and the whole artifact is
sent (the RFC allows a server to ignore Range).
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

import trio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..models import ArtifactResponse
from ..store import ArtifactStore
from .errors import ErrorBody, error_response

CHUNK = 1 << 20  # large reads: few thread hops, still a small buffer per download
_RANGE = re.compile(r"bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


# The OpenAPI responses of a download: the bytes come in the artifact's own mime type.
CONTENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
          "description": "The artifact's bytes, as its mime type"},
    206: {"content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
          "description": "The bytes of the requested Range"},
    416: {"model": ErrorBody, "description": "Range outside the artifact"},
}


class RangeNotSatisfiable(Exception):
    """The Range header asks only for bytes past the end."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The half-open span ``[start, end)`` one Range header asks for, or None for everything.

    Raises RangeNotSatisfiable when the one range asked for holds no byte of the artifact.
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header)
    if m is None:
        return None  # several ranges, another unit, or garbage: ignored, per the RFC
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - n), size
    start = int(first)
    if last and int(last) < start:
        return None  # an invalid range-spec: ignored
    if start >= size:
        raise RangeNotSatisfiable
    end = size if not last else min(int(last) + 1, size)
    return start, end


async def _read_span(f: BinaryIO, start: int, end: int) -> AsyncIterator[bytes]:
    try:
        fd = f.fileno()
        pos = start
        while pos < end:
            data = await trio.to_thread.run_sync(os.pread, fd, min(CHUNK, end - pos), pos)
            if not data:
                break  # cannot happen for an immutable blob; never loop forever on it
            pos += len(data)
            yield data
    finally:
        f.close()


async def download(store: ArtifactStore, key: str, request: Request,
                   range_header: str | None, if_range: str | None) -> Response:
    """The response to GET or HEAD of the artifact ``key``'s bytes."""
    # In this order, with no await between: get_artifact may wait for a digest being
    # computed, and the key may hold another version after that wait.
    artifact = await store.get_artifact(key)
    f = store.open_artifact(key)
    try:
        return content_response(f, artifact, range_header=range_header, if_range=if_range,
                                head=request.method == "HEAD", scope=request.scope)
    except BaseException:
        f.close()
        raise


def content_response(
    f: BinaryIO, artifact: ArtifactResponse, *, range_header: str | None,
    if_range: str | None, head: bool, scope: Any,
) -> Response:
    """The response for one download; it owns ``f`` and closes it when done."""
    size = os.fstat(f.fileno()).st_size
    etag = f'"{artifact.sha256}"' if artifact.sha256 else None
    # Set as a header, not media_type: Starlette would add "; charset=utf-8" to text/* types,
    # and the client must get the mime type the artifact was stored with.
    headers = {"Accept-Ranges": "bytes", "Content-Type": artifact.mime_type}
    if etag:
        headers["ETag"] = etag
    if if_range is not None and (etag is None or if_range.strip() != etag):
        range_header = None  # the client's copy is stale: it needs the whole new version
    try:
        span = byte_range(range_header, size)
    except RangeNotSatisfiable:
        f.close()
        return error_response(
            scope, 416, f"range {range_header!r} is outside the artifact's {size} bytes",
            headers={"Accept-Ranges": "bytes", "Content-Range": f"bytes */{size}"})
    status = 200
    start, end = 0, size
    if span is not None:
        start, end = span
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if head:
        f.close()
        return Response(status_code=status, headers=headers)
    return StreamingResponse(_read_span(f, start, end), status_code=status, headers=headers)
