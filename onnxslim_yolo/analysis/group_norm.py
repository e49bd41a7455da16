"""Group normalization on the channel axis, as the channel analysis and the pruning rewrite see it.

Two forms: ONNX's GroupNormalization op (opset 21, a scale and bias per channel; opset 18's, one
per group, is deprecated and the onnx checker refuses it), and the way PyTorch exports
``nn.GroupNorm``: Reshape (N, C, ...) -> (N, G, ...), InstanceNormalization of those G rows,
Reshape back to the input's shape (a Shape of the input, or a constant), and the per-channel
affine as separate Mul and Add nodes, which their own rules map. Each group of C/G neighbouring
channels is normalised by its own statistics: removing a whole group leaves every other group as
it was, removing part of one would not. So a group is one channel of the analysis, and pruning
lowers the group count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir


@dataclass(frozen=True)
class ExportedGroupNorm:
    """Reshape ``first`` to (N, G, ...), InstanceNormalization ``norm``, Reshape ``last`` back."""

    first: gs.Node
    norm: gs.Node
    last: gs.Node
    groups: int
    channels: int


def _shape_of(t: gs.Tensor, x: gs.Tensor) -> bool:
    """True when ``t`` is the whole Shape of ``x``."""
    p = ir.producer(t) if isinstance(t, gs.Variable) else None
    return (p is not None and p.op == "Shape" and p.inputs[0] is x
            and int(p.attrs.get("start", 0)) == 0 and p.attrs.get("end") is None)


def _params(norm: gs.Node, n: int) -> bool:
    vals = [ir.const_value(t) for t in norm.inputs[1:3]]
    return len(vals) == 2 and all(v is not None and v.shape == (n,) for v in vals)


def exported_from(node: gs.Node, shapes: Optional[Mapping[str, Sequence[int]]] = None
                  ) -> Optional[ExportedGroupNorm]:
    """The exported group norm whose first Reshape is ``node``: a constant target (N, G, ...)
    with G written out, static shapes (the tensors' own, or from ``shapes`` by name), one reader
    between the nodes, constant InstanceNormalization parameters of G values, and a last target
    that is the input's Shape or a constant (its channel entry C or -1)."""
    if node.op != "Reshape":
        return None
    x, mid = node.inputs[0], node.outputs[0]
    norm = ir.only_reader(mid, "InstanceNormalization")
    last = ir.only_reader(norm.outputs[0], "Reshape") if norm is not None else None
    if last is None or last.inputs[0] is not norm.outputs[0] or len(last.inputs) < 2:
        return None
    if any(o.outputs for o in norm.outputs[1:]):
        return None
    xs, ms, ys = (ir.static_dims(t, shapes) for t in (x, mid, last.outputs[0]))
    if xs is None or ms is None or ys != xs or len(xs) < 3 or len(ms) < 3:
        return None
    g, c = ms[1], xs[1]
    if ms[0] != xs[0] or g < 1 or c % g or g * int(np.prod(ms[2:])) != int(np.prod(xs[1:])):
        return None
    target = ir.reshape_target(node)
    if target is None or len(target) != len(ms) or target[1] != g or not _params(norm, g):
        return None
    if not _shape_of(last.inputs[1], x):
        back = ir.reshape_target(last)
        if back is None or len(back) != len(xs) or back[1] not in (c, -1):
            return None
    return ExportedGroupNorm(node, norm, last, g, c)


def exported_around(node: gs.Node) -> Optional[ExportedGroupNorm]:
    """The exported group norm ``node`` (its InstanceNormalization or last Reshape) belongs to."""
    chain = [node]
    for _ in range({"InstanceNormalization": 1, "Reshape": 2}.get(node.op, 0)):
        p = ir.producer(chain[-1].inputs[0])
        if p is None:
            return None
        chain.append(p)
    gn = exported_from(chain[-1]) if len(chain) > 1 else None
    return gn if gn is not None and node in (gn.norm, gn.last) else None


def op_refusal(node: gs.Node, channels: Optional[int]) -> Optional[str]:
    """Why a GroupNormalization op cannot lose groups, None when it can: constant scale and bias
    of one value per channel, and a channel count the groups divide."""
    g = int(node.attrs.get("num_groups", 0))
    if not channels or g < 1 or channels % g:
        return f"{channels} channels in {g} groups"
    vals = [ir.const_value(t) for t in node.inputs[1:3]]
    if len(vals) != 2 or any(v is None for v in vals):
        return "non-constant scale or bias"
    if any(v.shape != (channels,) for v in vals):
        return f"scale or bias of shape {list(vals[0].shape)}, not one value per channel ({channels})"
    return None


def link_groups(rec, x: gs.Tensor, y: gs.Tensor, groups: int) -> None:
    """Channel c of ``x`` is channel c of ``y``, and the channels of each group go together."""
    c = rec.channels(x)
    m = c // groups
    rec.link(x, 0, y, 0, c)
    for a in range(groups):
        for b in range(1, m):
            rec.link(x, a * m, x, a * m + b, 1)


def kept_groups(keep: np.ndarray, channels: int, groups: int) -> np.ndarray:
    """The groups of the kept channel indices (whole groups: the analysis never splits one); a
    group norm's, and a grouped Conv's (passes/_prune_rewrite)."""
    m = channels // groups
    kept = keep[::m] // m
    if len(keep) != len(kept) * m or not np.array_equal(keep, (kept[:, None] * m + np.arange(m)).ravel()):
        raise ValueError("a group would lose part of its channels")
    return kept


SetInput = Callable[[gs.Node, int, np.ndarray, str], None]


def rewrite_op(node: gs.Node, keep: np.ndarray, channels: int, set_input: SetInput) -> None:
    """GroupNormalization keeps the kept groups: fewer ``num_groups``, scale and bias sliced."""
    kept = kept_groups(keep, channels, int(node.attrs["num_groups"]))
    node.attrs["num_groups"] = int(len(kept))
    for i in (1, 2):
        v = ir.const_value(node.inputs[i])
        set_input(node, i, v[keep], node.inputs[i].name + "_pruned")


def rewrite_exported(gn: ExportedGroupNorm, keep: np.ndarray, set_input: SetInput) -> None:
    """The exported form keeps the kept groups: the first target's G, the InstanceNormalization's
    parameters, and a constant last target's channel count."""
    kept = kept_groups(keep, gn.channels, gn.groups)
    target = ir.reshape_target(gn.first)
    target[1] = len(kept)
    set_input(gn.first, 1, np.array(target, np.int64), gn.first.inputs[1].name + "_pruned")
    for i in (1, 2):
        v = ir.const_value(gn.norm.inputs[i])
        set_input(gn.norm, i, v[kept], gn.norm.inputs[i].name + "_pruned")
    back = ir.reshape_target(gn.last)
    if back is not None and back[1] == gn.channels:
        back[1] = len(keep)
        set_input(gn.last, 1, np.array(back, np.int64), gn.last.inputs[1].name + "_pruned")
