"""Errors out of the HTTP face: every failure is JSON ``{"detail": "..."}`` (DESIGN §5).

The store's errors carry their own status (``ArtifactError.http_status``); this module only
writes them out. FastAPI's own failures are reshaped to match: request validation is 400 (the
table's "bad argument", not FastAPI's 422), unknown routes and methods are 404/405 with a
detail that names the route, and anything unexpected is a logged 500 that leaves the server up.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ArtifactError, Conflict

log = logging.getLogger("artifactfs.http")

# Header that carries a session's true offset (tus's name), on 409s and on partial uploads.
OFFSET_HEADER = "Upload-Offset"


class ErrorBody(BaseModel):
    """Every error's body. A 409 for an offset mismatch adds ``offset``, the true one."""

    detail: str
    offset: int | None = None


def install_error_handlers(app: FastAPI) -> None:
    """Register the translations above on ``app``."""
    app.add_exception_handler(ArtifactError, _artifact_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


async def _artifact_error(request: Request, exc: ArtifactError) -> Response:
    status = exc.http_status
    if status == 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc,
                  exc_info=exc)
    elif status > 500:
        # 507 (a full disk), 503: the user's to fix, and the message says how; no traceback.
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    body: dict[str, Any] = {"detail": str(exc)}
    headers: dict[str, str] = {}
    if isinstance(exc, Conflict) and exc.offset is not None:
        # An offset mismatch: give the client the offset to resume from, in the body and in
        # the header a tus-style client reads.
        body["offset"] = exc.offset
        headers[OFFSET_HEADER] = str(exc.offset)
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(err: dict[str, Any]) -> str:
    loc = [str(part) for part in err.get("loc", ())]
    where = loc[0] if loc else "request"
    name = ".".join(loc[1:])
    msg = err.get("msg", "invalid")
    if where == "body" and err.get("type") == "json_invalid":
        ctx = err.get("ctx") or {}
        return f"body is not valid JSON ({ctx.get('error', 'decode error')})"
    if where == "body" and not name:
        if err.get("type") == "missing":
            return "a JSON body is required"
        return f"body must be a JSON object sent as Content-Type: application/json ({msg})"
    return f"{where} {name}: {msg}" if name else f"{where}: {msg}"


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = list(exc.errors())
    detail = "; ".join(_describe(e) for e in errors) or "invalid request"
    # The inputs are left out: a rejected body can be large, and it is the client's own.
    brief = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
             for e in errors]
    return JSONResponse({"detail": detail, "errors": brief}, status_code=400)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    status = exc.status_code
    if status == 404:
        detail = f"no route {request.method} {request.url.path}"
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"method {request.method} is not allowed on {request.url.path}" + (
            f" (allowed: {allowed})" if allowed else "")
    else:
        detail = str(exc.detail)
    return JSONResponse({"detail": detail}, status_code=status, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        {"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
        status_code=500)
