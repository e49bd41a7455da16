"""insert-qdq: calibrated INT8 QuantizeLinear/DequantizeLinear, YOLO-aware, per target.

What changes in the graph: Q/DQ pairs on the activations the target runs in INT8, per-channel
symmetric int8 weights (axis 0 for Conv and Gemm(transB), 1 for ConvTranspose, last for MatMul)
read through DequantizeLinear, int32 biases (ort-cpu; TensorRT keeps them float), Concat and
layout ops sharing one scale, opset raised to 13 (per-channel DequantizeLinear needs ``axis``).
The YOLO decode tail (``analysis.head``) stays float: Q/DQ stop at the last convs.

Must not fire: a model that already holds Q/DQ or QLinear ops (left unchanged, with the reason);
no calibration feeds (PreconditionError). Options: see ``quant.options.QdqOptions``.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional

import onnx

from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import Numerics, Pass, PassContext, PassReport, PassResult, PreconditionError
from onnxslim_yolo.quant import metrics, mixed, ranges
from onnxslim_yolo.quant.options import QdqOptions
from onnxslim_yolo.quant.pipeline import Built, Quantizer
from onnxslim_yolo.quant.sensitivity import (SwitchEvaluator, UnitSensitivity, candidates, rank_units,
                                             significant_units, switch_model, tensor_units)

log = logging.getLogger(__name__)

QUANT_OPS: frozenset = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                                  "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd",
                                  "QLinearMul"})
NO_CALIB = "insert-qdq needs calibration images: pass --calib DIR"


def already_quantized(model: onnx.ModelProto) -> Optional[str]:
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})
    return f"model already holds {', '.join(ops)} nodes: quantizing twice would stack errors" if ops else None


def output_format(q: Quantizer) -> Optional[str]:
    """The decoded YOLO output format ("v5", "v8", "yolox"), or None to measure the head maps."""
    from onnxslim_yolo.eval.decode import format_from_metadata, format_from_shape

    if q.head.family == "unknown" or len(q.model.graph.output) != 1:
        return None
    shape = dict(q.head.outputs).get(q.model.graph.output[0].name, ())
    hw = None
    for vi in q.model.graph.input:
        d = [x.dim_value for x in vi.type.tensor_type.shape.dim]
        if len(d) == 4:
            hw = d[2:]
    try:
        return format_from_metadata(q.model) or format_from_shape(shape, hw)
    except Exception:  # unknown layout: fall back to the head maps
        return None


def _within_budget(found: List[UnitSensitivity], max_layers: int) -> List[UnitSensitivity]:
    """The most sensitive candidates whose layers together stay within ``max_layers``."""
    out: List[UnitSensitivity] = []
    used: set = set()
    for r in found:
        new = used | set(r.units)
        if len(new) <= max_layers:
            out.append(r)
            used = new
    return out


class _Clock:
    """Runs a stage and records its wall time in ``report.details['seconds']``."""

    def __init__(self, report: PassReport) -> None:
        self.seconds: Dict[str, float] = report.details.setdefault("seconds", {})
        self.t0 = time.perf_counter()

    def __call__(self, stage: str, fn: Any, *args: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args)
        self.seconds[stage] = round(time.perf_counter() - t, 2)
        return out


class InsertQDQ(Pass):
    name = "insert-qdq"
    numerics = Numerics.LOSSY
    description = "Calibrated INT8 Q/DQ (YOLO decode tail kept float; ort-cpu or tensorrt placement)"
    after = ("canonicalize", "focus-to-conv", "fold-batchnorm", "fold-affine", "prune-channels")
    min_opset = 13
    default_enabled = False

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        QdqOptions.parse(ctx.opts(self.name))
        if not ctx.calib_inputs:
            raise PreconditionError(NO_CALIB)

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        opts = QdqOptions.parse(ctx.opts(self.name))
        report = PassReport()
        why = already_quantized(model)
        if why:
            report.skip(model.graph.name or "model", why)
            return PassResult(model, False, report)
        if not ctx.calib_inputs:
            raise PreconditionError(NO_CALIB)
        model = ir.ensure_opset(model, self.min_opset)
        clock = _Clock(report)
        q = Quantizer(model, opts, ctx.calib_inputs)
        report.details["seconds"].update(q.seconds)
        plan = clock("plan", q.plan)
        clock("calibrate", q.calibrate, plan)
        clock("bias_correction", q.correct_bias, plan)
        built = clock("insert", q.build, plan)
        final = clock("accuracy", self._accuracy, q, built, report)
        clock("report", self._report, q, final, report)
        return PassResult(final.model, True, report)

    # --------------------------------------------------------------------------------- accuracy
    def _accuracy(self, q: Quantizer, built: Built, report: PassReport) -> Built:
        """Sensitivity ranking, automatic float for very sensitive units, mixed precision."""
        o = q.opts
        if not (o.sensitivity or o.max_drop is not None or o.auto_float_db > 0) or not built.plan.units:
            return built
        units_of = tensor_units(built.graph, built.plan)
        sw = switch_model(built.graph, q.model, built.plan, built.record, units_of)
        ev = SwitchEvaluator(sw, q.head.last_conv_outputs, q.feeds[: o.sensitivity_images], o.threads,
                             output_format(q))
        cands = candidates(built.plan, units_of)
        nodes = built.plan.units
        ranking: List[UnitSensitivity] = []
        if o.sensitivity or o.max_drop is not None:
            ranking = rank_units(ev, cands, nodes, o.progress)
            significant = [r for r in ranking if o.auto_float_db > 0 and r.sqnr_gain_db >= o.auto_float_db]
        else:
            significant = significant_units(ev, cands, nodes, o.auto_float_db)
        significant = _within_budget(significant, int(o.auto_float_max * len(built.plan.layers)))
        sens: Dict[str, Any] = {"metric": ev.metric, "gain": "dB of that loss removed by restoring alone",
                                "images": len(ev.feeds), "int8_loss_db": round(ev.base, 3), "runs": ev.runs}
        if ranking:
            sens["ranking"] = [r.as_dict() for r in ranking]
        if significant:
            keep = [u for r in significant for u in r.units]
            sens["auto_float"] = {"threshold_db": o.auto_float_db,
                                  "candidates": [r.as_dict() for r in significant],
                                  "gain_together_db": round(ev.gain(keep), 3)}
            built = q.build(q.plan(self._keep_float(built, significant, o.auto_float_db)))
        report.details["sensitivity"] = sens
        if o.max_drop is not None:
            built = self._mixed(q, built, [r for r in ranking if r not in significant], report)
        return built

    @staticmethod
    def _keep_float(built: Built, restored: List[UnitSensitivity], threshold: float) -> Dict[str, str]:
        return {n: f"sensitive: un-quantizing {r.unit} alone lowers the output loss {r.sqnr_gain_db:.2f} dB "
                   f"(>= {threshold:g})" for r in restored for n in r.nodes}

    def _mixed(self, q: Quantizer, built: Built, ranking: List[UnitSensitivity], report: PassReport) -> Built:
        loss = metrics.DetectionLoss(q.model, q.feeds[: q.opts.mixed_images], q.opts.labels, q.opts.images,
                                     q.opts.threads, False)
        variants: Dict[int, Built] = {0: built}
        base_float = {n: why for n, why in built.plan.float_nodes.items() if why.startswith("sensitive")}

        def build(units: List[str]) -> onnx.ModelProto:
            keep = dict(base_float)
            keep.update({n: f"mixed precision: {r.unit} restored to meet max_drop"
                         for r in ranking if r.unit in set(units) for n in r.nodes})
            b = q.build(q.plan(keep))
            variants[len(units)] = b
            return b.model

        res = mixed.search(ranking, build, loss, float(q.opts.max_drop), first=built.model)
        report.details["mixed_precision"] = {"loss": loss.kind, "max_drop": q.opts.max_drop, "met": res.met,
                                             "final_loss": res.loss, "restored_units": res.restored,
                                             "steps": res.steps}
        if not res.met:
            report.skip("mixed-precision", f"loss {res.loss:.3f} > max_drop {q.opts.max_drop} even with "
                                           f"{len(res.restored)} units float")
        return variants[len(res.restored)]

    # ---------------------------------------------------------------------------------- report
    def _report(self, q: Quantizer, b: Built, report: PassReport) -> None:
        plan = b.plan
        report.count("int8_layers", len(plan.layers))
        report.count("int8_ops", len(plan.int8_ops))
        report.count("quantized_tensors", len(plan.activations))
        report.count("float_layers", sum(1 for n in plan.float_nodes if n not in plan.int8_ops))
        report.count("int32_biases", len(b.record.int32_bias))
        report.count("decode_tail_nodes", len(plan.tail))
        for node, why in plan.float_nodes.items():
            report.skip(node, why)
        for node, why in b.record.float_bias.items():
            report.skip(node, f"bias kept float: {why}")
        d: Dict[str, Any] = report.details
        d["target"] = plan.target.name
        d["head"] = {"family": q.head.family, "layout": q.head.layout, "last_convs": list(q.head.last_convs),
                     "strides": list(q.head.strides), "tail_nodes": list(plan.tail)}
        d["placement"] = plan.summary()
        d["int8_layers"] = list(plan.layers)
        d["calibration"] = {**q.calib_info, "methods": b.table.methods()}
        d["tensors"] = ranges.table_report(b.table, plan)
        if q.timings:
            d["conv_timings"] = q.timings
        if q.bias_errors:
            d["bias_correction"] = {k: float(abs(v).max()) for k, v in q.bias_errors.items()
                                    if k in plan.layers}
        feeds = q.feeds[: q.opts.eval_images]
        d["quality"] = {"images": len(feeds),
                        "outputs": metrics.output_quality(q.model, b.model, feeds, q.head.last_conv_outputs,
                                                          q.opts.threads)}
