"""How each op moves Conv output channels: the per-op rules of the channel-group analysis.

A rule reads one node and tells the :class:`Recorder` which channel positions ``(tensor, index)``
are the same channel (``link``), which ones a Conv produces or consumes (``role``), and which ones
can never be removed (``block`` with a reason). Rules never mutate the graph. Channels are on
axis 1 (NCHW, also NCL / NCDHW); a "feature" tensor is a float tensor of rank >= 3 with a static
channel count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from . import group_norm, linear_se

#: element-wise ops of one data input (extra inputs, if any, are scalars such as Clip's bounds).
UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Tanh", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Mish", "Gelu", "Identity", "Neg", "Abs", "Exp", "Log", "Sqrt",
    "Reciprocal", "Erf", "Cast", "Dropout", "ThresholdedRelu", "Floor", "Ceil", "Round", "Sign",
})
#: element-wise ops between feature maps (broadcasting): every full-channel input is coupled.
ELEMENTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"})
#: per-channel spatial ops: output channel c reads input channel c only.
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
                      "GlobalLpPool"})
#: ops that may sit between a Shape and a Resize 'sizes' input (shape arithmetic).
SHAPE_ARITH_OPS = frozenset({"Gather", "Slice", "Concat", "Cast", "Unsqueeze", "Squeeze", "Mul",
                             "Div", "Add", "Sub", "Floor", "Ceil", "Identity", "Constant"})


class Recorder(Protocol):
    """What a rule may call (implemented by ``channels._Builder``)."""

    def channels(self, t: gs.Tensor) -> Optional[int]: ...
    def link(self, a: gs.Tensor, a0: int, b: gs.Tensor, b0: int, n: int) -> None: ...
    def block(self, t: gs.Tensor, reason: str, start: int = 0, n: Optional[int] = None) -> None: ...
    def role(self, t: gs.Tensor, kind: str, node: gs.Node, n: Optional[int] = None,
             offset: int = 0) -> None: ...
    def reader(self, x: gs.Tensor, indices: Sequence[int], y: gs.Tensor, node: gs.Node) -> None: ...


Rule = Callable[[gs.Node, Recorder], None]


def _features(rec: Recorder, tensors: Iterable[gs.Tensor]) -> List[gs.Tensor]:
    return [t for t in tensors if isinstance(t, gs.Variable) and t.name and rec.channels(t)]


def _desc(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'"


def block_node(node: gs.Node, rec: Recorder, why: str = "") -> None:
    """Unmapped op: its feature inputs and outputs keep all their channels."""
    tail = f" ({why})" if why else ""
    for t in _features(rec, node.inputs):
        rec.block(t, f"consumed by {_desc(node)}{tail}")
    for t in _features(rec, node.outputs):
        rec.block(t, f"produced by {_desc(node)}{tail}")


def _pass_through(node: gs.Node, rec: Recorder, x: gs.Tensor, y: gs.Tensor) -> None:
    cx, cy = rec.channels(x), rec.channels(y)
    if not cx or not cy:
        block_node(node, rec, "unknown channel count")
    elif cx != cy:
        block_node(node, rec, f"changes the channel count {cx} -> {cy}")
    else:
        rec.link(x, 0, y, 0, cx)


def _has_feature_io(node: gs.Node, rec: Recorder) -> bool:
    return bool(_features(rec, node.inputs) or _features(rec, node.outputs))


def rule_unary(node: gs.Node, rec: Recorder) -> None:
    if not node.inputs or not node.outputs or not _has_feature_io(node, rec):
        return
    for extra in node.inputs[1:]:
        if extra.name and ir.const_value(extra) is None and rec.channels(extra):
            return block_node(node, rec, "non-scalar second input")
    used = [o for o in node.outputs[1:] if o.outputs]
    if used:
        return block_node(node, rec, "extra output is used")
    _pass_through(node, rec, node.inputs[0], node.outputs[0])


def rule_norm(node: gs.Node, rec: Recorder) -> None:
    """BatchNormalization and InstanceNormalization (which normalises each channel over its own
    spatial values) map channel c to channel c; their per-channel parameters (four, two) take
    the role "bn" or "norm" and are sliced with the channel."""
    if not _has_feature_io(node, rec):
        return
    if any(ir.const_value(t) is None for t in node.inputs[1:]):
        return block_node(node, rec, "non-constant parameters")
    if any(o.outputs for o in node.outputs[1:]):
        return block_node(node, rec, "training-mode outputs are used")
    _pass_through(node, rec, node.inputs[0], node.outputs[0])
    if rec.channels(node.outputs[0]):
        rec.role(node.outputs[0], "bn" if node.op == "BatchNormalization" else "norm", node)


def rule_instancenorm(node: gs.Node, rec: Recorder) -> None:
    """An InstanceNormalization inside an exported group norm is mapped with it (its rows are
    groups, not channels); any other is a per-channel norm."""
    if group_norm.exported_around(node) is None:
        rule_norm(node, rec)


def rule_group_norm(node: gs.Node, rec: Recorder) -> None:
    """GroupNormalization: channel c is channel c, and a group's channels go together
    (:mod:`.group_norm`); the output takes the role "groupnorm"."""
    if not _has_feature_io(node, rec):
        return
    x, y = node.inputs[0], node.outputs[0]
    cx, cy = rec.channels(x), rec.channels(y)
    why = group_norm.op_refusal(node, cx)
    if why is None and cy != cx:
        why = f"changes the channel count {cx} -> {cy}"
    if why is not None:
        return block_node(node, rec, why)
    group_norm.link_groups(rec, x, y, int(node.attrs["num_groups"]))
    rec.role(y, "groupnorm", node)


def rule_exported_group_norm(gn: group_norm.ExportedGroupNorm, rec: Recorder) -> None:
    """Reshape -> InstanceNormalization -> Reshape (:mod:`.group_norm`): the tensors between
    the three nodes hold groups, not channels, and take no part."""
    x, y = gn.first.inputs[0], gn.last.outputs[0]
    if rec.channels(x) != gn.channels or rec.channels(y) != gn.channels:
        for t in (x, y):
            rec.block(t, f"group norm at {_desc(gn.first)} with unknown channel counts")
        return
    group_norm.link_groups(rec, x, y, gn.groups)
    rec.role(y, "groupnorm", gn.norm)


def rule_pool(node: gs.Node, rec: Recorder) -> None:
    if not _has_feature_io(node, rec):
        return
    if any(o.outputs for o in node.outputs[1:]):
        return block_node(node, rec, "pooling indices are used")
    _pass_through(node, rec, node.inputs[0], node.outputs[0])


def _sizes_from_own_shape(node: gs.Node) -> bool:
    """True when Resize's runtime 'sizes' are computed from Shape(its own input): they follow C."""
    sizes = node.inputs[3]
    stack, seen = [sizes], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        p = ir.producer(t) if isinstance(t, gs.Variable) else None
        if p is None:
            continue
        if p.op == "Shape":
            if p.inputs[0] is node.inputs[0]:
                return True
            continue
        if p.op in SHAPE_ARITH_OPS:
            stack.extend(p.inputs)
    return False


def rule_resize(node: gs.Node, rec: Recorder) -> None:
    if not _has_feature_io(node, rec):
        return
    if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
        if ir.const_value(node.inputs[3]) is None and not _sizes_from_own_shape(node):
            return block_node(node, rec, "'sizes' is computed and does not follow the input's shape")
    _pass_through(node, rec, node.inputs[0], node.outputs[0])


def _axis(node: gs.Node, t: gs.Tensor, default: int = 0) -> Optional[int]:
    shp = getattr(t, "shape", None)
    if shp is None:
        return None
    a = int(node.attrs.get("axis", default))
    return a + len(shp) if a < 0 else a


def rule_concat(node: gs.Node, rec: Recorder) -> None:
    y = node.outputs[0]
    if not rec.channels(y):
        return block_node(node, rec) if _features(rec, node.inputs) else None
    axis = _axis(node, y)
    offset = 0
    for x in node.inputs:
        cx = rec.channels(x) if isinstance(x, gs.Variable) else None
        n = x.shape[1] if getattr(x, "shape", None) is not None and len(x.shape) > 1 else None
        if axis != 1:
            if cx:
                rec.link(x, 0, y, 0, cx)
            else:
                rec.block(y, f"{_desc(node)} has a constant or unknown input '{x.name}'")
            continue
        if cx:
            rec.link(x, 0, y, offset, cx)
            offset += cx
        elif isinstance(n, (int, np.integer)):
            rec.block(y, f"constant input '{x.name}' of {_desc(node)}", offset, int(n))
            offset += int(n)
        else:
            return block_node(node, rec, f"input '{x.name}' has no static channel count")


def _split_sizes(node: gs.Node, rec: Recorder) -> Optional[List[int]]:
    sizes = []
    for o in node.outputs:
        shp = getattr(o, "shape", None)
        if shp is None or len(shp) < 2 or not isinstance(shp[1], (int, np.integer)):
            return None
        sizes.append(int(shp[1]))
    return sizes


def rule_split(node: gs.Node, rec: Recorder) -> None:
    x = node.inputs[0]
    if not rec.channels(x):
        return block_node(node, rec) if _features(rec, node.outputs) else None
    axis = _axis(node, x)
    if axis != 1:
        for o in node.outputs:
            _pass_through(node, rec, x, o)
        return
    sizes = _split_sizes(node, rec)
    if sizes is None or sum(sizes) != rec.channels(x):
        return block_node(node, rec, "output channel counts unknown")
    offset = 0
    for o, n in zip(node.outputs, sizes):
        if n:
            rec.link(x, offset, o, 0, n)
        offset += n


def _normalized(axes: List[int], rank: int) -> List[int]:
    return [a + rank if a < 0 else a for a in axes]


def slice_params(node: gs.Node, rank: int) -> Optional[Dict[int, Tuple[int, int, int]]]:
    """{axis: (start, end, step)} from constant inputs, or None when any bound is computed."""
    vals = [ir.const_ints(node, i) for i in range(1, 5)]
    if any(v is None for v in vals):
        return None
    starts, ends, axes, steps = vals
    if not starts or not ends:
        return None
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    return dict(zip(_normalized(axes, rank), zip(starts, ends, steps)))


def normalized_slice(start: int, end: int, step: int, n: int) -> Tuple[int, int]:
    """[start, end) clamped to 0..n for a positive step (ONNX Slice semantics)."""
    s = start + n if start < 0 else start
    e = end + n if end < 0 else end
    return max(0, min(s, n)), max(0, min(e, n))


def rule_slice(node: gs.Node, rec: Recorder) -> None:
    x, y = node.inputs[0], node.outputs[0]
    if not rec.channels(x):
        return block_node(node, rec) if rec.channels(y) else None
    params = slice_params(node, len(x.shape))
    if params is None:
        return block_node(node, rec, "non-constant bounds")
    if 1 not in params:
        return _pass_through(node, rec, x, y)
    start, end, step = params[1]
    if step != 1:
        return block_node(node, rec, f"channel step {step}")
    cy = rec.channels(y)
    s, e = normalized_slice(start, end, step, rec.channels(x))
    if not cy or cy != max(e - s, 0):
        return block_node(node, rec, "output channel count unknown")
    rec.link(x, s, y, 0, cy)


def pad_amounts(node: gs.Node, rank: int) -> Optional[Dict[int, Tuple[int, int]]]:
    """{axis: (before, after)} of a Pad, from its ``pads`` attribute (opset < 11) or constant
    ``pads`` and ``axes`` inputs; None when they are computed."""
    pads, axes = ir.const_ints(node, 1, "pads"), ir.const_ints(node, 3)
    if pads is None or axes is None:
        return None
    axes = _normalized(axes, rank) if axes else list(range(rank))
    if len(pads) != 2 * len(axes):
        return None
    return {a: (pads[i], pads[i + len(axes)]) for i, a in enumerate(axes)}


def rule_pad(node: gs.Node, rec: Recorder) -> None:
    """A Pad of the spatial axes only (TF-style "same" padding before a strided Conv or a MaxPool)
    keeps every channel where it was, whatever its mode and value."""
    x, y = node.inputs[0], node.outputs[0]
    if not _has_feature_io(node, rec):
        return
    shape = getattr(x, "shape", None)
    amounts = pad_amounts(node, len(shape)) if shape is not None else None
    if amounts is None:
        return block_node(node, rec, "non-constant pads")
    if any(amounts.get(a, (0, 0)) != (0, 0) for a in (0, 1)):
        return block_node(node, rec, "pads the batch or channel axis")
    _pass_through(node, rec, x, y)


#: reductions: channel c of the output is reduced from channel c alone when axis 1 is kept
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
                        "ReduceProd", "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"})
#: reductions over the channel axis alone that read any channel count: CBAM's spatial attention
#: (mean and max over the channels). The rewrite makes up for removed channels (_prune_rewrite).
CHANNEL_REDUCERS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"})


def axes_of(node: gs.Node, rank: int) -> Optional[List[int]]:
    """A Reduce/Squeeze/Unsqueeze node's axes, normalized to ``rank``: the ``axes`` attribute
    (older opsets) or the constant second input; [] when absent, None when computed."""
    axes = ir.const_ints(node, 1, "axes")
    return None if axes is None else _normalized(axes, rank)


def rule_axes(node: gs.Node, rec: Recorder) -> None:
    """Reduce over, Squeeze or Unsqueeze only axes after the channel axis (SE blocks' spatial
    mean; BiFPN's torch.stack + sum over a new last axis): channel c stays at axis 1. A mean,
    sum, max or min over the channel axis alone reads the channels without tying them to
    anything (CBAM's spatial attention)."""
    if not node.inputs or not node.outputs or not _has_feature_io(node, rec):
        return
    x, y = node.inputs[0], node.outputs[0]
    ref = y if node.op == "Unsqueeze" else x
    shape = getattr(ref, "shape", None)
    axes = axes_of(node, len(shape)) if shape is not None else None
    if axes is None:
        return block_node(node, rec, "axes unknown")
    if not axes and (node.op != "Unsqueeze" and not node.attrs.get("noop_with_empty_axes", 0)):
        return block_node(node, rec, "no axes: every axis")
    if axes == [1] and node.op in CHANNEL_REDUCERS:
        return  # reads every channel; its output is no channel of x
    if any(a <= 1 for a in axes):
        return block_node(node, rec, "moves or reduces the channel axis")
    _pass_through(node, rec, x, y)


def _aligned_channel_dim(shape: Sequence, out_rank: int) -> Optional[object]:
    """The dim of a broadcast operand that lines up with the output's axis 1 (None if absent)."""
    pos = 1 - (out_rank - len(shape))
    return shape[pos] if 0 <= pos < len(shape) else None


def rule_elementwise(node: gs.Node, rec: Recorder) -> None:
    y = node.outputs[0]
    cy = rec.channels(y)
    if not cy:
        return block_node(node, rec) if _features(rec, node.inputs) else None
    rank = len(y.shape)
    for x in node.inputs:
        v = ir.const_value(x)
        shape = list(v.shape) if v is not None else getattr(x, "shape", None)
        if shape is None:
            return block_node(node, rec, f"input '{x.name}' has no known shape")
        c = _aligned_channel_dim(shape, rank)
        if c is None or c == 1:
            continue  # broadcast along channels: not coupled
        if c != cy:
            return block_node(node, rec, f"input '{x.name}' of shape {list(shape)} does not line up "
                                         f"with {cy} channels")
        if v is not None:
            rec.role(y, "const", node)  # per-channel constant: sliced with the channels
        elif rec.channels(x):
            rec.link(x, 0, y, 0, cy)
        else:
            return block_node(node, rec, f"input '{x.name}' has no static channel count")


def conv_kind(node: gs.Node, rec: Recorder) -> Tuple[str, str]:
    """("dense" | "grouped" | "blocked", reason). "grouped": group > 1 with the weight's
    (cout, cin / group, ...) layout; depthwise Convs are the case of one input channel a group."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    wv = ir.const_value(w) if w is not None else None
    if wv is None:
        return "blocked", "weight is not a constant"
    if len(node.inputs) > 2 and node.inputs[2].name and ir.const_value(node.inputs[2]) is None:
        return "blocked", "bias is not a constant"
    g = int(node.attrs.get("group", 1))
    if g == 1:
        return "dense", ""
    cin, cout = rec.channels(node.inputs[0]), rec.channels(node.outputs[0])
    if not cin or not cout:
        return "blocked", f"grouped Conv (group={g}) with unknown channel counts"
    if wv.ndim < 3 or cin % g or cout % g or wv.shape[0] != cout or wv.shape[1] != cin // g:
        return "blocked", (f"grouped Conv (group={g}) whose weight {list(wv.shape)} does not fit "
                           f"{cin} -> {cout}")
    return "grouped", ""


def _link_groups(node: gs.Node, rec: Recorder, x: gs.Tensor, y: gs.Tensor, g: int) -> None:
    """A Conv of ``g`` groups loses whole groups: group a's input channels and output channels
    are one channel (depthwise: input a and output a). Its output channels take the
    "depthwise" role, named after the common case."""
    ci, co = rec.channels(x) // g, rec.channels(y) // g
    for a in range(g):
        for b in range(ci):
            rec.link(x, a * ci + b, y, a * co, 1)
        for d in range(1, co):
            rec.link(y, a * co, y, a * co + d, 1)
    rec.role(y, "depthwise", node)


def rule_conv(node: gs.Node, rec: Recorder) -> None:
    x, y = node.inputs[0], node.outputs[0]
    kind, why = conv_kind(node, rec)
    if kind == "blocked":
        return block_node(node, rec, why)
    if kind == "grouped":
        return _link_groups(node, rec, x, y, int(node.attrs["group"]))
    if rec.channels(x):
        rec.role(x, "consumer", node)
    else:
        block_node(node, rec, "input channel count unknown")
        return
    if rec.channels(y):
        rec.role(y, "producer", node)


def _meets_source(expand: gs.Node, src: gs.Tensor) -> bool:
    """An Expand whose output meets ``src`` in an element-wise op: its channels are coupled with
    ``src``'s (``x * gate.expand_as(x)``), so a Shape of ``src`` stays its size after pruning."""
    return any(r.op in ELEMENTWISE_OPS and src in r.inputs for r in expand.outputs[0].outputs)


def _shape_channel_entry(node: gs.Node) -> Tuple[Optional[int], Optional[int]]:
    """(where the channel count sits in a Shape's output or None if it is not there, the output's
    length or None if unknown)."""
    shape = node.inputs[0].shape
    rank = len(shape) if shape is not None else None
    start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
    if rank is None:  # the caller keeps a negative start; a negative end may hold the count
        cut = end is not None and 0 <= int(end) <= 1
        return (1 - start if 0 <= start <= 1 and not cut else None), None
    window = list(range(rank))[slice(start, None if end is None else int(end))]
    return (window.index(1) if 1 in window else None), len(window)


def _shape_feeds_only_own_resize(node: gs.Node) -> Optional[str]:
    """None when a Shape's value leaves out the channel count (``_, _, h, w = x.shape``: Gathers
    or Slices of other entries), or only sizes a Resize of the same tensor, or an Expand of a
    tensor then combined with it, else what reads it."""
    entry, length = _shape_channel_entry(node)
    if entry is None and (length is not None or int(node.attrs.get("start", 0)) >= 0):
        return None  # reads other dims only
    stack, seen = [node.outputs[0]], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for c in t.outputs:
            picked = ir.picked_indices(c, length) if t is node.outputs[0] and length is not None else None
            if picked is not None and entry not in picked:
                continue  # an entry other than the channel count
            if c.op == "Resize" and len(c.inputs) > 3 and c.inputs[3] is t:
                if c.inputs[0] is not node.inputs[0]:
                    return _desc(c)
            elif c.op == "Expand" and len(c.inputs) > 1 and c.inputs[1] is t and \
                    _meets_source(c, node.inputs[0]):
                continue
            elif c.op == "Reshape" and c.inputs[1] is t and _restores(c, node.inputs[0]):
                continue
            elif c.op in SHAPE_ARITH_OPS:
                stack.extend(c.outputs)
            else:
                return _desc(c)
    return None


def _restores(reshape: gs.Node, src: gs.Tensor) -> bool:
    """A Reshape that ends an exported group norm of ``src``: back to ``src``'s own shape."""
    gn = group_norm.exported_around(reshape)
    return gn is not None and gn.last is reshape and gn.first.inputs[0] is src


def rule_shape(node: gs.Node, rec: Recorder) -> None:
    reader = _shape_feeds_only_own_resize(node)
    if reader is not None:
        for t in _features(rec, node.inputs):
            rec.block(t, f"channel count read by {_desc(node)} feeding {reader}")


@dataclass(frozen=True)
class Shuffle:
    """A channel shuffle: Reshape (N, C, H, W) -> (N, g, C/g, H, W), Transpose [0, 2, 1, 3, 4],
    Reshape back to (N, C, H, W), as ShuffleNet exports it; or with the spatial dims merged,
    (N, g, C/g, H*W) and [0, 2, 1, 3]. Input channel ``a * C/g + b`` becomes output channel
    ``b * g + a``."""

    first: gs.Node
    transpose: gs.Node
    last: gs.Node
    groups: int
    channels: int


def shuffle_from(node: gs.Node, shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Optional[Shuffle]:
    """The channel shuffle whose first Reshape is ``node``, when the three nodes have constant
    target shapes (an entry of -1 where the count follows from the others), static shapes (the
    tensors' own, or from ``shapes`` by name), and no other reader between them."""
    if node.op != "Reshape":
        return None
    x, mid = node.inputs[0], node.outputs[0]
    tr = ir.only_reader(mid, "Transpose")
    last = ir.only_reader(tr.outputs[0], "Reshape") if tr is not None else None
    if last is None:
        return None
    xs, ms, ys = (ir.static_dims(t, shapes) for t in (x, mid, last.outputs[0]))
    if xs is None or ms is None or ys != xs or len(xs) != 4 or len(ms) < 4:
        return None
    if list(tr.attrs.get("perm", [])) != [0, 2, 1] + list(range(3, len(ms))):
        return None
    g, m = ms[1], ms[2]
    if ms[0] != xs[0] or g * m != xs[1] or int(np.prod(ms[3:])) != xs[2] * xs[3]:
        return None
    first_shape, last_shape = ir.reshape_target(node), ir.reshape_target(last)
    if first_shape is None or last_shape is None or len(first_shape) != len(ms) or len(last_shape) != 4:
        return None
    if first_shape[1] != g or first_shape[2] not in (m, -1) or last_shape[1] not in (g * m, -1):
        return None
    return Shuffle(node, tr, last, g, g * m)


@dataclass(frozen=True)
class SplitShuffle:
    """ShuffleNetV2's shuffle and split as Megvii's code writes it (FastestDet, YOLO-FastestV2):
    Reshape (N, C, H, W) -> (N*C/2, 2, H*W), Transpose [1, 0, 2], Reshape -> (2, N, C/2, H, W),
    then Gather 0 and Gather 1 on axis 0, the even channels and the odd ones: input channel
    2k + j is channel k of output j."""

    first: gs.Node
    transpose: gs.Node
    last: gs.Node
    gathers: Tuple[gs.Node, gs.Node]  # index 0, index 1
    batch: int
    channels: int


def split_shuffle_from(node: gs.Node, shapes: Optional[Mapping[str, Sequence[int]]] = None
                       ) -> Optional[SplitShuffle]:
    """The split shuffle whose first Reshape is ``node``: constant targets, static shapes (the
    tensors' own, or from ``shapes`` by name), one reader between the nodes, and the last
    Reshape read by exactly two Gathers on axis 0 of the scalar indices 0 and 1."""
    if node.op != "Reshape":
        return None
    tr = ir.only_reader(node.outputs[0], "Transpose")
    last = ir.only_reader(tr.outputs[0], "Reshape") if tr is not None else None
    if last is None or [int(p) for p in tr.attrs.get("perm", [])] != [1, 0, 2]:
        return None
    xs, ms, ls = (ir.static_dims(t, shapes) for t in (node.inputs[0], node.outputs[0], last.outputs[0]))
    if xs is None or len(xs) != 4 or xs[1] % 2:
        return None
    n, c, h, w = xs
    if ms != [n * c // 2, 2, h * w] or ls != [2, n, c // 2, h, w]:
        return None
    if ir.reshape_target(node) is None or ir.reshape_target(last) is None:
        return None
    readers, by_index = list(last.outputs[0].outputs), {}
    for r in readers:
        idx = ir.const_value(r.inputs[1]) if r.op == "Gather" and len(r.inputs) > 1 else None
        if idx is None or idx.ndim != 0 or int(r.attrs.get("axis", 0)) != 0 or not -2 <= int(idx) <= 1:
            return None
        by_index[int(idx) % 2] = r
    if len(readers) != 2 or set(by_index) != {0, 1}:
        return None
    return SplitShuffle(node, tr, last, (by_index[0], by_index[1]), n, c)


def _split_shuffle_around(node: gs.Node) -> Optional[SplitShuffle]:
    """The split shuffle ``node`` (its Transpose, last Reshape or a Gather) belongs to."""
    chain = [node]
    for _ in range({"Transpose": 1, "Reshape": 2, "Gather": 3}.get(node.op, 0)):
        p = ir.producer(chain[-1].inputs[0])
        if p is None:
            return None
        chain.append(p)
    sh = split_shuffle_from(chain[-1]) if len(chain) > 1 else None
    return sh if sh is not None and node in (sh.transpose, sh.last) + sh.gathers else None


def rule_split_shuffle(sh: SplitShuffle, rec: Recorder) -> None:
    """Input channel 2k + j is channel k of output j; the pair 2k, 2k + 1 is one channel, since
    the two outputs keep equal counts."""
    x, outs = sh.first.inputs[0], [g.outputs[0] for g in sh.gathers]
    half = sh.channels // 2
    if rec.channels(x) != sh.channels or any(rec.channels(o) != half for o in outs):
        for t in [x] + outs:
            rec.block(t, f"channel split shuffle at {_desc(sh.first)} with unknown channel counts")
        return
    for k in range(half):
        for j, o in enumerate(outs):
            rec.link(x, 2 * k + j, o, k, 1)
        rec.link(x, 2 * k, x, 2 * k + 1, 1)


def rule_gather(node: gs.Node, rec: Recorder) -> None:
    """A Gather of a split shuffle (mapped at its first Reshape) takes no part. A Gather on the
    channel axis by constant indices reads channel ``indices[j]`` as its channel j: removing that
    input channel removes output channel j, but output channel j alone may go without it (the
    index is dropped), so the link is one way (:meth:`Recorder.reader`). Any other blocks."""
    if _split_shuffle_around(node) is not None:
        return
    x, y = node.inputs[0], node.outputs[0]
    idx = ir.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    cx = rec.channels(x) if isinstance(x, gs.Variable) else None
    if (idx is not None and idx.ndim == 1 and cx and _axis(node, x) == 1 and rec.channels(y) == len(idx)
            and np.all((idx >= -cx) & (idx < cx))):
        rec.reader(x, [int(i) % cx for i in idx], y, node)
        return
    block_node(node, rec)


def _shuffle_around(node: gs.Node) -> Optional[Shuffle]:
    """The shuffle ``node`` (a Transpose or the last Reshape) is the middle or the end of."""
    first = None
    if node.op == "Transpose":
        first = ir.producer(node.inputs[0])
    elif node.op == "Reshape":
        tr = ir.producer(node.inputs[0])
        first = ir.producer(tr.inputs[0]) if tr is not None and tr.op == "Transpose" else None
    sh = shuffle_from(first) if first is not None else None
    return sh if sh is not None and node in (sh.transpose, sh.last) else None


def rule_shuffle(node: gs.Node, rec: Recorder) -> None:
    """A channel shuffle is a fixed permutation: input channel a*m + b (m = C/g) is output
    channel b*g + a. Its Reshapes keep g groups of equal size, so channel b of every group goes
    together: the g inputs a*m + b and the g outputs b*g + a are one channel. The tensors between
    the three nodes have no channel axis and take no part. A split shuffle is mapped by
    :func:`rule_split_shuffle`. A Transpose that keeps the batch and channel axes in place
    (coordinate attention's ``permute(0, 1, 3, 2)``) passes channels through. Any other Reshape
    or Transpose keeps all its channels."""
    split = split_shuffle_from(node) if node.op == "Reshape" else None
    if split is not None:
        return rule_split_shuffle(split, rec)
    gn = group_norm.exported_from(node) if node.op == "Reshape" else None
    if gn is not None:
        return rule_exported_group_norm(gn, rec)
    sh = shuffle_from(node) if node.op == "Reshape" else None
    if sh is not None:
        x, y = sh.first.inputs[0], sh.last.outputs[0]
        if rec.channels(x) != sh.channels or rec.channels(y) != sh.channels:
            return block_node(node, rec, "channel shuffle with unknown channel counts")
        m = sh.channels // sh.groups
        for a in range(sh.groups):
            for b in range(m):
                rec.link(x, a * m + b, y, b * sh.groups + a, 1)
                if a:
                    rec.link(x, b, x, a * m + b, 1)
        return
    perm = node.attrs.get("perm") if node.op == "Transpose" else None
    if perm is not None and [int(p) for p in perm[:2]] == [0, 1]:
        return _pass_through(node, rec, node.inputs[0], node.outputs[0])
    if _shuffle_around(node) is None and _split_shuffle_around(node) is None and \
            group_norm.exported_around(node) is None:
        block_node(node, rec)


def _or_linear_se(fallback: Rule) -> Rule:
    """``fallback``, unless the node starts or ends a Linear excitation branch
    (:mod:`.linear_se`): its flatten couples the pooled channels with the gate's, its unflatten
    does nothing more."""
    def rule(node: gs.Node, rec: Recorder) -> None:
        se = linear_se.se_around(node)
        if se is None:
            return fallback(node, rec)
        if node is se.first:
            x, gate = se.first.inputs[0], se.last.outputs[0]
            if rec.channels(x) != se.channels or rec.channels(gate) != se.channels:
                return block_node(node, rec, "excitation branch with unknown channel counts")
            rec.link(x, 0, gate, 0, se.channels)
    return rule


def rule_expand(node: gs.Node, rec: Recorder) -> None:
    """Expand that broadcasts the spatial axes of (N, C, 1, 1) keeps channel c at c, when its
    target follows the pruned count: a constant (rewritten), or the Shape of a tensor the result
    is then combined with (``gate.expand_as(x)``). A target computed otherwise blocks."""
    if not node.inputs or not node.outputs or not _has_feature_io(node, rec):
        return
    if len(node.inputs) < 2 or not node.inputs[1].name:
        return block_node(node, rec, "target shape computed")
    if ir.const_ints(node, 1) is None:  # computed: follows only a Shape of what it meets
        src = ir.producer(node.inputs[1])
        if src is None or src.op != "Shape" or not _meets_source(node, src.inputs[0]):
            return block_node(node, rec, "target shape computed")
    _pass_through(node, rec, node.inputs[0], node.outputs[0])


def rule_depth_space(node: gs.Node, rec: Recorder) -> None:
    """DepthToSpace / SpaceToDepth of block b: each channel of the shallow side is b*b channels of
    the deep side, ``t*C + c`` in DCR order (SpaceToDepth, DepthToSpace's default), ``c*b*b + t``
    in CRD order. Pruning channel c removes all b*b together and keeps the order of the rest."""
    if not _has_feature_io(node, rec):
        return
    x, y = node.inputs[0], node.outputs[0]
    deep, shallow = (x, y) if node.op == "DepthToSpace" else (y, x)
    b = int(node.attrs.get("blocksize", 0))
    cd, cs = rec.channels(deep), rec.channels(shallow)
    if not cd or not cs or b < 1 or cd != cs * b * b:
        return block_node(node, rec, "channel counts do not match the block size")
    mode = ir.text(node.attrs.get("mode", "DCR"))
    for t in range(b * b):
        if mode == "CRD":
            for c in range(cs):
                rec.link(deep, c * b * b + t, shallow, c, 1)
        else:
            rec.link(deep, t * cs, shallow, 0, cs)


def transpose_refusal(node: gs.Node) -> Optional[str]:
    """Why a ConvTranspose is not exactly a 1x1 Conv and a DepthToSpace, None when it is: 2-D,
    constant weight and bias, one group, a square kernel equal to its stride, no padding or
    dilation, no output shape or padding (each input pixel then owns one output block)."""
    w = ir.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return "its weight is not a constant"
    if w.ndim != 4:
        return f"it is {w.ndim - 2}-D (only 2-D is mapped)"
    if len(node.inputs) > 2 and node.inputs[2].name and ir.const_value(node.inputs[2]) is None:
        return "its bias is not a constant"
    at = ir.conv_attrs(node, w.shape)
    if at.group != 1:
        return f"it has {at.group} groups"
    k, s = at.kernel, at.strides
    if k != s or k != tuple(int(v) for v in w.shape[2:]) or k[0] != k[1]:
        return (f"its kernel {'x'.join(map(str, k))} is not its square stride {'x'.join(map(str, s))}: "
                "output blocks overlap or leave gaps")
    if any(d != 1 for d in at.dilations) or any(at.pads) or \
            any(int(v) for v in node.attrs.get("output_padding", [])) or "output_shape" in node.attrs:
        return "it pads, dilates or sets its output shape"
    return None


def rule_conv_transpose(node: gs.Node, rec: Recorder) -> None:
    """ConvTranspose blocks. prune-channels maps the kernel-equals-stride kind itself, as a 1x1
    Conv and a DepthToSpace (passes/_prune_lower), so the reason names what stops this one."""
    block_node(node, rec, transpose_refusal(node)
               or "prune-channels maps it as a 1x1 Conv and a DepthToSpace, this analysis does not")


RULES: Dict[str, Rule] = {
    **{op: rule_unary for op in UNARY_OPS},
    **{op: rule_elementwise for op in ELEMENTWISE_OPS},
    **{op: rule_pool for op in POOL_OPS},
    **{op: rule_axes for op in REDUCE_OPS},
    "Squeeze": _or_linear_se(rule_axes), "Unsqueeze": _or_linear_se(rule_axes),
    "Flatten": _or_linear_se(block_node), "Expand": rule_expand,
    "BatchNormalization": rule_norm, "InstanceNormalization": rule_instancenorm,
    "GroupNormalization": rule_group_norm,
    "Resize": rule_resize, "Upsample": rule_resize,
    "Concat": rule_concat, "Split": rule_split, "Slice": rule_slice,
    "DepthToSpace": rule_depth_space, "SpaceToDepth": rule_depth_space,
    "ConvTranspose": rule_conv_transpose,
    "Conv": rule_conv, "Shape": rule_shape, "Pad": rule_pad, "Constant": lambda n, r: None,
    "Reshape": _or_linear_se(rule_shuffle), "Transpose": rule_shuffle, "Gather": rule_gather,
}


def rule_for(op: str) -> Rule:
    return RULES.get(op, block_node)
