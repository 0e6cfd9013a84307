"""The LoRA merge arithmetic, with the order of the fp32 sum as an explicit, named choice.

The upstream script computes ``w16 += (B.float() @ A.float()) * (alpha / r)``: an fp32 matrix product,
scaled, added to the fp16 weight in fp32 and rounded to fp16. Which bytes come out depends on how the
BLAS sums the r products: MKL's generic path (an AMD host's default) sums k = 0..r-1 in order with
each product rounded to fp32 (``seq``); its AVX2 and AVX-512 kernels, which an Intel host gets, mostly
use fused multiply-adds (``fma``). Both orders are computed here exactly, the same way on any CPU;
``host`` is a plain matmul through torch, i.e. whatever the local BLAS does, for diagnosis.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

from repro_merge.floats import round_to, to_float32

ORDERS = ("seq", "fma", "host")
DEFAULT_ORDER = "seq"
_ROWS = 64  # rows per block: a block of the fp32 product (64 x 4096 x 4 B = 1 MiB) stays in cache


def threads() -> int:
    """Worker threads for the blocked loops (results do not depend on it)."""
    return max(1, int(os.environ.get("REPRO_MERGE_THREADS", os.cpu_count() or 1)))


@numba.njit(nogil=True, cache=True)
def _seq_kernel(b: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out = sum over k in order of fl(b[:, k] * a[k]), each product and each sum rounded to fp32.

    Compiled without fast-math, so LLVM neither fuses a multiply with an add nor reorders the sum:
    vectorising over j keeps each element's operations those of the scalar loop, on any CPU.
    """
    for i in range(b.shape[0]):
        row = out[i]
        bi = b[i, 0]
        for j in range(a.shape[1]):
            row[j] = bi * a[0, j]
        for k in range(1, b.shape[1]):
            bi = b[i, k]
            for j in range(a.shape[1]):
                row[j] = row[j] + bi * a[k, j]


def _seq_block(b: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    _seq_kernel(np.ascontiguousarray(b), a, out)


def _fma_block(b: np.ndarray, a: np.ndarray, out: np.ndarray) -> None:
    """out = fma(b[:, k], a[k], acc) for k in order, each with a single rounding to fp32.

    fp32 products are exact in fp64; the fp64 sum with its rounding error (TwoSum) gives the sum rounded
    to odd, which rounds to fp32 exactly as one correctly rounded fma would (53 >= 2 * 24 + 2 bits).
    """
    b64, a64 = b.astype(np.float64), a.astype(np.float64)
    acc = (b64[:, :1] * a64[:1]).astype(np.float32)
    for k in range(1, b.shape[1]):
        p = b64[:, k : k + 1] * a64[k : k + 1]
        c = acc.astype(np.float64)
        s = p + c
        bb = s - p
        err = (p - (s - bb)) + (c - bb)
        bits = s.view(np.int64)
        fix = (err != 0) & ((bits & 1) == 0)
        step = np.where((err > 0) == (s > 0), 1, -1)
        bits += np.where(fix, step, 0)
        acc = s.astype(np.float32)
    out[...] = acc


def _blocked(
    kernel: Callable[[np.ndarray, np.ndarray, np.ndarray], None],
    b: np.ndarray,
    a: np.ndarray,
    finish: Callable[[slice, np.ndarray], None],
) -> None:
    """Run ``kernel`` on row blocks of the product in a thread pool; ``finish(rows, block)`` consumes each
    block (numpy releases the GIL, and blocks are independent, so threads change no result)."""

    def one(start: int) -> None:
        rows = slice(start, min(start + _ROWS, b.shape[0]))
        block = np.empty((rows.stop - rows.start, a.shape[1]), np.float32)
        kernel(b[rows], a, block)
        finish(rows, block)

    starts = range(0, b.shape[0], _ROWS)
    n = threads()
    if n == 1:
        for s in starts:
            one(s)
    else:
        # each worker runs torch's elementwise kernels on its block alone: no nested OpenMP teams
        with ThreadPoolExecutor(n, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(one, starts))


def _torch_view(x: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A torch tensor over the same memory (bf16 arrives as uint16 bits; read-only arrays are fine:
    nothing writes to them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about non-writable numpy arrays
        t = torch.from_numpy(x)
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def add_lora(
    w: np.ndarray,
    dtype_name: str,
    b: np.ndarray,
    a: np.ndarray,
    scale: float,
    fan_in_fan_out: bool,
    order: str = DEFAULT_ORDER,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``w += transpose(B.float() @ A.float()) * scale`` as torch does it in place: the sum in fp32 (scale
    rounded to fp32, as torch's CPU kernels take a Python float), one rounding back to w's dtype.

    ``b`` and ``a`` are already fp32. Returns the result, of w's dtype, in ``out`` if given (which may be
    ``w`` itself: each block of rows is read before it is written) or in a new array. The conversions to
    and from the weight's dtype go through torch's elementwise kernels (vectorised, round to nearest
    even, the same on any CPU); only the product's summation order needs code of our own.
    """
    s32 = np.float32(scale)
    if order == "host" or fan_in_fan_out:
        prod = _host(b, a) if order == "host" else _full(b, a, order)
        delta = (prod.T if fan_in_fan_out else prod) * s32
        delta += to_float32(w, dtype_name)
        return round_to(delta, dtype_name)
    out = np.empty(w.shape, w.dtype) if out is None else out
    tw, tout = _torch_view(w, dtype_name), _torch_view(out, dtype_name)
    kernel = _seq_block if order == "seq" else _fma_block

    def finish(rows: slice, block: np.ndarray) -> None:
        tb = torch.from_numpy(block)
        tb.mul_(float(s32))
        tb.add_(tw[rows])
        tout[rows].copy_(tb)

    _blocked(kernel, b, a, finish)
    return out


def _full(b: np.ndarray, a: np.ndarray, order: str) -> np.ndarray:
    prod = np.empty((b.shape[0], a.shape[1]), np.float32)

    def keep(rows: slice, block: np.ndarray) -> None:
        prod[rows] = block

    _blocked(_seq_block if order == "seq" else _fma_block, b, a, keep)
    return prod


def _host(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    return (torch.from_numpy(np.ascontiguousarray(b)) @ torch.from_numpy(np.ascontiguousarray(a))).numpy()
