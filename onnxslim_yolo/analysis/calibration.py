"""Calibration for INT8 QDQ quantization: an analysis (reads the model, returns data).

Stages, each usable alone::

    stats = collect(model, tensors, feeds)          # runs the model once per feed (streaming)
    stats.to_json("calib.stats.json")               # calibration runs once ...
    table = choose_ranges(stats, "auto")            # ... ranges can be re-chosen from the histograms
    table = force_same_range(table, [concat_in_out_names])
    scale, zp = table.scale_zero_point(name)        # or scale_zero_point(rmin, rmax, qdtype, symmetric)

Methods: ``minmax``, ``percentile``, ``entropy`` (TensorRT's KL search), ``mse`` (the clip range
minimizing the expected quantize-dequantize error for the target type) and ``auto`` (per tensor, the
method whose range has the lowest expected error; every candidate's error is recorded).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from ..pass_base import UsageError
from .calib_collect import CalibrationStats, collect
from .calib_table import CalibrationTable, RangeEntry, force_same_range
from .histogram import StreamingHistogram, TensorStats
from .qparams import (dequantize, expected_mse, fake_quantize, qrange, quantize, scale_zero_point,
                      scale_zero_point_array)
from .range_search import (Range, entropy_range, minmax_range, mse_range, percentile_range,
                           signed_bins)

log = logging.getLogger(__name__)

METHODS = ("minmax", "percentile", "entropy", "mse")


def _range_fn(method: str, percentile: float) -> Callable[[TensorStats, str, bool], Range]:
    if method == "percentile":
        return lambda ts, q, s: percentile_range(ts, q, s, percentile)
    return {"minmax": minmax_range, "entropy": entropy_range, "mse": mse_range}[method]


def range_errors(ts: TensorStats, ranges: Dict[str, Range], qdtype: str, symmetric: bool) -> Dict[str, float]:
    """Expected quantize-dequantize MSE of the tensor's histogram for each named range."""
    if not ranges:
        return {}
    left, right, n = signed_bins(ts)
    keys = list(ranges)
    lo = np.array([ranges[k][0] for k in keys])
    hi = np.array([ranges[k][1] for k in keys])
    s, z = scale_zero_point_array(lo, hi, qdtype, symmetric)
    errs = expected_mse(left, right, n, s, z, qdtype, symmetric)
    return {k: float(e) for k, e in zip(keys, errs)}


def choose_ranges(stats: CalibrationStats, method: str = "auto", *, symmetric: bool = False,
                  qdtype: str = "uint8", percentile: float = 99.99,
                  tensors: Optional[Sequence[str]] = None) -> CalibrationTable:
    """Pick a range per tensor from the statistics; nothing is re-run.

    ``auto`` tries every method on every tensor and keeps the range with the lowest expected
    error (ties go to the simpler method, in the order of :data:`METHODS`).
    """
    if method != "auto" and method not in METHODS:
        raise UsageError(f"calibration method '{method}' is unknown (use auto, {', '.join(METHODS)})")
    if not 0.0 < percentile <= 100.0:
        raise UsageError(f"percentile must be in (0, 100], got {percentile}")
    qrange(qdtype, symmetric)
    names = list(stats) if tensors is None else list(tensors)
    missing = [n for n in names if n not in stats]
    if missing:
        why = stats.skipped.get(missing[0], "not calibrated")
        raise UsageError(f"calibration: no statistics for tensor '{missing[0]}' ({why})")
    candidates = METHODS if method == "auto" else (method,)
    fns = {m: _range_fn(m, percentile) for m in candidates}

    def choose(name: str) -> RangeEntry:
        ts = stats[name]
        ranges = {m: fn(ts, qdtype, symmetric) for m, fn in fns.items()}
        errors = range_errors(ts, ranges, qdtype, symmetric)
        best = min(candidates, key=lambda m: errors[m])
        lo, hi = ranges[best]
        return RangeEntry(float(lo), float(hi), best, errors)

    # the searches are numpy work on whole histograms (the GIL is released): one thread per core
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        entries: Dict[str, RangeEntry] = dict(zip(names, pool.map(choose, names)))
    table = CalibrationTable(entries, qdtype, symmetric,
                             {"method": method, "percentile": percentile, "samples": stats.samples})
    log.info("calibration ranges (%s, %s%s): %s", method, qdtype, " symmetric" if symmetric else "",
             table.methods())
    return table


__all__ = ["collect", "choose_ranges", "range_errors", "scale_zero_point", "scale_zero_point_array",
           "force_same_range", "quantize", "dequantize", "fake_quantize", "qrange", "METHODS",
           "CalibrationStats", "CalibrationTable", "RangeEntry", "TensorStats", "StreamingHistogram"]
