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
from pathlib import Path
from typing import Any, Dict, Optional

import onnx

from onnxslim_yolo import ir, verify
from onnxslim_yolo.data import sample_count
from onnxslim_yolo.analysis.head import WEIGHT_OPS
from onnxslim_yolo.pass_base import Numerics, Pass, PassContext, PassReport, PassResult, PreconditionError
from onnxslim_yolo.quant import ranges, rewrite
from onnxslim_yolo.quant.accuracy import Controller
from onnxslim_yolo.quant.options import QdqOptions
from onnxslim_yolo.quant.pipeline import Built, Quantizer

log = logging.getLogger(__name__)
#: fewer calibration images than this get a warning
FEW_IMAGES = 8

NO_CALIB = "insert-qdq needs calibration images: pass --calib DIR"


def already_quantized(model: onnx.ModelProto) -> Optional[str]:
    ops = ir.quantized_ops(model)
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
    option_names = QdqOptions.option_names()
    numerics = Numerics.LOSSY
    description = "Calibrated INT8 Q/DQ (decode tail kept float; ort-cpu, tensorrt or openvino placement)"
    after = ("upcast-float16", "canonicalize", "focus-to-conv", "fold-batchnorm", "fold-affine",
             "prune-channels")
    min_opset = 13
    default_enabled = False

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:
        QdqOptions.parse(ctx.opts(self.name))
        ir.require_float32_weights(model)
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
        given, model = model, ir.ensure_opset(model, self.min_opset)
        images = sample_count(ctx.calib_inputs)   # an image folder's files, not decoded to count them
        if images < FEW_IMAGES and not (opts.calib_table and Path(opts.calib_table).exists()):
            log.warning("%s: %d calibration image(s): ranges from fewer than %d are noisy (the default "
                        "reads 64)", self.name, images, FEW_IMAGES)
        clock = _Clock(report)
        q = Quantizer(model, opts, ctx.calib_inputs)
        report.details["seconds"].update(q.seconds)
        plan = clock("plan", q.plan)
        if not plan.activations and not plan.layers:
            for node, why in plan.float_nodes.items():
                report.skip(node, why)
            report.skip(model.graph.name or "model", "nothing to quantize: every weight layer stays float "
                                                     "(reasons in the entries above)")
            return PassResult(model, False, report)
        clock("calibrate", q.calibrate, plan)
        clock("bias_correction", q.correct_bias, plan)
        built = clock("insert", q.build, plan)
        ctl = Controller(q, report)
        built = clock("sensitivity", ctl.sensitivity, built)
        built = clock("mixed_precision", ctl.mixed_precision, built)
        check = verify.random_feeds(model, ctx.verify_samples, ctx.seed, dict(ctx.input_shapes))
        check += list(ctx.calib_inputs[: ctx.verify_samples])
        if opts.guard:
            built = clock("guard", ctl.guard, built, check, self.tolerances(ctx).lossy_min_cosine)
        built = clock("openvino", ctl.fit_openvino, built)
        clock("report", self._report, q, built, report, ctl.quality(built.model, check))
        if not ir.quantized_ops(built.model):   # the guard (or the placement) put every layer back
            report.skip(model.graph.name or "model", "no layer stays INT8: each one cost more accuracy "
                                                     "or time than allowed, so the model is left float")
            return PassResult(given, False, report)
        return PassResult(built.model, True, report)

    # ---------------------------------------------------------------------------------- report
    def _report(self, q: Quantizer, b: Built, report: PassReport, quality: Dict[str, Any]) -> None:
        plan = b.plan
        report.count("int8_layers", len(plan.layers))
        report.count("int8_ops", len(plan.int8_ops))
        report.count("quantized_tensors", len(plan.activations))
        ops = {n.name: n.op_type for n in q.model.graph.node}
        kept = [n for n in plan.float_nodes if n not in plan.int8_ops]
        layers = sum(1 for n in kept if ops.get(n) in WEIGHT_OPS)   # Sigmoid and Mul are no layers
        report.count("float_layers", layers)
        report.count("float_ops", len(kept) - layers)
        report.count("int32_biases", len(b.record.int32_bias))
        if b.record.constants:
            report.count("quantized_constants", len(b.record.constants))
        report.count("decode_tail_nodes", len(plan.tail))
        for node, why in plan.float_nodes.items():
            report.skip(node, why)
        for node, why in b.record.float_bias.items():
            if why != rewrite.TARGET_FLOAT_BIAS:
                report.skip(node, f"bias kept float: {why}")
        if len(b.record.float_bias):
            report.count("float_biases", len(b.record.float_bias))
        d: Dict[str, Any] = report.details
        d["target"] = plan.target.name
        d["weights"] = {"bits": 7 if q.reduce_range else 8, "why": q.weight_range}
        d["head"] = {"family": q.head.family, "layout": q.head.layout, "last_convs": list(q.head.last_convs),
                     "strides": list(q.head.strides), "tail_nodes": list(plan.tail)}
        d["placement"] = plan.summary()
        d["int8_layers"] = list(plan.layers)
        if plan.runtime_quantized:
            report.count("runtime_quantized_layers", len(plan.runtime_quantized))
            d["runtime_quantized"] = dict(plan.runtime_quantized)
        d["calibration"] = {**q.calib_info, "methods": b.table.methods()}
        d["tensors"] = ranges.table_report(b.table, plan)
        if q.timings:
            d["conv_timings"] = q.timings
        if q.bias_errors:
            d["bias_correction"] = {k: float(abs(v).max()) for k, v in q.bias_errors.items()
                                    if k in plan.layers}
            d["layer_local_sqnr_db"] = {k: round(v, 2) for k, v in q.local_sqnr.items() if k in plan.layers}
        d["quality"] = {"inputs": "seeded random and calibration images (what the manager checks)",
                        "outputs": quality}
