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
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ArtifactError
from ..models import validate_name
from .blobs import fsync_path, sha256_of_path
from .schema import ROOT_ID

if TYPE_CHECKING:
    from .service import ArtifactStore

log = logging.getLogger("artifactfs.recovery")


def recover(store: ArtifactStore) -> None:
    meta, data = store.meta, store.data
    # First: commits acknowledged before the process stopped whose batch the database never
    # got (commitlog.py). Everything below then sees them like any other row.
    redone = meta.replay_log(store.replay_logged)
    if redone:
        log.warning("redid %d commits from the commit log", redone)
    marker = data.root / "clean"
    was_clean = marker.exists()
    if was_clean:
        marker.unlink()
        fsync_path(data.root)
    now = int(time.time())
    # Same boot: only the process died and the page cache kept every acknowledged byte. A new
    # boot (or none to compare): the machine restarted, and what was not fsynced may be lost.
    boot = _boot_id()
    rebooted = boot is None or meta.info("boot_id") != boot
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
                length = 0  # nothing received yet (the first bytes make the file), or lost
            # After a power loss the file's length may have survived with a page inside it
            # lost: resume from what the flusher had fsynced (schema.py, durable_offset).
            keep = min(s.offset, length,
                       meta.durable_offset(s.id) if rebooted and not was_clean else s.offset)
            if keep < s.offset:
                # Bytes acknowledged but not on disk did not survive: resume from what did.
                meta.set_session_offset(s.id, keep)
                meta.set_durable_offsets([(s.id, keep)])
                log.warning("upload session %s resumes at %d, not %d", s.id, keep, s.offset)
    live = {s.id for s in meta.all_sessions()}
    for name in list(data.iter_staging_ids()):
        if name not in live:
            data.remove_staging(name)
            log.info("removed staging file %s without a session", name)
    for e in meta.pending_files_without_session():
        meta.delete_entry(e.id)
    if not was_clean:
        _verify_not_durable(store, rebooted=rebooted)
        removed = remove_orphan_blobs(store)
        if removed:
            log.info("removed %d blobs no artifact points at", removed)
    # Only now: a start interrupted after a reboot must verify as after a reboot again.
    if boot is not None:
        meta.set_info("boot_id", boot)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _verify_not_durable(store: ArtifactStore, *, rebooted: bool) -> None:
    """Rows committed without fsync: keep those whose bytes survived; for the others, put
    back the durable version they replaced if it is intact (schema.py, `superseded`), else
    drop them.

    A row whose digest was still pending (digests.py) has nothing to check its bytes
    against. After a daemon crash alone the page cache kept every byte, so it is kept, with
    the digest of what its blob holds. After a power loss its bytes may be torn anywhere
    inside a surviving length (the POSIX model tests/lazyfs.py enforces), so it goes like a
    torn row: it was not durable yet, which is what fsync before close is for."""
    meta, data = store.meta, store.data
    after = 0
    while rows := meta.not_durable_after(after, 1000):
        after = rows[-1].id
        good: list[tuple[int, str]] = []
        for e in rows:
            assert e.blob_id is not None
            if e.sha256 is None and rebooted:
                found = None  # cannot be verified
            else:
                found = sha256_of_path(data.blob_path(e.blob_id))
            if found is not None and found == (e.sha256 or found[0], e.size):
                if e.sha256 is None:
                    with meta.transaction():
                        meta.set_digest(e.id, e.blob_id, found[0])
                good.append((e.id, e.blob_id))
                continue
            old = meta.superseded(e.id)
            # The kept version was durable (its blob fsynced) before it was replaced; a
            # pending digest there is checked by length (durable bytes are not torn).
            if old is not None and _intact(data.blob_path(old[0]), old[1], old[2]):
                log.error("artifact %s lost its newest bytes in a power loss; its previous"
                          " version is back", e.key)
                with meta.transaction():
                    meta.restore_superseded(e.id)
            else:
                log.error("artifact %s lost its bytes in a crash; removing it", e.key)
                meta.delete_entry(e.id)
            data.remove_blob(e.blob_id)
        data.fsync_blobs([b for _, b in good])
        with meta.transaction():
            meta.mark_verified(good)
    # What is left superseded a version that survived (now durable) or an entry gone: the
    # old blobs become orphans, removed next.
    meta.clear_superseded()


def _intact(path: Path, sha256: str | None, size: int) -> bool:
    found = sha256_of_path(path)
    return found is not None and found == (sha256 or found[0], size)


def remove_orphan_blobs(store: ArtifactStore, *, dry_run: bool = False) -> int:
    """Remove (or count) blobs no row points at: the sorted blob ids of the rows merged with
    the sorted blob directories, one directory's names in memory at a time."""
    removed = 0
    used = store.meta.blob_ids_sorted()
    pending = next(used, None)
    for sub in sorted(store.data.blobs.iterdir()):
        if not sub.is_dir():
            continue
        # Blob ids are lowercase hex and each directory is named by their first two
        # characters, so directories in name order meet the ids in the same order.
        while pending is not None and pending < sub.name:
            pending = next(used, None)
        in_sub: set[str] = set()
        while pending is not None and pending.startswith(sub.name):
            in_sub.add(pending)
            pending = next(used, None)
        for f in sub.iterdir():
            if f.name not in in_sub:
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
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.problems

    def damage(self, problem: str, *, fixed: str | None = None, advice: str | None = None,
               repair: bool = False) -> None:
        """Record a problem; ``fixed`` says what --repair did, ``advice`` what it cannot do."""
        self.problems.append(problem)
        if advice is not None:
            self.unrepaired.append(advice)
        elif repair and fixed is not None:
            self.repaired.append(fixed)


def fsck(store: ArtifactStore, *, repair: bool = False) -> FsckReport:
    """Check every row against its blob, every file on disk against the rows, every session
    and the tree's invariants; with ``repair``, fix what is safe.

    Runs on a data directory whose lock the caller holds and that start-up recovery has NOT
    touched: recovery cleans crash leftovers silently, which would hide them from the report.
    Safe to repair: files no row points at, sessions no one can resume (expired, without
    bytes, a mount write whose daemon is gone), pending files without a session, and lost
    directory rows (recreated from the keys under them). Not safe: an artifact whose bytes
    are missing or differ from its digest, a file/directory clash, a key out of step with
    the tree. Those are reported with what the user can do.
    """
    meta, data = store.meta, store.data
    report = FsckReport()
    _check_database(store, report)
    if report.unrepaired:
        return report  # a damaged database: the rows cannot be trusted for the rest
    _check_artifacts(store, report, repair)
    _check_blobs(store, report, repair)
    _check_sessions(store, report, repair)
    _check_tree(store, report, repair)
    report.counts = {
        "entries": meta.conn.execute("SELECT count(*) FROM entries").fetchone()[0],
        "sessions": len(meta.all_sessions()),
        "blobs": sum(1 for _ in data.iter_blob_ids()),
    }
    return report


def _check_database(store: ArtifactStore, report: FsckReport) -> None:
    rows = [r[0] for r in store.meta.conn.execute("PRAGMA integrity_check")]
    if rows != ["ok"]:
        report.problems += [f"database: {r}" for r in rows[:20]]
        report.unrepaired.append(
            "meta.db is damaged: restore it from a backup (sqlite3 .recover can salvage rows)")
    root = store.meta.entry(ROOT_ID)
    if root is None or not root.is_dir or root.key != "" or root.parent_id is not None:
        report.problems.append("the root directory row (id 1) is missing or altered")
        report.unrepaired.append("the root directory row is damaged: restore meta.db")


def _check_artifacts(store: ArtifactStore, report: FsckReport, repair: bool) -> None:
    data = store.data
    pending: list[tuple[int, str, str]] = []
    for e in store.meta.iter_artifacts():
        report.checked += 1
        assert e.blob_id is not None
        found = sha256_of_path(data.blob_path(e.blob_id))
        if found is None:
            report.damage(f"{e.key}: blob {e.blob_id} is missing",
                          advice=f"{e.key}: its bytes are gone; delete it or re-upload it")
        elif e.sha256 is None and found[1] == e.size:
            # A digest still pending (digests.py): the daemon records it when it next runs,
            # or this repair does (after the scan: not under its open cursor). Only for a
            # durable version: one that is not may hold torn bytes after a power loss, and
            # start-up, which knows whether the machine restarted, decides about it.
            if store.meta.is_durable(e):
                pending.append((e.id, e.blob_id, found[0]))
        elif found != (e.sha256, e.size):
            report.damage(
                f"{e.key}: blob has {found[1]} bytes sha256 {found[0][:12]}, row says"
                f" {e.size} bytes sha256 {(e.sha256 or '')[:12]}",
                advice=f"{e.key}: torn or altered bytes; delete it or re-upload it")
    if repair and pending:
        with store.meta.transaction():
            for entry_id, blob_id, sha in pending:
                store.meta.set_digest(entry_id, blob_id, sha)


def _check_blobs(store: ArtifactStore, report: FsckReport, repair: bool) -> None:
    orphans = remove_orphan_blobs(store, dry_run=not repair)
    if orphans:
        report.damage(f"{orphans} blobs no artifact points at",
                      fixed=f"removed {orphans} orphan blobs", repair=repair)


def _check_sessions(store: ArtifactStore, report: FsckReport, repair: bool) -> None:
    meta, data = store.meta, store.data
    sessions = {s.id: s for s in meta.all_sessions()}
    for name in list(data.iter_staging_ids()):
        if name not in sessions:
            report.damage(f"staging file {name} has no session",
                          fixed=f"removed staging file {name}", repair=repair)
            if repair:
                data.remove_staging(name)
    now = time.time()
    for s in sessions.values():
        gone = None
        try:
            length: int | None = os.stat(data.staging_path(s.id)).st_size
        except FileNotFoundError:
            length = None
        if s.origin == "mount":
            # We hold the lock, so no daemon runs: the writer of this file is gone for good.
            gone = f"mount write session {s.id} for {s.key} outlived its daemon"
        elif s.expires_at is not None and s.expires_at <= now:
            gone = f"upload session {s.id} for {s.key} has expired"
        elif length is None and s.offset > 0:
            gone = f"upload session {s.id} for {s.key} has no staging file"
        elif s.size is None or not 0 <= s.offset <= s.size:
            gone = f"upload session {s.id} for {s.key} has offset {s.offset} of size {s.size}"
        if gone is not None:
            report.damage(gone, fixed=f"removed session {s.id}", repair=repair)
            if repair:
                e = meta.entry(s.entry_id) if s.entry_id is not None else None
                with meta.transaction():
                    meta.delete_session(s.id)
                    if e is not None and e.is_file and e.blob_id is None:
                        meta.delete_entry(e.id)
                data.remove_staging(s.id)
            continue
        if length is None:  # offset 0: nothing received yet, so no file yet
            continue
        if length < s.offset:
            report.damage(
                f"upload session {s.id} for {s.key}: {s.offset} bytes acknowledged,"
                f" {length} on disk",
                fixed=f"session {s.id} resumes at {length}", repair=repair)
            if repair:
                meta.set_session_offset(s.id, length)
    for e in meta.pending_files_without_session():
        report.damage(f"{e.key}: a file being written with no write session",
                      fixed=f"removed the unfinished file {e.key}", repair=repair)
        if repair:
            meta.delete_entry(e.id)


def _check_tree(store: ArtifactStore, report: FsckReport, repair: bool) -> None:
    """Every entry's parent is a directory, key == parent.key/name, names obey the rules."""
    meta = store.meta
    rows = meta.conn.execute(
        "SELECT c.id, c.key, c.name, c.kind, c.blob_id, p.id, p.kind, p.key FROM entries c"
        " LEFT JOIN entries p ON p.id = c.parent_id WHERE c.id != ?", (ROOT_ID,)
    ).fetchall()
    dangling: list[int] = []
    for cid, key, name, kind, blob_id, pid, pkind, pkey in rows:
        try:
            validate_name(name)
        except ArtifactError as exc:
            report.damage(f"{key}: name {name!r} breaks a key rule ({exc})",
                          advice=f"{key}: rename it through the mount")
            continue
        if kind != "file" and blob_id is not None:
            report.damage(f"{key}: a {kind} that points at blob {blob_id}",
                          advice=f"{key}: a {kind} row holds bytes; restore meta.db")
        if pid is None:
            report.damage(f"{key}: its parent directory is missing",
                          fixed=f"{key}: recreated its parent directories", repair=repair)
            dangling.append(cid)
        elif pkind != "dir":
            report.damage(f"{key}: its parent {pkey} is a {pkind}, not a directory",
                          advice=f"{key}: file/directory clash with {pkey}; delete one side")
        elif key != (f"{pkey}/{name}" if pkey else name):
            report.damage(f"{key}: key does not match its place {pkey}/{name}",
                          advice=f"{key}: key out of step with the tree; restore meta.db")
    if dangling and repair:
        _reattach(store, dangling, report)


def _reattach(store: ArtifactStore, ids: list[int], report: FsckReport) -> None:
    """Give entries whose parent row vanished their directory rows back, from their keys."""
    meta = store.meta
    for cid in ids:
        e = meta.entry(cid)
        if e is None:
            continue
        try:
            with meta.transaction():
                parent_id = store._ensure_parents(e.key)
                meta.update_attrs(cid, parent_id=parent_id)
        except ArtifactError as exc:
            report.repaired.remove(f"{e.key}: recreated its parent directories")
            report.unrepaired.append(f"{e.key}: cannot recreate its parents: {exc}")
