"""Importance of channel groups: which channels cost the least accuracy when removed.

Criteria (a higher score means more important; the score of a group sums its members):

* ``l1`` / ``l2``: the producer filters' mean |w| / root-mean-square (per weight, so filters of
  different fan-in compare), plus depthwise filters in the group.
* ``bn``: |gamma| of the BatchNormalization nodes in the group, optionally / sqrt(var + eps).
* ``activation``: for every consumer Conv, the channel's activation std on calibration data times
  the norm of the consumer weights reading it, i.e. the RMS change of the consumer output when
  the channel is replaced by its mean; divided by the consumer output's RMS (``relative``) so that
  layers of different scale compare.

Dead channels: constant on the calibration data at every consumer input (std below ``dead_tol``
times the median channel std of that tensor). Read-only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx

from .. import ir
from ..pass_base import PreconditionError, UsageError
from .activations import ChannelStats
from .channels import ChannelAnalysis, ChannelGroup

CRITERIA = ("activation", "l1", "l2", "bn")


@dataclass
class Importance:
    criterion: str
    scores: Dict[int, float]
    dead: Set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Params:
    """Constant parameters by node name: Conv (W, b or None) and BN (scale, B, mean, var, eps)."""

    conv: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]
    bn: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]]


def read_params(model: onnx.ModelProto) -> Params:
    graph = ir.to_graph(model)
    ir.name_unnamed_nodes(graph)
    conv: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {}
    bn: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]] = {}
    for n in graph.nodes:
        if n.op == "Conv" and len(n.inputs) > 1:
            w = ir.const_value(n.inputs[1])
            b = ir.const_value(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2].name else None
            if w is not None:
                conv[n.name] = (w, b)
        elif n.op == "BatchNormalization":
            vals = [ir.const_value(t) for t in n.inputs[1:5]]
            if all(v is not None for v in vals):
                bn[n.name] = (*vals, float(n.attrs.get("epsilon", 1e-5)))  # type: ignore[assignment]
    return Params(conv, bn)


def weight_scores(groups: Sequence[ChannelGroup], params: Params, norm: str) -> Dict[int, float]:
    """Mean |w| (l1) or RMS (l2) of the producer and depthwise filters of each group."""
    out: Dict[int, float] = {}
    for g in groups:
        s = 0.0
        for r in g.roles:
            if r.kind in ("producer", "depthwise") and r.node in params.conv:
                f = params.conv[r.node][0][r.index].astype(np.float64)
                s += float(np.abs(f).mean() if norm == "l1" else np.sqrt((f * f).mean()))
        out[g.gid] = s
    return out


def bn_scores(groups: Sequence[ChannelGroup], params: Params, by_var: bool = False) -> Dict[int, float]:
    """Sum of |gamma| (or |gamma| / sqrt(var + eps)) over the BN nodes of each group."""
    if not params.bn:
        raise PreconditionError("prune-channels: criterion 'bn' needs BatchNormalization nodes; "
                                "this model has none (BN folded?): use 'activation' or 'l1'")
    out: Dict[int, float] = {}
    for g in groups:
        s = 0.0
        for r in g.of_kind("bn"):
            scale, _, _, var, eps = params.bn[r.node]
            v = abs(float(scale[r.index]))
            s += v / float(np.sqrt(var[r.index] + eps)) if by_var else v
        out[g.gid] = s
    return out


def consumer_inputs(groups: Sequence[ChannelGroup]) -> List[str]:
    """Tensors read by consumer Convs of the given groups (what calibration must capture)."""
    return sorted({r.tensor for g in groups for r in g.consumers})


def consumer_outputs(groups: Sequence[ChannelGroup], conv_out: Mapping[str, str]) -> List[str]:
    return sorted({conv_out[r.node] for g in groups for r in g.consumers if r.node in conv_out})


def _out_rms(stats: Optional[ChannelStats]) -> float:
    if stats is None:
        return 1.0
    return float(np.sqrt(np.sum(stats.std ** 2))) or 1.0


def activation_scores(groups: Sequence[ChannelGroup], params: Params,
                      stats: Mapping[str, ChannelStats], conv_out: Mapping[str, str],
                      relative: bool = True) -> Dict[int, float]:
    """Sum over consumers of std(channel) x ||W[:, channel]|| (/ consumer output RMS)."""
    out: Dict[int, float] = {}
    for g in groups:
        s = 0.0
        for r in g.consumers:
            st = stats.get(r.tensor)
            if st is None or r.node not in params.conv:
                continue
            w = params.conv[r.node][0][:, r.index].astype(np.float64)
            contrib = float(st.std[r.index]) * float(np.sqrt((w * w).sum()))
            s += contrib / (_out_rms(stats.get(conv_out.get(r.node, ""))) if relative else 1.0)
        out[g.gid] = s
    return out


def dead_groups(groups: Sequence[ChannelGroup], stats: Mapping[str, ChannelStats],
                tol: float = 1e-4) -> Set[int]:
    """Groups whose channel is constant (relative std <= tol) at every consumer input."""
    med: Dict[str, float] = {}
    dead: Set[int] = set()
    for g in groups:
        cons = g.consumers
        if not cons:
            continue
        ok = True
        for r in cons:
            st = stats.get(r.tensor)
            if st is None:
                ok = False
                break
            if r.tensor not in med:
                med[r.tensor] = float(np.median(st.std)) or 1.0
            if st.std[r.index] > tol * med[r.tensor]:
                ok = False
                break
        if ok:
            dead.add(g.gid)
    return dead


def conv_outputs(model: onnx.ModelProto) -> Dict[str, str]:
    """Conv node name -> its output tensor name."""
    graph = ir.to_graph(model)
    ir.name_unnamed_nodes(graph)
    return {n.name: n.outputs[0].name for n in graph.nodes if n.op == "Conv"}


def compute_importance(analysis: ChannelAnalysis, model: onnx.ModelProto, criterion: str,
                       stats: Optional[Mapping[str, ChannelStats]] = None, *,
                       bn_by_var: bool = False, relative: bool = True,
                       dead_tol: float = 1e-4) -> Importance:
    """Scores of every prunable group under ``criterion`` (see module docstring)."""
    if criterion not in CRITERIA:
        raise UsageError(f"prune-channels: unknown criterion '{criterion}'; "
                         f"choose one of {', '.join(CRITERIA)}")
    groups = analysis.prunable_groups()
    params = read_params(model)
    if criterion in ("l1", "l2"):
        scores = weight_scores(groups, params, criterion)
    elif criterion == "bn":
        scores = bn_scores(groups, params, bn_by_var)
    else:
        if stats is None:
            raise PreconditionError("prune-channels: criterion 'activation' needs calibration "
                                    "images; give calibration data or use 'l1'")
        scores = activation_scores(groups, params, stats, conv_outputs(model), relative)
    dead = dead_groups(groups, stats, dead_tol) if stats is not None else set()
    for gid in dead:
        scores[gid] = 0.0
    return Importance(criterion, scores, dead)
