"""Latency in onnxruntime: several models alive in one process, runs interleaved, medians.

Absolute milliseconds drift a lot on a shared machine; ratios between models measured this way
are stable, so callers should report ratios to a reference.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, List, Mapping, Optional

import numpy as np
import onnx

from . import verify


def interleaved_latency(models: Mapping[str, onnx.ModelProto], feeds: Optional[Dict[str, np.ndarray]] = None,
                        runs: int = 30, warmup: int = 3, threads: int = 2,
                        input_shapes: Optional[Mapping[str, List[int]]] = None) -> Dict[str, float]:
    """Median milliseconds per model; in each round every model runs once, in rotating order."""
    names = list(models)
    sessions = {n: verify.session(m, optimize=True, threads=threads) for n, m in models.items()}
    if feeds is None:
        first = next(iter(models.values()))
        feeds = verify.random_feeds(first, 1, 0, dict(input_shapes or {}))[0]
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, feeds)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(runs):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            sessions[n].run(None, feeds)
            times[n].append((time.perf_counter() - t0) * 1000.0)
    return {n: statistics.median(v) for n, v in times.items()}


def ratios(medians: Mapping[str, float], reference: str) -> Dict[str, float]:
    ref = medians[reference]
    return {n: (v / ref if ref > 0 else float("nan")) for n, v in medians.items()}
