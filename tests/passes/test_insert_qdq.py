"""insert-qdq on the fixture families (both targets) and on the real yolov5n."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from types import SimpleNamespace
from typing import Dict, List

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import fixtures
from fixtures import GraphBuilder
from onnxslim_yolo import ir, verify
from onnxslim_yolo.analysis.head import find_head
from onnxslim_yolo.pass_base import PassContext, PreconditionError, UsageError
from onnxslim_yolo.passes.insert_qdq import NO_CALIB, InsertQDQ

FAMILIES = ("yolov5_focus", "yolov5_v6", "yolov8", "yolox")


def ctx(model: onnx.ModelProto, n: int = 8, **opts) -> PassContext:
    base = {"progress": False, "placement": "all", "guard": False}
    feeds = verify.random_feeds(model, n, 0)
    return PassContext(options={"insert-qdq": {**base, **opts}}, calib_inputs=feeds)


@lru_cache(maxsize=None)
def quantized(family: str, target: str = "ort-cpu", opset: int = 13):
    model = fixtures.FAMILIES[family](opset=opset, bn=False)
    res = InsertQDQ().run(model, ctx(model, target=target))
    return model, res


class G:
    """Producer/consumer index of a quantized model."""

    def __init__(self, m: onnx.ModelProto) -> None:
        self.m = m
        self.inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        self.prod = {o: n for n in m.graph.node for o in n.output}
        self.readers: Dict[str, List[onnx.NodeProto]] = {}
        for n in m.graph.node:
            for x in n.input:
                self.readers.setdefault(x, []).append(n)

    def ops(self, op: str) -> List[onnx.NodeProto]:
        return [n for n in self.m.graph.node if n.op_type == op]

    def attr(self, n: onnx.NodeProto, name: str, default=None):
        return next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == name), default)


# ------------------------------------------------------------------------------------ refusals
def test_missing_calibration_is_a_precondition_error() -> None:
    model = fixtures.build_yolov5_v6(bn=False)
    for c in (PassContext(), PassContext(calib_inputs=[])):
        with pytest.raises(PreconditionError) as e:
            InsertQDQ().requires(model, c)
        assert str(e.value) == NO_CALIB == "insert-qdq needs calibration images: pass --calib DIR"
        with pytest.raises(PreconditionError, match="--calib DIR"):
            InsertQDQ().run(model, c)


def test_bad_options_are_usage_errors() -> None:
    model = fixtures.build_yolov5_v6(bn=False)
    with pytest.raises(UsageError, match="unknown option 'colour'"):
        InsertQDQ().run(model, ctx(model, colour=1))
    with pytest.raises(UsageError, match="unknown target 'tpu'"):
        InsertQDQ().run(model, ctx(model, target="tpu"))
    with pytest.raises(UsageError, match="matches no node"):
        InsertQDQ().run(model, ctx(model, exclude=["nothing/like/this*"]))


@pytest.mark.parametrize("reduce_range", [True, False])
def test_reduce_range_option_sets_the_weight_bits(reduce_range: bool) -> None:
    model = fixtures.FAMILIES["yolov5_v6"](bn=False)
    res = InsertQDQ().run(model, ctx(model, reduce_range=reduce_range))
    g = G(res.model)
    top = max(int(np.abs(g.inits[g.prod[c.input[1]].input[0]]).max()) for c in g.ops("Conv")
              if g.prod.get(c.input[1]) is not None)
    assert top == (63 if reduce_range else 127)
    assert res.report.details["weights"]["bits"] == (7 if reduce_range else 8)


def test_already_quantized_model_is_left_unchanged() -> None:
    _, res = quantized("yolov5_v6")
    again = InsertQDQ().run(res.model, ctx(res.model))
    assert again.modified is False and again.model is res.model
    assert "already holds" in again.report.skipped[0]["reason"]


def test_a_run_that_keeps_no_layer_int8_says_so_and_leaves_the_model(monkeypatch) -> None:
    """When the guard restored every layer, the pass returned the float model as changed
    ('int8_layers=0'), optimize exited 0 and only a log line said so (half the demo's runs)."""
    from dataclasses import replace

    from onnxslim_yolo.quant.accuracy import Controller

    monkeypatch.setattr(Controller, "guard",
                        lambda self, built, feeds, floor: replace(built, model=self.q.model))
    model = fixtures.FAMILIES["yolov5_v6"](bn=False)
    res = InsertQDQ().run(model, ctx(model, guard=True))
    assert res.modified is False and res.model is model
    assert res.report.skipped[-1]["reason"].startswith("no layer stays INT8")


# ------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("family", FAMILIES)
def test_ort_cpu_structure(family: str) -> None:
    model, res = quantized(family)
    q = res.model
    onnx.checker.check_model(q, full_check=True)
    g = G(q)
    qs = g.ops("QuantizeLinear")
    assert len(qs) == res.report.counts["quantized_tensors"] > 0
    for n in qs:  # every Q feeds only DQs with the same parameters
        readers = g.readers[n.output[0]]
        assert readers
        assert all(r.op_type == "DequantizeLinear" and r.input[1:] == n.input[1:] for r in readers)
        assert g.inits[n.input[2]].dtype == np.uint8
    # decode tail untouched: no tail node reads a DQ, no Q reads a tail output
    tail = set(find_head(model).tail_nodes) | set(find_head(model).decode_convs)
    for n in q.graph.node:
        if n.name in tail:
            assert not any(g.prod.get(x) is not None and g.prod[x].op_type == "DequantizeLinear"
                           for x in n.input)
    assert not any(g.prod.get(n.input[0]) is not None and g.prod[n.input[0]].name in tail for n in qs)
    # weights: int8, symmetric per output channel along axis 0, bias int32 = x_scale * w_scale
    convs = [n for n in g.ops("Conv") if g.prod.get(n.input[1]) is not None]
    assert len(convs) == res.report.counts["int8_layers"]
    for c in convs:
        wdq = g.prod[c.input[1]]
        w, s = g.inits[wdq.input[0]], g.inits[wdq.input[1]]
        assert w.dtype == np.int8 and np.abs(w).max() <= 127 and g.attr(wdq, "axis") == 0
        assert s.shape == (w.shape[0],) and not np.any(g.inits[wdq.input[2]])
        if len(c.input) > 2:
            bdq, xdq = g.prod[c.input[2]], g.prod[c.input[0]]
            assert g.inits[bdq.input[0]].dtype == np.int32
            np.testing.assert_allclose(g.inits[bdq.input[1]], g.inits[xdq.input[1]] * s, rtol=1e-6)
    verify.check_runs(q, verify.random_feeds(q, 1, 3))


def test_shared_scales_concat_sigmoid() -> None:
    _, res = quantized("yolov5_v6")
    g = G(res.model)
    qparams = {n.input[0]: tuple(n.input[1:]) for n in g.ops("QuantizeLinear")}

    def params(t: str):
        p = g.prod.get(t)
        return tuple(p.input[1:]) if p is not None and p.op_type == "DequantizeLinear" else qparams.get(t)

    value = lambda names: {(float(g.inits[a]), int(g.inits[b])) for a, b in names}  # noqa: E731
    concats = [n for n in g.ops("Concat") if n.output[0] in qparams]
    assert concats
    for n in concats:
        assert len(value([params(x) for x in n.input] + [qparams[n.output[0]]])) == 1
    sig = [n for n in g.ops("Sigmoid") if n.output[0] in qparams]
    assert sig and all(value([qparams[n.output[0]]]) == {(np.float32(1 / 255), 0)} for n in sig)
    for n in g.ops("MaxPool"):
        if n.output[0] in qparams:
            assert value([params(n.input[0]), qparams[n.output[0]]]).__len__() == 1


def test_opset11_yolox_is_upgraded_and_valid() -> None:
    model, res = quantized("yolox", opset=11)
    assert ir.opset(model) == 11 and ir.opset(res.model) == 13
    g = G(res.model)
    axes = [g.attr(n, "axis") for n in g.ops("DequantizeLinear") if g.inits.get(n.input[0]) is not None
            and g.inits[n.input[0]].dtype == np.int8]
    assert axes and all(a == 0 for a in axes)
    depthwise = [c for c in g.ops("Conv") if (g.attr(c, "group", 1) or 1) > 1 and g.prod.get(c.input[1])]
    assert depthwise  # placement "all": depthwise convs are quantized too
    onnx.checker.check_model(res.model, full_check=True)
    verify.check_runs(res.model, verify.random_feeds(res.model, 1, 5))


@pytest.mark.parametrize("family,floor", [("yolov8", 0.95), ("yolov5_focus", 0.8)])
def test_output_cosine_floor(family: str, floor: float) -> None:
    model, res = quantized(family)
    diffs = verify.compare_models(model, res.model, verify.random_feeds(model, 3, 11))
    assert min(d.cosine for d in diffs) >= floor
    quality = res.report.details["quality"]["outputs"]
    assert set(quality) >= {o.name for o in model.graph.output}
    json.dumps(res.report.to_dict())


# --------------------------------------------------------------------------------- targets
def test_tensorrt_target_rules() -> None:
    model, res = quantized("yolov5_v6", "tensorrt")
    g = G(res.model)
    for n in g.ops("QuantizeLinear") + g.ops("DequantizeLinear"):
        zp = g.inits[n.input[2]]
        assert not np.any(zp), n.name
        assert zp.dtype == np.int8, n.name  # int8 activations and weights, no int32 bias
    head = find_head(model)
    by_name = {n.name: n for n in res.model.graph.node}
    for conv in head.last_convs:  # last convs quantized at input and weights, output float
        c = by_name[conv]
        assert g.prod[c.input[0]].op_type == g.prod[c.input[1]].op_type == "DequantizeLinear"
        assert all(r.op_type != "QuantizeLinear" for r in g.readers[c.output[0]])
    adds = [n for n in g.ops("Add") if n.name not in head.tail_nodes]
    assert adds and all(any(g.prod.get(x) is not None and g.prod[x].op_type == "DequantizeLinear"
                            for x in n.input) for n in adds)
    assert not any(g.prod.get(n.input[0]) is not None and g.prod[n.input[0]].op_type == "Sigmoid"
                   for n in g.ops("QuantizeLinear"))  # no activation outputs quantized for TensorRT
    verify.check_runs(res.model, verify.random_feeds(res.model, 1, 2))


# ---------------------------------------------------------------------------------- options
def test_exclude_keeps_nodes_float() -> None:
    model = fixtures.build_yolov5_v6(bn=False)
    res = InsertQDQ().run(model, ctx(model, exclude=["model.4/*"]))
    g = G(res.model)
    for c in g.ops("Conv"):
        if c.name.startswith("model.4/"):
            assert c.input[1] in g.inits and g.inits[c.input[1]].dtype == np.float32
    assert any(s["reason"] == "excluded by option" and s["node"].startswith("model.4/")
               for s in res.report.skipped)


def test_an_add_or_concat_fed_by_a_float_conv_still_runs_int8(monkeypatch) -> None:
    """A Conv kept float because INT8 measured slower there feeds a residual Add and a Concat whose
    other inputs and outputs are quantized: its output gets a Q too, so onnxruntime fuses both
    instead of running them in float between DQ and Q. A Conv the user excludes stays float. (An
    onnxruntime that quantizes a float Conv between Q/DQ itself would run those two Convs INT8
    anyway: then they are quantized here, per channel.)"""
    from onnxslim_yolo.check.fusion import check_ort_fusion
    from onnxslim_yolo.check.index import GraphIndex
    from onnxslim_yolo.quant import cost
    from onnxslim_yolo.quant.pipeline import Quantizer
    b = GraphBuilder(opset=13, seed=5)
    x = b.input("images", (1, 3, 32, 32))
    a = b.conv(x, 16, k=3, s=2, act="silu", name="a")
    res = b.add(a, b.conv(a, 16, k=1, name="float_res"), name="res")
    cat = b.node("Concat", [b.conv(a, 8, k=3, act="silu", name="c"), b.conv(a, 8, k=1, name="float_cat")],
                 name="cat", axis=1)
    outs = [b.conv(b.conv(t, 16, k=3, act="silu", name="head_in"), 8, k=1, name="out") for t in (res, cat)]
    model = b.make_model([x], outs)

    def run(float_weights: bool = True, **opts):
        r = InsertQDQ().run(model, ctx(model, **opts))
        g = G(r.model)
        floats = [n for n in g.ops("Conv") if n.name.startswith("float_")]
        assert len(floats) == 2
        assert all((n.input[1] in g.inits) == float_weights for n in floats)
        return r, g, floats

    r, g, floats = run(exclude=["float_*"])
    assert all([c.op_type for c in g.readers[n.output[0]]] != ["QuantizeLinear"] for n in floats)
    monkeypatch.setattr(Quantizer, "_filter", lambda self, node: "INT8 slower here (test)"
                        if node.name.startswith("float_") else None)
    by_runtime = cost.runtime_quantizes_float_convs()
    r, g, floats = run(float_weights=not by_runtime)
    expected = {n.name for n in floats} if by_runtime else set()
    assert set(r.report.details.get("runtime_quantized", ())) == expected
    check = check_ort_fusion(GraphIndex(r.model), "ort-cpu")
    assert check.status == "pass", check.message
    for n in floats:
        assert [c.op_type for c in g.readers[n.output[0]]] == ["QuantizeLinear"]
    for op in ("res", "cat"):
        node = next(n for n in r.model.graph.node if n.name.startswith(op))
        assert [g.prod[i].op_type for i in node.input] == ["DequantizeLinear"] * 2


def slow_convs_run(monkeypatch, model: onnx.ModelProto, **opts):
    """insert-qdq with every Conv named ``float_*`` measured slower in INT8; onnxruntime must fuse
    every quantized group of the result. Returns the result and its graph."""
    from onnxslim_yolo.check.fusion import check_ort_fusion
    from onnxslim_yolo.check.index import GraphIndex
    from onnxslim_yolo.quant.pipeline import Quantizer
    monkeypatch.setattr(Quantizer, "_filter", lambda self, node: "INT8 slower here (test)"
                        if node.name.startswith("float_") else None)
    r = InsertQDQ().run(model, ctx(model, **opts))
    check = check_ort_fusion(GraphIndex(r.model), "ort-cpu")
    assert check.status == "pass", check.message
    return r, G(r.model)


def test_a_residual_add_before_a_relu_runs_int8_when_its_last_conv_stays_float(monkeypatch) -> None:
    """ResNet bottlenecks whose last Conv measured slower in INT8: Add(float Conv, shortcut) -> Relu,
    the Relu's output quantized for the next block. With a downsampling shortcut Conv (INT8, its
    output quantized for the Add alone) a float Add would leave that Q -> DQ serving nothing; the
    float Conv's output gets a Q instead, and the Add and Relu run INT8. Same without a downsample."""
    b = GraphBuilder(opset=13, seed=11)
    x = b.input("images", (1, 3, 32, 32))
    a = b.conv(x, 16, k=3, s=2, act="relu", name="stem")
    y1 = b.relu(b.add(b.conv(b.conv(a, 8, k=1, act="relu", name="b1"), 32, k=1, name="float_c3"),
                      b.conv(a, 32, k=1, name="down"), name="add1"), name="relu1")
    y2 = b.relu(b.add(b.conv(b.conv(y1, 8, k=1, act="relu", name="b2"), 32, k=1, name="float_c3b"), y1,
                      name="add2"), name="relu2")
    model = b.make_model([x], [b.conv(b.conv(y2, 16, k=3, act="relu", name="head_in"), 8, k=1, name="out")])
    r, g = slow_convs_run(monkeypatch, model)
    floats = [n for n in g.ops("Conv") if n.name.startswith("float_")]
    assert len(floats) == 2 and all(g.inits[n.input[1]].dtype == np.float32 for n in floats)
    for n in floats:
        assert [c.op_type for c in g.readers[n.output[0]]] == ["QuantizeLinear"]
    for add in g.ops("Add"):
        assert [g.prod[i].op_type for i in add.input] == ["DequantizeLinear"] * 2
        assert [c.op_type for c in g.readers[add.output[0]]] == ["QuantizeLinear"]


def test_a_concat_read_through_a_slice_runs_int8_when_one_input_stays_float(monkeypatch) -> None:
    """GhostNet's ghost module: Concat(primary Conv, cheap depthwise Conv of it) -> Slice of the
    first channels -> quantized reader. With the depthwise Conv measured slower in INT8, its
    output gets a Q and the Concat and Slice run on uint8 instead of in float between DQ and Q.
    (Between Q/DQ then, an onnxruntime that quantizes float Convs itself would run the depthwise
    Conv INT8 anyway: it is quantized here, per channel.)"""
    from onnxslim_yolo.quant import cost
    b = GraphBuilder(opset=13, seed=5)
    x = b.input("images", (1, 3, 32, 32))
    a = b.conv(x, 16, k=3, s=2, act="relu", name="stem")
    p = b.conv(a, 16, k=1, name="primary")
    cat = b.node("Concat", [p, b.conv(p, 16, k=3, groups=16, name="float_cheap")], name="cat", axis=1)
    half = b.slice(cat, [0], [24], [1], name="keep")
    model = b.make_model([x], [b.conv(b.conv(half, 16, k=3, act="relu", name="next"), 8, k=1, name="out")])
    r, g = slow_convs_run(monkeypatch, model)
    cheap = next(n for n in g.ops("Conv") if n.name.startswith("float_"))
    by_runtime = cost.runtime_quantizes_float_convs()
    assert (cheap.input[1] in g.inits) != by_runtime
    assert set(r.report.details.get("runtime_quantized", ())) == ({cheap.name} if by_runtime else set())
    assert [c.op_type for c in g.readers[cheap.output[0]]] == ["QuantizeLinear"]
    concat = g.ops("Concat")[0]
    assert [g.prod[i].op_type for i in concat.input] == ["DequantizeLinear"] * 2


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_an_upsample_quantized_on_both_sides_runs_int8(monkeypatch, mode: str) -> None:
    """YOLOv5-ghost: a ghost module's Concat (its depthwise Conv measured slower in INT8) is
    upsampled for one neck Concat and read by a later one. Both Concats are completed, so the
    Resize's input and output are quantized anyway: a nearest one runs INT8 in one range, not in
    float between a DQ and a Q of different ranges (onnxruntime left that unfused). onnxruntime
    keeps an interpolating (linear) Resize float between Q/DQ whatever the ranges: it is not
    planned INT8, and onnxruntime fuses every group either way (``slow_convs_run`` checks)."""
    b = GraphBuilder(opset=13, seed=7)
    x = b.input("images", (1, 3, 32, 32))
    a = b.conv(x, 16, k=3, s=2, act="silu", name="stem")
    p = b.conv(a, 8, k=1, act="silu", name="primary")
    ghost = b.node("Concat", [p, b.conv(p, 8, k=3, groups=8, act="silu", name="float_cheap")], name="ghost",
                   axis=1)
    up = b.resize2x(ghost, name="up", mode=mode)
    near = b.node("Concat", [up, b.conv(x, 16, k=3, act="silu", name="side")], name="near", axis=1)
    far = b.node("Concat", [ghost, b.conv(a, 16, k=3, act="silu", name="lateral")], name="far", axis=1)
    outs = [b.conv(b.conv(t, 16, k=3, act="silu", name=f"{n}_in"), 8, k=1, name=f"{n}_out")
            for t, n in ((near, "p3"), (far, "p4"))]
    r, g = slow_convs_run(monkeypatch, b.make_model([x], outs))
    resize = g.ops("Resize")[0]
    if mode == "linear":
        return
    assert g.prod[resize.input[0]].op_type == "DequantizeLinear"
    assert [c.op_type for c in g.readers[resize.output[0]]] == ["QuantizeLinear"]
    dq, q = g.prod[resize.input[0]], g.readers[resize.output[0]][0]
    assert [g.inits[dq.input[i]].item() for i in (1, 2)] == [g.inits[q.input[i]].item() for i in (1, 2)]


def test_a_conv_onnxruntime_would_quantize_itself_is_quantized_per_channel(monkeypatch, tmp_path) -> None:
    """A Conv measured slower in INT8, between a quantized input and a quantized output: this
    onnxruntime quantizes its float weights itself (per tensor) and runs it as a QLinearConv, so
    the placement quantizes it (per channel). Kept float when the user excludes it, and when the
    runtime does not do that; then the fusion check says that onnxruntime quantizes it anyway."""
    from onnxslim_yolo.check.fusion import check_ort_fusion
    from onnxslim_yolo.check.index import GraphIndex
    from onnxslim_yolo.quant import cost, placement
    b = GraphBuilder(opset=13, seed=3)
    x = b.input("images", (1, 3, 32, 32))
    a = b.conv(x, 16, k=3, s=2, name="stem")  # its output quantized: DQ-Conv-Q, read as DQ(a)
    mid = b.conv(a, 16, k=3, name="float_mid")
    model = b.make_model([x], [b.conv(b.conv(mid, 16, k=3, act="relu", name="next"), 8, k=1, name="out")])
    if not cost.runtime_quantizes_float_convs():
        pytest.skip("this onnxruntime does not quantize float Convs between Q/DQ itself")
    name = next(n.name for n in model.graph.node if n.name.startswith("float_mid"))
    r, g = slow_convs_run(monkeypatch, model)
    d = r.report.details
    assert name in d["int8_layers"] and d["runtime_quantized"][name] == placement.RUNTIME_QUANTIZED_WHY
    assert r.report.counts["runtime_quantized_layers"] == 1
    w = g.prod[next(n for n in g.ops("Conv") if n.name == name).input[1]]
    assert w.op_type == "DequantizeLinear" and g.inits[w.input[1]].shape == (16,)  # per channel
    path = tmp_path / "ort.onnx"
    verify.session(r.model, save_optimized=str(path))
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("QLinearConv") == len(d["int8_layers"])
    excluded = InsertQDQ().run(model, ctx(model, exclude=["float_mid*"]))
    kept = excluded.report.details
    assert name not in kept["int8_layers"] and "runtime_quantized" not in kept
    check = check_ort_fusion(GraphIndex(excluded.model), "ort-cpu")  # the exclusion is undone at run time
    assert check.status == "warn" and check.details["quantized_by_onnxruntime"] == [name]
    assert "onnxruntime quantizes 1 float weight layer(s) itself" in check.message
    monkeypatch.setattr(cost, "runtime_quantizes_float_convs", lambda: False)
    plain = InsertQDQ().run(model, ctx(model)).report.details
    assert name not in plain["int8_layers"] and "runtime_quantized" not in plain


def test_a_relu_into_a_concat_keeps_its_own_range_so_onnxruntime_drops_it() -> None:
    """RepVGG / ShuffleNet style: Relu outputs concatenated with signed tensors. In the Concat's
    shared range the Relu's Q would get a zero point inside the range and the Relu would run in
    float; with its own range [0, max] (zero point 0) onnxruntime removes it."""
    from onnxslim_yolo.check.fusion import check_ort_fusion
    from onnxslim_yolo.check.index import GraphIndex
    b = GraphBuilder(opset=13, seed=7)
    x = b.input("images", (1, 3, 32, 32))
    a = b.conv(x, 16, k=3, s=2, act="silu", name="a")
    cat = b.node("Concat", [b.conv(a, 8, k=3, act="relu", name="r"), b.conv(a, 8, k=1, name="signed")],
                 name="cat", axis=1)
    model = b.make_model([x], [b.conv(b.conv(cat, 16, k=3, act="silu", name="c"), 8, k=1, name="out")])
    r = InsertQDQ().run(model, ctx(model))
    check = check_ort_fusion(GraphIndex(r.model), "ort-cpu")
    assert check.status == "pass", check.message
    g = G(r.model)
    relu = next(n for n in g.ops("Relu"))
    q = g.readers[relu.output[0]]
    assert [n.op_type for n in q] == ["QuantizeLinear"] and int(g.inits[q[0].input[2]]) == 0
    concat = g.ops("Concat")[0]
    other = g.prod[g.prod[concat.input[1]].input[0]]
    assert other.op_type == "QuantizeLinear" and int(g.inits[other.input[2]]) > 0


def test_calibration_table_saved_then_loaded(tmp_path) -> None:
    model = fixtures.build_yolov5_v6(bn=False)
    path = tmp_path / "calib.json"
    first = InsertQDQ().run(model, ctx(model, calib_table=str(path)))
    assert path.exists() and first.report.details["calibration"]["calibration_table"] == str(path)
    # other images, same table: identical model
    c2 = PassContext(options={"insert-qdq": {"progress": False, "placement": "all", "calib_table": str(path),
                                             "guard": False,
                                             "bias_correction": False}},
                     calib_inputs=verify.random_feeds(model, 2, 99))
    again = InsertQDQ().run(model, c2)
    assert "loaded from" in again.report.details["calibration"]["calibration"]

    def scales(m: onnx.ModelProto) -> Dict[str, float]:
        g = G(m)
        return {n.input[0]: float(g.inits[n.input[1]]) for n in g.ops("QuantizeLinear")}

    assert scales(first.model) == scales(again.model)
    with pytest.raises(UsageError, match="target tensorrt needs int8"):
        InsertQDQ().run(model, ctx(model, calib_table=str(path), target="tensorrt"))


def test_a_calibration_table_for_another_model_or_with_broken_ranges_is_refused(tmp_path, caplog) -> None:
    """A table saved for one model loaded silently for another with the same tensor names (other
    weights: class-score cosine 0.001 on yolov5n), and a hand-edited range ran: NaN wrote scale 1,
    inf wrote scale inf, an inverted range quantized."""
    model = fixtures.build_yolov5_v6(bn=False)
    path = tmp_path / "calib.json"
    InsertQDQ().run(model, ctx(model, calib_table=str(path)))
    other = fixtures.build_yolov5_v6(bn=False, seed=1)   # same graph and names, other weights
    assert {t.name for t in other.graph.initializer} == {t.name for t in model.graph.initializer}
    with pytest.raises(UsageError, match=r"calib.json: calibration table was made for another model"):
        InsertQDQ().run(other, ctx(other, calib_table=str(path)))
    assert InsertQDQ().run(model, ctx(model, calib_table=str(path))).modified   # its own model loads it
    # another method asked of a saved table: the table's ranges are used, and that is said
    with caplog.at_level("WARNING"):
        InsertQDQ().run(model, ctx(model, calib_table=str(path), method="minmax"))
    assert "ranges loaded from the table, calibrated with method auto; method minmax is not applied" \
        in caplog.text
    saved = json.loads(path.read_text())
    name = next(iter(saved["tensors"]))
    for rmin, rmax in (("nan", 1.0), (0.0, "inf"), (5.0, 1.0)):
        entry = {**saved["tensors"][name], "rmin": rmin, "rmax": rmax}
        bad = dict(saved, tensors={**saved["tensors"], name: entry})
        path.write_text(json.dumps(bad))
        with pytest.raises(UsageError, match=rf"calib.json: tensor '{re.escape(name)}' has range \[.*\]; a "
                                             "range must be finite, its minimum at most its maximum"):
            InsertQDQ().run(model, ctx(model, calib_table=str(path)))


def _scales(m: onnx.ModelProto) -> Dict[str, float]:
    g = G(m)
    return {n.input[0]: float(g.inits[n.input[1]]) for n in g.ops("QuantizeLinear")}


def test_auto_keeps_the_calibration_table_measured_better_at_the_outputs(monkeypatch, tmp_path) -> None:
    """auto builds the per-tensor table and the percentile one from the same statistics, and keeps
    the one whose INT8 model has the higher output SQNR: here a stand-in measurement prefers the
    percentile table, so the model gets its scales (the image input keeps its exact min/max)."""
    from onnxslim_yolo.quant import pipeline

    model = fixtures.build_yolov8(bn=False)
    # an output both tables leave exact (infinite SQNR) counts as 100 dB and decides nothing
    exact = {"sqnr_db_mean": float("inf")}
    measured = iter([{"output0": {"sqnr_db_mean": 10.0}, "head": exact},
                     {"output0": {"sqnr_db_mean": 20.0}, "head": exact}])
    monkeypatch.setattr(pipeline, "metrics", SimpleNamespace(output_quality=lambda *a, **k: next(measured)))
    table = tmp_path / "calib.json"
    res = InsertQDQ().run(model, ctx(model, calib_table=str(table), bias_correction=False))
    choice = res.report.details["calibration"]["choice"]
    assert choice["sqnr_db"] == {"auto": 55.0, "percentile": 60.0} and choice["chosen"] == "percentile"
    monkeypatch.undo()
    pct = InsertQDQ().run(model, ctx(model, method="percentile", bias_correction=False))
    image = model.graph.input[0].name
    got, want = _scales(res.model), _scales(pct.model)
    assert {k: v for k, v in got.items() if k != image} == {k: v for k, v in want.items() if k != image}
    per_tensor = InsertQDQ().run(model, ctx(model, choice_images=0, bias_correction=False))
    assert "choice" not in per_tensor.report.details["calibration"]
    assert got != _scales(per_tensor.model)
    # the saved table is the chosen one: loading it gives the same model
    again = InsertQDQ().run(model, ctx(model, calib_table=str(table), bias_correction=False))
    assert _scales(again.model) == got


def test_auto_choice_is_the_higher_measured_sqnr() -> None:
    model = fixtures.build_yolov8(bn=False)
    res = InsertQDQ().run(model, ctx(model))
    choice = res.report.details["calibration"]["choice"]
    assert set(choice["sqnr_db"]) == {"auto", "percentile"} and choice["images"] == 8
    sqnr = choice["sqnr_db"]
    assert choice["chosen"] == ("percentile" if sqnr["percentile"] >= sqnr["auto"] + 0.5 else "auto")


def test_auto_keeps_the_per_tensor_table_within_the_margin(monkeypatch) -> None:
    from onnxslim_yolo.quant import pipeline

    model = fixtures.build_yolov8(bn=False)
    for auto, pct, chosen in ((30.0, 30.4, "auto"), (30.0, 30.5, "percentile"), (30.0, 29.0, "auto")):
        measured = iter([{"output0": {"sqnr_db_mean": auto}}, {"output0": {"sqnr_db_mean": pct}}])
        stand_in = SimpleNamespace(output_quality=lambda *a, **k: next(measured))
        monkeypatch.setattr(pipeline, "metrics", stand_in)
        res = InsertQDQ().run(model, ctx(model, n=2, bias_correction=False))
        assert res.report.details["calibration"]["choice"]["chosen"] == chosen, (auto, pct)


def test_calibration_table_pins_the_measured_placement(tmp_path) -> None:
    model = fixtures.build_yolov5_v6(bn=False, img=128)
    path = str(tmp_path / "calib.json")
    first = InsertQDQ().run(model, ctx(model, placement="measure", calib_table=path))
    again = InsertQDQ().run(model, ctx(model, placement="measure", calib_table=path))
    assert "measure_convs" in first.report.details["seconds"]
    assert "measure_convs" not in again.report.details["seconds"]  # timings came from the table
    assert again.report.details["conv_timings"] == first.report.details["conv_timings"]
    assert again.report.details["int8_layers"] == first.report.details["int8_layers"]


def test_bias_correction_changes_biases() -> None:
    model = fixtures.build_yolov5_v6(bn=False)
    on = InsertQDQ().run(model, ctx(model))
    off = InsertQDQ().run(model, ctx(model, bias_correction=False))
    corr = on.report.details["bias_correction"]
    assert corr and all(v >= 0 for v in corr.values()) and "bias_correction" not in off.report.details
    int32 = lambda m: {i.name: numpy_helper.to_array(i) for i in m.graph.initializer  # noqa: E731
                       if i.data_type == onnx.TensorProto.INT32 and i.dims}
    b_on, b_off = int32(on.model), int32(off.model)
    assert b_on.keys() == b_off.keys() and b_on
    changed = [k for k in b_on if not np.array_equal(b_on[k], b_off[k])]
    assert len(changed) >= len(b_on) // 2


def test_measured_placement_reports_timings() -> None:
    model = fixtures.build_yolov5_v6(bn=False, img=128)
    res = InsertQDQ().run(model, ctx(model, placement="measure"))
    timings = res.report.details["conv_timings"]
    assert timings and all(t["int8_ms"] > 0 and t["float_ms"] > 0 for t in timings)
    slower = {n for t in timings if t["speedup"] < 1.05 for n in t["nodes"]}
    reasons = {s["node"]: s["reason"] for s in res.report.skipped}
    assert all(reasons[n].startswith("INT8 slower here") for n in slower)
    assert set(res.report.details["int8_layers"]).isdisjoint(slower)


def test_sensitivity_and_mixed_precision(caplog) -> None:
    model = fixtures.build_yolov8(bn=False)
    with caplog.at_level("WARNING"):
        res = InsertQDQ().run(model, ctx(model, sensitivity=True, max_drop=1e9, mixed_images=2))
    # without labels the drop is not in mAP points, as the option's help says: the log says so
    assert "max_drop 1000000000.0 without labels is measured as 100 x (1 - detection agreement with the " \
           "float model) on 2 calibration images, not in mAP points" in caplog.text
    sens = res.report.details["sensitivity"]
    gains = [r["sqnr_gain_db"] for r in sens["ranking"]]
    assert gains == sorted(gains, reverse=True) and len(gains) >= res.report.counts["int8_layers"]
    mixed = res.report.details["mixed_precision"]
    assert mixed["met"] and mixed["restored"] == [] and mixed["steps"][0]["restored"] == 0
    strict = InsertQDQ().run(model, ctx(model, max_drop=0.0, mixed_images=2))
    m2 = strict.report.details["mixed_precision"]
    assert m2["steps"][0]["loss"] > 0  # the all-INT8 model does not reproduce every detection
    assert m2["restored"] and (m2["final"] <= 0.0) == m2["met"]
    assert strict.report.counts["int8_layers"] < res.report.counts["int8_layers"]


def test_guard_keeps_the_manager_floor() -> None:
    """A random-weight YOLOX amplifies rounding noise (cosine ~0.6 fully INT8): the guard restores
    the most sensitive layers until the manager's check passes on the manager's own inputs."""
    model = fixtures.build_yolox(opset=11, bn=False)
    c = ctx(model, guard=True)
    res = InsertQDQ().run(model, c)
    guard = res.report.details["guard"]
    assert guard["cosine_before"] < 0.9 <= guard["target_cosine"] and guard["met"] and guard["restored"]
    feeds = verify.random_feeds(model, c.verify_samples, c.seed) + list(c.calib_inputs[: c.verify_samples])
    diffs = verify.compare_models(ir.ensure_opset(model, 13), res.model, feeds)
    assert min(d.cosine for d in diffs) >= c.tolerances.lossy_min_cosine
    assert res.report.counts["int8_layers"] >= 1


def test_the_guard_holds_the_decoded_class_scores_to_the_floor_too(monkeypatch) -> None:
    """The final checks compare the decoded class scores on their own (box pixels outweigh them in
    a cosine over the whole output). The guard watched whole outputs only: yolov5n with --method
    entropy passed it (cosine 0.9995) and failed the checks (class scores 0.838, exit 1). Here a
    stand-in measurement puts the class scores below the floor while more than half of the Convs
    are INT8; the guard restores layers until they are not."""
    from onnxslim_yolo.quant import metrics

    model = fixtures.build_yolov5_v6(bn=False)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    real = metrics.output_quality

    def int8_convs(m: onnx.ModelProto) -> int:
        dq = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return sum(n.op_type == "Conv" and n.input[1] in dq for n in m.graph.node)

    def stand_in(ref, new, feeds, extra=(), threads=0, class_scores=False):
        # every output and head map well above the floor; the class scores below it, as measured
        measured = real(ref, new, feeds, extra, threads, class_scores)
        q = {k: dict(v, cosine_min=0.999) for k, v in measured.items()}
        if class_scores:
            low = int8_convs(new) > convs // 2
            q[metrics.CLASS_SCORES] = dict(q[metrics.CLASS_SCORES], cosine_min=0.5 if low else 0.95)
        return q

    monkeypatch.setattr(metrics, "output_quality", stand_in)
    res = InsertQDQ().run(model, ctx(model, guard=True))
    guard = res.report.details["guard"]
    assert guard["cosine_before"] == 0.5 and guard["met"] and guard["restored"]
    assert 0 < int8_convs(res.model) <= convs // 2
    assert res.report.details["quality"]["outputs"][metrics.CLASS_SCORES]["cosine_min"] == 0.95


def test_guard_judges_an_nms_output_by_its_candidates() -> None:
    """With NMS inside the graph, the kept rows reorder under INT8 noise: judged by them (cosine far
    below the floor) the guard would restore every layer. It measures the boxes and scores fed to
    the NMS instead. How far INT8 moves those depends on the CPU's kernels (VNNI or not), so the
    guard either leaves the plan alone or starts from the candidates' cosine."""
    from fixtures.postprocess import append_nms
    from onnxslim_yolo.quant.accuracy import GUARD_MARGIN
    model = append_nms(fixtures.build_yolov5_v6(bn=False))
    c = ctx(model, guard=True)
    feeds = verify.random_feeds(model, c.verify_samples, c.seed) + list(c.calib_inputs[: c.verify_samples])

    def worst(m):
        diffs = verify.compare_models(model, m, feeds)
        return {r: min(d.cosine for d in diffs if d.role == r) for r in ("selected", "candidates")}, diffs

    plain = InsertQDQ().run(model, ctx(model, guard=False))
    before, _ = worst(plain.model)
    assert before["selected"] < c.tolerances.lossy_min_cosine
    res = InsertQDQ().run(model, c)
    after, diffs = worst(res.model)
    assert verify.check_contract(diffs, "lossy", c.tolerances)[0]
    assert after["candidates"] >= c.tolerances.lossy_min_cosine
    guard = res.report.details.get("guard")
    if before["candidates"] >= c.tolerances.lossy_min_cosine + GUARD_MARGIN:
        assert guard is None and res.report.counts["int8_layers"] == plain.report.counts["int8_layers"] >= 10
    else:
        assert guard["cosine_before"] == pytest.approx(before["candidates"], abs=1e-3)


# -------------------------------------------------------------------------------- real model
def test_yolov5n_sixteen_images(yolov5n_path, coco128) -> None:
    from onnxslim_yolo.data import load_calibration
    from onnxslim_yolo.quant.metrics import DetectionError

    model = ir.load(yolov5n_path)
    feeds = load_calibration(coco128 / "images", model, limit=16, progress=False)
    res = InsertQDQ().run(model, PassContext(options={"insert-qdq": {"progress": False}}, calib_inputs=feeds))
    counts, details = res.report.counts, res.report.details
    assert counts["int8_layers"] >= 45 and counts["decode_tail_nodes"] == 37
    assert details["head"]["family"] == "yolov5"
    assert details["quality"]["outputs"]["output"]["cosine_min"] > 0.999
    err = DetectionError("v5", (640, 640))
    fs = [feeds[i] for i in range(0, 16, 2)]
    ref = [err.decoded(o[0]) for o in (verify.session(model).run(None, f) for f in fs)]
    qs = verify.session(res.model)
    loss = err(ref, [qs.run(None, f)[0] for f in fs])
    assert -10 * np.log10(loss) > 11.0  # int8 default lands near 13.7 dB on all 128 images


def _layers_model() -> onnx.ModelProto:
    """Conv -> ConvTranspose -> Conv -> Flatten -> Gemm(transB): one of each weight layer."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32))  # noqa: E731
    inits = [w(8, 3, 3, 3), w(8, 4, 2, 2), w(4, 4, 3, 3), w(10, 4 * 16 * 16)]
    for t, name in zip(inits, ("w0", "wt", "w1", "wg")):
        t.name = name
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["a"], ["ar"], name="relu0"),
             helper.make_node("ConvTranspose", ["ar", "wt"], ["b"], name="up", strides=[2, 2]),
             helper.make_node("Conv", ["b", "w1"], ["c"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wg"], ["y"], name="fc", transB=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])
    g = helper.make_graph(nodes, "layers", [x], [y], inits)
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_axes_per_layer_type(per_channel: bool) -> None:
    model = _layers_model()
    trt = InsertQDQ().run(model, ctx(model, target="tensorrt", per_channel=per_channel))
    g = G(trt.model)
    axis = {n.name: g.attr(g.prod[n.input[1]], "axis") for n in trt.model.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "Gemm") and g.prod.get(n.input[1]) is not None}
    if per_channel:
        assert axis == {"conv0": 0, "up": 1, "conv1": 0, "fc": 0}
    else:
        assert set(axis) == {"conv0", "up", "conv1", "fc"} and set(axis.values()) == {None}
    ort = InsertQDQ().run(model, ctx(model, per_channel=per_channel))
    reasons = {s["node"]: s["reason"] for s in ort.report.skipped}
    assert "no INT8 ConvTranspose kernel" in reasons["up"]
    assert reasons["fc"].startswith("last conv")  # the Gemm feeds the output: the "head"
    verify.check_runs(ort.model, verify.random_feeds(ort.model, 1, 0))
    verify.check_runs(trt.model, verify.random_feeds(trt.model, 1, 0))


@pytest.mark.parametrize("target", ["tensorrt", "openvino"])
def test_sensitivity_sees_the_layers_of_placements_that_quantize_layer_inputs(target):
    """Under the tensorrt and openvino placements a quantized tensor comes from a float op and is
    read by INT8 Convs behind its Q/DQ pair: those Convs are its units. Before, such tensors had
    none, the ranking was empty, and the accuracy guard could restore nothing."""
    from fixtures import demo_paths
    from onnxslim_yolo import ir
    from onnxslim_yolo.api import optimize

    model_path, images, _ = demo_paths()
    res = optimize(ir.load(model_path), int8=True, calib=images, calib_limit=4, bench=False, check=False,
                   progress=False, target=target,
                   pass_options={"insert-qdq": {"target": target, "sensitivity": True, "placement": "all",
                                                "guard": False}})
    rep = next(r for r in res.pipeline.records if r.name == "insert-qdq").report
    ranking = rep["details"]["sensitivity"]["ranking"]
    dq = {n.output[0] for n in res.model.graph.node if n.op_type == "DequantizeLinear"}
    int8_convs = {n.name for n in res.model.graph.node if n.op_type == "Conv" and n.input[1] in dq}
    assert len(int8_convs) == rep["counts"]["int8_layers"] > 10
    # every INT8 Conv can be restored by some candidate
    assert int8_convs <= set().union(*(r["nodes"] for r in ranking))


@pytest.mark.parametrize("target", ["tensorrt", "openvino", "ort-cpu"])
def test_every_int8_depthwise_conv_is_one_more_candidate(target):
    """The depthwise Convs of a YOLOX-style model, restored together, are a candidate of the
    sensitivity ranking (their per-tensor input loss adds up; one at a time each gains little)."""
    from onnxslim_yolo import verify
    from onnxslim_yolo.quant.sensitivity import GROUPED

    model = fixtures.build_yolox(opset=13)
    from onnxslim_yolo.pass_base import PassContext
    from onnxslim_yolo.passes.insert_qdq import InsertQDQ

    feeds = verify.random_feeds(model, 4, 0)

    ctx = PassContext(options={"insert-qdq": {"target": target, "sensitivity": True, "placement": "all",
                                              "guard": False, "progress": False}}, calib_inputs=feeds)
    res = InsertQDQ().run(model, ctx)
    ranking = res.report.details["sensitivity"]["ranking"]
    dq = {n.output[0] for n in res.model.graph.node if n.op_type == "DequantizeLinear"}
    grouped = {n.name for n in res.model.graph.node if n.op_type == "Conv" and n.input[1] in dq
               and any(a.name == "group" and a.i > 1 for a in n.attribute)}
    assert len(grouped) >= 2
    (cand,) = [r for r in ranking if r["candidate"] == GROUPED]
    assert grouped <= set(cand["nodes"])
    plain = InsertQDQ().run(fixtures.build_yolov5_v6(opset=13), PassContext(
        options=ctx.options, calib_inputs=verify.random_feeds(fixtures.build_yolov5_v6(opset=13), 4, 0)))
    assert GROUPED not in [r["candidate"] for r in plain.report.details["sensitivity"]["ranking"]]


def _token_stem() -> list:
    """Conv (w0) -> Relu -> Reshape (tok) -> Transpose: x (1, 3, 8, 8) as 64 tokens 'tt' of 16."""
    from onnx import helper

    return [helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0", kernel_shape=[3, 3], pads=[1] * 4),
            helper.make_node("Relu", ["a"], ["ar"], name="relu0"),
            helper.make_node("Reshape", ["ar", "tok"], ["t"], name="flat"),
            helper.make_node("Transpose", ["t"], ["tt"], name="tr", perm=[0, 2, 1])]


def _linear_block(bias_op: str = "Add") -> onnx.ModelProto:
    """Conv -> tokens -> MatMul -> + bias (or x scale) -> MatMul -> Relu -> Conv: a Linear layer's
    bias Add (a LayerScale Mul) between two INT8 layers, as transformer blocks export it."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w0", rng.normal(0, 0.3, (16, 3, 3, 3))), ("w1", rng.normal(0, 0.3, (16, 16))),
        ("c", rng.normal(0.5, 0.4, (16,))), ("w2", rng.normal(0, 0.3, (16, 16))),
        ("w3", rng.normal(0, 0.3, (8, 16, 1, 1))))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("tok", [1, 16, 64]), ("img", [1, 16, 8, 8]))]
    nodes = _token_stem() + [
             helper.make_node("MatMul", ["tt", "w1"], ["m1"], name="fc1"),
             helper.make_node(bias_op, ["m1", "c"], ["m1b"], name="bias"),
             helper.make_node("MatMul", ["m1b", "w2"], ["m2"], name="fc2"),
             helper.make_node("Relu", ["m2"], ["m2r"], name="relu2"),
             helper.make_node("Transpose", ["m2r"], ["back"], name="tr2", perm=[0, 2, 1]),
             helper.make_node("Reshape", ["back", "img"], ["im"], name="unflat"),
             helper.make_node("Conv", ["im", "w3"], ["y"], name="conv1", kernel_shape=[1, 1])]
    return _image_model(nodes, inits, "linear")


def _image_model(nodes: list, inits: list, name: str) -> onnx.ModelProto:
    """A checked opset-13 model of ``nodes`` from x (1, 3, 8, 8) to y (1, 8, 8, 8)."""
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("bias_op, fused", [("Add", "QLinearAdd"), ("Mul", "QLinearMul")])
def test_a_constant_operand_between_int8_layers_is_quantized_so_onnxruntime_fuses(bias_op, fused) -> None:
    """A bias Add (scale Mul) between two INT8 MatMuls ran in float between DQ and Q, since its
    constant was float (qdq.ort_fusion warned; 31 such Adds in RT-DETR-l). The constant is now
    quantized per tensor with it, and onnxruntime runs the op as one QLinear kernel."""
    from onnxslim_yolo.check import run_checks

    model = _linear_block(bias_op)
    res = InsertQDQ().run(model, ctx(model))
    g = G(res.model)
    op = next(n for n in g.ops(bias_op) if n.name == "bias")
    const_dq = next(g.prod[x] for x in op.input if g.prod.get(x) is not None
                    and g.prod[x].input[0] in g.inits)
    assert const_dq.op_type == "DequantizeLinear" and g.inits[const_dq.input[0]].dtype == np.uint8
    c = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "c"))
    s, z = (float(g.inits[const_dq.input[1]]), int(g.inits[const_dq.input[2]]))
    back = (g.inits[const_dq.input[0]].astype(np.int32) - z) * s
    assert np.abs(back - c).max() <= s / 2 + 1e-7
    assert all(g.prod[x].op_type == "DequantizeLinear" for x in op.input)
    assert res.report.details["placement"]["int8_ops"] >= 1
    optimized = verify.optimized_model(res.model)
    assert fused in [n.op_type for n in optimized.graph.node]
    fusion = next(r for r in run_checks(res.model, latency=False).results if r.name == "qdq.ort_fusion")
    assert fusion.status == "pass", fusion.message
    feeds = verify.random_feeds(model, 4, 1)
    assert min(d.cosine for d in verify.compare_models(model, res.model, feeds)) > 0.99


def test_a_batched_matmul_weight_gets_one_scale_so_onnxruntime_fuses() -> None:
    """YOLO-World's attention multiplies by constant text embeddings of shape [1, heads, d,
    classes]. With a scale per column onnxruntime ran that MatMul as DQ + float MatMul + Q
    (qdq.ort_fusion warned); a batched weight now gets one scale and runs as QLinearMatMul."""
    from onnx import helper

    from onnxslim_yolo.check import run_checks

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (1, 2, 8, 16)) * np.array([1, 8])[None, :, None, None]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w0", rng.normal(0, 0.3, (16, 3, 3, 3))), ("w1", w1), ("w2", rng.normal(0, 0.3, (8, 32, 1, 1))))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("heads", [1, 2, 8, 64]), ("img", [1, 32, 8, 8]))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["ar"], name="relu0"),
             helper.make_node("Reshape", ["ar", "heads"], ["h"], name="split_heads"),
             helper.make_node("Transpose", ["h"], ["ht"], name="tr", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["ht", "w1"], ["m"], name="attn"),
             helper.make_node("Relu", ["m"], ["mr"], name="relu1"),
             helper.make_node("Transpose", ["mr"], ["back"], name="tr2", perm=[0, 1, 3, 2]),
             helper.make_node("Reshape", ["back", "img"], ["im"], name="unflat"),
             helper.make_node("Conv", ["im", "w2"], ["y"], name="conv1", kernel_shape=[1, 1])]
    model = _image_model(nodes, inits, "batched")
    res = InsertQDQ().run(model, ctx(model))
    g = G(res.model)
    attn = next(n for n in g.ops("MatMul") if n.name == "attn")
    w_dq = g.prod[attn.input[1]]
    assert w_dq.op_type == "DequantizeLinear" and g.inits[w_dq.input[0]].shape == (1, 2, 8, 16)
    assert g.inits[w_dq.input[1]].size == 1
    conv_dq = g.prod[next(n for n in g.ops("Conv") if n.name == "conv0").input[1]]
    assert g.inits[conv_dq.input[1]].shape == (16,)  # 2-D and Conv weights stay per channel
    assert "QLinearMatMul" in [n.op_type for n in verify.optimized_model(res.model).graph.node]
    fusion = next(r for r in run_checks(res.model, latency=False).results if r.name == "qdq.ort_fusion")
    assert fusion.status == "pass", fusion.message
    feeds = verify.random_feeds(model, 4, 1)
    assert min(d.cosine for d in verify.compare_models(model, res.model, feeds)) > 0.99


def _postnorm_block() -> onnx.ModelProto:
    """Conv -> tokens -> LayerNorm(x + Linear(x)) -> Linear -> Relu -> Conv -> Relu -> Conv (opset 17)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w0", rng.normal(0, 0.3, (16, 3, 3, 3))), ("w1", rng.normal(0, 0.3, (16, 16))),
        ("c", rng.normal(0, 0.1, (16,))), ("gamma", rng.uniform(0.5, 1.5, (16,))),
        ("beta", rng.normal(0, 0.1, (16,))), ("w2", rng.normal(0, 0.3, (16, 16))),
        ("w3", rng.normal(0, 0.3, (16, 16, 3, 3))), ("w4", rng.normal(0, 0.3, (8, 16, 1, 1))))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("tok", [1, 16, 64]), ("img", [1, 16, 8, 8]))]
    nodes = _token_stem() + [
             helper.make_node("MatMul", ["tt", "w1"], ["m1"], name="fc1"),
             helper.make_node("Add", ["m1", "c"], ["m1b"], name="bias"),
             helper.make_node("Add", ["tt", "m1b"], ["res"], name="residual"),
             helper.make_node("LayerNormalization", ["res", "gamma", "beta"], ["n"], name="norm", axis=-1),
             helper.make_node("MatMul", ["n", "w2"], ["m2"], name="fc2"),
             helper.make_node("Relu", ["m2"], ["m2r"], name="relu2"),
             helper.make_node("Transpose", ["m2r"], ["back"], name="tr2", perm=[0, 2, 1]),
             helper.make_node("Reshape", ["back", "img"], ["im"], name="unflat"),
             helper.make_node("Conv", ["im", "w3"], ["b"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["br"], name="relu3"),
             helper.make_node("Conv", ["br", "w4"], ["y"], name="conv2", kernel_shape=[1, 1])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])
    g = helper.make_graph(nodes, "postnorm", [x], [y], inits)
    model = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_float_layernorm_between_int8_matmuls_is_not_taken_for_a_wasted_conversion() -> None:
    """A post-norm block, LayerNorm(x + Linear(x)) -> Linear, as RT-DETR's encoder exports it.
    LayerNorm has no quantized kernel, so onnxruntime runs the residual Add and the LayerNorm as
    one float SkipLayerNormalization between the two QLinearMatMuls: the DQ before it and the Q
    after it are the price of those INT8 MatMuls, not conversions for nothing. qdq.ort_fusion
    warned on it (7 such groups in RT-DETR-R18); it passes now."""
    from onnxslim_yolo.check import run_checks
    from onnxslim_yolo.check.index import GraphIndex

    model = _postnorm_block()
    res = InsertQDQ().run(model, ctx(model))
    opt = GraphIndex(verify.optimized_model(res.model, optimize="extended"))
    skip = next(i for i, n in enumerate(opt.nodes) if n.op_type == "SkipLayerNormalization")
    sources = {opt.producer_op(opt.nodes[opt.producer[t]].input[0]) for t in opt.nodes[skip].input
               if opt.producer_op(t) == "DequantizeLinear"}
    assert "QLinearMatMul" in sources                                   # fc1, INT8, feeds it
    readers = [opt.nodes[c].op_type for o in opt.nodes[skip].output for c in opt.consumer_nodes(o)]
    assert readers == ["QuantizeLinear"]
    assert [n.op_type for n in opt.nodes].count("QLinearMatMul") == 2
    fusion = next(r for r in run_checks(res.model, latency=False).results if r.name == "qdq.ort_fusion")
    assert fusion.status == "pass", fusion.message
    feeds = verify.random_feeds(model, 4, 1)
    assert min(d.cosine for d in verify.compare_models(model, res.model, feeds)) > 0.99


@pytest.mark.parametrize("family", sorted(fixtures.FAMILIES))
def test_float_layers_counts_the_weight_layers_left_float(family: str) -> None:
    """float_layers counted every node kept float (Sigmoid, Mul: 6 'layers' where 4 Convs were
    float on yolov5n); it counts weight layers now, the other ops apart."""
    _, res = quantized(family)
    m = res.model
    prod = {o: n for n in m.graph.node for o in n.output}
    tail = set(res.report.details["head"]["tail_nodes"])
    weights = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    float_layers = [n.name for n in m.graph.node if n.op_type in weights and n.name not in tail
                    and getattr(prod.get(n.input[1]), "op_type", "") != "DequantizeLinear"]
    counts = res.report.counts
    assert float_layers and counts["float_layers"] == len(float_layers)
    assert counts["float_ops"] == sum(1 for n in res.report.skipped if n["node"] not in float_layers
                                      and not n["reason"].startswith("bias kept float"))


def test_calibrating_on_few_images_is_warned_about(caplog) -> None:
    """--calib-limit 1 calibrated on one image without a word (pruning warns below its 8 probes)."""
    model = fixtures.build_yolov5_v6(bn=False)
    for n, warned in ((2, True), (8, False)):
        caplog.clear()
        with caplog.at_level("WARNING"):
            InsertQDQ().run(model, ctx(model, n=n))
        said = "insert-qdq: 2 calibration image(s): ranges from fewer than 8 are noisy" in caplog.text
        assert said is warned and ("calibration image(s)" in caplog.text) is warned
