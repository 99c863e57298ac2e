"""Helpers for the tests that call the mount's Operations directly, without a kernel
(tests/test_fs_*.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest


def fields(**set_: bool) -> Any:
    """A pyfuse3.SetattrFields stand-in with the named fields set."""
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
             "update_gid", "update_size")
    return SimpleNamespace(**{n: set_.get(n, False) for n in names})


async def fuse_errno(coro: Any) -> int:
    """The errno a handler fails with (it must fail)."""
    with pytest.raises(pyfuse3.FUSEError) as e:
        await coro
    return e.value.errno
