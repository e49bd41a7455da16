"""Structural checks: onnx checker, shape inference, opset, float64, dynamic dims, unused
initializers, duplicate names, dangling inputs, non-finite weights.

Each function takes the model (and its :class:`GraphIndex`) and returns one CheckResult.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Dict, Iterable, List, Set

import numpy as np
import onnx

from .. import ir
from ..pass_base import first_line
from .index import QDQ_OPS, GraphIndex, attr
from .result import CheckResult, failed, listing, passed, summarize, warned

MIN_OPSET, MAX_OPSET = 11, 21
#: per-channel Q/DQ (an ``axis`` attribute) exists from opset 13
PER_CHANNEL_OPSET = 13


def check_onnx_checker(model: onnx.ModelProto) -> CheckResult:
    """onnx.checker with ``full_check`` (types and shapes too)."""
    name = "structure.checker"
    try:
        ir.check_model(model)
    except Exception as exc:  # onnx raises ValidationError, InferenceError and others
        return failed(name, f"onnx checker: {' '.join(str(exc).split())}")   # the node is on a later line
    return passed(name, f"onnx checker (full) ok, IR version {model.ir_version}")


def check_shape_inference(model: onnx.ModelProto) -> CheckResult:
    """Strict shape inference with data propagation: every op must infer, declared shapes agree."""
    name = "structure.shape_inference"
    try:
        inferred = ir.inferred_values(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        return failed(name, f"strict shape inference: {first_line(exc)}")
    known = {vi.name for vi in inferred}
    produced = [o for n in model.graph.node for o in n.output if o]
    missing = [t for t in produced if t not in known and t not in {o.name for o in model.graph.output}]
    if missing:
        return warned(name, f"{len(missing)} of {len(produced)} tensors have no inferred type/shape: "
                            f"{summarize(missing)}", untyped=listing(missing))
    return passed(name, f"strict shape inference ok ({len(produced)} tensors)")


def has_per_channel_qdq(idx: GraphIndex) -> List[str]:
    """Q/DQ nodes whose scale has more than one element (per-channel or blocked)."""
    out = []
    for i, n in enumerate(idx.nodes):
        if n.op_type in QDQ_OPS and len(n.input) > 1:
            s = idx.const(n.input[1])
            if (s is not None and s.size > 1) or attr(n, "axis") is not None:
                out.append(idx.label(i))
    return out


def check_opset(model: onnx.ModelProto, idx: GraphIndex) -> CheckResult:
    """Default-domain opset within 11..21 (a newer one warns when onnxruntime runs it), and >= 13
    when per-channel Q/DQ is present."""
    name = "structure.opset"
    v = ir.opset(model)
    domains = {imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import}
    if v == 0:
        return failed(name, "model imports no ai.onnx opset", opsets=domains)
    if v < MIN_OPSET:
        return failed(name, f"opset {v} is outside the supported range {MIN_OPSET}..{MAX_OPSET}",
                      opsets=domains)
    if v > MAX_OPSET:
        if not runtime_loads_opset(v):
            return failed(name, f"opset {v} is newer than onnxruntime {ort_version()} runs", opsets=domains)
        return warned(name, f"opset {v} is newer than the range tested here ({MIN_OPSET}..{MAX_OPSET}); "
                            f"onnxruntime {ort_version()} runs it", opsets=domains)
    pc = has_per_channel_qdq(idx)
    if pc and v < PER_CHANNEL_OPSET:
        return failed(name, f"opset {v} has no per-channel QuantizeLinear/DequantizeLinear (needs "
                            f">= {PER_CHANNEL_OPSET}) but {len(pc)} Q/DQ nodes are per-channel: "
                            f"{summarize(pc)}",
                      opsets=domains, per_channel=listing(pc))
    return passed(name, f"opset {v}", opsets=domains)


def ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


@functools.lru_cache(maxsize=None)
def runtime_loads_opset(version: int) -> bool:
    """Whether the installed onnxruntime loads a one-node (Identity) model at ``version``."""
    from onnx import TensorProto, helper

    from ..pass_base import VerificationError
    from ..verify import session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    opsets = [helper.make_opsetid("", int(version))]
    probe = helper.make_model(graph, opset_imports=opsets, ir_version=ir.lowest_ir_version(opsets))
    try:
        session(probe, optimize=False)
    except VerificationError:
        return False
    return True


def _float64_tensors(model: onnx.ModelProto) -> List[str]:
    dbl = onnx.TensorProto.DOUBLE
    hits = [f"initializer {t.name}" for t in model.graph.initializer if t.data_type == dbl]
    for n in model.graph.node:
        if n.op_type == "Cast" and attr(n, "to") == dbl:
            hits.append(f"Cast {n.name or n.output[0]} to double")
        elif n.op_type == "Constant":
            hits += [f"Constant {n.output[0]}" for a in n.attribute
                     if a.name == "value" and a.t.data_type == dbl]
    try:
        vis = ir.inferred_values(model)
    except Exception:  # reported by the shape-inference check
        vis = list(model.graph.value_info)
    for vi in list(model.graph.input) + list(model.graph.output) + vis:
        if vi.type.tensor_type.elem_type == dbl:
            hits.append(f"tensor {vi.name}")
    return list(dict.fromkeys(hits))


def check_float64(model: onnx.ModelProto, target: str) -> CheckResult:
    """float64 tensors: slow on CPU, cast down (and clamped) by TensorRT; a warning either way."""
    name = "structure.float64"
    hits = _float64_tensors(model)
    if not hits:
        return passed(name, "no float64 tensors")
    how = "TensorRT casts them to float32" if target == "tensorrt" else "they run on slow double kernels"
    return warned(name, f"{len(hits)} float64 tensors ({how}): {summarize(hits)}", tensors=listing(hits))


def _dims(vi: onnx.ValueInfoProto) -> List[object]:
    if not vi.type.tensor_type.HasField("shape"):
        return ["?"]
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in vi.type.tensor_type.shape.dim]


def check_dynamic_dims(model: onnx.ModelProto) -> CheckResult:
    """Graph inputs/outputs with symbolic or unknown dims (TensorRT needs profiles for them)."""
    name = "structure.dynamic_dims"
    inits = {t.name for t in model.graph.initializer}
    io = [vi for vi in model.graph.input if vi.name not in inits] + list(model.graph.output)
    dyn = {vi.name: _dims(vi) for vi in io if any(not isinstance(d, int) or d <= 0 for d in _dims(vi))}
    shapes = {vi.name: _dims(vi) for vi in io}
    if dyn:
        return warned(name, "dynamic dims in " + ", ".join(f"{k} {v}" for k, v in list(dyn.items())[:3]),
                      dynamic=dyn, shapes=shapes)
    return passed(name, "all graph inputs and outputs have static shapes", shapes=shapes)


def _used_names(graph: onnx.GraphProto) -> Set[str]:
    used = {o.name for o in graph.output}
    for n in graph.node:
        used.update(n.input)
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                used |= _used_names(g)
    return used


def check_unused_initializers(model: onnx.ModelProto) -> CheckResult:
    name = "structure.unused_initializers"
    used = _used_names(model.graph)
    unused = [t.name for t in model.graph.initializer if t.name not in used]
    if unused:
        size = sum(t.ByteSize() for t in model.graph.initializer if t.name in set(unused))
        return warned(name, f"{len(unused)} initializers are never read ({size} bytes): {summarize(unused)}",
                      unused=listing(unused), bytes=size)
    return passed(name, f"all {len(model.graph.initializer)} initializers are used")


def _dupes(names: Iterable[str]) -> List[str]:
    return [k for k, c in Counter(n for n in names if n).items() if c > 1]


def check_duplicate_names(model: onnx.ModelProto) -> CheckResult:
    """Tensors defined twice fail (the graph is not SSA); repeated node names warn."""
    name = "structure.duplicate_names"
    g = model.graph
    outs = [o for n in g.node for o in n.output if o]
    tensor_dupes = _dupes(outs) + _dupes(t.name for t in g.initializer)
    defined_elsewhere = {t.name for t in g.initializer} | {vi.name for vi in g.input}
    tensor_dupes += [o for o in dict.fromkeys(outs) if o in defined_elsewhere]
    node_dupes = _dupes(n.name for n in g.node)
    details: Dict[str, object] = {"tensors": listing(tensor_dupes), "nodes": listing(node_dupes)}
    if tensor_dupes:
        return failed(name, f"{len(tensor_dupes)} tensor names are defined more than once: "
                            f"{summarize(tensor_dupes)}", **details)
    if node_dupes:
        return warned(name, f"{len(node_dupes)} node names are repeated: {summarize(node_dupes)}", **details)
    return passed(name, "tensor and node names are unique")


def check_dangling_inputs(idx: GraphIndex) -> CheckResult:
    """Node inputs and graph outputs that nothing produces."""
    name = "structure.dangling_inputs"
    known = set(idx.inputs) | set(idx.inits) | set(idx.producer)
    g = idx.model.graph
    known |= {vi.name for vi in g.input} | {t.values.name for t in g.sparse_initializer}
    dangling = [f"{idx.label(i)} input '{t}'" for i, n in enumerate(idx.nodes) for t in n.input
                if t and t not in known]
    dangling += [f"graph output '{o}'" for o in idx.outputs if o not in known]
    if dangling:
        return failed(name, f"{len(dangling)} tensors are read but never produced: {summarize(dangling)}",
                      dangling=listing(dangling))
    return passed(name, "every node input is produced")


#: (op, input index) where an infinite constant is a bound, not a weight: TF-style "same" max
#: pooling pads with -inf (Pad value), Clip and Max/Min bounds, masks added before a Softmax or
#: selected by Where, comparison thresholds. None: any input of that op.
INF_AS_BOUND = {"Pad": (2,), "Clip": (1, 2), "Where": (1, 2), "Max": None, "Min": None, "Add": None,
                "Sub": None, "Less": None, "LessOrEqual": None, "Greater": None, "GreaterOrEqual": None,
                "Equal": None}


def _inf_as_bound(idx: GraphIndex, t: str) -> bool:
    """Whether every reader of ``t`` takes it where an infinite value has a meaning."""
    readers = [idx.nodes[i] for i in idx.consumer_nodes(t)]
    for node in readers:
        if node.op_type not in INF_AS_BOUND:
            return False
        where = INF_AS_BOUND[node.op_type]
        if where is not None and not any(k < len(node.input) and node.input[k] == t for k in where):
            return False
    return bool(readers)


def check_weights_finite(idx: GraphIndex) -> CheckResult:
    """NaN in float constants (initializers and Constant nodes), and +-Inf unless every reader
    takes it as a bound (``INF_AS_BOUND``): a Pad value of -inf before a MaxPool is how
    TensorFlow-style "same" pooling exports."""
    name = "structure.weights_finite"
    names = list(idx.inits) + [o for n in idx.nodes if n.op_type == "Constant" for o in n.output]
    bad: Dict[str, int] = {}
    bounds = 0
    for t in names:
        v = idx.const(t)
        if v is None or not np.issubdtype(v.dtype, np.floating):
            continue
        n_nan, n_inf = int(np.count_nonzero(np.isnan(v))), int(np.count_nonzero(np.isinf(v)))
        if n_inf and not n_nan and _inf_as_bound(idx, t):
            bounds += 1
        elif n_nan + n_inf:
            bad[t] = n_nan + n_inf
    if bad:
        return failed(name, f"{len(bad)} constant tensors hold NaN/Inf: "
                            f"{summarize([f'{k} ({v} values)' for k, v in bad.items()])}",
                      tensors=dict(list(bad.items())[:20]))
    if bounds:
        return passed(name, f"{len(names) - bounds} constant tensors are finite; {bounds} hold infinite "
                            "bounds (a Pad value, Clip/Max/Min bound or mask), which is allowed")
    return passed(name, f"{len(names)} constant tensors are finite")
