"""prune-channels: structured removal of Conv output channels on the ONNX graph (lossy).

Decide -> propagate -> remove: channel groups come from :mod:`onnxslim_yolo.analysis.channels`
(what must go together and what can never go), importance from
:mod:`onnxslim_yolo.analysis.importance`, the greedy choice from ``_prune_select`` (target
fraction of multiply-adds), the rewrite from ``_prune_rewrite`` and the least-squares recovery of
consumer Convs from ``_prune_refit``.

Options (``ctx.opts("prune-channels")``): ``ratio`` in (0, 0.9]; ``per_layer`` {conv name or
pattern: ratio}; ``round_to`` (8); ``min_channels`` (1); ``protect`` (node names or fnmatch
patterns); ``criterion`` (activation | l1 | l2 | bn; default activation with calibration data,
else l1); ``reconstruct`` (default on with calibration data); ``fold_mean`` (default on with
calibration data); ``kept_json`` (path); ``calib_images`` (32); ``sequential`` (True); ``ridge``
(1e-3); ``samples`` (8192 rows per refit); ``bn_by_var``; ``relative`` (True); ``dead_tol``
(1e-4); ``threads`` (1).

Must not fire on channels that reach a graph output, a Reshape/Transpose/Flatten/Gemm/Softmax,
the Detect decode, a non-depthwise grouped Conv, or a protected node: those groups are skipped
with the reason. A model with nothing prunable raises PreconditionError.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import onnx

from onnxslim_yolo import ir
from onnxslim_yolo.analysis import activations, importance as imp, saliency, sensitivity
from onnxslim_yolo.analysis.channels import ChannelAnalysis, analyze_channels
from onnxslim_yolo.analysis.flops import model_stats
from onnxslim_yolo.pass_base import (Numerics, Pass, PassContext, PassReport, PassResult,
                                     PreconditionError, UsageError)

from . import _prune_cost, _prune_refit, _prune_rewrite, _prune_select

log = logging.getLogger(__name__)

NAME = "prune-channels"
MAX_RATIO = 0.9
KNOWN = {"ratio", "per_layer", "round_to", "min_channels", "protect", "criterion", "reconstruct",
         "fold_mean", "kept_json", "calib_images", "sequential", "ridge", "samples", "bn_by_var",
         "relative", "dead_tol", "threads", "gains", "refit_scope", "refit_head", "cost", "saliency", "sens_images", "max_layer_ratio",
         "labels", "images"}


@dataclass(frozen=True)
class PruneOptions:
    ratio: Optional[float]
    per_layer: Dict[str, float]
    round_to: int = 8
    min_channels: int = 1
    protect: Tuple[str, ...] = ()
    criterion: str = "l1"
    reconstruct: bool = False
    fold_mean: bool = False
    kept_json: Optional[str] = None
    calib_images: int = 32
    sequential: bool = True
    ridge: float = 1e-3
    samples: int = 8192
    bn_by_var: bool = False
    relative: bool = True
    dead_tol: float = 1e-4
    threads: int = 1
    gains: bool = True
    refit_scope: str = "downstream"
    refit_head: str = "affected"
    cost: str = "auto"
    saliency: bool = True
    sens_images: int = 4
    max_layer_ratio: float = 0.75
    extra: Dict[str, Any] = field(default_factory=dict)


def _ratio(value: Any, what: str, allow_zero: bool = False) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{NAME}: {what} {value!r} is not a number") from None
    if not (0.0 <= r <= MAX_RATIO if allow_zero else 0.0 < r <= MAX_RATIO):
        raise UsageError(f"{NAME}: {what} {value} is outside (0, {MAX_RATIO}]: give the fraction of "
                         "multiply-adds to remove, e.g. 0.2")
    return r


def parse_options(opts: Mapping[str, Any], has_calib: bool) -> PruneOptions:
    """Validate the options; bad values raise UsageError naming the option."""
    unknown = sorted(set(opts) - KNOWN)
    if unknown:
        log.warning("%s: ignoring unknown options %s", NAME, ", ".join(unknown))
    ratio = None if opts.get("ratio") is None else _ratio(opts["ratio"], "ratio")
    per_layer = {str(k): _ratio(v, f"per-layer ratio for '{k}'", allow_zero=True)
                 for k, v in dict(opts.get("per_layer") or {}).items()}
    if ratio is None and not per_layer:
        raise UsageError(f"{NAME}: give ratio (fraction of multiply-adds to remove, e.g. 0.2) or "
                         "per_layer ratios")
    ints = {k: opts.get(k, d) for k, d in (("round_to", 8), ("min_channels", 1), ("calib_images", 32),
                                           ("samples", 8192), ("threads", 1), ("sens_images", 4))}
    for k, v in ints.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{NAME}: {k} must be a positive integer, got {v!r}")
    criterion = opts.get("criterion") or ("activation" if has_calib else "l1")
    if criterion not in imp.CRITERIA:
        raise UsageError(f"{NAME}: unknown criterion '{criterion}'; choose one of {', '.join(imp.CRITERIA)}")
    if criterion == "activation" and not has_calib:
        raise UsageError(f"{NAME}: criterion 'activation' needs calibration images (--calib)")
    reconstruct = bool(opts.get("reconstruct", has_calib))
    if reconstruct and not has_calib:
        raise UsageError(f"{NAME}: reconstruct needs calibration images (--calib)")
    protect = opts.get("protect") or ()
    protect = (protect,) if isinstance(protect, str) else tuple(str(p) for p in protect)
    return PruneOptions(
        ratio=ratio, per_layer=per_layer, round_to=int(ints["round_to"]),
        min_channels=int(ints["min_channels"]), protect=protect, criterion=criterion,
        reconstruct=reconstruct, fold_mean=bool(opts.get("fold_mean", has_calib)) and has_calib,
        kept_json=opts.get("kept_json"), calib_images=int(ints["calib_images"]),
        sequential=bool(opts.get("sequential", True)), ridge=float(opts.get("ridge", 1e-3)),
        samples=int(ints["samples"]), bn_by_var=bool(opts.get("bn_by_var", False)),
        relative=bool(opts.get("relative", True)), dead_tol=float(opts.get("dead_tol", 1e-4)),
        threads=int(ints["threads"]), gains=bool(opts.get("gains", True)), refit_scope=str(opts.get("refit_scope", "downstream")),
        refit_head=str(opts.get("refit_head", "affected")), cost=str(opts.get("cost", "auto")),
        saliency=bool(opts.get("saliency", True)),
        sens_images=int(ints["sens_images"]),
        max_layer_ratio=_ratio(opts.get("max_layer_ratio", 0.75), "max_layer_ratio"))


def nothing_prunable(analysis: ChannelAnalysis) -> PreconditionError:
    reasons = analysis.blocked_reasons().most_common(3)
    why = "; ".join(f"{r} ({n} channels)" for r, n in reasons) or "no Conv produces channels"
    return PreconditionError(f"{NAME}: nothing prunable in this model: every channel group is blocked: {why}")


class PruneChannels(Pass):
    """Remove the least important Conv output channels until ``ratio`` of the MACs are gone."""

    name = NAME
    numerics = Numerics.LOSSY
    default_enabled = False
    after = ("canonicalize", "focus-to-conv")
    description = "structured channel pruning to a multiply-add target (lossy, least-squares recovery)"

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        parse_options(ctx.opts(self.name), bool(ctx.calib_inputs))

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts = parse_options(ctx.opts(self.name), bool(ctx.calib_inputs))
        graph = ir.to_graph(model)
        ir.name_unnamed_nodes(graph)
        model = ir.to_model(graph, model)
        analysis = analyze_channels(model, opts.protect, ctx.input_shapes)
        if not analysis.prunable_groups():
            raise nothing_prunable(analysis)
        feeds = activations.calib_batches(ctx.calib_inputs, opts.calib_images) if ctx.calib_inputs else []
        stats = self._stats(model, analysis, feeds, opts) if feeds else None
        scores = imp.compute_importance(analysis, model, opts.criterion, stats, bn_by_var=opts.bn_by_var,
                                        relative=opts.relative, dead_tol=opts.dead_tol)
        sal = saliency.saliency_maps(model, feeds, opts.threads) if (feeds and opts.saliency) else None
        cost, cost_info = self._cost_model(model, analysis, stats, scores, feeds, opts, ctx, sal)
        sel = _prune_select.select(analysis, cost, opts.ratio, opts.per_layer, opts.round_to,
                                   opts.min_channels, opts.max_layer_ratio)
        report = PassReport()
        _report_blocked(report, analysis)
        if not sel.removed:
            report.details["notes"] = sel.notes + ["no channel selected"]
            return PassResult(model, False, report)
        keep = _prune_rewrite.keep_map(analysis, sel.removed)
        means = {t: s.mean for t, s in stats.items()} if (stats and opts.fold_mean) else None
        pruned = _prune_rewrite.apply_keep(model, analysis, keep, means)
        refit_info: Dict[str, Any] = {}
        if opts.reconstruct:
            pruned, refit_info = self._refit(model, pruned, analysis, sel.removed, keep, feeds, opts, ctx, sal)
        _fill_report(report, model, pruned, analysis, sel, keep, scores, opts, {**cost_info, **refit_info})
        if opts.kept_json:
            _write_json(Path(opts.kept_json), report.details)
        return PassResult(pruned, True, report)

    @staticmethod
    def _stats(model: onnx.ModelProto, analysis: ChannelAnalysis, feeds: List[Dict[str, np.ndarray]],
               opts: PruneOptions) -> Dict[str, activations.ChannelStats]:
        groups = analysis.prunable_groups()
        names = imp.consumer_inputs(groups) + imp.consumer_outputs(groups, imp.conv_outputs(model))
        return activations.channel_stats(model, feeds, names, opts.threads)

    @staticmethod
    def _cost_model(model: onnx.ModelProto, analysis: ChannelAnalysis,
                    stats: Optional[Dict[str, activations.ChannelStats]], scores: imp.Importance,
                    feeds: List[Dict[str, np.ndarray]], opts: PruneOptions, ctx: PassContext, sal=None):
        """LSQ costs (activation criterion with reconstruction), else the static scores."""
        use_lsq = opts.cost == "lsq" or (opts.cost == "auto" and opts.reconstruct)
        if not (opts.criterion == "activation" and use_lsq and stats):
            return _prune_select.ScoreCost(scores.scores), {}
        return _prune_cost.lsq_cost(model, analysis, feeds, stats, imp.read_params(model),
                                    samples=opts.samples, ridge=opts.ridge, sens_images=opts.sens_images,
                                    threads=opts.threads, seed=ctx.seed, use_gains=opts.gains, saliency=sal)

    @staticmethod
    def _refit(model: onnx.ModelProto, pruned: onnx.ModelProto, analysis: ChannelAnalysis,
               removed: set, keep: Dict[str, np.ndarray], feeds: List[Dict[str, np.ndarray]],
               opts: PruneOptions, ctx: PassContext, sal=None) -> Tuple[onnx.ModelProto, Dict[str, Any]]:
        consumers_direct = {r.node for g in analysis.groups if g.gid in removed for r in g.consumers}
        consumers = set(consumers_direct)
        if opts.refit_scope == "downstream":
            pruned_convs = {r.node for g in analysis.groups if g.gid in removed for r in g.roles}
            consumers |= set(_prune_refit.downstream_convs(model, sorted(pruned_convs)))
        head = set(sensitivity.last_convs(model))
        if opts.refit_head == "no":
            consumers = {c for c in consumers if _conv_out(model, c) not in head}
        elif opts.refit_head == "affected":
            consumers = {c for c in consumers if _conv_out(model, c) not in head or c in consumers_direct}
        out, errors, skipped = _prune_refit.refit(
            model, pruned, sorted(consumers), keep, feeds, analysis.shapes, ridge=opts.ridge, samples=opts.samples,
            sequential=opts.sequential, seed=ctx.seed, threads=opts.threads, saliency=sal)
        return out, {"refit": errors, "refit_skipped": skipped}


def _conv_out(model: onnx.ModelProto, name: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.name == name)


def _report_blocked(report: PassReport, analysis: ChannelAnalysis) -> None:
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
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
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


def _fill_report(report: PassReport, model: onnx.ModelProto, pruned: onnx.ModelProto,
                 analysis: ChannelAnalysis, sel: _prune_select.Selection, keep: Mapping[str, np.ndarray],
                 scores: imp.Importance, opts: PruneOptions, refit_info: Mapping[str, Any]) -> None:
    after = model_stats(pruned).macs
    layers = _layer_table(analysis, keep, model)
    report.count("groups_removed", len(sel.removed))
    report.count("layers_pruned", sum(1 for v in layers.values() if v["out_channels"][0] != v["out_channels"][1]))
    report.count("dead_channels", len(scores.dead))
    report.details.update({
        "criterion": opts.criterion, "target_ratio": opts.ratio, "round_to": opts.round_to,
        "macs_before": analysis.total_macs, "macs_after": after,
        "mac_reduction": round(1 - after / analysis.total_macs, 4) if analysis.total_macs else 0.0,
        "reconstruct": opts.reconstruct, "fold_mean": opts.fold_mean,
        "layers": layers, "notes": list(sel.notes), **_dead_info(analysis, scores.dead, sel.removed, model),
        **dict(refit_info),
    })
    if report.details["dead_removed_approx"]:
        report.details["notes"].append(
            "dead channels read by zero-padded Convs: their constant was folded into the bias, "
            "exact in the interior, approximate at the borders")
    if opts.protect:
        report.details["protected"] = list(analysis.protected)


def _write_json(path: Path, details: Mapping[str, Any]) -> None:
    doc = {k: details[k] for k in ("criterion", "target_ratio", "macs_before", "macs_after",
                                   "mac_reduction") if k in details}
    doc["layers"] = details.get("layers", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
