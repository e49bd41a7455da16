"""The fixed-point driver of the exact rewrites that plan on a graph and apply in rounds.

fold-batchnorm, fold-affine and merge-branches each plan a round of independent rewrites on the
graph, apply them, clean up, and plan again, since one rewrite can expose the next (a Conv
between two BNs, Conv -> Mul -> Add, an Add of three branches). The refusals of the last round
are the patterns left in the graph; they go into the report as skips with their reasons.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Sequence, Tuple, TypeVar

import onnx
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import PassReport, PassResult

log = logging.getLogger(__name__)
P = TypeVar("P")


def run_rounds(model: onnx.ModelProto, graph: gs.Graph, report: PassReport,
               one_round: Callable[[gs.Graph], Tuple[Sequence[P], Dict[str, str]]],
               apply: Callable[[P], None], counter: str, message: str) -> PassResult:
    """Apply ``one_round``'s plans until a round plans nothing. ``counter`` names the report's
    count of plans applied, ``message`` is the log line's format with that number. The result
    keeps ``model`` when nothing applied."""
    done = 0
    refused: Dict[str, str] = {}
    while True:
        plans, refused = one_round(graph)
        if not plans:
            break
        for p in plans:
            apply(p)
        done += len(plans)
        graph.cleanup(remove_unused_graph_inputs=False)
    for node, reason in refused.items():
        report.skip(node, reason)
    if not done:
        return PassResult(model, False, report)
    report.count(counter, done)
    log.info(message, done)
    return PassResult(ir.to_model(graph, like=model), True, report)
