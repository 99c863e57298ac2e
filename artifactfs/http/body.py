"""Refused request bodies are read before the answer goes out.

A refused body is read and dropped (up to a cap) before the answer is sent: a server that
closes a connection with unread bytes makes the kernel send a reset, and most clients, which
write the whole body before reading, then see "connection reset" instead of the 4xx that says
what was wrong. Beyond the cap the client gets the answer and a closed connection.
:class:`DrainRefusedBodies` does this for every route and every refusal (the store's errors,
validation errors, unknown routes, a wrong token, a body over the JSON cap).
"""

from __future__ import annotations

import trio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DISCARD_LIMIT = 64 << 20
DISCARD_SECONDS = 10.0


async def discard_body(receive: Receive, limit: int = DISCARD_LIMIT) -> None:
    """Read and drop the rest of a request body (up to ``limit`` bytes or a few seconds)."""
    dropped = 0
    with trio.move_on_after(DISCARD_SECONDS):
        while dropped <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


class DrainRefusedBodies:
    """Before a 4xx goes out, read and drop what the client is still sending of its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = False

        async def tracked_receive() -> Message:
            nonlocal complete
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True  # the whole body, or the client is gone
            return message

        async def draining_send(message: Message) -> None:
            nonlocal complete
            if (message["type"] == "http.response.start" and message["status"] >= 400
                    and not complete):
                await discard_body(receive)
                complete = True
            await send(message)

        await self.app(scope, tracked_receive, draining_send)
