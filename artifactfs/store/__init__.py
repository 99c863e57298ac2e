"""The store: metadata, blobs and the service that decides every rule."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import trio

from .metadata import Entry
from .service import ArtifactStore, Change
from .sessions import WriteSession


def default_data_dir() -> Path:
    """The embedded default store: $XDG_DATA_HOME/artifactfs (~/.local/share/artifactfs)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "artifactfs"


@contextlib.asynccontextmanager
async def open_store(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    sync: bool = False,
    session_ttl: int = 24 * 3600,
    uri_base: str | None = None,
    flush_interval: float = 2.0,
) -> AsyncIterator[ArtifactStore]:
    """Open a data directory (taking its lock), recover it, and run its background work.

    ``async with open_store(path) as store:`` gives the Artifacts API's operations by name.
    """
    store = ArtifactStore(
        Path(data_dir) if data_dir is not None else default_data_dir(),
        sync=sync, session_ttl=session_ttl, uri_base=uri_base,
    )
    store.open()
    try:
        await store.commit_complete_sessions()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(store.run_background, flush_interval=flush_interval))
                nursery.start_soon(store.commit_batches)
                nursery.start_soon(store.digests.run)
                try:
                    yield store
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery wraps what the caller's block raised; give the caller its own
            # exception back (NotFound, not an ExceptionGroup holding it).
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
    finally:
        store.close()


__all__ = ["ArtifactStore", "Change", "Entry", "WriteSession", "default_data_dir", "open_store"]
