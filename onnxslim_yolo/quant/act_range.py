"""Activation-aware clip ranges: the range that minimizes the error *after* the activation.

A Conv output that only feeds a SiLU (or Sigmoid, ReLU, LeakyReLU) is quantized before the
activation squashes it: SiLU maps every value below about -6 to nearly 0, so resolution spent on
[-40, -6] is wasted, and a plain MSE range (which counts those errors at full weight) keeps them.
Here the error of a candidate range is measured through the activation f on the histogram:
clipped values cost (f(x) - f(clip(x)))^2, represented ones the rounding noise f'(x)^2 s^2 / 12.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis.histogram import TensorStats
from ..analysis.qparams import scale_zero_point_array
from ..analysis.range_search import _merged, signed_bins

Fn = Callable[[np.ndarray], np.ndarray]
ACTIVATIONS: Dict[str, Fn] = {
    "silu": lambda x: x / (1.0 + np.exp(-np.clip(x, -60, 60))),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60))),
    "relu": lambda x: np.maximum(x, 0.0),
}
BINS, N_LO, N_HI = 256, 32, 48


def activation_of(t: gs.Tensor) -> Optional[str]:
    """The activation all readers of ``t`` form: SiLU (Sigmoid(t) and Mul(t, sigmoid)), Sigmoid, Relu."""
    readers = list(t.outputs)
    ops = sorted(r.op for r in readers)
    if ops == ["Mul", "Sigmoid"]:
        sig = next(r for r in readers if r.op == "Sigmoid")
        mul = next(r for r in readers if r.op == "Mul")
        if any(x is sig.outputs[0] for x in mul.inputs) and any(x is t for x in mul.inputs):
            return "silu"
        return None
    if len(ops) == 1 and ops[0] in ("Sigmoid", "Relu"):
        return ops[0].lower()
    return None


def act_errors(c: np.ndarray, w: np.ndarray, n: np.ndarray, los: np.ndarray, his: np.ndarray, f: Fn,
               qdtype: str, symmetric: bool) -> np.ndarray:
    """Expected squared error after ``f`` for each candidate range (bins: centres c, widths w)."""
    s, z = scale_zero_point_array(los, his, qdtype, symmetric)
    from ..analysis.qparams import qrange
    qmin, qmax = qrange(qdtype, symmetric)
    lo_q = ((qmin - z) * s).reshape(-1, 1)
    hi_q = ((qmax - z) * s).reshape(-1, 1)
    eps = np.maximum(w, 1e-6) / 4
    d = (f(c + eps) - f(c - eps)) / (2 * eps)
    fc = f(c)
    x = np.clip(c[None, :], lo_q, hi_q)
    inside = (c[None, :] >= lo_q) & (c[None, :] <= hi_q)
    err = np.where(inside, (d[None, :] ** 2) * (s.reshape(-1, 1) ** 2) / 12.0, (fc[None, :] - f(x)) ** 2)
    return err @ n / max(float(n.sum()), 1.0)


def act_range(ts: TensorStats, act: str, qdtype: str, symmetric: bool) -> Tuple[float, float, float]:
    """(rmin, rmax, expected error after the activation) minimizing the post-activation error."""
    f = ACTIVATIONS[act]
    left, right, n = _merged(*signed_bins(ts), BINS)
    if n.size == 0 or not ts.count:
        return 0.0, 0.0, 0.0
    c, w = (left + right) / 2, right - left
    hi_top = max(ts.max, -ts.min, 0.0) if symmetric else max(ts.max, 0.0)
    his = np.linspace(hi_top / N_HI, hi_top, N_HI) if hi_top > 0 else np.zeros(1)
    if symmetric:
        cand_lo, cand_hi = -his, his
    else:
        los = np.linspace(min(ts.min, 0.0), 0.0, N_LO)
        cand_lo, cand_hi = [a.ravel() for a in np.meshgrid(los, his)]
    err = act_errors(c, w, n, cand_lo, cand_hi, f, qdtype, symmetric)
    i = int(np.argmin(err))
    return float(cand_lo[i]), float(cand_hi[i]), float(err[i])


def range_error(ts: TensorStats, act: str, lo: float, hi: float, qdtype: str, symmetric: bool) -> float:
    """Post-activation error of one given range (to compare with :func:`act_range`)."""
    left, right, n = _merged(*signed_bins(ts), BINS)
    if n.size == 0:
        return 0.0
    return float(act_errors((left + right) / 2, right - left, n, np.array([lo]), np.array([hi]),
                            ACTIVATIONS[act], qdtype, symmetric)[0])


__all__: Sequence[str] = ("activation_of", "act_range", "range_error", "ACTIVATIONS")
