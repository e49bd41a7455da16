"""Cost models for prune-channels' selection, built from calibration data.

:func:`lsq_cost` collects the input-patch second moments of every consumer Conv (one run of the
model over the calibration feeds), sets up the least-squares state of each (analysis.lsq), and
measures per consumer a gain: the head distortion when its least important quarter of input
channels is mean-replaced, divided by the relative error that causes at the consumer's output
(analysis.sensitivity). The selection then weighs each consumer's error after refit by its gain.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxslim_yolo import ir
from onnxslim_yolo.analysis import activations, lsq, sensitivity
from onnxslim_yolo.analysis._im2col import ConvGeometry, geometry
from onnxslim_yolo.analysis.activations import ChannelStats, Feeds
from onnxslim_yolo.analysis.channels import ChannelAnalysis
from onnxslim_yolo.analysis.importance import Params
from onnxslim_yolo.machine import available_memory
from onnxslim_yolo.pass_base import PreconditionError
from onnxslim_yolo.progress import bar as progress_bar

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


def check_state_memory(geoms: Mapping[str, Tuple[str, ConvGeometry]], params: Params,
                       available: Optional[int] = None, moments_kept: bool = False) -> int:
    """Bytes the least-squares states take (a float64 (F+1) x (F+1) matrix per consumer Conv, F
    its inputs per output: channels x kernel taps), and their moment matrices beside them while
    they are built (all of them with ``moments_kept``, else one); raises PreconditionError naming
    the widest Conv when that is more than the machine has free (``available``: measured when None)."""
    sizes = {n: lsq.state_bytes(int(np.prod(params.conv[n][0].shape[1:]))) for n in geoms}
    need = sum(sizes.values()) * (2 if moments_kept else 1) + max(sizes.values(), default=0)
    free = available_memory() if available is None else available
    if free is not None and need > free:
        widest = max(sizes, key=sizes.get)
        raise PreconditionError(
            f"prune-channels: the least-squares statistics of {len(sizes)} consumer Convs need "
            f"{need / 1e9:.1f} GB and {free / 1e9:.1f} GB is free (widest: '{widest}', "
            f"{sizes[widest] / 1e9:.2f} GB): protect the layers feeding it (--protect) to leave it out")
    return need


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
    states, _, geoms, moments = _lsq_states(model, analysis, feeds, params, samples, ridge, threads, seed,
                                            saliency, keep_moments=use_gains)   # measure_gains reads them
    gains = (measure_gains(model, analysis, geoms, moments, params, stats, feeds[:sens_images], threads, seed)
             if use_gains else {n: 1.0 for n in geoms})
    return LSQCost(states, gains), {"gains": {n: round(v, 4) for n, v in gains.items()}}


def _lsq_states(model: onnx.ModelProto, analysis: ChannelAnalysis, feeds: Sequence[Feeds], params: Params,
                samples: int, ridge: float, threads: int, seed: int, saliency, keep_moments: bool = False
                ) -> Tuple[Dict[str, lsq.ConsumerLSQ], Dict[str, Tuple[np.ndarray, np.ndarray]],
                           Dict[str, Tuple[str, ConvGeometry]], Dict[str, lsq.ConvStats]]:
    """Least-squares state and (weight, bias) of every dense consumer Conv, from one run of the
    model over ``feeds`` (``samples`` input rows in all); also the consumers' geometries and, with
    ``keep_moments``, their moment matrices (else each is dropped once its state holds the
    inverse: on a wide model both sets at once were twice the memory, yolov5x 7.6 GB each)."""
    geoms = consumer_geometries(model, analysis)
    check_state_memory(geoms, params, moments_kept=keep_moments)
    per_image = max(1, -(-samples // max(len(feeds), 1)))
    batches = activations.capture(model, feeds, sorted({x for x, _ in geoms.values()}), threads)
    moments = lsq.collect_moments(geoms, batches, per_image, seed, saliency)
    states = {n: lsq.ConsumerLSQ(*params.conv[n], moments[n] if keep_moments else moments.pop(n), ridge)
              for n in geoms}
    conv_params = {n: (params.conv[n][0], params.conv[n][1] if params.conv[n][1] is not None
                       else np.zeros(params.conv[n][0].shape[0], np.float32)) for n in geoms}
    return states, conv_params, geoms, moments


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
        unit, _, st = self._build(layer, size)
        params = dict(self.base)
        params.update({n: lsq.full_weights(st[n], self.shapes[n]) for n in st})
        return unit, self.probe.measure(params) - self.base_d

    def commit(self, layer: Layer, unit) -> None:
        super().commit(layer, unit)
        for n in self._consumers(layer):
            self.base[n] = lsq.full_weights(self.states[n], self.shapes[n])
        self.base_d = self.probe.rebase(self.base)

    def touches(self, a: Layer, b: Layer) -> bool:
        return True


def probe_metric(model: onnx.ModelProto, feeds: Sequence[Feeds], name: str, threads: int):
    """The probe's metric: 'agreement' (AgreementMetric, falling back when undefined) or None
    (the probe's default: detections for a known YOLO layout, else the head maps)."""
    return sensitivity.agreement_metric(model, feeds, threads) if name == "agreement" else None


def measured_cost(model: onnx.ModelProto, analysis: ChannelAnalysis, feeds: Sequence[Feeds],
                  params: Params, *, samples: int, ridge: float, sens_images: int, threads: int,
                  seed: int, saliency=None, metric: str = "auto") -> Tuple[MeasuredCost, Dict[str, Any]]:
    """The measured cost model (LSQ units, distortion measured on ``sens_images`` feeds)."""
    states, conv_params, _, _ = _lsq_states(model, analysis, feeds, params, samples, ridge, threads, seed,
                                      saliency)
    m = probe_metric(model, feeds[:sens_images], metric, threads)
    probe = sensitivity.RefitProbe(model, conv_params, feeds[:sens_images], threads, metric=m)
    shapes = {n: params.conv[n][0].shape for n in states}
    return MeasuredCost(states, probe, shapes), {"metric": probe.metric.name}


#: shares of a layer's channels at which the sweep measures the layer's cost curve
SWEEP_LEVELS = (0.125, 0.25, 0.5, 0.75)


class SweepCost(LSQCost):
    """Per-layer cost curves, each measured once on the unpruned model. A layer's channels are
    ordered channel by channel by least-squares cost (as LSQCost); at a few depths of that order
    (``levels``, shares of the layer) the model with only those channels gone and the layer's
    consumers refit is measured with ``probe`` (e.g. 1 - agreement mAP on the calibration
    images). A unit is the next channels of the order; its cost is the rise of the curve
    (linear between measured depths, made non-decreasing). Layers are measured alone, so their
    costs are taken as additive: a sensitivity sweep, then a greedy allocation."""

    def __init__(self, states: Dict[str, lsq.ConsumerLSQ], probe: sensitivity.RefitProbe,
                 shapes: Mapping[str, Sequence[int]], levels: Sequence[float] = SWEEP_LEVELS,
                 layers: Optional[int] = None, progress: bool = False) -> None:
        super().__init__(states, {})
        self.probe = probe
        self.shapes = shapes
        self.levels = tuple(levels)
        self.base_d = probe.measure({})
        self.curves: Dict[Any, Tuple[List[Any], np.ndarray, np.ndarray]] = {}
        self.labels: Dict[Any, str] = {}
        #: one tick per layer measured (``layers``: how many there are, for the bar's total)
        self.bar = progress_bar(total=layers, desc="sensitivity sweep: layers", enabled=progress)

    def _depths(self, layer: Layer) -> List[int]:
        n = len(layer.groups)
        ok = sorted(n - k for k in layer.counts if k >= layer.floor)
        if not ok:
            return []
        return sorted({min(ok, key=lambda d: (abs(d - share * n), d)) for share in self.levels})

    def curve(self, layer: Layer) -> Tuple[List[Any], np.ndarray, np.ndarray]:
        """(channel order, measured depths with 0, non-decreasing costs) of ``layer``."""
        if layer.key in self.curves:
            return self.curves[layer.key]
        depths = self._depths(layer)
        st = {n: self.states[n].copy() for n in self._consumers(layer)}
        left, order, costs = list(layer.groups), [], [0.0]
        for depth in depths:
            while len(order) < depth:
                took = self.take_from(layer, left, st)
                if took is None:
                    break
                order.append(took[0])
            params = {n: lsq.full_weights(st[n], self.shapes[n]) for n in st}
            costs.append(self.probe.measure(params) - self.base_d)
        xs = np.array([0] + depths, dtype=np.float64)
        ys = np.maximum.accumulate(np.maximum(np.array(costs), 0.0))
        self.curves[layer.key] = (order, xs, ys)
        self.labels[layer.key] = layer.label
        self.bar.update(1)
        if self.bar.total is not None and self.bar.n >= self.bar.total:
            self.bar.close()
        first = layer.label
        log.info("sweep: layer %d measured (%s): %s", len(self.curves), first,
                 " ".join(f"{int(x)}:{y:.3f}" for x, y in zip(xs[1:], ys[1:])))
        return self.curves[layer.key]

    def curve_report(self) -> Dict[str, List[List[float]]]:
        """First producer (or channel Gather) of each measured layer -> [[channels removed, cost], ...]."""
        return {self.labels[key]: [[int(x), round(float(y), 5)] for x, y in zip(xs, ys)]
                for key, (_, xs, ys) in self.curves.items()}

    def unit(self, layer: Layer, size: int) -> Tuple[List[Any], float]:
        order, xs, ys = self.curve(layer)
        done = len(layer.groups) - layer.kept
        unit = order[done:done + size]
        if len(unit) < size:        # past the measured depths: the least-squares order goes on
            rest = [g for g in layer.remaining if g not in unit]
            unit += layer.first_removable(rest, size - len(unit))
        cost = float(np.interp(done + size, xs, ys) - np.interp(done, xs, ys))
        return unit, cost

    def commit(self, layer: Layer, unit) -> None:
        return None

    def touches(self, a: Layer, b: Layer) -> bool:
        return a is b


def sweep_cost(model: onnx.ModelProto, analysis: ChannelAnalysis, feeds: Sequence[Feeds],
               params: Params, *, samples: int, ridge: float, sens_images: int, threads: int,
               seed: int, saliency=None, metric: str = "agreement", layers: Optional[int] = None,
               progress: bool = False) -> Tuple[SweepCost, Dict[str, Any]]:
    """The sweep cost model: per-layer curves measured by agreement mAP on ``sens_images`` feeds
    (``layers``: how many layers the selection has, for the progress bar)."""
    states, conv_params, _, _ = _lsq_states(model, analysis, feeds, params, samples, ridge, threads, seed,
                                      saliency)
    probe_feeds = feeds[:sens_images]
    m = probe_metric(model, probe_feeds, metric, threads)
    probe = sensitivity.RefitProbe(model, conv_params, probe_feeds, threads, metric=m)
    shapes = {n: params.conv[n][0].shape for n in states}
    return SweepCost(states, probe, shapes, layers=layers, progress=progress), {"metric": probe.metric.name}
