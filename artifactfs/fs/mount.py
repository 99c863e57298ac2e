"""Run the mount of one open store until it is unmounted or cancelled."""

from __future__ import annotations

import logging
import os

import pyfuse3
import trio

from ..store import ArtifactStore
from .kernel_cache import KernelCache
from .mountpoint import raise_read_ahead
from .operations import Operations
from .shared_reads import raise_fd_limit

log = logging.getLogger("artifactfs.mount")

# The kernel's INIT normally arrives within milliseconds of the mount; past this we report
# ready anyway (a caller that touches the mount then simply waits for the kernel).
INIT_WAIT = 10.0


def mount_options(store: ArtifactStore, *, allow_other: bool) -> set[str]:
    """Mount-level options only (docs/PLATFORM.md, Mount options: pyfuse3 refuses the rest)."""
    # The data directory as the source (as sshfs shows user@host:path): `mount` and `df` tell
    # the user which store is mounted, and `artifactfs umount` finds whose lock to wait for.
    source = os.fspath(store.data.root).replace("\\", "\\\\").replace(",", "\\,")
    options = set(pyfuse3.default_options)  # default_permissions: mode bits are enforced
    # nosuid, nodev: libfuse's defaults, stated because the mount relies on them (setuid bits
    # are kept as metadata only; operations.py, enable_killpriv_v2).
    options |= {f"fsname={source}", "subtype=artifactfs", "noatime", "nosuid", "nodev"}
    if allow_other:
        options.add("allow_other")
    return options


async def serve_mount(
    store: ArtifactStore,
    mountpoint: str,
    *,
    allow_other: bool = False,
    passthrough: bool = True,
    passthrough_writes: bool = True,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount ``store`` at ``mountpoint`` and answer the kernel until unmounted or cancelled.

    ``task_status.started()`` is called once the kernel has connected. Returns when someone
    unmounts (``fusermount3 -u``, ``artifactfs umount``); on cancellation (SIGINT/SIGTERM in
    the daemon) it unmounts itself, lazily if files are still open. ``passthrough`` (the
    default) asks the kernel to read committed artifacts from their blobs (passthrough.py;
    logged at INIT when it cannot, and the mount then works as without it);
    ``passthrough_writes`` (the default too) lets the kernel write new write-only files
    (passthrough_writes.py).
    """
    cache = KernelCache()
    raise_fd_limit()  # before Operations sizes its shared read handles to it
    ops = Operations(store, cache, passthrough=passthrough,
                     passthrough_writes=passthrough_writes)
    pyfuse3.init(ops, mountpoint, mount_options(store, allow_other=allow_other))
    log.info("mounted %s at %s", store.data.root, mountpoint)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.run)

            async def answer_kernel() -> None:
                await pyfuse3.main()
                log.info("%s was unmounted", mountpoint)
                nursery.cancel_scope.cancel()

            nursery.start_soon(answer_kernel)
            with trio.move_on_after(INIT_WAIT):
                await ops.initialized.wait()
            # Only after INIT: the kernel sets the bdi's read-ahead from the INIT reply
            # (min(bdi, max_readahead = 128 KiB)), undoing a raise made before it.
            raise_read_ahead(mountpoint)
            task_status.started()
    finally:
        busy = ops.open_handles()
        shared = ops.shared.stats()
        pyfuse3.close(unmount=True)
        log.info("mount at %s closed%s", mountpoint,
                 f" ({busy} files were still open; detached)" if busy else "")
        if shared:
            # The tests read this line: it shows the C open path in use (shared_reads.py).
            log.info("shared read handles: %(opens_answered)d opens and "
                     "%(releases_answered)d releases answered by pyfuse3", shared)
