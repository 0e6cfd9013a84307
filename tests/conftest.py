"""Shared fixtures: the tiny model family is generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from repro_merge.checksums import sha256_file
from repro_merge.fixtures import write_fixtures

GOLDEN = Path(__file__).parent / "golden"

# Property tests: a quick default, and `HYPOTHESIS_PROFILE=thorough` for a long run before a release.
_slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("default", max_examples=50, deadline=None, suppress_health_check=_slow_ok)
settings.register_profile("thorough", max_examples=3000, deadline=None, suppress_health_check=_slow_ok)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below root."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny family (read-only for tests: copy before changing anything)."""
    out = tmp_path_factory.mktemp("fixtures") / "family"
    write_fixtures(out)
    return out
