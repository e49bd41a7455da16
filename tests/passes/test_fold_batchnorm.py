"""fold-batchnorm: BN folded into Conv / ConvTranspose / Gemm / MatMul, before a Conv, or standalone."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import PassContext, UsageError
from onnxslim_yolo.pass_manager import PassManager, order_passes
from onnxslim_yolo.passes.fold_affine import FoldAffine
from onnxslim_yolo.passes.fold_batchnorm import FoldBatchNorm
from tests.passes.exact_helpers import assert_exact, assert_idempotent, make_model, max_diff, ops, valid


def run(model, **opts):
    return FoldBatchNorm().run(model, PassContext(options={"fold-batchnorm": opts} if opts else {}))


def bn_params(rng, c, prefix="bn", zero_shift=False):
    var = rng.uniform(0.2, 2.0, c).astype(np.float32)
    scale = rng.uniform(0.3, 1.7, c).astype(np.float32)
    # zero shift: an affine-only BN (mean 0, beta 0), so that B - mean * s is exactly 0
    mean = np.zeros(c, np.float32) if zero_shift else rng.normal(0, 0.5, c).astype(np.float32)
    shift = np.zeros(c) if zero_shift else rng.normal(0, 0.5, c)
    return {f"{prefix}.scale": scale, f"{prefix}.B": shift.astype(np.float32), f"{prefix}.mean": mean,
            f"{prefix}.var": var}


def bn(x, y, prefix="bn", **attrs):
    params = [f"{prefix}.{p}" for p in ("scale", "B", "mean", "var")]
    return helper.make_node("BatchNormalization", [x] + params,
                            [y], name=prefix, **attrs)


def conv_bn(opset=13, bias=True, group=1, k=3, pads=1, cin=4, cout=6, stride=1, op="Conv", eps=1e-5, seed=0,
            tap=False):
    rng = np.random.default_rng(seed)
    wshape = (cout, cin // group, k, k) if op == "Conv" else (cin, cout // group, k, k)
    inits = {"w": rng.normal(0, 0.3, wshape).astype(np.float32), **bn_params(rng, cout)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = rng.normal(0, 0.1, cout).astype(np.float32)
        ins.append("b")
    nodes = [helper.make_node(op, ins, ["c"], name="conv", kernel_shape=[k, k], pads=[pads] * 4,
                              strides=[stride] * 2, group=group),
             bn("c", "y", epsilon=eps)]
    outs = ["y"]
    if tap:
        nodes.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
        outs.append("r")
    return make_model(nodes, {"x": (1, cin, 9, 10)}, outs, inits, opset)


# ------------------------------------------------------------------------------------ Conv -> BN
@pytest.mark.parametrize("opset", [11, 13, 17, 21])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folded(opset, bias):
    m = conv_bn(opset, bias)
    res = run(m)
    assert res.modified and ops(res.model) == {"Conv": 1}
    assert res.report.counts == {"into_conv": 1, "folded": 1} and not res.report.skipped
    assert res.model.graph.output[0].name == "y"
    valid(res.model)
    assert_exact(m, res.model)
    assert_idempotent(FoldBatchNorm(), res.model)


@pytest.mark.parametrize("group", [1, 2, 3])
def test_conv_transpose_with_groups_folded(group):
    m = conv_bn(op="ConvTranspose", group=group, cin=6, cout=6, stride=2, pads=0, k=3)
    res = run(m)
    assert ops(res.model) == {"ConvTranspose": 1} and res.report.counts["into_convtranspose"] == 1
    valid(res.model)
    assert_exact(m, res.model)


@pytest.mark.parametrize("trans_b, c_shape, alpha, beta", [
    (0, None, 1.0, 1.0), (1, (5,), 0.5, 2.0), (0, (3, 5), 1.0, -1.0), (1, (1,), 1.5, 1.0)])
def test_gemm_bn_folded(trans_b, c_shape, alpha, beta):
    rng = np.random.default_rng(1)
    inits = {"w": rng.normal(size=(5, 4) if trans_b else (4, 5)).astype(np.float32), **bn_params(rng, 5)}
    ins = ["x", "w"]
    if c_shape:
        inits["c"] = rng.normal(size=c_shape).astype(np.float32)
        ins.append("c")
    nodes = [helper.make_node("Gemm", ins, ["g"], name="gemm", transB=trans_b, alpha=alpha, beta=beta),
             bn("g", "y")]
    m = make_model(nodes, {"x": (3, 4)}, ["y"], inits)
    res = run(m)
    assert ops(res.model) == {"Gemm": 1} and res.report.counts["into_gemm"] == 1
    valid(res.model)
    assert_exact(m, res.model)


def matmul_bn(rank3=False):
    rng = np.random.default_rng(2)
    inits = {"w": rng.normal(size=(4, 5)).astype(np.float32), **bn_params(rng, 3 if rank3 else 5)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["g"], name="matmul"), bn("g", "y")]
    return make_model(nodes, {"x": (2, 3, 4) if rank3 else (3, 4)}, ["y"], inits)


def test_matmul_bn_becomes_one_gemm():
    m = matmul_bn()
    res = run(m)
    assert ops(res.model) == {"Gemm": 1}
    valid(res.model)
    assert_exact(m, res.model)


# ------------------------------------------------------------------------------------ BN -> Conv
def bn_conv(pads=0, group=1, zero_shift=False, auto_pad=None, opset=13):
    rng = np.random.default_rng(3)
    inits = {"w": rng.normal(0, 0.3, (6, 6 // group, 3, 3)).astype(np.float32),
             "b": rng.normal(size=6).astype(np.float32), **bn_params(rng, 6, zero_shift=zero_shift)}
    attrs = {"auto_pad": auto_pad} if auto_pad else {"pads": [pads] * 4}
    nodes = [bn("x", "n"),
             helper.make_node("Conv", ["n", "w", "b"], ["y"], name="conv", group=group, **attrs)]
    return make_model(nodes, {"x": (1, 6, 8, 9)}, ["y"], inits, opset)


@pytest.mark.parametrize("group", [1, 2, 6])
def test_bn_before_unpadded_conv_folded(group):
    m = bn_conv(group=group)
    res = run(m)
    assert ops(res.model) == {"Conv": 1} and res.report.counts["into_following_conv"] == 1
    valid(res.model)
    assert_exact(m, res.model)


def test_bn_before_padded_conv_folded_when_shift_is_zero():
    m = bn_conv(pads=1, zero_shift=True)
    res = run(m)
    assert ops(res.model) == {"Conv": 1}
    assert_exact(m, res.model)


def test_bn_before_padded_conv_refused_then_standalone():
    m = bn_conv(pads=1)
    res = run(m)
    assert ops(res.model) == {"Mul": 1, "Add": 1, "Conv": 1}
    note = res.report.details["standalone_notes"]["bn"]
    assert "not exact: the Conv pads [1, 1, 1, 1] and the BN shift is nonzero" in note
    valid(res.model)
    assert_exact(m, res.model)
    assert_idempotent(FoldBatchNorm(), res.model)


def test_bn_conv_bn_chain_takes_two_rounds():
    rng = np.random.default_rng(4)
    inits = {"w": rng.normal(0, 0.3, (5, 6, 1, 1)).astype(np.float32), **bn_params(rng, 6, "bn1"),
             **bn_params(rng, 5, "bn2")}
    nodes = [bn("x", "n", "bn1"), helper.make_node("Conv", ["n", "w"], ["c"], name="conv"),
             bn("c", "y", "bn2")]
    m = make_model(nodes, {"x": (1, 6, 4, 4)}, ["y"], inits)
    res = run(m)
    assert ops(res.model) == {"Conv": 1}
    assert res.report.counts["folded"] == 2
    assert_exact(m, res.model)


# ------------------------------------------------------------------------------------ standalone
@pytest.mark.parametrize("mode, expect", [("mul-add", {"Mul": 1, "Add": 1, "Relu": 1}),
                                          ("depthwise-conv", {"Conv": 1, "Relu": 1}),
                                          ("keep", {"BatchNormalization": 1, "Relu": 1})])
def test_standalone_bn(mode, expect):
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn("r", "y")]
    m = make_model(nodes, {"x": (1, 4, 5, 5)}, ["y"], bn_params(rng, 4))
    res = run(m, standalone=mode)
    assert ops(res.model) == expect
    if mode == "keep":
        assert not res.modified and "standalone=keep" in res.report.skipped[0]["reason"]
        return
    valid(res.model)
    assert_exact(m, res.model)
    ctx = PassContext(options={"fold-batchnorm": {"standalone": mode}})
    assert_idempotent(FoldBatchNorm(), res.model, ctx)


def test_unknown_standalone_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown standalone mode"):
        run(conv_bn(), standalone="drop")


# ------------------------------------------------------------------------------------ refusals
def shared_weights():
    rng = np.random.default_rng(6)
    inits = {"w": rng.normal(size=(4, 4, 1, 1)).astype(np.float32), **bn_params(rng, 4, "bn1"),
             **bn_params(rng, 4, "bn2")}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"), bn("c1", "y1", "bn1"),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"), bn("c2", "y2", "bn2")]
    return make_model(nodes, {"x": (1, 4, 3, 3)}, ["y1", "y2"], inits)


def params_as_inputs():
    m = conv_bn()
    var = next(t for t in m.graph.initializer if t.name == "bn.var")
    m.graph.initializer.remove(var)
    m.graph.input.append(helper.make_tensor_value_info("bn.var", onnx.TensorProto.FLOAT, [6]))
    return m


def training_mode():
    m = conv_bn(opset=15)
    bn_node = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    bn_node.attribute.append(helper.make_attribute("training_mode", 1))
    return m


def running_stats_used():
    m = conv_bn(opset=13)
    bn_node = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    bn_node.output.extend(["mean_out"])
    m.graph.output.append(helper.make_tensor_value_info("mean_out", onnx.TensorProto.FLOAT, [6]))
    return m


def statistics_outputs_listed():
    """Below opset 14 a BN that lists its statistics outputs runs in training mode in onnxruntime
    (the batch's statistics), read or not: folded as inference, its output moved by 4 on values
    near 5 (silently with --no-verify)."""
    m = conv_bn(opset=13)
    bn_node = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    bn_node.output.extend(["m_out", "v_out"])
    return m


def conv_output_is_graph_output():
    m = conv_bn()
    m.graph.output.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None))
    return m


def matmul_rank3():
    return matmul_bn(rank3=True)


def test_a_shared_weight_gets_a_folded_copy_per_conv():
    """RTMDet's head: one Conv weight read at every level, each level with its own BN (the dynamo
    exporter leaves them unfolded). Each Conv gets its own folded weight; the shared one goes."""
    m = shared_weights()
    res = run(m)
    assert ops(res.model) == {"Conv": 2}
    assert res.report.counts == {"into_conv": 2, "weights_copied": 2, "folded": 2}
    weights = [n.input[1] for n in res.model.graph.node]
    assert len(set(weights)) == 2 and "w" not in {t.name for t in res.model.graph.initializer}
    assert_exact(m, res.model)
    kept = run(m, shared_weights="keep")  # as before 2026-12-06: refused, named
    assert not kept.modified and len(kept.report.skipped) == 2
    assert all("weight 'w' is shared with 1 other node input(s)" in s["reason"] for s in kept.report.skipped)
    with pytest.raises(UsageError, match="unknown shared_weights mode 'share'"):
        run(m, shared_weights="share")


REFUSALS = [
    (params_as_inputs, "BatchNormalization var 'bn.var' is not a constant (a graph input)", 1),
    (training_mode, "training-mode BatchNormalization (training_mode=1)", 1),
    (running_stats_used, "running statistics output 'mean_out' is used", 1),
    (statistics_outputs_listed,
     "training-mode BatchNormalization: it lists the statistics output 'm_out'", 1),
    (lambda: conv_bn(tap=True), "Conv 'conv' output also feeds 1 other consumer(s)", 1),
    (conv_output_is_graph_output, "Conv 'conv' output is a graph output", 1),
    (matmul_rank3, "MatMul 'matmul' output rank 3: the channel axis 1 is not its last axis", 1),
]


@pytest.mark.parametrize("make, reason, n", REFUSALS, ids=[r for _, r, _ in REFUSALS])
def test_refusals_name_the_reason(make, reason, n):
    m = make()
    res = run(m)
    assert not res.modified and res.model is m
    assert len(res.report.skipped) == n
    assert all(reason in s["reason"] for s in res.report.skipped), res.report.skipped


# ------------------------------------------------------------------------------------ property
@settings(derandomize=True, max_examples=30, deadline=None)
@given(op=st.sampled_from(["Conv", "ConvTranspose"]), group=st.sampled_from([1, 2]),
       k=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), pads=st.integers(0, 1), bias=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]), seed=st.integers(0, 1000),
       opset=st.sampled_from([11, 13, 17, 21]))
def test_property_conv_bn_fold_is_exact(op, group, k, stride, pads, bias, eps, seed, opset):
    m = conv_bn(opset, bias, group, k, pads, cin=4, cout=6, stride=stride, op=op, eps=eps, seed=seed)
    res = run(m)
    assert ops(res.model) == {op: 1}
    assert_exact(m, res.model, seed=seed)


@settings(derandomize=True, max_examples=20, deadline=None)
@given(group=st.sampled_from([1, 2, 3, 6]), zero_shift=st.booleans(), pads=st.integers(0, 1),
       auto=st.sampled_from([None, "VALID", "SAME_UPPER"]))
def test_property_bn_before_conv(group, zero_shift, pads, auto):
    m = bn_conv(pads=pads, group=group, zero_shift=zero_shift, auto_pad=auto)
    res = run(m)
    exact_fold = zero_shift or auto == "VALID" or (auto is None and pads == 0)
    assert ops(res.model) == ({"Conv": 1} if exact_fold else {"Mul": 1, "Add": 1, "Conv": 1})
    assert_exact(m, res.model, rtol=2e-5)


# ------------------------------------------------------------------------------------ real model
CHAIN_OPS = ("Conv", "BatchNormalization", "Sigmoid", "Mul", "Add", "MaxPool", "Resize", "Split")


def test_yolov5n_bn_matches_the_fused_export(yolov5n_bn_path, yolov5n_path):
    m, fused = ir.load(yolov5n_bn_path), ir.load(yolov5n_path)
    res = run(m)
    before, after, ref = ops(m), ops(res.model), ops(fused)
    assert before["BatchNormalization"] == 57 and after["BatchNormalization"] == 0
    assert after["Conv"] == 60 and res.report.counts["into_conv"] == 57
    assert {o: after[o] for o in CHAIN_OPS} == {o: ref[o] for o in CHAIN_OPS}
    # the folded convolutions are the exporter's fused ones: same shapes, same attributes, same numbers
    mine = sorted((n for n in res.model.graph.node if n.op_type == "Conv"), key=lambda n: n.name)
    theirs = sorted((n for n in fused.graph.node if n.op_type == "Conv"), key=lambda n: n.name)
    assert [n.name for n in mine] == [n.name for n in theirs]
    wm = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    wf = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer}
    for a, b in zip(mine, theirs):
        assert Counter(str(x) for x in a.attribute) == Counter(str(x) for x in b.attribute)
        for i in (1, 2):
            x, y = wm[a.input[i]], wf[b.input[i]]
            assert x.shape == y.shape and np.abs(x - y).max() <= 1e-5 * max(1.0, np.abs(y).max())
    valid(res.model)
    d, top = max_diff(m, res.model, n=2, seed=0)
    assert d <= 1e-4 * top
    assert_idempotent(FoldBatchNorm(), res.model)


def test_pipeline_orders_batchnorm_before_affine():
    names = [p.name for p in order_passes([FoldAffine(), FoldBatchNorm()])]
    assert names == ["fold-batchnorm", "fold-affine"]
    out = PassManager([FoldAffine(), FoldBatchNorm()], PassContext()).run(conv_bn())
    assert [r.name for r in out.records] == ["fold-batchnorm", "fold-affine"]
    assert ops(out.model) == {"Conv": 1}
