"""Channel dependency groups: which Conv output channels must be removed together.

Every channel position ``(tensor, index)`` of a feature tensor (float, rank >= 3, static channel
count on axis 1) is a node of a networkx graph; the per-op rules in :mod:`channel_rules` link
positions that are the same channel (through activations, BN, InstanceNorm, pooling, Resize,
Split/Slice/Concat offsets, residual Add/Mul, depthwise and grouped Convs (a group's inputs and
outputs go together), spatial Pads, Reduce/Squeeze/Unsqueeze over axes
after the channel axis, ShuffleNet's channel shuffle, a fixed permutation, DepthToSpace and
SpaceToDepth, which tie a channel to its block of channels, and squeeze-and-excitation
gates written with Linear layers, :mod:`.linear_se`). A connected
component is a :class:`ChannelGroup`:
removing one of its positions means removing all of them. A group is prunable when no position is
blocked (graph input or output, Reshape/Transpose other than a channel shuffle, Gemm, ...,
protected layers, the Detect head)
and a Conv produces it (a produced channel nothing reads, e.g. cut off by a Slice, is
prunable). Read-only: the model is never changed.
"""
from __future__ import annotations

import fnmatch
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..pass_base import UsageError
from . import channel_rules
from .flops import _shape_table, infer_static, node_macs

log = logging.getLogger(__name__)

Position = Tuple[str, int]
ClusterKey = Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]


@dataclass(frozen=True)
class Role:
    """A weight slot tied to one channel: ``kind`` is producer (Conv output channel), consumer
    (dense Conv input channel), depthwise (output channel of a depthwise or grouped Conv), bn,
    norm (InstanceNormalization), groupnorm (output channel of a group norm, either form of
    analysis.group_norm; ``node`` is the node holding its bias) or const (per-channel constant of
    an element-wise op)."""

    kind: str
    node: str
    tensor: str
    index: int


@dataclass(frozen=True)
class ChannelGroup:
    """Channel positions that are removed together, the weight slots they touch, and the
    multiply-adds saved by removing them (first order: this group alone)."""

    gid: int
    channels: FrozenSet[Position]
    roles: Tuple[Role, ...]
    macs: int
    reasons: Tuple[str, ...]

    @property
    def prunable(self) -> bool:
        return not self.reasons

    def of_kind(self, kind: str) -> Tuple[Role, ...]:
        return tuple(r for r in self.roles if r.kind == kind)

    @property
    def producers(self) -> Tuple[Role, ...]:
        return self.of_kind("producer")

    @property
    def consumers(self) -> Tuple[Role, ...]:
        return self.of_kind("consumer")

    @property
    def key(self) -> ClusterKey:
        """Groups with the same producers, consumers and depthwise members form one layer."""
        return tuple(tuple(sorted({r.node for r in self.of_kind(k)}))  # type: ignore[return-value]
                     for k in ("producer", "consumer", "depthwise"))


@dataclass(frozen=True)
class ConvInfo:
    name: str
    weight_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    group: int

    @property
    def taps(self) -> int:
        return int(np.prod(self.weight_shape[2:]))

    @property
    def positions(self) -> int:
        """Output positions over batch and space (a static batch of N costs N times the MACs)."""
        return int(np.prod(self.out_shape)) // max(int(self.out_shape[1]), 1)

    @property
    def macs(self) -> int:
        return int(np.prod(self.weight_shape)) * self.positions


@dataclass
class ChannelAnalysis:
    groups: List[ChannelGroup]
    channel_counts: Dict[str, int]
    convs: Dict[str, ConvInfo]
    total_macs: int
    protected: Tuple[str, ...] = ()
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    def prunable_groups(self) -> List[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def clusters(self) -> Dict[ClusterKey, List[ChannelGroup]]:
        """Prunable groups by layer (same producers/consumers), in channel order."""
        out: Dict[ClusterKey, List[ChannelGroup]] = defaultdict(list)
        for g in self.prunable_groups():
            out[g.key].append(g)
        return dict(out)

    def blocked_reasons(self) -> Counter:
        """How many groups each reason blocks."""
        c: Counter = Counter()
        for g in self.groups:
            for r in g.reasons:
                c[r] += 1
        return c

    def group_of(self, tensor: str, index: int) -> Optional[ChannelGroup]:
        for g in self.groups:
            if (tensor, index) in g.channels:
                return g
        return None


class _Builder:
    """Implements channel_rules.Recorder on a networkx graph of channel positions."""

    def __init__(self, readers: bool = False) -> None:
        self.gather_readers = readers
        self.g = nx.Graph()
        self.counts: Dict[str, int] = {}
        self.blocks: Dict[str, List[Tuple[int, int, str]]] = defaultdict(list)
        self.roles: Dict[str, List[Tuple[str, str, int, int]]] = defaultdict(list)
        #: one-way links of channel Gathers: (input, its channel for each output channel, output)
        self.readers: List[Tuple[str, List[int], str]] = []

    def channels(self, t: gs.Tensor) -> Optional[int]:
        if not isinstance(t, gs.Variable) or not t.name:
            return None
        if t.name in self.counts:
            return self.counts[t.name]
        shp, dt = t.shape, t.dtype
        ok = (shp is not None and len(shp) >= 3 and isinstance(shp[1], (int, np.integer))
              and shp[1] > 0 and (dt is None or np.issubdtype(np.dtype(dt), np.floating)))
        if not ok:
            return None
        c = int(shp[1])
        self.counts[t.name] = c
        self.g.add_nodes_from((t.name, i) for i in range(c))
        return c

    def link(self, a: gs.Tensor, a0: int, b: gs.Tensor, b0: int, n: int) -> None:
        self.channels(a), self.channels(b)
        self.g.add_edges_from(((a.name, a0 + i), (b.name, b0 + i)) for i in range(n))

    def block(self, t: gs.Tensor, reason: str, start: int = 0, n: Optional[int] = None) -> None:
        c = self.channels(t)
        if c:
            self.blocks[t.name].append((start, c - start if n is None else n, reason))

    def role(self, t: gs.Tensor, kind: str, node: gs.Node, n: Optional[int] = None,
             offset: int = 0) -> None:
        c = self.channels(t)
        if c:
            self.roles[t.name].append((kind, node.name, offset, c if n is None else n))

    def reader(self, x: gs.Tensor, indices: Sequence[int], y: gs.Tensor, node: gs.Node) -> None:
        if not self.gather_readers:   # off: importance scores know no Gather-only group
            channel_rules.block_node(node, self)
            return
        self.channels(x), self.channels(y)
        self.readers.append((x.name, list(indices), y.name))
        self.role(y, "gather", node)


def _conv_infos(graph: gs.Graph) -> Dict[str, ConvInfo]:
    out: Dict[str, ConvInfo] = {}
    for node in graph.nodes:
        if node.op != "Conv" or len(node.inputs) < 2:
            continue
        w = ir.const_value(node.inputs[1])
        y = node.outputs[0].shape
        if w is None or y is None or not all(isinstance(d, (int, np.integer)) for d in y):
            continue
        out[node.name] = ConvInfo(node.name, tuple(w.shape), tuple(int(d) for d in y),
                                  int(node.attrs.get("group", 1)))
    return out


def resolve_protect(graph: gs.Graph, patterns: Iterable[str]) -> List[str]:
    """Node names matching the given names or fnmatch patterns; unknown ones raise UsageError."""
    names = [n.name for n in graph.nodes]
    hit: List[str] = []
    missing: List[str] = []
    for p in patterns:
        m = [n for n in names if n == p or fnmatch.fnmatchcase(n, p)]
        if not m:
            missing.append(p)
        hit.extend(x for x in m if x not in hit)
    if missing:
        raise UsageError(f"prune-channels: protect names match no node: {', '.join(missing)}")
    return hit


def _head_convs(model: onnx.ModelProto) -> List[str]:
    """Detect-head Convs from analysis.head.find_head when that helper exists (best effort)."""
    try:
        from .head import find_head  # type: ignore[attr-defined]
    except Exception:
        return []
    try:
        head = find_head(model)
    except Exception as exc:  # protection is a courtesy: the rules block the head anyway
        log.debug("find_head failed: %s", exc)
        return []
    for attr in ("convs", "head_convs", "last_convs"):
        v = getattr(head, attr, None)
        if v:
            return [getattr(n, "name", n) for n in v]
    return []


def _group_macs(roles: Sequence[Role], convs: Mapping[str, ConvInfo]) -> int:
    total = 0
    for r in roles:
        ci = convs.get(r.node)
        if ci is None:
            continue
        if r.kind == "producer":
            total += int(np.prod(ci.weight_shape[1:])) * ci.positions
        elif r.kind == "consumer":
            total += ci.weight_shape[0] * ci.taps * ci.positions
        elif r.kind == "depthwise":  # one output channel of a grouped Conv: its group's inputs
            total += int(np.prod(ci.weight_shape[1:])) * ci.positions
    return total


def _assemble(b: _Builder, convs: Mapping[str, ConvInfo]) -> List[ChannelGroup]:
    comps = sorted((sorted(c) for c in nx.connected_components(b.g)), key=lambda c: c[0])
    parts: List[Tuple[Set[Position], Set[Role], Set[str]]] = []
    for comp in comps:
        roles: Set[Role] = set()
        reasons: Set[str] = set()
        for t, i in comp:
            for start, n, why in b.blocks.get(t, ()):
                if start <= i < start + n:
                    reasons.add(why)
            for kind, node, off, n in b.roles.get(t, ()):
                if off <= i < off + n:
                    roles.add(Role(kind, node, t, i - off))
        if not reasons and not any(r.kind in ("producer", "gather") for r in roles):
            reasons.add("no Conv produces these channels")
        parts.append((set(comp), roles, reasons))
    _close_readers(b, parts)
    return [ChannelGroup(gid, frozenset(chans), tuple(sorted(roles, key=lambda r: (r.kind, r.node, r.index))),
                         _group_macs(list(roles), convs), tuple(sorted(reasons)))
            for gid, (chans, roles, reasons) in enumerate(parts)]


def _close_readers(b: _Builder, parts: List[Tuple[Set[Position], Set[Role], Set[str]]]) -> None:
    """Removing a channel a Gather reads removes the Gather's output channels that read it: the
    input's group takes in their positions, roles and reasons (through chains of Gathers too).
    The output's own group stays as it is: it may go alone."""
    where = {pos: k for k, (chans, _, _) in enumerate(parts) for pos in chans}
    edges = {(where[(x, c)], where[(y, j)]) for x, idx, y in b.readers for j, c in enumerate(idx)}
    changed = True
    while changed:
        changed = False
        for a, z in edges:
            if a == z:
                continue
            for mine, theirs in zip(parts[a], parts[z]):
                if not theirs <= mine:
                    mine |= theirs
                    changed = True


def analyze_channels(model: onnx.ModelProto, protect: Sequence[str] = (),
                     input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                     protect_head: bool = True, readers: bool = False) -> ChannelAnalysis:
    """Channel groups of ``model`` (unnamed nodes are named as ir.name_unnamed_nodes does);
    ``readers``: channel Gathers are one-way readers (channel_rules.rule_gather), else they block."""
    inferred = infer_static(model, input_shapes)
    graph = ir.to_graph(inferred)
    ir.name_unnamed_nodes(graph)
    protected = resolve_protect(graph, protect)
    head = [n for n in (_head_convs(model) if protect_head else []) if n not in protected]
    b = _Builder(readers)
    for node in graph.nodes:
        channel_rules.rule_for(node.op)(node, b)
    for t in graph.inputs:
        b.block(t, f"graph input '{t.name}'")
    for t in graph.outputs:
        b.block(t, f"graph output '{t.name}'")
    by_name = {n.name: n for n in graph.nodes}
    for name, why in [(n, "protected") for n in protected] + [(n, "Detect head") for n in head]:
        node = by_name.get(name)
        for t in (node.outputs if node is not None else []):
            b.block(t, f"{why}: {node.op} '{name}'")
    convs = _conv_infos(graph)
    table = _shape_table(inferred)
    total = sum(node_macs(n, table) for n in inferred.graph.node)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in graph.tensors().values()
              if t.shape is not None and all(isinstance(d, (int, np.integer)) for d in t.shape)}
    return ChannelAnalysis(_assemble(b, convs), dict(b.counts), convs, total,
                           tuple(protected), shapes)
