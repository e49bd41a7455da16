"""Empirical bias correction: remove each INT8 Conv's own mean output error.

Quantizing a Conv's input and weights shifts the mean of each output channel (rounding is not
zero-mean once clipped, weights round the same way for every pixel). For every INT8 Conv, a
shadow Conv reads the *float* model's input through the planned Q/DQ, with the planned INT8
weights; the per-channel mean of (shadow - float) over calibration images is the layer's own
bias error, which is subtracted from its float bias before the bias is quantized. Measuring each
layer on the float model's activations (not on the quantized model's) keeps corrections from
compounding: correcting every layer by its total error (own plus inherited) overshoots.
"""
from __future__ import annotations

import logging
from typing import Dict, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir, verify
from ..analysis.qparams import np_qdtype
from .placement import QuantPlan
from .rewrite import quantize_weight

log = logging.getLogger(__name__)


def _shadow_model(model: onnx.ModelProto, plan: QuantPlan, qparams: Dict[str, tuple],
                  per_channel: bool, weight_qmax: int = 127) -> tuple:
    graph = ir.to_graph(model)
    by_name = {n.name: n for n in graph.nodes}
    alloc = ir.NameAllocator.for_graph(graph)
    opset = ir.opset(model)
    outs: Dict[str, str] = {}
    qd = np_qdtype(plan.target.act_qdtype)
    for spec in plan.layers.values():
        node = by_name.get(spec.node)
        if node is None or spec.op != "Conv" or spec.act_input not in qparams:
            continue
        x, y = node.inputs[0], node.outputs[0]
        s, z = qparams[spec.act_input]
        sc = gs.Constant(alloc("bc_scale"), np.array(s, np.float32))
        zc = gs.Constant(alloc("bc_zp"), np.array(z, qd))
        xq = gs.Variable(alloc("bc_xq"), qd)
        xd = gs.Variable(alloc("bc_xd"), np.float32)
        w = ir.const_value(node.inputs[1]).astype(np.float32)
        q, ws = quantize_weight(w, spec.axis, per_channel, weight_qmax)
        shape = [1] * w.ndim
        if per_channel:
            shape[spec.axis] = -1
        wdq = gs.Constant(alloc("bc_w"), (q.astype(np.float32) * ws.reshape(shape)).astype(np.float32))
        ys = gs.Variable(alloc("bc_y"), np.float32)
        diff = gs.Variable(alloc("bc_diff"), np.float32)
        mean = gs.Variable(alloc("bc_mean"), np.float32)
        axes = [0] + list(range(2, len(y.shape))) if y.shape else [0, 2, 3]
        graph.nodes += [gs.Node("QuantizeLinear", inputs=[x, sc, zc], outputs=[xq]),
                        gs.Node("DequantizeLinear", inputs=[xq, sc, zc], outputs=[xd]),
                        gs.Node("Conv", attrs=dict(node.attrs), inputs=[xd, wdq] + list(node.inputs[2:3]),
                                outputs=[ys]),
                        gs.Node("Sub", inputs=[ys, y], outputs=[diff])]
        if opset >= 18:
            graph.nodes.append(gs.Node("ReduceMean", attrs={"keepdims": 0},
                                       inputs=[diff, gs.Constant(alloc("bc_axes"), np.array(axes, np.int64))],
                                       outputs=[mean]))
        else:
            graph.nodes.append(gs.Node("ReduceMean", attrs={"axes": axes, "keepdims": 0}, inputs=[diff],
                                       outputs=[mean]))
        graph.outputs.append(mean)
        outs[spec.node] = mean.name
        for tag, src in (("noise", diff), ("signal", y)):
            ss = gs.Variable(alloc(f"bc_{tag}"), np.float32)
            graph.nodes.append(gs.Node("ReduceSumSquare", attrs={"keepdims": 0}, inputs=[src], outputs=[ss]))
            graph.outputs.append(ss)
            outs[f"{spec.node}\0{tag}"] = ss.name
    return ir.to_model(graph, model, cleanup=False), outs


def measure_bias_error(model: onnx.ModelProto, plan: QuantPlan, qparams: Dict[str, tuple],
                       feeds: Sequence[Dict[str, np.ndarray]], per_channel: bool = True,
                       threads: int = 0, weight_qmax: int = 127) -> tuple:
    """Per INT8 Conv: (mean (quantized - float) output per channel, local SQNR dB) over ``feeds``."""
    shadow, outs = _shadow_model(model, plan, qparams, per_channel, weight_qmax)
    if not outs:
        return {}, {}
    sess = verify.session(shadow, threads=threads)
    names = list(outs.values())
    acc = {k: 0.0 for k in outs}
    for f in feeds:
        vals = dict(zip(names, sess.run(names, f)))
        for node, t in outs.items():
            acc[node] = acc[node] + vals[t].astype(np.float64)
    local = {}
    for k in list(acc):
        if k.endswith("\0noise"):
            node = k[:-6]
            local[node] = float(10 * np.log10(max(acc[node + "\0signal"], 1e-30) / max(acc[k], 1e-30)))
    return {k: (v / max(len(feeds), 1)).astype(np.float32) for k, v in acc.items() if "\0" not in k}, local


def apply_correction(graph: gs.Graph, errors: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Subtract each layer's mean error from its float bias (adding a bias where there is none).
    Returns the largest absolute correction per layer."""
    by_name = {n.name: n for n in graph.nodes}
    alloc = ir.NameAllocator.for_graph(graph)
    done: Dict[str, float] = {}
    for name, err in errors.items():
        node = by_name[name]
        if len(node.inputs) > 2 and node.inputs[2].name:
            b = ir.const_value(node.inputs[2])
            if b is None:
                continue
            new = (b.astype(np.float32) - err).astype(np.float32)
        else:
            new = (-err).astype(np.float32)
        const = gs.Constant(alloc((node.inputs[2].name if len(node.inputs) > 2 and node.inputs[2].name
                                   else node.name + "_bias") + "_corrected"), new)
        if len(node.inputs) > 2:
            node.inputs[2] = const
        else:
            node.inputs.append(const)
        done[name] = float(np.abs(err).max(initial=0.0))
    return done
