"""onnxruntime runners and output comparisons (max abs, relative, cosine, SQNR)."""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import onnxruntime as ort

from . import ir
from .pass_base import PreconditionError, SlimError, Tolerances, VerificationError, first_line

log = logging.getLogger(__name__)

Feeds = Dict[str, np.ndarray]


#: ``optimize`` values of :func:`session`: every graph optimization, none (the reference), or up
#: to the EXTENDED level (the QDQ fusions, without the NCHWc layout rewrites of the last level)
LEVELS = {True: ort.GraphOptimizationLevel.ORT_ENABLE_ALL, False: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}


def session(model: onnx.ModelProto, *, optimize: Union[bool, str] = True, threads: int = 0,
            profile_prefix: Optional[str] = None, disabled_optimizers: Sequence[str] = (),
            save_optimized: Optional[str] = None) -> ort.InferenceSession:
    """A CPU InferenceSession. ``optimize`` is a key of :data:`LEVELS` (False: the reference);
    ``disabled_optimizers`` names onnxruntime graph transformers left out; ``save_optimized``
    writes the graph onnxruntime runs to that path."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[optimize]
    so.log_severity_level = 4   # fatal only: a failed run raises, said in one line by the caller
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if save_optimized:
        so.optimized_model_filepath = str(save_optimized)
    with tempfile.TemporaryDirectory() as td:
        payload = ir.serialize_for_runtime(model, td)
        try:
            return ort.InferenceSession(payload, so, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=list(disabled_optimizers))
        except Exception as exc:
            foreign = custom_op_nodes(model)
            why = f"{foreign[0]}; " if foreign else ""
            raise VerificationError(f"onnxruntime cannot load the model: {why}{first_line(exc)}") from None


def optimized_model(model: onnx.ModelProto, *, optimize: Union[bool, str] = True,
                    disabled_optimizers: Sequence[str] = ()) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs for ``model`` (one thread), read back."""
    with tempfile.TemporaryDirectory() as td:
        path = os.path.join(td, "optimized.onnx")
        session(model, optimize=optimize, threads=1, disabled_optimizers=disabled_optimizers,
                save_optimized=path)
        return onnx.load(path)


#: op domains onnxruntime's CPU provider has kernels for; any other needs a custom-op library
ORT_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def custom_op_nodes(model: onnx.ModelProto) -> List[str]:
    """The nodes, in the main graph or a subgraph (an If branch), that onnxruntime cannot run
    without a custom-op library (a TensorRT plugin such as EfficientNMS_TRT), each as
    "node 'NAME' is DOMAIN.OP, which onnxruntime cannot run", and those of the ONNX domain whose
    op the model's opset does not define ("... is OP, which is no ONNX operator at opset N"); an
    unnamed node is named by its op and first output."""
    opset = ir.opset(model)
    out = []
    for n in ir.all_nodes(model.graph):
        if n.domain not in ORT_DOMAINS:
            out.append(f"node '{ir.node_label(n)}' is {n.domain}.{n.op_type}, which onnxruntime cannot run")
        elif n.domain in ("", "ai.onnx") and not _onnx_op(n.op_type, opset):
            out.append(f"node '{ir.node_label(n)}' is {n.op_type}, which is no ONNX operator at "
                       f"opset {opset}")
    return out


def custom_op_summary(foreign: Sequence[str]) -> str:
    """The first of :func:`custom_op_nodes`' list and how many more there are; "" when it is empty."""
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    return f"{foreign[0]}{more}" if foreign else ""


def _onnx_op(op_type: str, opset: int) -> bool:
    """Whether the ONNX domain defines ``op_type`` at ``opset`` (or before it)."""
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True


#: onnxruntime's names of the float input types, and their numpy types
_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def fit_feeds(sess: Any, feeds: Feeds) -> Feeds:
    """``feeds`` with each float array in the float type the session's input declares: a float16
    model and its float32 original (or a model with a float32 interface) run on one feed."""
    out = dict(feeds)
    for i in sess.get_inputs() if hasattr(sess, "get_inputs") else ():
        want, v = _FLOAT_INPUTS.get(getattr(i, "type", None)), out.get(i.name)
        if want is not None and isinstance(v, np.ndarray) and v.dtype.kind == "f" and v.dtype != want:
            out[i.name] = v.astype(want)
    return out


def run(sess: ort.InferenceSession, feeds: Feeds, outputs: Optional[Sequence[str]] = None
        ) -> List[np.ndarray]:
    """Run ``sess`` (all outputs, or the named ``outputs`` in that order), each float feed in the
    float type its input declares (:func:`fit_feeds`)."""
    try:
        return sess.run(None if outputs is None else list(outputs), fit_feeds(sess, feeds))
    except Exception as exc:
        raise VerificationError(f"onnxruntime failed to run the model: {first_line(exc)}") from None


def random_feeds(model: onnx.ModelProto, n: int, seed: int,
                 shapes: Optional[Mapping[str, Sequence[int]]] = None) -> List[Feeds]:
    """``n`` seeded inputs: images-like floats in [0, 1) for float inputs, small ints otherwise;
    PaddleDetection's scale factor and image size as calibration feeds them (:func:`data.add_aux`)."""
    from . import data

    rng = np.random.default_rng(seed)
    static = ir.static_input_shapes(model, dict(shapes or {}))
    dtypes = ir.input_dtypes(model)
    aux = data.aux_inputs(model)
    images = [name for name in static if name not in aux]
    out: List[Feeds] = []
    for _ in range(n):
        feeds: Feeds = {}
        for name, shp in static.items():
            dt = dtypes[name]
            if np.issubdtype(dt, np.floating):
                feeds[name] = rng.random(shp, dtype=np.float32).astype(dt)
            else:
                feeds[name] = rng.integers(0, 4, size=shp).astype(dt)
        if aux and len(images) == 1 and len(static[images[0]]) == 4:
            data.add_aux(feeds, images[0], aux)
        out.append(feeds)
    return out


def batch_shapes(model: onnx.ModelProto, batch: int,
                 shapes: Optional[Mapping[str, Sequence[int]]] = None) -> Dict[str, Tuple[int, ...]]:
    """The concrete shapes (:func:`ir.static_input_shapes`, ``shapes`` as overrides) of the inputs
    whose first dim is symbolic, with that dim set to ``batch``; {} when no batch is symbolic or
    another dim is symbolic and not given."""
    declared = ir.input_shapes(model)
    symbolic = [n for n, d in declared.items() if d and not (isinstance(d[0], int) and d[0] > 0)]
    if not symbolic:
        return {}
    try:
        static = ir.static_input_shapes(model, dict(shapes or {}))
    except PreconditionError:
        return {}
    return {n: (batch, *static[n][1:]) for n in symbolic}


#: ops that pick elements by their values (NMS, TopK, NonZero of a score mask): a tiny change of
#: a score can reorder, swap or add what comes out, so tensors downstream of them are compared
#: through the candidates fed to them
SELECTION_OPS = frozenset({"NonMaxSuppression", "TopK", "NonZero"})


def selection_frontier(model: onnx.ModelProto) -> Tuple[List[str], List[str]]:
    """(float32 tensors computed before and consumed after a selection op (NMS, TopK, NonZero),
    graph outputs downstream of one). Empty lists for a model without such ops."""
    g = model.graph
    region: set = set()
    nodes = []
    for n in g.node:  # graph nodes are topologically sorted (onnx requires it)
        if n.op_type in SELECTION_OPS or any(i in region for i in n.input if i):
            region.update(o for o in n.output if o)
            nodes.append(n)
    if not nodes:
        return [], []
    consts = {i.name for i in g.initializer}
    consts |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    try:
        inferred = ir.inferred_values(model)
    except Exception:  # noqa: BLE001 -- without types nothing can be watched safely
        return [], [o.name for o in g.output if o.name in region]
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in inferred + list(g.input) + list(g.output)}
    outputs = {o.name for o in g.output}
    frontier = [i for n in nodes for i in n.input if i and i not in region and i not in consts
                and i not in outputs and types.get(i) == onnx.TensorProto.FLOAT]
    return list(dict.fromkeys(frontier)), [o.name for o in g.output if o.name in region]


def with_outputs(model: onnx.ModelProto, names: Sequence[str], only: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``names`` (type and shape left to the runtime).

    ``only``: the graph outputs exactly ``names`` and keeps only the nodes they need, so a run
    computes nothing else (onnxruntime runs every node of a graph whatever outputs are asked).
    When one of the nodes they need holds a subgraph (which may read tensors no input names),
    every node and output is kept; an If or Loop that only later nodes need (an NMS tail) goes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    needed = _ancestors(m.graph, names) if only else set()
    if only and not any(ir.holds_subgraph(m.graph.node[i]) for i in needed):
        kept = [n for i, n in enumerate(m.graph.node) if i in needed]
        del m.graph.node[:]
        m.graph.node.extend(kept)
        del m.graph.output[:]
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
            have.add(n)
    return m


def _ancestors(graph: onnx.GraphProto, names: Sequence[str]) -> set:
    """Indices of the nodes that ``names`` are computed from."""
    producer = {t: i for i, n in enumerate(graph.node) for t in n.output}
    seen: set = set()
    todo = [producer[t] for t in names if t in producer]
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo.extend(producer[t] for t in graph.node[i].input if t in producer)
    return seen


@dataclass(frozen=True)
class OutputDiff:
    name: str
    max_abs: float
    ref_max: float
    cosine: float
    sqnr_db: float
    #: max abs diff of the reference against itself with onnxruntime optimizations on: the
    #: runtime's own float reordering, which an "exact" rewrite may also show
    noise_floor: float = 0.0
    #: "output"; "selected" for a graph output downstream of NMS/TopK; "candidates" for a tensor
    #: fed into that selection (:func:`selection_frontier`), compared in its place
    role: str = "output"
    #: per index of the output's attribute axis (:func:`attribute_axis`: a detection row's
    #: columns, a map's channels), the largest abs diff and the largest abs reference value there;
    #: None when the output has no such axis. A bound scaled by the whole output's largest value
    #: (box pixels, ~640) let an "exact" pass move every score (0-1) by 0.05.
    slice_err: Optional[Tuple[float, ...]] = field(default=None, repr=False)
    slice_ref: Optional[Tuple[float, ...]] = field(default=None, repr=False)
    #: the runtime noise (``noise_floor``) per attribute index: box pixels' reordering noise
    #: (0.015 on a fixture's values up to 1464) says nothing of the scores'
    slice_noise: Optional[Tuple[float, ...]] = field(default=None, repr=False)
    #: the machine epsilon of the output's type when coarser than float32 (float16: 2**-10), else
    #: 0: an exact rewrite of a float16 model rounds its folded weights to float16, one unit in the
    #: last place of each layer's output, which float32's bound (1e-4 relative) does not allow
    eps: float = 0.0

    @property
    def rows_differ(self) -> bool:
        """A graph output after NMS/TopK that holds another number of rows than the reference's
        (the selection kept what the scores allowed): not compared value by value, its cosine 0
        and max abs inf are placeholders; the candidates fed to the selection are compared."""
        return self.role == "selected" and self.cosine == 0.0 and not np.isfinite(self.max_abs)

    def as_dict(self) -> Dict[str, float]:
        """The fields a report shows, and ``rows_differ`` (which a report cannot tell from a
        JSON copy, where inf is written as null)."""
        d = asdict(self)
        for k in ("slice_err", "slice_ref", "slice_noise"):
            del d[k]
        d["rows_differ"] = self.rows_differ
        return d


def _finite_pairs(a: np.ndarray, b: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The finite values of two flat arrays of one shape, when both hold the same non-finite values
    at the same places (an inf that masks invalid anchors, as RT-DETR's encoder writes, is part of
    the model); None when they differ there."""
    fa, fb = np.isfinite(a), np.isfinite(b)
    if fa.all() and fb.all():
        return a, b
    if not np.array_equal(fa, fb) or not np.array_equal(a[~fa], b[~fb], equal_nan=True):
        return None
    return a[fa], b[fb]


def _finite_abs_max(a: np.ndarray) -> float:
    """Largest absolute finite value of ``a`` (0 when it has none): a reference's magnitude."""
    finite = a[np.isfinite(a)]
    return float(np.abs(finite).max()) if finite.size else 0.0


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference of two arrays of one shape over their finite values; inf when
    their non-finite values differ (:func:`_finite_pairs`)."""
    pair = _finite_pairs(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())
    if pair is None:
        return float("inf")
    return float(np.abs(pair[0] - pair[1]).max()) if pair[0].size else 0.0


#: an attribute axis longer than this is no attribute axis (candidates, pixels)
MAX_ATTRIBUTES = 4096


def attribute_axis(shape: Sequence[int]) -> Optional[int]:
    """The axis whose index says what a value means, so that values along the others share a
    scale: the channels of an NCHW map (rank 4), the last axis of a (1, na, h, w, 5+C) head, the
    shorter of a (1, N, 4+C) or (1, 4+C, N) output's two, the shorter of a 2-D one's; None for
    other ranks, or when that axis is long (more than ``MAX_ATTRIBUTES``) or the only one."""
    dims = list(shape)
    if len(dims) == 4:
        axis = 1
    elif len(dims) == 5:
        axis = 4
    elif len(dims) in (2, 3):
        axis = len(dims) - 2 if dims[-2] < dims[-1] else len(dims) - 1
    else:
        return None
    size = dims[axis]
    return axis if 1 < size <= MAX_ATTRIBUTES and size < int(np.prod(dims)) else None


Slices = Optional[Tuple[float, ...]]


def _slices(ref: np.ndarray, err: np.ndarray) -> Tuple[Slices, Slices]:
    """(largest abs error, largest abs reference value) per index of ``ref``'s attribute axis."""
    axis = attribute_axis(ref.shape)
    if axis is None:
        return None, None
    other = tuple(i for i in range(ref.ndim) if i != axis)
    return (tuple(np.abs(err).max(axis=other).tolist()), tuple(np.abs(ref).max(axis=other).tolist()))


def diff(name: str, ref: np.ndarray, new: np.ndarray) -> OutputDiff:
    if ref.shape != new.shape:
        raise VerificationError(f"output '{name}' changed shape {list(ref.shape)} -> {list(new.shape)}")
    a = ref.astype(np.float64).ravel()
    b = new.astype(np.float64).ravel()
    pair = _finite_pairs(a, b)
    if pair is None:
        return OutputDiff(name, float("inf"), _finite_abs_max(a), -1.0, float("-inf"))
    finite = pair[0].size == a.size
    a, b = pair
    if a.size == 0:
        return OutputDiff(name, 0.0, 0.0, 1.0, float("inf"))
    err = a - b
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(a @ b / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    noise = float(err @ err)
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(max(float(a @ a), 1e-30) / noise))
    # per attribute only when every value is finite (masked infinities leave no shape to slice)
    errs, refs = _slices(a.reshape(ref.shape), err.reshape(ref.shape)) if finite else (None, None)
    eps = float(np.finfo(ref.dtype).eps) if ref.dtype == np.float16 else 0.0
    return OutputDiff(name, float(np.abs(err).max()), float(np.abs(a).max()), cos, sqnr,
                      slice_err=errs, slice_ref=refs, eps=eps)


def compare_models(ref: onnx.ModelProto, new: onnx.ModelProto, feeds: Sequence[Feeds],
                   ref_optimized: bool = False, noise_floor: bool = True,
                   new_session: Optional[Callable[[onnx.ModelProto], Any]] = None,
                   keep: Optional[Dict[str, List[List[np.ndarray]]]] = None) -> List[OutputDiff]:
    """Run both models on the same feeds; one worst-case diff per output (over all feeds), then
    one for the tensors feeding an NMS or TopK that graph outputs pass through, joined (role
    "candidates").

    The reference runs with graph optimizations disabled so that onnxruntime's own rewrites
    cannot hide (or cause) a difference. With ``noise_floor`` the reference also runs optimized,
    and the largest difference that alone causes is recorded next to each diff. ``new_session``
    builds the session ``new`` runs in (another runtime: :class:`.openvino_rt.OpenVinoSession`).
    ``keep``, a dict, receives each model's graph outputs per feed ("reference", "new"), for a
    caller that reads them further (the decoded class scores) without running the models again.
    """
    names = [o.name for o in ref.graph.output]
    new_names = [o.name for o in new.graph.output]
    if names != new_names:
        raise VerificationError(f"graph outputs changed {names} -> {new_names}")
    frontier, selected = selection_frontier(ref)
    produced = {o for n in new.graph.node for o in n.output}
    frontier = [t for t in frontier if t in produced]
    role = {n: "selected" if n in selected else "output" for n in names}
    # the candidates, taken together, stand for the outputs the selection picks from, as one
    # output holding boxes and scores does in a model without NMS inside
    joint = f"{frontier[0]} + {len(frontier) - 1} more" if len(frontier) > 1 else "".join(frontier)
    role[joint] = "candidates"
    n_out = len(names)
    names = names + ([joint] if frontier else [])

    def outputs(model: onnx.ModelProto, optimize: bool, factory=None) -> List[List[np.ndarray]]:
        # one session at a time: a large model's weights are held once by each live session
        sess = factory(model) if factory else session(model, optimize=optimize)
        outs = [run(sess, f) for f in feeds]
        del sess
        if not frontier:
            return outs
        return [o[:n_out] + [np.concatenate([t.astype(np.float64).ravel() for t in o[n_out:]])] for o in outs]

    # one copy of each model with the candidates as outputs, shared by its runs
    ref_run = with_outputs(ref, frontier) if frontier else ref
    ref_outs = outputs(ref_run, ref_optimized)
    floors = outputs(ref_run, True) if noise_floor and not ref_optimized else ref_outs
    new_outs = outputs(with_outputs(new, frontier) if frontier else new, True, new_session)
    if keep is not None:
        keep["reference"] = [o[:n_out] for o in ref_outs]
        keep["new"] = [o[:n_out] for o in new_outs]
    worst: Dict[str, OutputDiff] = {}
    for ref_out, new_out, floor in zip(ref_outs, new_outs, floors):
        for name, a, b, c in zip(names, ref_out, new_out, floor):
            if role[name] == "selected" and a.shape != b.shape:  # NMS kept another number of rows
                d = OutputDiff(name, float("inf"), _finite_abs_max(a), 0.0, float("-inf"))
            else:
                d = diff(name, a, b)
            # the reference against itself optimized, once: the runtime's own noise, in all and per
            # attribute index (its rewrites can also change what the selection keeps)
            noise = diff(name, a, c) if a.shape == c.shape else None
            nf = noise.max_abs if noise is not None else float("inf")
            if d.slice_err is not None:
                d = replace(d, slice_noise=noise.slice_err if noise is not None else None)
            w = worst.get(name)
            worst[name] = (replace(d, noise_floor=nf, role=role[name]) if w is None else
                           _worse(d, w, nf, role[name]))
    return [worst[n] for n in names]


def _worse(d: OutputDiff, w: OutputDiff, noise: float, role: str) -> OutputDiff:
    """The worst of two feeds' diffs of one output, value by value; per attribute index too when
    both have that axis alike, else the per-index figures of the one that has them (a feed without
    them, with masked infinities say, must not drop another feed's failing index)."""
    mine, theirs = (d.slice_err, d.slice_ref), (w.slice_err, w.slice_ref)
    if None in mine or None in theirs or len(d.slice_err or ()) != len(w.slice_err or ()):
        keep = d if None not in mine else w   # at most one side's figures
        per: List[Slices] = [keep.slice_err, keep.slice_ref, keep.slice_noise]
    else:   # one attribute axis, so the noise (of the same shape) has its length too
        per = [tuple(map(max, x, y)) if x is not None and y is not None else None for x, y in
               ((d.slice_err, w.slice_err), (d.slice_ref, w.slice_ref), (d.slice_noise, w.slice_noise))]
    return OutputDiff(d.name, max(d.max_abs, w.max_abs), max(d.ref_max, w.ref_max), min(d.cosine, w.cosine),
                      min(d.sqnr_db, w.sqnr_db), max(noise, w.noise_floor), role, *per, eps=max(d.eps, w.eps))


def within(d: OutputDiff, rtol: float, atol: float, noise_factor: float = 0.0,
           per_index: bool = True) -> bool:
    """``max|a-b| <= atol + rtol * max|ref| + noise_factor * noise``, and with ``per_index`` the
    same per index of the output's attribute axis with that index's largest reference value and
    noise (:func:`worst_slice`)."""
    return d.max_abs <= atol + rtol * d.ref_max + noise_factor * d.noise_floor and \
        (not per_index or worst_slice(d, rtol, atol, noise_factor) is None)


def worst_slice(d: OutputDiff, rtol: float, atol: float, noise_factor: float = 0.0) -> Optional[int]:
    """The attribute index whose largest abs diff most exceeds ``atol + rtol * (its largest abs
    reference value) + noise_factor * noise``; None when none does (or the output has no such axis)."""
    if d.slice_err is None or d.slice_ref is None:
        return None
    noise = d.slice_noise if d.slice_noise is not None else (d.noise_floor,) * len(d.slice_err)
    over = [e - (atol + rtol * r + noise_factor * n) for e, r, n in zip(d.slice_err, d.slice_ref, noise)]
    j = int(np.argmax(over))
    return j if over[j] > 0 else None


#: units in the last place of a float16 output an exact rewrite may move it by (relative to the
#: output's largest value, per attribute index): a fold rounds the weights it writes to float16
EXACT_ULPS = 4


def check_contract(diffs: Sequence[OutputDiff], numerics: str, tol: Tolerances) -> Tuple[bool, str]:
    """(ok, reason) for one pass's numerics contract over the worst-case output diffs."""
    for d in diffs:
        if numerics in ("exact", "tolerance"):
            # exact: float reordering, at the scale of each column or channel; tolerance (float16)
            # errors grow through the network with its inner values, at the scale of the output
            exact = numerics == "exact"
            rtol, atol = ((tol.exact_rtol, tol.exact_atol) if exact
                          else (tol.tolerance_rtol, tol.tolerance_atol))
            rtol = max(rtol, EXACT_ULPS * d.eps)   # a float16 output: a few units in its last place
            if not within(d, rtol, atol, tol.noise_factor, per_index=exact):
                j = worst_slice(d, rtol, atol, tol.noise_factor) if exact else None
                err, ref, noise, where = (d.max_abs, d.ref_max, d.noise_floor, "")
                if j is not None and d.slice_err is not None and d.slice_ref is not None:
                    err, ref, where = d.slice_err[j], d.slice_ref[j], f" at index {j} of its attribute axis"
                    noise = d.slice_noise[j] if d.slice_noise is not None else noise
                bound = "exact bound" if numerics == "exact" else "tolerance"
                return False, (f"output '{d.name}'{where}: max abs diff {err:.3g} exceeds {bound} "
                               f"{atol:g} + {rtol:g} x {ref:.3g} + {tol.noise_factor:g} x runtime noise "
                               f"{noise:.3g}")
        elif d.role != "selected":  # a lossy pass may reorder what NMS keeps: judged by its candidates
            if not d.cosine >= tol.lossy_min_cosine:
                return False, (f"output '{d.name}': cosine {d.cosine:.4f} below the lossy floor "
                               f"{tol.lossy_min_cosine}")
    return True, "ok"


def check_runs(model: onnx.ModelProto, feeds: Sequence[Feeds]) -> None:
    """Raise :class:`SlimError` subclasses when the model does not load or run."""
    s = session(model)
    for f in feeds:
        run(s, f)


__all__ = ["session", "run", "random_feeds", "batch_shapes", "diff", "compare_models", "check_contract",
           "OutputDiff",
           "selection_frontier", "SELECTION_OPS", "with_outputs",
           "within", "check_runs", "SlimError"]
