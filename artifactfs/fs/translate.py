"""Every failure of a request handler becomes a FUSEError carrying its errno.

pyfuse3 lets any other exception end its main loop and leaves the request unanswered (the
caller would hang), so each handler of the mount is wrapped in :func:`translated`.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import pyfuse3

from ..errors import ArtifactError

log = logging.getLogger("artifactfs.fs")

P = ParamSpec("P")
R = TypeVar("R")


def translated(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Raise every failure as FUSEError(errno): pyfuse3 lets any other exception end the loop
    and leaves the request unanswered (the caller would hang)."""

    @functools.wraps(fn)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ArtifactError as exc:
            if exc.errno == errno.EIO:
                log.error("%s failed: %s", fn.__name__, exc)
            else:
                log.debug("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise pyfuse3.FUSEError(exc.errno) from None
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler
