"""Sensitivity of the model output to each quantized unit, measured in one onnxruntime session.

A unit is an INT8 layer with the INT8 ops that only it feeds (its activation), a Concat/Add on
its own, or a quantized graph input (``QuantPlan.units``). The switch model is the quantized
model where every Q/DQ'd tensor and every INT8 weight is read through ``Where(switch, dq, float)``
with one boolean graph input per unit, so any subset of units can be restored to float without
rebuilding a session. The error is measured on the head's raw maps (the last convs' outputs,
before a decode mixes pixel boxes with 0..1 scores): SQNR over all maps and images. A unit's
sensitivity is the SQNR gained by restoring only that unit to float in the fully quantized model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir, verify
from .metrics import with_outputs
from .placement import QuantPlan
from .rewrite import RewriteRecord

log = logging.getLogger(__name__)

SWITCH = "__qdq_switch_"


@dataclass(frozen=True)
class UnitSensitivity:
    unit: str
    nodes: tuple
    sqnr_gain_db: float

    def as_dict(self) -> Dict[str, object]:
        return {"unit": self.unit, "nodes": list(self.nodes), "sqnr_gain_db": round(self.sqnr_gain_db, 3)}


def tensor_units(graph: gs.Graph, plan: QuantPlan) -> Dict[str, str]:
    """Quantized tensor -> unit: its producer's unit, else the unit of an INT8 layer reading it."""
    node_unit = {n: u for u, ns in plan.units.items() for n in ns}
    tensors = graph.tensors()
    out: Dict[str, str] = {}
    for name in plan.activations:
        t = tensors[name]
        p = t.inputs[0] if t.inputs else None
        if p is not None and p.name in node_unit:
            out[name] = node_unit[p.name]
            continue
        if f"input:{name}" in plan.units:
            out[name] = f"input:{name}"
            continue
        readers = [c.name for c in t.outputs if c.name in node_unit]
        if readers:
            out[name] = node_unit[readers[0]]
    return out


def switch_model(qgraph: gs.Graph, like: onnx.ModelProto, plan: QuantPlan, rec: RewriteRecord,
                 units_of: Dict[str, str]) -> onnx.ModelProto:
    """The quantized graph with a Where(switch_unit, quantized, float) on every quantized read."""
    tensors = qgraph.tensors()
    alloc = ir.NameAllocator.for_graph(qgraph)
    switches: Dict[str, gs.Variable] = {}

    def sw(unit: str) -> gs.Variable:
        if unit not in switches:
            switches[unit] = gs.Variable(SWITCH + unit, np.bool_, [])
        return switches[unit]

    def route(dq_name: str, float_t: gs.Tensor, unit: str) -> None:
        dq = tensors[dq_name]
        readers = list(dq.outputs)
        out = gs.Variable(alloc(dq_name + "_switched"), np.float32, dq.shape)
        qgraph.nodes.append(gs.Node("Where", inputs=[sw(unit), dq, float_t], outputs=[out]))
        for r in readers:
            for i, x in enumerate(r.inputs):
                if x is dq:
                    r.inputs[i] = out

    for name, (_, dq) in rec.activations.items():
        if name in units_of:
            route(dq, tensors[name], units_of[name])
    for node, (w_float, dq) in rec.weights.items():
        unit = next((u for u, ns in plan.units.items() if node in ns), None)
        if unit is not None and w_float in tensors:
            route(dq, tensors[w_float], unit)
    qgraph.inputs.extend(switches.values())
    return ir.to_model(qgraph, like)


def rank_units(model: onnx.ModelProto, units: Sequence[str], head_maps: Sequence[str],
               feeds: Sequence[Dict[str, np.ndarray]], threads: int = 0,
               progress: bool = False, nodes: Dict[str, List[str]] = None) -> List[UnitSensitivity]:
    """Sensitivity of every unit of a switch model, most sensitive first."""
    from tqdm import tqdm

    sess = verify.session(with_outputs(model, head_maps), threads=threads)
    names = [i.name for i in sess.get_inputs() if i.name.startswith(SWITCH)]
    plain = [f for f in feeds]

    def run(on: Dict[str, bool]) -> List[List[np.ndarray]]:
        flags = {n: np.array(on.get(n[len(SWITCH):], True)) for n in names}
        return [sess.run(list(head_maps), {**f, **flags}) for f in plain]

    ref = run({u: False for u in units})

    def sqnr(outs: List[List[np.ndarray]]) -> float:
        sig = noise = 0.0
        for r_img, o_img in zip(ref, outs):
            for a, b in zip(r_img, o_img):
                a64 = a.astype(np.float64)
                sig += float((a64 ** 2).sum())
                noise += float(((a64 - b) ** 2).sum())
        return float("inf") if noise == 0 else 10 * np.log10(max(sig, 1e-30) / noise)

    base = sqnr(run({}))
    res = []
    for u in tqdm(list(units), desc="sensitivity", disable=not progress, leave=False):
        res.append(UnitSensitivity(u, tuple((nodes or {}).get(u, [])), sqnr(run({u: False})) - base))
    res.sort(key=lambda r: -r.sqnr_gain_db)
    log.info("sensitivity: all-INT8 head SQNR %.2f dB; most sensitive %s", base,
             [(r.unit, round(r.sqnr_gain_db, 2)) for r in res[:5]])
    return res
