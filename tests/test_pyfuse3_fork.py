"""The pyfuse3 in .venv is the fork scripts/setup builds from patches/pyfuse3, all of it.

The mount works on the stock release too, only slower (README.md, "Without the fork"), so
nothing else would notice a set-up that installed the stock one or an older series. Not run
against .venv-stock: these tests are the difference.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from artifactfs.fs import operations, passthrough, shared_reads

ROOT = Path(__file__).resolve().parent.parent
FORK = ROOT / "patches" / "pyfuse3"


def series() -> list[str]:
    return [n for n in (FORK / "series").read_text().splitlines() if n and not n.startswith("#")]


def test_the_series_names_every_patch_once() -> None:
    names = series()
    assert len(names) == len(set(names)), names
    assert sorted(names) == sorted(p.name for p in FORK.glob("*.patch"))


def test_the_release_pinned_is_the_one_artifactfs_requires() -> None:
    sdist = re.findall(r"^pyfuse3==(\S+) --hash=sha256:[0-9a-f]{64}$",
                       (FORK / "sdist.txt").read_text(), re.M)
    assert len(sdist) == 1, "sdist.txt pins one pyfuse3 release by sha256"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"pyfuse3=={sdist[0]}" in project["dependencies"]


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
