"""INT8 paths onnxruntime's CPU provider will not fuse: a float op between DequantizeLinear and
QuantizeLinear pays for the conversions and gains nothing.

Which groups fuse comes from onnxruntime itself: the model is optimized at the EXTENDED level
(where the QDQ fusions run) and the optimized graph is read back. The reason given for each
unfused node comes from onnxruntime's QDQ selector rules (onnxruntime/core/optimizer/
qdq_transformer/selectors_actions): QLinear kernels exist for Conv, MatMul, Gemm, Add, Mul,
Concat, Where, Sigmoid, LeakyRelu, Softmax, AveragePool, GlobalAveragePool; Q/DQ are dropped
around data-movement ops. Conv/MatMul with int8 (S8) activations fuse only on ARM builds (or with
the session option ``session.qdqisint8allowed``); on x86 onnxruntime first rewrites an int8 Q->DQ
pair to uint8, but only when the Q has a single consumer after it gives every consumer its own DQ,
so an S8 Conv whose output feeds SiLU (Sigmoid and Mul) stays float. Verified with onnxruntime 1.32
(tests/check/test_qdq.py) and its source (qdq_selectors.cc, qdq_s8_to_u8.cc).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Union

import onnx

from .. import verify
from ..pass_base import first_line
from ..quant.targets import resize_runs_int8
from .index import QDQ_OPS, GraphIndex
from .qdq_lint import T, _type_name, qdq_nodes, qtype
from .result import CheckResult, listing, passed, skipped, summarize, warned

log = logging.getLogger(__name__)

QLINEAR = frozenset({"Conv", "MatMul", "Gemm", "Add", "Mul", "Concat", "Where", "Sigmoid", "LeakyRelu",
                     "Softmax", "AveragePool", "GlobalAveragePool"})
DROPPED = frozenset({"Expand", "Flatten", "Gather", "GatherElements", "Reshape", "Slice", "Squeeze", "Tile",
                     "Transpose", "Unsqueeze", "Resize", "MaxPool", "ReduceMax", "ReduceMin", "Split",
                     "ArgMax"})
S8_NEEDS_ARM = frozenset({"Conv", "MatMul"})
FLOAT_DOMAINS = ("", "ai.onnx", "com.microsoft")
MATMUL_LIKE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul"})


def _has_int8_path(node: onnx.NodeProto) -> bool:
    """onnxruntime has a QLinear kernel for the op or drops the Q/DQ around it; for a Resize only
    in the modes :func:`..quant.targets.resize_runs_int8` names."""
    if node.op_type == "Resize":
        return resize_runs_int8(next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest"))
    return node.op_type in QLINEAR | DROPPED


def _act_dq_inputs(idx: GraphIndex, i: int) -> List[int]:
    """DequantizeLinear producers of a node's non-constant inputs."""
    out = []
    for t in idx.nodes[i].input:
        p = idx.producer.get(t)
        dq = idx.nodes[p] if p is not None else None
        if dq is not None and dq.op_type == "DequantizeLinear" and not idx.is_const(dq.input[0]):
            out.append(p)
    return out


def _q_consumers(idx: GraphIndex, i: int) -> List[int]:
    return [c for o in idx.nodes[i].output for c in idx.consumer_nodes(o)
            if idx.nodes[c].op_type == "QuantizeLinear"]


def _dq_weights(idx: GraphIndex, i: int) -> bool:
    """Whether a Conv-like op reads a dequantized constant (weight or bias)."""
    for t in idx.nodes[i].input[1:]:
        p = idx.producer.get(t) if t else None
        dq = idx.nodes[p] if p is not None else None
        if dq is not None and dq.op_type == "DequantizeLinear" and idx.is_const(dq.input[0]):
            return True
    return False


def _shared_dq(idx: GraphIndex, dq: int, reader: int) -> bool:
    """Whether a DequantizeLinear's quantized tensor is also read by a node other than ``reader``."""
    q_out = idx.nodes[dq].input[0]
    others = [c for c in idx.consumer_nodes(idx.nodes[dq].output[0]) if c != reader]
    return bool(others) or len(idx.consumer_nodes(q_out)) > 1


def _from_int8_kernel(idx: GraphIndex, dq: int, depth: int = 8) -> bool:
    """Whether a DequantizeLinear reads a tensor an INT8 kernel wrote (a QLinear op's output in
    onnxruntime's optimized graph), or one quantized for other readers too, perhaps moved by
    Transposes, Reshapes ... on the quantized data; not one quantized from a float op for it."""
    tensor = idx.nodes[dq].input[0]
    for _ in range(depth):
        p = idx.producer.get(tensor)
        if p is None:
            return False
        n = idx.nodes[p]
        if n.op_type.startswith("QLinear") or (n.op_type == "QuantizeLinear"
                                               and len(idx.consumer_nodes(n.output[0])) > 1):
            return True
        if n.op_type not in DROPPED or not n.input:
            return False
        tensor = n.input[0]
    return False


def _read_as_int8(idx: GraphIndex, quantized: str) -> bool:
    """Whether a quantized tensor has a reader other than a DequantizeLinear (in onnxruntime's
    optimized graph, a fused QLinear op)."""
    return any(idx.nodes[c].op_type != "DequantizeLinear" for c in idx.consumer_nodes(quantized))


def _float_const_operands(idx: GraphIndex, i: int) -> List[str]:
    """Float constants a node reads directly, not through a DequantizeLinear (a Linear's bias in
    the Add after its MatMul)."""
    out = []
    for t in idx.nodes[i].input:
        c = idx.const(t) if t and idx.is_const(t) else None
        if c is not None and c.dtype.kind == "f":
            out.append(t)
    return out


def _serves_neighbours(idx: GraphIndex, i: int, dqs: List[int]) -> bool:
    """A QLinear-capable op with a float data input whose every dequantized input and every Q it
    feeds is read in INT8 by other nodes: those conversions are paid for its neighbours, and
    running it INT8 would take one more Q (on the float input). ResNet's residual Add after a last
    bottleneck Conv kept float is one."""
    n = idx.nodes[i]
    floats = [t for t in n.input if t and not idx.is_const(t) and idx.producer_op(t) != "DequantizeLinear"]
    return bool(floats) and all(_read_as_int8(idx, idx.nodes[d].input[0]) for d in dqs) \
        and all(_read_as_int8(idx, idx.nodes[q].output[0]) for q in _q_consumers(idx, i))


def _float_origin(idx: GraphIndex, tensor: str, depth: int = 8) -> Optional[str]:
    """The op a float tensor comes from, followed back through single-input ops that have an INT8
    path but read a float tensor themselves (so would need a Q of their own): YOLO-World's gate
    Unsqueeze(Sigmoid(Div(...))) comes from the Div. None for a graph input."""
    for _ in range(depth):
        p = idx.producer.get(tensor)
        if p is None:
            return None
        n = idx.nodes[p]
        data = [t for t in n.input if t and not idx.is_const(t)]
        if n.op_type not in QLINEAR | DROPPED or len(data) != 1 \
                or idx.producer_op(data[0]) in (None, "DequantizeLinear"):
            return n.op_type
        tensor = data[0]
    return idx.producer_op(tensor)


def _float_from_kernel_less(idx: GraphIndex, i: int) -> bool:
    """A QLinear-capable op whose every float data input comes from an op with no quantized kernel,
    directly (Mish's Mul reads DQ(x) and Tanh(Softplus(DQ(x)))) or through ops that would each need
    a Q of their own (:func:`_float_origin`): to run INT8 it needs a Q on each such input, one
    conversion for the DQ it saves, so the float op loses nothing."""
    floats = [t for t in idx.nodes[i].input
              if t and not idx.is_const(t) and idx.producer_op(t) != "DequantizeLinear"]
    ops = [_float_origin(idx, t) for t in floats]
    return bool(ops) and all(op is not None and op not in QLINEAR | DROPPED | QDQ_OPS for op in ops)


def _between_int8(idx: GraphIndex, i: int, dqs: List[int]) -> bool:
    """An op with no quantized kernel between INT8 kernels: each dequantized input is written by
    an INT8 kernel (or quantized for another reader too) and each Q it feeds is read in INT8. It
    has to run in float, and its conversions are those of its INT8 neighbours: RT-DETR's residual
    Add and LayerNorm, fused into a float SkipLayerNormalization between two QLinearMatMuls."""
    return all(_from_int8_kernel(idx, d) or _shared_dq(idx, d, i) for d in dqs) \
        and all(_read_as_int8(idx, idx.nodes[q].output[0]) for q in _q_consumers(idx, i))


def unfused_groups(idx: GraphIndex) -> List[int]:
    """Float ops that read a dequantized activation and are requantized, or Conv-like ops that
    read one with dequantized weights (dequantized for nothing). Left out, since they lose
    nothing: a float Conv with float weights that reads a tensor quantized for another reader;
    an op with no quantized kernel at all (ConvTranspose, say) whose dequantized inputs all are
    quantized for other readers too (onnxruntime itself dequantizes such an op's weights, in its
    WeightBiasQuantization step, though it has no kernel to fuse them into), or that sits between
    INT8 kernels (:func:`_between_int8`); an op that
    :func:`_serves_neighbours`; and one whose float inputs come from ops with no quantized
    kernel (:func:`_float_from_kernel_less`)."""
    out = []
    for i, n in enumerate(idx.nodes):
        if n.op_type in QDQ_OPS or n.op_type.startswith("QLinear") or n.domain not in FLOAT_DOMAINS:
            continue
        dqs = _act_dq_inputs(idx, i)
        if not dqs or not (_q_consumers(idx, i) or (n.op_type in MATMUL_LIKE and _dq_weights(idx, i))):
            continue
        if not _has_int8_path(n) and (all(_shared_dq(idx, d, i) for d in dqs) or _between_int8(idx, i, dqs)):
            continue
        if n.op_type in QLINEAR and n.op_type not in MATMUL_LIKE and (
                _serves_neighbours(idx, i, dqs) or _float_from_kernel_less(idx, i)):
            continue
        out.append(i)
    return out


def reason(idx: GraphIndex, i: int) -> str:
    """Why onnxruntime's rules leave this group unfused (best explanation from the rules)."""
    n = idx.nodes[i]
    dqs, qs = _act_dq_inputs(idx, i), _q_consumers(idx, i)
    types = {qtype(idx, j) for j in dqs + qs}
    if not _has_int8_path(n):
        what = "an interpolating Resize" if n.op_type == "Resize" else n.op_type
        return f"no quantized kernel for {what} in onnxruntime CPU"
    if T.INT16 in types or T.UINT16 in types:
        return "16-bit Q/DQ (no 16-bit QLinear kernels)"
    if n.op_type in S8_NEEDS_ARM and T.INT8 in {qtype(idx, j) for j in dqs}:
        return ("int8 (S8) activations: onnxruntime on x86 fuses Conv/MatMul only with uint8 activations and "
                "turns an int8 Q/DQ pair into uint8 only when the dequantized tensor has one consumer")
    if len(types) > 1:
        return "mixed quantized types " + "/".join(sorted(_type_name(t) for t in types))
    floats = [t for t in n.input if t and not idx.is_const(t) and idx.producer_op(t) != "DequantizeLinear"]
    if floats and n.op_type in QLINEAR:
        src = idx.producer_op(floats[0]) or "a graph input"
        return f"input '{floats[0]}' is float (from {src}), not dequantized"
    consts = _float_const_operands(idx, i)
    if consts and n.op_type in QLINEAR and n.op_type not in MATMUL_LIKE:
        return f"constant input '{consts[0]}' is float, not dequantized"
    outs = [c for o in n.output for c in idx.consumer_nodes(o)]
    if not qs or len(qs) != len(outs) or any(o in idx.outputs for o in n.output):
        return "output is not requantized by QuantizeLinear alone"
    if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 \
            and idx.producer_op(n.input[1]) != "DequantizeLinear":
        return "weights are not quantized"
    return "onnxruntime did not fuse this DQ -> op -> Q group (parameters or shapes)"


def ort_optimized(model: onnx.ModelProto) -> Union[onnx.ModelProto, str]:
    """The model as onnxruntime's CPU provider rewrites it at the EXTENDED level, else why not."""
    try:
        return verify.optimized_model(model, optimize="extended")
    except Exception as exc:  # reported by the runtime check
        log.info("onnxruntime could not optimize the model: %s", exc)
        return first_line(exc)


def quantized_by_runtime(idx: GraphIndex, opt: onnx.ModelProto) -> List[str]:
    """Weight layers with float weights in the model that onnxruntime runs as QLinear ops: it
    quantizes the weights of a float Conv / Gemm between DQ and Q itself (WeightBiasQuantization,
    onnxruntime 1.20 on, per tensor), which undoes an exclusion and costs accuracy."""
    float_layers = {n.name for n in idx.nodes if n.name and n.op_type in ("Conv", "ConvTranspose", "Gemm")
                    and len(n.input) > 1 and idx.is_const(n.input[1])}  # a DQ output is not a constant
    return sorted(n.name for n in opt.graph.node if n.name in float_layers
                  and (n.op_type.startswith("QLinear") or n.op_type in ("QGemm", "ConvInteger")))


def check_ort_fusion(idx: GraphIndex, target: str) -> CheckResult:
    """Warn about DQ -> op -> Q groups onnxruntime leaves in float (slower than plain FP32), and
    about float weight layers it quantizes itself (:func:`quantized_by_runtime`)."""
    name = "qdq.ort_fusion"
    if target != "ort-cpu":
        return skipped(name, f"onnxruntime fusion rules do not apply to {target}")
    if not qdq_nodes(idx):
        return skipped(name, "no QuantizeLinear/DequantizeLinear nodes")
    opt = ort_optimized(idx.model)
    if isinstance(opt, str):   # what it would fuse is moot: the model does not load (runtime.runs says why)
        return skipped(name, f"onnxruntime cannot load the model: {opt}")
    by_name: Dict[str, int] = {n.name: i for i, n in enumerate(idx.nodes) if n.name}
    oidx = GraphIndex(opt)
    names, source = [oidx.label(i) for i in unfused_groups(oidx)], "onnxruntime optimized graph"
    requantized = quantized_by_runtime(idx, opt)
    found = [f"{nm}: {reason(idx, by_name[nm]) if nm in by_name else 'left in float by onnxruntime'}"
             for nm in names]
    quantized = sum(1 for i, n in enumerate(idx.nodes) if n.op_type not in QDQ_OPS and _act_dq_inputs(idx, i))
    details = {"unfused": listing(found, 60), "count": len(found), "source": source,
               "quantized_by_onnxruntime": listing(requantized, 60)}
    parts = []
    if found:
        parts.append(f"{len(found)} INT8 groups run in float between DQ and Q on onnxruntime CPU: "
                     f"{summarize(found, 1)}")
    if requantized:
        parts.append(f"onnxruntime quantizes {len(requantized)} float weight layer(s) itself, with "
                     f"per-tensor weights, between their DQ input and Q output: {summarize(requantized, 1)}")
    if parts:
        return warned(name, "; ".join(parts), **details)
    return passed(name, f"onnxruntime fuses every quantized group ({quantized} ops read dequantized inputs)",
                  **details)
