"""The least-squares state of a consumer Conv (analysis.lsq) and the selection's reuse of it."""
from __future__ import annotations

import numpy as np

from onnxslim_yolo.analysis import lsq
from onnxslim_yolo.analysis._im2col import ConvGeometry
from onnxslim_yolo.analysis.channels import ChannelGroup, Role
from onnxslim_yolo.passes._prune_select import Layer, LSQCost


def _state(cin: int = 12, cout: int = 5, k: int = 3, seed: int = 0) -> lsq.ConsumerLSQ:
    rng = np.random.default_rng(seed)
    geo = ConvGeometry((k, k), (1, 1), (1, 1), (1, 1, 1, 1))
    x = np.concatenate([rng.standard_normal((400, cin * k * k)), np.ones((400, 1))], axis=1)
    stats = lsq.ConvStats(geo, cin, x.T @ x, len(x))
    w = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    return lsq.ConsumerLSQ(w, rng.standard_normal(cout).astype(np.float32), stats, 1e-3)


class _Reference:
    """ConsumerLSQ's removal as first written (index gathers on matrices that shrink)."""

    def __init__(self, st: lsq.ConsumerLSQ) -> None:
        self.p, self.theta, self.taps = st.p.copy(), st.theta.copy(), st.taps
        self.row, self.var_y, self.error = st.row.copy(), st.var_y, 0.0

    def remove(self, c: int) -> None:
        q = np.arange(self.row[c], self.row[c] + self.taps)
        pqq, tq, pq = self.p[np.ix_(q, q)], self.theta[:, q], self.p[q]
        inv = np.linalg.inv(pqq)
        self.error += float(np.sum(tq.T * (inv @ tq.T))) / self.var_y
        self.theta = self.theta - (tq @ inv) @ pq
        self.p = self.p - pq.T @ inv @ pq
        keep = np.setdiff1d(np.arange(self.p.shape[0]), q)
        self.theta, self.p = self.theta[:, keep], self.p[np.ix_(keep, keep)]
        self.row[self.row > self.row[c]] -= self.taps
        self.row[c] = -1

    def cost(self, c: int) -> float:
        q = np.arange(self.row[c], self.row[c] + self.taps)
        tq = self.theta[:, q]
        return float(np.sum(tq.T * np.linalg.solve(self.p[np.ix_(q, q)], tq.T))) / self.var_y


def test_deferred_removals_match_the_shrinking_matrices(monkeypatch):
    """Removals kept as rank-``taps`` factors (folded every PENDING) give the costs, errors and
    refit weights of updating and shrinking the whole matrix at each removal, and a copy made
    between removals is not disturbed by later removals on the original."""
    monkeypatch.setattr(lsq.ConsumerLSQ, "PENDING", 3)
    a = _state(cin=16)
    ref = _Reference(a)
    order = (3, 0, 11, 5, 9, 1, 14, 7)
    for i, c in enumerate(order):
        live = [k for k in range(16) if ref.row[k] >= 0]
        assert np.allclose(a.costs(live), [ref.cost(k) for k in live], rtol=1e-9, atol=1e-12)
        a.remove(c)
        ref.remove(c)
        if i == 3:
            snap, snap_ref = a.copy(), _Reference.__new__(_Reference)
            snap_ref.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v)
                                      for k, v in ref.__dict__.items()})
        assert abs(a.error - ref.error) <= 1e-9 * max(1.0, ref.error)
    assert len(a.pending) == len(order) % 3 and a.p.shape == (16 * 9 + 1,) * 2
    kept = np.nonzero(a.row >= 0)[0]
    w, b = lsq.full_weights(a, (5, 16, 3, 3))
    assert np.all(w[:, np.setdiff1d(np.arange(16), kept)] == 0)
    body = ref.theta[:, :-1].reshape(5, len(kept), 3, 3)
    assert np.allclose(w[:, kept], body, rtol=1e-5, atol=1e-5) and np.allclose(b, ref.theta[:, -1], atol=1e-5)
    # the copy taken after four removals goes on as the reference did from there
    for c in (2, 4):
        snap.remove(c)
        snap_ref.remove(c)
    assert abs(snap.error - snap_ref.error) <= 1e-9 * max(1.0, snap_ref.error)
    live = [k for k in range(16) if snap_ref.row[k] >= 0]
    assert np.allclose(snap.costs(live), [snap_ref.cost(k) for k in live], rtol=1e-9, atol=1e-12)


def _layer(consumer: str, n: int = 12) -> Layer:
    groups = [ChannelGroup(i, frozenset(), (Role("consumer", consumer, "x", i),), 1, ()) for i in range(n)]
    return Layer(((), (consumer,), ()), groups, [8, 4], 4, list(groups))


def test_committing_the_last_unit_reuses_its_refit_states(monkeypatch):
    """commit redid every removal the unit had just computed on a copy of the same states (137 s
    of 600 on YOLOv8s at 320 pixels); the states it leaves are the same matrices."""
    cost, redo = LSQCost({"c": _state()}, {}), LSQCost({"c": _state()}, {})
    layer, other = _layer("c"), _layer("c")
    unit, _ = cost.unit(layer, 4)
    calls = []
    real = lsq.ConsumerLSQ.remove
    monkeypatch.setattr(lsq.ConsumerLSQ, "remove", lambda self, c: calls.append(c) or real(self, c))
    cost.commit(layer, unit)
    assert calls == []
    redo.commit(other, [other.groups[g.gid] for g in unit])   # not the last unit built: redone
    assert calls == [g.gid for g in unit]
    assert np.array_equal(cost.states["c"].p, redo.states["c"].p)
    assert np.array_equal(cost.states["c"].theta, redo.states["c"].theta)
    # a unit built before another commit is no longer the last: its removals are redone
    two = LSQCost({"c": _state(), "d": _state(seed=1)}, {})
    c_layer, d_layer = _layer("c"), _layer("d")
    first, _ = two.unit(c_layer, 4)
    two.commit(d_layer, two.unit(d_layer, 4)[0])
    calls.clear()
    two.commit(c_layer, first)
    assert calls == [g.gid for g in first]


def test_the_ridge_scales_with_the_input_energy_and_an_input_with_none_counts_as_one():
    moment = np.diag([2.0, 4.0, 1.0])       # two features of energy 2 and 4; the bias last
    assert lsq.ridge_lambda(moment, 0.1) == 0.1 * 6.0 / 2
    assert lsq.ridge_lambda(np.diag([0.0, 0.0, 1.0]), 0.1) == 0.1
    assert lsq.ridge_lambda(moment, 0.0) == lsq.MIN_RIDGE * 3.0
    zero = np.zeros((3, 3))
    zero[-1, -1] = 1.0
    s = zero + np.diag(np.r_[np.full(2, lsq.ridge_lambda(zero, 1e-3)), 0.0])
    assert np.isfinite(np.linalg.inv(s)).all()
