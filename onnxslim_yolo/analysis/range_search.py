"""Clip-range choices on a streaming histogram: minmax, percentile, entropy (KL), MSE.

Every function takes a :class:`TensorStats` and returns ``(rmin, rmax)`` with ``rmin <= 0 <= rmax``
(``rmin == -rmax`` when symmetric). The histogram is never expanded back into samples.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .histogram import TensorStats
from .qparams import expected_mse, qrange, scale_zero_point_array

Range = Tuple[float, float]
#: candidates per search step (coarse grid, then a finer grid around the best coarse one)
COARSE, FINE = 64, 32
#: bins the MSE search works on (merged from the full histogram; the final error uses all bins)
MSE_BINS = 512
#: KL smoothing mass, as in TensorRT/MXNet's entropy calibration
KL_EPS = 1e-4


def _finish(lo: float, hi: float, symmetric: bool) -> Range:
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        a = max(-lo, hi)
        return -a, a
    return lo, hi


def signed_bins(ts: TensorStats) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    return ts.hist.occupied(ts.min, ts.max) if ts.count else (np.zeros(0), np.zeros(0), np.zeros(0))


def abs_bins(ts: TensorStats) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The histogram of |x|: exact, since 0 is a lattice edge (bin -j-1 folds onto bin j)."""
    h = ts.hist
    if not h.ready:
        return signed_bins(ts)
    nz = np.flatnonzero(h.counts)
    k = h.k_lo + nz
    j = np.where(k >= 0, k, -k - 1)
    folded = np.bincount(j, weights=h.counts[nz].astype(np.float64))
    keep = np.flatnonzero(folded)
    left = np.minimum(keep * h.width, ts.absmax)
    right = np.minimum((keep + 1) * h.width, ts.absmax)
    return left, right, folded[keep]


def quantile(left: np.ndarray, right: np.ndarray, n: np.ndarray, q: float) -> float:
    """Value below which a fraction ``q`` of the histogram lies (linear inside a bin)."""
    if n.size == 0:
        return 0.0
    cum = np.cumsum(n)
    target = min(max(q, 0.0), 1.0) * cum[-1]
    i = min(int(np.searchsorted(cum, target, side="left")), n.size - 1)
    before = cum[i - 1] if i else 0.0
    frac = (target - before) / n[i] if n[i] else 0.0
    return float(left[i] + frac * (right[i] - left[i]))


# ------------------------------------------------------------------------------- methods
def minmax_range(ts: TensorStats, qdtype: str, symmetric: bool) -> Range:
    return _finish(ts.min if ts.count else 0.0, ts.max if ts.count else 0.0, symmetric)


def percentile_range(ts: TensorStats, qdtype: str, symmetric: bool, percentile: float = 99.99) -> Range:
    """Symmetric: the ``percentile`` of |x|. Asymmetric: cut (100 - percentile)/2 % on each side
    (onnxruntime's convention)."""
    p = percentile / 100.0
    if symmetric:
        t = quantile(*abs_bins(ts), p)
        return _finish(-t, t, True)
    left, right, n = signed_bins(ts)
    cut = (1.0 - p) / 2.0
    return _finish(quantile(left, right, n, cut), quantile(left, right, n, 1.0 - cut), False)


def mse_range(ts: TensorStats, qdtype: str, symmetric: bool) -> Range:
    """The clip range minimizing the expected quantize-dequantize MSE of the histogram."""
    left, right, n = _merged(*signed_bins(ts), MSE_BINS)
    lo, hi = minmax_range(ts, qdtype, symmetric)
    if n.size == 0 or hi == lo:
        return lo, hi

    def err(los: np.ndarray, his: np.ndarray) -> np.ndarray:
        s, z = scale_zero_point_array(los, his, qdtype, symmetric)
        return expected_mse(left, right, n, s, z, qdtype, symmetric)

    if symmetric:
        t = _search(lambda ts_: err(-ts_, ts_), hi)
        return _finish(-t, t, True)
    # a joint search on the |x| threshold (clips whichever side is long), then one round of
    # coordinate descent on each end (the scale couples them)
    t = _search(lambda c: err(np.maximum(lo, -c), np.minimum(hi, c)), max(hi, -lo))
    lo, hi = max(lo, -t), min(hi, t)
    if hi > 0:
        hi = _search(lambda c: err(np.full_like(c, lo), c), ts.max, hi)
    if lo < 0:
        lo = -_search(lambda c: err(-c, np.full_like(c, hi)), -ts.min, -lo)
    return _finish(lo, hi, False)


def _search(f, top: float, current: float = 0.0) -> float:
    """Argmin of f over (0, top]: a coarse grid, then a fine grid around the best point."""
    cand = np.linspace(top / COARSE, top, COARSE)
    if current > 0:
        cand = np.append(cand, current)
    best = float(cand[int(np.argmin(f(cand)))])
    step = top / COARSE
    fine = np.linspace(max(best - step, step / FINE), min(best + step, top), FINE)
    fine = np.append(fine, best)
    return float(fine[int(np.argmin(f(fine)))])


def _merged(left: np.ndarray, right: np.ndarray, n: np.ndarray, most: int):
    """At most ``most`` bins: merge runs of consecutive non-empty bins (keeps exact mass)."""
    if n.size <= most:
        return left, right, n
    g = -(-n.size // most)
    idx = np.arange(0, n.size, g)
    return left[idx], right[np.minimum(idx + g - 1, n.size - 1)], np.add.reduceat(n, idx)


def entropy_range(ts: TensorStats, qdtype: str, symmetric: bool) -> Range:
    """TensorRT-style: the |x| threshold whose clipped, quantized distribution is closest (KL)."""
    h = ts.hist
    qmin, qmax = qrange(qdtype, symmetric)
    levels = qmax - qmin + 1
    nz = np.flatnonzero(h.counts) if h.ready else np.zeros(0, int)
    if nz.size == 0:
        return minmax_range(ts, qdtype, symmetric)
    k0, k1 = h.k_lo + int(nz[0]), h.k_lo + int(nz[-1]) + 1   # occupied lattice [k0, k1)
    counts = h.counts[nz[0]:nz[-1] + 1].astype(np.float64)
    top = max(-k0, k1)
    t_all = np.arange(1, top + 1)
    span = 2 * t_all if symmetric else np.minimum(k1, t_all) - np.maximum(k0, -t_all)
    if span[-1] < levels:  # the data covers fewer bins than levels: nothing to clip
        return minmax_range(ts, qdtype, symmetric)
    tmin = int(t_all[int(np.argmax(span >= levels))])
    kl = lambda ts_: _kl(counts, k0, k1, ts_, levels, symmetric)  # noqa: E731
    cand = np.unique(np.linspace(tmin, top, COARSE).astype(int))
    best = int(cand[int(np.argmin(kl(cand)))])
    step = max(1, (top - tmin) // COARSE)
    fine = np.unique(np.clip(np.linspace(best - step, best + step, FINE + 1).round().astype(int), tmin, top))
    t = int(fine[int(np.argmin(kl(fine)))])
    thr = min(t * h.width, ts.absmax)
    return _finish(max(ts.min, -thr), min(ts.max, thr), symmetric)


def _kl(counts: np.ndarray, k0: int, k1: int, ts: np.ndarray, levels: int, symmetric: bool) -> np.ndarray:
    """KL(P || Q) for each threshold t (in bins); P clips outliers into the edge bins, Q merges the
    window into ``levels`` quantization bins and spreads each over its non-empty bins."""
    t = np.asarray(ts, np.int64).reshape(-1, 1)
    k = np.arange(k0, k1).reshape(1, -1)
    wa, wb = np.maximum(k0, -t), np.minimum(k1, t)             # window [wa, wb)
    empty = (wb <= wa).ravel()                                  # every value beyond t: unusable
    wa, wb = np.minimum(wa, k1 - 1), np.maximum(wb, k0 + 1)
    qa, qb = (-t, t) if symmetric else (wa, wb)                 # span of the levels
    inside = (k >= wa) & (k < wb)
    orig = np.where(inside, counts, 0.0)
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    below = cum[(wa - k0).ravel()]
    above = cum[-1] - cum[(wb - k0).ravel()]
    p = orig.copy()
    rows = np.arange(t.shape[0])
    p[rows, (wa - k0).ravel()] += below
    p[rows, (wb - k0 - 1).ravel()] += above
    g = np.clip(((k - qa) * levels) // np.maximum(qb - qa, 1), 0, levels - 1)
    flat = (rows.reshape(-1, 1) * levels + g).ravel()
    size = t.shape[0] * levels
    gsum = np.bincount(flat, weights=orig.ravel(), minlength=size).reshape(-1, levels)
    gnz = np.bincount(flat, weights=(orig > 0).ravel().astype(np.float64), minlength=size).reshape(-1, levels)
    per = np.divide(gsum, gnz, out=np.zeros_like(gsum), where=gnz > 0)
    q = np.where(orig > 0, np.take_along_axis(per, g, axis=1), 0.0)
    p /= p.sum(axis=1, keepdims=True)
    q /= np.maximum(q.sum(axis=1, keepdims=True), 1e-300)
    # smoothing: bins where P has mass and Q has none get KL_EPS, taken from Q's other bins
    zero = inside & (q == 0)
    nzero, nnon = zero.sum(axis=1, keepdims=True), (inside & (q > 0)).sum(axis=1, keepdims=True)
    q = np.where(zero, KL_EPS, q - KL_EPS * nzero / np.maximum(nnon, 1) * (q > 0))
    q = np.maximum(q, 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / q), 0.0)
    return np.where(empty, np.inf, terms.sum(axis=1))
