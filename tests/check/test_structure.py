"""Structural checks: each fails (or warns) on a model broken in exactly that way and passes on a
good one."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import fixtures
from onnxslim_yolo.check import structure, targets
from onnxslim_yolo.check.index import GraphIndex

from .models import copy, qdq_conv, set_init, set_opset


@pytest.fixture(scope="module")
def good() -> onnx.ModelProto:
    return fixtures.build_yolov5_v6(opset=13)


def all_structure(model: onnx.ModelProto, target: str = "ort-cpu"):
    idx = GraphIndex(model)
    return [structure.check_onnx_checker(model), structure.check_shape_inference(model),
            structure.check_opset(model, idx), targets.check_ops(model, idx, target),
            structure.check_float64(model, target), structure.check_dynamic_dims(model),
            structure.check_unused_initializers(model), structure.check_duplicate_names(model),
            structure.check_dangling_inputs(idx), structure.check_weights_finite(idx)]


def tiny(nodes, inits=(), opset: int = 13, out_shape=(1, 4, 8, 8), domains=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, list(out_shape))], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]
                          + [helper.make_opsetid(d, 1) for d in domains])
    m.ir_version = 7
    return m


@pytest.mark.parametrize("target", ["ort-cpu", "tensorrt"])
def test_good_fixture_passes_every_structure_check(good, target):
    res = all_structure(good, target)
    assert [(r.name, r.status) for r in res if r.status != "pass"] == []
    assert len(res) == 10


def test_checker_fails_on_malformed_node():
    m = tiny([helper.make_node("Conv", ["x"], ["y"], name="conv")])  # Conv needs weights
    r = structure.check_onnx_checker(m)
    assert r.status == "fail" and "onnx checker" in r.message


def test_shape_inference_fails_when_declared_output_disagrees(good):
    m = copy(good)
    m.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 10  # real: 5 + 4 classes = 9
    r = structure.check_shape_inference(m)
    assert r.status == "fail" and "shape inference" in r.message


@pytest.mark.parametrize("opset,status", [(10, "fail"), (11, "pass"), (21, "pass"), (22, "warn")])
def test_opset_range(opset, status, monkeypatch):
    monkeypatch.setattr(structure, "runtime_loads_opset", lambda v: True)  # onnxruntime 1.18 stops at 21
    m = tiny([helper.make_node("Relu", ["x"], ["y"])], opset=opset)
    r = structure.check_opset(m, GraphIndex(m))
    assert r.status == status, r.message
    if status != "pass":
        assert f"opset {opset}" in r.message and "11..21" in r.message


def test_per_channel_qdq_needs_opset_13():
    good = qdq_conv()
    assert structure.check_opset(good, GraphIndex(good)).status == "pass"
    old = set_opset(good, 12)
    r = structure.check_opset(old, GraphIndex(old))
    assert r.status == "fail" and "per-channel" in r.message and "w_DQ" in r.message
    assert structure.check_onnx_checker(old).status == "fail"  # axis attribute unknown before 13


def test_opset_10_with_per_channel_dq_fails():
    m = set_opset(qdq_conv(), 10)
    r = structure.check_opset(m, GraphIndex(m))
    assert r.status == "fail" and "opset 10" in r.message


def test_an_opset_newer_than_tested_fails_when_onnxruntime_cannot_run_it(monkeypatch):
    """Opset 23 with per-channel Q/DQ warns when onnxruntime runs it (1.18 stops at 21);
    an opset the runtime cannot load fails, naming the onnxruntime version."""
    assert structure.runtime_loads_opset(21) and not structure.runtime_loads_opset(99)
    new = set_opset(qdq_conv(), 23)
    monkeypatch.setattr(structure, "runtime_loads_opset", lambda v: True)
    r = structure.check_opset(new, GraphIndex(new))
    assert r.status == "warn" and "opset 23" in r.message and "runs it" in r.message
    monkeypatch.setattr(structure, "runtime_loads_opset", lambda v: False)
    r = structure.check_opset(new, GraphIndex(new))
    assert r.status == "fail" and f"newer than onnxruntime {structure.ort_version()}" in r.message


def test_ops_custom_domain_fails_on_ort_and_com_microsoft_only_on_tensorrt():
    custom = tiny([helper.make_node("Magic", ["x"], ["y"], domain="my.ops", name="magic")],
                  domains=["my.ops"])
    r = targets.check_ops(custom, GraphIndex(custom), "ort-cpu")
    assert r.status == "fail" and "magic" in r.message and "my.ops" in r.message
    ms = tiny([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft", name="gelu")],
              domains=["com.microsoft"])
    assert targets.check_ops(ms, GraphIndex(ms), "ort-cpu").status == "pass"
    r = targets.check_ops(ms, GraphIndex(ms), "tensorrt")
    assert r.status == "fail" and "gelu" in r.message


def test_ops_custom_domain_inside_an_if_branch_fails():
    branch = helper.make_graph([helper.make_node("Magic", ["x"], ["z"], domain="my.ops")], "then", [],
                               [helper.make_tensor_value_info("z", T.FLOAT, [1, 4, 8, 8])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z"])], "else", [],
                              [helper.make_tensor_value_info("z", T.FLOAT, [1, 4, 8, 8])])
    cond = numpy_helper.from_array(np.array(True), "cond")
    m = tiny([helper.make_node("If", ["cond"], ["y"], name="select", then_branch=branch, else_branch=other)],
             inits=[cond], domains=["my.ops"])
    r = targets.check_ops(m, GraphIndex(m), "ort-cpu")
    assert r.status == "fail"
    assert "Magic(z) in a subgraph of select (my.ops.Magic: domain not supported by ort-cpu)" in r.message


def test_ops_qoperator_and_dynamic_weights_fail_on_tensorrt():
    inits = [numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")]
    dyn = tiny([helper.make_node("Relu", ["w"], ["w2"]),
                helper.make_node("Conv", ["x", "w2"], ["y"], name="c")], inits)
    assert targets.check_ops(dyn, GraphIndex(dyn), "ort-cpu").status == "pass"
    r = targets.check_ops(dyn, GraphIndex(dyn), "tensorrt")
    assert r.status == "fail" and "weights are not constant" in r.message
    q = qdq_conv()  # weights through DequantizeLinear of a constant are fine
    assert targets.check_ops(q, GraphIndex(q), "tensorrt").status == "pass"


def test_deprecated_upsample_warns():
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    m = tiny([helper.make_node("Upsample", ["x", "scales"], ["y"], name="up")], inits, opset=9,
             out_shape=(1, 4, 16, 16))
    r = targets.check_ops(m, GraphIndex(m), "ort-cpu")
    assert r.status == "warn" and "Upsample" in r.message and "Resize" in r.message


def test_float64_warns_and_names_the_tensor():
    m = tiny([helper.make_node("Cast", ["x"], ["x64"], to=T.DOUBLE, name="to_double"),
              helper.make_node("Cast", ["x64"], ["y"], to=T.FLOAT)])
    for target in ("ort-cpu", "tensorrt"):
        r = structure.check_float64(m, target)
        assert r.status == "warn" and "to_double" in r.message
    assert structure.check_float64(tiny([helper.make_node("Relu", ["x"], ["y"])]), "ort-cpu").status == "pass"


def test_dynamic_dims_warn():
    m = fixtures.build_yolov5_v6(opset=13, dynamic_batch=True)
    r = structure.check_dynamic_dims(m)
    assert r.status == "warn" and "batch" in r.message
    assert r.details["dynamic"]["images"][0] == "batch"


def test_unused_initializer_warns(good):
    m = copy(good)
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(100, np.float32), "orphan"))
    r = structure.check_unused_initializers(m)
    assert r.status == "warn" and "orphan" in r.message and r.details["bytes"] >= 400


def test_duplicate_tensor_fails_and_duplicate_node_name_warns():
    dup_t = tiny([helper.make_node("Relu", ["x"], ["y"], name="a"),
                  helper.make_node("Sigmoid", ["x"], ["y"], name="b")])
    r = structure.check_duplicate_names(dup_t)
    assert r.status == "fail" and r.details["tensors"] == ["y"]
    dup_n = tiny([helper.make_node("Relu", ["x"], ["h"], name="same"),
                  helper.make_node("Relu", ["h"], ["y"], name="same")])
    r = structure.check_duplicate_names(dup_n)
    assert r.status == "warn" and "same" in r.message


def test_dangling_input_fails_and_names_node_and_tensor():
    m = tiny([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")])
    r = structure.check_dangling_inputs(GraphIndex(m))
    assert r.status == "fail" and "add" in r.message and "ghost" in r.message
    # a sparse initializer defines its tensor (onnxruntime runs such a model)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([2.0], np.float32), "ghost"),
                                       numpy_helper.from_array(np.array([0], np.int64), "idx"), [1])
    m.graph.sparse_initializer.append(sparse)
    assert structure.check_dangling_inputs(GraphIndex(m)).status == "pass"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_fail(good, bad):
    conv = next(n for n in good.graph.node if n.op_type == "Conv")
    w = numpy_helper.to_array(next(t for t in good.graph.initializer if t.name == conv.input[1])).copy()
    w.flat[3] = bad
    r = structure.check_weights_finite(GraphIndex(set_init(good, conv.input[1], w)))
    assert r.status == "fail" and conv.input[1] in r.message and "(1 values)" in r.message
    assert structure.check_weights_finite(GraphIndex(good)).status == "pass"


def _same_maxpool(value: float, extra_reader: bool = False) -> onnx.ModelProto:
    """TF-style "same" max pooling: Pad with a constant value, then MaxPool without pads; the
    value optionally read by a Mul too."""
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")
    val = numpy_helper.from_array(np.array(value, np.float32), "pad_value")
    nodes = [helper.make_node("Pad", ["x", "pads", "pad_value"], ["p"], name="pad", mode="constant"),
             helper.make_node("MaxPool", ["p"], ["y" if not extra_reader else "m"], name="pool",
                              kernel_shape=[2, 2], strides=[1, 1])]
    if extra_reader:
        nodes.append(helper.make_node("Mul", ["m", "pad_value"], ["y"], name="scale"))
    return tiny(nodes, [pads, val])


def test_minus_inf_pad_value_is_a_bound_not_a_bad_weight():
    ok = structure.check_weights_finite(GraphIndex(_same_maxpool(-np.inf)))
    assert ok.status == "pass" and "1 hold infinite bounds" in ok.message
    assert structure.check_onnx_checker(_same_maxpool(-np.inf)).status == "pass"
    # the same -inf read as a factor, and a NaN even as a pad value, still fail
    for m in (_same_maxpool(-np.inf, extra_reader=True), _same_maxpool(np.nan)):
        r = structure.check_weights_finite(GraphIndex(m))
        assert r.status == "fail" and "pad_value (1 values)" in r.message


def test_the_checker_message_keeps_the_node_it_names_on_a_later_line():
    """onnx names the node on the lines after its first: the message stopped at 'of node:'."""
    m = qdq_conv()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend([nodes[-1]] + nodes[:-1])   # the Sigmoid first: not topologically sorted
    r = structure.check_onnx_checker(m)
    assert r.status == "fail" and "head/Sigmoid" in r.message and "\n" not in r.message
