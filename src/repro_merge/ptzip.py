"""torch 1.13.1's checkpoint format: a lazy, weights-only reader and a streaming, byte-identical writer.

``torch.load`` runs arbitrary pickle code from the file and ``torch.save`` needs the whole state dict in
memory. Here the reader parses ``data.pkl`` with an unpickler that only knows how to describe tensors
(nothing from the file is ever called) and reads one storage at a time; the writer emits exactly the
bytes ``torch.save(d, path)`` writes under torch 1.13.1 (pickle protocol 2 as the C pickler writes it,
miniz's zip layout with 64-byte data alignment and ZIP64 structures) while pulling tensor data one
storage at a time. Nothing here imports torch.
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
import pickle
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np

try:  # ISA-L's crc32 is the same function as zlib's, four times faster
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is in the lock; zlib is the portable fallback
    from zlib import crc32

from repro_merge.errors import BadInputError

# ---------------------------------------------------------------------------------------------- dtypes


class _Sealed:
    """Refuses pickle's BUILD opcode. BUILD updates an object's ``__dict__`` directly, past ``frozen``, so
    a crafted data.pkl could otherwise rewrite a tensor's stride after its bounds check, or a DType that
    the whole process shares."""

    def __setstate__(self, state: object) -> None:
        raise _RefusedPickle(f"refused BUILD on {type(self).__name__}: torch never pickles one")


@dataclass(frozen=True)
class DType(_Sealed):
    """A tensor element type: its torch name, storage class name and byte size."""

    name: str  # torch's name without the prefix: float16, bfloat16, ...
    storage: str  # the legacy storage class torch pickles: HalfStorage, ...
    itemsize: int

    @property
    def numpy(self) -> np.dtype:
        """numpy element type; bfloat16 (which numpy lacks) is carried as its raw uint16 bits."""
        return np.dtype("uint16") if self.name == "bfloat16" else np.dtype(self.name)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float16", "HalfStorage", 2),
        DType("bfloat16", "BFloat16Storage", 2),
        DType("float32", "FloatStorage", 4),
        DType("float64", "DoubleStorage", 8),
        DType("int64", "LongStorage", 8),
        DType("int32", "IntStorage", 4),
        DType("int16", "ShortStorage", 2),
        DType("int8", "CharStorage", 1),
        DType("uint8", "ByteStorage", 1),
        DType("bool", "BoolStorage", 1),
    )
}
_BY_STORAGE = {d.storage: d for d in DTYPES.values()}


def dtype_of(array: np.ndarray) -> DType:
    """The DType of a numpy array (bfloat16 cannot come from numpy; pass it explicitly)."""
    return DTYPES[array.dtype.name]


# ---------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class TensorMeta(_Sealed):
    """Everything ``data.pkl`` says about one tensor; its bytes live in storage record ``storage``."""

    dtype: DType
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset, in elements
    storage: str  # storage key (record data/<key>)
    storage_numel: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def is_contiguous(self) -> bool:
        return self.stride == contiguous_stride(self.shape)

    def view(self, storage: np.ndarray) -> np.ndarray:
        """This tensor as a view into its storage's elements (``storage`` is 1-D, of this dtype)."""
        item = storage.itemsize
        return np.lib.stride_tricks.as_strided(
            storage[self.offset :],
            shape=self.shape,
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


@dataclass(frozen=True)
class Record:
    """One zip member: where its data starts in the file, its size and CRC from the central directory."""

    name: str
    header_offset: int
    data_offset: int
    size: int
    crc: int


# ---------------------------------------------------------------------------------------------- reader


class CheckpointError(BadInputError):
    """A checkpoint file that cannot be read safely; the message names the file and what is wrong."""


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"),
} | {("torch", s) for s in _BY_STORAGE}


@dataclass(frozen=True)
class _StorageRef(_Sealed):
    dtype: DType
    key: str
    numel: int


class _RefusedPickle(Exception):
    pass


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, metadata: Any = None
) -> TensorMeta:
    ok = (
        isinstance(storage, _StorageRef)
        and type(offset) is int
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(type(n) is int and n >= 0 for n in size)
        and all(type(s) is int and s >= 0 for s in stride)
        and isinstance(requires_grad, bool)
        and isinstance(hooks, dict)
        and not hooks
    )
    if not ok:
        raise _RefusedPickle("malformed tensor record in data.pkl")
    meta = TensorMeta(storage.dtype, size, stride, offset, storage.key, storage.numel)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if offset < 0 or (meta.numel and last >= storage.numel):  # an empty tensor may sit past its storage
        raise _RefusedPickle(f"tensor of shape {list(size)} reaches outside its storage {storage.key}")
    return meta


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> TensorMeta:
    if not isinstance(data, TensorMeta) or not isinstance(requires_grad, bool) or not isinstance(hooks, dict):
        raise _RefusedPickle("malformed parameter record in data.pkl")
    return data


class _WeightsOnlyUnpickler(pickle.Unpickler):
    """Knows tensors, storages and OrderedDict; every other global is refused, nothing is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _RefusedPickle(f"refused global {module}.{name}: a state dict of tensors never needs it")
        if module == "collections":
            return OrderedDict
        if name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if name == "_rebuild_parameter":
            return _rebuild_parameter
        return _BY_STORAGE[name]  # a DType, recognised by persistent_load below

    def persistent_load(self, pid: Any) -> _StorageRef:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], DType)
            or not isinstance(pid[2], str)
            or not isinstance(pid[3], str)
            or type(pid[4]) is not int
            or pid[4] < 0
        ):
            raise _RefusedPickle(f"refused persistent id {pid!r:.80}")
        return _StorageRef(pid[1], pid[2], pid[4])


def _le(fmt: str, data: bytes, off: int = 0) -> tuple[int, ...]:
    return struct.unpack_from("<" + fmt, data, off)


class Checkpoint:
    """A torch (>= 1.6, zip format) checkpoint opened lazily: metadata now, tensor bytes on demand.

    ``tensors`` maps names to metadata in the file's pickled order; ``storages`` maps each storage key to
    its record. Tensors that share a storage share a key: read it once with :meth:`read_storage` and
    take each tensor's :meth:`TensorMeta.view` of it.
    """

    def __init__(self, path: str | os.PathLike[str], verify_crc: bool = True) -> None:
        self.path = Path(path)
        self.verify_crc = verify_crc
        try:
            self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e.strerror}") from None
        try:
            self.records = self._read_directory()
            by_offset = sorted(self.records, key=lambda r: r.data_offset)
            self._following = {a.name: b for a, b in itertools.pairwise(by_offset)}
            self.prefix, self.tensors = self._read_pickle()
            self.storages = self._storage_records()
        except CheckpointError:
            self.close()
            raise

    # -- public API

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def record_names(self) -> list[str]:
        """Member names in file order, without the archive folder (data.pkl, data/0, ..., version)."""
        return [r.name.split("/", 1)[1] if "/" in r.name else r.name for r in self.records]

    def shared_storages(self) -> dict[str, list[str]]:
        """Storage keys used by more than one tensor, with the tensors that use them."""
        users: dict[str, list[str]] = {}
        for name, meta in self.tensors.items():
            users.setdefault(meta.storage, []).append(name)
        return {k: v for k, v in users.items() if len(v) > 1}

    def read_record(self, rec: Record) -> np.ndarray:
        """A record's bytes (uint8, read-only), CRC-checked.

        The record is memory-mapped on its own: no copy out of the page cache (several times faster
        than reading into fresh memory here), and its pages are unmapped as soon as the caller drops
        the array, so only the tensors in use count towards the process's memory.
        """
        if rec.size == 0:
            return np.zeros(0, dtype=np.uint8)
        start = rec.data_offset - rec.data_offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(
                self._f.fileno(), rec.data_offset + rec.size - start, access=mmap.ACCESS_READ, offset=start
            )
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.path}: cannot map record {rec.name}: {e}") from None
        mm.madvise(mmap.MADV_SEQUENTIAL)
        self._read_ahead(rec)
        buf = np.frombuffer(mm, dtype=np.uint8, count=rec.size, offset=rec.data_offset - start)
        if self.verify_crc and crc32(buf) != rec.crc:
            raise CheckpointError(f"{self.path}: CRC mismatch in record {rec.name}: the file is corrupt")
        return buf

    def _read_ahead(self, rec: Record) -> None:
        """Ask the kernel to start reading the record after ``rec`` in the file: readers here take records
        in file order, so its disk reads overlap this record's CRC, the arithmetic and the writes."""
        nxt = self._following.get(rec.name)
        if nxt is not None and nxt.size and hasattr(os, "posix_fadvise"):  # not on macOS
            os.posix_fadvise(self._f.fileno(), nxt.data_offset, nxt.size, os.POSIX_FADV_WILLNEED)

    def read_storage(self, key: str) -> np.ndarray:
        """One storage's elements as a 1-D array (bfloat16 as uint16 bits)."""
        rec, dtype = self.storages[key]
        return self.read_record(rec).view(dtype.numpy)

    def tensor(self, name: str) -> np.ndarray:
        """One tensor's values (a read-only view into a freshly read copy of its storage)."""
        meta = self.tensors[name]
        return meta.view(self.read_storage(meta.storage))

    def contiguous_bytes(self, name: str) -> bytes:
        """A tensor's elements in row-major order, as ``tensor.contiguous()`` would hold them."""
        return np.ascontiguousarray(self.tensor(name)).tobytes()

    # -- parsing

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def _read_directory(self) -> list[Record]:
        try:
            return self._parse_directory()
        except (struct.error, IndexError, ValueError, OverflowError, OSError) as e:
            # a field that points into the wrong place: short reads, impossible offsets or counts
            raise self._fail(f"corrupt zip directory ({type(e).__name__}: {e})") from None

    def _parse_directory(self) -> list[Record]:
        f = self._f
        size = os.fstat(f.fileno()).st_size
        head = f.read(4)
        if head != b"PK\x03\x04":
            if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
                raise self._fail(
                    "legacy (pre-1.6, non-zip) torch format: not supported, re-save it with torch >= 1.6"
                )
            raise self._fail("not a torch zip checkpoint (no zip header)")
        tail_len = min(size, 22 + 65535 + 20 + 56)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        pos = tail.rfind(b"PK\x05\x06")
        if pos < 0 or pos + 22 > len(tail):
            raise self._fail("truncated or not a zip file: no end-of-central-directory record")
        _, _, _, entries, cd_size, cd_offset, _ = _le("HHHHIIH", tail, pos + 4)
        loc = pos - 20
        if loc >= 0 and tail[loc : loc + 4] == b"PK\x06\x07":
            (eocd64,) = _le("Q", tail, loc + 8)
            f.seek(eocd64)
            rec = f.read(56)
            if len(rec) != 56 or rec[:4] != b"PK\x06\x06":
                raise self._fail("corrupt ZIP64 end-of-central-directory record")
            entries, _, cd_size, cd_offset = _le("QQQQ", rec, 24)
        if cd_offset + cd_size > size:
            raise self._fail("truncated: central directory lies past the end of the file")
        f.seek(cd_offset)
        cd = f.read(cd_size)
        records, p = [], 0
        for _ in range(entries):
            if cd[p : p + 4] != b"PK\x01\x02":
                raise self._fail("corrupt central directory")
            (method, crc, csize, usize, nlen, xlen, clen, hoff) = (
                _le("H", cd, p + 10)[0],
                *_le("IIIHHH", cd, p + 16),
                _le("I", cd, p + 42)[0],
            )
            name = cd[p + 46 : p + 46 + nlen].decode("utf-8", "replace")
            extra = cd[p + 46 + nlen : p + 46 + nlen + xlen]
            usize, csize, hoff = self._zip64_fields(extra, usize, csize, hoff)
            if method != 0 or csize != usize:
                raise self._fail(f"record {name} is compressed; torch checkpoints store records uncompressed")
            f.seek(hoff)
            lh = f.read(30)
            if len(lh) != 30 or lh[:4] != b"PK\x03\x04":
                raise self._fail(f"corrupt local header for record {name}")
            lnlen, lxlen = _le("HH", lh, 26)
            data = hoff + 30 + lnlen + lxlen
            if data + usize > size:
                raise self._fail(f"truncated: record {name} ends past the end of the file")
            records.append(Record(name, hoff, data, usize, crc))
            p += 46 + nlen + xlen + clen
        return records

    def _zip64_fields(self, extra: bytes, usize: int, csize: int, hoff: int) -> tuple[int, int, int]:
        p = 0
        while p + 4 <= len(extra):
            tag, n = _le("HH", extra, p)
            if tag == 1:
                vals = list(_le("Q" * (n // 8), extra, p + 4))
                wanted = (usize == 0xFFFFFFFF) + (csize == 0xFFFFFFFF) + (hoff == 0xFFFFFFFF)
                if len(vals) < wanted:
                    raise self._fail("corrupt ZIP64 extra field: fewer values than the record needs")
                if usize == 0xFFFFFFFF:
                    usize = vals.pop(0)
                if csize == 0xFFFFFFFF:
                    csize = vals.pop(0)
                if hoff == 0xFFFFFFFF:
                    hoff = vals.pop(0)
            p += 4 + n
        return usize, csize, hoff

    def _read_pickle(self) -> tuple[str, dict[str, TensorMeta]]:
        pkl = [r for r in self.records if r.name.endswith("/data.pkl") or r.name == "data.pkl"]
        if len(pkl) != 1:
            raise self._fail("no data.pkl record: not a torch checkpoint")
        prefix = pkl[0].name[: -len("data.pkl")]
        if any(not r.name.startswith(prefix) for r in self.records):
            raise self._fail("records from more than one archive folder")
        try:
            obj = _WeightsOnlyUnpickler(io.BytesIO(self.read_record(pkl[0]).tobytes())).load()
        except _RefusedPickle as e:
            raise self._fail(f"data.pkl: {e}") from None
        except CheckpointError:
            raise
        except Exception as e:  # malformed pickle streams raise many types
            raise self._fail(f"data.pkl: malformed pickle ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, TensorMeta) for k, v in obj.items()
        ):
            raise self._fail("data.pkl is not a flat state dict of named tensors")
        return prefix.rstrip("/"), dict(obj)

    def _storage_records(self) -> dict[str, tuple[Record, DType]]:
        by_name = {r.name: r for r in self.records}
        out: dict[str, tuple[Record, DType]] = {}
        for name, meta in self.tensors.items():
            rec = by_name.get(f"{self.prefix}/data/{meta.storage}")
            if rec is None:
                raise self._fail(f"missing record data/{meta.storage} for tensor {name}")
            if rec.size != meta.storage_numel * meta.dtype.itemsize:
                raise self._fail(
                    f"record data/{meta.storage} holds {rec.size} bytes, tensor {name} needs "
                    f"{meta.storage_numel} x {meta.dtype.itemsize}"
                )
            seen = out.setdefault(meta.storage, (rec, meta.dtype))
            if seen[1] != meta.dtype:
                raise self._fail(
                    f"storage {meta.storage} is read both as {seen[1].name} and {meta.dtype.name}"
                )
        return out


def open_checkpoint(path: str | os.PathLike[str], verify_crc: bool = True) -> Checkpoint:
    return Checkpoint(path, verify_crc)


# ---------------------------------------------------------------------------------------------- pickle


class _Pickle:
    """Writes data.pkl exactly as torch 1.13.1's C pickler (protocol 2) does for a dict of tensors.

    The C pickler memoizes objects by identity. The emitter reproduces which objects are identical in
    torch.save: one string each for "storage" and "cpu", one class object per storage type, one fresh
    key string per storage (``str(int)`` never returns a cached object), and a distinct string per
    tensor name (as names read from a file or built at run time are).
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo: dict[object, int] = {}

    def _put(self, ident: object) -> None:
        i = self.memo[ident] = len(self.memo)
        self.out += b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)

    def _get(self, ident: object) -> bool:
        i = self.memo.get(ident)
        if i is None:
            return False
        self.out += b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)
        return True

    def string(self, s: str, ident: object) -> None:
        if not self._get(ident):
            raw = s.encode("utf-8", "surrogatepass")
            self.out += b"X" + struct.pack("<I", len(raw)) + raw
            self._put(ident)

    def global_(self, module: str, name: str) -> None:
        if not self._get(("global", module, name)):
            self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
            self._put(("global", module, name))

    def int_(self, v: int) -> None:
        if 0 <= v <= 0xFF:
            self.out += b"K" + bytes([v])
        elif 0 <= v <= 0xFFFF:
            self.out += b"M" + struct.pack("<H", v)
        elif -0x80000000 <= v <= 0x7FFFFFFF:
            self.out += b"J" + struct.pack("<i", v)
        else:
            raw = v.to_bytes((v.bit_length() >> 3) + 1, "little", signed=True)
            if v < 0 and len(raw) > 1 and raw[-1] == 0xFF and raw[-2] & 0x80:
                raw = raw[:-1]
            self.out += b"\x8a" + bytes([len(raw)]) + raw

    def int_tuple(self, values: tuple[int, ...], ident: object) -> None:
        if not values:
            self.out += b")"
            return
        if len(values) > 3:
            self.out += b"("
        for v in values:
            self.int_(v)
        self.out += bytes([0x84 + len(values)]) if len(values) <= 3 else b"t"
        self._put(ident)

    def tensor(self, n: int, meta: TensorMeta) -> None:
        """One tensor's REDUCE of _rebuild_tensor_v2 (n: a unique number for memo identities)."""
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"(("
        self.string("storage", "const-storage")
        self.global_("torch", meta.dtype.storage)
        self.string(meta.storage, ("storage-key", meta.storage))
        self.string("cpu", "const-cpu")
        self.int_(meta.storage_numel)
        self.out += b"t"
        self._put(("pid", n))
        self.out += b"Q"
        self.int_(meta.offset)
        self.int_tuple(meta.shape, ("size", n))
        self.int_tuple(meta.stride, ("stride", n))
        self.out += b"\x89"  # requires_grad=False
        self.global_("collections", "OrderedDict")
        self.out += b")R"
        self._put(("hooks", n))
        self.out += b"t"
        self._put(("args", n))
        self.out += b"R"
        self._put(("tensor", n))


def pickle_state_dict(entries: Sequence[tuple[str, TensorMeta]]) -> bytes:
    """data.pkl for a plain dict of tensors, as torch.save writes it.

    An entry whose TensorMeta is the very same object as an earlier one's is pickled as a reference to
    it, as torch does when one tensor object sits under two names.
    """
    p = _Pickle()
    p.out += b"}"
    p._put("dict")
    first: dict[int, int] = {}  # id(meta) -> index of the entry that pickled it
    if len(entries) == 1:  # the C pickler writes a one-item dict with SETITEM, no MARK
        batches: list[range] = [range(1)]
    else:  # batches of 1000, looping while a batch came out full: a multiple of 1000 ends with an empty one
        batches = (
            [range(i, min(i + 1000, len(entries))) for i in range(0, len(entries) + 1, 1000)]
            if entries
            else []
        )
    for batch in batches:
        if len(entries) > 1:
            p.out += b"("
        for i in batch:
            name, meta = entries[i]
            p.string(name, ("name", i))
            if id(meta) in first:
                p._get(("tensor", first[id(meta)]))
            else:
                first[id(meta)] = i
                p.tensor(i, meta)
        p.out += b"u" if len(entries) > 1 else b"s"
    p.out += b"."
    return bytes(p.out)


# ---------------------------------------------------------------------------------------------- zip


_U32_MAX = 0xFFFFFFFF  # miniz switches a record to ZIP64 at this value (>=), not at 2**32
_ALIGN = 64  # torch aligns every record's data to 64 bytes with an "FB" extra field


def archive_name(file_name: str) -> str:
    """The archive folder torch names after the file: basename up to its last dot."""
    base = os.path.basename(file_name)
    dot = base.rfind(".")
    folder = base[:dot] if dot >= 0 else base
    if not folder:
        raise ValueError(f"invalid file name for a torch checkpoint: {file_name!r}")  # torch refuses it too
    return folder


def _zip64_extra(size: int, offset: int, csize: int) -> bytes:
    """The ZIP64 extra field miniz writes: sizes if the record is large, the header offset if far.

    In the local header the compressed size is still 0 (miniz writes it before the data); the central
    directory carries the real one.
    """
    vals = ([size, csize] if size >= _U32_MAX else []) + ([offset] if offset >= _U32_MAX else [])
    if not vals:
        return b""
    return struct.pack("<HH", 1, 8 * len(vals)) + struct.pack(f"<{len(vals)}Q", *vals)


def _flags(size: int) -> int:
    """UTF-8 names; a data descriptor follows the data unless the record is empty (miniz's rule)."""
    return 0x0808 if size else 0x0800


def local_header(name: bytes, offset: int, size: int) -> bytes:
    """Local file header + name + extras, such that the data starts at a multiple of 64."""
    z64 = _zip64_extra(size, offset, csize=0)
    start = offset + 30 + len(name) + len(z64) + 4
    pad = -start % _ALIGN
    extra = z64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return (
        struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, _flags(size), 0, 0, 0, 0, 0, 0, len(name), len(extra))
        + name
        + extra
    )


def data_descriptor(crc: int, size: int, offset: int) -> bytes:
    if not size:
        return b""
    if size >= _U32_MAX or offset >= _U32_MAX:
        return struct.pack("<IIQQ", 0x08074B50, crc, size, size)
    return struct.pack("<IIII", 0x08074B50, crc, size, size)


def central_header(name: bytes, offset: int, size: int, crc: int) -> bytes:
    z64 = _zip64_extra(size, offset, csize=size)
    s32, o32 = min(size, _U32_MAX), min(offset, _U32_MAX)
    return (
        struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            0,
            0,
            _flags(size),
            0,
            0,
            0,
            crc,
            s32,
            s32,
            len(name),
            len(z64),
            0,
            0,
            0,
            0,
            o32,
        )
        + name
        + z64
    )


def end_records(entries: int, cd_offset: int, cd_size: int) -> bytes:
    """ZIP64 end record, its locator, and the classic end record (torch writes all three, always)."""
    eocd64_offset = cd_offset + cd_size
    return (
        struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 798, 45, 0, 0, entries, entries, cd_size, cd_offset)
        + struct.pack("<IIQI", 0x07064B50, 0, eocd64_offset, 1)
        + struct.pack(
            "<IHHHHIIH",
            0x06054B50,
            0,
            0,
            min(entries, 0xFFFF),
            min(entries, 0xFFFF),
            min(cd_size, _U32_MAX),
            min(cd_offset, _U32_MAX),
            0,
        )
    )


_WRITE_BACK_MIN = 1 << 20  # records this large are pushed to disk as soon as they are written


class _ZipWriter:
    """Appends stored records the way torch's PyTorchStreamWriter (miniz) does."""

    def __init__(self, f: BinaryIO, folder: str) -> None:
        self.f, self.folder, self.pos = f, folder, 0
        self.central: list[bytes] = []

    def _write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.pos += len(data)

    def _write_back(self, start: int, length: int) -> None:
        """Start writing a finished record to disk now (POSIX_FADV_DONTNEED starts write-back of its
        dirty pages without waiting for it), so the disk works while the next tensor is made instead
        of in the final fsync."""
        if length < _WRITE_BACK_MIN or not hasattr(os, "posix_fadvise"):  # not on macOS
            return
        self.f.flush()
        try:
            fd = self.f.fileno()
        except (OSError, io.UnsupportedOperation):  # an in-memory file: nothing to write back
            return
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)

    def record(self, name: str, chunks: Iterable[bytes | memoryview], size: int) -> None:
        raw_name = f"{self.folder}/{name}".encode()
        offset = self.pos
        self._write(local_header(raw_name, offset, size))
        crc, written = 0, 0
        for chunk in chunks:
            crc = crc32(chunk, crc)
            written += len(chunk)
            self._write(chunk)
        if written != size:
            raise ValueError(f"record {name}: announced {size} bytes, got {written}")
        self._write_back(offset, self.pos - offset)
        self._write(data_descriptor(crc, size, offset))
        self.central.append(central_header(raw_name, offset, size, crc))

    def finish(self) -> None:
        cd_offset = self.pos
        for entry in self.central:
            self._write(entry)
        self._write(end_records(len(self.central), cd_offset, self.pos - cd_offset))


# ---------------------------------------------------------------------------------------------- writer


@dataclass
class TensorSpec:
    """A tensor to write: its layout, and which storage it lives in (``storage`` any hashable token;
    tensors with equal tokens share one storage record, as views of one base tensor do in torch)."""

    dtype: DType
    shape: tuple[int, ...]
    storage: object
    storage_numel: int
    stride: tuple[int, ...] | None = None  # default: contiguous
    offset: int = 0


Fill = Callable[[object], np.ndarray | bytes | memoryview]


class StreamWriter:
    """torch.save's exact bytes, with storage data pushed one storage at a time.

    ``entries`` (the dict's content, in order) is pickled into data.pkl first; then each storage's
    elements must be given to :meth:`write` in :attr:`order`, torch's record order (storage keys sorted
    as strings: 0, 1, 10, 11, ..., 2). Several writers with the same entry names share that order, which
    lets one computed tensor feed the same position of several files. ``archive`` is the file name
    torch would have been given (default: ``path``'s own), so a file written under a temporary name gets
    its final name's bytes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[tuple[str, TensorSpec]],
        archive: str | None = None,
    ) -> None:
        keys: dict[object, str] = {}
        metas: list[tuple[str, TensorMeta]] = []
        by_spec: dict[int, TensorMeta] = {}
        for name, spec in entries:
            if id(spec) in by_spec:  # the same tensor object under a second name
                metas.append((name, by_spec[id(spec)]))
                continue
            key = keys.setdefault(spec.storage, str(len(keys)))
            stride = spec.stride if spec.stride is not None else contiguous_stride(spec.shape)
            meta = TensorMeta(
                spec.dtype, tuple(spec.shape), tuple(stride), spec.offset, key, spec.storage_numel
            )
            by_spec[id(spec)] = meta
            metas.append((name, meta))
        self._size = {m.storage: m.storage_numel * m.dtype.itemsize for _, m in metas}
        token = {k: t for t, k in keys.items()}
        self.order: list[object] = [token[k] for k in sorted(keys.values())]
        self._next = 0
        self._path, self._complete = Path(path), False
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._zip = _ZipWriter(self._f, archive_name(str(archive if archive is not None else path)))
        pkl = pickle_state_dict(metas)
        self._zip.record("data.pkl", [pkl], len(pkl))
        self._keys = sorted(keys.values())

    def write(self, token: object, data: np.ndarray | bytes | memoryview) -> None:
        """The elements (C order) of the next storage in :attr:`order`, which must be ``token``."""
        if self._next >= len(self.order) or self.order[self._next] != token:
            raise ValueError(f"storage {token!r} written out of order")
        key = self._keys[self._next]
        buf = _byte_view(data)
        if len(buf) != self._size[key]:
            raise ValueError(f"storage {key}: expected {self._size[key]} bytes, got {len(buf)}")
        self._zip.record(f"data/{key}", _chunks(buf), len(buf))
        self._next += 1

    def close(self) -> None:
        """Finish the file (version record, central directory); every storage must have been written."""
        try:
            if self._next != len(self.order):
                raise ValueError(f"{len(self.order) - self._next} storages were never written")
            self._zip.record("version", [b"3\n"], 2)
            self._zip.finish()
            self._complete = True
        finally:
            self._f.close()

    def abort(self) -> None:
        """Stop writing and remove the file unless :meth:`close` completed it (safe to call after it)."""
        self._f.close()
        if not self._complete:
            self._path.unlink(missing_ok=True)


T = TypeVar("T")
D = TypeVar("D")


def overlapped(tokens: Sequence[T], make: Callable[[T, int], D], write: Callable[[T, D], None]) -> None:
    """``write(token, make(token, slot))`` for each token in order, each write in a background thread
    while the next ``make`` runs, so that the disk and the CPU work at once. ``slot`` alternates 0, 1:
    ``make`` is called with a slot only after the write of the data it made with that slot before is
    done, so it may reuse one buffer per slot."""
    with ThreadPoolExecutor(1, thread_name_prefix="ptzip-write") as pool:
        pending: deque[Future[None]] = deque()
        try:
            for n, token in enumerate(tokens):
                if len(pending) == 2:
                    pending.popleft().result()
                pending.append(pool.submit(write, token, make(token, n % 2)))
            while pending:
                pending.popleft().result()
        except BaseException:
            for f in pending:
                f.cancel()  # leaving the pool waits for a write under way, so the caller may then abort
            raise


def save(
    path: str | os.PathLike[str],
    entries: Sequence[tuple[str, TensorSpec]],
    fill: Fill | Callable[[object, int], np.ndarray | bytes | memoryview],
    archive: str | None = None,
    overlap: bool = False,
) -> None:
    """Write a state dict with torch.save's exact bytes; ``fill(token)`` is called once per storage, in
    record order, and returns its elements. See :class:`StreamWriter`. With ``overlap``, each storage is
    written while the next is made: ``fill(token, slot)`` then, as in :func:`overlapped`."""
    w = StreamWriter(path, entries, archive)
    try:
        if overlap:
            overlapped(w.order, fill, w.write)  # type: ignore[arg-type]
        else:
            for token in w.order:
                w.write(token, fill(token))  # type: ignore[call-arg]
    except BaseException:
        w.abort()
        raise
    w.close()


def _byte_view(data: np.ndarray | bytes | memoryview) -> memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    return memoryview(data).cast("B")


def _chunks(buf: memoryview, size: int = 64 << 20) -> Iterator[memoryview]:
    for i in range(0, len(buf), size):
        yield buf[i : i + size]


def spec_of(array: np.ndarray, dtype: DType | None = None) -> TensorSpec:
    """A spec for an array saved as a fresh contiguous tensor with a storage of its own."""
    return TensorSpec(dtype or dtype_of(array), tuple(array.shape), object(), int(array.size))


def save_arrays(
    path: str | os.PathLike[str], items: Iterable[tuple[str, np.ndarray]], archive: str | None = None
) -> None:
    """torch.save of ``{name: torch.from_numpy(array)}`` for arrays held in memory."""
    arrays = list(items)
    entries = [(name, spec_of(a)) for name, a in arrays]
    data = {spec.storage: a for (_, spec), (_, a) in zip(entries, arrays, strict=True)}
    save(path, entries, lambda token: np.ascontiguousarray(data[token]), archive)
