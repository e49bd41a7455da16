"""Runtime checks: the model runs in onnxruntime, matches the reference's I/O, and its outputs
stay close to the reference's (max abs, cosine, SQNR), and its latency against the reference."""
from __future__ import annotations

import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from .. import ir, verify
from ..pass_base import SlimError, first_line
from .result import CheckResult, failed, passed, skipped, warned

Feeds = Dict[str, np.ndarray]
#: float element types one model may have where the other has another (fed in its own, compared)
FLOAT_TYPES = {"float", "float16", "double"}
#: a candidate this much slower than the reference (median ratio) gets a warning
LATENCY_SLACK = 0.10


def below(value: float, floor: float) -> str:
    """``value`` to 4 decimals, or to as many more (up to 8) as show it below ``floor``: 0.999974
    read "cosine 1.0000 below 1.0"."""
    for digits in range(4, 9):
        if round(value, digits) < floor:
            break
    return f"{value:.{digits}f}"


def check_runs(model: onnx.ModelProto, feeds: Feeds, threads: int = 1) -> CheckResult:
    """Loads in onnxruntime (CPU), runs on a seeded input, every output finite."""
    name = "runtime.runs"
    try:
        sess = verify.session(model, optimize=True, threads=threads)
        t0 = time.perf_counter()
        outs = verify.run(sess, feeds)
        ms = (time.perf_counter() - t0) * 1000
    except SlimError as exc:
        return failed(name, str(exc))
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: list(o.shape) for n, o in zip(names, outs)}
    bad = {n: int(o.size - np.count_nonzero(np.isfinite(o))) for n, o in zip(names, outs)
           if np.issubdtype(o.dtype, np.floating) and not np.all(np.isfinite(o))}
    if bad:
        return failed(name, "non-finite outputs on a seeded input: "
                            + ", ".join(f"{k} ({v} NaN/Inf)" for k, v in bad.items()), shapes=shapes)
    text = (f"runs in onnxruntime CPU ({ms:.1f} ms first run); outputs finite: "
            + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    # a declared dynamic batch, run at 2 (a Reshape holding the export's batch passed unseen), and
    # a declared dynamic image size at another one (grids or a Reshape holding the export's size
    # passed unseen: an export declaring any size failed at 320x480)
    fails: List[str] = []
    batch2 = verify.batch_shapes(model, 2, {k: v.shape for k, v in feeds.items()})
    other = _other_size(model, feeds)
    for at, what, size in ((batch2, "batch", "batch 2"),
                           (other and other[0], "image size", other and "x".join(map(str, other[1])))):
        if not at:
            continue
        try:
            verify.run(sess, verify.random_feeds(model, 1, 0, at)[0])   # every input at that shape
        except SlimError as exc:
            fails.append(f"declares a dynamic {what} and fails at {size}: {first_line(exc)}")
            continue
        text += f"; runs at {size} too (its {what} is dynamic)"
    if fails:
        return warned(name, f"{text}; but the model {'; and it '.join(fails)}", shapes=shapes)
    return passed(name, text, shapes=shapes)


def _other_size(model: onnx.ModelProto, feeds: Feeds
                ) -> Optional[Tuple[Dict[str, Tuple[int, ...]], Tuple[int, int]]]:
    """(input shapes, (h, w)) of a run at another image size than ``feeds``' when the one image
    input declares its height or width symbolic: each such side 64 pixels larger (a multiple of
    any YOLO stride up to 64), the other inputs as fed; None otherwise."""
    from .. import data

    images = data.image_inputs(model)
    if len(images) != 1:
        return None
    image, dims = next(iter(images.items()))
    if image not in feeds or len(dims) != 4 or feeds[image].ndim != 4:
        return None
    axes = (1, 2) if data.channels_last(model) else (2, 3)
    shape = list(feeds[image].shape)
    if all(isinstance(dims[a], int) and dims[a] > 0 for a in axes):
        return None
    for a in axes:
        if not (isinstance(dims[a], int) and dims[a] > 0):
            shape[a] += 64
    shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    shapes[image] = tuple(shape)
    return shapes, (shape[axes[0]], shape[axes[1]])


def _io(model: onnx.ModelProto) -> Dict[str, Dict[str, object]]:
    inits = {t.name for t in model.graph.initializer}

    def desc(vi: onnx.ValueInfoProto) -> object:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim] \
            if tt.HasField("shape") else None   # no shape declared (not a scalar's []): any shape
        return [onnx.TensorProto.DataType.Name(tt.elem_type).lower(), dims]
    return {"inputs": {vi.name: desc(vi) for vi in model.graph.input if vi.name not in inits},
            "outputs": {vi.name: desc(vi) for vi in model.graph.output}}


def _run_shapes(model: onnx.ModelProto, feeds: Feeds) -> Dict[str, List[int]]:
    sess = verify.session(model, optimize=True, threads=1)
    return {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), verify.run(sess, feeds))}


def _specializes(got: object, want: object) -> bool:
    """Same dtype and rank, and every dim equal or fixed where the reference's is symbolic."""
    (gt, gd), (wt, wd) = got, want  # type: ignore[misc]
    return gt == wt and len(gd) == len(wd) and all(
        g == w or (isinstance(w, str) and isinstance(g, int)) for g, w in zip(gd, wd))


def io_differences(model: onnx.ModelProto, reference: onnx.ModelProto,
                   feeds: Optional[Feeds]) -> Tuple[List[str], Dict[str, List[str]]]:
    """Human-readable I/O differences (names, order, dtypes, declared and run-time shapes), and per
    kind ("inputs", "outputs") the ones that only fix dims the reference leaves symbolic
    (``[1, 3, 640, 640]`` for ``['batch', 3, 'h', 'w']``, as ``--input-shape`` does); under "freed"
    those that only leave symbolic dims the reference fixes (a dynamic-batch export of a static
    model), compared at the reference's shape, and under "retyped" another float type (a float16
    export of a float32 model: each model is fed and read in its own, :func:`.verify.fit_feeds`).
    A side that declares no shape matches any; the run-time shapes are compared after."""
    a, b = _io(model), _io(reference)
    diffs: List[str] = []
    fixed: Dict[str, List[str]] = {"inputs": [], "outputs": [], "freed": [], "retyped": []}
    for kind in ("inputs", "outputs"):
        if list(a[kind]) != list(b[kind]):
            diffs.append(f"{kind} {list(a[kind])} != reference {list(b[kind])}")
            continue
        for n in a[kind]:
            (gt, gd), (wt, wd) = a[kind][n], b[kind][n]
            if a[kind][n] == b[kind][n]:
                continue
            text = f"{kind[:-1]} '{n}' {gt} {gd if gd is not None else 'of any shape'}"
            ref = f"reference {wt} {wd if wd is not None else 'of any shape'}"
            if gt != wt and not {gt, wt} <= FLOAT_TYPES:
                diffs.append(f"{text} != {ref}")
                continue
            if gt != wt:   # a float16 export of a float32 model, its dims compared as well below
                fixed["retyped"].append(f"{text} (the {ref})")
            if gd == wd or None in (gd, wd):
                continue
            if _specializes((wt, gd), (wt, wd)):
                fixed[kind].append(f"{text} (the {ref})")
            elif _specializes((wt, wd), (wt, gd)):
                fixed["freed"].append(f"{text} (the {ref})")
            else:
                diffs.append(f"{text} != {ref}")
    if not diffs and feeds is not None:
        got, want = _run_shapes(model, feeds), _run_shapes(reference, feeds)
        counted = set(verify.selection_frontier(reference)[1])
        diffs += [f"output '{n}' runs with shape {got[n]} != reference {want[n]}" for n in want
                  if not _same_run_shape(got.get(n), want[n], b["outputs"].get(n), n in counted)]
    return diffs, fixed


def _same_run_shape(got: Optional[List[int]], want: List[int], declared: Optional[Sequence],
                    selected: bool) -> bool:
    """Run-time output shapes agree. An output computed after a selection (NMS, TopK, NonZero)
    holds as many rows as the data select: two models that differ by rounding may keep 15
    detections and 20, so there only the rank and the dims the reference declares as numbers
    must agree (only the rank where it declares no shape)."""
    if got == want:
        return True
    if not selected or got is None or len(got) != len(want):
        return False
    dims = declared[1] if declared is not None else None
    if dims is None:
        return True
    return len(dims) == len(want) and all(g == w for g, w, d in zip(got, want, dims) if isinstance(d, int))


def _first(items: Sequence[str], n: int = 1) -> str:
    """The first ``n`` items joined, and how many more there are."""
    return "; ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def check_io(model: onnx.ModelProto, reference: onnx.ModelProto, feeds: Optional[Feeds],
             shape_given: bool = False) -> CheckResult:
    """Names, types and shapes equal the reference's. Dims the reference leaves symbolic and the
    model fixes pass when the user fixed the input shape (``shape_given``) or only outputs have
    them (shape inference resolved them); fixed input dims warn. Dims the model leaves symbolic
    where the reference fixes them, and another float type (float16 for float32), warn: the
    comparisons run at the reference's shape, each model fed and read in its own type."""
    name = "reference.io"
    try:
        diffs, by_kind = io_differences(model, reference, feeds)
    except SlimError as exc:
        return failed(name, f"cannot compare run-time shapes: {exc}")
    if diffs:
        return failed(name, _first(diffs, 2), differences=diffs)
    io = _io(model)
    fixed = by_kind["inputs"] + by_kind["outputs"]
    freed, retyped = by_kind["freed"], by_kind["retyped"]
    if freed or retyped:
        said = [f"symbolic dims the reference fixes: {_first(freed)}; compared at the reference's shape"] \
            if freed else []
        said += [f"another float type: {_first(retyped)}; each model fed and read in its own"] \
            if retyped else []
        return warned(name, "; ".join(said), freed=freed, retyped=retyped, fixed=fixed, **io)
    if fixed:
        text = f"fixed dims the reference leaves symbolic: {_first(fixed)}"
        if shape_given:
            return passed(name, f"as the input shape given, {text}", fixed=fixed, **io)
        if by_kind["inputs"]:
            return warned(name, f"{text}; the model runs at that size only", fixed=fixed, **io)
        return passed(name, f"inputs equal the reference's; shape inference {text}", fixed=fixed, **io)
    return passed(name, "input/output names, types and shapes equal the reference's", **io)


def check_numerics(model: onnx.ModelProto, reference: onnx.ModelProto, feeds: Sequence[Feeds],
                   min_cosine: float, feed_source: str, floor_why: Optional[str] = None) -> CheckResult:
    """Per-output worst max abs diff, cosine and SQNR over ``feeds``; fails below ``min_cosine``
    (``floor_why``: why that floor, named in a failure)."""
    name = "reference.numerics"
    try:
        kept: Dict[str, List[List[np.ndarray]]] = {}
        diffs = verify.compare_models(reference, model, feeds, noise_floor=False, keep=kept)
        if not any(d.role == "selected" for d in diffs):   # rows after an NMS: compared as candidates
            scores = class_scores_diff(reference, feeds, kept)
            diffs += [scores] if scores is not None else []
        del kept
    except SlimError as exc:
        return failed(name, str(exc))
    table = [d.as_dict() for d in diffs]
    text = "; ".join(f"{d.name}: another row count than the reference's (what the NMS kept), so judged "
                     "on the candidates fed to it" if d.rows_differ else
                     f"{d.name}: max abs {d.max_abs:.3g}, cosine {d.cosine:.6f}, SQNR {d.sqnr_db:.1f} dB"
                     for d in diffs[:2])
    details = {"outputs": table, "min_cosine": min_cosine, "feeds": f"{len(feeds)} {feed_source}"}
    if any(not np.isfinite(d.max_abs) for d in diffs):   # whose NaN: a broken reference is no yardstick
        bad = _non_finite(reference, feeds)
        if bad:
            return failed(name, f"the reference's outputs are not finite ({bad}) on {len(feeds)} "
                                f"{feed_source}: it cannot serve as a reference", **details)
    if floor_why:
        details["min_cosine_for"] = floor_why
    low = [d for d in diffs if not d.cosine >= min_cosine and d.role != "selected"]
    if low:
        floor = f"{min_cosine}, the floor for {floor_why}" if floor_why else f"{min_cosine}"
        cos = below(low[0].cosine, min_cosine)
        return failed(name, f"cosine {cos} of output '{low[0].name}' below {floor} "
                            f"({text})",
                      **details)
    floor = f"; floor {min_cosine}: {floor_why}" if floor_why else ""
    return passed(name, text + f" ({len(feeds)} {feed_source}{floor})", **details)


def _non_finite(model: onnx.ModelProto, feeds: Sequence[Feeds]) -> str:
    """'NAME (N NaN/Inf), ...' of the outputs of ``model`` (optimizations off) that are not finite on
    ``feeds``; empty when all are."""
    sess = verify.session(model, optimize=False)
    names = [o.name for o in sess.get_outputs()]
    bad: Dict[str, int] = {}
    for f in feeds:
        for n, o in zip(names, verify.run(sess, f)):
            if np.issubdtype(o.dtype, np.floating) and not np.all(np.isfinite(o)):
                bad[n] = bad.get(n, 0) + int(o.size - np.count_nonzero(np.isfinite(o)))
    return ", ".join(f"{k} {v} NaN/Inf" for k, v in bad.items())


def check_latency(model: onnx.ModelProto, reference: onnx.ModelProto, feeds: Feeds, runs: int,
                  threads: int, engine: str = "onnxruntime") -> CheckResult:
    """Median latency of the candidate over the reference's, runs interleaved in one process, in
    ``engine`` (onnxruntime or OpenVINO)."""
    from ..latency import interleaved_latency

    name = "latency"
    try:
        med = interleaved_latency({"reference": reference, "candidate": model}, feeds=feeds, runs=runs,
                                  threads=threads, engine=engine)
    except SlimError as exc:
        return failed(name, f"cannot time the models: {exc}")
    ratio = med["candidate"] / med["reference"] if med["reference"] > 0 else float("nan")
    details = {"median_ms": med, "ratio": ratio, "runs": runs, "threads": threads, "engine": engine}
    text = (f"{med['candidate']:.2f} ms vs reference {med['reference']:.2f} ms (x{ratio:.2f}, median of "
            f"{runs} interleaved runs, {threads} thread{'s' if threads > 1 else ''}"
            f"{', OpenVINO' if engine == 'openvino' else ''})")
    if ratio > 1.0 + LATENCY_SLACK:
        return warned(name, "slower than the reference: " + text, **details)
    return passed(name, text, **details)


def image_input(model: onnx.ModelProto) -> str:
    """The image input's name (not a Paddle im_shape listed before it), else the first input's."""
    from ..data import image_inputs

    try:
        return next(iter(image_inputs(model)))
    except (SlimError, StopIteration):
        return next(iter(ir.input_shapes(model)), "")


def input_feeds(model: onnx.ModelProto, images: Optional[str], n: int, seed: int, preset: Optional[str],
                input_shape: Optional[Sequence[int]]) -> List[Feeds]:
    """``n`` real preprocessed images when ``images`` is given, else ``n`` seeded random inputs."""
    if images is not None:
        from ..data import load_calibration

        return load_calibration(images, model, preset=preset, limit=n, input_shape=input_shape,
                                progress=False)
    shapes = {}
    if input_shape:
        shapes = {image_input(model): list(input_shape)}
    return verify.random_feeds(model, n, seed, shapes)


def class_scores_diff(model: onnx.ModelProto, feeds: Sequence[Feeds],
                      outputs: Mapping[str, Sequence[Sequence[np.ndarray]]]) -> Optional[verify.OutputDiff]:
    """The decoded class scores of two runs of ``model``'s outputs on ``feeds`` (``outputs``:
    "reference" and "new", graph outputs per feed, as :func:`.verify.compare_models` keeps them,
    both read as ``model``'s), the feed with the lowest cosine, when the outputs are candidate rows
    (:func:`..eval.anchors.class_scores_reader`); None otherwise, or when every feed's scores stay
    below :data:`..eval.anchors.SCORE_FLOOR` in both runs."""
    from ..data import feed_hw, model_input
    from ..eval.anchors import CLASS_SCORES, class_scores_reader, scores_detect

    worst: Optional[verify.OutputDiff] = None
    try:
        name = model_input(model)[0]
        sizes = [feed_hw(f[name]) for f in feeds]   # each feed's own size (a dynamic model's too)
        refs, news = outputs["reference"], outputs["new"]
        scores = class_scores_reader(model, refs[0], sizes[0])
        if scores is None:
            return None
        for hw, a, b in zip(sizes, refs, news):
            sa, sb = scores(a, hw), scores(b, hw)
            if not scores_detect(sa, sb):   # near 0 their cosine is float noise
                continue
            d = verify.diff(CLASS_SCORES, sa, sb)
            if worst is None or not d.cosine >= worst.cosine:
                worst = d
    except (SlimError, ValueError, IndexError, KeyError):
        return None
    return worst


def check_openvino(model: onnx.ModelProto, feeds: Sequence[Feeds], min_cosine: float,
                   feed_source: str) -> CheckResult:
    """The model loads and runs in OpenVINO's CPU plugin, and its outputs there match onnxruntime's
    (optimized) on the same ``feeds``: a runtime can read a Q/DQ graph differently."""
    from .. import openvino_rt

    name = "runtime.openvino"
    if not openvino_rt.available():
        return skipped(name, f"OpenVINO is not installed: {openvino_rt.INSTALL}")
    sessions: List[openvino_rt.OpenVinoSession] = []

    def open_ov(m: onnx.ModelProto) -> openvino_rt.OpenVinoSession:
        sessions.append(openvino_rt.OpenVinoSession(m))
        return sessions[-1]

    kept: Dict[str, List[List[np.ndarray]]] = {}
    try:
        diffs = verify.compare_models(model, model, feeds, ref_optimized=True, noise_floor=False,
                                      new_session=open_ov, keep=kept)
    except SlimError as exc:
        return failed(name, str(exc))
    where = f"OpenVINO {openvino_rt.version()} CPU ({sessions[0].precision} inference precision)"
    # rows picked by a TopK / NMS may come in another order: their candidates were compared instead
    selected = any(d.role == "selected" for d in diffs)
    scores = None if selected else class_scores_diff(model, feeds, kept)
    del kept
    if scores is not None:
        diffs = list(diffs) + [scores]
    table = [d.as_dict() for d in diffs]
    text = "; ".join(f"{d.name}: max abs {d.max_abs:.3g}, cosine {d.cosine:.6f}" for d in diffs[:2])
    details = {"outputs": table, "min_cosine": min_cosine, "feeds": f"{len(feeds)} {feed_source}",
               "runtime": where}
    low = [d for d in diffs if not d.cosine >= min_cosine and d.role != "selected"]
    if low:
        return failed(name, f"runs in {where}, but output '{low[0].name}' differs from onnxruntime's: "
                            f"cosine {below(low[0].cosine, min_cosine)} below {min_cosine} ({text})",
                      **details)
    return passed(name, f"runs in {where}; against onnxruntime {text} ({len(feeds)} {feed_source})",
                  **details)
