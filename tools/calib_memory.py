#!/usr/bin/env python3
"""Wall time and peak memory of calibration, next to onnxruntime's quantize_static (MinMax).

    python tools/calib_memory.py [--shared ../shared] [--limit 128] [--methods minmax,...,auto]
                                 [--separate] [--skip-ort] [--threads 0] [--json out.json]

Ours: ``collect`` over every float activation of the model's quantizable ops (Conv, Sigmoid, Mul,
Add, Concat, MaxPool, Resize outputs and the input), then ``choose_ranges`` with each method. By
default one child process collects once and chooses with every method (collect does not depend on
the method): the time for a method is collect + its choose, the peak RSS is the child's peak after
that method. ``--separate`` runs collect + choose in a fresh child per method instead. onnxruntime:
``quantize_static`` (QDQ, per-channel, U8 activations, MinMax) in its own child over the same
images, read lazily by a CalibrationDataReader. Peak RSS is each child's ``ru_maxrss``. Images load
with ``onnxslim_yolo.data.iter_inputs`` (yolov5 preset: RGB, centred letterbox 114, /255).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

QUANTIZABLE = ("Conv", "Sigmoid", "Mul", "Add", "Concat", "MaxPool", "Resize")
METHODS = ("minmax", "percentile", "entropy", "mse", "auto")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def cpu_s() -> float:
    """User + system CPU seconds of this process: fairer than wall time on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def feeds(model, images: Path, limit: int) -> Iterator[Dict[str, Any]]:
    from onnxslim_yolo.data import iter_inputs
    return iter_inputs(images, model, limit=limit or None, progress=False)


def activation_names(model, exclude: List[str] = ()) -> List[str]:
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    ops = set(QUANTIZABLE) - set(exclude)
    names += [o for n in model.graph.node if n.op_type in ops for o in n.output if o]
    return names


# ------------------------------------------------------------------------------ children
def child_ours(args: argparse.Namespace) -> Dict[str, Any]:
    import onnx
    from onnxslim_yolo.analysis.calibration import choose_ranges, collect
    t0 = time.perf_counter()
    model = onnx.load(str(args.model))
    names = activation_names(model, args.exclude_ops)
    stats = collect(model, names, feeds(model, args.images, args.limit), progress=False, threads=args.threads)
    collect_s = time.perf_counter() - t0
    out: Dict[str, Any] = {"tensors": len(stats), "skipped": len(stats.skipped), "samples": stats.samples,
                           "collect_s": collect_s, "collect_cpu_s": cpu_s(), "collect_peak_mb": peak_mb(),
                           "meta": stats.meta,
                           "methods": {}}
    with tempfile.TemporaryDirectory() as td:
        t = time.perf_counter()
        stats.to_json(Path(td) / "stats.json")
        out["stats_json_mb"] = (Path(td) / "stats.json").stat().st_size / 2**20
        out["stats_json_s"] = time.perf_counter() - t
    for m in args.methods:
        t, c = time.perf_counter(), cpu_s()
        table = choose_ranges(stats, m)
        out["methods"][m] = {"choose_s": time.perf_counter() - t, "choose_cpu_s": cpu_s() - c,
                             "peak_mb": peak_mb(), "won": table.methods()}
    return out


def child_ort(args: argparse.Namespace) -> Dict[str, Any]:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    model = onnx.load(str(args.model))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = feeds(model, args.images, args.limit)

        def get_next(self):
            return next(self.it, None)

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        quantize_static(str(args.model), str(Path(td) / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return {"wall_s": time.perf_counter() - t, "cpu_s": cpu_s(), "peak_mb": peak_mb()}


# -------------------------------------------------------------------------------- parent
def spawn(args: argparse.Namespace, role: str, methods: List[str]) -> Dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", role, "--model", str(args.model),
           "--images", str(args.images), "--limit", str(args.limit), "--threads", str(args.threads),
           "--methods", ",".join(methods), "--exclude-ops", ",".join(args.exclude_ops)]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode != 0:
        raise SystemExit(f"{role} child failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t
    return out


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--images", type=Path)
    ap.add_argument("--limit", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0,
                    help="onnxruntime intra-op threads for collect (0: auto)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--exclude-ops", default="",
                    help="op types whose outputs are not calibrated, e.g. Sigmoid")
    ap.add_argument("--separate", action="store_true", help="one collect per method, each in its own process")
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", choices=["ours", "ort"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = args.model or args.shared / "models" / "yolov5n.onnx"
    args.images = args.images or args.shared / "data" / "coco128" / "images"
    args.methods = [m for m in args.methods.split(",") if m]
    args.exclude_ops = [m for m in args.exclude_ops.split(",") if m]
    if args.child:
        print(json.dumps(child_ours(args) if args.child == "ours" else child_ort(args)))
        return 0
    if not args.model.exists() or not args.images.is_dir():
        print(f"needs {args.model} and {args.images} (../shared)", file=sys.stderr)
        return 2
    report: Dict[str, Any] = {"model": str(args.model), "images": str(args.images), "limit": args.limit,
                              "loadavg": os.getloadavg(), "cpus": os.cpu_count()}
    if not args.skip_ort:
        report["ort_minmax"] = spawn(args, "ort", [])
    if args.separate:
        report["ours"] = {m: spawn(args, "ours", [m]) for m in args.methods}
    else:
        report["ours"] = {"all": spawn(args, "ours", args.methods)}
    print_table(report, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def print_table(report: Dict[str, Any], args: argparse.Namespace) -> None:
    print(f"{Path(args.model).name}, {args.limit} images, load average {report['loadavg'][0]:.1f} "
          f"on {report['cpus']} CPUs")
    print(f"{'what':34s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MB':>12s}")
    if "ort_minmax" in report:
        o = report["ort_minmax"]
        print(f"{'onnxruntime quantize_static MinMax':34s} {o['wall_s']:8.1f} {o['cpu_s']:8.1f} "
              f"{o['peak_mb']:12.0f}   (whole process)")
    for key, run in report["ours"].items():
        print(f"{'collect (' + str(run['tensors']) + ' tensors)':34s} {run['collect_s']:8.1f} "
              f"{run['collect_cpu_s']:8.1f} {run['collect_peak_mb']:12.0f}   [{key}]")
        for m, r in run["methods"].items():
            print(f"{'collect + choose_ranges ' + m:34s} {run['collect_s'] + r['choose_s']:8.1f} "
                  f"{run['collect_cpu_s'] + r['choose_cpu_s']:8.1f} {r['peak_mb']:12.0f}   "
                  f"won {r['won']}")


if __name__ == "__main__":
    sys.exit(main())
