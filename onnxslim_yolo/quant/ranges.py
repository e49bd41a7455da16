"""From calibration statistics to the scale and zero point of every planned tensor.

Calibration (``analysis.calibration``) runs once over the float model for all candidate tensors;
each plan (the default one, and every mixed-precision variant) then takes its tensors' ranges,
fixes the ranges that need no data (a Sigmoid output is [0, 1]), takes the graph input's
min/max (images are exact multiples of 1/255 or integers: a clipped range would only lose), and
merges the ranges of tensors that must share one scale.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import onnx

from ..analysis import calibration as cal
from ..analysis.calib_table import CalibrationTable, RangeEntry, force_same_range
from ..pass_base import UsageError
from .act_range import act_range, range_error
from .placement import QuantPlan

log = logging.getLogger(__name__)

QParams = Dict[str, Tuple[float, int]]
#: the table's meta key for the fingerprint of the float model its ranges were calibrated on
MODEL_KEY = "model_fingerprint"
#: ... and for the calibration method asked for when it was made
METHOD_KEY = "method"


def base_table(model: onnx.ModelProto, plan: QuantPlan, feeds: Sequence, method: str, percentile: float,
               table_path: Optional[str], meta: Dict[str, object], progress: bool,
               also: Sequence[str] = ()
               ) -> Tuple[CalibrationTable, Dict[str, object], Dict[str, CalibrationTable]]:
    """Per-tensor ranges for the plan's calibrated tensors: loaded from ``table_path`` when that file
    exists, else calibrated on ``feeds`` (and saved to ``table_path`` with ``meta`` when given and
    there are no alternatives to choose from). ``also``: methods whose tables, from the same
    statistics, come back as alternatives (none when the table is loaded)."""
    from ..pass_manager import fingerprint

    t = plan.target
    tensors = [n for n in plan.activations if n not in plan.fixed and n not in plan.derived]
    info: Dict[str, object] = {}
    if table_path:   # a table records the model it ranges, to be refused for another one
        meta = {**meta, MODEL_KEY: fingerprint(model), METHOD_KEY: method}
    if table_path and Path(table_path).exists():
        table = CalibrationTable.from_json(table_path)
        if table.meta.get(MODEL_KEY, meta[MODEL_KEY]) != meta[MODEL_KEY]:
            raise UsageError(f"{table_path}: calibration table was made for another model (its weights or "
                             "graph differ from this one's after the exact passes): delete it to recalibrate")
        if table.meta.get(METHOD_KEY, method) != method:   # the table's ranges win, silently before
            log.warning("%s: ranges loaded from the table, calibrated with method %s; method %s is not "
                        "applied (delete the table to recalibrate)", table_path, table.meta[METHOD_KEY],
                        method)
        if table.qdtype != t.act_qdtype or table.symmetric != t.act_symmetric:
            raise UsageError(f"{table_path}: calibration table is for {table.qdtype}"
                             f"{' symmetric' if table.symmetric else ''}, target {t.name} needs "
                             f"{t.act_qdtype}{' symmetric' if t.act_symmetric else ''}: "
                             "delete it to recalibrate")
        missing = [n for n in tensors + list(plan.derived) if n not in table]
        if missing:
            raise UsageError(f"{table_path}: calibration table has no range for tensor '{missing[0]}' "
                             f"({len(missing)} missing): delete it to recalibrate")
        info["calibration"] = f"loaded from {table_path}"
        return table, info, {}
    if not feeds:
        raise UsageError("insert-qdq needs calibration images: pass --calib DIR")
    stats = cal.collect(model, tensors, feeds, progress=progress)
    tables = {m: _table(stats, plan, m, percentile, tensors, exact_inputs=m == "auto" or m in also)
              for m in (method, *also)}
    table = tables.pop(method)
    info["calibration"] = {"samples": stats.samples, "seconds": stats.meta.get("seconds"),
                           "skipped": dict(stats.skipped)}
    for tab in (table, *tables.values()):
        tab.meta.update(meta)
    if table_path and not tables:
        save_table(table, table_path, info)
    return table, info, tables


def save_table(table: CalibrationTable, path: str, info: Dict[str, object]) -> None:
    table.to_json(path)
    info["calibration_table"] = str(path)


def _table(stats: cal.CalibrationStats, plan: QuantPlan, method: str, percentile: float,
           tensors: Sequence[str], exact_inputs: bool) -> CalibrationTable:
    """One method's ranges from the statistics; with ``exact_inputs`` the graph inputs take
    min/max (images are exact multiples of 1/255 or integers: a clipped range would only lose)."""
    t = plan.target
    table = cal.choose_ranges(stats, method, symmetric=t.act_symmetric, qdtype=t.act_qdtype,
                              percentile=percentile, tensors=tensors)
    if exact_inputs and plan.graph_inputs:
        exact = cal.choose_ranges(stats, "minmax", symmetric=t.act_symmetric, qdtype=t.act_qdtype,
                                  tensors=plan.graph_inputs)
        table = CalibrationTable({**table.entries, **exact.entries}, table.qdtype, table.symmetric,
                                 dict(table.meta))
    return derive(activation_aware(table, stats, plan), plan)


def activation_aware(table: CalibrationTable, stats: cal.CalibrationStats,
                     plan: QuantPlan) -> CalibrationTable:
    """Replace the range of a tensor read only by an activation when the activation-aware range
    has a lower error after the activation (method ``<act>-aware``; the per-method errors of the
    plain candidates stay recorded)."""
    entries = dict(table.entries)
    for name, act in plan.act_after.items():
        if name not in stats or name not in entries:
            continue
        e = entries[name]
        lo, hi, err = act_range(stats[name], act, table.qdtype, table.symmetric)
        before = range_error(stats[name], act, e.rmin, e.rmax, table.qdtype, table.symmetric)
        if err < before:
            errors = {**e.errors, f"{act}-aware (after {act})": err, f"{e.method} (after {act})": before}
            entries[name] = RangeEntry(lo, hi, f"{act}-aware", errors)
    return CalibrationTable(entries, table.qdtype, table.symmetric, dict(table.meta))


def derive(table: CalibrationTable, plan: QuantPlan) -> CalibrationTable:
    """Ranges of value-preserving outputs: the union of their inputs' ranges. An input may itself
    be derived, listed later (a Concat reading another Concat): the outputs are resolved in rounds
    until no more can be; one with an input that never gets a range stays without."""
    entries = dict(table.entries)
    pending = dict(plan.derived)
    while pending:
        ready = {out: ins for out, ins in pending.items() if ins and all(i in entries for i in ins)}
        if not ready:
            break
        for out, ins in ready.items():
            known = [entries[i] for i in ins]
            entries[out] = RangeEntry(min(e.rmin for e in known), max(e.rmax for e in known), "derived")
            del pending[out]
    return CalibrationTable(entries, table.qdtype, table.symmetric, dict(table.meta))


def plan_table(base: CalibrationTable, plan: QuantPlan) -> CalibrationTable:
    """The plan's tensors with fixed ranges added and shared groups merged."""
    entries: Dict[str, RangeEntry] = {}
    for name in plan.activations:
        if name in plan.fixed:
            lo, hi = plan.fixed[name]
            entries[name] = RangeEntry(lo, hi, "fixed")
        elif name in base:
            entries[name] = replace(base[name], shared=None)
        else:
            raise UsageError(f"insert-qdq: no calibration range for tensor '{name}'")
    table = CalibrationTable(entries, base.qdtype, base.symmetric, dict(base.meta))
    groups = [[n for n in g if n in entries] for g in plan.groups]
    return force_same_range(table, [g for g in groups if len(g) > 1])


def qparams(table: CalibrationTable) -> QParams:
    return {name: (float(s), int(z)) for name in table for s, z in [table.scale_zero_point(name)]}


def table_report(table: CalibrationTable, plan: QuantPlan) -> Dict[str, Dict[str, object]]:
    """Per tensor: method, range, scale, zero point, why quantized, the group it shares."""
    out: Dict[str, Dict[str, object]] = {}
    for name, e in table.entries.items():
        s, z = table.scale_zero_point(name)
        out[name] = {"method": e.method, "rmin": round(e.rmin, 6), "rmax": round(e.rmax, 6),
                     "scale": float(s), "zero_point": int(z), "why": plan.activations.get(name, "")}
        if e.shared:
            out[name]["shared_with"] = e.shared
        if e.errors:
            out[name]["expected_mse"] = {k: float(f"{v:.4g}") for k, v in e.errors.items()}
    return out
