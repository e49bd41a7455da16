"""The Python API behind ``onnxslim-yolo optimize``: one call, a composed pipeline of passes.

    from onnxslim_yolo import optimize
    result = optimize("yolov5n.onnx", output="yolov5n.int8.onnx", int8=True, calib="images/")
    print(result.summary["after"]["macs"], result.output)
"""
from __future__ import annotations

import logging
import numbers
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import onnx

from . import ir, verify
from .analysis.flops import model_stats
from .eval.anchors import with_anchors
from .eval.decode import NotDetections
from .pass_base import (ModelLoadError, Numerics, Pass, PassContext, PreconditionError, SlimError, Tolerances,
                        UsageError, VerificationError, naming_file, one_run)
from .pass_manager import PassManager, PipelineResult, build_passes, default_pass_names

log = logging.getLogger(__name__)

ModelLike = Union[str, Path, onnx.ModelProto]


@dataclass
class OptimizeOptions:
    """Everything ``optimize`` accepts besides the model (the CLI maps its flags onto this)."""

    passes: Optional[Sequence[str]] = None      # explicit pass list; default: the default pipeline
    skip: Sequence[str] = ()
    int8: bool = False
    prune: Optional[float] = None
    calib: Optional[Union[str, Path]] = None    # image folder or .npy/.npz of preprocessed tensors
    calib_limit: Optional[int] = None
    images: Optional[Union[str, Path]] = None   # evaluation images (default: calib folder)
    labels: Optional[Union[str, Path]] = None   # YOLO labels folder or COCO json: accuracy before/after
    preprocess: Optional[str] = None
    anchors: Optional[str] = None               # raw anchor-map heads: JSON anchors (eval.anchors)
    input_shape: Optional[Sequence[int]] = None
    pass_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    verify: bool = True
    dump_dir: Optional[Union[str, Path]] = None
    bench: bool = True
    bench_runs: int = 20
    threads: int = 2
    seed: int = 0
    eval_limit: Optional[int] = None
    tolerances: Tolerances = field(default_factory=Tolerances)
    progress: bool = True
    check: bool = True                          # run the pre-deployment checks on the result
    max_drop: Optional[float] = None            # mAP points the checks allow (None: not enforced)
    target: Optional[str] = None                # INT8 rules, checks (None: the pass option's, else ort-cpu)
    _target_given: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        # target= left out takes pass_options["insert-qdq"]["target"], so the checks and the latency
        # run for the runtime the model was quantized for; given, it must agree (_refuse_options)
        self._check_types()
        self._target_given = self.target is not None
        if self.target is None:
            self.target = (self.pass_options.get("insert-qdq") or {}).get("target") or "ort-cpu"
        # a comma-separated string, as the CLI takes it, not a sequence of its letters
        if isinstance(self.passes, str):
            self.passes = [n.strip() for n in self.passes.split(",") if n.strip()]
        if isinstance(self.skip, str):
            self.skip = [n.strip() for n in self.skip.split(",") if n.strip()]

    def _check_types(self) -> None:
        """A UsageError naming the field for a value of the wrong kind (a traceback inside the
        pipeline before, or a pass blamed); ``input_shape`` as the CLI writes it, "1,3,640,640",
        and ``tolerances`` as a dict are read as meant."""
        if isinstance(self.input_shape, str):
            try:
                self.input_shape = [int(d) for d in self.input_shape.split(",")]
            except ValueError:
                raise UsageError(f"input_shape {self.input_shape!r}: expected numbers like "
                                 "1,3,640,640") from None
        if isinstance(self.tolerances, dict):
            try:
                self.tolerances = Tolerances(**self.tolerances)
            except TypeError as exc:
                raise UsageError(f"tolerances: {exc}") from None
        for kind, names in ((bool, FLAG_FIELDS), (int, INT_FIELDS), (float, NUMBER_FIELDS)):
            for name in names:
                v = getattr(self, name)
                number = numbers.Real if kind is float else numbers.Integral   # numpy's too
                if not (isinstance(v, bool) if kind is bool else
                        v is None or (isinstance(v, number) and not isinstance(v, bool))):
                    what = ("True or False" if kind is bool else "a number" if kind is float
                            else "a whole number")
                    raise UsageError(f"{name}={v!r}: expected {what}")
        if self.input_shape is not None and not all(isinstance(d, numbers.Integral) and d > 0
                                                    for d in self.input_shape):
            raise UsageError(f"input_shape {list(self.input_shape)}: expected positive whole numbers")
        if not isinstance(self.tolerances, Tolerances):
            raise UsageError(f"tolerances={self.tolerances!r}: expected a Tolerances (or a dict of its "
                             "fields)")
        if not isinstance(self.pass_options, dict) or \
                not all(isinstance(v, dict) for v in self.pass_options.values()):
            raise UsageError(f"pass_options={self.pass_options!r}: expected {{pass name: {{option: value}}}}")
        for key in ("calib_limit", "eval_limit"):   # their kind is checked above
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UsageError(f"{key} must be a whole number of images >= 1, got {value!r}")
        if self.bench_runs < 1 or self.threads < 0:
            raise UsageError(f"bench_runs={self.bench_runs}, threads={self.threads}: bench_runs must be at "
                             "least 1 and threads at least 0 (0: onnxruntime's own choice)")


#: OptimizeOptions fields by the kind of value they take (checked when the options are made)
FLAG_FIELDS = ("int8", "verify", "bench", "progress", "check")
INT_FIELDS = ("calib_limit", "eval_limit", "bench_runs", "threads", "seed")
NUMBER_FIELDS = ("prune", "max_drop")


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    pipeline: PipelineResult
    summary: Dict[str, Any]
    output: Optional[Path] = None
    checks: Optional[Any] = None               # a check.CheckReport when checks ran

    @property
    def ok(self) -> bool:
        return self.checks is None or bool(self.checks.ok)

    def to_dict(self) -> Dict[str, Any]:
        d = {"output": str(self.output) if self.output else None, "summary": self.summary}
        d.update(self.pipeline.to_dict())
        if self.checks is not None:
            d["checks"] = self.checks.to_dict()
        return d


def _as_model(model: ModelLike) -> Tuple[onnx.ModelProto, Optional[Path]]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    if not isinstance(model, (str, os.PathLike)):
        hint = " (the file's bytes: onnx.load_from_string them first)" if isinstance(model, bytes) else ""
        raise UsageError(f"optimize takes a model path or an onnx.ModelProto, got "
                         f"{type(model).__name__}{hint}")
    return ir.load(model), Path(model)


def run_files(opts: OptimizeOptions, src: Optional[ir.PathLike], output: Optional[ir.PathLike],
              report: Optional[ir.PathLike] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(outputs, inputs) of an optimize run by role, for :func:`.ir.claim_outputs`: the model
    written, the report, the kept-channel JSON and a calibration table still to be saved;
    the input model, the labels, the calibration data and images, and a calibration table to load."""
    table = opts.pass_options.get("insert-qdq", {}).get("calib_table")
    kept = opts.pass_options.get("prune-channels", {}).get("kept_json")
    table_in = bool(table) and Path(table).exists()
    outputs = {"optimized model": output, "report": report, "kept-channel JSON": kept,
               "calibration table": None if table_in else table}
    inputs = {"input model": src, "calibration table": table if table_in else None, "labels": opts.labels,
              "calibration data": opts.calib, "evaluation images": opts.images}
    return outputs, inputs


def pipeline_names(opts: OptimizeOptions, model: Optional[onnx.ModelProto] = None) -> List[str]:
    """The passes ``opts`` ask for; with ``model`` given and float16 weights in it, INT8 and pruning
    get ``upcast-float16`` first, and pruning alone ``restore-float16`` last (unless skipped)."""
    from .passes.upcast_float16 import float16_tensors, schedule

    from .registry import all_passes

    unknown = sorted(set(opts.pass_options) - set(all_passes()) - set(opts.passes or ()))
    if unknown:   # a misspelled pass name ("prune_channels") was ignored
        raise UsageError(f"pass_options name no pass {', '.join(repr(u) for u in unknown)}; the passes are "
                         f"{', '.join(sorted(all_passes()))}")
    extra: List[str] = []
    if opts.int8:
        extra.append("insert-qdq")
    # per-layer ratios ask for pruning as a ratio does (they were ignored without prune= or passes=)
    if opts.prune is not None or opts.pass_options.get("prune-channels", {}).get("per_layer"):
        extra.append("prune-channels")
    if opts.passes:
        names = list(opts.passes) + [e for e in extra if e not in opts.passes]
    else:
        names = default_pass_names(extra=extra, skip=opts.skip)
    skipped = [e for e in extra if e in set(opts.skip)]
    if skipped:   # the run wrote a float (or unpruned) model, with exit 0
        asks = "int8" if skipped[0] == "insert-qdq" else "prune"
        raise UsageError(f"skip removes {skipped[0]}, which {asks} asks for: drop one of the two")
    if model is not None:
        names = schedule(names, lambda: float16_tensors(model) > 0)
    return [n for n in names if n not in set(opts.skip)]


def build_context(model: onnx.ModelProto, opts: OptimizeOptions, names: Sequence[str],
                  exact_only: bool = False) -> PassContext:
    """The passes' context. A model with a dynamic image size and no ``input_shape``: an
    ``exact_only`` pipeline keeps the dynamic dims and verifies at the size in the model's
    metadata (else 640); a lossy one runs at the metadata size, fixed as if it were given as
    ``input_shape``, and is refused when the metadata names none."""
    from .data import full_input_shape, image_inputs, metadata_imgsz, model_input

    shapes: Dict[str, Tuple[int, ...]] = {}
    fix = True
    if opts.input_shape:
        (name,) = list(image_inputs(model))[:1] or [""]
        shapes = {name: tuple(int(d) for d in opts.input_shape)}
    try:
        ir.static_input_shapes(model, dict(shapes))
    except PreconditionError:
        if not exact_only and metadata_imgsz(model) is None:
            raise
        name, chw = model_input(model)
        shapes = {name: full_input_shape(model, chw)}
        if exact_only:
            fix = False
            log.info("input '%s' is dynamic: kept so, exact passes verified at %s", name, list(shapes[name]))
        else:
            log.warning("input '%s' is dynamic: INT8 and pruning run at %s, the size its metadata names, "
                        "and the result is fixed to it (--input-shape for another size)", name,
                        list(shapes[name]))
    calib = None
    if opts.calib is not None:
        from .data import load_calibration

        calib = load_calibration(opts.calib, model, preset=opts.preprocess, limit=opts.calib_limit,
                                 input_shape=opts.input_shape, progress=opts.progress)
    options: Dict[str, Dict[str, Any]] = {k: dict(v) for k, v in opts.pass_options.items()}
    # written by optimize beside the model it describes, not by the pass before its contract is proven
    options.get("prune-channels", {}).pop("kept_json", None)
    if "insert-qdq" in names:   # target= and max_drop= quantize for that runtime, within that drop
        qdq = options.setdefault("insert-qdq", {})
        qdq.setdefault("target", opts.target)
        if opts.max_drop is not None:
            qdq.setdefault("max_drop", opts.max_drop)
    if opts.prune is not None:
        options.setdefault("prune-channels", {})["ratio"] = opts.prune
    if not opts.progress:  # --quiet reaches the passes' own bars too
        for n in ("insert-qdq", "prune-channels"):
            options.setdefault(n, {}).setdefault("progress", False)
    if opts.labels is not None:
        for n in ("insert-qdq", "prune-channels"):
            options.setdefault(n, {}).setdefault("labels", str(opts.labels))
            options.setdefault(n, {}).setdefault("images", _eval_images(opts))
    return PassContext(options=options, calib_inputs=calib, tolerances=opts.tolerances, seed=opts.seed,
                       dump_dir=Path(opts.dump_dir) if opts.dump_dir else None, input_shapes=shapes,
                       fix_input_shapes=fix, verify=opts.verify)


@one_run
def optimize(model: ModelLike, output: Optional[Union[str, Path]] = None,
             options: Optional[OptimizeOptions] = None, **kwargs: Any) -> OptimizeResult:
    """Run the pipeline on a model (path or ModelProto); write ``output`` atomically if given.

    Keyword arguments are fields of :class:`OptimizeOptions`.
    """
    if options is not None and kwargs:   # the keywords were ignored without a word
        raise UsageError(f"optimize: give options= or keyword options, not both (got options= and "
                         f"{', '.join(sorted(kwargs))})")
    try:
        opts = options or OptimizeOptions(**kwargs)
    except TypeError as exc:   # an unknown keyword: name it, as every other bad input
        raise UsageError(f"optimize: {exc} (the fields of OptimizeOptions are the options)") from None
    opts, own = _own_passes(opts)
    original, src = _as_model(model)
    original = with_anchors(original, opts.anchors, copy=src is None)
    ir.claim_outputs(*run_files(opts, src, output))
    if opts.dump_dir and src is not None and ir.same_file(src.parent, opts.dump_dir) and \
            re.fullmatch(r"\d\d_.+\.onnx", src.name):   # a dump is NN_PASS.onnx: it could be the input
        raise UsageError(f"{opts.dump_dir}: --dump-dir holds the input model {src.name}, which a dump "
                         "could overwrite; choose another folder")
    if opts.dump_dir:   # refused when the first pass's model was dumped, after its work
        ir.ensure_writable(Path(opts.dump_dir) / "00_dump.onnx", "model dumps (--dump-dir)")
    names = pipeline_names(opts, original)
    _refuse_options(opts, names)
    loaded = _refuse_unrunnable(original, src)
    passes = [own[n] if n in own else build_passes([n])[0] for n in names]
    try:
        ctx = build_context(original, opts, names, all(p.numerics == Numerics.EXACT for p in passes))
    except SlimError as exc:   # the model's inputs do not suit the calibration data: name the file
        raise naming_file(exc, src) from None
    if opts.input_shape:
        _require_runs_at(loaded or verify.session(original, optimize=False, threads=1), src, ctx, original,
                         opts.input_shape)
    del loaded
    if opts.labels is not None:
        _require_detections(original, src, ctx)
    result = PassManager(passes, ctx).run(original)
    _say_eval_size(opts)
    checks = run_final_checks(original, result, opts) if opts.check else None
    summary = summarize(original, result.model, ctx, opts, checks)
    out_path = None
    if output is not None:
        out_path = ir.save(result.model, output, protect=[src] if src else [])
    _write_kept_channels(opts, result)
    return OptimizeResult(result.model, result, summary, out_path, checks)


def _own_passes(opts: OptimizeOptions) -> Tuple[OptimizeOptions, Dict[str, Pass]]:
    """``opts`` with the pass instances in ``passes`` given by name, and those instances by name:
    a pass written in the caller's code runs in ``optimize`` (its calibration, checks and
    summary) without being installed as a plugin. A built-in's name is refused."""
    from .registry import builtin_passes

    own: Dict[str, Pass] = {}
    for p in opts.passes or ():
        if isinstance(p, type) and issubclass(p, Pass):
            raise UsageError(f"passes: got the pass class {p.__name__}, not an instance: {p.__name__}()")
        if isinstance(p, Pass):
            if p.name in {c.name for c in builtin_passes()} or p.name in own:
                raise UsageError(f"passes: a pass instance named '{p.name}', which is taken")
            own[p.name] = p
    if not own:
        return opts, own
    names = [p.name if isinstance(p, Pass) else p for p in opts.passes]   # type: ignore[union-attr]
    return replace(opts, passes=names, pass_options=dict(opts.pass_options)), own


def _refuse_options(opts: OptimizeOptions, names: Sequence[str]) -> None:
    """Options that cannot work, refused before any work: the Python API's counterparts of the
    CLI's own checks (int8 without calibration data, a target no rule set is written for; an image
    limit below 1 is refused when the options are made), and an INT8 target or drop that
    contradicts the pass's own options."""
    from .quant.targets import TARGETS

    if opts.target not in TARGETS:
        raise UsageError(f"target '{opts.target}' is none of {', '.join(TARGETS)}")
    if opts.labels is not None and _eval_images(opts) is None:   # it failed after all the work
        raise UsageError("--labels needs images to score: pass --images DIR (images=)" +
                         (f"; --calib {Path(str(opts.calib)).name} holds arrays, not named images"
                          if opts.calib is not None else ""))
    if "prune-channels" in names:   # its options read before any work (a bad ratio failed after the others)
        from .passes._prune_options import parse_options

        given = dict(opts.pass_options.get("prune-channels", {}))
        given.pop("kept_json", None)
        if opts.prune is not None:
            given["ratio"] = opts.prune
        parse_options(given, opts.calib is not None)
    if "insert-qdq" not in names:
        return
    if opts.calib is None:
        raise UsageError("insert-qdq needs calibration images: pass calib= (--calib DIR): a folder of images "
                         "or a .npy/.npz of inputs")
    qdq = opts.pass_options.get("insert-qdq", {})
    for key, value in (("target", opts.target), ("max_drop", opts.max_drop)):
        if qdq.get(key) is not None and value is not None and qdq[key] != value \
                and not (key == "target" and not opts._target_given):
            raise UsageError(f"pass_options['insert-qdq']['{key}'] {qdq[key]!r} contradicts {key}={value!r}: "
                             f"give {key}= alone")


def _write_kept_channels(opts: OptimizeOptions, result: PipelineResult) -> None:
    """The kept channels of the pruned model written (``--kept-json``): only once the pipeline
    has passed its contracts, beside the model it describes. The pass wrote them before its
    contract was checked, so a failed run (no model written) replaced a good pair's JSON."""
    from .passes import _prune_report

    path = opts.pass_options.get("prune-channels", {}).get("kept_json")
    rec = next((r for r in result.records if r.name == "prune-channels" and r.modified), None)
    if path and rec is not None:
        _prune_report.write_json(Path(path), rec.report["details"])


def _refuse_unrunnable(model: onnx.ModelProto, src: Optional[Path]) -> Optional[Any]:
    """Every pass is verified in onnxruntime: a graph it cannot run is refused up front, with the
    node named, rather than failing the first pass with onnxruntime's or the checker's words (cut
    short at an unnamed node): no outputs, a node reading a tensor nothing defines, a node it has
    no kernel for (a TensorRT NMS plugin from an end-to-end export, an op no ONNX opset has), and
    any other graph onnxruntime will not load. Returns the session that proved it loads (None for
    a model over 2 GB, not loaded here: that writes it to a temporary file again)."""
    g = model.graph
    if not g.output:
        raise UsageError(f"{src or 'model'}: the graph has no outputs; nothing to optimize or check")
    known = {i.name for i in g.input} | {t.name for t in g.initializer}
    known |= {t.values.name for t in g.sparse_initializer} | {o for n in g.node for o in n.output}
    for n in g.node:
        missing = next((t for t in n.input if t and t not in known), None)
        if missing is not None:
            raise UsageError(f"{src or 'model'}: node '{ir.node_label(n)}' reads '{missing}', which is no "
                             "graph input, initializer or node output")
    foreign = verify.custom_op_summary(verify.custom_op_nodes(model))
    if foreign:
        hint = " (e.g. without the TensorRT NMS plugin)" if "onnxruntime cannot run" in foreign else ""
        raise PreconditionError(f"{src or 'model'}: {foreign}; export the model without it{hint}")
    if ir.model_size(model) > ir.PROTO_LIMIT:
        return None
    try:   # duplicate node names, an IR version too new, stale value_info: onnxruntime says which
        return verify.session(model, optimize=False, threads=1)
    except VerificationError as exc:   # before graphsurgeon reads it (it printed 23,706 lines for one)
        raise ModelLoadError(f"{src or 'model'}: {exc}; the input model must load in onnxruntime") from None


def _require_runs_at(sess: Any, src: Optional[Path], ctx: PassContext, model: onnx.ModelProto,
                     shape: Sequence[int]) -> None:
    """A dynamic export may hold its export size in constants (a Concat of two grids): at another
    ``--input-shape`` it does not run, and the first pass failed on it (exit 4, blamed). ``sess``
    runs ``model``."""
    try:
        verify.run(sess, verify.random_feeds(model, 1, 0, ctx.input_shapes)[0])
    except VerificationError as exc:
        size = ",".join(str(d) for d in shape)
        raise UsageError(f"{src or 'model'}: does not run at --input-shape {size} ({exc}); its export size "
                         "may be fixed inside the graph: export it at that size") from None


def _require_detections(model: onnx.ModelProto, src: Optional[Path], ctx: PassContext) -> None:
    """``--labels`` asks for the accuracy before and after: outputs this tool cannot read as
    detections are refused before any pass runs, not after them all (one run on the first
    calibration feed, else a seeded input)."""
    from .evaluate import feed_detections

    feeds = ctx.calib_inputs[:1] if ctx.calib_inputs else verify.random_feeds(model, 1, 0, ctx.input_shapes)
    try:
        feed_detections(model, feeds)
    except NotDetections as exc:
        raise UsageError(f"{src or 'model'}: --labels needs detections, and the outputs are none this tool "
                         f"decodes ({exc}); without --labels the model is optimized unscored") from None


def _eval_images(opts: OptimizeOptions) -> Optional[str]:
    images = opts.images or opts.calib
    if images is None or Path(images).suffix.lower() in (".npy", ".npz"):
        return None
    return str(images)


#: from this many images on, optimize warns that its checks and mAP read them all
MANY_EVAL_IMAGES = 1000


def _say_eval_size(opts: OptimizeOptions) -> None:
    """A warning when the checks and the mAP of the result will run both models on every image of
    a large folder: with --calib of 5000 images they ran for over 30 minutes after an INT8 pass of
    84 s (which reads 64 of them), with nothing said and no flag to limit them."""
    images = _eval_images(opts)
    if images is None or opts.eval_limit is not None or not (opts.check or opts.labels is not None):
        return
    from .data import list_images

    n = len(list_images(images))
    if n >= MANY_EVAL_IMAGES:
        log.warning("%s: the checks and the mAP of the result run the original and the optimized model on "
                    "all %d images (--eval-limit N for the first N)", images, n)


def run_final_checks(original: onnx.ModelProto, result: PipelineResult, opts: OptimizeOptions) -> Any:
    """The same checks as ``onnxslim-yolo check``, on the optimized model against the original."""
    from .check import run_checks

    lossy = any(r.numerics != "exact" and r.modified for r in result.records)
    images = _eval_images(opts)
    return run_checks(result.model, reference=original, images=images,
                      labels=str(opts.labels) if (opts.labels and images) else None, target=opts.target,
                      latency=False, limit=opts.eval_limit, preset=opts.preprocess,
                      input_shape=opts.input_shape, threads=opts.threads, progress=opts.progress,
                      max_drop=float("inf") if opts.max_drop is None else opts.max_drop,
                      min_cosine=opts.tolerances.lossy_min_cosine if lossy else 0.99,
                      numeric_data=None if images is not None or opts.calib is None else str(opts.calib))


#: a latency ratio above this (after / before) is reported as slower: below it is run-to-run noise
SLOWER_RATIO = 1.05


def slower_note(ratio: Optional[float], opts: OptimizeOptions) -> Optional[str]:
    """A warning when the optimized model ran slower than the original, with the likely reason."""
    if ratio is None or ratio <= SLOWER_RATIO:
        return None
    note = (f"the optimized model ran x{ratio:.2f} slower than the original here (median of "
            f"{opts.bench_runs} interleaved runs, {opts.threads} threads)")
    if opts.int8:
        from .quant.targets import x86_int8_saturates
        if x86_int8_saturates():
            note += ("; this x86 CPU has no VNNI, where onnxruntime's INT8 kernels gain little over float "
                     "and the Q/DQ conversions cost more: INT8 shrinks the file, but time it on the target")
        else:
            note += "; here the Q/DQ conversions outweigh what the INT8 kernels gain: time it on the target"
    return note


def _preprocessing_note(model: onnx.ModelProto, opts: OptimizeOptions, preset: str,
                        checks: Optional[Any]) -> Optional[str]:
    """The advice when the guessed ``preset`` looks wrong: the final checks' verdict when they
    judged it (``inputs.preprocessing``), else the probe's own."""
    from .check.result import WARN

    done = checks.get("inputs.preprocessing") if checks is not None else None
    if done is not None and "verdict" in done.details:
        return done.message if done.status == WARN else None
    from .preprobe import preset_advice

    folder = next(p for p in (opts.calib, opts.images) if p is not None and Path(p).is_dir())
    return preset_advice(model, folder, preset)


def images_fed(model: onnx.ModelProto, preprocess: Optional[str], folders: Sequence[Any]
               ) -> Optional[Dict[str, str]]:
    """How image ``folders`` (calibration, evaluation) are fed to ``model``: the preprocessing
    and what chose it; None when none of ``folders`` is a folder or the model takes no image."""
    from .data import describe_preset, get_preset, preset_choice

    if not any(p is not None and Path(p).is_dir() for p in folders):
        return None
    try:   # the guess is made once: get_preset given a name does not guess again
        name, why = (preprocess, "--preprocess") if preprocess else preset_choice(model)
        preset = get_preset(name, model)
    except SlimError:
        return None
    return {"preset": preset.name, "preprocessing": describe_preset(preset), "chosen_by": why}


def summarize(before: onnx.ModelProto, after: onnx.ModelProto, ctx: PassContext,
              opts: OptimizeOptions, checks: Optional[Any] = None) -> Dict[str, Any]:
    """Nodes, params, MACs/FLOPs, size, end-to-end diff, latency and accuracy before and after."""
    shapes = dict(ctx.input_shapes)
    s = {"before": model_stats(before, shapes).to_dict(), "after": model_stats(after, shapes).to_dict()}
    # real inputs when there are some: on noise a pruned model looked far off (0.85, where the pass
    # and the checks, on the calibration data, said 0.99)
    feeds = list(ctx.calib_inputs[:2]) if ctx.calib_inputs else \
        verify.random_feeds(before, 2, ctx.seed, shapes)
    # both run as deployed (onnxruntime's optimizations on): the reference unoptimized showed a
    # difference of 0.04 for a model the passes left byte for byte as it was
    s["outputs"] = [d.as_dict() for d in verify.compare_models(before, after, feeds, ref_optimized=True)]
    if opts.int8 and not ir.quantized_ops(after):   # the table said "changed: yes, int8_layers=0", exit 0
        s.setdefault("notes", []).append("--int8 left every layer float: no layer kept the accuracy (or "
                                         "the speed) INT8 must keep here; see insert-qdq's skipped entries")
    if opts.bench:
        from .latency import interleaved_latency
        from .openvino_rt import engine_for

        engine = engine_for(opts.target)
        med = interleaved_latency({"before": before, "after": after}, feeds=feeds[-1],
                                  runs=opts.bench_runs, threads=opts.threads, engine=engine)
        s["latency_ms"] = med
        s["latency_engine"] = engine
        s["latency_ratio"] = med["after"] / med["before"] if med["before"] else None
        note = slower_note(s["latency_ratio"], opts)
        if note:
            s.setdefault("notes", []).append(note)
    fed = images_fed(before, opts.preprocess, (opts.calib, opts.images))
    if fed:
        s["images"] = fed
        if not opts.preprocess:   # a guess: do the images look fed as the model was trained?
            note = _preprocessing_note(before, opts, fed["preset"], checks)
            if note:
                s.setdefault("notes", []).append(note)
    drop = checks.get("accuracy.map_drop") if checks is not None else None
    if drop is not None and "candidate" in drop.details:
        s["accuracy"] = {"before": drop.details["reference"], "after": drop.details["candidate"]}
    elif opts.labels is not None:
        from .evaluate import evaluate

        images = _eval_images(opts)   # refused up front when there are none
        acc = {}
        for key, m in (("before", before), ("after", after)):
            acc[key] = evaluate(m, images, opts.labels, preset=opts.preprocess, limit=opts.eval_limit,
                                progress=opts.progress)
        s["accuracy"] = acc
    return s
