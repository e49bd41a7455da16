"""find_head: last convs, decode tail, family/layout and strides on every fixture family and yolov5n."""
from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fixtures
from onnxslim_yolo.analysis.head import find_head, node_name
from onnxslim_yolo.pass_base import PreconditionError

EXPECTED = {  # family builder -> (family, last convs, has DFL, layout starts with)
    "yolov5_focus": ("yolov5", 3, False, "(1, N, 5+C)"),
    "yolov5_v6": ("yolov5", 3, False, "(1, N, 5+C)"),
    "yolov8": ("yolov8", 6, True, "(1, 4+C, N)"),
    "yolox": ("yolox", 9, False, "(1, N, 5+C)"),
}


def _downstream(model: onnx.ModelProto, names) -> set:
    prod_out = {node_name(n): list(n.output) for n in model.graph.node}
    readers = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    seen, stack = set(), [t for nm in names for t in prod_out[nm]]
    while stack:
        for r in readers.get(stack.pop(), []):
            if node_name(r) not in seen:
                seen.add(node_name(r))
                stack.extend(r.output)
    return seen


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_heads(name: str, opset: int) -> None:
    model = fixtures.FAMILIES[name](opset=opset)
    family, n_last, dfl, layout = EXPECTED[name]
    info = find_head(model)
    assert info.family == family
    assert info.layout.startswith(layout)
    assert len(info.last_convs) == n_last
    assert info.num_classes == 4
    assert info.strides == (8, 16, 32)
    assert sum(len(v) for v in info.levels.values()) == n_last
    assert len(set(len(v) for v in info.levels.values())) == 1  # same convs per level
    ops = {node_name(n): n.op_type for n in model.graph.node}
    assert all(ops[n] == "Conv" for n in info.last_convs)
    assert all(ops[n] != "Constant" for n in info.tail_nodes)
    # the tail is exactly what lies downstream of the last convs (Constants aside)
    assert set(info.tail_nodes) == {n for n in _downstream(model, info.last_convs) if ops[n] != "Constant"}
    # no weight layer in the tail except the DFL projection
    tail_convs = [n for n in info.tail_nodes if ops[n] == "Conv"]
    assert tail_convs == list(info.decode_convs)
    assert bool(info.decode_convs) == dfl
    assert not set(info.decode_convs) & set(info.last_convs)
    tail_outputs = {t for n in model.graph.node if node_name(n) in info.tail_nodes for t in n.output}
    assert {o.name for o in model.graph.output} <= tail_outputs


def test_yolov8_dfl_conv_is_tail_not_last() -> None:
    info = find_head(fixtures.build_yolov8())
    assert info.decode_convs == ("model.22/dfl/conv/Conv",)
    assert "model.22/dfl/conv/Conv" in info.tail_nodes
    assert all("/cv2." in n or "/cv3." in n for n in info.last_convs)
    assert info.anchors_per_cell == 1


def test_yolov6_head_named_by_its_constant_objectness() -> None:
    info = find_head(fixtures.build_yolox(decode_outputs=True, ones_objectness=True))
    assert (info.family, info.num_classes, info.anchors_per_cell) == ("yolov6", 4, 1)
    assert "objectness column is a constant 1 (no objectness branch)" in info.evidence


def test_yolox_decoded_tail_has_grid_arithmetic() -> None:
    info = find_head(fixtures.build_yolox(decode_outputs=True))
    assert info.family == "yolox"
    ops = {node_name(n): n.op_type for n in fixtures.build_yolox(decode_outputs=True).graph.node}
    tail_ops = {ops[n] for n in info.tail_nodes}
    assert {"Exp", "Add", "Mul", "Sigmoid", "Concat"} <= tail_ops


@pytest.mark.parametrize("channels_first", [False, True])
def test_boxes_and_scores_outputs_are_named_as_such(channels_first) -> None:
    """PP-YOLOE's boxes (1, N, 4) + scores (1, C, N): the scores alone were taken for YOLOv8's
    (1, 4+C, N) rows (C - 4 classes)."""
    from fixtures.postprocess import split_boxes_scores

    base = fixtures.build_yolov5_v6()
    model = split_boxes_scores(base, channels_first, ("scale_factor",))
    info = find_head(model)
    assert (info.family, info.num_classes) == ("boxes+scores", find_head(base).num_classes)
    assert info.layout.endswith("(1, C, N)" if channels_first else "(1, N, C)")
    assert set(info.last_convs) == set(find_head(base).last_convs)


@pytest.mark.parametrize("layout, batch_rows, want", [
    ("rows", False, "(1, K, 6) x1 y1 x2 y2 score class"), ("flat", False, "(K, 6) x1 y1 x2 y2 score class"),
    ("rows", True, "(K, 7) batch x1 y1 x2 y2 class score"),
    ("batched", True, "(1, K, 7) batch x1 y1 x2 y2 class score"),
    ("labels", False, "detections after NMS in several outputs")])
def test_detections_after_nms_are_named_as_such(layout, batch_rows, want) -> None:
    """An NMS in the graph: `inspect` said "unknown layout", and (1, K, 6) rows were 5+C ones."""
    from fixtures.postprocess import append_nms

    base = fixtures.build_yolov5_v6()
    info = find_head(append_nms(base, max_det=20, layout=layout, batch_rows=batch_rows))
    assert info.layout.startswith(want) and info.num_classes is None
    assert info.family == "unknown" and set(info.last_convs) == set(find_head(base).last_convs)
    onnx.helper.set_model_props(base, {"stride": "[8, 16, 32]", "names": "{0: 'a'}"})   # YOLOv5's
    assert find_head(append_nms(base, layout=layout, batch_rows=batch_rows)).family == "yolov5"


def test_outputs_without_batch_axis_and_with_symbolic_dims_are_read() -> None:
    """(N, 5+C) rows squeezed of their batch, and an output declared (batch, anchors, 5+C) that
    shape inference fixes: both were "unknown layout"."""
    base = fixtures.build_yolov5_v6(opset=13)
    want = find_head(base)
    squeezed = onnx.ModelProto()
    squeezed.CopyFrom(base)
    out = squeezed.graph.output[0]
    squeezed.graph.node.append(helper.make_node("Squeeze", ["sq_in", "sq_axes"], [out.name]))
    for n in squeezed.graph.node[:-1]:
        n.output[:] = ["sq_in" if o == out.name else o for o in n.output]
    squeezed.graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "sq_axes"))
    del out.type.tensor_type.shape.dim[0]
    symbolic = onnx.ModelProto()
    symbolic.CopyFrom(base)
    for d, name in zip(symbolic.graph.output[0].type.tensor_type.shape.dim, ("batch", "anchors")):
        d.dim_param = name
    for m in (squeezed, symbolic):
        info = find_head(m)
        assert (info.family, info.layout, info.num_classes) == (want.family, want.layout, want.num_classes)


def test_to_dict_is_json_ready() -> None:
    import json

    d = find_head(fixtures.build_yolov5_v6()).to_dict()
    json.dumps(d)
    assert d["strides"] == [8, 16, 32] and d["family"] == "yolov5"


def test_unnamed_nodes_get_derived_names() -> None:
    m = fixtures.build_yolov5_v6()
    for n in m.graph.node:
        n.name = ""
    info = find_head(m)
    assert len(info.last_convs) == 3
    assert all(n.startswith("Conv:") for n in info.last_convs)


def test_graph_without_weights_is_refused() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    g = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"], name="s")], "g", [x], [y])
    with pytest.raises(PreconditionError, match="no Conv/MatMul with weights"):
        find_head(helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)]))


def test_matmul_between_activations_is_not_a_layer() -> None:
    """An attention-like MatMul of two activations after the last Conv belongs to the tail."""
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
             helper.make_node("Transpose", ["r"], ["rt"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["r", "rt"], ["y"], name="mm")]
    shape = numpy_helper.from_array(np.array([1, 4, 64], np.int64), "shape")
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])], [w, shape])
    info = find_head(helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert info.last_convs == ("conv",)
    assert info.tail_nodes == ("reshape", "t", "mm")
    assert info.family == "unknown"


def test_yolov5n_head(yolov5n_path) -> None:
    model = onnx.load(str(yolov5n_path))
    t = time.perf_counter()
    info = find_head(model)
    assert time.perf_counter() - t < 2.0
    assert info.last_convs == ("/model.24/m.0/Conv", "/model.24/m.1/Conv", "/model.24/m.2/Conv")
    assert len(info.tail_nodes) == 37
    assert info.family == "yolov5" and info.num_classes == 80 and info.anchors_per_cell == 3
    assert info.levels == {8: ("/model.24/m.0/Conv",), 16: ("/model.24/m.1/Conv",),
                           32: ("/model.24/m.2/Conv",)}
    assert info.tail_nodes[-1] == "/model.24/Concat_3"
    ops = {n.name: n.op_type for n in model.graph.node}
    assert sorted({ops[n] for n in info.tail_nodes}) == ["Add", "Concat", "Mul", "Pow", "Reshape", "Sigmoid",
                                                         "Split", "Transpose"]


def test_segmentation_export_mask_coefficients_are_not_classes() -> None:
    """A YOLOv5-seg style export: the candidates carry nm mask coefficients after the class scores
    (1, N, 5+C+nm), and a second output holds nm prototype masks (1, nm, h, w). The head has C
    classes, and the evaluator reads the candidates without the coefficients."""
    import onnxruntime as ort

    from onnxslim_yolo.eval.decode import detection_output

    model = fixtures.build_yolov5_v6(opset=13)
    n = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    det, image = model.graph.output[0].name, model.graph.input[0].name
    # coefficients above every score: read as classes, they would win every candidate
    coeffs = numpy_helper.from_array(np.full((1, n, 3), 0.9, np.float32), "coeffs")
    model.graph.initializer.append(coeffs)
    model.graph.node.extend([helper.make_node("Concat", [det, "coeffs"], ["candidates"], axis=2),
                             helper.make_node("Identity", [image], ["protos"])])
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info("candidates", TensorProto.FLOAT, [1, n, 9 + 3]),
                               helper.make_tensor_value_info("protos", TensorProto.FLOAT, [1, 3, 64, 64])])
    info = find_head(model)
    assert info.num_classes == 4 and "3 mask coefficients" in info.evidence[0]
    feeds = {image: np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    assert outs[0].shape == (1, n, 12)
    np.testing.assert_array_equal(detection_output(outs), outs[0][:, :, :9])


def test_head_levels_take_the_stride_whose_grid_rounds_up_to_the_map():
    """800 rows over maps of 100, 50, 25 and 13 rows: strides 8, 16, 32 divide, 64 rounds up."""
    from onnxslim_yolo.analysis.head import _levels
    last = {f"c{i}": f"t{i}" for i in range(5)}
    shapes = {"t0": (1, 8, 100, 76), "t1": (1, 8, 50, 38), "t2": (1, 8, 25, 19), "t3": (1, 8, 13, 10),
              "t4": (1, 8, 7, 5)}
    assert _levels(last, shapes, (800, 608)) == {8: ("c0",), 16: ("c1",), 32: ("c2",), 64: ("c3",),
                                                 128: ("c4",)}
    assert _levels({"c": "t"}, {"t": (1, 8, 30, 30)}, (800, 608)) == {}  # no power of two gives 30


def test_a_channels_last_input_reads_the_same_head():
    """tf2onnx's N x H x W x C input in front of a YOLOv5 model: its image size was read off
    dims 2-3 (W and C), so no grid matched and the head's family was 'unknown', which sends the
    INT8 quality measures to the head maps instead of the decoded rows."""
    from fixtures.layout import channels_last_input

    nchw = fixtures.build_yolov5_v6(opset=13)
    ref, got = find_head(nchw), find_head(channels_last_input(nchw))
    assert ref.family == got.family == "yolov5" and got.strides == ref.strides == (8, 16, 32)
    assert got.layout == ref.layout and got.last_convs == ref.last_convs
