"""Make the golden hashes of the upstream low-memory merge script on the tiny fixtures.

Each tiny Meta layout is converted to HF format by the real converter (``reference.convert``) with a
``max_shard_size`` giving 2-4 shards ("normal"), and 13B/65B also with 10+ shards ("many", where the
script's lexicographic L1, L10, L2... merge order shows). Every base x variant x output type is then
merged by the real script (``reference.merge``), each run in a fresh process, and every file it writes
is hashed. The 13B normal cases are repeated under ``MKL_DEBUG_CPU_TYPE=5`` (MKL's AVX2 kernels, what an
Intel host runs), recorded separately because those bytes differ by CPU path.

    cd tests && python -m reference.make_goldens --script low_mem.py --fixtures FX --out golden/merge
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
UPSTREAM_PATH = "scripts/merge_llama_with_chinese_lora_low_mem.py"

# Meta folder -> (pth shard count, suffix of the adapter folders).
LAYOUTS: dict[str, tuple[int, str]] = {
    "7B": (1, "7b"),
    "13B": (2, "13b"),
    "30B": (4, "33b"),
    "65B": (8, "65b"),
}

# (layout, base kind) -> (max_shard_size, expected HF shard count). Chosen so model.embed_tokens.weight
# is in shard 1: the script reads the width from shard 1 only, and transformers writes an empty first
# shard when the first tensor is bigger than max_shard_size.
BASES: dict[tuple[str, str], tuple[str, int]] = {
    ("7B", "normal"): ("200KB", 2),
    ("13B", "normal"): ("200KB", 3),
    ("30B", "normal"): ("250KB", 4),
    ("65B", "normal"): ("400KB", 4),
    ("13B", "many"): ("60KB", 10),
    ("65B", "many"): ("100KB", 12),
}

# Variant -> adapter releases, merged in this order.
VARIANTS: dict[str, tuple[str, ...]] = {
    "llama": ("chinese_llama_lora",),
    "llama-plus": ("chinese_llama_plus_lora",),
    "alpaca": ("chinese_alpaca_lora",),
    "alpaca-plus": ("chinese_llama_plus_lora", "chinese_alpaca_plus_lora"),
    "alpaca-pro": ("chinese_llama_plus_lora", "chinese_alpaca_pro_lora"),
}
OUTPUT_TYPES = ("pth", "huggingface")

# Inherited variables that could steer BLAS/ATen kernels are dropped; each run sets its own.
STEERING_PREFIXES = ("OMP_", "MKL_", "KMP_", "ATEN_", "OPENBLAS_")
# MKL's generic path on any x86-64 host: an AMD host's default (where the setting changes no byte), and
# what an Intel host takes only when told (its default there is the AVX-512 kernels, an FMA order)
GENERIC = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
DEFAULT_ENV = {"OMP_NUM_THREADS": "1", **GENERIC}
MKL5_ENV = {"OMP_NUM_THREADS": "1", "MKL_DEBUG_CPU_TYPE": "5"}
THREAD_CHECK_ENV = {"OMP_NUM_THREADS": "2", **GENERIC}


@dataclass(frozen=True)
class Case:
    layout: str
    base: str
    variant: str
    output_type: str
    tag: str = ""  # "" (default env), "mkl5" or "threads2"

    @property
    def name(self) -> str:
        return "-".join(p for p in (self.layout, self.base, self.variant, self.output_type, self.tag) if p)

    @property
    def env(self) -> dict[str, str]:
        return {"": DEFAULT_ENV, "mkl5": MKL5_ENV, "threads2": THREAD_CHECK_ENV}[self.tag]


def all_cases() -> list[Case]:
    cases = [Case(lay, base, v, t) for (lay, base) in BASES for v in VARIANTS for t in OUTPUT_TYPES]
    cases += [Case("13B", "normal", v, t, "mkl5") for v in VARIANTS for t in OUTPUT_TYPES]
    return cases


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(STEERING_PREFIXES)}
    return {**env, **extra}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_under(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())


def sha256sum_text(root: Path) -> str:
    """Every file under root in ``sha256sum`` format, sorted by relative path."""
    rels = sorted(p.relative_to(root).as_posix() for p in files_under(root))
    return "".join(f"{sha256_file(root / r)}  {r}\n" for r in rels)


def run_logged(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run cmd from tests/ with output to log; raise with the log's path on failure. Returns seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=TESTS_DIR, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {' '.join(cmd)} (log: {log})")
    return time.monotonic() - start


def module_cmd(module: str, **flags: object) -> list[str]:
    """``python -m module --flag value ...`` with this interpreter."""
    return [sys.executable, "-m", module, *(x for k, v in flags.items() for x in (f"--{k}", str(v)))]


def convert_base(fixtures: Path, work: Path, layout: str, base: str) -> Path:
    """Convert one layout and check its shard count and that the embedding is in shard 1."""
    size, shards = BASES[(layout, base)]
    out = work / "bases" / f"{layout}-{base}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = module_cmd(
        "reference.convert",
        input_dir=fixtures / "llama",
        model_size=layout,
        output_dir=out,
        max_shard_size=size,
    )
    run_logged(cmd, clean_env(DEFAULT_ENV), work / "logs" / f"base-{layout}-{base}.log")
    weight_map = json.loads((out / "pytorch_model.bin.index.json").read_text())["weight_map"]
    first = f"pytorch_model-00001-of-{shards:05d}.bin"
    if len(set(weight_map.values())) != shards or weight_map["model.embed_tokens.weight"] != first:
        raise RuntimeError(f"{out}: expected {shards} shards with the embedding in {first}")
    return out


def run_case(case: Case, script: Path, fixtures: Path, work: Path) -> tuple[str, float]:
    """Merge one case into a fresh folder; returns its sha256sum listing and the seconds taken."""
    shards, suffix = LAYOUTS[case.layout]
    loras = [fixtures / "lora" / f"{release}_{suffix}" for release in VARIANTS[case.variant]]
    out = work / "out" / case.name
    shutil.rmtree(out, ignore_errors=True)
    cmd = module_cmd(
        "reference.merge",
        script=script,
        base_model=work / "bases" / f"{case.layout}-{case.base}",
        lora_model=",".join(map(str, loras)),
        output_type=case.output_type,
        output_dir=out,
        num_shards=shards,
    )
    seconds = run_logged(cmd, clean_env(case.env), work / "logs" / f"{case.name}.log")
    return sha256sum_text(out), seconds


def stack_versions() -> str:
    code = (
        "import torch, transformers, peft, sentencepiece, numpy, tokenizers, accelerate, sys; "
        "print(f'Python {sys.version.split()[0]}'); "
        "[print(m.__name__, m.__version__) for m in "
        "(torch, transformers, peft, sentencepiece, tokenizers, accelerate, numpy)]"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def upstream_commit(repo: Path | None, script: Path) -> str:
    """The upstream commit, and whether the script is byte-identical to that commit's file."""
    if repo is None:
        return "not recorded (no --upstream_git)"
    git = ["git", "-C", str(repo)]
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    blob = subprocess.run([*git, "show", f"HEAD:{UPSTREAM_PATH}"], capture_output=True, check=True).stdout
    same = "identical to" if blob == script.read_bytes() else "DIFFERENT from"
    return f"`{head}` (the script used is {same} `{UPSTREAM_PATH}` at that commit)"


def cpu_model() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), "unknown")


def write_readme(out: Path, a: argparse.Namespace, thread_check: list[str], n_cases: int) -> None:
    script = a.script
    fixtures_digest = hashlib.sha256(sha256sum_text(a.fixtures).encode()).hexdigest()
    bases = "\n".join(f"| {lay} | {base} | {size} | {n} |" for (lay, base), (size, n) in BASES.items())
    env = ", ".join(f"`{k}={v}`" for k, v in DEFAULT_ENV.items())
    mkl5 = ", ".join(f"`{k}={v}`" for k, v in MKL5_ENV.items())
    text = f"""# Golden hashes of the upstream low-memory merge script on the tiny fixtures

Made by `tests/reference/make_goldens.py`, which runs the real upstream script through
`tests/reference/merge.py` (its own source plus one tiny-size entry in each of its three size tables)
on HF bases made by transformers' own converter through `tests/reference/convert.py`.

## Files
- `base-<layout>-<base>.sha256`: every file of the converted HF base (check these first: a different
  base explains any merge difference).
- `<layout>-<base>-<variant>-<type>.sha256`: every file the script wrote into its output folder,
  `sha256sum` format, sorted by path. {n_cases} cases.
- `...-mkl5.sha256`: the 13B normal cases again under MKL's AVX2 kernels (see Environment).

`<layout>` is the Meta folder of the tiny fixture (7B, 13B, 30B = 33B, 65B); `<base>` is normal
(2-4 HF shards) or many (10+ shards).

## Commands
```
cd /work/main && .nox/tests/bin/repro-merge fixtures {a.fixtures}
{f"git -C {a.upstream_git} show HEAD:{UPSTREAM_PATH} > {script}" if a.upstream_git else ""}
cd /work/main/tests && ../.nox/tests/bin/python -m reference.make_goldens \\
    --script {script} --fixtures {a.fixtures} --out {a.out} \\
    --work {a.work}{f" --upstream_git {a.upstream_git}" if a.upstream_git else ""}
```
Each case is one fresh process:
`python -m reference.merge --script SCRIPT --base_model BASE --lora_model A[,B] --output_type TYPE
--output_dir OUT --num_shards N` (N = 1, 2, 4, 8 for 7B, 13B, 30B, 65B); each base is
`python -m reference.convert --input_dir FX/llama --model_size LAYOUT --output_dir BASE
--max_shard_size SIZE`.

## Inputs
- Upstream commit: {upstream_commit(a.upstream_git, script)}
- Script sha256: `{sha256_file(script)}`
- Fixtures: sha256 of their `sha256sum` listing `{fixtures_digest}`

| layout | base | max_shard_size | HF shards |
|---|---|---|---|
{bases}

## Environment
- CPU: {cpu_model()}
- Default runs: {env}; inherited `OMP_*`, `MKL_*`, `KMP_*`, `ATEN_*`, `OPENBLAS_*` variables removed.
- `-mkl5` runs: {mkl5}.
- Thread check (`OMP_NUM_THREADS=2` against the default run): {"; ".join(thread_check)}.

Stack:
```
{stack_versions().strip()}
```
"""
    (out / "README.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--script", type=Path, required=True, help="upstream merge_llama_with_chinese_lora_low_mem.py"
    )
    ap.add_argument("--fixtures", type=Path, required=True, help="output of `repro-merge fixtures`")
    ap.add_argument("--out", type=Path, required=True, help="golden folder, e.g. golden/merge")
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/merge-goldens"), help="scratch folder")
    ap.add_argument("--upstream_git", type=Path, default=None, help="upstream git dir, to record its commit")
    ap.add_argument("--jobs", type=int, default=2, help="merges run in parallel (each single-threaded)")
    a = ap.parse_args()
    a.script, a.fixtures, a.work = a.script.resolve(), a.fixtures.resolve(), a.work.resolve()
    script, fixtures, work = a.script, a.fixtures, a.work
    a.out.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    with ThreadPoolExecutor(a.jobs) as pool:
        bases = dict(zip(BASES, pool.map(lambda k: convert_base(fixtures, work, *k), BASES), strict=True))
    for (layout, base), path in bases.items():
        (a.out / f"base-{layout}-{base}.sha256").write_text(sha256sum_text(path))
    print(f"{len(bases)} bases converted in {time.monotonic() - t0:.0f} s", flush=True)

    cases = all_cases()
    checks = [
        Case("13B", "normal", "alpaca-plus", "pth", "threads2"),
        Case("30B", "normal", "alpaca-pro", "huggingface", "threads2"),
    ]
    jobs = cases + checks
    t1 = time.monotonic()
    with ThreadPoolExecutor(a.jobs) as pool:
        results = dict(zip(jobs, pool.map(lambda c: run_case(c, script, fixtures, work), jobs), strict=True))
    for case in cases:
        (a.out / f"{case.name}.sha256").write_text(results[case][0])
    seconds = [s for _, s in results.values()]
    print(
        f"{len(jobs)} merges in {time.monotonic() - t1:.0f} s, each {min(seconds):.1f}-{max(seconds):.1f} s"
    )

    def differing(case: Case) -> int:
        """Files whose hash differs from the same case's default run."""
        default = Case(case.layout, case.base, case.variant, case.output_type)
        return len(set(results[case][0].splitlines()) - set(results[default][0].splitlines()))

    thread_check = [f"{c.name}: {differing(c)} files differ" for c in checks]
    print("thread check:", "; ".join(thread_check))
    mkl5 = [f"{c.name}: {differing(c)}" for c in cases if c.tag == "mkl5"]
    print("mkl5 files differing from the default run:", "; ".join(mkl5))
    write_readme(a.out, a, thread_check, len(cases))


if __name__ == "__main__":
    main()
