"""Calibration: streaming statistics, range methods, scale/zero point, tables, collect() on models."""
from __future__ import annotations

import json
import math
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxslim_yolo.analysis.calibration import (METHODS, CalibrationStats, CalibrationTable, RangeEntry,
                                                StreamingHistogram, TensorStats, choose_ranges, collect,
                                                dequantize, fake_quantize, force_same_range, quantize,
                                                range_errors, scale_zero_point)
from onnxslim_yolo.analysis.range_search import quantile, signed_bins
from onnxslim_yolo.pass_base import UsageError


def stats_of(batches: List[np.ndarray], bins: int = 2048) -> TensorStats:
    ts = TensorStats("t", StreamingHistogram(bins))
    for b in batches:
        ts.update(b)
    return ts


def one(ts: TensorStats) -> CalibrationStats:
    return CalibrationStats({ts.name: ts}, samples=1, bins=ts.hist.bins)


# ------------------------------------------------------------------------------ histogram
def test_streaming_histogram_equals_one_shot_histogram():
    rng = np.random.default_rng(0)
    # ranges grow on both sides, shrink, and shift: exercises f = 1 shifts and f > 1 merges
    scales = [0.5, 0.4, 3.0, 1.0, 40.0, 2.0, 150.0]
    offsets = [0.0, 1.0, -2.0, 5.0, 0.0, -30.0, 20.0]
    batches = [(rng.standard_normal(5000) * s + o).astype(np.float32) for s, o in zip(scales, offsets)]
    batches.append(np.zeros(100, np.float32))
    ts = stats_of(batches)
    data = np.concatenate(batches)
    assert ts.min == float(data.min()) and ts.max == float(data.max())
    assert ts.count == data.size and ts.hist.counts.sum() == data.size
    ref, _ = np.histogram(data.astype(np.float64), bins=ts.hist.edges())
    # identical up to values sitting on an edge within float32 rounding of the bin index
    assert np.abs(ref - ts.hist.counts).sum() <= 2e-4 * data.size
    # the window is well used after growing: at least a third of the bins hold the data's span
    assert (data.max() - data.min()) / ts.hist.width > ts.hist.bins / 3
    assert ts.hist.k_lo <= 0 <= ts.hist.k_lo + ts.hist.bins  # 0 is an edge inside the window


def test_histogram_zero_then_data_and_nonfinite():
    ts = stats_of([np.zeros(10, np.float32), np.array([0.0, 1.0, -1.0, np.nan, np.inf], np.float32)])
    assert ts.count == 13 and ts.nonfinite == 2 and (ts.min, ts.max) == (-1.0, 1.0)
    h = ts.hist
    assert h.counts.sum() == 13 and h.counts[-h.k_lo] == 11  # the zeros sit in the bin [0, w)


def test_strided_histogram_keeps_exact_extremes_and_matches_the_full_one():
    rng = np.random.default_rng(3)
    batches = [rng.standard_t(3, 200_000).astype(np.float32) * s for s in (1.0, 2.0, 0.5, 1.5)]
    full = stats_of(batches)
    part = TensorStats("t", StreamingHistogram(2048))
    for b in batches:
        part.update(b, samples=10_000)
    data = np.concatenate(batches)
    # min, max and count see every value; the histogram holds one value in 20 of each update
    assert (part.min, part.max, part.count) == (float(data.min()), float(data.max()), data.size)
    assert part.hist.counts.sum() == 4 * 10_000 and part.updates == 4
    for q in (0.5, 0.9, 0.999):
        want = quantile(*signed_bins(full), q)
        assert quantile(*signed_bins(part), q) == pytest.approx(want, rel=0.05, abs=0.02), q
    # small updates are binned whole
    small = TensorStats("s", StreamingHistogram(256))
    small.update(np.arange(100, dtype=np.float32), samples=10_000)
    assert small.hist.counts.sum() == 100


def test_samples_per_update_bounds_the_total_and_the_floor():
    from onnxslim_yolo.analysis.histogram import HIST_MIN_SAMPLES, HIST_TOTAL_SAMPLES, samples_per_update
    assert samples_per_update(1) == HIST_TOTAL_SAMPLES
    assert samples_per_update(10**6) == HIST_MIN_SAMPLES
    n = HIST_TOTAL_SAMPLES // HIST_MIN_SAMPLES // 2
    assert samples_per_update(n) * n >= HIST_TOTAL_SAMPLES


def test_percentile_matches_numpy():
    rng = np.random.default_rng(1)
    batches = [rng.gamma(2.0, 1.5, 20000).astype(np.float32) - 1.0 for _ in range(5)]
    ts = stats_of(batches)
    data = np.concatenate(batches).astype(np.float64)
    for q in (1.0, 25.0, 50.0, 90.0, 99.0, 99.9):
        got = quantile(*signed_bins(ts), q / 100.0)
        assert abs(got - np.percentile(data, q)) <= 1.5 * ts.hist.width, q
    table = choose_ranges(one(ts), "percentile", percentile=99.0)
    lo, hi = np.percentile(data, [0.5, 99.5])  # asymmetric: half the cut on each side
    w = ts.hist.width
    assert abs(table["t"].rmin - lo) <= 1.5 * w and abs(table["t"].rmax - hi) <= 1.5 * w


# -------------------------------------------------------------------------------- methods
def heavy_tailed() -> TensorStats:
    rng = np.random.default_rng(2)
    x = rng.laplace(0.0, 1.0, 400000)
    x[:2] = [-30.0, 32.0]  # rare outliers: clipping them costs less than the resolution they take
    return stats_of(np.array_split(x.astype(np.float32), 8))


def uniform() -> TensorStats:
    rng = np.random.default_rng(3)
    return stats_of([rng.uniform(-4.0, 4.0, 50000).astype(np.float32) for _ in range(4)])


@pytest.mark.parametrize("method", ["entropy", "mse"])
@pytest.mark.parametrize("qdtype,symmetric", [("uint8", False), ("int8", True)])
def test_kl_and_mse_clip_heavy_tails_but_not_uniform(method, qdtype, symmetric):
    heavy = choose_ranges(one(heavy_tailed()), method, qdtype=qdtype, symmetric=symmetric)["t"]
    amax = heavy_tailed().absmax
    assert heavy.rmax < 0.5 * amax and -heavy.rmin < 0.5 * amax
    assert heavy.rmin < 0 < heavy.rmax
    flat = uniform()
    u = choose_ranges(one(flat), method, qdtype=qdtype, symmetric=symmetric)["t"]
    assert u.rmax >= 0.95 * flat.max and u.rmin <= 0.95 * flat.min


def test_clipped_mse_range_beats_minmax_on_real_samples():
    rng = np.random.default_rng(4)
    x = rng.laplace(0.0, 1.0, 400000)
    x[0] = 25.0
    x = x.astype(np.float32)
    ts = stats_of([x])
    table = choose_ranges(one(ts), "auto")
    e = table["t"]
    real = {m: float(np.mean((fake_quantize(x, *r, "uint8") - x) ** 2))
            for m, r in [("chosen", (e.rmin, e.rmax)), ("minmax", (ts.min, ts.max))]}
    assert real["chosen"] < 0.8 * real["minmax"]
    # the histogram's expected error predicts the error on the samples themselves
    assert e.errors[e.method] == pytest.approx(real["chosen"], rel=0.1)
    assert e.errors["minmax"] == pytest.approx(real["minmax"], rel=0.1)


@pytest.mark.parametrize("qdtype,symmetric", [("uint8", False), ("int8", True), ("uint8", True)])
def test_auto_picks_lowest_recorded_error(qdtype, symmetric):
    stats = CalibrationStats({"heavy": heavy_tailed(), "flat": uniform()}, samples=1)
    table = choose_ranges(stats, "auto", qdtype=qdtype, symmetric=symmetric)
    for name, e in table.items():
        assert set(e.errors) == set(METHODS)
        assert e.errors[e.method] == min(e.errors.values()), name
        again = range_errors(stats[name], {e.method: (e.rmin, e.rmax)}, qdtype, symmetric)
        assert again[e.method] == pytest.approx(e.errors[e.method])
    assert table["heavy"].errors["minmax"] > 2 * table["heavy"].errors[table["heavy"].method]


def test_ranges_include_zero_and_symmetric_is_symmetric():
    ts = stats_of([np.linspace(2.0, 5.0, 1000, dtype=np.float32)])
    for m in METHODS:
        a = choose_ranges(one(ts), m)["t"]
        assert a.rmin == 0.0 and a.rmax > 0
        s = choose_ranges(one(ts), m, qdtype="int8", symmetric=True)["t"]
        assert s.rmin == -s.rmax


def test_all_zero_tensor_gets_a_valid_scale():
    ts = stats_of([np.zeros(64, np.float32)])
    for m in ("auto",) + METHODS:
        e = choose_ranges(one(ts), m)["t"]
        assert (e.rmin, e.rmax) == (0.0, 0.0)
    s, z = scale_zero_point(0.0, 0.0, "uint8")
    assert s > 0 and z == 0


def test_choose_ranges_errors():
    stats = one(uniform())
    with pytest.raises(UsageError, match="method 'kl' is unknown"):
        choose_ranges(stats, "kl")
    with pytest.raises(UsageError, match="percentile must be in"):
        choose_ranges(stats, "percentile", percentile=0)
    with pytest.raises(UsageError, match="no statistics for tensor 'nope'"):
        choose_ranges(stats, tensors=["nope"])
    with pytest.raises(UsageError, match="quantized type 'int4'"):
        choose_ranges(stats, qdtype="int4")


# ------------------------------------------------------------------------- scale, zero point
def ref_quant(x, s, z, qmin, qmax):
    return np.clip(np.round(x.astype(np.float32) / np.float32(s)) + z, qmin, qmax)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(lo=st.floats(-1e4, 1e4, allow_nan=False, width=32), hi=st.floats(-1e4, 1e4, allow_nan=False, width=32),
       kind=st.sampled_from([("uint8", False), ("int8", True), ("int8", False), ("uint8", True)]))
def test_scale_zero_point_against_numpy(lo, hi, kind):
    qdtype, symmetric = kind
    lo, hi = min(lo, hi), max(lo, hi)
    s, z = scale_zero_point(lo, hi, qdtype, symmetric)
    qmin, qmax = {("uint8", False): (0, 255), ("uint8", True): (0, 255),
                  ("int8", False): (-128, 127), ("int8", True): (-127, 127)}[kind]
    assert isinstance(s, np.float32) and s > 0 and isinstance(z, int) and qmin <= z <= qmax
    if symmetric:
        assert z == (0 if qdtype == "int8" else 128)
    assert float(dequantize(quantize(np.float32(0.0), s, z, qdtype), s, z)) == 0.0  # 0 exact
    x = np.linspace(min(lo, 0.0), max(hi, 0.0), 257).astype(np.float32)
    q = quantize(x, s, z, qdtype)
    np.testing.assert_array_equal(q.astype(np.int64), ref_quant(x, s, z, qmin, qmax))
    back = dequantize(q, s, z)
    np.testing.assert_array_equal(back, ((q.astype(np.float32) - z) * s).astype(np.float32))
    if max(abs(lo), abs(hi)) > 1e-30:
        assert np.abs(back - x).max() <= 0.5 * s * (1 + 1e-4) + 1e-6 * np.abs(x).max()


@settings(derandomize=True, max_examples=100, deadline=None)
@given(lo=st.floats(-100, -1e-3), hi=st.floats(1e-3, 100), symmetric=st.booleans())
def test_scale_zero_point_equals_onnxruntime(lo, hi, symmetric):
    from onnxruntime.quantization.quant_utils import compute_scale_zp
    qdtype, (qmin, qmax) = ("int8", (-127, 127)) if symmetric else ("uint8", (0, 255))
    lo, hi = float(np.float32(lo)), float(np.float32(hi))
    # float32 values held in float64, int32 bounds: onnxruntime 1.16 to 1.20 subtract in the inputs' dtype
    # (rmax - rmin in float32 is 1 ulp off the float64 we and recent releases use; 1.16's int8 qmax - qmin
    # overflows, which gave scale 1.0)
    z_ref, s_ref = compute_scale_zp(np.array(lo), np.array(hi), np.array(qmin, np.int32),
                                    np.array(qmax, np.int32), symmetric)
    s, z = scale_zero_point(lo, hi, qdtype, symmetric)
    assert s == np.float32(s_ref) and z == int(z_ref)


def test_quantize_matches_onnxruntime_quantize_linear():
    x = np.linspace(-3.3, 7.7, 1001, dtype=np.float32)
    for qdtype, symmetric, elem in (("uint8", False, TensorProto.UINT8), ("int8", True, TensorProto.INT8)):
        s, z = scale_zero_point(-2.0, 5.0, qdtype, symmetric)
        g = helper.make_graph(
            [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.size])],
            [helper.make_tensor_value_info("q", elem, [x.size]),
             helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.size])],
            [numpy_helper.from_array(np.array(s, np.float32), "s"),
             numpy_helper.from_array(np.array(z, np.uint8 if elem == TensorProto.UINT8 else np.int8), "z")])
        m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        q, y = sess.run(None, {"x": x})
        np.testing.assert_array_equal(quantize(x, s, z, qdtype), q)
        np.testing.assert_array_equal(dequantize(q, s, z), y)


# -------------------------------------------------------------------------------- tables
def test_json_round_trips(tmp_path: Path):
    tensors = {"heavy": heavy_tailed(), "flat": uniform(), "zero": stats_of([np.zeros(4, np.float32)])}
    stats = CalibrationStats(tensors, samples=8, skipped={"shape": "int64 tensor"})
    p = stats.to_json(tmp_path / "stats.json")
    back = CalibrationStats.from_json(p)
    assert back.samples == 8 and back.skipped == stats.skipped and list(back) == list(stats)
    for n in stats:
        a, b = stats[n], back[n]
        key = lambda t: (t.min, t.max, t.count, t.hist.width, t.hist.k_lo)  # noqa: E731
        assert key(a) == key(b)
        np.testing.assert_array_equal(a.hist.counts, b.hist.counts)
    table = choose_ranges(stats, "auto")
    assert choose_ranges(back, "auto") == table  # calibration runs once: re-choose from the file
    tp = table.to_json(tmp_path / "sub" / "table.json")
    assert CalibrationTable.from_json(tp) == table
    assert sorted(x.name for x in tp.parent.iterdir()) == ["table.json"]  # no temp file left
    assert json.loads(tp.read_text())["tensors"]["flat"]["method"] == table["flat"].method


def test_json_errors(tmp_path: Path):
    with pytest.raises(UsageError, match="no such file"):
        CalibrationTable.from_json(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match="bad.json: not readable JSON"):
        CalibrationStats.from_json(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UsageError, match="not a calibration table"):
        CalibrationTable.from_json(bad)
    bad.write_text("[1, 2, 3]")   # valid JSON of another shape: an AttributeError traceback before
    kinds = ((CalibrationTable, "a calibration table"), (CalibrationStats, "calibration statistics"))
    for cls, what in kinds:
        with pytest.raises(UsageError, match=rf"bad.json: not {what} \(a JSON list, expected format"):
            cls.from_json(bad)


def test_force_same_range_unions_groups():
    e = lambda lo, hi: RangeEntry(lo, hi, "minmax", {"minmax": 0.0})  # noqa: E731
    table = CalibrationTable({"a": e(-1.0, 2.0), "b": e(0.0, 5.0), "c": e(-3.0, 1.0), "d": e(0.0, 1.0)})
    out = force_same_range(table, [["a", "b"], ["b", "c"]])
    assert {n: (out[n].rmin, out[n].rmax) for n in "abc"} == {n: (-3.0, 5.0) for n in "abc"}
    assert out["a"].shared == out["c"].shared and out["d"] == table["d"]
    assert table["a"].rmax == 2.0  # the input table is unchanged
    with pytest.raises(UsageError, match="tensor 'x' has no calibration entry"):
        force_same_range(table, [["a", "x"]])


# ------------------------------------------------------------------------------- collect
def conv_model(hw: int = 16, c: int = 8) -> onnx.ModelProto:
    """images -> Conv -> Sigmoid*x (SiLU) -> Conv -> Add(residual) -> Conv; a Shape; a Constant."""
    rng = np.random.default_rng(5)
    w = lambda o, i: numpy_helper.from_array((rng.standard_normal((o, i, 3, 3)) * 0.3).astype(np.float32))  # noqa
    inits = []
    for name, (o, i) in {"w1": (c, 3), "w2": (c, c), "w3": (4, c)}.items():
        t = w(o, i)
        t.name = name
        inits.append(t)
    nodes = [helper.make_node("Conv", ["images", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["s1"]),
             helper.make_node("Mul", ["c1", "s1"], ["a1"]),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(0.5))),
             helper.make_node("Mul", ["c2", "k"], ["c2h"]),
             helper.make_node("Add", ["c2h", "a1"], ["r"]),
             helper.make_node("Conv", ["r", "w3"], ["out"], pads=[1, 1, 1, 1]),
             helper.make_node("Shape", ["out"], ["shape"])]
    g = helper.make_graph(nodes, "small",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, hw, hw])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, hw, hw]),
                           helper.make_tensor_value_info("shape", TensorProto.INT64, [4])], inits)
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])


def feeds(n: int, hw: int = 16, seed: int = 0) -> Iterator[Dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {"images": rng.random((1, 3, hw, hw), dtype=np.float32) * 2 - 0.5}


def test_collect_min_max_match_onnxruntime():
    model = conv_model()
    names = ["images", "c1", "a1", "c2", "k", "r", "out", "w2", "shape"]
    stats = collect(model, names, list(feeds(6)), bins=256, progress=False, threads=1)
    ref_model = onnx.ModelProto()
    ref_model.CopyFrom(model)
    for n in ["c1", "a1", "c2", "k", "r"]:
        ref_model.graph.output.append(onnx.ValueInfoProto(name=n))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(ref_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    seen: Dict[str, List[np.ndarray]] = {}
    for f in feeds(6):
        for o, a in zip(sess.get_outputs(), sess.run(None, f)):
            seen.setdefault(o.name, []).append(a)
        seen.setdefault("images", []).append(f["images"])
    assert stats.samples == 6 and stats.skipped == {"shape": "int64 tensor, not float: nothing to calibrate"}
    assert set(stats) == set(names) - {"shape"}
    for n in ["images", "c1", "a1", "c2", "k", "r", "out"]:
        data = np.concatenate([a.ravel() for a in seen[n]])
        assert stats[n].min == pytest.approx(float(data.min()), rel=1e-5, abs=1e-6), n
        assert stats[n].max == pytest.approx(float(data.max()), rel=1e-5, abs=1e-6), n
        assert stats[n].count == data.size
    w2 = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w2"))
    assert (stats["w2"].min, stats["w2"].max) == (float(w2.min()), float(w2.max()))
    table = choose_ranges(stats, "auto")
    assert set(table) == set(stats) and all(e.rmin <= 0 <= e.rmax for e in table.values())


def test_collect_errors():
    model = conv_model()
    with pytest.raises(UsageError, match="tensor 'nope' is not in the model"):
        collect(model, ["c1", "nope"], feeds(1), progress=False)
    with pytest.raises(UsageError, match="no feeds"):
        collect(model, ["c1"], [], progress=False)
    with pytest.raises(UsageError, match="feed 0 lacks input 'images'"):
        collect(model, ["c1"], [{"x": np.zeros((1, 3, 16, 16), np.float32)}], progress=False)
    with pytest.raises(UsageError, match="bins must be at least 16"):
        collect(model, ["c1"], feeds(1), bins=4, progress=False)


def test_collect_memory_is_bounded():
    """200 feeds of a 1x16x128x128 activation: keeping samples would need 200 MiB per tensor."""
    psutil = pytest.importorskip("psutil")
    model = conv_model(hw=128, c=16)
    per_feed = 16 * 128 * 128 * 4
    proc, rss = psutil.Process(), []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss.append(proc.memory_info().rss)
            time.sleep(0.005)

    base = proc.memory_info().rss
    sampler = threading.Thread(target=sample)
    sampler.start()
    tracemalloc.start()
    try:
        stats = collect(model, ["c1", "a1", "r"], feeds(200, hw=128), progress=False, threads=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        done.set()
        sampler.join()
    assert stats.samples == 200 and stats["c1"].count == 200 * per_feed // 4
    naive = 3 * 200 * per_feed  # 600 MiB of samples
    assert peak < 16 * per_feed < naive / 10, f"python peak {peak / 2**20:.1f} MiB"
    assert max(rss) - base < naive / 6, f"RSS grew {(max(rss) - base) / 2**20:.0f} MiB"


def test_collect_on_yolov5n(yolov5n_path: Path):
    model = onnx.load(str(yolov5n_path))
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"][:3]
    rng = np.random.default_rng(0)
    data = [{"images": rng.random((1, 3, 640, 640), dtype=np.float32)} for _ in range(2)]
    stats = collect(model, convs, data, progress=False, threads=1)
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    del ref.graph.output[:]
    ref.graph.output.extend([onnx.ValueInfoProto(name=n) for n in convs])
    sess = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [sess.run(None, f) for f in data]
    for i, n in enumerate(convs):
        assert stats[n].max == pytest.approx(max(float(o[i].max()) for o in outs), rel=1e-4)
        assert stats[n].min == pytest.approx(min(float(o[i].min()) for o in outs), rel=1e-4)
    assert not math.isnan(choose_ranges(stats, "auto")[convs[0]].rmax)


def test_collect_dynamic_shapes_and_progress_bar(capsys, monkeypatch):
    """Feeds of changing spatial size (new output buffers per shape); progress goes to stderr (off a
    terminal as lines, here from the start)."""
    from onnxslim_yolo import progress as shown
    monkeypatch.setattr(shown, "LINE_EVERY", 0.0)
    model = conv_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    for o in model.graph.output:
        if o.name == "out":
            o.type.tensor_type.shape.dim[2].dim_param = "h"
            o.type.tensor_type.shape.dim[3].dim_param = "w"
    data = [f for i, hw in enumerate((16, 16, 16, 24, 24, 24, 16, 8, 8)) for f in feeds(1, hw=hw, seed=i)]
    stats = collect(model, ["c1", "out"], data, progress=True, threads=1)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = [sess.run(["out"], f)[0] for f in data]
    assert stats["out"].count == sum(o.size for o in outs)
    assert stats["out"].max == pytest.approx(max(float(o.max()) for o in outs), rel=1e-5)
    assert stats["out"].min == pytest.approx(min(float(o.min()) for o in outs), rel=1e-5)
    err = capsys.readouterr().err
    assert "calibration" in err
