#!/usr/bin/env python3
"""Show that the exact rewrites never make a model slower, and how close the outputs stay.

    python tools/bench_exact.py [--runs 40] [--shared ../shared] [--images 8] [--map] [--json out.json]

Cases: the Focus stem fixture (3x640x640, YOLOv5n/s widths) through ``focus-to-conv`` (merge and
space-to-depth-conv), the YOLOv5 v5.0-style fixture, and, when ``../shared`` is there,
``yolov5n_bn.onnx`` through ``fold-batchnorm``. For each: onnxruntime CPU latency of original and
rewritten (both sessions alive, runs interleaved, median of ``--runs``) at 1 and 2 intra-op threads,
with graph optimizations on (deployment) and off (what the graph itself costs), and the max abs
output diff on seeded inputs and on real coco128 images. ``--map`` also scores both yolov5n models
on coco128 (pycocotools mAP). Latency on a shared machine is noisy: compare ratios, not ms.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from onnxslim_yolo import ir, verify  # noqa: E402
from onnxslim_yolo.pass_base import Pass, PassContext  # noqa: E402


def latency(models: List[onnx.ModelProto], feeds: Dict[str, np.ndarray], runs: int, threads: int,
            optimize: bool) -> List[float]:
    """Median ms per model; runs interleaved so drift hits every model alike."""
    from onnxslim_yolo.latency import interleaved_latency

    med = interleaved_latency({str(i): m for i, m in enumerate(models)}, feeds=feeds, runs=runs,
                              threads=threads, optimize=optimize)
    return [med[str(i)] for i in range(len(models))]


def diffs(ref: onnx.ModelProto, new: onnx.ModelProto, feeds: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
    """Max abs diff (both with graph optimizations off) and max |ref| over all outputs and feeds."""
    rs, ns = verify.session(ref, optimize=False, threads=1), verify.session(new, optimize=False, threads=1)
    worst, top = 0.0, 0.0
    for f in feeds:
        for a, b in zip(rs.run(None, f), ns.run(None, f)):
            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
            top = max(top, float(np.abs(a).max()))
    return {"max_abs": worst, "ref_max": top, "rel": worst / top if top else 0.0}


def real_feeds(model: onnx.ModelProto, shared: Optional[Path], n: int) -> List[Dict[str, np.ndarray]]:
    if shared is None or n <= 0:
        return []
    from onnxslim_yolo.data import iter_inputs
    return list(iter_inputs(shared / "data" / "coco128" / "images", model, limit=n, progress=False))


def case(name: str, model: onnx.ModelProto, p: Pass, opts: Dict[str, Any], args: argparse.Namespace,
         shared: Optional[Path] = None) -> Dict[str, Any]:
    res = p.run(model, PassContext(options={p.name: opts}))
    new = res.model
    seeded = verify.random_feeds(model, 2, 0)
    row: Dict[str, Any] = {"case": name, "pass": p.name, "options": opts, "modified": res.modified,
                           "nodes": [len(model.graph.node), len(new.graph.node)],
                           "seeded": diffs(model, new, seeded)}
    real = real_feeds(model, shared, args.images)
    if real:
        row["real_images"] = dict(diffs(model, new, real), n=len(real))
    for optimize in (True, False):
        for threads in (1, 2):
            a, b = latency([model, new], seeded[0], args.runs, threads, optimize)
            key = f"{'opt' if optimize else 'noopt'}_t{threads}"
            row[key] = {"orig_ms": round(a, 3), "new_ms": round(b, 3), "ratio": round(b / a, 3)}
    return row


def fmt_row(r: Dict[str, Any]) -> str:
    lat = "  ".join(f"{k}: {v['orig_ms']:.2f}->{v['new_ms']:.2f} ms (x{v['ratio']:.2f})"
                    for k, v in r.items() if isinstance(v, dict) and "ratio" in v)
    s = r["seeded"]
    out = (f"{r['case']} [{r['pass']} {r['options'] or ''}] nodes {r['nodes'][0]}->{r['nodes'][1]}\n"
           f"  seeded max abs diff {s['max_abs']:.3g} (max |ref| {s['ref_max']:.3g}, rel {s['rel']:.2g})\n")
    if "real_images" in r:
        ri = r["real_images"]
        out += f"  {ri['n']} real images: max abs diff {ri['max_abs']:.3g} (rel {ri['rel']:.2g})\n"
    return out + "  " + lat


def mean_ap(models: List[onnx.ModelProto], shared: Path) -> List[Dict[str, float]]:
    from onnxslim_yolo.evaluate import detections_multi, score
    coco = shared / "data" / "coco128"
    dets = detections_multi(models, coco / "images", progress=False, threads=1)
    return [score(d, coco / "labels") for d in dets]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--images", type=int, default=8, help="real coco128 images for the output diff")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--map", action="store_true", help="also score both yolov5n models on coco128")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import fixtures
    from fixtures.focus import build_focus
    from onnxslim_yolo.passes.focus_to_conv import FocusToConv
    from onnxslim_yolo.passes.fold_batchnorm import FoldBatchNorm

    shared = args.shared if (args.shared / "models" / "yolov5n_bn.onnx").exists() else None
    cases: List[Callable[[], Dict[str, Any]]] = []
    for c_out in (16, 32):
        stem = build_focus("slice_chained", k=3, stride=1, pad=1, img=(640, 640), c_out=c_out)
        for mode in ("merge", "space-to-depth-conv"):
            cases.append(lambda s=stem, c=c_out, md=mode: case(
                f"focus stem 640 c_out={c}", s, FocusToConv(), {"mode": md}, args, shared))
    v5 = fixtures.build_yolov5_focus(opset=13, img=320)
    cases.append(lambda: case("yolov5 v5.0 fixture 320", v5, FocusToConv(), {"mode": "merge"}, args))
    bn_model: Optional[onnx.ModelProto] = None
    if shared is not None:
        bn_model = ir.load(shared / "models" / "yolov5n_bn.onnx")
        cases.append(lambda: case("yolov5n_bn.onnx", bn_model, FoldBatchNorm(), {}, args, shared))
    else:
        print(f"{args.shared}: absent, real-model case skipped")
    rows = []
    for make in cases:
        r = make()
        rows.append(r)
        print(fmt_row(r), flush=True)
    out: Dict[str, Any] = {"runs": args.runs, "cases": rows}
    if args.map and shared is not None and bn_model is not None:
        folded = FoldBatchNorm().run(bn_model, PassContext()).model
        out["map"] = dict(zip(("original", "folded"), mean_ap([bn_model, folded], shared)))
        print("coco128 mAP@0.5:0.95 / mAP@0.5: " + ", ".join(
            f"{k} {v['map']:.4f} / {v['map50']:.4f}" for k, v in out["map"].items()))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
