"""The structural rewrite of prune-channels: remove channel positions everywhere they appear.

Given the kept channel indices of every tensor that loses channels, slice producer Conv weights
and biases (output axis), consumer Conv weights (input axis), grouped and depthwise Convs (whole
groups, and their group count), BatchNormalization and InstanceNormalization parameters, group
norms (whole groups, analysis.group_norm), per-channel constants of element-wise ops, and
rewrite Split sizes (attribute or input, by opset), Slice bounds on the channel axis and
constant Resize 'sizes', the indices of a channel Gather, the target shapes of a channel
shuffle's Reshapes, constant Expand targets, and the Linear layers and Reshapes of a
squeeze-and-excitation gate (analysis.linear_se), and make up for the removed channels after a
mean, sum, max or min over the channel axis (CBAM). Concat offsets follow from the inputs.
Optionally the removed channels' means are folded into the consumer biases first. value_info is
dropped and shapes inferred again.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Set

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir
from onnxslim_yolo.analysis import channel_rules, group_norm, linear_se
from onnxslim_yolo.analysis.channels import ChannelAnalysis
from onnxslim_yolo.pass_base import PreconditionError

Keep = Dict[str, np.ndarray]


def keep_map(analysis: ChannelAnalysis, removed_gids: Set[int]) -> Keep:
    """Kept channel indices (sorted) of every tensor that loses at least one channel."""
    gone: Dict[str, Set[int]] = {}
    for g in analysis.groups:
        if g.gid in removed_gids:
            for t, i in g.channels:
                gone.setdefault(t, set()).add(i)
    return {t: np.array([i for i in range(analysis.channel_counts[t]) if i not in s], dtype=np.int64)
            for t, s in gone.items()}


class _Rewriter:
    def __init__(self, graph: gs.Graph, keep: Keep, analysis: ChannelAnalysis, opset: int,
                 means: Optional[Mapping[str, np.ndarray]]) -> None:
        self.graph, self.keep, self.opset = graph, keep, opset
        self.counts = analysis.channel_counts
        self.shapes = analysis.shapes
        self.means = means or {}
        self.alloc = ir.NameAllocator.for_graph(graph)
        self.touched: Set[str] = set()

    def set_input(self, node: gs.Node, i: int, value: np.ndarray, base: str) -> None:
        const = gs.Constant(self.alloc(base), np.ascontiguousarray(value))
        if i < len(node.inputs):
            node.inputs[i] = const
        else:
            while len(node.inputs) < i:
                node.inputs.append(gs.Variable.empty())
            node.inputs.append(const)
        self.touched.add(node.name)

    def rank(self, t: gs.Tensor) -> int:
        return len(self.shapes[t.name])

    def axis(self, node: gs.Node, t: gs.Tensor) -> int:
        a = int(node.attrs.get("axis", 0))
        return a + self.rank(t) if a < 0 else a

    def k(self, t: gs.Tensor) -> Optional[np.ndarray]:
        return self.keep.get(t.name) if isinstance(t, gs.Variable) else None

    def conv(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        kx, ky = self.k(x), self.k(y)
        if kx is None and ky is None:
            return
        w = ir.const_value(node.inputs[1])
        has_b = len(node.inputs) > 2 and bool(node.inputs[2].name)
        b = ir.const_value(node.inputs[2]) if has_b else np.zeros(w.shape[0], w.dtype)
        g = int(node.attrs.get("group", 1))
        if g > 1:  # whole groups go (analysis: a group's inputs and outputs are one channel)
            rows = self._group_rows(node, kx, ky, g, w.shape[0])
            node.attrs["group"] = int(len(rows) // (w.shape[0] // g))
            w, b = w[rows], b[rows]
        else:
            if kx is not None:
                b = b + self._folded(x.name, kx, w).astype(b.dtype)
                w = w[:, kx]
            if ky is not None:
                w, b = w[ky], b[ky]
        self.set_input(node, 1, w, node.inputs[1].name + "_pruned")
        if has_b or np.any(b != 0):
            self.set_input(node, 2, b, (node.inputs[2].name if has_b else node.name + "_bias") + "_pruned")

    def _group_rows(self, node: gs.Node, kx: Optional[np.ndarray], ky: Optional[np.ndarray],
                    g: int, cout: int) -> np.ndarray:
        """The weight rows (output channels) of the kept groups of a grouped Conv."""
        keep, channels = (ky, cout) if ky is not None else (kx, self.counts[node.inputs[0].name])
        try:
            kept = group_norm.kept_groups(keep, channels, g)
        except ValueError:
            why = f"prune-channels: Conv '{node.name}' would lose part of a group"
            raise PreconditionError(why) from None
        return (kept[:, None] * (cout // g) + np.arange(cout // g)).reshape(-1)

    def _folded(self, tensor: str, keep: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Bias change from replacing the removed input channels by their means."""
        mean = self.means.get(tensor)
        if mean is None:
            return np.zeros(w.shape[0])
        gone = np.setdiff1d(np.arange(w.shape[1]), keep)
        taps = w[:, gone].reshape(w.shape[0], len(gone), -1).sum(axis=2).astype(np.float64)
        return taps @ mean[gone]

    def batchnorm(self, node: gs.Node) -> None:
        """BatchNormalization's four per-channel inputs, InstanceNormalization's two."""
        k = self.k(node.outputs[0])
        if k is None:
            return
        for i in range(1, len(node.inputs)):
            v = ir.const_value(node.inputs[i])
            self.set_input(node, i, v[k], node.inputs[i].name + "_pruned")

    def elementwise(self, node: gs.Node) -> None:
        y = node.outputs[0]
        k = self.k(y)
        if k is None:
            return
        c = self.counts[y.name]
        for i, x in enumerate(node.inputs):
            v = ir.const_value(x)
            if v is None or v.ndim == 0:
                continue
            pos = 1 - (self.rank(y) - v.ndim)
            if 0 <= pos < v.ndim and v.shape[pos] == c and c > 1:
                self.set_input(node, i, np.take(v, k, axis=pos), x.name + "_pruned")

    def split(self, node: gs.Node) -> None:
        x = node.inputs[0]
        kx = self.k(x)
        if kx is None or self.axis(node, x) != 1:
            return
        sizes = np.array([len(self.keep[o.name]) if o.name in self.keep else self.counts[o.name]
                          for o in node.outputs], dtype=np.int64)
        self.touched.add(node.name)
        if self.opset < 13:
            node.attrs["split"] = [int(s) for s in sizes]
            return
        node.attrs.pop("num_outputs", None)
        self.set_input(node, 1, sizes, node.name + "_split")

    def slice(self, node: gs.Node) -> None:
        x = node.inputs[0]
        kx = self.k(x)
        if kx is None:
            return
        params = channel_rules.slice_params(node, self.rank(x))
        if params is None or 1 not in params:
            return
        s, e = channel_rules.normalized_slice(*params[1], self.counts[x.name])
        new_s = int(np.sum(kx < s))
        new_e = new_s + int(np.sum((kx >= s) & (kx < e)))
        axes = ir.const_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        axes_l = [int(a) for a in (axes if axes is not None else range(len(params)))]
        j = [a + self.rank(x) if a < 0 else a for a in axes_l].index(1)
        for i, val in ((1, new_s), (2, new_e)):
            arr = np.array(ir.const_value(node.inputs[i]), copy=True)
            arr.reshape(-1)[j] = val
            self.set_input(node, i, arr, node.inputs[i].name + "_pruned")

    def resize(self, node: gs.Node) -> None:
        k = self.k(node.outputs[0])
        if k is None or len(node.inputs) < 4 or not node.inputs[3].name:
            return
        sizes = ir.const_value(node.inputs[3])
        if sizes is None:
            return  # computed from Shape(input): follows the new channel count by itself
        sizes = np.array(sizes, copy=True)
        sizes[1] = len(k)
        self.set_input(node, 3, sizes, node.inputs[3].name + "_pruned")

    def linear_se(self, node: gs.Node) -> None:
        """A Linear excitation branch starting at ``node`` keeps the pooled tensor's channels."""
        se = linear_se.se_from(node, self.shapes)  # this graph's tensors carry no shapes
        k = self.k(se.first.inputs[0]) if se is not None else None
        if k is not None:
            linear_se.rewrite(se, k, self.set_input)

    def expand(self, node: gs.Node) -> None:
        """A constant Expand target that names the old channel count takes the new one."""
        k = self.k(node.outputs[0])
        shape = ir.const_value(node.inputs[1]) if k is not None and len(node.inputs) > 1 else None
        count = self.counts.get(node.outputs[0].name)
        if shape is not None and shape.ndim == 1 and len(shape) > 1 and shape[1] == count:
            shape = np.array(shape, copy=True)
            shape[1] = len(k)
            self.set_input(node, 1, shape, node.inputs[1].name + "_pruned")

    def reduce(self, node: gs.Node) -> None:
        """A mean, sum, max or min over the channel axis alone, of a tensor that lost channels,
        takes the removed channels as their means (zeros without ``means``): the mean is
        rescaled and shifted, the sum shifted, the max and min bounded by the removed means."""
        x, y = node.inputs[0], node.outputs[0]
        k = self.k(x)
        shape = self.shapes.get(x.name)
        if k is None or shape is None or channel_rules.axes_of(node, len(shape)) != [1]:
            return
        count = self.counts[x.name]
        mean = self.means.get(x.name)
        gone = np.setdiff1d(np.arange(count), k)
        vals = np.zeros(len(gone)) if mean is None else np.asarray(mean, np.float64)[gone]
        shift = [("Add", vals.sum() / count)] if vals.any() else []
        steps = {"ReduceMean": [("Mul", len(k) / count)] + shift,
                 "ReduceSum": [("Add", vals.sum())] if vals.any() else [],
                 "ReduceMax": [("Max", vals.max())], "ReduceMin": [("Min", vals.min())]}[node.op]
        if not steps:
            return
        src = gs.Variable(self.alloc(y.name + "_kept"), dtype=y.dtype)
        node.outputs[0] = src
        for i, (op, v) in enumerate(steps):
            last = i == len(steps) - 1
            out = y if last else gs.Variable(self.alloc(y.name + "_" + op.lower()), dtype=y.dtype)
            const = gs.Constant(self.alloc(f"{node.name}_{op.lower()}_removed"), np.array(v, np.float32))
            self.graph.nodes.append(gs.Node(op, self.alloc(f"{node.name}_{op}_removed"), inputs=[src, const],
                                            outputs=[out]))
            src = out
        self.touched.add(node.name)

    def _groups(self, node: gs.Node, fn, *args) -> None:
        try:
            fn(*args, self.set_input)
        except ValueError as exc:
            raise PreconditionError(f"prune-channels: {node.op} '{node.name}': {exc}") from None

    def group_norm(self, node: gs.Node) -> None:
        """GroupNormalization keeps its kept groups (analysis.group_norm)."""
        k = self.k(node.outputs[0])
        if k is not None:
            self._groups(node, group_norm.rewrite_op, node, k, self.counts[node.outputs[0].name])

    def reshape(self, node: gs.Node) -> None:
        """The two Reshapes of a channel shuffle (channel_rules.Shuffle, SplitShuffle) take the new
        count, and so do those of a Linear excitation branch; an exported group norm keeps its
        kept groups (analysis.group_norm)."""
        self.linear_se(node)
        gn = group_norm.exported_from(node, self.shapes)
        k = self.k(node.inputs[0]) if gn is not None else None
        if k is not None:
            return self._groups(node, group_norm.rewrite_exported, gn, k)
        split = channel_rules.split_shuffle_from(node, self.shapes)
        sh = channel_rules.shuffle_from(node, self.shapes)  # this graph's tensors carry no shapes
        k = self.k(node.inputs[0]) if split is not None or sh is not None else None
        if k is None:
            return
        if split is not None:  # (N*C/2, 2, H*W) and (2, N, C/2, H, W)
            changes = ((split.first, 0, split.batch * len(k) // 2), (split.last, 2, len(k) // 2))
        else:
            changes = ((sh.first, 2, len(k) // sh.groups), (sh.last, 1, len(k)))
        for reshape, axis, count in changes:
            target = ir.reshape_target(reshape)  # constant: shuffle_from checked it
            if target[axis] != -1:  # -1 follows the new count by itself
                target[axis] = count
                self.set_input(reshape, 1, np.array(target, np.int64), reshape.inputs[1].name + "_pruned")

    def gather(self, node: gs.Node) -> None:
        """A channel Gather (analysis: a one-way reader) keeps the indices of its kept outputs,
        renumbered into its input's kept channels."""
        x, y = node.inputs[0], node.outputs[0]
        kx, ky = self.k(x), self.k(y)
        idx = ir.const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if (kx is None and ky is None) or idx is None or idx.ndim != 1 or self.axis(node, x) != 1:
            return
        src = [int(i) % self.counts[x.name] for i in (idx if ky is None else idx[ky])]
        new = np.searchsorted(kx, src) if kx is not None else np.array(src)
        if kx is not None and not np.array_equal(kx[np.minimum(new, len(kx) - 1)], src):
            raise PreconditionError(f"prune-channels: Gather '{node.name}' reads a removed channel")
        self.set_input(node, 1, np.asarray(new, np.int64), node.inputs[1].name + "_pruned")

    def run(self) -> None:
        table = {"Conv": self.conv, "BatchNormalization": self.batchnorm, "Split": self.split,
                 "InstanceNormalization": self.batchnorm, "GroupNormalization": self.group_norm,
                 "Gather": self.gather,
                 "Slice": self.slice, "Resize": self.resize, "Reshape": self.reshape,
                 "Flatten": self.linear_se, "Squeeze": self.linear_se, "Expand": self.expand,
                 **{op: self.elementwise for op in channel_rules.ELEMENTWISE_OPS},
                 **{op: self.reduce for op in channel_rules.CHANNEL_REDUCERS}}
        for node in list(self.graph.nodes):
            fn = table.get(node.op)
            if fn is not None:
                fn(node)


def apply_keep(model: onnx.ModelProto, analysis: ChannelAnalysis, keep: Keep,
               means: Optional[Mapping[str, np.ndarray]] = None) -> onnx.ModelProto:
    """The model with only the kept channels; shapes re-inferred (checker-clean)."""
    graph = ir.to_graph(model)
    ir.name_unnamed_nodes(graph)
    _Rewriter(graph, keep, analysis, ir.opset(model), means).run()
    for t in graph.tensors().values():  # stale channel counts; inference below recomputes them
        if isinstance(t, gs.Variable) and t.name in keep:
            t.shape = None
    out = ir.to_model(graph, model)
    del out.graph.value_info[:]
    try:
        out = ir.infer_shapes(out, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreconditionError(f"prune-channels: pruned model fails shape inference: {msg}") from None
    return out
