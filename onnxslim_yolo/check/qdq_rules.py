"""QDQ rules that depend on the consumer or the target: per-channel weight axes, TensorRT's
symmetric INT8, and no quantization in the YOLO decode tail."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from .index import GraphIndex, attr
from .qdq_lint import WEIGHT_AXIS, T, _params, _skip_if_none, _type_name, qdq_nodes, qtype
from .result import CheckResult, failed, listing, passed, skipped, summarize, warned
from .tail import decode_tail


def _weight_dq(idx: GraphIndex, conv: int) -> Optional[Tuple[int, Tuple[int, ...]]]:
    """(DQ node, weight shape) when a Conv's weight is a DequantizeLinear of a constant."""
    n = idx.nodes[conv]
    p = idx.producer.get(n.input[1]) if len(n.input) > 1 else None
    if p is None or idx.nodes[p].op_type != "DequantizeLinear":
        return None
    src = idx.nodes[p].input[0]
    q = idx.producer.get(src)
    if q is not None and idx.nodes[q].op_type == "QuantizeLinear":  # float weights quantized in-graph
        src = idx.nodes[q].input[0]
    w = idx.const(src)
    return (p, tuple(w.shape)) if w is not None else None


def _axis_error(idx: GraphIndex, conv: int) -> Optional[str]:
    found = _weight_dq(idx, conv)
    if found is None:
        return None
    dq, wshape = found
    s, _ = _params(idx, dq)
    if s is None or s.size <= 1:
        return None
    op = idx.nodes[conv].op_type
    axis = int(attr(idx.nodes[dq], "axis", 1))
    axis = axis + len(wshape) if axis < 0 else axis
    want = WEIGHT_AXIS[op]
    if axis != want:
        return (f"{idx.label(dq)} (weights of {op} {idx.label(conv)}): per-channel axis {axis}, "
                f"expected {want} (output channels)")
    if s.ndim != 1 or s.size != wshape[want]:
        return (f"{idx.label(dq)} (weights of {op} {idx.label(conv)}): scale has {s.size} values for "
                f"{wshape[want]} output channels")
    return None


def check_per_channel(idx: GraphIndex) -> CheckResult:
    """Per-channel Conv weights are quantized along output channels, one scale per channel."""
    name = "qdq.per_channel"
    if (r := _skip_if_none(name, idx)) is not None:
        return r
    convs = [i for i, n in enumerate(idx.nodes) if n.op_type in WEIGHT_AXIS]
    quantized = [i for i in convs if _weight_dq(idx, i) is not None]
    qlinear = sum(n.op_type in ("QLinearConv", "QLinearMatMul", "ConvInteger") for n in idx.nodes)
    if not quantized and qlinear:   # "0 quantized Conv weights" read as if none were quantized
        return skipped(name, f"{qlinear} weight layers in QOperator form (QLinearConv, ...): their weight "
                             "scales are not read here")
    bad = [e for e in (_axis_error(idx, i) for i in quantized) if e]
    if bad:
        return failed(name, f"{len(bad)} wrong per-channel weight quantizations: {summarize(bad, 1)}",
                      invalid=listing(bad))
    scales = [_params(idx, _weight_dq(idx, i)[0])[0] for i in quantized]
    per_channel = sum(1 for s in scales if s is not None and s.size > 1)
    return passed(name, f"{len(quantized)} quantized Conv weights ({per_channel} per-channel) have the "
                        "right axis and scale length", quantized=len(quantized), per_channel=per_channel)


def _types(idx: GraphIndex) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for i in qdq_nodes(idx):
        key = _type_name(qtype(idx, i))
        out[key] = out.get(key, 0) + 1
    return out


def check_target_rules(idx: GraphIndex, target: str) -> CheckResult:
    """TensorRT: every Q/DQ is int8 with zero point 0 (symmetric). onnxruntime accepts any."""
    name = "qdq.target"
    if (r := _skip_if_none(name, idx)) is not None:
        return r
    types = _types(idx)
    if target != "tensorrt":
        text = f"{target} accepts these Q/DQ types: " + ", ".join(f"{k} x{v}" for k, v in types.items())
        wide = _wide_u8s8(idx)
        if not wide:
            return passed(name, text, types=types)
        from ..quant.targets import x86_int8_saturates

        here = x86_int8_saturates()
        said = (f"{len(wide)} layers multiply uint8 activations by int8 weights beyond 7 bits "
                f"({summarize(wide, 2)}): x86 kernels without VNNI sum those products in 16 bits and "
                "saturate; quantize the weights to 7 bits (reduce_range) for such CPUs")
        if here:   # this CPU is one: the numbers the other checks measure are the saturated ones
            return warned(name, f"{said}. This CPU has no VNNI; {text}", types=types,
                          saturating=listing(wide))
        return passed(name, f"{text}; {said} (this CPU {'has VNNI' if here is False else 'is not known'})",
                      types=types, saturating=listing(wide))
    bad: List[str] = []
    for i in qdq_nodes(idx):
        t = qtype(idx, i)
        if t == T.INT32:
            bad.append(f"{idx.label(i)}: int32 DequantizeLinear (TensorRT reads int8 only; "
                       "keep biases float)")
            continue
        if t != T.INT8:
            bad.append(f"{idx.label(i)}: type {_type_name(t)} (TensorRT needs int8)")
            continue
        _, z = _params(idx, i)
        if z is not None and np.any(z != 0):
            bad.append(f"{idx.label(i)}: zero point {int(z.ravel()[np.argmax(z.ravel() != 0)])} "
                       "(TensorRT needs symmetric quantization, zero point 0)")
    if bad:
        return failed(name, f"{len(bad)} Q/DQ nodes break TensorRT's INT8 rules: {summarize(bad, 2)}",
                      invalid=listing(bad), types=types)
    return passed(name, "all Q/DQ are symmetric int8 (zero point 0)", types=types)


def _wide_u8s8(idx: GraphIndex) -> List[str]:
    """The Conv, MatMul and Gemm nodes fed a uint8 activation and an int8 weight outside 7 bits
    (|w| <= 64, so that 255 x 64 x 2 fits 16 bits): onnxruntime's u8 x s8 kernels on x86 without
    VNNI saturate their pair sums past it (yolov5n quantized by onnxruntime's tool with full-range
    weights lost 8.9 mAP points on such a CPU, 1.1 with 7-bit ones)."""
    out: List[str] = []
    for i, n in enumerate(idx.nodes):
        if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2:
            continue
        act, wgt = (idx.producer.get(t) for t in n.input[:2])
        if act is None or wgt is None or idx.nodes[act].op_type != "DequantizeLinear" \
                or idx.nodes[wgt].op_type != "DequantizeLinear":
            continue
        if qtype(idx, act) != T.UINT8 or qtype(idx, wgt) != T.INT8:
            continue
        w = idx.const(idx.nodes[wgt].input[0])
        if w is not None and w.size and int(np.abs(w.astype(np.int32)).max()) > 64:
            out.append(idx.label(i))
    return out


def check_decode_tail(idx: GraphIndex) -> CheckResult:
    """No QuantizeLinear on a tensor computed in the decode tail, no quantized constant read by it."""
    name = "qdq.decode_tail"
    if (r := _skip_if_none(name, idx)) is not None:
        return r
    tail, source = decode_tail(idx)
    if not tail:
        return skipped(name, "no decode tail found (the outputs are the last Convs' own, or no Conv feeds "
                             "them)", source=source)
    bad: List[str] = []
    for i in qdq_nodes(idx):
        n = idx.nodes[i]
        p = idx.producer.get(n.input[0])
        if n.op_type == "QuantizeLinear" and p in tail:
            bad.append(f"{idx.label(i)} quantizes {idx.label(p)}")
        elif n.op_type == "DequantizeLinear" and idx.is_const(n.input[0]):
            readers = [c for c in idx.consumer_nodes(n.output[0]) if c in tail]
            if readers:
                bad.append(f"{idx.label(i)} feeds quantized constant to {idx.label(readers[0])}")
    details = {"tail_nodes": len(tail), "source": source, "quantized": listing(bad)}
    if bad:
        return failed(name, f"decode tail is quantized ({len(bad)} Q/DQ): {summarize(bad, 2)}; keep the "
                            "nodes after the last Conv in float", **details)
    return passed(name, f"decode tail ({len(tail)} nodes) is float", **details)
