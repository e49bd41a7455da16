"""The pass manager: ordering, lifecycle, cleanup, validation, numeric verification, reports.

The manager, not the pass, enforces each pass's numerics contract: after a pass modifies the model,
the new model is checked (onnx checker, shape inference, the pass's ``ensures``) and compared with
the model before the pass in onnxruntime (reference with graph optimizations disabled).
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper

from . import ir, verify
from .pass_base import (Numerics, Pass, PassContext, PassReport, PassResult, PreconditionError, SlimError,
                        Terminated, UsageError, VerificationError, first_line)

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What happened to one pass in a pipeline run (JSON-able through ``to_dict``)."""

    name: str
    numerics: str
    modified: bool
    seconds: float
    report: Dict[str, Any]
    verification: List[Dict[str, float]] = field(default_factory=list)
    opset_upgraded_to: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "numerics": self.numerics, "modified": self.modified,
                "seconds": round(self.seconds, 4), "report": self.report,
                "verification": self.verification, "opset_upgraded_to": self.opset_upgraded_to}


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    records: List[PassRecord]

    def to_dict(self) -> Dict[str, Any]:
        return {"passes": [r.to_dict() for r in self.records]}


def order_passes(passes: Sequence[Pass]) -> List[Pass]:
    """Topological order honouring each pass's ``after`` (only among scheduled passes).

    Ties keep the order given. A cycle raises :class:`UsageError` naming it.
    """
    by_name: Dict[str, Pass] = {}
    for p in passes:
        _check_pass(p)
        if p.name in by_name:
            raise UsageError(f"pass '{p.name}' scheduled twice")
        by_name[p.name] = p
    g = nx.DiGraph()
    position = {p.name: i for i, p in enumerate(passes)}
    g.add_nodes_from(position)
    known: Optional[set] = None
    for p in passes:
        for dep in after_names(p):
            if dep in by_name:
                g.add_edge(dep, p.name)
                continue
            if known is None:   # not scheduled is fine (skipped); no such pass is a misspelling
                from . import registry
                known = set(registry.all_passes())
            if dep not in known:
                log.warning("pass '%s' runs after '%s', which is no known pass: ignored", p.name, dep)
    try:
        names = list(nx.lexicographical_topological_sort(g, key=lambda n: position[n]))
    except nx.NetworkXUnfeasible:
        cycle = " -> ".join(e[0] for e in nx.find_cycle(g))
        raise UsageError(f"pass ordering has a cycle: {cycle}") from None
    return [by_name[n] for n in names]


def _check_pass(p: Any) -> None:
    """A UsageError unless ``p`` is a Pass instance with a name and a Numerics contract (a class,
    or a contract given as a string, failed later with an AttributeError)."""
    if isinstance(p, type) and issubclass(p, Pass):
        raise UsageError(f"got the pass class {p.__name__}, not an instance: pass {p.__name__}()")
    if not isinstance(p, Pass):
        raise UsageError(f"got {type(p).__name__} where a Pass instance belongs")
    if not isinstance(p.name, str) or not p.name:
        raise UsageError(f"{type(p).__name__}: a pass needs a name (a non-empty string)")
    if not isinstance(p.numerics, Numerics):
        raise UsageError(f"pass '{p.name}': numerics must be one of "
                         f"{', '.join('Numerics.' + n.name for n in Numerics)}, got {p.numerics!r}")


def after_names(p: Pass) -> Tuple[str, ...]:
    """``p.after`` as names: a single name given as a string is one name, not its letters."""
    return (p.after,) if isinstance(p.after, str) else tuple(p.after)


def fingerprint(model: onnx.ModelProto) -> str:
    """A digest of what a pass may change (nodes, initializers, inputs, outputs, opsets; those of
    subgraphs, model-local functions, metadata and the IR version too), read
    without serializing the whole model (one over 2 GB cannot be): to catch a pass that edits
    the model it was given instead of returning a new one. It reads values, not their protobuf
    encoding: graphsurgeon, importing a model, sets a Constant's empty tensor name explicitly,
    which changes the bytes but not the model."""
    h = hashlib.blake2b(digest_size=16)
    g = model.graph
    for n in ir.all_nodes(g):
        h.update("\0".join([n.op_type, n.domain, n.name, *n.input, "->", *n.output]).encode())
        for a in n.attribute:
            h.update(f"{a.name}:{a.type}".encode())
            if a.type == onnx.AttributeProto.TENSOR:
                _tensor_digest(h, a.t)
            elif a.type not in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):   # their nodes above
                h.update(a.SerializeToString())
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                h.update(str([v.name for v in list(sub.input) + list(sub.output)]).encode())
                for t in sub.initializer:   # a branch's own constants
                    _tensor_digest(h, t)
    for vi in list(g.input) + list(g.output):
        dims = [d.dim_param or str(d.dim_value) for d in vi.type.tensor_type.shape.dim]
        h.update(f"{vi.name}:{vi.type.tensor_type.elem_type}:{dims}".encode())
    h.update(str(sorted((i.domain, i.version) for i in model.opset_import)).encode())
    for t in g.initializer:
        _tensor_digest(h, t)
    h.update(f"ir {model.ir_version}".encode())
    h.update(str([(p.key, p.value) for p in model.metadata_props]).encode())
    for f in model.functions:   # model-local functions are small: their bytes
        h.update(f.SerializeToString())
    return h.hexdigest()


def _tensor_digest(h: Any, t: onnx.TensorProto) -> None:
    h.update(f"{t.name}:{list(t.dims)}:{t.data_type}".encode())
    if t.HasField("raw_data"):
        h.update(t.raw_data)
    elif t.data_location == onnx.TensorProto.EXTERNAL:
        h.update(str([(e.key, e.value) for e in t.external_data]).encode())
    else:
        try:
            h.update(numpy_helper.to_array(t).tobytes())
        except Exception:   # a dtype numpy cannot hold: its fields as they are
            h.update(t.SerializeToString())


def canonical_export(model: onnx.ModelProto) -> onnx.ModelProto:
    """One graphsurgeon cleanup + toposort; value_info dropped so shapes are re-inferred."""
    g = ir.to_graph(model)
    out = ir.to_model(g, like=model, cleanup=True)
    del out.graph.value_info[:]
    return out


def validate(model: onnx.ModelProto) -> onnx.ModelProto:
    """Full onnx checker and strict shape inference; returns the model with inferred value_info."""
    try:
        return ir.check_model(model, infer=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        # one line, but whole: the checker names the node on the lines after "... of node:"
        said = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
        raise VerificationError(f"model is invalid: {said[:400] or type(exc).__name__}") from None


class PassManager:
    """Runs passes in dependency order and proves each one's numerics contract."""

    def __init__(self, passes: Sequence[Pass], ctx: Optional[PassContext] = None,
                 on_pass: Optional[Callable[[str], None]] = None) -> None:
        if isinstance(passes, Pass):   # one pass, not a list of them
            raise UsageError(f"PassManager takes a list of passes, got the pass {passes!r}: "
                             "PassManager([...])")
        if ctx is not None and not isinstance(ctx, PassContext):
            raise UsageError(f"PassManager's context is a PassContext, got {type(ctx).__name__}: "
                             "PassContext(options=..., seed=...)")
        self.ctx = ctx or PassContext()
        self.passes = order_passes(passes)
        _check_options(self.passes, self.ctx.options)
        self.on_pass = on_pass
        self._runs_batch2: Optional[bool] = None  # whether the model runs at batch 2 (found once a run)

    def run(self, model: onnx.ModelProto) -> PipelineResult:
        if not isinstance(model, onnx.ModelProto):
            hint = " (load a path with onnxslim_yolo.load)" if isinstance(model, (str, Path)) else ""
            raise UsageError(f"PassManager.run takes an onnx.ModelProto, got {type(model).__name__}{hint}")
        unloaded = next((t.name for t in model.graph.initializer
                         if t.data_location == onnx.TensorProto.EXTERNAL), None)
        if unloaded is not None:   # it worked from the model's own folder only, and a pass was blamed
            raise UsageError(f"initializer '{unloaded}' holds its data in an external file not loaded: load "
                             "the model with onnxslim_yolo.load (or onnx.load's load_external_data=True)")
        self._runs_batch2 = None   # a property of the model: a manager is run on several
        if self.ctx.dump_dir is not None:
            _remove_earlier_dumps(Path(self.ctx.dump_dir), [p.name for p in self.passes])
        records: List[PassRecord] = []
        for index, p in enumerate(self.passes):
            if self.on_pass:
                self.on_pass(p.name)
            before = [r.name for r in records]
            try:
                model, rec = self._run_one(p, model)
            except SlimError as exc:
                where = f" (after {', '.join(before)})" if before else ""
                raise type(exc)(f"pass '{p.name}'{where}: {exc}") from None
            records.append(rec)
            if self.ctx.dump_dir is not None and rec.modified:
                ir.save(model, Path(self.ctx.dump_dir) / f"{index:02d}_{p.name}.onnx")
        return PipelineResult(model, records)

    def _run_one(self, p: Pass, model: onnx.ModelProto) -> "tuple[onnx.ModelProto, PassRecord]":
        upgraded = None
        if p.min_opset and ir.opset(model) < p.min_opset:
            model = ir.ensure_opset(model, p.min_opset)
            upgraded = p.min_opset
        _guarded(p, "requires", lambda: p.requires(model, self.ctx))
        given = fingerprint(model)
        t0 = time.perf_counter()
        result = _guarded(p, "", lambda: p.run(model, self.ctx))
        seconds = time.perf_counter() - t0
        if fingerprint(model) != given:
            raise VerificationError("changed the model it was given (a pass returns a new model and leaves "
                                    "its input as it was: copy it first); the result cannot be verified")
        if not isinstance(result, PassResult):
            raise VerificationError("returned no PassResult")
        if not isinstance(result.model, onnx.ModelProto) or not isinstance(result.report, PassReport):
            raise VerificationError(f"returned a PassResult whose model is a {type(result.model).__name__} "
                                    f"and report a {type(result.report).__name__} (expected onnx.ModelProto "
                                    "and PassReport)")
        new = result.model
        if not result.modified and new is not model and fingerprint(new) != given:
            log.warning("pass '%s' returned a changed model but modified=False: its change is dropped "
                        "(a pass that changes the model says so)", p.name)
        diffs: List[Dict[str, float]] = []
        if result.modified or upgraded:
            if p.numerics != Numerics.LOSSY:
                _same_interface(model, new, fixing=bool(self.ctx.input_shapes))
            new = validate(_guarded(p, "its result's export", lambda: canonical_export(new)))
            _guarded(p, "ensures", lambda: p.ensures(new, self.ctx))
            if self.ctx.verify:
                diffs = self._verify(p, model, new)
        log.info("%s: modified=%s in %.2fs", p.name, result.modified, seconds)
        rec = PassRecord(p.name, p.numerics.value, bool(result.modified), seconds,
                         result.report.to_dict(), diffs, upgraded)
        return (new if (result.modified or upgraded) else model), rec

    def _verify(self, p: Pass, before: onnx.ModelProto, after: onnx.ModelProto) -> List[Dict[str, float]]:
        real = list(self.ctx.calib_inputs[: self.ctx.verify_samples]) if self.ctx.calib_inputs else []
        if p.numerics == Numerics.LOSSY and real:
            # a lossy pass is tuned to the data it was calibrated on; uniform noise images are
            # outside every calibrated range and would measure clipping, not the pass
            feeds = real
        else:
            feeds = verify.random_feeds(before, self.ctx.verify_samples, self.ctx.seed,
                                        dict(self.ctx.input_shapes)) + real
        feeds += self._batch2_feeds(before, after, real if p.numerics == Numerics.LOSSY else [])
        diffs = verify.compare_models(before, after, feeds)
        tolerances = _guarded(p, "tolerances", lambda: p.tolerances(self.ctx))
        ok, reason = verify.check_contract(diffs, p.numerics.value, tolerances)
        if not ok:
            rounding = [op for op in ir.quantized_ops(before)
                        if op in ("QuantizeLinear", "DynamicQuantizeLinear")]
            if rounding and p.numerics != Numerics.LOSSY:
                reason += (f"; the model already holds {', '.join(rounding)} nodes, where a float rounding "
                           "difference moves a value by a whole step: optimize the float export instead")
            raise VerificationError(f"broke its {p.numerics.value} numerics contract: {reason}")
        return [d.as_dict() for d in diffs]

    def _batch2_feeds(self, model: onnx.ModelProto, after: onnx.ModelProto,
                      real: List[verify.Feeds]) -> List[verify.Feeds]:
        """One feed at batch 2 when an input's batch is symbolic before and after the pass: a
        pass must hold at any batch, and the other feeds are batch 1. Two real images stacked
        when given, else seeded noise. Nothing when a batch is fixed (by the model or by given
        input shapes), or when the model itself does not run at batch 2 (it declares a dynamic
        batch it does not have; found once, with a warning)."""
        if self.ctx.input_shapes or self._runs_batch2 is False:
            return []
        shapes = verify.batch_shapes(model, 2)
        if not shapes or set(verify.batch_shapes(after, 2)) != set(shapes):
            return []
        feed = verify.random_feeds(model, 1, self.ctx.seed + 1, shapes)[0]
        if real:
            feed = {k: np.concatenate([real[0][k], real[-1][k]]) if k in shapes else real[0][k] for k in feed}
        if self._runs_batch2 is None:
            try:
                verify.run(verify.session(model, optimize=False), feed)
                self._runs_batch2 = True
            except VerificationError as exc:
                log.warning("the model declares a dynamic batch but does not run at batch 2 (%s): passes "
                            "are verified at batch 1 only", exc)
                self._runs_batch2 = False
                return []
        return [feed]


def _remove_earlier_dumps(folder: Path, scheduled: Sequence[str]) -> None:
    """Remove the dumps (``NN_PASS.onnx`` of a known or scheduled pass, with its ``.data``) an
    earlier run left in ``folder``: a run dumps only the passes that changed its model, so a
    second run into the same folder left the first one's files beside its own, unsaid (a model
    with no BatchNorm showed a 02_fold-batchnorm.onnx, another model's)."""
    from . import registry

    names = set(registry.all_passes()) | set(scheduled)
    if not folder.is_dir():
        return
    old = [f for f in folder.iterdir() if f.is_file() and
           (m := re.fullmatch(r"\d{2,}_(.+)\.onnx(\.data)?", f.name)) and m.group(1) in names]
    for f in old:
        f.unlink()
    if old:
        log.info("removed %d model dump(s) of an earlier run from %s", len(old), folder)


def _check_options(passes: Sequence[Pass], options: Mapping[str, Any]) -> None:
    """Refuse, before any pass runs, an option a scheduled pass does not read (when it declares
    :attr:`~.pass_base.Pass.option_names`) and options for no known pass: a misspelt option of an
    exact pass was ignored, and insert-qdq's own check came after the exact passes had run."""
    from . import registry

    for p in passes:
        given = options.get(p.name) or {}
        if p.option_names is None or not isinstance(given, Mapping):
            continue
        unknown = sorted(set(given) - set(p.option_names))
        if unknown:
            known = f"known: {', '.join(p.option_names)}" if p.option_names else "it takes none"
            raise UsageError(f"{p.name}: unknown option '{unknown[0]}' ({known})")
    scheduled = {p.name for p in passes}
    stray = sorted(n for n in options if n not in scheduled and n not in registry.all_passes())
    if stray:
        raise UsageError(f"options for '{stray[0]}', which is no known pass; known passes: "
                         f"{', '.join(sorted(registry.all_passes()))}")


def _same_interface(before: onnx.ModelProto, after: onnx.ModelProto, fixing: bool) -> None:
    """Raise when an exact or tolerance pass changed what a caller feeds and reads: an input's or
    output's element type, or (unless given input shapes are being fixed) a symbolic input dim
    made fixed. The comparison reads values as float64 and feeds the types the new model asks for,
    so a float64 output, a float64 input (the caller's float32 feed then fails) and a dynamic batch
    fixed at 1 passed as exact."""
    def types(vis: Sequence[onnx.ValueInfoProto]) -> Dict[str, int]:
        return {vi.name: vi.type.tensor_type.elem_type for vi in vis}

    inits = {t.name for t in after.graph.initializer} | {t.name for t in before.graph.initializer}
    for kind, old, new in (("input", types([i for i in before.graph.input if i.name not in inits]),
                            types([i for i in after.graph.input if i.name not in inits])),
                           ("output", types(before.graph.output), types(after.graph.output))):
        for name, t in old.items():
            if name in new and new[name] != t:
                raise VerificationError(f"changed the type of {kind} '{name}' from "
                                        f"{onnx.TensorProto.DataType.Name(t)} to "
                                        f"{onnx.TensorProto.DataType.Name(new[name])}")
    if fixing:
        return
    now = ir.input_shapes(after)
    for name, dims in ir.input_shapes(before).items():
        for axis, (d, e) in enumerate(zip(dims, now.get(name, dims))):
            if not isinstance(d, int) and isinstance(e, int):
                raise VerificationError(f"fixed axis {axis} of input '{name}' ({d or '?'}) at {e}: a "
                                        "symbolic dim stays symbolic through an exact pass")


def _guarded(p: Pass, what: str, call: Callable[[], Any]) -> Any:
    """``call()`` (a pass's ``run``, or ``what``: its ``requires``, ``ensures``, ...), with what
    it raises, bar the project's own errors, as one line naming the pass (``-vv``: the
    traceback). A third-party pass's bug in ``requires`` was a traceback, and its ``sys.exit(0)``
    ended the run with exit code 0 and no output."""
    try:
        return call()
    except (SlimError, KeyboardInterrupt, MemoryError, Terminated):
        raise
    except BaseException as exc:   # a pass's own SystemExit too: a pass does not end the run
        log.debug("pass '%s' raised", p.name, exc_info=True)
        where = f" in {what}" if what else ""
        raise VerificationError(f"raised {type(exc).__name__}{where}: {first_line(exc)}") from None


def build_passes(names: Sequence[str], ctx: Optional[PassContext] = None) -> List[Pass]:
    """Instantiate passes by name (built-ins and plugins); unknown names raise UsageError."""
    from . import registry

    return [registry.get(n)() for n in names]


def default_pass_names(extra: Sequence[str] = (), skip: Sequence[str] = ()) -> List[str]:
    """The default pipeline: every default-enabled pass, plus ``extra``, minus ``skip``."""
    from . import registry

    table = registry.all_passes()
    for n in list(extra) + list(skip):
        if n not in table:
            raise UsageError(f"unknown pass '{n}'; known passes: {', '.join(sorted(table))}")
    names = [n for n, cls in table.items() if registry.joins_default(cls) or n in extra]
    return [n for n in names if n not in set(skip)]


__all__ = ["PassManager", "PassRecord", "PipelineResult", "order_passes", "build_passes",
           "default_pass_names", "validate", "canonical_export", "PreconditionError"]
