"""Latency in onnxruntime (or OpenVINO): several models alive in one process, runs interleaved,
medians.

Absolute milliseconds drift a lot on a shared machine; ratios between models measured this way
are stable, so callers should report ratios to a reference.

The timing runs in a fresh worker process whose sessions share one intra-op thread pool. With a
pool per session (onnxruntime's default), the worker threads of the session that just ran keep
spinning for a while, waiting for more work, and on a small machine they take a core from the
session being timed: interleaved runs then measure that contention (seen here: 94 ms per run
instead of the 43 ms the same model takes alone). A shared pool has no idle spinners, keeps
spinning on inside a run as in deployment, and a fresh process keeps the allocations of earlier
work (calibration, evaluation) out of the measurement. onnxruntime makes a shared pool from
Python only from 1.23 on; before, each session has its own pool with spinning turned off.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import onnx

from . import ir, verify
from .pass_base import VerificationError


def interleaved_latency(models: Mapping[str, onnx.ModelProto], feeds: Optional[Dict[str, np.ndarray]] = None,
                        runs: int = 30, warmup: int = 3, threads: int = 2,
                        input_shapes: Optional[Mapping[str, List[int]]] = None, optimize: bool = True,
                        repeats: int = 1, engine: str = "onnxruntime") -> Dict[str, float]:
    """Median milliseconds per model over ``repeats`` x ``runs`` rounds; in each round every
    model runs once, in rotating order. ``optimize=False`` disables graph optimizations;
    ``engine`` "openvino" times the models in OpenVINO's CPU plugin instead."""
    return latency_runs(models, feeds, runs, warmup, threads, input_shapes, optimize, repeats,
                        engine)["median_ms"]


def latency_runs(models: Mapping[str, onnx.ModelProto], feeds: Optional[Dict[str, np.ndarray]] = None,
                 runs: int = 30, warmup: int = 3, threads: int = 2,
                 input_shapes: Optional[Mapping[str, List[int]]] = None, optimize: bool = True,
                 repeats: int = 1, engine: str = "onnxruntime") -> Dict[str, Any]:
    """Like :func:`interleaved_latency`, with the per-repeat medians (``repeat_ms``) as well."""
    if int(runs) < 1:
        raise ValueError(f"latency runs must be at least 1, got {runs}")
    if not models:
        return {"median_ms": {}, "repeat_ms": {}}
    if feeds is None:
        first = next(iter(models.values()))
        feeds = verify.random_feeds(first, 1, 0, dict(input_shapes or {}))[0]
    with tempfile.TemporaryDirectory(prefix="osy_latency_") as td:
        spec: Dict[str, Any] = {"models": {}, "feeds": str(Path(td) / "feeds.npz"), "runs": int(runs),
                                "warmup": int(warmup), "threads": int(threads), "optimize": bool(optimize),
                                "repeats": max(1, int(repeats)), "engine": engine}
        for i, (name, m) in enumerate(models.items()):
            path = Path(td) / f"m{i}.onnx"
            ir.save(m, path, external_data=ir.model_size(m) > ir.PROTO_LIMIT)
            spec["models"][name] = str(path)
        np.savez(spec["feeds"], **feeds)
        spec_path = Path(td) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1])]
                                            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        proc = subprocess.run([sys.executable, "-m", "onnxslim_yolo.latency", str(spec_path)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise VerificationError(f"latency worker failed: {lines[-1] if lines else proc.returncode}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def _ort_sessions(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Sessions on one shared pool; onnxruntime < 1.23 cannot make one from Python, so each session
    there has its own pool whose threads do not spin (idle, they take no core from the timed one)."""
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as C

    shared = hasattr(C, "set_global_thread_pool_sizes")
    if shared:
        C.set_global_thread_pool_sizes(int(spec["threads"]), 1)
    sessions = {}
    for name, path in spec["models"].items():
        so = ort.SessionOptions()
        if shared:
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads = int(spec["threads"])
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if spec["optimize"]
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        sessions[name] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sessions


def _openvino_sessions(spec: Dict[str, Any]) -> Dict[str, Any]:
    """OpenVINO compiled models with an onnxruntime-like ``run`` (one infer request each)."""
    from .openvino_rt import OpenVinoSession

    return {name: OpenVinoSession(path, int(spec["threads"])) for name, path in spec["models"].items()}


def _measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The worker side: one shared thread pool (onnxruntime), sessions alive together, interleaved
    rounds."""
    with np.load(spec["feeds"]) as z:
        feeds = {k: z[k] for k in z.files}
    sessions = (_openvino_sessions if spec.get("engine") == "openvino" else _ort_sessions)(spec)
    names = list(sessions)
    fed = {n: verify.fit_feeds(sessions[n], feeds) for n in names}   # a float16 model beside its float one
    times: Dict[str, List[float]] = {n: [] for n in names}
    repeat_ms: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(spec["repeats"]):
        for _ in range(spec["warmup"]):
            for n in names:
                sessions[n].run(None, fed[n])
        this: Dict[str, List[float]] = {n: [] for n in names}
        for r in range(spec["runs"]):
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                t0 = time.perf_counter()
                sessions[n].run(None, fed[n])
                this[n].append((time.perf_counter() - t0) * 1000.0)
        for n in names:
            times[n] += this[n]
            repeat_ms[n].append(statistics.median(this[n]))
    return {"median_ms": {n: statistics.median(v) for n, v in times.items()}, "repeat_ms": repeat_ms}


def ratios(medians: Mapping[str, float], reference: str) -> Dict[str, float]:
    ref = medians[reference]
    return {n: (v / ref if ref > 0 else float("nan")) for n, v in medians.items()}


def _main(argv: Sequence[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    print(json.dumps(_measure(spec)))
    return 0


if __name__ == "__main__":  # the worker process
    sys.exit(_main(sys.argv[1:]))
