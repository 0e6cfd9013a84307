"""Render SHA256.md's tiny sections from real runs: the fixture family's hashes and the golden outputs of
the reference converter and the upstream merge script (tests/golden/merge, see its README).

    python -m reference.tiny_table FIXTURES_DIR > tiny-sections.md

The tiny target is the 13B layout with a 200KB-shard HF base ("13B-normal" in tests/golden/merge).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent.parent / "golden" / "merge"
VARIANTS = ("llama", "llama-plus", "alpaca", "alpaca-plus", "alpaca-pro")
TINY_LAYOUT = "13B-normal"


def _rows(lines: list[tuple[str, str]], target: str) -> list[str]:
    return [f"| {target} | {name} | {digest} |" for name, digest in sorted(lines)]


def _golden(name: str) -> list[tuple[str, str]]:
    out = []
    for line in (GOLDEN / f"{name}.sha256").read_text().splitlines():
        digest, path = line.split("  ", 1)
        out.append((path, digest))
    return out


def render(fixtures: Path) -> str:
    files = sorted(p for p in fixtures.rglob("*") if p.is_file())
    fx = [(p.relative_to(fixtures).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]
    parts = [
        "## Tiny: the embedded fixture family, every file (kind: fixtures)\n",
        "| target | file | sha256 |\n| --- | --- | --- |",
        *_rows(fx, "tiny"),
        "",
        "## Tiny: the HF base, made by transformers 4.28.1's converter (kind: hf-base)\n",
        "| target | file | sha256 |\n| --- | --- | --- |",
        *_rows(_golden(f"base-{TINY_LAYOUT}"), "tiny"),
    ]
    for kind in ("pth", "huggingface"):
        parts += [
            "",
            f"## Tiny: merged, {kind} output of the upstream script (kind: merged-{kind})\n",
            "| target | file | sha256 |\n| --- | --- | --- |",
        ]
        for v in VARIANTS:
            parts += _rows(_golden(f"{TINY_LAYOUT}-{v}-{kind}"), f"tiny-{v}")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(Path(sys.argv[1])))
