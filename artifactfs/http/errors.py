"""Errors out of the HTTP face: every failure is JSON ``{"detail": "..."}`` (DESIGN §5), or,
under the OpenAI Files API's routes, OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` so that OpenAI clients show the message.

The store's errors carry their own status (``ArtifactError.http_status``); this module only
writes them out. FastAPI's own failures are reshaped to match: request validation is 400 (the
table's "bad argument", not FastAPI's 422), unknown routes and methods are 404/405 with a
detail that names the route (a 405's ``Allow`` lists every method the resource takes), and
anything unexpected is a logged 500 that leaves the server up.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import Scope

from ..errors import ArtifactError, Conflict

log = logging.getLogger("artifactfs.http")

# Header that carries a session's true offset (tus's name), on 409s and on partial uploads.
OFFSET_HEADER = "Upload-Offset"


class ErrorBody(BaseModel):
    """Every error's body. A 409 for an offset mismatch adds ``offset``, the true one."""

    detail: str
    offset: int | None = None


# Routes under this prefix are the OpenAI Files API: their errors take OpenAI's shape.
OPENAI_PREFIX = "/v1/files"
# OpenAI's ``code`` for the statuses that have one of their own.
_OPENAI_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed",
                 409: "conflict", 413: "request_too_large", 416: "range_not_satisfiable",
                 507: "insufficient_storage"}


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """An error of the Files API, in the shape OpenAI's clients read."""

    error: OpenAIError


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def error_response(scope: Scope, status: int, detail: str, *,
                   extra: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON answer for one failure, in the shape of the API the request went to."""
    if is_openai_path(scope.get("path", "")):
        kind = ("server_error" if status >= 500 else
                "authentication_error" if status == 401 else "invalid_request_error")
        body: dict[str, Any] = {"error": {"message": detail, "type": kind, "param": None,
                                          "code": _OPENAI_CODES.get(status)}}
    else:
        body = {"detail": detail, **(extra or {})}
    return JSONResponse(body, status_code=status, headers=headers)


def allowed_methods(scope: Scope) -> list[str]:
    """Every method some route takes at this path."""
    routes = scope["app"].router.routes if "app" in scope else []
    return sorted({m for r in routes if isinstance(r, Route) and r.methods
                   and r.matches(scope)[0] != Match.NONE for m in r.methods})


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
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if isinstance(exc, Conflict) and exc.offset is not None:
        # An offset mismatch: give the client the offset to resume from, in the body and in
        # the header a tus-style client reads.
        extra["offset"] = exc.offset
        headers[OFFSET_HEADER] = str(exc.offset)
    return error_response(request.scope, status, str(exc), extra=extra, headers=headers)


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
    return error_response(request.scope, 400, detail, extra={"errors": brief})


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 404:
        detail = f"no route {request.method} {request.url.path}"
    elif status == 405:
        # Starlette names only the methods of the first route that matched the path; RFC 9110
        # wants all of them (GET and DELETE /v1/artifacts/{key} are two routes).
        allowed = ", ".join(allowed_methods(request.scope)) or headers.get("Allow", "")
        headers["Allow"] = allowed
        detail = f"method {request.method} is not allowed on {request.url.path}" + (
            f" (allowed: {allowed})" if allowed else "")
    else:
        detail = str(exc.detail)
    return error_response(request.scope, status, detail, headers=headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
    return error_response(
        request.scope, 500,
        f"internal error ({type(exc).__name__}); the server log has the details")
