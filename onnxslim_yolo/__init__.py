"""onnxslim-yolo: a graph-level compiler for YOLO-family ONNX detectors.

Public API::

    import onnxslim_yolo as osy
    model = osy.load("yolov5n.onnx")
    result = osy.optimize(model, int8=True, calib="images/")      # the composed pipeline
    osy.save(result.model, "yolov5n.int8.onnx", protect=["yolov5n.onnx"])

    # or compose passes yourself
    pm = osy.PassManager([osy.get_pass("canonicalize")(), MyPass()], osy.PassContext())
    out = pm.run(model).model
"""
from __future__ import annotations

from .api import OptimizeOptions, OptimizeResult, optimize
from .ir import load, save
from .pass_base import (ModelLoadError, Numerics, Pass, PassContext, PassReport, PassResult,
                        PreconditionError, SlimError, Tolerances, UsageError, VerificationError)
from .pass_manager import PassManager
from .registry import all_passes, builtin_passes
from .registry import get as get_pass

__version__ = "0.1.0"


def __getattr__(name: str):  # ALL_PASSES is computed on access so plugins installed later are seen
    if name == "ALL_PASSES":
        return builtin_passes()
    raise AttributeError(name)


__all__ = ["load", "save", "optimize", "OptimizeOptions", "OptimizeResult", "PassManager", "PassContext",
           "Pass", "PassResult", "PassReport", "Numerics", "Tolerances", "SlimError", "UsageError",
           "ModelLoadError", "PreconditionError", "VerificationError", "all_passes", "builtin_passes",
           "get_pass", "ALL_PASSES"]
