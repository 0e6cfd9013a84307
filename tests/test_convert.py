"""Step 1 against the real converter: transformers 4.28.1's convert_llama_weights_to_hf.py, run here on the
tiny fixtures through tests/reference/convert.py (which passes it only the vocab size and shard size)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_hashes
from reference import convert as reference

from repro_merge import ptzip
from repro_merge.convert import convert
from repro_merge.errors import BadInputError, OutputExistsError

# layout -> max_shard_size giving one shard, 2-3 shards, and 10 or more (asserted below)
SHARD_SIZES = {
    "7B": {"10GB": (1, 1), "200KB": (2, 3), "30KB": (10, 99)},
    "13B": {"10GB": (1, 1), "200KB": (2, 3), "60KB": (10, 99)},
    "30B": {"10GB": (1, 1), "400KB": (2, 3), "60KB": (10, 99)},
    "65B": {"10GB": (1, 1), "500KB": (2, 3), "1KB": (10, 99)},  # 1KB: every tensor alone, empty first shard
}
CASES = [(size, mss) for size, sizes in SHARD_SIZES.items() for mss in sizes]


@pytest.fixture(scope="module")
def reference_outputs(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """The reference converter's outputs for every case, produced once (in this process)."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for size, mss in CASES:
        out[size, mss] = root / f"{size}-{mss}"
        reference.run(tiny / "llama", size, out[size, mss], mss)
    return out


@pytest.mark.parametrize(("size", "mss"), CASES)
def test_every_file_equals_the_reference(
    tiny: Path, tmp_path: Path, reference_outputs: dict, size: str, mss: str
) -> None:
    ours = tmp_path / "hf"
    convert(tiny / "llama", size, ours, mss)
    want = tree_hashes(reference_outputs[size, mss])
    assert tree_hashes(ours) == want
    shards = [n for n in want if n.startswith("pytorch_model")]
    shards = [n for n in shards if n.endswith(".bin")]
    low, high = SHARD_SIZES[size][mss]
    assert low <= len(shards) <= high, f"{mss} was meant to give {low}-{high} shards, gave {len(shards)}"


def test_33b_is_the_30b_folder(tiny: Path, tmp_path: Path, reference_outputs: dict) -> None:
    convert(tiny / "llama", "33B", tmp_path / "hf", "400KB")
    assert tree_hashes(tmp_path / "hf") == tree_hashes(reference_outputs["30B", "400KB"])


def test_inv_freq_is_fp16_rounded_fp32(reference_outputs: dict) -> None:
    """What the reference really writes (the model is loaded in fp16, the buffer saved as fp32)."""
    import numpy as np

    with ptzip.Checkpoint(reference_outputs["7B", "10GB"] / "pytorch_model.bin") as ck:
        meta = ck.tensors["model.layers.0.self_attn.rotary_emb.inv_freq"]
        values = ck.tensor("model.layers.0.self_attn.rotary_emb.inv_freq")
    assert meta.dtype.name == "float32"
    assert np.array_equal(values.astype(np.float16).astype(np.float32), values)


@pytest.mark.parametrize("sep", ["_", "-"], ids=["script-flags", "dashed-flags"])
def test_cli_flags(tiny: Path, tmp_path: Path, reference_outputs: dict, sep: str) -> None:
    """The converter script's own flag names, and their dashed spellings."""
    flags = {"input_dir": tiny / "llama", "model_size": "13B", "output_dir": tmp_path / "hf"}
    flags["max_shard_size"] = "200KB"
    argv = [x for k, v in flags.items() for x in ("--" + k.replace("_", sep), str(v))]
    r = subprocess.run(
        [sys.executable, "-m", "repro_merge.cli", "convert", *argv], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert tree_hashes(tmp_path / "hf") == tree_hashes(reference_outputs["13B", "200KB"])


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def llama(tiny: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny original-LLaMA root, to break."""
    return Path(shutil.copytree(tiny / "llama", tmp_path / "llama"))


def _fails(llama: Path, tmp_path: Path, size: str, match: str, exc: type = BadInputError) -> str:
    out = tmp_path / "out"
    with pytest.raises(exc, match=match) as e:
        convert(llama, size, out)
    msg = str(e.value)
    assert "\n" not in msg
    assert not out.exists() or not any(out.iterdir()), "nothing may be written on bad input"
    return msg


def test_missing_shard(llama: Path, tmp_path: Path) -> None:
    (llama / "13B" / "consolidated.01.pth").unlink()
    msg = _fails(llama, tmp_path, "13B", "missing")
    assert "consolidated.01.pth" in msg


def test_wrong_shard_count(llama: Path, tmp_path: Path) -> None:
    shutil.copy(llama / "13B" / "consolidated.01.pth", llama / "13B" / "consolidated.02.pth")
    _fails(llama, tmp_path, "13B", r"13B has 2 shard\(s\).*found 3")


def test_shards_that_disagree(llama: Path, tmp_path: Path) -> None:
    # the 30B layout's shard 01 replaced by a 13B-layout shard: other dims
    shutil.copy(llama / "13B" / "consolidated.01.pth", llama / "30B" / "consolidated.01.pth")
    msg = _fails(llama, tmp_path, "30B", "has shape")
    assert "30B/consolidated.01.pth" in msg


def test_params_that_do_not_fit(llama: Path, tmp_path: Path) -> None:
    p = llama / "7B" / "params.json"
    params = json.loads(p.read_text())
    p.write_text(json.dumps({**params, "n_layers": params["n_layers"] + 1}))
    _fails(llama, tmp_path, "7B", "has no layers.2.attention.wq.weight")
    p.write_text(json.dumps({**params, "n_layers": params["n_layers"] - 1}))  # would drop a layer
    _fails(llama, tmp_path, "7B", "params.json: n_layers is 1, but consolidated.00.pth has layers.1")
    p.write_text(json.dumps({**params, "n_heads": params["n_heads"] * 2}))  # would scramble q and k
    _fails(llama, tmp_path, "7B", "params.json: n_heads is 8, but rope.freqs .* has 8 entries")
    p.write_text(json.dumps({**params, "dim": 72}))
    _fails(llama, tmp_path, "7B", "has shape")
    p.write_text("{not json")
    _fails(llama, tmp_path, "7B", "params.json: not readable JSON")
    p.write_text("5")
    _fails(llama, tmp_path, "7B", "params.json: must be a JSON object")
    for eps in ("1e-6", None, 0, True):
        p.write_text(json.dumps({**params, "norm_eps": eps}))
        _fails(llama, tmp_path, "7B", "params.json: norm_eps must be a number")


def test_cli_reports_bad_input_on_one_line(llama: Path, tmp_path: Path) -> None:
    (llama / "13B" / "consolidated.01.pth").unlink()
    r = subprocess.run(
        [sys.executable, "-m", "repro_merge.cli", "convert", "--input-dir", str(llama)]
        + ["--model-size", "13B", "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "consolidated.01.pth: missing" in lines[0], r.stderr


def test_missing_tokenizer_and_folder(llama: Path, tmp_path: Path) -> None:
    _fails(llama, tmp_path, "9B", "--model_size")
    shutil.rmtree(llama / "65B")
    _fails(llama, tmp_path, "65B", "no 65B folder")
    (llama / "tokenizer.model").unlink()
    _fails(llama, tmp_path, "7B", "tokenizer.model: missing")


def test_corrupt_shard_is_named(llama: Path, tmp_path: Path) -> None:
    shard = llama / "7B" / "consolidated.00.pth"
    shard.write_bytes(shard.read_bytes()[:-5000])
    msg = _fails(llama, tmp_path, "7B", "consolidated.00.pth")
    assert str(shard) in msg


def test_output_folder_not_empty(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        convert(tiny / "llama", "7B", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_crash_leaves_no_final_name(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing a shard leaves complete shards only, and a resume completes the rest."""
    import repro_merge.convert as conv

    real_save, calls = ptzip.save, []

    def failing_save(path, entries, fill, archive=None, overlap=False):  # type: ignore[no-untyped-def]
        calls.append(archive)
        if len(calls) == 2:
            fill(entries[0][1].storage, 0)
            raise KeyboardInterrupt("simulated crash")
        real_save(path, entries, fill, archive, overlap)

    monkeypatch.setattr(conv.ptzip, "save", failing_save)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(tiny / "llama", "13B", out, "200KB")
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_model-00001-of-00003.bin"]
    monkeypatch.setattr(conv.ptzip, "save", real_save)
    convert(tiny / "llama", "13B", out, "200KB", resume=True)
    ref = tmp_path / "ref"
    convert(tiny / "llama", "13B", ref, "200KB")
    assert tree_hashes(out) == tree_hashes(ref)


# ------------------------------------------------------------------------------------------ fast tokenizer


def _spm_with_ties(path: Path, n: int) -> None:
    """A BPE sentencepiece model whose pieces overlap a lot and whose scores tie and include zeros."""
    import random

    from sentencepiece import sentencepiece_model_pb2 as pb

    rnd = random.Random(7)
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    for piece, kind in (("<unk>", 2), ("<s>", 3), ("</s>", 3)):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, kind
    seen = {"<unk>", "<s>", "</s>"}
    letters = "▁abcde中文"
    while len(m.pieces) < n:
        piece = "".join(rnd.choice(letters) for _ in range(rnd.randint(1, 4)))
        if piece in seen:
            continue
        seen.add(piece)
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, float(rnd.choice([0, -1, -2, -2.5, -3])), 1
    path.write_bytes(m.SerializeToString())


@pytest.mark.parametrize("with_scores", [True, False])
def test_fast_extract_equals_transformers(tmp_path: Path, with_scores: bool) -> None:
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    from repro_merge.convert import fast_extract

    _spm_with_ties(tmp_path / "t.model", 1500)
    ex = SentencePieceExtractor(str(tmp_path / "t.model"))
    scores = (
        [(ex.sp.id_to_piece(i), ex.sp.get_score(i)) for i in range(ex.sp.GetPieceSize())]
        if with_scores
        else None
    )
    want = ex.extract(scores)
    got = fast_extract(ex, scores)
    assert got == want and len(want[1]) > 500


_TORCH_INV_FREQ = """
import sys, numpy as np, torch
from repro_merge.convert import inv_freq
bad = []
for head_dim in range(2, int(sys.argv[1]) + 1, 2):
    exact = (1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))).numpy()
    if not np.array_equal(inv_freq(head_dim), exact.astype(np.float16).astype(np.float32)):
        bad.append(head_dim)
print(bad)
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "native"])
def test_inv_freq_equals_torch(capability: str) -> None:
    """The converter's expression under each of torch's CPU kernels (set before torch starts, hence a
    process each) gives our buffer, for every even head size up to 2048 (real LLaMA: 128)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    r = subprocess.run(
        [sys.executable, "-c", _TORCH_INV_FREQ, "2048"], env=env, capture_output=True, text=True, check=True
    )
    assert r.stdout.strip() == "[]"


def test_inv_freq_fp32_is_powf() -> None:
    """Before the fp16 rounding, our values are torch's scalar kernel's bit for bit (so the rounding is
    the only step that hides a difference, and there is none to hide)."""
    code = """
import numpy as np, torch
from repro_merge import convert
for d in range(2, 1025, 2):
    e = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    ours = np.float32(1.0) / np.array([convert._powf()(10000.0, float(x)) for x in e], dtype=np.float32)
    want = (1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))).numpy()
    assert np.array_equal(ours, want), d
"""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


@pytest.mark.parametrize(
    "value", ["10GB", "200KB", "60KB", "1KB", "5GiB", "400MiB", "3KiB", "10Gb", "8mb", 1234]
)
def test_size_strings_as_transformers_reads_them(value: str | int) -> None:
    from transformers.modeling_utils import convert_file_size_to_int

    from repro_merge.convert import parse_size

    assert parse_size(value) == convert_file_size_to_int(value)


def test_bad_size_string() -> None:
    from repro_merge.convert import parse_size

    with pytest.raises(BadInputError, match="max_shard_size"):
        parse_size("10 parsecs")
