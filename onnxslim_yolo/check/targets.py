"""What each deployment target accepts: op domains, deprecated and unsupported ops.

``ort-cpu``: onnxruntime's CPU provider runs the ai.onnx, ai.onnx.ml and com.microsoft domains;
other domains need a custom-op library. ``openvino``: OpenVINO's ONNX frontend reads ai.onnx;
whether it imports every op is found by loading the model in it (``runtime.openvino``).
``tensorrt``: the onnx-tensorrt parser (TensorRT 8.6-10) reads only ai.onnx, wants INT8 as
QuantizeLinear/DequantizeLinear pairs (no QOperator ops such as QLinearConv) and Conv/ConvTranspose
weights that are constants.
"""
from __future__ import annotations

from typing import Dict, List

import onnx

from .. import ir
from ..quant.targets import TARGETS as QUANT_TARGETS
from ..verify import ORT_DOMAINS
from .index import GraphIndex
from .result import CheckResult, failed, listing, passed, summarize, warned

#: the deployment targets: those insert-qdq places Q/DQ for
TARGETS = tuple(QUANT_TARGETS)
TRT_DOMAINS = frozenset({"", "ai.onnx"})
#: op -> replacement (deprecated in the ai.onnx domain)
DEPRECATED = {"Upsample": "Resize", "Scatter": "ScatterElements", "ImageScaler": "Mul + Add",
              "Crop": "Slice", "ScaledTanh": "Mul + Tanh", "ParametricSoftplus": "Softplus + Mul"}
#: ai.onnx ops the onnx-tensorrt parser does not import
TRT_UNSUPPORTED = frozenset({
    "BitShift", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear",
    "ConcatFromSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SplitToSequence", "StringNormalizer", "TfIdfVectorizer", "Unique",
    "MaxRoiPool", "Multinomial", "RandomNormal", "RandomNormalLike", "SoftmaxCrossEntropyLoss",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement"})


def _unsupported(idx: GraphIndex, target: str) -> List[str]:
    domains = ORT_DOMAINS if target == "ort-cpu" else TRT_DOMAINS
    out: List[str] = []
    for i, n in enumerate(idx.nodes):
        if n.domain not in domains:
            out.append(f"{idx.label(i)} ({n.domain}.{n.op_type}: domain not supported by {target})")
        elif target == "tensorrt" and n.op_type in TRT_UNSUPPORTED:
            out.append(f"{idx.label(i)} ({n.op_type} not supported by the TensorRT ONNX parser)")
        elif target == "tensorrt" and n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 \
                and not _const_or_dq_const(idx, n.input[1]):
            out.append(f"{idx.label(i)} ({n.op_type} weights are not constant; TensorRT needs them to be)")
        for s in ir.subgraph_nodes(n):  # an If branch may hold a plugin too
            if s.domain not in domains:
                out.append(f"{ir.node_label(s)} in a subgraph of {idx.label(i)} ({s.domain}.{s.op_type}: "
                           f"domain not supported by {target})")
    return out


def _const_or_dq_const(idx: GraphIndex, tensor: str) -> bool:
    if idx.is_const(tensor):
        return True
    p = idx.producer.get(tensor)
    dq = idx.nodes[p] if p is not None else None
    return dq is not None and dq.op_type == "DequantizeLinear" and idx.is_const(dq.input[0])


def check_ops(model: onnx.ModelProto, idx: GraphIndex, target: str) -> CheckResult:
    """Ops the target cannot run fail; deprecated ops warn."""
    name = "structure.ops"
    bad = _unsupported(idx, target)
    deprecated = [f"{idx.label(i)} ({n.op_type}: use {DEPRECATED[n.op_type]})"
                  for i, n in enumerate(idx.nodes) if n.domain in ("", "ai.onnx") and n.op_type in DEPRECATED]
    counts: Dict[str, int] = {}
    for n in idx.nodes:
        key = f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    details = {"unsupported": listing(bad), "deprecated": listing(deprecated), "op_counts": counts}
    if bad:
        return failed(name, f"{len(bad)} nodes cannot run on {target}: {summarize(bad, 2)}", **details)
    if deprecated:
        return warned(name, f"{len(deprecated)} deprecated ops: {summarize(deprecated, 2)}", **details)
    return passed(name, f"{len(counts)} op types, all supported by {target}", **details)
