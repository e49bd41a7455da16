"""The stages of insert-qdq alone: weight quantization, activation-aware ranges, placement rules,
conv timing models, group-testing sensitivity and the mixed-precision search."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fixtures
from onnxslim_yolo import ir
from onnxslim_yolo.analysis.head import find_head
from onnxslim_yolo.analysis.histogram import StreamingHistogram, TensorStats
from onnxslim_yolo.quant import cost, mixed
from onnxslim_yolo.quant.act_range import act_range, range_error
from onnxslim_yolo.quant.placement import make_plan
from onnxslim_yolo.quant.rewrite import quantize_weight
from onnxslim_yolo.quant.sensitivity import UnitSensitivity, significant_units
from onnxslim_yolo.quant.targets import ORT_CPU, TENSORRT, weight_axis


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 6), st.integers(1, 5), st.sampled_from([0, 1]), st.booleans(), st.integers(0, 2 ** 16))
def test_quantize_weight_matches_numpy(cout: int, cin: int, axis: int, per_channel: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin, 3, 3)) * rng.uniform(0.01, 3.0)).astype(np.float32)
    if cout > 1:
        w[0] = 0.0  # an all-zero channel gets scale 1, never 0
    q, s = quantize_weight(w, axis, per_channel)
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    shape = [1] * 4
    if per_channel:
        assert s.shape == (w.shape[axis],)
        shape[axis] = -1
    else:
        assert s.shape == ()
    sb = s.reshape(shape)
    assert np.all(np.abs(q * sb - w) <= sb / 2 + 1e-7)
    assert np.all(s > 0)
    red = tuple(i for i in range(4) if i != axis) if per_channel else None
    top = np.abs(q).max(axis=red)
    assert np.all((top == 127) | (np.abs(w).max(axis=red) == 0))


def test_weight_axes() -> None:
    assert weight_axis("Conv") == 0 and weight_axis("ConvTranspose") == 1
    assert weight_axis("Gemm", trans_b=1) == 0 and weight_axis("Gemm", trans_b=0) == 1
    assert weight_axis("MatMul", rank=2) == 1


def _stats(x: np.ndarray) -> TensorStats:
    ts = TensorStats("t", StreamingHistogram(2048))
    ts.update(x)
    return ts


def test_silu_aware_range_clips_the_squashed_negatives() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 2, 200_000), rng.uniform(-40, -8, 2_000)]).astype(np.float32)
    ts = _stats(x)
    lo, hi, err = act_range(ts, "silu", "uint8", False)
    assert -12 < lo < -3 and hi > 5  # the tail below about -6 is worth nothing after SiLU
    assert err < range_error(ts, "silu", float(x.min()), float(x.max()), "uint8", False) / 4
    lo_r, _, _ = act_range(ts, "relu", "uint8", False)
    assert lo_r == pytest.approx(0.0, abs=0.5)


def test_placement_rules_ort_and_tensorrt() -> None:
    model = ir.to_model(ir.to_graph(fixtures.build_yolov5_v6(bn=False)), fixtures.build_yolov5_v6(bn=False))
    model = onnx.shape_inference.infer_shapes(model)
    head = find_head(model)
    plan = make_plan(ir.to_graph(model), head, ORT_CPU)
    assert set(plan.layers).isdisjoint(head.last_convs)
    assert all("last conv" in plan.float_nodes[n] for n in head.last_convs)
    assert not set(plan.int8_ops) & set(head.tail_nodes)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {ops[n] for n in plan.int8_ops} >= {"Sigmoid", "Mul", "Add", "Concat", "MaxPool", "Resize"}
    assert plan.derived and all(ops[n.rsplit("_output", 1)[0]] in ("MaxPool", "Concat") for n in plan.derived)
    assert set(plan.act_after.values()) == {"silu"}
    trt = make_plan(ir.to_graph(model), head, TENSORRT)
    assert set(head.last_convs) <= set(trt.layers) and not trt.int8_ops and not trt.groups
    adds = [n for n in model.graph.node if n.op_type == "Add" and n.name not in head.tail_nodes]
    assert adds and all(any(x in trt.activations for x in n.input) for n in adds)


def test_a_channels_last_image_keeps_its_exact_range_behind_the_transpose() -> None:
    """tf2onnx's N x H x W x C input reaches the first Conv through a Transpose. The image's exact
    min/max range (pixels: a clipped range only loses) was given to the graph input alone, so
    behind the Transpose the range was searched like any activation's, and the whole INT8
    table could differ from the same model's with an NCHW input."""
    from fixtures.layout import channels_last_input

    model = onnx.shape_inference.infer_shapes(channels_last_input(fixtures.build_yolov5_v6(opset=13)))
    plan = make_plan(ir.to_graph(model), find_head(model), ORT_CPU)
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    transpose = next(n for n in model.graph.node if n.op_type == "Transpose")
    assert transpose.input[0] == model.graph.input[0].name and first.input[0] == transpose.output[0]
    assert plan.graph_inputs == [transpose.output[0]] and transpose.output[0] in plan.activations


def test_conv_unit_models_run_and_time() -> None:
    keys = [cost.ConvKey(8, 16, (16, 16), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, "silu"),
            cost.ConvKey(8, 8, (16, 16), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 8, "none")]
    for k in keys:
        for int8 in (True, False):
            onnx.checker.check_model(cost._unit_model(k, int8))
    measured = cost.measure(keys, budget_ms=5)
    assert set(measured) == set(keys) and all(c.int8_ms > 0 and c.float_ms > 0 for c in measured.values())
    assert cost.slower_in_int8(cost.ConvCost(2.0, 1.0), 1.05).startswith("INT8 slower here")
    assert cost.slower_in_int8(cost.ConvCost(1.0, 2.0), 1.05) is None
    assert cost.slower_in_int8(None, 1.05) is None


def test_a_conv_timed_slower_in_int8_is_timed_again_and_the_median_round_decides(monkeypatch) -> None:
    """One round under load swung a conv from 2.7x to 0.7x: two runs of one command kept different
    convs float. A round below the bar is followed by two more; a round above it stands alone."""
    key = cost.ConvKey(8, 8, (8, 8), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, "silu")
    rounds = {"loaded": [[1.0, 1.0], [2.0, 1.4], [1.0, 2.5], [1.0, 2.4]],   # 1st: timing run
              "steady": [[1.0, 1.0], [1.0, 2.5]],
              "slow": [[1.0, 1.0], [2.0, 1.0], [2.0, 1.1], [2.1, 1.0]]}
    for name, times in rounds.items():
        left = list(times)
        monkeypatch.setattr(cost, "_time", lambda sessions, feed, runs: left.pop(0))
        got = cost.measure([key], budget_ms=5, min_speedup=1.05)[key]
        assert left == [], name
        assert (cost.slower_in_int8(got, 1.05) is None) is (name != "slow")
        assert (name, got) in {("loaded", cost.ConvCost(1.0, 2.4)), ("steady", cost.ConvCost(1.0, 2.5)),
                               ("slow", cost.ConvCost(2.0, 1.0))}
    left = [[1.0, 1.0], [2.0, 1.0]]
    assert cost.measure([key], budget_ms=5)[key] == cost.ConvCost(2.0, 1.0) and left == []   # no bar: once


class FakeEvaluator:
    """Loss = sum of planted unit noises (additive), so gains are known exactly."""

    def __init__(self, noise):
        self.noise, self.runs = noise, 0
        self.base = 0.0

    def gain(self, restored):
        self.runs += 1
        total = sum(self.noise.values())
        left = total - sum(self.noise[u] for u in set(restored))
        return 10 * np.log10(total / max(left, 1e-12))


@pytest.mark.parametrize("act", ["none", "relu", "silu"])
def test_float_unit_runs_a_float_conv(act, tmp_path) -> None:
    """onnxruntime quantizes the float weights of a Conv between DQ and Q itself
    (WeightBiasQuantization): the float unit must not let it, or it times an INT8 Conv."""
    key = cost.ConvKey(16, 16, (8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, act)
    ops = {}
    for int8 in (True, False):
        path = tmp_path / f"unit_{int8}.onnx"
        cost.unit_session(key, int8, save_optimized=str(path))
        ops[int8] = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QLinearConv" in ops[True]
    assert "QLinearConv" not in ops[False] and ops[False] & {"Conv", "FusedConv"}


def test_group_testing_finds_planted_units_in_few_runs() -> None:
    units = [f"u{i}" for i in range(64)]
    noise = {u: 0.01 for u in units}
    noise["u5"], noise["u40"] = 1.0, 0.6
    ev = FakeEvaluator(noise)
    found = significant_units(ev, [(u, (u,)) for u in units], {}, threshold_db=1.0)
    assert [r.unit for r in found] == ["u5", "u40"]
    assert ev.runs < 40  # vs 64 for one run per unit


def test_mixed_search_finds_smallest_restore() -> None:
    ranking = [UnitSensitivity(f"c{i}", (f"c{i}",), (), 10.0 - i) for i in range(10)]
    built = []
    res = mixed.search(ranking, lambda units: built.append(len(units)) or len(units), lambda k: 10 - 2 * k,
                       max_drop=3.0, first=0)
    assert res.met and len(res.restored) == 4 and res.loss == 2  # 10 - 2k <= 3 first at k = 4
    assert sorted({s["restored"] for s in res.steps}) == sorted(set([0] + built))
    never = mixed.search(ranking, lambda units: len(units), lambda k: 5.0, max_drop=1.0, first=0)
    assert not never.met and len(never.restored) == 10


# ------------------------------------------------------------------ weight range per CPU
AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx fma avx2\n"
VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni\n"


def test_x86_without_vnni_saturates_and_gets_7_bit_weights(monkeypatch) -> None:
    from onnxslim_yolo.quant import targets

    monkeypatch.setattr(targets.platform, "machine", lambda: "x86_64")
    assert targets.x86_int8_saturates(AVX2_ONLY) is True
    assert targets.x86_int8_saturates(VNNI) is False
    assert targets.x86_int8_saturates("processor\t: 0\n") is None
    assert targets.weight_range(ORT_CPU, None, AVX2_ONLY)[0] is True
    assert "no VNNI" in targets.weight_range(ORT_CPU, None, AVX2_ONLY)[1]
    assert targets.weight_range(ORT_CPU, None, VNNI)[0] is False
    assert targets.weight_range(TENSORRT, None, AVX2_ONLY)[0] is False  # TensorRT sums in 32 bits
    # OpenVINO's CPU plugin saturates as onnxruntime does (yolov5n's class scores at cosine 0.77)
    ov = targets.weight_range(targets.OPENVINO, None, AVX2_ONLY)
    assert ov[0] is True and "OpenVINO's CPU u8 x s8 kernels" in ov[1]
    assert targets.weight_range(targets.OPENVINO, None, VNNI)[0] is False
    assert targets.weight_range(ORT_CPU, False, AVX2_ONLY) == (False,
                                                               "8-bit weights (set by option reduce_range)")
    monkeypatch.setattr(targets.platform, "machine", lambda: "aarch64")
    assert targets.x86_int8_saturates(AVX2_ONLY) is False


def test_reduced_range_weights_stay_within_63() -> None:
    w = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    q, s = quantize_weight(w, 0, True, qmax=63)
    step = s.reshape(-1, 1, 1, 1)
    assert np.abs(q).max() == 63 and np.all(np.abs(q * step - w) <= step / 2 + 1e-7)
    np.testing.assert_allclose(s, np.abs(w).reshape(8, -1).max(1) / 63, rtol=1e-6)


def test_derived_ranges_resolve_a_concat_of_a_concat_listed_first():
    """A Concat reading another Concat's output may come first in the plan (YOLOv5-ghost: a
    GhostConv's Concat feeds the neck's): its range is still the union of all three inputs, and
    an output with an input that never gets a range stays without one."""
    from onnxslim_yolo.analysis.calib_table import CalibrationTable, RangeEntry
    from onnxslim_yolo.quant.placement import QuantPlan
    from onnxslim_yolo.quant.ranges import derive

    base = CalibrationTable({"a": RangeEntry(-1.0, 2.0, "mse"), "b": RangeEntry(0.0, 5.0, "mse"),
                             "c": RangeEntry(-3.0, 1.0, "mse")}, "uint8", False, {})
    plan = QuantPlan(ORT_CPU, derived={"outer": ["inner", "c"], "inner": ["a", "b"],
                                       "lost": ["a", "nowhere"]})
    table = derive(base, plan)
    assert (table["inner"].rmin, table["inner"].rmax) == (-1.0, 5.0)
    assert (table["outer"].rmin, table["outer"].rmax, table["outer"].method) == (-3.0, 5.0, "derived")
    assert "lost" not in table


def test_detection_error_reads_a_pose_export_without_its_keypoints():
    """The INT8 sensitivity's loss takes a pose export's keypoints off each row first: moving
    them leaves the boxes and class scores, and the loss, unchanged. Read raw, the keypoints
    (pixel coordinates) counted as class scores."""
    from fixtures.yolov8 import build_yolov8_pose
    from onnxslim_yolo import verify
    from onnxslim_yolo.eval.anchors import OutputReader
    from onnxslim_yolo.quant.metrics import DetectionError
    model = build_yolov8_pose(num_classes=1, keypoints=5)
    out = verify.session(model).run(None, verify.random_feeds(model, 1, 0)[0])[0]
    read, raw = DetectionError("v8", (64, 64), read=OutputReader(model)), DetectionError("v8", (64, 64))
    assert read.decoded(out)[1].shape[1] == 1 and raw.decoded(out)[1].shape[1] == 1 + 15
    moved = out.copy()
    moved[0, -15:, :] += 5.0
    assert read([read.decoded(out)], [moved]) == 0.0
    assert raw([raw.decoded(out)], [moved]) > 1.0
    boxes = out.copy()
    boxes[0, :2, :] += 5.0
    assert read([read.decoded(out)], [boxes]) > 0.0


def test_output_quality_reads_the_finite_values_of_outputs_with_the_same_infinities():
    """The INT8 guard's quality of an output holding inf at the same places in both models (RT-DETR's
    masked anchors) was NaN (a RuntimeWarning from its own SQNR); both figures now come from
    verify.diff over the finite values."""
    from onnx import numpy_helper

    from onnxslim_yolo import verify
    from onnxslim_yolo.quant.metrics import output_quality
    from tests.test_pass_manager import _masked_output_model

    ref = _masked_output_model()
    new = onnx.ModelProto()
    new.CopyFrom(ref)
    w = next(i for i in new.graph.initializer if i.name == new.graph.node[0].input[1])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(1.01), w.name))
    q = output_quality(ref, new, verify.random_feeds(ref, 2, 0))["masked"]
    assert 0.99 < q["cosine_min"] < 1.0 and 20 < q["sqnr_db_min"] < 80


def _scaled_columns(model: onnx.ModelProto, factors) -> onnx.ModelProto:
    """``model`` with its (1, N, 5+C) output's columns multiplied by ``factors``."""
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0].name
    for n in m.graph.node:
        n.output[:] = [o + "_raw" if o == out else o for o in n.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array(factors, np.float32), "factors"))
    m.graph.node.append(helper.make_node("Mul", [out + "_raw", "factors"], [out], name="scale"))
    return m


def test_guard_quality_leaves_out_class_scores_too_low_to_detect_anything():
    """The INT8 guard holds the decoded class scores to the floor as the final checks do; scores
    below the evaluation's conf in both models detect nothing, and near 0 their cosine is float
    noise (an unchanged YOLO12n's read 0.77 at 9e-8), so such feeds are left out as the checks
    leave them out; scores that can detect are still measured."""
    from onnxslim_yolo.check.numerics import input_feeds
    from onnxslim_yolo.eval.anchors import CLASS_SCORES
    from onnxslim_yolo.quant.metrics import output_quality

    yolo = fixtures.build_yolov5_v6(opset=13)
    feeds = input_feeds(yolo, None, 2, 0, None, None)
    keep = [1.0] * 4 + [1e-2] * 5   # objectness x class below 1e-4
    drop = [1.0] * 4 + [1e-2, 1e-2, 0.0, 1e-2, 0.0]
    q = output_quality(_scaled_columns(yolo, keep), _scaled_columns(yolo, drop), feeds, class_scores=True)
    assert CLASS_SCORES not in q
    keep, drop = [1.0] * 9, [1.0] * 6 + [0.0, 1.0, 0.0]
    q = output_quality(_scaled_columns(yolo, keep), _scaled_columns(yolo, drop), feeds, class_scores=True)
    assert q[CLASS_SCORES]["cosine_min"] < 0.9
