"""Input channels pruned at one reader: a channel Gather in front of a Conv whose input is shared.

A feature map read by several nodes (a C3 block's input, read by both of its 1x1 Convs; YOLOv5's
P3 output, read by its Detect Conv and by the stride-2 Conv down to P4; a residual stream, read by
a bottleneck and its Add) ties its channels across all readers: removing one removes it from every
reader. One reader may still do without an input channel that the others need: measured on
yolov5n (calibration images 1-64, least-squares refit of that Conv alone, coco128 mAP@0.5:0.95),
the stride-2 Conv ``/model.18`` reading 16 of P3's 64 channels keeps 0.357 (the original's
0.357), saving 2.0% of the multiply-adds, where removing P3's channels for both readers costs the
Detect head its input.

:func:`insert` puts a Gather on the channel axis (indices 0..C-1, a no-op) in front of each
dense 2-D Conv whose input has other readers. The channel analysis reads such a Gather one way
(channel_rules.rule_gather): its output channels may go alone, at the cost of that Conv's refit,
and go anyway when the channel they read goes. The selection weighs these units against the
others by the same measured cost. :func:`drop_identity` removes the Gathers that still read
every channel in order afterwards, so a model keeps only those that select.

Off by default (option ``readers``): on yolov5n at 10% fewer multiply-adds it scored 0.315
against 0.317 without. The 8 probe images rate some readers (the P3 C3 block's 1x1 Convs)
among the cheapest units, which the full evaluation above shows they are not.
"""
from __future__ import annotations

from typing import List, Set, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir
from onnxslim_yolo.analysis.sensitivity import last_convs

SUFFIX = "__reader"


def _dense_2d(node: gs.Node) -> bool:
    w = ir.const_value(node.inputs[1]) if node.op == "Conv" and len(node.inputs) > 1 else None
    return w is not None and w.ndim == 4 and int(node.attrs.get("group", 1)) == 1


def insert(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, Set[str]]:
    """A copy of ``model`` with a channel Gather before each dense 2-D Conv whose input (a
    feature map of known channel count, not a graph input) is read by other nodes too or is a
    graph output; returns it and the names of the Gathers. ``model`` itself when there is none.
    The head's last Convs get none: on yolov5n, the P3 Detect Conv reading 32 of its 64 inputs
    lost 4.6 mAP points, while the 8 probe images measured it among the cheapest units."""
    head = set(last_convs(model))
    inferred = ir.infer_shapes(model)
    graph = ir.to_graph(inferred)
    ir.name_unnamed_nodes(graph)
    alloc = ir.NameAllocator.for_graph(graph)
    outputs = {t.name for t in graph.outputs}
    inputs = {t.name for t in graph.inputs}
    added: Set[str] = set()
    for node in [n for n in graph.nodes if _dense_2d(n) and n.outputs[0].name not in head]:
        x = node.inputs[0]
        shape = x.shape if isinstance(x, gs.Variable) else None
        if (shape is None or len(shape) != 4 or not isinstance(shape[1], (int, np.integer))
                or x.name in inputs or len({id(r) for r in x.outputs}) < 2 and x.name not in outputs):
            continue
        idx = gs.Constant(alloc(node.name + SUFFIX + "_indices"), np.arange(int(shape[1]), dtype=np.int64))
        y = gs.Variable(alloc(x.name + SUFFIX), dtype=x.dtype, shape=list(shape))
        gather = gs.Node("Gather", alloc(node.name + SUFFIX), inputs=[x, idx], outputs=[y], attrs={"axis": 1})
        node.inputs[0] = y
        graph.nodes.append(gather)
        added.add(gather.name)
    if not added:
        return model, set()
    graph.toposort()
    out = ir.to_model(graph, model)
    del out.graph.value_info[:]
    return out, added


def drop_identity(model: onnx.ModelProto, names: Set[str]) -> Tuple[onnx.ModelProto, List[str]]:
    """``model`` without those of the Gathers ``names`` that read all their input's channels in
    order (their Conv reads the input again); returns it and the names of those kept."""
    if not names:
        return model, []
    graph = ir.to_graph(model)
    kept: List[str] = []
    for node in [n for n in graph.nodes if n.name in names]:
        idx = ir.const_value(node.inputs[1])
        x, y = node.inputs[0], node.outputs[0]
        count = ir.static_dims(x)
        if idx is None or count is None or not np.array_equal(idx, np.arange(count[1])):
            kept.append(node.name)
            continue
        for reader in list(y.outputs):
            for i, t in enumerate(list(reader.inputs)):
                if t is y:
                    reader.inputs[i] = x
        node.inputs.clear()
        node.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return ir.to_model(graph, model), sorted(kept)
