"""focus-to-conv: every Focus encoding becomes one Conv (or a phase Conv + the original), exactly."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import fixtures
from fixtures.focus import ENCODINGS, YOLOV5_ORDER, build_focus
from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import PassContext, UsageError
from onnxslim_yolo.pass_manager import PassManager
from onnxslim_yolo.passes.focus_to_conv import FocusToConv, merged_weight
from tests.passes.exact_helpers import assert_exact, assert_idempotent, assert_refused, ops, valid

YOLOX_ORDER = ((0, 0), (0, 1), (1, 0), (1, 1))
S2D = PassContext(options={"focus-to-conv": {"mode": "space-to-depth-conv"}})


def run(model, ctx=None):
    return FocusToConv().run(model, ctx or PassContext())


def conv_attrs(model):
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    return {a.name: list(a.ints) if a.ints else a.i for a in conv.attribute}


def opset_of(enc, opset):
    return 9 if enc == "slice_attr" else opset


# ------------------------------------------------------------------------------------ positive
@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("enc", ENCODINGS)
def test_every_encoding_becomes_one_conv(enc, opset):
    m = build_focus(enc, order=YOLOX_ORDER, opset=opset_of(enc, opset), img=(32, 48))
    res = run(m)
    assert res.modified and res.report.counts["rewritten"] == 1 and not res.report.skipped
    assert ops(res.model) == {"Conv": 1}
    a = conv_attrs(res.model)
    assert a["kernel_shape"] == [6, 6] and a["strides"] == [2, 2] and a["pads"] == [2, 2, 2, 2]
    valid(res.model)
    assert_exact(m, res.model)
    assert_idempotent(FocusToConv(), res.model)


@pytest.mark.parametrize("enc", ENCODINGS)
def test_space_to_depth_conv_mode_keeps_the_original_conv(enc):
    m = build_focus(enc, opset=opset_of(enc, 13), k=3, stride=2, pad=1)
    res = run(m, S2D)
    assert res.modified and ops(res.model) == {"Conv": 2}
    phase, conv = res.model.graph.node
    pa = {a.name: list(a.ints) if a.ints else a.i for a in phase.attribute}
    assert pa["kernel_shape"] == [2, 2] and pa["strides"] == [2, 2]
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    w = inits[phase.input[1]]
    assert w.shape == (12, 3, 2, 2) and np.all(w.sum(axis=(1, 2, 3)) == 1) and set(np.unique(w)) == {0, 1}
    orig = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert np.array_equal(inits[conv.input[1]], orig[conv.input[1]])  # original weights untouched
    valid(res.model)
    assert_exact(m, res.model)
    assert_idempotent(FocusToConv(), res.model, S2D)


def test_weights_permuted_for_the_phase_order():
    w = np.arange(2 * 12 * 3 * 3, dtype=np.float32).reshape(2, 12, 3, 3)
    order = ((1, 1), (0, 0), (1, 0), (0, 1))
    channels = [(c, a, b) for a, b in order for c in range(3)]
    out = merged_weight(w, channels, 2)
    assert out.shape == (2, 3, 6, 6)
    for k, (c, a, b) in enumerate(channels):
        assert np.array_equal(out[:, c, a::2, b::2], w[:, k])


def test_shared_row_slices_auto_pad_and_constant_nodes():
    m = build_focus("slice_chained", share_rows=True, const_nodes=True, auto_pad="SAME_UPPER", k=3,
                    stride=2, img=(30, 34))
    res = run(m)
    assert ops(res.model) == {"Conv": 1, "Constant": 1}  # the bias Constant node stays
    a = conv_attrs(res.model)
    # on the 15x17 phases, SAME_UPPER k3 s2 pads (1, 1, 1, 1); doubled on the image
    assert a["pads"] == [2, 2, 2, 2] and "auto_pad" not in a
    assert_exact(m, res.model)


@pytest.mark.parametrize("opset", [11, 13])
def test_yolov5_focus_fixture_stem_merged(opset):
    m = fixtures.build_yolov5_focus(opset=opset)
    before = ops(m)
    res = run(m)
    after = ops(res.model)
    assert res.report.counts["rewritten"] == 1
    assert before["Slice"] - after["Slice"] >= 4 and before["Concat"] - after["Concat"] == 1
    assert after["Conv"] == before["Conv"]
    valid(res.model)
    assert_exact(m, res.model, rtol=3e-5)   # Conv summation order: 1.2e-5 on onnxruntime 1.32, 2.2e-5 on 1.22


def test_through_the_pass_manager():
    m = build_focus("slice_both_axes", k=5, stride=2, pad=(1, 2, 3, 0))
    out = PassManager([FocusToConv()], PassContext(seed=1)).run(m)
    rec = out.records[0]
    assert rec.modified and ops(out.model) == {"Conv": 1}
    assert rec.verification[0]["max_abs"] <= 1e-5 * rec.verification[0]["ref_max"]


@pytest.mark.parametrize("enc", [e for e in ENCODINGS if e not in ("pixel_unshuffle", "slice_attr")])
def test_a_dynamic_batch_with_a_fixed_image_size_is_merged(enc):
    """Only H and W must be known: a dynamic batch was refused as 'unknown H/W' (the Slices keep
    the whole batch). The manager verifies the merge at batch 1 and 2. (The 6-D views of opset 9
    and pixel unshuffle reshape to a batch of their own, and still need it static.)"""
    m = build_focus(enc, opset=opset_of(enc, 13))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    out = PassManager([FocusToConv()], PassContext()).run(m)
    assert out.records[0].modified and ops(out.model) == {"Conv": 1}
    assert ir.input_shapes(out.model)["images"][0] == "N"


def test_unknown_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown mode 'fast'"):
        run(build_focus(), PassContext(options={"focus-to-conv": {"mode": "fast"}}))


# ------------------------------------------------------------------------------------ negative
def weight_as_graph_input(m: onnx.ModelProto) -> onnx.ModelProto:
    m = ir.fix_input_shapes(m, {})
    w = next(t for t in m.graph.initializer if t.name.startswith("conv.weight"))
    m.graph.initializer.remove(w)
    m.graph.input.append(helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))
    return m


def duplicate_phase(m: onnx.ModelProto) -> onnx.ModelProto:
    concat = next(n for n in m.graph.node if n.op_type == "Concat")
    concat.input[3] = concat.input[0]
    return m


REFUSALS = [
    (lambda: build_focus(img=(33, 32)), "H/W 33x32 not divisible by 2 (odd size)"),
    (lambda: build_focus(img=(32, 31)), "H/W 32x31 not divisible by 2 (odd size)"),
    (lambda: build_focus(dynamic=True), "has unknown channels or H/W"),
    (lambda: build_focus(dilation=2), "has dilations [2, 2]"),
    (lambda: build_focus(groups=2), "has group=2"),
    (lambda: build_focus(tap="concat"), "feeds 2 consumers, not only a Conv"),
    (lambda: build_focus(tap="slice"), "output also feeds Relu 'tap/Relu'"),
    (lambda: build_focus(tap="slice", share_rows=True), "output also feeds Relu 'tap/Relu'"),
    (lambda: weight_as_graph_input(build_focus()), "is not a constant (a graph input)"),
    (lambda: duplicate_phase(build_focus()), "not each of the 4 once"),
]


@pytest.mark.parametrize("make, reason", REFUSALS, ids=[r for _, r in REFUSALS])
def test_refusals_name_the_reason(make, reason):
    m = make()
    assert_refused(run(m), m, reason)


def test_odd_size_still_rewritten_in_phase_conv_mode_is_refused():
    res = run(build_focus(img=(33, 32)), S2D)
    assert not res.modified and "odd size" in res.report.skipped[0]["reason"]


def test_real_v6_stem_is_left_alone(yolov5n_path):
    m = ir.load(yolov5n_path)
    res = run(m)
    assert not res.modified and not res.report.skipped


# ------------------------------------------------------------------------------------ property
PADS = st.one_of(st.integers(0, 3).map(lambda p: ("pads", (p,) * 4)),
                 st.tuples(*[st.integers(0, 3)] * 4).map(lambda p: ("pads", p)),
                 st.sampled_from(["SAME_UPPER", "SAME_LOWER", "VALID"]).map(lambda a: ("auto", a)))


@settings(derandomize=True, max_examples=40, deadline=None)
@given(enc=st.sampled_from([e for e in ENCODINGS if e != "slice_attr"]),
       order=st.permutations(YOLOV5_ORDER), k=st.sampled_from([1, 2, 3, 5, 7]), stride=st.integers(1, 3),
       pad=PADS, h=st.integers(2, 12), w=st.integers(2, 12), bias=st.booleans(),
       opset=st.sampled_from([11, 13, 17, 21]))
def test_property_merge_equals_the_focus(enc, order, k, stride, pad, h, w, bias, opset):
    kind, p = pad
    kw = {"auto_pad": p} if kind == "auto" else {"pad": p}
    if kind == "pads":
        assume(h + p[0] + p[2] >= k and w + p[1] + p[3] >= k)
    elif p == "VALID":
        assume(h >= k and w >= k)
    m = build_focus(enc, order=tuple(order), k=k, stride=stride, bias=bias, opset=opset, img=(2 * h, 2 * w),
                    seed=h * 13 + w, **kw)
    res = run(m)
    assert ops(res.model) == {"Conv": 1}
    a = conv_attrs(res.model)
    assert a["kernel_shape"] == [2 * k, 2 * k] and a["strides"] == [2 * stride, 2 * stride]
    if kind == "pads":
        assert a["pads"] == [2 * v for v in p]
    valid(res.model)
    assert_exact(m, res.model, seed=k + stride)


def test_all_24_phase_orders_of_the_chained_encoding():
    for order in itertools.permutations(YOLOV5_ORDER):
        m = build_focus("slice_chained", order=order, img=(8, 8), c_out=4)
        res = run(m)
        assert ops(res.model) == {"Conv": 1}, order
        assert_exact(m, res.model, n=1)
