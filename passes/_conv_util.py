"""Helpers shared by the exact rewrites (focus-to-conv, fold-batchnorm, fold-affine).

The checks every fold makes before touching a tensor: is it a constant, is it used elsewhere,
is it a graph output. Read-only; nothing here mutates a graph. Conv attributes and explicit
padding are in ``ir`` (``conv_attrs``, ``explicit_pads``), which the analysis layer shares.
"""
from __future__ import annotations

import logging
from typing import Optional, Set, Tuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_yolo import ir

log = logging.getLogger(__name__)


def with_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred value_info (the model unchanged when inference fails)."""
    try:
        return ir.infer_shapes(model, data_prop=True)
    except Exception as exc:  # shapes are a help for the checks, not a requirement to run
        log.debug("shape inference failed: %s", exc)
        return model


def static_shape(t: gs.Tensor) -> Optional[Tuple[int, ...]]:
    """The tensor's shape when every dim is a known positive int, else None."""
    dims = ir.static_dims(t)
    return None if dims is None or any(d <= 0 for d in dims) else tuple(dims)


def rank(t: gs.Tensor) -> Optional[int]:
    shp = getattr(t, "shape", None)
    return None if shp is None else len(shp)


def is_graph_output(t: gs.Tensor, outputs: Set[str]) -> bool:
    return t.name in outputs


def sole_consumer(t: gs.Tensor, outputs: Set[str]) -> Optional[gs.Node]:
    """The one node reading ``t`` when nothing else (node or graph output) does."""
    if t.name in outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def users(t: gs.Tensor) -> int:
    """How many node inputs read ``t`` (a node reading it twice counts twice)."""
    return sum(sum(1 for i in n.inputs if i is t) for n in t.outputs)


def param(t: Optional[gs.Tensor], what: str) -> Tuple[Optional[np.ndarray], str]:
    """(value, "") for a constant tensor, else (None, reason naming ``what``)."""
    if t is None or (isinstance(t, gs.Variable) and not t.name):
        return None, f"{what} is missing"
    v = ir.const_value(t)
    if v is None:
        src = "a graph input" if not t.inputs else f"computed by {t.inputs[0].op}"
        return None, f"{what} '{t.name}' is not a constant ({src})"
    return v, ""


def shared(t: gs.Tensor) -> bool:
    """True when a parameter tensor is read by more than one node input."""
    return users(t) > 1


def new_const(alloc: ir.NameAllocator, base: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(alloc(base), np.ascontiguousarray(value))


def float_dtype(*arrays: np.ndarray) -> Optional[np.dtype]:
    """The common float dtype of parameters, None when one is not a float."""
    dts = {a.dtype for a in arrays}
    if len(dts) != 1 or not np.issubdtype(next(iter(dts)), np.floating):
        return None
    return next(iter(dts))
