"""The error table of DESIGN §5, in one place.

Every face translates these and nothing else: the mount raises ``pyfuse3.FUSEError(err.errno)``,
the HTTP face answers ``err.http_status`` with ``{"detail": str(err)}``. A rule that fails names
itself in the message, so the user learns what to change.
"""

from __future__ import annotations

import errno as _errno


class ArtifactError(Exception):
    """Base of every error the store raises on purpose.

    ``errno`` may be overridden per instance because one condition has several POSIX spellings
    (a file/directory clash is ENOTDIR or EISDIR depending on which side exists).
    """

    errno: int = _errno.EIO
    http_status: int = 500

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class InvalidArgument(ArtifactError):
    """Bad key, mime type, size, offset or flags: nothing was changed."""

    errno = _errno.EINVAL
    http_status = 400


class InvalidKey(InvalidArgument):
    """A key (or one component of a path) breaks a key rule; the message says which."""


class NotFound(ArtifactError):
    """The key, entry or upload session does not exist."""

    errno = _errno.ENOENT
    http_status = 404


class Conflict(ArtifactError):
    """A file/directory clash, an existing target, or an upload offset mismatch."""

    errno = _errno.EEXIST
    http_status = 409

    def __init__(
        self, message: str, *, errno: int | None = None, offset: int | None = None
    ) -> None:
        super().__init__(message, errno=errno)
        # For an offset mismatch: the session's true offset, so a client can resume from it.
        self.offset = offset


class NotEmpty(ArtifactError):
    """rmdir (or a rename over) a directory that still holds entries."""

    errno = _errno.ENOTEMPTY
    http_status = 409


class Unsupported(ArtifactError):
    """An operation artifactfs does not offer (hard links, device nodes, some rename flags)."""

    errno = _errno.EPERM
    http_status = 400


class NoSpace(ArtifactError):
    """The file system that holds the data directory is full."""

    errno = _errno.ENOSPC
    http_status = 507


class StoreLocked(ArtifactError):
    """Another process owns the data directory (DESIGN §6: one daemon per data directory)."""

    errno = _errno.EBUSY
    http_status = 503


def from_os_error(exc: OSError, what: str) -> ArtifactError:
    """Map an OSError met while touching blobs to the table: a full disk is the user's to fix."""
    if exc.errno in (_errno.ENOSPC, _errno.EDQUOT):
        return NoSpace(f"no space left for {what}: {exc.strerror}")
    return ArtifactError(f"I/O error on {what}: {exc}")
