"""Raw anchor-based head maps: the outputs of a YOLOv5 / YOLOv7 export that stops before the decode.

Edge exports often end at the head: YOLOv7's ``export.py`` without ``--grid`` gives one
(B, na, h, w, 5+C) map per level, and NPU toolchains cut YOLOv5 at the head Convs, one
(B, na*(5+C), h, w) map per level. The anchors are not in such a graph. They are read from the
metadata key ``anchors`` (``[[w, h, w, h, w, h], ...]`` in pixels, one list per level, finest
level first, as in a YOLOv5 / YOLOv7 config), else YOLOv5's defaults for 3 or 4 levels.
:func:`decode_maps` turns the maps into the ``v5`` layout, (B, N, 5+C) rows of decoded xywh,
objectness and class scores, with YOLOv5's decode (which YOLOv7 shares): after the sigmoid,
xy = (2 s - 0.5 + cell) x stride and wh = (2 s)^2 x anchor.
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..pass_base import UsageError
# decode imports this module inside its functions only: no cycle
from .decode import NotDetections, declared_shapes, known_map_dims, level_stride, probabilities

log = logging.getLogger(__name__)

#: YOLOv5's default anchors (w, h pixel pairs per level, finest level first): its P3-P5 models,
#: and its P6 models (P3-P6)
DEFAULT_ANCHORS = {
    3: ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326)),
    4: ((19, 27, 44, 40, 38, 94), (96, 68, 86, 152, 180, 137), (140, 301, 303, 264, 238, 542),
        (436, 615, 739, 380, 925, 792)),
}
#: metadata key naming a model's anchors
ANCHORS_KEY = "anchors"
#: the ``--anchors`` option's help (optimize, check, eval)
ANCHORS_HELP = ("Anchors of a raw anchor-based head (outputs before the decode), JSON per level, finest "
                "first: '[[10,13,16,30,33,23],[30,61,62,45,59,119],[116,90,156,198,373,326]]' "
                "(default: the model's 'anchors' metadata, else YOLOv5's).")
#: predictions per cell assumed for (B, na*(5+C), h, w) maps when no anchors are named
DEFAULT_PER_CELL = 3


class OutputReader:
    """:func:`.decode.detection_output` with what the model's metadata says about its outputs:
    the anchors of raw anchor maps (:func:`model_anchors`), the keypoint values of a pose
    export and the angle of an obb export (:func:`.decode.extra_values`); the maps of FastestDet
    and YOLO-FastestV2, which only the graph tells apart (:mod:`.fastest`), are decoded here."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from .decode import extra_values, rotated_boxes
        from .fastest import fastestdet_map, fastestv2_maps

        self.anchors = model_anchors(model)
        self.extra = extra_values(model)
        self.rotated = rotated_boxes(model)
        self.fastest = fastestdet_map(model)
        self.fastest_v2 = fastestv2_maps(model)

    def __call__(self, outputs: Sequence[np.ndarray], input_hw: Optional[Sequence[int]]) -> np.ndarray:
        from .decode import detection_output
        from .fastest import decode_map, v2_anchor_maps, v2_anchors, v2_from_raw, v2_raw_layout

        if self.fastest and len(outputs) == 1 and outputs[0].ndim == 4:
            return decode_map(outputs[0], input_hw)
        if self.fastest_v2 and all(o.ndim == 4 for o in outputs):
            return decode_maps(v2_anchor_maps(outputs, self.fastest_v2), input_hw, v2_anchors(self.anchors))
        raw = v2_raw_layout([o.shape for o in outputs])
        if raw is not None:
            maps = v2_anchor_maps(v2_from_raw(outputs, raw[1]), raw[0])
            return decode_maps(maps, input_hw, v2_anchors(self.anchors))
        return detection_output(outputs, input_hw, self.anchors, self.extra, self.rotated)


ScoresOf = Callable[[Sequence[np.ndarray], Sequence[int]], np.ndarray]
#: the name the decoded class scores are compared under (the checks' row, the INT8 quality's entry)
CLASS_SCORES = "class scores"
#: class scores that stay below this in both runs compared (the evaluation's conf) detect nothing
#: either way; near 0 their cosine measures float noise: an unchanged random-weight YOLO12n scored
#: 0.77 on an image whose scores all read below 1e-7 (onnxruntime's optimized Sigmoid gave 0 where
#: the plain one gave 9e-8), and its INT8 copy 0.30, so the guard put every layer back in float
SCORE_FLOOR = 1e-3


def scores_detect(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether either of two runs' class scores reaches :data:`SCORE_FLOOR` (worth comparing)."""
    return max(np.max(a, initial=0.0), np.max(b, initial=0.0)) >= SCORE_FLOOR


def class_scores_reader(model: onnx.ModelProto, outputs: Sequence[np.ndarray],
                        input_hw: Sequence[int]) -> Optional[ScoresOf]:
    """``(graph outputs, input (h, w)) -> decoded class scores`` of ``model``, when ``outputs`` (one
    run's, at ``input_hw``) are candidate rows (:data:`.decode.ROW_FORMATS`); None otherwise. A
    decoded output's box pixels (up to the input size) outweigh its scores (0-1) in one cosine, so
    the scores are compared on their own: a head with swapped classes kept a cosine of 1.0000."""
    from .decode import ROW_FORMATS, decode_rows, outputs_format

    read = OutputReader(model)
    fmt = outputs_format(model, list(outputs), input_hw)
    if fmt not in ROW_FORMATS:
        return None
    return lambda outs, hw: decode_rows(read(list(outs), hw), fmt, hw)[1]


def model_anchors(model: onnx.ModelProto) -> Optional[Tuple[Tuple[float, ...], ...]]:
    """The anchors the model's metadata names (``anchors``), None when it names none. A value
    that is not a list of equal-length lists of pixel pairs is a UsageError."""
    raw = next((p.value for p in model.metadata_props if p.key == ANCHORS_KEY), None)
    return None if raw is None else parse_anchors(raw)


def parse_anchors(text: str) -> Tuple[Tuple[float, ...], ...]:
    """``[[10,13, 16,30, 33,23], [...], ...]`` (JSON) -> one tuple of pixel pairs per level."""
    try:
        levels = json.loads(text)
        out = tuple(tuple(float(v) for v in lv) for lv in levels)
    except (ValueError, TypeError) as e:
        raise UsageError(f"anchors '{text}': expected a JSON list of per-level [w, h, w, h, ...] "
                         f"lists ({e})") from None
    if not out or any(len(lv) != len(out[0]) or not lv or len(lv) % 2 or min(lv) <= 0 for lv in out):
        raise UsageError(f"anchors '{text}': every level needs the same number of positive w, h pairs")
    return out


def with_anchors(model: onnx.ModelProto, text: Optional[str], copy: bool = True) -> onnx.ModelProto:
    """``model`` with its ``anchors`` metadata set from ``text`` (``--anchors``; checked by
    :func:`parse_anchors`), on a copy unless ``copy`` is False; ``model`` itself when ``text`` is
    None. The optimized model keeps the metadata, so later runs decode it without the option."""
    if text is None:
        return model
    from .fastest import fastestv2_maps, v2_raw_layout

    anchors = parse_anchors(text)
    shapes = declared_shapes(model)
    raw_v2, levels = v2_raw_layout(shapes), len(shapes)
    v2 = fastestv2_maps(model) or (raw_v2[0] if raw_v2 else None)
    if raw_v2:
        levels = len(raw_v2[1])  # three maps a level
    layout = (v2, 0) if v2 else anchor_layout(shapes, per_cell(anchors)) or anchor_layout(shapes)
    if layout is None:
        log.warning("--anchors: the outputs %s are not raw anchor maps; the anchors are stored but not used",
                    [list(s) for s in shapes])
    else:
        _anchors_for(levels, layout[0], anchors)  # a count that does not fit fails now, not later
    value = json.dumps([list(lv) for lv in anchors])
    if copy:
        model, original = onnx.ModelProto(), model
        model.CopyFrom(original)
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != ANCHORS_KEY]
    del model.metadata_props[:]
    for k, v in keep + [(ANCHORS_KEY, value)]:
        model.metadata_props.add(key=k, value=v)
    return model


def per_cell(anchors) -> int:
    """Predictions per cell: the anchors' pairs per level, else :data:`DEFAULT_PER_CELL`."""
    return len(anchors[0]) // 2 if anchors is not None else DEFAULT_PER_CELL


def anchor_layout(shapes: Sequence[Sequence], predictions: int = DEFAULT_PER_CELL
                  ) -> Optional[Tuple[int, int]]:
    """(predictions per cell, values per prediction) when ``shapes`` are 2 or more raw head maps
    of one anchor-based head: all (B, na, h, w, 5+C), or all (B, na*(5+C), h, w) with
    ``predictions`` per cell; the same na and 5+C >= 6 on every map, and no two maps of
    one size. None for any other set of outputs."""
    if len(shapes) < 2 or not all(len(s) == len(shapes[0]) and len(s) in (4, 5) and known_map_dims(s)
                                  for s in shapes):
        return None
    if len(shapes[0]) == 5:
        na, no = int(shapes[0][1]), int(shapes[0][4])
        same = all(int(s[1]) == na and int(s[4]) == no for s in shapes)
    else:
        ch = int(shapes[0][1])
        na, no = predictions, ch // predictions
        same = ch % predictions == 0 and all(int(s[1]) == ch for s in shapes)
    sizes = [(int(s[2]), int(s[3])) for s in shapes]  # (h, w) in both layouts
    if not same or no < 6 or len(set(sizes)) != len(sizes):
        return None
    return na, no


def known(levels: int, anchors) -> bool:
    """Whether raw maps of ``levels`` levels can be decoded: anchors named, or YOLOv5 defaults."""
    return anchors is not None or levels in DEFAULT_ANCHORS


def _anchors_for(levels: int, na: int, anchors) -> np.ndarray:
    if not known(levels, anchors):
        raise NotDetections(f"raw head maps of {levels} levels, and YOLOv5 has no default anchors for "
                            f"{levels} levels: name them with --anchors (or the model's '{ANCHORS_KEY}' "
                            "metadata)")
    if anchors is None:
        anchors = DEFAULT_ANCHORS[levels]
    a = np.asarray(anchors, np.float32).reshape(len(anchors), -1, 2)
    if a.shape[:2] != (levels, na):
        raise UsageError(f"anchors name {a.shape[0]} levels of {a.shape[1]} but the head has {levels} "
                         f"levels of {na} predictions per cell")
    return a


def decode_maps(outputs: Sequence[np.ndarray], input_hw: Optional[Sequence[int]] = None,
                anchors=None) -> np.ndarray:
    """The ``v5`` rows (B, N, 5+C) of raw anchor maps (:func:`anchor_layout`), finest level
    first. A level's stride is the input height over its height (8, 16, 32, ... without
    ``input_hw``). Maps whose values all lie in [0, 1] are taken as already through the sigmoid."""
    layout = anchor_layout([o.shape for o in outputs], per_cell(anchors))
    if layout is None:
        raise UsageError(f"outputs {[list(o.shape) for o in outputs]} are not raw anchor maps")
    na, no = layout
    maps = sorted(outputs, key=lambda o: -int(o.shape[2]))  # h, in both layouts
    grid_a = _anchors_for(len(maps), na, anchors)
    rows = []
    for i, s in enumerate(probabilities([np.asarray(m, np.float32) for m in maps])):
        if s.ndim == 4:  # (B, na*no, h, w) -> (B, na, h, w, no)
            s = s.reshape(s.shape[0], na, no, s.shape[2], s.shape[3]).transpose(0, 1, 3, 4, 2)
        b, _, h, w, _ = s.shape
        stride = level_stride(input_hw, h, i)
        yv, xv = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        cell = np.stack([xv, yv], -1)[None, None]
        xy = (s[..., :2] * 2.0 - 0.5 + cell) * stride
        wh = (s[..., 2:4] * 2.0) ** 2 * grid_a[i][None, :, None, None, :]
        rows.append(np.concatenate([xy, wh, s[..., 4:]], -1).reshape(b, -1, no))
    return np.concatenate(rows, 1).astype(np.float32, copy=False)


__all__ = ["ANCHORS_KEY", "CLASS_SCORES", "DEFAULT_ANCHORS", "anchor_layout", "class_scores_reader",
           "decode_maps", "model_anchors", "parse_anchors", "per_cell", "with_anchors"]
