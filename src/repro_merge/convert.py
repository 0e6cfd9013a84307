"""Step 1: Meta's original checkpoint -> Hugging Face layout, byte-identical to transformers 4.28.1's
``convert_llama_weights_to_hf.py``, one output tensor in memory at a time.

The reference loads every shard, writes one temporary file per layer, loads them into a model and
saves the model. What ends up on disk is fully determined by the weights and the model's state-dict
order, so this module computes each output tensor straight from the lazily read shards and streams it
into shards split exactly as ``save_pretrained`` splits them. transformers itself still writes the
small files (config, generation config, tokenizer), so they match by construction.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repro_merge import ptzip
from repro_merge.errors import BadInputError
from repro_merge.floats import cast
from repro_merge.layout import meta_split_axis, permute
from repro_merge.outputs import prepare_output_dir, publish_from, staged_file, write_bytes
from repro_merge.sizes import CONVERTER_SHARDS, folder_for, hf_intermediate_size

F16 = ptzip.DTYPES["float16"]
F32 = ptzip.DTYPES["float32"]


@dataclass
class MetaCheckpoint:
    """A validated original checkpoint: its parameters and its shards, opened lazily."""

    folder: Path
    size: str  # the converter's folder name: 7B, 13B, 30B, 65B
    dim: int
    n_heads: int
    n_layers: int
    norm_eps: float
    vocab: int
    ffn: int
    shards: list[ptzip.Checkpoint]

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def part(self, i: int, key: str) -> np.ndarray:
        """Shard ``i``'s slice of ``key`` as float16 (the converter's model is loaded in fp16)."""
        meta = self.shards[i].tensors[key]
        return cast(self.shards[i].tensor(key), meta.dtype.name, "float16")

    def cat(self, key: str, axis: int) -> np.ndarray:
        parts = [self.part(i, key) for i in range(len(self.shards))]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)

    def close(self) -> None:
        for s in self.shards:
            s.close()


# ------------------------------------------------------------------------------------------ validation


def _bad(path: Path, what: str) -> BadInputError:
    return BadInputError(f"{path}: {what}")


def _expected_keys(n_layers: int) -> list[str]:
    keys = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    for i in range(n_layers):
        keys += [f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]
        keys += [f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
        keys += [f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"]
    return keys


def open_meta(input_dir: Path, model_size: str) -> MetaCheckpoint:
    """Open and check everything the conversion needs, before a byte is written."""
    input_dir = Path(input_dir)
    try:
        size = folder_for(model_size)
    except ValueError as e:
        raise BadInputError(f"--model_size: {e}") from None
    folder = input_dir / size
    if not input_dir.is_dir():
        raise _bad(input_dir, "input folder not found")
    if not (input_dir / "tokenizer.model").is_file():
        raise _bad(
            input_dir / "tokenizer.model", "missing: the original LLaMA root must hold tokenizer.model"
        )
    if not folder.is_dir():
        raise _bad(folder, f"missing: no {size} folder under the input folder")
    params = _read_params(folder / "params.json")
    n = CONVERTER_SHARDS[size]
    found = sorted(p.name for p in folder.glob("consolidated.*.pth"))
    want = [f"consolidated.{i:02d}.pth" for i in range(n)]
    for name in want:
        if name not in found:
            raise _bad(
                folder / name, f"missing: {size} has {n} shard(s), found {len(found)} ({', '.join(found)})"
            )
    if found != want:
        raise _bad(
            folder, f"{size} has {n} shard(s) consolidated.00..{n - 1:02d}, found {len(found)}: {found}"
        )
    dim, heads, layers = params["dim"], params["n_heads"], params["n_layers"]
    if dim % heads or (dim // heads) % 2 or heads % n:
        raise _bad(folder / "params.json", f"dim {dim} and n_heads {heads} do not split into {n} shard(s)")
    shards = [ptzip.Checkpoint(folder / name) for name in want]
    try:
        vocab, ffn = _check_shapes(folder, shards, dim, heads, layers, n)
    except BadInputError:
        for s in shards:
            s.close()
        raise
    if ffn != hf_intermediate_size(dim):
        for s in shards:
            s.close()
        raise _bad(
            folder / want[0],
            f"feed-forward width {ffn} differs from {hf_intermediate_size(dim)}, the width transformers"
            f" 4.28.1 gives dim {dim}: the reference converter cannot load this checkpoint",
        )
    return MetaCheckpoint(folder, size, dim, heads, layers, float(params["norm_eps"]), vocab, ffn, shards)


def _read_params(path: Path) -> dict:
    try:
        params = json.loads(path.read_text())
    except FileNotFoundError:
        raise _bad(path, "missing") from None
    except (OSError, ValueError) as e:
        raise _bad(path, f"not readable JSON ({e})") from None
    if not isinstance(params, dict):
        raise _bad(path, f"must be a JSON object, not {type(params).__name__}")
    for field in ("dim", "n_heads", "n_layers", "norm_eps"):
        if field not in params:
            raise _bad(path, f"has no {field!r}")
    if not all(isinstance(params[f], int) and params[f] > 0 for f in ("dim", "n_heads", "n_layers")):
        raise _bad(path, "dim, n_heads and n_layers must be positive integers")
    eps = params["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
        raise _bad(path, f"norm_eps must be a number between 0 and 1, got {eps!r}")
    return params


def _check_shapes(
    folder: Path, shards: list[ptzip.Checkpoint], dim: int, heads: int, layers: int, n: int
) -> tuple[int, int]:
    """Every key present in every shard with the shape Meta's split gives, and params.json's layer and
    head counts those of the tensors (a wrong one would silently drop layers or scramble q and k);
    returns (vocab, ffn)."""
    first = shards[0]
    for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if key not in first.tensors:
            raise _bad(first.path, f"has no {key}: not an original LLaMA checkpoint")
    vocab = first.tensors["tok_embeddings.weight"].shape[0]
    ffn = first.tensors["layers.0.feed_forward.w1.weight"].shape[0] * n
    full = {"tok_embeddings.weight": (vocab, dim), "output.weight": (vocab, dim), "norm.weight": (dim,)}
    for i in range(layers):
        for w in ("wq", "wk", "wv", "wo"):
            full[f"layers.{i}.attention.{w}.weight"] = (dim, dim)
        full[f"layers.{i}.feed_forward.w1.weight"] = (ffn, dim)
        full[f"layers.{i}.feed_forward.w2.weight"] = (dim, ffn)
        full[f"layers.{i}.feed_forward.w3.weight"] = (ffn, dim)
        full[f"layers.{i}.attention_norm.weight"] = full[f"layers.{i}.ffn_norm.weight"] = (dim,)
    for shard in shards:
        for key in _expected_keys(layers):
            meta = shard.tensors.get(key)
            if meta is None:
                raise _bad(shard.path, f"has no {key} (params.json says {layers} layers)")
            if meta.dtype.name not in ("float16", "float32", "bfloat16"):
                raise _bad(shard.path, f"{key} is {meta.dtype.name}, expected a floating-point weight")
            axis = meta_split_axis(key)
            want = list(full[key])
            if axis is not None:
                if want[axis] % n:
                    raise _bad(shard.path, f"{key}: {want[axis]} does not split into {n} shards")
                want[axis] //= n
            if list(meta.shape) != want:
                raise _bad(
                    shard.path,
                    f"{key} has shape {list(meta.shape)}, expected {want} for dim {dim} in {n} shard(s)",
                )
    more = f"layers.{layers}.attention_norm.weight"
    if more in first.tensors:
        raise _bad(folder / "params.json", f"n_layers is {layers}, but {first.path.name} has {more}")
    rope = first.tensors.get("rope.freqs")
    if rope is not None and list(rope.shape) != [dim // heads // 2]:
        raise _bad(
            folder / "params.json",
            f"n_heads is {heads}, but rope.freqs in {first.path.name} has {rope.shape[0]} entries, "
            f"not dim / n_heads / 2 = {dim // heads // 2}",
        )
    return vocab, ffn


# ------------------------------------------------------------------------------------------ the HF tensors


@functools.cache
def _powf() -> Callable[[float, float], float]:
    """The C library's fp32 ``powf``: what torch's scalar CPU kernel calls for ``float ** tensor``.

    numpy's fp32 power is not usable here: with AVX-512 it switches to SVML, whose results differ in the
    last bit and, for some head sizes, after the fp16 rounding too (578 is the first), so the output
    would depend on the CPU. torch's own AVX2/AVX-512 kernels (what the converter runs on such a CPU)
    equal ``powf`` after the fp16 rounding for every even head size up to 3410 (tests check both).
    """
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    fn = libm.powf
    fn.argtypes, fn.restype = [ctypes.c_float, ctypes.c_float], ctypes.c_float
    return fn


def inv_freq(head_dim: int) -> np.ndarray:
    """The rotary buffer every HF layer saves, ``1 / 10000 ** (arange(0, d, 2) / d)`` in fp32, rounded
    through fp16 (the converter's model is loaded in fp16, which rounds the buffer; it is saved as fp32
    again). Real LLaMA heads are 128 wide: 64 calls."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    powers = np.array([_powf()(10000.0, float(x)) for x in exponent], dtype=np.float32)
    return (np.float32(1.0) / powers).astype(np.float16).astype(np.float32)


@dataclass(frozen=True)
class HFTensor:
    name: str
    dtype: ptzip.DType
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def hf_tensors(m: MetaCheckpoint) -> list[HFTensor]:
    """The converted model's state dict, in ``LlamaForCausalLM.state_dict()`` order."""
    d, f, v, h = m.dim, m.ffn, m.vocab, m.n_heads
    rope = inv_freq(m.head_dim)

    def qk(key: str) -> Callable[[], np.ndarray]:
        # shards hold whole heads: concatenating on rows keeps each head's rows together
        return lambda: permute(m.cat(key, 0), h)

    out = [HFTensor("model.embed_tokens.weight", F16, (v, d), lambda: m.cat("tok_embeddings.weight", 1))]
    for i in range(m.n_layers):
        a, p, ff = f"layers.{i}.attention.", f"model.layers.{i}.", f"layers.{i}.feed_forward."
        out += [
            HFTensor(p + "self_attn.q_proj.weight", F16, (d, d), qk(a + "wq.weight")),
            HFTensor(p + "self_attn.k_proj.weight", F16, (d, d), qk(a + "wk.weight")),
            HFTensor(p + "self_attn.v_proj.weight", F16, (d, d), lambda k=a + "wv.weight": m.cat(k, 0)),
            HFTensor(p + "self_attn.o_proj.weight", F16, (d, d), lambda k=a + "wo.weight": m.cat(k, 1)),
            HFTensor(p + "self_attn.rotary_emb.inv_freq", F32, rope.shape, lambda: rope),
            HFTensor(p + "mlp.gate_proj.weight", F16, (f, d), lambda k=ff + "w1.weight": m.cat(k, 0)),
            HFTensor(p + "mlp.down_proj.weight", F16, (d, f), lambda k=ff + "w2.weight": m.cat(k, 1)),
            HFTensor(p + "mlp.up_proj.weight", F16, (f, d), lambda k=ff + "w3.weight": m.cat(k, 0)),
            HFTensor(
                p + "input_layernorm.weight",
                F16,
                (d,),
                lambda k=f"layers.{i}.attention_norm.weight": m.part(0, k),
            ),
            HFTensor(
                p + "post_attention_layernorm.weight",
                F16,
                (d,),
                lambda k=f"layers.{i}.ffn_norm.weight": m.part(0, k),
            ),
        ]
    out += [
        HFTensor("model.norm.weight", F16, (d,), lambda: m.part(0, "norm.weight")),
        HFTensor("lm_head.weight", F16, (v, d), lambda: m.cat("output.weight", 0)),
    ]
    return out


# ------------------------------------------------------------------------------------------ sharding


def split_shards(tensors: list[HFTensor], max_shard_size: int) -> list[list[HFTensor]]:
    """``shard_checkpoint``'s greedy split: a new shard when the next tensor would pass the limit (so a
    first tensor larger than the limit leaves an empty first shard, as transformers 4.28.1 does)."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in tensors:
        if size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["pytorch_model.bin"]
    return [f"pytorch_model-{i + 1:05d}-of-{count:05d}.bin" for i in range(count)]


_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}


def parse_size(value: str | int) -> int:
    """``save_pretrained``'s max_shard_size, read as transformers 4.28.1 reads it: "10GB" is 10**10 bytes,
    "10GiB" 10 * 2**30, and a lower-case final "b" of GB/MB/KB means bits. (Parsed here rather than
    imported: transformers.modeling_utils would import torch, seconds for one number.)"""
    if isinstance(value, int):
        return value
    for unit, factor in _UNITS.items():
        if value.upper().endswith(unit):
            try:
                size = int(value[: -len(unit)]) * factor
            except ValueError:
                break
            return size // 8 if len(unit) == 2 and value.endswith("b") else size
    raise BadInputError(f"--max_shard_size: {value!r} is not a size such as 10GB, 400MB or 5GiB")


def write_state_dict(path: Path, tensors: list[HFTensor]) -> None:
    """Stream ``tensors`` into ``path`` (via a partial name), each its own contiguous storage."""
    entries = [(t.name, ptzip.TensorSpec(t.dtype, t.shape, t.name, math.prod(t.shape))) for t in tensors]
    makers = {t.name: t for t in tensors}

    def fill(name: object, slot: int) -> np.ndarray:  # a fresh array each time: slots need no care
        t = makers[name]  # type: ignore[index]
        a = t.make()
        if a.shape != t.shape or a.dtype != t.dtype.numpy:
            raise AssertionError(
                f"{t.name}: made {a.dtype}{list(a.shape)}, planned {t.dtype.name}{list(t.shape)}"
            )
        return a

    with staged_file(path) as tmp:  # each tensor is written while the next is made
        ptzip.save(tmp, entries, fill, archive=path.name, overlap=True)


# ------------------------------------------------------------------------------------------ config files


def _write_configs(out: Path, m: MetaCheckpoint) -> None:
    """config.json and generation_config.json through transformers, as the saved model writes them."""
    from transformers import GenerationConfig, LlamaConfig

    config = LlamaConfig(
        hidden_size=m.dim,
        intermediate_size=hf_intermediate_size(m.dim),
        num_attention_heads=m.n_heads,
        num_hidden_layers=m.n_layers,
        rms_norm_eps=m.norm_eps,
        vocab_size=m.vocab,  # 4.28.1 leaves its default 32000, which is real LLaMA's row count
    )
    config.torch_dtype = "float16"  # what save_pretrained records for the fp16 model
    config.architectures = ["LlamaForCausalLM"]
    publish_from(out, config.save_pretrained)
    publish_from(out, GenerationConfig.from_model_config(config).save_pretrained)


def fast_extract(self: object, vocab_scores: object = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """transformers 4.28.1's ``SentencePieceExtractor.extract``, with the same result, in O(V x L).

    The original tries every ordered pair of pieces (32000**2 dictionary lookups: minutes for LLaMA's
    tokenizer); a merge (l, r) exists exactly when l + r is a piece with a non-zero score and l and r
    are pieces, so splitting each piece at every position finds the same pairs. They are ordered as the
    original's stable sort leaves them: by score (descending when scores are given, else by id), ties
    in the order of the original's double loop (l's position, then r's).
    """
    sp = self.sp  # type: ignore[attr-defined]
    vocab = {sp.id_to_piece(index): index for index in range(sp.GetPieceSize())}
    if vocab_scores is not None:
        scores, reverse = dict(vocab_scores), True  # type: ignore[call-overload]
    else:
        scores, reverse = vocab, False
    position = {piece: i for i, piece in enumerate(vocab)}
    found = []
    for merged, score in scores.items():
        if not score:
            continue
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in position and right in position:
                found.append((-score if reverse else score, position[left], position[right], left, right))
    found.sort(key=lambda m: m[:3])
    return vocab, [(m[3], m[4]) for m in found]


def _write_tokenizer(out: Path, spm: Path) -> None:
    """tokenizer.json and friends through transformers' LlamaTokenizerFast, its slow-to-fast conversion
    sped up (see :func:`fast_extract`; the files are the same)."""
    from transformers import LlamaTokenizerFast, convert_slow_tokenizer

    extractor = convert_slow_tokenizer.SentencePieceExtractor
    slow = extractor.extract
    extractor.extract = fast_extract  # type: ignore[method-assign]
    try:
        tokenizer = LlamaTokenizerFast(str(spm))
    finally:
        extractor.extract = slow  # type: ignore[method-assign]
    publish_from(out, tokenizer.save_pretrained)


# ------------------------------------------------------------------------------------------ entry point


def convert(
    input_dir: Path,
    model_size: str,
    output_dir: Path,
    max_shard_size: str | int = "10GB",
    resume: bool = False,
) -> list[Path]:
    """Convert ``input_dir/<size>`` to HF format in ``output_dir``; returns the files written.

    With ``resume``, files already under their final names (complete, since every file is renamed into
    place only when whole) are kept and the rest are written.
    """
    output_dir = Path(output_dir)
    limit = parse_size(max_shard_size)
    m = open_meta(Path(input_dir), model_size)
    try:
        prepare_output_dir(output_dir, resume=resume)
        tensors = hf_tensors(m)
        shards = split_shards(tensors, limit)
        names = shard_names(len(shards))
        for name, shard in zip(names, shards, strict=True):
            if not (output_dir / name).exists():
                write_state_dict(output_dir / name, shard)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for t in tensors)},
                "weight_map": {
                    t.name: name for name, shard in zip(names, shards, strict=True) for t in shard
                },
            }
            write_bytes(
                output_dir / "pytorch_model.bin.index.json",
                (json.dumps(index, indent=2, sort_keys=True) + "\n").encode(),
            )
        _write_configs(output_dir, m)
        _write_tokenizer(output_dir, Path(input_dir) / "tokenizer.model")
    finally:
        m.close()
    return sorted(p for p in output_dir.iterdir() if not p.name.startswith("."))
