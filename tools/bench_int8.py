"""Benchmark of the insert-qdq pass against FP32 and onnxruntime's quantize_static (issue #4).

For one model and one calibration folder it measures, each compile in its own subprocess (so
the peak RSS is the compile's own):
- compile time and peak RSS: our insert-qdq pass vs ``quantize_static`` (QDQ, per-channel,
  MinMax, U8/S8, decode tail excluded by hand as a user would);
- mAP@0.5:0.95 with ``onnxslim_yolo.evaluate.evaluate`` (FP32, ours, theirs) when labels are given;
- latency: FP32 and INT8 sessions alive in one process, runs interleaved, median of ``--runs``,
  the whole measurement repeated ``--repeats`` times (the machine is shared: look at the spread);
- the same pass on an opset-11 YOLOX-style fixture with depthwise convs: valid, loads, runs.

Usage::

    python tools/bench_int8.py --model ../shared/models/yolov5n.onnx \\
        --calib ../shared/data/coco128/images --labels ../shared/data/coco128/labels --out /tmp/int8
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional


REPO = Path(__file__).resolve().parents[1]

OURS = """
import json, sys, time, resource, onnx
from onnxslim_yolo import ir
from onnxslim_yolo.data import load_calibration
from onnxslim_yolo.pass_base import PassContext
from onnxslim_yolo.passes.insert_qdq import InsertQDQ
src, dst, calib, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
limit = int(sys.argv[5]) or None
if limit:
    opts.setdefault("calib_limit", limit)
t0 = time.perf_counter()
model = ir.load(src)
feeds = load_calibration(calib, model, limit=limit, progress=False)
ctx = PassContext(options={"insert-qdq": {"progress": False, **opts}}, calib_inputs=feeds)
res = InsertQDQ().run(model, ctx)
ir.save(res.model, dst)
secs = time.perf_counter() - t0
rep = res.report.to_dict()
json.dump({"seconds": secs, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "stages": rep["details"].get("seconds"), "counts": rep["counts"],
           "quality": rep["details"].get("quality")}, open(dst + ".json", "w"), default=str)
"""

THEIRS = """
import json, sys, time, resource, onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)
from onnxslim_yolo.analysis.head import find_head
from onnxslim_yolo.data import load_calibration
src, dst, calib = sys.argv[1], sys.argv[2], sys.argv[3]
limit = int(sys.argv[4]) or None
t0 = time.perf_counter()
model = onnx.load(src)
feeds = load_calibration(calib, model, limit=limit, progress=False)
class Reader(CalibrationDataReader):
    def __init__(self):
        self.i = 0
    def get_next(self):
        if self.i >= len(feeds):
            return None
        self.i += 1
        return feeds[self.i - 1]
quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=list(find_head(model).tail_nodes))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
json.dump({"seconds": time.perf_counter() - t0, "peak_rss_mb": rss}, open(dst + ".json", "w"))
"""


def compile_in_subprocess(script: str, args: List[str]) -> Dict[str, object]:
    subprocess.run([sys.executable, "-c", script] + args, check=True, cwd=str(REPO),
                   stderr=subprocess.DEVNULL)
    return json.loads(Path(args[1] + ".json").read_text())


def latency(models: List[str], threads: int, runs: int, repeats: int) -> List[List[float]]:
    """Per repeat: median ms of each model (``onnxslim_yolo.latency``: one process, shared pool,
    runs interleaved)."""
    import onnx

    from onnxslim_yolo import verify
    from onnxslim_yolo.latency import latency_runs

    loaded = {str(i): onnx.load(m) for i, m in enumerate(models)}
    feed = verify.random_feeds(loaded["0"], 1, 0)[0]
    res = latency_runs(loaded, feeds=feed, runs=runs, threads=threads, repeats=repeats)
    return [[res["repeat_ms"][str(i)][r] for i in range(len(models))] for r in range(repeats)]


def fixture_check(tmp: Path) -> Dict[str, object]:
    """The pass on an opset-11 YOLOX-style fixture with depthwise convs: valid, loads, runs."""
    import onnx

    sys.path.insert(0, str(REPO))
    import fixtures
    from onnxslim_yolo import ir, verify
    from onnxslim_yolo.pass_base import PassContext
    from onnxslim_yolo.passes.insert_qdq import InsertQDQ

    model = fixtures.build_yolox(opset=11, img=128)
    feeds = verify.random_feeds(model, 8, 0)
    res = {}
    for placement in ("measure", "all"):
        opts = {"insert-qdq": {"progress": False, "placement": placement}}
        ctx = PassContext(options=opts, calib_inputs=feeds)
        out = InsertQDQ().run(model, ctx).model
        onnx.checker.check_model(out, full_check=True)
        diff = verify.compare_models(model, out, feeds[:2])
        dw = sum(1 for n in out.graph.node if n.op_type == "DequantizeLinear" and len(n.attribute))
        res[placement] = {"opset": ir.opset(out), "checker": "ok", "loads_and_runs": True,
                          "per_channel_weight_dq": dw,
                          "q_nodes": sum(1 for n in out.graph.node if n.op_type == "QuantizeLinear"),
                          "cosine": round(min(d.cosine for d in diff), 5)}
    return res


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--labels")
    ap.add_argument("--out", default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--options", default="{}", help="insert-qdq options as JSON")
    ap.add_argument("--compile-repeats", type=int, default=2)
    ap.add_argument("--skip-theirs", action="store_true")
    ap.add_argument("--calib-limit", type=int, default=0,
                    help="calibrate both on the first N images (default: ours its own default of "
                         "64, theirs every image)")
    a = ap.parse_args(argv)
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_int8_"))
    out.mkdir(parents=True, exist_ok=True)
    ours, theirs = str(out / "ours.onnx"), str(out / "ort_quantize_static.onnx")
    result: Dict[str, object] = {"model": a.model, "calib": a.calib, "calib_limit": a.calib_limit or None}
    compiles: List[Dict[str, object]] = []
    for _ in range(a.compile_repeats):  # alternated: the machine's load drifts
        args = [a.model, ours, a.calib, a.options, str(a.calib_limit)]
        row: Dict[str, object] = {"ours": compile_in_subprocess(OURS, args)}
        if not a.skip_theirs:
            row["theirs"] = compile_in_subprocess(THEIRS, [a.model, theirs, a.calib, str(a.calib_limit)])
        compiles.append(row)
    result["ours"] = compiles[-1]["ours"]
    result["compile_seconds"] = [{k: round(float(v["seconds"]), 2) for k, v in r.items()} for r in compiles]
    result["compile_peak_rss_mb"] = [{k: round(float(v["peak_rss_mb"])) for k, v in r.items()}
                                     for r in compiles]
    models = [a.model, ours] + ([] if a.skip_theirs else [theirs])
    reps = latency(models, a.threads, a.runs, a.repeats)
    result["latency_ms"] = reps
    result["latency_ratio_ours"] = [round(r[1] / r[0], 3) for r in reps]
    if not a.skip_theirs:
        result["latency_ratio_theirs"] = [round(r[2] / r[0], 3) for r in reps]
    if a.labels:
        from onnxslim_yolo.evaluate import evaluate
        result["map"] = {name: round(evaluate(m, a.calib, a.labels, progress=False,
                                              threads=a.threads)["map"], 4)
                         for name, m in zip(("fp32", "ours", "theirs"), models)}
    result["yolox_opset11_fixture"] = fixture_check(out)
    text = json.dumps(result, indent=1, default=str)
    (out / "bench_int8.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
