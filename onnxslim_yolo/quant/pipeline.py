"""Calibrate -> choose parameters -> insert: one quantization of a float model, reusable per plan.

:class:`Quantizer` holds what does not change between plans (the prepared float model, the head,
the measured conv costs, the calibration statistics turned into per-tensor ranges, the bias
errors), so mixed precision can build many variants cheaply.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir, verify
from ..analysis.calib_table import CalibrationTable
from ..analysis.head import HeadInfo, find_head
from . import bias_correction, cost, metrics, ranges, rewrite
from .options import QdqOptions
from .placement import QuantPlan, make_plan
from .targets import Target, get_target, weight_range

log = logging.getLogger(__name__)
#: calibration-table meta key holding the conv timings the placement was decided with
TIMINGS_KEY = "insert_qdq_conv_timings"
#: SQNR beyond this counts as exact when calibration tables are compared (dB)
SQNR_CAP_DB = 100.0
#: another calibration table replaces the per-tensor one only when it measures this much better
#: (dB): within it the two differ by noise, and two equivalent models (an NCHW export and its
#: NHWC twin) must not get different tables from a last-digit difference
CHOICE_MARGIN_DB = 0.5


class Spread(SequenceABC):
    """``k`` feeds spread evenly over ``seq``, read on access (a lazy image folder stays lazy)."""

    def __init__(self, seq: Sequence[Dict[str, np.ndarray]], k: Optional[int]) -> None:
        n = len(seq)
        self.seq = seq
        self.idx = list(range(n)) if k is None or k >= n else \
            sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.seq[self.idx[i]]


@dataclass
class Built:
    model: onnx.ModelProto
    graph: gs.Graph
    plan: QuantPlan
    table: CalibrationTable
    record: rewrite.RewriteRecord


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Named nodes, sorted, with inferred dtypes and shapes (placement needs float dtypes)."""
    graph = ir.to_graph(model)
    ir.name_unnamed_nodes(graph)
    named = ir.to_model(graph, model)
    try:
        return ir.infer_shapes(named, strict_mode=False)
    except Exception as exc:  # placement falls back to dtypes graphsurgeon knows
        log.warning("insert-qdq: shape inference failed (%s); quantizing what has known dtypes", exc)
        return named


class Quantizer:
    def __init__(self, model: onnx.ModelProto, opts: QdqOptions, feeds: Sequence[Dict[str, np.ndarray]]):
        t0 = time.perf_counter()
        self.model = prepare(model)
        self.opts = opts
        self.target: Target = get_target(opts.target)
        self.feeds = feeds
        self.head: HeadInfo = find_head(self.model)
        self.costs: Dict[str, cost.ConvCost] = {}
        self.timings: List[Dict[str, object]] = []
        self.base: Optional[CalibrationTable] = None
        self.calib_info: Dict[str, object] = {}
        self.bias_errors: Dict[str, np.ndarray] = {}
        self.local_sqnr: Dict[str, float] = {}
        self.seconds = {"prepare": round(time.perf_counter() - t0, 2)}
        self.reduce_range, self.weight_range = weight_range(self.target, opts.reduce_range)
        if self.target.measure and opts.placement == "measure":
            t0 = time.perf_counter()
            if not self._load_timings():
                self._measure()
                self.seconds["measure_convs"] = round(time.perf_counter() - t0, 2)

    @property
    def weight_qmax(self) -> int:
        """Largest INT8 weight magnitude: 7-bit (63) weights when the range is reduced."""
        return 63 if self.reduce_range else 127

    # ----------------------------------------------------------------------------- placement
    def _measure(self) -> None:
        graph = ir.to_graph(self.model)
        skip = set(self.head.tail_nodes) | set(self.head.last_convs)
        keys = {n.name: cost.conv_key(n) for n in graph.nodes if n.op == "Conv" and n.name not in skip}
        measured = cost.measure([k for k in keys.values() if k is not None], threads=self.opts.tune_threads,
                                progress=self.opts.progress, min_speedup=self.opts.min_speedup)
        self.costs = {n: measured[k] for n, k in keys.items() if k is not None}
        for k, c in measured.items():
            self.timings.append({"conv": f"{k.cin}->{k.cout} k{'x'.join(map(str, k.kernel))} "
                                         f"s{k.strides[0]} g{k.group} {'x'.join(map(str, k.hw))} {k.act}",
                                 "int8_ms": c.int8_ms, "float_ms": c.float_ms,
                                 "speedup": round(c.speedup, 3),
                                 "nodes": [n for n, kk in keys.items() if kk == k]})

    def _load_timings(self) -> bool:
        """Reuse the conv timings saved with a calibration table: the same table, the same placement."""
        path = self.opts.calib_table
        if not path or not Path(path).exists():
            return False
        saved = CalibrationTable.from_json(path).meta.get(TIMINGS_KEY)
        if not saved:
            return False
        self.timings = list(saved)
        self.costs = {n: cost.ConvCost(float(t["int8_ms"]), float(t["float_ms"]))
                      for t in saved for n in t["nodes"]}
        log.info("insert-qdq: conv timings loaded from %s", path)
        return True

    def _filter(self, node: gs.Node) -> Optional[str]:
        return cost.slower_in_int8(self.costs.get(node.name), self.opts.min_speedup)

    def plan(self, keep_float: Optional[Mapping[str, str]] = None) -> QuantPlan:
        graph = ir.to_graph(self.model)
        return make_plan(graph, self.head, self.target, self.opts.exclude, self._filter, keep_float,
                         runtime_quantizes=self.target.measure and cost.runtime_quantizes_float_convs())

    # ----------------------------------------------------------------------------- calibrate
    def calibrate(self, plan: QuantPlan) -> None:
        feeds = Spread(self.feeds, self.opts.calib_limit)
        also = ("percentile",) if self.opts.method == "auto" and self.opts.choice_images else ()
        self.base, self.calib_info, alts = ranges.base_table(
            self.model, plan, feeds, self.opts.method, self.opts.percentile, self.opts.calib_table,
            {TIMINGS_KEY: self.timings} if self.timings else {}, self.opts.progress, also)
        if alts:
            self.base = self._choose(plan, {"auto": self.base, **alts})
            if self.opts.calib_table:
                ranges.save_table(self.base, self.opts.calib_table, self.calib_info)

    def _choose(self, plan: QuantPlan, tables: Mapping[str, CalibrationTable]) -> CalibrationTable:
        """The table whose INT8 model has the highest mean SQNR over the graph outputs and the
        head maps (outputs after an NMS/TopK: what is fed into it) on ``choice_images`` feeds;
        the first (per-tensor) table unless another wins by :data:`CHOICE_MARGIN_DB`.
        Per-tensor errors favour tight ranges that clip rare large values; in a box branch those
        values are the large boxes, which only the whole model's error shows."""
        feeds = list(Spread(self.feeds, self.opts.choice_images))
        frontier, selected = verify.selection_frontier(self.model)
        extra = list(dict.fromkeys(list(self.head.last_conv_outputs) + frontier))
        scores: Dict[str, float] = {}
        for name, table in tables.items():
            self.base = table
            quality = metrics.output_quality(self.model, self.build(plan).model, feeds, extra,
                                             self.opts.threads)
            sqnr = [q["sqnr_db_mean"] for t, q in quality.items() if t not in selected]
            # an output both tables leave exact (infinite SQNR) must not hide the others' differences
            scores[name] = round(float(np.mean(np.clip(np.nan_to_num(sqnr, nan=-SQNR_CAP_DB),
                                                       -SQNR_CAP_DB, SQNR_CAP_DB))), 2)
        first = best = next(iter(scores))
        for name, score in scores.items():
            if score >= scores[first] + CHOICE_MARGIN_DB and score > scores[best]:
                best = name
        self.calib_info["choice"] = {"metric": "mean SQNR (dB) of the outputs and head maps",
                                     "images": len(feeds), "sqnr_db": scores, "chosen": best}
        log.info("insert-qdq: calibration table %s (output SQNR %s)", best, scores)
        return tables[best]

    def correct_bias(self, plan: QuantPlan) -> None:
        if not (self.opts.bias_correction and self.feeds):
            return
        qp = ranges.qparams(ranges.plan_table(self.base, plan))
        feeds = self.feeds[: self.opts.bias_correction_images]
        self.bias_errors, self.local_sqnr = bias_correction.measure_bias_error(
            self.model, plan, qp, feeds, self.opts.per_channel, self.opts.threads, self.weight_qmax)

    # ----------------------------------------------------------------------------- insert
    def _extend(self, plan: QuantPlan) -> None:
        """Calibrate tensors a re-plan quantizes that the first plan did not (rare)."""
        missing = [n for n in plan.activations if n not in plan.fixed and n not in self.base]
        if not missing:
            return
        self.base = ranges.derive(self.base, plan)
        missing = [n for n in missing if n not in self.base]
        if not missing:
            return
        sub = QuantPlan(plan.target, activations={n: "" for n in missing},
                        graph_inputs=[n for n in plan.graph_inputs if n in missing],
                        act_after={n: a for n, a in plan.act_after.items() if n in missing})
        feeds = Spread(self.feeds, self.opts.calib_limit)
        extra, _, _ = ranges.base_table(self.model, sub, feeds, self.opts.method, self.opts.percentile,
                                        None, {}, False)
        self.base = CalibrationTable({**self.base.entries, **extra.entries}, self.base.qdtype,
                                     self.base.symmetric, dict(self.base.meta))

    def build(self, plan: QuantPlan) -> Built:
        if self.base is None:
            self.calibrate(plan)
        self._extend(plan)
        table = ranges.plan_table(self.base, plan)
        qp = ranges.qparams(table)
        graph = ir.to_graph(self.model)
        errors = {k: v for k, v in self.bias_errors.items() if k in plan.layers}
        if errors:
            bias_correction.apply_correction(graph, errors)
        rec = rewrite.apply(graph, plan, qp, self.opts.per_channel, self.weight_qmax)
        model = ir.to_model(graph, self.model)
        del model.graph.value_info[:]
        return Built(model, graph, plan, table, rec)
