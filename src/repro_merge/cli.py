"""Command-line interface: argument parsing only; every command is a call into the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from repro_merge import __version__
from repro_merge.arith import DEFAULT_ORDER, ORDERS
from repro_merge.errors import EXIT_BAD_INPUT, ReproMergeError

if TYPE_CHECKING:
    from repro_merge.build import Result


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


def _print_json(obj: object) -> None:
    import json

    print(json.dumps(obj, indent=2, default=str))


def _cmd_build(args: argparse.Namespace) -> int:
    from repro_merge.build import build

    given = (
        ("llama", args.llama),
        ("lora", args.lora),
        ("hf_base", args.hf_base),
        ("output_dir", args.output_dir),
        ("work", args.work),
    )
    opt = {k: Path(v) for k, v in given if v}
    r = build(
        args.size,
        args.model,
        output_type=args.output_type,
        order=args.order,
        diagnose_orders=args.diagnose_orders,
        **opt,
    )  # type: ignore[arg-type]
    return _report(r, args.json)


def _cmd_verify(args: argparse.Namespace) -> int:
    from repro_merge.build import verify_folder

    paths = {
        k: Path(v) if v else None
        for k, v in (("llama", args.llama), ("lora", args.lora), ("hf_base", args.hf_base))
    }
    return _report(verify_folder(args.model, Path(args.dir), args.output_type, **paths), args.json)


def _report(r: Result, as_json: bool) -> int:
    """A build's or a verification's verdict, as text or JSON; returns its exit code."""
    from dataclasses import asdict

    if as_json:
        _print_json(
            {
                "target": r.target,
                "verdict": r.verdict,
                "exit_code": r.exit_code,
                "output_dir": str(r.output_dir),
                "outputs": [asdict(c) for c in r.outputs],
                "findings": [asdict(f) for f in r.findings],
            }
        )
    else:
        print(r.summary())
    return r.exit_code


def _cmd_targets(args: argparse.Namespace) -> int:
    from repro_merge import checksums
    from repro_merge.build import describe_targets

    rows = describe_targets(checksums.load())
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'target':22} {'pth':11} {'huggingface':12} needs")
    for r in rows:
        print(f"{r['name']:22} {r['pth']:11} {r['huggingface']:12} {r['needs']}")
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from repro_merge.verify import make_manifest, manifest_bytes

    sys.stdout.write(manifest_bytes(make_manifest(Path(args.dir))).decode())
    return 0


def _flag(p: argparse.ArgumentParser, name: str, **kw: object) -> None:
    """``--input_dir`` as the upstream scripts spell it, and ``--input-dir`` too."""
    spellings = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])
    p.add_argument(*spellings, dest=name, **kw)  # type: ignore[arg-type]


def _inputs(p: argparse.ArgumentParser, note: str = "") -> None:
    g = p.add_argument_group("inputs", note or None)
    g.add_argument("--llama", metavar="DIR", help="original LLaMA root (default $REPRO_MERGE_LLAMA)")
    g.add_argument(
        "--lora", metavar="DIR", help="folder of released adapter folders (default $REPRO_MERGE_LORA)"
    )
    g.add_argument(
        "--hf-base",
        "--hf_base",
        dest="hf_base",
        metavar="DIR",
        help="an HF base to use instead of converting (default $REPRO_MERGE_HF_BASE)",
    )


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
        "any CPU), fma (MKL's AVX2 and AVX-512 kernels' order), host (this machine's BLAS, for diagnosis)",
    )
    p.add_argument("--verbose", action="store_true", help="accepted for compatibility with the script")
    p.set_defaults(func=_cmd_merge)

    from repro_merge.sizes import BUILD_SIZES, VARIANT_ADAPTERS

    p = sub.add_parser(
        "build", help="verify inputs, convert, merge, verify outputs: one target, gated by SHA256.md"
    )
    p.add_argument("size", metavar="SIZE", choices=list(BUILD_SIZES), help=", ".join(BUILD_SIZES))
    p.add_argument("model", metavar="MODEL", choices=list(VARIANT_ADAPTERS), help=", ".join(VARIANT_ADAPTERS))
    _inputs(p)
    p.add_argument(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        metavar="DIR",
        help="default $REPRO_MERGE_OUT/SIZE-MODEL, else ./out/SIZE-MODEL",
    )
    p.add_argument(
        "--output-type", "--output_type", dest="output_type", default="pth", choices=["pth", "huggingface"]
    )
    p.add_argument("--order", default=DEFAULT_ORDER, choices=ORDERS, help="LoRA product order (default seq)")
    p.add_argument(
        "--work", metavar="DIR", help="HF base and fixtures (default $REPRO_MERGE_WORK, else OUT/../.work)"
    )
    p.add_argument(
        "--diagnose-orders",
        action="store_true",
        default=None,
        help="on a mismatch, rebuild with every arithmetic order (default: tiny targets only)",
    )
    p.add_argument("--json", action="store_true", help="the verdict and findings as JSON")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser(
        "verify", help="check an existing output folder against SHA256.md, and say why it differs"
    )
    p.add_argument(
        "--model", required=True, metavar="NAME", help="a target as `repro-merge targets` prints it"
    )
    p.add_argument("dir", metavar="DIR")
    p.add_argument(
        "--output-type",
        "--output_type",
        dest="output_type",
        choices=["pth", "huggingface"],
        help="default: what the folder holds",
    )
    _inputs(p, "with the inputs, a mismatch is also rebuilt with every arithmetic order")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("targets", help="what can be built, what each target needs, which hashes are TBA")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_targets)

    p = sub.add_parser("manifest", help="every file's and tensor's hash in a folder, and the weights digest")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=_cmd_manifest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    # accelerate 0.18 (pinned, imported by transformers) warns that pkg_resources is deprecated: not ours
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ReproMergeError as e:
        print(f"repro-merge: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the file system said no (permissions, a full disk, a file where a folder goes)
        where = f"{e.filename}: " if e.filename else ""
        print(f"repro-merge: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
