"""How far a quantized model is from its float original, measured on calibration images.

- :func:`output_quality`: per graph output and per head map (the last convs' raw outputs, where
  box and score logits are still separate from the decode), mean and worst cosine and SQNR;
- :func:`detection_loss`: the accuracy loss in mAP points used by mixed precision: with labels,
  the true mAP drop on the labelled images (the worst of the box, mask, keypoint and rotated-box
  mAPs the model and labels give); without, 100 x (1 - detection agreement), the mAP of the
  candidate's detections scored against the float model's confident detections (for an obb
  model the worse of its boxes' and its rotated boxes' agreement).
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx

from .. import verify
from ..analysis.activations import with_outputs
from ..eval.anchors import CLASS_SCORES
from ..pass_base import SlimError

log = logging.getLogger(__name__)

Feeds = Dict[str, np.ndarray]


def output_quality(ref: onnx.ModelProto, new: onnx.ModelProto, feeds: Sequence[Feeds],
                   extra: Sequence[str] = (), threads: int = 0,
                   class_scores: bool = False) -> Dict[str, Dict[str, float]]:
    """``{output: {cosine_mean, cosine_min, sqnr_db_mean, sqnr_db_min}}`` over ``feeds``; with
    ``class_scores``, and outputs that are candidate rows, also ``"class scores"`` decoded (as the
    final checks compare them: box pixels outweigh the scores in a cosine over the whole output),
    on the feeds where they reach :data:`..eval.anchors.SCORE_FLOOR`."""
    from ..data import feed_hw, model_input
    from ..eval.anchors import ScoresOf, class_scores_reader, scores_detect

    n_out = len(ref.graph.output)
    outs = [o.name for o in ref.graph.output] + [n for n in extra]
    rs = verify.session(with_outputs(ref, extra), threads=threads)
    ns = verify.session(with_outputs(new, extra), threads=threads)
    cos: Dict[str, List[float]] = {n: [] for n in outs}
    sq: Dict[str, List[float]] = {n: [] for n in outs}
    scores: Optional[ScoresOf] = None   # read off the first feed's outputs
    image = None
    if class_scores:
        try:
            image = model_input(ref)[0]
        except (SlimError, ValueError, IndexError, KeyError):   # no one image input to size the rows
            class_scores = False
    for f in feeds:
        ra, na = rs.run(outs, f), ns.run(outs, f)
        for name, a, b in zip(outs, ra, na):
            if a.shape != b.shape:  # an output after NMS kept another number of rows
                cos[name].append(0.0)
                sq[name].append(float("-inf"))
                continue
            d = verify.diff(name, a, b)
            cos[name].append(d.cosine)
            sq[name].append(d.sqnr_db)  # over the finite values, as the cosine (verify.diff)
        if class_scores:
            try:
                hw = feed_hw(f[image])
                scores = scores or class_scores_reader(ref, ra[:n_out], hw)
                if scores is None:   # no candidate rows: nothing to decode
                    class_scores = False
                    continue
                sa, sb = scores(ra[:n_out], hw), scores(na[:n_out], hw)
                d = verify.diff(CLASS_SCORES, sa, sb)
            except (SlimError, ValueError, IndexError, KeyError):   # outputs it cannot decode
                class_scores = False
                continue
            if not scores_detect(sa, sb):   # near 0 their cosine is float noise
                continue
            cos.setdefault(CLASS_SCORES, []).append(d.cosine)
            sq.setdefault(CLASS_SCORES, []).append(d.sqnr_db)
    return {n: {"cosine_mean": round(float(np.mean(cos[n])), 6),
                "cosine_min": round(float(np.min(cos[n])), 6),
                "sqnr_db_mean": round(float(np.mean(sq[n])), 2),
                "sqnr_db_min": round(float(np.min(sq[n])), 2)}
            for n in cos if cos[n]}


def _row_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


class DetectionError:
    """Loss between float and candidate outputs, row by row (no NMS: rows correspond), weighted by
    confidence: for every prediction that either model scores >= ``min_conf``, the L1 change of
    its class scores plus its float confidence x (1 - IoU) of the two boxes. It follows what
    mAP@0.5:0.95 sees (confident boxes and their precision), unlike an error over all logits.
    ``read`` (an :class:`..eval.anchors.OutputReader` of the model) first takes what is not a box
    or a class score off each row: a pose export's keypoints, an obb export's angle."""

    def __init__(self, fmt: str, hw: Sequence[int], min_conf: float = 0.05,
                 read: Optional[Callable] = None) -> None:
        self.fmt, self.hw, self.min_conf, self.read = fmt, tuple(hw), min_conf, read

    def decoded(self, out: np.ndarray) -> tuple:
        from ..eval.decode import decode_rows
        return decode_rows(out if self.read is None else self.read([out], self.hw), self.fmt, self.hw)

    def __call__(self, ref: Sequence[tuple], new: Sequence[np.ndarray]) -> float:
        num = den = 0.0
        for (rb, rs), out in zip(ref, new):
            nb, ns = self.decoded(out)
            cf, cq = rs.max(1), ns.max(1)
            w = np.maximum(cf, cq)
            m = w >= self.min_conf
            if not m.any():
                continue
            err = np.abs(ns[m] - rs[m]).sum(1) + cf[m] * (1.0 - _row_iou(rb[m], nb[m]))
            num += float(w[m] @ err)
            den += float(w[m].sum())
        return num / den if den > 0 else 0.0


class DetectionLoss:
    """Callable model -> loss in mAP points, against a float reference computed once."""

    def __init__(self, ref: onnx.ModelProto, feeds: Sequence[Feeds], labels: Optional[str] = None,
                 images: Optional[str] = None, threads: int = 0, progress: bool = False) -> None:
        self.feeds, self.labels, self.images = feeds, labels, images
        self.threads, self.progress = threads, progress
        if labels:
            from ..evaluate import evaluate
            if not images:
                from ..pass_base import UsageError
                raise UsageError("insert-qdq: option 'labels' needs option 'images' "
                                 "(the labelled image folder)")
            self.ref_maps = evaluate(ref, images, labels, progress=progress, threads=threads)
            self.kind = "true mAP drop (points)"
        else:
            from ..evaluate import feed_detections
            self.ref_boxes = feed_detections(ref, feeds, threads)
            self.kind = "100 x (1 - detection agreement with the float model)"

    def __call__(self, model: onnx.ModelProto) -> float:
        if self.labels:
            from ..eval.metrics import map_drops
            from ..evaluate import evaluate
            m = evaluate(model, self.images, self.labels, progress=self.progress, threads=self.threads)
            # the worst of the box mAP and, for a segmentation, pose or obb model, its mask,
            # keypoint or rotated-box mAP
            return round(max(map_drops(self.ref_maps, m).values()), 4)
        from ..evaluate import agreement, feed_detections, instance_agreement
        cand = feed_detections(model, self.feeds, self.threads)
        # the worst of the boxes' agreement and, for an obb model, its rotated boxes'. Not masks:
        # as a loss in "points" their agreement overstates the damage many times over (yolov5n-seg
        # with trained masks at --max-drop 1: every layer went back to float, where boxes alone
        # keep 24 INT8 layers for a true mask mAP drop of 0.06); the guard's output cosine covers
        # the prototypes. Keypoint agreement is unmeasured on a trained pose model.
        worst = min([agreement(cand, self.ref_boxes)["map"]] +
                    [r["map"] for r in instance_agreement(cand, self.ref_boxes).values()])
        return round(100.0 * (1.0 - worst), 4)
