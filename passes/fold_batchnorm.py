"""fold-batchnorm: inference BatchNormalization folded into neighbouring weights.

What changes in the graph, per BatchNormalization (BN = per-channel ``s * x + t``):
- after a Conv, a ConvTranspose (any groups; weights (Cin, Cout/g, k..)), a Gemm (transB aware)
  or a 2-D MatMul with constant weights (becomes a Gemm): folded into weights and bias;
- otherwise, before a Conv that is its only reader: folded into that Conv when exact, i.e. the
  Conv has no padding or the BN shift t is zero everywhere (padding adds zeros *after* the BN, so
  a border tap would see 0 where the folded bias assumes t);
- otherwise (standalone): option ``standalone`` = ``mul-add`` (default: per-channel Mul + Add),
  ``depthwise-conv`` (a 1x1 depthwise Conv, rank >= 3) or ``keep``.

A weight op whose weight other nodes read too (RTMDet's head shares each Conv across the levels,
each level with its own BN; the dynamo exporter leaves those BNs unfolded) gets its own folded
copy, as onnxruntime does when it loads the model; option ``shared_weights`` = ``keep`` refuses
such folds instead. The report counts the copies (``weights_copied``).

Must not fire (reason in the report): training mode (``training_mode=1`` or running statistics
used), parameters that are not constants, weights shared with other nodes under
``shared_weights=keep`` (and always for a BN before a Conv), a producer output read by more than
the BN, BN parameters that are not per-channel, ranks the fold cannot prove.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Set, Tuple, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import Numerics, Pass, PassContext, PassReport, PassResult, UsageError

from ._affine_fold import (OUT_KINDS, Target, apply_in, apply_out, bn_affine, fold_in_conv, fold_out,
                           out_target)
from ._conv_util import new_const, param, rank, shared, static_shape, with_shapes
from ._rounds import run_rounds

STANDALONE = ("mul-add", "depthwise-conv", "keep")
SHARED = ("copy", "keep")


@dataclass(frozen=True)
class FoldOut:
    bn: gs.Node
    target: Target
    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class FoldIn:
    bn: gs.Node
    conv: gs.Node
    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True)
class Standalone:
    bn: gs.Node
    s: np.ndarray
    t: np.ndarray
    rank: int
    mode: str
    note: str = ""  # why the BN could not go into a neighbouring Conv


Plan = Union[FoldOut, FoldIn, Standalone]
DEFER = "deferred"  # the neighbour is being rewritten this round; try again next round


def bn_params(bn: gs.Node, outputs: Set[str]) -> Union[Tuple[np.ndarray, np.ndarray], str]:
    """(s, t) of an inference BN with constant per-channel parameters, else a reason."""
    if int(bn.attrs.get("training_mode", 0)):
        return "training-mode BatchNormalization (training_mode=1)"
    for extra in bn.outputs[1:]:
        if extra.name and (extra.outputs or extra.name in outputs):
            return f"training-mode BatchNormalization: running statistics output '{extra.name}' is used"
        if extra.name:   # below opset 14 the outputs alone make it one: onnxruntime uses the batch's stats
            return f"training-mode BatchNormalization: it lists the statistics output '{extra.name}'"
    if int(bn.attrs.get("spatial", 1)) != 1:
        return "BatchNormalization with spatial=0 (per-activation statistics)"
    vals = []
    for i, what in enumerate(("scale", "B", "mean", "var"), start=1):
        v, why = param(bn.inputs[i] if len(bn.inputs) > i else None, f"BatchNormalization {what}")
        if v is None:
            return why
        vals.append(v.astype(np.float64).reshape(-1) if v.ndim <= 1 else v)
    if any(v.ndim != 1 or v.shape != vals[0].shape for v in vals):
        return f"BatchNormalization parameters are not per-channel vectors: {[list(v.shape) for v in vals]}"
    return bn_affine(*vals, eps=float(bn.attrs.get("epsilon", 1e-5)))


def plan_in(bn: gs.Node, s: np.ndarray, t: np.ndarray, outputs: Set[str]) -> Union[FoldIn, str, None]:
    """BN -> Conv when the Conv is the BN's only reader; None when there is no such Conv."""
    y = bn.outputs[0]
    if y.name in outputs or len(y.outputs) != 1 or y.outputs[0].op != "Conv":
        return None
    conv = y.outputs[0]
    if conv.inputs[0] is not y or any(i is y for i in conv.inputs[1:]):
        return None
    w, why = param(conv.inputs[1], f"Conv '{conv.name}' weight")
    if w is None:
        return why
    if shared(conv.inputs[1]):
        return f"Conv '{conv.name}' weight '{conv.inputs[1].name}' is shared with other node inputs"
    b = None
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        b, why = param(conv.inputs[2], f"Conv '{conv.name}' bias")
        if b is None:
            return why
    at = ir.conv_attrs(conv, w.shape)
    if w.shape[1] * at.group != s.shape[0]:
        return f"Conv '{conv.name}' reads {w.shape[1] * at.group} channels, BN has {s.shape[0]}"
    xs = static_shape(bn.inputs[0])
    pads = ir.explicit_pads(at, xs[2:] if xs else None)
    if (pads is None or any(pads)) and np.any(t != 0):
        return (f"BN -> Conv '{conv.name}' not exact: the Conv pads "
                f"{list(pads) if pads is not None else at.auto_pad} and the BN shift is nonzero")
    w2, b2 = fold_in_conv(w, b, s, t, at.group)
    return FoldIn(bn, conv, w2, b2)


def plan_bn(bn: gs.Node, outputs: Set[str], claimed: Set[int], mode: str,
            copy_shared: bool = True) -> Union[Plan, str]:
    st = bn_params(bn, outputs)
    if isinstance(st, str):
        return st
    s, t = st
    prod = ir.producer(bn.inputs[0])
    if prod is not None and prod.op in OUT_KINDS:
        if id(prod) in claimed:
            return DEFER
        tg = out_target(prod, bn, outputs, copy_shared=copy_shared)
        if isinstance(tg, str):
            return tg
        if tg.channels != s.shape[0]:
            return f"{prod.op} '{prod.name}' has {tg.channels} output channels, BN has {s.shape[0]}"
        w, b = fold_out(tg, s, t)
        return FoldOut(bn, tg, w, b)
    fin = plan_in(bn, s, t, outputs)
    if isinstance(fin, FoldIn) and id(fin.conv) in claimed:
        return DEFER
    if isinstance(fin, FoldIn) or mode == "keep":
        return fin if fin is not None else "standalone BatchNormalization kept (standalone=keep)"
    r = rank(bn.inputs[0])
    if r is None or r < 2:
        return f"{fin + '; ' if fin else ''}standalone BatchNormalization input rank unknown"
    if mode == "depthwise-conv" and r < 3:
        return f"{fin + '; ' if fin else ''}depthwise Conv needs rank >= 3, input rank is {r}"
    return Standalone(bn, s, t, r, mode, fin or "")


def apply_standalone(p: Standalone, graph: gs.Graph, alloc: ir.NameAllocator) -> None:
    bn, dt = p.bn, np.asarray(ir.const_value(p.bn.inputs[1])).dtype
    x, y = bn.inputs[0], bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    c = p.s.shape[0]
    if p.mode == "depthwise-conv":
        w = new_const(alloc, f"{bn.name}/dw_weight", p.s.reshape((c, 1) + (1,) * (p.rank - 2)).astype(dt))
        b = new_const(alloc, f"{bn.name}/dw_bias", p.t.astype(dt))
        graph.nodes.append(gs.Node("Conv", alloc(f"{bn.name}/dw_conv"), attrs={"group": c},
                                   inputs=[x, w, b], outputs=[y]))
        return
    shape = (c,) + (1,) * (p.rank - 2)
    s = new_const(alloc, f"{bn.name}/scale", p.s.reshape(shape).astype(dt))
    t = new_const(alloc, f"{bn.name}/shift", p.t.reshape(shape).astype(dt))
    mid = gs.Variable(alloc(f"{bn.name}/scaled"), dtype=x.dtype, shape=x.shape)
    graph.nodes.append(gs.Node("Mul", alloc(f"{bn.name}/Mul"), inputs=[x, s], outputs=[mid]))
    graph.nodes.append(gs.Node("Add", alloc(f"{bn.name}/Add"), inputs=[mid, t], outputs=[y]))


def apply(p: Plan, graph: gs.Graph, alloc: ir.NameAllocator) -> str:
    if isinstance(p, FoldOut):
        apply_out(p.target, p.weight, p.bias, p.bn, alloc)
        return f"into_{p.target.node.op.lower()}"
    if isinstance(p, FoldIn):
        apply_in(p.conv, p.weight, p.bias, p.bn, alloc)
        return "into_following_conv"
    apply_standalone(p, graph, alloc)
    return f"standalone_{p.mode.replace('-', '_')}"


def one_round(graph: gs.Graph, mode: str, copy_shared: bool = True) -> Tuple[List[Plan], Dict[str, str]]:
    """All non-conflicting plans of one round (each weight op claimed once) and the refusals."""
    outputs = ir.graph_output_names(graph)
    plans: List[Plan] = []
    refused: Dict[str, str] = {}
    claimed: Set[int] = set()
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization" and n.inputs]:
        p = plan_bn(bn, outputs, claimed, mode, copy_shared)
        if p == DEFER:
            continue
        if isinstance(p, str):
            refused[bn.name] = p
            continue
        if isinstance(p, FoldOut):
            claimed.add(id(p.target.node))
        elif isinstance(p, FoldIn):
            claimed.add(id(p.conv))
        plans.append(p)
    return plans, refused


class FoldBatchNorm(Pass):
    """Inference BatchNormalization folded into Conv / ConvTranspose / Gemm / MatMul; exact."""

    name = "fold-batchnorm"
    option_names = ("standalone", "shared_weights")
    numerics = Numerics.EXACT
    after = ("canonicalize",)
    description = "fold BatchNormalization into neighbouring Conv/Gemm weights"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        mode = ctx.opt(self.name, "standalone", "mul-add")
        if mode not in STANDALONE:
            raise UsageError(f"fold-batchnorm: unknown standalone mode '{mode}' "
                             f"(choose {', '.join(STANDALONE)})")
        sharing = ctx.opt(self.name, "shared_weights", "copy")
        if sharing not in SHARED:
            raise UsageError(f"fold-batchnorm: unknown shared_weights mode '{sharing}' "
                             f"(choose {', '.join(SHARED)})")
        report = PassReport()
        graph = ir.to_graph(with_shapes(model))
        alloc = ir.NameAllocator.for_graph(graph)

        def fold(p: Plan) -> None:
            report.count(apply(p, graph, alloc))
            if isinstance(p, FoldOut) and p.target.sharing:
                report.count("weights_copied")
            if isinstance(p, Standalone) and p.note:
                report.details.setdefault("standalone_notes", {})[p.bn.name] = p.note

        # a Conv between two BNs takes one fold per round
        return run_rounds(model, graph, report, lambda g: one_round(g, mode, sharing == "copy"), fold,
                          "folded", "fold-batchnorm: %d BatchNormalization node(s) removed")
