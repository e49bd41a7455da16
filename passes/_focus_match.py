"""Matcher for the Focus stem: the BxB pixel phases of one image tensor stacked on channels.

Read-only. Recognized encodings (B is the block size, 2 for Focus):
- ``Concat`` (axis 1) of B*B phase tensors, each a chain of ``Slice`` nodes (attribute form before
  opset 10, input form after; per-axis chained or one Slice over both axes, any order, ends as huge
  sentinels, negative or positional axes) reading the same tensor, or a reshaped 6-D view
  ``(N, C, H/B, B, W/B, B)`` sliced to one offset per block axis (the only way to write a phase
  with opset < 10 Slice, which has no steps);
- ``SpaceToDepth`` (DCR channel order: channel (bh*B + bw)*C + c);
- ``Reshape -> Transpose -> Reshape`` pixel unshuffle (torch ``pixel_unshuffle``), any channel order.

The result maps every channel k of the phase tensor to ``(c, a, b)``: input channel c at row
offset a and column offset b, so that ``phases[:, k, i, j] == x[:, c, B*i + a, B*j + b]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

import onnx_graphsurgeon as gs

from onnxslim_yolo import ir

from ._conv_util import static_shape

#: placeholder for an unknown dim: large and divisible by any block size that matters
_UNKNOWN = 2 ** 40
Prog = Tuple[int, int, int]  # (start, step, count) in the indices of the base tensor


@dataclass(frozen=True)
class Phase:
    """One phase tensor: ``base[:, :, a::B, b::B]``; ``problem`` says why it is not exact."""

    base: gs.Tensor
    block: int
    a: int
    b: int
    nodes: Tuple[gs.Node, ...]
    problem: str = ""


@dataclass(frozen=True)
class FocusMatch:
    """A phase tensor ``out`` produced by ``head`` from ``base`` through ``nodes``."""

    base: gs.Tensor
    block: int
    channels: Tuple[Tuple[int, int, int], ...]  # k -> (c, a, b)
    head: gs.Node
    out: gs.Tensor
    nodes: Tuple[gs.Node, ...]
    encoding: str


Match = Union[FocusMatch, str, None]  # a match, a refusal reason, or not a Focus at all


def _batched_shape(t: gs.Tensor) -> Optional[Tuple[int, ...]]:
    """The tensor's shape when every dim but the batch is a known positive int, the batch then
    :data:`_UNKNOWN` when it is not one: a phase keeps the whole batch, whatever it is (a dynamic
    batch was refused as 'unknown H/W')."""
    dims = getattr(t, "shape", None)
    if not dims or any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
        return None
    return (dims[0] if isinstance(dims[0], int) and dims[0] > 0 else _UNKNOWN, *dims[1:])


# ------------------------------------------------------------------------------ Slice algebra
def slice_params(node: gs.Node, rank: int) -> Optional[List[Tuple[int, int, int, int]]]:
    """``[(axis, start, end, step)]`` of a Slice with constant parameters, else None."""
    if "starts" in node.attrs:  # opset < 10: attributes, no steps
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        vals = []
        for i in range(1, 5):
            t = node.inputs[i] if len(node.inputs) > i else None
            if t is None or (isinstance(t, gs.Variable) and not t.name):
                vals.append(None)
                continue
            v = ir.const_value(t)
            if v is None:
                return None
            vals.append([int(x) for x in v.reshape(-1)])
        starts, ends, axes, steps = vals
        if starts is None or ends is None:
            return None
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps):
        return None
    return [(int(ax) + rank if int(ax) < 0 else int(ax), int(s), int(e), int(st))
            for ax, s, e, st in zip(axes, starts, ends, steps)]


def compose(prog: Prog, start: int, end: int, step: int) -> Optional[Prog]:
    """Apply ``[start:end:step]`` (ONNX clamping) to a selection; None for steps <= 0."""
    s0, st0, n0 = prog
    if step <= 0:
        return None
    start = min(max(start + n0 if start < 0 else start, 0), n0)
    end = min(max(end + n0 if end < 0 else end, 0), n0)
    count = max(0, -(-(end - start) // step))
    return s0 + start * st0, st0 * step, count


def _slice_chain(t: gs.Tensor) -> Tuple[gs.Tensor, List[gs.Node]]:
    """Walk up through Slice producers; returns (tensor above the chain, slices bottom-up)."""
    chain: List[gs.Node] = []
    p = ir.producer(t)
    while p is not None and p.op == "Slice":
        chain.append(p)
        t = p.inputs[0]
        p = ir.producer(t)
    return t, chain


def _select(base: gs.Tensor, chain: Sequence[gs.Node], rank: int) -> Optional[List[Prog]]:
    dims = _batched_shape(base) or (_UNKNOWN,) * rank
    if len(dims) != rank:
        return None
    progs: List[Prog] = [(0, 1, d) for d in dims]
    for node in reversed(chain):
        params = slice_params(node, rank)
        if params is None:
            return None
        for axis, s, e, st in params:
            if not 0 <= axis < rank:
                return None
            nxt = compose(progs[axis], s, e, st)
            if nxt is None:
                return None
            progs[axis] = nxt
    return progs


# --------------------------------------------------------------------------------- phases
def _phase_4d(t: gs.Tensor) -> Optional[Phase]:
    base, chain = _slice_chain(t)
    if not chain:
        return None
    progs = _select(base, chain, 4)
    if progs is None:
        return None
    (_, _, _), (_, _, _), (ha, hb, _), (wa, wb, _) = progs
    if hb != wb or hb < 2:
        return None  # not a stride-B spatial phase: some other use of Slice
    block = hb
    shape = _batched_shape(base)
    nodes = tuple(chain)
    if shape is None:
        return Phase(base, block, ha, wa, nodes, f"input '{base.name}' has unknown channels or H/W")
    n, c, h, w = shape
    if h % block or w % block:
        return Phase(base, block, ha, wa, nodes,
                     f"input '{base.name}' H/W {h}x{w} not divisible by {block} (odd size)")
    if progs[0] != (0, 1, n) or progs[1] != (0, 1, c):
        return Phase(base, block, ha, wa, nodes, "the slices also crop batch or channels")
    if not (0 <= ha < block and 0 <= wa < block and progs[2][2] == h // block
            and progs[3][2] == w // block):
        return Phase(base, block, ha, wa, nodes, "a slice does not keep a whole stride-"
                     f"{block} phase (rows {progs[2]}, cols {progs[3]} of {h}x{w})")
    return Phase(base, block, ha, wa, nodes)


def _view6(t: gs.Tensor) -> Optional[Tuple[gs.Tensor, gs.Node, int]]:
    """(x, reshape) when ``t = Reshape(x)`` is the (N, C, H/B, B, W/B, B) view of a 4-D x."""
    p = ir.producer(t)
    if p is None or p.op != "Reshape":
        return None
    x = p.inputs[0]
    xs, vs = static_shape(x), static_shape(t)
    if xs is None or vs is None or len(xs) != 4 or len(vs) != 6:
        return None
    n, c, h, w = xs
    blk = vs[3]
    if blk < 2 or vs[5] != blk or vs != (n, c, h // blk, blk, w // blk, blk) or h % blk or w % blk:
        return None
    return x, p, blk


def _phase_6d(t: gs.Tensor) -> Optional[Phase]:
    """Phase written as Reshape(6-D) -> Slice(one offset per block axis) -> Reshape/Squeeze."""
    tail = ir.producer(t)
    if tail is None or tail.op not in ("Reshape", "Squeeze"):
        return None
    v, chain = _slice_chain(tail.inputs[0])
    view = _view6(v) if chain else None
    if view is None:
        return None
    x, reshape, blk = view
    progs = _select(v, chain, 6)
    ts = static_shape(t)
    vs = static_shape(v)
    if progs is None or vs is None or ts != (vs[0], vs[1], vs[2], vs[4]):
        return None
    full = all(progs[i] == (0, 1, vs[i]) for i in (0, 1, 2, 4))
    if not (full and progs[3][2] == 1 and progs[5][2] == 1):
        return None
    return Phase(x, blk, progs[3][0], progs[5][0], (tail, *chain, reshape))


def phase_of(t: gs.Tensor) -> Optional[Phase]:
    return _phase_4d(t) or _phase_6d(t)


# --------------------------------------------------------------------------------- matchers
def _channel_axis(node: gs.Node, rank: int) -> int:
    axis = int(node.attrs.get("axis", 1))
    return axis + rank if axis < 0 else axis


def match_concat(node: gs.Node) -> Match:
    """A Concat of phases of one tensor (see module docstring)."""
    phases = [phase_of(t) for t in node.inputs]
    if not any(phases):
        return None
    if _channel_axis(node, 4) != 1:
        return None
    if not all(phases):
        return "some Concat inputs are not stride-B phases of the same tensor"
    bad = next((p.problem for p in phases if p.problem), "")  # type: ignore[union-attr]
    if bad:
        return bad
    base, block = phases[0].base, phases[0].block  # type: ignore[union-attr]
    if any(p.base is not base or p.block != block for p in phases):  # type: ignore[union-attr]
        return "the phases read different tensors or use different strides"
    offsets = [(p.a, p.b) for p in phases]  # type: ignore[union-attr]
    if len(phases) != block * block or len(set(offsets)) != block * block:
        return f"the Concat holds phases {offsets}, not each of the {block * block} once"
    c = _batched_shape(base)[1]  # type: ignore[index]
    channels = tuple((ci, a, b) for a, b in offsets for ci in range(c))
    unique = {id(n): n for p in phases for n in p.nodes}  # type: ignore[union-attr]
    nodes = tuple(unique.values())
    enc = "slice-6d" if any(n.op == "Reshape" for n in nodes) else "slice"
    return FocusMatch(base, block, channels, node, node.outputs[0], nodes, enc)


def match_space_to_depth(node: gs.Node) -> Match:
    blk = int(node.attrs.get("blocksize", 0))
    x = node.inputs[0]
    shape = _batched_shape(x)
    if shape is None or len(shape) != 4:
        return f"input '{x.name}' has unknown channels or H/W"
    n, c, h, w = shape
    if blk < 2 or h % blk or w % blk:
        return f"input '{x.name}' H/W {h}x{w} not divisible by blocksize {blk}"
    channels = tuple((ci, bh, bw) for bh in range(blk) for bw in range(blk) for ci in range(c))
    return FocusMatch(x, blk, channels, node, node.outputs[0], (), "space-to-depth")


def match_pixel_unshuffle(node: gs.Node) -> Match:
    """Reshape(N, C*B*B, H/B, W/B) <- Transpose <- Reshape(N, C, H/B, B, W/B, B) <- x."""
    tr = ir.producer(node.inputs[0])
    if tr is None or tr.op != "Transpose":
        return None
    view = _view6(tr.inputs[0])
    if view is None:
        return None
    x, reshape, blk = view
    perm = [int(p) for p in tr.attrs.get("perm", [])]
    n, c, h, w = static_shape(x)  # type: ignore[misc]
    if (len(perm) != 6 or perm[0] != 0 or perm[4:] != [2, 4] or sorted(perm[1:4]) != [1, 3, 5]
            or static_shape(node.outputs[0]) != (n, c * blk * blk, h // blk, w // blk)):
        return None
    sizes = {1: c, 3: blk, 5: blk}
    channels = []
    for k in range(c * blk * blk):
        idx: Dict[int, int] = {}
        rem = k
        for ax in reversed(perm[1:4]):  # row-major: the last axis varies fastest
            rem, idx[ax] = divmod(rem, sizes[ax])
        channels.append((idx[1], idx[3], idx[5]))
    return FocusMatch(x, blk, tuple(channels), node, node.outputs[0], (tr, reshape), "pixel-unshuffle")


def match(node: gs.Node) -> Match:
    if node.op == "Concat":
        return match_concat(node)
    if node.op == "SpaceToDepth":
        return match_space_to_depth(node)
    if node.op == "Reshape":
        return match_pixel_unshuffle(node)
    return None


def private_nodes_problem(m: FocusMatch, outputs: Set[str]) -> str:
    """A reason when an intermediate tensor of the match is read outside it, else ""."""
    inside = set(map(id, m.nodes)) | {id(m.head)}
    for n in m.nodes:
        for t in n.outputs:
            if t.name in outputs:
                return f"'{t.name}' of {n.op} '{n.name}' is a graph output"
            for c in t.outputs:
                if id(c) not in inside:
                    return f"{n.op} '{n.name}' output also feeds {c.op} '{c.name}'"
    return ""
