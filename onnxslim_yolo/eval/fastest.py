"""The heads of dog-qiuqiu's ShuffleNetV2 detectors, FastestDet and YOLO-FastestV2.

FastestDet's export ends in one (B, 1+4+C, H, W) map at stride 16, the head's three branches
concatenated on the channel axis: the objectness through a sigmoid, 4 raw box values, and C class
probabilities (a softmax over the channels; at opset 11 written as Transpose, Softmax,
Transpose). Its own decode (``handle_preds``): per cell (gx, gy) the box centre is
((tanh(v0) + gx) / W, (tanh(v1) + gy) / H) and its size (sigmoid(v2), sigmoid(v3)), all as
fractions of the input; the score is objectness^0.6 x class probability^0.4.

YOLO-FastestV2's export ends in one (B, H, W, 4na + na + C) map per level (strides 16 and 32),
the same Concat of sigmoid box values (4 per anchor), sigmoid objectness (one per anchor) and
one softmax class vector for the cell, transposed channels-last. It decodes as YOLOv5 does
(xy = (2s - 0.5 + cell) x stride, wh = (2s)^2 x anchor, score objectness x class), with the
anchors of its COCO model unless ``--anchors`` names others.

Shapes alone do not tell these maps from other heads' levels, so they are recognised by the
graph: each output is that Concat of Sigmoids and a Softmax. YOLO-FastestV2 exported without
them (its six raw maps, box, objectness and class logits per level) is read by shapes: 4na, na
and C channels per level with na >= 2.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from .decode import declared_shapes, known_map_dims, softmax
from .dfl import maps_by_size

#: exponents of objectness and class probability in FastestDet's score
OBJ_POWER, CLS_POWER = 0.6, 0.4
#: YOLO-FastestV2's COCO anchors (its data/coco.data), w h pairs per level, finest first
V2_ANCHORS = ((12.64, 19.39, 37.88, 51.48, 55.71, 138.31), (126.91, 78.23, 131.57, 214.55, 279.92, 258.87))


def _producers(model: onnx.ModelProto) -> Dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _from(prod: Dict[str, onnx.NodeProto], tensor: str, op: str) -> bool:
    """``tensor`` is made by ``op``, directly or between two Transposes (a channel softmax at
    opset 11 runs on the last axis)."""
    n = prod.get(tensor)
    if n is not None and n.op_type == "Transpose":
        inner = prod.get(n.input[0])
        n = prod.get(inner.input[0]) if inner is not None and inner.op_type == op else None
        return n is not None and n.op_type == "Transpose"
    return n is not None and n.op_type == op


def _branches(prod: Dict[str, onnx.NodeProto], tensor: str) -> Optional[onnx.NodeProto]:
    """The Concat on the channel axis of three branches that makes ``tensor``, else None."""
    cat = prod.get(tensor)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 3:
        return None
    axis = next((a.i for a in cat.attribute if a.name == "axis"), None)
    return cat if axis in (1, -3) else None


def fastestdet_map(model: onnx.ModelProto) -> bool:
    """The model's one output is FastestDet's map: a rank-4 Concat on the channel axis of a
    Sigmoid (objectness), one more input (the box values) and a Softmax (class probabilities)."""
    if len(model.graph.output) != 1:
        return False
    out, prod = model.graph.output[0], _producers(model)
    cat = _branches(prod, out.name)
    return cat is not None and len(out.type.tensor_type.shape.dim) == 4 \
        and _from(prod, cat.input[0], "Sigmoid") and _from(prod, cat.input[2], "Softmax")


def fastestv2_maps(model: onnx.ModelProto) -> Optional[int]:
    """Predictions per cell (na) when every output of the model is YOLO-FastestV2's: a Transpose
    to channels-last of a Concat of a Sigmoid (box values), a Sigmoid (objectness) and a Softmax;
    na is the objectness Conv's output channel count (its weight an initializer, or one through a
    DequantizeLinear). None otherwise."""
    prod = _producers(model)
    counts = set()
    for out in model.graph.output:
        t = prod.get(out.name)
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None) if t is not None else None
        cat = _branches(prod, t.input[0]) if t is not None and t.op_type == "Transpose" else None
        if perm != [0, 2, 3, 1] or cat is None or not _from(prod, cat.input[0], "Sigmoid") \
                or not _from(prod, cat.input[1], "Sigmoid") or not _from(prod, cat.input[2], "Softmax"):
            return None
        conv = prod.get(prod[cat.input[1]].input[0])
        if conv is None or conv.op_type != "Conv" or len(conv.input) < 2:
            return None
        weight = conv.input[1]
        dq = prod.get(weight)  # an INT8 model's weight comes dequantized
        if dq is not None and dq.op_type == "DequantizeLinear":
            weight = dq.input[0]
        w = next((i for i in model.graph.initializer if i.name == weight), None)
        if w is None:
            return None
        counts.add(int(w.dims[0]))
    return counts.pop() if len(counts) == 1 and len(model.graph.output) >= 2 else None


def head_kind(model: onnx.ModelProto, shapes: Optional[Sequence[Sequence]] = None) -> Optional[str]:
    """"fastestdet" or "yolo-fastestv2" when the model's outputs, of these ``shapes`` (the declared
    ones by default), are one of these heads (:func:`fastestdet_map`, :func:`fastestv2_maps`,
    :func:`v2_raw_layout`); None otherwise."""
    shapes = declared_shapes(model) if shapes is None else shapes
    if len(shapes) == 1 and len(shapes[0]) == 4 and fastestdet_map(model):
        return "fastestdet"
    if (all(len(s) == 4 for s in shapes) and fastestv2_maps(model)) or v2_raw_layout(shapes) is not None:
        return "yolo-fastestv2"
    return None


def v2_anchor_maps(outputs: Sequence[np.ndarray], na: int) -> List[np.ndarray]:
    """YOLO-FastestV2's (B, H, W, 4na + na + C) maps as YOLOv5's (B, na, H, W, 5+C): each anchor's
    box values and objectness, the cell's class probabilities repeated for each anchor."""
    maps = []
    for o in outputs:
        o = np.asarray(o, np.float32)
        b, h, w, k = o.shape
        box = o[..., :4 * na].reshape(b, h, w, na, 4)
        obj = o[..., 4 * na:5 * na].reshape(b, h, w, na, 1)
        cls = np.broadcast_to(o[..., None, 5 * na:], (b, h, w, na, k - 5 * na))
        maps.append(np.concatenate([box, obj, cls], -1).transpose(0, 3, 1, 2, 4))
    return maps


def v2_raw_layout(shapes: Sequence[Sequence]) -> Optional[Tuple[int, List[Tuple[int, int, int]]]]:
    """(na, [(box, objectness, class) output per level, finest first]) when ``shapes`` are
    YOLO-FastestV2's head maps before its sigmoids and softmax: per spatial size three rank-4
    maps of 4na, na and C channels, na >= 2 (one channel each would be a YOLOX or FCOS cut), the
    same on 2 or more levels; with C = na the objectness map is the first in output order, as
    the model writes them. None otherwise."""
    if len(shapes) < 6 or len(shapes) % 3 or not all(len(s) == 4 and known_map_dims(s) for s in shapes):
        return None
    levels, kinds = [], set()
    for maps in maps_by_size(shapes):
        ch = {i: int(shapes[i][1]) for i in maps}
        pairs = [(b, o) for b in maps for o in maps if b != o and ch[o] >= 2 and ch[b] == 4 * ch[o]]
        if len(maps) != 3 or not pairs or len({b for b, _ in pairs}) != 1:
            return None
        box, obj = min(pairs, key=lambda bo: bo[1])  # as many classes as anchors: objectness first
        cls = next(i for i in maps if i not in (box, obj))
        levels.append((box, obj, cls))
        kinds.add((ch[obj], ch[cls]))
    return (kinds.pop()[0], levels) if len(levels) >= 2 and len(kinds) == 1 else None


def v2_from_raw(outputs: Sequence[np.ndarray], levels: Sequence[Tuple[int, int, int]]) -> List[np.ndarray]:
    """The raw maps of :func:`v2_raw_layout` as the export's (B, H, W, 4na + na + C) maps."""
    out = []
    for box, obj, cls in levels:
        parts = [1.0 / (1.0 + np.exp(-np.asarray(outputs[box], np.float32))),
                 1.0 / (1.0 + np.exp(-np.asarray(outputs[obj], np.float32))),
                 softmax(np.asarray(outputs[cls], np.float32), 1)]
        out.append(np.concatenate(parts, 1).transpose(0, 2, 3, 1))
    return out


def v2_anchors(anchors) -> Tuple[Tuple[float, ...], ...]:
    """The anchors named for the model, else YOLO-FastestV2's COCO ones."""
    return anchors if anchors is not None else V2_ANCHORS


def decode_map(out: np.ndarray, input_hw: Optional[Sequence[int]]) -> np.ndarray:
    """The ``v8`` array (B, 4+C, H*W): xywh in input pixels and each class's score
    objectness^0.6 x probability^0.4 (without ``input_hw`` the input is taken as 16 x the map)."""
    p = np.asarray(out, np.float32)
    b, ch, h, w = p.shape
    ih, iw = (float(input_hw[0]), float(input_hw[1])) if input_hw is not None else (16.0 * h, 16.0 * w)
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    v = p[:, 1:5].reshape(b, 4, h * w)
    cx = (np.tanh(v[:, 0]) + gx.reshape(1, -1)) / w * iw
    cy = (np.tanh(v[:, 1]) + gy.reshape(1, -1)) / h * ih
    sig = 1.0 / (1.0 + np.exp(-v[:, 2:4]))
    xywh = np.stack([cx, cy, sig[:, 0] * iw, sig[:, 1] * ih], 1)
    obj = np.clip(p[:, :1].reshape(b, 1, h * w), 0.0, None)
    cls = np.clip(p[:, 5:].reshape(b, ch - 5, h * w), 0.0, None)
    return np.concatenate([xywh, obj ** OBJ_POWER * cls ** CLS_POWER], 1).astype(np.float32, copy=False)


__all__ = ["V2_ANCHORS", "fastestdet_map", "decode_map", "fastestv2_maps", "head_kind", "v2_anchor_maps",
           "v2_anchors", "v2_from_raw", "v2_raw_layout"]
