"""The console script: version, help, and one-line errors with the right exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import repro_merge


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "repro_merge.cli", *args], capture_output=True, text=True)


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"repro-merge {repro_merge.__version__}"
    assert repro_merge.__version__ != "0.0.0+unknown"


def test_help_lists_commands() -> None:
    r = run("--help")
    assert r.returncode == 0 and "fixtures" in r.stdout


def test_fixtures_into_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    r = run("fixtures", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "not an empty folder" in lines[0]


def test_file_system_errors_are_one_line(tmp_path: Path) -> None:
    """An OSError (here: a file where the output folder's parent should be) is no traceback."""
    (tmp_path / "file").write_text("")
    r = run("fixtures", str(tmp_path / "file" / "out"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"error: {tmp_path / 'file'}: " in lines[0], r.stderr
