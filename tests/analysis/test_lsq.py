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


def _reference_remove(st: lsq.ConsumerLSQ, c: int) -> None:
    """ConsumerLSQ.remove as first written (index gathers): the values must not change."""
    q = np.arange(st.row[c], st.row[c] + st.taps)
    pqq, tq, pq = st.p[np.ix_(q, q)], st.theta[:, q], st.p[q]
    inv = np.linalg.inv(pqq)
    st.theta = st.theta - (tq @ inv) @ pq
    st.p = st.p - pq.T @ inv @ pq
    keep = np.setdiff1d(np.arange(st.p.shape[0]), q)
    st.theta, st.p = st.theta[:, keep], st.p[np.ix_(keep, keep)]
    st.row[st.row > st.row[c]] -= st.taps
    st.row[c] = -1


def test_remove_keeps_the_values_of_the_index_gather_bit_for_bit():
    a, b = _state(), _state()
    for c in (3, 0, 11, 5):
        a.remove(c)
        _reference_remove(b, c)
        assert np.array_equal(a.p, b.p) and np.array_equal(a.theta, b.theta)
        assert np.array_equal(a.row, b.row)


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
