"""The whole build of one target: verify inputs, convert, merge, verify outputs, record provenance.

Every input is checked against SHA256.md before any compute; every output is written under a partial
name and renamed when complete, so a killed build leaves only complete files, and a rerun keeps the
outputs that verify and completes the rest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from repro_merge import __version__, arith, checksums
from repro_merge.checksums import Row, Table, sha256_file
from repro_merge.errors import (
    EXIT_INPUT_MISMATCH,
    EXIT_NOT_VERIFIABLE,
    EXIT_OK,
    EXIT_OUTPUT_MISMATCH,
    BadInputError,
    OutputExistsError,
    ReproMergeError,
)
from repro_merge.fixtures import ADAPTERS
from repro_merge.outputs import write_bytes
from repro_merge.sizes import BUILD_SIZES, RELEASED_VOCAB, VARIANT_ADAPTERS, BuildSize, tokenizer_family
from repro_merge.verify import (
    MANIFEST,
    PROVENANCE,
    FileCheck,
    Finding,
    check_files,
    diagnose,
    make_manifest,
    manifest_bytes,
)

ENV_LLAMA, ENV_LORA, ENV_HF_BASE = "REPRO_MERGE_LLAMA", "REPRO_MERGE_LORA", "REPRO_MERGE_HF_BASE"
ENV_OUT, ENV_WORK = "REPRO_MERGE_OUT", "REPRO_MERGE_WORK"


class InputMismatch(ReproMergeError):
    """An input's hash is not the published one (message: every such file, what it probably is)."""

    exit_code = EXIT_INPUT_MISMATCH


# ------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    size: BuildSize
    model: str

    @property
    def name(self) -> str:
        return f"{self.size.name}-{self.model}"

    @property
    def tiny(self) -> bool:
        return self.size.name == "tiny"

    def adapter_dirs(self) -> list[str]:
        """Released adapter folder names, in merge order."""
        return [f"{ADAPTERS[a].release}_{self.size.lora_suffix}" for a in VARIANT_ADAPTERS[self.model]]


def target(size: str, model: str) -> Target:
    if size not in BUILD_SIZES:
        raise BadInputError(f"SIZE {size!r}: expected one of {', '.join(BUILD_SIZES)}")
    if model not in VARIANT_ADAPTERS:
        raise BadInputError(f"MODEL {model!r}: expected one of {', '.join(VARIANT_ADAPTERS)}")
    return Target(BUILD_SIZES[size], model)


def parse_name(name: str) -> Target:
    """``13B-alpaca-plus`` -> Target (the names ``repro-merge targets`` prints)."""
    size, _, model = name.partition("-")
    return target(size, model)


def all_targets() -> list[Target]:
    return [Target(s, m) for s in BUILD_SIZES.values() for m in VARIANT_ADAPTERS]


def describe_targets(table: Table) -> list[dict[str, object]]:
    """What can be built, what each needs, and what is verifiable."""
    out = []
    for t in all_targets():
        pth = table.expected("merged-pth", t.name)
        hf = table.expected("merged-huggingface", t.name)
        out.append(
            {
                "name": t.name,
                "needs": "nothing (embedded tiny family)"
                if t.tiny
                else f"original LLaMA {t.size.folder}/ and " + ", ".join(t.adapter_dirs()),
                "adapters": t.adapter_dirs(),
                "pth": "TBA"
                if any(v is None for v in pth.values())
                else ("verifiable" if pth else "no hashes"),
                "huggingface": "verifiable" if hf and all(hf.values()) else "no hashes",
            }
        )
    return out


# ------------------------------------------------------------------------------------------ inputs


@dataclass
class Inputs:
    llama: Path | None  # original LLaMA root (None when an HF base is given)
    adapters: list[Path]
    hf_base: Path | None
    checks: list[dict[str, object]] = field(default_factory=list)


def embedded_fixtures(work: Path) -> Path:
    """The tiny family, generated once into the work folder (written atomically; hashes in SHA256.md)."""
    from repro_merge.fixtures import write_fixtures

    root = work / "fixtures"
    if not root.is_dir():
        write_fixtures(root)
    return root


def _check(path: Path, role: str, want: str | None, known: dict[Path, str]) -> dict[str, object]:
    """One input's hash against the table (``file`` is how it is named in provenance: folder/name); a
    tokenizer.model is named as a tokenizer, whichever folder it is in."""
    role = "tokenizer" if path.name == "tokenizer.model" else role
    if not path.is_file():
        raise BadInputError(f"{path}: missing ({role})")
    found = known.setdefault(path, sha256_file(path))
    status = "ok" if found == want else ("unverifiable" if want is None else "mismatch")
    return {
        "role": role,
        "file": f"{path.parent.name}/{path.name}",
        "path": str(path),
        "expected": want,
        "sha256": found,
        "status": status,
    }


def _probably(table: Table, digest: str) -> str:
    rows: list[Row] = table.identify(digest)
    more = f" (and {len(rows) - 3} more with the same hash)" if len(rows) > 3 else ""
    return ("; it is probably " + " or ".join(r.describe() for r in rows[:3]) + more) if rows else ""


def gather_inputs(
    t: Target, table: Table, llama: Path | None, lora: Path | None, hf_base: Path | None, work: Path
) -> Inputs:
    """Locate every input and check its hash; raise before any compute if one is wrong."""
    known: dict[Path, str] = {}
    fixtures = table.expected("fixtures", "tiny")
    if t.tiny:  # the embedded family unless given; its files are listed by path inside the family
        fx = llama.parent if llama else embedded_fixtures(work)
        llama, lora = fx / "llama", lora or fx / "lora"
        # every file the convert step reads: the shards, params.json and the base tokenizer
        originals = {
            fx / rel: h
            for rel, h in fixtures.items()
            if rel.startswith(f"llama/{t.size.folder}/") or rel == "llama/tokenizer.model"
        }
    elif llama is not None:
        originals = {llama / t.size.folder / f: h for f, h in table.expected("original", t.size.name).items()}
    inputs = Inputs(llama, [], hf_base)
    if hf_base is None:
        if llama is None:
            raise BadInputError(
                f"no original LLaMA folder: give --llama DIR or set {ENV_LLAMA} (or --hf-base)"
            )
        for path, h in originals.items():
            inputs.checks.append(_check(path, "original", h, known))
    else:
        for f, h in table.expected("hf-base", "tiny" if t.tiny else t.size.name).items():
            if f.startswith("pytorch_model"):
                inputs.checks.append(_check(hf_base / f, "hf-base", h, known))
    if lora is None:
        raise BadInputError(f"no adapter folder: give --lora DIR or set {ENV_LORA}")
    for name in t.adapter_dirs():
        folder = lora / name
        if not folder.is_dir():
            raise BadInputError(f"{folder}: missing adapter folder (released name {name})")
        inputs.adapters.append(folder)
        if t.tiny:  # every file of the adapter folder: its config (r, alpha) and tokenizer files too
            files = {
                rel.split("/", 2)[2]: h for rel, h in fixtures.items() if rel.startswith(f"lora/{name}/")
            }
        else:  # what the publisher lists: the weights and the tokenizer
            files = {
                "adapter_model.bin": table.expected("adapter", name).get("adapter_model.bin"),
                "tokenizer.model": table.expected("tokenizer", tokenizer_family(name)).get("tokenizer.model"),
            }
        for f, h in files.items():
            inputs.checks.append(_check(folder / f, "adapter", h, known))
    bad = [c for c in inputs.checks if c["status"] == "mismatch"]
    if bad:
        lines = [
            f"{c['path']}: expected {c['expected']}, found {c['sha256']}{_probably(table, str(c['sha256']))}"
            for c in bad
        ]
        raise InputMismatch(f"{len(bad)} input(s) are not the published files: " + " | ".join(lines))
    return inputs


# ------------------------------------------------------------------------------------------ the build


@dataclass
class Result:
    target: str
    output_dir: Path
    verdict: str  # pass | output-mismatch | not-verifiable
    exit_code: int
    outputs: list[FileCheck]
    findings: list[Finding]
    intermediate: list[FileCheck]

    def summary(self) -> str:
        ok = sum(c.status == "ok" for c in self.outputs)
        head = {
            "pass": f"PASS {self.target}: all {ok} published file(s) match",
            "output-mismatch": f"FAIL {self.target}: "
            + ", ".join(f"{c.file} {c.status}" for c in self.outputs if c.status in ("mismatch", "missing")),
            "not-verifiable": f"BUILT, NOT VERIFIABLE {self.target}: no published hash for "
            + (", ".join(c.file for c in self.outputs if c.status == "unverifiable") or "this output type"),
        }[self.verdict]
        lines = [head, f"  output: {self.output_dir}"]
        lines += [f"  [{f.category}] {f.file}: {f.detail}" for f in self.findings]
        return "\n".join(lines)


def _expected_outputs(t: Target, table: Table, output_type: str) -> dict[str, str | None]:
    return table.expected(f"merged-{output_type}", t.name)


def _verdict(checks: list[FileCheck]) -> tuple[str, int]:
    if not checks:
        return "not-verifiable", EXIT_NOT_VERIFIABLE
    if any(c.status in ("mismatch", "missing") for c in checks):
        return "output-mismatch", EXIT_OUTPUT_MISMATCH
    if any(c.status == "unverifiable" for c in checks):
        return "not-verifiable", EXIT_NOT_VERIFIABLE
    return "pass", EXIT_OK


# What a build writes into its output folder: the merge's files, then the manifest and provenance.
_BUILD_FILES = (
    "consolidated.*.pth",
    "params.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    MANIFEST,
    PROVENANCE,
)


def _check_resumable(out: Path, t: Target, output_type: str) -> None:
    """A rerun completes what a build of the same target began; a folder holding anything else (the
    user's files, another target's build) is refused before any work, as ``merge`` refuses it."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name.startswith(".") and p.name.endswith(".partial"):
            continue
        if not p.is_file() or not any(fnmatch.fnmatchcase(p.name, pat) for pat in _BUILD_FILES):
            raise OutputExistsError(
                f"{out}: output folder holds {p.name}, which no build writes; choose a new folder"
            )
    prov = out / PROVENANCE
    if prov.is_file():
        try:
            was = json.loads(prov.read_text())["target"]
        except (ValueError, KeyError, TypeError):
            was = None
        if was != {"name": t.name, "output_type": output_type}:
            raise OutputExistsError(
                f"{prov}: the folder holds another build ({was}), not {t.name} {output_type}; "
                "choose a new folder"
            )


def _drop_wrong_outputs(out: Path, expected: dict[str, str | None]) -> None:
    """On a rerun, keep the outputs that verify against the table; remove the rest so they are built
    again, including files the table has no hash for (nothing vouches for them: they may come from a
    build with another arithmetic order) and the previous manifest and provenance."""
    for p in out.iterdir():
        if not p.is_file() or p.name.startswith("."):
            continue
        want = expected.get(p.name)
        if want is None or sha256_file(p) != want:
            p.unlink()


def build(
    size: str,
    model: str,
    *,
    llama: Path | None = None,
    lora: Path | None = None,
    hf_base: Path | None = None,
    output_dir: Path | None = None,
    output_type: str = "pth",
    order: str = arith.DEFAULT_ORDER,
    work: Path | None = None,
    diagnose_orders: bool | None = None,
) -> Result:
    """Build one target and gate it; see the module docstring. Raises for bad or mismatched inputs."""
    from repro_merge.convert import convert
    from repro_merge.merge import merge

    started = time.time()
    t = target(size, model)
    if output_type not in ("pth", "huggingface"):
        raise BadInputError(f"--output-type {output_type!r}: expected pth or huggingface")
    table = checksums.load()
    out_root = Path(os.environ.get(ENV_OUT, "out"))
    output_dir = Path(output_dir) if output_dir else out_root / t.name
    work = Path(work or os.environ.get(ENV_WORK) or output_dir.parent / ".work")
    if not t.tiny:  # the tiny target's inputs are embedded: the mount points of the image do not apply
        llama = llama or _env_path(ENV_LLAMA)
        lora = lora or _env_path(ENV_LORA)
        hf_base = hf_base or _env_path(ENV_HF_BASE)
    _check_resumable(output_dir, t, output_type)
    inputs = gather_inputs(t, table, llama, lora, hf_base, work)

    intermediate: list[FileCheck] = []
    base = inputs.hf_base
    if base is None:
        base = work / f"hf-base-{t.size.name}"
        convert(inputs.llama, t.size.folder, base, t.size.max_shard_size, resume=True)  # type: ignore[arg-type]
        intermediate = check_files(base, table.expected("hf-base", "tiny" if t.tiny else t.size.name))
    expected = _expected_outputs(t, table, output_type)
    if output_dir.exists():
        _drop_wrong_outputs(output_dir, expected)
    adapters = [str(p) for p in inputs.adapters]
    merge(str(base), adapters, output_type, output_dir, t.size.num_shards, order, resume=True)

    checks = check_files(output_dir, expected)
    verdict, code = _verdict(checks)
    findings: list[Finding] = []
    if verdict == "output-mismatch":
        findings = diagnose_outputs(
            t,
            output_dir,
            checks,
            table,
            output_type,
            str(base),
            adapters,
            diagnose_orders if diagnose_orders is not None else t.tiny,
        )
    for c in intermediate:
        if c.status in ("mismatch", "missing"):
            findings.append(
                Finding(
                    "intermediate",
                    c.file,
                    f"the converted HF base differs from the published "
                    f"one ({c.status}); the merged outputs decide the verdict",
                )
            )
    manifest = make_manifest(output_dir)
    write_bytes(output_dir / MANIFEST, manifest_bytes(manifest))
    result = Result(t.name, output_dir, verdict, code, checks, findings, intermediate)
    write_provenance(result, t, inputs, output_type, order, manifest, base, started)
    return result


def diagnose_outputs(
    t: Target,
    folder: Path,
    checks: list[FileCheck],
    table: Table,
    output_type: str,
    base: str | None,
    adapters: list[str] | None,
    rebuild_orders: bool,
) -> list[Finding]:
    """The gate's findings; with the inputs at hand, also which arithmetic order gives which bytes."""
    from repro_merge.merge import merge

    golden, vocab = golden_manifest(t, output_type), expected_vocab(t)
    if not (rebuild_orders and base and adapters):
        return diagnose(folder, checks, table, golden, vocab=vocab)
    with tempfile.TemporaryDirectory(prefix="repro-merge-diagnose-") as scratch:

        def rebuild(order: str, dest: Path) -> Path:
            merge(base, adapters, output_type, dest, t.size.num_shards, order)
            return dest

        return diagnose(folder, checks, table, golden, rebuild, Path(scratch), vocab=vocab)


def verify_folder(
    name: str,
    folder: Path,
    output_type: str | None = None,
    llama: Path | None = None,
    lora: Path | None = None,
    hf_base: Path | None = None,
) -> Result:
    """The gate over an existing folder; on a mismatch, the diagnosis (rebuilding with every arithmetic
    order when the inputs are given, or always for tiny targets, whose inputs are embedded)."""
    from repro_merge.convert import convert
    from repro_merge.verify import output_format

    t = parse_name(name)
    if not folder.is_dir():
        raise BadInputError(f"{folder}: not a folder")
    output_type = output_type or output_format(folder)
    table = checksums.load()
    checks = check_files(folder, _expected_outputs(t, table, output_type))
    verdict, code = _verdict(checks)
    findings: list[Finding] = []
    if verdict == "output-mismatch":
        with tempfile.TemporaryDirectory(prefix="repro-merge-verify-") as tmp:
            base, adapters = None, None
            if t.tiny or llama or hf_base:
                inputs = gather_inputs(t, table, llama, lora, hf_base, Path(tmp))
                adapters = [str(p) for p in inputs.adapters]
                base = str(hf_base) if hf_base else str(Path(tmp) / "hf-base")
                if hf_base is None:
                    convert(inputs.llama, t.size.folder, Path(base), t.size.max_shard_size)  # type: ignore[arg-type]
            findings += diagnose_outputs(
                t, folder, checks, table, output_type, base, adapters, base is not None
            )
    return Result(t.name, folder, verdict, code, checks, findings, [])


def expected_vocab(t: Target) -> int | None:
    """A real target's vocabulary (tiny targets have golden manifests, which say more)."""
    return None if t.tiny else RELEASED_VOCAB[tokenizer_family(t.model)]


def golden_manifest(t: Target, output_type: str) -> dict | None:
    """The committed per-tensor manifest of a target's expected output, where there is one."""
    path = Path(__file__).with_name("manifests") / f"{t.name}-{output_type}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


# ------------------------------------------------------------------------------------------ provenance


def stack_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "repro-merge",
        "torch",
        "transformers",
        "peft",
        "sentencepiece",
        "tokenizers",
        "numpy",
        "isal",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def numerics_env() -> dict[str, object]:
    """What can change a BLAS's summation order or the thread split (recorded, for diagnosis)."""
    keys = sorted(k for k in os.environ if k.startswith(("OMP_", "MKL_", "OPENBLAS_", "ATEN_", "KMP_")))
    return {"env": {k: os.environ[k] for k in keys}, "merge_threads": arith.threads()}


def write_provenance(
    r: Result,
    t: Target,
    inputs: Inputs,
    output_type: str,
    order: str,
    manifest: dict,
    base: Path,
    started: float,
) -> None:
    """provenance.json: everything that determined the bytes; its ``digest`` covers all but ``local``
    (paths and times), so two builds from the same inputs on one machine kind record the same digest."""
    lock = Path(__file__).with_name("runtime-lock.txt")
    record = {
        "tool": {"name": "repro-merge", "version": __version__},
        "lock_sha256": sha256_file(lock) if lock.is_file() else None,
        "table_sha256": sha256_file(checksums.table_path()),  # the SHA256.md the gate read
        "stack": stack_versions(),
        "platform": {"system": platform.system(), "machine": platform.machine(), "cpu": cpu_model()},
        "numerics": {"order": order, **numerics_env()},
        "target": {"name": t.name, "output_type": output_type},
        "inputs": [{k: v for k, v in c.items() if k != "path"} for c in inputs.checks],
        "intermediate": [asdict(c) for c in r.intermediate],
        "outputs": [asdict(c) for c in r.outputs],
        "weights_digest": manifest["weights_digest"],
        "verdict": r.verdict,
        "findings": [asdict(f) for f in r.findings],
    }
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    local = {
        "output_dir": str(r.output_dir.resolve()),
        "hf_base": str(base.resolve()),
        "inputs": [str(c["path"]) for c in inputs.checks],
        "seconds": round(time.time() - started, 1),
    }
    payload = {**record, "digest": digest, "local": local}
    write_bytes(r.output_dir / PROVENANCE, (json.dumps(payload, indent=2) + "\n").encode())
