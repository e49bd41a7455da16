"""Measured sensitivity of the detection head to removing input channels of given Convs.

A copy of the model gets, in front of each listed Conv, ``x * m + s`` with ``m`` and ``s``
per-channel graph inputs. Setting ``m = 0`` and ``s = mean`` for a channel is exactly what
removing that input channel of that Conv with its mean folded into the bias does, so one
onnxruntime session measures any removal without rebuilding the model. The distortion is
measured on the confident detections when the output format is a known YOLO layout
(:class:`DetectionMetric`: box offsets and sizes relative to the box, score changes), else on
the outputs of the last Convs (:class:`HeadMetric`: per-channel MSE over variance).
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir, verify
from ..eval.anchors import OutputReader
from ..pass_base import SlimError
from . import activations
from .activations import Feeds
from .saliency import Watch, detection_watch

log = logging.getLogger(__name__)

MASK, SHIFT = "__prune_mask", "__prune_shift"
Removal = Mapping[str, Tuple[np.ndarray, np.ndarray]]


def masked_model(model: onnx.ModelProto, convs: Sequence[str],
                 shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Copy of ``model`` where each Conv in ``convs`` reads ``x * <conv>__prune_mask +
    <conv>__prune_shift`` (``shapes`` gives the static shape of each Conv's input)."""
    graph = ir.to_graph(model)
    ir.name_unnamed_nodes(graph)
    wanted = set(convs)
    for node in [n for n in graph.nodes if n.name in wanted and n.op == "Conv"]:
        x = node.inputs[0]
        shp = shapes[x.name]
        shape = [1, int(shp[1])] + [1] * (len(shp) - 2)
        m = gs.Variable(node.name + MASK, np.float32, shape)
        s = gs.Variable(node.name + SHIFT, np.float32, shape)
        mul = gs.Variable(node.name + "__prune_mul", np.float32)
        out = gs.Variable(node.name + "__prune_in", np.float32)
        graph.nodes.append(gs.Node("Mul", node.name + "__prune_Mul", inputs=[x, m], outputs=[mul]))
        graph.nodes.append(gs.Node("Add", node.name + "__prune_Add", inputs=[mul, s], outputs=[out]))
        graph.inputs.extend([m, s])
        node.inputs[0] = out
    return ir.to_model(graph, model)


def last_convs(model: onnx.ModelProto) -> List[str]:
    """Output tensors of the Convs with no Conv downstream (the head's raw maps)."""
    g = ir.node_graph(model)
    conv = {n.name for n in model.graph.node if n.op_type == "Conv"}
    below: Dict[str, bool] = {}
    for name in reversed(list(nx.topological_sort(g))):
        below[name] = any(s in conv or below[s] for s in g.successors(name))
    return [n.output[0] for n in model.graph.node if n.op_type == "Conv" and not below[n.name]]


def _channels_first(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 1, 0).reshape(a.shape[1], -1).astype(np.float64)


def distortion(ref: Sequence[np.ndarray], new: Sequence[np.ndarray], var: Sequence[np.ndarray]) -> float:
    """Mean over tensors and channels of MSE / reference variance of the channel."""
    vals = []
    for a, b, v in zip(ref, new, var):
        d = (_channels_first(a) - _channels_first(b)) ** 2
        vals.append(float(np.mean(d.mean(axis=1) / v)))
    return float(np.mean(vals)) if vals else 0.0


class HeadMetric:
    """Per-channel normalized MSE of the last Convs' outputs (any model)."""

    name = "head"

    def __init__(self, model: onnx.ModelProto) -> None:
        self.watch = last_convs(model)
        self.var: List[np.ndarray] = []

    def prepare(self, refs: Sequence[List[np.ndarray]]) -> None:
        stacked = [np.concatenate([_channels_first(r[i]) for r in refs], axis=1)
                   for i in range(len(self.watch))]
        self.var = [np.maximum(s.var(axis=1), 1e-12) for s in stacked]

    def __call__(self, ref: List[np.ndarray], new: List[np.ndarray]) -> float:
        return distortion(ref, new, self.var)


def box_iou_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of row i of ``a`` with row i of ``b`` (xyxy)."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / np.maximum(union, 1e-9)


class DetectionMetric:
    """How far the candidates the reference scores at least ``conf`` move, row by row: 1 - IoU
    of the box with the reference box, plus ``score_weight`` x |log| of the score ratio of the
    reference's top class, averaged with the reference score as weight. 1 - IoU is what costs
    mAP@0.5:0.95 (a box that moves loses the high IoU thresholds). Needs a known YOLO output
    format (v5, v8, yolox). For a segmentation export (candidates and prototype masks watched
    together) each row also adds the relative change of its mask logits (:func:`mask_change`),
    and for a pose export how far its keypoints move (:func:`keypoint_change`), so that the
    prototype or keypoint branch, which no box depends on, is not measured as free. An obb
    export's rotated boxes are compared by probabilistic IoU instead of its boxes' enclosing ones,
    so that its angle branch counts fully."""

    name = "detections"

    def __init__(self, model: onnx.ModelProto, found: Watch, conf: float = 0.05,
                 score_weight: float = 0.1) -> None:
        from ..eval.decode import keypoint_shape
        self.found, self.watch = found, list(found.tensors)
        self.fmt, self.hw, self.conf, self.score_weight = found.fmt, tuple(found.hw), conf, score_weight
        self.read = OutputReader(model)
        self.keypoints = keypoint_shape(model) if found.keypoints is not None else None
        self._refs: List[Tuple[List[np.ndarray], Tuple[np.ndarray, np.ndarray]]] = []
        self._grams: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}

    def prepare(self, refs: Sequence[List[np.ndarray]]) -> None:
        """Decode the references once (a probe compares every candidate with the same ones)."""
        self._refs = [(r, self._decode(r)) for r in refs]

    def _decoded_ref(self, ref: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        for r, dec in self._refs:
            if r is ref:
                return dec
        return self._decode(ref)

    def _decode(self, watched: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        from ..eval.decode import decode_rows
        return decode_rows(self.read(watched[:self.found.boxes], self.hw), self.fmt, self.hw)

    def _gram(self, protos: np.ndarray, nm: int) -> np.ndarray:
        """The reference prototypes' Gram, computed once per reference (kept with it, so that an
        id is never reused while cached)."""
        hit = self._grams.get(id(protos))
        if hit is None or hit[0] is not protos:
            hit = self._grams[id(protos)] = (protos, reference_gram(protos, nm))
        return hit[1]

    def _rotated(self, watched: List[np.ndarray]) -> np.ndarray:
        """(N, 5) cx cy w h angle of the watched candidates of an obb export: its output, or the
        boxes and angles fed into its selection (end to end)."""
        from ..eval.decode import split_layout
        from ..eval.instances import rotated_candidates
        if self.found.angles is None:
            return rotated_candidates(watched[0])
        boxes = split_layout([w.shape for w in watched[:2]])[0]   # which of the pair holds the boxes
        return np.concatenate([watched[boxes].reshape(-1, 4), watched[self.found.angles].reshape(-1, 1)],
                              1).astype(np.float64)

    def __call__(self, ref: List[np.ndarray], new: List[np.ndarray]) -> float:
        rb, rs = self._decoded_ref(ref)
        nb, ns = self._decode(new)
        cls = rs.argmax(axis=1)
        top = rs[np.arange(len(rs)), cls]
        rows = np.nonzero(top >= self.conf)[0]
        if not len(rows):
            rows = np.argsort(-top)[:10]
        w = top[rows].astype(np.float64)
        if self.read.rotated:
            from ..eval.metrics import probiou_pairs
            a, b = self._rotated(ref)[rows], self._rotated(new)[rows]
            iou = probiou_pairs(a, b, eps=1e-12) / probiou_pairs(a, a, eps=1e-12)   # 1 when unmoved
        else:
            iou = box_iou_rows(rb[rows].astype(np.float64), nb[rows].astype(np.float64))
        s_new = np.maximum(ns[rows, cls[rows]].astype(np.float64), 1e-9)
        err = (1.0 - iou) + self.score_weight * np.abs(np.log(s_new / np.maximum(w, 1e-9)))
        f = self.found
        if f.protos is not None:
            pick = [f.coefs, f.protos]
            nm = ref[f.protos].shape[1]
            err = err + mask_change([ref[i] for i in pick], [new[i] for i in pick], nm, rows,
                                    self._gram(ref[f.protos], nm))
        if self.keypoints:
            err = err + keypoint_change(ref[f.keypoints], new[f.keypoints], self.keypoints, rows, rb[rows])
        return float((err * w).sum() / max(w.sum(), 1e-12))


def keypoint_change(ref: np.ndarray, new: np.ndarray, shape: Tuple[int, int], rows: np.ndarray,
                    boxes: np.ndarray) -> np.ndarray:
    """Per row of ``rows`` of a pose export's output (batch 1): twice the mean distance its
    keypoints (``shape`` = (K, 3) x, y, visibility, or (K, 2)) move, over the square root of the
    reference box's area (xyxy ``boxes``), plus the mean change of their visibility. A keypoint
    moved by a fraction d of the box's size costs 2d, about what 1 - IoU charges a box shifted
    by d of its side."""
    from ..eval.decode import trailing_values
    k, v = shape
    a = trailing_values(ref, k * v)[rows].astype(np.float64).reshape(-1, k, v)
    b = trailing_values(new, k * v)[rows].astype(np.float64).reshape(-1, k, v)
    size = np.sqrt(np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1.0))
    moved = np.sqrt(((b[..., :2] - a[..., :2]) ** 2).sum(-1)).mean(1)
    seen = np.abs(b[..., 2] - a[..., 2]).mean(1) if v == 3 else 0.0
    return 2.0 * moved / size + seen


def mask_change(ref: Sequence[np.ndarray], new: Sequence[np.ndarray], nm: int,
                rows: np.ndarray, ref_gram: Optional[np.ndarray] = None) -> np.ndarray:
    """Per row of ``rows``: ||L_new - L_ref||^2 / ||L_ref||^2 over the whole prototype map, where
    a candidate's mask logits L = c P are its ``nm`` mask coefficients c times the prototype masks
    P (nm, h*w) of a segmentation export's outputs (candidates, prototypes; batch 1). With
    dc = c_new - c_ref and dP = P_new - P_ref, L_new - L_ref = dc P_new + c_ref dP: quadratic
    forms in three nm x nm Gram matrices, from differences, so nothing cancels and no (rows, h*w)
    map is built; the three come from one product of [P_new; dP] with itself. ``ref_gram`` is
    P_ref P_ref^T when the caller keeps it (the reference is the same for every candidate). The
    whole map counts, not only the box the mask is cropped to."""
    from ..eval.decode import trailing_values
    c_ref = trailing_values(ref[0], nm)[rows].astype(np.float64)
    dc = trailing_values(new[0], nm)[rows].astype(np.float64) - c_ref
    p_ref = ref[1][0].reshape(nm, -1)
    p_new = new[1][0].reshape(nm, -1)
    both = np.concatenate([p_new, p_new - p_ref])
    g = (both @ both.T).astype(np.float64)        # [[Pn Pn', Pn dP'], [dP Pn', dP dP']]
    g_rr = ref_gram if ref_gram is not None else reference_gram(ref[1], nm)
    num = (((dc @ g[:nm, :nm]) * dc).sum(1) + 2 * ((dc @ g[:nm, nm:]) * c_ref).sum(1)
           + ((c_ref @ g[nm:, nm:]) * c_ref).sum(1))
    den = ((c_ref @ g_rr) * c_ref).sum(1)
    return np.maximum(num, 0.0) / np.maximum(den, 1e-12)


def reference_gram(protos: np.ndarray, nm: int) -> np.ndarray:
    """P P^T (float64) of a (1, nm, h, w) prototype output, the denominator's Gram of :func:`mask_change`."""
    p = protos[0].reshape(nm, -1)
    return (p @ p.T).astype(np.float64)


class AgreementMetric:
    """1 - agreement mAP@0.5:0.95 over all probe images together (evaluate.agreement, in input
    pixels): the candidate's detections, with evaluation's NMS settings, scored against the
    reference's detections scoring at least ``ref_conf`` as ground truth. The same measure as
    ``check``'s agreement, so it ranks candidates as mAP does, at the price of one NMS and one
    pycocotools run per measure."""

    name = "agreement"

    def __init__(self, model: onnx.ModelProto, fmt: str, hw: Sequence[int],
                 ref_conf: Optional[float] = None, watch: Optional[Sequence[str]] = None,
                 boxes: Optional[int] = None) -> None:
        from ..evaluate import AGREEMENT_CONF
        self.watch = list(watch or [model.graph.output[0].name])
        self.boxes = len(self.watch) if boxes is None else boxes   # watched tensors read for the boxes
        self.fmt, self.hw = fmt, tuple(int(v) for v in hw)
        self.read = OutputReader(model)
        self.ref_conf = AGREEMENT_CONF if ref_conf is None else ref_conf
        self.ref_dets: List = []

    def _boxes(self, outs: Sequence[List[np.ndarray]]) -> list:
        from ..evaluate import output_boxes
        return output_boxes([self.read(o[:self.boxes], self.hw) for o in outs], self.fmt, self.hw)

    def prepare(self, refs: Sequence[List[np.ndarray]]) -> None:
        self.ref_dets = self._boxes(refs)
        if not any(len(d.above(self.ref_conf)) for d in self.ref_dets):
            raise SlimError(f"the model detects nothing scoring >= {self.ref_conf} on {len(refs)} "
                            "probe images: agreement is undefined")

    def total(self, refs: Sequence[List[np.ndarray]], news: Sequence[List[np.ndarray]]) -> float:
        from ..evaluate import agreement
        cand = self._boxes(news)
        return 1.0 - agreement(cand, self.ref_dets, self.ref_conf)["map"]


def default_metric(model: onnx.ModelProto):
    """Detection-level metric when the output is a known YOLO layout, else the head metric."""
    found = detection_watch(model)
    if found is None:
        return HeadMetric(model)
    return DetectionMetric(model, found)


def agreement_metric(model: onnx.ModelProto, feeds: Sequence[Feeds], threads: int):
    """AgreementMetric for a known YOLO layout whose reference detects something on ``feeds``;
    else the checked default metric (detections or head maps)."""
    found = detection_watch(model)
    if found is None:
        return _checked_metric(model, feeds[:1], threads)
    metric = AgreementMetric(model, found.fmt, found.hw, watch=found.tensors, boxes=found.boxes)
    try:
        outs = activations.capture(model, feeds, metric.watch, threads)
        metric.prepare([[o[n] for n in metric.watch] for o in outs])
    except SlimError as exc:
        log.info("agreement metric unavailable (%s); using the default metric", exc)
        return _checked_metric(model, feeds[:1], threads)
    return metric


def _checked_metric(model: onnx.ModelProto, feeds: Sequence[Feeds], threads: int):
    """default_metric, falling back to the head metric when decoding the real output fails."""
    metric = default_metric(model)
    if isinstance(metric, DetectionMetric) and feeds:
        out = list(activations.capture(model, feeds, metric.watch, threads))[0]
        try:
            ref = [out[n] for n in metric.watch]
            metric(ref, ref)
        except SlimError as exc:
            log.info("detection metric unavailable (%s); measuring the head maps", exc)
            return HeadMetric(model)
    return metric


class Probe:
    """One session answering "how much do the outputs change if these inputs are mean-replaced?"."""

    def __init__(self, model: onnx.ModelProto, convs: Sequence[str], shapes: Mapping[str, Sequence[int]],
                 feeds: Sequence[Feeds], threads: int = 1, metric=None) -> None:
        self.metric = metric if metric is not None else default_metric(model)
        masked = masked_model(model, convs, shapes)
        self.model = activations.with_outputs(masked, self.metric.watch, only=True)
        dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in self.model.graph.input}
        self.masks = {c: dims[c + MASK] for c in convs if c + MASK in dims}
        self.feeds = list(feeds)
        self.sess = verify.session(self.model, optimize=True, threads=threads)
        names = [o.name for o in self.sess.get_outputs()]
        self.idx = [names.index(w) for w in self.metric.watch]
        self.ref = [self._run(f, {}) for f in self.feeds]
        self.metric.prepare(self.ref)

    def _feed(self, f: Feeds, removal: Removal) -> Feeds:
        out = dict(f)
        for conv, shape in self.masks.items():
            m = np.ones(shape[1], np.float32)
            s = np.zeros(shape[1], np.float32)
            if conv in removal:
                idx, mean = removal[conv]
                m[idx] = 0.0
                s[idx] = mean
            out[conv + MASK] = m.reshape(shape)
            out[conv + SHIFT] = s.reshape(shape)
        return out

    def _run(self, f: Feeds, removal: Removal) -> List[np.ndarray]:
        res = verify.run(self.sess, self._feed(f, removal))
        return [res[i] for i in self.idx]

    def measure(self, removal: Removal) -> float:
        """Output distortion when, per Conv, the given input channels are replaced by their means."""
        res = [self._run(f, removal) for f in self.feeds]
        return float(np.mean([self.metric(r, n) for r, n in zip(self.ref, res)]))


def weights_as_inputs(model: onnx.ModelProto, convs: Sequence[str]) -> onnx.ModelProto:
    """Copy of ``model`` where each Conv in ``convs`` reads its weight and bias from graph inputs
    ``<conv>__prune_w`` / ``<conv>__prune_b`` (a bias input is added when missing)."""
    graph = ir.to_graph(model)
    ir.name_unnamed_nodes(graph)
    wanted = set(convs)
    for node in [n for n in graph.nodes if n.name in wanted and n.op == "Conv"]:
        w = ir.const_value(node.inputs[1])
        wv = gs.Variable(node.name + "__prune_w", np.float32, list(w.shape))
        bv = gs.Variable(node.name + "__prune_b", np.float32, [int(w.shape[0])])
        graph.inputs.extend([wv, bv])
        node.inputs[1] = wv
        if len(node.inputs) > 2:
            node.inputs[2] = bv
        else:
            node.inputs.append(bv)
    return ir.to_model(graph, model)


class RefitProbe:
    """One session answering "how much do the outputs change with these Conv parameters?".

    :meth:`rebase` makes a set of parameters the base (one whole-model run that also caches the
    activations a suffix run needs, analysis.suffix); :meth:`measure` then re-runs only the part of
    the model below the Convs whose parameters differ from the base (``suffix=False``: always the
    whole model)."""

    def __init__(self, model: onnx.ModelProto, params: Mapping[str, Tuple[np.ndarray, np.ndarray]],
                 feeds: Sequence[Feeds], threads: int = 1, metric=None, suffix: bool = True) -> None:
        from .suffix import Suffixes
        self.metric = metric if metric is not None else _checked_metric(model, feeds[:1], threads)
        self.defaults = {n: (np.asarray(w, np.float32), np.asarray(b, np.float32))
                         for n, (w, b) in params.items()}
        # only the nodes the metric reads: a tail after them (an NMS with If/Loop) neither runs
        # nor keeps the suffixes from being cut
        plain = activations.with_outputs(weights_as_inputs(model, list(params)), self.metric.watch, only=True)
        sources = {n: (n + "__prune_w", n + "__prune_b") for n in params}
        self.suffixes = Suffixes(plain, sources, self.metric.watch, threads) if suffix else None
        extra = self.suffixes.capture if self.suffixes is not None else []
        self.model = activations.with_outputs(plain, list(dict.fromkeys(self.metric.watch + extra)))
        self.feeds = list(feeds)
        self.sess = verify.session(self.model, optimize=True, threads=threads)
        self.base: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self.runs = 0
        self.ref = self._base_runs({})
        self.metric.prepare(self.ref)

    def _feed(self, f: Feeds, params: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> Feeds:
        feed = dict(f)
        for n, (w, b) in self.defaults.items():
            w, b = params.get(n, (w, b))
            feed[n + "__prune_w"] = w
            feed[n + "__prune_b"] = b
        return feed

    def _run(self, f: Feeds, params: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> List[np.ndarray]:
        return verify.run(self.sess, self._feed(f, params), self.metric.watch)

    def _base_runs(self, params: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> List[List[np.ndarray]]:
        """Whole-model runs with ``params``, which become the base of later suffix runs."""
        self.base = dict(params)
        if self.suffixes is None or not self.suffixes.usable:
            return [self._run(f, params) for f in self.feeds]
        names = self.suffixes.wanted()
        values = [dict(zip(names, verify.run(self.sess, self._feed(f, params), names))) for f in self.feeds]
        self.suffixes.store(values)
        return [[v[t] for t in self.metric.watch] for v in values]

    def _changed(self, params: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> set:
        """Convs whose parameters in ``params`` differ from the base's."""
        out = set()
        for n, d in self.defaults.items():
            a, b = params.get(n, d), self.base.get(n, d)
            if a is not b and not all(x is y or np.array_equal(x, y) for x, y in zip(a, b)):
                out.add(n)
        return out

    def _score(self, res: Sequence[List[np.ndarray]]) -> float:
        if hasattr(self.metric, "total"):
            return float(self.metric.total(self.ref, res))
        return float(np.mean([self.metric(r, n) for r, n in zip(self.ref, res)]))

    def measure(self, params: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> float:
        """Output distortion with the given Conv parameters (others as in the original)."""
        self.runs += 1
        changed = self._changed(params) if self.suffixes is not None else None
        if self.suffixes is not None and self.suffixes.covers(changed):
            key = frozenset(changed)
            res = [self.suffixes.run(k, self._feed(f, params), key) for k, f in enumerate(self.feeds)]
        else:
            res = [self._run(f, params) for f in self.feeds]
        return self._score(res)

    def rebase(self, params: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> float:
        """measure(params), and ``params`` become the base that suffix runs start from."""
        self.runs += 1
        changed = self._changed(params) if self.suffixes is not None else None
        if self.suffixes is not None and self.suffixes.covers(changed):
            res = self.suffixes.rebase([self._feed(f, params) for f in self.feeds], frozenset(changed))
            self.base = dict(params)
            return self._score(res)
        return self._score(self._base_runs(params))


def removal_of(groups: Iterable, means: Mapping[str, np.ndarray]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """(consumer Conv -> (input channel indices, means)) for the given channel groups."""
    idx: Dict[str, List[int]] = {}
    tensor: Dict[str, str] = {}
    for g in groups:
        for r in g.consumers:
            idx.setdefault(r.node, []).append(r.index)
            tensor[r.node] = r.tensor
    out: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for n, ii in idx.items():
        a = np.array(sorted(set(ii)), dtype=np.int64)
        mean = means.get(tensor[n])
        out[n] = (a, (mean[a] if mean is not None else np.zeros(len(a))).astype(np.float32))
    return out
