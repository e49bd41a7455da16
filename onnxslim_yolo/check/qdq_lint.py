"""QDQ lint: Q/DQ pairing, scales, zero points, per-channel axes, target rules, decode tail.

ONNX QuantizeLinear ``q = saturate(round(x / scale) + zero_point)``: a scale must be finite and
> 0, a zero point must be representable in the quantized type. TensorRT reads only symmetric
INT8 (zero point 0, type int8). Quantizing the YOLO decode tail (grid/anchor arithmetic on pixel
coordinates next to 0..1 scores) puts both ranges under one scale and destroys accuracy.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import onnx

from .index import QDQ_OPS, GraphIndex, attr
from .result import CheckResult, failed, listing, passed, skipped, summarize

T = onnx.TensorProto
#: TensorProto.INT4 and UINT4 by value: onnx names them from 1.16 on (the files store data_type as an int)
INT4, UINT4 = 22, 21
QRANGE = {T.INT8: (-128, 127), T.UINT8: (0, 255), T.INT16: (-32768, 32767), T.UINT16: (0, 65535),
          T.INT32: (-2 ** 31, 2 ** 31 - 1), INT4: (-8, 7), UINT4: (0, 15)}
_INT32_STORED = (T.INT8, T.UINT8, T.INT16, T.UINT16, INT4, UINT4)
#: quantized-operator consumers a Q may feed instead of a DQ (QOperator format)
Q_CONSUMERS = frozenset({"DequantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul",
                         "QLinearSigmoid", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
                         "QLinearLeakyRelu", "QLinearSoftmax", "QGemm", "ConvInteger", "MatMulInteger"})
WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}


def qdq_nodes(idx: GraphIndex) -> List[int]:
    return [i for i, n in enumerate(idx.nodes) if n.op_type in QDQ_OPS]


def qtype(idx: GraphIndex, i: int) -> Optional[int]:
    """The integer type a Q produces / a DQ reads (TensorProto enum), when it can be told."""
    n = idx.nodes[i]
    if len(n.input) > 2 and n.input[2]:
        zp = idx.const_proto(n.input[2])
        if zp is not None:
            return int(zp.data_type)
    if n.op_type == "QuantizeLinear":
        return int(attr(n, "output_dtype", 0) or T.UINT8)
    x = idx.const_proto(n.input[0])
    if x is not None:
        return int(x.data_type)
    p = idx.producer.get(n.input[0])
    return qtype(idx, p) if p is not None and idx.nodes[p].op_type == "QuantizeLinear" else None


def _type_name(t: Optional[int]) -> str:
    if t is None:
        return "unknown"
    try:
        return T.DataType.Name(t).lower()
    except ValueError:  # a type this onnx does not name yet (INT4 before 1.16, ...)
        return {INT4: "int4", UINT4: "uint4"}.get(t, f"data type {t}")


def _skip_if_none(name: str, idx: GraphIndex) -> Optional[CheckResult]:
    return None if qdq_nodes(idx) else skipped(name, "no QuantizeLinear/DequantizeLinear nodes")


def _params(idx: GraphIndex, i: int) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    n = idx.nodes[i]
    s = idx.const(n.input[1]) if len(n.input) > 1 else None
    z = idx.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    return s, z


def check_pairs(idx: GraphIndex) -> CheckResult:
    """Every QuantizeLinear feeds DequantizeLinear (same scale and zero point) and no graph output."""
    name = "qdq.pairs"
    if (r := _skip_if_none(name, idx)) is not None:
        return r
    bad: List[str] = []
    outputs = set(idx.outputs)
    for i in qdq_nodes(idx):
        n = idx.nodes[i]
        if n.op_type != "QuantizeLinear":
            continue
        cons = idx.consumer_nodes(n.output[0])
        others = sorted({idx.nodes[c].op_type for c in cons} - Q_CONSUMERS)
        if not cons or n.output[0] in outputs:
            bad.append(f"{idx.label(i)}: Q output is not dequantized"
                       + (" (it is a graph output)" if n.output[0] in outputs else ""))
        elif others:
            bad.append(f"{idx.label(i)}: Q feeds {', '.join(others)} instead of DequantizeLinear")
        for c in cons:
            if idx.nodes[c].op_type == "DequantizeLinear" and not _same_params(idx, i, c):
                bad.append(f"{idx.label(i)} -> {idx.label(c)}: scale/zero point differ between Q and DQ")
    if bad:
        return failed(name, f"{len(bad)} Q/DQ pairing errors: {summarize(bad, 2)}", errors=listing(bad))
    nq = sum(1 for i in qdq_nodes(idx) if idx.nodes[i].op_type == "QuantizeLinear")
    return passed(name, f"{nq} QuantizeLinear nodes, each dequantized with the same parameters")


def _same_params(idx: GraphIndex, q: int, dq: int) -> bool:
    (qs, qz), (ds, dz) = _params(idx, q), _params(idx, dq)
    qn, dn = idx.nodes[q], idx.nodes[dq]
    if list(qn.input[1:]) == list(dn.input[1:]):
        return True
    if qs is None or ds is None:
        return True  # runtime-computed scales: nothing to compare
    same_s = qs.shape == ds.shape and np.array_equal(qs, ds)
    zq = np.zeros_like(qs, dtype=np.int64) if qz is None else qz.astype(np.int64)
    zd = np.zeros_like(ds, dtype=np.int64) if dz is None else dz.astype(np.int64)
    return same_s and zq.shape == zd.shape and np.array_equal(zq, zd)


def check_scales(idx: GraphIndex) -> CheckResult:
    """Scales are constants, finite and > 0."""
    name = "qdq.scales"
    if (r := _skip_if_none(name, idx)) is not None:
        return r
    bad: List[str] = []
    dynamic: List[str] = []
    for i in qdq_nodes(idx):
        s, _ = _params(idx, i)
        if s is None:
            dynamic.append(idx.label(i))
            continue
        sf = s.astype(np.float64)
        n_nan, n_nonpos = int(np.sum(~np.isfinite(sf))), int(np.sum(np.isfinite(sf) & (sf <= 0)))
        if n_nan or n_nonpos:
            worst = sf[~np.isfinite(sf) | (sf <= 0)].ravel()[0]
            bad.append(f"{idx.label(i)}: scale {worst:g} ({n_nan} non-finite, {n_nonpos} <= 0 of {s.size})")
    if bad:
        return failed(name, f"{len(bad)} Q/DQ nodes have invalid scales: {summarize(bad, 2)}",
                      invalid=listing(bad))
    if dynamic:
        return CheckResult(name, "warn", f"{len(dynamic)} Q/DQ scales are computed at run time: "
                                         f"{summarize(dynamic)}", {"dynamic": listing(dynamic)})
    return passed(name, f"{len(qdq_nodes(idx))} Q/DQ scales are finite and positive")


def _stored_ints(proto: onnx.TensorProto) -> Optional[np.ndarray]:
    """Raw stored integers of a small-int tensor kept in ``int32_data`` (values may be out of range)."""
    if proto.data_type in _INT32_STORED and not proto.HasField("raw_data") and len(proto.int32_data):
        return np.asarray(proto.int32_data, np.int64)
    return None


def check_zero_points(idx: GraphIndex) -> CheckResult:
    """Zero points are constants of an integer type, inside that type's range, one per scale."""
    name = "qdq.zero_points"
    if (r := _skip_if_none(name, idx)) is not None:
        return r
    bad: List[str] = []
    for i in qdq_nodes(idx):
        n = idx.nodes[i]
        if len(n.input) < 3 or not n.input[2]:
            continue
        proto, (s, z) = idx.const_proto(n.input[2]), _params(idx, i)
        if proto is None or z is None:
            bad.append(f"{idx.label(i)}: zero point '{n.input[2]}' is not a constant")
            continue
        lo, hi = QRANGE.get(proto.data_type, (None, None))
        if lo is None:
            bad.append(f"{idx.label(i)}: zero point type {_type_name(proto.data_type)} is not an integer")
            continue
        raw = _stored_ints(proto)
        vals = raw if raw is not None else z.astype(np.int64)
        out = vals[(vals < lo) | (vals > hi)]
        if out.size:
            bad.append(f"{idx.label(i)}: zero point {int(out[0])} outside {_type_name(proto.data_type)} "
                       f"range [{lo}, {hi}]")
        elif s is not None and z.size != s.size:
            bad.append(f"{idx.label(i)}: {z.size} zero points for {s.size} scales")
    if bad:
        return failed(name, f"{len(bad)} invalid zero points: {summarize(bad, 2)}", invalid=listing(bad))
    return passed(name, "zero points are constants within their type's range")
