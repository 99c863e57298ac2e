"""The README's Python example runs as written (against a temporary data directory)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path: Path) -> None:
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README lost its Python example"
    code = block.group(1).replace('"/tmp/artifacts"', repr(str(tmp_path / "data")))
    assert repr(str(tmp_path / "data")) in code, "the example's data directory moved"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "key='datasets/v1/train.jsonl'" in out
    assert "b'hello'" in out
    assert (tmp_path / "data" / "meta.db").exists()
