"""The Artifacts API's pydantic models, field for field, and the rules for keys and mime types.

The key rules live here and only here (DESIGN §1); every face calls :func:`validate_key` or
:func:`validate_name` through the service.
"""

from __future__ import annotations

import errno
import re
from typing import Annotated, Any

from pydantic import BaseModel, Field

from .errors import InvalidArgument, InvalidKey

MAX_KEY_BYTES = 1024
MAX_COMPONENT_BYTES = 255
_KEY_CHARS = re.compile(r"[A-Za-z0-9_./-]*")
_BAD_CHAR = re.compile(r"[^A-Za-z0-9_./-]")
# Every rule of validate_key at once, for the common case of a valid key (one match instead
# of a check per component: a commit of a small artifact counts its microseconds). A key it
# refuses goes through the rule-by-rule checks, which say what is wrong.
_COMPONENT = rf"(?!\.\.?(?:/|$))[A-Za-z0-9_.-]{{1,{MAX_COMPONENT_BYTES}}}"
_VALID_KEY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
# type/subtype, each an RFC 6838 restricted-name; parameters (;charset=...) are allowed.
_MIME = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
    r"(\s*;\s*[A-Za-z0-9!#$&^_.+-]+=(\"[^\"]*\"|[A-Za-z0-9!#$&^_.+-]+))*"
)

# The same rules as JSON Schema, for the OpenAPI document (so generated clients and fuzzers
# send what the store takes). ECMA regexes without lookahead: a component is 1-255 of the key
# characters and neither "." nor "..". They only describe; validate_key decides, and its
# message says which rule failed.
COMPONENT_PATTERN = (r"(?:[A-Za-z0-9_-][A-Za-z0-9_.-]{0,254}|\.[A-Za-z0-9_-][A-Za-z0-9_.-]{0,253}"
                     r"|\.\.[A-Za-z0-9_.-]{1,253})")
KEY_SCHEMA: dict[str, Any] = {
    "pattern": rf"^{COMPONENT_PATTERN}(?:/{COMPONENT_PATTERN})*$",
    "minLength": 1, "maxLength": MAX_KEY_BYTES}
NAME_SCHEMA: dict[str, Any] = {
    "pattern": rf"^{COMPONENT_PATTERN}$", "minLength": 1, "maxLength": MAX_COMPONENT_BYTES}
PREFIX_SCHEMA: dict[str, Any] = {"pattern": r"^[A-Za-z0-9_./-]*$", "maxLength": MAX_KEY_BYTES}
MIME_SCHEMA: dict[str, Any] = {"pattern": f"^{_MIME.pattern}$"}
SIZE_SCHEMA: dict[str, Any] = {"minimum": 0, "maximum": 2**63 - 1}

Key = Annotated[str, Field(json_schema_extra=KEY_SCHEMA)]


class ArtifactUploadResponse(BaseModel):
    """An upload session: where the bytes go and how many have arrived."""

    id: str
    uri: str
    offset: int
    size: int


class ArtifactResponse(BaseModel):
    """A committed artifact. ``sha256`` is our extension: the content digest every face shows."""

    key: str
    mime_type: str
    uri: str
    size: int
    created_at: int
    sha256: str | None = None


class ArtifactDeleteRequest(BaseModel):
    key: Key


class BulkDeleteRequest(BaseModel):
    artifacts: list[ArtifactDeleteRequest]


class CreateUploadSessionRequest(BaseModel):
    """Body of ``POST /v1/artifacts`` (the API proposal passes these as the method's arguments)."""

    key: Key
    mime_type: Annotated[str, Field(json_schema_extra=MIME_SCHEMA)]
    size: Annotated[int, Field(json_schema_extra=SIZE_SCHEMA)]


class PaginatedResponse(BaseModel):
    """llama-stack's PaginatedResponse: one page of ``data``, ``has_more``, and this page's url."""

    data: list[dict[str, Any]]
    has_more: bool
    url: str | None = None


def validate_name(name: str) -> str:
    """Check one path component (a file or directory name); return it unchanged."""
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        raise InvalidKey("empty path component")
    if len(raw) > MAX_COMPONENT_BYTES:
        raise InvalidKey(
            f"path component is {len(raw)} bytes; at most {MAX_COMPONENT_BYTES} allowed",
            errno=errno.ENAMETOOLONG,
        )
    if name in (".", ".."):
        raise InvalidKey(f"path component {name!r} is not allowed")
    if "/" in name:
        raise InvalidKey(f"name {name!r} contains '/'")
    bad = _BAD_CHAR.search(name)
    if bad:
        raise InvalidKey(
            f"name {name!r} contains {bad.group()!r}; allowed characters are A-Z a-z 0-9 _ . - /"
        )
    return name


def validate_key(key: Any) -> str:
    """Check a whole key against DESIGN §1 and say which rule failed."""
    if isinstance(key, str) and len(key) <= MAX_KEY_BYTES and _VALID_KEY.fullmatch(key):
        return key
    return check_key_rules(key)


def check_key_rules(key: Any) -> str:
    """validate_key's rules one by one, so that the error names the one that failed."""
    if not isinstance(key, str):
        raise InvalidKey(f"key must be a string, not {type(key).__name__}")
    if not key:
        raise InvalidKey("key is empty")
    if not _KEY_CHARS.fullmatch(key):
        bad = _BAD_CHAR.search(key)
        char = bad.group() if bad else "?"
        raise InvalidKey(
            f"key {key[:80]!r} contains {char!r}; allowed characters are A-Z a-z 0-9 _ . - /"
        )
    if len(key) > MAX_KEY_BYTES:
        raise InvalidKey(
            f"key is {len(key)} bytes; at most {MAX_KEY_BYTES} allowed", errno=errno.ENAMETOOLONG
        )
    if key.startswith("/") or key.endswith("/"):
        raise InvalidKey(f"key {key!r} must not start or end with '/'")
    for part in key.split("/"):
        if not part:
            raise InvalidKey(f"key {key!r} has an empty component ('//')")
        validate_name(part)
    return key


def validate_mime_type(mime_type: Any) -> str:
    if not isinstance(mime_type, str) or not _MIME.fullmatch(mime_type):
        raise InvalidArgument(
            f"mime_type {str(mime_type)[:80]!r} is not of the form type/subtype"
        )
    return mime_type


def validate_size(size: Any) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidArgument(f"size must be an integer, not {type(size).__name__}")
    if size < 0:
        raise InvalidArgument(f"size must be >= 0, got {size}")
    if size > 2**63 - 1:
        raise InvalidArgument(f"size {size} is too large")
    return size


def join_key(parent_key: str, name: str) -> str:
    """The key of ``name`` inside the directory ``parent_key`` ('' is the root)."""
    key = f"{parent_key}/{name}" if parent_key else name
    if len(key) > MAX_KEY_BYTES:
        raise InvalidKey(
            f"path would be {len(key)} bytes; at most {MAX_KEY_BYTES} allowed",
            errno=errno.ENAMETOOLONG,
        )
    return key


def key_range_end(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix``.

    Keys are ASCII, so bumping the last character gives a half-open range the key index can
    answer: ``prefix <= key < key_range_end(prefix)``.
    """
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


MIME_BY_EXTENSION = {
    ".json": "application/json",
    ".jsonl": "application/jsonl",
    ".txt": "text/plain",
    ".csv": "text/csv",
    ".tsv": "text/tab-separated-values",
    ".md": "text/markdown",
    ".html": "text/html",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".tar": "application/x-tar",
    ".gz": "application/gzip",
    ".tgz": "application/gzip",
    ".zst": "application/zstd",
    ".zip": "application/zip",
    ".parquet": "application/vnd.apache.parquet",
    ".arrow": "application/vnd.apache.arrow.file",
    ".safetensors": "application/octet-stream",
    ".npy": "application/octet-stream",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".wav": "audio/wav",
    ".py": "text/x-python",
}


def mime_type_for_name(name: str) -> str:
    """Mime type from a file name's extension, else application/octet-stream (DESIGN §2)."""
    dot = name.rfind(".")
    if dot <= 0:
        return "application/octet-stream"
    return MIME_BY_EXTENSION.get(name[dot:].lower(), "application/octet-stream")
