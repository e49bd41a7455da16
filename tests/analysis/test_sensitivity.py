"""analysis.sensitivity: the agreement metric of the pruning probes."""
from __future__ import annotations

import numpy as np
import pytest

from fixtures import FAMILIES
from onnxslim_yolo import verify
from onnxslim_yolo.analysis import sensitivity
from onnxslim_yolo.pass_base import SlimError
from tests.analysis import graphs

HW = (64, 64)


class _Model:
    """Just enough of a ModelProto for the metric: one named graph output, no metadata, no nodes
    (the output reader looks for FastestDet's Concat before the output)."""

    metadata_props: list = []

    class graph:  # noqa: N801
        output = [type("O", (), {"name": "out"})()]
        node: list = []


def v5_output(boxes, cls, n_rows=40, n_classes=3, seed=0) -> np.ndarray:
    """(1, n_rows, 5 + n_classes) YOLOv5 rows: the given xywh boxes confident, the rest noise."""
    rng = np.random.default_rng(seed)
    p = np.zeros((n_rows, 5 + n_classes), np.float32)
    p[:, :4] = rng.uniform(8, 56, (n_rows, 4))
    p[:, 4] = rng.uniform(0.0, 0.02, n_rows)
    p[:, 5:] = rng.uniform(0.0, 0.5, (n_rows, n_classes))
    for i, (b, c) in enumerate(zip(boxes, cls)):
        p[i, :4] = b
        p[i, 4] = 0.9
        p[i, 5:] = 0.05
        p[i, 5 + c] = 0.95
    return p[None]


BOXES = [(16, 16, 12, 12), (44, 40, 16, 20)]


def metric_on(ref):
    m = sensitivity.AgreementMetric(_Model(), "v5", HW)
    m.prepare([[r] for r in ref])
    return m


def test_agreement_cost_is_zero_for_the_reference_and_grows_as_boxes_move():
    ref = [v5_output(BOXES, [0, 2], seed=i) for i in range(3)]
    m = metric_on(ref)
    assert m.total([[r] for r in ref], [[r] for r in ref]) == pytest.approx(0.0, abs=1e-9)
    costs = []
    for shift in (1.0, 3.0, 6.0):
        moved = [r.copy() for r in ref]
        for r in moved:
            r[0, :2, 0] += shift
        costs.append(m.total([[r] for r in ref], [[r] for r in moved]))
    assert 0.0 < costs[0] < costs[1] < costs[2] <= 1.0
    gone = [r.copy() for r in ref]
    for r in gone:
        r[0, :2, 4] = 0.0
    assert m.total([[r] for r in ref], [[r] for r in gone]) == pytest.approx(1.0)


def test_agreement_is_undefined_when_the_reference_detects_nothing():
    quiet = [v5_output([], []) for _ in range(2)]
    with pytest.raises(SlimError, match="detects nothing scoring >= 0.25 on 2 probe images"):
        metric_on(quiet)


def test_agreement_metric_on_yolo_fixtures_and_head_metric_for_unknown_layouts():
    for family in ("yolov8", "yolox"):
        model = FAMILIES[family](bn=False)
        metric = sensitivity.agreement_metric(model, verify.random_feeds(model, 2, 0), 1)
        assert metric.name == "agreement" and len(metric.ref_dets) == 2
    model = graphs.concat_graph()     # a 4-D feature map output: no detection layout
    assert sensitivity.agreement_metric(model, verify.random_feeds(model, 1, 0), 1).name == "head"


def test_detection_metric_reads_the_candidates_of_an_nms_tail_and_split_outputs():
    """NMS inside the graph: the probe watches the boxes and scores fed into it (rows that
    correspond between two models); boxes + scores outputs are watched as they are."""
    from fixtures.postprocess import append_nms, split_boxes_scores
    from onnxslim_yolo.analysis import activations
    from onnxslim_yolo.analysis.saliency import detection_watch
    base = FAMILIES["yolov5_v6"](bn=False)
    for model in (append_nms(base), split_boxes_scores(base, channels_first=True)):
        found = detection_watch(model)
        watch = found.tensors
        assert found.fmt == "xyxy" and len(watch) == 2 and found.hw == (64, 64) and found.boxes == 2
        metric = sensitivity.default_metric(model)
        assert metric.name == "detections" and metric.watch == watch
        out = list(activations.capture(model, verify.random_feeds(model, 1, 0), watch, 1))[0]
        ref = [out[n] for n in watch]
        moved = [ref[0] + 2.0, ref[1]]  # every box shifted by 2 pixels
        assert metric(ref, moved) > metric(ref, ref) + 0.05
    assert detection_watch(graphs.concat_graph()) is None


def test_segment_exports_are_probed_on_their_boxes_and_mask_logits():
    """A 'segment' export: the probe watches the candidates and the prototypes together, reads
    the boxes without the mask coefficients, and adds each confident candidate's relative change
    of mask logits, so a change to the prototypes or the coefficients alone costs what it does."""
    from fixtures.yolov8 import build_yolov8_seg
    from onnxslim_yolo.analysis import activations
    from onnxslim_yolo.analysis.saliency import detection_watch, saliency_maps
    model = build_yolov8_seg(nm=8)
    found = detection_watch(model)
    watch = found.tensors
    assert watch == ["output0", "output1"] and found.fmt == "v8" and found.hw == (64, 64)
    assert (found.boxes, found.coefs, found.protos, found.keypoints) == (2, 0, 1, None)
    metric = sensitivity.default_metric(model)
    assert metric.name == "detections" and metric.watch == watch
    feeds = verify.random_feeds(model, 1, 0)
    ref = [list(activations.capture(model, feeds, watch, 1))[0][n] for n in watch]
    assert metric(ref, ref) == pytest.approx(0.0, abs=1e-9)
    assert metric(ref, [ref[0], ref[1] * 1.1]) == pytest.approx(0.01, rel=1e-3)  # every logit x1.1
    coef = ref[0].copy()
    coef[0, -8:, :] *= 0.9
    assert metric(ref, [coef, ref[1]]) == pytest.approx(0.01, rel=1e-3)          # every logit x0.9
    moved = ref[0].copy()
    moved[0, :2, :] += 2.0                                                       # boxes, not masks
    assert metric(ref, [moved, ref[1]]) > 0.05
    maps = saliency_maps(model, feeds)   # from the class scores, not the coefficients after them
    assert maps is not None and maps[0].shape == (8, 8)
    assert maps[0].max() == pytest.approx(float(ref[0][0, 4:8].max()))


def test_mask_change_equals_the_change_of_the_mask_logit_maps():
    rng = np.random.default_rng(0)
    nm, rows = 4, np.array([0, 3, 7])
    for channels_first in (False, True):
        ref = [rng.normal(size=(1, 50, 6 + nm)).astype(np.float32),
               rng.normal(size=(1, nm, 8, 8)).astype(np.float32)]
        new = [r + 0.01 * rng.normal(size=r.shape).astype(np.float32) for r in ref]
        coefs = [o[0, :, -nm:] for o in (ref[0], new[0])]
        if channels_first:
            ref[0], new[0] = ref[0].transpose(0, 2, 1).copy(), new[0].transpose(0, 2, 1).copy()
        logits = [c[rows].astype(np.float64) @ p[0].reshape(nm, -1) for c, p in zip(coefs, (ref[1], new[1]))]
        want = ((logits[1] - logits[0]) ** 2).sum(1) / (logits[0] ** 2).sum(1)
        np.testing.assert_allclose(sensitivity.mask_change(ref, new, nm, rows), want, rtol=1e-4)


def test_pose_exports_are_probed_on_their_boxes_and_keypoints():
    """A 'pose' export: a keypoint moved by d pixels costs 2 d / sqrt(box area) (averaged over
    the K keypoints), a visibility change its size, boxes are read without the keypoints."""
    from fixtures.yolov8 import build_yolov8_pose
    from onnxslim_yolo.analysis import activations
    model = build_yolov8_pose(keypoints=5)
    metric = sensitivity.default_metric(model)
    assert metric.name == "detections" and metric.watch == ["output0"] and metric.keypoints == (5, 3)
    ref = [list(activations.capture(model, verify.random_feeds(model, 1, 0), ["output0"], 1))[0]["output0"]]
    assert metric(ref, ref) == pytest.approx(0.0, abs=1e-9)
    rows = np.arange(ref[0].shape[2])
    boxes = ref[0][0, :4].T.astype(np.float64)                    # cx cy w h
    xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1)
    moved = ref[0].copy()
    moved[0, -15, :] += 3.0                                       # the first of 5 keypoints, x
    want = 2 * (3.0 / 5) / np.sqrt(np.maximum(boxes[:, 2] * boxes[:, 3], 1.0))
    got = sensitivity.keypoint_change(ref[0], moved, (5, 3), rows, xyxy)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    hidden = ref[0].copy()
    hidden[0, -1, :] += 0.5                                       # the last keypoint's visibility
    got = sensitivity.keypoint_change(ref[0], hidden, (5, 3), rows, xyxy)
    np.testing.assert_allclose(got, 0.1, rtol=1e-5)
    assert metric(ref, [moved]) > 0.0


@pytest.mark.parametrize("task", ["seg", "pose"])
def test_end_to_end_segment_and_pose_exports_are_probed_before_their_selection(task):
    """YOLO26-style end-to-end exports select their best candidates inside the graph. The probe
    watches what is fed into the selection (rows that correspond between two models): boxes,
    scores, and the mask coefficients (with the prototypes beside) or the keypoints."""
    from fixtures.postprocess import append_topk
    from fixtures.yolov8 import build_yolov8_pose, build_yolov8_seg
    from onnxslim_yolo.analysis import activations
    from onnxslim_yolo.analysis.saliency import detection_watch
    seg = task == "seg"
    # 3 classes: with 4, boxes and scores fed into the selection would have the same shape
    model = (append_topk(build_yolov8_seg(num_classes=3, nm=8), 3) if seg
             else append_topk(build_yolov8_pose(keypoints=5), 1))
    from onnxslim_yolo.eval.decode import declared_shapes, row_format
    assert row_format(model, declared_shapes(model)[0], (64, 64)) is None  # selected rows: no v8 layout
    found = detection_watch(model)
    assert found.fmt == "xyxy" and found.boxes == 2
    assert (found.coefs, found.protos, found.keypoints) == ((2, 3, None) if seg else (None, None, 2))
    metric = sensitivity.default_metric(model)
    assert metric.name == "detections" and metric.watch == found.tensors
    out = list(activations.capture(model, verify.random_feeds(model, 1, 0), found.tensors, 1))[0]
    ref = [out[n] for n in found.tensors]
    assert ref[2].shape == (1, 84, 8 if seg else 15)
    assert metric(ref, ref) == pytest.approx(0.0, abs=1e-9)
    new = list(ref)
    if seg:
        new[3] = ref[3] * 1.1                    # every mask logit x1.1
        assert metric(ref, new) == pytest.approx(0.01, rel=1e-3)
    else:
        new[2] = ref[2].copy()
        new[2][0, :, 0] += 3.0                   # the first keypoint's x, 3 pixels
        assert metric(ref, new) > 0.0


@pytest.mark.parametrize("end_to_end", [False, True])
def test_obb_exports_are_probed_on_their_rotated_boxes(end_to_end):
    """An 'obb' export's candidates are compared by probabilistic IoU of their rotated boxes:
    mirrored angles, which leave the boxes around them as they were, cost; turning every box by
    pi (the same box) costs nothing. End to end (YOLO26-obb) the probe watches the boxes (cx cy w
    h) and the (1, N, 1) angles fed into the selection."""
    from fixtures.postprocess import append_topk
    from fixtures.yolov8 import build_yolov8_obb
    from onnxslim_yolo.analysis import activations
    from onnxslim_yolo.analysis.saliency import detection_watch
    model = build_yolov8_obb(num_classes=3)
    if end_to_end:
        model = append_topk(model, 3, corners=False)
    found = detection_watch(model)
    assert found.angles == (2 if end_to_end else None)
    metric = sensitivity.default_metric(model)
    assert metric.name == "detections" and metric.watch == found.tensors
    out = list(activations.capture(model, verify.random_feeds(model, 1, 0), found.tensors, 1))[0]
    ref = [out[n] for n in found.tensors]
    assert metric(ref, ref) == pytest.approx(0.0, abs=1e-12)

    def turned(f):
        new = [r.copy() for r in ref]
        if end_to_end:
            new[2] = f(new[2])
        else:
            new[0][:, -1] = f(new[0][:, -1])
        return new

    assert metric(ref, turned(lambda a: a + np.pi)) == pytest.approx(0.0, abs=1e-6)
    mirrored = turned(lambda a: -a)
    assert metric(ref, mirrored) > 0.01
    if not end_to_end:   # what an IoU of the boxes around them would have measured: nothing
        np.testing.assert_allclose(metric._decode(mirrored)[0], metric._decode(ref)[0], atol=1e-4)
