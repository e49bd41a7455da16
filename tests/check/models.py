"""Small models for the check tests: a hand-built QDQ Conv, a Conv-only QDQ inserter for the
YOLO fixtures, and edit helpers that break one thing at a time."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Set

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper, numpy_helper

QT = {"uint8": (np.uint8, 0, 255), "int8": (np.int8, -128, 127)}


def _init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def qdq_conv(act: str = "uint8", opset: int = 13, w_axis: int = 0, tail_qdq: bool = False,
             cout: int = 8, bias_dq: bool = True) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ per-channel int8 W, DQ int32 B) -> Q/DQ -> Sigmoid -> out.

    The Sigmoid plays the decode tail; ``tail_qdq`` quantizes its output too. Without ``bias_dq``
    the bias is a float initializer (what TensorRT wants).
    """
    dt, lo, hi = QT[act]
    zp = 128 if act == "uint8" else 0
    rng = np.random.default_rng(0)
    ws = np.full(cout, 0.01, np.float32)
    inits = [_init("x_scale", np.float32(0.02)), _init("x_zp", dt(zp)),
             _init("w_q", rng.integers(-100, 100, (cout, 4, 3, 3)).astype(np.int8)),
             _init("w_scale", ws), _init("w_zp", np.zeros(cout, np.int8)),
             _init("b_q", rng.integers(-50, 50, cout).astype(np.int32)),
             _init("b_scale", (ws * np.float32(0.02)).astype(np.float32)),
             _init("b_zp", np.zeros(cout, np.int32)),
             _init("y_scale", np.float32(0.05)), _init("y_zp", dt(zp))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_Q"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_DQ"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_DQ",
                              axis=w_axis),
             helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], name="b_DQ", axis=0),
             helper.make_node("Conv", ["x_dq", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zp"], ["y_q"], name="y_Q"),
             helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y_dq"], name="y_DQ"),
             helper.make_node("Sigmoid", ["y_dq"], ["s" if tail_qdq else "out"], name="head/Sigmoid")]
    if not bias_dq:
        bias = numpy_helper.to_array(inits[5]).astype(np.float32) * numpy_helper.to_array(inits[6])
        inits = inits[:5] + [_init("b", bias)] + inits[8:]
        nodes = [n for n in nodes if n.name != "b_DQ"]
    if tail_qdq:
        inits += [_init("s_scale", np.float32(1 / 255)), _init("s_zp", dt(zp if act == "int8" else 0))]
        nodes += [helper.make_node("QuantizeLinear", ["s", "s_scale", "s_zp"], ["s_q"], name="s_Q"),
                  helper.make_node("DequantizeLinear", ["s_q", "s_scale", "s_zp"], ["out"], name="s_DQ")]
    graph = helper.make_graph(nodes, "qdq_conv", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("out", T.FLOAT, [1, cout, 8, 8])], inits)
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


# ----------------------------------------------------------------------------------- edits
def set_init(model: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    """A copy with initializer ``name`` replaced (dtype kept unless ``value`` is an ndarray)."""
    m = copy(model)
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            old = numpy_helper.to_array(t)
            arr = value if isinstance(value, np.ndarray) else np.asarray(value, old.dtype).reshape(old.shape)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, name))
            return m
    raise KeyError(name)


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def set_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    m = copy(model)
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = version
    return m


def insert_qdq(model: onnx.ModelProto, tensor: str, scale: float = 0.05, zp: int = 128) -> onnx.ModelProto:
    """Q -> DQ (uint8) on ``tensor``; when it is a graph output, the DQ produces it."""
    m = copy(model)
    _insert(m, tensor, scale, np.uint8(zp))
    return _toposort(m)


def _insert(m: onnx.ModelProto, tensor: str, scale: float, zp) -> None:
    outputs = {o.name for o in m.graph.output}
    src = tensor + "_f" if tensor in outputs else tensor
    dst = tensor if tensor in outputs else tensor + "_dq"
    for n in m.graph.node:
        if tensor in outputs:
            n.output[:] = [src if o == tensor else o for o in n.output]
        else:
            n.input[:] = [dst if i == tensor else i for i in n.input]
    m.graph.initializer.extend([_init(tensor + "_s", np.float32(scale)), _init(tensor + "_z", zp)])
    m.graph.node.extend([
        helper.make_node("QuantizeLinear", [src, tensor + "_s", tensor + "_z"], [tensor + "_q"],
                         name=tensor + "_Q"),
        helper.make_node("DequantizeLinear", [tensor + "_q", tensor + "_s", tensor + "_z"], [dst],
                         name=tensor + "_DQ")])


def _toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    known: Set[str] = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, done = list(model.graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError("cycle or dangling input while sorting")
        for n in ready:
            known.update(n.output)
        done += ready
        pending = [n for n in pending if n not in ready]
    del model.graph.node[:]
    model.graph.node.extend(done)
    return model


# ------------------------------------------------------------------ Conv-only QDQ for fixtures
def _ranges(model: onnx.ModelProto, tensors: List[str], feeds: Dict[str, np.ndarray]) -> Dict[str, tuple]:
    m = copy(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend([helper.make_value_info(t, onnx.TypeProto()) for t in tensors if t not in have])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    vals = dict(zip(names, sess.run(None, feeds)))
    return {t: (float(min(vals[t].min(), 0)), float(max(vals[t].max(), 0))) for t in tensors}


def quantize_convs(model: onnx.ModelProto, exclude: Iterable[str] = (), act: str = "uint8",
                   seed: int = 0) -> onnx.ModelProto:
    """Every Conv (not in ``exclude``) reads Q/DQ activations and per-channel int8 weights; its
    output is Q/DQ'd too, so onnxruntime fuses it into QLinearConv (with uint8 activations)."""
    skip = set(exclude)
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in skip]
    tensors = sorted({n.input[0] for n in convs} | {n.output[0] for n in convs})
    x = model.graph.input[0]
    shape = [d.dim_value or 1 for d in x.type.tensor_type.shape.dim]
    feeds = {x.name: np.random.default_rng(seed).random(shape, dtype=np.float32)}
    rng = _ranges(model, tensors, feeds)
    _, lo, hi = QT[act]
    m = copy(model)
    scales: Dict[str, float] = {}
    for t in tensors:
        a, b = rng[t]
        if act == "uint8":
            s = max((b - a) / (hi - lo), 1e-8)
            _insert(m, t, s, np.uint8(np.clip(round(lo - a / s), lo, hi)))
        else:
            s = max(max(-a, b) / 127, 1e-8)
            _insert(m, t, s, np.int8(0))
        scales[t] = scales[t + "_dq"] = s
    inits = {t.name: t for t in m.graph.initializer}
    replaced: Set[str] = set()
    for n in list(m.graph.node):
        if n.op_type == "Conv" and n.name not in skip:
            bias = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else None
            replaced.update(n.input[1:3])
            _quantize_weight(m, n, numpy_helper.to_array(inits[n.input[1]]), bias, scales[n.input[0]])
    used = {i for n in m.graph.node for i in n.input}
    keep = [t for t in m.graph.initializer if t.name not in replaced or t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return _toposort(m)


def _quantize_weight(m: onnx.ModelProto, conv: onnx.NodeProto, w: np.ndarray, bias: Optional[np.ndarray],
                     x_scale: float) -> None:
    """Per-channel symmetric int8 weights (axis 0) and int32 bias with scale x_scale * w_scale."""
    ws = np.maximum((np.abs(w).reshape(w.shape[0], -1).max(1) / 127), 1e-8).astype(np.float32)
    q = np.clip(np.round(w / ws.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    base = conv.name + "_w"
    m.graph.initializer.extend([_init(base + "_q", q), _init(base + "_s", ws),
                                _init(base + "_z", np.zeros(w.shape[0], np.int8))])
    m.graph.node.extend([helper.make_node("DequantizeLinear", [base + "_q", base + "_s", base + "_z"], [base],
                                          name=base + "_DQ", axis=0)])
    conv.input[1] = base
    if bias is not None:
        bs = (ws * np.float32(x_scale)).astype(np.float32)
        bq = np.round(bias / bs).astype(np.int32)
        b = conv.name + "_b"
        m.graph.initializer.extend([_init(b + "_q", bq), _init(b + "_s", bs),
                                    _init(b + "_z", np.zeros(w.shape[0], np.int32))])
        m.graph.node.extend([helper.make_node("DequantizeLinear", [b + "_q", b + "_s", b + "_z"], [b],
                                              name=b + "_DQ", axis=0)])
        conv.input[2] = b


def tail_names(model: onnx.ModelProto) -> List[str]:
    from onnxslim_yolo.check.index import GraphIndex
    from onnxslim_yolo.check.tail import structural_tail

    idx = GraphIndex(model)
    return [idx.nodes[i].name for i in structural_tail(idx)]


def final_convs(model: onnx.ModelProto) -> Optional[List[str]]:
    """Conv nodes whose output reaches a graph output without passing another Conv."""
    from onnxslim_yolo.check.index import GraphIndex
    from onnxslim_yolo.check.tail import structural_tail

    idx = GraphIndex(model)
    tail = structural_tail(idx)
    return [idx.nodes[i].name for i, n in enumerate(idx.nodes)
            if n.op_type == "Conv" and any(s in tail for s in idx.successors(i))]
