"""The openvino target: INT8 placement for OpenVINO, and checks that run the model in OpenVINO
(skipped with the install command when OpenVINO is absent)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from fixtures import demo_paths
from onnxslim_yolo import ir, openvino_rt
from onnxslim_yolo.api import optimize
from onnxslim_yolo.check import run_checks

needs_openvino = pytest.mark.skipif(not openvino_rt.available(),
                                    reason="OpenVINO is not installed (pip install openvino)")


@pytest.fixture(scope="module")
def int8_for_openvino():
    """The demo model in INT8 for the openvino target, with its original."""
    model_path, images, _ = demo_paths()
    original = ir.load(model_path)
    res = optimize(original, int8=True, calib=images, calib_limit=4, bench=False, check=False,
                   progress=False, target="openvino", pass_options={"insert-qdq": {"target": "openvino"}})
    return original, res.model, images


def _qtypes(model: onnx.ModelProto) -> Counter:
    inits = {t.name: t for t in model.graph.initializer}
    return Counter(onnx.TensorProto.DataType.Name(inits[n.input[2]].data_type)
                   for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2)


def test_openvino_placement_uint8_activations_int8_weights_last_convs_float(int8_for_openvino):
    original, q, _ = int8_for_openvino
    assert set(_qtypes(q)) == {"UINT8"}
    dq_of = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    inits = {t.name: t for t in q.graph.initializer}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    quantized = [c for c in convs if c.input[1] in dq_of]
    # int8 per-channel weights, float biases (no int32 bias), and every quantized Conv reads a
    # dequantized activation
    for c in quantized:
        w = dq_of[c.input[1]]
        assert inits[w.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[w.input[1]].dims) == 1
        assert c.input[0] in dq_of
        assert len(c.input) < 3 or c.input[2] not in dq_of
    # the head's last convs read quantized inputs only when the target quantizes them: not here
    out_convs = {n.name for n in convs if not any(n.output[0] in m.input for m in q.graph.node
                                                 if m.op_type == "Conv")}
    float_convs = {c.name for c in convs} - {c.name for c in quantized}
    assert float_convs and float_convs <= out_convs | {convs[0].name}
    assert len(quantized) >= len(convs) - len(out_convs) - 1


def test_without_openvino_the_check_skips_with_the_install_command(int8_for_openvino, monkeypatch):
    original, q, _ = int8_for_openvino
    monkeypatch.setattr(openvino_rt, "available", lambda: False)
    rep = run_checks(q, reference=original, target="openvino", latency=False)
    res = {r.name: r for r in rep.results}
    assert res["runtime.openvino"].status == "skip"
    assert "pip install" in res["runtime.openvino"].message and "openvino" in res["runtime.openvino"].message
    assert res["structure.ops"].status == "pass" and "supported by openvino" in res["structure.ops"].message


def test_a_foreign_domain_is_refused_for_openvino(int8_for_openvino):
    original, _, _ = int8_for_openvino
    m = onnx.ModelProto()
    m.CopyFrom(original)
    m.graph.node[-1].domain = "com.microsoft"
    m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    rep = run_checks(m, target="openvino", latency=False)
    ops = next(r for r in rep.results if r.name == "structure.ops")
    assert ops.status == "fail" and "domain not supported by openvino" in ops.message


@needs_openvino
def test_the_int8_model_runs_in_openvino_and_is_scored_there(int8_for_openvino):
    original, q, images = int8_for_openvino
    rep = run_checks(q, reference=original, images=str(images), target="openvino", latency=True,
                     latency_runs=3)
    res = {r.name: r for r in rep.results}
    ov = res["runtime.openvino"]
    assert ov.status == "pass", ov.message
    names = [o["name"] for o in ov.details["outputs"]]
    assert "class scores" in names and all(o["cosine"] >= 0.99 for o in ov.details["outputs"])
    assert res["accuracy.agreement"].message.endswith("in OpenVINO")
    lat = res["latency"].details
    assert lat["engine"] == "openvino" and lat["median_ms"]["candidate"] > 0


@needs_openvino
def test_scores_that_openvino_computes_differently_fail_the_check(int8_for_openvino, monkeypatch):
    """A model whose boxes agree but whose class scores do not (as a Q/DQ graph OpenVINO misreads:
    the tensorrt-target yolov5n, cosine 0.03) fails on the decoded class scores, which one cosine
    over the whole output (boxes in pixels) would hide."""
    original, q, _ = int8_for_openvino
    real_run = openvino_rt.OpenVinoSession.run

    def scrambled(self, names, feeds):
        outs = real_run(self, names, feeds)
        out = outs[0].copy()
        out[..., 5:] = np.random.default_rng(0).random(out[..., 5:].shape).astype(out.dtype)
        return [out] + outs[1:]

    monkeypatch.setattr(openvino_rt.OpenVinoSession, "run", scrambled)
    rep = run_checks(q, target="openvino", latency=False)
    ov = next(r for r in rep.results if r.name == "runtime.openvino")
    assert ov.status == "fail"
    assert "output 'class scores' differs from onnxruntime's" in ov.message


def _top_rows(model: onnx.ModelProto, k: int) -> onnx.ModelProto:
    """``model`` whose (1, N, 5+C) output is cut to its ``k`` rows of highest objectness by a TopK
    (as RT-DETR-like exports pick their queries): the same rows layout, chosen inside the graph."""
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0]
    consts = {"tk_s": [4], "tk_e": [5], "tk_ax": [2], "tk_k": [k], "tk_sq": [0, 2], "tk_uq": [2]}
    m.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), n) for n, v in consts.items())
    m.graph.node.extend([
        helper.make_node("Slice", [out.name, "tk_s", "tk_e", "tk_ax"], ["tk_obj"], name="tk_slice"),
        helper.make_node("Squeeze", ["tk_obj", "tk_sq"], ["tk_obj1"], name="tk_squeeze"),
        helper.make_node("TopK", ["tk_obj1", "tk_k"], ["tk_val", "tk_idx"], name="tk_topk"),
        helper.make_node("Gather", [out.name, "tk_idx"], ["rows"], name="tk_gather", axis=1)])
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("rows", onnx.TensorProto.FLOAT, [1, k, dims[2]]))
    onnx.checker.check_model(m, full_check=True)
    return m


@needs_openvino
def test_rows_picked_by_a_topk_may_come_in_another_order(int8_for_openvino, monkeypatch):
    """Rows a TopK picks can be ordered otherwise by another runtime's rounding. They are judged
    by the candidates the TopK reads, not row by row (nor by their class scores)."""
    _, q, _ = int8_for_openvino
    picked = _top_rows(q, 50)
    real_run = openvino_rt.OpenVinoSession.run

    def reordered(self, names, feeds):
        outs = real_run(self, names, feeds)
        return [outs[0][:, ::-1].copy()] + outs[1:]

    monkeypatch.setattr(openvino_rt.OpenVinoSession, "run", reordered)
    ov = next(r for r in run_checks(picked, target="openvino", latency=False).results
              if r.name == "runtime.openvino")
    assert ov.status == "pass", ov.message
    roles = {o["name"]: o["role"] for o in ov.details["outputs"]}
    assert roles["rows"] == "selected" and "candidates" in roles.values() and "class scores" not in roles
    # the same reordering of an output no TopK chose fails
    ov = next(r for r in run_checks(q, target="openvino", latency=False).results
              if r.name == "runtime.openvino")
    assert ov.status == "fail" and "differs from onnxruntime's" in ov.message


@needs_openvino
def test_a_model_openvino_cannot_load_fails_once_and_skips_the_image_checks(int8_for_openvino, monkeypatch):
    """With --images, the image checks ran in OpenVINO after runtime.openvino had failed: the load
    error came out as a traceback (naming_file could not copy an OpenVinoError), no report."""
    original, q, images = int8_for_openvino

    def refuse(self, *a, **k):
        raise openvino_rt.OpenVinoError("cannot load the model", RuntimeError("Conversion is failed for: X"))

    monkeypatch.setattr(openvino_rt.OpenVinoSession, "__init__", refuse)
    rep = run_checks(q, reference=original, images=str(images), target="openvino", latency=True)
    res = {r.name: r for r in rep.results}
    assert res["runtime.openvino"].status == "fail" and not rep.ok
    for name in ("inputs.preprocessing", "accuracy.agreement", "accuracy.map_drop", "latency"):
        assert res[name].status == "skip" and res[name].message == "not run: OpenVINO does not run the model"


@needs_openvino
def test_latency_in_openvino(int8_for_openvino):
    from onnxslim_yolo.latency import interleaved_latency

    original, q, _ = int8_for_openvino
    med = interleaved_latency({"a": original, "b": q}, runs=3, threads=1, engine="openvino")
    assert set(med) == {"a", "b"} and all(v > 0 for v in med.values())


def _quantized_convs(model: onnx.ModelProto):
    """Convs with INT8 weights (a float Conv may still read a tensor that INT8 siblings share)."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dq]


def test_layers_openvino_cannot_compile_stay_float(monkeypatch):
    """OpenVINO's low-precision transformations refuse some quantized patterns (RT-DETR's encoder
    MatMuls). insert-qdq compiles its result there; a layer the message names is kept float and
    the model rebuilt, until it compiles. A stand-in for OpenVINO refuses two quantized Convs
    one at a time, named inside a message of several lines as OpenVINO writes them."""
    from fixtures import FAMILIES
    from onnxslim_yolo import verify
    from onnxslim_yolo.pass_base import PassContext
    from onnxslim_yolo.passes.insert_qdq import InsertQDQ

    model = FAMILIES["yolov5_v6"](opset=13, bn=False)
    refused: list = []
    compiled: list = []

    class StandIn:
        def __init__(self, m, threads=0):
            quantized = _quantized_convs(m)
            if not refused:
                refused.extend(quantized[1:3])
            bad = [n for n in refused if n in quantized]
            if bad:
                raise openvino_rt.OpenVinoError("cannot load the model", RuntimeError(
                    f"Exception from src/inference/src/cpp/core.cpp:117:\nException from src/x.cpp:54:\n"
                    f"[MatMulTransformation] END: node: opset1::Convolution {bad[0]} (opset1::Multiply "
                    f"{bad[0]}_input/DequantizationMultiply) CALLBACK HAS THROWN\n"
                    f"Input shape dimension equal 2100 cannot be broadcasted (numpy mode) to 1."))
            compiled.append(quantized)

    monkeypatch.setattr(openvino_rt, "available", lambda: True)
    monkeypatch.setattr(openvino_rt, "OpenVinoSession", StandIn)
    opts = {"progress": False, "placement": "all", "guard": False, "target": "openvino"}
    res = InsertQDQ().run(model, PassContext(options={"insert-qdq": opts},
                                             calib_inputs=verify.random_feeds(model, 4, 0)))
    assert len(refused) == 2 and len(compiled) == 1
    left = _quantized_convs(res.model)
    assert not set(refused) & set(left) and len(left) == len(compiled[0]) > 0
    assert res.report.details["openvino"] == {"compiles": 3, "kept_float": sorted(refused)}
    why = {s["node"]: s["reason"] for s in res.report.skipped}
    for n in refused:
        assert why[n].startswith("openvino: its INT8 form does not compile there (OpenVINO cannot load the "
                                 "model: [MatMulTransformation] END: node: opset1::Convolution")
        assert "Exception from" not in why[n]


def test_an_openvino_refusal_naming_no_quantized_node_is_reported(monkeypatch):
    from fixtures import FAMILIES
    from onnxslim_yolo import verify
    from onnxslim_yolo.pass_base import PassContext
    from onnxslim_yolo.passes.insert_qdq import InsertQDQ

    model = FAMILIES["yolov5_v6"](opset=13, bn=False)

    def refuse(m, threads=0):
        raise openvino_rt.OpenVinoError("cannot load the model",
                                        RuntimeError("unsupported op Foo in node 'x9'"))

    monkeypatch.setattr(openvino_rt, "available", lambda: True)
    monkeypatch.setattr(openvino_rt, "OpenVinoSession", refuse)
    opts = {"progress": False, "placement": "all", "guard": False, "target": "openvino"}
    res = InsertQDQ().run(model, PassContext(options={"insert-qdq": opts},
                                             calib_inputs=verify.random_feeds(model, 4, 0)))
    assert res.report.details["openvino"] == {"compiles": 1, "kept_float": []}
    why = {s["node"]: s["reason"] for s in res.report.skipped}
    assert why["openvino"] == ("the INT8 model does not compile in OpenVINO and its message names no "
                               "quantized node: OpenVINO cannot load the model: "
                               "unsupported op Foo in node 'x9'")
    assert _quantized_convs(res.model)


def test_openvino_messages_become_one_line():
    exc = RuntimeError("Exception from a.cpp:1:\nException from b.cpp:2:\nfirst why\n\nmore\nlast check\n")
    assert openvino_rt.reason(exc) == "first why ... last check"
    assert openvino_rt.reason(RuntimeError("Exception from a.cpp:1:\nonly")) == "only"
    assert openvino_rt.reason(RuntimeError("x" * 500), 50) == "x" * 47 + "..."
    assert openvino_rt.reason(RuntimeError("")) == "RuntimeError"


@needs_openvino
def test_a_model_with_an_input_it_never_reads_runs_with_every_feed_given():
    """OpenVINO 2024.0 drops an input the graph never reads and refused the feed named for it
    (`eval --runtime openvino` exited 4 there); the session feeds the inputs the compiled model kept."""
    h = onnx.helper
    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4]),
                          h.make_tensor_value_info("unused", onnx.TensorProto.FLOAT, [1, 2])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    x = np.linspace(-1, 1, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    session = openvino_rt.OpenVinoSession(model)
    (y,) = session.run(None, {"x": x, "unused": np.ones((1, 2), np.float32)})
    np.testing.assert_array_equal(y, np.maximum(x, 0))
