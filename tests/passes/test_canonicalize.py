"""canonicalize: constant/shape folding and no-op removal, exact and idempotent."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fixtures
from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import PassContext
from onnxslim_yolo.pass_manager import PassManager
from onnxslim_yolo.passes.canonicalize import Canonicalize, _inferred_graph


def ops(model):
    return Counter(n.op_type for n in model.graph.node)


def run(model, **ctx):
    return PassManager([Canonicalize()], PassContext(**ctx)).run(model)


def noisy_model(opset: int = 13, batch="N") -> onnx.ModelProto:
    """Conv whose output goes through Identity, a no-op Cast, a Dropout and a Shape-driven Reshape."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["c"], ["i"]),
        helper.make_node("Cast", ["i"], ["k"], to=TensorProto.FLOAT),
        helper.make_node("Dropout", ["k"], ["d"]),
        helper.make_node("Shape", ["d"], ["s"]),
        helper.make_node("Gather", ["s", "idx"], ["g"], axis=0),
        helper.make_node("Unsqueeze", ["g", "ax0"], ["u"]),
        helper.make_node("Concat", ["u", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["d", "shape"], ["r"]),
        helper.make_node("Identity", ["r"], ["y"]),
    ]
    inits = [w, numpy_helper.from_array(np.array(0, np.int64), "idx"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])], inits)
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", opset)])


def test_noops_removed_and_shapes_folded_with_static_input():
    res = run(noisy_model(batch=1))
    c = ops(res.model)
    assert c == Counter({"Conv": 1, "Reshape": 1}), c
    assert [o.name for o in res.model.graph.output] == ["y"]
    counts = res.records[0].report["counts"]
    assert counts["removed_identity"] == 2 and counts["removed_cast"] == 1 and counts["removed_dropout"] == 1
    d = res.records[0].verification[0]
    assert d["max_abs"] <= 1e-5 * d["ref_max"]


def test_dynamic_batch_stays_dynamic_until_shape_given():
    """The Shape-driven Reshape of a dynamic batch copies the batch (target [0, -1], not the 1 of
    any one run); a given input shape fixes the batch, and the chain folds away."""
    dyn = run(noisy_model(batch="N"))
    assert ops(dyn.model)["Shape"] == 0 and _reshape_targets(dyn.model) == [[0, -1]]
    assert ir.input_shapes(dyn.model)["x"] == ("N", 3, 8, 8)
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    assert _ort(dyn.model, {"x": x}).shape == (2, 4 * 8 * 8)
    fixed = run(noisy_model(batch="N"), input_shapes={"x": (2, 3, 8, 8)})
    assert ops(fixed.model)["Shape"] == 0
    dims = [d.dim_value for d in fixed.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 8, 8]


def test_a_given_shape_replaces_stale_symbolic_shapes_when_nothing_folds():
    # an onnxslim-simplified dynamic YOLO11n export lists each tensor's symbolic shape in
    # value_info up to 9 times, its output included. Shape inference updated the graph output,
    # graphsurgeon then read a stale copy, and with nothing to fold no later round repaired it:
    # the output kept ['batch', 84, <expression>] and failed the reference I/O check
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "h", "w"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])], [w])
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    for _ in range(3):
        m.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                ["N", 4, "floor(h)", "floor(w)"]))
    graph = _inferred_graph(ir.fix_input_shapes(m, {"x": (2, 3, 8, 8)}), None)
    assert graph.outputs[0].shape == [2, 4, 8, 8]
    fixed = run(m, input_shapes={"x": (2, 3, 8, 8)}).model
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in fixed.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [2, 4, 8, 8]


def test_quantize_dequantize_never_folded():
    w = numpy_helper.from_array(np.arange(-13, 14, dtype=np.int8).reshape(1, 3, 3, 3), "wq")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["y"])]
    inits = [w, numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c", "d"])], inits)
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    out = run(m).model
    assert ops(out)["DequantizeLinear"] == 1
    assert any(i.data_type == TensorProto.INT8 for i in out.graph.initializer)


def test_unnamed_nodes_get_unique_names():
    m = noisy_model(batch=1)
    for n in m.graph.node:
        n.name = ""
    out = run(m).model
    names = [n.name for n in out.graph.node]
    assert all(names) and len(set(names)) == len(names)


@pytest.mark.parametrize("family", sorted(fixtures.FAMILIES))
@pytest.mark.parametrize("opset", [11, 13])
def test_fixture_families_exact_and_idempotent(family, opset):
    m = fixtures.FAMILIES[family](opset=opset)
    first = run(m)
    assert first.records[0].report["counts"]["nodes_after"] <= len(m.graph.node)
    second = run(first.model)
    assert not second.records[0].modified
    assert ops(second.model) == ops(first.model)


def test_real_yolov5n_folds_constants_exactly(yolov5n_path):
    m = ir.load(yolov5n_path)
    res = run(m)
    c = ops(res.model)
    assert c["Constant"] == 0 and c["Conv"] == 60 and len(res.model.graph.node) == 236
    d = res.records[0].verification[0]
    assert d["max_abs"] <= 1e-4 * d["ref_max"] and d["cosine"] > 0.999999


def _two_step_shape_chain() -> onnx.ModelProto:
    """x (1,4,8,8) -> Reshape to (1, 4, 64) by a Shape chain with a Div (no data propagation
    through it), then Reshape to (1, 2, 2, 64) by a Shape chain of that result: the second chain
    can only fold once the first has (the YOLOv3-tinyu export's DFL Reshape)."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
        helper.make_node("Div", ["c", "one_val"], ["c1"]),
        helper.make_node("Unsqueeze", ["c1", "ax0"], ["cu"]),
        helper.make_node("Concat", ["one_vec", "cu", "minus1"], ["t1"], axis=0),
        helper.make_node("Reshape", ["x", "t1"], ["y"]),
        helper.make_node("Shape", ["y"], ["s2"]), helper.make_node("Gather", ["s2", "two"], ["d"], axis=0),
        helper.make_node("Unsqueeze", ["d", "ax0"], ["du"]),
        helper.make_node("Concat", ["one_vec", "two_vec", "two_vec", "du"], ["t2"], axis=0),
        helper.make_node("Reshape", ["y", "t2"], ["x2"]),
        helper.make_node("Relu", ["x2"], ["out"]),
    ]
    inits = [i64("one", 1), i64("one_val", 1), i64("ax0", [0]), i64("one_vec", [1]), i64("minus1", [-1]),
             i64("two", 2), i64("two_vec", [2])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["a", "b", "c", "d"])
    g = helper.make_graph(nodes, "chain", [x], [out], inits)
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_shape_chains_that_depend_on_each_other_fold_in_rounds():
    model = _two_step_shape_chain()
    res = run(model)
    assert ops(res.model) == Counter({"Reshape": 2, "Relu": 1})
    inferred = onnx.shape_inference.infer_shapes(res.model)
    out = inferred.graph.output[0].type.tensor_type.shape
    assert [d.dim_value for d in out.dim] == [1, 2, 2, 64]


def test_folding_goes_on_until_every_fpn_level_has_a_static_shape():
    """Each round resolves one level of a computed-size FPN (torchvision's), so six levels take
    more rounds than a fixed few; afterwards plain shape inference knows every Conv's output."""
    from onnxslim_yolo.analysis.flops import _infer, _unshaped_outputs

    from ..analysis import graphs

    model = graphs.fpn_chain()
    out = run(model).model
    assert _unshaped_outputs(_infer(out)) == 0
    assert ops(out)["Resize"] == 6 and not ops(out)["Shape"]


def se_squeezed(batch=1, opset: int = 13) -> onnx.ModelProto:
    """tf2onnx's squeeze-excite: Conv a -> GlobalAveragePool -> Squeeze [N, C] -> Reshape back to
    [N, C, 1, 1] -> Conv -> Sigmoid -> Mul(a, gate). A Flatten of the pooled map is read as well
    (a shape change that is not a round trip), and the graph output is a no-op Reshape."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "wa"),
             numpy_helper.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32), "wse"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, 8, 1, 1], np.int64), "back"),
             numpy_helper.from_array(np.array([-1, 8, 8, 8], np.int64), "same")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1], name="a"),
             helper.make_node("GlobalAveragePool", ["a"], ["gap"], name="gap"),
             helper.make_node("Squeeze", ["gap", "axes"], ["sq"], name="sq"),
             helper.make_node("Reshape", ["sq", "back"], ["rs"], name="rs"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
             helper.make_node("Conv", ["rs", "wse"], ["se"], name="se"),
             helper.make_node("Sigmoid", ["se"], ["gate"], name="gate"),
             helper.make_node("Mul", ["a", "gate"], ["m"], name="scale"),
             helper.make_node("Reshape", ["m", "same"], ["y"], name="out")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])
    g = helper.make_graph(nodes, "se", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8, 8, 8]),
                           helper.make_tensor_value_info("flat", TensorProto.FLOAT, [batch, 8])], inits)
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", opset)])


def test_a_squeeze_reshape_round_trip_is_bypassed_exactly():
    res = run(se_squeezed())
    c = ops(res.model)
    assert c == Counter({"Conv": 2, "GlobalAveragePool": 1, "Flatten": 1, "Sigmoid": 1, "Mul": 1,
                         "Reshape": 1}), c
    se = next(n for n in res.model.graph.node if n.name == "se")
    assert se.input[0] == "gap"
    assert res.records[0].report["counts"]["removed_reshape_round_trip"] == 1
    d = res.records[0].verification[0]
    assert d["max_abs"] <= 1e-5 * max(d["ref_max"], 1.0)
    # with a dynamic batch the shapes are not static: nothing is bypassed
    dyn = run(se_squeezed(batch="N"))
    assert ops(dyn.model)["Squeeze"] == 1 and ops(dyn.model)["Reshape"] == 2


def affine_chain() -> onnx.ModelProto:
    """Conv -> Relu -> x * 1 -> x + 0 (per channel) -> 0 + x -> x - 0 -> x / 1 -> y, an untrained
    learnable affine; then ops that are not identities: x * 1 broadcast to a larger batch, x + 0.5,
    1 - x (the neutral-looking constant first)."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones((1,), np.float32), "one"),
             numpy_helper.from_array(np.zeros((1, 4, 1, 1), np.float32), "zeros"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), "ones_batch2"),
             numpy_helper.from_array(np.full((1,), 0.5, np.float32), "half")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Mul", ["r", "one"], ["m"], name="mul1"),
             helper.make_node("Add", ["m", "zeros"], ["a"], name="add0"),
             helper.make_node("Add", ["zero", "a"], ["a2"], name="zero_add"),
             helper.make_node("Sub", ["a2", "zero"], ["s"], name="sub0"),
             helper.make_node("Div", ["s", "one"], ["y"], name="div1"),
             helper.make_node("Mul", ["y", "ones_batch2"], ["wide"], name="broadcast"),
             helper.make_node("Add", ["y", "half"], ["shift"], name="add_half"),
             helper.make_node("Sub", ["one", "y"], ["flip"], name="one_minus")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "wide", "shift", "flip")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    g = helper.make_graph(nodes, "affine", [x], outs, inits)
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])


def test_identity_arithmetic_is_bypassed_exactly():
    model = affine_chain()
    res = run(model)
    names = {n.name for n in res.model.graph.node}
    assert names == {"conv", "relu", "broadcast", "add_half", "one_minus"}, names
    assert res.records[0].report["counts"]["removed_identity_arithmetic"] == 5
    assert [o.name for o in res.model.graph.output] == ["y", "wide", "shift", "flip"]
    relu = next(n for n in res.model.graph.node if n.name == "relu")
    assert relu.output[0] == "y"  # the graph output keeps its name, written by the Relu now
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    import onnxruntime as ort
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    after = ort.InferenceSession(res.model.SerializeToString()).run(None, {"x": x})
    for b, a in zip(before, after):
        assert b.shape == a.shape and np.array_equal(b, a)


def _reshape_targets(model):
    consts = {t.name: numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    return [consts.get(n.input[1]) for n in model.graph.node if n.op_type == "Reshape"]


def _ort(model, feeds):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so).run(None, feeds)[0]


@pytest.mark.parametrize("resize,batch_from", [(False, "own"), (False, "x"), (True, "x")])
def test_computed_reshape_targets_of_a_dynamic_batch_become_constants_copying_the_batch(resize, batch_from):
    """Each shuffle's two computed targets become [0, 2, 4, 8, 8] and [0, 8, 8, 8] (0 copies the
    batch), also when the batch is read from the graph input, under another name after a Resize;
    no Shape is left, the model still takes any batch, and the channel analysis sees through
    both shuffles."""
    from onnxslim_yolo.analysis.channels import analyze_channels
    from tests.analysis import graphs
    model = graphs.dynamic_shuffle_graph(resize, batch_from)
    res = run(model)
    assert _reshape_targets(res.model) == [[0, 2, 4, 8, 8], [0, 8, 8, 8]] * 2
    assert ops(res.model)["Shape"] == 0 and ops(model)["Shape"] == 16
    assert res.records[0].report["counts"]["reshape_targets_made_constant"] == 4
    assert ir.input_shapes(res.model)["x"] == ("batch", 3, 8, 8)
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    assert np.array_equal(_ort(res.model, {"x": x}), _ort(model, {"x": x}))
    groups = analyze_channels(res.model).prunable_groups()
    assert {"u0.c", "u1.c"} <= {r.node for g in groups for r in g.producers}


def test_a_batch_entry_read_from_another_input_keeps_its_target_computed():
    """The second shuffle's batch entry is dim 0 of the second input y (n, 1): nothing proves it
    equals x's batch, so that target stays computed, and so does the next one, whose input shape
    stays unknown; the first shuffle's two become constants."""
    from tests.analysis import graphs
    model = graphs.dynamic_shuffle_graph(batch_from="y")
    res = run(model)
    assert _reshape_targets(res.model) == [[0, 2, 4, 8, 8], [0, 8, 8, 8], None, None]
    assert res.records[0].report["counts"]["reshape_targets_made_constant"] == 2
    assert ops(res.model)["Shape"] > 0


def test_the_batch_is_followed_only_through_ops_that_keep_the_first_axis():
    """A Conv, a Transpose (0, 2, 3, 1) and a Concat on channels keep the batch of x; a Transpose
    with its default (reversed) order, a Concat on axis 0 and a Flatten do not."""
    import onnx_graphsurgeon as gs
    from onnxslim_yolo.passes.canonicalize import _batch_root
    x = gs.Variable("x", np.float32, ["b", 3, 4, 4])
    graph = gs.Graph(inputs=[x])

    def op(name, kind, inputs, shape, **attrs):
        out = gs.Variable(name, np.float32, shape)
        graph.nodes.append(gs.Node(kind, name, attrs, inputs=inputs, outputs=[out]))
        return out

    w = gs.Constant("w", np.ones((3, 3, 1, 1), np.float32))
    c = op("c", "Conv", [x, w], ["b", 3, 4, 4])
    kept = [op("t", "Transpose", [c], ["b", 4, 4, 3], perm=[0, 2, 3, 1]),
            op("cat1", "Concat", [c, c], ["b", 6, 4, 4], axis=1)]
    lost = [op("rev", "Transpose", [c], [4, 4, 3, "b"]),
            op("cat0", "Concat", [c, c], ["b2", 3, 4, 4], axis=0),
            op("flat", "Flatten", [c], ["b", 48], axis=1)]
    assert [_batch_root(t) for t in kept] == [x, x]
    assert [_batch_root(t) for t in lost] == [None, None, None]
    # a broadcasting Add of a batch-1 input: the batch is x's, not the first operand's (it was z's,
    # and a Reshape target "dim 0 of the sum" became 0, a copy of a batch-1 tensor's: wrong at batch 2)
    z = gs.Variable("z", np.float32, [1, 3, 4, 4])
    y = gs.Variable("y", np.float32, ["other", 3, 4, 4])
    graph.inputs += [z, y]
    assert _batch_root(op("zx", "Add", [z, c], ["b", 3, 4, 4])) is x
    assert _batch_root(op("zz", "Relu", [z], [1, 3, 4, 4])) is z
    assert _batch_root(op("xy", "Add", [c, y], [None, 3, 4, 4])) is None   # two batches: not told


@pytest.mark.parametrize("opset", [9, 13])
def test_a_flatten_from_dim_two_reads_the_shape_by_slice_and_becomes_constant(opset):
    """``x.flatten(start_dim=2)`` of a dynamic batch (YOLOX's head): Shape -> Slice [0:2] ->
    Concat with [-1] -> Reshape becomes the target [0, 4, -1] (Slice bounds as attributes before
    opset 10, as inputs after)."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 1, 1)).astype(np.float32), "w")
    consts = [numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    if opset >= 10:
        consts += [numpy_helper.from_array(np.array([v], np.int64), n)
                   for n, v in (("s0", 0), ("s1", 2), ("ax", 0))]
        sl = helper.make_node("Slice", ["s", "s0", "s1", "ax"], ["head"])
    else:
        sl = helper.make_node("Slice", ["s"], ["head"], starts=[0], ends=[2], axes=[0])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Shape", ["c"], ["s"]), sl,
             helper.make_node("Concat", ["head", "minus1"], ["t"], axis=0),
             helper.make_node("Reshape", ["c", "t"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16])], [w] + consts)
    model = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", opset)])
    res = run(model)
    assert _reshape_targets(res.model) == [[0, 4, -1]] and ops(res.model)["Shape"] == 0
    x = np.random.default_rng(1).normal(size=(3, 3, 4, 4)).astype(np.float32)
    assert np.array_equal(_ort(res.model, {"x": x}), _ort(model, {"x": x}))


@pytest.mark.parametrize("attr, value, dtype", [("value_float", 40.0, np.float32),
                                                ("value_floats", [40.0], np.float32),
                                                ("value_int", 3, np.int64)])
def test_constants_written_as_scalar_attributes_keep_their_onnx_type(attr, value, dtype):
    """A Constant with value_float (valid ONNX, run by onnxruntime) was folded as float64: the Concat
    of it and a float32 tensor failed the checker, and canonicalize failed (exit 4)."""
    is_float = dtype == np.float32
    nodes = [helper.make_node("Constant", [], ["k"], **{attr: value}),
             helper.make_node("Reshape", ["k", "one"], ["k1"]),
             helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT if is_float else TensorProto.INT64),
             helper.make_node("Concat", ["xc", "k1"], ["y"], axis=0)]
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    out_type = TensorProto.FLOAT if is_float else TensorProto.INT64
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", out_type, [3])], [one])
    model = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    res = run(model)
    folded = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    k = next(v for v in folded.values() if v.size == 1)
    assert k.dtype == dtype and float(k.ravel()[0]) == float(np.ravel(value)[0])
    assert ir.const_value(ir.to_graph(model).nodes[0].outputs[0]).dtype == dtype


def test_an_ir3_model_listing_its_initializers_as_inputs_stays_valid():
    """IR 3 wants every initializer among the graph inputs; graphsurgeon drops them there, and the
    result kept IR 3: 'model.0.conv.weight in initializer but not in graph input' (exit 4)."""
    m = fixtures.build_yolov5_v6(opset=11)
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    m.ir_version = 3
    onnx.checker.check_model(m)
    res = run(m)
    assert res.model.ir_version == 4
    onnx.checker.check_model(res.model)


@pytest.mark.parametrize("start, mid, back, removed", [
    (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT, True),     # widened and back: exact
    (TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.FLOAT16, True),
    (TensorProto.INT32, TensorProto.INT64, TensorProto.INT32, True),
    (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.FLOAT, False),   # narrowed: a rounding, kept
    (TensorProto.FLOAT, TensorProto.INT32, TensorProto.FLOAT, False),     # to integers: a truncation
    (TensorProto.INT32, TensorProto.DOUBLE, TensorProto.INT32, False),    # across kinds: kept
    (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, False),  # back to another type
])
def test_a_cast_round_trip_is_removed_only_when_lossless(start, mid, back, removed):
    """A float32 -> float64 -> float32 pair between a Conv and its BatchNormalization kept the BN
    from being folded; narrowing, truncating or retyping pairs change values and stay."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="in"),
             helper.make_node("Conv", ["xf", "w"], ["cf"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Cast", ["cf"], ["c"], to=start, name="to_start"),
             helper.make_node("Cast", ["c"], ["c64"], to=mid, name="up"),
             helper.make_node("Cast", ["c64"], ["y"], to=back, name="down"),
             helper.make_node("Abs", ["y"], ["z"], name="abs")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", start, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("z", back, [1, 4, 8, 8])], [w])
    res = run(helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)]))
    c = ops(res.model)
    # "in" and "to_start" are no-op Casts for a float32 start; the pair goes when lossless
    casts = (0 if start == TensorProto.FLOAT else 2) + (0 if removed else 2)
    assert c == Counter({"Conv": 1, "Abs": 1, "Cast": casts}), c
    assert res.records[0].report["counts"].get("removed_cast_round_trip", 0) == int(removed)


def test_initializers_listed_as_inputs_are_reported_as_frozen():
    """An initializer also listed as a graph input (overridable in onnxruntime) becomes a constant
    and leaves the interface: the report names it (it was dropped unsaid)."""
    from onnx import TensorProto, numpy_helper

    g = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]),
                           helper.make_tensor_value_info("s", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                          [numpy_helper.from_array(np.array([2.0], np.float32), "s")])
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    res = Canonicalize().run(m, PassContext())
    assert [i.name for i in res.model.graph.input] == ["x"] and res.modified
    assert res.report.counts["initializer_inputs_frozen"] == 1
    assert res.report.details["initializer_inputs_frozen"] == ["s"]


def test_nodes_out_of_order_are_sorted_before_shape_inference():
    """A graph output declared without a shape, its nodes listed out of order (onnxruntime loads
    it): inference reads nodes in order and found no shape, and the manager blamed canonicalize
    for the shapeless output ('model is invalid', exit 4)."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    y.type.tensor_type.ClearField("shape")
    g = helper.make_graph([helper.make_node("Relu", ["c"], ["y"]),
                           helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])], [y], [w])
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    assert not ir.is_topological(m.graph)
    res = run(m)
    assert [n.op_type for n in res.model.graph.node] == ["Conv", "Relu"]
    assert ir.is_topological(res.model.graph)
    onnx.checker.check_model(res.model, full_check=True)


def test_another_topological_order_of_the_same_nodes_is_no_change():
    """A ResNet block as torch lists it (the branch, then the shortcut Conv): graphsurgeon's sort
    puts the shortcut first. That alone is no change: the model goes back as given (the summary
    said "changed: yes" with nothing to show). An input out of order is sorted and counted."""
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv1", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w"], ["b"], name="conv2", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["x", "w"], ["d"], name="down", kernel_shape=[1, 1]),
             helper.make_node("Add", ["b", "d"], ["y"], name="add")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])
    m = helper.make_model_gen_version(helper.make_graph(nodes, "g", [x], [y], [w]),
                                      opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    resorted = [n.name for n in ir.to_graph(m).toposort().nodes]
    assert resorted != [n.name for n in nodes]   # the case: graphsurgeon orders them otherwise
    res = Canonicalize().run(m, PassContext())
    assert not res.modified and res.model is m and "nodes_sorted" not in res.report.counts
    m.graph.node.insert(0, m.graph.node.pop())   # the Add first: out of order
    res = Canonicalize().run(m, PassContext())
    assert res.modified and res.report.counts["nodes_sorted"] == 5
    assert ir.is_topological(res.model.graph)


def test_a_refusal_seen_again_in_another_fold_round_is_listed_once():
    """An Identity from one graph output to another was refused once per fold round (3 identical
    entries), 'from a graph input or constant'."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]),
                           helper.make_node("Identity", ["a"], ["b"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3])])
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    skipped = Canonicalize().run(m, PassContext()).report.skipped
    assert [s["reason"] for s in skipped] == ["Identity writes a graph output from another graph output"]


def test_a_bfloat16_round_trip_is_kept_and_the_pass_runs():
    """graphsurgeon gives a bfloat16 tensor's type as its ONNX number, which numpy cannot read:
    canonicalize raised a TypeError (exit 4) on any model with a bfloat16 Cast."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Cast", ["c"], ["b"], to=TensorProto.BFLOAT16, name="to_bf16"),
             helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT, name="back")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    res = run(helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert ops(res.model) == Counter({"Conv": 1, "Cast": 2})   # a rounding: kept


def test_a_model_with_nothing_to_do_comes_back_as_given_without_a_warning(caplog):
    """graphsurgeon writes initializers in the order their nodes use them; a model listing them
    otherwise (a Resize's scales before its roi) is not changed by that, so the pass says
    unmodified and returns the model it was given, and the manager has nothing to warn about."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Resize", ["c", "roi", "scales"], ["y"], name="up", mode="nearest")]
    inits = [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.zeros(0, np.float32), "roi")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    res = Canonicalize().run(model, PassContext())
    assert res.modified is False and res.model is model
    with caplog.at_level("WARNING"):
        out = run(model)
    assert not out.records[0].modified
    assert [t.name for t in out.model.graph.initializer] == ["w", "scales", "roi"]
    assert not [r for r in caplog.records if "modified=False" in r.getMessage()]
