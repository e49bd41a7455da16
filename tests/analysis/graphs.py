"""Tiny hand-built graphs (onnx.helper) for the channel-group and pruning tests."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class G:
    """Add nodes by name; every helper returns the output tensor name (``<node>_out``)."""

    def __init__(self, opset: int = 13, seed: int = 0) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: List[onnx.NodeProto] = []
        self.inits: List[onnx.TensorProto] = []

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, n_out: int = 1, **attrs) -> str:
        outs = [f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs  # type: ignore[return-value]

    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 1, group: int = 1,
             bias: bool = True, pad: Optional[int] = None) -> str:
        w = (self.rng.normal(0, 1, (cout, cin // group, k, k)) / np.sqrt(cin // group * k * k))
        ins = [x, self.const(name + ".w", w.astype(np.float32))]
        if bias:
            ins.append(self.const(name + ".b", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        p = k // 2 if pad is None else pad
        return self.node("Conv", ins, name, kernel_shape=[k, k], pads=[p] * 4, group=group)

    def silu(self, x: str, name: str) -> str:
        return self.node("Mul", [x, self.node("Sigmoid", [x], name + ".sig")], name)

    def cbs(self, x: str, cin: int, cout: int, name: str, k: int = 1) -> str:
        return self.silu(self.conv(x, cin, cout, name, k), name + ".act")

    def model(self, inputs: Sequence[Tuple[str, Sequence[int]]], outputs: Sequence[str],
              out_rank: Optional[Sequence[int]] = None) -> onnx.ModelProto:
        ranks = list(out_rank or [4] * len(outputs))
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs]
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * r)
                for o, r in zip(outputs, ranks)]
        g = helper.make_graph(self.nodes, "g", ins, outs, self.inits)
        m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
        for o in m.graph.output:  # declare the inferred output shapes (the checker wants one)
            vi = next((v for v in m.graph.value_info if v.name == o.name), None)
            if vi is not None:
                o.CopyFrom(vi)
        del m.graph.value_info[:]
        onnx.checker.check_model(m, full_check=True)
        return m


X = ("x", (1, 3, 8, 8))


def concat_graph() -> onnx.ModelProto:
    """a(4) and b(6) -> Concat(10) -> c; the head conv h keeps its outputs (graph output)."""
    g = G()
    a = g.cbs("x", 3, 4, "a")
    b = g.cbs("x", 3, 6, "b", k=3)
    c = g.cbs(g.node("Concat", [a, b], "cat", axis=1), 10, 8, "c", k=3)
    return g.model([X], [g.conv(c, 8, 5, "h")])


def split_graph(opset: int = 13, sizes: Tuple[int, int] = (3, 5),
                num_outputs: bool = False) -> onnx.ModelProto:
    """a(8) -> Split sizes -> b (3x3) on the first part, c on the second; Concat -> h. The split
    sizes are an attribute before opset 13, an input from 13, or ``num_outputs`` (opset 18)."""
    g = G(opset)
    a = g.cbs("x", 3, sum(sizes), "a")
    if num_outputs:
        parts = g.node("Split", [a], "split", n_out=2, axis=1, num_outputs=2)
    elif opset >= 13:
        parts = g.node("Split", [a, g.const("sizes", np.array(sizes, np.int64))], "split", n_out=2, axis=1)
    else:
        parts = g.node("Split", [a], "split", n_out=2, axis=1, split=list(sizes))
    b = g.cbs(parts[0], sizes[0], 4, "b", k=3)
    c = g.cbs(parts[1], sizes[1], 4, "c")
    return g.model([X], [g.conv(g.node("Concat", [b, c], "cat", axis=1), 8, 5, "h")])


def split_rejoin_graph(quiet_first: bool = True) -> onnx.ModelProto:
    """a(8) -> Split (3, 5); the first part through an AveragePool, Concat with the second -> c ->
    h: both parts are one layer (same producer and consumer). With ``quiet_first`` the three
    channels of the first part have the smallest filters (the first a filter-L1 choice takes)."""
    g = G()
    a = g.cbs("x", 3, 8, "a")
    if quiet_first:
        w = next(t for t in g.inits if t.name == "a.w")
        arr = numpy_helper.to_array(w).copy()
        arr[:3] *= 1e-3
        w.CopyFrom(numpy_helper.from_array(arr, "a.w"))
    parts = g.node("Split", [a, g.const("sizes", np.array([3, 5], np.int64))], "split", n_out=2, axis=1)
    pooled = g.node("AveragePool", [parts[0]], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    c = g.cbs(g.node("Concat", [pooled, parts[1]], "cat", axis=1), 8, 6, "c", k=3)
    return g.model([X], [g.conv(c, 6, 5, "h")])


def residual_graph() -> onnx.ModelProto:
    """a(8) -> SiLU -> b(8) 3x3 -> SiLU; Add(a, b) -> c; dw(8) depthwise -> d."""
    g = G()
    a = g.cbs("x", 3, 8, "a")
    b = g.cbs(a, 8, 8, "b", k=3)
    s = g.node("Add", [a, b], "add")
    dw = g.silu(g.conv(s, 8, 8, "dw", k=3, group=8), "dw.act")
    return g.model([X], [g.conv(dw, 8, 5, "h")])


def grouped_graph() -> onnx.ModelProto:
    """a(8) -> SiLU -> grp 3x3 (group=4, 8 -> 12) -> SiLU -> dwm 3x3 (group=12, 12 -> 24: a
    depthwise Conv with two outputs per input) -> SiLU -> h (as ResNeXt / RegNet and Keras'
    depth_multiplier export them)."""
    g = G()
    a = g.cbs("x", 3, 8, "a")
    grp = g.silu(g.conv(a, 8, 12, "grp", k=3, group=4), "grp.act")
    dwm = g.silu(g.conv(grp, 12, 24, "dwm", k=3, group=12), "dwm.act")
    return g.model([X], [g.conv(dwm, 24, 5, "h")])


def instancenorm_graph() -> onnx.ModelProto:
    """IBN-Net's mix: a(8) -> Split (4, 4) -> InstanceNormalization on the first half,
    BatchNormalization on the second -> Concat -> SiLU -> h."""
    g = G()
    a = g.conv("x", 3, 8, "a", k=3)
    parts = g.node("Split", [a, g.const("sizes", np.array([4, 4], np.int64))], "split", n_out=2, axis=1)
    r = g.rng
    scale, bias = r.uniform(0.5, 1.5, 4).astype(np.float32), r.normal(0, 0.5, 4).astype(np.float32)
    inorm = g.node("InstanceNormalization", [parts[0], g.const("in.s", scale), g.const("in.b", bias)], "in")
    bn = g.node("BatchNormalization", [parts[1]] + [
        g.const(f"bn.{k}", v.astype(np.float32)) for k, v in (
            ("s", r.uniform(0.5, 1.5, 4)), ("b", r.normal(0, 0.5, 4)), ("m", r.normal(0, 0.5, 4)),
            ("v", r.uniform(0.5, 1.5, 4)))], "bn")
    cat = g.silu(g.node("Concat", [inorm, bn], "cat", axis=1), "act")
    return g.model([X], [g.conv(cat, 8, 5, "h")])


def pool_resize_graph() -> onnx.ModelProto:
    """a(6) -> MaxPool 3x3 -> Resize x2 (scales) -> b 3x3 -> Slice channels [1:5] -> c."""
    g = G()
    a = g.cbs("x", 3, 6, "a")
    p = g.node("MaxPool", [a], "pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    r = g.node("Resize", [p, "", g.const("scales", np.array([1, 1, 2, 2], np.float32))], "up", mode="nearest")
    b = g.cbs(r, 6, 8, "b", k=3)
    sl = g.node("Slice", [b, g.const("st", np.array([1], np.int64)), g.const("en", np.array([5], np.int64)),
                          g.const("ax", np.array([1], np.int64))], "slice")
    return g.model([X], [g.conv(sl, 4, 5, "h")])


def pad_graph(opset: int = 13, channel_pad: bool = False) -> onnx.ModelProto:
    """TF-style "same" padding: a(6) -> Pad (bottom/right, zeros) -> b 3x3 stride 2 unpadded ->
    Pad (-inf) -> MaxPool 2x2 unpadded -> h. From opset 18 the first Pad names its axes (2, 3).
    ``channel_pad``: the first Pad also adds one zero channel (b then reads 7)."""
    g = G(opset)
    a = g.cbs("x", 3, 6, "a")
    if opset >= 18 and not channel_pad:
        p = g.node("Pad", [a, g.const("pads", np.array([0, 0, 1, 1], np.int64)), "",
                           g.const("axes", np.array([2, 3], np.int64))], "pad", mode="constant")
    else:
        pads = [0, 0, 0, 0, 0, int(channel_pad), 1, 1]
        p = g.node("Pad", [a, g.const("pads", np.array(pads, np.int64))], "pad", mode="constant")
    cin = 7 if channel_pad else 6
    w = (g.rng.normal(0, 1, (8, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
    b = g.silu(g.node("Conv", [p, g.const("b.w", w)], "b", kernel_shape=[3, 3], strides=[2, 2]), "b.act")
    q = g.node("Pad", [b, g.const("pads2", np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64)),
                       g.const("ninf", np.array(-np.inf, np.float32))], "pad2", mode="constant")
    m = g.node("MaxPool", [q], "pool", kernel_shape=[2, 2])
    return g.model([X], [g.conv(m, 8, 5, "h")])


def se_stack_graph(opset: int = 13, mean_over: Sequence[int] = (2, 3)) -> onnx.ModelProto:
    """EfficientNet / EfficientDet patterns. SE: a(8) * Sigmoid(se2(se1(ReduceMean(a) over
    ``mean_over``, keepdims))); BiFPN's weighted sum of torch.stack: Unsqueeze both inputs on a
    new last axis, Concat there, Mul by per-input weights, ReduceSum over it (keepdims 0) -> h.
    Axes are attributes up to opset 12 (ReduceMean up to 17), inputs after."""
    g = G(opset)

    def axes_node(op: str, x: str, axes: Sequence[int], name: str, input_from: int, **attrs) -> str:
        if opset >= input_from:
            return g.node(op, [x, g.const(name + ".axes", np.array(axes, np.int64))], name, **attrs)
        return g.node(op, [x], name, axes=list(axes), **attrs)

    a = g.cbs("x", 3, 8, "a", k=3)
    m = axes_node("ReduceMean", a, mean_over, "se.mean", 18, keepdims=1)
    gate = g.node("Sigmoid", [g.conv(g.cbs(m, 8 if 1 not in mean_over else 1, 4, "se1"), 4, 8, "se2")],
                  "se.gate")
    s = g.node("Mul", [a, gate], "se.scale")
    b = g.cbs("x", 3, 8, "b", k=3)
    stacked = g.node("Concat", [axes_node("Unsqueeze", s, [-1], "ua", 13),
                                axes_node("Unsqueeze", b, [-1], "ub", 13)], "stack", axis=-1)
    w = g.node("Mul", [stacked, g.const("fuse.w", np.array([0.6, 0.4], np.float32))], "fuse")
    total = axes_node("ReduceSum", w, [-1], "fuse.sum", 13, keepdims=0)
    return g.model([X], [g.conv(total, 8, 5, "h")])


def linear_se_graph(variant: str = "matmul", opset: int = 13) -> onnx.ModelProto:
    """a(8) scaled by a squeeze-and-excitation gate written with Linear layers, as YOLO attention
    add-ons write it: GlobalAveragePool -> flatten to (1, 8) -> Linear 8 -> 4 -> Relu -> Linear
    4 -> 8 -> Sigmoid -> back to (1, 8, 1, 1) -> a * gate -> h. ``matmul``: Reshape [1, 8], two
    MatMuls, Reshape [1, 8, 1, 1], Expand to a's Shape (torch's bias-free Linear, ``expand_as``);
    ``gemm``: Flatten, Gemm with transB and bias, HardSigmoid, Unsqueeze axes 2, 3; ``add``:
    Squeeze axes 2, 3, MatMul + bias Add, Reshape [1, -1, 1, 1] (the dynamo exporter's Linear;
    from opset 14 with allowzero=1, as that exporter writes every Reshape)."""
    g = G(opset)
    a = g.cbs("x", 3, 8, "a", k=3)
    pooled = g.node("GlobalAveragePool", [a], "se.pool")
    w1 = (g.rng.normal(0, 0.5, (8, 4))).astype(np.float32)
    w2 = (g.rng.normal(0, 0.5, (4, 8))).astype(np.float32)

    def axes(op: str, x: str, name: str) -> str:
        if opset >= 13:
            return g.node(op, [x, g.const(name + ".axes", np.array([2, 3], np.int64))], name)
        return g.node(op, [x], name, axes=[2, 3])

    if variant == "matmul":
        flat = g.node("Reshape", [pooled, g.const("se.s1", np.array([1, 8], np.int64))], "se.flat")
        h = g.node("Relu", [g.node("MatMul", [flat, g.const("se.w1", w1)], "se.fc1")], "se.relu")
        gate = g.node("Sigmoid", [g.node("MatMul", [h, g.const("se.w2", w2)], "se.fc2")], "se.sig")
        gate = g.node("Reshape", [gate, g.const("se.s2", np.array([1, 8, 1, 1], np.int64))], "se.view")
        gate = g.node("Expand", [gate, g.node("Shape", [a], "se.shape")], "se.expand")
    elif variant == "gemm":
        flat = g.node("Flatten", [pooled], "se.flat", axis=1)
        b1, b2 = np.full(4, 0.1, np.float32), np.linspace(-1, 1, 8).astype(np.float32)
        h = g.node("Relu", [g.node("Gemm", [flat, g.const("se.w1", w1.T), g.const("se.b1", b1)], "se.fc1",
                                   transB=1)], "se.relu")
        gate = g.node("Gemm", [h, g.const("se.w2", w2.T), g.const("se.b2", b2)], "se.fc2", transB=1)
        gate = axes("Unsqueeze", g.node("HardSigmoid", [gate], "se.hsig"), "se.view")
    else:
        flat = axes("Squeeze", pooled, "se.flat")
        h = g.node("Add", [g.node("MatMul", [flat, g.const("se.w1", w1)], "se.fc1"),
                           g.const("se.b1", np.full(4, 0.1, np.float32))], "se.fc1.bias")
        h = g.node("Relu", [h], "se.relu")
        gate = g.node("Add", [g.node("MatMul", [h, g.const("se.w2", w2)], "se.fc2"),
                              g.const("se.b2", np.linspace(-1, 1, 8).astype(np.float32))], "se.fc2.bias")
        gate = g.node("Sigmoid", [gate], "se.sig")
        gate = g.node("Reshape", [gate, g.const("se.s2", np.array([1, -1, 1, 1], np.int64))], "se.view",
                      **({"allowzero": 1} if opset >= 14 else {}))
    s = g.node("Mul", [a, gate], "se.scale")
    return g.model([X], [g.conv(s, 8, 5, "h")])


def expand_graph(target: str = "const") -> onnx.ModelProto:
    """a(8) * Expand(GlobalAveragePool(a)) -> h: the target is a constant [1, 8, 8, 8] (``const``)
    or the Shape of b(8), a tensor the expanded one never meets (``other``; b -> output g)."""
    g = G()
    a = g.cbs("x", 3, 8, "a", k=3)
    pooled = g.node("GlobalAveragePool", [a], "pool")
    if target == "const":
        shape = g.const("target", np.array([1, 8, 8, 8], np.int64))
        outs = []
    else:
        b = g.cbs("x", 3, 8, "b")
        shape, outs = g.node("Shape", [b], "shape_b"), [g.conv(b, 8, 5, "g")]
    e = g.node("Expand", [pooled, shape], "expand")
    return g.model([X], [g.conv(g.node("Mul", [a, e], "scale"), 8, 5, "h")] + outs)


def shuffle_graph(opset: int = 13, minus_one: bool = False, merged: bool = False,
                  allowzero: bool = False) -> onnx.ModelProto:
    """Two ShuffleNetV2 stride-1 units on a(8): Split 4 + 4, the second half through 1x1 ->
    depthwise 3x3 -> 1x1, Concat with the first half, then a channel shuffle of 2 groups
    (Reshape (1, 2, 4, 8, 8) -> Transpose (0, 2, 1, 3, 4) -> Reshape (1, 8, 8, 8), or with -1
    for the computed counts when ``minus_one``) -> h. ``merged``: the shuffle's middle is
    (1, 2, 4, 64) and its Transpose (0, 2, 1, 3); ``allowzero``: its Reshapes say allowzero=1
    (opset 14 on), as PyTorch's dynamo exporter writes them."""
    g = G(opset)
    zero = {"allowzero": 1} if allowzero else {}
    y = g.cbs("x", 3, 8, "a")
    for u in range(2):
        if opset >= 13:
            parts = g.node("Split", [y, g.const(f"u{u}.sizes", np.array([4, 4], np.int64))], f"u{u}.split",
                           n_out=2, axis=1)
        else:
            parts = g.node("Split", [y], f"u{u}.split", n_out=2, axis=1, split=[4, 4])
        b = g.cbs(parts[1], 4, 4, f"u{u}.b1")
        b = g.conv(b, 4, 4, f"u{u}.dw", k=3, group=4)
        b = g.cbs(b, 4, 4, f"u{u}.b2")
        cat = g.node("Concat", [parts[0], b], f"u{u}.cat", axis=1)
        first = [1, 2, -1 if minus_one else 4] + ([64] if merged else [8, 8])
        r = g.node("Reshape", [cat, g.const(f"u{u}.s1", np.array(first, np.int64))], f"u{u}.view", **zero)
        t = g.node("Transpose", [r], f"u{u}.swap", perm=[0, 2, 1, 3] if merged else [0, 2, 1, 3, 4])
        last = [1, -1 if minus_one else 8, 8, 8]
        y = g.node("Reshape", [t, g.const(f"u{u}.s2", np.array(last, np.int64))], f"u{u}.shuffle", **zero)
    return g.model([X], [g.conv(y, 8, 5, "h")])


def split_shuffle_graph(opset: int = 13, minus_one: bool = False) -> onnx.ModelProto:
    """Two ShuffleNetV2 stride-1 units on a(8) as Megvii's code writes them (FastestDet,
    YOLO-FastestV2): Reshape (8/2, 2, 64) -> Transpose (1, 0, 2) -> Reshape (2, 1, 4, 8, 8) ->
    Gather 0 (the even channels, passed on) and Gather 1 (the odd ones, through 1x1 -> depthwise
    3x3 -> 1x1), Concat -> h. With ``minus_one`` the last Reshape's batch is -1, as exported."""
    g = G(opset)
    y = g.cbs("x", 3, 8, "a")
    for u in range(2):
        r = g.node("Reshape", [y, g.const(f"u{u}.s1", np.array([4, 2, 64], np.int64))], f"u{u}.view")
        t = g.node("Transpose", [r], f"u{u}.swap", perm=[1, 0, 2])
        last = g.node("Reshape", [t, g.const(f"u{u}.s2", np.array([2, -1 if minus_one else 1, 4, 8, 8],
                                                                   np.int64))], f"u{u}.split")
        even = g.node("Gather", [last, g.const(f"u{u}.i0", np.array(0, np.int64))], f"u{u}.even", axis=0)
        odd = g.node("Gather", [last, g.const(f"u{u}.i1", np.array(1, np.int64))], f"u{u}.odd", axis=0)
        b = g.cbs(odd, 4, 4, f"u{u}.b1")
        b = g.conv(b, 4, 4, f"u{u}.dw", k=3, group=4)
        b = g.cbs(b, 4, 4, f"u{u}.b2")
        y = g.node("Concat", [even, b], f"u{u}.cat", axis=1)
    return g.model([X], [g.conv(y, 8, 5, "h")])


def conv_transpose_graph(kernel: int = 2, bias: bool = True, opset: int = 13) -> onnx.ModelProto:
    """YOLOv6's neck upsampling: a(6) 3x3 -> MaxPool 2 -> b(8) -> SiLU -> ConvTranspose ``up``
    8 -> 6, stride 2 (kernel 2: one output block per pixel; kernel 4, pads 1: overlapping) ->
    SiLU -> Concat with a -> c(8) 3x3 -> h. Second branch: d(4) -> SpaceToDepth 2 -> e(4) 1x1 ->
    DepthToSpace 2 (CRD from opset 11, else DCR) -> Concat -> h."""
    g = G(opset)
    a = g.cbs("x", 3, 6, "a", k=3)
    b = g.cbs(g.node("MaxPool", [a], "pool", kernel_shape=[2, 2], strides=[2, 2]), 6, 8, "b")
    w = (g.rng.normal(0, 1, (8, 6, kernel, kernel)) / np.sqrt(8 * 4)).astype(np.float32)
    ins = [b, g.const("up.w", w)] + ([g.const("up.b", g.rng.normal(0, 0.1, 6).astype(np.float32))]
                                     if bias else [])
    pads = [(kernel - 2) // 2] * 4
    up = g.silu(g.node("ConvTranspose", ins, "up", kernel_shape=[kernel] * 2, strides=[2, 2], pads=pads),
                "up.act")
    c = g.cbs(g.node("Concat", [up, a], "cat", axis=1), 12, 8, "c", k=3)
    d = g.node("SpaceToDepth", [g.cbs("x", 3, 4, "d")], "s2d", blocksize=2)
    e = g.cbs(d, 16, 16, "e")
    mode = {"mode": "CRD"} if opset >= 11 else {}
    f = g.node("DepthToSpace", [e], "d2s", blocksize=2, **mode)
    return g.model([X], [g.conv(g.node("Concat", [c, f], "cat2", axis=1), 12, 5, "h")])


def coord_attention_graph(opset: int = 13) -> onnx.ModelProto:
    """Coordinate attention on a(8): means over W (N, 8, 8, 1) and over H, the latter permuted
    (0, 1, 3, 2) to (N, 8, 8, 1); Concat on H -> m(4) 1x1 -> ReLU -> Split on H -> the W half
    permuted back; gh(8) and gw(8) 1x1 -> Sigmoid; a * gate_h * gate_w -> h."""
    g = G(opset)
    a = g.cbs("x", 3, 8, "a", k=3)
    if opset >= 18:
        xh = g.node("ReduceMean", [a, g.const("ax3", np.array([3], np.int64))], "pool_h")
        xw = g.node("ReduceMean", [a, g.const("ax2", np.array([2], np.int64))], "pool_w")
    else:
        xh = g.node("ReduceMean", [a], "pool_h", axes=[3])
        xw = g.node("ReduceMean", [a], "pool_w", axes=[2])
    xw = g.node("Transpose", [xw], "perm_w", perm=[0, 1, 3, 2])
    y = g.node("Relu", [g.conv(g.node("Concat", [xh, xw], "cat", axis=2), 8, 4, "m")], "m.act")
    parts = g.node("Split", [y, g.const("halves", np.array([8, 8], np.int64))], "split", n_out=2, axis=2)
    gate_h = g.node("Sigmoid", [g.conv(parts[0], 4, 8, "gh")], "gh.act")
    tw = g.node("Transpose", [parts[1]], "perm_back", perm=[0, 1, 3, 2])
    gate_w = g.node("Sigmoid", [g.conv(tw, 4, 8, "gw")], "gw.act")
    out = g.node("Mul", [g.node("Mul", [a, gate_h], "scale_h"), gate_w], "scale_w")
    return g.model([X], [g.conv(out, 8, 5, "h")])


def cbam_graph(opset: int = 13) -> onnx.ModelProto:
    """CBAM on a(8): channel attention, a shared 1x1 MLP 8 -> 4 -> 8 (one pair of weights, two
    pairs of Convs) on the average and the max pool, summed -> Sigmoid -> a * gate = xc; spatial
    attention, the mean and the max of xc over its channels -> Concat -> s 7x7 (2 -> 1) ->
    Sigmoid -> xc * gate -> h."""
    g = G(opset)
    a = g.cbs("x", 3, 8, "a", k=3)
    w1 = g.const("mlp1.w", (g.rng.normal(0, 1, (4, 8, 1, 1)) / np.sqrt(8)).astype(np.float32))
    w2 = g.const("mlp2.w", (g.rng.normal(0, 1, (8, 4, 1, 1)) / 2).astype(np.float32))
    gates = []
    for pool in ("GlobalAveragePool", "GlobalMaxPool"):
        p = g.node(pool, [a], pool)
        hidden = g.node("Relu", [g.node("Conv", [p, w1], f"{pool}.fc1", kernel_shape=[1, 1])], f"{pool}.relu")
        gates.append(g.node("Conv", [hidden, w2], f"{pool}.fc2", kernel_shape=[1, 1]))
    xc = g.node("Mul", [a, g.node("Sigmoid", [g.node("Add", gates, "ca.sum")], "ca.gate")], "ca")
    stats = []
    for op in ("ReduceMean", "ReduceMax"):
        if opset >= 18:
            stats.append(g.node(op, [xc, g.const(f"{op}.axes", np.array([1], np.int64))], op))
        else:
            stats.append(g.node(op, [xc], op, axes=[1]))
    s = g.conv(g.node("Concat", stats, "sa.cat", axis=1), 2, 1, "s", k=7, bias=False)
    out = g.node("Mul", [xc, g.node("Sigmoid", [s], "sa.gate")], "sa")
    return g.model([X], [g.conv(out, 8, 5, "h")])


def blocked_graph() -> onnx.ModelProto:
    """a(4) -> Reshape -> output; b(4) grouped (group=2) -> output."""
    g = G()
    a = g.cbs("x", 3, 4, "a")
    r = g.node("Reshape", [a, g.const("shape", np.array([1, -1], np.int64))], "flat")
    b = g.conv(g.cbs("x", 3, 4, "p"), 4, 4, "grp", group=2)
    return g.model([X], [r, b], out_rank=[2, 4])


def fpn_chain(opset: int = 11, levels: int = 6, c: int = 4, hw: int = 64) -> onnx.ModelProto:
    """torchvision's FPN top-down path: each level upsamples the one above to the size of its
    lateral Conv, read as Shape -> Gather -> Unsqueeze -> Concat -> Cast and joined to the
    Shape of the level above. Resize-11 does not infer its output from such computed sizes, so
    each level's shape is known only once the level above has been folded."""
    g = G(opset)
    i0, e = g.const("i0", np.array([0], np.int64)), g.const("empty", np.zeros(0, np.float32))
    two = g.const("i2", np.array([2], np.int64))
    axes = {"axes": [0]} if opset < 13 else {}
    cs = [g.conv("x", c, c, "c0", k=3)]
    for i in range(1, levels + 1):
        cs.append(g.node("Conv", [cs[-1], g.const(f"c{i}.w", np.ones((c, c, 1, 1), np.float32))], f"c{i}",
                         strides=[2, 2]))
    p, heads = cs[-1], []
    for i in range(levels - 1, -1, -1):
        top = g.node("Slice", [g.node("Shape", [p], f"sp{i}"), i0, two], f"nc{i}")
        sc = g.node("Shape", [cs[i]], f"sc{i}")
        dims = [g.node("Unsqueeze", [g.node("Gather", [sc, g.const(f"k{k}{i}", np.array(k, np.int64))],
                                            f"g{k}{i}", axis=0)] + ([] if axes else [i0]), f"u{k}{i}", **axes)
                for k in (2, 3)]
        hw_ = g.node("Cast", [g.node("Concat", dims, f"hw{i}", axis=0)], f"hwc{i}", to=TensorProto.INT64)
        up = g.node("Resize", [p, e, e, g.node("Concat", [top, hw_], f"size{i}", axis=0)], f"up{i}",
                    mode="nearest")
        p = g.node("Add", [cs[i], up], f"p{i}")
        heads.append(g.conv(p, c, c, f"o{i}"))
    return g.model([("x", (1, c, hw, hw))], heads)


def fpn_chain_macs(levels: int = 6, c: int = 4, hw: int = 64) -> int:
    """Multiply-adds of :func:`fpn_chain`: the 3x3 stem, the stride-2 1x1 Convs, the 1x1 heads."""
    px = [(hw >> i) ** 2 for i in range(levels + 1)]
    return c * c * 9 * px[0] + c * c * sum(px[1:]) + c * c * sum(px[:levels])


def dynamic_shuffle_graph(resize: bool = False, batch_from: str = "own") -> onnx.ModelProto:
    """A dynamic-batch ShuffleNet as TorchScript exports it: x (batch, 3, 8, 8) -> a(8) -> two units
    of a 1x1 CBS and a channel shuffle of 2 groups whose Reshape targets are computed from the
    unit's Shape (Gather 0..3, channels Div 2, Unsqueeze, Concat) -> h. ``resize``: a MaxPool 2 and a
    Resize by 2 after a, its scales a Concat of two constants (shape inference cannot follow
    them and names the batch anew, a name that stays after the Concat is folded). ``batch_from``:
    the second shuffle reads its batch entry from its own input (``own``), from the graph input
    ``x`` (``x``: the same batch, under another name after the Resize) or from a second input
    ``y`` (n, 1) (``y``: not to be copied)."""
    g = G(13)
    y = g.cbs("x", 3, 8, "a")
    if resize:
        y = g.node("MaxPool", [y], "pool", kernel_shape=[2, 2], strides=[2, 2])
        scales = g.node("Concat", [g.const("up.keep", np.ones(2, np.float32)),
                                   g.const("up.double", np.full(2, 2, np.float32))], "up.scales", axis=0)
        y = g.node("Resize", [y, "", scales], "up", mode="nearest")
    zero, one = g.const("i0", np.array(0, np.int64)), g.const("ax0", np.array([0], np.int64))

    def dim(src: str, i: int, name: str) -> str:
        shape = g.node("Shape", [src], f"{name}.shape")
        return g.node("Gather", [shape, zero if i == 0 else g.const(f"{name}.i{i}", np.array(i, np.int64))],
                      f"{name}.gather{i}", axis=0)

    for u in range(2):
        c = g.cbs(y, 8, 8, f"u{u}.c")
        b = dim(batch_from if batch_from != "own" and u == 1 else c, 0, f"u{u}.b")
        per = g.node("Div", [dim(c, 1, f"u{u}.c1"), g.const(f"u{u}.two", np.array(2, np.int64))], f"u{u}.div")
        parts = [g.node("Unsqueeze", [v, one], f"u{u}.unsq{k}") for k, v in enumerate(
            [b, per, dim(c, 2, f"u{u}.h"), dim(c, 3, f"u{u}.w")])]
        first = g.node("Concat", [parts[0], g.const(f"u{u}.groups", np.array([2], np.int64))] + parts[1:],
                       f"u{u}.target1", axis=0)
        view = g.node("Reshape", [c, first], f"u{u}.view")
        t = g.node("Transpose", [view], f"u{u}.swap", perm=[0, 2, 1, 3, 4])
        last = g.node("Concat", [g.node("Unsqueeze", [dim(c, k, f"u{u}.d{k}"), one], f"u{u}.back{k}")
                                 for k in range(4)], f"u{u}.target2", axis=0)
        y = g.node("Reshape", [t, last], f"u{u}.shuffle")
    inputs = [("x", ("batch", 3, 8, 8))] + ([("y", ("n", 1))] if batch_from == "y" else [])
    return g.model(inputs, [g.conv(y, 8, 5, "h")])


def gather_graph() -> onnx.ModelProto:
    """a (3 -> 6) feeds b directly, and c through a Gather of its channels 4, 0 and 5."""
    g = G()
    s = g.silu(g.conv("x", 3, 6, "a"), "a.act")
    picked = g.node("Gather", [s, g.const("idx", np.array([4, 0, 5], np.int64))], "pick", axis=1)
    cat = g.node("Concat", [g.conv(s, 6, 2, "b"), g.conv(picked, 3, 2, "c")], "cat", axis=1)
    return g.model([X], [g.conv(cat, 4, 2, "h")])


def exported_group_norm(g: G, x: str, name: str, c: int, groups: int, back: Optional[str] = None,
                        rng: Optional[np.random.Generator] = None) -> str:
    """nn.GroupNorm as PyTorch exports it: Reshape (0, G, -1) -> InstanceNormalization -> Reshape
    to ``back`` (default Shape(x)) -> Mul, Add; random parameters (``name``.s / .b per group,
    ``name``.affine.s / .b per channel), drawn from ``rng`` (default ``g.rng``)."""
    mid = g.node("Reshape", [x, g.const(name + ".to", np.array([0, groups, -1], np.int64))], name + ".first")
    norm = g.node("InstanceNormalization", [mid] + norm_params(g, name, (groups,), rng), name + ".in")
    y = g.node("Reshape", [norm, back or g.node("Shape", [x], name + ".shape")], name + ".last")
    gamma, beta = norm_params(g, name + ".affine", (c, 1, 1), rng)
    return g.node("Add", [g.node("Mul", [y, gamma], name + ".mul"), beta], name + ".add")


def norm_params(g: G, name: str, shape: Tuple[int, ...],
                rng: Optional[np.random.Generator] = None) -> List[str]:
    """A norm's scale (``name``.s, uniform 0.5-1.5) and bias (``name``.b, normal, sd 0.5)."""
    r = g.rng if rng is None else rng
    return [g.const(f"{name}.s", r.uniform(0.5, 1.5, shape).astype(np.float32)),
            g.const(f"{name}.b", r.normal(0, 0.5, shape).astype(np.float32))]


def group_norm_chain_graph(opset: int = 11) -> onnx.ModelProto:
    """a(8) -> group norm (4 groups) -> SiLU -> c 3x3 (8) -> group norm (2 groups) -> SiLU -> h,
    both norms as TorchScript exports them. At opset 11 onnx's inference does not carry the
    Shape into the last Reshape, so c's output had symbolic dims until shapes were folded."""
    g = G(opset)
    a = g.conv("x", 3, 8, "a", k=3)
    c = g.conv(g.silu(exported_group_norm(g, a, "gn1", 8, 4), "act1"), 8, 8, "c", k=3)
    return g.model([X], [g.conv(g.silu(exported_group_norm(g, c, "gn2", 8, 2), "act2"), 8, 5, "h")])


def group_norm_graph(form: str = "op21", opset: Optional[int] = None) -> onnx.ModelProto:
    """a(16) -> group norm of 4 groups -> SiLU -> h, and a 3x3 Conv b reading a too.
    ``form``: "op21", the GroupNormalization op; "shape" / "const" / "minus_one", PyTorch's
    export: Reshape (0, 4, -1) -> InstanceNormalization -> Reshape to Shape(a) / to (1, 16, 8, 8)
    / to (1, -1, 8, 8), then the per-channel Mul and Add."""
    op = form.startswith("op")
    g = G(opset or (int(form[2:]) if op else 13))
    a = g.conv("x", 3, 16, "a", k=3)
    if op:
        gn = g.node("GroupNormalization", [a] + norm_params(g, "gn", (16,)), "gn", num_groups=4,
                    epsilon=1e-5)
    else:
        back = {"shape": None, "const": [1, 16, 8, 8], "minus_one": [1, -1, 8, 8]}[form]
        gn = exported_group_norm(g, a, "gn", 16, 4, back and g.const("gn.back", np.array(back, np.int64)))
    h = g.conv(g.silu(gn, "act"), 16, 5, "h")
    return g.model([X], [h, g.conv(a, 16, 4, "b", k=3)])
