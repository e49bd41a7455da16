"""The fixture models: valid ONNX, run in onnxruntime, expected structure, deterministic."""
from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fixtures import FAMILIES, GraphBuilder
from fixtures.common import INPUT

OPSETS = (11, 13)


@functools.lru_cache(maxsize=None)
def _cached(family: str, items: tuple) -> onnx.ModelProto:
    return FAMILIES[family](**dict(items))


def _model(family: str, **kw) -> onnx.ModelProto:
    """A built model shared between tests (never mutate it)."""
    kw = {"opset": 13, "bn": True, **kw}
    return _cached(family, tuple(sorted(kw.items())))


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


#: family -> (output name, output shape at img 64 with 4 classes)
EXPECTED = {
    "yolov5_focus": ("output", (1, 3 * _anchors(64), 9)),
    "yolov5_v6": ("output", (1, 3 * _anchors(64), 9)),
    "yolov8": ("output0", (1, 8, _anchors(64))),
    "yolox": ("output", (1, _anchors(64), 9)),
}


def _counts(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.fixture(scope="module", params=[(f, o) for f in FAMILIES for o in OPSETS],
                ids=lambda p: f"{p[0]}-op{p[1]}")
def built(request):
    family, opset = request.param
    return family, opset, _model(family, opset=opset)


def test_checker_and_strict_shape_inference(built):
    _, opset, model = built
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert model.opset_import[0].version == opset
    assert len(inferred.graph.value_info) > 50  # every intermediate got a shape
    assert model.ByteSize() < 300_000


def test_runs_finite_with_expected_shape(built):
    family, _, model = built
    name, shape = EXPECTED[family]
    assert [o.name for o in model.graph.output] == [name]
    assert [i.name for i in model.graph.input] == [INPUT]
    (out,) = _run(model)
    assert out.shape == shape
    assert np.isfinite(out).all()


def test_focus_has_four_slices_on_input_and_one_concat():
    model = _model("yolov5_focus")
    on_input = [n for n in model.graph.node if INPUT in n.input]
    assert Counter(n.op_type for n in on_input) == Counter({"Slice": 4})
    slices = {s.output[0] for s in on_input}
    (concat,) = [n for n in model.graph.node if n.op_type == "Concat" and set(n.input) == slices]
    counts = _counts(model)
    assert counts["BatchNormalization"] == counts["Conv"] - 3  # all but the 3 Detect convs
    assert counts["MaxPool"] == 3 and counts["Resize"] == 2 and counts["Pow"] == 3


def test_focus_slices_follow_yolov5_order():
    b = GraphBuilder(seed=0)
    x = b.input(INPUT, (1, 3, 8, 8))
    from fixtures.yolov5 import focus_stem
    focus_stem(b, x, 8, bn=False)
    cat = next(n for n in b.nodes if n.op_type == "Concat")
    model = b.make_model([x], [cat.output[0]])
    xin = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    got = _session(model).run(None, {INPUT: xin})[0]
    ref = np.concatenate([xin[..., ::2, ::2], xin[..., 1::2, ::2], xin[..., ::2, 1::2],
                          xin[..., 1::2, 1::2]], 1)
    np.testing.assert_array_equal(got, ref)


def test_v6_stem_is_6x6_stride2_and_constants_are_nodes():
    model = _model("yolov5_v6")
    (first,) = [n for n in model.graph.node if INPUT in n.input]
    assert first.op_type == "Conv"
    assert _attrs(first)["kernel_shape"] == [6, 6] and _attrs(first)["strides"] == [2, 2]
    counts = _counts(model)
    assert counts["Constant"] > 10 and counts["Split"] == 3 and counts["Slice"] == 0


def test_v5_decode_ranges():
    (out,) = _run(_model("yolov5_v6"))
    assert 0.0 <= out[..., 4:].min() and out[..., 4:].max() <= 1.0
    assert out[..., :2].min() >= -16 and out[..., :2].max() <= 64 + 16  # (2s - 0.5 + grid) * stride
    assert out[..., 2:4].min() >= 0.0 and out[..., 2:4].max() <= 4 * 373  # (2s)^2 * anchor


@pytest.mark.parametrize("opset", OPSETS)
def test_v8_has_split_softmax_dfl_and_no_objectness(opset):
    model = _model("yolov8", opset=opset)
    counts = _counts(model)
    assert counts["Split"] >= 8 and counts["Softmax"] == 1  # C2f chunks + box/cls + lt/rb
    dfl = next(n for n in model.graph.node if n.op_type == "Conv" and "dfl" in n.name)
    w = next(t for t in model.graph.initializer if t.name == dfl.input[1])
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(w).ravel(), np.arange(16))
    (out,) = _run(model)
    assert 0.0 <= out[:, 4:].min() and out[:, 4:].max() <= 1.0
    assert out[:, 2:4].min() >= 0.0  # wh = lt + rb of non-negative DFL expectations


@pytest.mark.parametrize("opset", OPSETS)
def test_yolox_depthwise_and_raw_vs_decoded(opset):
    raw = _model("yolox", opset=opset)
    dec = _model("yolox", opset=opset, decode_outputs=True)
    ch = {}
    for t in raw.graph.initializer:
        ch[t.name] = t.dims
    dw = [n for n in raw.graph.node if n.op_type == "Conv" and _attrs(n).get("group", 1) > 1
          and _attrs(n)["group"] == ch[n.input[1]][0] and ch[n.input[1]][1] == 1]
    assert len(dw) >= 20
    (r,) = _run(raw)
    (d,) = _run(dec)
    assert 0.0 <= r[..., 4:].min() and r[..., 4:].max() <= 1.0
    grid, stride = [], []
    for s in (8, 16, 32):
        n = 64 // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grid.append(np.stack((xv, yv), 2).reshape(-1, 2))
        stride.append(np.full((n * n, 1), s))
    grid, stride = np.concatenate(grid)[None], np.concatenate(stride)[None]
    ref = np.concatenate([(r[..., :2] + grid) * stride, np.exp(r[..., 2:4]) * stride, r[..., 4:]], 2)
    np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bn_false_is_the_same_network_folded(family):
    with_bn, folded = _model(family, bn=True), _model(family, bn=False)
    assert _counts(with_bn)["BatchNormalization"] > 20
    assert _counts(folded)["BatchNormalization"] == 0
    (a,), (b,) = _run(with_bn), _run(folded)
    scale = np.abs(a).max()
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dynamic_batch(family):
    model = _model(family, dynamic_batch=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    (two,) = _run(model, batch=2)
    (one,) = _run(_model(family))
    assert two.shape[0] == 2 and np.isfinite(two).all()
    np.testing.assert_allclose(two[:1], one, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_deterministic_bytes(family):
    a = _model(family, seed=3).SerializeToString()
    assert a == FAMILIES[family](seed=3).SerializeToString()  # a fresh build
    assert a != _model(family, seed=4).SerializeToString()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_other_sizes_and_opsets(family):
    model = _model(family, opset=17, img=96, num_classes=2, width=4)
    (out,) = _run(model, img=96)
    a = _anchors(96)
    want = {"yolov5_focus": (1, 3 * a, 7), "yolov5_v6": (1, 3 * a, 7), "yolov8": (1, 6, a),
            "yolox": (1, a, 7)}[family]
    assert out.shape == want and np.isfinite(out).all()
    assert _model(family, opset=21).opset_import[0].version == 21


def test_rejects_bad_family_arguments():
    with pytest.raises(ValueError, match="multiple of 32"):
        FAMILIES["yolov8"](img=100)
    with pytest.raises(ValueError, match="width"):
        FAMILIES["yolox"](width=3)
    with pytest.raises(ValueError, match="opset 10"):
        FAMILIES["yolov5_v6"](opset=10)


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


def test_eager_probe_values_match_onnxruntime():
    """The builder's numpy evaluation (used for data-dependent init) agrees with onnxruntime
    on every op the families use, including the whole YOLOv5 decode."""
    from fixtures.common import start
    from fixtures.yolov5 import backbone_neck, detect, focus_stem
    b, x = start(opset=13, img=64, seed=0, dynamic_batch=True)
    out = detect(b, backbone_neck(b, focus_stem(b, x, 8, bn=True), 8, True, focus=True), 4,
                 split_decode=True)
    model = b.make_model([x], [out])
    got = _session(model).run(None, {INPUT: b.values[x]})[0]
    np.testing.assert_allclose(b.values[out], got, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------- demo
def test_demo_files_regenerate_identically(tmp_path):
    from PIL import Image

    from fixtures import demo_paths
    from fixtures.make_demo import main
    model_path, images, labels = demo_paths()
    assert main([str(tmp_path)]) == 0
    import onnx
    from onnx import numpy_helper
    new, old = onnx.load(str(tmp_path / model_path.name)), onnx.load(str(model_path))
    # same graph; weights equal up to float rounding (BLAS or numpy versions may differ slightly)
    assert [(n.op_type, list(n.input), list(n.output)) for n in new.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in old.graph.node]
    for a, b in zip(new.graph.initializer, old.graph.initializer):
        assert a.name == b.name
        np.testing.assert_allclose(numpy_helper.to_array(a), numpy_helper.to_array(b), rtol=1e-4, atol=1e-6)
    pngs = sorted(p.name for p in images.glob("*.png"))
    assert len(pngs) == 8 and pngs == sorted(p.name for p in (tmp_path / "images").glob("*.png"))
    for name in pngs:
        a = np.asarray(Image.open(images / name))
        b = np.asarray(Image.open(tmp_path / "images" / name))
        assert a.shape in ((96, 128, 3), (128, 96, 3))
        np.testing.assert_array_equal(a, b)
        txt = (labels / name.replace(".png", ".txt")).read_text()
        assert txt == (tmp_path / "labels" / name.replace(".png", ".txt")).read_text()
        rows = [list(map(float, ln.split())) for ln in txt.splitlines()]
        assert rows and all(int(r[0]) in range(4) and all(0 < v <= 1 for v in r[1:]) for r in rows)


def test_demo_model_is_a_focus_model_that_runs():
    from fixtures import demo_paths
    model_path, _, _ = demo_paths()
    assert 200_000 <= model_path.stat().st_size <= 1_500_000
    model = onnx.load(str(model_path))
    counts = _counts(model)
    assert counts["BatchNormalization"] > 40 and counts["Slice"] >= 4
    (out,) = _run(model, img=128)
    assert out.shape == (1, 3 * _anchors(128), 9) and np.isfinite(out).all()
