"""Squeeze-and-excitation blocks written with Linear layers, as most attention add-ons to YOLO do.

``y = avg_pool(x).view(b, c); y = fc(y).view(b, c, 1, 1); x * y``: the pooled (N, C, 1, 1)
tensor is flattened to (N, C) (Reshape, Flatten or Squeeze), goes through two Linear layers
(MatMul or Gemm with constant weights, a bias Add allowed after each) with unary activations
between and after them, and comes back to (N, C, 1, 1) (Reshape or Unsqueeze) as the gate that
scales x. Channel c of the pooled tensor is the first layer's input c and the second layer's
output c, so the gate's channel c is the pooled tensor's channel c: removing it means dropping
input row c of the first weight and output column c of the second (and of its bias). With the
channel zeroed upstream, the removed input contributes nothing to the first layer and the removed
gate scales nothing, so pruning stays exact. The (N, C) tensors in between have no channel
positions of their own: only the two ends take part in the channel analysis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir

#: ops a gate may pass through between and after the two Linear layers
GATE_OPS = frozenset({"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Tanh", "Elu",
                      "Selu", "Gelu", "Identity", "Mish", "Softplus"})
#: longest chain between the flatten and the unflatten (two layers, their biases, activations)
MAX_CHAIN = 10


@dataclass(frozen=True)
class LinearSE:
    """The flatten, the two Linear layers (with the bias Add after the second, if any) and the
    unflatten of one excitation branch over ``channels`` channels."""

    first: gs.Node
    fc1: gs.Node
    fc2: gs.Node
    bias2: Optional[gs.Node]
    last: gs.Node
    channels: int


def fc_axes(node: gs.Node) -> Optional[Tuple[int, int]]:
    """(input axis, output axis) of a MatMul / Gemm's constant 2-D weight, None otherwise."""
    w = ir.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim != 2:
        return None
    if node.op == "MatMul":
        return 0, 1
    if node.op != "Gemm" or node.attrs.get("transA", 0) or float(node.attrs.get("alpha", 1.0)) != 1.0:
        return None
    return (1, 0) if node.attrs.get("transB", 0) else (0, 1)


def _flattens(node: gs.Node, x: Sequence[int], y: Sequence[int]) -> bool:
    """``node`` takes (N, C, 1, 1) to (N, C), with a target it is safe to rewrite."""
    if len(x) != 4 or x[2:] != [1, 1] or list(y) != list(x[:2]):
        return False
    if node.op == "Flatten":
        return int(node.attrs.get("axis", 1)) == 1
    if node.op == "Squeeze":
        return True  # the shapes show it squeezes the two ones
    target = ir.reshape_target(node)
    return target is not None and len(target) == 2 and target[1] in (x[1], -1)


def _unflattens(node: gs.Node, x: Sequence[int], y: Sequence[int]) -> bool:
    if len(x) != 2 or list(y) != list(x) + [1, 1]:
        return False
    if node.op == "Unsqueeze":
        return True
    target = ir.reshape_target(node)
    return target is not None and len(target) == 4 and target[1] in (x[1], -1)


def _const_vector(node: gs.Node, n: int) -> bool:
    """An Add of the branch tensor and a constant of ``n`` values (a Linear layer's bias)."""
    vals = [ir.const_value(t) for t in node.inputs]
    return len(vals) == 2 and sum(v is not None for v in vals) == 1 and \
        next(v for v in vals if v is not None).size == n


def se_from(node: gs.Node, shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Optional[LinearSE]:
    """The Linear excitation branch whose flatten is ``node`` (shapes from the tensors, or from
    ``shapes`` by name), None when ``node`` does not start one: any reader other than the next
    step of the chain, a weight that is not constant, or a count that does not match."""
    if node.op not in ("Reshape", "Flatten", "Squeeze") or not node.inputs or not node.outputs:
        return None
    xs, ys = ir.static_dims(node.inputs[0], shapes), ir.static_dims(node.outputs[0], shapes)
    if xs is None or ys is None or not _flattens(node, xs, ys):
        return None
    c, t, prev = xs[1], node.outputs[0], node
    fcs, bias2 = [], None
    for _ in range(MAX_CHAIN):
        readers = list(t.outputs)
        if len(readers) != 1:
            return None
        n = readers[0]
        if n.op in ("MatMul", "Gemm") and len(fcs) < 2 and n.inputs[0] is t and fc_axes(n) is not None:
            fcs.append(n)
        elif n.op == "Add" and fcs and prev is fcs[-1] and _const_vector(n, _out_dim(fcs[-1])):
            bias2 = n if len(fcs) == 2 else bias2
        elif n.op in GATE_OPS and fcs:
            pass
        elif n.op in ("Reshape", "Unsqueeze") and len(fcs) == 2:
            ts, us = ir.static_dims(t, shapes), ir.static_dims(n.outputs[0], shapes)
            fc1, fc2 = fcs
            w1 = ir.const_value(fc1.inputs[1])
            if ts is None or us is None or not _unflattens(n, ts, us) or ts[1] != c or \
                    w1.shape[fc_axes(fc1)[0]] != c or _out_dim(fc2) != c:
                return None
            return LinearSE(node, fc1, fc2, bias2, n, c)
        else:
            return None
        t, prev = n.outputs[0], n
    return None


def _out_dim(fc: gs.Node) -> int:
    return int(ir.const_value(fc.inputs[1]).shape[fc_axes(fc)[1]])


def se_around(node: gs.Node) -> Optional[LinearSE]:
    """The branch ``node`` (a flatten or an unflatten) starts or ends."""
    if node.op in ("Reshape", "Flatten", "Squeeze"):
        se = se_from(node)
        if se is not None:
            return se
    if node.op not in ("Reshape", "Unsqueeze"):
        return None
    t, steps = node.inputs[0] if node.inputs else None, 0
    while t is not None and steps <= MAX_CHAIN:
        p = ir.producer(t)
        if p is None:
            return None
        if p.op in ("Reshape", "Flatten", "Squeeze"):
            se = se_from(p)
            return se if se is not None and se.last is node else None
        t, steps = (p.inputs[0] if p.inputs else None), steps + 1
    return None


def rewrite(se: LinearSE, keep: np.ndarray, set_input) -> None:
    """Keep channels ``keep`` (sorted indices): input rows of the first layer, output columns of
    the second and of its bias, and the count in each Reshape target that names it.
    ``set_input(node, index, value, base_name)`` replaces a node input by a new constant."""
    for fc, which in ((se.fc1, 0), (se.fc2, 1)):
        w = ir.const_value(fc.inputs[1])
        set_input(fc, 1, np.take(w, keep, axis=fc_axes(fc)[which]), fc.inputs[1].name + "_pruned")
    if se.fc2.op == "Gemm" and len(se.fc2.inputs) > 2 and se.fc2.inputs[2].name:
        b = ir.const_value(se.fc2.inputs[2])
        if b is not None and b.shape and b.shape[-1] == se.channels:
            set_input(se.fc2, 2, np.take(b, keep, axis=-1), se.fc2.inputs[2].name + "_pruned")
    if se.bias2 is not None:
        i = next(j for j, t in enumerate(se.bias2.inputs) if ir.const_value(t) is not None)
        b = ir.const_value(se.bias2.inputs[i])
        set_input(se.bias2, i, np.take(b, keep, axis=-1), se.bias2.inputs[i].name + "_pruned")
    for node in (se.first, se.last):
        target = ir.reshape_target(node)
        if target is not None and target[1] != -1:
            target[1] = len(keep)
            set_input(node, 1, np.array(target, np.int64), node.inputs[1].name + "_pruned")


__all__ = ["GATE_OPS", "LinearSE", "fc_axes", "rewrite", "se_around", "se_from"]
