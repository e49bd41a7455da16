"""Pass manager: ordering, contract enforcement, opset upgrade, dumps, plugins."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import GraphBuilder
from onnxslim_yolo import registry
from onnxslim_yolo.pass_base import (Numerics, Pass, PassContext, PassReport, PassResult, Tolerances,
                                     UsageError, VerificationError)
from onnxslim_yolo.pass_manager import PassManager, order_passes


def small_model(opset: int = 13) -> onnx.ModelProto:
    b = GraphBuilder(opset=opset, seed=1)
    x = b.input("images", (1, 3, 16, 16))
    y = b.conv(x, 8, k=3, act="silu")
    y = b.conv(y, 4, k=1)
    return b.make_model([x], [y])


class ScaleWeights(Pass):
    """Multiplies the first Conv weight by ``factor``; contract set per test."""

    name = "scale-weights"
    numerics = Numerics.EXACT

    def __init__(self, factor: float = 1.0, numerics: Numerics = Numerics.EXACT) -> None:
        self.factor = factor
        self.numerics = numerics  # type: ignore[misc]

    def run(self, model, ctx):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        conv = next(n for n in m.graph.node if n.op_type == "Conv")
        init = next(i for i in m.graph.initializer if i.name == conv.input[1])
        w = numpy_helper.to_array(init) * np.float32(self.factor)
        init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
        rep = PassReport()
        rep.count("scaled")
        return PassResult(m, self.factor != 1.0, rep)


def named(name: str, after=(), base=Pass):
    return type(name.replace("-", "_"), (base,), {"name": name, "after": tuple(after),
                                                  "run": lambda self, m, c: PassResult(m, False)})()


def test_order_honours_after_and_keeps_given_order():
    a, b, c = named("a"), named("b", after=["c"]), named("c")
    assert [p.name for p in order_passes([a, b, c])] == ["a", "c", "b"]
    # "after" naming a pass that is not scheduled is ignored; one that does not exist, with a warning
    assert [p.name for p in order_passes([named("x", after=["fold-batchnorm"]), a])] == ["x", "a"]


def test_after_naming_no_known_pass_warns(caplog):
    with caplog.at_level("WARNING"):
        order_passes([named("x", after=["fold-batchnrom"])])
    assert "pass 'x' runs after 'fold-batchnrom', which is no known pass: ignored" in caplog.text


def test_order_cycle_is_a_usage_error():
    with pytest.raises(UsageError, match="cycle"):
        order_passes([named("a", after=["b"]), named("b", after=["a"])])


def test_duplicate_pass_refused():
    with pytest.raises(UsageError, match="scheduled twice"):
        order_passes([named("a"), named("a")])


def test_exact_pass_within_contract_is_verified():
    res = PassManager([ScaleWeights(1.0 + 1e-7)], PassContext()).run(small_model())
    rec = res.records[0]
    assert rec.modified and rec.verification
    assert rec.verification[0]["cosine"] > 0.999999


def test_exact_pass_that_changes_numerics_fails_loudly():
    with pytest.raises(VerificationError, match=r"pass 'scale-weights'.*exact numerics contract.*max abs"):
        PassManager([ScaleWeights(1.05)], PassContext()).run(small_model())


def _float16_conv_div() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array((r.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float16), "w"),
             numpy_helper.from_array(r.standard_normal(8).astype(np.float16), "b"),
             numpy_helper.from_array(r.uniform(0.3, 3.0, (1, 8, 1, 1)).astype(np.float16), "k")]
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Div", ["c", "k"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8, 16, 16])], inits)
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_an_exact_fold_of_a_float16_model_passes_within_its_last_place():
    """A Div folded into a float16 Conv's weights rounds them to float16: outputs one unit in the
    last place off (0.004 at 5), past float32's exact bound, so every exact pass that folded
    anything into a float16 model failed (fold-affine, fold-batchnorm, merge-branches)."""
    from onnxslim_yolo.passes.fold_affine import FoldAffine

    res = PassManager([FoldAffine()], PassContext()).run(_float16_conv_div())
    assert [n.op_type for n in res.model.graph.node] == ["Conv"] and res.records[0].modified
    (d,) = res.records[0].verification
    assert 0 < d["max_abs"] and d["eps"] == 2.0 ** -10
    # the float16 allowance is a few last places, not float16's tolerance contract: 1% still fails
    scaled = _float16_conv_div()
    k = next(i for i in scaled.graph.initializer if i.name == "k")
    k.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(k) * np.float16(1.01)).astype(np.float16), "k"))

    class Nudge(Pass):
        name = "nudge"
        numerics = Numerics.EXACT

        def run(self, model, ctx):
            return PassResult(scaled, True, PassReport())

    with pytest.raises(VerificationError, match=r"pass 'nudge'.*exact numerics contract"):
        PassManager([Nudge()], PassContext()).run(_float16_conv_div())


def test_a_float_model_gets_no_quantizer_note():
    with pytest.raises(VerificationError) as err:
        PassManager([ScaleWeights(1.05)], PassContext()).run(small_model())
    assert "already holds" not in str(err.value)


class NudgeConstant(Pass):
    """Moves the constant ``k`` by one float32 ulp: exact in float arithmetic."""

    name = "nudge"
    numerics = Numerics.EXACT

    def run(self, model, ctx):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        init = next(i for i in m.graph.initializer if i.name == "k")
        k = np.nextafter(numpy_helper.to_array(init), np.float32(1)).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(k, "k"))
        return PassResult(m, True, PassReport())


def test_a_one_ulp_change_before_a_quantizer_fails_with_the_reason():
    """Q(0.5) rounds to 0 (half to even), Q(0.5 + 1 ulp) to 1: a whole step at the output."""
    h = onnx.helper
    inits = [numpy_helper.from_array(np.full((1, 4), 0.5, np.float32), "k"),
             numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "z")]
    nodes = [h.make_node("QuantizeLinear", ["k", "s", "z"], ["q"]),
             h.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             h.make_node("Add", ["x", "d"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], inits)
    model = h.make_model_gen_version(graph, opset_imports=[h.make_opsetid("", 13)])
    with pytest.raises(VerificationError, match=r"pass 'nudge'.*exact numerics contract: output 'y': max abs "
                                                r"diff 1 .*already holds QuantizeLinear nodes, where a float "
                                                r"rounding difference moves a value by a whole step"):
        PassManager([NudgeConstant()], PassContext()).run(model)


def test_error_names_the_passes_that_ran_before():
    first = named("first")
    with pytest.raises(VerificationError, match=r"pass 'scale-weights' \(after first\)"):
        PassManager([first, ScaleWeights(1.05)], PassContext()).run(small_model())


def test_lossy_pass_floor_enforced():
    ok = PassManager([ScaleWeights(1.05, Numerics.LOSSY)], PassContext()).run(small_model())
    assert ok.records[0].verification[0]["cosine"] > 0.9
    bad = ScaleWeights(-1.0, Numerics.LOSSY)
    with pytest.raises(VerificationError, match="below the lossy floor"):
        PassManager([bad], PassContext(tolerances=Tolerances(lossy_min_cosine=0.99))).run(small_model())


def candidates_then_nms(batch_rows: bool = False) -> onnx.ModelProto:
    """256 candidate rows (x y w h obj 2 classes, all in 0..1) from a Conv, then an NMS tail."""
    from fixtures.postprocess import append_nms
    b = GraphBuilder(opset=13, seed=3)
    x = b.input("images", (1, 3, 16, 16))
    y = b.sigmoid(b.conv(x, 7, k=3))
    y = b.node("Reshape", [y, b.i64([1, 7, 256])], shapes=[(1, 7, 256)])
    y = b.node("Transpose", [y], shapes=[(1, 256, 7)], perm=[0, 2, 1])
    return append_nms(b.make_model([x], [y]), max_det=50, iou=0.3, batch_rows=batch_rows)


@pytest.mark.parametrize("batch_rows", [False, True])
def test_lossy_pass_is_judged_by_the_candidates_an_nms_keeps_from(batch_rows: bool):
    """A small weight change reorders what the NMS keeps (its output's cosine collapses), yet its
    candidates barely move: the lossy contract holds; a sign flip of the weights still fails.
    (K, 7) rows without padding: the NMS may keep another number of rows."""
    ok = PassManager([ScaleWeights(1.05, Numerics.LOSSY)], PassContext()).run(candidates_then_nms(batch_rows))
    by_role = {}
    for d in ok.records[0].verification:
        by_role.setdefault(d["role"], []).append(d["cosine"])
    assert set(by_role) == {"selected", "candidates"}
    assert min(by_role["selected"]) < 0.9 < min(by_role["candidates"])
    floor = r"output 'nms_\d+ \+ \d+ more': cosine .* below the lossy floor"
    with pytest.raises(VerificationError, match=floor):
        PassManager([ScaleWeights(-1.0, Numerics.LOSSY)], PassContext()).run(candidates_then_nms(batch_rows))


def test_no_verify_skips_the_check():
    res = PassManager([ScaleWeights(1.05)], PassContext(verify=False)).run(small_model())
    assert res.records[0].modified and res.records[0].verification == []


def test_unmodified_pass_returns_same_model():
    m = small_model()
    res = PassManager([ScaleWeights(1.0)], PassContext()).run(m)
    assert res.model is m and not res.records[0].modified


def test_pass_returning_nothing_is_refused():
    bad = type("Bad", (Pass,), {"name": "bad", "run": lambda self, m, c: None})()
    with pytest.raises(VerificationError, match="pass 'bad'.*no PassResult"):
        PassManager([bad], PassContext()).run(small_model())


def test_pass_producing_invalid_model_is_caught():
    def run(self, m, c):
        out = onnx.ModelProto()
        out.CopyFrom(m)
        out.graph.node[0].op_type = "NoSuchOp"
        return PassResult(out, True)
    bad = type("Breaker", (Pass,), {"name": "breaker", "run": run})()
    with pytest.raises(VerificationError, match="pass 'breaker'.*invalid"):
        PassManager([bad], PassContext()).run(small_model())


def _pass(name: str, run, **attrs) -> Pass:
    return type(name.title().replace("-", ""), (Pass,), {"name": name, "run": run, **attrs})()


def test_a_pass_that_edits_the_model_it_was_given_fails_loudly():
    """It was verified against itself (before and after the same object), so a change of 1.0 to a
    weight passed as exact and reached the written file."""
    def run(self, m, c):
        w = next(i for i in m.graph.initializer if i.name == m.graph.node[0].input[1])
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + np.float32(1.0), w.name))
        return PassResult(m, True)
    for modified in (True, False):
        bad = _pass("in-place", lambda self, m, c, r=run, f=modified: PassResult(r(self, m, c).model, f))
        with pytest.raises(VerificationError, match=r"^pass 'in-place': changed the model it was given "
                                                    r"\(a pass returns a new model"):
            PassManager([bad], PassContext()).run(small_model())


def test_the_fingerprint_reads_values_not_their_encoding():
    """Importing a model into graphsurgeon sets a Constant's empty tensor name explicitly: the
    bytes change, the model does not. The first fingerprint hashed the bytes, and insert-qdq on
    PP-PicoDet and a YOLOv8n-seg failed as if it had edited its input."""
    from onnxslim_yolo import ir
    from onnxslim_yolo.pass_manager import fingerprint

    b = GraphBuilder(opset=13, seed=1, const_nodes=True)
    x = b.input("images", (1, 3, 16, 16))
    model = b.make_model([x], [b.mul(b.conv(x, 4, k=1), b.const(np.array([2.0], np.float32)))])
    const = next(n for n in model.graph.node if n.op_type == "Constant")
    const.attribute[0].t.ClearField("name")
    before, encoded = fingerprint(model), model.SerializeToString()
    ir.to_model(ir.to_graph(model), model)
    const.attribute[0].t.name = ""   # what graphsurgeon did: set, and so encoded, but empty
    assert model.SerializeToString() != encoded and fingerprint(model) == before
    value = numpy_helper.to_array(const.attribute[0].t)
    const.attribute[0].t.CopyFrom(numpy_helper.from_array(value + np.ones_like(value)))
    assert fingerprint(model) != before


def test_a_pass_that_raises_is_named_in_one_line():
    def boom(self, m, c):
        raise KeyError("oops")
    with pytest.raises(VerificationError, match=r"^pass 'boom' \(after noop\): raised KeyError: 'oops'$"):
        PassManager([named("noop"), _pass("boom", boom)], PassContext()).run(small_model())
    cases = ((PassResult(None, True), "model is a NoneType and report a PassReport"),
             (PassResult(small_model(), False, {"a": 1}), "model is a ModelProto and report a dict"))
    for result, what in cases:
        bad = _pass("odd", lambda self, m, c, r=result: r)
        with pytest.raises(VerificationError, match=f"pass 'odd': returned a PassResult whose {what}"):
            PassManager([bad], PassContext()).run(small_model())


def test_what_a_pass_raises_outside_run_or_a_sys_exit_is_named_in_one_line():
    """requires() or ensures() raising, a result graph with a cycle (graphsurgeon raised in the
    export) were tracebacks, exit 1; a pass calling sys.exit(0) ended the run with exit 0 and no
    output."""
    import copy
    import sys

    from onnx import helper

    def copied(self, m, c):
        return PassResult(copy.deepcopy(m), True)

    def cycle(self, m, c):
        out = copy.deepcopy(m)
        first = out.graph.node[0].output[0]
        out.graph.node.append(helper.make_node("Add", [first, "loop2"], ["loop3"], name="p_add"))
        out.graph.node.append(helper.make_node("Identity", ["loop3"], ["loop2"], name="p_id"))
        out.graph.output.append(helper.make_tensor_value_info("loop3", onnx.TensorProto.FLOAT, None))
        return PassResult(out, True)

    def needs(self, m, c):
        raise KeyError("needs foo")

    def post(self, m, c):
        assert False, "postcondition failed"

    cases = ((_pass("req", copied, requires=needs),
              r"^pass 'req': raised KeyError in requires: 'needs foo'$"),
             (_pass("ens", copied, ensures=post),
              r"^pass 'ens': raised AssertionError in ensures: postcondition"),
             (_pass("cyc", cycle), r"^pass 'cyc': raised \w+ in its result's export: .*[Cc]ycle"),
             (_pass("quit", lambda self, m, c: sys.exit(0)), r"^pass 'quit': raised SystemExit: 0$"))
    for bad, message in cases:
        with pytest.raises(VerificationError, match=message):
            PassManager([bad], PassContext()).run(small_model())


def test_an_edit_of_a_branch_a_function_or_the_metadata_of_the_given_model_is_caught():
    """The fingerprint read the top-level graph only: a pass that changed an If branch's constant,
    a model-local function or the metadata of the model it was given passed as exact."""
    from onnxslim_yolo.pass_manager import fingerprint

    m = small_model()
    m.metadata_props.add(key="imgsz", value="[16, 16]")
    before = fingerprint(m)
    m.metadata_props[0].value = "[32, 32]"
    assert fingerprint(m) != before
    from onnx import TensorProto, helper

    branch = helper.make_graph([helper.make_node("Identity", ["k"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])],
                               [numpy_helper.from_array(np.ones(1, np.float32), "k")])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "g",
                          [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, functions=[helper.make_function("f", "F", ["a"], ["b"], [
        helper.make_node("Relu", ["a"], ["b"])], [helper.make_opsetid("", 13)])])
    before = fingerprint(m)
    zeros = numpy_helper.from_array(np.zeros(1, np.float32), "k")
    m.graph.node[0].attribute[0].g.initializer[0].CopyFrom(zeros)
    assert fingerprint(m) != before
    before = fingerprint(m)
    m.functions[0].node[0].op_type = "Sigmoid"
    assert fingerprint(m) != before


def test_an_exact_pass_that_changes_the_interface_fails():
    """An output made float64, an input made float64 (a caller's float32 feed then fails) and a
    dynamic batch fixed at 1 passed as exact: values are compared as float64, feeds take the
    types the new model asks for, and the batch-2 feed was dropped when the batch was fixed."""
    import copy

    def retyped(kind):
        def run(self, m, c):
            out = copy.deepcopy(m)
            vi = (out.graph.output if kind == "output" else out.graph.input)[0]
            node = next(n for n in out.graph.node if vi.name in (n.output if kind == "output" else n.input))
            cast = onnx.helper.make_node("Cast", [vi.name], [vi.name + "_64"], to=onnx.TensorProto.DOUBLE)
            if kind == "output":
                node.output[list(node.output).index(vi.name)] = vi.name + "_pre"
                out.graph.node.append(onnx.helper.make_node("Cast", [vi.name + "_pre"], [vi.name],
                                                            to=onnx.TensorProto.DOUBLE))
            else:
                cast = onnx.helper.make_node("Cast", [vi.name], [vi.name + "_32"], to=onnx.TensorProto.FLOAT)
                node.input[list(node.input).index(vi.name)] = vi.name + "_32"
                out.graph.node.insert(0, cast)
            vi.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
            return PassResult(out, True)
        return run

    def fixed(self, m, c):
        out = copy.deepcopy(m)
        out.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
        return PassResult(out, True)

    for kind in ("output", "input"):
        with pytest.raises(VerificationError, match=rf"pass 'retype': changed the type of {kind} '[^']+' "
                                                    r"from FLOAT to DOUBLE"):
            PassManager([_pass("retype", retyped(kind))], PassContext()).run(small_model())
    dynamic = small_model()
    dynamic.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with pytest.raises(VerificationError, match=r"pass 'fix': fixed axis 0 of input 'images' \(N\) at 1"):
        PassManager([_pass("fix", fixed)], PassContext()).run(dynamic)
    # given input shapes are fixed on purpose, and a lossy pass may fix the size it calibrated at
    PassManager([_pass("fix", fixed)], PassContext(input_shapes={"images": (1, 3, 16, 16)})).run(dynamic)


def test_a_model_whose_external_data_was_not_loaded_is_refused(tmp_path: Path):
    """Loaded with load_external_data=False, it ran from its own folder only, elsewhere a pass was
    blamed ('raised ValidationError', exit 4)."""
    from onnxslim_yolo import ir

    b = GraphBuilder(opset=13, seed=0)
    x = b.input("images", (1, 3, 16, 16))
    ir.save(b.make_model([x], [b.conv(x, 64, k=3)]), tmp_path / "m.onnx", external_data=True)  # 6.9 kB
    lazy = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(UsageError, match=r"^initializer '.+' holds its data in an external file not loaded"):
        PassManager([named("noop")]).run(lazy)
    assert PassManager([named("noop")]).run(ir.load(tmp_path / "m.onnx")).records[0].modified is False


def test_a_changed_model_returned_as_unmodified_is_warned_about(caplog):
    """Its change was dropped without a word (the report said 'changed: no')."""
    changed = small_model()
    changed.graph.node[0].name = "renamed"
    with caplog.at_level("WARNING"):
        res = PassManager([_pass("quiet", lambda self, m, c: PassResult(changed, False))]).run(small_model())
    assert res.model.graph.node[0].name != "renamed"
    assert "pass 'quiet' returned a changed model but modified=False: its change is dropped" in caplog.text


def test_passes_are_checked_when_scheduled():
    with pytest.raises(UsageError, match=r"got the pass class ScaleWeights, not an instance: "
                                         r"pass ScaleWeights\(\)"):
        PassManager([ScaleWeights], PassContext())
    with pytest.raises(UsageError, match=r"pass 'loose': numerics must be one of Numerics.EXACT, "
                                         r".*got 'exact'"):
        PassManager([_pass("loose", lambda self, m, c: PassResult(m, False), numerics="exact")])
    with pytest.raises(UsageError, match=r"got str where a Pass instance belongs"):
        PassManager(["canonicalize"])
    with pytest.raises(UsageError, match=r"PassManager takes a list of passes, got the pass <noop noop"):
        PassManager(named("noop"))   # a TypeError before
    with pytest.raises(UsageError, match=r"PassManager's context is a PassContext, got dict"):
        PassManager([named("noop")], {"seed": 1})   # canonicalize was blamed (AttributeError), exit 4
    with pytest.raises(UsageError, match=r"^options for 'fold-batchnrom', which is no known pass"):
        PassManager([named("noop")], PassContext(options={"fold-batchnrom": {}}))
    with pytest.raises(UsageError, match=r"^save takes an onnx.ModelProto, got str$"):
        from onnxslim_yolo import ir
        ir.save("model", "x.onnx")
    with pytest.raises(UsageError, match=r"PassManager.run takes an onnx.ModelProto, got str \(load a path"):
        PassManager([named("noop")]).run("model.onnx")
    # one name given as a string is that name, not its letters (it was ignored: the pass ran first)
    a, b = named("a"), _pass("b", lambda self, m, c: PassResult(m, False), after="a")
    assert [p.name for p in order_passes([b, a])] == ["a", "b"]


def test_an_invalid_model_message_names_the_node():
    def run(self, m, c):
        out = onnx.ModelProto()
        out.CopyFrom(m)
        out.graph.node[1].input[0] = "does_not_exist"
        out.graph.node[1].name = "the_reader"
        return PassResult(out, True)
    with pytest.raises(VerificationError, match=r"pass 'dangling': model is invalid: .*the_reader") as e:
        PassManager([_pass("dangling", run)], PassContext()).run(small_model())
    assert "\n" not in str(e.value)


class ShiftColumns(Pass):
    """Adds ``shift`` to the output's columns ``cols`` (its last axis)."""

    name = "shift-columns"

    def __init__(self, shift: float, cols: slice) -> None:
        self.shift, self.cols = shift, cols

    def run(self, model, ctx):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        out = m.graph.output[0]
        producer = next(n for n in m.graph.node if out.name in n.output)
        producer.output[list(producer.output).index(out.name)] = "before_shift"
        width = out.type.tensor_type.shape.dim[-1].dim_value
        c = np.zeros(width, np.float32)
        c[self.cols] = self.shift
        m.graph.initializer.append(numpy_helper.from_array(c, "shift"))
        m.graph.node.append(onnx.helper.make_node("Add", ["before_shift", "shift"], [out.name]))
        return PassResult(m, True)


def test_the_exact_bound_scales_with_each_column_not_the_whole_output():
    """Box columns hold pixels, score columns 0-1: scaled by the output's largest value (here a
    box coordinate), the bound let an exact pass move every score by 0.05 (on yolov5n: by 0.069).
    The diff reads 0.0501 on an AVX2 machine (the shift plus the runtime's rounding)."""
    from fixtures import build_yolov5_v6

    model = build_yolov5_v6(opset=13)
    with pytest.raises(VerificationError, match=r"pass 'shift-columns': broke its exact numerics "
                                                r"contract: output 'output' at index [4-8] of its "
                                                r"attribute axis: max abs diff 0\.05\d* exceeds exact bound"):
        PassManager([ShiftColumns(0.05, slice(4, None))], PassContext()).run(model)
    # a float rounding's worth on every column, boxes included, still passes
    res = PassManager([ShiftColumns(2e-6, slice(None))], PassContext()).run(model)
    (d,) = res.records[0].verification
    assert d["ref_max"] * Tolerances().exact_rtol > 0.05 > d["max_abs"]   # the old bound: 0.05 within it


def test_a_feed_without_per_column_figures_keeps_another_feeds_failing_column():
    """Merging two feeds dropped both feeds' per-column figures when one had none (masked
    infinities), and a score column moved by 0.05 passed again."""
    from onnxslim_yolo.verify import OutputDiff, _worse, check_contract

    bad = OutputDiff("out", 0.05, 600.0, 1.0, 60.0, 1e-4, "output", (1e-3, 0.05), (600.0, 1.0), (1e-4, 1e-6))
    plain = OutputDiff("out", 1e-3, 600.0, 1.0, 60.0, 1e-4)
    for merged in (_worse(bad, plain, 1e-4, "output"), _worse(plain, bad, 1e-4, "output")):
        ok, why = check_contract([merged], "exact", Tolerances())
        assert not ok and "at index 1 of its attribute axis" in why, why
    assert check_contract([_worse(plain, plain, 1e-4, "output")], "exact", Tolerances())[0]


def test_min_opset_upgrades_model():
    p = type("Needs13", (Pass,), {"name": "needs-13", "min_opset": 13,
                                  "run": lambda self, m, c: PassResult(m, False)})()
    res = PassManager([p], PassContext()).run(small_model(opset=11))
    assert res.records[0].opset_upgraded_to == 13
    assert [o.version for o in res.model.opset_import if o.domain in ("", "ai.onnx")] == [13]


def test_dump_dir_receives_each_modified_model(tmp_path: Path):
    PassManager([named("noop"), ScaleWeights(1.0 + 1e-7)], PassContext(dump_dir=tmp_path)).run(small_model())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_scale-weights.onnx"]


def test_dump_dir_keeps_no_dump_of_an_earlier_run(tmp_path: Path):
    """A second run into the same folder left the first run's dumps of passes that did not change
    its own model beside its own; files that are no dump of a known pass stay."""
    for name in ("02_fold-batchnorm.onnx", "02_fold-batchnorm.onnx.data", "07_scale-weights.onnx",
                 "01_mine.onnx", "notes.txt"):
        (tmp_path / name).write_bytes(b"earlier")
    ctx = PassContext(dump_dir=tmp_path)
    PassManager([named("noop"), ScaleWeights(1.0 + 1e-7)], ctx).run(small_model())
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["01_mine.onnx", "01_scale-weights.onnx", "notes.txt"]
    PassManager([ScaleWeights(1.0)], ctx).run(small_model())   # changes nothing: dumps nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01_mine.onnx", "notes.txt"]


def test_plugins_from_entry_points(monkeypatch):
    monkeypatch.setattr(registry, "plugin_passes", lambda: [ScaleWeights])
    assert registry.get("scale-weights") is ScaleWeights
    # an installed plugin joins the default pipeline only when its class says so
    from onnxslim_yolo.pass_manager import default_pass_names
    assert "scale-weights" not in default_pass_names()
    assert "scale-weights" in default_pass_names(["scale-weights"])
    eager = type("Eager", (ScaleWeights,), {"name": "eager", "default_enabled": True})
    monkeypatch.setattr(registry, "plugin_passes", lambda: [ScaleWeights, eager])
    assert "eager" in default_pass_names() and "scale-weights" not in default_pass_names()
    assert "canonicalize" in default_pass_names() and "insert-qdq" not in default_pass_names()
    with pytest.raises(UsageError, match="unknown pass 'nope'; known passes: .*canonicalize"):
        registry.get("nope")


def test_plugins_that_cannot_serve_or_clash_are_left_out_with_a_warning(monkeypatch, caplog):
    """A plugin named 5, with numerics "exact", or whose __init__ takes an argument broke
    `onnxslim-yolo passes` (and every unknown-pass message) for all passes; of two plugins of one
    name, the one found first won, the other 'shadowed a built-in'."""
    import importlib.metadata
    from types import SimpleNamespace

    def ep(name, cls, dist):
        return SimpleNamespace(name=name, load=lambda: cls, dist=SimpleNamespace(name=dist))

    def needs_arg(self, x):
        pass

    twin = type("Twin", (ScaleWeights,), {"name": "twin"})
    other_twin = type("OtherTwin", (ScaleWeights,), {"name": "twin"})
    found = [ep("good", ScaleWeights, "pkg-a"), ep("num", type("N", (ScaleWeights,), {"name": 5}), "pkg-b"),
             ep("str", type("S", (ScaleWeights,), {"name": "s", "numerics": "exact"}), "pkg-c"),
             ep("arg", type("A", (Pass,), {"name": "a", "__init__": needs_arg}), "pkg-d"),
             ep("t1", twin, "pkg-e"), ep("t2", other_twin, "pkg-f"), ep("cls", object, "pkg-g")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: found)
    registry.plugin_passes.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert registry.plugin_passes() == [ScaleWeights]
            registry.plugin_passes()   # read once: warned once
    finally:
        registry.plugin_passes.cache_clear()
    for text in ("num (package pkg-b) ignored: its name 5 is not a non-empty string",
                 "str (package pkg-c) ignored: its numerics 'exact' is not a Numerics member",
                 "arg (package pkg-d) ignored: it cannot be made without arguments (TypeError",
                 "pass plugins of packages pkg-e, pkg-f all name themselves 'twin': all ignored",
                 "cls (package pkg-g) ignored: not a Pass subclass"):
        assert caplog.text.count(text) == 1, text


def _reshape_model(target) -> onnx.ModelProto:
    """x (N, 3, 4, 4) -> Conv -> Reshape ``target`` -> y: [0, -1] copies the batch; [1, 32] runs
    only at batch 1 although the input declares N."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(2, 3, 1, 1)).astype(np.float32), "w")
    t = numpy_helper.from_array(np.array(target, np.int64), "t")
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["c"]),
         onnx.helper.make_node("Reshape", ["c", "t"], ["y"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, None])], [w, t])
    return onnx.helper.make_model_gen_version(g, opset_imports=[onnx.helper.make_opsetid("", 13)])


class PinReshape(Pass):
    """Writes ``target`` as the Reshape's target: exact at batch 1 for [0, -1], [1, -1], [1, 32]."""

    name = "pin-reshape"
    numerics = Numerics.EXACT

    def __init__(self, target) -> None:
        self.target = target

    def run(self, model, ctx):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        t = next(i for i in m.graph.initializer if i.name == "t")
        t.CopyFrom(numpy_helper.from_array(np.array(self.target, np.int64), "t"))
        return PassResult(m, True, PassReport())


def test_a_pass_that_holds_only_at_batch_one_fails_on_a_dynamic_batch_model():
    """[0, -1] -> [1, -1] changes nothing at batch 1; the manager also runs a batch of 2."""
    with pytest.raises(VerificationError, match=r"output 'y' changed shape \[2, 32\] -> \[1, 64\]"):
        PassManager([PinReshape([1, -1])]).run(_reshape_model([0, -1]))
    assert PassManager([PinReshape([0, -1])]).run(_reshape_model([0, -1])).records[0].verification
    # given input shapes fix the batch: nothing to check at batch 2
    fixed = PassContext(input_shapes={"x": (1, 3, 4, 4)})
    PassManager([PinReshape([1, -1])], fixed).run(_reshape_model([0, -1]))


def test_a_model_that_declares_a_batch_it_cannot_run_is_verified_at_batch_one(caplog):
    with caplog.at_level("WARNING"):
        res = PassManager([PinReshape([1, -1])]).run(_reshape_model([1, 32]))
    assert res.records[0].modified
    assert "declares a dynamic batch but does not run at batch 2" in caplog.text


def test_a_reused_manager_finds_each_models_batch_anew():
    """Whether the model runs at batch 2 was found once per manager: after a model that does not,
    the next one was verified at batch 1 only, and a pass that holds only there passed as exact."""
    pm = PassManager([PinReshape([1, -1])])
    pm.run(_reshape_model([1, 32]))
    with pytest.raises(VerificationError, match=r"output 'y' changed shape \[2, 32\] -> \[1, 64\]"):
        pm.run(_reshape_model([0, -1]))
    # and after a model that runs at batch 2, one that does not failed an exact pass (exit 4)
    pm = PassManager([ScaleWeights(1.0 + 1e-7)])
    pm.run(_reshape_model([0, -1]))
    assert pm.run(_reshape_model([1, 32])).records[0].modified


def _masked_output_model() -> onnx.ModelProto:
    """small_model whose output is inf where a constant mask says so, as RT-DETR's encoder marks
    invalid anchors: the same inf before and after any rewrite of the Convs."""
    m = small_model()
    out = m.graph.output[0]
    mask = np.zeros((1, 4, 16, 16), bool)
    mask[0, 1, :4] = True
    m.graph.initializer.extend([numpy_helper.from_array(mask, "invalid"),
                                numpy_helper.from_array(np.array(np.inf, np.float32), "inf")])
    m.graph.node.append(onnx.helper.make_node("Where", ["invalid", "inf", out.name], ["masked"], name="mask"))
    out.name = "masked"
    return m


def test_outputs_with_the_same_infinities_are_compared_on_their_finite_values():
    """RT-DETR (PaddleDetection, random weights) failed fold-batchnorm's exact contract with 'max abs
    diff nan': its candidates hold inf at invalid anchors in both models. Equal non-finite values at
    the same places are now left out of the comparison; a value that turns non-finite still fails."""
    from onnxslim_yolo import verify

    res = PassManager([ScaleWeights(1.0 + 1e-7)], PassContext()).run(_masked_output_model())
    d = res.records[0].verification[0]
    assert d["cosine"] > 0.999999 and 0 < d["max_abs"] < 1e-4 and np.isfinite(d["ref_max"])
    with pytest.raises(VerificationError, match=r"max abs diff 0\.\d+ exceeds exact bound"):
        PassManager([ScaleWeights(1.05)], PassContext()).run(_masked_output_model())
    a = np.array([1.0, np.inf, np.nan, 2.0])
    assert verify.diff("o", a, a + [0.5, 0, 0, 0]).max_abs == 0.5
    assert verify.diff("o", a, np.array([1.0, 3.0, np.nan, 2.0])).max_abs == np.inf
    assert verify.diff("o", a, np.array([1.0, -np.inf, np.nan, 2.0])).max_abs == np.inf
    assert verify.max_abs_diff(a, a) == 0.0 and verify.max_abs_diff(a, a[::-1]) == np.inf
