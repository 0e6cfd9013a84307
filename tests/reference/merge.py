"""Run the upstream Chinese-LLaMA-Alpaca merge script, unmodified except for tiny-size table entries.

The upstream ``merge_llama_with_chinese_lora_low_mem.py`` recognises a base model only by its embedding
width (4096, 5120, 6656, 8192). Three module-level dict literals turn that width into a size name, the
size name into the pth shard count, and the size name into the ``params.json`` dict it writes. Our tiny
bases have other widths, so the script would stop with a KeyError. This harness therefore:

- parses the script with ``ast`` and finds those three assignments by the shape of their values, not by
  their names: (a) int keys including 4096 -> str values; (b) str keys 7B/13B/33B/65B -> int values;
  (c) the same str keys -> dict values;
- adds, right after the last of the three, one entry to each: for the base's width W, (a) W ->
  ``"tinyW"``, (b) ``"tinyW"`` -> ``--num_shards``, (c) ``"tinyW"`` -> the params dict built from the
  base's ``config.json`` (dim = hidden_size, multiple_of 256, n_heads, n_layers, norm_eps =
  rms_norm_eps, vocab_size -1; the key order of the real entries);
- runs the script's own text as ``__main__`` with ``sys.argv`` set to its normal flags.

Nothing else changes. The source is split at the end of the last table assignment: the part before and
the part after are compiled from the original text under the script's own path (the part after is
padded with newlines so tracebacks show true line numbers), and the added lines are compiled as
``<tiny-size entries>`` between them, all in one module namespace. The regular
``merge_llama_with_chinese_lora.py`` has the same three tables and runs the same way.

Run each merge in a fresh process (the script keeps state in module globals and in torch):

    python -m reference.merge --script PATH --base_model DIR --lora_model A[,B] \
        --output_type pth|huggingface --output_dir DIR --num_shards N
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path

REAL_SIZE_NAMES = {"7B", "13B", "33B", "65B"}


@dataclass(frozen=True)
class SizeTables:
    """Names of the script's three size tables and the line after which entries can be added."""

    width_to_size: str
    size_to_shards: str
    size_to_params: str
    end_line: int  # 1-based last line of the last of the three assignments


def _consts(nodes: list[ast.expr | None]) -> list[object] | None:
    """Values of a list of constant nodes, or None if any is not a constant (or is a ``**`` splat)."""
    if not all(isinstance(n, ast.Constant) for n in nodes):
        return None
    return [n.value for n in nodes]  # type: ignore[union-attr]


def _table_kind(value: ast.expr) -> str | None:
    """Which of the three tables a dict literal looks like: 'a', 'b', 'c' or None."""
    if not isinstance(value, ast.Dict):
        return None
    keys = _consts(value.keys)
    if keys is None:
        return None
    if all(type(k) is int for k in keys) and 4096 in keys:
        values = _consts(value.values)  # type: ignore[arg-type]
        return "a" if values is not None and all(isinstance(v, str) for v in values) else None
    if all(isinstance(k, str) for k in keys) and REAL_SIZE_NAMES <= set(keys):  # type: ignore[arg-type]
        if all(isinstance(v, ast.Dict) for v in value.values):
            return "c"
        values = _consts(value.values)  # type: ignore[arg-type]
        if values is not None and all(type(v) is int for v in values):
            return "b"
    return None


def find_size_tables(source: str) -> SizeTables:
    """Locate the three tables among the module-level ``NAME = {...}`` assignments; exactly one each."""
    tree = ast.parse(source)
    found: dict[str, list[tuple[str, ast.stmt]]] = {"a": [], "b": [], "c": []}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            kind = _table_kind(stmt.value)
            if kind is not None:
                found[kind].append((stmt.targets[0].id, stmt))
    if any(len(v) != 1 for v in found.values()):
        raise SystemExit(f"expected exactly one of each size table, found {found}")
    stmts = [found[k][0][1] for k in "abc"]
    end_line = max(s.end_lineno or s.lineno for s in stmts)
    # The split must fall between top-level statements, not inside a `x = {...}; y = ...` line.
    if any(s.lineno == end_line and s not in stmts for s in tree.body):
        raise SystemExit(f"another statement shares line {end_line} with a size table")
    return SizeTables(found["a"][0][0], found["b"][0][0], found["c"][0][0], end_line)


def tiny_entries(tables: SizeTables, config: dict[str, object], num_shards: int) -> str:
    """Python source adding the tiny base's entries to the three tables."""
    width = int(config["hidden_size"])  # type: ignore[call-overload]
    name = f"tiny{width}"
    params = {
        "dim": width,
        "multiple_of": 256,
        "n_heads": config["num_attention_heads"],
        "n_layers": config["num_hidden_layers"],
        "norm_eps": config["rms_norm_eps"],
        "vocab_size": -1,
    }
    return (
        f"{tables.width_to_size}[{width!r}] = {name!r}\n"
        f"{tables.size_to_shards}[{name!r}] = {num_shards!r}\n"
        f"{tables.size_to_params}[{name!r}] = {params!r}\n"
    )


def run_script(script: Path, argv: list[str], base_model: Path, num_shards: int) -> None:
    """Execute the script as ``__main__`` in this process, with tiny entries for ``base_model``."""
    source = script.read_text()
    tables = find_size_tables(source)
    config = json.loads((base_model / "config.json").read_text())
    lines = source.splitlines(keepends=True)
    head = "".join(lines[: tables.end_line])
    tail = "\n" * tables.end_line + "".join(lines[tables.end_line :])
    namespace: dict[str, object] = {"__name__": "__main__", "__file__": str(script)}
    sys.argv = [str(script), *argv]
    sys.path[0] = str(script.parent)  # as `python script.py` would have it
    exec(compile(head, str(script), "exec"), namespace)
    exec(compile(tiny_entries(tables, config, num_shards), "<tiny-size entries>", "exec"), namespace)
    exec(compile(tail, str(script), "exec"), namespace)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", type=Path, required=True, help="the upstream merge script")
    ap.add_argument("--base_model", type=Path, required=True, help="HF-format tiny base")
    ap.add_argument("--lora_model", required=True, help="comma-separated adapter folders, in order")
    ap.add_argument("--output_type", choices=["pth", "huggingface"], required=True)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--num_shards", type=int, required=True, help="pth shard count for this layout")
    a = ap.parse_args()
    argv = [
        "--base_model",
        str(a.base_model),
        "--lora_model",
        a.lora_model,
        "--output_type",
        a.output_type,
        "--output_dir",
        a.output_dir,
    ]
    run_script(a.script.resolve(), argv, a.base_model, a.num_shards)


if __name__ == "__main__":
    main()
