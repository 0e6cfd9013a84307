"""Command-line interface: argument parsing only; every command is a call into the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from repro_merge import __version__
from repro_merge.errors import ReproMergeError


def _cmd_fixtures(args: argparse.Namespace) -> int:
    from repro_merge.fixtures import write_fixtures

    files = write_fixtures(Path(args.out))
    print(f"wrote {len(files)} files under {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repro-merge",
        description="Rebuild Chinese-LLaMA/Alpaca full weights byte-identically to the upstream scripts.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("fixtures", help="write the deterministic tiny model family into a new folder")
    p.add_argument("out", metavar="OUT", help="folder to create (must not exist or be empty)")
    p.set_defaults(func=_cmd_fixtures)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ReproMergeError as e:
        print(f"repro-merge: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
