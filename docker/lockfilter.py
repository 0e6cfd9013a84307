"""Select requirement blocks (``name==version`` plus its ``--hash`` lines) from a hash-locked file.

Used on the host (nox ``wheelhouse``) and inside the Docker build, so both read the committed
``lockfiles/runtime.txt`` itself and never a hand-made copy of its hashes:

    python3 docker/lockfilter.py LOCK --only setuptools wheel     # the build tools
    python3 docker/lockfilter.py LOCK --exclude sentencepiece     # everything installed as a wheel
    python3 docker/lockfilter.py LOCK --only sentencepiece        # the sdist built in the image

Standard library only (the image's python3 has nothing else). Fails if a named package is not in the lock.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==")


def normalize(name: str) -> str:
    """PEP 503 name normalization (``Typing_Extensions`` == ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def blocks(text: str) -> list[tuple[str, str]]:
    """(normalized name, block text) per requirement; comment-only lines are dropped."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _NAME.match(line)
        if m:
            out.append((normalize(m.group(1)), [line]))
        elif out and line[:1].isspace():
            out[-1][1].append(line)
        else:
            raise SystemExit(f"lockfilter: unexpected line in lock: {line!r}")
    return [(name, "\n".join(lines) + "\n") for name, lines in out]


def select(text: str, only: list[str] | None, exclude: list[str]) -> str:
    """The blocks named in ``only`` (all if None) minus those in ``exclude``; every name must exist."""
    found = blocks(text)
    names = {n for n, _ in found}
    wanted = {normalize(n) for n in only} if only is not None else None
    dropped = {normalize(n) for n in exclude}
    missing = ((wanted or set()) | dropped) - names
    if missing:
        raise SystemExit(f"lockfilter: not in the lock: {', '.join(sorted(missing))}")
    return "".join(b for n, b in found if (wanted is None or n in wanted) and n not in dropped)


def main(argv: list[str] | None = None) -> int:
    """Print the selected blocks of LOCK to stdout."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lock", type=Path)
    p.add_argument("--only", nargs="+", metavar="NAME", help="keep only these packages")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NAME", help="drop these packages")
    args = p.parse_args(argv)
    sys.stdout.write(select(args.lock.read_text(), args.only, args.exclude))
    return 0


if __name__ == "__main__":
    sys.exit(main())
