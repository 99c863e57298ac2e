"""Helpers for the store-layer tests (tests/test_store_*.py): snapshots and invariants."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from artifactfs.store import ArtifactStore
from artifactfs.store.metadata import Metadata
from artifactfs.store.recovery import FsckReport, fsck
from artifactfs.store.schema import ROOT_ID


async def put(store: ArtifactStore, key: str, content: bytes,
              mime_type: str = "application/octet-stream", chunks: int = 1) -> Any:
    """Upload ``content`` to ``key`` in ``chunks`` requests; return the ArtifactResponse."""
    s = await store.create_upload_session(key, mime_type, len(content))
    if not content:
        return await store.upload_content_to_session(s.id, b"")
    step = max(1, -(-len(content) // chunks))
    result = None
    for pos in range(0, len(content), step):
        result = await store.upload_content_to_session(s.id, content[pos:pos + step], pos)
    assert result is not None
    return result


def read(store: ArtifactStore, key: str) -> bytes:
    with store.open_artifact(key) as f:
        return f.read()


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def entry_id(store: ArtifactStore, key: str) -> int:
    """The id of the entry at ``key`` ('' is the root), walking the tree as the mount does."""
    node = ROOT_ID
    if key:
        for name in key.split("/"):
            node = store.lookup(node, name).id
    return node


def db_snapshot(store: ArtifactStore) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every entry and session row, to prove that a refused request changed nothing."""
    conn = store.meta.conn
    entries = conn.execute(
        "SELECT id, parent_id, name, key, kind, blob_id, size, sha256, mime_type"
        " FROM entries ORDER BY id").fetchall()
    sessions = conn.execute('SELECT id, key, size, "offset" FROM sessions ORDER BY id').fetchall()
    return entries, sessions


def disk_snapshot(store: ArtifactStore) -> dict[str, int]:
    """Every file under blobs/ and staging/ with its length."""
    out: dict[str, int] = {}
    for top in (store.data.blobs, store.data.staging):
        for dirpath, _, files in os.walk(top):
            for f in files:
                p = Path(dirpath) / f
                out[str(p.relative_to(store.data.root))] = p.stat().st_size
    return out


def snapshot(store: ArtifactStore) -> tuple[Any, ...]:
    return (*db_snapshot(store), disk_snapshot(store))


async def all_artifacts(store: ArtifactStore, page: int = 1000) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while True:
        resp = await store.list_artifacts(start_index=len(out), limit=page)
        out += resp.data
        if not resp.has_more:
            return out


def check_invariants(store: ArtifactStore) -> None:
    """No key points at a torn or missing blob; no orphan blob; no staging file without its
    session; every key is its parent's key plus its name."""
    conn = store.meta.conn
    used: set[str] = set()
    for key, blob_id, size, digest in conn.execute(
            "SELECT key, blob_id, size, sha256 FROM entries WHERE blob_id IS NOT NULL"):
        path = store.data.blob_path(blob_id)
        assert path.exists(), f"{key} points at missing blob {blob_id}"
        content = path.read_bytes()
        assert len(content) == size, f"{key}: blob has {len(content)} bytes, row says {size}"
        if digest is None:  # pending (store/digests.py): then it is queued to be computed
            assert blob_id in store.digests._done, f"{key}: digest pending, not queued"
        else:
            assert sha(content) == digest, f"{key}: blob digest differs from its row"
        used.add(blob_id)
    on_disk = set(store.data.iter_blob_ids())
    kept = set(store._doomed) | set(store._replaced)  # freed later (docs/CONCURRENCY.md)
    assert on_disk <= used | kept, f"orphan blobs: {on_disk - used}"
    sessions = {r[0] for r in conn.execute("SELECT id FROM sessions")}
    staging = set(store.data.iter_staging_ids())
    assert staging <= sessions, f"staging files without a session: {staging - sessions}"
    for key, name, pkey, pkind in conn.execute(
            "SELECT c.key, c.name, p.key, p.kind FROM entries c"
            " JOIN entries p ON p.id = c.parent_id"):
        assert pkind == "dir", f"{key} lives in {pkey}, a {pkind}"
        assert key == (f"{pkey}/{name}" if pkey else name), f"{key} is not {pkey}/{name}"
    orphans = conn.execute(
        "SELECT count(*) FROM entries c WHERE c.parent_id IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM entries p WHERE p.id = c.parent_id)").fetchone()[0]
    assert orphans == 0, "entries whose parent row is gone"


def run_fsck(data_dir: Path, *, repair: bool = False) -> FsckReport:
    """fsck a data directory no daemon holds, as `artifactfs fsck` does (no recovery first,
    which would hide damage; only the commit log's lines put in)."""
    store = ArtifactStore(data_dir)
    store.data.acquire()
    try:
        store.meta = Metadata(store.data.db_path)
        try:
            store.meta.replay_log(store.replay_logged)
            return fsck(store, repair=repair)
        finally:
            store.meta.close()
    finally:
        store.data.release()


def fsck_clean(data_dir: Path) -> None:
    """``run_fsck``, and require the data directory clean."""
    report = run_fsck(data_dir)
    assert report.clean, report.problems
