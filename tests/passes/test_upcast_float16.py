"""upcast-float16: float16 exports computed in float32 with their interface kept, and scheduled
before INT8 and pruning by ``optimize``."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fixtures
from onnxslim_yolo import verify
from onnxslim_yolo.api import OptimizeOptions, optimize, pipeline_names
from onnxslim_yolo.pass_base import PassContext, VerificationError
from onnxslim_yolo.pass_manager import PassManager
from onnxslim_yolo.passes.canonicalize import Canonicalize
from onnxslim_yolo.passes.upcast_float16 import UpcastFloat16, float16_tensors

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def half(model: onnx.ModelProto, keep_io_types: bool = False) -> onnx.ModelProto:
    """``model`` as onnxruntime's float16 converter writes it (the tool users run on exports)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=keep_io_types)


def rounded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (float32) with every float32 initializer and Constant rounded to float16 values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensors = list(out.graph.initializer) + [a.t for n in out.graph.node for a in n.attribute
                                             if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        if t.data_type == F32:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16).astype(np.float32),
                                               t.name))
    return out


def io_types(model: onnx.ModelProto):
    return ([v.type.tensor_type.elem_type for v in model.graph.input],
            [v.type.tensor_type.elem_type for v in model.graph.output])


@pytest.mark.parametrize("keep_io_types", [False, True])
def test_a_float16_export_computes_in_float32_behind_its_own_interface(keep_io_types):
    original = fixtures.build_yolov5_v6(opset=13)
    model = half(original, keep_io_types)
    assert float16_tensors(model) > 20
    res = PassManager([UpcastFloat16(), Canonicalize()], PassContext()).run(model)
    out = res.model
    assert float16_tensors(out) == 0
    assert not [t.name for t in out.graph.initializer if t.data_type not in (F32, TensorProto.INT64)]
    assert io_types(out) == io_types(model)
    want = F32 if keep_io_types else F16
    assert io_types(out) == ([want], [want])
    # the only Casts left are the interface's: the converter's own became float32 -> float32 no-ops
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert len(casts) == (0 if keep_io_types else 2)
    tidy = PassManager([Canonicalize()], PassContext()).run(original).model
    assert Counter(n.op_type for n in out.graph.node if n.op_type != "Cast") == \
        Counter(n.op_type for n in tidy.graph.node)
    counts = res.records[0].report["counts"]
    assert counts["initializers"] == sum(t.data_type == F16 for t in model.graph.initializer)
    assert counts.get("inputs_cast", 0) == counts.get("outputs_cast", 0) == (0 if keep_io_types else 1)
    # the weights are the same numbers: the result computes what the float32 model does with its
    # weights rounded to float16, up to the rounding of the float16 output
    feed = {k: v.astype(np.float16).astype(np.float32)
            for k, v in verify.random_feeds(original, 1, 0)[0].items()}
    ref = verify.run(verify.session(rounded(original), optimize=False), feed)
    got = verify.run(verify.session(out, optimize=False),
                     {k: v.astype(np.float32 if keep_io_types else np.float16) for k, v in feed.items()})
    for a, b in zip(ref, got):
        tol = 1e-4 if keep_io_types else 2.0 ** -10
        assert np.abs(a - b.astype(np.float32)).max() <= tol * np.abs(a).max()


def test_the_float32_arithmetic_is_closer_to_the_float32_model_than_float16_was():
    """Upcasting drops the float16 rounding of every intermediate result: on the original float32
    weights rounded to float16, the upcast model's outputs are nearer the float32 model's."""
    original = fixtures.build_yolov5_v6(opset=13)
    model = half(original)
    out = PassManager([UpcastFloat16()], PassContext()).run(model).model
    feed = verify.random_feeds(original, 1, 3)[0]
    ref = verify.run(verify.session(original, optimize=False), feed)
    f16 = {k: v.astype(np.float16) for k, v in feed.items()}
    before = verify.run(verify.session(model, optimize=False), f16)
    after = verify.run(verify.session(out, optimize=False), f16)
    for a, b16, b32 in zip(ref, before, after):
        assert np.abs(b32.astype(np.float32) - a).mean() < np.abs(b16.astype(np.float32) - a).mean()


def _if_model() -> onnx.ModelProto:
    """y = x + (c ? [1.5] : [-2.25]) with float16 constants inside an If's branches, and a float16
    input passed straight through to a second output."""
    def branch(name, value):
        const = helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.array([value], np.float16), name))
        return helper.make_graph([const], f"{name}_g", [], [helper.make_tensor_value_info(name, F16, [1])])

    nodes = [helper.make_node("If", ["c"], ["k"], then_branch=branch("a", 1.5),
                              else_branch=branch("b", -2.25)),
             helper.make_node("Add", ["x", "k"], ["y"])]
    graph = helper.make_graph(nodes, "if16", [helper.make_tensor_value_info("x", F16, [2, 3]),
                                              helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", F16, [2, 3]),
                               helper.make_tensor_value_info("x", F16, [2, 3])])
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_subgraphs_are_upcast_and_a_passed_through_output_is_left_with_a_reason():
    model = _if_model()
    res = PassManager([UpcastFloat16()], PassContext()).run(model)
    out = res.model
    assert float16_tensors(model) == 2 and float16_tensors(out) == 0
    branch = out.graph.node[1].attribute[0].g   # after the input's Cast
    assert branch.output[0].type.tensor_type.elem_type == F32
    report = res.records[0].report
    assert report["skipped"] == [{"node": "x",
                                  "reason": "graph output is not computed by a node; left as it is"}]
    x = np.arange(6, dtype=np.float16).reshape(2, 3)
    for cond, add in ((True, 1.5), (False, -2.25)):
        y, x_out = verify.session(out, optimize=False).run(None, {"x": x, "c": np.array(cond)})
        assert y.dtype == np.float16 and np.array_equal(y, x + np.float16(add)) and np.array_equal(x_out, x)


def test_value_info_declared_for_the_graph_outputs_does_not_contradict_their_casts():
    """Simplified exports (onnxslim) declare a value_info for every tensor, the outputs included:
    such an entry must not be retyped to float32 under the output's float16 Cast."""
    model = half(fixtures.build_yolov5_v6(opset=13))
    model = onnx.shape_inference.infer_shapes(model)
    for o in model.graph.output:
        model.graph.value_info.append(o)
    out = PassManager([UpcastFloat16()], PassContext()).run(model).model
    assert io_types(out) == ([F16], [F16])
    assert float16_tensors(out) == 0


def test_a_float32_model_is_left_alone():
    model = fixtures.build_yolov5_v6(opset=13)
    res = UpcastFloat16().run(model, PassContext())
    assert res.modified is False and res.model is model


def test_ensures_refuses_a_float16_weight_left_behind():
    with pytest.raises(VerificationError, match=r"1 float16 initializer\(s\) or constant\(s\) left"):
        UpcastFloat16().ensures(helper.make_model(helper.make_graph(
            [], "g", [], [], initializer=[numpy_helper.from_array(np.zeros(2, np.float16), "w")])),
            PassContext())


@pytest.mark.parametrize("asked, first, last", [
    (dict(int8=True), True, False), (dict(prune=0.1), True, True), (dict(int8=True, prune=0.1), True, False),
    (dict(), False, False), (dict(int8=True, skip=("upcast-float16",)), False, False),
    (dict(prune=0.1, skip=("restore-float16",)), True, False)])
def test_optimize_schedules_the_upcast_before_int8_and_pruning_of_float16_models(asked, first, last):
    f16 = half(fixtures.build_yolov5_v6(opset=13))
    names = pipeline_names(OptimizeOptions(**asked), f16)
    assert (names[0] == "upcast-float16") is first and names.count("upcast-float16") == int(first)
    assert (names[-1] == "restore-float16") is last and names.count("restore-float16") == int(last)
    float32 = pipeline_names(OptimizeOptions(**asked), fixtures.build_yolov5_v6(opset=13))
    assert not {"upcast-float16", "restore-float16"} & set(float32)


def test_int8_of_a_float16_export_runs_and_keeps_its_float16_interface():
    from fixtures import demo_paths

    model_path, images, _ = demo_paths()
    from onnxslim_yolo import ir

    f16 = half(ir.load(model_path))
    res = optimize(f16, int8=True, calib=images, calib_limit=4, bench=False, check=False, progress=False,
                   pass_options={"insert-qdq": {"placement": "all", "guard": False}})
    names = [r.name for r in res.pipeline.records]
    assert names[0] == "upcast-float16" and names[-1] == "insert-qdq"
    assert next(r for r in res.pipeline.records if r.name == "insert-qdq").report["counts"]["int8_layers"] > 0
    assert io_types(res.model) == ([F16], [F16]) and float16_tensors(res.model) == 0
    feed = {k: v.astype(np.float16) for k, v in verify.random_feeds(f16, 1, 0)[0].items()}
    (got,) = verify.session(res.model).run(None, feed)
    assert got.dtype == np.float16 and np.isfinite(got).all()


@pytest.mark.parametrize("keep_io_types", [False, True])
def test_pruning_a_float16_export_gives_a_float16_model_with_the_same_interface(keep_io_types):
    """The upcast for the refit, then back to float16: the pruned model has float16 weights, the
    size of a float16 file, and the interface the user's code was written for."""
    from fixtures import demo_paths

    from onnxslim_yolo import ir

    model_path, images, _ = demo_paths()
    f16 = half(ir.load(model_path), keep_io_types)
    res = optimize(f16, prune=0.2, calib=images, calib_limit=4, bench=False, check=False, progress=False)
    names = [r.name for r in res.pipeline.records]
    assert names[0] == "upcast-float16" and names[-2:] == ["prune-channels", "restore-float16"]
    prune = next(r for r in res.pipeline.records if r.name == "prune-channels").report["details"]
    assert prune["mac_reduction"] >= 0.2
    restore = res.pipeline.records[-1]
    readers = {}
    for n in res.model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    float32 = [t.name for t in res.model.graph.initializer if t.data_type == F32]
    # only what onnx types as float32 whatever the model's type is left: Resize's scales
    assert float32 and all(readers[t] == {"Resize"} for t in float32)
    assert restore.modified and restore.report["details"]["float32_initializers_left"] == len(float32)
    weights = [t for t in res.model.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == F16 for t in weights)
    assert io_types(res.model) == io_types(f16)
    assert ir.model_size(res.model) < 0.6 * ir.model_size(rounded(ir.load(model_path)))
    casts = [n for n in res.model.graph.node if n.op_type == "Cast"]
    assert len(casts) == (2 if keep_io_types else 0)    # the converter's own, around the float32 interface


def test_restore_leaves_quantized_models_and_reports_a_failing_converter(monkeypatch):
    from onnxruntime.transformers import float16 as ort_float16

    from onnxslim_yolo.passes.restore_float16 import RestoreFloat16

    model = fixtures.build_yolov5_v6(opset=13)
    q = onnx.ModelProto()
    q.CopyFrom(model)
    q.graph.node.insert(0, helper.make_node("QuantizeLinear", ["images", "s", "z"], ["images_q"]))
    res = RestoreFloat16().run(q, PassContext())
    assert res.modified is False and "the model is quantized" in res.report.skipped[0]["reason"]

    def broken(*args, **kwargs):
        raise RuntimeError("no float16 kernel for op X\nmore")

    monkeypatch.setattr(ort_float16, "convert_float_to_float16", broken)
    res = RestoreFloat16().run(model, PassContext())
    assert res.modified is False and res.model is model
    assert res.report.skipped[0]["reason"] == "onnxruntime's float16 tool failed: no float16 kernel for op X"
