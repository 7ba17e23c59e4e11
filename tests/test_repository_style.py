"""Repository hygiene that needs no model code: every git-tracked Python file keeps its lines at most 120 characters.

The files are those ``git ls-files '*.py'`` lists, read from the working tree, so the test runs in well under a second
and is skipped when there is no ``git`` executable or the repository's ``.git`` is not there (e.g. an unpacked zip).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINE_LENGTH = 120


def _tracked_python_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout (no .git)")
    proc = subprocess.run(["git", "ls-files", "-z", "--", "*.py"], cwd=REPO, capture_output=True, timeout=60)
    if proc.returncode != 0:
        pytest.skip(f"git ls-files failed in {REPO}: {proc.stderr.decode(errors='replace').strip()}")
    return [REPO / name for name in proc.stdout.decode().split("\0") if name]


def test_tracked_python_lines_at_most_120_characters():
    """No line of a git-tracked ``*.py`` file (a tracked file deleted from the working tree aside) is longer than
    120 characters; the failure lists each offender as ``file:line:length``."""
    files = _tracked_python_files()
    assert files, f"git ls-files found no Python files in {REPO}"
    too_long = []
    for path in files:
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            length = len(line.rstrip("\r"))
            if length > MAX_LINE_LENGTH:
                too_long.append(f"{path.relative_to(REPO)}:{number}:{length}")
    assert not too_long, (f"{len(too_long)} line(s) longer than {MAX_LINE_LENGTH} characters:\n"
                          + "\n".join(too_long))
