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


def assert_refused(res: PassResult, model: onnx.ModelProto, reason: str) -> None:
    """The pass left ``model`` as it was and skipped exactly one pattern, for ``reason``."""
    assert not res.modified and res.model is model
    assert len(res.report.skipped) == 1 and reason in res.report.skipped[0]["reason"], res.report.skipped


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Dict[str, Sequence], outputs_: Sequence[str],
               inits: Dict[str, np.ndarray], opset: int = 13) -> onnx.ModelProto:
    """A model from nodes; graph inputs ``{name: shape}``, float32; output shapes inferred."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        list(nodes), "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs_],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    inferred = onnx.shape_inference.infer_shapes(m)
    known = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in m.graph.output:
        vi = known.get(out.name)
        if vi is not None and vi.type.tensor_type.HasField("shape"):
            out.type.CopyFrom(vi.type)
        else:
            out.type.tensor_type.shape.SetInParent()
    onnx.checker.check_model(m)
    return m
