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


#: the least penalty, relative to the input energy: with ``ridge`` 0 the system stays solvable
MIN_RIDGE = 1e-12


def ridge_lambda(moment: np.ndarray, ridge: float) -> float:
    """The ridge penalty for the (F+1) x (F+1) input moments of a Conv (bias row and column last):
    ``ridge`` times the mean input energy on the diagonal. An input that is zero on every sampled
    row (a ReLU branch dead on the calibration images) counts as energy 1, so the system stays
    solvable and the penalty holds its weights where it pulls them."""
    f = moment.shape[0] - 1
    trace = float(np.trace(moment[:f, :f]))
    return max(ridge, MIN_RIDGE) * (trace if trace > 0 else max(f, 1)) / max(f, 1)


class ConsumerLSQ:
    """Kept input channels, current refit weights and inverse moments of one consumer Conv.

    The inverse moments ``p`` stay full size and are never written in place: a copy shares them.
    A removal's rank update is kept as a pair of (F+1) x taps factors and folded into a new ``p``
    only after :data:`PENDING` of them; the rows a removal reads and the diagonal blocks the costs
    read are corrected for the pending ones. So a unit built on a copy and dropped (most of a
    greedy selection's) costs no pass over the matrix: each removal used to update and copy all
    of it, up to 5185 x 5185 on a YOLOv8m. Removed features keep their places, with zero weights."""

    #: removals kept as factors before they are folded into ``p``
    PENDING = 32

    def __init__(self, w: np.ndarray, b: Optional[np.ndarray], stats: ConvStats, ridge: float = 1e-3,
                 out_keep: Optional[np.ndarray] = None) -> None:
        cout = w.shape[0]
        bias = np.zeros(cout) if b is None else b.astype(np.float64)
        theta = np.concatenate([w.reshape(cout, -1).astype(np.float64), bias[:, None]], axis=1)
        if out_keep is not None:
            theta = theta[out_keep]
        s = stats.moment / max(stats.count, 1)
        f = s.shape[0] - 1
        s = s + np.diag(np.r_[np.full(f, ridge_lambda(s, ridge)), 0.0])
        mu = s[:, -1]
        self.var_y = _quadratic(theta, s - np.outer(mu, mu)) or 1.0
        self.taps = t = stats.taps
        self.theta = theta
        p = np.linalg.inv(s)
        self.p = (p + p.T) / 2
        #: original input channel -> first row of its block in the matrices (-1: removed)
        self.row = np.arange(stats.cin) * t
        #: each channel's diagonal block of the current inverse moments, (cin, taps, taps)
        c = np.arange(stats.cin)
        self.diag = self.p[:f, :f].reshape(stats.cin, t, stats.cin, t)[c, :, c, :]
        #: features of removed channels (their rows and columns of the current inverse are zero)
        self.gone = np.zeros(f + 1, bool)
        #: rank updates not folded into ``p`` yet: (u, g), the current inverse is p - sum g u^T
        self.pending: list = []
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
        sol = np.linalg.solve(self.diag[np.asarray(cs)], tq)
        return (tq * sol).reshape(len(cs), -1).sum(axis=1) / self.var_y

    def _rows(self, q: np.ndarray) -> np.ndarray:
        """Rows ``q`` of the current inverse moments, zero at removed features."""
        out = self.p[q]
        for u, g in self.pending:
            out -= g[q] @ u.T
        out[:, self.gone] = 0.0
        return out

    def remove(self, c: int) -> float:
        """Remove channel ``c`` and refit; returns the added relative error."""
        q = self._block(c)
        pq = self._rows(q)
        inv = np.linalg.inv(pq[:, q])
        tq = self.theta[:, q]
        added = float(np.sum(tq.T * (inv @ tq.T))) / self.var_y
        self.theta -= (tq @ inv) @ pq
        self.theta[:, q] = 0.0
        u = pq.T
        g = u @ inv
        n, t = len(self.row), self.taps
        self.diag -= np.matmul(g[:n * t].reshape(n, t, t), u[:n * t].reshape(n, t, t).transpose(0, 2, 1))
        self.gone[q] = True
        self.row[c] = -1
        self.error += added
        self.pending.append((u, g))
        if len(self.pending) >= self.PENDING:
            self._fold()
        return added

    def _fold(self) -> None:
        """A new ``p`` with the pending updates applied (copies may share the old one)."""
        us, gs = zip(*self.pending)
        new = np.concatenate(gs, axis=1) @ np.concatenate(us, axis=1).T
        np.subtract(self.p, new, out=new)
        self.p, self.pending = new, []

    def copy(self) -> "ConsumerLSQ":
        """Another state to remove channels from; ``p`` and the pending factors, never written in
        place, are shared."""
        new = object.__new__(ConsumerLSQ)
        new.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) and k != "p" else v)
                             for k, v in self.__dict__.items()})
        new.pending = list(self.pending)
        return new


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
    channels, as :meth:`ConsumerLSQ.remove` leaves them, bias)."""
    w = state.theta[:, :-1]
    return w.reshape(tuple(int(d) for d in shape)).astype(np.float32), state.theta[:, -1].astype(np.float32)
