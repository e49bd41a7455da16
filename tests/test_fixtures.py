"""The fixture models: valid ONNX, run in onnxruntime, expected structure, deterministic."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fixtures import FAMILIES, GraphBuilder
from fixtures.common import INPUT

OPSETS = (11, 13)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, batch: int = 1, img: int = 64) -> list:
    x = np.random.default_rng(0).random((batch, 3, img, img), dtype=np.float32)
    return _session(model).run(None, {INPUT: x})


def _anchors(img: int) -> int:
    return sum((img // s) ** 2 for s in (8, 16, 32))


@pytest.fixture(scope="module", params=[(f, o) for f in FAMILIES for o in OPSETS],
                ids=lambda p: f"{p[0]}-op{p[1]}")
def built(request):
    family, opset = request.param
    return family, opset, FAMILIES[family](opset=opset)


def test_checker_and_strict_shape_inference(built):
    _, opset, model = built
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert model.opset_import[0].version == opset
    assert len(inferred.graph.value_info) > 50  # every intermediate got a shape
    assert model.ByteSize() < 300_000


def test_runs_finite_with_expected_shape(built):
    family, _, model = built
    (out,) = _run(model)
    assert np.isfinite(out).all()
    na = 3 if family.startswith("yolov5") else 1
    assert out.shape == (1, na * _anchors(64), 9)
    assert [o.name for o in model.graph.output] == ["output"]


def test_v5_decode_is_pixel_boxes_and_probabilities():
    (out,) = _run(FAMILIES["yolov5_v6"]())
    assert 0.0 <= out[..., 4:].min() and out[..., 4:].max() <= 1.0
    assert out[..., :2].min() > -64 and out[..., :2].max() < 128  # centres near the image
    assert out[..., 2:4].min() >= 0.0


def test_focus_has_four_slices_on_input():
    model = FAMILIES["yolov5_focus"]()
    on_input = [n for n in model.graph.node if INPUT in n.input]
    assert Counter(n.op_type for n in on_input) == Counter({"Slice": 4})
    concat = [n for n in model.graph.node if n.op_type == "Concat"
              and set(n.input) == {s.output[0] for s in on_input}]
    assert len(concat) == 1
    counts = Counter(n.op_type for n in model.graph.node)
    assert counts["BatchNormalization"] == counts["Conv"] - 3  # all but the 3 Detect convs


def test_v6_stem_is_6x6_stride2():
    model = FAMILIES["yolov5_v6"]()
    (first,) = [n for n in model.graph.node if INPUT in n.input]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in first.attribute}
    assert first.op_type == "Conv" and attrs["kernel_shape"] == [6, 6] and attrs["strides"] == [2, 2]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bn_false_has_no_batchnorm_and_dynamic_batch_runs(family):
    model = FAMILIES[family](bn=False, dynamic_batch=True, opset=13)
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    (out,) = _run(model, batch=2)
    assert out.shape[0] == 2 and np.isfinite(out).all()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_deterministic_bytes(family):
    a = FAMILIES[family](seed=3).SerializeToString()
    assert a == FAMILIES[family](seed=3).SerializeToString()
    assert a != FAMILIES[family](seed=4).SerializeToString()


# ---------------------------------------------------------------------------- GraphBuilder
@pytest.mark.parametrize("act", ["silu", "relu", "leaky"])
@pytest.mark.parametrize("bn", [True, False])
def test_deep_chain_neither_explodes_nor_vanishes(act, bn):
    b = GraphBuilder(seed=1)
    y = x = b.input("x", (1, 16, 16, 16))
    for i in range(20):
        y = b.conv(y, 16, k=3, bn=bn, act=act)
    out = _session(b.make_model([x], [y])).run(
        None, {"x": np.random.default_rng(0).random((1, 16, 16, 16), dtype=np.float32)})[0]
    assert 0.02 < float(out.std()) < 20.0


@pytest.mark.parametrize("opset", [11, 12, 13, 18, 21])
def test_builder_ops_opset_aware(opset):
    b = GraphBuilder(opset=opset, seed=0)
    x = b.input("x", (1, 6, 4, 4))
    a, c = b.split(x, [2, 4])
    s = b.slice(c, [1], [4], [1], [2])
    up = b.resize2x(s)
    sm = b.softmax(b.reshape(up, [1, 2, 4, 16]), axis=1)
    t = b.transpose(sm, [0, 3, 1, 2])
    model = b.make_model([x], [a, t])
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert (len(split.input) == 2) == (opset >= 13)
    xin = np.arange(96, dtype=np.float32).reshape(1, 6, 4, 4) / 96
    ra, rt = _session(model).run(None, {"x": xin})
    np.testing.assert_array_equal(ra, xin[:, :2])
    ref = xin[:, 2:][:, 1:4:2].repeat(2, 2).repeat(2, 3).reshape(1, 2, 4, 16)
    ref = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    np.testing.assert_allclose(rt, ref.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-6)


def test_builder_names_unique_and_bn_params_valid():
    b = GraphBuilder(seed=0)
    x = b.input("x", (1, 4, 8, 8))
    y = b.conv(b.conv(x, 8, bn=True, act="silu"), 8, bn=True, act="silu")
    model = b.make_model([x], [y])
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    var = [v for k, v in inits.items() if k.endswith("running_var")]
    gamma = [v for k, v in inits.items() if k.endswith("bn/weight")]
    assert len(var) == 2 and all((v > 0).all() for v in var)
    assert all(g.std() > 0.05 for g in gamma)  # non-trivial BN


def test_builder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="opset 9"):
        GraphBuilder(opset=9)
    b = GraphBuilder()
    x = b.input("x", (1, 6, 4, 4))
    with pytest.raises(ValueError, match="do not sum"):
        b.split(x, [2, 2])
    with pytest.raises(ValueError, match="groups"):
        b.conv(x, 8, groups=4)
