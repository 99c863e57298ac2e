"""What the daemon does differently under systemd: log to the journal, report readiness.

Both follow systemd's documented protocols (no library needed): a unit's stderr is the journal
when ``JOURNAL_STREAM`` names exactly the file stderr is (systemd.exec(5)); readiness is one
datagram to ``NOTIFY_SOCKET`` (sd_notify(3)).
"""

from __future__ import annotations

import contextlib
import os
import socket


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd connected this process (or its parent) to.

    ``JOURNAL_STREAM`` ("DEVICE:INODE") is inherited by everything a unit starts, including
    shells whose stderr goes elsewhere, so the variable alone is not enough: it must name the
    file stderr is.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def notify(state: str) -> bool:
    """Send ``state`` ("READY=1", ...) to systemd if it asked for it (Type=notify units).

    Returns whether a message was sent. Never raises: readiness reporting must not stop the
    daemon.
    """
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path  # "@": the abstract namespace
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(state.encode())
        return True
    return False
