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


def _cmd_convert(args: argparse.Namespace) -> int:
    from repro_merge.convert import convert

    files = convert(Path(args.input_dir), args.model_size, Path(args.output_dir), args.max_shard_size)
    print(f"wrote {len(files)} files to {args.output_dir}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from repro_merge.merge import merge

    loras = [s.strip() for s in args.lora_model.split(",") if s.strip()]
    files = merge(
        args.base_model, loras, args.output_type, Path(args.output_dir), args.num_shards, args.order
    )
    print(f"wrote {len(files)} files to {args.output_dir}")
    return 0


def _flag(p: argparse.ArgumentParser, name: str, **kw: object) -> None:
    """``--input_dir`` as the upstream scripts spell it, and ``--input-dir`` too."""
    spellings = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
    p.add_argument(*spellings, dest=name, **kw)  # type: ignore[arg-type]


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

    p = sub.add_parser(
        "convert",
        help="original LLaMA -> Hugging Face format (step 1), as transformers 4.28.1's converter writes it",
    )
    _flag(p, "input_dir", required=True, metavar="DIR", help="original LLaMA root: tokenizer.model, SIZE/")
    _flag(
        p, "model_size", required=True, choices=["7B", "13B", "30B", "33B", "65B"], help="33B lives in 30B/"
    )
    _flag(p, "output_dir", required=True, metavar="DIR", help="new or empty folder for the HF model")
    _flag(
        p, "max_shard_size", default="10GB", metavar="SIZE", help="shard split, as save_pretrained's (10GB)"
    )
    p.set_defaults(func=_cmd_convert)

    from repro_merge.arith import DEFAULT_ORDER, ORDERS

    p = sub.add_parser(
        "merge",
        help="merge one LoRA or two (in order) into the HF base (step 2), as the upstream script does",
    )
    _flag(p, "base_model", required=True, metavar="DIR", help="HF base (converted LLaMA), or a cached hub id")
    _flag(
        p,
        "lora_model",
        required=True,
        metavar="A[,B]",
        help="adapter folder(s) or cached hub id(s), in order",
    )
    _flag(p, "output_type", default="pth", choices=["pth", "huggingface"], help="default: pth")
    _flag(
        p, "output_dir", default="./merged_model", metavar="DIR", help="new or empty folder (./merged_model)"
    )
    _flag(
        p, "num_shards", type=int, metavar="N", help="pth files for a width that is no LLaMA size (default 1)"
    )
    _flag(
        p,
        "order",
        default=DEFAULT_ORDER,
        choices=ORDERS,
        help="fp32 summation order of the LoRA product: seq (the script's bytes on a generic-path MKL, on "
        "any CPU), fma (MKL's AVX2 kernels' order), host (this machine's BLAS, for diagnosis)",
    )
    p.add_argument("--verbose", action="store_true", help="accepted for compatibility with the script")
    p.set_defaults(func=_cmd_merge)
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
