"""Raw head maps: a YOLOv5 / YOLOv7 / YOLOv8 export that stops before the decode."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from PIL import Image

from fixtures.yolov5 import ANCHORS, build_yolov5_v6
from fixtures.yolov8 import build_yolov8
from onnxslim_yolo import data, pass_base, verify
from onnxslim_yolo.analysis.head import find_head
from onnxslim_yolo.eval.anchors import (OutputReader, anchor_layout, decode_maps, model_anchors,
                                        parse_anchors, with_anchors)
from onnxslim_yolo.eval.decode import NotDetections, detect_format, detection_output, raw_maps_format
from onnxslim_yolo.eval.dfl import dfl_layout
from onnxslim_yolo.evaluate import detections
from onnxslim_yolo.pass_base import UsageError

HW = (64, 64)


def _cut(model: onnx.ModelProto, outputs, tmp_path: Path, name: str) -> onnx.ModelProto:
    src, dst = tmp_path / "full.onnx", tmp_path / f"{name}.onnx"
    onnx.save(model, str(src))
    onnx.utils.extract_model(str(src), str(dst), ["images"], list(outputs))
    return onnx.load(str(dst))


@pytest.fixture()
def heads(tmp_path: Path):
    """The YOLOv5 fixture (decode inside, YOLOv5's default anchors) and the same graph cut at its
    head: the three head Convs' outputs (B, 3*(5+C), h, w), and those maps reshaped and
    transposed to (B, 3, h, w, 5+C) before the sigmoid."""
    full = build_yolov5_v6(num_classes=4)
    convs = find_head(full).last_conv_outputs
    by_input = {n.input[0]: n for n in full.graph.node if n.input}  # Constant nodes have none
    permuted = [by_input[by_input[c].output[0]].output[0] for c in convs]  # Conv -> Reshape -> Transpose
    assert all(by_input[p].op_type == "Sigmoid" for p in permuted)
    return full, _cut(full, convs, tmp_path, "raw4"), _cut(full, permuted, tmp_path, "raw5")


def _outs(model: onnx.ModelProto, x: np.ndarray):
    return verify.run(verify.session(model, optimize=False), {"images": x})


@pytest.mark.parametrize("rank", [4, 5])
def test_raw_maps_decode_to_the_graphs_own_decode(heads, rank):
    full, raw4, raw5 = heads
    raw = raw4 if rank == 4 else raw5
    x = np.random.default_rng(0).random((1, 3, *HW), dtype=np.float32)
    want = _outs(full, x)[0]
    outs = _outs(raw, x)
    assert [o.ndim for o in outs] == [rank] * 3
    got = detection_output(outs[::-1], HW)  # any output order: levels sorted finest first
    assert got.shape == want.shape == (1, 3 * (64 + 16 + 4), 9)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # strides follow from the input size; without it, 8, 16, 32 are assumed (the same here)
    np.testing.assert_allclose(detection_output(outs), got, rtol=1e-6)


def test_anchors_from_metadata_scale_the_boxes(heads):
    _, raw4, _ = heads
    outs = _outs(raw4, np.full((1, 3, *HW), 0.5, np.float32))
    doubled = [[2 * v for v in lv] for lv in ANCHORS]
    helper.set_model_props(raw4, {"anchors": json.dumps(doubled)})
    anchors = model_anchors(raw4)
    assert anchors == tuple(tuple(float(v) for v in lv) for lv in doubled)
    base, scaled = decode_maps(outs, HW), decode_maps(outs, HW, anchors)
    np.testing.assert_allclose(scaled[..., 2:4], 2 * base[..., 2:4], rtol=1e-6)
    np.testing.assert_array_equal(scaled[..., [0, 1, 4, 5]], base[..., [0, 1, 4, 5]])


def test_the_evaluator_and_head_analysis_read_raw_maps(heads, tmp_path: Path, caplog):
    full, raw4, raw5 = heads
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / f"im{i}.png")
    ref = detections(full, images, progress=False, threads=1)
    for raw in (raw4, raw5):
        assert detect_format(raw) == "v5" and data.detect_preset(raw) == "yolov5"
        caplog.clear()
        pass_base.WARNED.clear()  # warned once per process: an earlier test may have
        got = detections(raw, images, progress=False, threads=1)
        assert "decoded with YOLOv5's default anchors" in caplog.text
        caplog.clear()
        detections(raw, images, progress=False, threads=1)
        assert "default anchors" not in caplog.text  # not again
        for a, b in zip(ref, got):
            assert len(a) == len(b) > 0
            np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-3)
            np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
    for raw, layout in ((raw4, "(1, na*(5+C), h, w)"), (raw5, "(1, na, h, w, 5+C)")):
        info = find_head(raw)
        assert (info.family, info.layout, info.num_classes, info.anchors_per_cell) == \
            ("yolov5", f"raw maps {layout}", 4, 3)
        assert info.evidence[-1] == "anchors: YOLOv5's defaults (--anchors names others)"
    helper.set_model_props(raw4, {"anchors": json.dumps(ANCHORS)})
    assert find_head(raw4).evidence[-1] == "anchors: the model's 'anchors' metadata"
    caplog.clear()
    detections(raw4, images, progress=False, threads=1)
    assert "default anchors" not in caplog.text


def test_anchor_layout_only_matches_one_anchor_head():
    assert anchor_layout([(1, 27, 8, 8), (1, 27, 4, 4), (1, 27, 2, 2)]) == (3, 9)
    assert anchor_layout([(1, 3, 8, 8, 9), (1, 3, 4, 4, 9)]) == (3, 9)
    assert anchor_layout([(1, 27, 8, 8), (1, 27, 4, 4)], predictions=9) is None  # 3 values per prediction
    assert anchor_layout([(1, 27, 8, 8)]) is None  # one map
    assert anchor_layout([(1, 27, 8, 8), (1, 27, 8, 8)]) is None  # two maps of one size
    assert anchor_layout([(1, 27, 8, 8), (1, 36, 4, 4)]) is None  # other channels
    assert anchor_layout([(1, 28, 8, 8), (1, 28, 4, 4)]) is None  # not 3 predictions per cell
    assert anchor_layout([(1, 27, 8, 8), (1, 3, 4, 4, 9)]) is None  # mixed ranks
    assert anchor_layout([(1, 27, "h", 8), (1, 27, 4, 4)]) is None  # symbolic size


def test_bad_or_missing_anchors_are_named():
    with pytest.raises(UsageError, match="anchors '\\[1, 2\\]': expected a JSON list"):
        parse_anchors("[1, 2]")
    with pytest.raises(UsageError, match="same number of positive w, h pairs"):
        parse_anchors("[[10, 13, 16, 30], [30, 61]]")
    maps = [np.zeros((1, 27, 8, 8), np.float32), np.zeros((1, 27, 4, 4), np.float32)]
    with pytest.raises(NotDetections, match="raw head maps of 2 levels, and YOLOv5 has no default anchors "
                                            "for 2 levels: name them with --anchors"):
        decode_maps(maps, (64, 64))
    with pytest.raises(UsageError, match="anchors name 1 levels of 3 but the head has 2 levels"):
        decode_maps(maps, (64, 64), parse_anchors("[[1, 2, 3, 4, 5, 6]]"))


def _images(folder: Path, n: int = 2) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_anchors_option_reaches_optimize_check_and_eval(heads, tmp_path: Path):
    """``--anchors`` is stored in the optimized model's metadata, so that ``check`` decodes it
    without the option; a malformed value is a usage error (exit 2) naming it."""
    from click.testing import CliRunner

    from onnxslim_yolo.cli import main
    _, raw4, _ = heads
    images = _images(tmp_path / "images")
    src, out = tmp_path / "raw.onnx", tmp_path / "raw.opt.onnx"
    onnx.save(raw4, str(src))
    doubled = json.dumps([[2 * v for v in lv] for lv in ANCHORS])
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(out), "--anchors", doubled, "--calib",
                                  str(images), "--no-bench", "--quiet", "--report", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert model_anchors(onnx.load(str(out))) == parse_anchors(doubled)
    assert model_anchors(onnx.load(str(src))) is None  # the input is left as it was
    checks = {c["name"]: c for c in json.loads((tmp_path / "r.json").read_text())["checks"]["checks"]}
    assert checks["accuracy.agreement"]["status"] == "pass"  # it skipped before: "not a detection output"
    r = CliRunner().invoke(main, ["check", str(out), "--reference", str(src), "--anchors", doubled,
                                  "--images", str(images), "--no-latency", "--min-agreement", "0.0",
                                  "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    agreement = {c["name"]: c for c in json.loads((tmp_path / "c.json").read_text())["checks"]}
    assert agreement["accuracy.agreement"]["status"] == "pass"
    for cmd in (["eval", str(src), "--labels", str(tmp_path)], ["check", str(src)]):
        r = CliRunner().invoke(main, cmd + ["--images", str(images), "--anchors", "[[1, 2], [3]]"])
        assert r.exit_code == 2 and "anchors '[[1, 2], [3]]': every level needs the same number" in r.output


# ------------------------------------------------------------- anchor-free (DFL) raw head maps
@pytest.fixture()
def v8_heads(tmp_path: Path):
    """The YOLOv8 fixture (DFL decode inside) and the same graph cut at its six head Convs."""
    full = build_yolov8(num_classes=4)
    return full, _cut(full, find_head(full).last_conv_outputs, tmp_path, "v8raw")


def test_dfl_maps_decode_to_the_graphs_own_decode(v8_heads):
    full, raw = v8_heads
    x = np.random.default_rng(0).random((1, 3, *HW), dtype=np.float32)
    want, outs = _outs(full, x)[0], _outs(raw, x)
    assert sorted(o.shape[1] for o in outs) == [4, 4, 4, 64, 64, 64]
    assert dfl_layout([o.shape for o in outs]) == (16, 4, [(0, 1), (2, 3), (4, 5)])
    got = detection_output(outs, HW)
    assert got.shape == want.shape == (1, 8, 64 + 16 + 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    # Rockchip's layout: class scores through the sigmoid in the graph, a clipped score sum after them
    rk = []
    for box, cls in zip(outs[::2], outs[1::2]):
        s = 1.0 / (1.0 + np.exp(-cls))
        rk += [box, s, np.minimum(s.sum(1, keepdims=True), 1.0)]
    np.testing.assert_allclose(detection_output(rk, HW), want, rtol=1e-5, atol=1e-4)
    assert detect_format(raw) == "v8" and data.detect_preset(raw) == "yolov8"
    info = find_head(raw)
    assert (info.family, info.num_classes) == ("yolov8", 4) and info.layout.startswith("raw maps")


def test_dfl_layout_only_matches_one_anchor_free_head():
    two = [(1, 64, 8, 8), (1, 4, 8, 8), (1, 64, 4, 4), (1, 4, 4, 4)]
    assert dfl_layout(two) == (16, 4, [(0, 1), (2, 3)])
    assert dfl_layout([(1, 64, 8, 8), (1, 1, 8, 8), (1, 64, 4, 4), (1, 1, 4, 4)])[1] == 1  # one class
    assert dfl_layout(two[:2]) is None  # one level
    assert dfl_layout([(1, 64, 8, 8), (1, 4, 8, 8), (1, 64, 4, 4), (1, 5, 4, 4)]) is None  # classes differ
    assert dfl_layout([(1, 6, 8, 8), (1, 5, 8, 8), (1, 6, 4, 4), (1, 5, 4, 4)]) is None  # no 4R box map
    # a plain box map of 4 distances (RTMDet), only with nothing beside the two maps
    assert dfl_layout([(1, 6, 8, 8), (1, 4, 8, 8), (1, 6, 4, 4), (1, 4, 4, 4)]) == (1, 6, [(1, 0), (3, 2)])
    assert dfl_layout([(1, 4, 8, 8), (1, 1, 8, 8), (1, 6, 8, 8), (1, 4, 4, 4), (1, 1, 4, 4),
                       (1, 6, 4, 4)]) is None  # YOLOX's box, objectness and class maps (or FCOS's)
    # EfficientDet / RetinaNet: 9 anchors x 4 box values and 9 x C class scores per level
    assert dfl_layout([(1, 36, 8, 8), (1, 810, 8, 8), (1, 36, 4, 4), (1, 810, 4, 4)]) is None
    assert dfl_layout([(1, 68, 8, 8), (1, 80, 8, 8), (1, 68, 4, 4), (1, 80, 4, 4)])[:2] == (17, 80)
    assert dfl_layout([(1, 64, 8, 8), (1, 4, 8, 8), (1, 32, 8, 8), (1, 64, 4, 4), (1, 4, 4, 4),
                       (1, 32, 4, 4)]) is None  # a third wide map per level (mask coefficients)
    assert dfl_layout([(1, 64, 8, 8), (1, 4, "h", 8), (1, 64, 4, 4), (1, 4, 4, 4)]) is None


def test_anchors_that_do_not_fit_fail_up_front_and_unused_ones_are_named(heads, caplog):
    full, raw4, _ = heads
    with pytest.raises(UsageError, match="anchors name 3 levels of 2 but the head has 3 levels of 3"):
        with_anchors(raw4, "[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]")
    with pytest.raises(UsageError, match="anchors name 2 levels of 3 but the head has 3 levels"):
        with_anchors(raw4, "[[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]")
    out = with_anchors(full, json.dumps(ANCHORS))  # a decoded head: stored, not used
    assert "are not raw anchor maps; the anchors are stored but not used" in caplog.text
    assert model_anchors(out) is not None and model_anchors(full) is None  # a copy by default


def test_anchor_maps_of_a_level_count_without_anchors_are_not_read_as_detections(heads, tmp_path: Path):
    """Two of the three maps: YOLOv5 has no default anchors for two levels, so the layout is not
    taken for detections (the checks skip, naming the reason) until anchors are named."""
    full, raw4, _ = heads
    two = _cut(full, [o.name for o in raw4.graph.output][:2], tmp_path, "two")
    shapes = [tuple(d.dim_value for d in o.type.tensor_type.shape.dim) for o in two.graph.output]
    assert anchor_layout(shapes) == (3, 9) and raw_maps_format(two, shapes) is None
    assert find_head(two).evidence[-1] == "anchors: none known for 2 levels (--anchors names them)"
    named = with_anchors(two, json.dumps(ANCHORS[:2]))
    assert raw_maps_format(named, shapes) == "v5" and detect_format(named) == "v5"


# ------------------------------------------------------------- RTMDet's distance maps (mmdet)
def test_rtmdet_distance_maps_decode_from_the_cell_corners():
    """mmdet's RTMDet cut at its head: per level a (B, 4, h, w) map of the distances to the box's
    sides, in pixels, from the cell's corner point (mmdet's points at offset 0), beside the class
    logits; mmdet writes the class maps first."""
    box8, box16 = np.zeros((1, 4, 8, 8), np.float32), np.zeros((1, 4, 4, 4), np.float32)
    cls8, cls16 = np.full((1, 3, 8, 8), -20, np.float32), np.full((1, 3, 4, 4), -20, np.float32)
    box8[0, :, 1, 2] = (3, 4, 5, 6)      # row 1, column 2 at stride 8: point (16, 8)
    cls8[0, 2, 1, 2] = 20.0
    box16[0, :, 3, 0] = (1, 2, 30, 8)    # row 3, column 0 at stride 16: point (0, 48)
    got = detection_output([cls8, cls16, box8, box16], HW)[0]
    assert got.shape == (4 + 3, 64 + 16)
    np.testing.assert_allclose(got[:4, 1 * 8 + 2], [17, 9, 8, 10])  # x1 y1 x2 y2 = 13 4 21 14
    np.testing.assert_allclose(got[:4, 64 + 3 * 4], [14.5, 51, 31, 10])  # -1 46 30 56
    assert got[4 + 2, 10] > 0.999 and got[4:, :10].max() < 1e-8  # class logits through the sigmoid


def rtmdet_model(num_classes: int = 3) -> onnx.ModelProto:
    """Two levels of an RTMDet-style head on a 64x64 input: class logits (1, C, h, w) and box
    distances ReLU(conv) x stride (1, 4, h, w), class maps first."""
    rng = np.random.default_rng(3)
    nodes, inits, cls, box = [], [], [], []
    for s in (8, 16):
        h = HW[0] // s
        inits += [onnx.numpy_helper.from_array(rng.normal(0, 0.1, (c, 3, s, s)).astype(np.float32), f"{k}{s}")
                  for k, c in (("wc", num_classes), ("wb", 4))]
        inits.append(onnx.numpy_helper.from_array(np.array(float(s), np.float32), f"s{s}"))
        nodes += [helper.make_node("Conv", ["images", f"wc{s}"], [f"cls{s}"], strides=[s, s]),
                  helper.make_node("Conv", ["images", f"wb{s}"], [f"d{s}"], strides=[s, s]),
                  helper.make_node("Relu", [f"d{s}"], [f"r{s}"]),
                  helper.make_node("Mul", [f"r{s}", f"s{s}"], [f"box{s}"])]
        cls.append(helper.make_tensor_value_info(f"cls{s}", onnx.TensorProto.FLOAT, [1, num_classes, h, h]))
        box.append(helper.make_tensor_value_info(f"box{s}", onnx.TensorProto.FLOAT, [1, 4, h, h]))
    graph = helper.make_graph(nodes, "rtmdet", [helper.make_tensor_value_info(
        "images", onnx.TensorProto.FLOAT, [1, 3, *HW])], cls + box, inits)
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_rtmdet_maps_are_read_by_the_head_analysis_presets_and_evaluator(tmp_path: Path):
    model = rtmdet_model()
    info = find_head(model)
    assert (info.family, info.num_classes) == ("rtmdet", 3) and "distances" in info.layout
    assert detect_format(model) == "v8"
    assert data.preset_choice(model) == ("mmdet", "the output layout: RTMDet's box distance maps")
    mm = data.PRESETS["mmdet"]  # NanoDet's BGR normalisation (mmdet's mean 103.53, ... in 0-255), padded
    assert (mm.rgb, mm.center, mm.mean) == (False, False, data.PRESETS["nanodet"].mean)
    dets = detections(model, _images(tmp_path / "im"), progress=False)
    assert len(dets) == 2 and all(d.boxes.shape[1] == 4 for d in dets)
    assert max(len(d.boxes) for d in dets) > 0


# ------------------------------------------------------------------ FastestDet's one head map
def fastestdet_model(opset: int = 13, num_classes: int = 3, softmax: bool = True) -> onnx.ModelProto:
    """FastestDet's head on a 64x64 input at stride 16: Concat(Sigmoid(obj), box, Softmax(cls)) on
    the channel axis; at opset 11 the channel softmax is Transpose, Softmax(axis 3), Transpose."""
    rng = np.random.default_rng(4)
    inits = [onnx.numpy_helper.from_array(rng.normal(0, 0.2, (c, 3, 16, 16)).astype(np.float32), k)
             for k, c in (("wo", 1), ("wr", 4), ("wc", num_classes))]
    nodes = [helper.make_node("Conv", ["images", k], [k + "_y"], strides=[16, 16])
             for k in ("wo", "wr", "wc")]
    nodes.append(helper.make_node("Sigmoid", ["wo_y"], ["obj"]))
    if not softmax:
        nodes.append(helper.make_node("Sigmoid", ["wc_y"], ["cls"]))
    elif opset >= 13:
        nodes.append(helper.make_node("Softmax", ["wc_y"], ["cls"], axis=1))
    else:
        nodes += [helper.make_node("Transpose", ["wc_y"], ["t"], perm=[0, 2, 3, 1]),
                  helper.make_node("Softmax", ["t"], ["s"], axis=3),
                  helper.make_node("Transpose", ["s"], ["cls"], perm=[0, 3, 1, 2])]
    nodes.append(helper.make_node("Concat", ["obj", "wr_y", "cls"], ["output"], axis=1))
    graph = helper.make_graph(nodes, "fastestdet", [helper.make_tensor_value_info(
        "images", onnx.TensorProto.FLOAT, [1, 3, *HW])], [helper.make_tensor_value_info(
            "output", onnx.TensorProto.FLOAT, [1, 5 + num_classes, 4, 4])], inits)
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_fastestdet_map_decodes_as_its_own_code_does():
    """Cell (gx 1, gy 2) of a 4x4 map over a 64x64 input: centre ((tanh(v0) + 1) / 4, (tanh(v1) +
    2) / 4), size (sigmoid(v2), sigmoid(v3)) of the input; scores objectness^0.6 x p^0.4."""
    from onnxslim_yolo.eval.fastest import decode_map
    p = np.zeros((1, 8, 4, 4), np.float32)
    p[0, :, 2, 1] = [0.5, np.arctanh(0.5), np.arctanh(-0.25), 0.0, np.log(3.0), 0.2, 0.3, 0.5]
    got = decode_map(p, HW)[0]
    assert got.shape == (4 + 3, 16)
    np.testing.assert_allclose(got[:4, 2 * 4 + 1], [(0.5 + 1) / 4 * 64, (-0.25 + 2) / 4 * 64, 32, 48],
                               rtol=1e-5)
    np.testing.assert_allclose(got[4:, 9], 0.5 ** 0.6 * np.array([0.2, 0.3, 0.5]) ** 0.4, rtol=1e-5)
    assert np.all(got[4:, :9] == 0)  # no objectness elsewhere


@pytest.mark.parametrize("opset", [11, 13])
def test_fastestdet_is_recognised_by_its_graph(opset, tmp_path: Path):
    from onnxslim_yolo.eval.fastest import fastestdet_map
    model = fastestdet_model(opset)
    assert fastestdet_map(model) and not fastestdet_map(fastestdet_model(opset, softmax=False))
    info = find_head(model)
    assert (info.family, info.num_classes) == ("fastestdet", 3)
    assert detect_format(model) == "v8" and data.detect_preset(model) == "fastestdet"
    assert not data.PRESETS["fastestdet"].rgb
    dets = detections(model, _images(tmp_path / "im"), progress=False)
    assert len(dets) == 2 and max(len(d.boxes) for d in dets) > 0
    assert all(d.boxes.max() <= 64 and d.boxes.min() >= 0 for d in dets)  # within the 64x48 images
    # one map of 8 channels with no such graph is read as no known layout
    assert raw_maps_format(fastestdet_model(opset, softmax=False), [(1, 8, 4, 4)]) is None


# -------------------------------------------------------------- YOLO-FastestV2's anchor maps
def fastestv2_model(raw: bool = False, num_classes: int = 3, na: int = 3) -> onnx.ModelProto:
    """YOLO-FastestV2's head on a 64x64 input at strides 16 and 32: per level Transpose(Concat(
    Sigmoid(box), Sigmoid(objectness), Softmax(classes))) to (1, h, w, 5na + C); with ``raw`` the
    three logit maps per level instead (its export without the post-processing)."""
    rng = np.random.default_rng(5)
    nodes, inits, outs = [], [], []
    for s in (16, 32):
        h = HW[0] // s
        parts = (("box", 4 * na), ("obj", na), ("cls", num_classes))
        for k, c in parts:
            inits.append(onnx.numpy_helper.from_array(rng.normal(0, 0.05, (c, 3, s, s)).astype(np.float32),
                                                      f"w{k}{s}"))
            nodes.append(helper.make_node("Conv", ["images", f"w{k}{s}"], [f"{k}{s}"], strides=[s, s]))
        if raw:
            outs += [helper.make_tensor_value_info(f"{k}{s}", onnx.TensorProto.FLOAT, [1, c, h, h])
                     for k, c in parts]
            continue
        nodes += [helper.make_node("Sigmoid", [f"box{s}"], [f"sb{s}"]),
                  helper.make_node("Sigmoid", [f"obj{s}"], [f"so{s}"]),
                  helper.make_node("Softmax", [f"cls{s}"], [f"sc{s}"], axis=1),
                  helper.make_node("Concat", [f"sb{s}", f"so{s}", f"sc{s}"], [f"cat{s}"], axis=1),
                  helper.make_node("Transpose", [f"cat{s}"], [f"out{s}"], perm=[0, 2, 3, 1])]
        outs.append(helper.make_tensor_value_info(f"out{s}", onnx.TensorProto.FLOAT,
                                                  [1, h, h, 5 * na + num_classes]))
    graph = helper.make_graph(nodes, "fastestv2", [helper.make_tensor_value_info(
        "images", onnx.TensorProto.FLOAT, [1, 3, *HW])], outs, inits)
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_fastestv2_maps_decode_as_yolov5_with_its_anchors():
    """Anchor 1 of cell (column 2, row 1) at stride 16: xy = (2s - 0.5 + cell) x 16, wh = (2s)^2 x
    anchor (YOLO-FastestV2's COCO anchors, 37.88 x 51.48); rows keep objectness and the cell's
    class probabilities, which YOLOv5's decode multiplies."""
    from onnxslim_yolo.eval.fastest import V2_ANCHORS
    m = fastestv2_model()
    f16, f32 = np.full((1, 4, 4, 18), 0.25, np.float32), np.full((1, 2, 2, 18), 0.25, np.float32)
    f16[0, 1, 2, 4:8] = [0.5, 0.75, 0.5, 1.0]
    f16[0, 1, 2, 12:15] = [0.1, 0.9, 0.2]  # objectness of anchors 0-2
    f16[0, 1, 2, 15:] = [0.1, 0.6, 0.3]
    got = OutputReader(m)([f16, f32], HW)[0]
    assert got.shape == (3 * 16 + 3 * 4, 8)
    row = got[1 * 16 + 1 * 4 + 2]  # anchor-major rows, as YOLOv5's maps
    np.testing.assert_allclose(row, [(0.5 + 2) * 16, (1.0 + 1) * 16, V2_ANCHORS[0][2], 4 * V2_ANCHORS[0][3],
                                     0.9, 0.1, 0.6, 0.3], rtol=1e-6)


def test_fastestv2_export_and_raw_maps_read_alike(tmp_path: Path):
    from onnxslim_yolo.eval.fastest import V2_ANCHORS, fastestv2_maps, v2_raw_layout
    export, raw = fastestv2_model(), fastestv2_model(raw=True)  # 3 classes, 3 anchors: the order decides
    assert fastestv2_maps(export) == 3 and fastestv2_maps(raw) is None
    x = np.random.default_rng(0).random((1, 3, *HW), dtype=np.float32)
    want, got = OutputReader(export)(_outs(export, x), HW), OutputReader(raw)(_outs(raw, x), HW)
    assert want.shape == (1, 60, 8)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for m in (export, raw):
        info = find_head(m)
        assert (info.family, info.num_classes, info.anchors_per_cell) == ("yolo-fastestv2", 3, 3)
        assert detect_format(m) == "v5" and data.detect_preset(m) == "fastestdet"
    dets = detections(export, _images(tmp_path / "im"), progress=False)
    assert len(dets) == 2 and max(len(d.boxes) for d in dets) > 0
    # an INT8 model's objectness Conv reads its weight through a DequantizeLinear
    q = onnx.ModelProto()
    q.CopyFrom(export)
    for s in (16, 32):
        w = next(t for t in q.graph.initializer if t.name == f"wobj{s}")
        w.name = f"wobj{s}_q"
        q.graph.node.insert(0, helper.make_node("DequantizeLinear", [w.name, f"sc{s}"], [f"wobj{s}"]))
        q.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.01, np.float32), f"sc{s}"))
        w.CopyFrom(onnx.numpy_helper.from_array(np.ones(tuple(w.dims), np.int8), w.name))
    assert fastestv2_maps(q) == 3
    # YOLOX's three maps per level (4, 1, C) and FCOS's (4, C, 1) are not read so
    assert v2_raw_layout([(1, 4, 8, 8), (1, 1, 8, 8), (1, 3, 8, 8), (1, 4, 4, 4), (1, 1, 4, 4),
                          (1, 3, 4, 4)]) is None
    # --anchors must fit 2 levels of 3; ones that fit are used: twice the anchors, twice the sizes
    with pytest.raises(UsageError, match="anchors name 3 levels of 3 but the head has 2 levels of 3"):
        with_anchors(export, json.dumps(ANCHORS))
    doubled = with_anchors(raw, json.dumps([[2 * v for v in lv] for lv in V2_ANCHORS]))
    np.testing.assert_allclose(OutputReader(doubled)(_outs(raw, x), HW)[..., 2:4], 2 * want[..., 2:4],
                               rtol=1e-5)


# ------------------------------------------------------ GFL head rows (PP-PicoDet, NanoDet-Plus)
def _as_rows(maps):
    """(B, K, h, w) maps as the (B, h*w, K) rows a GFL head exports."""
    return [m.reshape(m.shape[0], m.shape[1], -1).transpose(0, 2, 1) for m in maps]


def _rows_model(raw: onnx.ModelProto) -> onnx.ModelProto:
    """``raw`` with each map output turned into rows by a Reshape (B, K, h*w) and a Transpose."""
    m = onnx.ModelProto()
    m.CopyFrom(raw)
    shapes = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    del m.graph.output[:]
    for i, (name, (b, k, h, w)) in enumerate(shapes.items()):
        target = helper.make_tensor(f"rows{i}.shape", onnx.TensorProto.INT64, [3], [b, k, h * w])
        m.graph.initializer.append(target)
        m.graph.node.extend([helper.make_node("Reshape", [name, target.name], [f"rows{i}.flat"]),
                             helper.make_node("Transpose", [f"rows{i}.flat"], [f"rows{i}"], perm=[0, 2, 1])])
        rows = helper.make_tensor_value_info(f"rows{i}", onnx.TensorProto.FLOAT, [b, h * w, k])
        m.graph.output.append(rows)
    onnx.checker.check_model(m)
    return m


def test_gfl_rows_decode_like_the_maps_they_hold(v8_heads):
    """The YOLOv8 fixture's head maps as rows (B, h*w, 4x16) + (B, h*w, C) decode to the graph's
    own decode; a model with such outputs is read as a GFL head fed ImageNet-normalised images."""
    full, raw = v8_heads
    x = np.random.default_rng(0).random((1, 3, *HW), dtype=np.float32)
    want, rows = _outs(full, x)[0], _as_rows(_outs(raw, x))
    assert dfl_layout([r.shape for r in rows]) == (16, 4, [(0, 1), (2, 3), (4, 5)])
    np.testing.assert_allclose(detection_output(rows[::-1], HW), want, rtol=1e-5, atol=1e-4)
    model = _rows_model(raw)
    np.testing.assert_allclose(detection_output(_outs(model, x), HW), want, rtol=1e-5, atol=1e-4)
    assert detect_format(model) == "v8" and data.detect_preset(model) == "imagenet"
    info = find_head(model)
    assert (info.family, info.num_classes) == ("gfl", 4) and info.layout.startswith("rows")


def test_gfl_rows_of_eight_bins_decode_from_the_cell_centres():
    """PicoDet's decode, written out: centre ((col, row) + 0.5) * stride, minus / plus the expected
    distance over 8 bins (softmax) times the stride, per side l, t, r, b."""
    rng = np.random.default_rng(1)
    hw, nc = (64, 96), 3
    sizes = [(8, 12, 8), (4, 6, 16), (2, 3, 32), (1, 2, 64)]
    boxes = [rng.normal(0, 2, (1, h * w, 32)).astype(np.float32) for h, w, _ in sizes]
    scores = [rng.random((1, h * w, nc), dtype=np.float32) for h, w, _ in sizes]
    got = detection_output(scores + boxes, hw)[0]
    want = []
    for (h, w, s), box, sc in zip(sizes, boxes, scores):
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        cx, cy = (cols.ravel() + 0.5) * s, (rows.ravel() + 0.5) * s
        p = np.exp(box[0].reshape(-1, 4, 8))
        d = (p / p.sum(2, keepdims=True) * np.arange(8)).sum(2) * s
        x1, y1, x2, y2 = cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]
        want.append(np.concatenate([np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]), sc[0].T]))
    np.testing.assert_allclose(got, np.concatenate(want, 1), rtol=1e-5, atol=1e-4)
    with pytest.raises(NotDetections, match="a head level of 96 rows matches no grid of a 64x64 input"):
        detection_output(scores + boxes, (64, 64))


def test_gfl_row_layout_only_matches_one_head():
    pico = [(1, 7600, 10), (1, 1900, 10), (1, 475, 10), (1, 130, 10),
            (1, 7600, 32), (1, 1900, 32), (1, 475, 32), (1, 130, 32)]
    assert dfl_layout(pico) == (8, 10, [(4, 0), (5, 1), (6, 2), (7, 3)])
    assert dfl_layout([(1, 64, 32), (1, 64, 32), (1, 16, 32), (1, 16, 32)]) is None  # 32 classes = 4 x 8
    assert dfl_layout([(1, 64, 32), (1, 64, 5), (1, 32, 32), (1, 32, 5)]) is None  # levels 2x apart
    assert dfl_layout([(1, 64, 24), (1, 64, 5), (1, 16, 24), (1, 16, 5)]) is None  # 6 bins per side
    assert dfl_layout([(1, 64, 32), (1, 64, 5), (1, 16, 32), (1, 16, 6)]) is None  # classes differ
    assert dfl_layout([(1, 64, 4), (1, 64, 5)]) is None  # one level (and a boxes + scores pair)
