"""ptzip against the real torch 1.13.1: our bytes equal torch.save's, our reader sees what torch.load sees."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from repro_merge import ptzip
from repro_merge.checksums import sha256_file

TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int64": torch.int64,
    "bool": torch.bool,
    "int8": torch.int8,
    "float64": torch.float64,
}


# ------------------------------------------------------------------------------------------ strategies


@st.composite
def base_tensor(draw: st.DrawFn) -> torch.Tensor:
    dtype = TORCH_DTYPES[draw(st.sampled_from(sorted(TORCH_DTYPES)))]
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    n = int(np.prod(shape)) if shape else 1
    seed = draw(st.integers(0, 2**32 - 1))
    raw = np.random.default_rng(seed).integers(
        0, 256, size=n * torch.tensor([], dtype=dtype).element_size(), dtype=np.uint8
    )
    t = torch.from_numpy(raw.copy()).view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        t = torch.from_numpy(raw % 2 == 1).reshape(shape)
    return t


@st.composite
def view_of(draw: st.DrawFn, base: torch.Tensor) -> torch.Tensor:
    """The base itself or a non-contiguous / offset view of it."""
    kind = draw(st.sampled_from(["same", "transpose", "slice", "row"]))
    if kind == "transpose" and base.dim() >= 2:
        return base.transpose(0, 1)
    if kind == "slice" and base.dim() >= 1 and base.shape[0] > 1:
        return base[1:]
    if kind == "row" and base.dim() >= 1 and base.shape[0] > 0:
        return base[base.shape[0] - 1]
    return base


# "storage" and "cpu" are left out: torch's pickler memoizes strings by object identity, so a key that
# is the very interned str torch pickles in every persistent id gets a memo reference instead of its
# text. Names read from a file are fresh objects (see the "".join below) and never hit this.
names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), max_codepoint=0x2FFFF), min_size=1, max_size=300
).filter(lambda s: s not in ("storage", "cpu"))


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    keys = draw(st.lists(names, min_size=1, max_size=200, unique=True))
    bases = draw(st.lists(base_tensor(), min_size=1, max_size=min(len(keys), 30)))
    d = {}
    for k in keys:
        base = bases[draw(st.integers(0, len(bases) - 1))]
        d["".join(k)] = draw(view_of(base))  # "".join: a fresh str object, as names read from a file are
    return d


file_names = st.sampled_from(
    [
        "consolidated.00.pth",
        "pytorch_model-00001-of-00002.bin",
        "adapter_model.bin",
        "noext",
        "a.b.c.pth",
        "模型.bin",
        "x" * 200 + ".pth",
    ]
)


def ours_from_torch(path: Path, d: dict[str, torch.Tensor], archive: str | None = None) -> None:
    """Write ``d`` with ptzip, describing each tensor (and the storage it views) as torch sees it."""
    storages: dict[int, torch.Tensor] = {}
    entries = []
    by_tensor: dict[int, ptzip.TensorSpec] = {}
    for name, t in d.items():
        if id(t) in by_tensor:
            entries.append((name, by_tensor[id(t)]))
            continue
        st_ = t.storage()
        key = st_._storage._cdata  # the storage identity torch.save keys on
        storages.setdefault(key, torch.tensor([], dtype=t.dtype).set_(st_))
        spec = ptzip.TensorSpec(
            ptzip.DTYPES[str(t.dtype).removeprefix("torch.")],
            tuple(t.shape),
            key,
            st_.size(),
            tuple(t.stride()),
            t.storage_offset(),
        )
        by_tensor[id(t)] = spec
        entries.append((name, spec))

    def fill(key: object) -> np.ndarray:
        flat = storages[key]  # type: ignore[index]
        return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)

    ptzip.save(path, entries, fill, archive)


# ------------------------------------------------------------------------------------------ writer


@given(d=state_dicts(), name=file_names)
def test_bytes_equal_torch_save(tmp_path_factory: pytest.TempPathFactory, d: dict, name: str) -> None:
    tmp = tmp_path_factory.mktemp("eq")
    (tmp / "torch").mkdir()
    (tmp / "ours").mkdir()
    torch.save(d, tmp / "torch" / name)
    ours_from_torch(tmp / "ours" / name, d)
    assert (tmp / "ours" / name).read_bytes() == (tmp / "torch" / name).read_bytes()


def test_bytes_equal_torch_save_at_the_far_end(tmp_path: Path) -> None:
    """What 50 random examples rarely reach: 201 keys over 121 storages (their string sort past 10 and
    100), every dtype, views and shared storages, 300-character and non-ASCII names, a record > 1 MB."""
    rng = np.random.default_rng(7)
    dtypes = sorted(TORCH_DTYPES)
    bases = []
    for i in range(120):
        dtype = TORCH_DTYPES[dtypes[i % len(dtypes)]]
        shape = tuple(int(x) for x in rng.integers(1, 5, size=i % 3 + 1))
        bases.append(torch.from_numpy(rng.integers(0, 2, size=shape).astype(np.int8)).to(dtype))
    d = {}
    for k in range(200):
        b = bases[k % 120]
        view = b.transpose(0, 1) if b.dim() >= 2 and k % 4 == 1 else b[1:] if k % 4 == 2 and len(b) > 1 else b
        name = ("层" * (k % 7) + f"layers.{k}.w" + "x" * (300 if k % 50 == 0 else 0))[:300]
        d[name] = view
    d["big"] = torch.arange(600_000, dtype=torch.float32)  # 2.4 MB: a record pushed to disk on its own
    assert len({t.storage().data_ptr() for t in d.values()}) == 121
    (tmp_path / "torch").mkdir()
    for name in ("consolidated.00.pth", "模型.bin"):
        torch.save(d, tmp_path / "torch" / name)
        ours_from_torch(tmp_path / name, d)
        assert (tmp_path / name).read_bytes() == (tmp_path / "torch" / name).read_bytes()


@pytest.mark.parametrize("n", [1, 2, 11, 999, 1000, 1001, 2000])
def test_dict_batches_like_the_c_pickler(tmp_path: Path, n: int) -> None:
    d = {f"k{i}": torch.tensor([i], dtype=torch.int16) for i in range(n)}
    torch.save(d, tmp_path / "t.pth")
    ptzip.save_arrays(tmp_path / "o.pth", [(k, v.numpy()) for k, v in d.items()], archive="t.pth")
    assert (tmp_path / "o.pth").read_bytes() == (tmp_path / "t.pth").read_bytes()


def test_same_tensor_under_two_names(tmp_path: Path) -> None:
    t = torch.arange(4, dtype=torch.float16)
    d = {"a": t, "b": torch.ones(2), "c": t}
    torch.save(d, tmp_path / "t.pth")
    ours_from_torch(tmp_path / "o.pth", d, archive="t.pth")
    assert (tmp_path / "o.pth").read_bytes() == (tmp_path / "t.pth").read_bytes()


def test_large_ints_in_pickle(tmp_path: Path) -> None:
    """Storage sizes and offsets past 2**31 are pickled as LONG1, as the C pickler does."""
    meta = ptzip.TensorMeta(ptzip.DTYPES["int8"], (3,), (1,), 2**33, "0", 2**33 + 3)
    raw = ptzip.pickle_state_dict([("w", meta)])
    assert pickle.loads.__module__  # the stdlib reads it back to the same numbers:
    seen = []

    class P(pickle.Unpickler):
        def find_class(self, m: str, n: str) -> object:
            return lambda *a: seen.append(a) or a

        def persistent_load(self, pid: object) -> object:
            seen.append(pid)
            return pid

    import io

    P(io.BytesIO(raw)).load()
    assert seen[0][4] == 2**33 + 3 and seen[-1][1] == 2**33


def test_archive_name_from_final_name(tmp_path: Path) -> None:
    """A file written under a temporary name gets the bytes of its final name."""
    d = {"w": torch.ones(3, dtype=torch.float16)}
    torch.save(d, tmp_path / "consolidated.00.pth")
    ptzip.save_arrays(tmp_path / ".tmp-123", [("w", d["w"].numpy())], archive="consolidated.00.pth")
    assert (tmp_path / ".tmp-123").read_bytes() == (tmp_path / "consolidated.00.pth").read_bytes()


def test_failed_save_leaves_no_file(tmp_path: Path) -> None:
    arrays = [("a", np.ones(4, np.float16)), ("b", np.ones(4, np.float16))]
    entries = [(n, ptzip.spec_of(a)) for n, a in arrays]

    def fill(token: object) -> np.ndarray:
        if token is entries[1][1].storage:
            raise RuntimeError("the producer of the second tensor failed")
        return arrays[0][1]

    with pytest.raises(RuntimeError):
        ptzip.save(tmp_path / "x.pth", entries, fill)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fails", ["make", "write"])
def test_overlapped_save_failure_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """A failure in the producer or in the background write: the exception reaches the caller after the
    write thread stopped, and the partial file is gone."""
    arrays = [(f"t{i}", np.full(1000, i, np.float32)) for i in range(6)]
    entries = [(n, ptzip.spec_of(a)) for n, a in arrays]
    data = {spec.storage: a for (_, spec), (_, a) in zip(entries, arrays, strict=True)}
    real = ptzip.StreamWriter.write

    def write(self: ptzip.StreamWriter, token: object, buf: np.ndarray) -> None:
        if fails == "write" and token is entries[3][1].storage:
            raise OSError(28, "No space left on device")
        real(self, token, buf)

    def fill(token: object, slot: int) -> np.ndarray:
        if fails == "make" and token is entries[4][1].storage:
            raise RuntimeError("the producer failed")
        return data[token]

    monkeypatch.setattr(ptzip.StreamWriter, "write", write)
    with pytest.raises(OSError if fails == "write" else RuntimeError):
        ptzip.save(tmp_path / "x.pth", entries, fill, overlap=True)
    assert list(tmp_path.iterdir()) == []


def test_overlapped_keeps_order_and_frees_each_slot_before_reuse() -> None:
    import threading

    events: list[tuple[str, int, int]] = []
    main, second_made = threading.get_ident(), threading.Event()

    def make(n: int, slot: int) -> int:
        assert threading.get_ident() == main
        events.append(("make", n, slot))
        if n == 1:
            second_made.set()
        return n

    def write(n: int, data: int) -> None:
        assert threading.get_ident() != main and data == n
        if n == 0:  # the next tensor is made while this one is being written
            assert second_made.wait(30)
        events.append(("write", n, -1))

    ptzip.overlapped(list(range(8)), make, write)
    assert [n for kind, n, _ in events if kind == "write"] == list(range(8))
    assert [slot for kind, _, slot in events if kind == "make"] == [0, 1] * 4
    for n in range(2, 8):  # the slot's previous data was written before it is made again
        assert events.index(("write", n - 2, -1)) < events.index(("make", n, n % 2))


def test_refuses_empty_archive_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="invalid file name"):
        ptzip.save_arrays(tmp_path / ".hidden", [("w", np.zeros(1, np.float16))])


# ------------------------------------------------------------------------------------------ reader


@given(d=state_dicts(), name=file_names)
def test_reader_sees_what_torch_load_sees(
    tmp_path_factory: pytest.TempPathFactory, d: dict, name: str
) -> None:
    path = tmp_path_factory.mktemp("rd") / name
    torch.save(d, path)
    loaded = torch.load(path)
    with ptzip.Checkpoint(path) as ck:
        assert list(ck.tensors) == list(loaded)
        assert ck.prefix == ptzip.archive_name(name)
        for k, t in loaded.items():
            meta = ck.tensors[k]
            assert (meta.shape, meta.stride, meta.offset) == (tuple(t.shape), t.stride(), t.storage_offset())
            assert meta.dtype.name == str(t.dtype).removeprefix("torch.")
            got = ck.tensor(k)
            want = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            assert got.shape == want.shape and got.tobytes() == np.ascontiguousarray(want).tobytes()
        # tensors sharing a storage in torch share a key here
        groups: dict[int, set[str]] = {}
        for k, t in loaded.items():
            groups.setdefault(t.storage()._storage._cdata, set()).add(k)
        shared = {frozenset(v) for v in ck.shared_storages().values()}
        assert shared == {frozenset(g) for g in groups.values() if len(g) > 1}


def test_views_come_back_as_views(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"base": base, "t": base.t(), "row": base[2]}, tmp_path / "v.pth")
    with ptzip.Checkpoint(tmp_path / "v.pth") as ck:
        (key,) = ck.shared_storages()
        storage = ck.read_storage(key)
        views = {k: ck.tensors[k].view(storage) for k in ck.tensors}
        assert all(np.shares_memory(v, storage) for v in views.values())
        np.testing.assert_array_equal(views["t"], base.t().numpy())
        np.testing.assert_array_equal(views["row"], base[2].numpy())


def test_reads_ordered_dict_and_parameters(tmp_path: Path) -> None:
    m = torch.nn.Linear(3, 2)
    torch.save(m.state_dict(), tmp_path / "sd.pth")
    torch.save({"p": m.weight}, tmp_path / "param.pth")
    with ptzip.Checkpoint(tmp_path / "sd.pth") as ck:
        assert list(ck.tensors) == ["weight", "bias"]
    with ptzip.Checkpoint(tmp_path / "param.pth") as ck:
        np.testing.assert_array_equal(ck.tensor("p"), m.weight.detach().numpy())


# ------------------------------------------------------------------------------------------ hostile input


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.target}",))


def _zip_with_pickle(path: Path, pkl: bytes) -> None:
    """A well-formed torch zip whose data.pkl is ``pkl``."""
    with open(path, "wb") as f:
        z = ptzip._ZipWriter(f, "evil")
        z.record("data.pkl", [pkl], len(pkl))
        z.record("version", [b"3\n"], 2)
        z.finish()


def _payloads(target: Path) -> dict[str, bytes]:
    cmd = f"touch {target}".encode()
    expr = b"__import__('os').system('" + cmd + b"')"
    return {
        "reduce-os-system": pickle.dumps({"w": _Payload(target)}, protocol=2),
        "protocol-4-stack-global": pickle.dumps({"w": _Payload(target)}, protocol=4),
        "builtins-eval": b"\x80\x02cbuiltins\neval\nX" + struct.pack("<I", len(expr)) + expr + b"\x85R.",
        "exec-via-inst": b"(S'" + b'import os; os.system("' + cmd + b'")' + b"'\nibuiltins\nexec\n.",
        "ordered-dict-then-os": b"\x80\x02ccollections\nOrderedDict\n)Rcposix\nsystem\nX"
        + struct.pack("<I", len(cmd))
        + cmd
        + b"\x85R.",
    }


@pytest.mark.parametrize("kind", list(_payloads(Path("/x"))))
def test_pickle_payload_is_never_executed(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _zip_with_pickle(path, _payloads(target)[kind])
    with pytest.raises(ptzip.CheckpointError) as e:
        ptzip.Checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert not target.exists()


def test_payload_really_would_run(tmp_path: Path) -> None:
    """The planted payload is live: torch.load (weights_only off) does create the file."""
    target = tmp_path / "pwned"
    _zip_with_pickle(tmp_path / "evil.pth", _payloads(target)["reduce-os-system"])
    torch.load(tmp_path / "evil.pth")
    assert target.exists()


def test_refuses_malformed_structures(tmp_path: Path) -> None:
    bad = {
        "not-a-dict": pickle.dumps([1, 2], protocol=2),
        "bad-persistent-id": b"\x80\x02}(X\x01\x00\x00\x00w(X\x04\x00\x00\x00evilK\x01tQu.",
    }
    for kind, pkl in bad.items():
        _zip_with_pickle(tmp_path / f"{kind}.pth", pkl)
        with pytest.raises(ptzip.CheckpointError, match=str(tmp_path)):
            ptzip.Checkpoint(tmp_path / f"{kind}.pth")


def test_refuses_tensor_outside_its_storage(tmp_path: Path) -> None:
    meta = ptzip.TensorMeta(ptzip.DTYPES["float16"], (4,), (1,), 2, "0", 4)
    pkl = ptzip.pickle_state_dict([("w", meta)])
    with open(tmp_path / "x.pth", "wb") as f:
        z = ptzip._ZipWriter(f, "x")
        z.record("data.pkl", [pkl], len(pkl))
        z.record("data/0", [b"\0" * 8], 8)
        z.record("version", [b"3\n"], 2)
        z.finish()
    with pytest.raises(ptzip.CheckpointError, match="outside its storage"):
        ptzip.Checkpoint(tmp_path / "x.pth")


def _one_tensor_pickle() -> bytes:
    """data.pkl of {"w": 4 fp16 elements}, as torch writes it (ends with SETITEM, STOP)."""
    return ptzip.pickle_state_dict([("w", ptzip.TensorMeta(ptzip.DTYPES["float16"], (4,), (1,), 0, "0", 4))])


def _zip_with_tensor(path: Path, pkl: bytes) -> None:
    with open(path, "wb") as f:
        z = ptzip._ZipWriter(f, path.stem)
        z.record("data.pkl", [pkl], len(pkl))
        z.record("data/0", [b"\0" * 8], 8)
        z.record("version", [b"3\n"], 2)
        z.finish()


def test_refuses_build_that_rewrites_a_checked_tensor(tmp_path: Path) -> None:
    """BUILD would set the tensor's stride to 1000 after the bounds check, reading far past its storage."""
    pkl = _one_tensor_pickle()
    assert pkl.endswith(b"s.")
    stride_1000 = b"}X\x06\x00\x00\x00strideM\xe8\x03\x85sb"
    _zip_with_tensor(tmp_path / "x.pth", pkl[:-2] + stride_1000 + b"s.")
    with pytest.raises(ptzip.CheckpointError, match="refused BUILD on TensorMeta"):
        ptzip.Checkpoint(tmp_path / "x.pth")


def test_refuses_build_on_a_shared_dtype(tmp_path: Path) -> None:
    """BUILD on torch.HalfStorage would change the process-wide DType every later file is written with."""
    pkl = _one_tensor_pickle()
    itemsize_1 = b"ctorch\nHalfStorage\n}X\x08\x00\x00\x00itemsizeK\x01sb0"
    _zip_with_tensor(tmp_path / "x.pth", pkl[:2] + itemsize_1 + pkl[2:])
    with pytest.raises(ptzip.CheckpointError, match="refused BUILD on DType"):
        ptzip.Checkpoint(tmp_path / "x.pth")
    assert ptzip.DTYPES["float16"].itemsize == 2
    _zip_with_tensor(tmp_path / "ok.pth", pkl)  # the unmodified stream reads, so the splice is what failed
    with ptzip.Checkpoint(tmp_path / "ok.pth") as ck:
        assert ck.tensors["w"].shape == (4,)


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.pth"
    torch.save({"a": torch.arange(100, dtype=torch.float16), "b": torch.ones(7)}, path)
    return path


def test_every_truncation_is_a_clear_error(good_file: Path, tmp_path: Path) -> None:
    data = good_file.read_bytes()
    for cut in range(0, len(data), 7):
        p = tmp_path / "cut.pth"
        p.write_bytes(data[:cut])
        try:
            with ptzip.Checkpoint(p) as ck:
                for k in ck.tensors:
                    ck.tensor(k)
        except ptzip.CheckpointError as e:
            assert str(p) in str(e)
        else:
            pytest.fail(f"truncation at {cut} of {len(data)} bytes was not noticed")


def test_every_corrupt_directory_byte_is_a_clear_error(good_file: Path, tmp_path: Path) -> None:
    """Each byte of the central directory and end records, flipped: read fine or a one-line error."""
    data = good_file.read_bytes()
    with ptzip.Checkpoint(good_file) as ck:
        cd_start = ck.records[-1].data_offset + ck.records[-1].size
    p = tmp_path / "flipped.pth"
    for i in range(cd_start, len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            p.write_bytes(bytes(bad))
            try:
                with ptzip.Checkpoint(p) as ck:
                    for k in ck.tensors:
                        ck.tensor(k)
            except ptzip.CheckpointError as e:
                assert str(p) in str(e) and "\n" not in str(e)


def test_bad_crc(good_file: Path) -> None:
    data = bytearray(good_file.read_bytes())
    with ptzip.Checkpoint(good_file) as ck:
        rec = ck.storages[ck.tensors["a"].storage][0]
    data[rec.data_offset + 3] ^= 0x40
    good_file.write_bytes(bytes(data))
    with ptzip.Checkpoint(good_file) as ck, pytest.raises(ptzip.CheckpointError, match="CRC mismatch"):
        ck.tensor("a")


def test_missing_record(good_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "missing.pth"
    with zipfile.ZipFile(good_file) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("data/1"):
                dst.writestr(info.filename, src.read(info))
    with pytest.raises(ptzip.CheckpointError, match="missing record data/1"):
        ptzip.Checkpoint(out)


def test_legacy_and_foreign_files(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ptzip.CheckpointError, match="legacy"):
        ptzip.Checkpoint(tmp_path / "legacy.pth")
    (tmp_path / "junk.bin").write_bytes(b"hello world" * 10)
    with pytest.raises(ptzip.CheckpointError, match="not a torch zip"):
        ptzip.Checkpoint(tmp_path / "junk.bin")
    with pytest.raises(ptzip.CheckpointError, match="cannot open"):
        ptzip.Checkpoint(tmp_path / "absent.bin")


# ------------------------------------------------------------------------------------------ ZIP64 encoding


def test_zip64_local_header_for_large_record() -> None:
    name, size = b"big/data/0", 5 << 30
    h = ptzip.local_header(name, 0, size)
    assert len(h) % 64 == 0  # data starts aligned
    (xlen,) = struct.unpack_from("<H", h, 28)
    extra = h[30 + len(name) :]
    assert len(extra) == xlen
    assert struct.unpack_from("<HHQQ", extra) == (1, 16, size, 0)  # ZIP64 extra first (csize not yet known)
    assert extra[20:22] == b"FB"  # ... then the padding
    assert struct.unpack_from("<II", h, 18) == (0, 0)  # sizes live in the descriptor
    assert len(ptzip.data_descriptor(1, size, 0)) == 24


def test_zip64_for_header_past_4gib() -> None:
    name, offset = b"big/data/1", (4 << 30) + 123
    h = ptzip.local_header(name, offset, 10)
    assert (offset + len(h)) % 64 == 0
    assert struct.unpack_from("<HHQ", h, 30 + len(name)) == (1, 8, offset)
    assert len(ptzip.data_descriptor(1, 10, offset)) == 24
    c = ptzip.central_header(name, offset, 10, 7)
    assert struct.unpack_from("<III", c, 16) == (7, 10, 10)
    assert struct.unpack_from("<I", c, 42) == (0xFFFFFFFF,)
    assert struct.unpack_from("<HHQ", c, 46 + len(name)) == (1, 8, offset)


def test_zip64_threshold_is_miniz_s() -> None:
    """miniz switches at 0xFFFFFFFF itself, one byte below 4 GiB."""
    assert len(ptzip.data_descriptor(0, 0xFFFFFFFF, 0)) == 24
    assert len(ptzip.data_descriptor(0, 0xFFFFFFFE, 0)) == 16
    ends = ptzip.end_records(3, 5 << 30, 100)
    assert struct.unpack_from("<I", ends, 56 + 20 + 16) == (0xFFFFFFFF,)


@pytest.mark.slow
def test_over_4gib_file_equals_torch_save(tmp_path: Path) -> None:
    """Real shards are 13 GB: a record over 4 GiB and records whose headers start past 4 GiB."""
    big = torch.zeros((4 << 30) + 100, dtype=torch.int8)
    big[-1] = 7
    small = torch.arange(10, dtype=torch.float16)
    torch.save({"big": big, "small": small}, tmp_path / "t.pth")
    digest_torch = sha256_file(tmp_path / "t.pth")
    big_numel = big.numel()
    del big
    (tmp_path / "t.pth").unlink()

    def fill(token: object) -> np.ndarray | bytes:
        if token == "small":
            return small.numpy()
        out = np.zeros(big_numel, np.int8)  # one tensor in memory at a time, as the merge does
        out[-1] = 7
        return out

    entries = [
        ("big", ptzip.TensorSpec(ptzip.DTYPES["int8"], (big_numel,), "big", big_numel)),
        ("small", ptzip.TensorSpec(ptzip.DTYPES["float16"], (10,), "small", 10)),
    ]
    ptzip.save(tmp_path / "t.pth", entries, fill)
    assert sha256_file(tmp_path / "t.pth") == digest_torch
    with ptzip.Checkpoint(tmp_path / "t.pth") as ck:
        np.testing.assert_array_equal(ck.tensor("small"), small.numpy())
        assert ck.tensors["big"].shape == (big_numel,)
