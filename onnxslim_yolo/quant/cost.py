"""Measured INT8-vs-float cost of each Conv on this machine (ort-cpu placement).

A Conv is worth quantizing for onnxruntime only if its fused QLinearConv (plus its activation in
QLinear ops) beats the float Conv (plus the float activation and the DQ/Q at its borders). Whether
it does depends on the shape and the CPU: on the AVX512-VNNI machine this was written on, dense
1x1 and 3x3 convs ran 2.5-3.5x faster in INT8, the 3-input-channel 6x6 stem 1.5x slower and
depthwise convs 2-4x slower. So instead of a rule, every distinct Conv configuration is timed
here: two one-layer models with uint8 input and output (the same borders for both), run
interleaved in one process, median of several runs each.

The float unit runs without onnxruntime's ``WeightBiasQuantization`` transformer. That step
quantizes the float weights (per tensor) of a Conv that reads a DequantizeLinear and feeds a
QuantizeLinear, which the float unit with no activation after its Conv does, so that unit ran as
a QLinearConv: both units took the same time and every such Conv (a plain Conv before a residual
Add, Mish, HardSwish, GELU or a LayerNorm) was kept float as "INT8 slower here".
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from .. import ir, verify
from ..progress import bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvKey:
    """Everything that decides a Conv's run time (batch 1)."""

    cin: int
    cout: int
    hw: Tuple[int, ...]
    kernel: Tuple[int, ...]
    strides: Tuple[int, ...]
    pads: Tuple[int, ...]
    dilations: Tuple[int, ...]
    group: int
    act: str  # "silu", "sigmoid", "relu", "leaky", "none"


@dataclass(frozen=True)
class ConvCost:
    int8_ms: float
    float_ms: float

    @property
    def speedup(self) -> float:
        return self.float_ms / self.int8_ms if self.int8_ms > 0 else float("inf")


def activation_after(node: gs.Node) -> str:
    """The activation a Conv's output feeds: SiLU (Sigmoid(x) and Mul(x, sigmoid)), Relu, ..."""
    y = node.outputs[0]
    ops = sorted(c.op for c in y.outputs)
    if ops == ["Mul", "Sigmoid"]:
        return "silu"
    if len(ops) == 1:
        return {"Relu": "relu", "LeakyRelu": "leaky", "Sigmoid": "sigmoid"}.get(ops[0], "none")
    return "none"


def conv_key(node: gs.Node) -> Optional[ConvKey]:
    """Key of a 2-D Conv with static input shape and constant weights, else None."""
    x, w = node.inputs[0], node.inputs[1]
    shape = getattr(x, "shape", None)
    if node.op != "Conv" or not isinstance(w, gs.Constant) or not shape or len(shape) != 4:
        return None
    if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    k = tuple(int(d) for d in w.values.shape[2:])
    n = len(k)
    a = node.attrs
    pads = tuple(int(p) for p in a.get("pads", [0] * 2 * n))
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    return ConvKey(int(shape[1]), int(w.values.shape[0]), tuple(int(d) for d in shape[2:]), k,
                   tuple(int(s) for s in a.get("strides", [1] * n)), pads,
                   tuple(int(d) for d in a.get("dilations", [1] * n)), int(a.get("group", 1)),
                   activation_after(node))


def _unit_model(key: ConvKey, int8: bool, seed: int = 0) -> onnx.ModelProto:
    """uint8 in -> DQ -> Conv (+activation) -> Q -> uint8 out, with INT8 or float Conv/activation."""
    rng = np.random.default_rng(seed)
    fan_in = key.cin // key.group * int(np.prod(key.kernel))
    w = rng.standard_normal((key.cout, key.cin // key.group) + key.kernel) / np.sqrt(fan_in)
    w = w.astype(np.float32)
    b = (rng.standard_normal(key.cout) * 0.1).astype(np.float32)
    inits: List[onnx.TensorProto] = []
    nodes: List[onnx.NodeProto] = []

    def c(v: np.ndarray, name: str) -> str:
        inits.append(numpy_helper.from_array(np.asarray(v), name))
        return name

    def qdq(x: str, s: float, z: int, tag: str, dq: bool = True) -> str:
        c(np.array(s, np.float32), tag + "_s"), c(np.array(z, np.uint8), tag + "_z")
        nodes.append(helper.make_node("QuantizeLinear", [x, tag + "_s", tag + "_z"], [tag + "_q"]))
        if not dq:
            return tag + "_q"
        nodes.append(helper.make_node("DequantizeLinear", [tag + "_q", tag + "_s", tag + "_z"], [tag + "_d"]))
        return tag + "_d"

    c(np.array(0.02, np.float32), "x_s"), c(np.array(128, np.uint8), "x_z")
    nodes.append(helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xd"]))
    if int8:
        ws = (np.abs(w).reshape(key.cout, -1).max(1) / 127).astype(np.float32)
        wq = np.round(w / ws.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.int8)
        wz = c(np.zeros(key.cout, np.int8), "wz")
        nodes.append(helper.make_node("DequantizeLinear", [c(wq, "wq"), c(ws, "ws"), wz], ["wd"], axis=0))
        bs = (0.02 * ws).astype(np.float32)
        bq, bz = c(np.round(b / bs).astype(np.int32), "bq"), c(np.zeros(key.cout, np.int32), "bz")
        nodes.append(helper.make_node("DequantizeLinear", [bq, c(bs, "bs"), bz], ["bd"], axis=0))
        wb = ["wd", "bd"]
    else:
        wb = [c(w, "w"), c(b, "b")]
    nodes.append(helper.make_node("Conv", ["xd"] + wb, ["y"], kernel_shape=list(key.kernel),
                                  strides=list(key.strides), pads=list(key.pads),
                                  dilations=list(key.dilations), group=key.group))
    y = qdq("y", 0.05, 128, "yq") if int8 else "y"
    if key.act == "silu":
        sg = "sg"
        nodes.append(helper.make_node("Sigmoid", [y], [sg]))
        sg = qdq(sg, 1 / 255, 0, "sgq") if int8 else sg
        nodes.append(helper.make_node("Mul", [y, sg], ["a"]))
        y = "a"
    elif key.act != "none":
        op = {"relu": "Relu", "leaky": "LeakyRelu", "sigmoid": "Sigmoid"}[key.act]
        nodes.append(helper.make_node(op, [y], ["a"]))
        y = "a"
    out = qdq(y, 0.03, 10, "out", dq=False)
    n = len(key.hw)
    ohw = tuple((key.hw[i] + key.pads[i] + key.pads[i + n] - key.dilations[i] * (key.kernel[i] - 1) - 1)
                // key.strides[i] + 1 for i in range(n))
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, (1, key.cin) + key.hw)
    g = helper.make_graph(nodes, "conv_unit", [x],
                          [helper.make_tensor_value_info(out, TensorProto.UINT8, (1, key.cout) + ohw)], inits)
    opsets = [helper.make_opsetid("", 13)]
    return helper.make_model(g, opset_imports=opsets, ir_version=ir.lowest_ir_version(opsets))


def _time(sessions: Sequence, feed: Dict[str, np.ndarray], runs: int) -> List[float]:
    for s in sessions:
        s.run(None, feed)
    times: List[List[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) * 1e3 for t in times]


#: onnxruntime transformers left out of the float unit's session (see the module docstring)
FLOAT_UNIT_DISABLED = ("WeightBiasQuantization",)


def unit_session(key: ConvKey, int8: bool, threads: int = 1, save_optimized: Optional[str] = None):
    """The onnxruntime session of one timing unit (``save_optimized``: where to write the graph
    onnxruntime runs)."""
    return verify.session(_unit_model(key, int8), threads=threads, save_optimized=save_optimized,
                          disabled_optimizers=() if int8 else FLOAT_UNIT_DISABLED)


@functools.lru_cache(maxsize=None)
def runtime_quantizes_float_convs() -> bool:
    """Whether this onnxruntime quantizes a float Conv between DequantizeLinear and
    QuantizeLinear itself (its WeightBiasQuantization step, onnxruntime 1.20 on): a float unit
    with every optimizer on runs as a QLinearConv."""
    key = ConvKey(8, 8, (4, 4), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1, "none")
    return any(n.op_type == "QLinearConv" for n in verify.optimized_model(_unit_model(key, False)).graph.node)


#: timing rounds of a key whose first round keeps it float (:func:`measure`)
RECHECK_ROUNDS = 3


def measure(keys: Sequence[ConvKey], threads: int = 1, budget_ms: float = 15.0,
            progress: bool = False, min_speedup: Optional[float] = None) -> Dict[ConvKey, ConvCost]:
    """Time every key's INT8 and float unit; about ``budget_ms`` of runs per key (at least 5).
    A key whose INT8 unit measures less than ``min_speedup`` times faster is timed in
    :data:`RECHECK_ROUNDS` rounds in all, and the round of median speed-up decides: other work on
    the CPU slows one unit of a round, and one round swung a conv from 2.7x to 0.7x, so two runs
    of one command kept different convs float (54 against 56 INT8 layers, 1.4 points of mAP)."""
    out: Dict[ConvKey, ConvCost] = {}
    for key in bar(list(dict.fromkeys(keys)), desc="timing convs", enabled=progress):
        sessions = [unit_session(key, i8, threads) for i8 in (True, False)]
        feed = {"x": np.random.default_rng(1).integers(0, 256, (1, key.cin) + key.hw).astype(np.uint8)}
        first = _time(sessions, feed, 1)
        runs = int(np.clip(budget_ms / max(sum(first), 1e-3), 5, 50))
        rounds = [ConvCost(*(round(t, 4) for t in _time(sessions, feed, runs)))]
        while min_speedup is not None and len(rounds) < RECHECK_ROUNDS and rounds[0].speedup < min_speedup:
            rounds.append(ConvCost(*(round(t, 4) for t in _time(sessions, feed, runs))))
        out[key] = sorted(rounds, key=lambda c: c.speedup)[len(rounds) // 2]
        log.debug("conv %s: int8 %.3f ms, float %.3f ms (%d rounds)", asdict(key), out[key].int8_ms,
                  out[key].float_ms, len(rounds))
    return out


def slower_in_int8(cost: Optional[ConvCost], min_speedup: float) -> Optional[str]:
    """Reason to keep a Conv float, or None to quantize it."""
    if cost is None or cost.speedup >= min_speedup:
        return None
    return (f"INT8 slower here: measured {cost.int8_ms:.3f} ms INT8 vs {cost.float_ms:.3f} ms float "
            f"(speedup {cost.speedup:.2f} < {min_speedup:g})")
