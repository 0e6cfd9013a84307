"""Step 3: the checksum gate, per-tensor manifests, and a diagnosis that names why a file differs.

A file hash only says *that* bytes differ. From the files alone this module tells apart: a different
container around the same tensors (another torch version, another key order, another file name),
different shapes (wrong adapter order or tokenizer), and numeric deviations (which tensors, how many
elements, how many ulps) — and, when the inputs are at hand, which arithmetic order of the merge
reproduces the expected bytes (another BLAS/CPU path).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from repro_merge import ptzip
from repro_merge.checksums import Table, sha256_file
from repro_merge.layout import is_rotated, meta_split_axis, meta_to_hf, permute
from repro_merge.ptzip import crc32

MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"
OWN_FILES = (MANIFEST, PROVENANCE)  # written by repro-merge next to the model, never part of it


# ------------------------------------------------------------------------------------------ manifests


def output_format(folder: Path) -> str:
    return "pth" if any(folder.glob("consolidated.*.pth")) else "huggingface"


def is_checkpoint(name: str) -> bool:
    return name.endswith((".pth", ".bin"))


def tensor_hashes(path: Path, verify_crc: bool = True) -> list[dict[str, object]]:
    """Every tensor of a checkpoint, in file order: name, dtype, shape, sha256 of its C-order bytes."""
    out = []
    with ptzip.Checkpoint(path, verify_crc=verify_crc) as ck:
        for name, meta in ck.tensors.items():
            digest = hashlib.sha256(np.ascontiguousarray(ck.tensor(name)).tobytes()).hexdigest()
            out.append({"name": name, "dtype": meta.dtype.name, "shape": list(meta.shape), "sha256": digest})
    return out


def manifest_bytes(manifest: dict[str, object]) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


def make_manifest(folder: Path) -> dict[str, object]:
    """The folder's files with their hashes, every tensor's hash, and the format-independent digest."""
    files: dict[str, dict[str, object]] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in OWN_FILES:
            continue
        entry: dict[str, object] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        if is_checkpoint(p.name):
            entry["tensors"] = tensor_hashes(p)
        files[p.name] = entry
    return {"format": output_format(folder), "files": files, "weights_digest": weights_digest(folder)}


def weights_digest(folder: Path) -> str:
    """A digest of the model's weights alone: HF names, HF layout, whole tensors. The same for pth and
    huggingface output of one model, and for any torch version (container bytes do not enter it)."""
    lines = sorted(
        f"{name} {dtype} {list(shape)} {digest}\n" for name, dtype, shape, digest in _whole_tensors(folder)
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _whole_tensors(folder: Path) -> list[tuple[str, str, tuple[int, ...], str]]:
    def h(a: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

    out = []
    if output_format(folder) == "huggingface":
        for path in sorted(folder.glob("pytorch_model*.bin")):
            with ptzip.Checkpoint(path) as ck:
                for name, meta in ck.tensors.items():
                    if not name.endswith("rotary_emb.inv_freq"):
                        out.append((name, meta.dtype.name, meta.shape, h(ck.tensor(name))))
        return out
    n_heads = int(json.loads((folder / "params.json").read_text())["n_heads"])
    cks = [ptzip.Checkpoint(p) for p in sorted(folder.glob("consolidated.*.pth"))]
    try:
        for name, meta in cks[0].tensors.items():
            hf = meta_to_hf(name)
            if hf is None:
                continue
            axis = meta_split_axis(name) if len(cks) > 1 else None
            whole = (
                cks[0].tensor(name) if axis is None else np.concatenate([c.tensor(name) for c in cks], axis)
            )
            if is_rotated(name):
                whole = permute(whole, n_heads)
            out.append((hf, meta.dtype.name, tuple(whole.shape), h(whole)))
    finally:
        for c in cks:
            c.close()
    return out


# ------------------------------------------------------------------------------------------ the gate


@dataclass
class FileCheck:
    file: str
    expected: str | None  # None: TBA
    found: str | None  # None: missing

    @property
    def status(self) -> str:
        if self.found is None:
            return "missing"
        if self.expected is None:
            return "unverifiable"
        return "ok" if self.found == self.expected else "mismatch"


def check_files(
    folder: Path, expected: dict[str, str | None], known: dict[str, str] | None = None
) -> list[FileCheck]:
    """Hash every expected file (``known`` holds hashes already computed this run)."""
    known = known or {}
    out = []
    for name, want in sorted(expected.items()):
        p = folder / name
        found = known.get(name) or (sha256_file(p) if p.is_file() else None)
        out.append(FileCheck(name, want, found))
    return out


# ------------------------------------------------------------------------------------------ diagnosis


@dataclass
class Finding:
    """One cause found for a mismatch: a category, the file, and a sentence a person can act on."""

    category: str  # inputs | corrupt | container | structure | numeric | arithmetic-order | missing | unknown
    file: str
    detail: str
    data: dict[str, object] = field(default_factory=dict)


def ulp_diff(found: np.ndarray, expected: np.ndarray) -> tuple[int, int]:
    """(elements that differ, the largest difference in ulps) of two float arrays of one shape."""
    if found.dtype.itemsize == 2:
        a, b = found.view(np.uint16), expected.view(np.uint16)
        oa, ob = _ordered16(a), _ordered16(b)
    else:
        a, b = found.view(np.uint32), expected.view(np.uint32)
        oa, ob = _ordered32(a), _ordered32(b)
    diff = np.abs(oa - ob)
    return int(np.count_nonzero(a != b)), int(diff.max()) if diff.size else 0


def _ordered16(bits: np.ndarray) -> np.ndarray:
    x = bits.astype(np.int64)
    return np.where(x & 0x8000, 0x8000 - x, x)


def _ordered32(bits: np.ndarray) -> np.ndarray:
    x = bits.astype(np.int64)
    return np.where(x & 0x80000000, 0x80000000 - x, x)


def container_findings(path: Path, expected_tensors: list[dict] | None) -> list[Finding]:
    """What differs around the tensors: records, archive name, key order; numeric or shape changes."""
    name = path.name
    try:
        ck = ptzip.Checkpoint(path, verify_crc=False)
    except ptzip.CheckpointError as e:
        return [Finding("container", name, f"not readable as a torch 1.13 checkpoint: {e}")]
    out: list[Finding] = []
    with ck:
        corrupt = [r.name for r in ck.records if crc32(ck.read_record(r)) != r.crc]
        if corrupt:
            out.append(
                Finding(
                    "corrupt",
                    name,
                    f"CRC mismatch in {', '.join(corrupt[:3])}: the bytes changed after "
                    "the file was written (a disk, copy or download fault)",
                    {"records": corrupt},
                )
            )
        records = ck.record_names()
        extra = [r for r in records if r not in ("data.pkl", "version") and not r.startswith("data/")]
        if "byteorder" in extra:
            out.append(
                Finding(
                    "container",
                    name,
                    "has a `byteorder` record, which torch >= 2.1 writes: saved by a "
                    "newer torch than 1.13 (the published hashes assume 1.13.x)",
                    {"records": extra},
                )
            )
        elif extra:
            out.append(Finding("container", name, f"has records torch 1.13 does not write: {extra}"))
        if ck.prefix != ptzip.archive_name(name):
            out.append(
                Finding(
                    "container",
                    name,
                    f"its archive folder is {ck.prefix!r}: it was saved under another "
                    "file name and renamed (torch names the folder after the file)",
                )
            )
        if expected_tensors is None:
            return out
        found = tensor_hashes(path, verify_crc=False)
    want = {t["name"]: t for t in expected_tensors}
    got = {t["name"]: t for t in found}
    if set(want) != set(got):
        out.append(
            Finding(
                "structure",
                name,
                f"tensor names differ: missing {sorted(set(want) - set(got))[:5]}, "
                f"extra {sorted(set(got) - set(want))[:5]}",
            )
        )
        return out
    shapes = [n for n in want if (want[n]["shape"], want[n]["dtype"]) != (got[n]["shape"], got[n]["dtype"])]
    for n in shapes:
        out.append(
            Finding(
                "structure",
                name,
                f"{n} is {got[n]['dtype']}{got[n]['shape']}, expected "
                f"{want[n]['dtype']}{want[n]['shape']}" + _shape_hint(n, got[n]["shape"], want[n]["shape"]),
                {"tensor": n},
            )
        )
    values = [n for n in want if n not in shapes and want[n]["sha256"] != got[n]["sha256"]]
    if values:
        out.append(
            Finding(
                "numeric",
                name,
                f"{len(values)} tensor(s) hold other values: {', '.join(values[:4])}"
                + ("..." if len(values) > 4 else ""),
                {"tensors": values},
            )
        )
    elif not shapes:
        if [t["name"] for t in expected_tensors] != [t["name"] for t in found]:
            out.append(
                Finding(
                    "container",
                    name,
                    "same tensors, in another key order (as the regular merge script "
                    "writes, or the low-memory script with 10+ base shards)",
                )
            )
        elif not out:
            out.append(
                Finding(
                    "container",
                    name,
                    "same tensors in the same order, but other container bytes (pickle "
                    "or zip layout): written by another torch version than 1.13",
                )
            )
    return out


# Embedding tensors whose first axis is the whole vocabulary in every file that holds them (pth shards
# split tok_embeddings along its width, output.weight along the vocabulary: that one is left out).
_VOCAB_ROWS = ("tok_embeddings.weight", "model.embed_tokens.weight", "lm_head.weight")


def vocab_findings(path: Path, vocab: int) -> list[Finding]:
    """Without a manifest of the expected file: do its embeddings have the target's vocabulary? Read
    from the tensors' metadata alone."""
    try:
        with ptzip.Checkpoint(path, verify_crc=False) as ck:
            shapes = {n: list(ck.tensors[n].shape) for n in _VOCAB_ROWS if n in ck.tensors}
    except ptzip.CheckpointError:
        return []  # container_findings names an unreadable file
    return [
        Finding(
            "structure",
            path.name,
            f"{n} is {shape}" + _shape_hint(n, shape, [vocab, *shape[1:]]),
            {"tensor": n, "rows": shape[0], "expected_rows": vocab},
        )
        for n, shape in shapes.items()
        if shape[0] != vocab
    ]


def _shape_hint(name: str, got: list[int], want: list[int]) -> str:
    if ("embed" in name or "output" in name or "lm_head" in name) and got[1:] == want[1:]:
        return (
            f": {got[0]} vocabulary rows instead of {want[0]}, the vocabulary of another adapter or tokenizer"
            " "
            "(LLaMA 49953 vs Alpaca 49954): wrong adapter order, or a swapped tokenizer"
        )
    return ""


Rebuild = Callable[[str, Path], Path]  # (order, scratch folder) -> a folder holding the rebuilt outputs


def order_findings(
    folder: Path, mismatched: list[FileCheck], rebuild: Rebuild, scratch: Path, orders: tuple[str, ...]
) -> list[Finding]:
    """Rebuild with each arithmetic order; say which reproduces the expected bytes, and measure how far
    the found file is from them (elements, ulps)."""
    out: list[Finding] = []
    builds = {order: rebuild(order, scratch / order) for order in orders}
    for fc in mismatched:
        match = [
            o
            for o, d in builds.items()
            if (d / fc.file).is_file() and sha256_file(d / fc.file) == fc.expected
        ]
        made = [
            o for o, d in builds.items() if (d / fc.file).is_file() and sha256_file(d / fc.file) == fc.found
        ]
        data: dict[str, object] = {"reproduces_expected": match, "reproduces_found": made}
        if match:
            detail = f"the expected bytes are what the `{match[0]}` arithmetic order gives"
            if made:
                detail += f"; this file is what the `{made[0]}` order gives (another BLAS/CPU path)"
            if is_checkpoint(fc.file):
                detail += "; " + _distance(folder / fc.file, builds[match[0]] / fc.file, data)
            out.append(Finding("arithmetic-order", fc.file, detail, data))
        else:
            detail = (
                f"no arithmetic order ({', '.join(orders)}) reproduces the expected bytes from these inputs"
            )
            if made:
                detail += f"; this file is what the `{made[0]}` order gives"
            out.append(Finding("arithmetic-order", fc.file, detail, data))
    return out


def _distance(found: Path, expected: Path, data: dict[str, object]) -> str:
    """Per-tensor element and ulp counts between two checkpoints of one structure."""
    parts, worst = [], 0
    try:
        with ptzip.Checkpoint(found, verify_crc=False) as a, ptzip.Checkpoint(expected) as b:
            for name, meta in b.tensors.items():
                if (
                    name not in a.tensors
                    or a.tensors[name].shape != meta.shape
                    or a.tensors[name].dtype != meta.dtype
                ):
                    continue
                x, y = np.ascontiguousarray(a.tensor(name)), np.ascontiguousarray(b.tensor(name))
                if meta.dtype.itemsize in (2, 4) and not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                    n, ulps = ulp_diff(x, y)
                    worst = max(worst, ulps)
                    parts.append({"tensor": name, "elements": n, "of": int(x.size), "max_ulps": ulps})
    except ptzip.CheckpointError as e:
        return f"not comparable ({e})"
    data["tensors"] = parts
    if not parts:
        return "its tensors equal the expected ones: the difference is in the container"
    shown = ", ".join(
        f"{p['tensor']}: {p['elements']} of {p['of']} elements, up to {p['max_ulps']} ulp" for p in parts[:3]
    )
    return f"{len(parts)} tensor(s) differ ({shown}{', ...' if len(parts) > 3 else ''})"


def diagnose(
    folder: Path,
    checks: list[FileCheck],
    table: Table,
    golden: dict | None = None,
    rebuild: Rebuild | None = None,
    scratch: Path | None = None,
    orders: tuple[str, ...] = ("seq", "fma", "host"),
    vocab: int | None = None,
) -> list[Finding]:
    """Every finding for the files that failed the gate (``vocab``: the target's vocabulary, checked
    where no manifest of the expected files is at hand)."""
    bad = [c for c in checks if c.status in ("mismatch", "missing")]
    out: list[Finding] = []
    for c in bad:
        if c.status == "missing":
            out.append(Finding("missing", c.file, "not written"))
            continue
        others = table.identify(c.found or "")
        if others:
            out.append(
                Finding(
                    "inputs",
                    c.file,
                    "its hash is that of "
                    + "; ".join(r.describe() for r in others[:3])
                    + ": built from other inputs, or another target's file",
                )
            )
        if is_checkpoint(c.file):
            expected_tensors = None
            if golden is not None:
                expected_tensors = golden["files"].get(c.file, {}).get("tensors")  # type: ignore[union-attr]
            out += container_findings(folder / c.file, expected_tensors)
            if expected_tensors is None and vocab is not None:
                out += vocab_findings(folder / c.file, vocab)
    numeric = any(f.category == "numeric" for f in out) or (
        golden is None and any(is_checkpoint(c.file) for c in bad)
    )
    if rebuild is not None and scratch is not None and numeric:
        out += order_findings(folder, [c for c in bad if c.status == "mismatch"], rebuild, scratch, orders)
    unknown = "differs, and no cause was found"
    if golden is None:
        unknown += (
            "; with no per-tensor manifest of the expected file, only its container was checked "
            "(give the inputs to rebuild it with every arithmetic order)"
        )
    for c in bad:  # every differing file gets a finding, also where no cause is visible from it alone
        if not any(f.file == c.file for f in out):
            out.append(Finding("unknown", c.file, unknown))
    return out


def report(findings: list[Finding]) -> str:
    return "\n".join(f"  [{f.category}] {f.file}: {f.detail}" for f in findings)


def as_json(findings: list[Finding]) -> list[dict[str, object]]:
    return [asdict(f) for f in findings]
