"""ConvTranspose seen by prune-channels as a 1x1 Conv and a DepthToSpace, and written back.

A 2-D ConvTranspose whose kernel equals its stride (``k = s``, no padding, no dilation, one
group: the 2x upsampling of YOLOv6's neck and of the YOLOv8-seg prototype branch) places each
input pixel's ``k x k`` output block on its own, so it is exactly a 1x1 Conv with ``k*k*Cout``
outputs followed by DepthToSpace (DCR order: output channel ``c`` at block offset ``(i, j)`` is
Conv channel ``(i*k + j)*Cout + c``). The channel analysis, the cost model and the refit all know
a 1x1 Conv, so prune-channels lowers such ConvTransposes on its working copy (:func:`lower`)
and writes them back afterwards (:func:`raise_back`): the 1x1 Conv and DepthToSpace run two to
three times slower than the ConvTranspose in onnxruntime (CPU, 64 channels at 80x80: 8.5 against
2.6 ms). A pair goes back when the ``k*k`` biases of each output channel are equal, which the
refit keeps (``_prune_refit``, tied biases); otherwise it stays lowered, and the report says so.

Other ConvTransposes are left alone; the channel rules block them with the reason.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir
from onnxslim_yolo.analysis.channel_rules import transpose_refusal

SUFFIX = "__depth_to_space"


def lower(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, Dict[str, int]]:
    """A copy of ``model`` with every mappable ConvTranspose as a 1x1 Conv (same name) and a
    DepthToSpace writing the ConvTranspose's output tensor; returns it and {name: block size}.
    ``model`` itself is returned when nothing is mapped."""
    graph = ir.to_graph(model)
    ir.name_unnamed_nodes(graph)
    alloc = ir.NameAllocator.for_graph(graph)
    lowered: Dict[str, int] = {}
    for node in [n for n in graph.nodes if n.op == "ConvTranspose"]:
        if transpose_refusal(node) is not None:
            continue
        w = ir.const_value(node.inputs[1])
        cin, cout, k = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
        b = ir.const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        w2 = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(k * k * cout, cin)[:, :, None, None])
        b2 = np.tile(np.zeros(cout, w.dtype) if b is None else b, k * k)
        y = node.outputs[0]
        mid = gs.Variable(alloc(y.name + "_blocks"), dtype=y.dtype)
        conv = gs.Node("Conv", node.name, inputs=[
            node.inputs[0], gs.Constant(alloc(node.name + "_w1x1"), w2.astype(w.dtype)),
            gs.Constant(alloc(node.name + "_b1x1"), b2.astype(w.dtype))], outputs=[mid],
            attrs={"kernel_shape": [1, 1]})
        d2s = gs.Node("DepthToSpace", alloc(node.name + SUFFIX), inputs=[mid], outputs=[y],
                      attrs={"blocksize": k})
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.extend([conv, d2s])
        lowered[conv.name] = k
    if not lowered:
        return model, {}
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return ir.to_model(graph, model), lowered


def raise_back(model: onnx.ModelProto, lowered: Dict[str, int]) -> Tuple[onnx.ModelProto, List[str]]:
    """``model`` with each lowered pair turned back into a ConvTranspose; returns it and the
    notes for pairs that stay lowered (a channel's biases differ between block offsets)."""
    if not lowered:
        return model, []
    graph = ir.to_graph(model)
    alloc = ir.NameAllocator.for_graph(graph)
    by_name = {n.name: n for n in graph.nodes}
    notes: List[str] = []
    for name, k in lowered.items():
        conv = by_name.get(name)
        d2s = by_name.get(name + SUFFIX)
        if conv is None or d2s is None:
            continue
        w2 = ir.const_value(conv.inputs[1])
        b2 = ir.const_value(conv.inputs[2])
        cin, cout = int(w2.shape[1]), int(w2.shape[0]) // (k * k)
        blocks = b2.reshape(k * k, cout)
        if not np.array_equal(blocks, np.broadcast_to(blocks[:1], blocks.shape)):
            notes.append(f"ConvTranspose '{name}' stays a 1x1 Conv and a DepthToSpace: its refit "
                         "gave the block offsets of a channel different biases")
            continue
        w = np.ascontiguousarray(w2[:, :, 0, 0].reshape(k, k, cout, cin).transpose(3, 2, 0, 1))
        conv.op = "ConvTranspose"
        conv.attrs = {"kernel_shape": [k, k], "strides": [k, k]}
        conv.inputs[1] = gs.Constant(alloc(name + "_w"), w)
        conv.inputs[2] = gs.Constant(alloc(name + "_b"), np.ascontiguousarray(blocks[0]))
        conv.outputs[0] = d2s.outputs[0]
        d2s.outputs.clear()
        d2s.inputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return ir.to_model(graph, model), notes


def relabel_layers(layers: Dict[str, Dict], lowered: Dict[str, int]) -> None:
    """Per-layer table entries of lowered ConvTransposes in the ConvTranspose's own terms: output
    channel c for the 1x1 Conv's ``b*b`` channels ``t*C + c`` (DCR order)."""
    for name, k in lowered.items():
        entry = layers.get(name)
        if entry is None:
            continue
        blocks = k * k
        before, after = entry["out_channels"]
        entry["out_channels"] = [before // blocks, after // blocks]
        entry["kept_out"] = entry["kept_out"][:after // blocks]
        entry["op"] = "ConvTranspose"
