"""Model statistics: op counts, parameters, multiply-adds (MACs) and FLOPs.

Convention: MACs count the multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul (the
quantized QLinearConv / ConvInteger / MatMulInteger too); element-wise ops, pooling and resizing
are not counted. FLOPs = 2 x MACs (one multiply and one add per MAC). Shapes come from onnx shape
inference with the graph inputs made static (a symbolic batch counts as 1).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from .. import ir

CONV_OPS = ("Conv", "ConvInteger", "QLinearConv")
MATMUL_OPS = ("MatMul", "MatMulInteger", "QLinearMatMul")


@dataclass
class ModelStats:
    nodes: int
    op_counts: Dict[str, int]
    params: int
    macs: int
    size_bytes: int
    opset: int
    inputs: Dict[str, List]
    outputs: Dict[str, List]
    per_node_macs: Dict[str, int] = field(default_factory=dict)
    #: parameters per element type (ir.param_dtypes)
    param_dtypes: Dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> Dict:
        return {"nodes": self.nodes, "op_counts": self.op_counts, "params": self.params,
                "macs": self.macs, "flops": self.flops, "flops_convention": "FLOPs = 2 x MACs "
                "(Conv/ConvTranspose/Gemm/MatMul multiply-adds)", "size_bytes": self.size_bytes,
                "opset": self.opset, "inputs": self.inputs, "outputs": self.outputs,
                "param_dtypes": self.param_dtypes}


def _shape_table(model: onnx.ModelProto) -> Dict[str, Tuple[int, ...]]:
    table: Dict[str, Tuple[int, ...]] = {}
    for coll in (model.graph.value_info, model.graph.input, model.graph.output):
        for vi in coll:
            dims = vi.type.tensor_type.shape.dim
            if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
                table[vi.name] = tuple(int(d.dim_value) for d in dims)
    for init in model.graph.initializer:
        table[init.name] = tuple(int(d) for d in init.dims)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    table[node.output[0]] = tuple(int(d) for d in a.t.dims)
    return table


def _infer(m: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return ir.infer_shapes(m, data_prop=True)
    except Exception:
        return m


def _unshaped_outputs(m: onnx.ModelProto) -> bool:
    """Some Conv/Gemm/MatMul output has no static shape (its MACs would count as 0)."""
    shapes = _shape_table(m)
    return any(n.output[0] not in shapes for n in m.graph.node
               if n.op_type in CONV_OPS + MATMUL_OPS + ("ConvTranspose", "Gemm"))


def infer_static(model: onnx.ModelProto,
                  input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> onnx.ModelProto:
    """The model (same nodes) with shapes inferred from static inputs. Shapes that stay unknown
    behind a Shape -> Gather -> Div -> ... chain (torch.chunk's Slice ends, views by computed
    sizes) are taken from a copy with constants and shapes folded, inferred again."""
    try:
        static = ir.static_input_shapes(model, dict(input_shapes or {}))
    except Exception:
        static = {}
    m = ir.fix_input_shapes(model, static) if static else model
    inferred = _infer(m)
    folded = inferred
    for _ in range(ir.FOLD_ROUNDS if static else 0):  # each round folds what the last one resolved
        if not _unshaped_outputs(folded):
            break
        size = len(folded.graph.node)
        graph = ir.to_graph(folded)
        try:
            graph.fold_constants(fold_shapes=True, error_ok=True)
        except Exception:
            break
        folded = ir.to_model(graph, like=m)
        del folded.graph.value_info[:]
        folded = _infer(folded)
        if len(folded.graph.node) == size:  # nothing folded: inference cannot learn more either
            break
    if folded is not inferred:
        known = set(_shape_table(inferred))
        outputs = {o for n in inferred.graph.node for o in n.output}
        shaped = list(folded.graph.value_info) + list(folded.graph.output)
        # a computed tensor folded all the way becomes an initializer (an Expand of a constant to
        # a shape computed by Where, as YOLOE's text embeddings are): its dims are its shape
        shaped += [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in folded.graph.initializer]
        fill = [vi for vi in shaped if vi.name in outputs and vi.name not in known]
        # a symbolic shape the first inference gave ('unk__0' after a Reshape to a computed
        # target) gives way to the folded copy's static one: to_graph reads the first entry
        static = set(_shape_table(folded))
        replaced = {vi.name for vi in fill if vi.name in static}
        entries = {vi.name for vi in inferred.graph.value_info}
        kept = [vi for vi in inferred.graph.value_info if vi.name not in replaced]
        del inferred.graph.value_info[:]
        added = [vi for vi in fill if vi.name in replaced or vi.name not in entries]
        inferred.graph.value_info.extend(kept + added)
    return inferred


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_macs(node: onnx.NodeProto, shapes: Mapping[str, Tuple[int, ...]]) -> int:
    """Multiply-adds of one node, 0 when unknown or not counted."""
    op = node.op_type
    if op in CONV_OPS or op == "ConvTranspose":
        w_idx = 3 if op == "QLinearConv" else 1
        w = shapes.get(node.input[w_idx]) if len(node.input) > w_idx else None
        if not w or len(w) < 3:
            return 0
        if op == "ConvTranspose":
            x = shapes.get(node.input[0])
            if not x:
                return 0
            # each input pixel scatters Cout/g * k... multiply-adds
            return int(np.prod(x)) * int(np.prod(w[1:]))
        y = shapes.get(node.output[0])
        if not y:
            return 0
        # per output element: Cin/g * prod(kernel)
        return int(np.prod(y)) * int(np.prod(w[1:]))
    if op == "Gemm" or op in MATMUL_OPS:
        a_idx, b_idx = (0, 3) if op == "QLinearMatMul" else (0, 1)
        a, b = shapes.get(node.input[a_idx]), shapes.get(node.input[b_idx])
        y = shapes.get(node.output[0])
        if not a or not b or not y:
            return 0
        k = a[-1] if not (op == "Gemm" and _attr(node, "transA", 0)) else a[0]
        return int(np.prod(y)) * int(k)
    return 0


def model_stats(model: onnx.ModelProto,
                input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> ModelStats:
    """Counts for ``inspect`` and the summary table."""
    inferred = infer_static(model, input_shapes)
    shapes = _shape_table(inferred)
    per_node: Dict[str, int] = {}
    total = 0
    for i, node in enumerate(inferred.graph.node):
        m = node_macs(node, shapes)
        if m:
            per_node[node.name or f"{node.op_type}_{i}"] = m
            total += m
    ops = Counter(n.op_type for n in model.graph.node)
    return ModelStats(
        nodes=len(model.graph.node),
        op_counts=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        params=ir.param_count(model),
        macs=total,
        size_bytes=ir.model_size(model),
        opset=ir.opset(model),
        inputs={k: list(v) for k, v in ir.input_shapes(model).items()},
        outputs={o.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                          for d in o.type.tensor_type.shape.dim] for o in model.graph.output},
        per_node_macs=per_node,
        param_dtypes=ir.param_dtypes(model),
    )
