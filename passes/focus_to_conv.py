"""focus-to-conv: the Focus stem (pixel phases stacked on channels, then a Conv) as one Conv.

What changes in the graph: the Slices/Concat (or SpaceToDepth, or pixel-unshuffle Reshapes) that
build the B*B stride-B phases of an image tensor ``x`` and the KxK Conv that reads them become one
Conv on ``x`` with kernel B*K, stride B*S and padding B*P (per side, also asymmetric pads and
``auto_pad`` resolved). Exact: row ``B*(S*u + i - P) + a`` of ``x`` is the row the phase Conv read
at kernel tap ``i`` of phase ``a``, so each product is the same; only summation order changes.
Option ``mode``: ``merge`` (default) or ``space-to-depth-conv``: the phases are produced by a fixed
one-hot stride-B BxB Conv and the original Conv is kept (for targets without strided Slice
that want the original Conv; on onnxruntime CPU it measured 1.1-1.3x slower than Slice/Concat on a
640x640 stem, while ``merge`` measured 0.72-0.87x).

Must not fire (reason in the report): H/W of ``x`` unknown or not divisible by B (the phases of an
odd size drop or pad a row the merged Conv would read), a Conv with dilation or groups, a phase
tensor feeding more than the Conv, intermediate Slice outputs read by other nodes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import Numerics, Pass, PassContext, PassReport, PassResult, UsageError

from ._conv_util import new_const, param, sole_consumer, with_shapes
from ._focus_match import FocusMatch, match, private_nodes_problem

log = logging.getLogger(__name__)

MODES = ("merge", "space-to-depth-conv")


@dataclass(frozen=True)
class MergePlan:
    match: FocusMatch
    conv: gs.Node
    weight: np.ndarray
    attrs: Dict[str, Any]


@dataclass(frozen=True)
class PhaseConvPlan:
    match: FocusMatch
    weight: np.ndarray


Plan = Union[MergePlan, PhaseConvPlan]


def merged_weight(w: np.ndarray, channels, block: int) -> np.ndarray:
    """(O, B*B*C, K, K) weights on the phases -> (O, C, B*K, B*K) weights on the image."""
    cin = 1 + max(c for c, _, _ in channels)
    out = np.zeros((w.shape[0], cin, block * w.shape[2], block * w.shape[3]), dtype=w.dtype)
    for k, (c, a, b) in enumerate(channels):
        out[:, c, a::block, b::block] = w[:, k]
    return out


def phase_weight(channels, block: int, dtype: np.dtype) -> np.ndarray:
    """One-hot (B*B*C, C, B, B) weights: output channel k copies x[c, B*i + a, B*j + b]."""
    cin = 1 + max(c for c, _, _ in channels)
    out = np.zeros((len(channels), cin, block, block), dtype=dtype)
    for k, (c, a, b) in enumerate(channels):
        out[k, c, a, b] = 1
    return out


def plan_merge(m: FocusMatch, outputs) -> Union[MergePlan, str]:
    conv = sole_consumer(m.out, outputs)
    if conv is None:
        n = len(m.out.outputs) + (m.out.name in outputs)
        return f"phase tensor '{m.out.name}' feeds {n} consumers, not only a Conv"
    if conv.op != "Conv" or conv.inputs[0] is not m.out:
        return f"phase tensor '{m.out.name}' feeds {conv.op} '{conv.name}', not a Conv input"
    w, why = param(conv.inputs[1], f"Conv '{conv.name}' weight")
    if w is None:
        return why
    at = ir.conv_attrs(conv, w.shape)
    if at.group != 1:
        return f"Conv '{conv.name}' has group={at.group} (phases of one pixel fall in different groups)"
    if w.ndim != 4 or w.shape[1] != len(m.channels):
        return f"Conv '{conv.name}' weight shape {list(w.shape)} does not read the {len(m.channels)} phases"
    if any(d != 1 for d in at.dilations):
        return f"Conv '{conv.name}' has dilations {list(at.dilations)}"
    _, _, h, wd = m.base.shape
    pads = ir.explicit_pads(at, (h // m.block, wd // m.block))
    if pads is None:
        return f"Conv '{conv.name}' auto_pad {at.auto_pad} needs the input size"
    blk = m.block
    attrs = {k: v for k, v in conv.attrs.items() if k != "auto_pad"}
    attrs.update(kernel_shape=[blk * k for k in at.kernel], strides=[blk * s for s in at.strides],
                 pads=[blk * p for p in pads], dilations=[1, 1], group=1)
    return MergePlan(m, conv, merged_weight(w, m.channels, blk), attrs)


def plan_phase_conv(m: FocusMatch) -> Union[PhaseConvPlan, str]:
    dt = m.base.dtype
    if dt is None or not np.issubdtype(np.dtype(dt), np.floating):
        return f"input '{m.base.name}' is not a float tensor (dtype {dt})"
    return PhaseConvPlan(m, phase_weight(m.channels, m.block, np.dtype(dt)))


def apply(plan: Plan, graph: gs.Graph, alloc: ir.NameAllocator) -> Dict[str, Any]:
    m = plan.match
    if isinstance(plan, MergePlan):
        conv = plan.conv
        conv.inputs[0] = m.base
        conv.inputs[1] = new_const(alloc, f"{conv.inputs[1].name}_merged", plan.weight)
        conv.attrs = plan.attrs
        return {"node": m.head.name, "encoding": m.encoding, "block": m.block, "conv": conv.name,
                "kernel": plan.attrs["kernel_shape"], "strides": plan.attrs["strides"],
                "pads": plan.attrs["pads"]}
    out = m.out
    m.head.outputs.clear()
    w = new_const(alloc, f"{m.head.name}/phase_weight", plan.weight)
    node = gs.Node("Conv", alloc(f"{m.head.name}/phase_conv"),
                   attrs={"kernel_shape": [m.block] * 2, "strides": [m.block] * 2, "pads": [0] * 4,
                          "dilations": [1, 1], "group": 1},
                   inputs=[m.base, w], outputs=[out])
    graph.nodes.append(node)
    return {"node": m.head.name, "encoding": m.encoding, "block": m.block, "conv": node.name}


class FocusToConv(Pass):
    """Focus stem (phases + KxK Conv) -> one (B*K)x(B*K) Conv with stride B*S; exact."""

    name = "focus-to-conv"
    option_names = ("mode",)
    numerics = Numerics.EXACT
    after = ("canonicalize",)
    description = "rewrite the Focus stem (Slice/Concat or SpaceToDepth + Conv) as one Conv"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        mode = ctx.opt(self.name, "mode", "merge")
        if mode not in MODES:
            raise UsageError(f"focus-to-conv: unknown mode '{mode}' (choose {', '.join(MODES)})")
        report = PassReport()
        graph = ir.to_graph(with_shapes(model))
        outputs = ir.graph_output_names(graph)
        plans: List[Plan] = []
        for node in list(graph.nodes):
            m = match(node)
            if m is None:
                continue
            report.count("matched")
            if isinstance(m, str):
                report.skip(node.name, m)
                continue
            reason = private_nodes_problem(m, outputs)
            plan = reason or (plan_merge(m, outputs) if mode == "merge" else plan_phase_conv(m))
            if isinstance(plan, str):
                report.skip(node.name, plan)
                continue
            plans.append(plan)
        if not plans:
            return PassResult(model, False, report)
        alloc = ir.NameAllocator.for_graph(graph)
        rewrites = [apply(p, graph, alloc) for p in plans]
        report.count("rewritten", len(rewrites))
        report.details["rewrites"] = rewrites
        log.info("focus-to-conv: %d stem(s) rewritten (%s)", len(rewrites), mode)
        return PassResult(ir.to_model(graph, like=model), True, report)
