"""SHA256.md: every row parses, the published rows are all there, and our tiny rows agree with the real
runs they were rendered from."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from conftest import GOLDEN
from reference.tiny_table import render

from repro_merge import checksums
from repro_merge.errors import BadInputError

ROOT = Path(__file__).parent.parent
MANIFESTS = ROOT / "src" / "repro_merge" / "manifests"


def test_every_row_parses_and_counts() -> None:
    text = (ROOT / "SHA256.md").read_text()
    table = checksums.parse(text)
    table_lines = [
        ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith(("| target", "| ---"))
    ]
    assert len(table.rows) == len(table_lines)  # nothing skipped
    published = collections.Counter(r.kind for r in table.rows if not r.target.startswith("tiny"))
    # the publisher's table: 7 original parts; 2+3+7 HF shards; 2 tokenizers; 15 adapters; 35 merged parts
    assert published == {"original": 7, "hf-base": 12, "tokenizer": 2, "adapter": 15, "merged-pth": 35}
    tba = [r for r in table.rows if r.sha256 is None]
    assert {r.target for r in tba} == {"7B-alpaca-pro", "13B-alpaca-pro", "33B-alpaca-plus", "33B-alpaca-pro"}
    assert len(tba) == 1 + 2 + 4 + 4
    tiny = collections.Counter(r.kind for r in table.rows if r.target.startswith("tiny"))
    assert tiny == {"fixtures": 120, "hf-base": 10, "merged-pth": 30, "merged-huggingface": 45}


def test_the_packaged_table_is_the_root_file() -> None:
    assert checksums.table_path().read_bytes() == (ROOT / "SHA256.md").read_bytes()


def test_spot_values() -> None:
    t = checksums.load()
    assert t.expected("original", "7B") == {
        "consolidated.00.pth": "700df0d3013b703a806d2ae7f1bfb8e59814e3d06ae78be0c66368a50059f33d"
    }
    assert t.expected("merged-pth", "13B-alpaca-plus")["consolidated.01.pth"] == (
        "bf70001600ce166f6ca4ef59df5510f0582cdc119fb74e27d9cf3e4c7b142015"
    )
    assert len(t.expected("hf-base", "33B")) == 7


@pytest.mark.parametrize("bad", ["| 7B | x | 123 |", "| 7B | consolidated.00.pth |"])
def test_malformed_rows_are_errors(bad: str) -> None:
    with pytest.raises(BadInputError, match="SHA256.md:3"):
        checksums.parse(f"## x (kind: original)\n\n{bad}\n")


def test_unknown_kind_and_duplicates() -> None:
    with pytest.raises(BadInputError, match="unknown kind"):
        checksums.parse("## x (kind: nonsense)\n")
    row = "| 7B | a.pth | " + "0" * 64 + " |"
    with pytest.raises(BadInputError, match="listed twice"):
        checksums.parse(f"## x (kind: original)\n{row}\n{row}\n")


def test_tiny_sections_are_the_real_runs(tiny: Path) -> None:
    """The tiny rows equal tests/golden/merge (upstream script and converter runs) and the fixtures."""
    text = (ROOT / "SHA256.md").read_text()
    start = text.index("## Tiny: the embedded fixture family")
    assert text[start:] == render(tiny)


@pytest.mark.parametrize("variant", ["llama", "llama-plus", "alpaca", "alpaca-plus", "alpaca-pro"])
def test_golden_manifests_agree(variant: str) -> None:
    table = checksums.load()
    digests = set()
    for kind in ("pth", "huggingface"):
        manifest = json.loads((MANIFESTS / f"tiny-{variant}-{kind}.json").read_text())
        files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
        assert files == table.expected(f"merged-{kind}", f"tiny-{variant}")
        digests.add(manifest["weights_digest"])
    assert len(digests) == 1, "the weights digest must not depend on the output format"


def test_golden_readme_names_the_runs() -> None:
    readme = (GOLDEN / "merge" / "README.md").read_text()
    assert "090475fbebcca06af2ae52c5227fe1617e22072a" in readme and "make_goldens" in readme
