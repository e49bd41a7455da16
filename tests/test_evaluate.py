"""Evaluator: output decoding, NMS, ground truth, COCO mAP, agreement, CLI, and yolov5n on coco128."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import List, Sequence

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxslim_yolo import data
from fixtures.postprocess import append_nms, split_boxes_scores
from onnxslim_yolo.eval.decode import (NotDetections, decode, decode_rows, detect_format, grid_size,
                                       row_format, xywh2xyxy, yolox_grid)
from onnxslim_yolo.eval.metrics import ImageBoxes, coco_map, load_ground_truth, read_yolo_labels
from onnxslim_yolo.eval.nms import nms, non_max_suppression, scale_boxes
from onnxslim_yolo.evaluate import agreement, detections, evaluate, score
from onnxslim_yolo.pass_base import PreconditionError, UsageError

# ------------------------------------------------------------------ a tiny synthetic data set
# 40x80 images letterboxed to 64x64: ratio 0.8, centred pad (0, 16), top-left pad (0, 0)
IMG_HW, SIZE = (40, 80), 64
LABELS = [(1, 0.25, 0.5, 0.2, 0.4), (0, 0.75, 0.3, 0.3, 0.4)]  # class cx cy w h (normalized)


def letterboxed(labels, pad_top: float, shift: float = 0.0) -> np.ndarray:
    """(N, 4) cx cy w h of the labels in 64x64 input pixels; ``shift`` moves boxes right by w*shift."""
    H, W = IMG_HW
    r = 0.8
    return np.array([[(cx * W + shift * w * W) * r, cy * H * r + pad_top, w * W * r, h * H * r]
                     for _, cx, cy, w, h in labels], np.float32)


def const_model(fmt: str, cxcywh: np.ndarray, classes: Sequence[int], n_classes: int = 2) -> onnx.ModelProto:
    """A model that ignores its image and always outputs these boxes in the given layout."""
    n = grid_size((SIZE, SIZE))
    rows = np.zeros((n * (3 if fmt == "v5" else 1), 5 + n_classes), np.float32)
    if fmt == "yolox":
        rows[:, :4] = [0.5, 0.5, 0.0, 0.0]  # raw: box of one stride-8 cell
        for b, c in zip(cxcywh, classes):
            gx, gy = int(b[0] // 8), int(b[1] // 8)
            k = gy * (SIZE // 8) + gx
            rows[k, :4] = [b[0] / 8 - gx, b[1] / 8 - gy, math.log(b[2] / 8), math.log(b[3] / 8)]
            rows[k, 4], rows[k, 5 + c] = 0.9, 1.0
    else:
        for k, (b, c) in enumerate(zip(cxcywh, classes)):
            rows[k, :4], rows[k, 4], rows[k, 5 + c] = b, 0.9, 1.0
    if fmt == "v8":
        rows[:, 5:] *= rows[:, 4:5]
        rows = np.delete(rows, 4, axis=1).T  # (4 + C, N), no objectness
    out = rows[None]
    node = helper.make_node("Constant", [], ["output"], value=numpy_helper.from_array(out, "c"))
    g = helper.make_graph([node], "const", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                          [1, 3, SIZE, SIZE])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out.shape))])
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture()
def dataset(tmp_path: Path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (*IMG_HW, 3), dtype=np.uint8)).save(images / f"im{i}.png")
        (labels / f"im{i}.txt").write_text("\n".join(" ".join(str(v) for v in lab) for lab in LABELS) + "\n")
    return images, labels


CLASSES = [lab[0] for lab in LABELS]


# ------------------------------------------------------------------------------------- NMS
def brute_force_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> List[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep: List[int] = []
    for i in order:
        ok = True
        for k in keep:
            a, b = boxes[i], boxes[k]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if inter / union > thr:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


def test_nms_hand_computed():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.9, 0.8, 0.7])
    # IoU(0, 1) = 81 / 119 = 0.68
    assert nms(boxes, scores, 0.6).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    assert nms(boxes, scores, 0.6, max_keep=1).tolist() == [0]
    # IoU exactly 0.5 does not suppress (strictly greater, as torchvision)
    half = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], np.float32)
    assert nms(half, np.array([0.5, 0.9]), 0.5).tolist() == [1, 0]
    assert nms(half, np.array([0.5, 0.9]), 0.49).tolist() == [1]


def test_nms_matches_brute_force_on_random_boxes():
    rng = np.random.default_rng(1)
    for _ in range(20):
        xy = rng.uniform(0, 50, (60, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (60, 2))], 1)
        scores = rng.random(60)
        for thr in (0.3, 0.6):
            assert nms(boxes, scores, thr).tolist() == brute_force_nms(boxes, scores, thr)
            assert nms(boxes, scores, thr, max_keep=5).tolist() == brute_force_nms(boxes, scores, thr)[:5]


def test_non_max_suppression_class_aware_multilabel_and_limits():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [40, 40, 50, 50]], np.float32)
    scores = np.array([[0.9, 0.0], [0.0, 0.8], [0.3, 0.2]], np.float32)
    d = non_max_suppression(boxes, scores, conf=0.1, iou=0.6)
    # the overlapping pair survives (different classes); box 2 yields one detection per class
    assert d[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.3, 0.2])
    assert d[:, 5].tolist() == [0, 1, 0, 1]
    assert np.allclose(d[1, :4], boxes[1])
    agnostic = non_max_suppression(boxes, scores, conf=0.1, iou=0.6, agnostic=True, multi_label=False)
    assert agnostic[:, 4].tolist() == pytest.approx([0.9, 0.3])
    assert len(non_max_suppression(boxes, scores, conf=0.25, iou=0.6)) == 3  # strict > conf
    assert len(non_max_suppression(boxes, scores, conf=0.1, iou=0.6, max_det=2)) == 2
    assert non_max_suppression(boxes, scores, conf=0.95, iou=0.6).shape == (0, 6)


def test_scale_boxes_undoes_letterbox_and_clips():
    d = np.array([[16.0, 26.0, 32.0, 42.0], [-5.0, 10.0, 70.0, 60.0]])
    out = scale_boxes(d, 0.8, (0, 16), IMG_HW)
    assert out[0].tolist() == pytest.approx([20, 12.5, 40, 32.5])
    assert out[1].tolist() == pytest.approx([0, 0, 80, 40])


# ---------------------------------------------------------------------------------- decoding
def test_decode_v5_scores_are_obj_times_cls():
    out = np.array([[[10, 20, 4, 6, 0.5, 0.2, 0.8], [0, 0, 2, 2, 0.0005, 1.0, 1.0]]], np.float32)
    boxes, scores = decode(out, "v5", (64, 64))
    assert boxes[0].tolist() == pytest.approx([8, 17, 12, 23])
    assert scores[0].tolist() == pytest.approx([0.1, 0.4])
    boxes, scores = decode(out, "v5", (64, 64), conf=0.001)  # low-objectness row dropped early
    assert len(boxes) == 1


def test_decode_v8_is_channels_first_without_objectness():
    out = np.array([[10, 20, 4, 6, 0.3, 0.7], [0, 0, 2, 2, 0.9, 0.1]], np.float32).T[None]  # (1, 6, 2)
    boxes, scores = decode(out, "v8", (64, 64))
    assert boxes[0].tolist() == pytest.approx([8, 17, 12, 23])
    assert np.allclose(scores, [[0.3, 0.7], [0.9, 0.1]])


def test_decode_yolox_grid_and_strides():
    grid, stride = yolox_grid((64, 64))
    assert grid.shape == (84, 2) and stride[:64].max() == 8 and stride[64:80].min() == 16
    out = np.zeros((1, 84, 7), np.float32)
    out[0, 70] = [0.5, 0.5, math.log(2), math.log(2), 0.8, 0.5, 0.25]  # stride 16, cell (x=2, y=1)
    boxes, scores = decode(out, "yolox", (64, 64))
    assert boxes[70].tolist() == pytest.approx([40 - 16, 24 - 16, 40 + 16, 24 + 16], abs=1e-4)
    assert scores[70].tolist() == pytest.approx([0.4, 0.2])
    with pytest.raises(UsageError, match="84 rows but a 32x32 input gives 21 grid points"):
        decode(out, "yolox", (32, 32))


def test_decode_yolox_already_decoded_is_read_as_is():
    out = np.zeros((1, 84, 7), np.float32)
    out[0, :, :2] = 30.0
    out[0, 0] = [40, 24, 32, 32, 0.8, 0.5, 0.25]
    boxes, _ = decode(out, "yolox", (64, 64))
    assert boxes[0].tolist() == pytest.approx([24, 8, 56, 40])


def test_detect_format_from_layout():
    assert detect_format(const_model("v5", np.zeros((0, 4)), [])) == "v5"
    assert detect_format(const_model("v8", np.zeros((0, 4)), [])) == "v8"
    assert detect_format(const_model("yolox", np.zeros((0, 4)), [])) == "yolox"
    assert detect_format(const_model("v5", np.zeros((0, 4)), []), output_shape=(1, 6, 84)) == "v8"
    m = const_model("v5", np.zeros((0, 4)), [])
    m.metadata_props.add(key="task", value="segment")
    with pytest.raises(NotDetections, match="ultralytics 'segment' export"):
        detect_format(m)
    assert data.detect_preset(m) == "yolov8"  # preprocessed like the detector, not refused


def _with_masks(model: onnx.ModelProto, nm: int = 32, rows: bool = False) -> onnx.ModelProto:
    """``model`` as an ultralytics 'segment' export: ``nm`` mask coefficients after each candidate
    (after the class rows of a (1, 4+C, N) output, or after each (1, K, 6) row with ``rows``) and a
    second output of (1, nm, 16, 16) prototype masks."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    const = m.graph.node[0]
    out = numpy_helper.to_array(const.attribute[0].t)
    pad = [(0, 0), (0, 0), (0, nm)] if rows else [(0, 0), (0, nm), (0, 0)]
    out = np.pad(out, pad, constant_values=0.3)
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(out, "c"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out.shape)))
    m.graph.node.append(helper.make_node("Constant", [], ["protos"], value=numpy_helper.from_array(
        np.zeros((1, nm, 16, 16), np.float32), "p")))
    m.graph.output.append(helper.make_tensor_value_info("protos", TensorProto.FLOAT, [1, nm, 16, 16]))
    m.metadata_props.add(key="task", value="segment")
    return m


def test_segment_exports_are_read_for_their_boxes(dataset):
    """YOLOv8/11-seg: (1, 4+C+32, N) beside the prototypes; YOLO26-seg: (1, K, 6+32) rows after
    its own selection. The coefficients are dropped and the boxes scored."""
    images, labels = dataset
    seg = _with_masks(const_model("v8", letterboxed(LABELS, 16), CLASSES))
    assert detect_format(seg) == "v8"
    assert evaluate(seg, images, labels, progress=False, threads=1)["map"] == pytest.approx(1.0)
    rows = np.zeros((1, 50, 6), np.float32)   # more rows than values per row, as YOLO26-seg's 300 x 38
    for k, (b, c) in enumerate(zip(letterboxed(LABELS, 16), CLASSES)):
        rows[0, k] = [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2, 0.9, c]
    e2e = const_model("v8", np.zeros((0, 4)), [])
    e2e.graph.node[0].attribute[0].t.CopyFrom(numpy_helper.from_array(rows, "c"))
    e2e.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 50, 6]))
    e2e = _with_masks(e2e, rows=True)
    assert detect_format(e2e) == "dets"
    assert evaluate(e2e, images, labels, progress=False, threads=1)["map"] == pytest.approx(1.0)


def test_pose_exports_are_read_for_their_boxes(dataset):
    """An ultralytics 'pose' export: (1, 4+C+51, N), its metadata's kpt_shape [17, 3] naming the
    keypoint values after the class scores; without kpt_shape it is refused."""
    images, labels = dataset
    pose = const_model("v8", letterboxed(LABELS, 16), CLASSES)
    const = pose.graph.node[0]
    out = np.pad(numpy_helper.to_array(const.attribute[0].t), [(0, 0), (0, 51), (0, 0)], constant_values=40.0)
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(out, "c"))
    pose.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out.shape)))
    pose.metadata_props.add(key="task", value="pose")
    with pytest.raises(NotDetections, match="ultralytics 'pose' export"):
        detect_format(pose)
    pose.metadata_props.add(key="kpt_shape", value="[17, 3]")
    assert detect_format(pose) == "v8"
    res = evaluate(pose, images, labels, progress=False, threads=1)
    assert res["map"] == pytest.approx(1.0) and res["n_detections"] == 6
    # an end-to-end pose export (YOLO26-pose): (1, K, 6+51) rows after its own selection are dets
    rows = np.zeros((1, 60, 6 + 51), np.float32)
    rows[..., 6:] = 40.0
    for k, (b, c) in enumerate(zip(letterboxed(LABELS, 16), CLASSES)):
        rows[0, k, :6] = [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2, 0.9, c]
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(rows, "c"))
    pose.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 60, 57]))
    assert detect_format(pose) == "dets"
    res = evaluate(pose, images, labels, progress=False, threads=1)
    assert res["map"] == pytest.approx(1.0) and res["n_detections"] == 6


def test_obb_exports_are_scored_on_the_boxes_around_their_rotated_boxes(dataset):
    """An ultralytics 'obb' export: (1, 4+C+1, N), the angle last. Rotated boxes whose enclosing
    axis-aligned boxes are the labels' boxes score mAP 1.0; read as plain v8 rows (no angle, the
    rotated w h) they do not. Candidates in rows (end to end, after the export's own selection)
    are read as such rows."""
    images, labels = dataset
    boxes = letterboxed(LABELS, 16)
    obb = const_model("v8", boxes, CLASSES)
    const = obb.graph.node[0]
    out = numpy_helper.to_array(const.attribute[0].t).copy()
    angles = np.array([0.1, -0.1] * (out.shape[2] // 2) + [0.0] * (out.shape[2] % 2), np.float32)
    c, s = np.abs(np.cos(angles)), np.abs(np.sin(angles))
    w, h = out[0, 2].copy(), out[0, 3].copy()      # the wanted enclosing w h: solve for the rotated w h
    det = c * c - s * s
    out[0, 2], out[0, 3] = (c * w - s * h) / det, (c * h - s * w) / det
    assert (out[0, 2:4] >= 0).all()
    out = np.concatenate([out, angles[None, None]], axis=1)
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(out, "c"))
    obb.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out.shape)))
    obb.metadata_props.add(key="task", value="obb")
    assert detect_format(obb) == "v8"
    res = evaluate(obb, images, labels, progress=False, threads=1)
    assert res["map"] == pytest.approx(1.0) and res["n_detections"] == 6
    plain = onnx.ModelProto()
    plain.CopyFrom(obb)
    del plain.metadata_props[:]
    plain.metadata_props.add(key="task", value="pose")
    plain.metadata_props.add(key="kpt_shape", value="[1, 1]")   # the angle dropped, w h kept rotated
    assert evaluate(plain, images, labels, progress=False, threads=1)["map"] < 0.9
    # end to end (YOLO26-obb): (1, K, 7) rows cx cy w h score class angle after its own selection
    rows = np.zeros((1, 50, 7), np.float32)
    rows[0, :2] = np.concatenate([out[0, :4, :2].T, [[0.9, 1], [0.9, 0]], out[0, -1:, :2].T], 1)
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(rows, "c"))
    obb.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 50, 7]))
    assert detect_format(obb) == "dets"
    res = evaluate(obb, images, labels, progress=False, threads=1)
    assert res["map"] == pytest.approx(1.0) and res["n_detections"] == 6


def test_detect_format_of_split_and_post_nms_outputs():
    base = const_model("v5", np.zeros((0, 4)), [])
    for channels_first in (False, True):
        split = split_boxes_scores(base, channels_first)
        assert [o.name for o in split.graph.output] == ["boxes", "scores"]
        assert detect_format(split) == "xyxy" and row_format(split, (1, 252, 4), (64, 64)) is None
    nms = append_nms(base, max_det=20)
    assert detect_format(nms) == "dets" and row_format(nms, (1, 20, 6), (64, 64)) is None
    assert detect_format(append_nms(base, batch_rows=True)) == "dets7"  # (K, 7) YOLOv7 end-to-end rows
    assert detect_format(append_nms(base, batch_rows=True, layout="batched")) == "dets7"   # (1, K, 7)
    assert detect_format(append_nms(base, layout="flat")) == "dets"   # (K, 6): not v5 rows of 1 class
    boxes, scores = decode(np.array([[1, 2, 3, 4, 0.9, 2]], np.float32), "dets", (64, 64))  # one row
    assert boxes.tolist() == [[1, 2, 3, 4]] and scores.shape == (1, 3) and scores[0, 2] == np.float32(0.9)
    for layout in ("labels", "end2end", "paddle"):   # mmdeploy's dets + labels; EfficientNMS's four
        split_nms = append_nms(base, max_det=20, layout=layout)   # outputs; (K, 6) rows + counts
        assert detect_format(split_nms) == "dets" and row_format(split_nms, (1, 20, 5), (64, 64)) is None
    ultra = const_model("v8", np.zeros((0, 4)), [])
    ultra.metadata_props.add(key="task", value="detect")
    assert detect_format(ultra, output_shape=(1, 300, 6)) == "dets"  # nms=True export: not (1, 4+C, N)
    assert detect_format(ultra) == "v8" == row_format(ultra, (1, 6, 84), (64, 64))
    one_class = const_model("v5", np.zeros((0, 4)), [], n_classes=1)  # (1, 3 x 84, 6): still a v5 head
    assert detect_format(one_class) == "v5"
    with pytest.raises(NotDetections, match="rows do not correspond"):
        decode_rows(np.zeros((1, 20, 6), np.float32), "dets", (64, 64))


def test_corner_boxes_are_told_from_centre_size_ones_by_their_values(caplog):
    """An export that turned its 5+C rows' boxes into corners scored 0.003 (read as cx cy w h), and
    a boxes + scores pair left in cx cy w h 0.000 (read as corners); below 200 candidates, or
    over rows of one point (padding), the layout decides."""
    rng = np.random.default_rng(0)
    n = 300
    xywh = np.concatenate([rng.uniform(0, 640, (n, 2)), rng.uniform(4, 120, (n, 2))], 1).astype(np.float32)
    want = xywh2xyxy(xywh)
    rest = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    caplog.set_level("WARNING")
    for fmt, cols in (("v5", rest), ("xyxy", rest[:, 1:])):
        for boxes in (xywh, want):
            got, _ = decode(np.concatenate([boxes, cols], 1)[None], fmt, (640, 640))
            assert np.allclose(got, want, atol=1e-3), (fmt, boxes is want)
    got, _ = decode(np.concatenate([want, rest], 1).T[None], "v8", (640, 640))   # (1, 4+C, N)
    assert np.allclose(got, want, atol=1e-3)
    said = [r.getMessage() for r in caplog.records if "candidate boxes have" in r.getMessage()]
    assert len(said) == 3 and sum("as corners always do" in m for m in said) == 2, said
    assert any(re.match(r"\d+\.\d% of the 300 candidate boxes have x2 < x1 or y2 < y1, which corners never",
                        m) for m in said), said
    few = np.concatenate([want[:150], rest[:150]], 1)[None]
    assert np.allclose(decode(few, "v5", (640, 640))[0], xywh2xyxy(want[:150]))   # too few to tell
    padded = np.concatenate([np.concatenate([want[:150], rest[:150]], 1), np.zeros((200, 7), np.float32)])
    assert np.allclose(decode(padded[None], "v5", (640, 640))[0][:150], xywh2xyxy(want[:150]))


def test_decode_refuses_outputs_that_are_not_detections():
    with pytest.raises(NotDetections, match=r"output of shape \[1, 1000\]"):
        decode(np.zeros((1, 1000), np.float32), "v5", (64, 64))  # a classifier's logits
    with pytest.raises(NotDetections, match="rows have 5 values"):
        decode(np.zeros((1, 20, 5), np.float32), "v5", (64, 64))


# ----------------------------------------------------------------------- ground truth and mAP
def test_read_yolo_labels_to_pixels_and_errors(tmp_path: Path):
    f = tmp_path / "a.txt"
    f.write_text("1 0.25 0.5 0.2 0.4\n\n3 0.1 0.1 0.3 0.1 0.3 0.5 0.1 0.5\n")
    boxes, classes = read_yolo_labels(f, IMG_HW)
    assert classes.tolist() == [1, 3]
    assert boxes[0].tolist() == pytest.approx([12, 12, 28, 28])
    assert boxes[1].tolist() == pytest.approx([8, 4, 24, 20])  # polygon -> its bounding box
    assert read_yolo_labels(tmp_path / "none.txt", IMG_HW)[0].shape == (0, 4)
    f.write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(UsageError, match=r"a.txt:1: expected 'class cx cy w h'"):
        read_yolo_labels(f, IMG_HW)
    f.write_text("cat 0.5 0.5 0.2 0.1\n")
    with pytest.raises(UsageError, match=r"a.txt:1: not a YOLO label line"):
        read_yolo_labels(f, IMG_HW)


@pytest.mark.parametrize("line, message", [
    # each was read without a word before: a negative box, NaN, a class of 4.7 (read as 4), pixels
    ("45 -0.5 0.5 0.2 -0.3", r"value -0.5 is not a coordinate normalised to 0-1"),
    ("0 nan 0.5 0.2 0.2", r"value nan is not a coordinate normalised to 0-1"),
    ("0 0.1 0.1 0.3 0.1 0.3 1.5 0.1 0.5", r"value 1.5 is not a coordinate normalised to 0-1"),
    ("0 320 240 50 80", r"value 320 is not a coordinate normalised to 0-1 \(YOLO labels divide by"),
    ("4.7 0.5 0.5 0.2 0.2", r"class '4.7' is not a class index \(a whole number >= 0\)"),
    ("-1 0.5 0.5 0.2 0.2", r"class '-1' is not a class index"),
])
def test_label_values_outside_0_1_or_a_fractional_class_are_refused(tmp_path: Path, line, message):
    f = tmp_path / "a.txt"
    f.write_text("1 0.25 0.5 0.2 0.4\n" + line + "\n")
    with pytest.raises(UsageError, match=r"a.txt:2: " + message):
        read_yolo_labels(f, IMG_HW)


def test_label_files_with_a_byte_order_mark_are_read_and_their_errors_not_renamed(tmp_path: Path):
    """A UTF-8 byte-order mark (Windows editors) made the first class '\\ufeff23'; and an error
    naming a label file and line was put behind the model's path, as if it were the model's."""
    from onnxslim_yolo.pass_base import naming_file

    f = tmp_path / "a.txt"
    f.write_bytes("\ufeff23 0.5 0.5 0.2 0.4\n".encode("utf-8"))
    boxes, classes = read_yolo_labels(f, IMG_HW)
    assert classes.tolist() == [23]
    err = UsageError(f"{f}:2: class '4.7' is not a class index (a whole number >= 0)")
    assert str(naming_file(err, "model.onnx")) == str(err)
    assert str(naming_file(UsageError("no detections"), "model.onnx")) == "model.onnx: no detections"


def test_duplicate_label_lines_count_once_as_ultralytics_counts_them(tmp_path: Path, caplog):
    """Each copy of a line was one more object: a detection matches one, the others counted as
    missed (coco128 subset: mAP 0.574 -> 0.533, no warning)."""
    f = tmp_path / "dup.txt"
    f.write_text("1 0.5 0.5 0.2 0.2\n1 0.50 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n")
    with caplog.at_level("WARNING"):
        boxes, classes = read_yolo_labels(f, IMG_HW)
    assert classes.tolist() == [1, 2] and len(boxes) == 2
    assert "dup.txt: 2 duplicate label lines left out" in caplog.text
    gt = [ImageBoxes("dup.png", IMG_HW, boxes, classes)]
    dets = [ImageBoxes("dup.png", IMG_HW, boxes, classes, np.array([0.9, 0.8]))]
    assert coco_map(gt, dets)["map"] == pytest.approx(1.0)


def test_label_values_a_rounding_past_0_1_are_kept(tmp_path: Path):
    f = tmp_path / "a.txt"
    f.write_text("2.0 1.0004 0.5 0.2 0.4\n0 0.5 -0.0004 0.2 0.2\n")
    boxes, classes = read_yolo_labels(f, IMG_HW)
    assert classes.tolist() == [2, 0] and len(boxes) == 2


def test_a_coco_json_with_a_byte_order_mark_is_read(tmp_path: Path):
    j = {"images": [{"id": 1, "file_name": "im0.png", "height": 40, "width": 80}],
         "categories": [{"id": 1, "name": "a"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 0}]}
    (tmp_path / "gt.json").write_bytes(("\ufeff" + json.dumps(j)).encode("utf-8"))
    (gt,) = load_ground_truth(tmp_path / "gt.json", [("im0.png", IMG_HW)], 1)
    assert gt.boxes.tolist() == [[1, 2, 4, 6]]


def test_coco_json_ground_truth_maps_category_ids(tmp_path: Path):
    j = {"images": [{"id": 7, "file_name": "sub/im0.png", "height": 40, "width": 80}],
         "categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
         "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [12, 12, 16, 16], "iscrowd": 0},
                         {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}]}
    (tmp_path / "gt.json").write_text(json.dumps(j))
    gt = load_ground_truth(tmp_path / "gt.json", [("im0.png", IMG_HW), ("other.png", IMG_HW)], 2)
    assert gt[0].classes.tolist() == [1, 0] and gt[0].boxes.tolist() == [[12, 12, 28, 28], [0, 0, 5, 5]]
    assert gt[0].crowd.tolist() == [False, True] and len(gt[1]) == 0
    # a detection inside the crowd region is ignored; without the crowd flag it is a false positive
    dets = [ImageBoxes("im0.png", IMG_HW, np.array([[12, 12, 28, 28], [0, 0, 3, 3]], float),
                       np.array([1, 0]), np.array([0.5, 0.9])),
            ImageBoxes("other.png", IMG_HW, np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))]
    assert coco_map(gt, dets)["map"] == pytest.approx(1.0)
    no_crowd = [ImageBoxes(g.key, g.hw, g.boxes, g.classes) for g in gt]
    assert coco_map(no_crowd, dets)["map"] == pytest.approx(0.5)
    with pytest.raises(UsageError, match="none of the 1 images is listed"):
        load_ground_truth(tmp_path / "gt.json", [("x.png", IMG_HW)], 2)


def _coco(tmp_path: Path, categories, annotations) -> Path:
    j = {"images": [{"id": 1, "file_name": "im0.png", "height": 40, "width": 80}],
         "categories": [{"id": c, "name": n} for c, n in categories],
         "annotations": [{"id": i, "image_id": 1, "category_id": c, "bbox": [1, 2, 3, 4], "iscrowd": 0}
                         for i, c in enumerate(annotations)]}
    (tmp_path / "gt.json").write_text(json.dumps(j))
    return tmp_path / "gt.json"


def test_a_coco_json_listing_only_the_categories_it_uses_keeps_their_classes(tmp_path: Path, caplog):
    """Categories listed only as far as they occur were renumbered by rank: 0-based ids (0, 16, 17)
    became classes 0, 1, 2 (coco128 subset: mAP 0.574 -> 0.064, with only a warning)."""
    im = [("im0.png", IMG_HW)]
    (gt,) = load_ground_truth(_coco(tmp_path, [(0, "a"), (16, "b"), (17, "c")], [17, 0, 16]), im, 80)
    assert gt.classes.tolist() == [17, 0, 16]
    # COCO's own ids (1-based, with gaps) of a subset: by COCO's names for a COCO-trained model
    (gt,) = load_ground_truth(_coco(tmp_path, [(1, "person"), (18, "dog"), (90, "toothbrush")],
                                    [90, 1, 18]), im, 80)
    assert gt.classes.tolist() == [79, 0, 16]
    # every category, 1-based: by rank, as before
    (gt,) = load_ground_truth(_coco(tmp_path, [(i + 1, f"k{i}") for i in range(3)], [3, 1]), im, 3)
    assert gt.classes.tolist() == [2, 0]
    with pytest.raises(UsageError, match=r"gt.json: 2 categories \(ids 3, 9\) for a model of 80 classes: "
                                         r"which class each is cannot be told"):
        load_ground_truth(_coco(tmp_path, [(3, "x"), (9, "y")], [3]), im, 80)
    # annotations of unlisted categories are counted; none usable is refused, not scored 0.0
    with caplog.at_level("WARNING"):
        (gt,) = load_ground_truth(_coco(tmp_path, [(0, "a")], [0, 5, 5]), im, 80)
    assert len(gt) == 1 and "2 of 3 annotations have a category_id not in 'categories'" in caplog.text
    with pytest.raises(UsageError, match=r"no annotations for the 1 images \(of 2 in the JSON, 2 with an "):
        load_ground_truth(_coco(tmp_path, [(0, "a")], [5, 5]), im, 80)
    with pytest.raises(UsageError, match=r"no annotations for the 1 images \(of 0 in the JSON"):
        load_ground_truth(_coco(tmp_path, [(0, "a")], []), im, 80)


def _gt(n: int = 2) -> List[ImageBoxes]:
    boxes = np.array([[12, 12, 28, 28], [48, 4, 72, 20]], np.float64)
    return [ImageBoxes(f"im{i}.png", IMG_HW, boxes, np.array([1, 0])) for i in range(n)]


def _as_dets(gt: List[ImageBoxes], shift: float = 0.0, classes=None) -> List[ImageBoxes]:
    return [ImageBoxes(g.key, g.hw, g.boxes + [shift, 0, shift, 0],
                       g.classes if classes is None else np.asarray(classes), np.array([0.9, 0.8]))
            for g in gt]


def test_coco_map_is_one_for_exact_detections_and_lower_when_perturbed():
    gt = _gt()
    exact = coco_map(gt, _as_dets(gt))
    assert exact["map"] == pytest.approx(1.0) and exact["map50"] == pytest.approx(1.0)
    assert exact["n_images"] == 2 and exact["n_detections"] == 4 and exact["n_ground_truth"] == 4
    shifted = coco_map(gt, _as_dets(gt, shift=4.0))  # IoU 0.6 and 0.71: only some thresholds pass
    assert 0.1 < shifted["map"] < 0.6 and shifted["map50"] == pytest.approx(1.0)
    swapped = coco_map(gt, _as_dets(gt, classes=[0, 1]))
    assert swapped["map"] == pytest.approx(0.0)
    empty = [ImageBoxes(g.key, g.hw, np.zeros((0, 4)), np.zeros(0, int), np.zeros(0)) for g in gt]
    assert coco_map(gt, empty)["map"] == 0.0
    with pytest.raises(UsageError, match="different images"):
        coco_map(gt, _as_dets(_gt(1)))


def test_agreement():
    ref = _as_dets(_gt())
    assert agreement(ref, ref)["map"] == pytest.approx(1.0)
    low = [ImageBoxes(d.key, d.hw, d.boxes, d.classes, np.array([0.9, 0.1])) for d in ref]
    res = agreement(ref, low)  # the reference's 0.1 box is not ground truth: the candidate's is a FP
    assert res["n_ground_truth"] == 2 and res["map"] == pytest.approx(1.0)
    assert agreement(_as_dets(_gt(), shift=4.0), ref)["map"] < 0.6
    none = [ImageBoxes(d.key, d.hw, d.boxes, d.classes, np.array([0.2, 0.1])) for d in ref]
    with pytest.raises(PreconditionError, match="no detection scoring >= 0.25"):
        agreement(ref, none)


def test_agreement_scores_a_copy_of_a_crowded_reference_as_one():
    """pycocotools scores the best 100 detections of a class in an image: a copy reproducing a
    reference with 150 confident detections of one class per image (a shelf, a crowd; max_det 300)
    agreed 0.67 with it, not 1.0 (a random-weight YOLO12n with 120: 0.81). The true mAP keeps
    COCO's 100."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 600, (150, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 30, (150, 2))], axis=1)
    classes = np.zeros(150, int)
    ref = [ImageBoxes(f"im{i}.png", (640, 640), boxes, classes, np.linspace(0.9, 0.3, 150)) for i in range(2)]
    res = agreement(ref, ref)
    assert res["n_ground_truth"] == 300
    assert res["map"] == pytest.approx(1.0) and res["map50"] == pytest.approx(1.0)
    truth = [ImageBoxes(d.key, d.hw, d.boxes, d.classes) for d in ref]
    true = coco_map(truth, ref)
    assert true["map"] == pytest.approx(true["map50"]) and true["map"] < 0.8


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("fmt", ["v5", "v8", "yolox"])
def test_evaluate_constant_model_recovers_labels(dataset, fmt):
    images, labels = dataset
    pad_top = 0 if fmt == "yolox" else 16  # the yolox preset pads bottom/right only
    model = const_model(fmt, letterboxed(LABELS, pad_top), CLASSES)
    res = evaluate(model, images, labels, progress=False, threads=1)  # format and preset detected
    assert res["map"] == pytest.approx(1.0, abs=1e-6) and res["n_images"] == 3
    assert res["n_ground_truth"] == 6 and res["n_detections"] == 6
    shifted = const_model(fmt, letterboxed(LABELS, pad_top, shift=0.15), CLASSES)
    res2 = evaluate(shifted, images, labels, progress=False, threads=1, fmt=fmt,
                    preset="yolox" if fmt == "yolox" else "yolov5")
    assert 0.0 < res2["map"] < 0.9


@pytest.mark.parametrize("tail", ["split", "split_channels_first", "split_paddle", "nms", "nms_batch_rows",
                                  "nms_labels", "nms_end2end", "nms_paddle", "nms_flat", "nms_class_first",
                                  "nms_batch_rows_batched"])
def test_split_and_post_nms_outputs_give_the_same_detections(dataset, tail):
    """Boxes + scores as two outputs, and NMS inside the graph: the v5 head's boxes, recovered.
    PaddleDetection's im_shape (listed before the image) and scale_factor inputs are fed the
    image's size and 1."""
    images, labels = dataset
    base = const_model("v5", letterboxed(LABELS, 16), CLASSES)
    model = {"split": lambda m: split_boxes_scores(m),
             "split_channels_first": lambda m: split_boxes_scores(m, True),
             "split_paddle": lambda m: split_boxes_scores(m, True, ("im_shape", "scale_factor")),
             "nms": lambda m: append_nms(m, max_det=20),
             "nms_batch_rows": lambda m: append_nms(m, max_det=20, batch_rows=True),
             "nms_labels": lambda m: append_nms(m, max_det=20, layout="labels"),
             "nms_end2end": lambda m: append_nms(m, max_det=20, layout="end2end"),
             "nms_paddle": lambda m: append_nms(m, max_det=20, layout="paddle"),
             # hand-written: (K, 6) with no batch axis (read as v5 rows, mAP 0), the class before
             # the score, (1, K, 7)
             "nms_flat": lambda m: append_nms(m, max_det=20, layout="flat"),
             "nms_class_first": lambda m: append_nms(m, max_det=20, layout="class_first"),
             "nms_batch_rows_batched": lambda m: append_nms(m, max_det=20, batch_rows=True,
                                                            layout="batched")}[tail](base)
    # the letterbox these boxes are placed for (a Paddle export is stretched by default, below)
    ref, got = (detections(m, images, preset="yolov5", progress=False, threads=1) for m in (base, model))
    for a, b in zip(ref, got):
        ia, ib = np.argsort(a.classes), np.argsort(b.classes)  # equal scores: any order
        assert len(a) == len(b) == 2 and np.allclose(b.boxes[ib], a.boxes[ia], atol=1e-4)
        assert np.allclose(b.scores[ib], a.scores[ia]) and b.classes[ib].tolist() == a.classes[ia].tolist()
    assert evaluate(model, images, labels, preset="yolov5", progress=False,
                    threads=1)["map"] == pytest.approx(1.0)


def test_a_paddle_export_is_fed_stretched_images(dataset):
    """PaddleDetection resizes without keeping the aspect ratio: boxes placed for the 40x80 images
    stretched to 64x64 (x 0.8, y 1.6) map back onto the labels; letterboxed, they do not."""
    images, labels = dataset
    H, W = IMG_HW
    stretched = np.array([[cx * W * 0.8, cy * H * 1.6, w * W * 0.8, h * H * 1.6]
                          for _, cx, cy, w, h in LABELS], np.float32)
    model = split_boxes_scores(const_model("v5", stretched, CLASSES), True, ("im_shape", "scale_factor"))
    assert data.preset_choice(model) == ("paddle", "PaddleDetection's scale_factor input")
    assert "stretched to the input" in data.describe_preset(data.PRESETS["paddle"])
    assert evaluate(model, images, labels, progress=False, threads=1)["map"] == pytest.approx(1.0)
    assert evaluate(model, images, labels, preset="yolov5", progress=False, threads=1)["map"] < 0.5
    out, ratio, pad = data.letterbox(np.zeros((40, 80, 3), np.uint8), (64, 64), stretch=True)
    assert out.shape == (64, 64, 3) and ratio == (0.8, 1.6) and pad == (0, 0)
    # a YOLOv5 export given a scale_factor input by hand is still YOLOv5's (was stretched: 0.3223
    # for 0.3571 on yolov5n)
    v5 = split_boxes_scores(const_model("v5", letterboxed(LABELS, 16), CLASSES), True, ("scale_factor",))
    onnx.helper.set_model_props(v5, {"stride": "[8, 16, 32]", "names": "{0: 'a', 1: 'b'}"})
    assert data.preset_choice(v5) == ("yolov5", "the exporter named in the model's metadata")
    assert evaluate(v5, images, labels, progress=False, threads=1)["map"] == pytest.approx(1.0)


def test_detections_are_in_original_pixels_and_score_uses_labels(dataset):
    images, labels = dataset
    dets = detections(const_model("v5", letterboxed(LABELS, 16), CLASSES), images, progress=False, threads=1)
    assert [d.key for d in dets] == ["im0.png", "im1.png", "im2.png"]
    assert dets[0].boxes[dets[0].classes == 1][0].tolist() == pytest.approx([12, 12, 28, 28], abs=1e-4)
    assert dets[0].scores.tolist() == pytest.approx([0.9, 0.9])
    assert score(dets, labels)["map"] == pytest.approx(1.0)
    assert agreement(dets, dets)["map"] == pytest.approx(1.0)


@pytest.mark.parametrize("fmt", ["v5", "v8", "nms"])
def test_images_labelled_with_classes_the_model_cannot_predict_are_left_out(dataset, fmt, caplog):
    """A 2-class model, one image labelled with class 5 too: as ultralytics' val drops such an image
    as corrupt, the other two score 1.0, with a warning naming the image; every image so: an error.
    A post-NMS output does not say how many classes it scores: its metadata's names do."""
    images, labels = dataset
    model = const_model("v8" if fmt == "v8" else "v5", letterboxed(LABELS, 16), CLASSES)
    if fmt == "nms":
        model = append_nms(model, max_det=20)
        onnx.helper.set_model_props(model, {"names": "{0: 'a', 1: 'b'}"})
    with (labels / "im1.txt").open("a") as f:
        f.write("5 0.5 0.5 0.1 0.1\n")
    caplog.set_level("WARNING")
    res = evaluate(model, images, labels, preset="yolov5", progress=False, threads=1)
    assert res["map"] == pytest.approx(1.0) and res["n_images"] == 2 and res["n_ground_truth"] == 4
    warned = [r.getMessage() for r in caplog.records if "cannot predict" in r.getMessage()]
    assert len(warned) == 1 and "1 of 3 images" in warned[0]
    assert "scores 2 classes; im1.png has class 5" in warned[0]
    for i in (0, 2):
        (labels / f"im{i}.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(UsageError, match="every image with objects has label classes the model cannot"):
        evaluate(model, images, labels, preset="yolov5", progress=False, threads=1)
    (labels / "im0.txt").write_text("")   # an image with no object left: still nothing to score
    with pytest.raises(UsageError, match="every image with objects has label classes the model cannot"):
        evaluate(model, images, labels, preset="yolov5", progress=False, threads=1)


def test_a_static_batch_model_is_evaluated_image_by_image(dataset):
    """Batch 2 over 3 images: two runs, the filler's boxes dropped, each image's boxes as with batch 1."""
    images, labels = dataset
    one = const_model("v5", letterboxed(LABELS, 16), CLASSES)
    two = onnx.ModelProto()
    two.CopyFrom(one)
    rows = two.graph.output[0].type.tensor_type.shape.dim
    two.graph.node[0].output[0] = "rows"
    two.graph.initializer.append(numpy_helper.from_array(np.array([2, rows[1].dim_value, rows[2].dim_value]),
                                                         "shape"))
    two.graph.node.append(helper.make_node("Expand", ["rows", "shape"], ["output"]))
    two.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    rows[0].dim_value = 2
    a, b = detections(one, images, progress=False), detections(two, images, progress=False)
    assert [d.key for d in b] == [d.key for d in a] == ["im0.png", "im1.png", "im2.png"]
    for x, y in zip(a, b):
        assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.scores, y.scores)
    assert score(b, labels)["map"] == pytest.approx(1.0)


def test_evaluate_errors(dataset, tmp_path: Path):
    images, labels = dataset
    model = const_model("v5", letterboxed(LABELS, 16), CLASSES)
    with pytest.raises(UsageError, match="labels not found"):
        evaluate(model, images, tmp_path / "nolabels", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no labels found for the 3 images"):
        evaluate(model, images, tmp_path / "empty", progress=False)
    with pytest.raises(UsageError, match="unknown output format 'v9'"):
        evaluate(model, images, labels, fmt="v9", progress=False)
    # a label file given for the folder said "label folder does not exist"
    with pytest.raises(UsageError, match=r"im0\.txt: a file; expected a folder of YOLO labels"):
        evaluate(model, images, labels / "im0.txt", progress=False)


def test_labels_missing_for_most_images_are_warned_about(dataset, caplog):
    """Images without a label file show no object (ultralytics' backgrounds); when most have none,
    the labels are likely not the images' (labels for 2 of 8 images scored silently)."""
    images, labels = dataset
    model = const_model("v5", letterboxed(LABELS, 16), CLASSES)
    caplog.set_level("WARNING")
    evaluate(model, images, labels, progress=False)
    (labels / "im1.txt").unlink()
    evaluate(model, images, labels, progress=False)   # 1 of 3: a background image, no warning
    assert not [r for r in caplog.records if "no label file" in r.getMessage()]
    (labels / "im2.txt").unlink()
    res = evaluate(model, images, labels, progress=False)
    warned = [r.getMessage() for r in caplog.records if "no label file" in r.getMessage()]
    assert len(warned) == 1 and "2 of 3 images have no label file (im1.png first)" in warned[0]
    assert res["n_ground_truth"] == 2 and res["map"] < 1.0


def test_eval_cli(dataset, tmp_path: Path):
    from onnxslim_yolo.cli import main
    from onnxslim_yolo.ir import save
    images, labels = dataset
    save(const_model("v5", letterboxed(LABELS, 16), CLASSES), tmp_path / "m.onnx")
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "m.onnx"), "--images", str(images), "--labels",
                                  str(labels), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "mAP@0.5:0.95       | 1.0000" in r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["n_images"] == 3
    assert r.output.splitlines()[0] == f"images fed as {doc['images_fed']['preprocessing']} (chosen by " \
                                       f"{doc['images_fed']['chosen_by']}; --preprocess to change)"
    assert doc["images_fed"]["preprocessing"].startswith("yolov5: RGB")
    # boxes that do not follow the image do not follow its mirror image either: the guess cannot be told
    assert doc["preprocessing_probe"]["verdict"] == "unknown" and "warning" not in r.output
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "m.onnx"), "--images", str(tmp_path / "none"),
                                  "--labels", str(labels)])
    assert r.exit_code == 2 and "none: image folder does not exist" in r.output


def test_eval_cli_shows_progress_in_a_log(dataset, tmp_path: Path, monkeypatch):
    """Off a terminal (CI) the evaluation prints plain progress lines now and then; --quiet none."""
    from onnxslim_yolo import progress
    from onnxslim_yolo.cli import main
    from onnxslim_yolo.ir import save
    images, labels = dataset
    save(const_model("v5", letterboxed(LABELS, 16), CLASSES), tmp_path / "m.onnx")
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    args = ["eval", str(tmp_path / "m.onnx"), "--images", str(images), "--labels", str(labels)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    shown = [line for line in r.output.splitlines() if line.startswith("evaluate:")]
    assert shown and "3/3" in shown[-1] and "\r" not in r.output, r.output
    r = CliRunner().invoke(main, args + ["--quiet"])
    assert r.exit_code == 0 and "evaluate:" not in r.output, r.output


def test_eval_cli_runs_the_model_in_openvino(dataset, tmp_path: Path, monkeypatch):
    from onnxslim_yolo import openvino_rt
    from onnxslim_yolo.cli import main
    from onnxslim_yolo.ir import save
    images, labels = dataset
    save(const_model("v5", letterboxed(LABELS, 16), CLASSES), tmp_path / "m.onnx")
    args = ["eval", str(tmp_path / "m.onnx"), "--images", str(images), "--labels", str(labels), "--quiet",
            "--runtime", "openvino", "--json", str(tmp_path / "r.json")]
    if openvino_rt.available():
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        assert "mAP@0.5:0.95       | 1.0000" in r.output and "(the model ran in openvino)" in r.output
        assert json.loads((tmp_path / "r.json").read_text())["runtime"] == "openvino"
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "openvino" else object())
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "OpenVINO is not installed: pip install" in r.output


# ------------------------------------------------------------------------------- real model
def test_yolov5n_coco128_matches_reference(yolov5n_path: Path, coco128: Path):
    """Reference: pycocotools 0.357 mAP@0.5:0.95, 0.552 mAP@0.5 (shared/README.md)."""
    dets = detections(yolov5n_path, coco128 / "images", progress=False, threads=1)
    res = score(dets, coco128 / "labels")
    assert res["n_images"] == 128
    assert 0.352 <= res["map"] <= 0.362
    assert 0.547 <= res["map50"] <= 0.557
    assert agreement(dets[:8], dets[:8])["map"] == pytest.approx(1.0)
    assert data.detect_preset(onnx.load(str(yolov5n_path), load_external_data=False)) == "yolov5"


def test_yolov5n_with_nms_inside_or_split_outputs_scores_the_same(yolov5n_path: Path, coco128: Path):
    """The real head behind an ONNX NonMaxSuppression tail, and as boxes + scores outputs."""
    model = onnx.load(str(yolov5n_path))
    ref = score(detections(model, coco128 / "images", progress=False, limit=32), coco128 / "labels")
    for tail in (append_nms(model), split_boxes_scores(model, channels_first=True),
                 append_nms(model, layout="labels"), append_nms(model, layout="end2end")):
        res = score(detections(tail, coco128 / "images", progress=False, limit=32), coco128 / "labels")
        assert res["map"] == pytest.approx(ref["map"], abs=1e-4)
        assert res["n_detections"] == ref["n_detections"]


def test_decode_gfl_reads_nanodet_plus_rows():
    """NanoDet-Plus's one output (1, N, C + 4x8) at 64x96: N = 96 + 24 + 6 + 2 grid points at strides
    8-64; boxes are the cell's corner minus / plus the expected bin (softmax over 8) times the
    stride. The format is told by that row count alone, and the preset is NanoDet's."""
    rng = np.random.default_rng(3)
    hw, nc = (64, 96), 3
    levels = [(8, 12, 8), (4, 6, 16), (2, 3, 32), (1, 2, 64)]
    p = np.concatenate([rng.random((sum(h * w for h, w, _ in levels), nc)),
                        rng.normal(0, 2, (sum(h * w for h, w, _ in levels), 32))], 1).astype(np.float32)
    boxes, scores = decode(p[None], "gfl", hw)
    want, row = [], 0
    for h, w, s in levels:
        for y in range(h):
            for x in range(w):
                e = np.exp(p[row, nc:].reshape(4, 8).astype(np.float64))
                d = (e / e.sum(1, keepdims=True) * np.arange(8)).sum(1) * s
                want.append([x * s - d[0], y * s - d[1], x * s + d[2], y * s + d[3]])
                row += 1
    np.testing.assert_allclose(boxes, np.array(want), rtol=1e-5, atol=1e-3)
    assert np.array_equal(scores, p[:, :nc])
    model = _declared((1, 3, *hw), (1, p.shape[0], p.shape[1]))
    assert detect_format(model) == "gfl" and data.detect_preset(model) == "nanodet"
    assert detect_format(_declared((1, 3, *hw), (1, 126, p.shape[1]))) == "yolox"  # strides 8-32 only
    with pytest.raises(NotDetections, match="does not fit a 64x64 input"):
        decode(p[None], "gfl", (64, 64))


def _declared(in_shape, out_shape) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Identity", ["images"], ["output"])], "g",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))])
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])


def _four_level_rows(decode_mul: bool) -> onnx.ModelProto:
    """x (1, 3, 64, 96) -> four Convs at strides 8, 16, 32, 64 (85 channels, the last padded to 2
    columns) -> flattened, joined and transposed to (1, 128, 85): one row per grid point at strides
    8-64, as NanoDet-Plus's rows, or, with ``decode_mul``, a decoded P6 head (YOLOv6n6) whose
    rows are multiplied by a stride-like constant."""
    rng = np.random.default_rng(0)
    nodes, inits, flat = [], [], []
    for i, s in enumerate((8, 16, 32, 64)):
        inits.append(numpy_helper.from_array(rng.normal(size=(85, 3, s, s)).astype(np.float32), f"w{i}"))
        pads = [0, 0, 0, 32] if s == 64 else [0, 0, 0, 0]
        nodes.append(helper.make_node("Conv", ["images", f"w{i}"], [f"c{i}"], strides=[s, s], pads=pads))
        inits.append(numpy_helper.from_array(np.array([1, 85, -1], np.int64), f"s{i}"))
        nodes.append(helper.make_node("Reshape", [f"c{i}", f"s{i}"], [f"f{i}"]))
        flat.append(f"f{i}")
    nodes += [helper.make_node("Concat", flat, ["cat"], axis=2),
              helper.make_node("Transpose", ["cat"], ["rows" if decode_mul else "output"], perm=[0, 2, 1])]
    if decode_mul:
        inits.append(numpy_helper.from_array(np.full((1, 1, 85), 8.0, np.float32), "k"))
        nodes.append(helper.make_node("Mul", ["rows", "k"], ["output"]))
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 96])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 128, 85])], inits)
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])


def test_rows_of_a_decoded_head_over_strides_8_to_64_are_not_gfl():
    """Both models have one row per grid point at strides 8-64: only the one with no decode
    arithmetic after its Convs is NanoDet-Plus's layout."""
    from onnxslim_yolo.analysis.head import find_head
    plain, decoded = _four_level_rows(False), _four_level_rows(True)
    assert detect_format(plain) == "gfl" and find_head(plain).family == "gfl"
    assert detect_format(decoded) == "v5" and find_head(decoded).family != "gfl"


def test_paddle_nms_rows_are_split_per_image_by_their_counts():
    """PaddleDetection's MultiClassNMS writes every image's ``class score x1 y1 x2 y2`` rows in turn
    and a count per image; a class -1 row (no detection) scores 0."""
    from onnxslim_yolo.eval.decode import nms_layout, nms_rows

    rows = np.array([[3, 0.9, 1, 2, 3, 4], [0, 0.5, 5, 6, 7, 8], [-1, 0.0, 0, 0, 0, 0]], np.float32)
    counts = np.array([2, 1], np.int32)
    assert nms_layout([rows.shape, counts.shape]) == "paddle"
    assert nms_layout([(3, 6), (1, 1)]) is None
    got = nms_rows([rows, counts], "paddle")
    assert got.shape == (2, 2, 6)
    assert got[0].tolist() == [[1, 2, 3, 4, pytest.approx(0.9), 3], [5, 6, 7, 8, 0.5, 0]]
    assert got[1, :, 4].tolist() == [0, 0]
