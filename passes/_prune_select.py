"""Which channel groups prune-channels removes: greedy by cost per multiply-add saved.

Layers (clusters of groups with the same producers and consumers) shrink in units; with
``round_to`` > 1 a layer wider than ``round_to`` keeps a multiple of ``round_to`` channels. At
each step the unit with the least cost per saved multiply-add (exact, counting in- and output
channels already removed) goes, until the target reduction of the model's multiply-adds is
reached; a layer never loses more than ``max_layer_ratio`` of its channels. Per-layer ratios fix
a layer's count first. Costs come from a cost model:

* :class:`ScoreCost`: static importance scores; a unit is the lowest-scored remaining channels.
* :class:`LSQCost`: the relative error each consumer Conv keeps after an optimal least-squares
  refit (analysis.lsq), times a per-consumer gain (how much that error reaches the head); the
  unit is built channel by channel, each time the cheapest one, so correlated channels go first.
"""
from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

from onnxslim_yolo.analysis.channels import ChannelAnalysis, ChannelGroup, ClusterKey, ConvInfo, Role
from onnxslim_yolo.analysis.lsq import ConsumerLSQ
from onnxslim_yolo.progress import bar as progress_bar


@dataclass
class Selection:
    removed: Set[int]
    macs_before: int
    macs_after: int
    layers: Dict[ClusterKey, Tuple[int, int]]
    notes: List[str] = field(default_factory=list)
    order: List[int] = field(default_factory=list)
    steps: List[Dict[str, object]] = field(default_factory=list)


def allowed_counts(n: int, round_to: int, min_channels: int) -> List[int]:
    """Kept-channel counts a layer of ``n`` channels may shrink to, largest first (n excluded):
    multiples of ``round_to``, so none for a layer no wider than it (kept whole: it had any count,
    so --round-to 32 left 13, 27 and 31 channels)."""
    floor = max(1, min_channels)
    if round_to > 1:
        floor = max(floor, round_to)
        first = (n - 1) // round_to * round_to
        return [k for k in range(first, floor - 1, -round_to) if k >= floor]
    return list(range(n - 1, floor - 1, -1))


class _Macs:
    """Current (cout, cin per group) of every Conv; exact MACs of a removal. A weight slot is
    counted once: a Gather's output channel and the input channel it reads share their
    consumer's slot (analysis.channels), and either may take it first."""

    def __init__(self, convs: Mapping[str, ConvInfo]) -> None:
        self.info = dict(convs)
        self.cout = {n: c.weight_shape[0] for n, c in convs.items()}
        self.cin = {n: c.weight_shape[1] for n, c in convs.items()}
        self.done: Set[Role] = set()

    def _macs(self, n: str, cout: int, cin: int) -> int:
        c = self.info[n]
        return cout * cin * c.taps * c.positions

    def _deltas(self, groups: Sequence[ChannelGroup]) -> Dict[str, List[int]]:
        d: Dict[str, List[int]] = {}
        for r in self._slots(groups):
            e = d.setdefault(r.node, [0, 0])
            e[1 if r.kind == "consumer" else 0] += 1
        return d

    def _slots(self, groups: Sequence[ChannelGroup]) -> Set[Role]:
        return {r for g in groups for r in g.roles if r.node in self.info and r not in self.done
                and r.kind in ("producer", "depthwise", "consumer")}

    def saved(self, groups: Sequence[ChannelGroup]) -> int:
        total = 0
        for n, (dout, din) in self._deltas(groups).items():
            co, ci = self.cout[n], self.cin[n]
            total += self._macs(n, co, ci) - self._macs(n, co - dout, ci - din)
        return total

    def apply(self, groups: Sequence[ChannelGroup]) -> int:
        s = self.saved(groups)
        for n, (dout, din) in self._deltas(groups).items():
            self.cout[n] -= dout
            self.cin[n] -= din
        self.done |= self._slots(groups)
        return s


@dataclass
class Layer:
    key: ClusterKey
    groups: List[ChannelGroup]
    counts: List[int]                   # allowed kept counts, largest first
    floor: int                          # never keep fewer (max_layer_ratio, one per part)
    remaining: List[ChannelGroup] = field(default_factory=list)
    #: the groups of each tensor that holds some of the layer's channels but not all (a Split or
    #: Slice output): one of each stays, so that no tensor is left with no channels
    parts: List[FrozenSet[int]] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return len(self.remaining)

    @property
    def names(self) -> Tuple[str, ...]:
        """The producers naming the layer, else the channel Gathers (a reader's own inputs)."""
        return self.key[0] or tuple(sorted({r.node for g in self.groups for r in g.of_kind("gather")}))

    @property
    def label(self) -> str:
        return self.names[0] if self.names else "?"

    def next_size(self) -> Optional[int]:
        nxt = [k for k in self.counts if k < self.kept and k >= self.floor]
        return self.kept - nxt[0] if nxt else None

    def removable(self, left: Sequence[ChannelGroup]) -> List[ChannelGroup]:
        """The groups of ``left`` (those still in, as a unit is built) that may go next: not the
        last one of a part. A new list."""
        if not self.parts:
            return list(left)
        ids = {g.gid for g in left}
        last = {i for p in self.parts if len(p & ids) == 1 for i in p & ids}
        return [g for g in left if g.gid not in last]

    def first_removable(self, ordered: Sequence[ChannelGroup], size: int) -> List[ChannelGroup]:
        """Up to ``size`` groups of ``ordered`` taken in order, each one :meth:`removable` then."""
        left, unit = list(ordered), []
        while len(unit) < size:
            ok = self.removable(left)
            if not ok:
                break
            unit.append(ok[0])
            left.remove(ok[0])
        return unit


def layer_parts(groups: Sequence[ChannelGroup]) -> List[FrozenSet[int]]:
    """For :attr:`Layer.parts`: the group ids of each tensor holding some but not all of ``groups``."""
    by_tensor: Dict[str, Set[int]] = defaultdict(set)
    for g in groups:
        for tensor, _ in g.channels:
            by_tensor[tensor].add(g.gid)
    return sorted({frozenset(ids) for ids in by_tensor.values() if len(ids) < len(groups)}, key=sorted)


class ScoreCost:
    """Static scores: the unit is the ``size`` lowest-scored remaining groups."""

    def __init__(self, scores: Mapping[int, float]) -> None:
        self.scores = scores

    def unit(self, layer: Layer, size: int) -> Tuple[List[ChannelGroup], float]:
        ranked = sorted(layer.remaining, key=lambda g: (self.scores.get(g.gid, 0.0), g.gid))
        order = layer.first_removable(ranked, size)
        return order, sum(self.scores.get(g.gid, 0.0) for g in order)

    def commit(self, layer: Layer, unit: Sequence[ChannelGroup]) -> None:
        return None

    def touches(self, a: Layer, b: Layer) -> bool:
        return a is b


class LSQCost:
    """Relative consumer error after a least-squares refit, weighted by per-consumer gains."""

    def __init__(self, states: Dict[str, ConsumerLSQ], gains: Mapping[str, float]) -> None:
        self.states = states
        self.gains = gains
        #: commits so far, and the last unit built: (layer, unit, commits then, its consumers'
        #: states after it). Committing that unit adopts those states instead of redoing its
        #: removals on ``states`` (the same arithmetic, so the same values; each removal reads
        #: rows of the inverse moments and updates the refit weights, cout x F+1 per consumer)
        self.commits = 0
        self.last: Optional[Tuple[Layer, List[ChannelGroup], int, Dict[str, ConsumerLSQ]]] = None

    def _costs(self, left: Sequence[ChannelGroup], st: Mapping[str, ConsumerLSQ]) -> List[float]:
        """Gain-weighted cost of each group of ``left`` (one batched solve per consumer Conv)."""
        wanted: Dict[str, Dict[int, None]] = {}       # consumer -> its input channels asked, in order
        for g in left:
            for r in g.consumers:
                if r.node in st:
                    wanted.setdefault(r.node, {})[r.index] = None
        per = {n: dict(zip(live, st[n].costs(live).tolist())) if live else {}
               for n, live in ((n, [i for i in idx if st[n].row[i] >= 0]) for n, idx in wanted.items())}
        return [sum(self.gains.get(r.node, 1.0) * per[r.node].get(r.index, 0.0) for r in g.consumers
                    if r.node in st) for g in left]

    def take(self, left: List[ChannelGroup], st: Dict[str, ConsumerLSQ]) -> Tuple[ChannelGroup, float]:
        """Remove the cheapest group of ``left`` from ``left`` and from the states ``st`` (refit);
        returns it and the weighted error that added."""
        best = min(zip(left, self._costs(left, st)), key=lambda gc: (gc[1], gc[0].gid))[0]
        added = 0.0
        for r in best.consumers:
            if r.node in st and st[r.node].row[r.index] >= 0:   # a shared slot may be gone already
                added += self.gains.get(r.node, 1.0) * st[r.node].remove(r.index)
        left.remove(best)
        return best, added

    def take_from(self, layer: Layer, left: List[ChannelGroup], st: Dict[str, ConsumerLSQ]
                  ) -> Optional[Tuple[ChannelGroup, float]]:
        """:meth:`take` among the groups of ``left`` that ``layer`` lets go (:meth:`Layer.removable`);
        None when it lets none go."""
        ok = layer.removable(left)
        if not ok:
            return None
        best, added = self.take(ok, st)
        left.remove(best)
        return best, added

    def _run(self, layer: Layer, size: int, st: Dict[str, ConsumerLSQ]) -> Tuple[List[ChannelGroup], float]:
        left = list(layer.remaining)
        unit: List[ChannelGroup] = []
        total = 0.0
        for _ in range(size):
            took = self.take_from(layer, left, st)
            if took is None:
                break
            unit.append(took[0])
            total += took[1]
        return unit, total

    def _consumers(self, layer: Layer) -> Set[str]:
        return {n for n in layer.key[1] if n in self.states}

    def unit(self, layer: Layer, size: int) -> Tuple[List[ChannelGroup], float]:
        unit, total, _ = self._build(layer, size)
        return unit, total

    def _build(self, layer: Layer, size: int) -> Tuple[List[ChannelGroup], float, Dict[str, ConsumerLSQ]]:
        """The next unit of ``layer``, its cost, and its consumers' states after it (built on copies
        of the current states), kept for :meth:`commit`: only the latest unit's, one layer's."""
        st = {n: self.states[n].copy() for n in self._consumers(layer)}
        unit, total = self._run(layer, size, st)
        self.last = (layer, unit, self.commits, st)
        return unit, total, st

    def commit(self, layer: Layer, unit: Sequence[ChannelGroup]) -> None:
        last, self.last = self.last, None
        if last is not None and last[0] is layer and last[1] is unit and last[2] == self.commits:
            self.states.update(last[3])
        else:
            for g in unit:
                for r in g.consumers:
                    if r.node in self.states and self.states[r.node].row[r.index] >= 0:
                        self.states[r.node].remove(r.index)
        self.commits += 1

    def touches(self, a: Layer, b: Layer) -> bool:
        return a is b or bool(self._consumers(a) & self._consumers(b))


def group_steps(groups: Sequence[ChannelGroup], round_to: int, min_channels: int) -> Tuple[int, int]:
    """(round_to, min_channels) counted in groups. A group holds one channel of each tensor,
    except through a grouped Conv, where it is a whole Conv group: a RegNet layer whose groups
    hold 16 channels may lose one at a time and still keep a multiple of 8 channels, one of
    ResNeXt's 4-channel groups goes in twos, and a multiple of 8 groups always does."""
    per_tensor: Dict[str, List[int]] = defaultdict(lambda: [0] * len(groups))
    for k, g in enumerate(groups):
        for tensor, _ in g.channels:
            per_tensor[tensor][k] += 1
    widths = [math.gcd(*counts) for counts in per_tensor.values()] or [1]
    step = 1
    for w in widths:
        need = round_to // math.gcd(round_to, w)
        step = step * need // math.gcd(step, need)
    return step, -(-min_channels // min(widths))


def make_layers(analysis: ChannelAnalysis, round_to: int, min_channels: int,
                max_layer_ratio: float) -> List[Layer]:
    out = []
    for key, groups in sorted(analysis.clusters().items()):
        n, parts = len(groups), layer_parts(groups)
        counts = allowed_counts(n, *group_steps(groups, round_to, min_channels))
        out.append(Layer(key, list(groups), counts,
                         max(int(-(-n * (1 - max_layer_ratio) // 1)), len(parts)), list(groups), parts))
    return out


def _matches(layer: Layer, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) or n == pattern for n in layer.names)


def _remove(layer: Layer, unit: Sequence[ChannelGroup], model, macs: _Macs, sel: Selection,
            layers: Sequence[Layer] = ()) -> int:
    """Remove ``unit`` from ``layer``; from the other ``layers`` too, any group whose channels
    are now all gone (a Gather's output channels go with the input channels they read)."""
    model.commit(layer, unit)
    ids = {g.gid for g in unit}
    layer.remaining = [g for g in layer.remaining if g.gid not in ids]
    sel.removed.update(ids)
    sel.order.extend(g.gid for g in unit)
    if any(r.kind == "gather" for g in unit for r in g.roles):
        gone = {p for g in unit for p in g.channels}
        for other in layers:
            if other is not layer:
                other.remaining = [g for g in other.remaining if not g.channels <= gone]
    return macs.apply(unit)


def _per_layer(layers: List[Layer], per_layer: Mapping[str, float], model, macs: _Macs,
               sel: Selection) -> Tuple[Set[int], int]:
    fixed: Set[int] = set()
    saved = 0
    for pattern, frac in per_layer.items():
        hits = [i for i, layer in enumerate(layers) if _matches(layer, pattern)]
        if not hits:
            sel.notes.append(f"per-layer '{pattern}': no prunable layer matches")
        for i in hits:
            layer = layers[i]
            n = len(layer.groups)
            kept = min([n] + layer.counts, key=lambda k: (abs(k - n * (1.0 - frac)), -k))
            asked = n * (1.0 - frac)
            if abs(kept - asked) >= 1.0:   # a ratio of 0.9 kept 8 of 32 without a word
                sel.notes.append(f"per-layer '{pattern}': {layer.label} keeps {kept} of {n} channels, the "
                                 f"allowed count nearest the {asked:.1f} asked (--round-to, min_channels)")
            if kept < n:
                unit, _ = model.unit(layer, n - kept)
                saved += _remove(layer, unit, model, macs, sel, layers)
            fixed.add(i)
    return fixed, saved


#: a lazy-greedy winner saving at least this share of the model's MACs is only taken after every
#: stale candidate was measured again (a big, lumpy unit must beat up-to-date alternatives)
BIG_UNIT = 0.01


#: a unit saving more than this share of the multiply-adds still to remove is taken only when no
#: smaller unit is left: one lumpy unit (half of a 16-channel stem) decides the result alone, and
#: its measured cost on a few images is the least reliable (yolov5n at 10%: the stem taken first
#: lost 8.2 mAP points, the same target in smaller units 4.5)
LUMP_SHARE = 0.5


#: a last unit may overshoot the target by this share of it even when stopping would end nearer
OVERSHOOT = 0.1


def _best(layers: List[Layer], fixed: Set[int], model, macs: _Macs,
          cache: Dict[int, Tuple[List[ChannelGroup], float, bool]],
          remaining: int, slack: int = 0) -> Optional[Tuple[float, int, int]]:
    """(cost per MAC, layer index, MACs saved) of the cheapest next unit, filling the cache;
    units over ``LUMP_SHARE`` of ``remaining`` only when there is no other, and then the one of
    least total cost (it nearly finishes the target: per-MAC cheapness would overshoot it), of
    equal costs the one saving least (random-weight exports measure every unit at 0.0: the first
    lump found, half of a wide neck Conv, took YOLOv8n-p2 at 10% to 13.2% fewer multiply-adds).
    A lump that overshoots the target by ``remaining`` or more (it ends further from the target
    than stopping does) and by more than ``slack`` is never returned (LCNet-0.5 at 10%: 0.4%
    short, the cheapest lump took 2.8%, so the model lost 12.4%); None then, as when no unit is
    left."""
    best: Optional[Tuple[float, int, int]] = None
    lump: Optional[Tuple[float, int, int]] = None
    for i, layer in enumerate(layers):
        size = layer.next_size()
        if i in fixed or size is None:
            continue
        if i not in cache:
            unit, cost = model.unit(layer, size)
            cache[i] = (unit, cost, True)
        gain = macs.saved(cache[i][0])
        if gain <= 0:
            continue
        cand = (cache[i][1] / gain, i, gain)
        if gain > LUMP_SHARE * remaining:
            if gain - remaining >= remaining and gain - remaining > slack:
                continue
            if lump is None or (cache[i][1], gain) < (cache[lump[1]][1], lump[2]):
                lump = cand
        elif best is None or cand[0] < best[0]:
            best = cand
    return best if best is not None else lump


def select(analysis: ChannelAnalysis, model, ratio: Optional[float], per_layer: Mapping[str, float],
           round_to: int, min_channels: int, max_layer_ratio: float = 0.75,
           progress: bool = False) -> Selection:
    """Groups to remove under cost ``model`` (ScoreCost, LSQCost or a lazy MeasuredCost);
    ``progress`` shows a bar of the multiply-adds removed against the target."""
    layers = make_layers(analysis, round_to, min_channels, max_layer_ratio)
    macs = _Macs(analysis.convs)
    before = analysis.total_macs
    sel = Selection(set(), before, before, {})
    fixed, saved = _per_layer(layers, per_layer, model, macs, sel)
    target = int(round((ratio or 0.0) * before))
    lazy = bool(getattr(model, "lazy", False))
    cache: Dict[int, Tuple[List[ChannelGroup], float, bool]] = {}   # unit, cost, fresh
    bar = progress_bar(total=round(target / 1e6, 1), desc="pruning: M multiply-adds removed",
                       enabled=progress and target > 0,
                       bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} [{elapsed}]")
    bar.update(round(min(saved, target) / 1e6, 1))
    while saved < target:
        best = _best(layers, fixed, model, macs, cache, target - saved, int(OVERSHOOT * target))
        if best is None:
            left = [g for g in (macs.saved(cache[j][0]) for j in cache if layers[j].next_size()) if g > 0]
            why = (f"every unit left removes {min(left) / before:.1%} or more, too far past the target; "
                   f"--round-to smaller for finer units" if left
                   else "no prunable channels left")
            sel.notes.append(f"target not reached: {saved / before:.1%} of {ratio:.1%} fewer "
                             f"multiply-adds ({why})")
            break
        i = best[1]
        stale = [j for j, v in cache.items() if not v[2]]
        if not cache[i][2] or (best[2] >= BIG_UNIT * before and stale):
            for j in ([i] if not cache[i][2] and best[2] < BIG_UNIT * before else stale):
                cache[j] = (*model.unit(layers[j], layers[j].next_size() or 0), True)
            continue
        gain = _remove(layers[i], cache[i][0], model, macs, sel, layers)
        saved += gain
        bar.update(round(min(saved, target) / 1e6, 1) - bar.n)
        sel.steps.append({"layer": layers[i].label,
                          "removed": len(cache[i][0]), "cost": round(float(cache[i][1]), 6),
                          "macs_saved": gain, "reduction": round(saved / before, 4)})
        del cache[i]
        if lazy:
            cache = {j: (u, c, False) for j, (u, c, _) in cache.items()}
        else:
            cache = {j: v for j, v in cache.items() if not model.touches(layers[i], layers[j])}
    bar.close()
    sel.macs_after = before - saved
    sel.layers = {layer.key: (len(layer.groups), layer.kept) for layer in layers}
    return sel
