"""Scale and zero point with ONNX arithmetic, numpy QuantizeLinear/DequantizeLinear, expected MSE.

ONNX QuantizeLinear: ``q = saturate(round_half_even(x / scale) + zero_point)`` in float32;
DequantizeLinear: ``(q - zero_point) * scale``. Ranges are widened to include 0 so that 0 is
exactly representable (padding, ReLU zeros). Symmetric int8 uses [-127, 127] with zero point 0,
symmetric uint8 uses zero point 128 (what onnxruntime's and TensorRT's kernels expect).
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np

from ..pass_base import UsageError

QTYPES = {"uint8": (0, 255, np.uint8), "int8": (-128, 127, np.int8),
          "uint16": (0, 65535, np.uint16), "int16": (-32768, 32767, np.int16)}
SYMMETRIC_RANGE = {"int8": (-127, 127), "int16": (-32767, 32767)}
_TINY = float(np.finfo(np.float32).tiny)

ArrayLike = Union[float, np.ndarray]


def qrange(qdtype: str, symmetric: bool = False) -> Tuple[int, int]:
    """(qmin, qmax) of a quantized type; the symmetric signed range drops the most negative value."""
    if qdtype not in QTYPES:
        raise UsageError(f"quantized type '{qdtype}' is not supported (use one of {sorted(QTYPES)})")
    if symmetric and qdtype in SYMMETRIC_RANGE:
        return SYMMETRIC_RANGE[qdtype]
    return QTYPES[qdtype][0], QTYPES[qdtype][1]


def np_qdtype(qdtype: str) -> np.dtype:
    qrange(qdtype)
    return np.dtype(QTYPES[qdtype][2])


def scale_zero_point_array(rmin: ArrayLike, rmax: ArrayLike, qdtype: str = "uint8",
                           symmetric: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Vectorized :func:`scale_zero_point`: float32 scales and int64 zero points."""
    qmin, qmax = qrange(qdtype, symmetric)
    lo = np.minimum(np.asarray(rmin, np.float64), 0.0)
    hi = np.maximum(np.asarray(rmax, np.float64), 0.0)
    if symmetric:
        hi = np.maximum(-lo, hi)
        lo = -hi
    scale64 = (hi - lo) / float(qmax - qmin)
    scale = scale64.astype(np.float32)
    degenerate = ~(scale >= _TINY)  # also catches NaN
    safe = np.where(degenerate, 1.0, scale64)
    if symmetric:
        zp = np.full(lo.shape, np.round((qmin + qmax) / 2.0), np.float64)
    else:
        zp = np.round(qmin - lo / safe)
        zp = np.where(degenerate, float(max(qmin, 0)), zp)
    zp = np.clip(zp, qmin, qmax).astype(np.int64)
    scale = np.where(degenerate, np.float32(1.0), scale).astype(np.float32)
    return scale, zp


def scale_zero_point(rmin: float, rmax: float, qdtype: str = "uint8",
                     symmetric: bool = False) -> Tuple[np.float32, int]:
    """Scale (float32, always > 0) and zero point (int in the type's range) for [rmin, rmax].

    Same arithmetic as onnxruntime's ``compute_scale_zp``: the range is widened to include 0
    (and made ``[-a, a]`` when symmetric), ``scale = (rmax - rmin) / (qmax - qmin)`` and
    ``zero_point = round(qmin - rmin / scale)``; a zero-width range gets scale 1.
    """
    s, z = scale_zero_point_array(rmin, rmax, qdtype, symmetric)
    return np.float32(s), int(z)


def quantize(x: np.ndarray, scale: ArrayLike, zero_point: ArrayLike, qdtype: str = "uint8") -> np.ndarray:
    """ONNX QuantizeLinear (per tensor, or per channel when scale/zero_point broadcast)."""
    qmin, qmax = qrange(qdtype)
    q = np.round(np.asarray(x, np.float32) / np.asarray(scale, np.float32))
    q = q + np.asarray(zero_point, np.float32)
    return np.clip(q, qmin, qmax).astype(np_qdtype(qdtype))


def dequantize(q: np.ndarray, scale: ArrayLike, zero_point: ArrayLike) -> np.ndarray:
    """ONNX DequantizeLinear."""
    return ((q.astype(np.int32) - np.asarray(zero_point, np.int32)).astype(np.float32)
            * np.asarray(scale, np.float32))


def fake_quantize(x: np.ndarray, rmin: float, rmax: float, qdtype: str = "uint8",
                  symmetric: bool = False) -> np.ndarray:
    """Quantize then dequantize ``x`` with the parameters of [rmin, rmax]."""
    s, z = scale_zero_point(rmin, rmax, qdtype, symmetric)
    return dequantize(quantize(x, s, z, qdtype), s, z)


# ---------------------------------------------------------------------------- expected error
def _cube(x: np.ndarray) -> np.ndarray:
    return x * x * x  # numpy's power() has no fast path for 3


def _sawtooth_integral(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Integral from 0 to x of (u - s*round(u/s))^2 du (rounding error squared on the grid s*Z)."""
    n = np.floor(x / s + 0.5)
    return n * (_cube(s) / 12.0) + _cube(x - n * s) / 3.0


def expected_mse(left: np.ndarray, right: np.ndarray, counts: np.ndarray, scale: np.ndarray,
                 zero_point: np.ndarray, qdtype: str, symmetric: bool) -> np.ndarray:
    """Mean squared quantize-dequantize error of a histogram, for C candidate (scale, zero point).

    Values are taken as uniform inside each bin [left, right); the error inside the representable
    range is the exact integral of the rounding error, outside it the clipping error. Returns (C,).
    """
    qmin, qmax = qrange(qdtype, symmetric)
    total = float(counts.sum())
    s = np.asarray(scale, np.float64).reshape(-1, 1)
    if total == 0 or left.size == 0:
        return np.zeros(s.shape[0])
    zp = np.asarray(zero_point, np.float64).reshape(-1, 1)
    lo_q, hi_q = (qmin - zp) * s, (qmax - zp) * s
    a, b = left.reshape(1, -1), right.reshape(1, -1)
    point = (b - a) <= 0
    width = np.where(point, 1.0, b - a)
    # below the range: every value dequantizes to lo_q
    b1 = np.minimum(b, lo_q)
    under = np.where(a < lo_q, (_cube(b1 - lo_q) - _cube(a - lo_q)) / 3.0, 0.0)
    a3 = np.maximum(a, hi_q)
    over = np.where(b > hi_q, (_cube(b - hi_q) - _cube(a3 - hi_q)) / 3.0, 0.0)
    a2, b2 = np.clip(a, lo_q, hi_q), np.clip(b, lo_q, hi_q)
    inside = _sawtooth_integral(b2, s) - _sawtooth_integral(a2, s)
    err = (under + over + inside) / width
    # degenerate bins (a single value): the exact squared error of that value
    if point.any():
        xq = np.clip(np.round(a / s) * s, lo_q, hi_q)
        err = np.where(point, (a - xq) ** 2, err)
    return np.maximum(err, 0.0) @ counts / total
