"""Sessions: thin wrappers over the CLI and the test runner, each in a venv built from hash-locked files."""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import nox

ROOT = Path(__file__).parent
# The container sessions (wheelhouse, image, image_check) live in docker/noxsessions.py; loading it by path
# registers them here (a plain `import docker...` could pick up the PyPI package of that name).
_spec = importlib.util.spec_from_file_location(
    "repro_merge_docker_sessions", ROOT / "docker" / "noxsessions.py"
)
assert _spec and _spec.loader
sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up there
_spec.loader.exec_module(sys.modules[_spec.name])

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

PYTHON = "3.11"
LOCKS = ROOT / "lockfiles"
# Locks are resolved as of this instant, so `nox -s lock` regenerates byte-identical files until the
# date is moved on purpose (and the new locks are reviewed and committed).
LOCK_DATE = "2026-11-01T00:00:00Z"
# The image and CI run Debian bookworm (glibc 2.36): manylinux_2_28 admits the wheels numba and llvmlite
# ship (2_28 only), and every older manylinux tag.
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
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
    # no build isolation: the build backend is the lock's own setuptools, not an unpinned download
    session.install("--no-deps", "--no-build-isolation", "-e", str(ROOT))


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
    session.run("ruff", "check", "src", "tests", "benchmarks", "docker", "noxfile.py")
    session.run("ruff", "format", "--check", "--diff", "src", "tests", "benchmarks", "docker", "noxfile.py")


SIZES = ("tiny", "7B", "13B", "33B")
MODELS = ("llama", "llama-plus", "alpaca", "alpaca-plus", "alpaca-pro")
TARGETS = [f"{s}-{m}" for s in SIZES for m in MODELS]


def in_image(session: nox.Session, args: list[str], command: str = "build") -> None:
    """`repro-merge COMMAND ARGS` in the repro-merge image (`nox -s image` builds it): ./out is /out, so
    the outputs land in ./out owned by the caller's uid, and an argument `out/...` names the same folder;
    $REPRO_MERGE_LLAMA and $REPRO_MERGE_LORA, when set, are mounted read-only."""
    out = ROOT / "out"
    out.mkdir(exist_ok=True)
    mounts = ["-v", f"{out}:/out"]
    for env, target in (("REPRO_MERGE_LLAMA", "/models/llama"), ("REPRO_MERGE_LORA", "/models/lora")):
        if os.environ.get(env):
            mounts += ["-v", f"{os.environ[env]}:{target}:ro"]
    docker = os.environ.get("DOCKER", "/usr/bin/docker")
    user = f"{os.getuid()}:{os.getgid()}"
    args = ["/" + a if a.startswith("out/") else a for a in args]
    entry = [] if command == "build" else ["--entrypoint", "repro-merge"]
    cmd = [] if command == "build" else [command]
    session.run(
        docker, "run", "--rm", "--user", user, *mounts, *entry, "repro-merge", *cmd, *args, external=True
    )


def _split_docker(session: nox.Session) -> tuple[bool, list[str]]:
    """(`--docker` given, the other arguments)."""
    return "--docker" in session.posargs, [a for a in session.posargs if a != "--docker"]


@nox.session(python=PYTHON)
def merge(session: nox.Session) -> None:
    """Build and gate one target: `nox -s merge -- 13B alpaca-plus [--lora DIR]` (default: the tiny one);
    `-- --docker 13B alpaca-plus` runs it in the image instead of the pinned venv."""
    docker, args = _split_docker(session)
    args = args or ["tiny", "alpaca-plus"]
    if docker:
        in_image(session, args)
        return
    install_locked(session, "runtime.txt")
    session.run("repro-merge", "build", *args)


@nox.session(python=PYTHON, name="build")
@nox.parametrize("target", TARGETS, ids=TARGETS)
def build_target(session: nox.Session, target: str) -> None:
    """One session per size x model (`nox -l`); inputs from $REPRO_MERGE_LLAMA / $REPRO_MERGE_LORA;
    `-- --docker` runs it in the image."""
    docker, args = _split_docker(session)
    args = [*target.split("-", 1), *args]
    if docker:
        in_image(session, args)
        return
    install_locked(session, "runtime.txt")
    session.run("repro-merge", "build", *args)


@nox.session(python=PYTHON)
def golden(session: nox.Session) -> None:
    """CI's golden-hash regression: every tiny target, pth and huggingface, built and gated against the
    committed hashes (SHA256.md), in the pinned venv, or in the image with `-- --docker`."""
    docker, _ = _split_docker(session)
    if not docker:
        install_locked(session, "runtime.txt")
    where = "image" if docker else "venv"
    for model in MODELS:
        for kind in ("pth", "huggingface"):
            args = [
                "tiny",
                model,
                "--output-type",
                kind,
                "--output-dir",
                f"out/golden-{where}/tiny-{model}-{kind}",
            ]
            if docker:
                in_image(session, args)
            else:
                session.run("repro-merge", "build", *args)


@nox.session(python=PYTHON)
def verify(session: nox.Session) -> None:
    """Gate an existing folder: `nox -s verify -- --model 13B-alpaca-plus out/13B-alpaca-plus` (default:
    the tiny target `nox -s merge` builds); `-- --docker ...` in the image (the folder must be in ./out)."""
    docker, args = _split_docker(session)
    args = args or ["--model", "tiny-alpaca-plus", "out/tiny-alpaca-plus"]
    if docker:
        in_image(session, args, command="verify")
        return
    install_locked(session, "runtime.txt")
    session.run("repro-merge", "verify", *args)


@nox.session(python=PYTHON)
def fixtures(session: nox.Session) -> None:
    """Write the tiny model family: `nox -s fixtures -- OUT` (default ./out/fixtures)."""
    install_locked(session, "runtime.txt")
    session.run("repro-merge", "fixtures", *(session.posargs or ["out/fixtures"]))


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks with peak RSS and throughput. `nox -s bench [-- OPTIONS]` runs the pipeline benchmark
    (ours vs the references at real 7B shapes); `nox -s bench -- ptzip [OPTIONS]` the checkpoint I/O one."""
    install_locked(session)
    # Byte-compile the stack once (uv installs no .pyc, and with PYTHONDONTWRITEBYTECODE set none is ever
    # written), so that no measured run spends seconds compiling torch's and numba's sources.
    session.run("python", "-m", "compileall", "-q", "-j", "0", session.virtualenv.location, str(ROOT / "src"))
    names = sorted(p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py"))
    args = list(session.posargs)
    which = args.pop(0) if args and args[0] in names else "pipeline"
    session.run("python", str(ROOT / "benchmarks" / f"bench_{which}.py"), *args)


def _compile(session: nox.Session, name: str, out: Path) -> None:
    # uv comes with nox in the tools lock; its own finder works whether or not .tools/bin is on PATH.
    from uv import find_uv_bin

    session.run(
        find_uv_bin(),
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
