"""Float conversions on numpy arrays exactly as torch does them: round to nearest even, bf16 as bits.

numpy has no bfloat16, so bf16 arrays travel as their uint16 bit patterns.
"""

from __future__ import annotations

import numpy as np


def to_float32(x: np.ndarray, dtype_name: str) -> np.ndarray:
    """``tensor.float()``; bf16 arrives as its uint16 bits."""
    if dtype_name == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def round_to(x32: np.ndarray, dtype_name: str) -> np.ndarray:
    """fp32 -> the weight's dtype, round to nearest even (as a torch in-place add's write-back does)."""
    if dtype_name == "bfloat16":
        bits = x32.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(x32), np.uint16(0x7FC0), rounded)  # torch's quiet NaN
    return x32.astype(dtype_name)


def cast(x: np.ndarray, src: str, dst: str) -> np.ndarray:
    """``tensor.to(dst)`` between float types (through fp32, round to nearest even)."""
    if src == dst:
        return x
    x32 = to_float32(x, src)
    return x32 if dst == "float32" else round_to(x32, dst)
