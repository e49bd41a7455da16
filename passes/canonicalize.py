"""canonicalize: constant folding, shape folding, and removal of no-op nodes.

What changes in the graph:
- unnamed nodes get unique names (reports and errors must be able to name every node);
- subgraphs computing constants are folded (onnxruntime evaluates them through graphsurgeon),
  including Shape -> Gather -> Unsqueeze -> Concat chains once the input shape is static;
- Identity, Dropout (inference) and Cast to the type the tensor already has are bypassed, and so
  is a chain of Reshape / Squeeze / Unsqueeze / Flatten that ends in the static shape it started
  from (tf2onnx's SE blocks: GlobalAveragePool -> Squeeze -> Reshape back to N x C x 1 x 1),
  and a Cast back to the type a Cast widened from (float32 -> float64 -> float32: every value
  survives the round trip; a BatchNormalization behind one could not be folded);
- a Reshape whose target is computed from Shape nodes gets a constant target, when every entry
  is a constant or a copy of the input's own dim at that position, the same named (symbolic)
  dim: ``x.view(x.size(0), 2, -1, h, w)`` of a dynamic-batch export becomes the target
  ``[0, 2, -1, h, w]`` (0 copies the dim). Shape inference can follow a constant target and not
  a computed one, so the shapes after it become known; ShuffleNet's channel shuffles need this;
- identity arithmetic is bypassed: x + 0, x - 0, x * 1, x / 1 with a constant of zeros or ones
  that does not broadcast x to a larger shape (an untrained learnable affine, as in HGNetV2's
  blocks; onnxruntime drops these too, and a placement that kept them would misjudge what runs);
- unused nodes and initializers are removed, nodes are topologically sorted.

Must not fire on: QuantizeLinear / DequantizeLinear (folding a DQ of an int8 weight would undo the
quantization), and folds whose result would be larger than ``max_fold_bytes`` (a constant grid
that is cheap to compute but costly to store). Graph outputs keep their names.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import Numerics, Pass, PassContext, PassReport, PassResult, UsageError

from ._conv_util import static_shape

log = logging.getLogger(__name__)

NEVER_FOLD = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
DEFAULT_MAX_FOLD_BYTES = 16 * 2 ** 20
NOOP_KEYS = {"Identity": "removed_identity", "Dropout (inference)": "removed_dropout",
             "no-op Cast": "removed_cast", "reshape round trip": "removed_reshape_round_trip",
             "identity arithmetic": "removed_identity_arithmetic",
             "cast round trip": "removed_cast_round_trip"}
#: binary ops with their neutral constant, and which input positions that constant may take
NEUTRAL = {"Add": (0.0, (0, 1)), "Sub": (0.0, (1,)), "Mul": (1.0, (0, 1)), "Div": (1.0, (1,))}
#: ops that only relabel the dims of row-major data: a chain of them back to its first shape is exact
RESHAPES = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten"})
#: ops whose output's first axis is their first variable input's (the batch stays the batch)
BATCH_KEEPING = frozenset({
    "Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Relu", "LeakyRelu", "Sigmoid",
    "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Softplus", "Mish", "Gelu", "Erf",
    "Identity", "Cast", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "PRelu"})


@dataclass(frozen=True)
class Dim:
    """A symbolic dim among the values of a computed shape: dim ``index`` of ``tensor``."""
    tensor: gs.Tensor
    index: int
    param: str


class Canonicalize(Pass):
    """Constant folding and cleanup that leaves the numerics untouched."""

    name = "canonicalize"
    option_names = ("max_fold_bytes",)
    numerics = Numerics.EXACT
    description = "fold constants and static shapes, drop Identity / no-op Cast / Dropout / x*1, x+0"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        report = PassReport()
        inits = {t.name for t in model.graph.initializer}
        frozen = [vi.name for vi in model.graph.input if vi.name in inits]
        if frozen:   # older exporters list weights as inputs; graphsurgeon drops them (as onnxruntime's tool)
            report.count("initializer_inputs_frozen", len(frozen))
            report.details["initializer_inputs_frozen"] = frozen[:20]
        shapes = dict(ctx.input_shapes) if ctx.fix_input_shapes else {}
        if shapes:
            model = ir.fix_input_shapes(model, shapes)
        unsorted = not ir.is_topological(model.graph)
        if unsorted:   # onnx's inference reads the nodes in order
            report.count("nodes_sorted", len(model.graph.node))
            model = ir.to_model(ir.to_graph(model).toposort(), like=model, cleanup=False)
        graph = _inferred_graph(model, report)
        n_before = len(graph.nodes)
        named = ir.name_unnamed_nodes(graph)
        if named:
            report.count("nodes_named", named)
        removed = bypass_noops(graph, report)
        max_bytes = ctx.opt(self.name, "max_fold_bytes", DEFAULT_MAX_FOLD_BYTES)
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise UsageError(f"canonicalize: max_fold_bytes={max_bytes!r}: expected a whole number of bytes")
        for rnd in range(ir.FOLD_ROUNDS):
            # a fold can make a shape known that the next round folds (a Reshape whose target
            # came from a Shape chain, then a Shape of what it feeds): infer again and go on
            if rnd:
                graph = _inferred_graph(ir.to_model(graph, like=model, cleanup=False), None)
            n_round = len(graph.nodes)
            graph.fold_constants(fold_shapes=True, error_ok=True, size_threshold=max_bytes,
                                 should_exclude_node=lambda n: n.op in NEVER_FOLD)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            removed += bypass_noops(graph, report)
            targets = constant_reshape_targets(graph)
            if targets:
                report.count("reshape_targets_made_constant", targets)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            if len(graph.nodes) == n_round and not targets:
                break
        n_after = len(graph.nodes)
        report.count("nodes_before", n_before)
        report.count("nodes_after", n_after)
        report.count("constant_nodes_folded", max(0, n_before - n_after - removed))
        out = ir.to_model(graph, like=model, cleanup=False)
        del out.graph.value_info[:]
        modified = (n_after != n_before or named > 0 or bool(shapes) or unsorted
                    or not _same_graph(model, out))
        # unmodified, the model goes back as it came: the export may still differ in what no
        # reader sees (initializers in the order their nodes use them, another topological
        # order of the same nodes)
        return PassResult(out if modified else model, modified, report)


def _inferred_graph(model: onnx.ModelProto, report: Optional[PassReport]) -> gs.Graph:
    """The graph with onnx shape inference (data propagation on) applied where it succeeds (a
    failure is reported once, in the first round)."""
    try:
        model = ir.infer_shapes(model, data_prop=True)
    except Exception as exc:  # a model we cannot infer still gets folded, less well
        if report is not None:
            report.skip("<graph>", f"shape inference failed: {str(exc).splitlines()[0]}")
    return ir.to_graph(model)


def _shape_entries(t: gs.Tensor) -> Optional[list]:
    """The values of a 1-D int tensor computed from shapes, each an int or a :class:`Dim`:
    constants, Shape (start, end), Gather of constant indices, Slice of constant bounds (step 1),
    Unsqueeze of a scalar, Concat, and Cast. None for anything else or an unnamed dynamic dim."""
    value = ir.const_value(t)
    if value is not None:
        return [int(v) for v in np.asarray(value).ravel()] if value.dtype.kind in "iu" else None
    node = t.inputs[0] if len(t.inputs) == 1 else None
    if node is None:
        return None
    if node.op == "Shape":
        src = node.inputs[0]
        if src.shape is None:
            return None
        entries: list = []
        for i, d in enumerate(src.shape):
            if isinstance(d, int) and d >= 0:
                entries.append(d)
            elif isinstance(d, str) and d:
                entries.append(Dim(src, i, d))
            else:
                return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(entries))
        return entries[start:end]
    if node.op in ("Cast", "Unsqueeze"):
        return _shape_entries(node.inputs[0])  # a scalar and its one-element vector hold one value
    if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (0, -1):
        parts = [_shape_entries(i) for i in node.inputs]
        return None if any(p is None for p in parts) else [v for p in parts for v in p]
    if node.op in ("Slice", "Gather"):  # x.shape[a:b] (flatten(start_dim=2)), x.shape[i]
        data = _shape_entries(node.inputs[0])
        picked = ir.picked_indices(node, len(data)) if data is not None else None
        return None if picked is None else [data[i] for i in picked]
    return None


def _batch_root(t: gs.Tensor) -> Optional[gs.Tensor]:
    """The graph input whose first dim ``t``'s first dim is, followed up through ops that keep
    the first axis (elementwise, Conv, pooling; Concat, Split, Slice not on axis 0; Resize by
    a scale of 1 on it; Transpose and constant-target Reshapes that leave it in place)."""
    while True:  # a graph has no cycles: this ends at a graph input or an op that does not qualify
        if not t.inputs:
            return t
        node = t.inputs[0]
        if node.op in ("Concat", "Split") and int(node.attrs.get("axis", 0)) == 0:
            return None
        if node.op == "Slice" and 0 in (ir.const_ints(node, 3, "axes") or [0]):
            return None
        if node.op == "Transpose" and list(node.attrs.get("perm", [-1]))[:1] != [0]:  # default: reversed
            return None
        if node.op == "Reshape" and (ir.reshape_target(node) or [None])[:1] != [0]:
            return None
        if node.op == "Resize":
            scales = ir.const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
            if scales is None or scales.size == 0 or float(scales.ravel()[0]) != 1.0:
                return None
        elif node.op not in BATCH_KEEPING | {"Concat", "Split", "Slice", "Transpose", "Reshape"}:
            return None
        if node.op == "Reshape":  # the rank may change, the first axis stays
            t = node.inputs[0]
        else:
            t = _batch_input(node, t)
        if t is None:
            return None


def _batch_input(node: gs.Node, t: gs.Tensor) -> Optional[gs.Tensor]:
    """The input of ``node`` whose first dim ``t``'s first dim is: its one variable input of
    ``t``'s rank, or of several (a broadcasting Add) those not of batch 1, when they agree on it;
    None when that cannot be told. Following the first one took a batch-1 operand's batch for the
    other's (N), and a Reshape target became 0 (a copy of 1): wrong at batch 2."""
    if not t.shape:
        return None
    same = [i for i in node.inputs if isinstance(i, gs.Variable) and i.shape and len(i.shape) == len(t.shape)]
    if len(same) > 1:
        batched = [i for i in same if i.shape[0] != 1]
        same = batched or same
        first = {str(i.shape[0]) for i in same}
        if len(first) != 1 or not isinstance(same[0].shape[0], (int, str)) or same[0].shape[0] in ("", -1):
            return None
    return same[0] if same else None


def _same_dim(entry: Dim, data: gs.Tensor, index: int) -> bool:
    """``entry`` is dim ``index`` of ``data``: the same tensor and axis, the same dim_param, or
    (the first axis) both lead to the first dim of the same graph input."""
    dims = data.shape
    if dims is None or index >= len(dims) or entry.index != index:
        return False
    if entry.tensor is data or dims[index] == entry.param:
        return True
    if index:
        return False
    root = _batch_root(entry.tensor)
    return root is not None and root is _batch_root(data)


def constant_reshape_targets(graph: gs.Graph) -> int:
    """Computed Reshape targets whose entries are constants or copies of the input's dims at the
    same positions become constants (0 for each copy). Returns how many."""
    n, alloc = 0, None
    for node in graph.nodes:
        if node.op != "Reshape" or node.attrs.get("allowzero", 0) or len(node.inputs) < 2 \
                or ir.const_value(node.inputs[1]) is not None:
            continue
        entries = _shape_entries(node.inputs[1])
        if entries is None or not any(isinstance(e, Dim) for e in entries):
            continue  # a target of only numbers is graphsurgeon's to fold
        if not all(_same_dim(e, node.inputs[0], i) for i, e in enumerate(entries) if isinstance(e, Dim)):
            continue
        target = np.array([0 if isinstance(e, Dim) else e for e in entries], np.int64)
        alloc = alloc or ir.NameAllocator.for_graph(graph)
        node.inputs[1] = gs.Constant(alloc(f"{node.name}_target"), target)
        n += 1
    return n


def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """The same nodes (in any order: both are topologically sorted) and as many initializers."""
    ga = sorted((n.op_type, tuple(n.input), tuple(n.output)) for n in a.graph.node)
    gb = sorted((n.op_type, tuple(n.input), tuple(n.output)) for n in b.graph.node)
    return ga == gb and len(a.graph.initializer) == len(b.graph.initializer)


def round_trip_source(node: gs.Node) -> Optional[gs.Tensor]:
    """For the last op of a Reshape / Squeeze / Unsqueeze / Flatten chain, the nearest tensor up
    the chain with the same static shape and dtype as its output (None if there is none)."""
    if node.op not in RESHAPES or not node.inputs or not node.outputs:
        return None
    out = node.outputs[0]
    want = static_shape(out)
    if want is None:
        return None
    cur = node
    while True:
        src = cur.inputs[0]
        if not isinstance(src, gs.Variable):
            return None
        if static_shape(src) == want and _same_type(src.dtype, out.dtype):
            return src
        if len(src.inputs) != 1 or src.inputs[0].op not in RESHAPES:
            return None
        cur = src.inputs[0]


def _same_type(a: object, b: object) -> bool:
    """Two graphsurgeon tensor types are known and equal; one numpy has no match for (bfloat16)
    graphsurgeon gives as its ONNX number, equal only to the same number."""
    if a is None or b is None:
        return False
    try:
        return np.dtype(a) == np.dtype(b)
    except TypeError:
        return a == b


def identity_operand(node: gs.Node) -> Optional[gs.Tensor]:
    """The variable input of ``x + 0``, ``0 + x``, ``x - 0``, ``x * 1``, ``1 * x`` or ``x / 1`` when
    the constant is all neutral and the output has the input's static shape and dtype."""
    if node.op not in NEUTRAL or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    neutral, positions = NEUTRAL[node.op]
    out = node.outputs[0]
    for ci in positions:
        c, x = node.inputs[ci], node.inputs[1 - ci]
        value = ir.const_value(c)
        if value is None or value.size == 0 or not isinstance(x, gs.Variable):
            continue
        if ir.const_value(x) is not None:
            continue
        if value.dtype.kind not in "fiu" or not np.all(value == neutral):
            continue
        shape = static_shape(x)
        if shape is None or shape != static_shape(out) or not _same_type(x.dtype, out.dtype):
            continue
        return x
    return None


def _is_noop(node: gs.Node) -> Optional[str]:
    if node.op == "Identity":
        return "Identity"
    if node.op in NEUTRAL and identity_operand(node) is not None:
        return "identity arithmetic"
    if node.op in RESHAPES and round_trip_source(node) is not None:
        return "reshape round trip"
    if node.op == "Dropout":
        mask_used = len(node.outputs) > 1 and bool(node.outputs[1].outputs)
        training = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        mode = None if training is None else ir.const_value(training)
        if not mask_used and (training is None or (mode is not None and not bool(mode))):
            return "Dropout (inference)"
        return None
    if node.op == "Cast":
        src = node.inputs[0].dtype
        to = node.attrs.get("to")
        if src is not None and to is not None:
            try:   # graphsurgeon gives a type numpy has no match for (bfloat16) as its ONNX number
                same = np.dtype(src) == ir.np_dtype(int(to))
            except Exception:   # noqa: BLE001
                return None
            if same:
                return "no-op Cast"
            if cast_round_trip_source(node) is not None:
                return "cast round trip"
    return None


def cast_round_trip_source(node: gs.Node) -> Optional[gs.Tensor]:
    """The input of the Cast before ``node`` (a Cast) when that Cast widened it without loss (within
    floats, or within integers: ``np.can_cast`` safe) and ``node`` casts back to its type; else None."""
    first = node.inputs[0].inputs[0] if node.inputs and node.inputs[0].inputs else None
    if first is None or first.op != "Cast" or not first.inputs or first.inputs[0].dtype is None:
        return None
    try:
        orig = np.dtype(first.inputs[0].dtype)
        mid = ir.np_dtype(int(first.attrs["to"]))
        back = ir.np_dtype(int(node.attrs["to"]))
    except Exception:   # noqa: BLE001 - a type numpy has no match for (bfloat16, strings)
        return None
    same_kind = (orig.kind == "f") == (mid.kind == "f") and orig.kind in "fiu" and mid.kind in "fiu"
    return first.inputs[0] if back == orig and same_kind and np.can_cast(orig, mid, "safe") else None


def bypass_noops(graph: gs.Graph, report: PassReport) -> int:
    """Reconnect consumers of no-op nodes to their input. Returns how many nodes were bypassed."""
    outputs = {t.name for t in graph.outputs}
    matches: List[gs.Node] = [n for n in graph.nodes if n.inputs and _is_noop(n)]
    n = 0
    for node in matches:
        kind = _is_noop(node)
        src, dst = node.inputs[0], node.outputs[0]
        if kind == "reshape round trip":
            if dst.name in outputs:  # a graph output keeps its producer
                continue
            src = round_trip_source(node)
        elif kind == "identity arithmetic":
            src = identity_operand(node)
        elif kind == "cast round trip":
            src = cast_round_trip_source(node)
        if dst.name in outputs:
            if src.name in outputs or isinstance(src, gs.Constant) or not src.inputs or src in graph.inputs:
                what = "another graph output" if src.name in outputs else "a graph input or constant"
                report.skip(node.name, f"{kind} writes a graph output from {what}")
                continue
            # keep the public output name: the producer now writes it directly
            prod = src.inputs[0]
            if any(c is not node for c in src.outputs):
                report.skip(node.name, f"{kind} writes a graph output and its input has other consumers")
                continue
            idx = [i for i, t in enumerate(prod.outputs) if t is src][0]
            prod.outputs[idx] = dst
            node.outputs.clear()
            node.inputs.clear()
        else:
            for consumer in list(dst.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is dst:
                        consumer.inputs[i] = src
            node.outputs.clear()
            node.inputs.clear()
        report.count(NOOP_KEYS[kind])
        n += 1
    return n
