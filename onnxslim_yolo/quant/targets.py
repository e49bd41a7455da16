"""What each deployment target wants from a QDQ model (types, which ops run in INT8, ranges).

The ort-cpu rules come from measurements with onnxruntime 1.32 on the 2-core AVX512-VNNI machine
(profiles of yolov5n at 640, per-op kernel time, see the module docs of ``quant.cost``):
- DQ -> Conv -> Q fuses into QLinearConv (int32 or float bias both fuse); dense convs run 2.5-3.5x
  faster than FP32, but the 3-channel stem (5.2 ms vs 3.3 ms) and depthwise convs (2-4x slower)
  do not, hence the per-conv measurement (``quant.cost``) instead of a fixed rule;
- SiLU as QLinearSigmoid + QLinearMul (7.0 ms on yolov5n) beat the float alternatives: DQ ->
  Sigmoid -> Mul -> Q (no QuickGelu fusion once onnxruntime duplicates the DQ: 10+ ms), DQ ->
  com.microsoft QuickGelu -> Q (about equal, but not a standard op), a 256-entry Gather lookup
  (4x slower);
- ConvTranspose has no INT8 kernel (runs DQ + float ConvTranspose + Q): kept float;
- a quantized last-conv output costs 0.6 mAP (one scale for box and score logits): kept float;
- Reshape/Transpose/MaxPool/Resize/Split/Slice run on uint8 when input and output share a scale.
TensorRT: explicit quantization rules (Q/DQ on the inputs of Conv/MatMul/Gemm and their weights,
the residual input of Add; int8 symmetric, zero point 0; biases float).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, Optional, Tuple

from ..pass_base import UsageError

WEIGHT_LAYERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: ops onnxruntime runs on uint8 unchanged when their input and output share one scale
SAME_RANGE_OPS = frozenset({"MaxPool", "Resize", "Reshape", "Transpose", "Split", "Slice", "Squeeze",
                            "Unsqueeze", "Flatten", "Identity", "DepthToSpace", "SpaceToDepth"})


@dataclass(frozen=True)
class Target:
    """Quantization conventions of one runtime."""

    name: str
    act_qdtype: str
    act_symmetric: bool
    #: weight layers the runtime runs in INT8
    int8_layers: FrozenSet[str]
    #: non-weight ops that run in INT8 when all their float inputs are quantized
    int8_ops: FrozenSet[str]
    #: ops whose output shares its input's range (one group per node)
    same_range_ops: FrozenSet[str]
    #: Concat inputs and output share one scale
    shared_concat: bool
    bias_int32: bool
    #: quantize the inputs and weights of the last convs (their outputs always stay float)
    quantize_last_convs: bool
    #: a quantized layer's output is quantized too (onnxruntime fuses DQ->Conv->Q only)
    quantize_layer_outputs: bool
    #: Add: quantize only the residual (skip) input, TensorRT's rule
    residual_add_inputs: bool
    #: decide INT8 vs float per conv by timing both on this machine
    measure: bool
    #: an Add / Mul with a float constant operand (a Linear layer's bias Add, a LayerScale Mul)
    #: runs INT8 when its other input and its output are quantized anyway: the constant is
    #: quantized too (per tensor, the activation type), so onnxruntime fuses QLinearAdd/Mul
    #: instead of running the op in float between DQ and Q
    quantize_constant_operands: bool = False


ORT_CPU = Target(
    name="ort-cpu", act_qdtype="uint8", act_symmetric=False,
    int8_layers=frozenset({"Conv", "MatMul", "Gemm"}),
    int8_ops=frozenset({"Sigmoid", "Mul", "Add", "Concat", "LeakyRelu", "Relu", "AveragePool",
                        "GlobalAveragePool"}) | SAME_RANGE_OPS,
    same_range_ops=SAME_RANGE_OPS, shared_concat=True, bias_int32=True, quantize_last_convs=False,
    quantize_layer_outputs=True, residual_add_inputs=False, measure=True, quantize_constant_operands=True)

TENSORRT = Target(
    name="tensorrt", act_qdtype="int8", act_symmetric=True,
    int8_layers=frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"}),
    int8_ops=frozenset(), same_range_ops=frozenset(), shared_concat=False, bias_int32=False,
    quantize_last_convs=True, quantize_layer_outputs=False, residual_add_inputs=True, measure=False)

#: OpenVINO's CPU plugin reads Q/DQ into its own low-precision graph. Measured with OpenVINO
#: 2026.4 on yolov5n (640x640, 2 threads, mAP in OpenVINO on coco128; float 18.2 ms, 0.3599 at
#: its default bf16 precision on this CPU): these rules (uint8 activations, Q/DQ on the inputs of
#: the weight layers and on the residual input of Add, Concat / MaxPool / Resize passing a
#: quantized input on at its scale, the last convs float) 14.9 ms and 0.3520; the same with the
#: last convs quantized 14.2 ms but 0.3460; the ort-cpu rules 21.3 ms (no faster than float); the
#: tensorrt rules (int8 symmetric activations) 14.3 ms but mAP 0.0007, although onnxruntime runs
#: that model to 0.3475
OPENVINO = Target(
    name="openvino", act_qdtype="uint8", act_symmetric=False,
    int8_layers=frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"}),
    int8_ops=frozenset({"Concat", "MaxPool", "Resize"}), same_range_ops=frozenset({"MaxPool", "Resize"}),
    shared_concat=True, bias_int32=False, quantize_last_convs=False, quantize_layer_outputs=False,
    residual_add_inputs=True, measure=False)

TARGETS = {t.name: t for t in (ORT_CPU, TENSORRT, OPENVINO)}


def resize_runs_int8(mode: str) -> bool:
    """Whether onnxruntime runs a Resize of this ``mode`` on quantized values: it drops the Q/DQ
    around a nearest Resize only; an interpolating one (YOLO26's depth head) stays float between
    them whatever its ranges (measured on onnxruntime 1.32)."""
    return mode == "nearest"


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UsageError(f"insert-qdq: unknown target '{name}' (use {', '.join(TARGETS)})")
    return TARGETS[name]


def weight_axis(op: str, trans_b: int = 0, rank: int = 4) -> int:
    """Output-channel axis of a layer's weight: Conv 0, ConvTranspose 1, MatMul last, Gemm by transB."""
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if trans_b else 1
    return rank - 1


#: targets that run INT8 on this machine's CPU: both multiply u8 x s8 with VPMADDUBSW on x86 without
#: VNNI (OpenVINO's CPU plugin too: with 8-bit weights there, yolov5n's class scores came out of
#: OpenVINO at cosine 0.77 against onnxruntime's, and 0.99 with 7-bit weights, on an AVX2 EPYC)
CPU_TARGETS = ("ort-cpu", "openvino")

#: CPU flags (Linux /proc/cpuinfo) of x86 int8 dot products that accumulate u8 x s8 in 32 bits
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def x86_int8_saturates(cpuinfo: Optional[str] = None) -> Optional[bool]:
    """True on an x86 CPU without VNNI/AMX, False with it or off x86, None when unknown.

    Without VNNI, onnxruntime's u8 x s8 kernels multiply with VPMADDUBSW, which adds pairs of
    products in 16 bits and saturates (255 x 127 x 2 > 32767); its documentation advises
    7-bit weights (reduce range) there. With VNNI (VPDPBUSD) or AMX the sums are 32-bit.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    if not flags:
        return None
    return not (flags & VNNI_FLAGS)


def weight_range(target: Target, reduce_range: Optional[bool],
                 cpuinfo: Optional[str] = None) -> Tuple[bool, str]:
    """(use 7-bit weights, why) for ``target``; ``reduce_range`` None decides from this CPU."""
    if reduce_range is not None:
        return bool(reduce_range), f"{7 if reduce_range else 8}-bit weights (set by option reduce_range)"
    if target.name not in CPU_TARGETS:
        return False, f"8-bit weights ({target.name} accumulates int8 products in 32 bits)"
    sat = x86_int8_saturates(cpuinfo)
    if sat:
        runtime = "onnxruntime's" if target.name == "ort-cpu" else "OpenVINO's CPU"
        return True, (f"7-bit weights: this x86 CPU has no VNNI, and {runtime} u8 x s8 kernels "
                      "would saturate 16-bit pair sums with 8-bit weights")
    if sat is None:
        return False, "8-bit weights (CPU features unknown)"
    return False, "8-bit weights (this CPU sums int8 products in 32 bits: VNNI, AMX or not x86)"
