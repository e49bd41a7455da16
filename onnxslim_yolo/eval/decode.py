"""Decode raw YOLO outputs into candidate boxes and per-class scores (input-pixel coordinates).

Formats:
  ``v5``    (1, N, 5+C) decoded xywh, objectness, class scores; score = obj * cls.
  ``v8``    (1, 4+C, N) decoded xywh and class scores, no objectness (YOLOv8/11, ultralytics).
  ``yolox`` (1, N, 5+C) raw YOLOX head: xy offsets from the grid cell and log wh per stride
            8/16/32, sigmoid obj and cls; score = obj * cls. An export that already decoded the
            boxes (``decode_in_inference``) is recognised from its values and read like ``v5``.
  ``xyxy``  two outputs, boxes (1, N, 4) x1 y1 x2 y2 and class scores (1, N, C) or (1, C, N), no
            objectness (YOLO-NAS, PP-YOLOE, DAMO-YOLO exports); :func:`detection_output` joins
            them into one (1, N, 4+C) array.
  ``dets``  (1, K, 6) detections after NMS, ``x1 y1 x2 y2 score class`` (ultralytics ``nms=True``
            and end-to-end exports). Rows are not candidates: they do not correspond between two
            models, so only NMS-level comparisons (mAP, agreement) apply, not row-by-row ones.
  ``dets7`` (K, 7) detections after NMS, ``batch x1 y1 x2 y2 class score`` (the YOLOv7
            end-to-end export for onnxruntime); read like ``dets``, one image at a time.
  ``gfl``   (1, N, C+32) NanoDet-Plus's export: per grid point at strides 8/16/32/64, C class
            scores (through the sigmoid) and 4 x 8 distance-bin logits (GFL, ``reg_max`` 7);
            the distances count from the cell's corner (x, y) * stride, as NanoDet-Plus does.
Raw head maps (per level, before the decode) are decoded by :func:`detection_output`: anchor-based
ones into ``v5`` rows (:mod:`.anchors`), anchor-free DFL ones into the ``v8`` layout (:mod:`.dfl`).
"""
from __future__ import annotations

import ast
import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..pass_base import UsageError, warn_once

log = logging.getLogger(__name__)

FORMATS = ("v5", "v8", "yolox", "xyxy", "dets", "dets7", "gfl")
#: formats whose rows are candidates in a fixed order (row i of two models is the same anchor)
ROW_FORMATS = ("v5", "v8", "yolox", "xyxy", "gfl")
ALIASES = {"yolov5": "v5", "yolov8": "v8", "yolo11": "v8", "yolov11": "v8", "v11": "v8",
           "ultralytics": "v8"}
STRIDES = (8, 16, 32)
#: NanoDet-Plus's strides and distance bins per side (``gfl``)
GFL_STRIDES = (8, 16, 32, 64)
GFL_BINS = 8


class NotDetections(UsageError):
    """The model's output is not a YOLO detection layout this module decodes (a classifier, a
    segmentation or pose export, ...): evaluation refuses it, checks skip detection metrics."""


def normalize_format(fmt: str) -> str:
    f = ALIASES.get(fmt.lower(), fmt.lower())
    if f not in FORMATS:
        raise UsageError(f"unknown output format '{fmt}'; choose one of {', '.join(FORMATS)}")
    return f


def _metadata(model: onnx.ModelProto) -> Dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def exporter_family(model: onnx.ModelProto) -> Tuple[Optional[str], str]:
    """(family, task) from the metadata: 'yolox' when named, 'v8' for ultralytics exports
    (task/imgsz/author keys; task 'detect', 'segment', 'pose', ...), 'v5' for yolov5."""
    meta = _metadata(model)
    text = " ".join([model.producer_name, model.graph.name, *meta.keys(), *meta.values()]).lower()
    if "yolox" in text:
        return "yolox", "detect"
    if "task" in meta or "imgsz" in meta or "ultralytics" in meta.get("author", "").lower():
        return "v8", meta.get("task", "detect")
    if "stride" in meta and "names" in meta:
        return "v5", "detect"
    return None, "detect"


def format_from_metadata(model: onnx.ModelProto) -> Optional[str]:
    """The output format the metadata names (see :func:`exporter_family`); ultralytics exports of
    another task than 'detect' raise: their outputs are not boxes and class scores alone. A
    'segment' or 'pose' export is read for its boxes: its mask coefficients or keypoints are
    dropped (:func:`mask_coefficients`, :func:`keypoint_values`). An 'obb' export is read for the
    axis-aligned boxes around its rotated ones (:func:`rotated_boxes`)."""
    family, task = exporter_family(model)
    if (task == "segment" and mask_coefficients(declared_shapes(model))
            or task == "pose" and keypoint_values(model) or task == "obb"):
        return family
    if task != "detect":
        raise NotDetections(f"model is an ultralytics '{task}' export; only 'detect' models are evaluated")
    return family


def _kpt_dims(model: onnx.ModelProto) -> Tuple[int, ...]:
    """The dims of an ultralytics 'pose' export's metadata ``kpt_shape``; () for other models."""
    meta = _metadata(model)
    if meta.get("task") != "pose":   # exporter_family's task: ultralytics writes the key
        return ()
    try:
        return tuple(int(d) for d in ast.literal_eval(meta.get("kpt_shape", "")))
    except (ValueError, SyntaxError, TypeError):
        return ()


def keypoint_values(model: onnx.ModelProto) -> int:
    """Values per candidate after the class scores of an ultralytics 'pose' export: the product of
    its metadata's ``kpt_shape`` (17 keypoints x (x, y, visibility) = 51); 0 for other models."""
    dims = _kpt_dims(model)
    n = int(np.prod(dims)) if dims else 0
    return n if n > 0 else 0


def keypoint_shape(model: onnx.ModelProto) -> Optional[Tuple[int, int]]:
    """(keypoints, values each) of a pose export whose ``kpt_shape`` is (K, 3) (x, y, visibility)
    or (K, 2); None otherwise."""
    dims = _kpt_dims(model)
    return (dims[0], dims[1]) if len(dims) == 2 and dims[0] > 0 and dims[1] in (2, 3) else None


def rotated_boxes(model: onnx.ModelProto) -> bool:
    """An ultralytics 'obb' export: (1, 4+C+1, N), each candidate's last value the angle (radians)
    of its rotated box cx cy w h, or end to end (1, K, 7) rows ``cx cy w h score class angle``
    after its own selection. The evaluator reads the axis-aligned box around each (and the labels'
    polygons as theirs, :mod:`.metrics`) for ``map``, and the rotated boxes for ``obb_map``
    (:mod:`.instances`)."""
    return _metadata(model).get("task") == "obb"


def extra_values(model: onnx.ModelProto) -> int:
    """Values after each candidate's class scores: a pose export's keypoints, an obb export's angle."""
    return keypoint_values(model) or int(rotated_boxes(model))


def enclosing_boxes(out: np.ndarray) -> np.ndarray:
    """(B, 4+C+1, N) rotated candidates (cx cy w h, scores, angle) -> (B, 4+C, N) with each w h
    that of the axis-aligned box around the rotated one; end-to-end rows (B, K, 7) ``cx cy w h
    score class angle`` -> ``dets`` rows (B, K, 6) ``x1 y1 x2 y2 score class`` of those boxes."""
    rows = _trailing_axis(out.shape) == 2
    a = out.transpose(0, 2, 1) if rows else out   # (B, values, N)
    c, s = np.abs(np.cos(a[:, -1])), np.abs(np.sin(a[:, -1]))
    w, h = a[:, 2], a[:, 3]
    box = a[:, :-1].astype(np.float32, copy=True)
    box[:, 2], box[:, 3] = w * c + h * s, w * s + h * c
    if not rows:
        return box
    half = box[:, 2:4] / 2
    box[:, 0:2], box[:, 2:4] = box[:, 0:2] - half, box[:, 0:2] + half
    return box.transpose(0, 2, 1)


def split_layout(shapes: Sequence[Sequence]) -> Optional[Tuple[int, int, bool]]:
    """(boxes index, scores index, scores channels-first) when ``shapes`` are exactly two outputs,
    boxes (B, N, 4) and scores (B, N, C) or (B, C, N); else None. Two (B, N, 4) outputs (four
    classes) are taken in their order, boxes first."""
    if len(shapes) != 2 or any(len(s) != 3 for s in shapes):
        return None
    for bi in (0, 1):
        box, sc = shapes[bi], shapes[1 - bi]
        n = box[1]
        if box[2] != 4 or not isinstance(n, (int, np.integer)) or n <= 0:
            continue
        if sc[1] == n and (sc[2] != 4 or bi == 0):
            return bi, 1 - bi, False
        if sc[2] == n and sc[1] != n:
            return bi, 1 - bi, True
    return None


def _same_dims(a: Sequence, b: Sequence) -> bool:
    """Equal dims, a dim that is not a fixed number (None) matching any."""
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def nms_layout(shapes: Sequence[Sequence]) -> Optional[str]:
    """Detections after an NMS inside the model, spread over several outputs: "labels" for
    mmdeploy's ``dets`` (B, K, 5) ``x1 y1 x2 y2 score`` and ``labels`` (B, K); "end2end" for
    TensorRT EfficientNMS's four, ``num_dets`` (B, 1), boxes (B, K, 4), scores (B, K) and
    classes (B, K) (an export that builds them from ONNX ops); "paddle" for PaddleDetection's
    MultiClassNMS through paddle2onnx, (K, 6) ``class score x1 y1 x2 y2`` rows of every image in
    turn and the count per image (B,); None for any other outputs."""
    ranks = [len(s) for s in shapes]
    if ranks == [3, 2] and shapes[0][2] == 5 and _same_dims(shapes[0][:2], shapes[1]):
        return "labels"
    if ranks == [2, 1] and shapes[0][1] == 6:
        return "paddle"
    if ranks == [2, 3, 2, 2] and shapes[0][1] in (1, None) and shapes[1][2] == 4 \
            and _same_dims(shapes[1][:2], shapes[2]) and _same_dims(shapes[1][:2], shapes[3]):
        return "end2end"
    return None


def nms_rows(outputs: Sequence[np.ndarray], layout: str) -> np.ndarray:
    """The outputs of an :func:`nms_layout` as one (B, K, 6) ``x1 y1 x2 y2 score class`` array,
    the ``dets`` format; rows past an end2end export's ``num_dets`` get score 0 (padding)."""
    if layout == "labels":
        dets, labels = outputs
        return np.concatenate([dets.astype(np.float32), labels[..., None].astype(np.float32)], axis=2)
    if layout == "paddle":
        rows, counts = outputs[0].astype(np.float32), outputs[1].reshape(-1).astype(np.int64)
        out = np.zeros((len(counts), max(int(counts.max(initial=0)), 1), 6), np.float32)
        for b, (start, n) in enumerate(zip(np.cumsum(counts) - counts, counts)):
            r = rows[start:start + n]
            out[b, :len(r)] = np.concatenate([r[:, 2:6], r[:, 1:2], r[:, :1]], axis=1)
        out[..., 4] = np.where(out[..., 5] < 0, 0, out[..., 4])  # a class -1 row: no detection
        return out
    num, boxes, scores, classes = outputs
    scores = np.where(np.arange(scores.shape[1])[None] < num.reshape(-1, 1), scores, 0)
    return np.concatenate([boxes.astype(np.float32), scores[..., None].astype(np.float32),
                           classes[..., None].astype(np.float32)], axis=2)


def mask_coefficients(shapes: Sequence[Sequence]) -> int:
    """Mask coefficients per candidate in an instance-segmentation export: two outputs, the
    candidates (rank 3, e.g. YOLOv5-seg's (1, N, 5+C+nm)) and the prototype masks (1, nm, h, w).
    nm (the prototypes' channels) then; 0 for any other set of outputs."""
    if len(shapes) != 2 or len(shapes[0]) != 3 or len(shapes[1]) != 4:
        return 0
    nm = shapes[1][1]
    return int(nm) if isinstance(nm, (int, np.integer)) and nm > 0 else 0


def _trailing_axis(shape: Sequence) -> int:
    """The axis of a (B, N, values) or (B, values, N) candidates output that holds each
    candidate's values: 2 when candidates are in rows (more of them than values), else 1."""
    return 2 if shape[1] > shape[2] else 1


def boxes_shape(shapes: Sequence[Sequence], extra: int = 0) -> Tuple:
    """The first output's shape as :func:`detection_output` leaves it: without the mask
    coefficients of a segmentation export or ``extra`` keypoint values (a dim that is not a
    number leaves it as it is)."""
    shape = tuple(shapes[0])
    nm = mask_coefficients(shapes) or extra
    if not nm or len(shape) != 3 or not all(isinstance(d, (int, np.integer)) for d in shape[1:]):
        return shape
    axis = _trailing_axis(shape)
    return tuple(d - nm if k == axis else d for k, d in enumerate(shape))


def detection_output(outputs: Sequence[np.ndarray], input_hw: Optional[Sequence[int]] = None,
                     anchors=None, extra: int = 0, rotated: bool = False) -> np.ndarray:
    """The one array :func:`decode` reads from a model's outputs: the first output, without the
    trailing mask coefficients of a segmentation export (:func:`mask_coefficients`), for a
    boxes + scores pair (:func:`split_layout`) the two joined into (B, N, 4+C), for raw anchor
    maps (:mod:`.anchors`, with ``anchors`` from :func:`.anchors.model_anchors`) their decoded
    ``v5`` rows, for raw anchor-free maps (:mod:`.dfl`) their decoded ``v8`` array, and for
    detections after an NMS over several outputs (:func:`nms_layout`) their ``dets`` rows.
    ``extra`` values after each candidate's class scores are dropped too (a pose export's
    keypoints, :func:`keypoint_values`); with ``rotated`` the one extra value is an obb export's
    angle, and the boxes become the axis-aligned ones around the rotated boxes (:func:`enclosing_boxes`)."""
    from . import anchors as anchor_maps, dfl
    shapes = [o.shape for o in outputs]
    if anchor_maps.anchor_layout(shapes, anchor_maps.per_cell(anchors)) is not None:
        return anchor_maps.decode_maps(outputs, input_hw, anchors)
    if dfl.dfl_layout(shapes) is not None:
        return dfl.decode_maps(outputs, input_hw)
    nms = nms_layout(shapes)
    if nms is not None:
        return nms_rows(outputs, nms)
    split = split_layout(shapes)
    if split is None:
        nm = mask_coefficients(shapes) or extra
        out = outputs[0]
        if rotated and out.ndim == 3:
            return enclosing_boxes(out)
        if not nm:
            return out
        # candidates in rows (B, N, 5+C+nm), or channels first (B, 4+C+nm, N)
        return out[:, :, :-nm] if _trailing_axis(out.shape) == 2 else out[:, :-nm, :]
    bi, si, channels_first = split
    scores = outputs[si].transpose(0, 2, 1) if channels_first else outputs[si]
    return np.concatenate([outputs[bi].astype(np.float32, copy=False),
                           scores.astype(np.float32, copy=False)], axis=2)


def raw_maps_format(model: onnx.ModelProto, shapes: Sequence[Sequence]) -> Optional[str]:
    """The format :func:`detection_output` decodes raw head maps of ``model`` with these
    ``shapes`` into: ``v5`` for anchor-based maps (:mod:`.anchors`), ``v8`` for anchor-free ones
    (:mod:`.dfl`) and FastestDet's map, ``v5`` for YOLO-FastestV2's (:mod:`.fastest`); None when
    the shapes are not raw head maps, or are anchor maps of a level count with no anchors to
    decode them (those raise NotDetections in :func:`detection_output`)."""
    from . import anchors as anchor_maps, dfl
    from .fastest import head_kind
    kind = head_kind(model, shapes)
    if kind is not None:
        return {"fastestdet": "v8", "yolo-fastestv2": "v5"}[kind]
    anchors = anchor_maps.model_anchors(model)
    if anchor_maps.anchor_layout(shapes, anchor_maps.per_cell(anchors)) is not None:
        return "v5" if anchor_maps.known(len(shapes), anchors) else None
    return "v8" if dfl.dfl_layout(shapes) is not None else None


def outputs_format(model: onnx.ModelProto, outputs: Sequence[np.ndarray],
                   input_hw: Optional[Sequence[int]] = None) -> str:
    """:func:`detect_format` from a run's outputs (their real shapes, dynamic axes included)."""
    if split_layout([o.shape for o in outputs]) is not None:
        return "xyxy"
    if nms_layout([o.shape for o in outputs]) is not None:
        return "dets"
    raw = raw_maps_format(model, [o.shape for o in outputs])
    if raw is not None:
        return raw
    shape = boxes_shape([o.shape for o in outputs], extra_values(model))
    return detect_format(model, output_shape=shape, input_hw=input_hw)


def value_dims(vi: onnx.ValueInfoProto) -> Tuple:
    """A tensor's declared dims, None where not a fixed number."""
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)


def declared_shapes(model: onnx.ModelProto) -> List[Tuple]:
    """The graph outputs' declared dims (:func:`value_dims`), in output order."""
    return [value_dims(o) for o in model.graph.output]


def grid_size(input_hw: Sequence[int], strides: Sequence[int] = STRIDES) -> int:
    """Number of anchor points of an anchor-free head over ``strides``."""
    return sum(math.ceil(input_hw[0] / s) * math.ceil(input_hw[1] / s) for s in strides)


def gfl_shape(rows: int, values: int, input_hw: Optional[Sequence[int]]) -> bool:
    """A (1, rows, values) output has NanoDet-Plus's shape: a row per grid point at strides 8-64
    and more than the 4 x 8 bin logits per row (:func:`decoded_in_graph` tells it from a decoded
    P6 head of the same shape)."""
    return input_hw is not None and values > 4 * GFL_BINS and rows == grid_size(input_hw, GFL_STRIDES)


def format_from_shape(shape: Sequence, input_hw: Optional[Sequence[int]], gfl: bool = True) -> Optional[str]:
    """Guess from the output layout: channels-first -> v8; N == grid points at strides 8-64 and
    more than 32 values per row -> gfl (unless ``gfl`` is False); N == grid points at 8-32 ->
    yolox; 6 values per row and fewer rows than anchors -> dets (after NMS); else v5."""
    dims = list(shape)[-2:] if len(shape) >= 2 else []
    if len(dims) != 2 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
        return None
    a, b = int(dims[0]), int(dims[1])
    if a < b:
        return "v8" if a > 4 else None
    if b < 6:
        return None
    if gfl and gfl_shape(a, b, input_hw):
        return "gfl"
    if input_hw is not None and a == grid_size(input_hw):
        return "yolox"
    if b == 6 and _few_rows(a, input_hw):
        return "dets"
    return "v5"


def _few_rows(rows: int, input_hw: Optional[Sequence[int]]) -> bool:
    """Fewer rows than a YOLO head has candidates (one per grid point at strides 8/16/32)."""
    return rows < (grid_size(input_hw) if input_hw is not None else 1000)


def _static_output_shape(model: onnx.ModelProto) -> Tuple:
    return declared_shapes(model)[0]


def _format_from(model: onnx.ModelProto, shape: Sequence,
                 input_hw: Optional[Sequence[int]]) -> Optional[str]:
    fmt = format_from_metadata(model)
    if len(shape) == 2 and shape[-1] in (6, 7) and _after_selection(model):
        return "dets7" if shape[-1] == 7 else "dets"   # (K, 7) with the image index, (K, 6) without
    if len(shape) == 3 and shape[-1] == 6 and _after_selection(model):
        return "dets"  # (1, K, 6) computed from an NMS / TopK inside the model
    if len(shape) == 3 and shape[0] in (1, None) and shape[-1] == 7 and not rotated_boxes(model) \
            and _after_selection(model):
        return "dets7"  # (1, K, 7): the (K, 7) rows given a batch axis (an obb export's are its own)
    if fmt and len(shape) == 3 and shape[-1] == 6 and isinstance(shape[-2], (int, np.integer)):
        rows = int(shape[-2])
        # (1, K, 6) is not the (1, 4+C, N) v8 layout, nor a head with fewer rows than anchors
        if (fmt == "v8" and rows > 6) or _few_rows(rows, input_hw):
            return "dets"
    if fmt:
        return fmt
    guess = format_from_shape(shape, input_hw)
    if guess == "gfl" and decoded_in_graph(model):  # a decoded P6 head (YOLOv6n6) has as many rows
        guess = format_from_shape(shape, input_hw, gfl=False)
    return guess


#: ops of a decode (grid offsets, strides, exp sizes, a DFL projection); a GFL export has none
#: between its last Convs and its output, only a sigmoid and layout ops
DECODE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Exp", "Pow", "Softmax", "MatMul"})


def decoded_in_graph(model: onnx.ModelProto) -> bool:
    """Whether the first graph output is computed from its last Convs through decode arithmetic
    (:data:`DECODE_OPS`): walking up from the output, stopping at Convs and graph inputs."""
    producer = {o: n for n in model.graph.node for o in n.output}
    stack, seen = [model.graph.output[0].name], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in seen or node.op_type == "Conv":
            continue
        seen.add(id(node))
        if node.op_type in DECODE_OPS:
            return True
        stack.extend(node.input)
    return False


def _after_selection(model: onnx.ModelProto) -> bool:
    """The first graph output is computed from an NMS, TopK or NonZero."""
    from ..verify import selection_frontier
    return model.graph.output[0].name in selection_frontier(model)[1]


def detect_format(model: onnx.ModelProto, output_shape: Optional[Sequence[int]] = None,
                  input_hw: Optional[Sequence[int]] = None) -> str:
    """Output format of ``model``: a boxes + scores pair of outputs is ``xyxy``; else metadata
    first (an ultralytics (1, K, 6) output is ``dets``), then the (given or declared) layout."""
    if split_layout(declared_shapes(model)) is not None:
        return "xyxy"
    if nms_layout(declared_shapes(model)) is not None:
        return "dets"
    raw = raw_maps_format(model, declared_shapes(model)) if output_shape is None else None
    if raw is not None:
        return raw
    if input_hw is None:
        from ..data import model_input
        try:
            input_hw = model_input(model)[1][1:]
        except UsageError:
            input_hw = None
    shape = output_shape if output_shape is not None else boxes_shape(declared_shapes(model),
                                                                       extra_values(model))
    return _format_from(model, shape, input_hw) or "v5"


def row_format(model: onnx.ModelProto, shape: Sequence, input_hw: Optional[Sequence[int]]) -> Optional[str]:
    """The format of a single-output model whose output ``shape`` holds candidates row by row
    (:data:`ROW_FORMATS`), for metrics that compare two models row by row; None otherwise
    (unknown layout, several outputs, detections after NMS). Raises NotDetections for
    ultralytics exports of another task."""
    if len(model.graph.output) != 1 or len(shape) != 3:
        return None
    # a pose export's rows without their keypoints: (1, 300, 57) after a selection is not v8's (1, 4+C, N)
    fmt = _format_from(model, boxes_shape([shape], extra_values(model)), input_hw)
    return fmt if fmt in ROW_FORMATS else None


def segment_format(model: onnx.ModelProto, input_hw: Optional[Sequence[int]]) -> Optional[str]:
    """:func:`row_format` of a segmentation export's candidates (its first output beside the
    prototype masks, read without the mask coefficients, :func:`mask_coefficients`); None for
    any other set of outputs or an unknown layout."""
    shapes = declared_shapes(model)
    if len(model.graph.output) != 2 or not mask_coefficients(shapes):
        return None
    fmt = _format_from(model, boxes_shape(shapes), input_hw)
    return fmt if fmt in ROW_FORMATS else None


def trailing_values(out: np.ndarray, n: int) -> np.ndarray:
    """(N, n): the last ``n`` values of each candidate (batch 1; in rows, or channels first as
    ultralytics writes them): a segmentation export's mask coefficients, a pose export's keypoints."""
    a = out[0]
    return a[:, -n:] if _trailing_axis(out.shape) == 2 else a[-n:, :].T


# ----------------------------------------------------------------------------------- decoding
def xywh2xyxy(x: np.ndarray) -> np.ndarray:
    y = np.empty_like(x)
    half = x[:, 2:4] / 2
    y[:, :2] = x[:, :2] - half
    y[:, 2:] = x[:, :2] + half
    return y


def _squeeze(out: np.ndarray) -> np.ndarray:
    if out.ndim == 3:
        if out.shape[0] != 1:
            raise UsageError(f"output batch is {out.shape[0]}; evaluation runs one image at a time")
        out = out[0]
    if out.ndim != 2 or out.shape[0] == 1:
        raise NotDetections(f"output of shape {list(out.shape)}; expected (1, N, 5+C) or (1, 4+C, N)")
    return out.astype(np.float32, copy=False)


def _check_obj(p: np.ndarray) -> None:
    if p.shape[1] < 6:
        raise NotDetections(f"output rows have {p.shape[1]} values; expected xywh, obj and class scores")


def _decode_obj(p: np.ndarray, corners: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    return (p[:, :4] if corners else xywh2xyxy(p[:, :4])), p[:, 5:] * p[:, 4:5]


#: candidates needed to tell corner boxes from centre-size ones by their values (:func:`_corners`)
ORDER_ROWS = 200


def _corners(boxes: np.ndarray, fmt: str) -> bool:
    """Whether a head's candidate boxes are x1 y1 x2 y2 corners, where ``fmt`` says cx cy w h (v5,
    v8) or the other way round (xyxy). Corners always hold x2 >= x1 and y2 >= y1; centre-size
    boxes hold w >= cx and h >= cy only for boxes reaching the top-left corner (about 1.5% of
    yolov5n's 25200 candidates). So, over at least :data:`ORDER_ROWS` candidates (rows of one
    point, padding, aside), every one in order reads as corners and fewer than 90% as centre-size
    boxes; else what ``fmt`` says (warned once when the values overrule it: an export that
    converted its boxes scored 0.003)."""
    xyxy = fmt == "xyxy"
    boxes = boxes[(boxes[:, 2] != boxes[:, 0]) | (boxes[:, 3] != boxes[:, 1])]   # padding rows say nothing
    if len(boxes) < ORDER_ROWS:
        return xyxy
    ordered = float(np.mean((boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])))
    found = ordered >= 0.999 if not xyxy else ordered >= 0.9
    if found and not xyxy:
        warn_once(log, ("box order", fmt, found), "%.1f%% of the %d candidate boxes have x2 >= x1 and "
                  "y2 >= y1, as corners always do and centre-size boxes seldom: read as x1 y1 x2 y2, not "
                  "cx cy w h as the layout says", 100 * ordered, len(boxes))
    elif xyxy and not found:
        warn_once(log, ("box order", fmt, found), "%.1f%% of the %d candidate boxes have x2 < x1 or y2 < y1, "
                  "which corners never have: read as cx cy w h, not x1 y1 x2 y2 as the layout says",
                  100 * (1 - ordered), len(boxes))
    return found


def known_map_dims(shape: Sequence) -> bool:
    """Every dim of a raw head map after the batch is a positive number."""
    return all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:])


def level_stride(input_hw: Optional[Sequence[int]], h: int, level: int) -> float:
    """A raw head map's stride: the input height over the map's, else 8, 16, 32, ... by level."""
    return float(input_hw[0]) / h if input_hw is not None else float(8 * 2 ** level)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def probabilities(maps: Sequence[np.ndarray]) -> List[np.ndarray]:
    """Raw head maps through the sigmoid, unless every value of every map already lies in [0, 1]
    (an export that applies it in the graph)."""
    if all(float(m.min()) >= 0.0 and float(m.max()) <= 1.0 for m in maps):
        return list(maps)
    return [1.0 / (1.0 + np.exp(-m)) for m in maps]


def yolox_grid(input_hw: Sequence[int], strides: Sequence[int] = STRIDES) -> Tuple[np.ndarray, np.ndarray]:
    """(grid xy (N, 2), stride (N, 1)) in YOLOX's anchor order: per stride, row-major (y, x)."""
    grids, expanded = [], []
    for s in strides:
        hs, ws = math.ceil(input_hw[0] / s), math.ceil(input_hw[1] / s)
        yv, xv = np.meshgrid(np.arange(hs), np.arange(ws), indexing="ij")
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        expanded.append(np.full((hs * ws, 1), s))
    return np.concatenate(grids).astype(np.float32), np.concatenate(expanded).astype(np.float32)


def _looks_decoded(p: np.ndarray) -> bool:
    # raw YOLOX xy are offsets of about -1..2 cells; decoded xy are pixels up to the input size
    return float(np.median(np.abs(p[:, :2]))) > 8.0


def per_image(output: np.ndarray) -> List[np.ndarray]:
    """Each image's output (batch axis kept, length 1) of a batched (N, ., .) output."""
    if output.ndim == 3 and output.shape[0] > 1:
        return [output[b:b + 1] for b in range(output.shape[0])]
    return [output]


def score_columns(output: np.ndarray, fmt: str) -> Optional[int]:
    """How many classes one image's detection output scores (its class-score columns, as
    :func:`decode` reads them); None for a ``dets`` output, whose rows name one class each."""
    if fmt in ("dets", "dets7"):
        return None
    p = _squeeze(output)
    n = int(p.shape[0]) - 4 if fmt == "v8" else int(p.shape[1]) - {"xyxy": 4, "gfl": 4 * GFL_BINS}.get(fmt, 5)
    return n if n > 0 else None


def named_classes(model: onnx.ModelProto) -> Optional[int]:
    """How many classes the metadata's ``names`` lists (ultralytics and YOLOv5 exports write a
    dict or list of them); None when it names none or cannot be read."""
    raw = _metadata(model).get("names")
    try:
        names = ast.literal_eval(raw) if raw else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return len(names) if isinstance(names, (dict, list, tuple)) and names else None


def decode_rows(output: np.ndarray, fmt: str, input_hw: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`decode` of every image of a batch, rows concatenated in batch order (for row-by-row
    comparisons of two models' outputs). Refuses ``dets``, whose rows do not correspond."""
    if fmt in ("dets", "dets7"):
        raise NotDetections("the output holds detections after NMS; rows do not correspond between models")
    parts = [decode(o, fmt, input_hw) for o in per_image(output)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def decode(output: np.ndarray, fmt: str, input_hw: Sequence[int],
           conf: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(boxes xyxy (N, 4), class scores (N, C)) in input pixels, from one image's raw output.

    With ``conf``, rows whose objectness is <= conf are dropped first (ultralytics does the same:
    with class scores <= 1 such rows cannot score above conf).
    """
    if fmt == "dets7":
        output, fmt = batch_rows_as_dets(output), "dets"
    if fmt == "dets":
        d = final_detections(output, conf or 0.0)
        scores = np.zeros((len(d), int(d[:, 5].max()) + 1 if len(d) else 1), np.float32)
        scores[np.arange(len(d)), d[:, 5].astype(np.int64)] = d[:, 4]
        return d[:, :4], scores
    p = _squeeze(output)
    if fmt == "v8":
        if p.shape[0] < 5:
            raise NotDetections(f"v8 output has {p.shape[0]} channels; expected 4 box + class scores")
        p = p.T
        return (p[:, :4] if _corners(p[:, :4], fmt) else xywh2xyxy(p[:, :4])), p[:, 4:]
    if fmt == "xyxy":
        if p.shape[1] < 5:
            raise NotDetections(f"xyxy output rows have {p.shape[1]} values; expected 4 box + class scores")
        return (p[:, :4] if _corners(p[:, :4], fmt) else xywh2xyxy(p[:, :4])), p[:, 4:]
    if fmt == "gfl":
        return _decode_gfl(p, input_hw)
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format '{fmt}'; choose one of {', '.join(FORMATS)}")
    _check_obj(p)
    keep = p[:, 4] > conf if conf is not None else slice(None)
    if fmt == "v5" or _looks_decoded(p):
        return _decode_obj(p[keep], _corners(p[:, :4], "v5"))
    grid, stride = yolox_grid(input_hw)
    if grid.shape[0] != p.shape[0]:
        raise NotDetections(f"YOLOX output has {p.shape[0]} rows but a {input_hw[0]}x{input_hw[1]} "
                         f"input gives {grid.shape[0]} grid points at strides {STRIDES}")
    p, grid, stride = p[keep].copy(), grid[keep], stride[keep]
    p[:, :2] = (p[:, :2] + grid) * stride
    p[:, 2:4] = np.exp(p[:, 2:4]) * stride
    return _decode_obj(p)


def _decode_gfl(p: np.ndarray, input_hw: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """``gfl`` rows: class scores, then 4 x 8 bin logits per side (l, t, r, b); softmax over the
    bins, the expected bin times the stride is the distance from the cell's corner."""
    grid, stride = yolox_grid(input_hw, GFL_STRIDES)
    nc = p.shape[1] - 4 * GFL_BINS
    if grid.shape[0] != p.shape[0] or nc < 1:
        raise NotDetections(f"GFL output of {p.shape[0]} rows of {p.shape[1]} values does not fit a "
                            f"{input_hw[0]}x{input_hw[1]} input at strides {GFL_STRIDES} with "
                            f"{GFL_BINS} bins")
    bins = softmax(p[:, nc:].reshape(-1, 4, GFL_BINS), 2)
    dist = (bins * np.arange(GFL_BINS, dtype=np.float32)).sum(2) * stride
    corner = grid * stride
    return np.concatenate([corner - dist[:, :2], corner + dist[:, 2:]], 1).astype(np.float32), p[:, :nc]


def final_detections(output: np.ndarray, conf: float = 0.001, max_det: int = 300, with_rows: bool = False):
    """(M, 6) ``x1 y1 x2 y2 score class`` of a ``dets`` output (NMS already ran in the model):
    rows scoring > ``conf``, best first, at most ``max_det``. Padding rows (score 0) drop out.
    With ``with_rows`` also (M,) the row of the output each came from."""
    p = _detection_rows(output)
    if p.shape[1] != 6:
        raise NotDetections(f"detection rows have {p.shape[1]} values; expected x1 y1 x2 y2 score class")
    p = _score_before_class(p)
    rows = np.nonzero(p[:, 4] > conf)[0]
    p = p[rows]
    if (p[:, 5] < 0).any() or not np.all(np.isfinite(p)):
        raise NotDetections("detection rows hold a negative class or non-finite values")
    order = np.argsort(-p[:, 4], kind="stable")[:max_det]
    dets = p[order].astype(np.float32)
    return (dets, rows[order].astype(np.int64)) if with_rows else dets


def _detection_rows(output: np.ndarray) -> np.ndarray:
    """One image's detections after NMS as (K, values): a (1, K, values) output without its batch
    axis, a (K, values) one as it is (a single detection is one row, not a batch)."""
    p = np.asarray(output)
    if p.ndim == 3:
        if p.shape[0] != 1:
            raise UsageError(f"output batch is {p.shape[0]}; evaluation runs one image at a time")
        p = p[0]
    if p.ndim != 2:
        raise NotDetections(f"output of shape {list(p.shape)}; expected (1, K, 6) or (K, 6) detections")
    return p.astype(np.float32, copy=False)


def _whole(v: np.ndarray) -> bool:
    return bool(np.all(np.abs(v - np.round(v)) < 1e-4))


def _score_before_class(p: np.ndarray) -> np.ndarray:
    """(K, 6) ``x1 y1 x2 y2 score class`` rows, whichever of the last two columns an export wrote
    first: exporters differ (ultralytics puts the score first, YOLOv7's end-to-end export the
    class), and the class column holds whole numbers where the scores do not (warned once)."""
    if len(p) and not _whole(p[:, 5]) and _whole(p[:, 4]) and float(p[:, 4].min()) >= 0:
        warn_once(log, "dets class first", "the detection rows hold whole numbers where the score "
                  "was expected and fractions where the class was: the two columns are read swapped")
        return p[:, [0, 1, 2, 3, 5, 4]]
    return p


def batch_rows_as_dets(output: np.ndarray) -> np.ndarray:
    """A ``dets7`` output's rows of image 0 as a (1, K, 6) ``dets`` array; (1, K, 7) rows are read
    without their batch axis."""
    p = np.asarray(output, np.float32)
    if p.ndim == 3 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 2 or p.shape[1] != 7:
        raise NotDetections(f"output of shape {list(p.shape)}; expected (K, 7) batch x1 y1 x2 y2 class score")
    if (p[:, 0] > 0).any():
        raise UsageError("the (K, 7) detections name images after the first; evaluation runs one "
                         "image at a time")
    return p[:, [1, 2, 3, 4, 6, 5]][None]
