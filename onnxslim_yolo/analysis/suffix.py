"""Re-run only the part of a model below a change, from cached activations of a base run.

A probe that measures many candidate weight changes (prune-channels' measured cost) runs the
whole model each time, although everything not downstream of the changed Convs computes what it
computed before. :class:`Suffixes` knows, per set of changed nodes, the nodes downstream of them
(the suffix) and the tensors the suffix reads from outside itself (its boundary). After a base
run that captured every boundary tensor (:meth:`Suffixes.store`), a change is measured by a
session over the suffix alone, fed the cached boundary values. Outputs not downstream of the
change come from the cache.

A tensor on a boundary is, by construction, not downstream of the change, so its base value is
its value under the change: a suffix run computes what a full run computes, up to float rounding
where onnxruntime fuses differently at the boundary.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import ir, verify
from ..machine import available_memory

log = logging.getLogger(__name__)

#: base activations always kept per probe, all feeds together; beyond it only while twice that
#: stays free beside them (Suffixes.limit), else the probe runs whole models
CACHE_BYTES = 1 << 30
#: suffix sessions kept (least recently used dropped)
SESSIONS = 24
#: and at most about this many bytes of them (:func:`_session_bytes`): on a wide model at 640
#: pixels 24 sessions held several GB
SESSION_BYTES = 2 << 30


def _session_bytes(weights: int, boundary: int) -> int:
    """What a suffix session is taken to hold: its weights twice (onnxruntime keeps a pre-packed
    copy of Conv weights) and its boundary inputs four times (a proxy for the activations its
    memory arena keeps after a run)."""
    return 2 * weights + 4 * boundary


class Suffixes:
    """Suffix sessions of ``model`` for changes of the nodes named in ``sources`` (node -> the
    graph inputs that carry its parameters, e.g. a Conv's weight and bias). A suffix session
    reads the parameters of the changed nodes from inputs and has those of every other node
    baked in, from the first feed it runs with: onnxruntime pre-packs constant Conv weights, which
    makes a Conv much faster than one whose weight is an input."""

    def __init__(self, model: onnx.ModelProto, sources: Mapping[str, Sequence[str]], watch: Sequence[str],
                 threads: int = 1, cache_bytes: int = CACHE_BYTES) -> None:
        g = model.graph
        self.model, self.watch, self.threads, self.cache_bytes = model, list(watch), threads, cache_bytes
        #: graph input -> the source node it parametrizes (baked into a suffix unless that changed)
        self.owner = {i: s for s, ins in sources.items() for i in ins}
        self.nodes = list(g.node)
        self.consts = {t.name for t in g.initializer}
        self.graph_inputs = {i.name: i for i in g.input}
        self.consumers: Dict[str, List[int]] = {}
        for i, n in enumerate(self.nodes):
            for t in n.input:
                self.consumers.setdefault(t, []).append(i)
        #: tensors that depend on no graph input (Constant nodes and what is computed from them):
        #: baked into a suffix as initializers, so shape inference sees Resize scales and the like
        self.static = set(self.consts)
        for n in self.nodes:
            if all(not t or t in self.static for t in n.input):
                self.static.update(n.output)
        index = {n.name: i for i, n in enumerate(self.nodes) if n.name}
        self.sources = {s: index[s] for s in sources if s in index}
        #: nodes with subgraphs may read outer tensors that no input lists: not cut there
        self.usable = not ir.has_subgraphs(g)
        self.below = {s: self._descendants([i]) for s, i in self.sources.items()}
        bounds: Set[str] = set()
        for nodes in self.below.values():
            bounds |= self._boundary(nodes)
        self.capture = sorted(bounds | set(self.watch))
        self.cache: List[Dict[str, np.ndarray]] = []
        #: sources whose suffix boundaries the cache holds (all, unless it was over its limit)
        self.kept: Set[str] = set(self.below)
        #: (changed nodes, everything) -> (session entry, its bytes by _session_bytes)
        self.sessions: "OrderedDict[Tuple[FrozenSet[str], bool], Tuple[Tuple, int]]" = OrderedDict()
        self.runs = 0

    def _descendants(self, start: Sequence[int]) -> FrozenSet[int]:
        seen, todo = set(start), list(start)
        while todo:
            for t in self.nodes[todo.pop()].output:
                for j in self.consumers.get(t, ()):
                    if j not in seen:
                        seen.add(j)
                        todo.append(j)
        return frozenset(seen)

    def _boundary(self, nodes: FrozenSet[int]) -> Set[str]:
        made = {t for i in nodes for t in self.nodes[i].output}
        return {t for i in nodes for t in self.nodes[i].input
                if t and t not in made and t not in self.consts and t not in self.graph_inputs}

    # -- the base cache ------------------------------------------------------------------------

    def limit(self) -> int:
        """Bytes the cache may take: ``cache_bytes``, or more while twice that stays free beside
        it (the captured tensors already count as taken; the cache they replace is given back)."""
        free = available_memory()
        if free is None:
            return self.cache_bytes
        held = sum(a.nbytes for v in self.cache for a in v.values())
        return max(self.cache_bytes, (free + held) // 3)

    def store(self, values: Sequence[Mapping[str, np.ndarray]]) -> None:
        """The base run's captured tensors, one mapping per feed. Over :meth:`limit` (a wide model
        at 640 pixels has several GB of them on 8 images) only the boundaries of the latest
        sources that fit are kept (:meth:`_fitting`): changes of those still run suffixes, the
        rest whole models. With none fitting, every change runs the whole model."""
        size = sum(a.nbytes for v in values for a in v.values())
        cap = self.limit()
        have = set(values[0]) if values else set()
        self.kept, keep = set(self.below), have
        if size > cap or have != set(self.capture):   # over the limit, or a base run of a part
            self.kept, keep = self._fitting(values, cap)
            log.info("probe: base activations take %.0f MB (cap %.0f MB): suffix runs for %d of %d "
                     "sources, whole-model runs for the rest", size / 2**20, cap / 2**20, len(self.kept),
                     len(self.below))
            if not self.kept:
                self.usable = False
                self.cache = []
                return
        self.cache = [{t: a for t, a in v.items() if t in keep} for v in values]
        self.sessions.clear()       # their baked parameters were those of the old base

    def _fitting(self, values: Sequence[Mapping[str, np.ndarray]], cap: int) -> Tuple[Set[str], Set[str]]:
        """(sources, tensors): the latest sources (by graph position) whose boundary tensors, with
        the watched ones, fit in ``cap`` bytes over all feeds. A late source's suffix is short,
        so a suffix run saves it the most over a whole run, and its boundary is usually small."""
        size = {t: sum(v[t].nbytes for v in values) for t in values[0]}
        keep = {t for t in self.watch if t in size}
        total = sum(size[t] for t in keep)
        kept: Set[str] = set()
        for s in sorted(self.below, key=lambda s: -self.sources[s]):
            need = self._boundary(self.below[s]) - keep
            if need - set(size):      # not captured by this base run
                continue
            add = sum(size[t] for t in need)
            if total + add <= cap:
                keep |= need
                total += add
                kept.add(s)
        return kept, keep

    def wanted(self) -> List[str]:
        """What a base run captures: every boundary tensor, or once the cache held only part of
        them, that part (capturing all of them at once is what did not fit)."""
        if self.cache and self.kept != set(self.below):
            return sorted(self.cache[0])
        return self.capture

    @property
    def session_bytes(self) -> Dict[Tuple[FrozenSet[str], bool], int]:
        return {k: size for k, (_, size) in self.sessions.items()}

    @property
    def ready(self) -> bool:
        return self.usable and bool(self.cache)

    # -- suffix sessions -----------------------------------------------------------------------

    def _session(self, changed: FrozenSet[str], feed: Mapping[str, np.ndarray], everything: bool = False):
        key = (changed, everything)
        if key in self.sessions:
            self.sessions.move_to_end(key)
            return self.sessions[key][0]
        nodes: FrozenSet[int] = frozenset().union(*(self.below[c] for c in changed))
        order = sorted(nodes)
        made = {t for i in order for t in self.nodes[i].output}
        cut = self._boundary(nodes)
        bounds = sorted(cut - self.static)
        sample = self.cache[0]
        baked = [numpy_helper.from_array(sample[t], t) for t in sorted(cut & self.static)]
        read = list(dict.fromkeys(t for i in order for t in self.nodes[i].input if t in self.graph_inputs))
        fixed = [t for t in read if t in self.owner and self.owner[t] not in changed]
        inputs = [self.graph_inputs[t] for t in read if t not in fixed]
        baked += [numpy_helper.from_array(np.asarray(feed[t]), t) for t in fixed]
        inputs += [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(sample[t].dtype),
                                                 list(sample[t].shape)) for t in bounds]
        used = {t for i in order for t in self.nodes[i].input}
        outputs = [t for t in (sorted(sample) if everything else self.watch) if t in made]
        graph = helper.make_graph([self.nodes[i] for i in order], "suffix", inputs,
                                  [onnx.ValueInfoProto(name=t) for t in outputs],
                                  [t for t in self.model.graph.initializer if t.name in used] + baked)
        sub = helper.make_model(graph, opset_imports=list(self.model.opset_import),
                                ir_version=self.model.ir_version)
        sub.functions.extend(self.model.functions)
        entry = (verify.session(sub, optimize=True, threads=self.threads), [i.name for i in inputs], bounds,
                 outputs)
        weights = sum(t.ByteSize() for t in graph.initializer)
        self.sessions[key] = (entry, _session_bytes(weights, sum(sample[t].nbytes for t in bounds)))
        while len(self.sessions) > 1 and (len(self.sessions) > SESSIONS
                                          or sum(self.session_bytes.values()) > SESSION_BYTES):
            self.sessions.popitem(last=False)
        return entry

    def _suffix_run(self, k: int, feed: Mapping[str, np.ndarray], changed: FrozenSet[str],
                    everything: bool) -> Dict[str, np.ndarray]:
        sess, names, bounds, outputs = self._session(changed, feed, everything)
        self.runs += 1
        base, bset = self.cache[k], set(bounds)
        got = sess.run(outputs, {n: (base[n] if n in bset else feed[n]) for n in names})
        return dict(zip(outputs, got))

    def run(self, k: int, feed: Mapping[str, np.ndarray], changed: FrozenSet[str]) -> List[np.ndarray]:
        """The watched tensors for feed ``k`` (``feed``: graph inputs, weights included) when only
        the nodes in ``changed`` differ from the base run."""
        base = self.cache[k]
        new = self._suffix_run(k, feed, changed, False) if changed else {}
        return [new[t] if t in new else base[t] for t in self.watch]

    def rebase(self, feeds: Sequence[Mapping[str, np.ndarray]], changed: FrozenSet[str]
               ) -> List[List[np.ndarray]]:
        """Make the change the base: the cached tensors below it are recomputed by a suffix run
        per feed (``feeds`` in cache order). Returns the watched tensors per feed."""
        if changed:
            for k, feed in enumerate(feeds):
                self.cache[k].update(self._suffix_run(k, feed, changed, True))
            self.sessions.clear()   # their baked parameters were those of the old base
        return [[c[t] for t in self.watch] for c in self.cache]

    def covers(self, changed: Optional[Set[str]]) -> bool:
        """Whether a suffix run can answer for ``changed`` (None: unknown change)."""
        return self.ready and changed is not None and all(c in self.kept for c in changed)
