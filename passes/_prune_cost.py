"""Cost models for prune-channels' selection, built from calibration data.

:func:`lsq_cost` collects the input-patch second moments of every consumer Conv (one run of the
model over the calibration feeds), sets up the least-squares state of each (analysis.lsq), and
measures per consumer a gain: the head distortion when its least important quarter of input
channels is mean-replaced, divided by the relative error that causes at the consumer's output
(analysis.sensitivity). The selection then weighs each consumer's error after refit by its gain.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import onnx

from onnxslim_yolo import ir
from onnxslim_yolo.analysis import activations, lsq, sensitivity
from onnxslim_yolo.analysis._im2col import ConvGeometry, geometry
from onnxslim_yolo.analysis.activations import ChannelStats, Feeds
from onnxslim_yolo.analysis.channels import ChannelAnalysis
from onnxslim_yolo.analysis.importance import Params

from ._prune_select import Layer, LSQCost

log = logging.getLogger(__name__)

#: share of a consumer's input channels mean-replaced to measure its gain
GAIN_SHARE = 0.25


def consumer_geometries(model: onnx.ModelProto, analysis: ChannelAnalysis
                        ) -> Dict[str, Tuple[str, ConvGeometry]]:
    """Dense 2-D consumer Convs of prunable groups -> (input tensor, geometry)."""
    names = {r.node for g in analysis.prunable_groups() for r in g.consumers}
    graph = ir.to_graph(model)
    ir.name_unnamed_nodes(graph)
    out: Dict[str, Tuple[str, ConvGeometry]] = {}
    for node in graph.nodes:
        if node.name not in names or int(node.attrs.get("group", 1)) != 1:
            continue
        w = ir.const_value(node.inputs[1])
        x = node.inputs[0].name
        geo = geometry(node, w.shape, analysis.shapes.get(x))
        if geo is not None:
            out[node.name] = (x, geo)
    return out


def _gain_channels(allowed: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A random quarter of the prunable input channels: a typical, not a best-case, removal."""
    pool = np.array(sorted(set(allowed)), dtype=np.int64)
    n = max(1, int(round(GAIN_SHARE * len(pool))))
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))


def measure_gains(model: onnx.ModelProto, analysis: ChannelAnalysis, geoms: Mapping[str, Tuple[str, Any]],
                  moments: Mapping[str, lsq.ConvStats], params: Params, stats: Mapping[str, ChannelStats],
                  feeds: Sequence[Feeds], threads: int, seed: int = 0) -> Dict[str, float]:
    """Head distortion per unit of relative consumer error, per consumer Conv."""
    allowed: Dict[str, List[int]] = {}
    for g in analysis.prunable_groups():
        for r in g.consumers:
            allowed.setdefault(r.node, []).append(r.index)
    probe = sensitivity.Probe(model, list(geoms), analysis.shapes, feeds, threads)
    gains: Dict[str, float] = {}
    rng = np.random.default_rng(seed)
    for name, (x, _) in geoms.items():
        w, b = params.conv[name]
        chans = _gain_channels(allowed.get(name, []), rng)
        local = lsq.replacement_error(w, b, moments[name], chans)
        head = probe.measure({name: (chans, stats[x].mean[chans].astype(np.float32))})
        if local > 1e-9:
            gains[name] = head / local
    med = float(np.median(list(gains.values()))) if gains else 1.0
    return {n: gains.get(n, med) for n in geoms}


def lsq_cost(model: onnx.ModelProto, analysis: ChannelAnalysis, feeds: Sequence[Feeds],
             stats: Mapping[str, ChannelStats], params: Params, *, samples: int, ridge: float,
             sens_images: int, threads: int, seed: int, use_gains: bool = True, saliency=None
             ) -> Tuple[LSQCost, Dict[str, Any]]:
    """The LSQ cost model and what it measured (gains) for the report."""
    geoms = consumer_geometries(model, analysis)
    per_image = max(1, -(-samples // max(len(feeds), 1)))
    batches = activations.capture(model, feeds, sorted({x for x, _ in geoms.values()}), threads)
    moments = lsq.collect_moments(geoms, batches, per_image, seed, saliency)
    states = {n: lsq.ConsumerLSQ(*params.conv[n], moments[n], ridge) for n in geoms}
    gains = (measure_gains(model, analysis, geoms, moments, params, stats, feeds[:sens_images], threads, seed)
             if use_gains else {n: 1.0 for n in geoms})
    return LSQCost(states, gains), {"gains": {n: round(v, 4) for n, v in gains.items()}}


class MeasuredCost(LSQCost):
    """A unit is built channel by channel by least-squares cost (as LSQCost); its cost is the
    measured output distortion (analysis.sensitivity.RefitProbe) of the model with all committed
    refits plus this unit's refit, minus that of the committed model. Used with lazy greedy."""

    lazy = True

    def __init__(self, states: Dict[str, lsq.ConsumerLSQ], probe: sensitivity.RefitProbe,
                 shapes: Mapping[str, Sequence[int]]) -> None:
        super().__init__(states, {})
        self.probe = probe
        self.shapes = shapes
        self.base: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.base_d = 0.0

    def unit(self, layer: Layer, size: int):
        st = {n: self.states[n].copy() for n in self._consumers(layer)}
        unit, _ = self._run(layer, size, st)
        params = dict(self.base)
        params.update({n: lsq.full_weights(st[n], self.shapes[n]) for n in st})
        return unit, self.probe.measure(params) - self.base_d

    def commit(self, layer: Layer, unit) -> None:
        super().commit(layer, unit)
        for n in self._consumers(layer):
            self.base[n] = lsq.full_weights(self.states[n], self.shapes[n])
        self.base_d = self.probe.measure(self.base)

    def touches(self, a: Layer, b: Layer) -> bool:
        return True


def measured_cost(model: onnx.ModelProto, analysis: ChannelAnalysis, feeds: Sequence[Feeds],
                  params: Params, *, samples: int, ridge: float, sens_images: int, threads: int,
                  seed: int, saliency=None) -> Tuple[MeasuredCost, Dict[str, Any]]:
    """The measured cost model (LSQ units, distortion measured on ``sens_images`` feeds)."""
    geoms = consumer_geometries(model, analysis)
    per_image = max(1, -(-samples // max(len(feeds), 1)))
    batches = activations.capture(model, feeds, sorted({x for x, _ in geoms.values()}), threads)
    moments = lsq.collect_moments(geoms, batches, per_image, seed, saliency)
    states = {n: lsq.ConsumerLSQ(*params.conv[n], moments[n], ridge) for n in geoms}
    conv_params = {n: (params.conv[n][0], params.conv[n][1] if params.conv[n][1] is not None
                       else np.zeros(params.conv[n][0].shape[0], np.float32)) for n in geoms}
    probe = sensitivity.RefitProbe(model, conv_params, feeds[:sens_images], threads)
    shapes = {n: params.conv[n][0].shape for n in geoms}
    return MeasuredCost(states, probe, shapes), {"metric": probe.metric.name}
