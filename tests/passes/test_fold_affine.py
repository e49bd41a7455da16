"""fold-affine: constant per-channel Mul/Add/Sub/Div after a Conv folded into it, exactly."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import fixtures
from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import PassContext
from onnxslim_yolo.passes.fold_affine import FoldAffine
from tests.passes.exact_helpers import assert_exact, assert_idempotent, assert_refused, make_model, ops, valid

C = 6


def run(model):
    return FoldAffine().run(model, PassContext())


def conv_then(steps, opset=13, bias=True, op="Conv", seed=0, tap=False, shared=False):
    """x -> Conv -> each (op, const, const_first) in ``steps`` -> y."""
    rng = np.random.default_rng(seed)
    wshape = (C, 4, 3, 3) if op == "Conv" else (4, C, 3, 3)
    inits = {"w": rng.normal(0, 0.3, wshape).astype(np.float32)}
    ins = ["x", "w"] + (["b"] if bias else [])
    if bias:
        inits["b"] = rng.normal(0, 0.1, C).astype(np.float32)
    nodes = [helper.make_node(op, ins, ["t0"], name="conv", pads=[1, 1, 1, 1])]
    outs = []
    if shared:
        nodes.append(helper.make_node(op, ["x", "w"], ["other"], name="conv2", pads=[1, 1, 1, 1]))
        outs.append("other")
    for i, (kind, value, first) in enumerate(steps):
        name = f"c{i}"
        inits[name] = np.asarray(value, np.float32)
        a, b = (name, f"t{i}") if first else (f"t{i}", name)
        nodes.append(helper.make_node(kind, [a, b], [f"t{i + 1}"], name=f"{kind.lower()}{i}"))
    nodes.append(helper.make_node("Identity", [f"t{len(steps)}"], ["y"], name="out"))
    if tap:
        nodes.append(helper.make_node("Relu", ["t0"], ["r"], name="relu"))
        outs.append("r")
    return make_model(nodes, {"x": (1, 4, 7, 8)}, ["y"] + outs, inits, opset)


def vec(shape, seed=1, lo=0.5, hi=1.5):
    return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


# ------------------------------------------------------------------------------------ positive
@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_mul_then_add_folded_in_two_rounds(opset):
    m = conv_then([("Mul", vec((1, C, 1, 1)), False), ("Add", vec((C, 1, 1), 2), False)], opset)
    res = run(m)
    assert ops(res.model) == {"Conv": 1, "Identity": 1}
    assert res.report.counts == {"folded_mul": 1, "folded_add": 1, "folded": 2}
    valid(res.model)
    assert_exact(m, res.model)
    assert_idempotent(FoldAffine(), res.model)


@pytest.mark.parametrize("steps", [
    [("Mul", np.float32(1.7), True)],                       # scalar, constant first
    [("Add", vec((1, C, 1, 1)), True)],                     # constant first
    [("Sub", vec((C, 1, 1)), False)],
    [("Div", vec((1, C, 1, 1)), False)],
    [("Mul", vec((1,)), False), ("Sub", vec((1, 1, 1, 1)), False), ("Div", np.float32(3.0), False)],
], ids=["mul-scalar-left", "add-left", "sub", "div", "chain-of-three"])
@pytest.mark.parametrize("bias", [True, False])
def test_each_affine_form_folded(steps, bias):
    m = conv_then(steps, bias=bias)
    res = run(m)
    assert ops(res.model) == {"Conv": 1, "Identity": 1}
    assert res.report.counts["folded"] == len(steps)
    assert_exact(m, res.model)


def test_conv_transpose_folded():
    m = conv_then([("Mul", vec((1, C, 1, 1)), False), ("Add", vec((1, C, 1, 1)), False)], op="ConvTranspose")
    res = run(m)
    assert ops(res.model) == {"ConvTranspose": 1, "Identity": 1}
    assert_exact(m, res.model)


def test_silu_and_residuals_are_not_candidates():
    m = fixtures.build_yolov5_v6(opset=13)
    res = run(m)
    assert not res.modified and not res.report.skipped


# ------------------------------------------------------------------------------------ refusals
def operand_as_input():
    m = conv_then([("Mul", vec((1, C, 1, 1)), False)])
    c = next(t for t in m.graph.initializer if t.name == "c0")
    m.graph.initializer.remove(c)
    m.graph.input.append(helper.make_tensor_value_info("c0", onnx.TensorProto.FLOAT, [1, C, 1, 1]))
    return m


MUL = [("Mul", vec((1, C, 1, 1)), False)]
REFUSALS = [
    (lambda: conv_then([("Mul", vec((1, 1, 7, 8)), False)]),
     "constant of shape [1, 1, 7, 8] is not per-channel"),
    (lambda: conv_then([("Add", vec((C,)), False)]), "constant of shape [6] does not broadcast per channel"),
    (lambda: conv_then([("Mul", vec((2, 1, C, 1, 1)), False)]), "does not broadcast per channel on rank 4"),
    # one value, but of rank 5: it raises the output's rank (folded as a scalar: an invalid graph)
    (lambda: conv_then([("Mul", np.full((1, 1, 1, 1, 1), 1.5), False)]),
     "constant of shape [1, 1, 1, 1, 1] does not broadcast per channel on rank 4"),
    (operand_as_input, "Mul 'mul0' operand 'c0' is not a constant (a graph input)"),
    (lambda: conv_then(MUL, shared=True), "weight 'w' is shared with 1 other"),
    (lambda: conv_then(MUL, tap=True), "output also feeds 1 other consumer(s)"),
    (lambda: conv_then([("Div", np.zeros((1, C, 1, 1)), False)]), "divides by zero"),
]


@pytest.mark.parametrize("make, reason", REFUSALS, ids=[r for _, r in REFUSALS])
def test_refusals_name_the_reason(make, reason):
    m = make()
    assert_refused(run(m), m, reason)


# ------------------------------------------------------------------------------------ property
SHAPES = [(), (1,), (C, 1, 1), (1, C, 1, 1), (1, 1, 1, 1)]


@settings(derandomize=True, max_examples=30, deadline=None)
@given(kinds=st.lists(st.sampled_from(["Mul", "Add", "Sub", "Div"]), min_size=1, max_size=3),
       shape=st.sampled_from(SHAPES), first=st.booleans(), bias=st.booleans(), seed=st.integers(0, 999),
       opset=st.sampled_from([11, 13, 17, 21]))
def test_property_affine_chains_fold_exactly(kinds, shape, first, bias, seed, opset):
    steps = [(k, vec(shape, seed + i), first and k in ("Mul", "Add")) for i, k in enumerate(kinds)]
    m = conv_then(steps, opset, bias=bias, seed=seed)
    res = run(m)
    assert ops(res.model) == {"Conv": 1, "Identity": 1}
    valid(res.model)
    assert_exact(m, res.model, seed=seed)


def test_real_fused_model_has_nothing_to_fold(yolov5n_path):
    res = run(ir.load(yolov5n_path))
    assert not res.modified and not res.report.skipped
