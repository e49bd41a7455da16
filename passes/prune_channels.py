"""prune-channels: structured removal of Conv output channels on the ONNX graph (lossy).

Decide -> propagate -> remove. Channel groups come from :mod:`onnxslim_yolo.analysis.channels`
(what must go together, what can never go and why), importance from
:mod:`onnxslim_yolo.analysis.importance`, the greedy choice to a multiply-add target from
``_prune_select`` with a cost model from ``_prune_cost``, the rewrite from ``_prune_rewrite`` and
the least-squares recovery of consumer Convs from ``_prune_refit``.

With calibration data (default criterion ``activation``, ``reconstruct`` on, ``cost`` auto =
measured): each layer shrinks channel by channel in the order that keeps its consumers' outputs
best after a least-squares refit (analysis.lsq), and a candidate unit costs the measured change
of the detections (or of the head's maps for unknown layouts) on ``sens_images`` images with
those refits in place, per multiply-add saved. Without calibration data: filter L1 (or l2, bn)
scores, no refit.

Options (``ctx.opts("prune-channels")``, validated in ``_prune_options``): ``ratio`` in (0, 0.9]
(fraction of the model's multiply-adds to remove); ``per_layer`` {Conv name or pattern: ratio};
``round_to`` (8: layers wider than 8 keep a multiple of 8); ``min_channels`` (1); ``protect``
(node names or fnmatch patterns whose outputs keep all channels); ``criterion``; ``reconstruct``;
``fold_mean`` (removed channels' means into consumer biases); ``kept_json`` (path for the kept
indices per layer); ``calib_images`` (64); ``sens_images`` (8); ``samples`` (8192 rows for the
cost model's input moments); ``ridge`` (1e-3, cost model); ``refit_samples`` (at most 262144 rows
per refit, 64 per unknown); ``refit_memory`` (4.0 GB: the original outputs kept for the
refits; above it the widest refits sample fewer rows, with a warning); ``refit_ridge`` (0.1,
relative to the mean input energy, pulling the refit towards the original weights);
``sequential`` (refit on the pruned model's own inputs, level by level);
``refit_scope`` (affected | downstream); ``refit_head`` (yes | no); ``cost`` (auto | measured |
sweep | lsq | score; sweep: each layer's cost curve measured alone by agreement mAP on
``sweep_images`` (64) images, then allocated greedily, reported as ``curves``); ``probe_metric``
(auto | detections | agreement); ``saliency`` (sample refit rows near detections); ``readers`` (off; on,
with the measured, sweep or lsq cost, a Conv whose input other nodes read too may drop input
channels alone, through a channel Gather, ``_prune_readers``: no better on yolov5n);
``max_layer_ratio`` (0.75);
``bn_by_var``, ``relative``, ``dead_tol``, ``threads``.

A ConvTranspose whose kernel equals its stride (YOLOv6's and the YOLOv8-seg prototype's 2x
upsampling) is pruned as the 1x1 Conv and DepthToSpace it equals, and written back
(``_prune_lower``); other ConvTransposes block.

Must not fire on channels that reach a graph output, a Reshape/Transpose (other than a channel
shuffle, whose Reshapes take the new count)/Flatten/Gemm/Softmax,
the Detect decode or a protected node: those layers are skipped with the reason. A grouped
Conv loses whole groups: group a's input and output channels are one channel of the analysis
(depthwise Convs are the case of one input channel a group). A model with nothing prunable
raises PreconditionError.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import onnx

from onnxslim_yolo import ir
from onnxslim_yolo.analysis import activations, channel_rules, importance as imp, saliency, sensitivity
from onnxslim_yolo.analysis.channels import ChannelAnalysis, analyze_channels
from onnxslim_yolo.data import sample_count
from onnxslim_yolo.pass_base import Numerics, Pass, PassContext, PassReport, PassResult, PreconditionError

from . import (_prune_cost, _prune_lower, _prune_readers, _prune_refit, _prune_report, _prune_rewrite,
               _prune_select)
from ._prune_options import KNOWN, NAME, PruneOptions, parse_options

log = logging.getLogger(__name__)
Feeds = Dict[str, np.ndarray]


def nothing_prunable(analysis: ChannelAnalysis) -> PreconditionError:
    reasons = analysis.blocked_reasons().most_common(3)
    why = "; ".join(f"{r} ({n} channels)" for r, n in reasons) or "the model has no Conv"
    return PreconditionError(f"{NAME}: nothing prunable in this model: every channel group is blocked: {why}")


class PruneChannels(Pass):
    """Remove the least costly Conv output channels until ``ratio`` of the MACs are gone."""

    name = NAME
    option_names = tuple(sorted(KNOWN))
    numerics = Numerics.LOSSY
    default_enabled = False
    after = ("upcast-float16", "canonicalize", "focus-to-conv")
    description = "structured channel pruning to a multiply-add target (lossy, least-squares recovery)"

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        parse_options(ctx.opts(self.name), bool(ctx.calib_inputs))
        ir.require_float32_weights(model)
        ops = ir.quantized_ops(model)
        if ops:
            raise PreconditionError(
                f"the model already holds {', '.join(ops)} nodes: its quantization scales were calibrated on "
                "the unpruned activations; prune the float model, then quantize (--prune R --int8 does both)")

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts = parse_options(ctx.opts(self.name), bool(ctx.calib_inputs))
        graph = ir.to_graph(model)
        ir.name_unnamed_nodes(graph)
        original = model = ir.to_model(graph, model)
        model, lowered = _prune_lower.lower(model)
        readers: set = set()
        if opts.readers and _cost_kind(opts, bool(ctx.calib_inputs)) != "score":
            model, readers = _prune_readers.insert(model)
        analysis = analyze_channels(model, opts.protect, ctx.input_shapes, readers=bool(readers))
        if not analysis.prunable_groups():
            raise nothing_prunable(analysis)
        feeds = activations.calib_batches(ctx.calib_inputs, opts.calib_images) if ctx.calib_inputs else []
        samples = sample_count(feeds)
        warn = _data_warning(ctx.opts(self.name), samples, opts)
        if warn:
            log.warning("%s", warn)
        stats = _stats(model, analysis, feeds, opts) if feeds else None
        scores = imp.compute_importance(analysis, model, opts.criterion, stats, bn_by_var=opts.bn_by_var,
                                        relative=opts.relative, dead_tol=opts.dead_tol)
        sal = saliency.saliency_maps(model, feeds, opts.threads) if (feeds and opts.saliency) else None
        cost, info = _cost_model(model, analysis, stats, scores, feeds, opts, ctx.seed, sal)
        sel = _prune_select.select(analysis, cost, opts.ratio, opts.per_layer, opts.round_to,
                                   opts.min_channels, opts.max_layer_ratio, progress=opts.progress)
        if isinstance(cost, (_prune_cost.MeasuredCost, _prune_cost.SweepCost)):
            info["probe_runs"] = cost.probe.runs
        if isinstance(cost, _prune_cost.SweepCost):
            info["curves"] = cost.curve_report()
        report = PassReport()
        _prune_report.report_blocked(report, analysis)
        if not sel.removed:
            report.details["notes"] = sel.notes + ["no channel selected"]
            return PassResult(original, False, report)
        keep = _prune_rewrite.keep_map(analysis, sel.removed)
        means = {t: s.mean for t, s in stats.items()} if (stats and opts.fold_mean) else None
        pruned = _prune_rewrite.apply_keep(model, analysis, keep, means)
        del cost     # the selection's least-squares states: gigabytes on a wide model
        refit_notes: List[str] = []
        if opts.reconstruct:
            pruned, more = _refit(model, pruned, analysis, sel.removed, keep, feeds, opts, ctx.seed, sal,
                                  opts.progress, lowered, refit_notes)
            info.update(more)
        _prune_report.fill_report(report, model, pruned, analysis, sel, keep, scores, opts, info)
        report.details["notes"].extend(refit_notes)
        pruned, kept_readers = _prune_readers.drop_identity(pruned, readers)
        if kept_readers:
            report.details["reader_gathers"] = kept_readers
        pruned, notes = _prune_lower.raise_back(pruned, lowered)
        _prune_lower.relabel_layers(report.details["layers"], lowered)
        report.details["notes"].extend(notes)
        if lowered:
            report.details["convtranspose_as_1x1"] = sorted(lowered)
        if opts.kept_json:
            _prune_report.write_json(Path(opts.kept_json), report.details)
        return PassResult(pruned, True, report)


def _data_warning(given: Mapping[str, Any], samples: int, opts: PruneOptions) -> Optional[str]:
    """What to say when the data leaves the pruning blind: no calibration at all (filter L1, no
    refit: yolov5n loses every mAP point at 10%), fewer images than the probe set, or under half
    the images the refit reads by default."""
    if not samples and "criterion" not in given:
        return (f"{NAME}: no calibration images, so channels are chosen by filter L1 and nothing is refit; "
                "expect most of the accuracy to go (yolov5n at 10%: mAP 0.357 -> 0.000); pass --calib IMAGES")
    if 0 < samples < opts.sens_images:
        return (f"{NAME}: {samples} calibration image(s), fewer than the {opts.sens_images} the channel "
                "choice probes: the choice and the refit rest on little data")
    if 0 < samples < opts.calib_images // 2:
        asked = "asked for (calib_images)" if "calib_images" in given else "the refit reads by default"
        return (f"{NAME}: {samples} calibration images, under half the {opts.calib_images} "
                f"{asked}: expect a larger loss (yolov5n at 10%: -7.1 mAP points on 16 images, "
                "-3.4 on 64)")
    return None


def _stats(model: onnx.ModelProto, analysis: ChannelAnalysis, feeds: List[Feeds],
           opts: PruneOptions) -> Dict[str, activations.ChannelStats]:
    groups = analysis.prunable_groups()
    names = imp.consumer_inputs(groups) + imp.consumer_outputs(groups, imp.conv_outputs(model))
    # the channel means that a mean or max over the channels (CBAM) takes for removed channels
    names += [n.input[0] for n in model.graph.node
              if n.op_type in channel_rules.CHANNEL_REDUCERS and n.input[0] in analysis.channel_counts]
    return activations.channel_stats(model, feeds, names, opts.threads)


def _cost_kind(opts: PruneOptions, calibrated: bool) -> str:
    """The cost model the selection uses: ``cost`` (auto: measured with a refit, else score) with
    the activation criterion and calibration data; the static scores otherwise."""
    cost = opts.cost if opts.cost != "auto" else ("measured" if opts.reconstruct else "score")
    return cost if opts.criterion == "activation" and calibrated else "score"


def _cost_model(model: onnx.ModelProto, analysis: ChannelAnalysis,
                stats: Optional[Dict[str, activations.ChannelStats]], scores: imp.Importance,
                feeds: List[Feeds], opts: PruneOptions, seed: int, sal) -> Tuple[Any, Dict[str, Any]]:
    """Measured or LSQ costs with the activation criterion and calibration data, else the scores."""
    cost = _cost_kind(opts, bool(stats))
    if cost == "score":
        return _prune_select.ScoreCost(scores.scores), {"cost": "score"}
    params = imp.read_params(model)
    common = dict(samples=opts.samples, ridge=opts.ridge, sens_images=opts.sens_images,
                  threads=opts.threads, seed=seed, saliency=sal)
    if opts.probe_metric != "auto":
        common["metric"] = opts.probe_metric
    if cost == "measured":
        model_cost, info = _prune_cost.measured_cost(model, analysis, feeds, params, **common)
    elif cost == "sweep":
        common["sens_images"] = opts.sweep_images
        n_layers = sum(layer.next_size() is not None for layer in _prune_select.make_layers(
            analysis, opts.round_to, opts.min_channels, opts.max_layer_ratio))
        model_cost, info = _prune_cost.sweep_cost(model, analysis, feeds, params, layers=n_layers,
                                                  progress=opts.progress, **common)
    else:
        model_cost, info = _prune_cost.lsq_cost(model, analysis, feeds, stats, params,
                                                use_gains=opts.gains, **common)
    return model_cost, {"cost": cost, **info}


def _refit(model: onnx.ModelProto, pruned: onnx.ModelProto, analysis: ChannelAnalysis, removed: set,
           keep: Dict[str, np.ndarray], feeds: List[Feeds], opts: PruneOptions, seed: int,
           sal, progress: bool = False, tied: Optional[Dict[str, int]] = None,
           notes: Optional[List[str]] = None) -> Tuple[onnx.ModelProto, Dict[str, Any]]:
    """Least-squares refit of the Convs that lost input channels (and, with refit_scope
    'downstream', of every Conv below a pruned one; refit_head 'no' leaves the last Convs)."""
    convs = {r.node for g in analysis.groups if g.gid in removed for r in g.consumers}
    if opts.refit_scope == "downstream":
        pruned_convs = sorted({r.node for g in analysis.groups if g.gid in removed for r in g.roles})
        convs |= set(_prune_refit.downstream_convs(model, pruned_convs))
    if opts.refit_head == "no":
        head = set(sensitivity.last_convs(model))
        convs = {n.name for n in model.graph.node if n.name in convs and n.output[0] not in head}
    out, errors, skipped = _prune_refit.refit(
        model, pruned, sorted(convs), keep, feeds, analysis.shapes, ridge=opts.refit_ridge,
        samples=opts.refit_samples,
        sequential=opts.sequential, seed=seed, threads=opts.threads, saliency=sal, progress=progress,
        tied=tied, memory=opts.refit_memory * 1e9, notes=notes)
    return out, {"refit": errors, "refit_skipped": skipped}
