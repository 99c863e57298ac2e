"""Request bodies read as a stream: uploads go to disk chunk by chunk, never whole in memory.

A refused body is read and dropped (up to a cap) before the answer is sent: a server that
closes a connection with unread bytes makes the kernel send a reset, and most clients, which
write the whole body before reading, then see "connection reset" instead of the 4xx that says
what was wrong. Beyond the cap the client gets the answer and a closed connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio
from starlette.requests import ClientDisconnect
from starlette.types import Receive

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


class RequestBody:
    """A request body as an async iterator of chunks that knows whether it was read to the end.

    Starlette's ``request.stream()`` cannot say that, and reading past the end would wait for
    the client to hang up.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.complete = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.complete:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            self.complete = not message.get("more_body", False)
            body = message.get("body", b"")
            if body:
                yield body

    async def discard_rest(self) -> None:
        if not self.complete:
            await discard_body(self._receive)
            self.complete = True
