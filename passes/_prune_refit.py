"""Least-squares recovery for prune-channels: refit consumer Convs on calibration activations.

For a dense 2-D Conv that lost input channels, sample output positions on calibration images,
take the im2col patches of its input in the pruned model (kept channels) and the original
output ``Y = X W^T + b`` of the original model at the same positions, and solve the ridge
problem ``min ||[X_kept, 1] theta - Y||^2 + lambda ||W'||^2`` (bias not penalised) by the normal
equations in float64. ``sequential`` refits in topological levels: a consumer sees the inputs
of the pruned model with all upstream refits applied, so it also corrects upstream error.
Grouped, depthwise and non-2-D Convs are not refit (depthwise ones are removed with their
group, never consumers); their names are returned as skipped.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim_yolo import ir
from onnxslim_yolo.analysis._im2col import ConvGeometry, geometry, patches, sample_positions
from onnxslim_yolo.analysis.activations import Feeds, capture
from onnxslim_yolo.analysis.lsq import ridge_lambda
from onnxslim_yolo.progress import bar as progress_bar


log = logging.getLogger(__name__)


@dataclass
class _Target:
    node: str
    x: str
    keep: np.ndarray
    w: np.ndarray            # original weight (Cout kept, Cin, kh, kw)
    b: np.ndarray
    geo: ConvGeometry
    tied: int = 1            # output channels come in this many blocks sharing one bias each


def _targets(model: onnx.ModelProto, names: Sequence[str], keep: Mapping[str, np.ndarray],
             shapes: Mapping[str, Tuple[int, ...]], tied: Mapping[str, int]
             ) -> Tuple[List[_Target], Dict[str, str]]:
    graph = ir.to_graph(model)
    ir.name_unnamed_nodes(graph)
    by_name = {n.name: n for n in graph.nodes}
    out: List[_Target] = []
    skipped: Dict[str, str] = {}
    for name in names:
        node = by_name[name]
        w = ir.const_value(node.inputs[1])
        x = node.inputs[0].name
        geo = geometry(node, w.shape, shapes.get(x))
        if geo is None or int(node.attrs.get("group", 1)) != 1:
            skipped[name] = "not a dense 2-D Conv with known padding: no refit"
            continue
        b = ir.const_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        b = np.zeros(w.shape[0]) if b is None else b
        ky = keep.get(node.outputs[0].name)
        if ky is not None:  # the consumer is also a producer that lost output channels
            w, b = w[ky], b[ky]
        kx = keep.get(x, np.arange(w.shape[1]))
        out.append(_Target(name, x, kx, w.astype(np.float64), b.astype(np.float64), geo,
                           tied.get(name, 1) ** 2))
    return out, skipped


def _levels(model: onnx.ModelProto, names: Sequence[str]) -> List[List[str]]:
    """Consumers grouped so that no consumer depends on another of its own level."""
    g = ir.node_graph(model)
    wanted = set(names)
    level: Dict[str, int] = {}
    for n in nx.topological_sort(g):
        if n in wanted:
            up = [level[a] for a in nx.ancestors(g, n) if a in level]
            level[n] = 1 + max(up) if up else 0
    out: List[List[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for n, lv in level.items():
        out[lv].append(n)
    return out


def _solve(ata: np.ndarray, aty: np.ndarray, ridge: float, prior: Optional[np.ndarray] = None) -> np.ndarray:
    """Ridge solution of the normal equations; with ``prior`` the penalty is on the distance to it."""
    f = ata.shape[0] - 1
    lam = ridge_lambda(ata, ridge)
    reg = np.full(f + 1, lam)
    reg[-1] = 0.0
    rhs = aty if prior is None else aty + reg[:, None] * prior
    return np.linalg.solve(ata + np.diag(reg), rhs)


def _solve_tied(ata: np.ndarray, aty: np.ndarray, ridge: float, prior: np.ndarray, blocks: int) -> np.ndarray:
    """:func:`_solve` with the bias of output ``t*C + c`` shared by the ``blocks`` outputs of
    channel c (a ConvTranspose seen as a 1x1 Conv, _prune_lower). With A = X'X + lam I,
    s = X'1, n rows and r = X'y + lam prior per output, w = A^-1 (r - s b) and the bias equation
    summed over a channel's outputs give b_c = sum_t (1'y - s'A^-1 r) / (blocks (n - s'A^-1 s))."""
    f = ata.shape[0] - 1
    lam = ridge_lambda(ata, ridge)
    a = ata[:f, :f] + lam * np.eye(f)
    s, n = ata[:f, f], float(ata[f, f])
    a_r = np.linalg.solve(a, aty[:f] + lam * prior[:f])
    a_s = np.linalg.solve(a, s)
    per_channel = (aty[f] - s @ a_r).reshape(blocks, -1).sum(axis=0)
    b = np.tile(per_channel / (blocks * (n - float(s @ a_s))), blocks)
    return np.vstack([a_r - np.outer(a_s, b), b[None, :]])


def _set_params(model: onnx.ModelProto, node_name: str, w: np.ndarray, b: np.ndarray,
                alloc: ir.NameAllocator) -> None:
    """Point the Conv at new weight and bias initializers (the old ones are cleaned up later)."""
    node = next(n for n in model.graph.node if n.name == node_name)
    names = [alloc(node_name + "_w_refit"), alloc(node_name + "_b_refit")]
    model.graph.initializer.extend([numpy_helper.from_array(w.astype(np.float32), names[0]),
                                    numpy_helper.from_array(b.astype(np.float32), names[1])])
    node.input[1] = names[0]
    if len(node.input) > 2:
        node.input[2] = names[1]
    else:
        node.input.append(names[1])


def downstream_convs(model: onnx.ModelProto, sources: Sequence[str]) -> List[str]:
    """Dense Convs at or below any node in ``sources`` (they see changed inputs after pruning)."""
    g = ir.node_graph(model)
    below: set = set()
    for s in sources:
        if s in g:
            below |= nx.descendants(g, s) | {s}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.name in below]


#: sampled rows per unknown of a refit. Neighbouring positions of one image are strongly
#: correlated, so few rows per unknown overfit: on yolov5n at 10% fewer MACs (same channels, 32
#: calibration images) 6 rows per unknown lost 5.8 mAP points, 64 lost 5.1
ROWS_PER_UNKNOWN = 64


#: fewest rows one refit samples (and the fewest a memory budget leaves it)
MIN_ROWS = 2048


def rows_for(unknowns: int, budget: int) -> int:
    """Sampled rows for a refit of ``unknowns`` parameters per output (weights and bias):
    ``ROWS_PER_UNKNOWN`` per unknown, within [MIN_ROWS, budget]."""
    return int(min(max(ROWS_PER_UNKNOWN * unknowns, MIN_ROWS), budget))


def output_bytes(rows: Mapping[str, int], cout: Mapping[str, int]) -> int:
    """Bytes of the original outputs kept for refits of ``rows`` sampled rows and ``cout`` output
    channels per Conv (float32)."""
    return sum(r * cout[n] * 4 for n, r in rows.items())


def row_plan(want: Mapping[str, int], cout: Mapping[str, int], memory: float
             ) -> Tuple[Dict[str, int], Optional[str]]:
    """Rows per refit Conv (``want``: rows asked, ``cout``: output channels), and a note when a
    memory budget cut them. The original outputs at the sampled rows (float32, rows x output
    channels per Conv) are kept from the first model run to the Conv's refit; on a wide model
    (yolov5x: 21 GB at the default rows) that does not fit. Above ``memory`` bytes, every Conv's
    rows are capped at one common count (the narrow Convs keep theirs), never below ``MIN_ROWS``."""
    def size(cap: int) -> int:
        return output_bytes({n: min(r, cap) for n, r in want.items()}, cout)

    top = max(want.values(), default=0)
    if size(top) <= memory:
        return dict(want), None
    lo, hi = MIN_ROWS, top
    while lo < hi:                      # the largest cap that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= memory else (lo, mid - 1)
    capped = {n: min(r, lo) for n, r in want.items()}
    cut = sum(r > lo for r in want.values())
    note = (f"refit: {cut} of {len(want)} Convs fit on {lo} sampled rows instead of up to {top}: their "
            f"original outputs take {size(lo) / 1e9:.1f} GB instead of {size(top) / 1e9:.1f} "
            f"(refit_memory {memory / 1e9:.1f} GB)")
    return capped, note


class _Normal:
    """Normal equations of one refit, accumulated chunk by chunk in float64 (so only the sums are
    kept, not the sampled input rows)."""

    def __init__(self) -> None:
        self.ata: Optional[np.ndarray] = None
        self.aty: Optional[np.ndarray] = None
        self.yty, self.ysum, self.n = 0.0, None, 0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        a = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
        y = y.astype(np.float64)
        if self.ata is None:
            self.ata, self.aty = np.zeros((a.shape[1],) * 2), np.zeros((a.shape[1], y.shape[1]))
            self.ysum = np.zeros(y.shape[1])
        self.ata += a.T @ a
        self.aty += a.T @ y
        self.yty += float((y * y).sum())
        self.ysum += y.sum(0)
        self.n += len(y)


def _original_side(orig: onnx.ModelProto, targets: List[_Target], feeds: Sequence[Feeds],
                   rows: Mapping[str, int], seed: int, threads: int,
                   normals: Optional[Dict[str, _Normal]] = None, saliency=None):
    """Sampled positions (``rows`` per Conv over all feeds) and the original outputs Y there.
    With ``normals`` (refits on the original inputs), the original kept-channel patches and Y
    go straight into each Conv's normal equations and no Y is kept."""
    rng = np.random.default_rng(seed)
    pos: Dict[str, List[np.ndarray]] = {t.node: [] for t in targets}
    ys: Dict[str, List[np.ndarray]] = {t.node: [] for t in targets}
    per_image = {t.node: max(1, -(-rows[t.node] // len(feeds))) for t in targets}
    for i, vals in enumerate(capture(orig, feeds, [t.x for t in targets], threads)):
        sal = saliency[i] if saliency is not None else None
        for t in targets:
            x = vals[t.x]
            p = sample_positions(t.geo, x.shape, per_image[t.node], rng, sal)
            full = patches(t.geo, x, p)
            pos[t.node].append(p)
            y = (full @ t.w.reshape(t.w.shape[0], -1).T + t.b).astype(np.float32)
            if normals is None:
                ys[t.node].append(y)
            else:
                normals[t.node].add(patches(t.geo, x[:, t.keep], p).astype(np.float32), y)
    return pos, ys


#: bytes of original outputs a refit keeps between the model runs (refit_memory, in GB, times 1e9)
REFIT_MEMORY = 4e9


def refit(orig: onnx.ModelProto, pruned: onnx.ModelProto, convs: Sequence[str],
          keep: Mapping[str, np.ndarray], feeds: Sequence[Feeds], shapes: Mapping[str, Tuple[int, ...]],
          *, ridge: float = 1e-3, samples: int = 8192, sequential: bool = True, seed: int = 0,
          threads: int = 1, saliency=None, progress: bool = False, tied: Optional[Mapping[str, int]] = None,
          memory: float = REFIT_MEMORY, notes: Optional[List[str]] = None
          ) -> Tuple[onnx.ModelProto, Dict[str, Dict[str, float]], Dict[str, str]]:
    """Refit ``convs`` of ``pruned`` to the original outputs; returns (model, per-Conv relative
    errors before/after, skipped reasons). Convs that lost no input channel are refit on all.
    ``tied`` {Conv: block size}: lowered ConvTransposes, refit with one bias per channel.
    ``memory``: bytes the original outputs kept for the sequential refits may take (row_plan);
    a note on rows cut for it goes to ``notes``."""
    targets, skipped = _targets(orig, convs, keep, shapes, tied or {})
    if not targets or not feeds:
        return pruned, {}, skipped
    want = {t.node: rows_for(len(t.keep) * t.geo.kernel[0] * t.geo.kernel[1] + 1, samples) for t in targets}
    rows, note = row_plan(want, {t.node: int(t.w.shape[0]) for t in targets},
                          memory if sequential else float("inf"))
    if note:
        log.warning("%s", note)
        if notes is not None:
            notes.append(note)
    normals = None if sequential else {t.node: _Normal() for t in targets}
    pos, ys = _original_side(orig, targets, feeds, rows, seed, threads, normals, saliency)
    out = onnx.ModelProto()
    out.CopyFrom(pruned)
    alloc = ir.NameAllocator.for_graph(out.graph)
    errors: Dict[str, Dict[str, float]] = {}
    by_node = {t.node: t for t in targets}
    levels = _levels(out, [t.node for t in targets]) if sequential else [[t.node for t in targets]]
    bar = progress_bar(total=len(targets), desc="refitting convs", enabled=progress)
    for names in levels:
        if sequential:
            normals = {n: _Normal() for n in names}
            for i, vals in enumerate(capture(out, feeds, [by_node[n].x for n in names], threads)):
                for n in names:
                    t = by_node[n]
                    normals[n].add(patches(t.geo, vals[t.x], pos[n][i]).astype(np.float32), ys[n][i])
        for n in names:
            errors[n] = _fit_one(out, by_node[n], normals.pop(n), ridge, alloc)
            ys.pop(n, None)
            bar.update(1)
    bar.close()
    return ir.to_model(ir.to_graph(out), out), errors, skipped


def _fit_one(model: onnx.ModelProto, t: _Target, eq: _Normal, ridge: float,
             alloc: ir.NameAllocator) -> Dict[str, float]:
    """Ridge refit from the accumulated normal equations. The ridge pulls towards the original
    weights of the kept channels, not towards zero: with little data the refit stays close to
    the mean-folded removal."""
    ata, aty = eq.ata, eq.aty
    w_kept = t.w[:, t.keep].reshape(t.w.shape[0], -1)
    prior = np.concatenate([w_kept.T, t.b[None, :]], axis=0)
    theta = _solve(ata, aty, ridge, prior) if t.tied == 1 else _solve_tied(ata, aty, ridge, prior, t.tied)

    def residual(th: np.ndarray) -> float:
        return max(eq.yty - 2.0 * float((th * aty).sum()) + float(np.sum((ata @ th) * th)), 0.0)

    spread = (eq.yty - float((eq.ysum * eq.ysum).sum()) / max(eq.n, 1)) or 1.0
    before = float(np.sqrt(residual(prior) / spread))
    after = float(np.sqrt(residual(theta) / spread))
    cout, (kh, kw) = t.w.shape[0], t.geo.kernel
    w_new = theta[:-1].T.reshape(cout, len(t.keep), kh, kw)
    _set_params(model, t.node, w_new, theta[-1], alloc)
    return {"rel_error_before": round(before, 5), "rel_error_after": round(after, 5)}
