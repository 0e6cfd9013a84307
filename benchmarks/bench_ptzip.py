"""ptzip vs torch.save/torch.load vs cp on a ~2 GB state dict with real 7B tensor shapes.

    python benchmarks/bench_ptzip.py [--layers 4] [--out out/bench]

Each step runs in a child process (peak RSS from wait4). Targets (issue: torch checkpoint I/O): a
streaming write peaks under 1.2x the largest tensor plus the interpreter; its time is within 1.2x of
`cp` of the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import drop_caches, fs_type, median_runs, python, table, write_json  # noqa: E402

from repro_merge import ptzip  # noqa: E402


def shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """A 7B-shaped state dict: embeddings (the largest tensor, 262 MB) and a few layers."""
    d, f, v = 4096, 11008, 32000
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{m}.weight", (d, d)) for m in "qkvo"]
        out += [
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
            (p + "mlp.up_proj.weight", (f, d)),
        ]
        out += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    return out


def value(i: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.full(shape, np.float16(i % 7 + 0.5), dtype=np.float16)


# ------------------------------------------------------------------------------------------ child steps


def child(op: str, layers: int, path: str = "", dst: str = "") -> None:
    items = shapes(layers)
    if op == "baseline-numpy":
        return
    if op == "baseline-torch":
        import torch  # noqa: F401

        return
    if op == "ours-write":
        specs = [
            (n, ptzip.TensorSpec(ptzip.DTYPES["float16"], s, i, int(np.prod(s))))
            for i, (n, s) in enumerate(items)
        ]
        ptzip.save(path, specs, lambda i, slot: value(i, items[i][1]), overlap=True)  # type: ignore[index, arg-type]
    elif op == "torch-save":
        import torch

        torch.save({n: torch.from_numpy(value(i, s)) for i, (n, s) in enumerate(items)}, path)
    elif op == "ours-read":
        with ptzip.Checkpoint(path) as ck:
            for name in ck.tensors:
                ck.tensor(name)
    elif op == "torch-load":
        import torch

        d = torch.load(path)
        assert len(d) == len(items)
    elif op == "ours-copy":  # read every tensor (CRC-checked) and write it out while the next is read
        with ptzip.Checkpoint(path) as ck:
            entries = [
                (n, ptzip.TensorSpec(m.dtype, m.shape, m.storage, m.storage_numel, m.stride, m.offset))
                for n, m in ck.tensors.items()
            ]
            ptzip.save(dst, entries, lambda key, slot: ck.read_storage(key), archive=path, overlap=True)  # type: ignore[arg-type]
    else:
        raise SystemExit(f"unknown step {op}")
    if op in ("ours-write", "torch-save", "ours-copy"):
        os.sync()  # a write is done when it is on disk; cp's row syncs too


# ------------------------------------------------------------------------------------------ driver


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="7B layers in the state dict (4: ~2.1 GB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per step; the median is reported")
    ap.add_argument(
        "--dir", type=Path, default=Path("out/bench"), help="where files are written (disk or tmpfs)"
    )
    ap.add_argument("--out", type=Path, default=Path("out/bench"), help="where the JSON report goes")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.layers, *args.child[1:])
        return

    work = args.dir / "ptzip-work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "a").mkdir(parents=True)
    (work / "b").mkdir()
    name = "pytorch_model-00001-of-00002.bin"
    ours, theirs = work / "a" / name, work / "b" / name
    items = shapes(args.layers)
    nbytes = sum(int(np.prod(s)) * 2 for _, s in items)
    largest = max(int(np.prod(s)) * 2 for _, s in items)
    me = [__file__, "--layers", str(args.layers), "--child"]

    base = median_runs(
        [
            ("interpreter+numpy", python(*me, "baseline-numpy"), 0),
            ("interpreter+torch", python(*me, "baseline-torch"), 0),
        ],
        1,
    )
    writes = median_runs(
        [
            ("torch.save", python(*me, "torch-save", str(theirs)), nbytes),
            ("ptzip write", python(*me, "ours-write", str(ours)), nbytes),
            ("cp", ["sh", "-c", f"cp '{theirs}' '{work / 'cp.bin'}' && sync"], nbytes),
            (
                "ptzip copy (read+write)",
                python(*me, "ours-copy", str(theirs), str(work / "copy.bin")),
                nbytes,
            ),
        ],
        args.repeat,
        before=drop_caches,
    )
    reads = median_runs(
        [
            ("cat (read)", ["sh", "-c", f"cat '{theirs}' > /dev/null"], nbytes),
            ("torch.load", python(*me, "torch-load", str(theirs)), nbytes),
            ("ptzip read", python(*me, "ours-read", str(theirs)), nbytes),
        ],
        args.repeat,
        before=drop_caches,
    )
    rows = base + writes + reads
    identical = sha256(ours) == sha256(theirs)
    copy_identical = sha256(work / "copy.bin") == sha256(theirs)
    cold = drop_caches()

    ref = {
        "ptzip write": "cp",
        "torch.save": "cp",
        "ptzip copy (read+write)": "cp",
        "ptzip read": "cat (read)",
        "torch.load": "cat (read)",
    }
    by = {m.name: m for m in rows}
    rss_budget = 1.2 * largest / 2**20 + by["interpreter+numpy"].peak_rss_mb
    checks = {
        "ptzip write bytes == torch.save bytes": identical,
        "ptzip copy bytes == source bytes": copy_identical,
        f"ptzip write peak RSS <= 1.2 x largest tensor + interpreter ({rss_budget:.0f} MB)": by[
            "ptzip write"
        ].peak_rss_mb
        <= rss_budget,
        "ptzip copy (read+write) time <= 1.2 x cp": by["ptzip copy (read+write)"].seconds
        <= 1.2 * by["cp"].seconds,
    }
    print(
        f"\n{nbytes / 1e9:.2f} GB state dict, {len(items)} tensors, largest {largest / 2**20:.0f} MiB, "
        f"files in {args.dir} ({fs_type(args.dir)}), median of {args.repeat}; page cache dropped before each "
        f"step: {cold}; writes include sync\n"
    )
    print(table(rows, ref))
    print()
    for what, ok in checks.items():
        print(f"- [{'x' if ok else ' '}] {what}")
    write_json(
        args.out / f"ptzip-{fs_type(args.dir)}.json",
        {
            "bytes": nbytes,
            "largest": largest,
            "cold_cache": cold,
            "dir": str(args.dir),
            "rows": rows,
            "checks": checks,
        },
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
