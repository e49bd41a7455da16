"""fold-affine: a constant per-channel Mul / Add / Sub / Div after a Conv folded into the Conv.

What changes in the graph: ``Conv -> Mul(c)`` becomes a Conv with weights and bias scaled by c;
``Conv -> Add(c)`` (or ``Sub(c)``) a Conv whose bias absorbs c; ``Div(c)`` scales by 1/c. The
constant may sit on either side of Mul/Add (``Sub``/``Div`` only with the Conv output first) and
must broadcast per output channel: a scalar, (C,1,1), (1,C,1,1), ... (rank at most the Conv
output's; only the channel dim may differ from 1). Chains (Mul then Add ...) fold one per round.
ConvTranspose is handled alike.

Must not fire (reason in the report): a constant that is not per-channel or would change the
output shape, a non-constant operand (graph input), weights shared with other nodes, a Conv output
read by more than the Mul/Add or being a graph output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import Numerics, Pass, PassContext, PassReport, PassResult

from ._affine_fold import Target, apply_out, fold_out, out_target
from ._conv_util import param, rank, with_shapes
from ._rounds import run_rounds

OPS = ("Mul", "Add", "Sub", "Div")
KINDS = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class Plan:
    node: gs.Node
    target: Target
    weight: np.ndarray
    bias: np.ndarray


def per_channel(c: np.ndarray, channels: int, out_rank: Optional[int]) -> Union[np.ndarray, str]:
    """The constant as a (channels,) vector when it broadcasts per output channel, else a reason."""
    if c.size == 1 and (c.ndim <= 1 or (out_rank is not None and c.ndim <= out_rank)):
        return np.full(channels, float(c.reshape(-1)[0]))
    if out_rank is None:
        return f"constant of shape {list(c.shape)} against an output of unknown rank"
    if c.ndim > out_rank or c.ndim < out_rank - 1:
        return f"constant of shape {list(c.shape)} does not broadcast per channel on rank {out_rank}"
    full = (1,) * (out_rank - c.ndim) + c.shape
    if full[1] != channels or any(d != 1 for i, d in enumerate(full) if i != 1):
        return f"constant of shape {list(c.shape)} is not per-channel for {channels} channels"
    return c.reshape(-1).astype(np.float64)


def plan_node(node: gs.Node, outputs: Set[str], claimed: Set[int]) -> Union[Plan, str, None]:
    """A fold of the elementwise ``node`` into the Conv before it; None when not a candidate."""
    a, b = node.inputs[0], node.inputs[1]
    pa, pb = ir.producer(a), ir.producer(b)
    if pa is not None and pa.op in KINDS:
        conv, x, other = pa, a, b
    elif node.op in ("Mul", "Add") and pb is not None and pb.op in KINDS:
        conv, x, other = pb, b, a
    else:
        return None
    if other.inputs and ir.const_value(other) is None:
        return None  # a computed operand (SiLU's Sigmoid, a residual): not an affine map
    if id(conv) in claimed:
        return "deferred"
    c, why = param(other, f"{node.op} '{node.name}' operand")
    if c is None:
        return why
    if not np.issubdtype(c.dtype, np.floating):
        return f"{node.op} '{node.name}' operand is {c.dtype}, not float"
    tg = out_target(conv, node, outputs, KINDS)
    if isinstance(tg, str):
        return tg
    vec = per_channel(c, tg.channels, rank(x))
    if isinstance(vec, str):
        return f"{node.op} '{node.name}': {vec}"
    if node.op == "Div" and np.any(vec == 0):
        return f"Div '{node.name}' divides by zero in some channel"
    ones, zeros = np.ones(tg.channels), np.zeros(tg.channels)
    s, t = {"Mul": (vec, zeros), "Div": (1.0 / np.where(vec == 0, 1.0, vec), zeros), "Add": (ones, vec),
            "Sub": (ones, -vec)}[node.op]
    w, bias = fold_out(tg, s, t)
    return Plan(node, tg, w, bias)


def one_round(graph: gs.Graph) -> Tuple[List[Plan], Dict[str, str]]:
    outputs = ir.graph_output_names(graph)
    plans: List[Plan] = []
    refused: Dict[str, str] = {}
    claimed: Set[int] = set()
    for node in [n for n in graph.nodes if n.op in OPS and len(n.inputs) == 2]:
        p = plan_node(node, outputs, claimed)
        if p is None or p == "deferred":
            continue
        if isinstance(p, str):
            refused[node.name] = p
            continue
        claimed.add(id(p.target.node))
        plans.append(p)
    return plans, refused


class FoldAffine(Pass):
    """Constant per-channel Mul/Add/Sub/Div after a Conv folded into its weights; exact."""

    name = "fold-affine"
    option_names = ()
    numerics = Numerics.EXACT
    after = ("canonicalize", "fold-batchnorm")
    description = "fold per-channel constant Mul/Add after a Conv into the Conv"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        report = PassReport()
        graph = ir.to_graph(with_shapes(model))
        alloc = ir.NameAllocator.for_graph(graph)

        def apply(p: Plan) -> None:
            apply_out(p.target, p.weight, p.bias, p.node, alloc)
            report.count(f"folded_{p.node.op.lower()}")

        # Conv -> Mul -> Add: the Add folds once the Mul is gone
        return run_rounds(model, graph, report, one_round, apply, "folded",
                          "fold-affine: %d Mul/Add node(s) folded into Convs")
