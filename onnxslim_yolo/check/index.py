"""A read-only index of a model's top-level graph for the checks.

Checks read ``onnx`` protos directly rather than importing into graphsurgeon: the models they
inspect may be broken (duplicate or dangling names), which an import would hide or refuse.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .. import ir

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


class GraphIndex:
    """Producers, consumers and constants of one model's main graph, built once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.model = model
        self.nodes: List[onnx.NodeProto] = list(g.node)
        self.inits: Dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.inputs: List[str] = [vi.name for vi in g.input if vi.name not in self.inits]
        self.outputs: List[str] = [o.name for o in g.output]
        self.producer: Dict[str, int] = {}
        self.consumers: Dict[str, List[int]] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer.setdefault(o, i)
            for t in n.input:
                if t:
                    self.consumers.setdefault(t, []).append(i)
        self._consts: Dict[str, Optional[np.ndarray]] = {}

    # ------------------------------------------------------------------------------- names
    def label(self, i: int) -> str:
        """The node's name, or ``Op(first output)`` when it has none."""
        return ir.node_label(self.nodes[i], i)

    def opset(self) -> int:
        return ir.opset(self.model)

    # ------------------------------------------------------------------------------ graph
    def producer_op(self, tensor: str) -> Optional[str]:
        i = self.producer.get(tensor)
        return None if i is None else self.nodes[i].op_type

    def consumer_nodes(self, tensor: str) -> List[int]:
        return self.consumers.get(tensor, [])

    def successors(self, i: int) -> List[int]:
        return sorted({c for o in self.nodes[i].output for c in self.consumer_nodes(o)})

    def predecessors(self, i: int) -> List[int]:
        return sorted({self.producer[t] for t in self.nodes[i].input if t in self.producer})

    # ---------------------------------------------------------------------------- constants
    def is_const(self, tensor: str) -> bool:
        if tensor in self.inits:
            return True
        i = self.producer.get(tensor)
        return i is not None and self.nodes[i].op_type == "Constant"

    def const(self, tensor: str) -> Optional[np.ndarray]:
        """Value of an initializer or a Constant node output; None otherwise."""
        if tensor not in self._consts:
            self._consts[tensor] = self._read_const(tensor)
        return self._consts[tensor]

    def _read_const(self, tensor: str) -> Optional[np.ndarray]:
        if tensor in self.inits:
            return numpy_helper.to_array(self.inits[tensor])
        i = self.producer.get(tensor)
        if i is None or self.nodes[i].op_type != "Constant":
            return None
        for a in self.nodes[i].attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name in ir.CONSTANT_ATTRS:   # float32 and int64, as ONNX types them
                return np.asarray(onnx.helper.get_attribute_value(a), dtype=ir.CONSTANT_ATTRS[a.name])
        return None

    def const_proto(self, tensor: str) -> Optional[onnx.TensorProto]:
        """The TensorProto behind a constant (for raw storage checks), when there is one."""
        if tensor in self.inits:
            return self.inits[tensor]
        i = self.producer.get(tensor)
        if i is not None and self.nodes[i].op_type == "Constant":
            for a in self.nodes[i].attribute:
                if a.name == "value":
                    return a.t
        return None


def attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute value of a node, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
