"""Steps 1 and 2 end to end at real 7B tensor shapes: repro-merge vs the reference tools vs cp.

    python benchmarks/bench_pipeline.py [--layers 2] [--repeat 3] [--script low_mem.py] [--dir out/bench]
    python benchmarks/bench_pipeline.py --sweep 2,4,8,16 --repeat 1 --script low_mem.py

Inputs are synthetic (benchmarks/synth.py, cached per layer count under --dir). Step 1 compares
`repro-merge convert` with transformers 4.28.1's own converter and a `cp` of the input shard; step 2
(Alpaca-Plus: LLaMA-Plus then Alpaca-Plus, output pth and huggingface) compares `repro-merge merge` with
the upstream low-memory script (--script), or without it with peft's own merge path, and a `cp` of the
base shards. Every command runs in its own child with the page cache dropped before it, ends with
`sync` (a write is done when it is on disk; repro-merge fsyncs anyway), and is measured as a process
tree (benchmarks/common.py). Targets (issue: end-to-end benchmark): peak RSS <= 1.5 GB whatever the
layer count, ours <= 1.5x cp of the same bytes, ours >= 3x faster than the upstream low-memory script,
and ours' files byte-identical to the reference's.
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import synth  # noqa: E402
from common import Measure, Step, drop_caches, fs_type, median_runs, python, table, write_json  # noqa: E402

RSS_LIMIT_MB = 1.5e9 / 2**20  # 1.5 GB
CP_FACTOR = 1.5
SPEEDUP = 3.0


def sha256_dir(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                out[str(p.relative_to(folder))] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def synced(argv: list[str]) -> list[str]:
    """``argv`` then sync, in one tree: every row's time ends with its data on disk."""
    return ["sh", "-c", f"{shlex.join(argv)} && sync"]


# ------------------------------------------------------------------------------------------ groups


@dataclass
class Group:
    """One step's rows: ours, the reference (if any), cp (if any), with what each wrote."""

    title: str
    ours: str
    ref: str | None
    cp: str | None
    comparable: bool  # the reference writes the bytes ours promises (sha256 checked)
    inputs: list[Path]
    steps: list[Step] = field(default_factory=list)
    input_bytes: dict[str, int] = field(default_factory=dict)  # taken up front: the sweep may delete inputs
    hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    rows: list[Measure] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.input_bytes = {str(p): p.stat().st_size for p in self.inputs}

    def identical(self) -> bool | None:
        if not self.comparable or self.ref is None:
            return None
        a, b = self.hashes.get(self.ours), self.hashes.get(self.ref)
        return bool(a) and a == b

    def row(self, name: str | None) -> Measure | None:
        return next((m for m in self.rows if m.name == name), None)


def _step(group: Group, name: str, argv: list[str], out: Path, log: Path, hashed: bool) -> Step:
    """A row writing into ``out``: cleared before each run; measured, hashed (first run) and removed
    after it, so at most one output (plus the reference's temporaries) is on disk at a time."""

    def before() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)

    def after(rep: int) -> int:
        nbytes = dir_bytes(out)
        if hashed and rep == 0:
            group.hashes[name] = sha256_dir(out)
        shutil.rmtree(out)
        return nbytes

    logged = ["sh", "-c", f'exec "$@" >>{shlex.quote(str(log))} 2>&1', "sh", *synced(argv)]
    return Step(name, logged, 0, before=before, after=after)


def groups(
    data: synth.Data, work: Path, script: Path | None, with_cp: bool, kinds: tuple[str, ...]
) -> list[Group]:
    """Step 1 and step 2 for each output type in ``kinds`` on ``data``; outputs go under ``work``."""
    log = work / "children.log"
    ours = python("-m", "repro_merge.cli")
    out: list[Group] = []

    g = Group(
        "step 1: convert",
        "convert: ours",
        "convert: transformers 4.28.1",
        "convert: cp" if with_cp else None,
        True,
        [data.shard],
    )
    g.steps.append(
        _step(
            g,
            g.ours,
            [
                *ours,
                "convert",
                "--input_dir",
                str(data.llama),
                "--model_size",
                "7B",
                "--output_dir",
                str(work / "c-ours"),
            ],
            work / "c-ours",
            log,
            True,
        )
    )
    conv = "transformers.models.llama.convert_llama_weights_to_hf"
    ref_argv = python("-m", conv, "--input_dir", str(data.llama), "--model_size", "7B", "--output_dir")
    g.steps.append(_step(g, g.ref, [*ref_argv, str(work / "c-ref")], work / "c-ref", log, True))  # type: ignore[arg-type]
    if g.cp:
        g.steps.append(
            _step(g, g.cp, ["cp", "-r", str(data.shard), str(work / "c-cp")], work / "c-cp", log, False)
        )
    out.append(g)

    loras = f"{data.llama_plus},{data.alpaca_plus}"
    for kind in kinds:
        short = "pth" if kind == "pth" else "hf"
        if script is not None:
            ref = f"merge {short}: upstream low-mem script"
        elif kind == "huggingface":
            ref = "merge hf: peft merge_and_unload"
        else:
            ref = None
        g = Group(
            f"step 2: merge alpaca-plus -> {kind}",
            f"merge {short}: ours",
            ref,
            f"merge {short}: cp" if with_cp else None,
            script is not None,
            [
                *data.hf_shards(),
                data.llama_plus / "adapter_model.bin",
                data.alpaca_plus / "adapter_model.bin",
            ],
        )
        args = ["--base_model", str(data.hf), "--lora_model", loras, "--output_type", kind, "--output_dir"]
        o = work / f"m{short}-ours"
        g.steps.append(_step(g, g.ours, [*ours, "merge", *args, str(o)], o, log, True))
        if ref is not None:
            o = work / f"m{short}-ref"
            if script is not None:
                argv = python(str(script), *args, str(o))
            else:
                argv = python(__file__, "--child", "peft", str(data.hf), loras, str(o))
            g.steps.append(_step(g, ref, argv, o, log, script is not None))
        if g.cp:
            o = work / f"m{short}-cp"
            g.steps.append(_step(g, g.cp, ["cp", *map(str, data.hf_shards()), str(o)], o, log, False))
        out.append(g)
    return out


def measure(
    data: synth.Data, work: Path, script: Path | None, repeat: int, with_cp: bool, kinds: tuple[str, ...]
) -> list[Group]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    gs = groups(data, work, script, with_cp, kinds)
    for g in gs:
        print(f"... {g.title}, {data.layers} layers: {', '.join(s.name for s in g.steps)}", file=sys.stderr)
        g.rows = median_runs(g.steps, repeat, before=drop_caches)
    return gs


def comparisons(gs: list[Group]) -> dict[str, str | list[str]]:
    ref: dict[str, str | list[str]] = {}
    for g in gs:
        ref[g.ours] = [r for r in (g.ref, g.cp) if r]
        if g.ref and g.cp:
            ref[g.ref] = g.cp
    return ref


def checks(gs: list[Group], script: Path | None, layers: str) -> dict[str, bool]:
    """The targets, one line each, for the rows measured at ``layers``."""
    out: dict[str, bool] = {}
    for g in gs:
        ours, ref, cp = g.row(g.ours), g.row(g.ref), g.row(g.cp)
        assert ours is not None
        out[f"{g.ours}: peak RSS {ours.peak_rss_mb:.0f} MB <= 1.5 GB ({layers})"] = (
            ours.peak_rss_mb <= RSS_LIMIT_MB
        )
        if cp is not None:
            f = ours.seconds / cp.seconds
            out[f"{g.ours}: time {f:.2f}x cp <= {CP_FACTOR}x ({layers})"] = f <= CP_FACTOR
        if script is not None and ref is not None and g.title.startswith("step 2"):
            f = ref.seconds / ours.seconds
            out[f"{g.ours}: {f:.1f}x faster than the upstream low-mem script, >= {SPEEDUP}x ({layers})"] = (
                f >= SPEEDUP
            )
        same = g.identical()
        if same is not None:
            n = len(g.hashes.get(g.ours, {}))
            out[f"{g.ours}: {n} files, same sha256 as {g.ref} ({layers})"] = same
    return out


def sizes_line(g: Group) -> str:
    inp = sum(g.input_bytes.values())
    outs = ", ".join(f"{m.name.split(': ')[1]} {m.bytes / 1e9:.2f}" for m in g.rows)
    return f"- {g.title}: input {inp / 1e9:.2f} GB ({len(g.inputs)} files); output GB: {outs}"


NOTES = (
    "Times are medians of alternating runs with the page cache dropped before each; every row ends with "
    "`sync`. Peak RSS is the larger of wait4's ru_maxrss and the polled (50 ms) sum over the process "
    "tree, and counts file pages mapped by the process (ours memory-maps tensors it reads). Disk read/"
    "write are read_bytes/write_bytes of the tree (/proc/<pid>/io); rchar/wchar count read()/write() "
    "syscalls only, so reads through mmap (all of ours' input) are not in rchar. GB/s is output bytes "
    "over wall time."
)


# ------------------------------------------------------------------------------------------ modes


def single(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    data = synth.ensure(args.dir / "pipeline-data", args.layers)
    gen = time.perf_counter() - t0
    gs = measure(data, args.dir / "pipeline-work", args.script, args.repeat, True, ("pth", "huggingface"))
    rows = [m for g in gs for m in g.rows]
    what = f"{args.layers} layers"
    ok = checks(gs, args.script, what)
    print(
        f"\n7B shapes, {args.layers} layers, files in {args.dir} ({fs_type(args.dir)}), median of "
        f"{args.repeat}, reference for step 2: {args.script or 'peft merge_and_unload (no --script)'}\n"
    )
    print(table(rows, comparisons(gs), io=True))
    print()
    for g in gs:
        print(sizes_line(g))
    print(f"\n{NOTES}\n")
    for line, good in ok.items():
        print(f"- [{'x' if good else ' '}] {line}")
    write_json(
        args.out / "pipeline.json",
        {
            "layers": args.layers,
            "repeat": args.repeat,
            "script": str(args.script) if args.script else None,
            "dir": str(args.dir),
            "fs": fs_type(args.dir),
            "data_ready_seconds": gen,
            "groups": [_group_json(g) for g in gs],
            "checks": ok,
            "notes": NOTES,
            "total_seconds": time.perf_counter() - t0,
        },
    )


def sweep(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    layers = [int(x) for x in args.sweep.split(",")]
    per: dict[int, list[Group]] = {}
    ok: dict[str, bool] = {}
    skipped: dict[int, str] = {}
    for n in layers:
        why = make_room(args.dir / "pipeline-data", n)
        if why:
            skipped[n] = why
            print(f"... {n} layers skipped: {why}", file=sys.stderr)
            continue
        data = synth.ensure(args.dir / "pipeline-data", n)
        # no cp rows and no huggingface output: the sweep is about memory, and pth is the heavier path
        per[n] = measure(data, args.dir / "pipeline-work", args.script, args.repeat, False, ("pth",))
        ok |= checks(per[n], args.script, f"{n} layers")
    layers = [n for n in layers if n in per]
    names = [m.name for m in per[layers[0]][0].rows + [r for g in per[layers[0]][1:] for r in g.rows]]
    rss = {name: [_find(per[n], name).peak_rss_mb for n in layers] for name in names}
    secs = {name: [_find(per[n], name).seconds for n in layers] for name in names}
    for g in per[layers[0]]:
        mine = rss[g.ours]
        ok[f"{g.ours}: flat, peak RSS max/min {max(mine) / min(mine):.2f} <= 1.15 over {layers} layers"] = (
            max(mine) <= 1.15 * min(mine)
        )
        if g.ref:
            theirs = rss[g.ref]
            grow = theirs[-1] / theirs[0]
            ok[f"{g.ref}: grows, peak RSS {grow:.1f}x from {layers[0]} to {layers[-1]} layers"] = grow >= 1.5
    head = "| row | " + " | ".join(f"{n} layers" for n in layers) + " |"
    rule = "| --- |" + " ---: |" * len(layers)
    print(f"\nPeak RSS (MB) vs layer count, 7B shapes, repeat {args.repeat}\n\n{head}\n{rule}")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{v:.0f}" for v in rss[name]) + " |")
    print(f"\nWall time (s) vs layer count\n\n{head}\n{rule}")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in secs[name]) + " |")
    print()
    for n, why in skipped.items():
        print(f"- {n} layers not measured: {why}")
    for line, good in ok.items():
        print(f"- [{'x' if good else ' '}] {line}")
    png = args.out / "rss_vs_layers.png"
    plot(png, layers, rss)
    print(f"\nplot: {png}")
    write_json(
        args.out / "pipeline-sweep.json",
        {
            "layers": layers,
            "repeat": args.repeat,
            "script": str(args.script) if args.script else None,
            "peak_rss_mb": rss,
            "seconds": secs,
            "skipped": skipped,
            "per_layers": {n: [_group_json(g) for g in gs] for n, gs in per.items()},
            "checks": ok,
            "notes": NOTES,
            "total_seconds": time.perf_counter() - t0,
        },
    )


def make_room(cache: Path, layers: int) -> str:
    """Free disk for ``layers``' inputs plus the largest transient output (the references write the
    model twice: temporaries, then the result), deleting other cached layer counts if needed; returns
    why it cannot, or "". The sweep's inputs alone take 2 + 4 + 8 + 16 layers: ~35 GB."""
    cache.mkdir(parents=True, exist_ok=True)
    have = synth.Data(cache / f"L{layers}", layers)
    need = (0 if have.root.is_dir() else synth.cache_bytes(layers)) + 2.2 * synth.model_bytes(layers) + 2e9
    for other in sorted(cache.glob("L*"), key=lambda p: p.stat().st_mtime):
        if shutil.disk_usage(cache).free >= need:
            break
        if other != have.root:
            print(f"... removing cached {other} to make room", file=sys.stderr)
            shutil.rmtree(other)
    free = shutil.disk_usage(cache).free
    return "" if free >= need else f"needs {need / 1e9:.1f} GB free under {cache}, has {free / 1e9:.1f} GB"


def _find(gs: list[Group], name: str) -> Measure:
    return next(m for g in gs for m in g.rows if m.name == name)


def _group_json(g: Group) -> dict:
    return {
        "title": g.title,
        "inputs": g.input_bytes,
        "rows": g.rows,
        "identical": g.identical(),
        "sha256": g.hashes,
    }


def plot(path: Path, layers: list[int], rss: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, values) in enumerate(rss.items()):  # ours' lines coincide: markers tell them apart
        style = ("-" if name.endswith("ours") else "--") + "o^sDv<>"[i % 7]
        ax.plot(layers, [v / 1024 for v in values], style, label=name, markersize=8 - i, alpha=0.85)
    ax.axhline(RSS_LIMIT_MB / 1024, color="grey", linewidth=0.8, linestyle=":", label="1.5 GB target")
    ax.set_xlabel("layers (7B shapes)")
    ax.set_ylabel("peak RSS of the process tree (GiB)")
    ax.set_xticks(layers)
    ax.set_title("Peak memory vs model depth: repro-merge streams, the references load whole")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------ peft baseline


def peft_merge(base: str, loras: str, out: str) -> None:
    """Step 2 with peft's own merge, as Chinese-LLaMA-Alpaca's docs do it: fp16 base, embeddings resized
    to each adapter's tokenizer before loading it, merge_and_unload, save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM, LlamaTokenizer

    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float16, device_map={"": "cpu"})
    tokenizer = None
    for path in loras.split(","):
        tokenizer = LlamaTokenizer.from_pretrained(path)
        if model.get_input_embeddings().weight.size(0) != len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        lora = PeftModel.from_pretrained(model, path, device_map={"": "cpu"}, torch_dtype=torch.float16)
        model = lora.merge_and_unload()
    assert tokenizer is not None
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="7B layers in the synthetic model (2: 1.3 GB)")
    ap.add_argument(
        "--sweep", help="comma-separated layer counts: peak RSS vs depth (convert, merge pth; no cp rows)"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median is reported")
    ap.add_argument("--script", type=Path, help="the upstream merge_llama_with_chinese_lora_low_mem.py")
    ap.add_argument("--dir", type=Path, default=Path("out/bench"), help="inputs (cached) and outputs")
    ap.add_argument("--out", type=Path, default=Path("out/bench"), help="JSON report and plot")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        op, *rest = args.child
        {"peft": peft_merge}[op](*rest)
        return
    (sweep if args.sweep else single)(args)


if __name__ == "__main__":
    main()
