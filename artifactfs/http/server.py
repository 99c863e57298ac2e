"""Run the HTTP face on hypercorn's trio worker, in the daemon's own trio loop.

The daemon calls :func:`serve_http` in the nursery that also runs the mount, so both faces share
one store object and one thread (docs/CONCURRENCY.md).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ..errors import InvalidArgument
from ..store import ArtifactStore
from .app import create_app

log = logging.getLogger("artifactfs.http")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (the default, token-free binding)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything, so it needs a token


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or an error that says why there cannot be one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise InvalidArgument(
            f"cannot listen on {_url_host(host)}:{port}: {exc.strerror or exc}") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def public_host(host: str) -> str:
    """The host uris name: the bound address, or this machine's name for a wildcard bind
    (0.0.0.0 is where to listen, not an address a client can use)."""
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return host


async def serve_http(
    store: ArtifactStore,
    host: str,
    port: int,
    *,
    token: str | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Artifacts API on ``host:port`` until cancelled.

    Sets ``store.uri_base`` so that every uri the store hands out is an absolute URL of this
    server; ``port`` 0 picks a free port (tests), and ``task_status.started`` reports the URL
    once the socket listens. Binding beyond loopback without a token raises InvalidArgument
    before anything listens: an unauthenticated store on the network is never a default.
    """
    if not token and not is_loopback(host):
        raise InvalidArgument(
            f"refusing to serve HTTP on {host}: binding beyond loopback needs a bearer token"
            " (--token or ARTIFACTFS_TOKEN); use 127.0.0.1 to serve this machine only")
    sock = _listen(host, port)
    bound_port = sock.getsockname()[1]
    config = Config()
    # hypercorn takes over our socket: we bound it, so a port in use is a clear error here
    # (not an exception group from inside hypercorn) and port 0 is known before we serve.
    config.bind = [f"fd://{sock.detach()}"]
    # One access line per request is noise at INFO; it is there with -v (DEBUG).
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        config.accesslog = logging.getLogger("artifactfs.http.access")
    config.errorlog = logging.getLogger("artifactfs.http.server")
    # Cancellation is how the daemon stops us; do not linger on idle keep-alive connections.
    config.graceful_timeout = 1.0
    store.uri_base = f"http://{_url_host(public_host(host))}:{bound_port}"
    app = create_app(store, token=token)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, app, config))  # type: ignore[arg-type]
        log.info("serving the Artifacts API at %s (OpenAPI at %s/openapi.json)%s",
                 store.uri_base, store.uri_base, " with a bearer token" if token else "")
        task_status.started(store.uri_base)
