"""The tiny family is deterministic, laid out as Meta and peft lay out the real files, and pinned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tree_hashes
from transformers import LlamaTokenizer

from repro_merge import checksums
from repro_merge.errors import OutputExistsError
from repro_merge.fixtures import ADAPTERS, lora_dir_name, meta_tensors, write_fixtures
from repro_merge.layout import meta_split_axis
from repro_merge.sizes import TINY_SIZES


def test_hashes_pinned(tiny: Path) -> None:
    """SHA256.md's fixture rows, first written from a run of `repro-merge fixtures` (sha256sum per file)."""
    assert tree_hashes(tiny) == checksums.load().expected("fixtures", "tiny")


def test_identical_across_runs(tiny: Path, tmp_path: Path) -> None:
    write_fixtures(tmp_path / "again")
    assert tree_hashes(tmp_path / "again") == tree_hashes(tiny)


def test_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="exists and is not an empty folder") as e:
        write_fixtures(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("folder", list(TINY_SIZES))
def test_meta_layout(tiny: Path, folder: str) -> None:
    size = TINY_SIZES[folder]
    root = tiny / "llama" / folder
    params = json.loads((root / "params.json").read_text())
    assert params == {
        "dim": size.dim,
        "multiple_of": 256,
        "n_heads": size.n_heads,
        "n_layers": size.n_layers,
        "norm_eps": size.norm_eps,
        "vocab_size": -1,
    }
    shards = [torch.load(root / f"consolidated.{i:02d}.pth") for i in range(size.num_shards)]
    assert sorted(p.name for p in root.glob("*.pth")) == [
        f"consolidated.{i:02d}.pth" for i in range(size.num_shards)
    ]
    vocab = len(LlamaTokenizer(str(tiny / "llama" / "tokenizer.model")))
    for key, full in meta_tensors(size, vocab):
        dim = meta_split_axis(key)
        parts = [s[key] for s in shards]
        if dim is None:
            assert all(torch.equal(p, torch.from_numpy(full)) for p in parts)
        else:
            assert torch.equal(torch.cat(parts, dim=dim), torch.from_numpy(full)), key
        assert all(p.is_contiguous() and p.storage().size() == p.numel() for p in parts), key
    assert list(shards[0])[:4] == [
        "tok_embeddings.weight",
        "norm.weight",
        "output.weight",
        "layers.0.attention.wq.weight",
    ]


@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_adapter_layout(tiny: Path, variant: str) -> None:
    spec = ADAPTERS[variant]
    size = TINY_SIZES["13B"]
    root = tiny / "lora" / lora_dir_name(size, variant)
    assert root.name == f"{spec.release}_13b"
    assert sorted(p.name for p in root.iterdir()) == [
        "adapter_config.json",
        "adapter_model.bin",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    cfg = json.loads((root / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["fan_in_fan_out"]) == (spec.r, spec.alpha, False)
    sd = torch.load(root / "adapter_model.bin")
    vocab = len(LlamaTokenizer.from_pretrained(str(root)))
    assert vocab == (362 if spec.alpaca else 361)
    assert sd["base_model.model.model.embed_tokens.weight"].shape == (vocab, size.dim)
    assert sd["base_model.model.lm_head.weight"].shape == (vocab, size.dim)
    a = sd["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = sd["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (spec.r, size.ffn_dim) and b.shape == (size.dim, spec.r)
    assert {t.dtype for t in sd.values()} == {getattr(torch, spec.dtype)}
    lora_keys = [k for k in sd if "lora_" in k]
    assert len(lora_keys) == 2 * 7 * size.n_layers


def test_variety_of_adapters() -> None:
    """What the arithmetic tests rely on: an fp32 adapter and a scaling other than 32/8."""
    assert any(a.dtype == "float32" for a in ADAPTERS.values())
    assert any((a.r, a.alpha) != (8, 32) for a in ADAPTERS.values())
