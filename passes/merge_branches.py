"""merge-branches: parallel Conv branches of one input, summed by an Add, become one Conv (exact).

A RepVGG / MobileOne / YOLOv6 / PP-YOLOE block exported without its re-parameterisation computes
``Conv3x3(x) + Conv1x1(x) + BN(x)``: three branches over the same tensor, summed. Convolution is
linear, so the sum is one Conv whose kernel is the sum of the branch kernels (each placed at the
taps it reads) and whose bias is the sum of the biases. The block then costs one Conv instead of
two Convs, a BatchNormalization and two Adds.

What changes in the graph, per ``Add(u, v)`` (repeated until no Add matches, so chains of Adds
merge one branch per round):
- ``u`` and ``v`` are Convs reading the same tensor with constant weights, the same strides,
  dilations and groups: the Conv with the widest kernel takes both kernels and biases. The other
  kernel must sit inside it at a whole tap offset with the same output size (a 1x1 with pads 0
  inside a 3x3 with pads 1: yes; a 3x3 pads 0 beside a 3x3 pads 1: no, the output sizes differ).
- ``u`` is such a Conv and ``v`` is its input itself, or a per-channel affine of it: ``Mul(x, s)``,
  ``Add(x, t)``, ``Add(Mul(x, s), t)`` (fold-batchnorm's standalone BatchNormalization) or a
  BatchNormalization: the identity goes into the kernel's centre tap (stride 1, as many output
  as input channels).
The surviving Conv keeps its name; the Add's output tensor is unchanged.

Must not fire (reason in the report): a branch whose output is also read elsewhere or is a graph
output, non-constant or non-float weights, differing strides, dilations or groups, a kernel that
does not fit the widest one, an identity with a stride, with a different channel count, or whose
centre falls between taps, ``auto_pad`` SAME with unknown input size, an affine whose constant
is not per-channel. Adds whose operands are not both branches of one tensor are not candidates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import Numerics, Pass, PassContext, PassReport, PassResult

from ._conv_util import (float_dtype, new_const, param, rank,
                         sole_consumer, static_shape, with_shapes)
from ._rounds import run_rounds
from .fold_affine import per_channel
from .fold_batchnorm import bn_params


@dataclass(frozen=True)
class ConvBranch:
    node: gs.Node
    weight: np.ndarray
    bias: Optional[np.ndarray]
    attrs: ir.ConvAttrs
    pads: Tuple[int, ...]

    @property
    def extent(self) -> Tuple[int, ...]:
        """Input span of one output position per spatial dim: (k - 1) * d + 1."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.weight.shape[2:], self.attrs.dilations))


@dataclass(frozen=True)
class Identity:
    """``s * x + t`` per channel (s = 1, t = 0 for x itself)."""

    s: np.ndarray
    t: np.ndarray


Branch = Union[ConvBranch, Identity]


@dataclass(frozen=True)
class Plan:
    add: gs.Node
    base: ConvBranch
    weight: np.ndarray
    bias: np.ndarray
    kind: str          # "conv" or "identity"


def conv_branch(t: gs.Tensor, outputs: Set[str]) -> Union[ConvBranch, str, None]:
    """The Conv producing ``t`` as a mergeable branch; None when ``t`` is not a Conv's output."""
    node = ir.producer(t)
    if node is None or node.op != "Conv" or node.outputs[0] is not t:
        return None
    if sole_consumer(t, outputs) is None:
        return f"Conv '{node.name}' output '{t.name}' is read by more than the Add"
    w, why = param(node.inputs[1] if len(node.inputs) > 1 else None, f"Conv '{node.name}' weight")
    if w is None:
        return why
    b = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        b, why = param(node.inputs[2], f"Conv '{node.name}' bias")
        if b is None:
            return why
    if float_dtype(*([w] if b is None else [w, b])) is None:
        return f"Conv '{node.name}' weights are not float"
    if w.ndim < 3:
        return f"Conv '{node.name}' weight has rank {w.ndim}"
    at = ir.conv_attrs(node, w.shape)
    xs = static_shape(node.inputs[0])
    pads = ir.explicit_pads(at, xs[2:] if xs else None)
    if pads is None:
        return f"Conv '{node.name}' pads {at.auto_pad} on an input of unknown size"
    return ConvBranch(node, w, b, at, pads)


def _affine_step(node: gs.Node, x: gs.Tensor, channels: Optional[int]
                 ) -> Union[Tuple[np.ndarray, np.ndarray], str, None]:
    """(s, t) of one per-channel affine op reading ``x``; None when ``node`` is not one."""
    if node.op == "BatchNormalization":
        if node.inputs[0] is not x:
            return None
        st = bn_params(node, set())
        return st if not isinstance(st, str) else f"BatchNormalization '{node.name}': {st}"
    if node.op not in ("Mul", "Add") or len(node.inputs) != 2 or channels is None:
        return None
    other = node.inputs[1] if node.inputs[0] is x else node.inputs[0]
    if other is x or ir.const_value(other) is None:
        return None
    c = np.asarray(ir.const_value(other))
    if not np.issubdtype(c.dtype, np.floating):
        return None
    vec = per_channel(c, channels, rank(x))
    if isinstance(vec, str):
        return f"{node.op} '{node.name}': {vec}"
    one, zero = np.ones(channels), np.zeros(channels)
    return (vec, zero) if node.op == "Mul" else (one, vec)


def identity_branch(v: gs.Tensor, x: gs.Tensor, channels: int) -> Union[Identity, str, None]:
    """``v`` as ``s * x + t`` through at most two per-channel affine ops; None when ``v`` is not
    ``x`` or an affine of it. The affine ops stay in the graph while anything else reads them."""
    s, t = np.ones(channels), np.zeros(channels)   # v = s * cur + t
    steps = 0
    cur = v
    while cur is not x:
        node = ir.producer(cur)
        if node is None or steps == 2 or node.outputs[0] is not cur:
            return None
        src = node.inputs[0] if node.op == "BatchNormalization" else next(
            (i for i in node.inputs if ir.const_value(i) is None), None)
        if src is None:
            return None
        st = _affine_step(node, src, channels)
        if st is None or isinstance(st, str):
            return st
        s, t = s * st[0], t + s * st[1]
        steps += 1
        cur = src
    return Identity(s, t)


def _offsets(base: ConvBranch, other: ConvBranch) -> Union[Tuple[int, ...], str]:
    """Tap offsets of ``other``'s kernel inside ``base``'s, or the reason it does not fit."""
    n = len(base.attrs.strides)
    offs = []
    for i in range(n):
        d, kb, ko = base.attrs.dilations[i], base.weight.shape[2 + i], other.weight.shape[2 + i]
        shift = base.pads[i] - other.pads[i]
        size_b = base.pads[i] + base.pads[n + i] - (kb - 1) * d
        size_o = other.pads[i] + other.pads[n + i] - (ko - 1) * d
        if size_b != size_o:
            return (f"Conv '{other.node.name}' (kernel {ko}, pads {other.pads[i]}+{other.pads[n + i]}) "
                    f"gives another output size than '{base.node.name}' (kernel {kb}, "
                    f"pads {base.pads[i]}+{base.pads[n + i]})")
        if shift % d or shift < 0 or shift // d + ko > kb:
            return f"Conv '{other.node.name}' kernel does not sit on the taps of '{base.node.name}'"
        offs.append(shift // d)
    return tuple(offs)


def merge_convs(a: ConvBranch, b: ConvBranch) -> Union[Tuple[ConvBranch, np.ndarray, np.ndarray], str]:
    if a.node.inputs[0] is not b.node.inputs[0]:
        return "the branches read different tensors"
    if a.weight.ndim != b.weight.ndim:
        return f"Convs '{a.node.name}' and '{b.node.name}' have different spatial ranks"
    for what in ("strides", "group"):
        if getattr(a.attrs, what) != getattr(b.attrs, what):
            return (f"Convs '{a.node.name}' and '{b.node.name}' differ in {what}: "
                    f"{getattr(a.attrs, what)} vs {getattr(b.attrs, what)}")
    if a.weight.shape[:2] != b.weight.shape[:2]:
        return (f"Convs '{a.node.name}' and '{b.node.name}' have weights {list(a.weight.shape)} and "
                f"{list(b.weight.shape)}")
    base, other = (a, b) if np.prod(a.extent) >= np.prod(b.extent) else (b, a)
    # a dilation matters only along a kernel dim wider than 1
    if any(k > 1 and do != db for k, do, db in zip(other.weight.shape[2:], other.attrs.dilations,
                                                    base.attrs.dilations)):
        return (f"Convs '{a.node.name}' and '{b.node.name}' differ in dilations: "
                f"{a.attrs.dilations} vs {b.attrs.dilations}")
    offs = _offsets(base, other)
    if isinstance(offs, str):
        return offs
    w = base.weight.astype(np.float64)
    idx = (slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offs, other.weight.shape[2:]))
    w[idx] += other.weight
    bias = np.zeros(w.shape[0])
    for br in (a, b):
        if br.bias is not None:
            bias += br.bias.astype(np.float64).reshape(-1)
    return base, w, bias


def merge_identity(conv: ConvBranch, ident: Identity) -> Union[Tuple[np.ndarray, np.ndarray], str]:
    w = conv.weight
    cout, cin_g, g = w.shape[0], w.shape[1], conv.attrs.group
    if cin_g * g != cout:
        return f"Conv '{conv.node.name}' maps {cin_g * g} to {cout} channels: no identity to add"
    if any(s != 1 for s in conv.attrs.strides):
        return f"Conv '{conv.node.name}' has strides {list(conv.attrs.strides)}: the identity branch has none"
    n = len(conv.attrs.strides)
    centre = []
    for i in range(n):
        p, d, k = conv.pads[i], conv.attrs.dilations[i], w.shape[2 + i]
        if p % d or p // d >= k or conv.pads[i] + conv.pads[n + i] != (k - 1) * d:
            return (f"Conv '{conv.node.name}' (kernel {k}, pads {p}+{conv.pads[n + i]}) does not keep "
                    "the input size with a tap on each input position")
        centre.append(p // d)
    out = w.astype(np.float64)
    ch = np.arange(cout)
    out[(ch, ch % cin_g) + tuple(np.full(cout, c) for c in centre)] += ident.s
    bias = np.zeros(cout) if conv.bias is None else conv.bias.astype(np.float64).reshape(-1)
    return out, bias + ident.t


def plan_add(add: gs.Node, outputs: Set[str]) -> Union[Plan, str, None]:
    """The merge of ``add``'s two operands; None when they are not branches of one tensor."""
    if len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return None
    u, v = add.inputs
    cu, cv = conv_branch(u, outputs), conv_branch(v, outputs)
    if isinstance(cu, ConvBranch) and isinstance(cv, ConvBranch):
        if cu.node.inputs[0] is not cv.node.inputs[0]:
            return None
        got = merge_convs(cu, cv)
        if isinstance(got, str):
            return got
        return Plan(add, got[0], got[1], got[2], "conv")
    for conv, other in ((cu, v), (cv, u)):
        if not isinstance(conv, ConvBranch):
            continue
        ident = identity_branch(other, conv.node.inputs[0], conv.weight.shape[0])
        if ident is None:
            continue
        if isinstance(ident, str):
            return ident
        got = merge_identity(conv, ident)
        if isinstance(got, str):
            return got
        return Plan(add, conv, got[0], got[1], "identity")
    reasons = [c for c in (cu, cv) if isinstance(c, str)]
    if reasons and _same_source(u, v):
        return reasons[0]
    return None


def _same_source(u: gs.Tensor, v: gs.Tensor) -> bool:
    """Both operands computed from one tensor by a Conv or are that tensor (a would-be merge)."""
    def src(t: gs.Tensor) -> Optional[gs.Tensor]:
        p = ir.producer(t)
        return p.inputs[0] if p is not None and p.op == "Conv" else None
    su, sv = src(u), src(v)
    return su is not None and (su is sv or su is v) or sv is not None and sv is u


def apply(p: Plan, alloc: ir.NameAllocator) -> None:
    conv, y = p.base.node, p.add.outputs[0]
    dt = p.base.weight.dtype
    x = conv.inputs[0]
    p.add.inputs.clear()
    p.add.outputs.clear()
    conv.inputs.clear()
    conv.inputs.extend([x, new_const(alloc, f"{conv.name}/merged_weight", p.weight.astype(dt)),
                        new_const(alloc, f"{conv.name}/merged_bias", p.bias.astype(dt))])
    conv.attrs["kernel_shape"] = list(p.weight.shape[2:])
    conv.attrs["pads"] = list(p.base.pads)
    conv.attrs.pop("auto_pad", None)
    conv.outputs.clear()
    conv.outputs.append(y)


def one_round(graph: gs.Graph) -> Tuple[List[Plan], Dict[str, str]]:
    outputs = ir.graph_output_names(graph)
    plans: List[Plan] = []
    refused: Dict[str, str] = {}
    for add in [n for n in graph.nodes if n.op == "Add"]:
        p = plan_add(add, outputs)
        if isinstance(p, str):
            refused[add.name] = p
        elif p is not None:
            plans.append(p)
    return plans, refused


class MergeBranches(Pass):
    """Parallel Conv branches over one input summed by an Add merged into one Conv; exact."""

    name = "merge-branches"
    option_names = ()
    numerics = Numerics.EXACT
    after = ("canonicalize", "fold-batchnorm", "fold-affine")
    description = "merge Conv branches summed by Add (RepVGG-style blocks) into one Conv"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        report = PassReport()
        graph = ir.to_graph(with_shapes(model))
        ir.name_unnamed_nodes(graph)
        alloc = ir.NameAllocator.for_graph(graph)

        def merge(p: Plan) -> None:
            apply(p, alloc)
            report.count(f"merged_{p.kind}")

        # Add(Add(conv_a, conv_b), identity): one branch per round
        return run_rounds(model, graph, report, one_round, merge, "merged",
                          "merge-branches: %d branch(es) merged into Convs")
