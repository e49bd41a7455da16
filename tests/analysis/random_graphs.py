"""Random YOLO-like graphs for the fuzz tests: a seed picks a chain of the blocks exports are
made of (Conv with or without BatchNorm and an activation, stride-2 Convs, depthwise and grouped
Convs, residual Adds, sigmoid gates, squeeze-and-excitation, Concat, Split, Slice, MaxPool,
AveragePool, Resize, Pad, SPPF) over tensors of a few channels, ending in 1x1 head Convs, one of
them flattened as a Detect output is. The same seed gives the same model."""
from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import onnx

from tests.analysis.graphs import G, exported_group_norm, norm_params

#: the opsets drawn from: Split sizes as an attribute (11), as an input (13), num_outputs allowed (18+)
OPSETS = (11, 13, 17, 18, 21)
BLOCKS = ("cbs", "cbs", "down", "dw", "group2", "residual", "gate", "se", "concat", "concat",
          "split", "slice", "maxpool", "avgpool", "up", "pad", "sppf", "affine", "repvgg", "deconv",
          "mish", "spatial", "shared", "s2d")
#: drawn from too with ``extra`` (the same seed then gives another graph): InstanceNormalization,
#: a depthwise Conv with two outputs per input, a Resize to another map's size read by Shape, a
#: group norm (the GroupNormalization op from opset 21, else as PyTorch exports nn.GroupNorm)
EXTRA_BLOCKS = ("instnorm", "dwmult", "sizeof", "groupnorm")


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.g = G(int(self.rng.choice(OPSETS)), seed)
        self.live: Dict[str, Tuple[int, int]] = {}    # tensor -> (channels, height = width)
        self.used: Set[str] = set()      # tensors a block has read
        self.k = 0

    def name(self, kind: str) -> str:
        self.k += 1
        return f"{kind}{self.k}"

    def take(self, t: str) -> Tuple[int, int]:
        self.used.add(t)
        return self.live[t]

    def add(self, t: str, c: int, h: int) -> str:
        self.live[t] = (c, h)
        return t

    def width(self) -> int:
        return int(self.rng.choice((4, 6, 8, 12)))

    def act(self, x: str, name: str) -> str:
        g, kind = self.g, self.rng.choice(("silu", "silu", "relu", "leaky", "hardswish", "clip", "none"))
        if kind == "silu":
            return g.silu(x, name)
        if kind == "relu":
            return g.node("Relu", [x], name)
        if kind == "leaky":
            return g.node("LeakyRelu", [x], name, alpha=0.1)
        if kind == "hardswish":
            return g.node("HardSwish", [x], name) if g.opset >= 14 else g.silu(x, name)
        if kind == "clip":
            lo, hi = g.const(name + ".lo", np.float32(0)), g.const(name + ".hi", np.float32(6))
            return g.node("Clip", [x, lo, hi], name)
        return x

    def conv(self, x: str, cout: int, k: int = 1, stride: int = 1, group: int = 1,
             bn: bool = False, act: bool = True) -> str:
        """Conv (+ BatchNorm) + activation; returns the new live tensor."""
        c, h = self.take(x)
        g, name = self.g, self.name("conv")
        w = self.rng.normal(0, 1, (cout, c // group, k, k)) / np.sqrt(c // group * k * k)
        ins = [x, g.const(name + ".w", w.astype(np.float32))]
        if not bn:
            ins.append(g.const(name + ".b", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        y = g.node("Conv", ins, name, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2,
                   group=group)
        if bn:
            y = self.batchnorm(y, cout, name + ".bn", 1e-3)
        h2 = (h + 2 * (k // 2) - k) // stride + 1
        return self.add(self.act(y, name + ".act") if act else y, cout, h2)

    def batchnorm(self, x: str, c: int, name: str, eps: float) -> str:
        """BatchNormalization ``name`` of ``c`` channels with random parameters (constants name0..3)."""
        p = [self.rng.uniform(0.5, 1.5, c), self.rng.normal(0, 0.1, c), self.rng.normal(0, 0.1, c),
             self.rng.uniform(0.5, 1.5, c)]
        params = [self.g.const(f"{name}{i}", v.astype(np.float32)) for i, v in enumerate(p)]
        return self.g.node("BatchNormalization", [x] + params, name, epsilon=eps)

    def cbs(self, x: str) -> str:
        return self.conv(x, self.width(), k=int(self.rng.choice((1, 3))), bn=bool(self.rng.random() < 0.4))

    def block(self, kind: str, x: str) -> List[str]:
        """Add one block reading ``x`` (and maybe other live tensors); the tensors it makes. A
        block whose shape does not suit ``x`` (a stride-2 Conv on a 2x2 map) is a Conv instead."""
        c, h = self.live[x]
        method = getattr(self, "_" + kind, None)   # "cbs" has none: a Conv
        made = method(x, c, h) if method else None
        return [self.cbs(x)] if made is None else made

    def _down(self, x: str, c: int, h: int) -> Optional[List[str]]:
        if h < 4:
            return None
        return [self.conv(x, self.width(), k=3, stride=2, bn=bool(self.rng.random() < 0.5))]

    def _dw(self, x: str, c: int, h: int) -> Optional[List[str]]:
        return [self.conv(x, c, k=3, group=c, bn=bool(self.rng.random() < 0.5))]

    def _group2(self, x: str, c: int, h: int) -> Optional[List[str]]:
        if c % 2:
            return None
        return [self.conv(x, 2 * int(self.rng.choice((2, 3, 4))), k=3, group=2)]

    def _residual(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        y = self.conv(self.conv(x, self.width()), c, k=3)
        self.take(x)
        self.take(y)
        return [self.add(g.node("Add", [x, y], self.name("add")), c, h)]

    def _gate(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        s = g.node("Sigmoid", [self.conv(x, c)], self.name("gsig"))
        self.take(x)
        return [self.add(g.node("Mul", [x, s], self.name("gate")), c, h)]

    def _se(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        n = self.name("se")
        self.take(x)
        p = g.node("GlobalAveragePool", [x], n + ".gap")
        r = max(2, c // 2)
        w1 = g.const(n + ".w1", (self.rng.normal(0, 1, (r, c, 1, 1)) / np.sqrt(c)).astype(np.float32))
        w2 = g.const(n + ".w2", (self.rng.normal(0, 1, (c, r, 1, 1)) / np.sqrt(r)).astype(np.float32))
        z = g.node("Relu", [g.node("Conv", [p, w1], n + ".fc1")], n + ".relu")
        s = g.node("Sigmoid", [g.node("Conv", [z, w2], n + ".fc2")], n + ".sig")
        return [self.add(g.node("Mul", [x, s], n), c, h)]

    def _concat(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        others = [t for t, (_, th) in self.live.items() if th == h and t != x]
        picked = list(self.rng.choice(others, size=min(len(others), int(self.rng.integers(1, 3))),
                                      replace=False)) if others else [self.cbs(x)]
        if self.live[picked[0]][1] != h:   # cbs keeps the size; kept for clarity
            return []
        parts = [x] + [str(t) for t in picked]
        for t in parts:
            self.take(t)
        return [self.add(g.node("Concat", parts, self.name("cat"), axis=1),
                         sum(self.live[t][0] for t in parts), h)]

    def _split(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        if c < 2:
            return None
        a = int(self.rng.integers(1, c))
        self.take(x)
        n = self.name("split")
        if g.opset < 13:
            outs = g.node("Split", [x], n, n_out=2, axis=1, split=[a, c - a])
        elif g.opset >= 18 and c % 2 == 0 and self.rng.random() < 0.5:
            a = c // 2
            outs = g.node("Split", [x], n, n_out=2, axis=1, num_outputs=2)
        else:
            outs = g.node("Split", [x, g.const(n + ".sizes", np.array([a, c - a], np.int64))], n,
                          n_out=2, axis=1)
        return [self.add(outs[0], a, h), self.add(outs[1], c - a, h)]

    def _slice(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        if c < 3:
            return None
        lo = int(self.rng.integers(0, c - 1))
        hi = int(self.rng.integers(lo + 1, c + 1))
        end = hi - c if hi < c and self.rng.random() < 0.3 else (2 ** 62 if hi == c else hi)
        n = self.name("slice")
        self.take(x)
        ins = [x] + [g.const(n + suffix, np.array([v], np.int64))
                     for suffix, v in ((".s", lo), (".e", end), (".a", 1))]
        variant = self.rng.random()
        if variant < 0.25:       # every other channel (a step on the channel axis)
            ins.append(g.const(n + ".step", np.array([2], np.int64)))
            return [self.add(g.node("Slice", ins, n), len(range(lo, hi, 2)), h)]
        if variant < 0.45:       # channels picked by a Gather on axis 1
            idx = np.sort(self.rng.choice(c, size=int(self.rng.integers(1, c)), replace=False))
            return [self.add(g.node("Gather", [x, g.const(n + ".idx", idx.astype(np.int64))], n, axis=1),
                             len(idx), h)]
        return [self.add(g.node("Slice", ins, n), hi - lo, h)]

    def _maxpool(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        self.take(x)
        if h >= 4 and self.rng.random() < 0.4:
            return [self.add(g.node("MaxPool", [x], self.name("mp"), kernel_shape=[2, 2], strides=[2, 2]),
                             c, h // 2)]
        return [self.add(g.node("MaxPool", [x], self.name("mp"), kernel_shape=[5, 5], pads=[2] * 4),
                         c, h)]

    def _avgpool(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        self.take(x)
        return [self.add(g.node("AveragePool", [x], self.name("ap"), kernel_shape=[3, 3], pads=[1] * 4,
                                count_include_pad=int(self.rng.integers(0, 2))), c, h)]

    def _up(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        if h > 16:
            return None
        n = self.name("up")
        self.take(x)
        roi = g.const(n + ".roi", np.zeros(0, np.float32))
        if self.rng.random() < 0.4:   # by output sizes, as dynamic-shape exports write it
            sizes = g.const(n + ".sizes", np.array([1, c, 2 * h, 2 * h], np.int64))
            no_scales = g.const(n + ".scales", np.zeros(0, np.float32))
            return [self.add(g.node("Resize", [x, roi, no_scales, sizes], n, mode="nearest"), c, 2 * h)]
        scales = g.const(n + ".scales", np.array([1, 1, 2, 2], np.float32))
        return [self.add(g.node("Resize", [x, roi, scales], n, mode="nearest"), c, 2 * h)]

    def _pad(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        n = self.name("pad")
        self.take(x)
        pads = g.const(n + ".pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
        return [self.add(g.node("Pad", [x, pads], n), c, h + 2)]

    def _affine(self, x: str, c: int, h: int) -> Optional[List[str]]:
        """A per-channel scale and shift, as a Mul and an Add (or Sub, Div)."""
        g = self.g
        n = self.name("aff")
        self.take(x)
        op1, op2 = ("Mul", "Add") if self.rng.random() < 0.5 else ("Div", "Sub")
        scale = g.const(n + ".s", self.rng.uniform(0.5, 2, (1, c, 1, 1)).astype(np.float32))
        shift = g.const(n + ".t", self.rng.normal(0, 0.1, (c, 1, 1)).astype(np.float32))
        return [self.add(g.node(op2, [g.node(op1, [x, scale], n + ".m"), shift], n), c, h)]

    def _repvgg(self, x: str, c: int, h: int) -> Optional[List[str]]:
        """3x3 + 1x1 (+ the input through a BatchNorm) summed, then ReLU."""
        g = self.g
        n = self.name("rep")
        cout = c if self.rng.random() < 0.6 else self.width()
        y3, y1 = self.conv(x, cout, k=3, bn=True, act=False), self.conv(x, cout, k=1, bn=True, act=False)
        branches = [y3, y1]
        if cout == c:
            branches.append(self.batchnorm(x, c, n + ".id", 1e-5))
            self.take(x)
        for t in (y3, y1):
            self.take(t)
        total = branches[0]
        for i, b in enumerate(branches[1:]):
            total = g.node("Add", [total, b], f"{n}.add{i}")
        return [self.add(g.node("Relu", [total], n), cout, h)]

    def _deconv(self, x: str, c: int, h: int) -> Optional[List[str]]:
        """ConvTranspose kernel 2 stride 2 (YOLOv6's upsampling)."""
        g = self.g
        if h > 16:
            return None
        n = self.name("deconv")
        self.take(x)
        cout = self.width()
        w = g.const(n + ".w", (self.rng.normal(0, 1, (c, cout, 2, 2)) / np.sqrt(c)).astype(np.float32))
        ins = [x, w] + ([g.const(n + ".b", self.rng.normal(0, 0.1, cout).astype(np.float32))]
                        if self.rng.random() < 0.5 else [])
        y = g.node("ConvTranspose", ins, n, kernel_shape=[2, 2], strides=[2, 2])
        return [self.add(self.act(y, n + ".act"), cout, 2 * h)]

    def _mish(self, x: str, c: int, h: int) -> Optional[List[str]]:
        """X * tanh(softplus(x)), as exporters write Mish before opset 18."""
        g = self.g
        n = self.name("mish")
        self.take(x)
        t = g.node("Tanh", [g.node("Softplus", [x], n + ".sp")], n + ".tanh")
        return [self.add(g.node("Mul", [x, t], n), c, h)]

    def _spatial(self, x: str, c: int, h: int) -> Optional[List[str]]:
        """CBAM's spatial gate: mean and max over the channels."""
        g = self.g
        n = self.name("sa")
        self.take(x)
        if g.opset >= 18:
            ax = g.const(n + ".axes", np.array([1], np.int64))
            mean = g.node("ReduceMean", [x, ax], n + ".mean", keepdims=1)
            mx = g.node("ReduceMax", [x, ax], n + ".max", keepdims=1)
        else:
            mean = g.node("ReduceMean", [x], n + ".mean", axes=[1], keepdims=1)
            mx = g.node("ReduceMax", [x], n + ".max", axes=[1], keepdims=1)
        cat = g.node("Concat", [mean, mx], n + ".cat", axis=1)
        w = g.const(n + ".w", (self.rng.normal(0, 1, (1, 2, 3, 3)) / 4).astype(np.float32))
        gate = g.node("Sigmoid", [g.node("Conv", [cat, w], n + ".conv", kernel_shape=[3, 3],
                                         pads=[1] * 4)], n + ".sig")
        return [self.add(g.node("Mul", [x, gate], n), c, h)]

    def _shared(self, x: str, c: int, h: int) -> Optional[List[str]]:
        """One weight read by two Convs (a module called twice)."""
        g = self.g
        others = [t for t, (tc, _) in self.live.items() if tc == c and t not in (x, "x")]
        if not others:
            return [self.cbs(x)]
        other = str(self.rng.choice(others))
        n = self.name("shared")
        cout = self.width()
        w = g.const(n + ".w", (self.rng.normal(0, 1, (cout, c, 1, 1)) / np.sqrt(c)).astype(np.float32))
        outs = []
        for i, t in enumerate((x, other)):
            _, th = self.take(t)
            outs.append(self.add(g.node("Conv", [t, w], f"{n}.{i}"), cout, th))
        return outs

    def _s2d(self, x: str, c: int, h: int) -> Optional[List[str]]:
        """SpaceToDepth, then a Conv reads it."""
        g = self.g
        if h < 4 or h % 2:
            return None
        self.take(x)
        y = self.add(g.node("SpaceToDepth", [x], self.name("s2d"), blocksize=2), 4 * c, h // 2)
        return [self.conv(y, self.width())]

    def _instnorm(self, x: str, c: int, h: int) -> Optional[List[str]]:
        """A Conv, InstanceNormalization, an activation (IBN-Net)."""
        g = self.g
        y = self.conv(x, self.width(), act=False)
        cy = self.take(y)[0]
        n = self.name("in")
        z = g.node("InstanceNormalization", [y] + norm_params(g, n, (cy,), self.rng), n)
        return [self.add(self.act(z, n + ".act"), cy, h)]

    def _groupnorm(self, x: str, c: int, h: int) -> Optional[List[str]]:
        """A Conv, a group norm of 2 or 3 groups, an activation: the GroupNormalization op at
        opset 21, else Reshape (0, G, -1) -> InstanceNormalization -> Reshape back (to the
        Conv's Shape, or a constant with a -1 batch) -> per-channel Mul and Add."""
        g, r = self.g, self.rng
        y = self.conv(x, 12, act=False)
        groups, n = int(r.choice((2, 3))), self.name("gn")
        self.take(y)
        if g.opset >= 21:
            z = g.node("GroupNormalization", [y] + norm_params(g, n, (12,), r), n, num_groups=groups,
                       epsilon=1e-5)
        else:
            back = None if r.random() < 0.5 else g.const(n + ".back", np.array([-1, 12, h, h], np.int64))
            z = exported_group_norm(g, y, n, 12, groups, back, r)
        return [self.add(self.act(z, n + ".act"), 12, h)]

    def _dwmult(self, x: str, c: int, h: int) -> Optional[List[str]]:
        return [self.conv(x, 2 * c, k=3, group=c)]

    def _sizeof(self, x: str, c: int, h: int) -> Optional[List[str]]:
        """``F.interpolate(x, size=other.shape[-2:])`` as an export writes it: Shape of x sliced
        to (N, C), Shape of another live map sliced to (H, W), Concat, Resize by those sizes."""
        g = self.g
        others = [t for t, (_, th) in self.live.items() if th != h and t != "x"]
        if not others:
            return None
        o = str(others[int(self.rng.integers(0, len(others)))])
        n = self.name("sizeof")
        self.take(x)

        def part(t: str, a: int, b: int, tag: str) -> str:
            bounds = [g.const(f"{n}.{tag}{i}", np.array([v], np.int64)) for i, v in enumerate((a, b, 0))]
            return g.node("Slice", [g.node("Shape", [t], f"{n}.shape_{tag}")] + bounds, f"{n}.{tag}")

        sizes = g.node("Concat", [part(x, 0, 2, "nc"), part(o, 2, 4, "hw")], n + ".sizes", axis=0)
        roi = g.const(n + ".roi", np.zeros(0, np.float32))
        no_scales = g.const(n + ".scales", np.zeros(0, np.float32))
        return [self.add(g.node("Resize", [x, roi, no_scales, sizes], n, mode="nearest"), c, self.live[o][1])]

    def _sppf(self, x: str, c: int, h: int) -> Optional[List[str]]:
        g = self.g
        y = self.conv(x, self.width())
        cy = self.live[y][0]
        pools = [y]
        for _ in range(3):
            pools.append(g.node("MaxPool", [pools[-1]], self.name("sppf"), kernel_shape=[5, 5],
                                pads=[2] * 4))
        self.take(y)
        cat = self.add(g.node("Concat", pools, self.name("sppfcat"), axis=1), 4 * cy, h)
        return [self.conv(cat, self.width())]


def random_yolo_like(seed: int, steps: int = 0, messy: bool = False, extra: bool = False) -> onnx.ModelProto:
    """A random graph from ``seed`` (``steps`` blocks, default 6-13, drawn from BLOCKS, and
    EXTRA_BLOCKS too with ``extra``) on a 1x3x16x16 input; every
    tensor no block reads feeds a 1x1 head Conv, and one head is flattened as a Detect output
    (Reshape to (1, 1, K, H*W), Transpose) so its channels cannot be pruned. ``messy`` makes it
    as exporters do: a dynamic batch read back by Shape, Gather, Unsqueeze and Concat for the
    Reshape, a quarter of the nodes unnamed, a third of the constants as Constant nodes."""
    b = _Builder(seed)
    b.add("x", 3, 16)
    x = b.conv("x", b.width(), k=3, bn=bool(b.rng.random() < 0.5))
    for _ in range(steps or int(b.rng.integers(6, 14))):
        made = b.block(str(b.rng.choice(BLOCKS + EXTRA_BLOCKS if extra else BLOCKS)), x)
        if made:
            x = str(made[int(b.rng.integers(0, len(made)))])
    g, outs = b.g, []
    ends = [t for t in b.live if t != "x" and t not in b.used]
    for i, t in enumerate(ends):
        c, h = b.take(t)
        k = 5 + int(b.rng.integers(0, 4))
        y = g.conv(t, c, k, f"head{i}")
        if i == 0:
            shape = g.const(f"head{i}.shape", np.array([1, 1, k, h * h], np.int64))
            if messy:
                shape = _batch_from_shape(g, y, f"head{i}", [1, k, h * h])
            y = g.node("Transpose", [g.node("Reshape", [y, shape], f"head{i}.flat")], f"head{i}.t",
                       perm=[0, 1, 3, 2])
        outs.append(y)
    model = g.model([("x", ("N" if messy else 1, 3, 16, 16))], outs)
    return _mess_up(model, b.rng) if messy else model


def _batch_from_shape(g: G, y: str, name: str, rest: List[int]) -> str:
    """The target (batch of ``y``, *rest) computed as a TorchScript export computes it."""
    first = g.const(name + ".i0", np.array(0, np.int64))
    n = g.node("Gather", [g.node("Shape", [y], name + ".shape"), first], name + ".batch", axis=0)
    if g.opset >= 13:
        n = g.node("Unsqueeze", [n, g.const(name + ".ax", np.array([0], np.int64))], name + ".unsq")
    else:
        n = g.node("Unsqueeze", [n], name + ".unsq", axes=[0])
    return g.node("Concat", [n, g.const(name + ".rest", np.array(rest, np.int64))], name + ".target", axis=0)


def _mess_up(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """A quarter of the nodes unnamed; a third of the initializers as Constant nodes, first."""
    for n in model.graph.node:
        if rng.random() < 0.25:
            n.name = ""
    moved = [t for t in model.graph.initializer if rng.random() < 0.33]
    consts = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in moved]
    keep = [t for t in model.graph.initializer if all(t is not m for m in moved)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


__all__ = ["random_yolo_like", "OPSETS", "BLOCKS", "EXTRA_BLOCKS"]
