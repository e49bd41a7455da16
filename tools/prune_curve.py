#!/usr/bin/env python3
"""Accuracy and latency of channel pruning against the multiply-add reduction.

    python tools/prune_curve.py MODEL --images DIR --labels DIR [--ratios 0.05,0.1,0.2,0.3]
                                [--calib-images 64] [--out DIR]

For each ratio it runs prune-channels twice: ``activation+lsq`` (activation-aware, measured
cost, least-squares refit, calibrated on the first ``--calib-images`` images of ``--images``) and
``l1`` (filter L1, no calibration, no reconstruction). Every model is scored with
``onnxslim_yolo.evaluate.evaluate`` (pycocotools mAP@0.5:0.95 and @0.5 on all of ``--images``)
and on the held-out images alone (those after the first ``--calib-images``, which the pruning never
saw), and timed with ``onnxslim_yolo.latency`` (one worker process, sessions sharing one pool,
runs interleaved, median; ratio to the original). Writes ``prune_curve.json`` and
``prune_curve.md`` in ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

METHODS = {
    "activation+lsq": {"criterion": "activation", "reconstruct": True},
    "l1": {"criterion": "l1", "reconstruct": False},
}


def prune(model, ratio: float, method: str, calib, extra: Dict[str, Any]):
    from onnxslim_yolo.pass_base import PassContext
    from onnxslim_yolo.passes.prune_channels import PruneChannels

    opts = dict(METHODS[method], ratio=ratio, **extra)
    ctx = PassContext(options={"prune-channels": opts}, calib_inputs=calib if method != "l1" else None)
    t0 = time.perf_counter()
    res = PruneChannels().run(model, ctx)
    return res.model, res.report.details, time.perf_counter() - t0


def table(rows: List[Dict[str, Any]]) -> str:
    head = ("| method | target | MACs (G) | fewer MACs | mAP@0.5:0.95 | change | mAP@0.5 | held-out mAP "
            "| held-out change | latency vs original | prune s |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = next(r for r in rows if r["method"] == "original")
    lines = [head]
    for r in rows:
        ho = r.get("holdout_map")
        ho_txt = ("-", "-") if ho is None else (f"{ho:.3f}", f"{100 * (ho - base['holdout_map']):+.1f}")
        lines.append(f"| {r['method']} | {r['target']:.0%} | {r['macs'] / 1e9:.3f} | {r['reduction']:.1%} | "
                     f"{r['map']:.3f} | {100 * (r['map'] - base['map']):+.1f} | {r['map50']:.3f} | "
                     f"{ho_txt[0]} | {ho_txt[1]} | {r['latency_ratio']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def held_out_keys(images: str, skip: int) -> List[str]:
    """Names of the images after the first ``skip`` (the ones the pruning never saw)."""
    from onnxslim_yolo.data import list_images

    return [f.name for f in list_images(images)[skip:]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--images", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--ratios", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads for pruning/evaluation")
    ap.add_argument("--latency-runs", type=int, default=30)
    ap.add_argument("--out", default=None, help="folder for prune_curve.json/.md and the models")
    args = ap.parse_args(argv)
    if args.latency_runs < 1:
        ap.error(f"--latency-runs must be at least 1, got {args.latency_runs}")
    logging.basicConfig(level=logging.WARNING)

    from onnxslim_yolo import data, evaluate, ir
    from onnxslim_yolo.analysis.flops import model_stats
    from onnxslim_yolo.latency import interleaved_latency

    model = ir.load(args.model)
    calib = data.load_calibration(args.images, model, limit=args.calib_images, progress=False)
    extra = {"round_to": args.round_to, "threads": args.threads}
    models: Dict[str, Any] = {"original": model}
    rows: List[Dict[str, Any]] = [{"method": "original", "target": 0.0, "macs": model_stats(model).macs,
                                   "reduction": 0.0, "seconds": 0.0}]
    out = Path(args.out) if args.out else None
    for method in args.methods.split(","):
        for ratio in (float(r) for r in args.ratios.split(",")):
            pruned, details, secs = prune(model, ratio, method, calib, extra)
            key = f"{method}@{ratio:g}"
            models[key] = pruned
            rows.append({"method": method, "target": ratio, "macs": details["macs_after"],
                         "reduction": details["mac_reduction"], "seconds": secs,
                         "layers": {k: v["out_channels"] for k, v in details["layers"].items()}})
            if out:
                ir.save(pruned, out / f"{key}.onnx")
            print(f"{key}: {details['mac_reduction']:.1%} fewer MACs in {secs:.0f} s", file=sys.stderr)
    held = set(held_out_keys(args.images, args.calib_images))
    for r, m in zip(rows, models.values()):
        dets = evaluate.detections(m, args.images, progress=False, threads=args.threads)
        res = evaluate.score(dets, args.labels)
        r["map"], r["map50"] = res["map"], res["map50"]
        if held:
            r["holdout_map"] = evaluate.score([d for d in dets if d.key in held], args.labels)["map"]
    lat = interleaved_latency(models, runs=args.latency_runs, threads=args.threads)
    for r, name in zip(rows, models):
        r["latency_ms"] = lat[name]
        r["latency_ratio"] = lat[name] / lat["original"]
    md = table(rows)
    print(md)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "prune_curve.json").write_text(json.dumps(rows, indent=1))
        (out / "prune_curve.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
