"""Random YOLO-like graphs for the fuzz tests: a seed picks a chain of the blocks exports are
made of (Conv with or without BatchNorm and an activation, stride-2 Convs, depthwise and grouped
Convs, residual Adds, sigmoid gates, squeeze-and-excitation, Concat, Split, Slice, MaxPool,
AveragePool, Resize, Pad, SPPF) over tensors of a few channels, ending in 1x1 head Convs, one of
them flattened as a Detect output is. The same seed gives the same model."""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import onnx

from tests.analysis.graphs import G

#: the opsets drawn from: Split sizes as an attribute (11), as an input (13), num_outputs allowed (18)
OPSETS = (11, 13, 17, 18)
BLOCKS = ("cbs", "cbs", "down", "dw", "group2", "residual", "gate", "se", "concat", "concat",
          "split", "slice", "maxpool", "avgpool", "up", "pad", "sppf")


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.g = G(int(self.rng.choice(OPSETS)), seed)
        self.live: Dict[str, Tuple[int, int]] = {}    # tensor -> (channels, height = width)
        self.used: Dict[str, int] = {}
        self.k = 0

    def name(self, kind: str) -> str:
        self.k += 1
        return f"{kind}{self.k}"

    def take(self, t: str) -> Tuple[int, int]:
        self.used[t] = self.used.get(t, 0) + 1
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
             bn: bool = False) -> str:
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
            p = [self.rng.uniform(0.5, 1.5, cout), self.rng.normal(0, 0.1, cout),
                 self.rng.normal(0, 0.1, cout), self.rng.uniform(0.5, 1.5, cout)]
            names = [g.const(f"{name}.bn{i}", v.astype(np.float32)) for i, v in enumerate(p)]
            y = g.node("BatchNormalization", [y] + names, name + ".bn", epsilon=1e-3)
        h2 = (h + 2 * (k // 2) - k) // stride + 1
        return self.add(self.act(y, name + ".act"), cout, h2)

    def cbs(self, x: str) -> str:
        return self.conv(x, self.width(), k=int(self.rng.choice((1, 3))), bn=bool(self.rng.random() < 0.4))

    def block(self, kind: str, x: str) -> List[str]:
        """Add one block reading ``x`` (and maybe other live tensors); the tensors it makes."""
        g, (c, h) = self.g, self.live[x]
        if kind == "down" and h >= 4:
            return [self.conv(x, self.width(), k=3, stride=2, bn=bool(self.rng.random() < 0.5))]
        if kind == "dw":
            return [self.conv(x, c, k=3, group=c, bn=bool(self.rng.random() < 0.5))]
        if kind == "group2" and c % 2 == 0:
            return [self.conv(x, 2 * int(self.rng.choice((2, 3, 4))), k=3, group=2)]
        if kind == "residual":
            y = self.conv(self.conv(x, self.width()), c, k=3)
            self.take(x)
            self.take(y)
            return [self.add(g.node("Add", [x, y], self.name("add")), c, h)]
        if kind == "gate":
            s = g.node("Sigmoid", [self.conv(x, c)], self.name("gsig"))
            self.take(x)
            self.used[s] = 1
            return [self.add(g.node("Mul", [x, s], self.name("gate")), c, h)]
        if kind == "se":
            n = self.name("se")
            self.take(x)
            p = g.node("GlobalAveragePool", [x], n + ".gap")
            r = max(2, c // 2)
            w1 = g.const(n + ".w1", (self.rng.normal(0, 1, (r, c, 1, 1)) / np.sqrt(c)).astype(np.float32))
            w2 = g.const(n + ".w2", (self.rng.normal(0, 1, (c, r, 1, 1)) / np.sqrt(r)).astype(np.float32))
            z = g.node("Relu", [g.node("Conv", [p, w1], n + ".fc1")], n + ".relu")
            s = g.node("Sigmoid", [g.node("Conv", [z, w2], n + ".fc2")], n + ".sig")
            return [self.add(g.node("Mul", [x, s], n), c, h)]
        if kind == "concat":
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
        if kind == "split" and c >= 2:
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
        if kind == "slice" and c >= 3:
            lo = int(self.rng.integers(0, c - 1))
            hi = int(self.rng.integers(lo + 1, c + 1))
            end = hi - c if hi < c and self.rng.random() < 0.3 else (2 ** 62 if hi == c else hi)
            n = self.name("slice")
            self.take(x)
            ins = [x, g.const(n + ".s", np.array([lo], np.int64)), g.const(n + ".e", np.array([end], np.int64)),
                   g.const(n + ".a", np.array([1], np.int64))]
            return [self.add(g.node("Slice", ins, n), hi - lo, h)]
        if kind == "maxpool":
            self.take(x)
            if h >= 4 and self.rng.random() < 0.4:
                return [self.add(g.node("MaxPool", [x], self.name("mp"), kernel_shape=[2, 2], strides=[2, 2]),
                                 c, h // 2)]
            return [self.add(g.node("MaxPool", [x], self.name("mp"), kernel_shape=[5, 5], pads=[2] * 4), c, h)]
        if kind == "avgpool":
            self.take(x)
            return [self.add(g.node("AveragePool", [x], self.name("ap"), kernel_shape=[3, 3], pads=[1] * 4,
                                    count_include_pad=int(self.rng.integers(0, 2))), c, h)]
        if kind == "up" and h <= 16:
            n = self.name("up")
            self.take(x)
            scales = g.const(n + ".scales", np.array([1, 1, 2, 2], np.float32))
            roi = g.const(n + ".roi", np.zeros(0, np.float32))
            return [self.add(g.node("Resize", [x, roi, scales], n, mode="nearest"), c, 2 * h)]
        if kind == "pad":
            n = self.name("pad")
            self.take(x)
            pads = g.const(n + ".pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
            return [self.add(g.node("Pad", [x, pads], n), c, h + 2)]
        if kind == "sppf":
            y = self.conv(x, self.width())
            cy = self.live[y][0]
            pools = [y]
            for _ in range(3):
                pools.append(g.node("MaxPool", [pools[-1]], self.name("sppf"), kernel_shape=[5, 5],
                                    pads=[2] * 4))
            self.take(y)
            cat = self.add(g.node("Concat", pools, self.name("sppfcat"), axis=1), 4 * cy, h)
            return [self.conv(cat, self.width())]
        return [self.cbs(x)]


def random_yolo_like(seed: int, steps: int = 0) -> onnx.ModelProto:
    """A random graph from ``seed`` (``steps`` blocks, default 6-13) on a 1x3x16x16 input; every
    tensor no block reads feeds a 1x1 head Conv, and one head is flattened as a Detect output
    (Reshape to (1, 1, K, H*W), Transpose) so its channels cannot be pruned."""
    b = _Builder(seed)
    b.add("x", 3, 16)
    x = b.conv("x", b.width(), k=3, bn=bool(b.rng.random() < 0.5))
    for _ in range(steps or int(b.rng.integers(6, 14))):
        made = b.block(str(b.rng.choice(BLOCKS)), x)
        if made:
            x = str(made[int(b.rng.integers(0, len(made)))])
    g, outs, ranks = b.g, [], []
    ends = [t for t in b.live if t != "x" and not b.used.get(t)]
    for i, t in enumerate(ends):
        c, h = b.take(t)
        k = 5 + int(b.rng.integers(0, 4))
        y = g.conv(t, c, k, f"head{i}")
        if i == 0:
            shape = g.const(f"head{i}.shape", np.array([1, 1, k, h * h], np.int64))
            y = g.node("Transpose", [g.node("Reshape", [y, shape], f"head{i}.flat")], f"head{i}.t",
                       perm=[0, 1, 3, 2])
        outs.append(y)
        ranks.append(4)
    return g.model([("x", (1, 3, 16, 16))], outs, ranks)


__all__ = ["random_yolo_like", "OPSETS", "BLOCKS"]
