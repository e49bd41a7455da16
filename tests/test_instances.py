"""Masks, keypoints and rotated boxes: labels that give them, their pycocotools mAP, and
segmentation, pose and obb exports scored and checked on them end to end (through the constant
models of test_evaluate)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxslim_yolo.check.accuracy import Detections, check_map_drop
from onnxslim_yolo.eval import instances
from onnxslim_yolo.eval.instances import _samples, image_keypoints, image_rotated
from onnxslim_yolo.eval.metrics import (ImageBoxes, coco_map, labels_have_shapes, load_ground_truth,
                                        read_labels)
from onnxslim_yolo.evaluate import detections, evaluate
from onnxslim_yolo.pass_base import UsageError
from tests.test_evaluate import CLASSES, IMG_HW, LABELS, _with_masks, const_model, letterboxed

H, W = IMG_HW
K = 17
# a 40x80 image letterboxed to 64x64: ratio 0.8, pad (left 0, top 16); prototypes at 16x16
RATIO, PAD_TOP, PROTO = 0.8, 16, 4


def _corners(cx: float, cy: float, w: float, h: float) -> str:
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    return f"{x1} {y1} {x2} {y1} {x2} {y2} {x1} {y2}"


def _images(tmp_path: Path, lines) -> tuple:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images / f"im{i}.png")
        (labels / f"im{i}.txt").write_text("\n".join(lines) + "\n")
    return images, labels


# ------------------------------------------------------------------------------------ labels
def test_label_lines_keep_polygons_and_keypoints(tmp_path: Path):
    f = tmp_path / "a.txt"
    kp3 = " ".join(f"{0.1 + 0.01 * k} 0.5 {k % 3}" for k in range(K))
    kp2 = " ".join(f"{0.1 + 0.01 * k} 0.5" for k in range(K - 1)) + " 0 0"
    f.write_text(f"1 0.25 0.5 0.2 0.4 {kp3}\n")
    g = read_labels(f, IMG_HW)   # 4 + 51 values (odd): a pose line even when no model asks for one
    assert g.boxes.tolist() == [pytest.approx([12, 12, 28, 28])] and g.keypoints is None
    g = read_labels(f, IMG_HW, keypoints=K)
    assert g.keypoints.shape == (1, K, 3)
    assert g.keypoints[0, 3].tolist() == pytest.approx([0.13 * W, 0.5 * H, 0])
    f.write_text(f"0 0.25 0.5 0.2 0.4 {kp2}\n")   # x y only: 4 + 34 values
    g = read_labels(f, IMG_HW, keypoints=K)
    assert g.boxes.tolist() == [pytest.approx([12, 12, 28, 28])]
    assert g.keypoints[0, :, 2].tolist() == [2.0] * (K - 1) + [0.0]   # (0, 0) is a missing keypoint
    # the same 38 values for a model without keypoints are a 19-point polygon (its bounding box)
    assert read_labels(f, IMG_HW).segments is not None
    with pytest.raises(UsageError, match=r"a.txt:1: 17 keypoints but the model predicts 5"):
        f.write_text(f"0 0.25 0.5 0.2 0.4 {kp3}\n")
        read_labels(f, IMG_HW, keypoints=5)
    f.write_text(f"3 {_corners(0.2, 0.3, 0.2, 0.4)}\n1 0.5 0.5 0.2 0.2\n")
    g = read_labels(f, IMG_HW)
    assert g.boxes[0].tolist() == pytest.approx([8, 4, 24, 20])
    assert g.segments[0] == [pytest.approx([8, 4, 24, 4, 24, 20, 8, 20])] and g.segments[1] is None


def test_coco_json_segmentation_and_keypoints(tmp_path: Path):
    import json

    kp = np.zeros((K, 3))
    kp[:, 0], kp[:, 1], kp[:, 2] = np.linspace(12, 28, K), 20, 2
    j = {"images": [{"id": 1, "file_name": "im0.png", "height": H, "width": W}],
         "categories": [{"id": 0, "name": "a"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 0, "bbox": [12, 12, 16, 16], "iscrowd": 0,
                          "segmentation": [[12, 12, 28, 12, 28, 28, 12, 28]],
                          "keypoints": kp.ravel().tolist()}]}
    (tmp_path / "gt.json").write_text(json.dumps(j))
    gt = load_ground_truth(tmp_path / "gt.json", [("im0.png", IMG_HW)], 1, keypoints=K)
    assert gt[0].segments == [[[12, 12, 28, 12, 28, 28, 12, 28]]]
    assert np.array_equal(gt[0].keypoints[0], kp)


# ------------------------------------------------------------------------------- scoring
def _rle(polygon, hw=IMG_HW):
    from pycocotools import mask as mask_utils

    return mask_utils.merge(mask_utils.frPyObjects([polygon], *hw))


def test_mask_map_is_one_for_the_labels_own_masks_and_falls_with_overlap():
    boxes = np.array([[12, 12, 28, 28], [48, 4, 72, 20]], np.float64)
    polys = [[float(v) for v in (x1, y1, x2, y1, x2, y2, x1, y2)] for x1, y1, x2, y2 in boxes]
    gt = [ImageBoxes("im0.png", IMG_HW, boxes, np.array([1, 0]), segments=[[p] for p in polys])]

    def dets(masks):
        return [ImageBoxes("im0.png", IMG_HW, boxes, np.array([1, 0]), np.array([0.9, 0.8]), segments=masks)]

    assert coco_map(gt, dets([_rle(p) for p in polys]), "segm")["map"] == pytest.approx(1.0)
    # each mask cut to its left 60%: IoU about 0.6, so only the lowest IoU thresholds match
    cut = [_rle([b[0], b[1], b[0] + 0.6 * (b[2] - b[0]), b[1], b[0] + 0.6 * (b[2] - b[0]), b[3], b[0], b[3]])
           for b in boxes]
    res = coco_map(gt, dets(cut), "segm")
    assert res["map50"] == pytest.approx(1.0) and 0.05 < res["map"] < 0.4
    # the boxes themselves are exact: bbox mAP 1 whatever the masks
    assert coco_map(gt, dets(cut))["map"] == pytest.approx(1.0)


def test_empty_masks_agree_with_empty_masks_by_their_boxes():
    """A model's confident detection may have an empty mask; as agreement's ground truth it must
    still be matched by the same empty mask (a mask IoU of two empty masks is 0), at its box."""
    from pycocotools import mask as mask_utils
    from onnxslim_yolo.evaluate import agreement

    boxes = np.array([[12, 12, 28, 28], [48, 4, 72, 20]], np.float64)
    empty = mask_utils.encode(np.zeros((H, W, 1), np.uint8, order="F"))[0]
    full = _rle([12, 12, 28, 12, 28, 28, 12, 28])

    def dets(b, masks):
        return [ImageBoxes("im0.png", IMG_HW, b, np.array([1, 1]), np.array([0.9, 0.8]), segments=masks)]

    ref = dets(boxes, [full, empty])
    assert agreement(ref, ref, kind="segm")["map"] == pytest.approx(1.0)
    # the empty mask's box elsewhere: no match (without the boxes any empty mask would do)
    moved = dets(boxes + [[0, 0, 0, 0], [-40, 10, -40, 10]], [full, empty])
    assert agreement(moved, ref, kind="segm")["map"] == pytest.approx(0.5, abs=0.01)
    # an empty mask against a real one still has IoU 0: the first detection is a false positive
    # ahead of the second's match (recall 0.5 at precision 0.5)
    assert agreement(dets(boxes, [empty, empty]), ref, kind="segm")["map"] == pytest.approx(0.25, abs=0.01)


def test_keypoint_map_is_oks():
    boxes = np.array([[10, 5, 50, 35]], np.float64)
    kp = np.zeros((1, K, 3))
    kp[0, :, 0], kp[0, :, 1], kp[0, :, 2] = np.linspace(12, 48, K), 20, 2
    gt = [ImageBoxes("im0.png", IMG_HW, boxes, np.array([0]), keypoints=kp)]

    def at(shift):
        d = kp.copy()
        d[..., 0] += shift
        return [ImageBoxes("im0.png", IMG_HW, boxes, np.array([0]), np.array([0.9]), keypoints=d)]

    assert coco_map(gt, at(0.0), "keypoints")["map"] == pytest.approx(1.0)
    # OKS of a shift s: mean over keypoints of exp(-s^2 / (2 * area * (2 sigma)^2)), area 0.53 * 40 * 30
    area = 0.53 * 40 * 30
    from onnxslim_yolo.eval.metrics import COCO_KPT_SIGMAS
    oks = lambda s: float(np.mean(np.exp(-s ** 2 / (2 * area * (2 * COCO_KPT_SIGMAS) ** 2))))  # noqa: E731
    s = 2.0
    res = coco_map(gt, at(s), "keypoints")
    thresholds = np.linspace(0.5, 0.95, 10)
    assert res["map"] == pytest.approx(float(np.mean(thresholds < oks(s))), abs=1e-6)
    assert coco_map(gt, at(30.0), "keypoints")["map"] == 0.0


def test_keypoint_agreement_scores_a_copy_of_a_crowd_as_one():
    """pycocotools scores the best 20 people of an image for keypoints: a copy reproducing a
    reference with 30 confident people agreed 0.66 with it, not 1.0. The true keypoint mAP keeps 20."""
    from onnxslim_yolo.evaluate import agreement

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (30, 2))
    boxes = np.concatenate([xy, xy + 30], axis=1)
    kp = np.concatenate([xy[:, None] + rng.uniform(0, 30, (30, K, 2)), np.full((30, K, 1), 2.0)], axis=2)
    ref = [ImageBoxes("im0.png", (160, 160), boxes, np.zeros(30, int), np.linspace(0.9, 0.3, 30),
                      keypoints=kp)]
    assert agreement(ref, ref, kind="keypoints")["map"] == pytest.approx(1.0)
    truth = [ImageBoxes("im0.png", (160, 160), boxes, np.zeros(30, int), keypoints=kp)]
    assert coco_map(truth, ref, "keypoints")["map"] < 0.8


# ------------------------------------------------------------------------------ end to end
def _seg_model(region: Optional[tuple], value: float = 10.0) -> onnx.ModelProto:
    """The v8 constant model as a segment export whose every candidate's mask is the prototype
    sum: ``value`` inside ``region`` (x1, y1, x2, y2 in 64x64 input pixels), -value elsewhere
    (everywhere with None)."""
    m = _with_masks(const_model("v8", letterboxed(LABELS, PAD_TOP), CLASSES), nm=2)
    protos = np.full((1, 2, 16, 16), -value if region is not None else value, np.float32)
    if region is not None:
        x1, y1, x2, y2 = (int(v) // PROTO for v in region)
        protos[:, :, y1:y2, x1:x2] = value
    for n in m.graph.node:
        if n.output[0] == "protos":
            n.attribute[0].t.CopyFrom(numpy_helper.from_array(protos, "p"))
    return m


def test_segment_export_masks_are_scored_where_the_letterbox_put_them(tmp_path: Path):
    lines = [f"{c} {_corners(cx, cy, w, h)}" for c, cx, cy, w, h in LABELS]
    images, labels = _images(tmp_path, lines)
    # masks over the whole input: each detection's mask is its box
    full = evaluate(_seg_model(None), images, labels, progress=False, threads=1)
    assert full["map"] == pytest.approx(1.0) and full["mask_map50"] == pytest.approx(1.0)
    assert full["mask_map"] > 0.8
    # masks only where the first label (class 1) lies in the letterboxed input: class 0 scores 0
    cx, cy, w, h = LABELS[0][1:]
    x1, y1 = (cx - w / 2) * W * RATIO, (cy - h / 2) * H * RATIO + PAD_TOP
    x2, y2 = (cx + w / 2) * W * RATIO, (cy + h / 2) * H * RATIO + PAD_TOP
    one = evaluate(_seg_model((x1, y1, x2, y2)), images, labels, progress=False, threads=1)
    assert one["mask_map50"] == pytest.approx(0.5) and one["map"] == pytest.approx(1.0)
    # the same region without the letterbox's top pad misses it (masks mapped back through the pad)
    off = evaluate(_seg_model((x1, y1 - PAD_TOP, x2, y2 - PAD_TOP)), images, labels, progress=False,
                   threads=1)
    assert off["mask_map50"] == pytest.approx(0.0)
    dets = detections(_seg_model(None), images, progress=False, threads=1, instances=True)
    assert len(dets[0].segments) == len(dets[0]) == 2
    assert detections(_seg_model(None), images, progress=False, threads=1)[0].segments is None
    # box labels only: no mask mAP
    box_images, box_labels = _images(tmp_path / "boxes", [" ".join(map(str, lab)) for lab in LABELS])
    assert "mask_map" not in evaluate(_seg_model(None), box_images, box_labels, progress=False, threads=1)


def test_masks_are_computed_only_when_the_labels_give_shapes(tmp_path: Path, monkeypatch):
    box_images, box_labels = _images(tmp_path / "boxes", [" ".join(map(str, lab)) for lab in LABELS])
    poly_images, poly_labels = _images(tmp_path / "polys",
                                       [f"{c} {_corners(cx, cy, w, h)}" for c, cx, cy, w, h in LABELS])
    assert not labels_have_shapes(box_labels) and labels_have_shapes(poly_labels)
    assert labels_have_shapes(poly_labels, ["im0"]) and not labels_have_shapes(poly_labels, ["other"])
    js = tmp_path / "a.json"
    js.write_text('{"images": [], "annotations": [{"bbox": [0, 0, 1, 1]}], "categories": []}')
    assert not labels_have_shapes(js)
    js.write_text('{"images": [], "annotations": [{"segmentation": [[0, 0, 1, 0, 1, 1]]}]}')
    assert labels_have_shapes(js)
    calls = []
    real = instances.mask_rles
    monkeypatch.setattr(instances, "mask_rles", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = evaluate(_seg_model(None), box_images, box_labels, progress=False, threads=1)
    assert res["map"] == pytest.approx(1.0) and calls == []
    assert evaluate(_seg_model(None), poly_images, poly_labels, progress=False, threads=1)["mask_map50"] == \
        pytest.approx(1.0)
    assert len(calls) == 2     # one per image


def _pose_model(kp: np.ndarray, shift: float = 0.0) -> onnx.ModelProto:
    """The v8 constant model as a pose export (kpt_shape [17, 3]): candidate j's keypoints are
    ``kp[j]`` (normalized in the original image) placed in the letterboxed input, moved ``shift``
    input pixels right."""
    pose = const_model("v8", letterboxed(LABELS, PAD_TOP), CLASSES)
    const = pose.graph.node[0]
    out = np.pad(numpy_helper.to_array(const.attribute[0].t), [(0, 0), (0, 3 * K), (0, 0)]).copy()
    for j, k in enumerate(kp):
        xy = k * [W, H] * RATIO + [shift, PAD_TOP]
        out[0, 6::3, j], out[0, 7::3, j], out[0, 8::3, j] = xy[:, 0], xy[:, 1], 0.9
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(out, "c"))
    pose.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out.shape)))
    pose.metadata_props.add(key="task", value="pose")
    pose.metadata_props.add(key="kpt_shape", value=f"[{K}, 3]")
    return pose


def test_pose_export_keypoints_are_scored(tmp_path: Path):
    kp = np.random.default_rng(1).uniform(0.05, 0.95, (len(LABELS), K, 2))
    lines = [f"{c} {cx} {cy} {w} {h} " + " ".join(f"{x} {y} 2" for x, y in k)
             for (c, cx, cy, w, h), k in zip(LABELS, kp)]
    images, labels = _images(tmp_path, lines)
    exact = evaluate(_pose_model(kp), images, labels, progress=False, threads=1)
    assert exact["map"] == pytest.approx(1.0) and exact["pose_map"] == pytest.approx(1.0)
    moved = evaluate(_pose_model(kp, shift=8.0), images, labels, progress=False, threads=1)
    assert moved["map"] == pytest.approx(1.0) and moved["pose_map"] == 0.0
    # the check fails on the keypoints' drop while the boxes are unchanged
    ref, cand = (detections(m, images, progress=False, threads=1, instances=True)
                 for m in (_pose_model(kp), _pose_model(kp, shift=8.0)))
    res = check_map_drop(Detections(cand, ref), str(labels), max_drop=1.0)
    assert res.status == "fail" and res.message.startswith("keypoint mAP drop 100.00 pts exceeds")
    assert res.details["drop_points"] == pytest.approx(0.0) and res.details["pose_drop_points"] == 100.0
    assert check_map_drop(Detections(ref, ref), str(labels), max_drop=1.0).status == "pass"


def test_eval_cli_prints_mask_map(tmp_path: Path):
    from onnxslim_yolo.cli import main

    lines = [f"{c} {_corners(cx, cy, w, h)}" for c, cx, cy, w, h in LABELS]
    images, labels = _images(tmp_path, lines)
    path = tmp_path / "seg.onnx"
    onnx.save(_seg_model(None), str(path))
    res = CliRunner().invoke(main, ["eval", str(path), "--images", str(images), "--labels", str(labels),
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    assert "mask mAP@0.5" in res.output and "mask mAP@0.5:0.95" in res.output


def test_masks_and_keypoints_map_back_through_the_letterbox():
    # bilinear weights: each row sums to 1; a 2x upsample of [0, 1] reads 0, 0.25, 0.75, 1
    lo, hi, frac = _samples(4, 0.5, 0.0, 2)
    w = np.zeros((4, 2))
    np.add.at(w, (np.arange(4), lo), 1 - frac)
    np.add.at(w, (np.arange(4), hi), frac)
    assert np.allclose(w.sum(1), 1) and np.allclose(w @ np.array([0.0, 1.0]), [0, 0.25, 0.75, 1])
    k = image_keypoints(np.array([[[16.0, 32.0]]]), RATIO, (0, PAD_TOP))
    assert k.tolist() == [[[20.0, 20.0, 1.0]]]
    # stretched (PaddleDetection, FastestDet): a ratio per axis, no padding
    assert image_keypoints(np.array([[[16.0, 32.0]]]), (0.8, 1.6), (0, 0)).tolist() == [[[20.0, 20.0, 1.0]]]
    # a keypoint predicted in the padding or past the edge lands on the image's border, as
    # ultralytics' scale_coords clips it; inside the image nothing moves
    pts = np.array([[[-8.0, 8.0, 0.9], [16.0, 32.0, 0.8], [90.0, 70.0, 0.7]]])
    k = image_keypoints(pts, RATIO, (0, PAD_TOP), (40, 60))
    assert k.tolist() == [[[0.0, 0.0, 0.9], [20.0, 20.0, 0.8], [60.0, 40.0, 0.7]]]


def test_rotated_boxes_map_back_through_a_stretch():
    """A box along the x axis keeps its angle and scales by the x ratio; one at 90 degrees by
    the y ratio; at 45 degrees under a 2:1 stretch its sides run along (1, 2) and (-1, 2)
    directions, of lengths sqrt(5)/sqrt(2) times the sides."""
    r = np.array([[40.0, 40.0, 20.0, 10.0, 0.0], [40.0, 40.0, 20.0, 10.0, np.pi / 2],
                  [40.0, 40.0, 20.0, 20.0, np.pi / 4]])
    out = image_rotated(r, (2.0, 1.0), (0, 0))
    np.testing.assert_allclose(out[0], [20, 40, 10, 10, 0], atol=1e-9)
    np.testing.assert_allclose(out[1], [20, 40, 20, 5, np.pi / 2], atol=1e-9)
    np.testing.assert_allclose(out[2, 2:4], [20 * np.sqrt(5 / 8)] * 2, atol=1e-9)
    assert out[2, 4] == pytest.approx(np.arctan2(1, 0.5))
    np.testing.assert_allclose(image_rotated(r, 2.0, (4, 0))[:, :4], (r[:, :4] - [4, 0, 0, 0]) / 2)


def test_agreement_compares_keypoints_and_masks_with_the_reference(tmp_path: Path):
    from onnxslim_yolo.check.accuracy import check_agreement
    from onnxslim_yolo.evaluate import instance_agreement

    kp = np.random.default_rng(2).uniform(0.05, 0.95, (len(LABELS), K, 2))
    images, _ = _images(tmp_path, [" ".join(map(str, lab)) for lab in LABELS])   # labels not read
    ref, moved = (detections(m, images, progress=False, threads=1, instances=True)
                  for m in (_pose_model(kp), _pose_model(kp, shift=8.0)))
    assert instance_agreement(ref, ref)["keypoint"]["map"] == pytest.approx(1.0)
    assert instance_agreement(moved, ref)["keypoint"]["map"] == 0.0
    assert check_agreement(Detections(ref, ref)).status == "pass"
    res = check_agreement(Detections(moved, ref))
    assert res.status == "fail" and res.message.startswith("keypoint agreement 0.0000 below 0.5: mAP 1.0000")
    assert res.details["pose_map"] == 0.0 and res.details["map"] == pytest.approx(1.0)
    # a reference whose keypoints move against themselves (float rounding) only warns
    noisy = check_agreement(Detections(moved, ref), noise=lambda: {"box": 1.0, "keypoint": 0.0})
    assert noisy.status == "warn" and noisy.details["pose_self_agreement"] == 0.0
    # a reference below the floor against itself (0.3) excuses no more than its share: 0.0 fails
    # (it warned before, as any floor above the reference's own agreement did)
    shaky = check_agreement(Detections(moved, ref), noise=lambda: {"box": 1.0, "keypoint": 0.3})
    assert shaky.status == "fail" and shaky.details["pose_self_agreement"] == 0.3
    # masks: the candidate's masks everywhere against the reference's masks on one object
    cx, cy, w, h = LABELS[0][1:]
    region = ((cx - w / 2) * W * RATIO, (cy - h / 2) * H * RATIO + PAD_TOP,
              (cx + w / 2) * W * RATIO, (cy + h / 2) * H * RATIO + PAD_TOP)
    full, one = (detections(m, images, progress=False, threads=1, instances=True)
                 for m in (_seg_model(None), _seg_model(region)))
    assert instance_agreement(full, full)["mask"]["map"] == pytest.approx(1.0)
    # the reference's second object has an empty mask, which nothing can match
    assert instance_agreement(full, one)["mask"]["map50"] == pytest.approx(0.5)
    assert "keypoint" not in instance_agreement(full, one)


def test_a_pose_model_on_box_labels_gets_no_keypoint_map(tmp_path: Path):
    """Box-only labels (and an image without labels) give no keypoint mAP, not a zero."""
    kp = np.random.default_rng(3).uniform(0.05, 0.95, (len(LABELS), K, 2))
    images, labels = _images(tmp_path, [" ".join(map(str, lab)) for lab in LABELS])
    (labels / "im1.txt").unlink()
    res = evaluate(_pose_model(kp), images, labels, progress=False, threads=1)
    assert "pose_map" not in res and res["n_ground_truth"] == 2


# --------------------------------------------------------------------------- rotated boxes
def _corners_of(r) -> np.ndarray:
    cx, cy, w, h, a = r
    u, v = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    signs = ((-1, -1), (1, -1), (1, 1), (-1, 1))
    return np.array([[cx, cy] + sx * w / 2 * u + sy * h / 2 * v for sx, sy in signs])


OBJECTS = np.array([[20.0, 20.0, 30.0, 6.0, 0.4], [60.0, 20.0, 24.0, 8.0, -0.3]])   # original pixels


def _obb_model(rotated: np.ndarray) -> onnx.ModelProto:
    """The v8 constant model as an obb export whose candidates are ``rotated`` (original pixels,
    placed in the letterboxed input), classes as LABELS."""
    r = rotated.copy()
    r[:, :4] *= RATIO
    r[:, 1] += PAD_TOP
    m = const_model("v8", r[:, :4], CLASSES)
    const = m.graph.node[0]
    out = numpy_helper.to_array(const.attribute[0].t).copy()
    angles = np.zeros((1, 1, out.shape[2]), np.float32)
    angles[0, 0, :len(r)] = r[:, 4]
    out = np.concatenate([out, angles], axis=1)
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(out, "c"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out.shape)))
    m.metadata_props.add(key="task", value="obb")
    return m


def test_obb_export_is_scored_on_its_rotated_boxes(tmp_path: Path):
    lines = [f"{c} " + " ".join(f"{x / W} {y / H}" for x, y in _corners_of(r))
             for c, r in zip(CLASSES, OBJECTS)]
    images, labels = _images(tmp_path, lines)   # DOTA-style polygons, as ultralytics writes them
    exact = evaluate(_obb_model(OBJECTS), images, labels, progress=False, threads=1)
    assert exact["map"] == pytest.approx(1.0) and exact["obb_map"] == pytest.approx(1.0)
    # mirrored angles: the same boxes around them, so the axis-aligned mAP cannot tell
    mirrored = OBJECTS * [1, 1, 1, 1, -1]
    res = evaluate(_obb_model(mirrored), images, labels, progress=False, threads=1)
    assert res["map"] == pytest.approx(1.0) and res["obb_map"] < 0.2
    dets = detections(_obb_model(OBJECTS), images, progress=False, threads=1)
    got = dets[0].rotated[np.argsort(dets[0].classes)[::-1]]   # class 1 first, as OBJECTS
    assert np.allclose(got, OBJECTS, atol=1e-3)
    # the agreement check compares the rotated boxes with the reference's too
    from onnxslim_yolo.evaluate import instance_agreement

    flipped = detections(_obb_model(mirrored), images, progress=False, threads=1)
    assert instance_agreement(dets, dets)["rotated box"]["map"] == pytest.approx(1.0)
    assert instance_agreement(flipped, dets)["rotated box"]["map"] < 0.2
    # end to end (YOLO26-obb): (1, K, 7) rows cx cy w h score class angle
    for angles, want in ((OBJECTS[:, 4], 1.0), (-OBJECTS[:, 4], 0.0)):
        e2e = _obb_model(OBJECTS)
        rows = np.zeros((1, 30, 7), np.float32)
        r = OBJECTS[:, :4] * RATIO + [0, PAD_TOP, 0, 0]
        rows[0, :2] = np.concatenate([r, [[0.9], [0.9]], np.array(CLASSES)[:, None], angles[:, None]], 1)
        e2e.graph.node[0].attribute[0].t.CopyFrom(numpy_helper.from_array(rows, "c"))
        e2e.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 30, 7]))
        res = evaluate(e2e, images, labels, progress=False, threads=1)
        assert res["map"] == pytest.approx(1.0) and res["n_detections"] == 4
        assert res["obb_map"] == pytest.approx(want) if want else res["obb_map"] < 0.2


def test_obb_nms_suppresses_on_rotated_overlap():
    """Two thin parallel diagonal boxes: their axis-aligned boxes overlap (IoU 0.77), the boxes
    themselves do not, so both stay; a copy of the first moved by a pixel is suppressed."""
    from onnxslim_yolo.eval.nms import non_max_suppression

    r = np.array([[50, 50, 80, 4, np.pi / 4], [54, 46, 80, 4, np.pi / 4], [51, 50, 80, 4, np.pi / 4]])
    c, s = np.abs(np.cos(r[:, 4])), np.abs(np.sin(r[:, 4]))
    w, h = r[:, 2] * c + r[:, 3] * s, r[:, 2] * s + r[:, 3] * c
    boxes = np.stack([r[:, 0] - w / 2, r[:, 1] - h / 2, r[:, 0] + w / 2, r[:, 1] + h / 2], 1)
    scores = np.array([[0.9], [0.8], [0.7]])
    assert len(non_max_suppression(boxes, scores, iou=0.6)) == 1
    d, rows = non_max_suppression(boxes, scores, iou=0.6, with_rows=True, rotated=r)
    assert rows.tolist() == [0, 1]


def test_obb_nms_lets_a_suppressed_box_suppress_as_ultralytics_fast_nms():
    """A chain of three boxes, each moved 12 pixels along its length from the one before: the
    second overlaps the first and the third, the third not the first. Greedy NMS would keep the
    third (its only suppressor is gone); Fast-NMS, as ultralytics validates obb models, does not."""
    from onnxslim_yolo.eval.metrics import probiou
    from onnxslim_yolo.eval.nms import nms_rotated

    r = np.array([[50, 50, 40, 10, 0.0], [62, 50, 40, 10, 0.0], [74, 50, 40, 10, 0.0]])
    ov = probiou(r, r)
    assert ov[0, 1] > 0.5 and ov[1, 2] > 0.5 and ov[0, 2] < 0.5
    assert nms_rotated(r, np.array([0.9, 0.8, 0.7]), 0.5).tolist() == [0]
    assert nms_rotated(r, np.array([0.7, 0.8, 0.9]), 0.5).tolist() == [2]


@pytest.mark.parametrize("n, span, iou", [(300, 200, 0.3), (700, 300, 0.7), (1, 10, 0.5), (0, 10, 0.5)])
def test_obb_nms_equals_fast_nms_by_the_full_overlap_matrix(n, span, iou):
    """Against Fast-NMS written out: the (N, N) overlaps of the boxes in score order, a box dropped
    when any earlier one overlaps it by more than ``iou``. Over several column blocks (FAST_COLS),
    and cut at ``max_keep`` the first ones of the full run."""
    from onnxslim_yolo.eval.metrics import probiou
    from onnxslim_yolo.eval.nms import FAST_COLS, nms_rotated

    rng = np.random.default_rng(n)
    r = np.concatenate([rng.uniform(0, span, (n, 2)), rng.uniform(5, 80, (n, 2)),
                        rng.uniform(-1, 2, (n, 1))], 1)
    s = rng.random(n)
    order = np.argsort(-s, kind="stable")
    ov = np.triu(probiou(r[order], r[order]), 1)
    want = order[~(ov > iou).any(0)]
    got = nms_rotated(r, s, iou)
    assert got.tolist() == want.tolist()
    assert nms_rotated(r, s, iou, max_keep=50).tolist() == want[:50].tolist()
    if n >= 300:
        assert n > 2 * FAST_COLS and 0 < len(want) < n


def test_summary_table_shows_mask_keypoint_and_rotated_box_map_before_and_after():
    from onnxslim_yolo.report import summary_table

    stats = {"nodes": 10, "params": 100, "macs": 1000, "flops": 2000, "size_bytes": 4000}
    before = {"map": 0.5, "map50": 0.7, "mask_map": 0.4, "mask_map50": 0.6}
    after = {"map": 0.49, "map50": 0.69, "mask_map": 0.35, "mask_map50": 0.55}
    out = summary_table({"before": stats, "after": stats, "accuracy": {"before": before, "after": after}})
    rows = {line.split("|")[0].strip(): line for line in out.splitlines()}
    assert "mask mAP@0.5:0.95" in rows and "-5.00 pts" in rows["mask mAP@0.5:0.95"]
    assert "mAP@0.5:0.95" in rows and "-1.00 pts" in rows["mAP@0.5:0.95"]
    assert not any(k.startswith(("keypoint", "rotated")) for k in rows)


def test_mixed_precision_loss_with_labels_is_the_worst_of_box_and_keypoint_map_drops(tmp_path: Path):
    from onnxslim_yolo.quant.metrics import DetectionLoss

    kp = np.random.default_rng(4).uniform(0.05, 0.95, (len(LABELS), K, 2))
    lines = [f"{c} {cx} {cy} {w} {h} " + " ".join(f"{x} {y} 2" for x, y in k)
             for (c, cx, cy, w, h), k in zip(LABELS, kp)]
    images, labels = _images(tmp_path, lines)
    loss = DetectionLoss(_pose_model(kp), [], str(labels), str(images), threads=1)
    assert loss(_pose_model(kp)) == pytest.approx(0.0)
    assert loss(_pose_model(kp, shift=8.0)) == pytest.approx(100.0)   # boxes exact, keypoints all lost


def test_mixed_precision_loss_without_labels_judges_boxes_and_rotated_boxes():
    """Without labels the loss is 100 x (1 - agreement with the float model) on the calibration
    feeds: an obb export's mirrored rotated boxes cost it all even with the same boxes around
    them. Masks and keypoints are left to labels (their agreement overstates a loss in points):
    moved keypoints or cut masks around unchanged boxes cost nothing here."""
    from onnxslim_yolo.quant.metrics import DetectionLoss

    feeds = [{"images": np.zeros((1, 3, 64, 64), np.float32)}] * 2
    obb = DetectionLoss(_obb_model(OBJECTS), feeds, threads=1)
    assert obb(_obb_model(OBJECTS)) == pytest.approx(0.0)
    assert obb(_obb_model(OBJECTS * [1, 1, 1, 1, -1])) > 80.0
    moved = OBJECTS + [[0, 6, 0, 0, 0], [0, 0, 0, 0, 0]]     # one box 6 pixels down
    assert 0.0 < obb(_obb_model(moved)) < 100.0
    kp = np.random.default_rng(4).uniform(0.05, 0.95, (len(LABELS), K, 2))
    assert DetectionLoss(_pose_model(kp), feeds, threads=1)(_pose_model(kp, shift=8.0)) == 0.0
    cx, cy, w, h = LABELS[0][1:]
    region = ((cx - w / 2) * W * RATIO, (cy - h / 2) * H * RATIO + PAD_TOP,
              (cx + w / 2) * W * RATIO, (cy + h / 2) * H * RATIO + PAD_TOP)
    assert DetectionLoss(_seg_model(None), feeds, threads=1)(_seg_model(region)) == 0.0


def test_end_to_end_segment_export_masks_follow_their_rows(tmp_path: Path):
    """YOLO26-seg: (1, K, 6+nm) rows after its own selection beside the prototypes; each row's
    coefficients make its mask. Row 0 (class 1) gets coefficients that switch its mask on, row 1
    (class 0) ones that switch it off."""
    lines = [f"{c} {_corners(cx, cy, w, h)}" for c, cx, cy, w, h in LABELS]
    images, labels = _images(tmp_path, lines)
    nm = 2
    rows = np.zeros((1, 20, 6 + nm), np.float32)
    for k, (b, c) in enumerate(zip(letterboxed(LABELS, PAD_TOP), CLASSES)):
        rows[0, k, :6] = [b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2, 0.9, c]
    rows[0, 0, 6:], rows[0, 1, 6:] = [1.0, 0.0], [-1.0, 0.0]
    m = const_model("v8", np.zeros((0, 4)), [])
    m.graph.node[0].attribute[0].t.CopyFrom(numpy_helper.from_array(rows, "c"))
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("output", TensorProto.FLOAT, list(rows.shape)))
    m.graph.node.append(helper.make_node("Constant", [], ["protos"], value=numpy_helper.from_array(
        np.full((1, nm, 16, 16), 10.0, np.float32), "p")))
    m.graph.output.append(helper.make_tensor_value_info("protos", TensorProto.FLOAT, [1, nm, 16, 16]))
    m.metadata_props.add(key="task", value="segment")
    res = evaluate(m, images, labels, progress=False, threads=1)
    assert res["map"] == pytest.approx(1.0) and res["mask_map50"] == pytest.approx(0.5)
