"""The whole build and the gate: each exit path, planted faults and their diagnoses, kill -9 and rerun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import sha256_file

from repro_merge import checksums, errors, ptzip, verify
from repro_merge.build import InputMismatch, build, verify_folder

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def family(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy of the tiny family (tests plant faults in copies of it)."""
    return Path(shutil.copytree(tiny, tmp_path_factory.mktemp("family") / "fx"))


@pytest.fixture(scope="module")
def built(family: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-alpaca-plus, built once (read-only for tests: copy before changing)."""
    out = tmp_path_factory.mktemp("built") / "tiny-alpaca-plus"
    r = build("tiny", "alpaca-plus", llama=family / "llama", output_dir=out)
    assert r.verdict == "pass", r.summary()
    return out


def _copy_family(family: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(family, tmp_path / "fx", symlinks=True))


def cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "repro_merge.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


# ------------------------------------------------------------------------------------------ success


def test_main_job_with_no_other_input(tmp_path: Path) -> None:
    """`repro-merge build tiny alpaca-plus`, embedded fixtures, default output folder: exit 0."""
    r = cli("build", "tiny", "alpaca-plus", cwd=tmp_path)
    assert r.returncode == errors.EXIT_OK, r.stderr
    assert r.stdout.startswith("PASS tiny-alpaca-plus")
    out = tmp_path / "out" / "tiny-alpaca-plus"
    expected = checksums.load().expected("merged-pth", "tiny-alpaca-plus")
    assert {n: sha256_file(out / n) for n in expected} == expected
    assert (out / "manifest.json").is_file() and (out / "provenance.json").is_file()


@pytest.mark.parametrize("model", ["llama", "llama-plus", "alpaca", "alpaca-pro"])
@pytest.mark.parametrize("kind", ["pth", "huggingface"])
def test_every_tiny_target_passes(family: Path, tmp_path: Path, model: str, kind: str) -> None:
    r = build(
        "tiny",
        model,
        llama=family / "llama",
        output_dir=tmp_path / "out",
        output_type=kind,
        work=tmp_path / "work",
    )
    assert r.verdict == "pass" and r.exit_code == 0, r.summary()


def test_given_hf_base_skips_conversion(family: Path, built: Path, tmp_path: Path) -> None:
    base = built.parent / ".work" / "hf-base-tiny"
    r = build(
        "tiny",
        "alpaca-plus",
        llama=family / "llama",
        hf_base=base,
        output_dir=tmp_path / "o",
        work=tmp_path / "w",
    )
    assert r.verdict == "pass" and not (tmp_path / "w" / "hf-base-tiny").exists()


def test_manifest_and_provenance(family: Path, built: Path, tmp_path: Path) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    golden = json.loads((ROOT / "src/repro_merge/manifests/tiny-alpaca-plus-pth.json").read_text())
    assert manifest == golden
    prov = json.loads((built / "provenance.json").read_text())
    assert prov["verdict"] == "pass" and prov["weights_digest"] == golden["weights_digest"]
    assert prov["stack"]["torch"].startswith("1.13.1") and prov["stack"]["transformers"] == "4.28.1"
    assert prov["lock_sha256"] == sha256_file(ROOT / "lockfiles" / "runtime.txt")
    assert {i["role"] for i in prov["inputs"]} == {"original", "adapter", "tokenizer"}
    assert all(i["status"] == "ok" for i in prov["inputs"])
    # deterministic: a second build elsewhere records the same digest (only `local` differs)
    again = build(
        "tiny", "alpaca-plus", llama=family / "llama", output_dir=tmp_path / "again", work=tmp_path / "w"
    )
    assert again.verdict == "pass"
    prov2 = json.loads((tmp_path / "again" / "provenance.json").read_text())
    assert prov2["digest"] == prov["digest"] and prov2["local"] != prov["local"]
    assert {k: v for k, v in prov2.items() if k != "local"} == {k: v for k, v in prov.items() if k != "local"}


def test_weights_digest_is_format_independent(family: Path, built: Path, tmp_path: Path) -> None:
    r = build(
        "tiny",
        "alpaca-plus",
        llama=family / "llama",
        output_dir=tmp_path / "hf",
        output_type="huggingface",
        work=built.parent / ".work",
    )
    assert r.verdict == "pass"
    pth = json.loads((built / "manifest.json").read_text())["weights_digest"]
    hf = json.loads((tmp_path / "hf" / "manifest.json").read_text())["weights_digest"]
    assert pth == hf


# ------------------------------------------------------------------------------------------ input mismatch


def _input_mismatch(fx: Path, tmp_path: Path) -> str:
    with pytest.raises(InputMismatch) as e:
        build("tiny", "alpaca-plus", llama=fx / "llama", output_dir=tmp_path / "out", work=tmp_path / "w")
    assert not (tmp_path / "out").exists() and not (tmp_path / "w" / "hf-base-tiny").exists(), "no compute"
    assert e.value.exit_code == errors.EXIT_INPUT_MISMATCH
    return str(e.value)


def test_wrong_base(family: Path, tmp_path: Path) -> None:
    fx = _copy_family(family, tmp_path)
    a, b = fx / "llama/13B/consolidated.00.pth", fx / "llama/13B/consolidated.01.pth"
    a.write_bytes(b.read_bytes())  # shard 01 where shard 00 should be
    msg = _input_mismatch(fx, tmp_path)
    want = checksums.load().expected("fixtures", "tiny")["llama/13B/consolidated.00.pth"]
    assert str(a) in msg and want in msg and sha256_file(b) in msg
    assert "probably llama/13B/consolidated.01.pth of tiny" in msg


def test_wrong_adapter(family: Path, tmp_path: Path) -> None:
    fx = _copy_family(family, tmp_path)
    shutil.copy(
        fx / "lora/chinese_alpaca_pro_lora_13b/adapter_model.bin",
        fx / "lora/chinese_alpaca_plus_lora_13b/adapter_model.bin",
    )
    msg = _input_mismatch(fx, tmp_path)
    assert "chinese_alpaca_plus_lora_13b/adapter_model.bin: expected" in msg
    assert "probably lora/chinese_alpaca_pro_lora_13b/adapter_model.bin" in msg


def test_swapped_tokenizer(family: Path, tmp_path: Path) -> None:
    fx = _copy_family(family, tmp_path)
    shutil.copy(
        fx / "lora/chinese_llama_plus_lora_13b/tokenizer.model",
        fx / "lora/chinese_alpaca_plus_lora_13b/tokenizer.model",
    )
    msg = _input_mismatch(fx, tmp_path)
    assert "chinese_alpaca_plus_lora_13b/tokenizer.model: expected" in msg
    assert "it is probably lora/chinese_llama_lora_13b/tokenizer.model" in msg  # the LLaMA tokenizer


def test_changed_adapter_config_and_params(family: Path, tmp_path: Path) -> None:
    """alpha, r and params.json set the arithmetic and the split: they are checked before any compute."""
    fx = _copy_family(family, tmp_path)
    cfg = fx / "lora/chinese_alpaca_plus_lora_13b/adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "lora_alpha": 64}))
    params = fx / "llama/13B/params.json"
    params.write_text(params.read_text().replace('"n_layers": 2', '"n_layers": 1'))
    msg = _input_mismatch(fx, tmp_path)
    assert msg.startswith("2 input(s) are not the published files")
    assert f"{params}: expected" in msg and f"{cfg}: expected" in msg


def test_swapped_adapter_order(family: Path, tmp_path: Path) -> None:
    """The two adapter folders' contents exchanged: each is named as the other."""
    fx = _copy_family(family, tmp_path)
    a, b = fx / "lora/chinese_llama_plus_lora_13b", fx / "lora/chinese_alpaca_plus_lora_13b"
    a.rename(fx / "lora/tmp")
    b.rename(a)
    (fx / "lora/tmp").rename(b)
    msg = _input_mismatch(fx, tmp_path)
    assert msg.startswith("10 input(s)")  # each folder's five files: weights, config, tokenizer files
    assert "probably lora/chinese_alpaca_plus_lora_13b/adapter_model.bin" in msg
    assert "probably lora/chinese_llama_plus_lora_13b/adapter_model.bin" in msg


def test_input_mismatch_exit_code_from_cli(family: Path, tmp_path: Path) -> None:
    fx = _copy_family(family, tmp_path)
    (fx / "lora/chinese_llama_plus_lora_13b/adapter_model.bin").write_bytes(b"PK\x03\x04 not really")
    r = cli("build", "tiny", "alpaca-plus", "--llama", str(fx / "llama"), "--output-dir", str(tmp_path / "o"))
    assert r.returncode == errors.EXIT_INPUT_MISMATCH
    assert len(r.stderr.strip().splitlines()) == 1 and "adapter_model.bin: expected" in r.stderr


# ------------------------------------------------------------------------------------------ bad usage


def test_bad_usage(tmp_path: Path) -> None:
    assert cli("build", "9B", "llama").returncode == errors.EXIT_BAD_INPUT
    assert cli("build", "7B", "vicuna").returncode == errors.EXIT_BAD_INPUT
    r = cli("build", "7B", "llama", "--lora", str(tmp_path), env={"REPRO_MERGE_LLAMA": str(tmp_path)})
    assert r.returncode == errors.EXIT_BAD_INPUT and "missing" in r.stderr
    r = cli("verify", "--model", "tiny-vicuna", str(tmp_path))
    assert r.returncode == errors.EXIT_BAD_INPUT and "MODEL" in r.stderr


# ------------------------------------------------------------------------------------------ output mismatch


def _verify(folder: Path, name: str = "tiny-alpaca-plus") -> tuple[int, list[dict]]:
    r = cli("verify", "--model", name, str(folder), "--json")
    assert r.returncode in (errors.EXIT_OK, errors.EXIT_OUTPUT_MISMATCH, errors.EXIT_NOT_VERIFIABLE), r.stderr
    return r.returncode, json.loads(r.stdout)["findings"]


def test_verify_passes_a_good_folder(built: Path) -> None:
    assert _verify(built) == (errors.EXIT_OK, [])


def test_flipped_byte_in_an_output(built: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(built, tmp_path / "o"))
    f = out / "consolidated.01.pth"
    with ptzip.Checkpoint(f) as ck:
        rec = ck.storages[ck.tensors["layers.1.feed_forward.w2.weight"].storage][0]
    data = bytearray(f.read_bytes())
    data[rec.data_offset + 10] ^= 0x01
    f.write_bytes(bytes(data))
    code, findings = _verify(out)
    assert code == errors.EXIT_OUTPUT_MISMATCH
    numeric = [x for x in findings if x["category"] == "numeric"]
    assert numeric and numeric[0]["data"]["tensors"] == ["layers.1.feed_forward.w2.weight"]
    order = [x for x in findings if x["category"] == "arithmetic-order"]
    assert (
        order
        and "seq" in order[0]["data"]["reproduces_expected"]
        and order[0]["data"]["reproduces_found"] == []
    )
    assert "1 of 10240 elements" in order[0]["detail"]


def test_resaved_by_a_newer_torch(built: Path, tmp_path: Path) -> None:
    """What torch >= 2.1 writes: the same tensors plus a `byteorder` record."""
    out = Path(shutil.copytree(built, tmp_path / "o"))
    f = out / "consolidated.00.pth"
    with zipfile.ZipFile(f, "a") as z:
        z.writestr("consolidated.00/byteorder", "little")
    code, findings = _verify(out)
    assert code == errors.EXIT_OUTPUT_MISMATCH
    assert [x["category"] for x in findings] == ["container"]
    assert "byteorder" in findings[0]["detail"] and "torch >= 2.1" in findings[0]["detail"]


def test_one_changed_fp16_element(built: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(built, tmp_path / "o"))
    f = out / "consolidated.00.pth"
    with ptzip.Checkpoint(f) as ck:
        items = [(k, np.array(ck.tensor(k))) for k in ck.tensors]
    w = dict(items)["layers.0.attention.wq.weight"]
    w.view(np.uint16)[3, 5] += 1  # one fp16 element, one ulp
    ptzip.save_arrays(f, items)
    code, findings = _verify(out)
    assert code == errors.EXIT_OUTPUT_MISMATCH
    numeric = [x for x in findings if x["category"] == "numeric"][0]
    assert numeric["data"]["tensors"] == ["layers.0.attention.wq.weight"]
    order = [x for x in findings if x["category"] == "arithmetic-order"][0]
    assert order["data"]["reproduces_found"] == []
    assert order["data"]["tensors"] == [
        {"tensor": "layers.0.attention.wq.weight", "elements": 1, "of": 3200, "max_ulps": 1}
    ]


def test_every_differing_file_is_named_without_a_manifest(built: Path, tmp_path: Path) -> None:
    """A real target has no per-tensor manifest of its expected files: each differing file still gets
    findings, from the files alone. Checked against 13B-alpaca-plus, the tiny shards have the wrong
    vocabulary; with no vocabulary to check, the finding says what could not be checked."""
    out = Path(shutil.copytree(built, tmp_path / "o"))
    for f in sorted(out.glob("consolidated.*.pth")):  # other values in a sound container
        with ptzip.Checkpoint(f) as ck:
            items = [(k, np.array(ck.tensor(k))) for k in ck.tensors]
        items[0][1].view(np.uint16).flat[0] += 1
        ptzip.save_arrays(f, items)
    code, findings = _verify(out, "13B-alpaca-plus")
    assert code == errors.EXIT_OUTPUT_MISMATCH
    structure = [x for x in findings if x["category"] == "structure"]
    assert [x["file"] for x in structure] == ["consolidated.00.pth", "consolidated.01.pth"]
    assert all("362 vocabulary rows instead of 49954" in x["detail"] for x in structure)

    table = checksums.load()
    checks = verify.check_files(out, table.expected("merged-pth", "13B-alpaca-plus"))
    unknown = verify.diagnose(out, checks, table, golden=None, vocab=None)
    assert [(f.category, f.file) for f in unknown] == [
        ("unknown", "consolidated.00.pth"),
        ("unknown", "consolidated.01.pth"),
    ]
    assert all("only its container was checked" in f.detail for f in unknown)


def test_other_arithmetic_order_is_named(family: Path, tmp_path: Path) -> None:
    """Built with the FMA order (what MKL's AVX2 and AVX-512 kernels mostly do): the gate says so. The
    diagnosis's `host` rebuild runs on MKL's generic path here, forced so on any CPU."""
    args = [
        "--llama",
        str(family / "llama"),
        "--output-dir",
        str(tmp_path / "o"),
        "--work",
        str(tmp_path / "w"),
    ]
    r = cli(
        "build",
        "tiny",
        "alpaca-plus",
        *args,
        "--order",
        "fma",
        "--json",
        env={"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    )
    assert r.returncode == errors.EXIT_OUTPUT_MISMATCH, r.stderr
    order = [f for f in json.loads(r.stdout)["findings"] if f["category"] == "arithmetic-order"]
    assert order and all(f["data"]["reproduces_expected"] == ["seq", "host"] for f in order)
    assert all(f["data"]["reproduces_found"] == ["fma"] for f in order)
    assert all("this file is what the `fma` order gives" in f["detail"] for f in order)
    for f in order:  # and how far it is from the expected bytes: which tensors, elements, ulps
        assert f["data"]["tensors"] and all(0 < t["elements"] <= t["of"] for t in f["data"]["tensors"])
        assert all(t["max_ulps"] >= 1 for t in f["data"]["tensors"]) and "tensor(s) differ" in f["detail"]


def test_wrong_model_is_structure(family: Path, tmp_path: Path) -> None:
    """A LLaMA-Plus output checked as Alpaca-Plus: one vocabulary row short (adapter order/tokenizer)."""
    r = build("tiny", "llama-plus", llama=family / "llama", output_dir=tmp_path / "o", work=tmp_path / "w")
    assert r.verdict == "pass"
    code, findings = _verify(tmp_path / "o")
    assert code == errors.EXIT_OUTPUT_MISMATCH
    assert any(x["category"] == "inputs" and "tiny-llama-plus" in x["detail"] for x in findings)
    structure = [x for x in findings if x["category"] == "structure"]
    assert structure and "361 vocabulary rows instead of 362" in structure[0]["detail"]


def test_not_verifiable_when_the_hash_is_tba(family: Path, tmp_path: Path) -> None:
    table = (ROOT / "SHA256.md").read_text()
    pth = checksums.load().expected("merged-pth", "tiny-alpaca-plus")["consolidated.00.pth"]
    (tmp_path / "SHA256.md").write_text(table.replace(pth, "TBA"))
    env = {"REPRO_MERGE_SHA256": str(tmp_path / "SHA256.md")}
    r = cli(
        "build",
        "tiny",
        "alpaca-plus",
        "--llama",
        str(family / "llama"),
        "--output-dir",
        str(tmp_path / "o"),
        env=env,
    )
    assert r.returncode == errors.EXIT_NOT_VERIFIABLE, r.stderr
    assert r.stdout.startswith("BUILT, NOT VERIFIABLE tiny-alpaca-plus") and "PASS" not in r.stdout


def test_targets_lists_tba(tmp_path: Path) -> None:
    r = cli("targets", "--json")
    rows = {t["name"]: t for t in json.loads(r.stdout)}
    assert rows["33B-alpaca-plus"]["pth"] == "TBA" and rows["13B-alpaca-plus"]["pth"] == "verifiable"
    assert rows["tiny-alpaca-plus"]["needs"].startswith("nothing")
    assert rows["13B-alpaca-plus"]["adapters"] == [
        "chinese_llama_plus_lora_13b",
        "chinese_alpaca_plus_lora_13b",
    ]
    assert "33B-alpaca-pro" in cli("targets").stdout


# ------------------------------------------------------------------------------------------ crash and rerun


def _complete(path: Path) -> bool:
    """A whole file: a readable checkpoint, or parseable JSON, or (other files) any content."""
    if path.suffix in (".pth", ".bin"):
        try:
            with ptzip.Checkpoint(path) as ck:
                for k in ck.tensors:
                    ck.tensor(k)
            return True
        except ptzip.CheckpointError:
            return False
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
            return True
        except ValueError:
            return False
    return True


# The build in a child that SIGKILLs itself in the middle of one record of one file: some of that
# record's bytes are on disk, as under a kill -9 at a random moment, but the moment is chosen.
_KILLED_BUILD = """
import os, signal, sys
from repro_merge import cli, ptzip

archive, record = os.environ["KILL_IN"].split(":")
real = ptzip._ZipWriter.record


def record_then_die(self, name, chunks, size):
    if self.folder == archive and name == record:
        self._write(next(iter(chunks))[: max(size // 2, 1)])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, name, chunks, size)


ptzip._ZipWriter.record = record_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    "kill_in",
    [
        "pytorch_model-00002-of-00003:data/3",  # step 1, the converted base's second shard
        "consolidated.00:data/5",  # step 2, the first of the two pth files written side by side
        "consolidated.01:data.pkl",  # step 2, the second one, as it starts
    ],
)
def test_kill_9_then_rerun(family: Path, tmp_path: Path, kill_in: str) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["build", "tiny", "alpaca-plus", "--llama", str(family / "llama")]
    args += ["--output-dir", str(out), "--work", str(work)]
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_BUILD, *args],
        env={**os.environ, "KILL_IN": kill_in},
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    folders = [d for d in (out, work / "hf-base-tiny") if d.is_dir()]
    left = [p for d in folders for p in d.iterdir()]
    partial = [p for p in left if p.name.startswith(".") and p.name.endswith(".partial")]
    assert any(
        p.name == f".{kill_in.split(':')[0]}.{'bin' if 'pytorch' in kill_in else 'pth'}.partial"
        for p in partial
    ), f"the kill did not land inside the chosen file: {left}"
    for p in left:
        assert p.name.startswith(".") or _complete(p), f"{p} has its final name but is not complete"
    r = cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "partial files are cleaned up"


@pytest.mark.parametrize(
    ("output_type", "pattern"), [("huggingface", "pytorch_model-*.bin"), ("pth", "*.pth")]
)
def test_rerun_keeps_verified_outputs_and_rebuilds_the_rest(
    family: Path, built: Path, tmp_path: Path, output_type: str, pattern: str
) -> None:
    out, work = tmp_path / "o", built.parent / ".work"

    def run() -> str:
        r = build(
            "tiny", "alpaca-plus", llama=family / "llama", output_dir=out, output_type=output_type, work=work
        )
        return r.verdict

    assert run() == "pass"
    shards = sorted(out.glob(pattern))
    assert len(shards) >= 2
    before = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].write_bytes(b"junk")
    assert run() == "pass"
    for p in shards:
        assert (p.stat().st_mtime_ns == before[p]) == (p != shards[1]), f"{p.name}: rewritten or not"


def test_rerun_rebuilds_outputs_no_hash_vouches_for(family: Path, tmp_path: Path) -> None:
    """A file the table has no hash for is never kept on a rerun: it may come from a build with another
    arithmetic order (as real targets' HF shards and TBA parts have no published hash)."""
    table = tmp_path / "SHA256.md"
    rows = (ROOT / "SHA256.md").read_text().splitlines(keepends=True)
    dropped = [r for r in rows if r.startswith("| tiny-alpaca-plus | consolidated.00.pth")]
    assert len(dropped) == 1
    published = dropped[0].split("|")[3].strip()  # the script's own bytes for it
    table.write_text("".join(r for r in rows if r not in dropped))
    env = {"REPRO_MERGE_SHA256": str(table)}
    out, args = tmp_path / "o", ["--llama", str(family / "llama"), "--work", str(tmp_path / "w")]
    r = cli("build", "tiny", "alpaca-plus", *args, "--output-dir", str(out), "--order", "fma", env=env)
    assert r.returncode == errors.EXIT_OK, r.stderr  # the listed files are alike in both orders
    fma = sha256_file(out / "consolidated.00.pth")
    r = cli("build", "tiny", "alpaca-plus", *args, "--output-dir", str(out), env=env)
    assert r.returncode == errors.EXIT_OK, r.stderr
    seq = sha256_file(out / "consolidated.00.pth")
    assert fma != seq == published
    assert json.loads((out / "provenance.json").read_text())["numerics"]["order"] == "seq"


def test_output_folder_with_other_files_is_refused(family: Path, built: Path, tmp_path: Path) -> None:
    """A rerun may complete a build of the same target; the user's files or another target's build are
    refused before any work, and left as they were."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(errors.OutputExistsError, match="holds notes.txt"):
        build("tiny", "alpaca-plus", llama=family / "llama", output_dir=mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    other = Path(shutil.copytree(built, tmp_path / "other"))
    before = {p.name: sha256_file(p) for p in other.iterdir()}
    for model, kind in (("alpaca-pro", "pth"), ("alpaca-plus", "huggingface")):
        with pytest.raises(errors.OutputExistsError, match="holds another build"):
            build("tiny", model, llama=family / "llama", output_dir=other, output_type=kind)
    assert {p.name: sha256_file(p) for p in other.iterdir()} == before


def test_verify_via_python_api(built: Path) -> None:
    r = verify_folder("tiny-alpaca-plus", built)
    assert r.verdict == "pass" and r.exit_code == 0
