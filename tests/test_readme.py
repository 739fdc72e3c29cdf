"""Every ```python block of README.md runs as written (in a temporary directory, offline, CPU).

A block whose first line is ``# not run: <reason>`` is skipped (it needs data, a network or more
than a few seconds). Each block runs with ``exec`` in its own namespace and its own temporary working
directory; a failure names the README line where the block starts.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"#\s*not run:\s*\S")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number of the opening fence, code)`` of every ```python block."""
    blocks, lines, start, body = [], text.splitlines(), None, []
    for number, line in enumerate(lines, start=1):
        if start is None and line.strip() == "```python":
            start, body = number, []
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(body) + "\n"))
            start = None
        elif start is not None:
            body.append(line)
    assert start is None, f"README.md:{start}: unterminated ```python block"
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks_that_run():
    assert [code for _, code in BLOCKS if not SKIP.match(code.lstrip())], "no executed Python block in README.md"


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block(line, code, tmp_path, monkeypatch):
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if SKIP.match(first):
        pytest.skip(f"README.md:{line}: {first.strip()}")
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    except Exception:  # noqa: BLE001 - report any failure with the block's line
        pytest.fail(f"README.md block at line {line} failed:\n{traceback.format_exc()}", pytrace=False)
