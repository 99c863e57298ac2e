"""Layer 6, a real mount: every example in docs/SEMANTICS.md runs and prints what it says.

A ```sh block is a session: ``$ `` starts a command, the lines after it are its expected output
(stdout and stderr together), run with LC_ALL=C by ``sh -c`` in a fresh directory in the mount.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from mountutil import Mount, mount_fixture

pytestmark = [pytest.mark.mount, pytest.mark.stock]

mount = mount_fixture()

DOC = Path(__file__).resolve().parent.parent / "docs" / "SEMANTICS.md"


def sessions() -> list[tuple[int, list[tuple[str, str]]]]:
    """(line number, [(command, expected output)]) for every ```sh block with commands."""
    out = []
    lines = DOC.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            start, i = i + 1, i + 1
            steps: list[tuple[str, str]] = []
            while lines[i].strip() != "```":
                if lines[i].startswith("$ "):
                    steps.append((lines[i][2:], ""))
                elif steps:
                    cmd, expected = steps[-1]
                    steps[-1] = (cmd, expected + lines[i] + "\n")
                i += 1
            if steps:
                out.append((start, steps))
        i += 1
    return out


@pytest.mark.parametrize("session", sessions(), ids=lambda s: f"line{s[0]}")
def test_example(session: tuple[int, list[tuple[str, str]]], mount: Mount) -> None:
    line, steps = session
    workdir = mount.path / f"example_line{line}"
    workdir.mkdir()
    env = dict(os.environ, LC_ALL="C", MNT=os.fspath(mount.path), DIR=workdir.name)
    for cmd, expected in steps:
        r = subprocess.run(["sh", "-c", cmd], cwd=workdir, env=env, capture_output=True,
                           timeout=60, check=False)
        got = (r.stdout + r.stderr).decode(errors="replace")
        assert _normal(got) == _normal(expected), f"docs/SEMANTICS.md line {line}: $ {cmd}"


def _normal(text: str) -> str:
    return re.sub(r"[ \t]+\n", "\n", text).rstrip("\n")
