"""Bearer-token check on every route (DESIGN §4: binding beyond loopback needs a token).

A plain ASGI middleware, so it runs before routing and before any body is read: a request
with a missing or wrong token is answered 401 and reaches no route, so it changes nothing.
"""

from __future__ import annotations

import hmac
import logging

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

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
        response = JSONResponse({"detail": detail}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="artifactfs"'})
        await response(scope, receive, send)
