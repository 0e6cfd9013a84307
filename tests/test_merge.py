"""Step 2 against the upstream low-memory merge script: every output file of ours equals what the script
wrote from the same inputs (tests/golden/merge, made by tests/reference/make_goldens.py; see its README)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN, tree_hashes

from repro_merge import arith, floats, ptzip
from repro_merge.convert import convert
from repro_merge.errors import BadInputError, OutputExistsError
from repro_merge.merge import merge

MERGE = GOLDEN / "merge"
ADAPTERS = {
    "llama": ["chinese_llama_lora"],
    "llama-plus": ["chinese_llama_plus_lora"],
    "alpaca": ["chinese_alpaca_lora"],
    "alpaca-plus": ["chinese_llama_plus_lora", "chinese_alpaca_plus_lora"],
    "alpaca-pro": ["chinese_llama_plus_lora", "chinese_alpaca_pro_lora"],
}
LORA_SIZE = {"7B": "7b", "13B": "13b", "30B": "33b", "65B": "65b"}
PTH_SHARDS = {"7B": 1, "13B": 2, "30B": 4, "65B": 8}
# the HF bases the goldens were made from (their README): layout, kind -> max_shard_size
BASES = {
    ("7B", "normal"): "200KB",
    ("13B", "normal"): "200KB",
    ("30B", "normal"): "250KB",
    ("65B", "normal"): "400KB",
    ("13B", "many"): "60KB",
    ("65B", "many"): "100KB",
}


def golden(name: str) -> dict[str, str]:
    lines = (MERGE / f"{name}.sha256").read_text().splitlines()
    return {path: digest for digest, path in (line.split("  ", 1) for line in lines)}


def cases(suffix: str = "") -> list[tuple[str, str, str, str]]:
    out = []
    for p in sorted(MERGE.glob(f"*{suffix}.sha256")):
        stem = p.name.removesuffix(".sha256")
        if stem.startswith("base-") or (not suffix and stem.endswith("-mkl5")):
            continue
        stem = stem.removesuffix(suffix)
        rest, kind = stem.rsplit("-", 1)
        layout, base, variant = rest.split("-", 2)
        out.append((layout, base, variant, kind))
    return out


def loras(tiny: Path, layout: str, variant: str) -> list[str]:
    return [str(tiny / "lora" / f"{a}_{LORA_SIZE[layout]}") for a in ADAPTERS[variant]]


@pytest.fixture(scope="session")
def bases(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """HF bases made by our converter (test_bases_match proves they are the goldens' bases)."""
    root = tmp_path_factory.mktemp("bases")
    out = {}
    for (layout, kind), mss in BASES.items():
        out[layout, kind] = root / f"{layout}-{kind}"
        convert(tiny / "llama", layout, out[layout, kind], mss)
    return out


def test_case_matrix_is_complete() -> None:
    got = {(c[0], c[1], c[2], c[3]) for c in cases()}
    assert len(got) == 60
    assert {c[3] for c in got} == {"pth", "huggingface"} and {c[2] for c in got} == set(ADAPTERS)
    assert len(cases("-mkl5")) == 10


@pytest.mark.parametrize(("layout", "kind"), list(BASES))
def test_bases_match(bases: dict, layout: str, kind: str) -> None:
    assert tree_hashes(bases[layout, kind]) == golden(f"base-{layout}-{kind}")


@pytest.mark.parametrize(("layout", "base", "variant", "kind"), cases())
def test_every_file_equals_the_script(
    tiny: Path, bases: dict, tmp_path: Path, layout: str, base: str, variant: str, kind: str
) -> None:
    out = tmp_path / "out"
    shards = PTH_SHARDS[layout] if kind == "pth" else None
    merge(str(bases[layout, base]), loras(tiny, layout, variant), kind, out, num_shards=shards)
    assert tree_hashes(out) == golden(f"{layout}-{base}-{variant}-{kind}")


# ------------------------------------------------------------------------------------------ CPU independence


def _cli(
    tiny: Path, bases: dict, out: Path, variant: str, kind: str, order: str, env: dict[str, str]
) -> Path:
    """A merge in a fresh process, so MKL reads its environment at start-up."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "repro_merge.cli",
            "merge",
            "--base_model",
            str(bases["13B", "normal"]),
            "--lora_model",
            ",".join(loras(tiny, "13B", variant)),
            "--output_type",
            kind,
            "--output_dir",
            str(out),
            "--num_shards",
            "2",
            "--order",
            order,
        ],
        env={**_unsteered(), **env},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return out


def _unsteered() -> dict[str, str]:
    """This process's environment without the variables that steer MKL/OpenMP or repro-merge's threads."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MKL_", "OMP_", "REPRO_MERGE_"))}


MKL5 = {"MKL_DEBUG_CPU_TYPE": "5"}  # MKL 2020's AVX2 kernels, on any x86-64 CPU with AVX2
# MKL's generic path on any x86-64 CPU: what an AMD host takes by default (where this setting changes no
# byte), and what an Intel host takes only when told (its default there is the AVX-512 kernels: fma order)
MKL_GENERIC = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def test_the_script_depends_on_the_cpu() -> None:
    """What makes the checks below meaningful: the script's own bytes change under MKL's AVX2 path."""
    for kind in ("pth", "huggingface"):
        assert golden(f"13B-normal-alpaca-plus-{kind}") != golden(f"13B-normal-alpaca-plus-{kind}-mkl5")


@pytest.mark.parametrize("kind", ["pth", "huggingface"])
@pytest.mark.parametrize(
    "env",
    [
        MKL5,
        {**MKL5, "REPRO_MERGE_THREADS": "1", "OMP_NUM_THREADS": "1"},
        {"REPRO_MERGE_THREADS": "2", "OMP_NUM_THREADS": "2"},
    ],
    ids=["mkl5", "mkl5-1thread", "2threads"],
)
def test_seq_order_is_the_same_on_any_cpu(
    tiny: Path, bases: dict, tmp_path: Path, kind: str, env: dict
) -> None:
    out = _cli(tiny, bases, tmp_path / "out", "alpaca-plus", kind, "seq", env)
    assert tree_hashes(out) == golden(f"13B-normal-alpaca-plus-{kind}")


@pytest.mark.parametrize(
    ("variant", "kind"), [("alpaca-plus", "pth"), ("alpaca-plus", "huggingface"), ("alpaca-pro", "pth")]
)
def test_host_order_reproduces_the_script_under_mkl5(
    tiny: Path, bases: dict, tmp_path: Path, variant: str, kind: str
) -> None:
    out = _cli(tiny, bases, tmp_path / "out", variant, kind, "host", MKL5)
    assert tree_hashes(out) == golden(f"13B-normal-{variant}-{kind}-mkl5")


def test_host_order_on_the_generic_path(tiny: Path, bases: dict, tmp_path: Path) -> None:
    out = _cli(tiny, bases, tmp_path / "out", "alpaca-plus", "pth", "host", MKL_GENERIC)
    assert tree_hashes(out) == golden("13B-normal-alpaca-plus-pth")


def test_fma_order_is_mkl_strict_fma(tiny: Path, bases: dict, tmp_path: Path) -> None:
    """MKL's AVX2 kernels in strict CNR mode sum with fused multiply-adds in order: ours must agree."""
    ours = _cli(tiny, bases, tmp_path / "fma", "alpaca-plus", "pth", "fma", {})
    theirs = _cli(
        tiny, bases, tmp_path / "mkl", "alpaca-plus", "pth", "host", {**MKL5, "MKL_CBWR": "AUTO,STRICT"}
    )
    assert tree_hashes(ours) == tree_hashes(theirs)
    assert tree_hashes(ours) != golden("13B-normal-alpaca-plus-pth")


_SHAPES = [(80, 8, 80), (256, 16, 96), (40, 6, 300), (33, 3, 7)]
_SCRIPT_ARITHMETIC = """
import sys, numpy as np, torch
w, b, a, scale = (np.load(p) for p in sys.argv[1:5])
prod = torch.from_numpy(b) @ torch.from_numpy(a)
t = torch.from_numpy(w)
t += prod * float(scale)
np.save(sys.argv[5], prod.numpy())
np.save(sys.argv[6], t.numpy())
"""


def _script_arithmetic(tmp_path: Path, env: dict[str, str], *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """The fp32 product ``B @ A`` and the script's ``w += (B @ A) * s``, through torch and MKL in a fresh
    process (MKL reads its environment once, at start-up)."""
    paths = [tmp_path / f"{n}.npy" for n in ("w", "b", "a", "s", "prod", "merged")]
    for p, x in zip(paths, arrays, strict=False):
        np.save(p, x)
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT_ARITHMETIC, *map(str, paths)],
        env={**_unsteered(), **env},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return np.load(paths[4]), np.load(paths[5])


@pytest.mark.parametrize("shape", _SHAPES)
@pytest.mark.parametrize(
    ("order", "env"), [("seq", MKL_GENERIC), ("fma", {**MKL5, "MKL_CBWR": "AUTO,STRICT"})], ids=["seq", "fma"]
)
def test_orders_equal_mkl_paths(tmp_path: Path, shape: tuple[int, int, int], order: str, env: dict) -> None:
    """``seq`` is MKL's generic path and ``fma`` its strict-CNR AVX2 path, each forced by its setting so
    that the check means the same on an AMD and on an Intel host."""
    o, r, i = shape
    rng = np.random.default_rng(sum(shape))
    b = rng.standard_normal((o, r)).astype(np.float32)
    a = rng.standard_normal((r, i)).astype(np.float32)
    w = rng.standard_normal((o, i)).astype(np.float16)
    prod, merged = _script_arithmetic(tmp_path, env, w, b, a, np.float64(20 / r))
    assert np.array_equal(arith._full(b, a, order), prod)
    other = arith._full(b, a, "fma" if order == "seq" else "seq")
    assert np.array_equal(other, prod) == (r == 1)  # one product: no sum, both orders agree
    assert np.array_equal(arith.add_lora(w, "float16", b, a, 20 / r, False, order), merged)
    got_t = arith.add_lora(w.T.copy(), "float16", b, a, 20 / r, True, order)  # fan_in_fan_out
    assert np.array_equal(got_t, merged.T)


def test_bf16_rounding_matches_torch() -> None:
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 1e3
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(floats.round_to(x, "bfloat16"), want)
    assert np.array_equal(
        floats.to_float32(want, "bfloat16"),
        torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float().numpy(),
    )


# ---------------------------------------------------------------------------- inputs the script cannot take


@pytest.mark.parametrize("kind", ["pth", "huggingface"])
def test_each_output_byte_is_written_once(
    tiny: Path, bases: dict, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single pass: the checkpoint writers emit exactly the outputs' bytes, one file per output (the
    script writes each pth twice, through L*- temporary files), and every file is a final output."""
    written: dict[str, int] = {}
    real = ptzip._ZipWriter._write

    def counting(self: ptzip._ZipWriter, data: bytes | memoryview) -> None:
        written[self.folder] = written.get(self.folder, 0) + len(data)
        real(self, data)

    monkeypatch.setattr(ptzip._ZipWriter, "_write", counting)
    out = tmp_path / "out"
    merge(str(bases["30B", "normal"]), loras(tiny, "30B", "alpaca-pro"), kind, out, num_shards=4)
    files = {
        p.name.rsplit(".", 1)[0]: p.stat().st_size for p in out.iterdir() if p.suffix in (".pth", ".bin")
    }
    assert len(files) == 4 and written == files


def test_single_file_base(tiny: Path, tmp_path: Path) -> None:
    """A base small enough for one pytorch_model.bin merges like a one-shard base (the script dies)."""
    base = tmp_path / "base"
    convert(tiny / "llama", "7B", base)
    assert (base / "pytorch_model.bin").exists()
    merge(str(base), loras(tiny, "7B", "alpaca-plus"), "pth", tmp_path / "pth", num_shards=1)
    assert tree_hashes(tmp_path / "pth") == golden("7B-normal-alpaca-plus-pth")  # pth bytes ignore sharding
    merge(str(base), loras(tiny, "7B", "alpaca-plus"), "huggingface", tmp_path / "hf")
    # what the script writes per shard, for one shard holding the whole merged model
    want = golden("7B-normal-alpaca-plus-huggingface")
    assert tree_hashes(tmp_path / "hf")["config.json"] == want["config.json"]
    assert sorted(tree_hashes(tmp_path / "hf")) == sorted(
        [
            "config.json",
            "generation_config.json",
            "pytorch_model.bin",
            "special_tokens_map.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    )
    two = tmp_path / "two"
    convert(tiny / "llama", "7B", two, "200KB")
    merge(str(two), loras(tiny, "7B", "alpaca-plus"), "huggingface", tmp_path / "hf2")
    whole: dict[str, torch.Tensor] = {}
    for shard in sorted((tmp_path / "hf2").glob("pytorch_model-*.bin")):
        whole |= torch.load(shard)
    torch.save(whole, tmp_path / "pytorch_model.bin")
    assert (tmp_path / "hf" / "pytorch_model.bin").read_bytes() == (
        tmp_path / "pytorch_model.bin"
    ).read_bytes()


def _hub_cache(root: Path, repo: str, folder: Path) -> None:
    """A cache laid out as huggingface_hub lays it out: blobs, a snapshot of links, refs/main."""
    base = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in folder.iterdir():
        import hashlib

        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))


def test_hub_ids_from_the_local_cache(tiny: Path, bases: dict, tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    a, b = loras(tiny, "13B", "alpaca-plus")
    _hub_cache(cache, "ziqingyang/chinese-llama-plus-lora-13b", Path(a))
    _hub_cache(cache, "ziqingyang/chinese-alpaca-plus-lora-13b", Path(b))
    env = {**os.environ, "HUGGINGFACE_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    argv = [
        sys.executable,
        "-m",
        "repro_merge.cli",
        "merge",
        "--base_model",
        str(bases["13B", "normal"]),
        "--num_shards",
        "2",
        "--output_dir",
        str(tmp_path / "out"),
        "--lora_model",
        "ziqingyang/chinese-llama-plus-lora-13b, ziqingyang/chinese-alpaca-plus-lora-13b",
    ]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert tree_hashes(tmp_path / "out") == golden("13B-normal-alpaca-plus-pth")
    argv[-1] = "ziqingyang/not-in-cache"
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out2")
    r = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "never downloads" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ bad input


def _refused(
    tmp_path: Path,
    base: Path,
    adapters: list[str],
    match: str,
    kind: str = "pth",
    exc: type = BadInputError,
    num_shards: int = 2,
) -> str:
    out = tmp_path / "refused"
    with pytest.raises(exc, match=match) as e:
        merge(str(base), adapters, kind, out, num_shards=num_shards)
    assert "\n" not in str(e.value)
    assert not out.exists() or not any(out.iterdir()), "nothing may be written before the checks pass"
    return str(e.value)


def _copy(src: str | Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def test_llama_tokenizer_with_alpaca_adapter(tiny: Path, bases: dict, tmp_path: Path) -> None:
    bad = _copy(loras(tiny, "13B", "alpaca")[0], tmp_path / "alpaca")
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(loras(tiny, "13B", "llama")[0]) / f, bad / f)
    msg = _refused(tmp_path, bases["13B", "normal"], [str(bad)], "362 embedding rows.*361 tokens")
    assert "adapter_model.bin" in msg


def test_lm_head_rows_that_do_not_fit_the_tokenizer(tiny: Path, bases: dict, tmp_path: Path) -> None:
    bad = _copy(loras(tiny, "13B", "alpaca")[0], tmp_path / "alpaca")
    with ptzip.Checkpoint(bad / "adapter_model.bin") as ck:
        items = [(k, np.array(ck.tensor(k))) for k in ck.tensors]
    items = [(k, a[:-1] if k.endswith("lm_head.weight") else a) for k, a in items]
    ptzip.save_arrays(bad / "adapter_model.bin", items)
    msg = _refused(tmp_path, bases["13B", "normal"], [str(bad)], "361 lm_head rows.*362 tokens")
    assert str(bad / "adapter_model.bin") in msg and str(bad / "tokenizer.model") in msg


def test_adapters_in_the_wrong_order(tiny: Path, bases: dict, tmp_path: Path) -> None:
    a, b = loras(tiny, "13B", "alpaca-plus")
    msg = _refused(tmp_path, bases["13B", "normal"], [b, a], "wrong order")
    assert msg.startswith(f"{Path(a) / 'tokenizer.model'}: 361 tokens, fewer than the first adapter's 362")


def test_adapter_for_another_size(tiny: Path, bases: dict, tmp_path: Path) -> None:
    msg = _refused(
        tmp_path, bases["13B", "normal"], loras(tiny, "7B", "alpaca"), "gives .* the base weight is"
    )
    assert "chinese_alpaca_lora_7b" in msg


def test_adapter_keys_matching_no_weight(tiny: Path, bases: dict, tmp_path: Path) -> None:
    bad = _copy(loras(tiny, "13B", "llama")[0], tmp_path / "extra")
    with ptzip.Checkpoint(bad / "adapter_model.bin") as ck:
        items = [(k, np.array(ck.tensor(k))) for k in ck.tensors]
    extra = "base_model.model.model.layers.7.self_attn.q_proj.lora_"
    items += [(extra + "A.weight", items[1][1]), (extra + "B.weight", items[2][1])]
    ptzip.save_arrays(bad / "adapter_model.bin", items)
    _refused(
        tmp_path, bases["13B", "normal"], [str(bad)], "layers.7.self_attn.q_proj.weight matches no weight"
    )


def test_missing_adapter_config_field(tiny: Path, bases: dict, tmp_path: Path) -> None:
    bad = _copy(loras(tiny, "13B", "llama")[0], tmp_path / "nocfg")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    _refused(tmp_path, bases["13B", "normal"], [str(bad)], "adapter_config.json: field 'lora_alpha'")


@pytest.mark.parametrize("n", [0, -1])
def test_num_shards_below_one(tiny: Path, bases: dict, tmp_path: Path, n: int) -> None:
    match = f"--num_shards {n}: the number of pth files must be 1 or more"
    _refused(tmp_path, bases["13B", "normal"], loras(tiny, "13B", "llama"), match, num_shards=n)


def test_no_base_shards(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, tmp_path / "empty", loras(tiny, "13B", "llama"), "no base shards found")


def test_incomplete_base(tiny: Path, bases: dict, tmp_path: Path) -> None:
    base = _copy(bases["13B", "normal"], tmp_path / "base")
    (base / "pytorch_model-00002-of-00003.bin").unlink()
    _refused(tmp_path, base, loras(tiny, "13B", "llama"), "incomplete")


def test_output_folder_not_empty(tiny: Path, bases: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="not empty"):
        merge(str(bases["13B", "normal"]), loras(tiny, "13B", "llama"), "pth", out, num_shards=2)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_adapter_weights_are_read_without_pickle_code(tiny: Path, bases: dict, tmp_path: Path) -> None:
    bad = _copy(loras(tiny, "13B", "llama")[0], tmp_path / "evil")
    import pickle

    class Boom:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Boom()}, bad / "adapter_model.bin")  # type: ignore[dict-item]
    _refused(tmp_path, bases["13B", "normal"], [str(bad)], "refused global")
    assert not (tmp_path / "pwned").exists()
    assert pickle  # the payload was live pickle


def test_cli_flags_like_the_script(tiny: Path, bases: dict, tmp_path: Path) -> None:
    a, b = loras(tiny, "13B", "alpaca-pro")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "repro_merge.cli",
            "merge",
            "--base-model",
            str(bases["13B", "normal"]),
            "--lora-model",
            f"{a} , {b}",
            "--output-type",
            "huggingface",
            "--output-dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert tree_hashes(tmp_path / "o") == golden("13B-normal-alpaca-pro-huggingface")
