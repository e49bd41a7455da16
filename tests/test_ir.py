"""IR boundary: loading errors, atomic saves, external data, names, shapes, opset upgrade."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

from fixtures import GraphBuilder
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


def test_external_data_round_trip(tmp_path: Path):
    m = tiny()
    out = ir.save(m, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
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
    assert ir.static_input_shapes(m, {"images": (1, 3, 16, 16)}) == {"images": (1, 3, 16, 16)}


def test_opset_upgrade():
    m = tiny(opset=11)
    up = ir.ensure_opset(m, 13)
    assert ir.opset(up) == 13 and ir.ensure_opset(up, 11) is up


def test_param_count_counts_weights_only():
    m = tiny()
    # 4x3x3x3 weight + 4 bias; SiLU has no parameters
    assert ir.param_count(m) == 4 * 3 * 3 * 3 + 4
