"""Checks made before a request reaches its route: the bearer token and the JSON body cap.

Plain ASGI middlewares, so they run before routing and before any body is read. A request
with a missing or wrong token is answered 401 and reaches no route, so it changes nothing
(DESIGN §4: binding beyond loopback needs a token).
"""

from __future__ import annotations

import hmac
import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

log = logging.getLogger("artifactfs.http")


class BearerToken:
    """Refuse every HTTP request whose ``Authorization`` is not ``Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        # compare_digest: the time taken does not tell a guesser how much of it was right.
        if given is not None and hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        detail = ("missing bearer token: send 'Authorization: Bearer <token>'"
                  if given is None else "wrong bearer token")
        log.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), detail)
        response = error_response(scope, 401, detail,
                                  headers={"WWW-Authenticate": 'Bearer realm="artifactfs"'})
        await response(scope, receive, send)


class JsonBodyLimit:
    """Cap the bodies of the routes that parse JSON whole (``paths``) at ``limit`` bytes.

    Upload bodies are not capped here: they stream to disk, and the store refuses what passes
    the session's size. A JSON body is read into memory before validation, so without a cap a
    client could make the daemon hold any amount of memory.
    """

    def __init__(self, app: ASGIApp, limit: int, paths: frozenset[str]) -> None:
        self.app = app
        self.limit = limit
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(
                scope, 413, f"request body of {int(declared)} bytes is larger than the"
                            f" {self.limit} bytes this route takes")
            await response(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # Raised inside the route's body read: FastAPI passes HTTPExceptions through
                # to the error handlers, which answer 413 as JSON.
                raise HTTPException(413, f"request body is larger than the {self.limit}"
                                         " bytes this route takes")
            return message

        await self.app(scope, counted_receive, send)
