"""Reports of prune-channels: blocked layers, per-layer channel table, dead channels, JSON."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict, Mapping

import numpy as np
import onnx

from onnxslim_yolo import ir
from onnxslim_yolo.analysis import importance as imp
from onnxslim_yolo.analysis.channels import ChannelAnalysis
from onnxslim_yolo.analysis.flops import model_stats
from onnxslim_yolo.pass_base import PassReport

from ._prune_options import PruneOptions
from ._prune_select import Selection


def report_blocked(report: PassReport, analysis: ChannelAnalysis) -> None:
    """One skip entry per producer Conv whose output channels are (partly) unprunable."""
    seen: Dict[str, Counter] = {}
    for g in analysis.groups:
        if g.prunable:
            continue
        for r in g.producers:
            seen.setdefault(r.node, Counter()).update(g.reasons)
    for node, reasons in sorted(seen.items()):
        report.skip(node, "; ".join(r for r, _ in reasons.most_common(2)))


def _layer_table(analysis: ChannelAnalysis, keep: Mapping[str, np.ndarray],
                 model: onnx.ModelProto) -> Dict[str, Dict[str, Any]]:
    io = {n.name: (n.input[0], n.output[0]) for n in model.graph.node if n.op_type == "Conv"}
    out: Dict[str, Dict[str, Any]] = {}
    for name, ci in analysis.convs.items():
        x, y = io[name]
        kx, ky = keep.get(x), keep.get(y)
        if kx is None and ky is None:
            continue
        cout = ci.weight_shape[0]
        cin = ci.weight_shape[1] * ci.group
        out[name] = {"out_channels": [cout, cout if ky is None else len(ky)],
                     "in_channels": [cin, cin if kx is None else len(kx)],
                     "kept_out": (list(range(cout)) if ky is None else [int(i) for i in ky]),
                     "kept_in": (list(range(cin)) if kx is None else [int(i) for i in kx])}
    return out


def _pads_zero(node: onnx.NodeProto) -> bool:
    """True when a Conv reads no padding (a constant input channel stays constant everywhere)."""
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    auto = ir.text(a.get("auto_pad", b"NOTSET"))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return all(k == 1 for k in a.get("kernel_shape", [1])) and all(s == 1 for s in a.get("strides", [1]))
    return not any(a.get("pads", [])) or auto == "VALID"


def _dead_info(analysis: ChannelAnalysis, dead: set, removed: set, model: onnx.ModelProto) -> Dict[str, int]:
    """Removed dead groups whose bias folding is exact (all consumers unpadded) or approximate."""
    zero = {n.name: _pads_zero(n) for n in model.graph.node if n.op_type == "Conv"}
    exact = inexact = 0
    for g in analysis.groups:
        if g.gid in dead and g.gid in removed:
            if all(zero.get(r.node, False) for r in g.consumers):
                exact += 1
            else:
                inexact += 1
    return {"dead_removed_exact": exact, "dead_removed_approx": inexact}


def fill_report(report: PassReport, model: onnx.ModelProto, pruned: onnx.ModelProto,
                analysis: ChannelAnalysis, sel: Selection, keep: Mapping[str, np.ndarray],
                scores: imp.Importance, opts: PruneOptions, refit_info: Mapping[str, Any]) -> None:
    after = model_stats(pruned).macs
    layers = _layer_table(analysis, keep, model)
    report.count("groups_removed", len(sel.removed))
    pruned_layers = [v for v in layers.values() if v["out_channels"][0] != v["out_channels"][1]]
    report.count("layers_pruned", len(pruned_layers))
    report.count("dead_channels", len(scores.dead))
    report.details.update({
        "criterion": opts.criterion, "target_ratio": opts.ratio, "round_to": opts.round_to,
        "macs_before": analysis.total_macs, "macs_after": after,
        "mac_reduction": round(1 - after / analysis.total_macs, 4) if analysis.total_macs else 0.0,
        "reconstruct": opts.reconstruct, "fold_mean": opts.fold_mean,
        "layers": layers, "notes": list(sel.notes), "steps": sel.steps,
        **_dead_info(analysis, scores.dead, sel.removed, model), **dict(refit_info),
    })
    if report.details["dead_removed_approx"]:
        report.details["notes"].append(
            "dead channels read by zero-padded Convs: their constant was folded into the bias, "
            "exact in the interior, approximate at the borders")
    if opts.protect:
        report.details["protected"] = list(analysis.protected)


def write_json(path: Path, details: Mapping[str, Any]) -> None:
    doc = {k: details[k] for k in ("criterion", "target_ratio", "macs_before", "macs_after",
                                   "mac_reduction") if k in details}
    doc["layers"] = details.get("layers", {})
    ir.write_json(path, doc, indent=1)
