"""run_checks: every pre-deployment check on one model, optionally against a reference.

Used by ``onnxslim-yolo check`` and at the end of ``optimize``. A check that cannot run for a
reason in the model (it does not load, its I/O differs from the reference) is skipped with that
reason; user mistakes (missing files, bad options) raise :class:`UsageError`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import onnx

from .. import ir, openvino_rt, verify
from ..data import image_stems
from ..eval.anchors import with_anchors
from ..eval.decode import NotDetections
from ..eval.metrics import labels_have_shapes
from ..pass_base import SlimError, Tolerances, UsageError, VerificationError, first_line, one_run
from . import accuracy, fusion, numerics, qdq_lint, qdq_rules, structure, targets
from .index import GraphIndex
from .result import FAIL, CheckReport, CheckResult, failed, skipped, warned

log = logging.getLogger(__name__)
ModelLike = Union[str, os.PathLike, onnx.ModelProto]
NOT_RUNNING = "the model does not run in onnxruntime"
IO_DIFFERS = "its I/O differs from the reference"
#: the checks that run the models on the user's images
IMAGE_CHECKS = ("inputs.preprocessing", "accuracy.agreement", "accuracy.map_drop")


@dataclass(frozen=True)
class CheckOptions:
    """Thresholds and run settings (the CLI maps its flags onto these)."""

    target: str = "ort-cpu"
    max_drop: float = accuracy.DEFAULT_MAX_DROP   # mAP points the candidate may lose against the reference
    min_cosine: Optional[float] = None  # per-output cosine floor against the reference (None: by kind)
    min_agreement: float = accuracy.MIN_AGREEMENT
    latency: bool = True
    latency_runs: int = 20
    threads: int = 1
    limit: Optional[int] = None        # images used for detection checks (first N by name)
    numeric_samples: int = 2           # inputs for the numerics comparison
    #: without images, a .npy/.npz of input tensors (optimize's --calib arrays) for the numerics
    #: comparisons instead of seeded random inputs, on which a pruned model looked far off (0.60)
    numeric_data: Optional[str] = None
    preset: Optional[str] = None
    anchors: Optional[str] = None      # raw anchor-map heads: JSON anchors for both models (eval.anchors)
    input_shape: Optional[Sequence[int]] = None
    seed: int = 0
    progress: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.target not in targets.TARGETS:
            raise UsageError(f"unknown target '{self.target}'; choose one of {', '.join(targets.TARGETS)}")
        if not self.max_drop >= 0:   # NaN too: it passed every drop
            raise UsageError(f"--max-drop {self.max_drop}: must be >= 0 (mAP points)")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise UsageError(f"--min-agreement {self.min_agreement}: must be within [0, 1] (an mAP)")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise UsageError(f"--min-cosine {self.min_cosine}: must be within [-1, 1]")
        if self.limit is not None and self.limit <= 0:
            raise UsageError(f"--limit {self.limit}: must be a positive number of images")


def _load(m: ModelLike, what: str) -> onnx.ModelProto:
    if isinstance(m, onnx.ModelProto):
        return m
    if not Path(m).exists():
        raise UsageError(f"{m}: {what} not found")
    return ir.load(m)


def _guard(name: str, fn: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; a library error becomes a failed result, a user error propagates."""
    try:
        return fn()
    except UsageError:
        raise
    except SlimError as exc:
        return failed(name, str(exc))
    except Exception as exc:  # a check must not take the others down with it
        log.debug("check %s crashed", name, exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return failed(name, f"check could not run: {type(exc).__name__}: {first}")


def _static_checks(model: onnx.ModelProto, idx: GraphIndex, target: str) -> List[CheckResult]:
    plan: List[tuple] = [
        ("structure.checker", lambda: structure.check_onnx_checker(model)),
        ("structure.shape_inference", lambda: structure.check_shape_inference(model)),
        ("structure.opset", lambda: structure.check_opset(model, idx)),
        ("structure.ops", lambda: targets.check_ops(model, idx, target)),
        ("structure.float64", lambda: structure.check_float64(model, target)),
        ("structure.dynamic_dims", lambda: structure.check_dynamic_dims(model)),
        ("structure.unused_initializers", lambda: structure.check_unused_initializers(model)),
        ("structure.duplicate_names", lambda: structure.check_duplicate_names(model)),
        ("structure.dangling_inputs", lambda: structure.check_dangling_inputs(idx)),
        ("structure.weights_finite", lambda: structure.check_weights_finite(idx)),
        ("qdq.pairs", lambda: qdq_lint.check_pairs(idx)),
        ("qdq.scales", lambda: qdq_lint.check_scales(idx)),
        ("qdq.zero_points", lambda: qdq_lint.check_zero_points(idx)),
        ("qdq.per_channel", lambda: qdq_rules.check_per_channel(idx)),
        ("qdq.target", lambda: qdq_rules.check_target_rules(idx, target)),
        ("qdq.decode_tail", lambda: qdq_rules.check_decode_tail(idx)),
        ("qdq.ort_fusion", lambda: fusion.check_ort_fusion(idx, target)),
    ]
    return [_guard(n, f) for n, f in plan]


def _input_shape(model: onnx.ModelProto, opts: CheckOptions) -> Optional[List[int]]:
    """The input shape to run with: the option, the static shape, or 1xCxHxW (1xHxWxC) from
    metadata/640."""
    if opts.input_shape:
        shape = [int(d) for d in opts.input_shape]
        ir.static_input_shapes(model, {numerics.image_input(model): shape})  # agrees with it
        return shape
    from ..data import dynamic_input_shape

    shape = dynamic_input_shape(model)
    return None if shape is None else list(shape)


#: default cosine floor of reference.numerics; a lossy copy (:func:`lossy_copy`) gets the pass
#: manager's floor for lossy passes, as optimize's own checks of its INT8 and pruned output do
MIN_COSINE = 0.99


def lossy_copy(model: onnx.ModelProto, ref: onnx.ModelProto) -> Optional[str]:
    """Why ``model`` is a lossy copy of ``ref`` (quantized against a float reference, or with
    Convs of fewer output channels than the same-named ones there: pruned), else None."""
    if ir.quantized_ops(model) and not ir.quantized_ops(ref):
        return "a quantized model against a float reference"

    def couts(m: onnx.ModelProto) -> Dict[str, int]:
        dims = {t.name: list(t.dims) for t in m.graph.initializer}
        return {n.name: dims[n.input[1]][0] for n in m.graph.node
                if n.op_type == "Conv" and n.name and len(n.input) > 1 and dims.get(n.input[1])}

    theirs = couts(ref)
    narrower = [n for n, c in couts(model).items() if c < theirs.get(n, c)]
    if narrower:
        return f"a pruned model ({len(narrower)} Convs with fewer output channels than the reference's)"
    return None


def _reference_checks(model: onnx.ModelProto, ref: onnx.ModelProto, feed: Optional[numerics.Feeds],
                      opts: CheckOptions, images: Optional[str],
                      shape: Optional[List[int]]) -> List[CheckResult]:
    io = _guard("reference.io", lambda: numerics.check_io(model, ref, feed, bool(opts.input_shape)))
    if feed is None or io.status == FAIL:
        why = NOT_RUNNING if feed is None else IO_DIFFERS
        return [io, skipped("reference.numerics", f"not compared: {why}")]
    data, src = _numeric_source(images, opts)
    feeds = numerics.input_feeds(model, data, opts.numeric_samples, opts.seed, opts.preset, shape)
    floor, why = opts.min_cosine, None
    if floor is None:
        why = lossy_copy(model, ref)
        floor = Tolerances().lossy_min_cosine if why else MIN_COSINE
    num = _guard("reference.numerics",
                 lambda: numerics.check_numerics(model, ref, feeds, floor, src, why))
    return [io, num]


def _accuracy_checks(model: onnx.ModelProto, ref: Optional[onnx.ModelProto], images: Optional[str],
                     labels: Optional[str], opts: CheckOptions,
                     shape: Optional[List[int]], engine: str = "onnxruntime") -> List[CheckResult]:
    if images is None:
        why = "no images (pass --images DIR)"
        return [skipped(n, why) for n in IMAGE_CHECKS]
    try:
        dets = accuracy.detect(model, ref, images, opts.preset, opts.limit, opts.threads, shape,
                               opts.progress, engine,
                               instances=ref is not None or (labels is not None and labels_have_shapes(
                                   labels, image_stems(images, opts.limit))))
    except VerificationError as exc:   # the runtime failed on the images: those checks fail, the rest stand
        return [failed(n, f"the models did not run on the images: {first_line(exc)}") for n in IMAGE_CHECKS]
    except NotDetections as exc:
        why = f"not a detection output: {exc}"
        if labels is None:
            return [skipped(n, why) for n in IMAGE_CHECKS]
        # the mAP asked for cannot be measured: a warning, not a quiet skip a CI gate passes
        return [skipped(n, why) for n in IMAGE_CHECKS[:-1]] + \
            [warned(IMAGE_CHECKS[-1], f"--labels given, but its mAP cannot be measured: {why}")]
    fed = ref if ref is not None else model
    probe = _guard("inputs.preprocessing", lambda: accuracy.check_preprocessing(
        fed, images, opts.preset, opts.limit, shape, opts.threads, opts.progress))
    noise = None if ref is None else (lambda: accuracy.self_agreement(
        ref, dets, images, opts.preset, opts.limit, opts.threads, shape, opts.progress))
    return [probe,
            _guard("accuracy.agreement", lambda: accuracy.check_agreement(dets, opts.min_agreement, noise)),
            _guard("accuracy.map_drop", lambda: accuracy.check_map_drop(dets, labels, opts.max_drop))]


def _openvino_check(model: onnx.ModelProto, feed: numerics.Feeds, images: Optional[str], opts: CheckOptions,
                    shape: Optional[List[int]]) -> CheckResult:
    data, src = _numeric_source(images, opts)
    feeds = numerics.input_feeds(model, data, opts.numeric_samples, opts.seed, opts.preset, shape) \
        if data is not None else [feed]
    floor = MIN_COSINE if opts.min_cosine is None else opts.min_cosine   # the same model in two runtimes
    return _guard("runtime.openvino", lambda: numerics.check_openvino(model, feeds, floor, src))


def _numeric_source(images: Optional[str], opts: CheckOptions) -> Tuple[Optional[str], str]:
    """(what the numerics comparisons read, what to call it): the images, else the input arrays
    given, else None for seeded random inputs."""
    if images is not None:
        return images, "images"
    if opts.numeric_data is not None:
        return opts.numeric_data, "calibration arrays"
    return None, "seeded random inputs"


def _reference_size(model: onnx.ModelProto, ref: onnx.ModelProto) -> Optional[List[int]]:
    """The reference's static input shape when the model's input leaves those dims symbolic (a
    dynamic-batch export of a static model runs at the reference's size), else None."""
    mine, theirs = (ir.input_shapes(m).get(numerics.image_input(m), ()) for m in (model, ref))
    if len(mine) != len(theirs) or not all(isinstance(d, int) and d > 0 for d in theirs):
        return None
    if all(m == t or not isinstance(m, int) or m <= 0 for m, t in zip(mine, theirs)):
        return list(theirs)   # type: ignore[arg-type]
    return None


def _runtime_checks(model: onnx.ModelProto, ref: Optional[onnx.ModelProto], images: Optional[str],
                    labels: Optional[str], opts: CheckOptions) -> List[CheckResult]:
    shape = _input_shape(model, opts)
    if ref is not None and not opts.input_shape:
        shape = _reference_size(model, ref) or shape
    shapes = {numerics.image_input(model): shape} if shape else {}
    feed = verify.random_feeds(model, 1, opts.seed, shapes)[0]
    runs = _guard("runtime.runs", lambda: numerics.check_runs(model, feed, opts.threads))
    out = [runs]
    ok = runs.status != FAIL
    if opts.target == "openvino":
        out.append(_openvino_check(model, feed, images, opts, shape) if ok
                   else skipped("runtime.openvino", f"not run: {NOT_RUNNING}"))
    engine = openvino_rt.engine_for(opts.target)
    if ref is not None:
        out += _reference_checks(model, ref, feed if ok else None, opts, images, shape)
    io_ok = ref is None or next(r for r in out if r.name == "reference.io").status != FAIL
    # the image checks and the timing run in the target's runtime: not when it cannot run the model
    in_target = engine == "onnxruntime" or next(r for r in out if r.name == "runtime.openvino").status != FAIL
    if not ok or not io_ok or not in_target:
        why = NOT_RUNNING if not ok else IO_DIFFERS if not io_ok else "OpenVINO does not run the model"
        out += [skipped(n, f"not run: {why}")
                for n in IMAGE_CHECKS + ("latency",)]
        return out
    out += _accuracy_checks(model, ref, images, labels, opts, shape, engine)
    if ref is None:
        out.append(skipped("latency", "no reference model to compare with"))
    elif not opts.latency:
        out.append(skipped("latency", "not timed here (check --no-latency; optimize times both models in its "
                                      "summary)"))
    else:
        out.append(_guard("latency",
                          lambda: numerics.check_latency(model, ref, feed, opts.latency_runs, opts.threads,
                                                         engine)))
    return out


@one_run
def run_checks(model: ModelLike, reference: Optional[ModelLike] = None, images: Optional[str] = None,
               labels: Optional[str] = None, target: str = "ort-cpu", options: Optional[CheckOptions] = None,
               **kwargs: Any) -> CheckReport:
    """Every check on ``model`` (path or ModelProto); keyword arguments are CheckOptions fields."""
    opts = options or CheckOptions(target=target, **kwargs)
    opts.validate()
    if labels is not None and images is None:
        raise UsageError("--labels needs --images: the labels describe which images to score")
    for p, what in ((images, "image folder"), (labels, "labels")):
        if p is not None and not Path(p).exists():
            raise UsageError(f"{p}: {what} not found")
    m = with_anchors(_load(model, "model"), opts.anchors, copy=isinstance(model, onnx.ModelProto))
    ref = _load(reference, "reference model") if reference is not None else None
    if ref is not None:
        ref = with_anchors(ref, opts.anchors, copy=isinstance(reference, onnx.ModelProto))
    idx = GraphIndex(m)
    results = _static_checks(m, idx, opts.target)
    results += _runtime_checks(m, ref, None if images is None else str(images),
                               None if labels is None else str(labels), opts)
    if not isinstance(model, onnx.ModelProto) and isinstance(reference, (str, os.PathLike)) \
            and ir.same_file(model, reference):   # an easy slip in a CI script: every comparison passes
        same = f"the reference is the model's own file ({reference}): every comparison with it passes"
        results = [warned(r.name, f"{same}; {r.message}", **r.details) if r.name == "reference.io" else r
                   for r in results]
    settings = {k: v for k, v in asdict(opts).items() if k not in ("extra", "progress")}
    settings.update(images=None if images is None else str(images),
                    labels=None if labels is None else str(labels))
    return CheckReport(results, model=None if isinstance(model, onnx.ModelProto) else str(model),
                       reference=None if reference is None or isinstance(reference, onnx.ModelProto)
                       else str(reference), target=opts.target, settings=settings)
