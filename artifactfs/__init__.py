"""artifactfs: ML artifacts as a mounted directory tree, an HTTP API and a Python API.

    from artifactfs import open_store

    async with open_store("/data/artifacts") as store:
        s = await store.create_upload_session("datasets/v1/train.jsonl", "application/jsonl", 5)
        await store.upload_content_to_session(s.id, b"hello")
"""

from .errors import (
    ArtifactError,
    Conflict,
    InvalidArgument,
    InvalidKey,
    NoSpace,
    NotEmpty,
    NotFound,
    StoreLocked,
    Unsupported,
)
from .models import (
    ArtifactDeleteRequest,
    ArtifactResponse,
    ArtifactUploadResponse,
    BulkDeleteRequest,
    PaginatedResponse,
)
from .store import ArtifactStore, default_data_dir, open_store

__all__ = [
    "ArtifactDeleteRequest",
    "ArtifactError",
    "ArtifactResponse",
    "ArtifactStore",
    "ArtifactUploadResponse",
    "BulkDeleteRequest",
    "Conflict",
    "InvalidArgument",
    "InvalidKey",
    "NoSpace",
    "NotEmpty",
    "NotFound",
    "PaginatedResponse",
    "StoreLocked",
    "Unsupported",
    "default_data_dir",
    "open_store",
]
