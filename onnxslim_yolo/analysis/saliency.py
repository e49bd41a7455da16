"""Where the detector finds objects: per-image saliency maps from the model's own detections.

For a known YOLO output layout (v5, v8, yolox; rows ordered per stride 8/16/32, anchor, y, x),
each candidate's best class score is written at its grid cell, and the map (at the finest stride)
is the maximum over anchors and strides. Least-squares statistics sample Conv output positions
partly in proportion to this map, so that reconstructions are accurate where boxes are decoded,
not only on background. Returns None for unknown layouts (then sampling stays uniform).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import onnx

from .. import ir, verify
from ..pass_base import SlimError
from .activations import Feeds

log = logging.getLogger(__name__)

STRIDES = (8, 16, 32)


def layout(model: onnx.ModelProto):
    """(format, input hw) of a YOLO detector whose candidates are the rows of its outputs: a single
    output, or a segmentation export's candidates beside its prototype masks (read by
    :class:`..eval.anchors.OutputReader` without their mask coefficients); (None, None) otherwise."""
    from ..data import model_input
    from ..eval.decode import _static_output_shape, row_format, segment_format
    try:
        hw = model_input(model)[1][1:]
        fmt = row_format(model, _static_output_shape(model), hw) or segment_format(model, hw)
    except Exception:  # unknown layout: uniform sampling
        return None, None
    return (fmt, hw) if fmt else (None, None)


class Watch(NamedTuple):
    """What a row-by-row detection metric watches: ``tensors`` in this order, the first ``boxes``
    of them read by the model's OutputReader as ``fmt`` candidates; the indices, among them, of
    the mask coefficients (the candidates holding them last, or a (1, N, nm) tensor) and the
    prototype masks of a segmentation model, of the keypoints (likewise) of a pose model, and of
    the (1, N, 1) angles fed into an end-to-end obb model's selection (its boxes then cx cy w h)."""

    tensors: List[str]
    fmt: str
    hw: Tuple[int, ...]
    boxes: int = 1
    coefs: Optional[int] = None
    protos: Optional[int] = None
    keypoints: Optional[int] = None
    angles: Optional[int] = None


def detection_watch(model: onnx.ModelProto) -> Optional[Watch]:
    """:class:`Watch` for row-by-row detection metrics, or None: the single output of a known YOLO
    layout (a segmentation export's candidates with its prototypes), a boxes + scores pair of
    outputs, raw head maps (every output, decoded as ``v5`` or ``v8``), or for a model with a
    selection inside (NMS, TopK) the boxes (1, N, 4) and scores fed into it (read as ``xyxy``),
    with the mask coefficients or keypoints fed into it too (:func:`_frontier_extras`)."""
    from ..eval.decode import keypoint_shape
    fmt, hw = layout(model)
    outputs = [o.name for o in model.graph.output]
    if fmt is not None:  # every output: a segmentation export's are read together
        seg = len(outputs) == 2
        return Watch(outputs, fmt, tuple(hw), len(outputs), 0 if seg else None, 1 if seg else None,
                     0 if keypoint_shape(model) else None)
    from .. import verify
    from ..data import model_input
    from ..eval.decode import declared_shapes, raw_maps_format, split_layout, value_dims
    raw = raw_maps_format(model, declared_shapes(model))
    if raw is not None:
        try:
            return Watch(outputs, raw, tuple(model_input(model)[1][1:]), len(outputs))
        except Exception:  # noqa: BLE001 -- dynamic input size: no fixed layout
            return None
    pair = split_layout(declared_shapes(model))
    if pair is not None:  # boxes + scores outputs
        try:
            hw = model_input(model)[1][1:]
        except Exception:  # noqa: BLE001 -- dynamic input size: no fixed layout
            return None
        return Watch([outputs[pair[0]], outputs[pair[1]]], "xyxy", tuple(hw), 2)
    frontier, selected = verify.selection_frontier(model)
    if not frontier:
        return None
    try:
        hw = model_input(model)[1][1:]
        inferred = ir.inferred_values(model)
    except Exception:  # noqa: BLE001 -- no shapes: no candidate layout
        return None
    shapes = {vi.name: value_dims(vi) for vi in inferred}
    shapes.update((o.name, value_dims(o)) for o in model.graph.output)
    for a in frontier:
        for b in frontier:
            if a != b and a in shapes and b in shapes and split_layout([shapes[a], shapes[b]]) is not None:
                pair = Watch([a, b], "xyxy", tuple(hw), 2)
                return _frontier_extras(model, pair, frontier, selected, shapes)
    return None


def _frontier_extras(model: onnx.ModelProto, pair: Watch, frontier: Sequence[str], selected: Sequence[str],
                     shapes: Dict[str, Tuple]) -> Optional[Watch]:
    """``pair`` (the boxes and scores fed into a selection) with what else the candidates carry
    into it: a segmentation model's (1, N, nm) mask coefficients, beside the (1, nm, h, w)
    prototypes it outputs without selecting them; a pose model's (1, N, K x D) keypoints; an obb
    model's (1, N, 1) angles. None when an output that is not selected is anything else, or an
    obb model's angles are not found (their change would go unmeasured)."""
    from ..eval.decode import keypoint_shape, rotated_boxes
    rows = shapes[pair.tensors[0]][1]
    rest = [o.name for o in model.graph.output if o.name not in selected]

    def fed(width: int) -> Optional[str]:
        return next((t for t in frontier if shapes.get(t) == (1, rows, width)), None) if rows else None

    if rest:
        proto = shapes.get(rest[0], ())
        coef = fed(proto[1]) if len(rest) == 1 and len(proto) == 4 and proto[1] else None
        if coef is None:
            return None
        return pair._replace(tensors=pair.tensors + [coef, rest[0]], coefs=2, protos=3)
    if rotated_boxes(model):
        angle = fed(1)
        return pair._replace(tensors=pair.tensors + [angle], angles=2) if angle else None
    kpt = keypoint_shape(model)
    found = fed(kpt[0] * kpt[1]) if kpt else None
    return pair._replace(tensors=pair.tensors + [found], keypoints=2) if found else pair


def detection_map(scores: np.ndarray, hw: Sequence[int]) -> Optional[np.ndarray]:
    """(H/8, W/8) map of the best score per cell, from per-row best scores in YOLO row order."""
    grids = [(math.ceil(hw[0] / s), math.ceil(hw[1] / s)) for s in STRIDES]
    cells = sum(h * w for h, w in grids)
    if len(scores) % cells:
        return None
    na = len(scores) // cells
    out = np.zeros(grids[0], np.float32)
    start = 0
    for (h, w), s in zip(grids, STRIDES):
        block = scores[start:start + na * h * w].reshape(na, h, w).max(axis=0)
        start += na * h * w
        up = np.repeat(np.repeat(block, s // STRIDES[0], axis=0), s // STRIDES[0], axis=1)
        out = np.maximum(out, up[:grids[0][0], :grids[0][1]])
    return out


def saliency_maps(model: onnx.ModelProto, feeds: Sequence[Feeds], threads: int = 1
                  ) -> Optional[List[np.ndarray]]:
    """One map per feed (batch 1), or None when the output layout is not a known YOLO format."""
    fmt, hw = layout(model)
    if fmt is None:
        return None
    from ..eval.anchors import OutputReader
    from ..eval.decode import decode
    sess = verify.session(model, optimize=True, threads=threads)
    read = OutputReader(model)
    maps: List[np.ndarray] = []
    for f in feeds:
        try:
            _, scores = decode(read(verify.run(sess, f), hw), fmt, hw)
        except SlimError as exc:
            log.info("saliency: %s; uniform sampling", exc)
            return None
        m = detection_map(scores.max(axis=1), hw)
        if m is None:
            log.info("saliency: output rows do not match the stride grid; uniform sampling")
            return None
        maps.append(m)
    return maps


def cell_weights(sal: np.ndarray, ho: int, wo: int, mix: float = 0.5) -> np.ndarray:
    """Sampling probabilities over a (ho, wo) output grid: ``mix`` uniform, the rest saliency."""
    ys = np.minimum(((np.arange(ho) + 0.5) * sal.shape[0] / ho).astype(int), sal.shape[0] - 1)
    xs = np.minimum(((np.arange(wo) + 0.5) * sal.shape[1] / wo).astype(int), sal.shape[1] - 1)
    s = sal[np.ix_(ys, xs)].astype(np.float64).ravel()
    u = np.full(s.size, 1.0 / s.size)
    if s.sum() <= 0:
        return u
    return mix * u + (1 - mix) * s / s.sum()
