#!/usr/bin/env python3
"""Peak memory and wall time of ``optimize --prune``, beside what the pruning pass plans to hold.

    python tools/prune_memory.py MODEL --calib DIR [--ratio 0.1] [--calib-limit 64] [--json out.json]

Runs ``onnxslim-yolo optimize MODEL --prune RATIO --calib DIR --no-bench --no-check --quiet`` in a
child process and reads its peak RSS (``ru_maxrss`` of the children) and wall time. Beside them it
prints, from the model's weights alone, the two large things pruning holds: the selection's
least-squares statistics (a float64 (F+1) x (F+1) matrix per dense Conv, F = input channels x
kernel taps) and the refit's original outputs at the default sampled rows (64 per unknown, at
most ``refit_samples``), before and after the ``refit_memory`` cap. Both count every dense Conv, an
upper bound: only the consumers of prunable channels are held.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))


def planned(model_path: str) -> Dict[str, Any]:
    """GB of least-squares statistics and of refit outputs (uncapped and capped) for every dense Conv."""
    import onnx

    from onnxslim_yolo.analysis.lsq import state_bytes
    from onnxslim_yolo.passes import _prune_refit
    from onnxslim_yolo.passes._prune_options import PruneOptions

    model = onnx.load(model_path, load_external_data=False)
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    opts = PruneOptions(0.1, {})
    stats, rows, width = 0, {}, {}
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        w = inits.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if w is None or len(w) != 4 or group != 1:
            continue
        f = w[1] * w[2] * w[3]
        stats += state_bytes(f)
        key = node.name or node.output[0]
        rows[key] = _prune_refit.rows_for(f + 1, opts.refit_samples)
        width[key] = w[0]
    asked = _prune_refit.output_bytes(rows, width)
    capped, note = _prune_refit.row_plan(rows, width, opts.refit_memory * 1e9)
    held = _prune_refit.output_bytes(capped, width)
    return {"dense_convs": len(rows), "lsq_stats_gb": round(stats / 1e9, 2),
            "refit_outputs_asked_gb": round(asked / 1e9, 2), "refit_outputs_held_gb": round(held / 1e9, 2),
            "refit_note": note}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--calib-limit", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    row: Dict[str, Any] = {"model": args.model, "ratio": args.ratio, **planned(args.model)}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "onnxslim_yolo", "optimize", args.model, "-o", str(Path(tmp) / "p.onnx"),
               "--prune", str(args.ratio), "--calib", args.calib, "--no-bench", "--no-check", "--quiet",
               "--report", str(Path(tmp) / "r.json")]
        if args.calib_limit:
            cmd += ["--calib-limit", str(args.calib_limit)]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL).returncode
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        row["exit_code"] = rc
        row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9, 2)
        if rc == 0:
            rep = json.loads((Path(tmp) / "r.json").read_text())
            prune = next(p for p in rep["passes"] if p["name"] == "prune-channels")["report"]["details"]
            row["mac_reduction"] = prune["mac_reduction"]
            row["notes"] = [n for n in prune["notes"] if n.startswith("refit: ")]
    print("\n".join(f"{k:24s} {v}" for k, v in row.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    return 0 if row["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
