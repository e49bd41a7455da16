"""FastestDet's one head map (dog-qiuqiu's single-scale ShuffleNetV2 detector).

Its export ends in one (B, 1+4+C, H, W) map at stride 16, the head's three branches concatenated
on the channel axis: the objectness through a sigmoid, 4 raw box values, and C class
probabilities (a softmax over the channels; at opset 11 written as Transpose, Softmax,
Transpose). Its own decode (``handle_preds``): per cell (gx, gy) the box centre is
((tanh(v0) + gx) / W, (tanh(v1) + gy) / H) and its size (sigmoid(v2), sigmoid(v3)), all as
fractions of the input; the score is objectness^0.6 x class probability^0.4.

Shapes alone do not tell this map from one level of another head, so it is recognised by the
graph: the output is that Concat of a Sigmoid, something, and a Softmax.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import onnx

#: exponents of objectness and class probability in FastestDet's score
OBJ_POWER, CLS_POWER = 0.6, 0.4


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


def fastestdet_map(model: onnx.ModelProto) -> bool:
    """The model's one output is FastestDet's map: a rank-4 Concat on the channel axis of a
    Sigmoid (objectness), one more input (the box values) and a Softmax (class probabilities)."""
    if len(model.graph.output) != 1:
        return False
    out = model.graph.output[0]
    if len(out.type.tensor_type.shape.dim) != 4:
        return False
    prod = _producers(model)
    cat = prod.get(out.name)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 3:
        return False
    axis = next((a.i for a in cat.attribute if a.name == "axis"), None)
    return axis in (1, -3) and _from(prod, cat.input[0], "Sigmoid") and _from(prod, cat.input[2], "Softmax")


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


__all__ = ["fastestdet_map", "decode_map"]
