"""Model-size table: the one place that knows the real LLaMA shapes and our tiny stand-ins.

Real sizes are what Meta released (33B is stored in a folder named ``30B``). Each real size has a tiny
counterpart with the same *layout* (shard count, odd/even splits, head grouping) but dimensions small
enough for tests; the tiny dims differ per size so that the embedding width alone identifies the layout,
as the upstream merge script identifies real sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    """Shape parameters of one model size, as written in Meta's ``params.json``."""

    name: str  # the name users know: 7B, 13B, 33B, 65B (tiny: tiny-7B, ...)
    folder: str  # the folder Meta ships it in, which the converter requires: 7B, 13B, 30B, 65B
    dim: int
    n_heads: int
    n_layers: int
    num_shards: int  # consolidated.0N.pth files
    norm_eps: float = 1e-6
    multiple_of: int = 256

    @property
    def ffn_dim(self) -> int:
        """Feed-forward width: Meta's rule, int(8*dim/3) rounded up to ``multiple_of``."""
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def params_json(self) -> dict[str, float | int]:
        """The ``params.json`` Meta ships with the checkpoint (vocab_size -1: taken from the tokenizer)."""
        return {
            "dim": self.dim,
            "multiple_of": self.multiple_of,
            "n_heads": self.n_heads,
            "n_layers": self.n_layers,
            "norm_eps": self.norm_eps,
            "vocab_size": -1,
        }


REAL_SIZES: dict[str, ModelSize] = {
    s.name: s
    for s in (
        ModelSize("7B", "7B", dim=4096, n_heads=32, n_layers=32, num_shards=1),
        ModelSize("13B", "13B", dim=5120, n_heads=40, n_layers=40, num_shards=2),
        ModelSize("33B", "30B", dim=6656, n_heads=52, n_layers=60, num_shards=4),
        ModelSize("65B", "65B", dim=8192, n_heads=64, n_layers=80, num_shards=8, norm_eps=1e-5),
    )
}

# Tiny counterparts: same shard counts and folder names, dims chosen so every Meta split divides evenly
# and each layout has its own embedding width.
TINY_SIZES: dict[str, ModelSize] = {
    s.folder: s
    for s in (
        ModelSize("tiny-7B", "7B", dim=64, n_heads=4, n_layers=2, num_shards=1),
        ModelSize("tiny-13B", "13B", dim=80, n_heads=4, n_layers=2, num_shards=2),
        ModelSize("tiny-33B", "30B", dim=96, n_heads=8, n_layers=3, num_shards=4),
        ModelSize("tiny-65B", "65B", dim=128, n_heads=8, n_layers=2, num_shards=8, norm_eps=1e-5),
    )
}

# What transformers 4.28.1's converter accepts as --model_size, and its shard count for each.
CONVERTER_SHARDS: dict[str, int] = {"7B": 1, "13B": 2, "30B": 4, "65B": 8}


def folder_for(size: str) -> str:
    """Meta folder name for a size name a user may type (``33B`` lives in ``30B``)."""
    if size in REAL_SIZES:
        return REAL_SIZES[size].folder
    if size in CONVERTER_SHARDS:
        return size
    raise ValueError(f"unknown model size {size!r}: expected one of 7B, 13B, 33B (30B), 65B")


def real_size_by_dim(dim: int) -> ModelSize | None:
    """The real size whose embedding width is ``dim``, as the upstream merge script recognises it."""
    return next((s for s in REAL_SIZES.values() if s.dim == dim), None)


def hf_intermediate_size(dim: int) -> int:
    """transformers 4.28.1's converter rule for the MLP width (ignores ``multiple_of``)."""
    return int(math.ceil(dim * 8 / 3) + 255) // 256 * 256


# The buildable models: which adapters are merged, in order, onto the original LLaMA.
VARIANT_ADAPTERS: dict[str, tuple[str, ...]] = {
    "llama": ("llama",),
    "llama-plus": ("llama-plus",),
    "alpaca": ("alpaca",),
    "alpaca-plus": ("llama-plus", "alpaca-plus"),
    "alpaca-pro": ("llama-plus", "alpaca-pro"),
}


# The released tokenizers' lengths, by family: Chinese LLaMA extends LLaMA's 32000 pieces to 49953,
# Alpaca adds a pad token. A merged model has the vocabulary of its last adapter's tokenizer.
RELEASED_VOCAB: dict[str, int] = {"llama": 49953, "alpaca": 49954}


def tokenizer_family(adapter: str) -> str:
    """Which released tokenizer an adapter (variant or folder name) ships: llama or alpaca."""
    return "alpaca" if "alpaca" in adapter else "llama"


@dataclass(frozen=True)
class BuildSize:
    """A size ``repro-merge build`` knows: where its inputs live and how its HF base is sharded."""

    name: str  # 7B, 13B, 33B, tiny
    folder: str  # the original LLaMA folder (and converter --model_size)
    lora_suffix: str  # released adapter folders end in _<suffix>: chinese_llama_lora_7b
    max_shard_size: str  # HF base shards: the converter's default for real models
    num_shards: int | None  # merge --num_shards: None where the width is a real size


BUILD_SIZES: dict[str, BuildSize] = {
    s.name: s
    for s in (
        BuildSize("7B", "7B", "7b", "10GB", None),
        BuildSize("13B", "13B", "13b", "10GB", None),
        BuildSize("33B", "30B", "33b", "10GB", None),
        # the 13B layout of the tiny family: 2 pth shards, an odd vocabulary split unevenly, 3 HF shards
        BuildSize("tiny", "13B", "13b", "200KB", 2),
    )
}
