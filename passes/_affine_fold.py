"""Folding a per-channel affine map ``y = s * x + t`` into the weights of a neighbouring op.

Shared by fold-batchnorm and fold-affine. ``out_target`` checks that an op's output channels can
absorb an affine that follows it (Conv, ConvTranspose, Gemm, MatMul with constant weights), and
``fold_out`` computes the new weights in float64; ``fold_in_conv`` does the same for an affine
before a Conv. Only ``apply_out`` / ``apply_in`` mutate the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Set, Tuple, Union

import numpy as np
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir

from ._conv_util import new_const, param, rank, users

OUT_KINDS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Target:
    """An op with constant weights whose output channels (``channels``) can absorb an affine."""

    node: gs.Node
    weight: np.ndarray
    bias: Optional[np.ndarray]
    channels: int
    group: int = 1
    #: other node inputs reading the same weight: the fold gives this op its own copy
    sharing: int = 0


def bn_affine(scale: np.ndarray, shift: np.ndarray, mean: np.ndarray, var: np.ndarray,
              eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """BatchNormalization (inference) as ``s * x + t``, in float64."""
    s = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(eps))
    return s, shift.astype(np.float64) - mean.astype(np.float64) * s


def out_target(node: gs.Node, via: gs.Node, outputs: Set[str], kinds=OUT_KINDS,
               copy_shared: bool = False) -> Union[Target, str]:
    """``node`` as a fold target for the affine op ``via`` reading its output, or a reason. A
    weight other nodes read too is refused, unless ``copy_shared``: the fold writes new weights
    for ``node`` alone either way (:func:`apply_out`), so the others keep the shared one."""
    if node.op not in kinds:
        return f"{node.op} '{node.name}' has no weights to fold into"
    y = node.outputs[0]
    if y.name in outputs:
        return f"{node.op} '{node.name}' output is a graph output"
    if users(y) != 1:
        return f"{node.op} '{node.name}' output also feeds {users(y) - 1} other consumer(s)"
    widx = 1
    w, why = param(node.inputs[widx] if len(node.inputs) > widx else None, f"{node.op} '{node.name}' weight")
    if w is None:
        return why
    sharing = users(node.inputs[widx]) - 1   # node reads it once itself
    if sharing and not copy_shared:
        return (f"{node.op} '{node.name}' weight '{node.inputs[widx].name}' is shared with "
                f"{sharing} other node input(s)")
    b = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        b, why = param(node.inputs[2], f"{node.op} '{node.name}' bias")
        if b is None:
            return why
    if node.op in ("Conv", "ConvTranspose"):
        at = ir.conv_attrs(node, w.shape)
        ch = w.shape[0] if node.op == "Conv" else w.shape[1] * at.group
        return Target(node, w, b, ch, at.group, sharing)
    if w.ndim != 2:
        return f"{node.op} '{node.name}' weight has rank {w.ndim}, not 2"
    if node.op == "MatMul":
        r = rank(y)
        if r != 2:
            return (f"MatMul '{node.name}' output rank {r if r is not None else 'unknown'}: "
                    "the channel axis 1 is not its last axis")
        return Target(node, w, None, w.shape[1], sharing=sharing)
    ch = w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1]
    return Target(node, w, b, ch, sharing=sharing)


def fold_out(tg: Target, s: np.ndarray, t: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """New (weight, bias) so that the op computes ``s * op(x) + t`` (s, t of shape (channels,))."""
    w = tg.weight.astype(np.float64)
    op, dt = tg.node.op, tg.weight.dtype
    if op == "Conv":
        w2 = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        b = np.zeros(tg.channels) if tg.bias is None else tg.bias.astype(np.float64)
        return w2.astype(dt), (b * s + t).astype(dt)
    if op == "ConvTranspose":
        g = tg.group
        shp = w.shape
        w2 = w.reshape((g, shp[0] // g) + shp[1:]) * s.reshape((g, 1, shp[1]) + (1,) * (w.ndim - 2))
        b = np.zeros(tg.channels) if tg.bias is None else tg.bias.astype(np.float64)
        return w2.reshape(shp).astype(dt), (b * s + t).astype(dt)
    if op == "MatMul":
        return (w * s[None, :]).astype(dt), t.astype(dt)
    a = tg.node.attrs
    trans_b = int(a.get("transB", 0))
    w2 = w * (s[:, None] if trans_b else s[None, :])
    c = np.zeros(1) if tg.bias is None else tg.bias.astype(np.float64) * float(a.get("beta", 1.0))
    return w2.astype(dt), (s * c + t).astype(dt)


def apply_out(tg: Target, w: np.ndarray, b: np.ndarray, via: gs.Node, alloc: ir.NameAllocator) -> None:
    """Give ``tg.node`` the new weights and the output of ``via``; ``via`` is disconnected."""
    node = tg.node
    base = node.name or node.outputs[0].name
    wc = new_const(alloc, f"{node.inputs[1].name}_folded", w)
    bc = new_const(alloc, f"{base}/bias_folded", b)
    if node.op == "MatMul":
        node.op = "Gemm"  # Gemm = MatMul + bias in one node (both operands are 2-D here)
        node.attrs = {}
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    node.inputs[1] = wc
    if len(node.inputs) > 2:
        node.inputs[2] = bc
    else:
        node.inputs.append(bc)
    y = via.outputs[0]
    via.outputs.clear()
    via.inputs.clear()
    node.outputs[0] = y


def fold_in_conv(w: np.ndarray, b: Optional[np.ndarray], s: np.ndarray, t: np.ndarray,
                 group: int) -> Tuple[np.ndarray, np.ndarray]:
    """New (weight, bias) of a Conv reading ``s * x + t`` instead of x (exact without padding)."""
    wd = w.astype(np.float64)
    o, cg = wd.shape[:2]
    gi = (np.arange(o) // (o // group))[:, None] * cg + np.arange(cg)[None, :]  # (O, Cin/g) channel
    sc = s[gi].reshape((o, cg) + (1,) * (wd.ndim - 2))
    tc = t[gi].reshape((o, cg) + (1,) * (wd.ndim - 2))
    bias = np.zeros(o) if b is None else b.astype(np.float64)
    bias = bias + (wd * tc).reshape(o, -1).sum(axis=1)
    return (wd * sc).astype(w.dtype), bias.astype(w.dtype)


def apply_in(conv: gs.Node, w: np.ndarray, b: np.ndarray, via: gs.Node, alloc: ir.NameAllocator) -> None:
    """``conv`` reads the input of ``via`` with new weights; ``via`` is disconnected."""
    base = conv.name or conv.outputs[0].name
    conv.inputs[0] = via.inputs[0]
    conv.inputs[1] = new_const(alloc, f"{conv.inputs[1].name}_folded", w)
    bc = new_const(alloc, f"{base}/bias_folded", b)
    if len(conv.inputs) > 2:
        conv.inputs[2] = bc
    else:
        conv.inputs.append(bc)
    via.inputs.clear()
    via.outputs.clear()
