"""Step 2: merge one or two LoRA adapters into an HF base, streaming, byte-identical to the upstream
``scripts/merge_llama_with_chinese_lora_low_mem.py`` of ymcui/Chinese-LLaMA-Alpaca.

The script loads each base shard whole, merges it, and either saves it under its own name
(huggingface) or splits it into per-shard ``L<n>-consolidated.0<i>.pth`` files that it later loads
and merges (pth). Its files are fully determined by the merged tensors and their key order, so here
each merged tensor is computed once, from lazily read inputs, and written straight into its place in
every output file: peak memory is one tensor plus the adapters, and each output byte is written once.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repro_merge import arith, ptzip
from repro_merge.errors import BadInputError
from repro_merge.floats import cast, to_float32
from repro_merge.layout import hf_to_meta, is_rotated, meta_split_axis, unpermute
from repro_merge.outputs import prepare_output_dir, publish_from, staged_file, write_bytes
from repro_merge.sizes import real_size_by_dim

PREFIX = "base_model.model."  # how peft names the wrapped model's weights in adapter_model.bin
SHARD = re.compile(r"pytorch_model-(\d+)-of-(\d+)\.bin")
FLOATS = ("float16", "float32", "bfloat16")


# ------------------------------------------------------------------------------------------ inputs


def resolve(name: str, what: str) -> Path:
    """A local folder, or a hub id found in the local Hugging Face cache (never downloaded)."""
    path = Path(name)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HUGGINGFACE_HUB_CACHE

    try:
        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception:  # not a valid id, or not cached: huggingface_hub raises several types
        raise BadInputError(
            f"{name}: {what} not found, neither as a folder nor as a hub id in the local Hugging Face cache "
            f"({HUGGINGFACE_HUB_CACHE}); repro-merge never downloads"
        ) from None


@dataclass
class Adapter:
    """One LoRA adapter: its scaling, its tokenizer's length, and its weights opened lazily."""

    path: Path
    r: int
    alpha: float
    fan_in_fan_out: bool
    vocab: int
    ck: ptzip.Checkpoint
    full: dict[str, str] = field(default_factory=dict)  # base key -> adapter key of a replacing weight
    lora: dict[str, tuple[str, str]] = field(default_factory=dict)  # base key -> (lora_A, lora_B) keys

    @property
    def scale(self) -> float:
        return self.alpha / self.r  # a Python float, as peft's config gives the script

    @property
    def file(self) -> Path:
        return self.ck.path

    def f32(self, key: str) -> np.ndarray:
        return to_float32(self.ck.tensor(key), self.ck.tensors[key].dtype.name)


def open_adapter(path: Path) -> Adapter:
    """Read and check an adapter folder: config fields, weights (weights-only), tokenizer length."""
    cfg_path = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{cfg_path}: missing: not a LoRA adapter folder") from None
    except (OSError, ValueError) as e:
        raise BadInputError(f"{cfg_path}: not readable JSON ({e})") from None
    for name in ("r", "lora_alpha"):
        if not isinstance(cfg.get(name), int | float) or isinstance(cfg.get(name), bool) or cfg[name] <= 0:
            raise BadInputError(f"{cfg_path}: field {name!r} is missing or not a positive number")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise BadInputError(
            f"{cfg_path}: peft_type is {cfg['peft_type']!r}, only LORA adapters can be merged"
        )
    vocab = _tokenizer_length(path)
    ck = ptzip.Checkpoint(path / "adapter_model.bin")
    ad = Adapter(path, int(cfg["r"]), cfg["lora_alpha"], bool(cfg.get("fan_in_fan_out", False)), vocab, ck)
    for key, meta in ck.tensors.items():
        if not key.startswith(PREFIX) or meta.dtype.name not in FLOATS:
            raise BadInputError(f"{ck.path}: unexpected entry {key} ({meta.dtype.name})")
        base = key[len(PREFIX) :]
        if base.endswith(".lora_A.weight"):
            partner = key.replace(".lora_A.weight", ".lora_B.weight")
            if partner not in ck.tensors:
                raise BadInputError(f"{ck.path}: {key} has no matching lora_B")
            ad.lora[base.replace(".lora_A.weight", ".weight")] = (key, partner)
        elif base.endswith(".lora_B.weight"):
            if key.replace(".lora_B.weight", ".lora_A.weight") not in ck.tensors:
                raise BadInputError(f"{ck.path}: {key} has no matching lora_A")
        else:
            ad.full[base] = key
    for ka, kb in ad.lora.values():
        a, b = ck.tensors[ka].shape, ck.tensors[kb].shape
        if len(a) != 2 or len(b) != 2 or a[0] != ad.r or b[1] != ad.r:
            raise BadInputError(
                f"{ck.path}: {ka} {list(a)} and {kb} {list(b)} do not have rank r={ad.r} ({cfg_path.name})"
            )
    for what, name in (("embedding", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
        key = ad.full.get(name)
        if key is not None and ck.tensors[key].shape[0] != vocab:
            raise BadInputError(
                f"{ck.path}: {ck.tensors[key].shape[0]} {what} rows, but {path / 'tokenizer.model'} has"
                f" {vocab} tokens (LLaMA tokenizer with an Alpaca adapter, or the reverse?)"
            )
    return ad


def _tokenizer_length(path: Path) -> int:
    from transformers import LlamaTokenizer

    if not (path / "tokenizer.model").is_file():
        raise BadInputError(f"{path / 'tokenizer.model'}: missing: each adapter carries its tokenizer")
    try:
        return len(LlamaTokenizer.from_pretrained(str(path)))
    except Exception as e:  # sentencepiece and transformers raise many types on a bad model file
        raise BadInputError(
            f"{path / 'tokenizer.model'}: not a usable tokenizer ({type(e).__name__})"
        ) from None


@dataclass
class Base:
    """The HF base model: shard files in the script's (sorted) order, opened lazily."""

    path: Path
    shards: list[ptzip.Checkpoint]
    config: dict | None

    @property
    def names(self) -> list[str]:
        return [ck.path.name for ck in self.shards]

    def where(self) -> dict[str, int]:
        return {key: i for i, ck in enumerate(self.shards) for key in ck.tensors}

    def close(self) -> None:
        for ck in self.shards:
            ck.close()


def open_base(path: Path) -> Base:
    files = sorted(p.name for p in path.iterdir() if SHARD.fullmatch(p.name)) if path.is_dir() else []
    if files:
        total = int(SHARD.fullmatch(files[0]).group(2))  # type: ignore[union-attr]
        want = [f"pytorch_model-{i:05d}-of-{total:05d}.bin" for i in range(1, total + 1)]
        missing = [w for w in want if w not in files]
        if missing or len(files) != total:
            raise BadInputError(
                f"{path}: base shards incomplete: expected {total}, missing {missing or files}"
            )
    elif (path / "pytorch_model.bin").is_file():
        files = ["pytorch_model.bin"]  # a base small enough for one file (the script finds no shards here)
    else:
        raise BadInputError(f"{path}: no base shards found (pytorch_model-*-of-*.bin or pytorch_model.bin)")
    config = None
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise BadInputError(f"{path / 'config.json'}: not readable JSON ({e})") from None
    shards = [ptzip.Checkpoint(path / f) for f in files]
    for ck in shards:
        users: dict[str, int] = {}
        for key, meta in ck.tensors.items():
            users[meta.storage] = users.get(meta.storage, 0) + 1
            if meta.dtype.name not in FLOATS or not meta.is_contiguous() or meta.offset:
                raise BadInputError(f"{ck.path}: {key} is not a plain floating-point tensor")
        if any(n > 1 for n in users.values()):
            raise BadInputError(f"{ck.path}: tensors share storage; save_pretrained never writes that")
    return Base(path, shards, config)


# ------------------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class Target:
    """What the pth output looks like: params.json and the number of consolidated files."""

    params: dict[str, float | int]
    num_shards: int

    @property
    def dim(self) -> int:
        return int(self.params["dim"])

    @property
    def n_heads(self) -> int:
        return int(self.params["n_heads"])


def pth_target(base: Base, width: int, num_shards: int | None) -> Target:
    """The script's table for a real embedding width; else the base's config.json and --num_shards."""
    if num_shards is not None and num_shards < 1:
        raise BadInputError(f"--num_shards {num_shards}: the number of pth files must be 1 or more")
    size = real_size_by_dim(width)
    if size is not None:
        if num_shards not in (None, size.num_shards):
            raise BadInputError(
                f"--num_shards {num_shards}: a {size.name} model is written as {size.num_shards}"
            )
        return Target(size.params_json(), size.num_shards)
    cfg = base.config
    where = base.path / "config.json"
    if cfg is None:
        raise BadInputError(f"{where}: missing: needed for a model of width {width}, which is no LLaMA size")
    try:
        params = {
            "dim": int(cfg["hidden_size"]),
            "multiple_of": 256,
            "n_heads": int(cfg["num_attention_heads"]),
            "n_layers": int(cfg["num_hidden_layers"]),
            "norm_eps": cfg["rms_norm_eps"],
            "vocab_size": -1,
        }
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"{where}: missing or bad field {e}") from None
    if params["dim"] != width:
        raise BadInputError(f"{where}: hidden_size {params['dim']} but the embedding is {width} wide")
    return Target(params, 1 if num_shards is None else num_shards)


def check(base: Base, adapters: Sequence[Adapter], output_type: str, num_shards: int | None) -> Target | None:
    """Everything that can be wrong with the inputs, found before any compute."""
    where = base.where()
    if "model.embed_tokens.weight" not in where:
        raise BadInputError(f"{base.path}: no model.embed_tokens.weight in any base shard")
    if len(adapters) == 2 and adapters[0].vocab > adapters[1].vocab:
        a, b = adapters
        raise BadInputError(
            f"{b.path / 'tokenizer.model'}: {b.vocab} tokens, fewer than the first adapter's {a.vocab}"
            f" ({a.path}): adapters in the wrong order? (LLaMA-Plus first, then Alpaca-Plus/Pro)"
        )
    for ad in adapters:
        for key in [*ad.full, *ad.lora]:
            if key not in where:
                raise BadInputError(
                    f"{ad.file}: {PREFIX}{key} matches no weight of the base model {base.path}"
                )
        for key, (ka, kb) in ad.lora.items():
            shape = base.shards[where[key]].tensors[key].shape
            out, inp = ad.ck.tensors[kb].shape[0], ad.ck.tensors[ka].shape[1]
            want = (inp, out) if ad.fan_in_fan_out else (out, inp)
            if shape != want:
                raise BadInputError(
                    f"{ad.file}: LoRA for {key} gives {list(want)}, the base weight is {list(shape)}"
                )
        for key, ak in ad.full.items():
            shape, got = base.shards[where[key]].tensors[key].shape, ad.ck.tensors[ak].shape
            if len(got) != len(shape) or got[1:] != shape[1:]:
                raise BadInputError(f"{ad.file}: {ak} is {list(got)}, the base's {key} is {list(shape)}")
    if output_type != "pth":
        return None
    width = base.shards[where["model.embed_tokens.weight"]].tensors["model.embed_tokens.weight"].shape[1]
    target = pth_target(base, width, num_shards)
    for key, i in where.items():
        try:
            meta_name = hf_to_meta(key)
        except KeyError:
            raise BadInputError(f"{base.shards[i].path}: {key} has no place in the pth layout") from None
        shape = _final_shape(base, adapters, key, i)
        axis = None if meta_name is None else meta_split_axis(meta_name)
        if axis is not None and meta_name != "output.weight" and shape[axis] % target.num_shards:
            raise BadInputError(
                f"{base.shards[i].path}: {key} {list(shape)} does not split into {target.num_shards}"
            )
    if target.dim % target.n_heads or (target.dim // target.n_heads) % 2:
        raise BadInputError(f"{base.path}: dim {target.dim} and {target.n_heads} heads cannot be unpermuted")
    return target


def _final_shape(base: Base, adapters: Sequence[Adapter], key: str, shard: int) -> tuple[int, ...]:
    shape = base.shards[shard].tensors[key].shape
    for ad in adapters:
        if key in ad.full:
            shape = ad.ck.tensors[ad.full[key]].shape
    return shape


def _final_dtype(base: Base, adapters: Sequence[Adapter], key: str, shard: int) -> ptzip.DType:
    dtype = base.shards[shard].tensors[key].dtype
    return ptzip.DTYPES["float16"] if any(key in ad.full for ad in adapters) else dtype


# ------------------------------------------------------------------------------------------ the arithmetic


class Scratch:
    """One array reused for every other merged tensor (two alternate: one is written out while the
    next is computed, see ``ptzip.overlapped``), so fresh memory, whose first touch is what costs here,
    not the arithmetic, is paid for once."""

    def __init__(self) -> None:
        self.raw = np.empty(0, np.uint8)

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = math.prod(shape) * dtype.itemsize
        if self.raw.size < n:
            self.raw = np.empty(n, np.uint8)
        return self.raw[:n].view(dtype).reshape(shape)


def merged(
    base: Base, adapters: Sequence[Adapter], shard: int, key: str, order: str, scratch: Scratch | None = None
) -> np.ndarray:
    """One base tensor with every adapter applied in order, as the script's loop does it. The result
    may live in ``scratch``: use it before the next call."""
    # a replacing weight discards everything before it: start from the last one (and never read the base)
    last = max((n for n, ad in enumerate(adapters) if key in ad.full), default=None)
    if last is None:
        ck = base.shards[shard]
        w, dtype = ck.tensor(key), ck.tensors[key].dtype.name
    else:  # state_dict[k] = lora[k].half()
        ad = adapters[last]
        ak = ad.full[key]
        w, dtype = cast(ad.ck.tensor(ak), ad.ck.tensors[ak].dtype.name, "float16"), "float16"
    owned = False  # w is an input (read-only, mapped) until the first LoRA writes a result of ours
    for ad in adapters[0 if last is None else last :]:
        if key in ad.lora:  # state_dict[k] += transpose(B.float() @ A.float()) * scaling
            ka, kb = ad.lora[key]
            out = w if owned else (scratch.get(w.shape, w.dtype) if scratch else None)
            w = arith.add_lora(w, dtype, ad.f32(kb), ad.f32(ka), ad.scale, ad.fan_in_fan_out, order, out)
            owned = True
    return w


def pth_pieces(meta_name: str, shape: tuple[int, ...], n: int) -> tuple[int | None, list[int]]:
    """How the pth shards split one weight: (axis, piece sizes along it); axis None: each shard holds it
    whole. output.weight's last piece takes the remainder when the vocabulary does not divide (13B:
    49953 rows -> 24976 + 24977); every other split axis divides (checked up front)."""
    axis = meta_split_axis(meta_name) if n > 1 else None
    if axis is None:
        return None, []
    size = shape[axis] // n
    return axis, [size] * (n - 1) + [shape[axis] - size * (n - 1)]


def piece_shapes(meta_name: str, shape: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    axis, sizes = pth_pieces(meta_name, shape, n)
    if axis is None:
        return [shape] * n
    return [shape[:axis] + (s,) + shape[axis + 1 :] for s in sizes]


def split_for_pth(meta_name: str, w: np.ndarray, target: Target) -> list[np.ndarray]:
    """The pth shards' pieces of one merged HF weight (q and k unpermuted first)."""
    if is_rotated(meta_name):
        w = unpermute(w, target.n_heads)
    axis, sizes = pth_pieces(meta_name, w.shape, target.num_shards)
    if axis is None:
        return [w] * target.num_shards
    return np.split(w, np.cumsum(sizes)[:-1], axis=axis)


# ------------------------------------------------------------------------------------------ writing


def _spec(dtype: ptzip.DType, shape: tuple[int, ...], token: object) -> ptzip.TensorSpec:
    return ptzip.TensorSpec(dtype, tuple(shape), token, math.prod(shape))


def write_huggingface(out: Path, base: Base, adapters: Sequence[Adapter], order: str) -> int:
    """Each base shard merged under its own name; returns the merged model's size in bytes."""
    total, scratch = 0, (Scratch(), Scratch())
    for i, ck in enumerate(base.shards):
        entries = []
        for key in ck.tensors:
            dtype, shape = _final_dtype(base, adapters, key, i), _final_shape(base, adapters, key, i)
            entries.append((key, _spec(dtype, shape, key)))
            total += math.prod(shape) * dtype.itemsize
        final = out / ck.path.name
        if final.exists():
            continue
        with staged_file(final) as tmp:
            ptzip.save(
                tmp,
                entries,
                lambda key, slot, i=i: merged(base, adapters, i, key, order, scratch[slot]),
                archive=final.name,
                overlap=True,
            )
    return total


def pth_order(base: Base) -> list[tuple[int, str]]:
    """(shard, key) in the pth files' key order. The script merges its per-shard temporary files
    L1-, L2-, ... in sorted name order, so with 10 or more base shards L10 comes before L2."""
    shard_order = sorted(range(len(base.shards)), key=lambda j: f"L{j + 1}-consolidated")
    return [(j, key) for j in shard_order for key in base.shards[j].tensors if hf_to_meta(key) is not None]


def write_pth(out: Path, base: Base, adapters: Sequence[Adapter], target: Target, order: str) -> None:
    """consolidated.0<i>.pth, all written side by side: each merged tensor is computed once and its
    pieces go to every file (all files share one record order, as their key lists are alike). Files
    already in ``out`` (a resumed build keeps those that verify) are not written again."""
    plan = pth_order(base)
    names = [f"consolidated.{i:02d}.pth" for i in range(target.num_shards)]
    todo = [i for i, n in enumerate(names) if not (out / n).exists()]
    if not todo:
        return
    entries: list[list[tuple[str, ptzip.TensorSpec]]] = [[] for _ in names]
    for pos, (j, key) in enumerate(plan):
        meta_name = hf_to_meta(key)
        shape = _final_shape(base, adapters, key, j)
        dtype = _final_dtype(base, adapters, key, j)
        for i, piece in enumerate(piece_shapes(meta_name, shape, target.num_shards)):  # type: ignore[arg-type]
            entries[i].append((meta_name, _spec(dtype, piece, pos)))  # type: ignore[arg-type]
    with ExitStack() as stack:
        writers = {}
        for i in todo:
            tmp = stack.enter_context(staged_file(out / names[i]))
            w = ptzip.StreamWriter(tmp, entries[i], archive=names[i])
            stack.callback(w.abort)
            writers[i] = w
        scratch = (Scratch(), Scratch())

        def make(pos: int, slot: int) -> list[np.ndarray]:
            j, key = plan[pos]
            w = merged(base, adapters, j, key, order, scratch[slot])
            return split_for_pth(hf_to_meta(key), w, target)  # type: ignore[arg-type]

        def write(pos: int, pieces: list[np.ndarray]) -> None:
            for i, w in writers.items():
                w.write(pos, pieces[i])

        ptzip.overlapped(writers[todo[0]].order, make, write)  # type: ignore[arg-type]
        for w in writers.values():
            w.close()


def _json(obj: object) -> bytes:
    return json.dumps(obj, indent=2).encode()  # the script's json.dump(obj, f, indent=2): no final newline


def write_configs(out: Path, base: Base, vocab: int, total_size: int) -> None:
    """The base's config files as the script rewrites them: new vocab size, recomputed total size."""
    for name in ("config.json", "generation_config.json", "pytorch_model.bin.index.json"):
        src = base.path / name
        if not src.is_file():
            continue
        obj = json.loads(src.read_text())
        if name == "config.json":
            obj["vocab_size"] = vocab
        if name == "pytorch_model.bin.index.json":
            obj["metadata"]["total_size"] = total_size
        write_bytes(out / name, _json(obj))


def write_tokenizer(out: Path, adapter: Adapter) -> None:
    """The last adapter's tokenizer, saved by transformers as the script saves it."""
    from transformers import LlamaTokenizer

    publish_from(out, LlamaTokenizer.from_pretrained(str(adapter.path)).save_pretrained)


# ------------------------------------------------------------------------------------------ entry point


def merge(
    base_model: str,
    lora_models: Sequence[str],
    output_type: str,
    output_dir: Path,
    num_shards: int | None = None,
    order: str = arith.DEFAULT_ORDER,
    resume: bool = False,
) -> list[Path]:
    """Merge ``lora_models`` (in order) into ``base_model``; returns the files written."""
    if output_type not in ("pth", "huggingface"):
        raise BadInputError(f"--output_type {output_type!r}: expected pth or huggingface")
    if order not in arith.ORDERS:
        raise BadInputError(f"--order {order!r}: expected one of {', '.join(arith.ORDERS)}")
    if not 1 <= len(lora_models) <= 2:
        raise BadInputError(f"--lora_model: one adapter or two in order, got {len(lora_models)}")
    output_dir = Path(output_dir)
    with ExitStack() as stack:
        adapters = []
        for name in lora_models:
            ad = open_adapter(resolve(name, "LoRA model"))
            stack.callback(ad.ck.close)
            adapters.append(ad)
        base = open_base(resolve(base_model, "base model"))
        stack.callback(base.close)
        target = check(base, adapters, output_type, num_shards)
        prepare_output_dir(output_dir, resume=resume)
        write_tokenizer(output_dir, adapters[-1])
        if target is not None:
            write_bytes(output_dir / "params.json", json.dumps(target.params).encode())
            write_pth(output_dir, base, adapters, target, order)
        else:
            total = write_huggingface(output_dir, base, adapters, order)
            write_configs(output_dir, base, adapters[-1].vocab, total)
    return sorted(p for p in output_dir.iterdir() if not p.name.startswith("."))
