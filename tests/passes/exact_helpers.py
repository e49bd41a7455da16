"""Helpers for the tests of exact rewrites: op counts, validity, and the onnxruntime diff."""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from onnxslim_yolo import verify
from onnxslim_yolo.pass_base import PassContext, PassResult


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def valid(model: onnx.ModelProto) -> None:
    """Full onnx checker and strict shape inference (raise on failure)."""
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def outputs(model: onnx.ModelProto, feeds: Sequence[Dict[str, np.ndarray]]) -> List[List[np.ndarray]]:
    """Outputs with onnxruntime graph optimizations disabled, one thread."""
    s = verify.session(model, optimize=False, threads=1)
    return [verify.run(s, f) for f in feeds]


def max_diff(ref: onnx.ModelProto, new: onnx.ModelProto, n: int = 2, seed: int = 0,
             feeds: Optional[Sequence[Dict[str, np.ndarray]]] = None) -> Tuple[float, float]:
    """(max abs diff, max |ref|) over all outputs and ``n`` seeded inputs; both models run
    with graph optimizations disabled so only the rewrite can make a difference."""
    feeds = list(feeds) if feeds is not None else verify.random_feeds(ref, n, seed)
    worst, top = 0.0, 0.0
    for a_outs, b_outs in zip(outputs(ref, feeds), outputs(new, feeds)):
        for a, b in zip(a_outs, b_outs):
            assert a.shape == b.shape
            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()))
            top = max(top, float(np.abs(a).max()))
    return worst, top


def assert_exact(ref: onnx.ModelProto, new: onnx.ModelProto, rtol: float = 1e-5, **kw) -> float:
    """Outputs equal within float summation error: max abs diff <= rtol * max |ref|."""
    d, top = max_diff(ref, new, **kw)
    assert top > 0
    assert d <= rtol * top, f"max abs diff {d:.3g} vs max |ref| {top:.3g}"
    return d


def assert_idempotent(p, model: onnx.ModelProto, ctx: Optional[PassContext] = None) -> PassResult:
    again = p.run(model, ctx or PassContext())
    assert not again.modified
    assert ops(again.model) == ops(model)
    return again
