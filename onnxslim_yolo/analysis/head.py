"""Detection-head analysis (read-only): the last Convs, the decode tail, the output layout.

The *last convs* are the weight-carrying nodes (Conv, ConvTranspose, MatMul/Gemm with a constant
operand, and their quantized forms) from which no other such node is reachable before a graph
output: the head's raw prediction maps. The *decode tail* is every node downstream of them up to
the outputs (Reshape/Transpose/Sigmoid, grid and anchor arithmetic, the Concat of boxes and
scores, DFL). A DFL projection (a 1x1 Conv or MatMul whose constant weight is ``arange(reg_max)``)
is decode arithmetic, not a learned layer: it belongs to the tail and is never a last conv.

Node names are the graph's own; an unnamed node is called ``"<op>:<first output>"``.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from .. import ir
from ..data import channels_last, ones_objectness
from ..eval.anchors import anchor_layout, known, model_anchors, per_cell
from ..eval.decode import GFL_BINS, GFL_STRIDES, decoded_in_graph, gfl_shape, mask_coefficients, split_layout
from ..eval.dfl import DISTANCES, dfl_layout, gfl_rows
from ..eval.fastest import fastestdet_map, fastestv2_maps, v2_raw_layout
from ..pass_base import PreconditionError

log = logging.getLogger(__name__)

WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "QLinearConv", "ConvInteger",
                        "QLinearMatMul", "MatMulInteger"})
FAMILIES = ("yolov5", "yolov8", "yolox", "unknown")
DEFAULT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class HeadInfo:
    """Where the detection head ends and what its outputs mean."""

    family: str
    layout: str
    last_convs: Tuple[str, ...]
    last_conv_outputs: Tuple[str, ...]
    tail_nodes: Tuple[str, ...]
    decode_convs: Tuple[str, ...] = ()
    levels: Dict[int, Tuple[str, ...]] = field(default_factory=dict)
    num_classes: Optional[int] = None
    anchors_per_cell: Optional[int] = None
    outputs: Tuple[Tuple[str, Tuple[object, ...]], ...] = ()
    evidence: Tuple[str, ...] = ()

    @property
    def strides(self) -> Tuple[int, ...]:
        return tuple(sorted(self.levels))

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        d["levels"] = {str(k): list(v) for k, v in self.levels.items()}
        d["strides"] = list(self.strides)
        d["outputs"] = [{"name": n, "shape": list(s)} for n, s in self.outputs]
        for k in ("last_convs", "last_conv_outputs", "tail_nodes", "decode_convs", "evidence"):
            d[k] = list(d[k])
        return d


# ----------------------------------------------------------------------------------- graph index
def node_name(n: onnx.NodeProto) -> str:
    return n.name or f"{n.op_type}:{n.output[0] if n.output else ''}"


class _Index:
    """Producer/consumer links of a GraphProto (top graph only), built once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer: Dict[str, int] = {}
        self.consumers: Dict[str, List[int]] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                if o:
                    self.producer[o] = i
            for x in n.input:
                if x:
                    self.consumers.setdefault(x, []).append(i)
        self.outputs = [o.name for o in g.output]

    def succ(self, i: int) -> Set[int]:
        return {j for o in self.nodes[i].output for j in self.consumers.get(o, ())}

    def const(self, name: str) -> Optional[np.ndarray]:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and self.nodes[p].op_type == "Constant":
            for a in self.nodes[p].attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        if p is not None and self.nodes[p].op_type in ("DequantizeLinear", "Identity", "Cast"):
            return self.const(self.nodes[p].input[0])
        return None

    def topo(self) -> List[int]:
        """Kahn's order (the proto need not be sorted)."""
        indeg = [0] * len(self.nodes)
        succ = [self.succ(i) for i in range(len(self.nodes))]
        for s in succ:
            for j in s:
                indeg[j] += 1
        q = deque(i for i, d in enumerate(indeg) if d == 0)
        order: List[int] = []
        while q:
            i = q.popleft()
            order.append(i)
            for j in succ[i]:
                indeg[j] -= 1
                if indeg[j] == 0:
                    q.append(j)
        if len(order) != len(self.nodes):
            raise PreconditionError("find_head: the graph has a cycle")
        return order


def is_decode_projection(idx: _Index, i: int) -> bool:
    """DFL: a Conv/MatMul whose constant weight is 0, 1, ..., n-1 (an expectation, not a layer)."""
    n = idx.nodes[i]
    if n.op_type not in ("Conv", "MatMul", "Gemm") or len(n.input) < 2:
        return False
    for name in n.input[:2]:
        w = idx.const(name)
        if w is not None and 2 <= w.size <= 256 and w.size == max(w.shape, default=1):
            if np.array_equal(w.ravel(), np.arange(w.size, dtype=w.dtype)):
                return True
    return False


def _is_weight_node(idx: _Index, i: int) -> bool:
    n = idx.nodes[i]
    if n.op_type not in WEIGHT_OPS:
        return False
    if n.op_type in ("MatMul", "Gemm"):  # activation x activation (attention) is not a layer
        return any(idx.const(x) is not None for x in n.input[:2])
    return True


# --------------------------------------------------------------------------------------- shapes
def _dims(vi: onnx.ValueInfoProto) -> Tuple[object, ...]:
    out: List[object] = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None))
    return tuple(out)


def _shapes(model: onnx.ModelProto, names: Sequence[str]) -> Dict[str, Tuple[object, ...]]:
    """Static shapes of ``names`` (graph outputs and value_info first; shape inference for the
    others, and for the dims they declare as names: an output declared (batch, anchors, 85) is
    (1, 25200, 85) once the input's size is fixed)."""
    g = model.graph
    known = {vi.name: _dims(vi) for vi in list(g.value_info) + list(g.output) + list(g.input)
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    if all(n in known and all(isinstance(d, int) for d in known[n]) for n in names):
        return known
    try:
        inferred = ir.inferred_values(model, strict_mode=False)
    except Exception as exc:  # shape inference is best effort here
        log.debug("find_head: shape inference failed: %s", exc)
        return known
    for vi in inferred:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims, old = _dims(vi), known.get(vi.name)
            if old is None:
                known[vi.name] = dims
            elif len(old) == len(dims):
                known[vi.name] = tuple(o if isinstance(o, int) else d for o, d in zip(old, dims))
    return known


def _image_hw(model: onnx.ModelProto) -> Optional[Tuple[int, int]]:
    inits = {t.name for t in model.graph.initializer}
    last = channels_last(model)   # tf2onnx's N x H x W x C
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        d = _dims(vi)
        hw = d[1:3] if last else d[2:4]
        if len(d) == 4 and all(isinstance(v, int) and v > 0 for v in hw):
            return int(hw[0]), int(hw[1])
    return None


# ----------------------------------------------------------------------------------------- head
def _reaches_layer(idx: _Index, order: Sequence[int], layer: Set[int]) -> List[bool]:
    """reach[i]: some weight layer is strictly downstream of node i."""
    reach = [False] * len(idx.nodes)
    for i in reversed(order):
        reach[i] = any(j in layer or reach[j] for j in idx.succ(i))
    return reach


def _downstream(idx: _Index, starts: Sequence[int]) -> Set[int]:
    seen: Set[int] = set()
    stack = list(starts)
    while stack:
        for j in idx.succ(stack.pop()):
            if j not in seen:
                seen.add(j)
                stack.append(j)
    return seen


def _levels(last_out: Mapping[str, str], shapes: Mapping[str, Tuple[object, ...]],
            hw: Optional[Tuple[int, int]]) -> Dict[int, Tuple[str, ...]]:
    levels: Dict[int, List[str]] = {}
    if hw is None:
        return {}
    for node, t in last_out.items():
        s = shapes.get(t, ())
        if len(s) != 4 or not isinstance(s[2], int) or s[2] <= 0:
            continue
        if hw[0] % s[2] == 0:
            levels.setdefault(hw[0] // s[2], []).append(node)
            continue
        # an input size the stride does not divide: the map has the cells rounded up (PicoDet's
        # stride 64 over 800 rows: 13)
        stride = next((2 ** k for k in range(1, 9) if -(-hw[0] // 2 ** k) == s[2]), None)
        if stride is not None:
            levels.setdefault(stride, []).append(node)
    return {k: tuple(v) for k, v in sorted(levels.items())}


def _cells(hw: Optional[Tuple[int, int]], strides: Sequence[int]) -> Optional[int]:
    if hw is None:
        return None
    return sum((hw[0] // s) * (hw[1] // s) for s in strides)


def guess_family(model: onnx.ModelProto, outputs: Sequence[Tuple[str, Tuple[object, ...]]],
                 strides: Sequence[int], has_dfl: bool
                 ) -> Tuple[str, str, Optional[int], Optional[int], List[str]]:
    """(family, layout, num_classes, anchors per cell, evidence) from output shapes and metadata."""
    meta = {p.key: p.value for p in model.metadata_props}
    ev: List[str] = []
    nm = mask_coefficients([s for _, s in outputs])
    if nm:
        ev.append(f"{nm} mask coefficients per candidate (prototype output)")
    hw = _image_hw(model)
    cells = _cells(hw, strides or DEFAULT_STRIDES)
    if fastestdet_map(model):
        ch = outputs[0][1][1]
        ev.append(f"output {outputs[0][0]} is a Concat of a Sigmoid, a 4-channel box map and a Softmax "
                  "(FastestDet's head)")
        return ("fastestdet", "(1, 1+4+C, H, W) objectness, box values, class probabilities",
                int(ch) - 5 if isinstance(ch, (int, np.integer)) else None, 1, ev)
    v2, raw = fastestv2_maps(model), v2_raw_layout([s for _, s in outputs])
    if v2 or raw is not None:
        if v2:
            nc = outputs[0][1][3]
            nc = int(nc) - 5 * v2 if isinstance(nc, (int, np.integer)) else None
            layout = f"(1, h, w, 5x{v2}+C) box values and objectness per anchor, class probabilities"
            ev.append(f"{len(outputs)} outputs (1, h, w, 5x{v2}+C): a channels-last Concat of Sigmoids and a "
                      "Softmax (YOLO-FastestV2's head)")
        else:
            v2, nc = raw[0], int(outputs[raw[1][0][2]][1][1])
            layout = f"raw maps (1, 4x{v2}, h, w) + (1, {v2}, h, w) + (1, C, h, w)"
            ev.append(f"{len(raw[1])} levels of raw maps (1, 4x{v2}, h, w) + (1, {v2}, h, w) + "
                      f"(1, {nc}, h, w), no sigmoid or softmax in the graph (YOLO-FastestV2's head)")
        ev.append("anchors: " + ("the model's 'anchors' metadata" if model_anchors(model) is not None
                                 else "YOLO-FastestV2's COCO ones (--anchors names others)"))
        return "yolo-fastestv2", layout, nc, v2, ev
    if gfl_rows([s for _, s in outputs]):
        bins, nc, levels = dfl_layout([s for _, s in outputs])  # type: ignore[misc]
        ev.append(f"{len(levels)} levels of head rows (1, h*w, 4x{bins}) + (1, h*w, {nc}), no DFL decode "
                  "in the graph")
        return "gfl", "rows (1, h*w, 4*R) + (1, h*w, C)", nc, 1, ev
    pair = split_layout([s for _, s in outputs])
    if pair is not None:  # PP-YOLOE, YOLO-NAS, DAMO-YOLO: one (1, C, N) output is not v8's (1, 4+C, N)
        bi, si, first = pair
        scores = outputs[si][1]
        nc = scores[1] if first else scores[2]
        what = "(1, C, N)" if first else "(1, N, C)"
        ev.append(f"outputs {outputs[bi][0]} (1, N, 4) boxes and {outputs[si][0]} {what} class scores")
        return ("boxes+scores", f"boxes (1, N, 4) x1 y1 x2 y2 + class scores {what}",
                int(nc) if isinstance(nc, (int, np.integer)) else None, 1, ev)
    after = _after_nms(model, outputs)
    if after is not None:
        ev.append(after[1])
        return after[0], after[2], None, None, ev
    # a (N, 5+C) output is a (1, N, 5+C) one without its batch axis
    rank3 = [(n, s if len(s) == 3 else (1, *s)) for n, s in outputs
             if len(s) in (2, 3) and all(isinstance(d, int) for d in s[-2:])]
    if rank3:
        name, (_, a, b) = max(rank3, key=lambda ns: int(ns[1][1]) * int(ns[1][2]))  # type: ignore[index]
        a, b = int(a), int(b)  # type: ignore[arg-type]
        if gfl_shape(a, b, hw) and not decoded_in_graph(model):
            ev.append(f"output {name} (1, {a}, {b}): {a} = grid cells at strides {GFL_STRIDES}, "
                      f"C + 4x{GFL_BINS} bin logits last")
            return "gfl", "(1, N, C+4*8) class scores + distance-bin logits", b - 4 * GFL_BINS - nm, 1, ev
        if cells and b == cells and a >= 5 and (has_dfl or a < b):
            ev.append(f"output {name} (1, {a}, {b}): 4+C channels first, {b} = grid cells")
            return "yolov8", "(1, 4+C, N) xywh + class scores, no objectness", a - 4 - nm, 1, ev
        if cells and a % cells == 0 and b >= 6:
            na = a // cells
            fam = "yolov5" if na > 1 else "yolox"
            ev.append(f"output {name} (1, {a}, {b}): {na} prediction(s) per grid cell, 5+C last")
            if na == 1 and ones_objectness(model):
                ev.append("objectness column is a constant 1 (no objectness branch)")
                return "yolov6", "(1, N, 5+C) xywh + ones + class scores", b - 5 - nm, na, ev
            return fam, "(1, N, 5+C) xywh + objectness + class scores", b - 5 - nm, na, ev
        if has_dfl and a >= 5:
            ev.append("DFL projection in the tail")
            return "yolov8", "(1, 4+C, N) xywh + class scores, no objectness", a - 4 - nm, 1, ev
        if b >= 6 and a > b:
            fam = "yolov5" if "stride" in meta and "names" in meta else "unknown"
            ev.append(f"output {name} (1, {a}, {b}): predictions last-dim 5+C")
            return fam, "(1, N, 5+C) xywh + objectness + class scores", b - 5 - nm, None, ev
    anchors = model_anchors(model)
    maps = anchor_layout([s for _, s in outputs], per_cell(anchors))
    if maps is not None:
        na, no = maps
        layout = "(1, na*(5+C), h, w)" if len(outputs[0][1]) == 4 else "(1, na, h, w, 5+C)"
        ev.append(f"{len(outputs)} raw head maps {layout}, na={na}, 5+C={no}, no decode in the graph")
        ev.append("anchors: " + ("the model's 'anchors' metadata" if anchors is not None else
                                 "YOLOv5's defaults (--anchors names others)" if known(len(outputs), None)
                                 else f"none known for {len(outputs)} levels (--anchors names them)"))
        return "yolov5", f"raw maps {layout}", no - 5, na, ev
    free = dfl_layout([s for _, s in outputs])
    if free is not None:
        bins, nc, levels = free
        if bins == DISTANCES:
            ev.append(f"{len(levels)} levels of raw head maps (1, 4, h, w) + (1, {nc}, h, w), no decode in "
                      "the graph: box distances in pixels")
            return "rtmdet", "raw maps (1, 4, h, w) distances + (1, C, h, w)", nc, 1, ev
        ev.append(f"{len(levels)} levels of raw head maps (1, 4x{bins}, h, w) + (1, {nc}, h, w), no DFL "
                  "decode in the graph")
        return "yolov8", "raw maps (1, 4*R, h, w) + (1, C, h, w)", nc, 1, ev
    if any(len(s) == 5 for _, s in outputs):
        ev.append("rank-5 outputs (1, na, h, w, 5+C)")
        s5 = next(s for _, s in outputs if len(s) == 5)
        nc = int(s5[4]) - 5 if isinstance(s5[4], int) else None
        return "yolov5", "raw maps (1, na, h, w, 5+C)", nc, s5[1] if isinstance(s5[1], int) else None, ev
    if meta.get("task") == "detect" or "ultralytics" in meta.get("author", "").lower():
        ev.append("ultralytics metadata")
        return "yolov8", "unknown layout", None, None, ev
    return "unknown", "unknown layout", None, None, ev


def _after_nms(model: onnx.ModelProto, outputs: Sequence[Tuple[str, Tuple[object, ...]]]
               ) -> Optional[Tuple[str, str, str]]:
    """(family, evidence, layout) of detections after an NMS inside the graph, as the evaluator
    reads them (:func:`..eval.decode.nms_layout`, or one output of 6 or 7 values per row computed
    after a selection op); None otherwise. The family is the exporter's, when its metadata names it."""
    from ..eval.decode import exporter_family, nms_layout, rotated_boxes
    from ..verify import selection_frontier
    named = exporter_family(model)[0] or ""
    family = {"v5": "yolov5", "v8": "yolov8", "yolox": "yolox"}.get(named, "unknown")
    several = nms_layout([s for _, s in outputs])
    if several is not None:
        return family, f"{len(outputs)} outputs of detections after NMS ({several})", \
            "detections after NMS in several outputs"
    name, shape = outputs[0] if outputs else ("", ())
    if len(shape) not in (2, 3) or shape[-1] not in (6, 7) or rotated_boxes(model) \
            or name not in selection_frontier(model)[1]:
        return None
    rows = "batch x1 y1 x2 y2 class score" if shape[-1] == 7 else "x1 y1 x2 y2 score class"
    dims = f"({'1, ' if len(shape) == 3 else ''}K, {shape[-1]})"
    return family, f"output {name} {list(shape)} is computed after an NMS, TopK or NonZero", \
        f"{dims} {rows} rows after NMS"


def find_head(model: onnx.ModelProto) -> HeadInfo:
    """Locate the last Convs, the decode tail and the output layout of a YOLO-family model.

    Raises :class:`PreconditionError` when the graph has no weight layer at all.
    """
    idx = _Index(model)
    order = idx.topo()
    decode = {i for i in range(len(idx.nodes)) if is_decode_projection(idx, i)}
    layers = {i for i in range(len(idx.nodes)) if i not in decode and _is_weight_node(idx, i)}
    if not layers:
        raise PreconditionError("find_head: no Conv/MatMul with weights in the graph")
    reach = _reaches_layer(idx, order, layers)
    last = [i for i in order if i in layers and not reach[i]]
    tail_set = _downstream(idx, last)
    pos = {i: k for k, i in enumerate(order)}
    tail = sorted((i for i in tail_set if idx.nodes[i].op_type != "Constant"), key=pos.__getitem__)
    last_out = {node_name(idx.nodes[i]): idx.nodes[i].output[0] for i in last}
    out_names = [o for o in idx.outputs]
    shapes = _shapes(model, list(last_out.values()) + out_names)
    levels = _levels(last_out, shapes, _image_hw(model))
    outputs = tuple((o, tuple(shapes.get(o, ()))) for o in out_names)
    has_dfl = any(i in tail_set for i in decode)
    family, layout, nc, na, ev = guess_family(model, outputs, tuple(levels) or DEFAULT_STRIDES, has_dfl)
    info = HeadInfo(family=family, layout=layout, last_convs=tuple(last_out),
                    last_conv_outputs=tuple(last_out.values()),
                    tail_nodes=tuple(node_name(idx.nodes[i]) for i in tail),
                    decode_convs=tuple(node_name(idx.nodes[i]) for i in sorted(decode, key=pos.__getitem__)),
                    levels=levels, num_classes=nc, anchors_per_cell=na, outputs=outputs, evidence=tuple(ev))
    log.info("head: %s, %d last convs, %d tail nodes, strides %s", family, len(last), len(tail),
             list(levels))
    return info


__all__ = ["HeadInfo", "find_head", "guess_family", "is_decode_projection", "node_name", "WEIGHT_OPS"]
