"""restore-float16: a float16 model that was computed in float32 for pruning goes back to float16.

``optimize --prune`` on a float16 export first runs ``upcast-float16`` (pruning calibrates and
refits in float32). Without this pass the pruned model would keep float32 weights and come out
about twice the size of the file the user gave (yolov5n: 4.0 MB in, 7.5 MB out). ``optimize``
schedules it last whenever it scheduled the upcast and no INT8 was asked for: an INT8 model's
weights are int8 already and its float parts stay float32.

The conversion is onnxruntime's own float16 tool (``onnxruntime.transformers.float16``): it
knows which ops must stay float32 (NonMaxSuppression, TopK, Range, Resize's scales, ...) and
puts Casts around them. Graph inputs and outputs keep their types. Casts that become no-ops
(the upcast's own, float16 -> float16 now) are then dropped by ``canonicalize``'s rules.

Numerics: tolerance (weights and intermediate results are rounded to float16 again).
"""
from __future__ import annotations

import onnx

from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import Numerics, Pass, PassContext, PassReport, PassResult, first_line
from onnxslim_yolo.passes.canonicalize import Canonicalize

F32 = onnx.TensorProto.FLOAT
F16 = onnx.TensorProto.FLOAT16


def _float32_weights(model: onnx.ModelProto) -> int:
    return sum(t.data_type == F32 for t in model.graph.initializer)


class RestoreFloat16(Pass):
    """float32 weights and arithmetic back to float16; graph inputs and outputs keep their types."""

    name = "restore-float16"
    option_names = ()
    numerics = Numerics.TOLERANCE
    default_enabled = False
    after = ("upcast-float16", "canonicalize", "focus-to-conv", "fold-batchnorm", "fold-affine",
             "merge-branches", "prune-channels", "insert-qdq")
    description = "float32 weights back to float16 after a float16 model was pruned (interface kept)"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        report = PassReport()
        before = _float32_weights(model)
        if not before:
            return PassResult(model, False, report)
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
            report.skip(model.graph.name or "model", "the model is quantized: its float parts stay float32")
            return PassResult(model, False, report)
        if ir.model_size(model) > ir.PROTO_LIMIT:
            report.skip(model.graph.name or "model", "over the 2 GiB protobuf limit: onnxruntime's float16 "
                                                     "tool cannot infer its shapes; left in float32")
            return PassResult(model, False, report)
        try:
            half = convert_float_to_float16(model, keep_io_types=True)
        except Exception as exc:   # the tool's own failure: refuse with its reason, keep float32
            report.skip(model.graph.name or "model", f"onnxruntime's float16 tool failed: {first_line(exc)}")
            return PassResult(model, False, report)
        tidy = Canonicalize().run(half, ctx)
        half = tidy.model
        report.count("initializers", before - _float32_weights(half))
        report.count("removed_cast", tidy.report.counts.get("removed_cast", 0))
        report.details["float32_initializers_left"] = _float32_weights(half)
        return PassResult(half, True, report)


__all__ = ["RestoreFloat16"]
