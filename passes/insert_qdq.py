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
from onnxslim_yolo.quant.sensitivity import UnitSensitivity, rank_units, switch_model, tensor_units

log = logging.getLogger(__name__)

QUANT_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                       "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul"})
NO_CALIB = "insert-qdq needs calibration images: pass --calib DIR"


def already_quantized(model: onnx.ModelProto) -> Optional[str]:
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})
    return f"model already holds {', '.join(ops)} nodes: quantizing twice would stack errors" if ops else None


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
        plan = clock("plan", q.plan)
        clock("calibrate", q.calibrate, plan)
        clock("bias_correction", q.correct_bias, plan)
        built = clock("insert", q.build, plan)
        ranking: List[UnitSensitivity] = []
        if opts.sensitivity or opts.max_drop is not None:
            ranking = clock("sensitivity", self._sensitivity, q, built, report)
        final = built
        if opts.max_drop is not None:
            final = clock("mixed_precision", self._mixed, q, built, ranking, report)
        clock("report", self._report, q, final, report)
        return PassResult(final.model, True, report)

    # --------------------------------------------------------------------------------- accuracy
    def _sensitivity(self, q: Quantizer, built: Built, report: PassReport) -> List[UnitSensitivity]:
        sw = switch_model(built.graph, q.model, built.plan, built.record, tensor_units(built.graph, built.plan))
        ranking = rank_units(sw, [u for u in built.plan.units if not u.startswith("input:")],
                             q.head.last_conv_outputs, q.feeds[: q.opts.sensitivity_images], q.opts.threads,
                             q.opts.progress, built.plan.units)
        report.details["sensitivity"] = {"metric": "head-map SQNR gained by restoring the unit to float (dB)",
                                         "images": min(len(q.feeds), q.opts.sensitivity_images),
                                         "ranking": [r.as_dict() for r in ranking]}
        return ranking

    def _mixed(self, q: Quantizer, built: Built, ranking: List[UnitSensitivity], report: PassReport) -> Built:
        loss = metrics.DetectionLoss(q.model, q.feeds[: q.opts.mixed_images], q.opts.labels, q.opts.images,
                                     q.opts.threads, False)
        variants: Dict[int, Built] = {0: built}

        def build(units: List[str]) -> onnx.ModelProto:
            nodes = [n for u in units for n in built.plan.units.get(u, [])]
            b = q.build(q.plan(excluded_nodes=nodes))
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
            d["bias_correction"] = {k: float(abs(v).max()) for k, v in q.bias_errors.items() if k in plan.layers}
        feeds = q.feeds[: q.opts.eval_images]
        d["quality"] = {"images": len(feeds),
                        "outputs": metrics.output_quality(q.model, b.model, feeds, q.head.last_conv_outputs,
                                                          q.opts.threads)}
