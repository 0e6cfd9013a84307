"""Deterministic tiny checkpoints: an original-LLaMA root in Meta layout and Chinese LoRA adapters.

Real weights cannot be downloaded and must never be needed at run time, so every code path is exercised
on this family instead. Every value is an exact small integer ratio drawn from a counter-based seed, so
the bytes are the same on every run and machine; the published tiny golden hashes depend on that.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repro_merge import ptzip
from repro_merge.errors import OutputExistsError
from repro_merge.layout import meta_split_axis
from repro_merge.sizes import TINY_SIZES, VARIANT_ADAPTERS, ModelSize

# Vocabulary sizes mirror the real ones (32000 / 49953 / 49954): Chinese LLaMA extends the base
# vocabulary to an odd size (the 13B layout then splits output.weight unevenly), Alpaca adds one pad.
BASE_NORMAL_PIECES = 61  # 3 specials + 256 byte pieces + 61 = 320
CHINESE_PIECES = "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着"
ALPACA_PAD = "[PAD]"
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")


@dataclass(frozen=True)
class AdapterSpec:
    """One released adapter: which tokenizer, dtype and LoRA rank/alpha it has."""

    name: str  # variant name: llama, llama-plus, alpaca, alpaca-plus, alpaca-pro
    release: str  # released folder stem, e.g. chinese_alpaca_plus_lora
    alpaca: bool  # Alpaca tokenizer (LLaMA's plus one pad token)
    dtype: str  # float16 or float32
    r: int
    alpha: int


# At least one fp32 adapter and ranks/alphas other than 8/32, so the arithmetic paths that differ
# between CPUs (inexact fp32 products, non-power-of-two scaling) are covered.
ADAPTERS: dict[str, AdapterSpec] = {
    a.name: a
    for a in (
        AdapterSpec("llama", "chinese_llama_lora", False, "float16", 8, 32),
        AdapterSpec("llama-plus", "chinese_llama_plus_lora", False, "float16", 8, 32),
        AdapterSpec("alpaca", "chinese_alpaca_lora", True, "float16", 8, 32),
        AdapterSpec("alpaca-plus", "chinese_alpaca_plus_lora", True, "float32", 16, 32),
        AdapterSpec("alpaca-pro", "chinese_alpaca_pro_lora", True, "float16", 6, 20),
    )
}
assert {a for names in VARIANT_ADAPTERS.values() for a in names} == set(ADAPTERS)


def _rng(*name: str) -> np.random.Generator:
    """A generator seeded from a tensor's name, so each tensor is independent of generation order."""
    seed = int.from_bytes(hashlib.sha256("/".join(name).encode()).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(seed))


def _values(shape: tuple[int, ...], dtype: str, scale_bits: int, *name: str) -> np.ndarray:
    """Exactly representable values k / 2**scale_bits with k of the dtype's full precision."""
    mant = 10 if dtype == "float16" else 23
    k = _rng(*name).integers(-(2**mant), 2**mant, size=shape, dtype=np.int64)
    return (k / 2.0 ** (mant + scale_bits)).astype(dtype)


def _norm(n: int, *name: str) -> np.ndarray:
    """RMSNorm weights near 1, like trained ones."""
    k = _rng(*name).integers(128, 384, size=(n,), dtype=np.int64)
    return (k / 256.0).astype(np.float16)


# ---------------------------------------------------------------------------------------------- tokenizers


def _sp_model(extra: list[str], user_defined: list[str]) -> bytes:
    """A LLaMA-style byte-fallback BPE sentencepiece model, built directly as a protobuf."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = 0  # set below
    t.byte_fallback = True
    t.split_digits = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    Piece = pb.ModelProto.SentencePiece

    def add(piece: str, score: float, kind: int) -> None:
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, score, kind

    add("<unk>", 0.0, Piece.UNKNOWN)
    add("<s>", 0.0, Piece.CONTROL)
    add("</s>", 0.0, Piece.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, Piece.BYTE)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges = [
        "▁t",
        "he",
        "▁the",
        "in",
        "er",
        "an",
        "▁a",
        "on",
        "re",
        "at",
        "en",
        "▁s",
        "ed",
        "▁o",
        "nd",
        "es",
        "▁w",
        "or",
        "▁c",
        "is",
        "it",
        "ar",
        "▁f",
        "▁b",
        "al",
        "ing",
        "▁p",
        "ou",
        "▁m",
        "▁in",
        "le",
        "▁d",
        "ic",
        "▁and",
    ]
    normal = merges + ["▁"] + letters
    assert len(normal) == BASE_NORMAL_PIECES
    for i, piece in enumerate(normal + extra):
        add(piece, -float(i), Piece.NORMAL)
    for piece in user_defined:
        add(piece, 0.0, Piece.USER_DEFINED)
    t.vocab_size = len(m.pieces)
    return m.SerializeToString()


def _tokenizer_files(out: Path, extra: list[str], user_defined: list[str], pad: str | None) -> int:
    """tokenizer.model plus the HF tokenizer files the released adapters carry; returns len(tokenizer)."""
    from transformers import LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp, "tokenizer.model")
        model.write_bytes(_sp_model(extra, user_defined))
        kwargs = {"pad_token": pad} if pad else {}
        tok = LlamaTokenizer(vocab_file=str(model), **kwargs)
        tok.save_pretrained(str(out))
    return len(tok)


# ------------------------------------------------------------------------------------------------- weights


def meta_tensors(size: ModelSize, vocab: int) -> Iterator[tuple[str, np.ndarray]]:
    """The full (unsharded) original checkpoint, in Meta's key order."""
    d, f = size.dim, size.ffn_dim
    tag = size.name
    yield "tok_embeddings.weight", _values((vocab, d), "float16", 1, tag, "tok_embeddings")
    yield "norm.weight", _norm(d, tag, "norm")
    yield "output.weight", _values((vocab, d), "float16", 1, tag, "output")
    for i in range(size.n_layers):
        p = f"layers.{i}."
        for key, shape in (
            ("attention.wq", (d, d)),
            ("attention.wk", (d, d)),
            ("attention.wv", (d, d)),
            ("attention.wo", (d, d)),
            ("feed_forward.w1", (f, d)),
            ("feed_forward.w2", (d, f)),
            ("feed_forward.w3", (f, d)),
        ):
            yield p + key + ".weight", _values(shape, "float16", 1, tag, p + key)
        yield p + "attention_norm.weight", _norm(d, tag, p + "attention_norm")
        yield p + "ffn_norm.weight", _norm(d, tag, p + "ffn_norm")
    half = size.head_dim // 2
    yield "rope.freqs", (1.0 / (10000.0 ** (np.arange(half, dtype=np.float64) / half))).astype(np.float32)


def _meta_shards(size: ModelSize, vocab: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{} for _ in range(size.num_shards)]
    for key, full in meta_tensors(size, vocab):
        dim = meta_split_axis(key)
        parts = [full] * size.num_shards if dim is None else np.split(full, size.num_shards, axis=dim)
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = np.ascontiguousarray(part)
    return shards


def adapter_tensors(size: ModelSize, spec: AdapterSpec, vocab: int) -> Iterator[tuple[str, np.ndarray]]:
    """An adapter_model.bin's content in peft 0.3.0's key order: full embeddings plus LoRA A/B pairs."""
    d, f, r, dt = size.dim, size.ffn_dim, spec.r, spec.dtype
    tag = (size.name, spec.name)
    pre = "base_model.model."
    yield pre + "model.embed_tokens.weight", _values((vocab, d), dt, 1, *tag, "embed_tokens")
    shapes = {
        "q_proj": (d, d),
        "k_proj": (d, d),
        "v_proj": (d, d),
        "o_proj": (d, d),
        "gate_proj": (f, d),
        "down_proj": (d, f),
        "up_proj": (f, d),
    }
    for i in range(size.n_layers):
        for mod in LORA_MODULES:
            out_f, in_f = shapes[mod]
            where = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"{pre}model.layers.{i}.{where}.{mod}"
            yield key + ".lora_A.weight", _values((r, in_f), dt, 4, *tag, key, "A")
            yield key + ".lora_B.weight", _values((out_f, r), dt, 4, *tag, key, "B")
    yield pre + "lm_head.weight", _values((vocab, d), dt, 1, *tag, "lm_head")


def adapter_config(spec: AdapterSpec) -> dict[str, object]:
    """adapter_config.json as peft 0.3.0 writes it for the released Chinese adapters."""
    return {
        "base_model_name_or_path": "decapoda-research/llama-7b-hf",
        "bias": "none",
        "enable_lora": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": float(spec.alpha),
        "lora_dropout": 0.05,
        "merge_weights": False,
        "modules_to_save": ["embed_tokens", "lm_head"],
        "peft_type": "LORA",
        "r": spec.r,
        "target_modules": list(LORA_MODULES),
        "task_type": "CAUSAL_LM",
    }


def lora_dir_name(size: ModelSize, variant: str) -> str:
    """Released folder name, e.g. chinese_alpaca_plus_lora_13b (33B for the 30B folder)."""
    user = size.name.removeprefix("tiny-").lower()
    return f"{ADAPTERS[variant].release}_{user}"


# ------------------------------------------------------------------------------------------------- writing


def _save(path: Path, tensors: dict[str, np.ndarray] | Iterator[tuple[str, np.ndarray]]) -> None:
    ptzip.save_arrays(path, tensors.items() if isinstance(tensors, dict) else tensors)


def write_fixtures(out: Path) -> list[Path]:
    """Write the whole tiny family under ``out`` (must be empty or absent); returns the files written.

    ``out/llama`` is an original-LLaMA root (``tokenizer.model``; ``7B``, ``13B``, ``30B``, ``65B`` with
    ``consolidated.0N.pth`` and ``params.json``); ``out/lora/<release>_<size>`` are the adapters. The
    family is written into a sibling temporary folder and renamed into place, so a crash never leaves a
    partial family under the final name.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(
            f"{out}: exists and is not an empty folder; fixtures are only written into a new or empty folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_family(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the family from other users (e.g. in a container)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p for p in out.rglob("*") if p.is_file())


def _write_family(root: Path) -> None:
    chinese = list(CHINESE_PIECES)
    llama = root / "llama"
    base_vocab = _tokenizer_files(llama, [], [], None)
    for extra in ("special_tokens_map.json", "tokenizer_config.json"):
        (llama / extra).unlink()  # Meta ships tokenizer.model alone
    vocab = {False: len(chinese) + base_vocab, True: len(chinese) + base_vocab + 1}
    for size in TINY_SIZES.values():
        folder = llama / size.folder
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps(size.params_json()))
        for i, shard in enumerate(_meta_shards(size, base_vocab)):
            _save(folder / f"consolidated.{i:02d}.pth", shard)
        for spec in ADAPTERS.values():
            lora = root / "lora" / lora_dir_name(size, spec.name)
            n = _tokenizer_files(
                lora, chinese, [ALPACA_PAD] if spec.alpaca else [], ALPACA_PAD if spec.alpaca else None
            )
            assert n == vocab[spec.alpaca], (n, vocab)
            (lora / "adapter_config.json").write_text(
                json.dumps(adapter_config(spec), indent=2, sort_keys=True)
            )
            _save(lora / "adapter_model.bin", adapter_tensors(size, spec, n))
