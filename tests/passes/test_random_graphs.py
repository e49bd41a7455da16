"""Passes on random YOLO-like graphs (tests/analysis/random_graphs.py), clean and messy (dynamic
batch read back by Shape chains, unnamed nodes, Constant nodes): the exact pipeline is verified
by the manager without a warning, pruning's mechanics equal the original with the removed
channels zeroed, and calibrated pruning and INT8 write models onnxruntime runs optimized. Some
seeds also draw the extra blocks (random_graphs.EXTRA_BLOCKS)."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from onnxslim_yolo import PassContext, PassManager, ir, verify
from onnxslim_yolo.pass_manager import build_passes, default_pass_names
from tests.analysis.random_graphs import random_yolo_like
from tests.passes.test_prune_channels import EXACT, assert_exact, run

SEEDS = list(range(30))
#: (seed, messy, extra): every seed clean and messy, and the first 12 with the extra blocks
#: (InstanceNormalization, a depthwise Conv with two outputs per input, a Resize to the size
#: another map's Shape gives, a group norm)
CASES = [(s, m, False) for s in SEEDS for m in (False, True)] + \
    [(s, m, True) for s in SEEDS[:12] for m in (False, True)]


def named(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as prune-channels reads it: its unnamed nodes named as the pass names them, its
    Constant nodes as initializers (what the zeroed reference edits)."""
    g = ir.to_graph(model)
    ir.name_unnamed_nodes(g)
    out = ir.to_model(g, model)
    for n in out.graph.node:
        if n.op_type == "Constant":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            out.graph.initializer.append(t)
    kept = [n for n in out.graph.node if n.op_type != "Constant"]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    return out


def test_the_seeds_cover_every_block_kind_and_messy_graphs_are_messy():
    models = [random_yolo_like(s) for s in SEEDS]
    seen = set().union(*({n.op_type for n in m.graph.node} for m in models))
    assert {"Split", "Slice", "Concat", "Add", "Resize", "MaxPool", "AveragePool", "GlobalAveragePool",
            "BatchNormalization", "Pad", "Clip", "LeakyRelu", "HardSwish", "Relu", "ConvTranspose",
            "Softplus", "ReduceMax", "SpaceToDepth", "Div", "Gather"} <= seen, seen
    assert {m.opset_import[0].version for m in models} == {11, 13, 17, 18, 21}
    assert random_yolo_like(5).SerializeToString() == random_yolo_like(5).SerializeToString()
    messy = random_yolo_like(5, messy=True)
    assert messy.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert any(not n.name for n in messy.graph.node)
    assert {"Constant", "Shape", "Gather", "Unsqueeze"} <= {n.op_type for n in messy.graph.node}
    extra = [random_yolo_like(s, extra=True) for s in SEEDS[:12]]
    assert any(n.op_type == "InstanceNormalization" for m in extra for n in m.graph.node)
    assert any(n.op_type == "GroupNormalization" for m in extra for n in m.graph.node)
    assert any(n.op_type == "Reshape" and n.name.startswith("gn") for m in extra for n in m.graph.node)
    assert any(n.op_type == "Resize" and n.input[3].endswith(".sizes_out") and "sizeof" in n.name
               for m in extra for n in m.graph.node if len(n.input) > 3)
    assert random_yolo_like(3, extra=True).SerializeToString() != random_yolo_like(3).SerializeToString()


@pytest.mark.parametrize("seed, messy, extra", CASES)
def test_exact_pipeline_and_pruning_mechanics(seed, messy, extra, caplog):
    model = random_yolo_like(seed, messy=messy, extra=extra)
    with caplog.at_level(logging.WARNING):
        res = PassManager(build_passes(default_pass_names()), PassContext()).run(model)
    assert not [r for r in caplog.records if "modified=False" in r.getMessage()]
    for rec in res.records:
        assert all(d["max_abs"] <= 1e-4 * max(1.0, d["ref_max"]) for d in rec.verification), rec.name
    pruned = run(model, ratio=0.3, round_to=1, **EXACT)
    if pruned.modified:
        assert_exact(named(model), pruned.model, pruned.report.details)
        assert 0 < pruned.report.details["mac_reduction"] <= 0.4


@pytest.mark.parametrize("seed, messy, extra", [c for c in CASES if c[0] < 8])
def test_calibrated_pruning_writes_a_model_that_runs(seed, messy, extra):
    model = random_yolo_like(seed, messy=messy, extra=extra)
    calib = verify.random_feeds(model, 16, 1)
    res = run(model, calib, ratio=0.2)
    onnx.checker.check_model(res.model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(res.model, check_type=True, strict_mode=True)
    for vi in inferred.graph.value_info:    # no feature map without channels (a Resize's roi may be empty)
        dims = vi.type.tensor_type.shape.dim
        assert len(dims) != 4 or all(d.dim_param or d.dim_value > 0 for d in dims), vi.name
    out = verify.run(verify.session(res.model, optimize=True), calib[0])
    assert all(np.isfinite(o).all() for o in out)


@pytest.mark.parametrize("seed", SEEDS[:12])
def test_int8_pipeline_runs_on_random_graphs(seed):
    model = random_yolo_like(seed, messy=bool(seed % 2))
    calib = verify.random_feeds(model, 8, 1)
    res = PassManager(build_passes(default_pass_names(extra=["insert-qdq"])),
                      PassContext(calib_inputs=calib)).run(model)
    out = verify.run(verify.session(res.model, optimize=True), calib[0])
    assert all(np.isfinite(o).all() for o in out)
