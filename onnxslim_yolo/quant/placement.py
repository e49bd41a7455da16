"""Where Q/DQ go: which weight layers and ops run in INT8, which tensors get a Q/DQ pair.

Read-only over a graphsurgeon graph; the result is a :class:`QuantPlan` the rewrite applies.
Rules (per target, see ``quant.targets``):
- the decode tail from :func:`find_head` is never touched; the last convs' outputs stay float;
- a weight layer runs INT8 unless the target has no kernel for it, the user excluded it, its
  weights are not constant, or the measurement said INT8 is slower here (``layer_filter``);
  its activation input is quantized, and (ort-cpu) its output too, so DQ->Conv->Q fuses;
- (ort-cpu) an op in ``int8_ops`` runs INT8 when all its float data inputs are quantized anyway
  and some consumer reads it in INT8; otherwise it is left float and reads DQ outputs;
- ops the runtime runs unchanged on integers (MaxPool, Resize, Reshape ...) and Concat share one
  range between inputs and output (``groups``); a Sigmoid output has the fixed range [0, 1];
- (tensorrt) only the inputs of weight layers and the residual input of Add are quantized.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import AbstractSet, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx_graphsurgeon as gs

from .. import ir
from ..analysis.head import HeadInfo
from ..pass_base import UsageError
from .act_range import activation_of
from .targets import Target, resize_runs_int8, weight_axis

log = logging.getLogger(__name__)

#: data inputs of the ops that may run INT8 (other inputs are shapes, scales, axes)
_ALL_INPUTS = ("Concat", "Add", "Mul")
LayerFilter = Callable[[gs.Node], Optional[str]]
#: ops whose output values all come from their data inputs (nearest Resize included)
VALUE_PRESERVING = frozenset({"MaxPool", "Reshape", "Transpose", "Split", "Slice", "Squeeze", "Unsqueeze",
                              "Flatten", "Identity", "DepthToSpace", "SpaceToDepth", "Concat"})


@dataclass(frozen=True)
class LayerSpec:
    """One INT8 weight layer: its weight (and bias) tensors and the per-channel axis."""

    node: str
    op: str
    act_input: str
    weight: str
    weight_index: int
    axis: int
    bias: Optional[str] = None
    #: False: one weight scale whatever the pipeline's per-channel option (a batched MatMul weight)
    per_channel: bool = True


@dataclass
class QuantPlan:
    target: Target
    layers: Dict[str, LayerSpec] = field(default_factory=dict)
    int8_ops: List[str] = field(default_factory=list)
    activations: Dict[str, str] = field(default_factory=dict)   # tensor -> why it is quantized
    float_nodes: Dict[str, str] = field(default_factory=dict)   # node -> why it stays float
    groups: List[List[str]] = field(default_factory=list)      # tensors sharing one range
    fixed: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    graph_inputs: List[str] = field(default_factory=list)
    tail: List[str] = field(default_factory=list)
    #: unit name -> node names (an INT8 layer with the INT8 ops that only it feeds)
    units: Dict[str, List[str]] = field(default_factory=dict)
    #: quantized tensor -> the activation all its readers form ("silu", "sigmoid", "relu")
    act_after: Dict[str, str] = field(default_factory=dict)
    #: output of a value-preserving INT8 op (MaxPool, Resize, Reshape, Concat ...) -> its inputs:
    #: its values are a subset of theirs, so its range is their union (not calibrated)
    derived: Dict[str, List[str]] = field(default_factory=dict)
    #: weight layers measured slower in INT8 but quantized, since the runtime would anyway
    runtime_quantized: Dict[str, str] = field(default_factory=dict)
    #: INT8 op -> its float constant operand, quantized with it (Target.quantize_constant_operands)
    const_operands: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> Dict[str, object]:
        return {"target": self.target.name, "int8_layers": len(self.layers),
                "int8_ops": len(self.int8_ops), "quantized_tensors": len(self.activations),
                "float_nodes": len(self.float_nodes), "shared_range_groups": len(self.groups),
                "decode_tail_nodes": len(self.tail)}


def match_patterns(names: Iterable[str], patterns: Sequence[str]) -> Set[str]:
    """Node names matching any pattern (exact name or fnmatch); a pattern matching nothing is an error."""
    names = list(names)
    hit: Set[str] = set()
    for p in patterns:
        m = {n for n in names if n == p or fnmatch.fnmatchcase(n, p)}
        if not m:
            raise UsageError(f"insert-qdq: exclude pattern '{p}' matches no node")
        hit |= m
    return hit


def data_inputs(node: gs.Node) -> List[gs.Tensor]:
    return list(node.inputs) if node.op in _ALL_INPUTS else list(node.inputs[:1])


def is_float_var(t: gs.Tensor) -> bool:
    if not isinstance(t, gs.Variable) or ir.const_value(t) is not None or t.dtype is None:
        return False
    try:   # graphsurgeon gives a type numpy has no match for (bfloat16) as its ONNX number
        return np.dtype(t.dtype) == np.float32
    except TypeError:
        return False


def _const(t: gs.Tensor) -> Optional[np.ndarray]:
    return ir.const_value(t) if t is not None and t.name else None


def layer_spec(node: gs.Node, target: Target) -> Tuple[Optional[LayerSpec], str]:
    """(spec, "") for a weight layer the target can run INT8, else (None, reason)."""
    if node.op not in target.int8_layers:
        return None, f"{target.name} has no INT8 {node.op} kernel (measured: DQ + float op + Q)"
    if node.op == "MatMul":
        if len(node.inputs) < 2 or _const(node.inputs[1]) is None or _const(node.inputs[0]) is not None:
            return None, "MatMul without a constant right-hand weight"
        w_idx, act = 1, node.inputs[0]
    else:
        if len(node.inputs) < 2 or _const(node.inputs[1]) is None:
            return None, f"{node.op} weights are not constant"
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            return None, "Gemm with transA"
        w_idx, act = 1, node.inputs[0]
    w = _const(node.inputs[w_idx])
    if w is None or w.dtype != np.float32 or w.ndim < 2:
        return None, f"{node.op} weights are not float32 matrices"
    if not is_float_var(act):
        untyped = isinstance(act, gs.Variable) and act.dtype is None
        what = "has no type shape inference could give it" if untyped else "is not a float32 activation"
        return None, f"{node.op} input '{act.name}' {what}"
    axis = weight_axis(node.op, int(node.attrs.get("transB", 0)), w.ndim)
    bias = None
    if node.op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
        b = _const(node.inputs[2])
        if b is not None and b.ndim == 1 and b.shape[0] == w.shape[axis]:
            bias = node.inputs[2].name
    # onnxruntime fuses DQ -> MatMul -> Q into QLinearMatMul with a per-column scale only for a 2-D
    # weight; a batched one (YOLO-World's text embeddings, [1, heads, d, classes]) with a scale per
    # column ran as DQ + float MatMul + Q (measured, onnxruntime 1.32), so it gets one scale
    per_channel = not (node.op == "MatMul" and w.ndim > 2)
    return LayerSpec(node.name, node.op, act.name, node.inputs[w_idx].name, w_idx, axis, bias,
                     per_channel), ""


# ------------------------------------------------------------------------------------- planning
def _choose_layers(graph: gs.Graph, plan: QuantPlan, head: HeadInfo, excluded: Mapping[str, str],
                   layer_filter: Optional[LayerFilter], forced: Mapping[str, str]) -> Set[str]:
    """Fill ``plan.layers`` and ``plan.float_nodes``; returns the layers kept float by
    ``layer_filter`` alone (measured slower in INT8). ``forced`` layers skip the filter."""
    slower: Set[str] = set()
    last = set(head.last_convs)
    tail = set(plan.tail)
    t = plan.target
    for node in graph.nodes:
        if node.name in tail or node.op not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        if node.name in excluded:
            plan.float_nodes[node.name] = excluded[node.name]
            continue
        if node.name in last and not t.quantize_last_convs:
            plan.float_nodes[node.name] = ("last conv: its output feeds the decode tail and stays float "
                                           "(a quantized output needs one scale for box and score logits)")
            continue
        spec, why = layer_spec(node, t)
        if spec is None:
            plan.float_nodes[node.name] = why
            continue
        why_slower = layer_filter(node) if layer_filter is not None and node.name not in forced else None
        if why_slower:
            plan.float_nodes[node.name] = why_slower
            slower.add(node.name)
            continue
        plan.layers[node.name] = spec
    return slower


def _propagate(graph: gs.Graph, plan: QuantPlan, excluded: Mapping[str, str]) -> Set[str]:
    """Forward: ops that can run INT8 on tensors quantized anyway. Returns quantized tensor names."""
    t = plan.target
    tail = set(plan.tail)
    avail: Set[str] = {s.act_input for s in plan.layers.values()}
    if t.quantize_layer_outputs:
        for node in graph.nodes:
            if node.name in plan.layers:
                avail.update(o.name for o in node.outputs if is_float_var(o))
    if not t.int8_ops:
        return avail
    for node in graph.nodes:
        if node.name in tail or node.name in plan.layers or not runs_int8(node, t.int8_ops):
            continue
        if node.name in excluded:
            plan.float_nodes[node.name] = excluded[node.name]
            continue
        io = _float_io(node)
        const = _const_operand(node) if io is None and t.quantize_constant_operands else None
        if const is not None:
            io = ([x for x in node.inputs if x is not const], [o for o in node.outputs if is_float_var(o)])
        if io is None or not all(x.name in avail for x in io[0]):
            continue
        plan.int8_ops.append(node.name)
        if const is not None:
            plan.const_operands[node.name] = const.name
        avail.update(o.name for o in io[1])
    _complete_partial(graph, plan, excluded, avail)
    return avail


#: ops whose float constant operand can be quantized along (Target.quantize_constant_operands)
CONST_OPERAND_OPS = ("Add", "Mul")


def _const_operand(node: gs.Node) -> Optional[gs.Tensor]:
    """The float32 constant of an Add or Mul of one float activation and one float32 constant
    (a bias, a scale) with one float output; None otherwise."""
    if node.op not in CONST_OPERAND_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    consts = [x for x in node.inputs if x.name and ir.const_value(x) is not None]
    acts = [x for x in node.inputs if is_float_var(x)]
    if len(consts) != 1 or len(acts) != 1 or not is_float_var(node.outputs[0]):
        return None
    value = ir.const_value(consts[0])
    return consts[0] if value.dtype == np.float32 and value.size > 0 else None


def runs_int8(node: gs.Node, ops: AbstractSet[str]) -> bool:
    """``node.op`` is one of ``ops``, and not a Resize that interpolates
    (:func:`.targets.resize_runs_int8`)."""
    if node.op not in ops:
        return False
    return node.op != "Resize" or resize_runs_int8(ir.text(node.attrs.get("mode", "nearest")))


def _float_io(node: gs.Node) -> Optional[Tuple[List[gs.Tensor], List[gs.Tensor]]]:
    """(data inputs, outputs) of a node that could run INT8: every data input and every named
    output a float32 activation; None otherwise."""
    ins = data_inputs(node)
    outs = [o for o in node.outputs if is_float_var(o)]
    named = [o for o in node.outputs if o.name]
    if not ins or not all(is_float_var(x) for x in ins) or len(outs) != len(named):
        return None
    return ins, outs


#: INT8 ops whose missing inputs :func:`_complete_partial` quantizes
_COMPLETED = ("Concat", "Add")
#: single-input INT8 ops that may sit between a completed op and its quantized output: a Relu,
#: or an op onnxruntime runs on uint8 unchanged (GhostNet's Concat -> Slice keeping the first half)
_THROUGH = frozenset({"Relu"}) | (VALUE_PRESERVING - {"Concat"})


def _through_after(graph: gs.Graph, outs: Sequence[gs.Tensor], avail: Set[str], skip: Set[str],
                   int8_ops: Iterable[str]) -> Optional[List[gs.Node]]:
    """The readers of ``outs`` when each output is read by one op of ``_THROUGH`` alone (an INT8
    op of the target, not in ``skip``) whose outputs are quantized anyway: ResNet's residual
    Add -> Relu, GhostNet's Concat -> Slice. None otherwise."""
    graph_outs = {o.name for o in graph.outputs}
    readers: List[gs.Node] = []
    for o in outs:
        if o.name in graph_outs or len(o.outputs) != 1:
            return None
        r = o.outputs[0]
        if r.op not in _THROUGH or r.op not in int8_ops or r.name in skip:
            return None
        io = _float_io(r)
        if io is None or not all(y.name in avail for y in io[1]):
            return None
        readers.append(r)
    return readers


def _complete_partial(graph: gs.Graph, plan: QuantPlan, excluded: Mapping[str, str], avail: Set[str]) -> None:
    """A Concat or Add whose output is quantized anyway (directly, or after a Relu as in ResNet's
    residual Add, or after a Slice as in GhostNet's Concat) and some of whose inputs are, but not
    all (one comes from a float op, say a Conv kept float because INT8 is slower there): quantize
    the rest too, so that it runs INT8 instead
    of in float between DQs and a Q. One Q replaces the DQs and the float op. Not when such an
    input's producer is excluded by the user or kept float by the accuracy search. A Concat's
    inputs share its output's range, so there the values do not change; an Add's new Q adds one
    rounding, as the Q after an INT8 producer would. Repeated until nothing changes: a completed
    Concat's new Q can make the Add before it eligible. A Resize, MaxPool, Slice ... (same-range
    ops) whose input and outputs end up quantized that way runs INT8 too: YOLOv5-ghost's upsample
    of a ghost Concat quantized for a later Concat, its output for the next one, ran in float
    between DQ and Q with two different ranges, which onnxruntime does not fuse."""
    t = plan.target
    ops = [op for op in _COMPLETED if op in t.int8_ops and (op != "Concat" or t.shared_concat)]
    same_range = t.same_range_ops & t.int8_ops
    tail = set(plan.tail)
    changed = True
    while changed:
        changed = False
        int8 = set(plan.int8_ops)
        for node in graph.nodes:
            if node.name in tail or node.name in int8 or node.name in excluded:
                continue
            passthrough = runs_int8(node, same_range)
            io = _float_io(node) if passthrough or node.op in ops else None
            if io is None:
                continue
            ins, outs = io
            if passthrough:  # quantized on both sides anyway: run it INT8 in one range
                if all(x.name in avail for x in ins + outs):
                    plan.int8_ops.append(node.name)
                    changed = True
                continue
            after: Optional[List[gs.Node]] = []
            if not all(o.name in avail for o in outs):
                after = _through_after(graph, outs, avail, tail | int8 | set(excluded), t.int8_ops)
            missing = [x for x in ins if x.name not in avail]
            # an input from a node the user or the accuracy search keeps float stays float
            if after is None or len(missing) == len(ins) \
                    or any(p.name in excluded for x in missing for p in x.inputs):
                continue
            plan.int8_ops.extend([node.name] + [r.name for r in after])
            for x in missing:
                why = f"input of INT8 {node.op} {node.name} (its other inputs and output are quantized: " \
                      f"one Q instead of a float {node.op})"
                plan.activations.setdefault(x.name, why)
                avail.add(x.name)
            avail.update(o.name for o in outs)
            changed = True


def _demote(graph: gs.Graph, plan: QuantPlan, by_name: Dict[str, gs.Node]) -> None:
    """Backward: an INT8 op none of whose readers runs INT8 goes back to float (saves a Q/DQ)."""
    int8 = set(plan.int8_ops)
    layer_inputs = {s.act_input for s in plan.layers.values()}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    for name in sorted(int8, key=order.__getitem__, reverse=True):
        node = by_name[name]
        used = False
        for o in node.outputs:
            if o.name in layer_inputs:
                used = True
            for c in o.outputs:
                if c.name in int8:
                    used = True
        if not used:
            int8.discard(name)
            plan.float_nodes[name] = "no INT8 reader: a float op after DQ is cheaper than requantizing"
    plan.int8_ops = [n for n in plan.int8_ops if n in int8]
    plan.const_operands = {n: c for n, c in plan.const_operands.items() if n in int8}


def _from_int8_relu(x: gs.Tensor, int8: Set[str]) -> bool:
    """A Relu output keeps its own range [0, max] in a shared Concat: with a zero point at the
    bottom of the range onnxruntime drops the Relu (ReluQuantFusion); in the Concat's wider range
    it would run in float between DQ and Q. QLinearConcat requantizes such an input."""
    return len(x.inputs) == 1 and x.inputs[0].op == "Relu" and x.inputs[0].name in int8


def _collect(graph: gs.Graph, plan: QuantPlan, by_name: Dict[str, gs.Node]) -> None:
    t = plan.target
    int8 = set(plan.int8_ops)
    for spec in plan.layers.values():
        plan.activations.setdefault(spec.act_input, f"input of INT8 {spec.op} {spec.node}")
        if t.quantize_layer_outputs:
            for o in by_name[spec.node].outputs:
                if is_float_var(o):
                    why = f"output of INT8 {spec.op} {spec.node} (DQ-{spec.op}-Q fuses)"
                    plan.activations.setdefault(o.name, why)
    for name in plan.int8_ops:
        node = by_name[name]
        for o in node.outputs:
            plan.activations.setdefault(o.name, f"output of INT8 {node.op} {name}")
        if node.op == "Sigmoid":
            plan.fixed[node.outputs[0].name] = (0.0, 1.0)
        if node.op in t.same_range_ops or (node.op == "Concat" and t.shared_concat):
            own_range = node.op == "Concat"
            shared = [x.name for x in data_inputs(node) if not (own_range and _from_int8_relu(x, int8))]
            plan.groups.append(shared + [o.name for o in node.outputs])
            if node.op in VALUE_PRESERVING:
                for o in node.outputs:
                    plan.derived[o.name] = [x.name for x in data_inputs(node)]
    if t.residual_add_inputs:
        _residual_adds(graph, plan)
    tensors = graph.tensors()
    for name in plan.activations:
        act = activation_of(tensors[name])
        if act:
            plan.act_after[name] = act
    plan.graph_inputs = [n for n in input_copies(graph) if n in plan.activations]


def input_copies(graph: gs.Graph) -> List[str]:
    """The graph inputs and the tensors that only rearrange or select their values (VALUE_PRESERVING
    ops fed by them alone: a channels-last image's Transpose), in the order found: their values
    are the input's own (pixels), so they take its exact min/max range too."""
    found = [i.name for i in graph.inputs]
    seen, grew = set(found), True
    while grew:   # a fixpoint: graphsurgeon's node order need not be topological
        grew = False
        for node in graph.nodes:
            ins = data_inputs(node)
            if node.op in VALUE_PRESERVING and ins and all(x.name in seen for x in ins):
                new = [o.name for o in node.outputs if o.name not in seen]
                found += new
                seen.update(new)
                grew = grew or bool(new)
    return found


def _residual_adds(graph: gs.Graph, plan: QuantPlan) -> None:
    """TensorRT: quantize the skip input of a residual Add so the Add fuses into the Conv."""
    tail = set(plan.tail)
    for node in graph.nodes:
        if node.op != "Add" or node.name in tail or len(node.inputs) != 2:
            continue
        ins = [x for x in node.inputs if is_float_var(x)]
        if len(ins) != 2:
            continue
        skip = [x for x in ins if len(x.outputs) > 1]
        for x in (skip if len(skip) == 1 else ins):
            plan.activations.setdefault(x.name, f"residual input of Add {node.name}")


def _units(graph: gs.Graph, plan: QuantPlan, by_name: Dict[str, gs.Node]) -> None:
    """Group each INT8 layer with the INT8 ops fed only by it (its activation chain)."""
    owner: Dict[str, str] = {}
    int8 = set(plan.int8_ops)
    for node in graph.nodes:
        if node.name in plan.layers:
            plan.units[node.name] = [node.name]
            for o in node.outputs:
                owner[o.name] = node.name
        elif node.name in int8:
            ins = [x for x in data_inputs(node) if x.name != plan.const_operands.get(node.name)]
            srcs = {owner.get(x.name) for x in ins}
            unit = srcs.pop() if len(srcs) == 1 and None not in srcs and len(ins) >= 1 else None
            if unit is None or by_name[node.name].op == "Concat":
                unit = node.name
                plan.units[unit] = []
            plan.units[unit].append(node.name)
            for o in node.outputs:
                owner[o.name] = unit
    for name in plan.graph_inputs:
        plan.units[f"input:{name}"] = []


#: float weight layers onnxruntime quantizes itself (weights per tensor, its WeightBiasQuantization
#: step) when they read a DequantizeLinear and their output reaches a QuantizeLinear through
#: nothing but single-reader Relu / Clip nodes
_RUNTIME_QUANTIZED = ("Conv", "ConvTranspose", "Gemm")
RUNTIME_QUANTIZED_WHY = ("measured slower in INT8, but onnxruntime quantizes it anyway (per-tensor weights) "
                         "between its dequantized input and quantized output: quantized here per channel")


def runtime_quantized(graph: gs.Graph, plan: QuantPlan, slower: Set[str]) -> Set[str]:
    """Layers of ``slower`` (kept float for speed alone) that onnxruntime would quantize anyway
    in ``plan``: input quantized, output quantized directly or after single-reader Relu / Clip."""
    outs = {o.name for o in graph.outputs}
    found: Set[str] = set()
    for node in graph.nodes:
        if node.name not in slower or node.op not in _RUNTIME_QUANTIZED:
            continue
        if not node.inputs or node.inputs[0].name not in plan.activations or len(node.outputs) != 1:
            continue
        y = node.outputs[0]
        while y.name not in plan.activations and y.name not in outs and len(y.outputs) == 1 \
                and y.outputs[0].op in ("Relu", "Clip") and y.outputs[0].outputs:
            y = y.outputs[0].outputs[0]
        if y.name in plan.activations:
            found.add(node.name)
    return found


def make_plan(graph: gs.Graph, head: HeadInfo, target: Target, exclude: Sequence[str] = (),
              layer_filter: Optional[LayerFilter] = None,
              keep_float: Optional[Mapping[str, str]] = None, runtime_quantizes: bool = False) -> QuantPlan:
    """The placement for ``graph`` (every node named, toposorted, dtypes known).

    ``exclude``: user patterns kept float; ``keep_float``: node -> reason (mixed precision);
    ``runtime_quantizes``: the runtime quantizes a float layer between Q/DQ itself (onnxruntime
    1.20 on), so a layer kept float only as slower in INT8 is quantized here when the plan puts
    it there (per-channel weights instead of the runtime's per-tensor ones).
    """
    by_name = {n.name: n for n in graph.nodes}
    excluded = {n: "excluded by option" for n in match_patterns(by_name, exclude)}
    excluded.update(keep_float or {})
    tail = set(head.tail_nodes) | set(head.decode_convs)
    forced: Dict[str, str] = {}
    for _ in range(4):  # a promoted layer's quantized output can put the next one between Q/DQ
        plan = QuantPlan(target=target, tail=[n.name for n in graph.nodes if n.name in tail])
        slower = _choose_layers(graph, plan, head, excluded, layer_filter, forced)
        _propagate(graph, plan, excluded)
        _demote(graph, plan, by_name)
        _collect(graph, plan, by_name)
        more = runtime_quantized(graph, plan, slower) if runtime_quantizes else set()
        if not more:
            break
        forced.update({n: RUNTIME_QUANTIZED_WHY for n in more})
    plan.runtime_quantized = forced  # every forced layer is a layer: it passed layer_spec to be slower
    _units(graph, plan, by_name)
    log.info("placement %s: %s", target.name, plan.summary())
    return plan
