"""Least-squares view of a consumer Conv: what removing input channels costs after a refit.

For a dense 2-D Conv with weights ``W`` (Cout, Cin, kh, kw) and bias ``b``, the input patches
``x`` (im2col rows, C*kh*kw features, plus a constant 1 for the bias) on calibration data give the
second-moment matrix ``S = E[x x^T]``. With ``theta`` the current weights ([W, b] at first) and
``P = (S + ridge)^-1`` restricted to the kept features, removing the features ``q`` of one input
channel and refitting the rest optimally raises the squared output error by
``trace(theta_q P_qq^-1 theta_q^T)`` (the group form of optimal brain surgeon), and the refit is
``theta <- theta - theta_q P_qq^-1 P_q:``. Errors are reported relative to the output variance.
With uncorrelated channels this reduces to std(channel)^2 x ||W[:, channel]||^2, the
activation-aware importance. Read-only on the model: this is arithmetic on statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._im2col import ConvGeometry, patches, sample_positions


@dataclass
class ConvStats:
    """Second moments of a Conv's augmented input patches (last feature is the constant 1)."""

    geometry: ConvGeometry
    cin: int
    moment: np.ndarray   # (F+1, F+1), sum of x x^T
    count: int

    @property
    def taps(self) -> int:
        return self.geometry.kernel[0] * self.geometry.kernel[1]


def state_bytes(features: int) -> int:
    """Bytes of one Conv's float64 (F+1) x (F+1) matrix (its moments, or its state's inverse),
    F = ``features`` inputs per output (input channels x kernel taps)."""
    return (features + 1) ** 2 * 8


def collect_moments(geoms: Mapping[str, Tuple[str, ConvGeometry]], batches, per_image: int,
                    seed: int = 0, saliency: Optional[Sequence[np.ndarray]] = None) -> Dict[str, ConvStats]:
    """Accumulate patch second moments; ``geoms`` maps a Conv name to (input tensor, geometry),
    ``batches`` yields dicts tensor -> array (one calibration feed each); ``saliency`` (one map
    per feed) biases the sampled positions towards detections."""
    rng = np.random.default_rng(seed)
    out: Dict[str, ConvStats] = {}
    for i, vals in enumerate(batches):
        sal = saliency[i] if saliency is not None else None
        for name, (tensor, geo) in geoms.items():
            x = vals[tensor]
            pos = sample_positions(geo, x.shape, per_image, rng, sal)
            p = patches(geo, x, pos)
            a = np.concatenate([p, np.ones((len(p), 1))], axis=1)
            st = out.get(name)
            if st is None:
                out[name] = ConvStats(geo, x.shape[1], a.T @ a, len(a))
            else:
                st.moment += a.T @ a
                st.count += len(a)
    return out


class ConsumerLSQ:
    """Kept input channels, current refit weights and inverse moments of one consumer Conv."""

    def __init__(self, w: np.ndarray, b: Optional[np.ndarray], stats: ConvStats, ridge: float = 1e-3,
                 out_keep: Optional[np.ndarray] = None) -> None:
        cout = w.shape[0]
        bias = np.zeros(cout) if b is None else b.astype(np.float64)
        theta = np.concatenate([w.reshape(cout, -1).astype(np.float64), bias[:, None]], axis=1)
        if out_keep is not None:
            theta = theta[out_keep]
        s = stats.moment / max(stats.count, 1)
        f = s.shape[0] - 1
        lam = ridge * float(np.trace(s[:f, :f])) / max(f, 1)
        s = s + np.diag(np.r_[np.full(f, lam), 0.0])
        mu = s[:, -1]
        self.var_y = _quadratic(theta, s - np.outer(mu, mu)) or 1.0
        self.taps = stats.taps
        self.theta = theta
        self.p = np.linalg.inv(s)
        self.p = (self.p + self.p.T) / 2
        #: original input channel -> first row of its block in the current matrices (-1: removed)
        self.row = np.arange(stats.cin) * self.taps
        self.error = 0.0

    def _block(self, c: int) -> np.ndarray:
        r = self.row[c]
        if r < 0:
            raise KeyError(c)
        return np.arange(r, r + self.taps)

    def cost(self, c: int) -> float:
        """Relative output error added by removing input channel ``c`` (with refit)."""
        return float(self.costs([c])[0])

    def costs(self, cs: Sequence[int]) -> np.ndarray:
        """:meth:`cost` of each channel of ``cs``, in one batched solve (the selection asks for
        every remaining channel of a layer at each step)."""
        q = np.stack([self._block(c) for c in cs])                  # (n, taps)
        tq = np.ascontiguousarray(self.theta[:, q].transpose(1, 2, 0))  # (n, taps, cout)
        sol = np.linalg.solve(self.p[q[:, :, None], q[:, None, :]], tq)
        return (tq * sol).reshape(len(cs), -1).sum(axis=1) / self.var_y

    def remove(self, c: int) -> float:
        """Remove channel ``c`` and refit; returns the added relative error."""
        q = self._block(c)
        pqq = self.p[np.ix_(q, q)]
        tq = self.theta[:, q]
        pq = self.p[q]
        inv = np.linalg.inv(pqq)
        added = float(np.sum(tq.T * (inv @ tq.T))) / self.var_y
        self.theta = self.theta - (tq @ inv) @ pq
        self.p -= pq.T @ inv @ pq       # in place: a new matrix per removal took as long again
        self.theta = np.delete(self.theta, slice(q[0], q[-1] + 1), axis=1)
        self.p = _without_block(self.p, int(q[0]), self.taps)
        self.row[self.row > self.row[c]] -= self.taps
        self.row[c] = -1
        self.error += added
        return added

    def copy(self) -> "ConsumerLSQ":
        new = object.__new__(ConsumerLSQ)
        new.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v)
                             for k, v in self.__dict__.items()})
        return new


def _without_block(m: np.ndarray, r: int, t: int) -> np.ndarray:
    """Square ``m`` without rows and columns r .. r+t-1, copied by four slices: the same values as
    ``m[np.ix_(keep, keep)]`` at a third of the time (a gather by index arrays, plus a new matrix
    for the rank update before it, took half of YOLOv8s' selection)."""
    k = m.shape[0] - t
    out = np.empty((k, k), m.dtype)
    out[:r, :r], out[:r, r:] = m[:r, :r], m[:r, r + t:]
    out[r:, :r], out[r:, r:] = m[r + t:, :r], m[r + t:, r + t:]
    return out


def relative_errors(lsq: Mapping[str, ConsumerLSQ], names: Sequence[str]) -> Dict[str, float]:
    return {n: round(lsq[n].error, 6) for n in names if n in lsq}


def replacement_error(w: np.ndarray, b: Optional[np.ndarray], stats: ConvStats,
                      channels: Sequence[int]) -> float:
    """Relative output error when the given input channels are replaced by their means (no refit)."""
    cout = w.shape[0]
    theta = np.concatenate([w.reshape(cout, -1).astype(np.float64),
                            (np.zeros(cout) if b is None else b.astype(np.float64))[:, None]], axis=1)
    s = stats.moment / max(stats.count, 1)
    mu = s[:, -1]
    cov = s - np.outer(mu, mu)
    var_y = _quadratic(theta, cov) or 1.0
    q = (np.asarray(channels, dtype=np.int64)[:, None] * stats.taps + np.arange(stats.taps)).ravel()
    return _quadratic(theta[:, q], cov[np.ix_(q, q)]) / var_y


def _quadratic(theta: np.ndarray, m: np.ndarray) -> float:
    """sum over outputs o of theta[o] @ m @ theta[o] (as two matrix products: a three-operand
    einsum loops over all of o, f and g, minutes for a Conv over 1024 channels)."""
    return float(np.sum((theta @ m) * theta))


def full_weights(state: ConsumerLSQ, shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """The state's refit as full Conv parameters: (W of ``shape`` with zeros in removed input
    channels, bias)."""
    cout, cin = int(shape[0]), int(shape[1])
    w = np.zeros((cout, cin, state.taps), np.float64)
    kept = np.nonzero(state.row >= 0)[0]
    body = state.theta[:, :-1].reshape(cout, len(kept), state.taps)
    w[:, kept] = body
    return w.reshape(tuple(int(d) for d in shape)).astype(np.float32), state.theta[:, -1].astype(np.float32)
