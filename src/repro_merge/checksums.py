"""SHA256.md, parsed: the one table of expected hashes (published ones and our tiny golden ones).

Each section heading names its kind, ``## Title (kind: KIND)``, and holds a table ``| target | file |
sha256 |``; a hash of ``TBA`` means the publisher has not released it. Kinds:

- ``original``: Meta's consolidated.*.pth, target = size (7B, 13B, 33B)
- ``hf-base``: the original LLaMA converted to HF format, target = size (or ``tiny``)
- ``tokenizer``: tokenizer.model of the adapters, target = ``llama`` or ``alpaca``
- ``adapter``: adapter_model.bin, target = the released folder name (chinese_alpaca_plus_lora_13b)
- ``merged-pth`` / ``merged-huggingface``: the build's outputs, target = SIZE-MODEL (13B-alpaca-plus)
- ``fixtures``: every file of the embedded tiny family, target ``tiny``, file = path inside it
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from repro_merge.errors import BadInputError

KINDS = ("original", "hf-base", "tokenizer", "adapter", "merged-pth", "merged-huggingface", "fixtures")
_HEADING = re.compile(r"^#+ .*\(kind: ([a-z-]+)\)\s*$")
_ROW = re.compile(r"^\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|\s*([0-9a-f]{64}|TBA)\s*\|\s*$")
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Row:
    kind: str
    target: str
    file: str
    sha256: str | None  # None: TBA

    def describe(self) -> str:
        return f"{self.file} of {self.target} ({self.kind})"


@dataclass(frozen=True)
class Table:
    rows: tuple[Row, ...]

    def expected(self, kind: str, target: str) -> dict[str, str | None]:
        """file -> hash (None for TBA) of one target; empty if the table has no such target."""
        return {r.file: r.sha256 for r in self.rows if r.kind == kind and r.target == target}

    def identify(self, digest: str) -> list[Row]:
        """Every row whose hash is ``digest``: what a file probably is."""
        return [r for r in self.rows if r.sha256 == digest]

    def targets(self, kind: str) -> list[str]:
        return list(dict.fromkeys(r.target for r in self.rows if r.kind == kind))


def parse(text: str, source: str = "SHA256.md") -> Table:
    """Parse the table; any table line that is not a valid row is an error (nothing is skipped)."""
    rows, kind = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADING.match(line)
        if m:
            kind = m.group(1)
            if kind not in KINDS:
                raise BadInputError(f"{source}:{n}: unknown kind {kind!r}")
            continue
        if (
            not line.startswith("|")
            or set(line) <= set("|-: ")
            or line.replace(" ", "").lower() == "|target|file|sha256|"
        ):
            continue
        m = _ROW.match(line)
        if not m or kind is None:
            raise BadInputError(f"{source}:{n}: not a `| target | file | sha256 |` row under a kind heading")
        target, file, digest = m.groups()
        rows.append(Row(kind, target, file, None if digest == "TBA" else digest))
    seen = set()
    for r in rows:
        if (r.kind, r.target, r.file) in seen:
            raise BadInputError(f"{source}: {r.describe()} is listed twice")
        seen.add((r.kind, r.target, r.file))
    return Table(tuple(rows))


def table_path() -> Path:
    """SHA256.md shipped with the package (a link to the repository's root file in a source tree)."""
    return Path(os.environ.get("REPRO_MERGE_SHA256", Path(__file__).with_name("SHA256.md")))


@cache
def load() -> Table:
    path = table_path()
    return parse(path.read_text(encoding="utf-8"), str(path))


def sha256_file(path: Path, block: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def is_hash(text: str) -> bool:
    return bool(_HEX.fullmatch(text))
