#!/usr/bin/env python3
"""Benchmark onnxslim-yolo against the tools users would otherwise pick, in one process and run.

    python tools/bench.py MODEL [MODEL ...] --calib IMAGES --labels LABELS --out DIR

For each model it builds these variants, each compile in a fresh subprocess (so its time and peak
memory are its own): the original; `onnxslim` (the graph simplifier); onnxruntime `quantize_static`
(QDQ, per-channel, MinMax, U8 activations) with nothing excluded and with the YOLO decode tail
excluded; and our pipelines (`optimize`, `--int8`, `--prune 0.2`, `--prune 0.2 --int8`). Then it
measures, for every variant: compile seconds, compile peak RSS, file size, FLOPs, onnxruntime CPU
latency as a ratio to the original (all sessions alive in one process, runs interleaved, median),
and mAP@0.5:0.95 / mAP@0.5 on the labelled folder. Writes ``bench.json`` and ``bench.md``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

VARIANTS = ("original", "onnxslim", "ort-qdq-all", "ort-qdq-tail-excluded", "optimize", "int8",
            "prune0.2", "prune0.2-int8")


# --------------------------------------------------------------------------- compiles (child side)
def _ort_quantize(src: str, dst: str, calib: str, limit: Optional[int], exclude_tail: bool) -> str:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    from onnxslim_yolo.data import iter_inputs

    model = onnx.load(src)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter_inputs(calib, model, limit=limit, progress=False)

        def get_next(self):
            return next(self.it, None)

    exclude: List[str] = []
    if exclude_tail:
        exclude = sorted(decode_tail(model))
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=exclude or None)
    return f"{len(exclude)} nodes excluded" if exclude_tail else "nothing excluded"


def decode_tail(model) -> List[str]:
    """Names of the decode-tail nodes (what a user would exclude by hand)."""
    from onnxslim_yolo.analysis.head import find_head

    info = find_head(model)
    return list(info.tail_nodes)


def _ours(src: str, dst: str, calib: str, limit: Optional[int], int8: bool, prune: Optional[float]) -> str:
    from onnxslim_yolo.api import OptimizeOptions, optimize

    # the compile is the pipeline with its per-pass verification; the pre-deployment checks
    # (an evaluation of their own) are left to the measurement below
    opts = OptimizeOptions(int8=int8, prune=prune, calib=calib if (int8 or prune) else None, calib_limit=limit,
                           bench=False, progress=False, check=False)
    optimize(src, output=dst, options=opts)
    return ""


def _onnxslim(src: str, dst: str) -> str:
    import onnx
    import onnxslim

    onnx.save(onnxslim.slim(src), dst)
    return ""


def compile_variant(variant: str, src: str, dst: str, calib: str, limit: Optional[int]) -> str:
    table: Dict[str, Callable[[], str]] = {
        "onnxslim": lambda: _onnxslim(src, dst),
        "ort-qdq-all": lambda: _ort_quantize(src, dst, calib, limit, exclude_tail=False),
        "ort-qdq-tail-excluded": lambda: _ort_quantize(src, dst, calib, limit, exclude_tail=True),
        "optimize": lambda: _ours(src, dst, calib, limit, int8=False, prune=None),
        "int8": lambda: _ours(src, dst, calib, limit, int8=True, prune=None),
        "prune0.2": lambda: _ours(src, dst, calib, limit, int8=False, prune=0.2),
        "prune0.2-int8": lambda: _ours(src, dst, calib, limit, int8=True, prune=0.2),
    }
    return table[variant]()


def _child(variant: str, src: str, dst: str, calib: str, limit: Optional[int], conn) -> None:
    import logging
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    try:
        note = compile_variant(variant, src, dst, calib, limit)
        err = None
    except Exception as exc:  # reported in the table, the benchmark goes on
        note, err = "", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    conn.send({"seconds": seconds, "peak_rss_mb": peak_mb, "note": note, "error": err})
    conn.close()


def run_compile(variant: str, src: Path, dst: Path, calib: str, limit: Optional[int]) -> Dict[str, Any]:
    """Compile in a spawned interpreter; its own wall time and peak RSS (imports included)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(variant, str(src), str(dst), calib, limit, child))
    proc.start()
    child.close()
    res = parent.recv() if parent.poll(24 * 3600) else {"error": "no result"}
    proc.join()
    return res


# ----------------------------------------------------------------------------- measurement
def measure(model_path: Path, variants: Dict[str, Path], images: str, labels: str, runs: int, threads: int,
            eval_limit: Optional[int], progress: bool) -> Dict[str, Dict[str, Any]]:
    import onnx

    from onnxslim_yolo.analysis.flops import model_stats
    from onnxslim_yolo.evaluate import evaluate
    from onnxslim_yolo.latency import interleaved_latency
    from onnxslim_yolo.data import load_calibration

    models = {name: onnx.load(str(p)) for name, p in variants.items()}
    feeds = load_calibration(images, models["original"], limit=1, progress=False)[0]
    lat = interleaved_latency(models, feeds=feeds, runs=runs, threads=threads)
    out: Dict[str, Dict[str, Any]] = {}
    for name, m in models.items():
        st = model_stats(m)
        acc = evaluate(m, images, labels, limit=eval_limit, progress=progress, threads=threads)
        out[name] = {"size_mb": variants[name].stat().st_size / 1e6, "gflops": st.flops / 1e9,
                     "latency_ms": lat[name], "latency_ratio": lat[name] / lat["original"],
                     "map": acc["map"], "map50": acc["map50"]}
    return out


def bench_model(model_path: Path, args: argparse.Namespace, out_dir: Path) -> List[Dict[str, Any]]:
    from tqdm import tqdm

    work = out_dir / model_path.stem
    work.mkdir(parents=True, exist_ok=True)
    built: Dict[str, Path] = {"original": model_path}
    compiles: Dict[str, Dict[str, Any]] = {"original": {"seconds": 0.0, "peak_rss_mb": None, "note": "",
                                                        "error": None}}
    todo = [v for v in args.variants if v != "original"]
    for v in tqdm(todo, desc=f"compile {model_path.name}", disable=not args.progress, file=sys.stderr):
        dst = work / f"{v}.onnx"
        res = run_compile(v, model_path, dst, args.calib, args.calib_limit)
        compiles[v] = res
        if not res.get("error") and dst.exists():
            built[v] = dst
    figures = measure(model_path, built, args.images or args.calib, args.labels, args.runs, args.threads,
                      args.eval_limit, args.progress)
    rows = []
    for v in ["original"] + todo:
        row = {"model": model_path.name, "variant": v, **compiles[v]}
        row.update(figures.get(v, {}))
        rows.append(row)
    return rows


def markdown(rows: Sequence[Dict[str, Any]], header: str) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)
    lines = [header, "",
             "| model | variant | compile s | compile peak MB | size MB | GFLOPs | latency vs original | "
             "mAP@0.5:0.95 | mAP@0.5 | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        note = r.get("error") or r.get("note") or ""
        lines.append(f"| {r['model']} | {r['variant']} | {f(r.get('seconds'), '.1f')} | "
                     f"{f(r.get('peak_rss_mb'), '.0f')} | {f(r.get('size_mb'), '.2f')} | {f(r.get('gflops'), '.2f')} | "
                     f"{f(r.get('latency_ratio'), '.2f')} | {f(r.get('map'), '.3f')} | {f(r.get('map50'), '.3f')} | "
                     f"{note} |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """CPU model and whether it has int8 dot products (VNNI/AMX): INT8 speed depends on both."""
    from onnxslim_yolo.quant.targets import x86_int8_saturates

    name = platform.processor() or platform.machine()
    try:
        cpuinfo: Optional[str] = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = None
    for line in (cpuinfo or "").splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    sat = x86_int8_saturates(cpuinfo)
    return name + {True: " (x86, no VNNI)", False: "", None: ""}[sat]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--calib", required=True, help="calibration images folder")
    ap.add_argument("--labels", required=True, help="YOLO labels folder (or COCO json) for mAP")
    ap.add_argument("--images", help="evaluation images (default: --calib)")
    ap.add_argument("--out", required=True, type=Path, help="folder for bench.json, bench.md and the models")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calib-limit", type=int)
    ap.add_argument("--eval-limit", type=int)
    ap.add_argument("--runs", type=int, default=30, help="interleaved latency runs (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    for m in args.models:
        if not m.is_file():
            ap.error(f"{m}: no such model file")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    for m in args.models:
        rows.extend(bench_model(m, args, args.out))
    import onnxruntime
    header = (f"Measured {date.today().isoformat()} on {cpu_name()}, {mp.cpu_count()} cores, onnxruntime "
              f"{onnxruntime.__version__}, {args.threads} threads, latency median of {args.runs} "
              "interleaved runs.")
    (args.out / "bench.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    md = markdown(rows, header)
    (args.out / "bench.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
