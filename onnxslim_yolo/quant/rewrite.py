"""Insert the planned Q/DQ pairs and quantize weights (the only mutating stage of insert-qdq).

- every planned activation tensor ``t`` gets ``QuantizeLinear -> DequantizeLinear``; all its
  readers read the DQ output (a graph output keeps the float tensor);
- every INT8 layer's weight becomes an int8 constant (symmetric, [-127, 127], one scale per output
  channel along the layer's axis, or one scale when ``per_channel`` is off) read through a DQ;
- with ``bias_int32``, a bias becomes int32 with scale ``input_scale * weight_scale`` (zero point
  0), unless a value would overflow int32 (then it stays float, reported);
- the float constant operand of an INT8 Add / Mul (``plan.const_operands``) is quantized per
  tensor in the activation type and read through a DQ.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..analysis.qparams import np_qdtype, quantize, scale_zero_point
from .placement import LayerSpec, QuantPlan
from .targets import Target

log = logging.getLogger(__name__)

INT32_MAX = 2 ** 31 - 1
TARGET_FLOAT_BIAS = "target keeps biases float"
QParams = Mapping[str, Tuple[float, int]]  # tensor -> (scale, zero point)


@dataclass
class RewriteRecord:
    """What the rewrite created, for reports, bias correction and sensitivity switches."""

    #: activation tensor -> (Q node name, DQ output tensor name)
    activations: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    #: layer node -> (float weight name, DQ output tensor name)
    weights: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    int32_bias: List[str] = field(default_factory=list)
    float_bias: Dict[str, str] = field(default_factory=dict)
    #: INT8 op -> DQ output of its quantized constant operand
    constants: Dict[str, str] = field(default_factory=dict)


def quantize_weight(w: np.ndarray, axis: int, per_channel: bool,
                    qmax: int = 127) -> Tuple[np.ndarray, np.ndarray]:
    """(int8 weights, float32 scales) symmetric on [-qmax, qmax] (127, or 63 for reduced range);
    an all-zero channel gets scale 1."""
    if per_channel:
        red = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=red)
    else:
        amax = np.asarray(np.abs(w).max())
    scale = np.where(amax > 0, amax / float(qmax), 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if per_channel:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def _scalar(name: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.asarray(value))


def _qdq(graph: gs.Graph, t: gs.Variable, scale: float, zp: int, qdtype: str,
         alloc: ir.NameAllocator) -> Tuple[str, str]:
    s = _scalar(alloc(t.name + "_scale"), np.array(scale, np.float32))
    z = _scalar(alloc(t.name + "_zero_point"), np.array(zp, np_qdtype(qdtype)))
    qv = gs.Variable(alloc(t.name + "_quantized"), np_qdtype(qdtype), t.shape)
    dv = gs.Variable(alloc(t.name + "_dequantized"), np.float32, t.shape)
    readers = list(t.outputs)
    qn = gs.Node("QuantizeLinear", alloc(t.name + "_QuantizeLinear"), inputs=[t, s, z], outputs=[qv])
    dn = gs.Node("DequantizeLinear", alloc(t.name + "_DequantizeLinear"), inputs=[qv, s, z], outputs=[dv])
    for r in readers:
        for i, x in enumerate(r.inputs):
            if x is t:
                r.inputs[i] = dv
    graph.nodes.extend([qn, dn])
    return qn.name, dv.name


def _weight(graph: gs.Graph, node: gs.Node, spec: LayerSpec, per_channel: bool,
            alloc: ir.NameAllocator, qmax: int = 127) -> Tuple[np.ndarray, str]:
    w = ir.const_value(node.inputs[spec.weight_index]).astype(np.float32)
    per_channel = per_channel and spec.per_channel
    q, scale = quantize_weight(w, spec.axis, per_channel, qmax)
    base = spec.weight
    qc = gs.Constant(alloc(base + "_quantized"), q)
    sc = gs.Constant(alloc(base + "_scale"), scale)
    zc = gs.Constant(alloc(base + "_zero_point"), np.zeros(scale.shape, np.int8))
    out = gs.Variable(alloc(base + "_dequantized"), np.float32, w.shape)
    attrs = {"axis": spec.axis} if per_channel else {}
    graph.nodes.append(gs.Node("DequantizeLinear", alloc(base + "_DequantizeLinear"), attrs=attrs,
                               inputs=[qc, sc, zc], outputs=[out]))
    node.inputs[spec.weight_index] = out
    return scale, out.name


def _bias(graph: gs.Graph, node: gs.Node, spec: LayerSpec, w_scale: np.ndarray, x_scale: float,
          alloc: ir.NameAllocator) -> str:
    """'' when the bias became int32, else the reason it stays float."""
    b = ir.const_value(node.inputs[2]).astype(np.float64)
    bs = (np.float64(x_scale) * w_scale.astype(np.float64)) * np.ones_like(b)
    if np.any(bs <= 0):
        return "zero scale"
    q = np.round(b / bs)
    if np.abs(q).max(initial=0) > INT32_MAX:
        return "int32 overflow (input scale x weight scale too small for this bias)"
    base = spec.bias or node.name + "_bias"
    qc = gs.Constant(alloc(base + "_quantized"), q.astype(np.int32))
    sc = gs.Constant(alloc(base + "_scale"), bs.astype(np.float32))
    zc = gs.Constant(alloc(base + "_zero_point"), np.zeros(b.shape, np.int32))
    out = gs.Variable(alloc(base + "_dequantized"), np.float32, b.shape)
    graph.nodes.append(gs.Node("DequantizeLinear", alloc(base + "_DequantizeLinear"), attrs={"axis": 0},
                               inputs=[qc, sc, zc], outputs=[out]))
    node.inputs[2] = out
    return ""


def apply(graph: gs.Graph, plan: QuantPlan, qparams: QParams, per_channel: bool = True,
          weight_qmax: int = 127) -> RewriteRecord:
    """Mutate ``graph`` per ``plan``; ``qparams`` gives every planned activation's scale and zero point."""
    rec = RewriteRecord()
    alloc = ir.NameAllocator.for_graph(graph)
    tensors = graph.tensors()
    by_name = {n.name: n for n in graph.nodes}
    for spec in plan.layers.values():
        node = by_name[spec.node]
        w_name = node.inputs[spec.weight_index].name
        scale, dq = _weight(graph, node, spec, per_channel, alloc, weight_qmax)
        rec.weights[spec.node] = (w_name, dq)
        if spec.bias is None:
            continue
        if not plan.target.bias_int32 or spec.act_input not in qparams:
            rec.float_bias[spec.node] = TARGET_FLOAT_BIAS
            continue
        why = _bias(graph, node, spec, scale, qparams[spec.act_input][0], alloc)
        if why:
            rec.float_bias[spec.node] = why
        else:
            rec.int32_bias.append(spec.node)
    for name in plan.activations:
        s, z = qparams[name]
        rec.activations[name] = _qdq(graph, tensors[name], s, z, plan.target.act_qdtype, alloc)
    for name, const in plan.const_operands.items():
        rec.constants[name] = _constant(graph, by_name[name], const, plan.target, alloc)
    return rec


def _constant(graph: gs.Graph, node: gs.Node, const: str, target: Target, alloc: ir.NameAllocator) -> str:
    """Quantize ``node``'s constant operand ``const`` per tensor in the activation type (its
    range widened to 0), read through a DequantizeLinear of its own; the DQ output's name."""
    i = next(k for k, x in enumerate(node.inputs) if x.name == const)
    v = ir.const_value(node.inputs[i]).astype(np.float32)
    scale, zp = scale_zero_point(float(v.min()), float(v.max()), target.act_qdtype, target.act_symmetric)
    qc = gs.Constant(alloc(const + "_quantized"), quantize(v, scale, zp, target.act_qdtype))
    sc = _scalar(alloc(const + "_scale"), np.array(scale, np.float32))
    zc = _scalar(alloc(const + "_zero_point"), np.array(zp, np_qdtype(target.act_qdtype)))
    out = gs.Variable(alloc(const + "_dequantized"), np.float32, v.shape)
    graph.nodes.append(gs.Node("DequantizeLinear", alloc(const + "_DequantizeLinear"),
                               inputs=[qc, sc, zc], outputs=[out]))
    node.inputs[i] = out
    return out.name
