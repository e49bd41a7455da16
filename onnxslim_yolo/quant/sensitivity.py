"""Sensitivity of the model output to each quantization decision, in one onnxruntime session.

A unit is an INT8 layer with the INT8 ops that only it feeds (its activation), a Concat/Add on
its own (``QuantPlan.units``). A quantized tensor is quantized as long as its producer's unit or
any INT8 layer reading it stays INT8 (onnxruntime fuses DQ->Conv->Q only with both). So the
candidates for restoring to float are, per quantized tensor, that set of units: restoring it
removes the tensor's Q/DQ and runs those layers float, exactly what a rebuild with their nodes
kept float does.

The switch model is the quantized model with every quantized read (activation, weight, bias)
routed through ``Where(on, quantized, float)``, ``on`` the Or of the switches (boolean graph
inputs) of the units that keep it quantized; with every switch off it computes the float model.
The error is measured on the head's raw maps (the last convs' outputs, before a decode mixes
pixel boxes with 0..1 scores): SQNR over all maps and images. A candidate's sensitivity is the
SQNR gained by restoring it alone in the fully quantized model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import data, ir, verify
from ..analysis.activations import with_outputs
from ..progress import bar
from . import metrics
from .placement import QuantPlan
from .rewrite import RewriteRecord

log = logging.getLogger(__name__)

SWITCH = "__qdq_switch_"


@dataclass(frozen=True)
class UnitSensitivity:
    """One candidate: a name (the tensor it un-quantizes), its units, their nodes, the gain."""

    unit: str
    units: tuple
    nodes: tuple
    sqnr_gain_db: float

    def as_dict(self) -> Dict[str, object]:
        return {"candidate": self.unit, "units": list(self.units), "nodes": list(self.nodes),
                "sqnr_gain_db": round(self.sqnr_gain_db, 3)}


def unit_of(plan: QuantPlan) -> Dict[str, str]:
    """Node name -> the name of the unit (:attr:`QuantPlan.units`) holding it."""
    return {n: u for u, ns in plan.units.items() for n in ns}


def _readers(t: gs.Tensor) -> List[gs.Node]:
    """The nodes reading ``t``, through the QuantizeLinear -> DequantizeLinear pair of a quantized
    graph (where the INT8 readers read the DequantizeLinear's output, not ``t``)."""
    out: List[gs.Node] = []
    for r in t.outputs:
        if r.op != "QuantizeLinear":
            out.append(r)
            continue
        for dq in r.outputs[0].outputs:
            out.extend(dq.outputs[0].outputs if dq.op == "DequantizeLinear" else [dq])
    return out


def tensor_units(graph: gs.Graph, plan: QuantPlan) -> Dict[str, List[str]]:
    """Quantized tensor -> the units that keep it quantized: the producing INT8 layer (its output
    must be quantized for DQ->Conv->Q to fuse) or INT8 op; under the tensorrt and openvino
    placements (weight-layer inputs quantized, not outputs) also the INT8 units that read it
    through its Q/DQ pair in the quantized ``graph``. Before 2026-12-05 those were missed, so the
    guard and mixed precision had nothing (tensorrt) or only Concats (openvino) to restore."""
    node_unit = unit_of(plan)
    int8_readers = set(plan.layers) | set(plan.int8_ops)
    tensors = graph.tensors()
    out: Dict[str, List[str]] = {}
    for name in plan.activations:
        t = tensors[name]
        p = t.inputs[0] if t.inputs else None
        units = [node_unit[p.name]] if p is not None and p.name in plan.layers else []
        for r in t.outputs:
            if r.name in int8_readers and r.name in node_unit and node_unit[r.name] not in units:
                units.append(node_unit[r.name])
        if not units and p is not None and p.name in node_unit:
            units = [node_unit[p.name]]
        if not plan.target.quantize_layer_outputs:   # tensorrt / openvino: the readers behind Q/DQ
            units += [node_unit[r.name] for r in _readers(t) if r.name in int8_readers
                      and r.name in node_unit and node_unit[r.name] not in units]
        if units:
            out[name] = units
    return out


def candidates(plan: QuantPlan, units_of: Dict[str, List[str]]) -> List[Tuple[str, Tuple[str, ...]]]:
    """(name, units) per distinct set of units that un-quantizes a tensor, in graph order."""
    seen: Dict[frozenset, str] = {}
    for t, units in units_of.items():
        seen.setdefault(frozenset(units), t)
    order = {u: i for i, u in enumerate(plan.units)}
    return [(t, tuple(sorted(us, key=order.__getitem__))) for us, t in seen.items()]


#: name of the candidate that restores every INT8 grouped (depthwise) Conv at once
GROUPED = "grouped convs"


def grouped_candidate(graph: gs.Graph, plan: QuantPlan) -> List[Tuple[str, Tuple[str, ...]]]:
    """One more candidate: the units of every INT8 Conv with groups (depthwise), together, when
    there are at least two. A depthwise Conv reads each channel alone, so a per-tensor input
    scale fits channels of very different ranges badly, and the loss adds up over many layers
    while each alone gains little when restored: PP-PicoDet (LCNet, 37 depthwise of 102 Convs)
    under the openvino placement lost output cosine 0.58 all-INT8 and 0.998 with its depthwise
    Convs float, but restoring one candidate at a time kept 97 layers float."""
    node_unit = unit_of(plan)
    units = [node_unit[n.name] for n in graph.nodes if n.op == "Conv" and n.name in plan.layers
             and int(n.attrs.get("group", 1)) > 1 and n.name in node_unit]
    units = list(dict.fromkeys(units))
    return [(GROUPED, tuple(units))] if len(units) >= 2 else []


def float_biases(model: onnx.ModelProto, plan: QuantPlan) -> Dict[str, np.ndarray]:
    """The float model's bias of every INT8 layer (bias correction changes the quantized one)."""
    graph = ir.to_graph(model)
    out: Dict[str, np.ndarray] = {}
    for n in graph.nodes:
        if n.name in plan.layers and plan.layers[n.name].bias is not None:
            b = ir.const_value(n.inputs[2])
            if b is not None:
                out[n.name] = b.astype(np.float32)
    return out


def switch_model(qgraph: gs.Graph, like: onnx.ModelProto, plan: QuantPlan, rec: RewriteRecord,
                 units_of: Dict[str, List[str]]) -> onnx.ModelProto:
    """The quantized graph with a Where(switch_unit, quantized, float) on every quantized read
    (activations, weights and biases: with every switch off it computes the float model)."""
    tensors = qgraph.tensors()
    alloc = ir.NameAllocator.for_graph(qgraph)
    switches: Dict[str, gs.Variable] = {}

    ors: Dict[Tuple[str, ...], gs.Variable] = {}

    def sw(units: Sequence[str]) -> gs.Variable:
        key = tuple(sorted(units))
        for u in key:
            if u not in switches:
                switches[u] = gs.Variable(SWITCH + u, np.bool_, [])
        if len(key) == 1:
            return switches[key[0]]
        if key not in ors:
            acc = switches[key[0]]
            for u in key[1:]:
                nxt = gs.Variable(alloc("switch_or"), np.bool_, [])
                qgraph.nodes.append(gs.Node("Or", inputs=[acc, switches[u]], outputs=[nxt]))
                acc = nxt
            ors[key] = acc
        return ors[key]

    def route(dq_name: str, float_t: gs.Tensor, units: Sequence[str]) -> None:
        dq = tensors[dq_name]
        readers = list(dq.outputs)
        out = gs.Variable(alloc(dq_name + "_switched"), np.float32, dq.shape)
        qgraph.nodes.append(gs.Node("Where", inputs=[sw(units), dq, float_t], outputs=[out]))
        for r in readers:
            for i, x in enumerate(r.inputs):
                if x is dq:
                    r.inputs[i] = out

    for name, (_, dq) in rec.activations.items():
        if name in units_of:
            route(dq, tensors[name], units_of[name])
    node_unit = unit_of(plan)
    for node, (w_float, dq) in rec.weights.items():
        if node in node_unit and w_float in tensors:
            route(dq, tensors[w_float], [node_unit[node]])
    layers = {n.name: n for n in qgraph.nodes if n.name in plan.layers}
    originals = float_biases(like, plan)
    for name, b in originals.items():
        node = layers.get(name)
        if node is None or name not in node_unit or len(node.inputs) < 3:
            continue
        out = gs.Variable(alloc(name + "_bias_switched"), np.float32, b.shape)
        orig = gs.Constant(alloc(name + "_bias_float"), b)
        qgraph.nodes.append(gs.Node("Where", inputs=[sw([node_unit[name]]), node.inputs[2], orig],
                                    outputs=[out]))
        node.inputs[2] = out
    qgraph.inputs.extend(switches.values())
    return ir.to_model(qgraph, like)


class SwitchEvaluator:
    """Loss of a switch model with any set of units restored to float (one session).

    With a decodable YOLO output the loss is :class:`metrics.DetectionError` on the decoded
    output; otherwise the noise-to-signal ratio of the head maps. Gains are in dB of that loss.
    """

    def __init__(self, model: onnx.ModelProto, head_maps: Sequence[str],
                 feeds: Sequence[Dict[str, np.ndarray]], threads: int = 0,
                 fmt: Optional[str] = None, read: Optional[Callable] = None) -> None:
        out0 = model.graph.output[0].name
        self.names = None
        self.feeds = list(feeds)
        self.runs = 0
        self.fetch = [out0] if fmt else list(head_maps)
        self.sess = verify.session(with_outputs(model, self.fetch, only=True), threads=threads)
        self.names = [i.name for i in self.sess.get_inputs() if i.name.startswith(SWITCH)]
        ref = self._run(off=None)
        if fmt:
            name = [i.name for i in self.sess.get_inputs() if not i.name.startswith(SWITCH)][0]
            err = metrics.DetectionError(fmt, data.feed_hw(self.feeds[0][name]), read=read)
            self.metric = "decoded detections: confidence-weighted score L1 + box (1 - IoU)"
            self.ref = [err.decoded(r[0]) for r in ref]
            self.loss = lambda outs: err(self.ref, [o[0] for o in outs])
        else:
            self.metric = "head maps: noise-to-signal ratio"
            self.ref = ref
            self.loss = self._nsr
        self.base_loss = self.loss(self._run(off=()))
        self.base = -10 * np.log10(max(self.base_loss, 1e-30))

    def _run(self, off: Optional[Iterable[str]]) -> List[List[np.ndarray]]:
        off_set = set(off) if off is not None else None
        flags = {n: np.array(off_set is not None and n[len(SWITCH):] not in off_set) for n in self.names}
        self.runs += len(self.feeds)
        return [self.sess.run(self.fetch, {**f, **flags}) for f in self.feeds]

    def _nsr(self, outs: List[List[np.ndarray]]) -> float:
        sig = noise = 0.0
        for r_img, o_img in zip(self.ref, outs):
            for a, b in zip(r_img, o_img):
                a64 = a.astype(np.float64)
                sig += float((a64 ** 2).sum())
                noise += float(((a64 - b) ** 2).sum())
        return noise / max(sig, 1e-30)

    def gain(self, restored: Iterable[str]) -> float:
        """dB by which restoring ``restored`` to float lowers the loss."""
        loss = self.loss(self._run(off=restored))
        return float(10 * np.log10(max(self.base_loss, 1e-30) / max(loss, 1e-30)))


Candidate = Tuple[str, Tuple[str, ...]]


def _nodes(units: Sequence[str], nodes: Dict[str, List[str]]) -> tuple:
    return tuple(n for u in units for n in nodes.get(u, []))


def rank_units(ev: SwitchEvaluator, cands: Sequence[Candidate], nodes: Dict[str, List[str]],
               progress: bool = False) -> List[UnitSensitivity]:
    """Exact ranking: every candidate restored alone; most sensitive first."""
    res = [UnitSensitivity(name, units, _nodes(units, nodes), ev.gain(units))
           for name, units in bar(list(cands), desc="sensitivity", enabled=progress)]
    res.sort(key=lambda r: -r.sqnr_gain_db)
    log.info("sensitivity: all-INT8 head SQNR %.2f dB; most sensitive %s", ev.base,
             [(r.unit, round(r.sqnr_gain_db, 2)) for r in res[:5]])
    return res


def significant_units(ev: SwitchEvaluator, cands: Sequence[Candidate], nodes: Dict[str, List[str]],
                      threshold_db: float, group: int = 0) -> List[UnitSensitivity]:
    """Candidates whose restoring alone gains at least ``threshold_db``, found by group testing.

    Restoring a group of candidates removes at least the noise of any one of them, up to error
    cancellation between members; so a group gaining less than half the threshold is not split
    (the margin absorbs cancellation): about sqrt(n)/2 + 2 k log(n) evaluations for k
    significant candidates instead of n. Most sensitive first.
    """
    cands = list(cands)
    size = group or max(2, int(np.ceil(np.sqrt(len(cands)) / 2)))
    stack = [cands[i:i + size] for i in range(0, len(cands), size)]
    found: List[UnitSensitivity] = []
    while stack:
        g = stack.pop()
        units = tuple(dict.fromkeys(u for _, us in g for u in us))
        gain = ev.gain(units)
        if gain < (threshold_db if len(g) == 1 else threshold_db / 2):
            continue
        if len(g) == 1:
            found.append(UnitSensitivity(g[0][0], g[0][1], _nodes(g[0][1], nodes), gain))
        else:
            stack += [g[: len(g) // 2], g[len(g) // 2:]]
    found.sort(key=lambda r: -r.sqnr_gain_db)
    log.info("sensitivity: %d candidates gain >= %.2f dB (%d runs): %s", len(found), threshold_db, ev.runs,
             [(r.unit, round(r.sqnr_gain_db, 2)) for r in found])
    return found
