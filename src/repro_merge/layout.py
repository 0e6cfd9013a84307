"""The two weight layouts: Meta's (consolidated.*.pth, model-parallel shards) and Hugging Face's.

One place for the name mapping and for which axis Meta splits each weight on, used by the fixture
generator, the converter and the merge.
"""

from __future__ import annotations

import numpy as np

# HF layer-module suffix -> Meta layer-module suffix
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
ROTARY = "rotary_emb.inv_freq"  # an HF buffer with no Meta counterpart


def hf_to_meta(name: str) -> str | None:
    """Meta's name for an HF weight; None for the rotary buffer; KeyError for anything else."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        module, last = ".".join(parts[3:-1]), parts[-1]
        if f"{module}.{last}" == f"self_attn.{ROTARY}":
            return None
        if module in _LAYER_NAMES and last == "weight":
            return f"layers.{parts[2]}.{_LAYER_NAMES[module]}.weight"
    raise KeyError(name)


def meta_to_hf(name: str) -> str | None:
    """HF's name for a Meta weight; None for Meta's rope.freqs; KeyError for anything else."""
    if name == "rope.freqs":
        return None
    for hf, meta in _TOP_NAMES.items():
        if name == meta:
            return hf
    parts = name.split(".")
    module = ".".join(parts[2:-1])
    for hf, meta in _LAYER_NAMES.items():
        if parts[0] == "layers" and module == meta and parts[-1] == "weight":
            return f"model.layers.{parts[1]}.{hf}.weight"
    raise KeyError(name)


def meta_split_axis(name: str) -> int | None:
    """The axis Meta splits a weight on across model-parallel shards (None: replicated in each)."""
    if name.endswith("norm.weight") or name == "rope.freqs":
        return None
    if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    return 0


def is_rotated(meta_name: str) -> bool:
    """q and k are permuted between the layouts (Meta interleaves rotary pairs, HF splits halves)."""
    return meta_name.endswith(("attention.wq.weight", "attention.wk.weight"))


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta -> HF for q/k: each head's interleaved rotary pairs become two halves (the converter's)."""
    dim = w.shape[1]
    return np.ascontiguousarray(
        w.reshape(n_heads, dim // n_heads // 2, 2, dim).transpose(0, 2, 1, 3)
    ).reshape(dim, dim)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF -> Meta for q/k (the merge script's inverse of :func:`permute`)."""
    dim = w.shape[1]
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, dim // n_heads // 2, dim).transpose(0, 2, 1, 3)
    ).reshape(dim, dim)
