"""merge-branches: Conv branches of one input summed by Add (RepVGG-style) merged into one Conv."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import fixtures
from onnxslim_yolo import ir
from onnxslim_yolo.analysis.flops import model_stats
from onnxslim_yolo.pass_base import PassContext
from onnxslim_yolo.passes.fold_batchnorm import FoldBatchNorm
from onnxslim_yolo.passes.merge_branches import MergeBranches
from tests.passes.exact_helpers import assert_exact, assert_idempotent, assert_refused, make_model, ops, valid

C = 8
X = (1, C, 9, 10)


def run(model):
    return MergeBranches().run(model, PassContext())


class Block:
    """x -> sum of branches -> Relu -> y; each branch a Conv (kernel, pads, ...) or an identity."""

    def __init__(self, seed=0, cin=C):
        self.rng = np.random.default_rng(seed)
        self.cin = cin
        self.nodes, self.inits, self.terms, self.extra_outputs = [], {}, [], []

    def conv(self, k=(3, 3), pads=(1, 1, 1, 1), cout=C, group=1, bias=True, x="x", **attrs):
        i = len(self.terms)
        self.inits[f"w{i}"] = self.rng.normal(0, 0.3, (cout, self.cin // group) + tuple(k)).astype(np.float32)
        ins = [x, f"w{i}"]
        if bias:
            self.inits[f"b{i}"] = self.rng.normal(0, 0.1, cout).astype(np.float32)
            ins.append(f"b{i}")
        self.nodes.append(helper.make_node("Conv", ins, [f"t{i}"], name=f"conv{i}", kernel_shape=list(k),
                                           pads=list(pads), group=group, **attrs))
        self.terms.append(f"t{i}")
        return self

    def bn(self):
        i = len(self.terms)
        for p, (lo, hi) in zip(("s", "bb", "m", "v"), ((0.5, 1.5), (-0.3, 0.3), (-0.2, 0.2), (0.5, 2.0))):
            self.inits[f"{p}{i}"] = self.rng.uniform(lo, hi, self.cin).astype(np.float32)
        self.nodes.append(helper.make_node("BatchNormalization", ["x", f"s{i}", f"bb{i}", f"m{i}", f"v{i}"],
                                           [f"t{i}"], name=f"bn{i}"))
        self.terms.append(f"t{i}")
        return self

    def identity(self):
        self.terms.append("x")
        return self

    def build(self, opset=13, x_shape=X):
        nodes = list(self.nodes)
        acc = self.terms[0]
        for j, t in enumerate(self.terms[1:]):
            nodes.append(helper.make_node("Add", [acc, t], [f"s{j}_sum"], name=f"add{j}"))
            acc = f"s{j}_sum"
        nodes.append(helper.make_node("Relu", [acc], ["y"], name="relu"))
        return make_model(nodes, {"x": x_shape}, ["y"] + self.extra_outputs, self.inits, opset)


def repvgg(seed=0, opset=13):
    return Block(seed).conv((3, 3)).conv((1, 1), (0, 0, 0, 0)).bn().build(opset)


# ------------------------------------------------------------------------------------ positive
@pytest.mark.parametrize("opset", [11, 13, 17, 21])
def test_repvgg_block_becomes_one_conv(opset):
    m = repvgg(opset=opset)
    res = run(m)
    assert ops(res.model) == {"Conv": 1, "Relu": 1}
    assert res.report.counts == {"merged_conv": 1, "merged_identity": 1, "merged": 2}
    conv = res.model.graph.node[0]
    assert conv.name == "conv0"   # the widest branch keeps its name
    valid(res.model)
    assert_exact(m, res.model)
    assert model_stats(res.model).macs < model_stats(m).macs
    assert_idempotent(MergeBranches(), res.model)


def test_after_fold_batchnorm_the_standalone_mul_add_merges_too():
    m = repvgg(seed=3)
    folded = FoldBatchNorm().run(m, PassContext()).model
    assert ops(folded)["Mul"] == 1 and ops(folded)["Add"] == 3
    res = run(folded)
    assert ops(res.model) == {"Conv": 1, "Relu": 1}
    assert_exact(m, res.model)


def test_mobileone_depthwise_branches_and_plain_identity():
    b = Block(seed=1)
    for _ in range(3):
        b.conv((3, 3), group=C)
    m = b.conv((1, 1), (0, 0, 0, 0), group=C, bias=False).identity().build()
    res = run(m)
    assert ops(res.model) == {"Conv": 1, "Relu": 1}
    assert res.report.counts == {"merged_conv": 3, "merged_identity": 1, "merged": 4}
    assert_exact(m, res.model)


def test_dilated_and_asymmetric_kernels_sit_on_the_right_taps():
    # ACNet-style 3x3 + 1x3 + 3x1, and a dilated 3x3 with a 1x1 and an identity
    acnet = Block(seed=2).conv((3, 3)).conv((1, 3), (0, 1, 0, 1)).conv((3, 1), (1, 0, 1, 0)).build()
    dil = (Block(seed=4).conv((3, 3), (2, 2, 2, 2), dilations=[2, 2]).conv((1, 1), (0, 0, 0, 0))
           .identity().build())
    shifted = Block(seed=5).conv((3, 3), (2, 1, 0, 1)).identity().build()   # H pads 2+0: centre at tap 2
    for m in (acnet, dil, shifted):
        res = run(m)
        assert ops(res.model) == {"Conv": 1, "Relu": 1}, res.report.skipped
        assert_exact(m, res.model)


def test_strided_and_channel_changing_branches_merge_without_identity():
    m = Block(seed=6).conv((3, 3), cout=16, strides=[2, 2]).conv((1, 1), (0, 0, 0, 0), cout=16,
                                                                    strides=[2, 2]).build()
    res = run(m)
    assert ops(res.model) == {"Conv": 1, "Relu": 1}
    assert_exact(m, res.model)


def test_same_auto_pad_is_resolved():
    b = Block(seed=7).conv((3, 3), (0, 0, 0, 0))
    b.nodes[0] = helper.make_node("Conv", ["x", "w0", "b0"], ["t0"], name="conv0", kernel_shape=[3, 3],
                                  auto_pad="SAME_UPPER")
    m = b.conv((1, 1), (0, 0, 0, 0)).build()
    res = run(m)
    assert ops(res.model) == {"Conv": 1, "Relu": 1}
    assert_exact(m, res.model)


@settings(derandomize=True, max_examples=25, deadline=None)
@given(kernels=st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3), ident=st.booleans(),
       depthwise=st.booleans(), bias=st.booleans(), seed=st.integers(0, 999),
       opset=st.sampled_from([11, 13, 17, 21]))
def test_property_any_centred_branches_merge_exactly(kernels, ident, depthwise, bias, seed, opset):
    b = Block(seed=seed)
    b.conv((3, 3), group=C if depthwise else 1)
    for k in kernels:
        b.conv((k, k), (k // 2,) * 4, group=C if depthwise else 1, bias=bias)
    if ident:
        b.bn()
    m = b.build(opset)
    res = run(m)
    assert ops(res.model) == {"Conv": 1, "Relu": 1}
    valid(res.model)
    assert_exact(m, res.model, seed=seed)


# ------------------------------------------------------------------------------------ not candidates
def test_residuals_and_yolo_graphs_are_not_candidates():
    # y = Conv(Relu(x)) + x: the Conv reads another tensor than the one added, as in ResNet
    w = np.random.default_rng(8).normal(0, 0.3, (C, C, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="pre"),
             helper.make_node("Conv", ["h", "w"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "x"], ["y"], name="add")]
    residual = make_model(nodes, {"x": X}, ["y"], {"w": w})
    for m in (residual, fixtures.build_yolov5_v6(opset=13), fixtures.build_yolov8(opset=13)):
        r = run(m)
        assert not r.modified and not r.report.skipped


# ------------------------------------------------------------------------------------ refusals
def tapped():
    b = Block(seed=9).conv((3, 3)).conv((1, 1), (0, 0, 0, 0))
    b.extra_outputs.append("t1")
    return b.build()


def weight_as_input():
    m = repvgg(seed=10)
    w = next(t for t in m.graph.initializer if t.name == "w1")
    m.graph.initializer.remove(w)
    m.graph.input.append(helper.make_tensor_value_info("w1", onnx.TensorProto.FLOAT, [C, C, 1, 1]))
    return m


REFUSALS = [
    (lambda: Block(12).conv((3, 3), group=C).conv((1, 1), (0, 0, 0, 0)).build(), "differ in group: 8 vs 1"),
    # a 1x5 and a 5x1 (same output size): neither kernel holds the other
    (lambda: Block(13).conv((1, 5), (0, 2, 0, 2)).conv((5, 1), (2, 0, 2, 0)).build(),
     "does not sit on the taps"),
    (tapped, "output 't1' is read by more than the Add"),
    (weight_as_input, "weight 'w1' is not a constant (a graph input)"),
]


@pytest.mark.parametrize("make, reason", REFUSALS, ids=[r for _, r in REFUSALS])
def test_refusals_name_the_reason(make, reason):
    m = make()
    assert_refused(run(m), m, reason)


def test_real_yolov5n_has_no_branches_to_merge(yolov5n_path):
    res = run(ir.load(yolov5n_path))
    assert not res.modified and not res.report.skipped


def test_default_pipeline_merges_after_batchnorm_folding(tmp_path):
    from onnxslim_yolo.api import optimize
    src = tmp_path / "rep.onnx"
    m = Block(seed=15).conv((3, 3)).conv((1, 1), (0, 0, 0, 0)).bn().build()
    ir.save(m, src)
    out = tmp_path / "rep.opt.onnx"
    result = optimize(str(src), output=str(out))
    names = [r.name for r in result.pipeline.records]
    assert names.index("fold-batchnorm") < names.index("merge-branches")
    got = ir.load(str(out))
    assert ops(got) == {"Conv": 1, "Relu": 1}
    assert_exact(m, got)
