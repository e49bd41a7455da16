"""IR boundary: loading errors, atomic saves, external data, names, shapes, opset upgrade."""
from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fixtures import GraphBuilder, build_yolov5_v6
from onnxslim_yolo import ir
from onnxslim_yolo.pass_base import ModelLoadError, PreconditionError, UsageError


def tiny(opset=13, dynamic=False):
    b = GraphBuilder(opset=opset, seed=3, dynamic_batch=dynamic)
    x = b.input("images", (1, 3, 8, 8))
    return b.make_model([x], [b.conv(x, 4, k=3, act="silu")])


def test_load_errors_are_one_line(tmp_path: Path):
    with pytest.raises(ModelLoadError, match=r"nope.onnx: no such file"):
        ir.load(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match=r"junk.onnx: not a readable ONNX model"):
        ir.load(junk)
    good = tmp_path / "m.onnx"
    ir.save(tiny(), good)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"cut.onnx: not a readable ONNX model") as e:
        ir.load(cut)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="is a directory"):
        ir.load(tmp_path)


def test_save_is_atomic_and_protects_input(tmp_path: Path):
    src = tmp_path / "in.onnx"
    ir.save(tiny(), src)
    before = src.read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite the input model"):
        ir.save(tiny(opset=11), src, protect=[src])
    assert src.read_bytes() == before
    out = ir.save(tiny(), tmp_path / "sub" / "out.onnx", protect=[src])
    assert out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["out.onnx"]
    with pytest.raises(UsageError, match="refusing to overwrite the input model"):   # one path, not a list
        ir.save(tiny(opset=11), src, protect=str(src))
    assert src.read_bytes() == before


def test_an_unwritable_output_is_a_one_line_usage_error(tmp_path: Path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(UsageError, match=r"afile/x.onnx: cannot write the report there \(.*afile is a file, "
                                         r"not a folder\)$") as e:   # it said "File exists"
        ir.ensure_writable(tmp_path / "afile" / "x.onnx", "report")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match=r": is a folder; give a file name for the output"):
        ir.ensure_writable(tmp_path)
    with pytest.raises(UsageError, match=r"afile/x.onnx: cannot write there \("):
        ir.save(tiny(), tmp_path / "afile" / "x.onnx")
    # folders it can make are fine, and are not left behind for a run that fails later
    ir.ensure_writable(tmp_path / "new" / "sub" / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    (tmp_path / "new").mkdir()
    ir.ensure_writable(tmp_path / "new" / "sub" / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "new"]
    assert not any((tmp_path / "new").iterdir())


def test_written_files_get_the_umask_mode_and_failures_leave_nothing(tmp_path: Path):
    old = os.umask(0o022)
    try:
        model = ir.save(tiny(), tmp_path / "m.onnx")
        doc = ir.write_json(tmp_path / "r.json", {"a": 1}, indent=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE(model.stat().st_mode) == 0o644 and stat.S_IMODE(doc.stat().st_mode) == 0o644
    assert doc.read_text() == '{\n  "a": 1\n}'
    with pytest.raises(TypeError):
        ir.write_json(tmp_path / "r.json", {"a": object()})
    assert doc.read_text() == '{\n  "a": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json"]


def test_a_failed_write_is_a_one_line_error_and_the_old_file_stays(tmp_path: Path, monkeypatch):
    """A full disk or a file size limit (OSError from the writer) raised a traceback."""
    out = ir.save(tiny(), tmp_path / "m.onnx")
    before = out.read_bytes()

    def too_large(model, path, *a, **k):
        Path(path).write_bytes(b"part")
        raise OSError(27, "File too large")

    monkeypatch.setattr(onnx, "save_model", too_large)
    with pytest.raises(UsageError, match=r"m.onnx: cannot write it \(File too large\)$") as e:
        ir.save(tiny(opset=11), out)
    assert "\n" not in str(e.value)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_external_data_gets_the_umask_mode_and_a_failed_write_leaves_nothing(tmp_path: Path, monkeypatch):
    old = os.umask(0o022)
    try:
        ir.save(build_yolov5_v6(opset=13), tmp_path / "e.onnx", external_data=True)
    finally:
        os.umask(old)
    assert [stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("e.onnx", "e.onnx.data")] == [0o644, 0o644]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_save = onnx.save_model

    def full_disk(*a, **k):  # the data file is written, then the proto fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full_disk)
    with pytest.raises(UsageError, match=r"e.onnx: cannot write it \(No space left on device\)"):
        ir.save(build_yolov5_v6(opset=13, width=16), tmp_path / "e.onnx", external_data=True)
    monkeypatch.setattr(onnx, "save_model", real_save)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_external_data_round_trip(tmp_path: Path):
    m = build_yolov5_v6(opset=13)
    out = ir.save(m, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    # small tensors (Resize scales, Reshape shapes) stay inline, where shape inference reads them
    inline = onnx.load(str(out), load_external_data=False).graph.initializer
    where = {t.name: t.data_location == onnx.TensorProto.EXTERNAL for t in inline}
    assert any(where.values()) and not all(where.values())
    clear = [t for t in m.graph.initializer if abs(t.ByteSize() - 1024) > 64]
    assert all(where[t.name] == (t.ByteSize() > 1024) for t in clear)
    feed = {"images": np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)}
    from_file = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)
    in_memory = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None,
                                                                                                    feed)
    assert all(np.array_equal(a, b) for a, b in zip(from_file, in_memory))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    back = ir.load(out)
    a = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in back.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_name_allocator_never_collides():
    m = tiny()
    alloc = ir.NameAllocator.for_graph(m.graph)
    existing = m.graph.node[0].output[0]
    n1, n2 = alloc(existing), alloc(existing)
    assert n1 != existing and n2 not in (existing, n1)


def test_static_input_shapes_and_refusal():
    assert ir.static_input_shapes(tiny(dynamic=True)) == {"images": (1, 3, 8, 8)}
    m = tiny()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(PreconditionError, match=r"input 'images' has no static shape.*--input-shape"):
        ir.static_input_shapes(m)
    assert ir.static_input_shapes(m, {"images": (1, 3, 16, 8)}) == {"images": (1, 3, 16, 8)}
    with pytest.raises(UsageError, match=r"--input-shape \[1, 3, 16, 16\]: input 'images' is "
                                         r"\[1, 3, 'height', 8\], and axis 3 is fixed at 8; only its "
                                         r"symbolic dims can be set"):
        ir.static_input_shapes(m, {"images": (1, 3, 16, 16)})
    with pytest.raises(UsageError, match=r"input 'images' has rank 4"):
        ir.static_input_shapes(m, {"images": (3, 16, 8)})


def test_opset_upgrade():
    m = tiny(opset=11)
    up = ir.ensure_opset(m, 13)
    assert ir.opset(up) == 13 and ir.ensure_opset(up, 11) is up


def test_param_count_counts_weights_only():
    m = tiny()
    # 4x3x3x3 weight + 4 bias; SiLU has no parameters
    assert ir.param_count(m) == 4 * 3 * 3 * 3 + 4


def test_param_dtypes_tally_the_parameters_by_element_type():
    from onnx import numpy_helper

    m = tiny()
    assert ir.param_dtypes(m) == {"float32": 4 * 3 * 3 * 3 + 4}
    w = next(t for t in m.graph.initializer if len(t.dims) == 4)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float16), w.name))
    assert ir.param_dtypes(m) == {"float16": 4 * 3 * 3 * 3, "float32": 4}
    assert ir.param_count(m) == 4 * 3 * 3 * 3 + 4
    # bfloat16 by its own name on every onnx (1.16 maps it to numpy's float32)
    w.CopyFrom(onnx.helper.make_tensor(w.name, onnx.TensorProto.BFLOAT16, list(w.dims), [0] * 108))
    assert ir.param_dtypes(m) == {"bfloat16": 4 * 3 * 3 * 3, "float32": 4}


def test_size_by_parts_matches_bytesize():
    m = build_yolov5_v6(opset=13)
    assert 0 <= m.ByteSize() - ir._size_by_parts(m) < 64


class _NoWholeSize:
    """A model that refuses to be sized whole: protobuf's upb backend sizes a message by
    serializing it, every weight included (1.3 s for a 389 MB model, asked dozens of times)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def ByteSize(self) -> int:  # noqa: N802 - protobuf's name
        raise AssertionError("model_size serialized the whole model to size it")


def test_model_size_is_exact_without_serializing_the_weights():
    from onnx import numpy_helper

    m = build_yolov5_v6(opset=13)
    rng = np.random.default_rng(0)
    # raw lengths on both sides of the varint steps (127, 16383 bytes), an empty raw_data, a tensor
    # in float_data, a Constant node's tensor, model metadata
    for i, n in enumerate((0, 31, 32, 4095, 4096, 300000)):
        m.graph.initializer.append(numpy_helper.from_array(rng.random(n, dtype=np.float32), f"extra{i}"))
    m.graph.initializer.append(onnx.helper.make_tensor("listed", onnx.TensorProto.FLOAT, [3], [1, 2, 3]))
    m.graph.node.append(onnx.helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        rng.random(5000, dtype=np.float32))))
    onnx.helper.set_model_props(m, {"names": "{0: 'a'}" * 50})
    assert ir.model_size(_NoWholeSize(m)) == m.ByteSize()
    assert ir.model_size(tiny()) == tiny().ByteSize()


def test_infer_shapes_over_the_limit_infers_without_the_weights(monkeypatch):
    m = build_yolov5_v6(opset=13)
    plain = onnx.shape_inference.infer_shapes(m, data_prop=True)
    monkeypatch.setattr(ir, "PROTO_LIMIT", 1000)
    monkeypatch.setattr(ir, "_LIGHT_TENSOR", 1024)
    calls = []
    real = onnx.shape_inference.infer_shapes

    def spy(model, **kw):
        calls.append(max(t.ByteSize() for t in model.graph.initializer))
        return real(model, **kw)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    light = ir.infer_shapes(m, data_prop=True)
    assert calls and calls[0] <= ir._LIGHT_TENSOR < max(t.ByteSize() for t in m.graph.initializer)
    shape = {vi.name: str(vi.type) for vi in plain.graph.value_info}
    assert {vi.name: str(vi.type) for vi in light.graph.value_info} == shape and len(shape) > 50
    assert [str(o) for o in light.graph.output] == [str(o) for o in plain.graph.output]
    assert [t.SerializeToString() for t in light.graph.initializer] == \
        [t.SerializeToString() for t in m.graph.initializer]
    assert len(light.graph.input) == len(m.graph.input)


def test_inferred_values_over_the_limit_copies_no_weights(monkeypatch):
    m = build_yolov5_v6(opset=13)
    plain = onnx.shape_inference.infer_shapes(m).graph
    monkeypatch.setattr(ir, "PROTO_LIMIT", 1000)
    monkeypatch.setattr(ir, "_LIGHT_TENSOR", 1024)
    copies = []
    real = onnx.ModelProto.CopyFrom
    monkeypatch.setattr(onnx.ModelProto, "CopyFrom", lambda self, o: (copies.append(1), real(self, o))[1])
    got = ir.inferred_values(m)
    assert not copies
    assert [str(v) for v in got] == [str(v) for v in list(plain.value_info) + list(plain.output)]
    assert len(got) > 50


@pytest.mark.parametrize("limit", [None, 1000])
def test_check_model_returns_the_strictly_inferred_model_only_when_asked(monkeypatch, limit):
    m = build_yolov5_v6(opset=13)
    if limit:
        monkeypatch.setattr(ir, "PROTO_LIMIT", limit)
    assert ir.check_model(m) is None
    inferred = ir.check_model(m, infer=True)
    assert len(inferred.graph.value_info) == len(onnx.shape_inference.infer_shapes(m).graph.value_info) > 50
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    bad.graph.node[0].input[0] = "missing_tensor"
    with pytest.raises(onnx.checker.ValidationError, match="missing_tensor"):
        ir.check_model(bad)


def test_same_file_survives_a_symlink_loop(tmp_path: Path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert ir.same_file(tmp_path / "a", tmp_path / "a") and not ir.same_file(tmp_path / "a", tmp_path / "b")
    ir.claim_outputs({"report": tmp_path / "r.json"}, {"model": tmp_path / "a"})   # a traceback before


def test_outputs_are_kept_off_a_models_external_data(tmp_path: Path):
    """A model's weights in another file are part of it: no output may land on that file, and an
    output model's own <name>.data (written over 2 GB) may not land on an input."""
    src = tmp_path / "m.onnx"
    b = GraphBuilder(opset=13, seed=3)
    x = b.input("images", (1, 3, 8, 8))
    ir.save(b.make_model([x], [b.conv(x, 64, k=3, act="silu")]), src, external_data=True)  # 7 KB of weights
    assert ir.external_files(src) == [tmp_path / "m.onnx.data"]
    assert ir.external_files(tmp_path / "m.onnx.data") == [] and ir.external_files(tmp_path / "no.onnx") == []
    with pytest.raises(UsageError, match=r"m\.onnx\.data: refusing to overwrite the input model's external "
                                         r"data with the report; choose another path"):
        ir.claim_outputs({"report": tmp_path / "m.onnx.data"}, {"input model": src})
    with pytest.raises(UsageError, match=r"m\.onnx\.data: refusing to overwrite the labels with the "
                                         r"optimized model's external data"):
        ir.claim_outputs({"optimized model": tmp_path / "m.onnx"}, {"input model": tmp_path / "other.onnx",
                                                                     "labels": tmp_path / "m.onnx.data"})
    ir.claim_outputs({"optimized model": tmp_path / "out.onnx"}, {"input model": src})   # no error


def test_claim_outputs_reads_the_model_only_when_an_output_path_exists(tmp_path: Path, monkeypatch):
    """A new output path cannot be a model's weights file: the model is not parsed for nothing;
    over an existing output (a rerun) it is read, once however often outputs are claimed."""
    src = tmp_path / "m.onnx"
    ir.save(tiny(), src)
    calls = []
    real = ir._external_names.__wrapped__
    monkeypatch.setattr(ir, "_external_names", functools.lru_cache(maxsize=8)(
        lambda *a: calls.append(a) or real(*a)))
    ir.claim_outputs({"optimized model": tmp_path / "new.onnx"}, {"input model": src})
    assert calls == []
    (tmp_path / "old.onnx").write_bytes(b"")
    for _ in range(2):
        ir.claim_outputs({"optimized model": tmp_path / "old.onnx"}, {"input model": src})
    assert len(calls) == 1


def test_json_is_written_strictly_with_non_finite_numbers_as_null(tmp_path):
    """optimize's report held "max_drop": Infinity (no --max-drop), which is no JSON: strict parsers
    (Node's JSON.parse) refused every report."""
    import json

    from onnxslim_yolo.cli import _json_default

    payload = {"max_drop": float("inf"), "sqnr": [1.0, float("nan")], "f32": np.float32("inf"),
               "arr": np.array([1.5, -np.inf]), "n": np.int64(3), "ok": True, "none": None}
    ir.write_json(tmp_path / "r.json", payload, indent=2, default=_json_default)
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data == {"max_drop": None, "sqnr": [1.0, None], "f32": None, "arr": [1.5, None], "n": 3,
                    "ok": True, "none": None}


def _gelu_between_convs() -> onnx.ModelProto:
    """Conv -> com.microsoft QuickGelu (onnxruntime's optimizer writes SiLU so) -> Conv."""
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = onnx.numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype(np.float32), "w2")
    nodes = [onnx.helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
             onnx.helper.make_node("QuickGelu", ["a"], ["s"], domain="com.microsoft", alpha=1.0, name="act"),
             onnx.helper.make_node("Conv", ["s", "w2"], ["y"], name="c2")]
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    g = onnx.helper.make_graph(nodes, "g", [x], [y], [w1, w2])
    opsets = [onnx.helper.make_opsetid("", 13), onnx.helper.make_opsetid("com.microsoft", 1)]
    return onnx.helper.make_model(g, opset_imports=opsets, ir_version=7)


def test_shapes_after_onnxruntimes_own_ops_come_from_its_inference():
    """A model saved by onnxruntime's optimizer (SiLU as com.microsoft QuickGelu): onnx's inference
    stopped at the first such op, so every later Conv had no type or shape (yolov5n: 0.18 G MACs
    counted of 2.23, and --int8 left every layer float as 'not a float32 activation')."""
    from onnxslim_yolo.analysis.flops import model_stats

    m = _gelu_between_convs()
    types = {vi.name: vi for vi in ir.inferred_values(m)}
    assert [d.dim_value for d in types["s"].type.tensor_type.shape.dim] == [1, 8, 16, 16]
    assert [d.dim_value for d in types["y"].type.tensor_type.shape.dim] == [1, 4, 16, 16]
    assert types["y"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model_stats(m).macs == 16 * 16 * (8 * 3 * 9 + 4 * 8)


def test_graph_outputs_keep_the_dim_names_they_declare(tmp_path: Path):
    """An onnxslim-simplified dynamic YOLO11n lists output0 in value_info as (batch, 84, <a size
    expression>) beside its declared (batch, 84, anchors): graphsurgeon took the expression, every
    pass's output declared it, and reference.io failed the exact pipeline (exit 1). A static dim
    inferred for a declared name is still taken."""
    import fixtures
    from onnxslim_yolo import optimize

    m = fixtures.build_yolov8(opset=13)
    for i, name in ((2, "height"), (3, "width")):
        m.graph.input[0].type.tensor_type.shape.dim[i].dim_param = name
    onnx.helper.set_model_props(m, {"imgsz": "[64, 64]"})   # the fixture's Reshapes hold its size
    out = m.graph.output[0]
    out.type.tensor_type.shape.dim[2].dim_param = "anchors"
    listed = onnx.ValueInfoProto()
    listed.CopyFrom(out)
    listed.type.tensor_type.shape.dim[2].dim_param = "((height - 1)//8 + 1)*((width - 1)//8 + 1) + ..."
    m.graph.value_info.append(listed)

    def dims(model):
        return [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]

    assert dims(ir.to_model(ir.to_graph(m), like=m)) == [1, 8, "anchors"]
    plain = onnx.ModelProto()
    plain.CopyFrom(m)
    del plain.graph.value_info[:]
    got = []
    for name, model in (("listed", m), ("plain", plain)):   # the pipeline declares what it would without
        onnx.save(model, tmp_path / f"{name}.onnx")
        res = optimize(str(tmp_path / f"{name}.onnx"), output=str(tmp_path / f"{name}.o.onnx"), check=False,
                       bench=False, progress=False)
        got.append(dims(ir.load(res.output)))
    assert got[0] == got[1] and "..." not in str(got[0])
    listed.type.tensor_type.shape.dim[2].dim_value = 84
    m.graph.value_info[-1].CopyFrom(listed)
    assert dims(ir.to_model(ir.to_graph(m), like=m)) == [1, 8, 84]


def test_shape_inference_reaches_past_a_group_normalization():
    """onnx infers nothing for GroupNormalization-21, so every tensor after it stayed unknown
    (strict inference without check_type fails at the next node); ir gives its output the
    input's type and shape."""
    from tests.analysis.graphs import group_norm_graph

    model = group_norm_graph("op21")
    with pytest.raises(onnx.shape_inference.InferenceError, match="act.sig"):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    plain = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert not any(vi.type.tensor_type.HasField("shape") for vi in plain.graph.value_info
                   if vi.name in ("gn_out", "act_out"))
    inferred = ir.infer_shapes(model, strict_mode=True)
    typed = ir.infer_shapes(model, check_type=True, strict_mode=True)
    assert typed.graph.value_info == inferred.graph.value_info
    dims = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    assert dims["gn_out"] == dims["act_out"] == [1, 16, 8, 8]
    values = ir.inferred_values(model)
    assert [[d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in values if vi.name == "h_out"] == \
        [[1, 5, 8, 8]]
    assert not any(vi.name == "gn_out" for vi in model.graph.value_info)  # the input is left as it was
