"""Class-aware non-maximum suppression in numpy, with ultralytics validation semantics.

Matches ``non_max_suppression`` of ultralytics yolov5/yolov8 as used by ``val``: candidates with
score > conf, multi-label (one candidate per class above conf), at most ``max_nms`` candidates by
score, classes separated by offsetting boxes by ``class * max_wh``, greedy NMS suppressing
IoU > iou (torchvision.ops.nms), then the ``max_det`` best. Rotated boxes (obb) are suppressed
as ultralytics does, by Fast-NMS on their probabilistic IoU (:func:`nms_rotated`).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np

from ..data import Ratio, ratio_xy

MAX_WH = 7680
MAX_NMS = 30000


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box against (N, 4) boxes, areas without the +1 pixel convention."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _greedy(order: np.ndarray, overlap: Callable[[int, np.ndarray], np.ndarray], iou: float,
            max_keep: Optional[int]) -> np.ndarray:
    """Indices kept by greedy suppression of candidates in ``order`` (best score first):
    ``overlap(i, rest)`` gives the overlap of the i-th of them with the ``rest`` (positions in
    ``order``), and each kept one suppresses those above ``iou``. Stops after ``max_keep``: later
    candidates never suppress earlier ones, so the first ``max_keep`` kept are the same as with a
    full run."""
    limit = len(order) if max_keep is None else max_keep
    idx = np.arange(len(order))
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):
        while idx.size and len(keep) < limit:
            i, rest = idx[0], idx[1:]
            keep.append(i)
            idx = rest[~(overlap(i, rest) > iou)]  # NaN (two empty boxes) does not suppress, as torchvision
    return order[np.asarray(keep, dtype=np.int64)]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: Optional[int] = None) -> np.ndarray:
    """Indices kept by greedy NMS, best score first (torchvision.ops.nms semantics: a box is
    suppressed by a kept, better-scoring box when their IoU > ``iou``), at most ``max_keep``."""
    order = np.argsort(-scores, kind="stable")
    b = boxes[order].astype(np.float64)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x2 - x1) * (y2 - y1)

    def iou_of(i: int, rest: np.ndarray) -> np.ndarray:
        w = np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest])
        h = np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest])
        inter = np.clip(w, 0, None) * np.clip(h, 0, None)
        return inter / (areas[i] + areas[rest] - inter)

    return _greedy(order, iou_of, iou, max_keep)


#: candidates whose rotated overlaps :func:`nms_rotated` measures at once (columns) and, within
#: them, better-scoring candidates per step (rows): (ROWS, COLS) float64 arrays of a few MB each
FAST_COLS, FAST_ROWS = 128, 4096


def nms_rotated(rboxes: np.ndarray, scores: np.ndarray, iou: float,
                max_keep: Optional[int] = None) -> np.ndarray:
    """Indices kept, best score first, by Fast-NMS (Bolya et al. 2019) of rotated boxes (N, 5) cx
    cy w h angle, overlap measured by probabilistic IoU (:func:`.metrics.probiou_pairs`), as
    ultralytics suppresses oriented boxes: a box goes when any better-scoring box overlaps it by
    more than ``iou``, whether that box was kept or not (greedy NMS would let a suppressed box's
    neighbours stay). At most ``max_keep``: a box's fate depends only on better ones, so the columns
    are taken in score order and the work stops once that many are kept."""
    from .metrics import probiou_pairs

    order = np.argsort(-scores, kind="stable")
    r = rboxes[order].astype(np.float64)
    n = len(r)
    limit = n if max_keep is None else max_keep
    keep: List[int] = []
    with np.errstate(divide="ignore", invalid="ignore"):
        for c0 in range(0, n, FAST_COLS):
            c1 = min(c0 + FAST_COLS, n)
            cols = np.arange(c0, c1)
            gone = np.zeros(c1 - c0, bool)
            for r0 in range(0, c1, FAST_ROWS):
                r1 = min(r0 + FAST_ROWS, c1)
                ov = probiou_pairs(r[r0:r1, None], r[None, c0:c1])
                better = np.arange(r0, r1)[:, None] < cols[None]
                gone |= (better & (ov > iou)).any(0)  # NaN does not suppress, as in torch
            keep.extend(cols[~gone].tolist())
            if len(keep) >= limit:
                break
    return order[np.asarray(keep[:limit], dtype=np.int64)]


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, conf: float = 0.001, iou: float = 0.6,
                        max_det: int = 300, multi_label: bool = True, agnostic: bool = False,
                        max_nms: int = MAX_NMS, max_wh: float = MAX_WH, with_rows: bool = False,
                        rotated: Optional[np.ndarray] = None):
    """(M, 6) detections ``x1 y1 x2 y2 score class`` from xyxy ``boxes`` (N, 4) and ``scores`` (N, C);
    with ``with_rows`` also (M,) the candidate (row of ``boxes``) each came from. With ``rotated``
    (N, 5) cx cy w h angle, the candidates' rotated boxes, those are what overlap is measured on
    (:func:`nms_rotated`)."""
    if multi_label:
        i, j = np.nonzero(scores > conf)
        s = scores[i, j]
    else:
        j = scores.argmax(1)
        s = scores[np.arange(len(j)), j]
        i = np.nonzero(s > conf)[0]
        j, s = j[i], s[i]
    if i.size == 0:
        empty = np.zeros((0, 6), dtype=np.float32)
        return (empty, np.zeros(0, np.int64)) if with_rows else empty
    if i.size > max_nms:
        top = np.argsort(-s, kind="stable")[:max_nms]
        i, j, s = i[top], j[top], s[top]
    b = boxes[i].astype(np.float64)
    offset = 0.0 if agnostic else j[:, None].astype(np.float64) * max_wh
    if rotated is not None:
        r = rotated[i].astype(np.float64)
        r[:, :2] += offset
        k = nms_rotated(r, s, iou, max_det)
    else:
        k = nms(b + offset, s, iou, max_det)
    dets = np.concatenate([b[k], s[k, None], j[k, None]], axis=1).astype(np.float32)
    return (dets, i[k].astype(np.int64)) if with_rows else dets


def scale_boxes(dets: np.ndarray, ratio: Ratio, pad, orig_hw) -> np.ndarray:
    """Map xyxy boxes from letterboxed (or stretched: ``ratio`` (x, y)) input pixels back to the
    original image, clipped to it."""
    rx, ry = ratio_xy(ratio)
    out = dets.copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - pad[0]) / rx
    out[:, [1, 3]] = (out[:, [1, 3]] - pad[1]) / ry
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, orig_hw[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, orig_hw[0])
    return out
