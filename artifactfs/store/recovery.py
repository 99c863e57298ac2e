"""Start-up recovery and fsck: bring the data directory back to the invariants of schema.py.

Recovery runs on every open. It is cheap after a clean shutdown (the ``clean`` marker): it only
settles sessions. After a crash it also verifies the rows committed without fsync and removes
blobs no row points at. ``fsck`` checks everything, including every blob's digest.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .blobs import fsync_path, sha256_of_path

if TYPE_CHECKING:
    from .service import ArtifactStore

log = logging.getLogger("artifactfs.recovery")


def recover(store: ArtifactStore) -> None:
    meta, data = store.meta, store.data
    marker = data.root / "clean"
    was_clean = marker.exists()
    if was_clean:
        marker.unlink()
        fsync_path(data.root)
    now = int(time.time())
    for s in meta.all_sessions():
        if s.origin == "mount":
            # Its writer was this daemon's kernel client, gone with the crash: no one can
            # resume it, so the key keeps its previous artifact (DESIGN §2).
            e = meta.entry(s.entry_id) if s.entry_id is not None else None
            with meta.transaction():
                meta.delete_session(s.id)
                if e is not None and e.is_file and e.blob_id is None:
                    meta.delete_entry(e.id)
            data.remove_staging(s.id)
            log.warning("discarded the mount write of %s lost in a crash", s.key)
        elif s.expires_at is not None and s.expires_at <= now:
            meta.delete_session(s.id)
            data.remove_staging(s.id)
            log.info("removed expired upload session %s for %s", s.id, s.key)
        else:
            try:
                length = os.stat(data.staging_path(s.id)).st_size
            except FileNotFoundError:
                data.create_staging(s.id)
                length = 0
            if length < s.offset:
                # Bytes acknowledged but not fsynced did not survive: resume from what did.
                meta.set_session_offset(s.id, length)
                log.warning("upload session %s resumes at %d, not %d", s.id, length, s.offset)
    live = {s.id for s in meta.all_sessions()}
    for name in list(data.iter_staging_ids()):
        if name not in live:
            data.remove_staging(name)
            log.info("removed staging file %s without a session", name)
    for e in meta.pending_files_without_session():
        meta.delete_entry(e.id)
    if not was_clean:
        _verify_not_durable(store)
        removed = remove_orphan_blobs(store)
        if removed:
            log.info("removed %d blobs no artifact points at", removed)


def _verify_not_durable(store: ArtifactStore) -> None:
    """Rows committed without fsync: keep those whose bytes survived, drop the others."""
    meta, data = store.meta, store.data
    while rows := meta.not_durable(1000):
        good: list[tuple[int, str]] = []
        for e in rows:
            assert e.blob_id is not None
            found = sha256_of_path(data.blob_path(e.blob_id))
            if found == (e.sha256, e.size):
                good.append((e.id, e.blob_id))
            else:
                log.error("artifact %s lost its bytes in a crash; removing it", e.key)
                meta.delete_entry(e.id)
                data.remove_blob(e.blob_id)
        data.fsync_blobs([b for _, b in good])
        with meta.transaction():
            meta.mark_durable(good)
        if len(rows) < 1000:
            break


def remove_orphan_blobs(store: ArtifactStore, *, dry_run: bool = False) -> int:
    removed = 0
    for sub in sorted(store.data.blobs.iterdir()):
        if not sub.is_dir():
            continue
        used = store.meta.blob_ids_with_prefix(sub.name)
        for f in sub.iterdir():
            if f.name not in used:
                removed += 1
                if not dry_run:
                    store.data.remove_blob(f.name)
    return removed


@dataclass
class FsckReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems


def fsck(store: ArtifactStore, *, repair: bool = False) -> FsckReport:
    """Check every row against its blob and the tree's invariants; repair what is safe."""
    meta, data = store.meta, store.data
    report = FsckReport()
    for e in meta.iter_artifacts():
        report.checked += 1
        assert e.blob_id is not None
        found = sha256_of_path(data.blob_path(e.blob_id))
        if found is None:
            report.problems.append(f"{e.key}: blob {e.blob_id} is missing")
            report.unrepaired.append(f"{e.key}: its bytes are gone; delete it or re-upload")
        elif found != (e.sha256, e.size):
            report.problems.append(
                f"{e.key}: blob has {found[1]} bytes sha256 {found[0][:12]}, row says"
                f" {e.size} bytes sha256 {(e.sha256 or '')[:12]}")
            report.unrepaired.append(f"{e.key}: torn or altered bytes; re-upload it")
    orphans = remove_orphan_blobs(store, dry_run=not repair)
    if orphans:
        report.problems.append(f"{orphans} blobs no artifact points at")
        if repair:
            report.repaired.append(f"removed {orphans} orphan blobs")
    sessions = {s.id: s for s in meta.all_sessions()}
    for name in list(data.iter_staging_ids()):
        if name not in sessions:
            report.problems.append(f"staging file {name} has no session")
            if repair:
                data.remove_staging(name)
                report.repaired.append(f"removed staging file {name}")
    now = time.time()
    for s in sessions.values():
        if s.origin == "http" and s.expires_at is not None and s.expires_at <= now:
            report.problems.append(f"upload session {s.id} for {s.key} has expired")
            if repair:
                meta.delete_session(s.id)
                data.remove_staging(s.id)
                report.repaired.append(f"removed expired session {s.id}")
        elif not data.staging_exists(s.id):
            report.problems.append(f"upload session {s.id} for {s.key} has no staging file")
            if repair:
                meta.delete_session(s.id)
                report.repaired.append(f"removed session {s.id} without bytes")
    # The tree: every entry's parent is a directory, and key == parent.key/name.
    rows = meta.conn.execute(
        "SELECT c.id, c.key, c.name, p.id, p.kind, p.key FROM entries c"
        " LEFT JOIN entries p ON p.id = c.parent_id WHERE c.parent_id IS NOT NULL"
    )
    dangling: list[int] = []
    for cid, key, name, pid, pkind, pkey in rows:
        if pid is None:
            report.problems.append(f"{key}: its parent directory is missing")
            dangling.append(cid)
        elif pkind != "dir":
            report.problems.append(f"{key}: its parent {pkey} is not a directory")
            report.unrepaired.append(f"{key}: file/directory clash; rename one side")
        elif key != (f"{pkey}/{name}" if pkey else name):
            report.problems.append(f"{key}: key does not match its place {pkey}/{name}")
            report.unrepaired.append(f"{key}: key out of step with the tree")
    if dangling and repair:
        _reattach(store, dangling, report)
    return report


def _reattach(store: ArtifactStore, ids: list[int], report: FsckReport) -> None:
    """Give entries whose parent row vanished their directory rows back, from their keys."""
    meta = store.meta
    for cid in ids:
        e = meta.entry(cid)
        if e is None:
            continue
        with meta.transaction():
            parent_id = store._ensure_parents(e.key)
            meta.update_attrs(cid, parent_id=parent_id)
        report.repaired.append(f"{e.key}: recreated its parent directories")
