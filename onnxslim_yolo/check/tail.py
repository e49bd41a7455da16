"""The decode tail: nodes after the last Conv on every path to the outputs.

Uses :func:`onnxslim_yolo.analysis.head.find_head` when that analysis is installed and finds a
head; otherwise (or when it declines the model) falls back to the structural definition: a node
is in the tail when some Conv-like node precedes it and no Conv-like node follows it.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, List, Optional, Set, Tuple

from ..pass_base import SlimError
from .index import QDQ_OPS, GraphIndex

log = logging.getLogger(__name__)

CONV_OPS = frozenset({"Conv", "ConvTranspose", "QLinearConv", "ConvInteger", "MatMul", "Gemm"})
_NAME_FIELDS = ("tail_nodes", "decode_nodes", "tail", "decode_tail", "nodes")


def _from_head_analysis(idx: GraphIndex) -> Optional[Set[int]]:
    try:
        from ..analysis.head import find_head  # written by another module; optional here
    except ImportError:
        return None
    try:
        info = find_head(idx.model)
    except SlimError as exc:
        log.info("find_head declined the model (%s); using the structural decode tail", exc)
        return None
    names = _names(info)
    if not names:
        return None
    by_name = {n.name: i for i, n in enumerate(idx.nodes) if n.name}
    found = {by_name[n] for n in names if n in by_name}
    return found or None


def _names(info: Any) -> List[str]:
    if info is None:
        return []
    if isinstance(info, (list, tuple, set, frozenset)):
        return [str(n) for n in info]
    for f in _NAME_FIELDS:
        v = info.get(f) if isinstance(info, dict) else getattr(info, f, None)
        if isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(x, str) for x in v):
            return list(v)
    return []


def _reach(idx: GraphIndex, starts: Iterable[int], forward: bool) -> Set[int]:
    seen: Set[int] = set()
    stack = list(starts)
    while stack:
        i = stack.pop()
        for j in (idx.successors(i) if forward else idx.predecessors(i)):
            if j not in seen:
                seen.add(j)
                stack.append(j)
    return seen


def structural_tail(idx: GraphIndex) -> Set[int]:
    """Nodes (not Conv-like, not Constant) downstream of a Conv with no Conv downstream of them.

    Q/DQ nodes are transparent: a tail Q/DQ is judged by the rest of the tail, not counted here.
    """
    convs = [i for i, n in enumerate(idx.nodes) if n.op_type in CONV_OPS]
    if not convs:
        return set()
    after_conv = _reach(idx, convs, forward=True)
    before_conv = _reach(idx, convs, forward=False)
    return {i for i in after_conv - before_conv
            if idx.nodes[i].op_type not in CONV_OPS | QDQ_OPS | {"Constant"}}


def decode_tail(idx: GraphIndex) -> Tuple[Set[int], str]:
    """(node indices of the decode tail, where the answer came from)."""
    found = _from_head_analysis(idx)
    if found is not None:
        return {i for i in found if idx.nodes[i].op_type not in QDQ_OPS | CONV_OPS}, "analysis.head.find_head"
    return structural_tail(idx), "structural (after the last Conv on every path)"
