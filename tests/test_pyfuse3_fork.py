"""The pyfuse3 in .venv is the fork scripts/setup builds from patches/pyfuse3, all of it.

The mount works on the stock release too, only slower (README.md, "Without the fork"), so
nothing else would notice a set-up that installed the stock one or an older series. Not run
against .venv-stock: these tests are the difference.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from artifactfs.fs import operations, passthrough, shared_reads

FORK = Path(__file__).resolve().parent.parent / "patches" / "pyfuse3"


def series() -> list[str]:
    return [n for n in (FORK / "series").read_text().splitlines() if n and not n.startswith("#")]


def test_the_series_names_every_patch_once() -> None:
    names = series()
    assert len(names) == len(set(names)), names
    assert sorted(names) == sorted(p.name for p in FORK.glob("*.patch"))


def test_pyfuse3_is_the_fork_at_the_series_version() -> None:
    # The last patch sets the version (patches/README.md): the installed one must be it.
    versions = re.findall(r"^\+Version: (\S+)$", (FORK / series()[-1]).read_text(), re.M)
    assert versions and "+artifactfs." in versions[0], series()[-1]
    assert importlib.metadata.version("pyfuse3") == versions[0]


def test_the_fork_has_what_the_mount_looks_for() -> None:
    assert operations.OPEN_FLAGS  # cache-readdir, noflush
    assert not operations.STOCK_PYFUSE3
    assert passthrough.available()  # passthrough, built against libfuse 3.17
    assert shared_reads.AVAILABLE and shared_reads.PASSTHROUGH  # shared-read-handles
