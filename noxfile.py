"""Sessions: thin wrappers over the CLI and the test runner, each in a venv built from hash-locked files."""

from __future__ import annotations

import difflib
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

PYTHON = "3.11"
ROOT = Path(__file__).parent
LOCKS = ROOT / "lockfiles"
# Locks are resolved as of this instant, so `nox -s lock` regenerates byte-identical files until the
# date is moved on purpose (and the new locks are reviewed and committed).
LOCK_DATE = "2026-11-01T00:00:00Z"
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_17"]
# name -> what `uv pip compile` reads
LOCK_SOURCES: dict[str, list[str]] = {
    "runtime.txt": ["pyproject.toml"],
    "dev.txt": ["pyproject.toml", "--extra", "dev"],
    "lint.txt": ["--group", "pyproject.toml:lint"],
    "tools.txt": ["--group", "pyproject.toml:tools"],
}


def install_locked(session: nox.Session, lock: str = "dev.txt") -> None:
    """The pinned stack from a lock, every file hash-checked, then this package without dependencies."""
    session.install("--require-hashes", "-r", str(LOCKS / lock))
    session.install("--no-deps", "-e", str(ROOT))


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite inside the pinned stack (`nox -s tests -- -k name` passes pytest options)."""
    install_locked(session)
    session.run("pytest", "-n", "2", "-m", "not slow", *session.posargs)


@nox.session(python=PYTHON)
def slow(session: nox.Session) -> None:
    """The slow tests (multi-GB files); run before resolving anything that touches them."""
    install_locked(session)
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the package, tests and this file."""
    session.install("--require-hashes", "-r", str(LOCKS / "lint.txt"))
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "--diff", "src", "tests", "benchmarks", "noxfile.py")


SIZES = ("tiny", "7B", "13B", "33B")
MODELS = ("llama", "llama-plus", "alpaca", "alpaca-plus", "alpaca-pro")
TARGETS = [f"{s}-{m}" for s in SIZES for m in MODELS]


@nox.session(python=PYTHON)
def merge(session: nox.Session) -> None:
    """Build and gate one target: `nox -s merge -- 13B alpaca-plus [--lora DIR]` (default: the tiny one)."""
    install_locked(session, "runtime.txt")
    session.run("repro-merge", "build", *(session.posargs or ["tiny", "alpaca-plus"]))


@nox.session(python=PYTHON, name="build")
@nox.parametrize("target", TARGETS, ids=TARGETS)
def build_target(session: nox.Session, target: str) -> None:
    """One session per size x model (`nox -l`); inputs from $REPRO_MERGE_LLAMA / $REPRO_MERGE_LORA."""
    install_locked(session, "runtime.txt")
    size, model = target.split("-", 1)
    session.run("repro-merge", "build", size, model, *session.posargs)


@nox.session(python=PYTHON)
def verify(session: nox.Session) -> None:
    """Gate an existing folder: `nox -s verify -- --model 13B-alpaca-plus out/13B-alpaca-plus`."""
    install_locked(session, "runtime.txt")
    session.run(
        "repro-merge", "verify", *(session.posargs or ["--model", "tiny-alpaca-plus", "out/tiny-alpaca-plus"])
    )


@nox.session(python=PYTHON)
def fixtures(session: nox.Session) -> None:
    """Write the tiny model family: `nox -s fixtures -- OUT` (default ./out/fixtures)."""
    install_locked(session, "runtime.txt")
    session.run("repro-merge", "fixtures", *(session.posargs or ["out/fixtures"]))


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks with peak RSS and throughput: `nox -s bench -- ptzip [--dir /dev/shm/x] [--repeat 3]`."""
    install_locked(session)
    names = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py"))
    which, *rest = session.posargs or [""]
    if which not in names:
        session.error(f"name a benchmark: nox -s bench -- {{{','.join(names)}}} [options]")
    session.run("python", str(ROOT / "benchmarks" / f"bench_{which}.py"), *rest)


def _compile(session: nox.Session, name: str, out: Path) -> None:
    session.run(
        "uv",
        "pip",
        "compile",
        "--quiet",
        "--generate-hashes",
        "--custom-compile-command",
        "nox -s lock",
        *PLATFORM,
        "--exclude-newer",
        LOCK_DATE,
        "--output-file",
        str(out),
        *LOCK_SOURCES[name],
        external=True,
    )


@nox.session(venv_backend="none")
def lock(session: nox.Session) -> None:
    """Regenerate lockfiles/ from pyproject.toml; `nox -s lock -- --check` fails if they would change."""
    check = "--check" in session.posargs
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for name in LOCK_SOURCES:
            target = LOCKS / name
            out = Path(tmp, name) if check else target
            _compile(session, name, out)
            if check and out.read_text() != target.read_text():
                stale.append(name)
                diff = difflib.unified_diff(
                    target.read_text().splitlines(), out.read_text().splitlines(), str(target), "regenerated"
                )
                print("\n".join(diff))
        if stale:
            session.error(f"lock files out of date: {', '.join(stale)}; run `nox -s lock` and commit")
