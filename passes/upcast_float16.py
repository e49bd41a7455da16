"""upcast-float16: a float16 model computes in float32; its inputs and outputs keep their types.

A float16 export (``half=True``, or converted by onnxconverter-common / onnxruntime's
``float16`` tool) stores its weights and runs its arithmetic in float16. Calibration, the
least-squares refit and INT8 scales all work in float32, so ``insert-qdq`` and
``prune-channels`` need float32 weights; ``optimize`` schedules this pass before them when a
model has float16 weights, and after pruning alone ``restore-float16`` takes the model back.

What changes (in the main graph and in every If/Loop/Scan body):
- float16 initializers and tensor attributes (Constant, ConstantOfShape) become float32: every
  float16 value is a float32 value, so the weights are unchanged;
- Cast / EyeLike / Random* attributes ``to`` / ``dtype`` naming float16 name float32, and
  subgraph inputs, outputs and value_info typed float16 are retyped;
- a float16 graph input is read through a new Cast to float32, and a float16 graph output is
  written by a new Cast from float32: callers feed and receive the same types as before.
Casts that become float32 -> float32 are left to ``canonicalize``, which drops them.

Numerics: tolerance. The weights are the same numbers, but intermediate results are no longer
rounded to float16, so outputs move by float16 rounding noise (and get closer to what the model
was trained as).
"""
from __future__ import annotations

from typing import Callable, Iterable, List

import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import Numerics, Pass, PassContext, PassReport, PassResult, VerificationError

F16 = onnx.TensorProto.FLOAT16
F32 = onnx.TensorProto.FLOAT
#: integer attributes that name an element type
DTYPE_ATTRS = ("to", "dtype")


def _upcast_tensor(t: onnx.TensorProto) -> None:
    arr = numpy_helper.to_array(t).astype(np.float32)
    t.CopyFrom(numpy_helper.from_array(arr, t.name))


def _retype(values: Iterable[onnx.ValueInfoProto]) -> int:
    n = 0
    for vi in values:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == F16:
            vi.type.tensor_type.elem_type = F32
            n += 1
    return n


def _graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """``graph`` and every subgraph under it, depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _graphs(g)


def _upcast_graph(graph: onnx.GraphProto, report: PassReport) -> None:
    """Retype everything float16 in ``graph`` and its subgraphs, except the main graph's own inputs
    and outputs (``_keep_io`` gives them their Casts)."""
    for g in _graphs(graph):
        for t in g.initializer:
            if t.data_type == F16:
                _upcast_tensor(t)
                report.count("initializers")
        for sp in g.sparse_initializer:
            if sp.values.data_type == F16:
                _upcast_tensor(sp.values)
                report.count("initializers")
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F16:
                    _upcast_tensor(a.t)
                    report.count("constants")
                elif a.type == onnx.AttributeProto.INT and a.name in DTYPE_ATTRS and a.i == F16:
                    a.i = F32
                    report.count(f"{node.op_type.lower()}_to_float32")
        if g is graph:  # an entry for a graph input or output would contradict its float16 Cast
            io = {v.name for v in [*g.input, *g.output]}
            keep = [v for v in g.value_info if v.name not in io]
            del g.value_info[:]
            g.value_info.extend(keep)
        n = _retype(g.value_info)
        if g is not graph:
            n += _retype(g.input) + _retype(g.output)
        if n:
            report.count("value_infos", n)


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in ir.all_nodes(graph):
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _keep_io(graph: onnx.GraphProto, report: PassReport) -> None:
    """A Cast to float32 behind each float16 graph input and a Cast back to float16 in front of
    each float16 graph output, so the model's interface keeps its types."""
    # names of the subgraphs too: a read renamed in a branch must not meet a name defined there
    fresh = ir.NameAllocator([*(n for node in ir.all_nodes(graph) for n in [*node.input, *node.output]),
                              *(v.name for v in [*graph.input, *graph.output]),
                              *(t.name for t in graph.initializer), *(node.name for node in graph.node)])

    inits = {t.name for t in graph.initializer}
    head: List[onnx.NodeProto] = []
    for vi in graph.input:
        if vi.name in inits or vi.type.tensor_type.elem_type != F16:
            continue
        inner = fresh(f"{vi.name}_float32")
        _rename_reads(graph, vi.name, inner)
        head.append(onnx.helper.make_node("Cast", [vi.name], [inner], to=F32,
                                          name=fresh(f"{vi.name}_upcast")))
        report.count("inputs_cast")
    producers = {o: node for node in graph.node for o in node.output}
    tail: List[onnx.NodeProto] = []
    for vi in graph.output:
        if vi.type.tensor_type.elem_type != F16:
            continue
        node = producers.get(vi.name)
        if node is None:   # an input or initializer passed straight through: already float16
            report.skip(vi.name, "graph output is not computed by a node; left as it is")
            continue
        inner = fresh(f"{vi.name}_float32")
        node.output[list(node.output).index(vi.name)] = inner
        _rename_reads(graph, vi.name, inner)
        tail.append(onnx.helper.make_node("Cast", [inner], [vi.name], to=F16,
                                          name=fresh(f"{vi.name}_downcast")))
        report.count("outputs_cast")
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)


def float16_tensors(model: onnx.ModelProto) -> int:
    """How many initializers and Constant values of ``model`` (subgraphs included) are float16."""
    n = 0
    for g in _graphs(model.graph):
        n += sum(t.data_type == F16 for t in g.initializer)
        n += sum(a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F16
                 for node in g.node for a in node.attribute)
    return n


class UpcastFloat16(Pass):
    """float16 weights and arithmetic to float32; graph inputs and outputs keep float16."""

    name = "upcast-float16"
    option_names = ()
    numerics = Numerics.TOLERANCE
    default_enabled = False
    description = "float16 weights and arithmetic to float32 (inputs and outputs keep their types)"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        report = PassReport()
        out = onnx.ModelProto()
        out.CopyFrom(model)
        _upcast_graph(out.graph, report)
        _keep_io(out.graph, report)
        modified = any(report.counts.values())
        if modified:
            report.details["float16_tensors_before"] = float16_tensors(model)
        return PassResult(out if modified else model, modified, report)

    def ensures(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        left = float16_tensors(model)
        if left:
            raise VerificationError(f"{left} float16 initializer(s) or constant(s) left")


def schedule(names: List[str], has_float16: Callable[[], bool]) -> List[str]:
    """``names`` with this pass first when INT8 or pruning (they need float32 weights) is scheduled
    and ``has_float16()`` (asked only then), and with ``restore-float16`` last when it is pruning
    alone; unchanged otherwise."""
    if UpcastFloat16.name in names or not {"insert-qdq", "prune-channels"} & set(names) or not has_float16():
        return names
    tail = [] if "insert-qdq" in names or "restore-float16" in names else ["restore-float16"]
    return [UpcastFloat16.name, *names, *tail]


__all__ = ["UpcastFloat16", "float16_tensors", "schedule"]
