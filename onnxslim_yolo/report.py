"""Plain-text tables for the CLI: the optimize summary, pass timings, inspect output."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

from .eval.metrics import MAP_KINDS


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)

    def fmt_row(r: List[str]) -> str:
        return "|".join(" " + (c.rjust(w) if i and _numeric(c) else c.ljust(w)) + " "
                        for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt_row(cells[0]), line] + [fmt_row(r) for r in cells[1:]])


def _numeric(cell: str) -> bool:
    """Numbers (with a unit or sign) are right-aligned, text left-aligned."""
    return bool(re.match(r"^[x+-]?[\d.,]+(e[+-]?\d+)?\s*(%|pts|[kMG]B?|B)?$", cell.strip()))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def human(n: Optional[float], unit: str = "") -> str:
    if n is None:
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3f} {suffix}{unit}".strip()
    return f"{n:g} {unit}".strip()


def _change(before: Optional[float], after: Optional[float]) -> str:
    if before in (None, 0) or after is None:
        return "-"
    return f"{(after - before) / before * 100:+.1f}%"


def summary_table(summary: Dict[str, Any]) -> str:
    b, a = summary["before"], summary["after"]
    rows: List[List[Any]] = [
        ["nodes", b["nodes"], a["nodes"], _change(b["nodes"], a["nodes"])],
        ["parameters", human(b["params"]), human(a["params"]), _change(b["params"], a["params"])],
        ["MACs", human(b["macs"]), human(a["macs"]), _change(b["macs"], a["macs"])],
        ["FLOPs (2 x MACs)", human(b["flops"]), human(a["flops"]), _change(b["flops"], a["flops"])],
        ["size", human(b["size_bytes"], "B"), human(a["size_bytes"], "B"),
         _change(b["size_bytes"], a["size_bytes"])],
    ]
    lat = summary.get("latency_ms")
    if lat:
        where = "openvino cpu" if summary.get("latency_engine") == "openvino" else "ort cpu"
        rows.append([f"latency (ms, {where})", f"{lat['before']:.2f}", f"{lat['after']:.2f}",
                     f"x{summary['latency_ratio']:.2f}"])
    acc = summary.get("accuracy")
    if acc:
        for prefix, what in MAP_KINDS:
            for key, label in (("map", "mAP@0.5:0.95"), ("map50", "mAP@0.5")):
                vb, va = acc["before"].get(prefix + key), acc["after"].get(prefix + key)
                if vb is not None and va is not None:
                    name = f"{what} {label}" if prefix else label
                    rows.append([name, f"{vb:.4f}", f"{va:.4f}", f"{(va - vb) * 100:+.2f} pts"])
    out = table(rows, ["", "before", "after", "change"])
    diffs = summary.get("outputs") or []
    if diffs:
        out += "\n" + table([[_diff_name(d), "other row count", "-", "-"] if d.get("rows_differ") else
                             [_diff_name(d), d["max_abs"], d["cosine"], d["sqnr_db"]] for d in diffs],
                            ["output vs original", "max abs diff", "cosine", "SQNR dB"])
    return out


def _diff_name(d: Dict[str, Any]) -> str:
    """An output's name; graph outputs after NMS/TopK and the candidates fed to it say so."""
    role = d.get("role", "output")
    return {"selected": f"{d['name']} (after NMS/TopK)", "candidates": f"{d['name']} (into NMS/TopK)"
            }.get(role, d["name"])


def passes_table(records: Sequence[Dict[str, Any]]) -> str:
    rows = []
    for r in records:
        counts = r["report"]["counts"]
        skipped = len(r["report"]["skipped"])
        # a lossy pass is judged on the candidates fed to an NMS, not on what the NMS kept
        worst = min((d["cosine"] for d in r["verification"] if d.get("role") != "selected"), default=None)
        note = ", ".join(f"{k}={v}" for k, v in list(counts.items())[:4])
        rows.append([r["name"], r["numerics"], "yes" if r["modified"] else "no", f"{r['seconds']:.2f}",
                     "-" if worst is None else f"{worst:.6f}", skipped, note])
    return table(rows, ["pass", "contract", "changed", "seconds", "min cosine", "skipped", "counts"])


def _macs_at(stats: Dict[str, Any]) -> str:
    at = stats.get("macs_at")
    return f" at input {at} (the input size is dynamic)" if at else ""


def _dtypes(stats: Dict[str, Any]) -> str:
    """', float16' (or ', int8 1.8 M, float32 9.2 k') after the parameter count."""
    types = stats.get("param_dtypes") or {}
    if len(types) == 1:
        return f", {next(iter(types))}"
    return "".join(f", {t} {human(n)}" for t, n in types.items())


def stats_table(stats: Dict[str, Any]) -> str:
    rows = [["opset", stats["opset"]], ["nodes", stats["nodes"]],
            ["parameters", f"{stats['params']:,} ({human(stats['params'])})" + _dtypes(stats)],
            ["MACs", f"{stats['macs']:,} ({human(stats['macs'])})" + _macs_at(stats)],
            ["FLOPs", f"{stats['flops']:,} ({human(stats['flops'])}; FLOPs = 2 x MACs of "
                      "Conv/ConvTranspose/Gemm/MatMul)"],
            ["size", human(stats["size_bytes"], "B")]]
    for n, s in stats["inputs"].items():
        rows.append([f"input {n}", s])
    for n, s in stats["outputs"].items():
        rows.append([f"output {n}", s])
    return table(rows, ["property", "value"])
