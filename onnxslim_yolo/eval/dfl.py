"""Raw anchor-free head maps: a YOLOv8 / YOLO11 export cut before the DFL decode.

NPU toolchains cut Ultralytics' Detect head at its last Convs and decode on the host: per level a
box map (B, 4*R, h, w) of distance-bin logits (R = 16 bins per side, the DFL ``reg_max``) and a
class map (B, C, h, w), sometimes a (B, 1, h, w) score sum beside them (Rockchip's export), which
is ignored. A GFL head exported level by level (PP-PicoDet through paddle2onnx) writes the same
two as rows: (B, h*w, 4*R) with R = 8 and (B, h*w, C). :func:`decode_maps` turns either into the
``v8`` layout, (B, 4+C, N) decoded xywh and class scores, as the Detect head does: softmax over
each side's bins, their expected value is the distance from the cell centre (half a stride into
the cell, as Ultralytics and PicoDet place it) in strides; class logits go through the sigmoid
(maps whose values all lie in [0, 1] are taken as scores already). NanoDet-Plus's single output
is another format (``gfl`` in :mod:`.decode`).

mmdet's RTMDet head cut the same way (mmdeploy's partition for NPUs) writes a plain box map
(B, 4, h, w) beside each class map: the distances to the box's sides, already in pixels (the head
multiplies them by the stride), from the cell's corner point (mmdet's point generator with offset
0 for RTMDet). Such a map is read only when a level has exactly the two maps: with a third, one
channel wide, the cut may be YOLOX's (box offsets, objectness, classes) or FCOS's (centreness),
which decode otherwise.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..pass_base import UsageError
# decode imports this module inside its functions: no import cycle
from .decode import NotDetections, known_map_dims, level_stride, probabilities, softmax

#: distance bins per side of the heads exported this way: 16 (Ultralytics' reg_max), 17 (reg_max 16
#: plus one: YOLOv6 3.0's DFL heads, whose decode is the same; PP-YOLOE's too). Other counts are left
#: alone: an anchor-based box map of 9 anchors x 4 (RetinaNet, EfficientDet) is not 9 bins.
BINS = (16, 17)
#: bins per side of heads exported as rows (B, h*w, 4R): also 8 (PicoDet's reg_max 7)
ROW_BINS = (8,) + BINS
#: "bins" of a plain box map (B, 4, h, w): distances in pixels, not bin logits (RTMDet)
DISTANCES = 1
#: the strides a row level's grid is searched over (the input size over them, rounded up)
ROW_STRIDES = (4, 8, 16, 32, 64, 128)


def dfl_layout(shapes: Sequence[Sequence]) -> Optional[Tuple[int, int, List[Tuple[int, int]]]]:
    """(bins per side R, classes C, [(box output, class output) per level, finest first]) when
    ``shapes`` are the rank-4 maps of 2 or more levels of one anchor-free head: per spatial size,
    one (B, 4R, h, w) box map (R in :data:`BINS`) and one (B, C, h, w) class map, and at most one
    (B, 1, h, w) score sum after them; or, with no third map, a plain (B, 4, h, w) box map
    (R = :data:`DISTANCES`) and the class map; the same R and C on every level. When C = 4R too,
    the first of the two in output order is the box map (Ultralytics' order). None for any other
    set of outputs. Shapes alone cannot tell a pose head's one-class map from a score sum: such a cut is
    read as boxes and keypoints."""
    if len(shapes) >= 4 and all(len(s) == 3 and known_map_dims(s) for s in shapes):
        return _row_layout(shapes)
    if len(shapes) < 4 or not all(len(s) == 4 and known_map_dims(s) for s in shapes):
        return None
    levels, kinds = [], set()
    for group in maps_by_size(shapes):
        maps = list(group)
        if len(maps) == 3:  # a score-sum map beside them: the last one-channel map
            ones = [i for i in maps if int(shapes[i][1]) == 1]
            if not ones:
                return None
            maps.remove(ones[-1])
        if len(maps) != 2:
            return None
        box = next((i for i in maps if int(shapes[i][1]) % 4 == 0 and int(shapes[i][1]) // 4 in BINS), None)
        if box is None and len(group) == 2:  # no third map: plain distances (RTMDet)
            box = next((i for i in maps if int(shapes[i][1]) == 4 * DISTANCES), None)
        if box is None:
            return None
        cls = maps[1] if box == maps[0] else maps[0]
        levels.append((box, cls))
        kinds.add((int(shapes[box][1]) // 4, int(shapes[cls][1])))
    if len(levels) < 2 or len(kinds) != 1:
        return None
    bins, nc = kinds.pop()
    return bins, nc, levels


def maps_by_size(shapes: Sequence[Sequence]) -> List[List[int]]:
    """The indices of rank-4 maps (B, C, h, w) grouped by spatial size, the largest size first."""
    by_size: Dict[Tuple[int, int], List[int]] = {}
    for i, s in enumerate(shapes):
        by_size.setdefault((int(s[2]), int(s[3])), []).append(i)
    return [by_size[hw] for hw in sorted(by_size, key=lambda hw: -hw[0] * hw[1])]


def _row_layout(shapes: Sequence[Sequence]) -> Optional[Tuple[int, int, List[Tuple[int, int]]]]:
    """:func:`dfl_layout` of rows: per row count, one (B, n, 4R) box output (R in
    :data:`ROW_BINS`) and one (B, n, C) class output; counts falling about 4x from level to
    level. None when C = 4R too (the two cannot be told apart) or for anything else."""
    by_rows: Dict[int, List[int]] = {}
    for i, s in enumerate(shapes):
        by_rows.setdefault(int(s[1]), []).append(i)
    counts = sorted(by_rows, reverse=True)
    if len(counts) < 2 or any(not 3 * b <= a <= 5 * b for a, b in zip(counts, counts[1:])):
        return None
    levels, kinds = [], set()
    for n in counts:
        pair = by_rows[n]
        boxes = [i for i in pair if int(shapes[i][2]) % 4 == 0 and int(shapes[i][2]) // 4 in ROW_BINS]
        if len(pair) != 2 or len(boxes) != 1:
            return None
        box = boxes[0]
        cls = pair[1] if box == pair[0] else pair[0]
        levels.append((box, cls))
        kinds.add((int(shapes[box][2]) // 4, int(shapes[cls][2])))
    if len(kinds) != 1:
        return None
    bins, nc = kinds.pop()
    return bins, nc, levels


def gfl_rows(shapes: Sequence[Sequence]) -> bool:
    """``shapes`` are a GFL head's rows (:func:`dfl_layout` of rank-3 outputs)."""
    return bool(shapes) and all(len(s) == 3 for s in shapes) and dfl_layout(shapes) is not None


def _row_grid(rows: int, level: int, input_hw: Optional[Sequence[int]]) -> Tuple[int, int, float]:
    """(h, w, stride) of a row level: the stride whose grid over ``input_hw`` has ``rows`` cells,
    else (without ``input_hw``) a square grid at stride 8, 16, ... by level."""
    if input_hw is not None:
        for s in ROW_STRIDES:
            h, w = -(-int(input_hw[0]) // s), -(-int(input_hw[1]) // s)
            if h * w == rows:
                return h, w, float(s)
        raise NotDetections(f"a head level of {rows} rows matches no grid of a {input_hw[0]}x{input_hw[1]} "
                            f"input at strides {ROW_STRIDES}")
    side = int(round(rows ** 0.5))
    if side * side != rows:
        raise NotDetections(f"a head level of {rows} rows is no square grid; the input size is needed")
    return side, side, float(8 * 2 ** level)


def decode_maps(outputs: Sequence[np.ndarray], input_hw: Optional[Sequence[int]] = None) -> np.ndarray:
    """The ``v8`` array (B, 4+C, N) of raw anchor-free maps (:func:`dfl_layout`), finest level
    first. A level's stride is the input height over its height (8, 16, 32, ... without
    ``input_hw``)."""
    layout = dfl_layout([o.shape for o in outputs])
    if layout is None:
        raise UsageError(f"outputs {[list(o.shape) for o in outputs]} are not raw anchor-free head maps")
    bins, _, levels = layout
    scores = probabilities([np.asarray(outputs[c], np.float32) for _, c in levels])
    proj = np.arange(bins, dtype=np.float32)
    offset = 0.0 if bins == DISTANCES else 0.5  # RTMDet's points at the cells' corners
    cols = []
    for i, (bi, _) in enumerate(levels):
        box = np.asarray(outputs[bi], np.float32)
        if box.ndim == 3:  # rows (B, h*w, 4R): as the maps' (B, 4, R, h*w)
            b = box.shape[0]
            h, w, stride = _row_grid(box.shape[1], i, input_hw)
            box = box.reshape(b, h * w, 4, bins).transpose(0, 2, 3, 1)
        else:
            b, _, h, w = box.shape
            stride = level_stride(input_hw, h, i)
        if bins == DISTANCES:  # pixels: in strides like the bins' expected values
            dist = box.reshape(b, 4, h * w) / stride
        else:
            dist = (softmax(box.reshape(b, 4, bins, h * w), 2) * proj[None, None, :, None]).sum(2)
        yv, xv = np.meshgrid(np.arange(h, dtype=np.float32) + offset, np.arange(w, dtype=np.float32) + offset,
                             indexing="ij")
        cx, cy = xv.reshape(1, -1), yv.reshape(1, -1)
        x1, y1, x2, y2 = cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]
        xywh = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1) * stride
        cls = scores[i].transpose(0, 2, 1) if scores[i].ndim == 3 else scores[i].reshape(b, -1, h * w)
        cols.append(np.concatenate([xywh, cls], 1))
    return np.concatenate(cols, 2).astype(np.float32, copy=False)


__all__ = ["dfl_layout", "decode_maps", "gfl_rows"]
