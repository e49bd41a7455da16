"""Runtime, reference, accuracy and latency checks, and run_checks end to end on fixtures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper
from PIL import Image

import fixtures
from onnxslim_yolo import verify
from onnxslim_yolo.check import accuracy, numerics, run_checks
from onnxslim_yolo.pass_base import UsageError

from .models import copy, insert_qdq, quantize_convs


@pytest.fixture(scope="module")
def yolo() -> onnx.ModelProto:
    return fixtures.build_yolov5_v6(opset=13)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


def shifted(model: onnx.ModelProto, dx: float) -> onnx.ModelProto:
    """The same model with every box moved ``dx`` input pixels right (I/O unchanged)."""
    m = copy(model)
    out = m.graph.output[0].name
    for n in m.graph.node:
        n.output[:] = [o + "_raw" if o == out else o for o in n.output]
    shift = np.zeros((1, 1, m.graph.output[0].type.tensor_type.shape.dim[2].dim_value), np.float32)
    shift[..., 0] = dx
    m.graph.initializer.append(numpy_helper.from_array(shift, "shift"))
    m.graph.node.append(helper.make_node("Add", [out + "_raw", "shift"], [out], name="shift_boxes"))
    return m


def feed(model):
    return verify.random_feeds(model, 1, 0)[0]


def statuses(report):
    return {r.name: r.status for r in report.results}


# ------------------------------------------------------------------------------------ runs, io
def test_runs_passes_and_reports_output_shape(yolo):
    r = numerics.check_runs(yolo, feed(yolo))
    assert r.status == "pass" and r.details["shapes"] == {"output": [1, 252, 9]}


def test_runs_fails_on_non_finite_output():
    g = helper.make_graph([helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Log", ["n"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 8])])
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    r = numerics.check_runs(m, {"x": np.linspace(0.1, 0.9, 8, dtype=np.float32)[None]})
    assert r.status == "fail" and "y (8 NaN/Inf)" in r.message


def test_unloadable_model_fails_runs_and_skips_the_rest(yolo):
    m = copy(yolo)
    m.graph.node[-1].domain = "my.ops"
    m.opset_import.append(helper.make_opsetid("my.ops", 1))
    rep = run_checks(m, reference=yolo, latency=False)
    st = statuses(rep)
    assert st["runtime.runs"] == "fail" and "onnxruntime cannot load" in rep.get("runtime.runs").message
    assert st["structure.ops"] == "fail"
    assert st["reference.numerics"] == "skip" and st["latency"] == "skip"
    assert not rep.ok


def test_output_shape_mismatch_fails_io_and_skips_numerics(yolo):
    other = fixtures.build_yolov5_v6(opset=13, num_classes=5)
    rep = run_checks(other, reference=yolo, latency=False)
    io = rep.get("reference.io")
    assert io.status == "fail"
    assert "output 'output' float [1, 252, 10] != reference float [1, 252, 9]" in io.message
    assert rep.get("reference.numerics").status == "skip"
    assert [r.name for r in rep.failures] == ["reference.io"]


def test_input_name_mismatch_fails_io(yolo):
    m = copy(yolo)
    m.graph.input[0].name = "data"
    for n in m.graph.node:
        n.input[:] = ["data" if i == "images" else i for i in n.input]
    r = numerics.check_io(m, yolo, None)
    assert r.status == "fail" and "inputs ['data'] != reference ['images']" in r.message


def _symbolic(model, which, index, name):
    m = copy(model)
    vi = (m.graph.input if which == "input" else m.graph.output)[0]
    vi.type.tensor_type.shape.dim[index].dim_param = name
    return m


def test_io_fixed_input_dims_pass_when_the_shape_was_given_else_warn(yolo):
    ref = _symbolic(_symbolic(yolo, "input", 0, "batch"), "input", 3, "width")
    given = numerics.check_io(yolo, ref, None, shape_given=True)
    assert given.status == "pass" and "as the input shape given" in given.message
    assert given.details["fixed"][0].startswith("input 'images' float [1, 3,")
    silent = numerics.check_io(yolo, ref, None)
    assert silent.status == "warn" and "runs at that size only" in silent.message


def test_a_dynamic_model_against_its_static_reference_warns_and_is_compared(yolo, images):
    """A dynamic-batch (and dynamic-size) export of a static model failed reference.io, and every
    comparison was skipped (the reverse only warned); now it warns and runs at the reference's shape."""
    dyn = _symbolic(_symbolic(yolo, "input", 0, "batch"), "input", 3, "width")
    io = numerics.check_io(dyn, yolo, None)
    assert io.status == "warn" and io.message.startswith("symbolic dims the reference fixes: input 'images'")
    rep = run_checks(dyn, reference=yolo, images=str(images), latency=False)
    st = {r.name: r.status for r in rep.results}
    assert st["reference.io"] == "warn" and st["reference.numerics"] == "pass"
    assert st["accuracy.agreement"] == "pass" and rep.get("accuracy.agreement").details["map"] > 0.9


def _float16_interface(model):
    """The model behind a float16 input and output (as a float16 export with its I/O types kept
    float16 is fed and read)."""
    m = copy(model)
    x, y = m.graph.input[0], m.graph.output[0]
    for n in m.graph.node:
        n.input[:] = [x.name + "_f32" if t == x.name else t for t in n.input]
        n.output[:] = [y.name + "_f32" if t == y.name else t for t in n.output]
    m.graph.node.insert(0, helper.make_node("Cast", [x.name], [x.name + "_f32"], to=T.FLOAT, name="in_cast"))
    m.graph.node.append(helper.make_node("Cast", [y.name + "_f32"], [y.name], to=T.FLOAT16, name="out_cast"))
    x.type.tensor_type.elem_type = y.type.tensor_type.elem_type = T.FLOAT16
    return m


def test_a_float16_interface_against_its_float_reference_is_compared(yolo, images, labels):
    """reference.io failed on 'float16 != reference float', and every comparison was skipped: each
    model is now fed and read in its own float type, with a warning."""
    half = _float16_interface(yolo)
    io = numerics.check_io(half, yolo, None)
    assert io.status == "warn" and io.message.startswith("another float type: input 'images' float16")
    assert len(io.details["retyped"]) == 2   # the input and the output
    rep = run_checks(half, reference=yolo, images=str(images), labels=str(labels), latency=True,
                     latency_runs=2)
    st = {r.name: r.status for r in rep.results}
    assert st["reference.numerics"] == "pass" and st["accuracy.agreement"] == "pass", rep.results
    assert st["accuracy.map_drop"] == "pass" and st["latency"] in ("pass", "warn") and rep.ok
    assert rep.get("accuracy.map_drop").details["drop_points"] < 1.0
    # float16 with a dynamic batch (an ultralytics half=True, dynamic=True export) failed on the dims
    dyn = _symbolic(half, "input", 0, "batch")
    io = numerics.check_io(dyn, yolo, None)
    assert io.status == "warn" and len(io.details["retyped"]) == 2 and len(io.details["freed"]) == 1
    assert "symbolic dims the reference fixes" in io.message and "another float type" in io.message
    rep = run_checks(dyn, reference=yolo, latency=False)
    assert rep.get("reference.numerics").status == "pass" and rep.ok


def test_an_output_declared_without_a_shape_matches_any(yolo):
    """No shape declared is not a scalar's []: an extra output so declared failed reference.io."""
    ref = copy(yolo)
    ref.graph.output.append(helper.make_tensor_value_info(ref.graph.node[0].output[0], T.FLOAT, None))
    cand = copy(ref)
    cand.graph.output[1].CopyFrom(helper.make_tensor_value_info(ref.graph.node[0].output[0], T.FLOAT,
                                                                [1, 8, 32, 32]))
    assert numerics.check_io(cand, ref, feed(yolo)).status == "pass"
    assert numerics.check_io(ref, cand, feed(yolo)).status == "pass"
    scalar = copy(ref)
    scalar.graph.output[1].type.tensor_type.shape.SetInParent()   # declared: a scalar
    bad = numerics.check_io(scalar, cand, None)
    assert bad.status == "fail" and "[] != reference float [1, 8, 32, 32]" in bad.message


def test_io_output_dims_resolved_by_inference_pass_and_real_differences_fail(yolo):
    ref = _symbolic(yolo, "output", 1, "anchors")
    r = numerics.check_io(yolo, ref, None)
    assert r.status == "pass" and "shape inference fixed dims" in r.message
    other = copy(yolo)
    other.graph.input[0].type.tensor_type.shape.dim[2].dim_value += 32
    bad = numerics.check_io(other, _symbolic(yolo, "input", 0, "batch"), None, shape_given=True)
    assert bad.status == "fail" and "!= reference" in bad.message


# ------------------------------------------------------------------------------------ numerics
def test_numerics_same_model_passes(yolo):
    r = numerics.check_numerics(yolo, yolo, [feed(yolo)], 0.99, "seeded random inputs")
    assert r.status == "pass" and r.details["outputs"][0]["cosine"] > 0.999999


def test_numerics_below_cosine_floor_fails_and_floor_is_settable(yolo):
    other = fixtures.build_yolov5_v6(opset=13, seed=1)  # same graph, other weights
    r = numerics.check_numerics(other, yolo, [feed(yolo)], 0.99, "seeded random inputs")
    assert r.status == "fail" and "below 0.99" in r.message and "SQNR" in r.message
    cos = min(o["cosine"] for o in r.details["outputs"])
    assert numerics.check_numerics(other, yolo, [feed(yolo)], cos - 1e-3, "x").status == "pass"


def test_numerics_compare_the_decoded_class_scores_too(yolo):
    """Box pixels outweigh scores in one cosine over a decoded output: a head with two classes
    swapped kept the whole output's cosine above the floor and passed. Its class scores, decoded
    as the evaluator reads them, are a row of their own."""
    m = copy(yolo)
    out = m.graph.output[0].name
    for n in m.graph.node:
        n.output[:] = [o + "_raw" if o == out else o for o in n.output]
    cols = np.arange(m.graph.output[0].type.tensor_type.shape.dim[2].dim_value)
    cols[[5, 6]] = cols[[6, 5]]
    m.graph.initializer.append(numpy_helper.from_array(cols, "cols"))
    m.graph.node.append(helper.make_node("Gather", [out + "_raw", "cols"], [out], axis=2, name="swap"))
    feeds = numerics.input_feeds(yolo, None, 2, 0, None, None)
    r = numerics.check_numerics(m, yolo, feeds, 0.99, "seeded random inputs")
    rows = {o["name"]: o for o in r.details["outputs"]}
    assert rows[out]["cosine"] > 0.99 and rows["class scores"]["cosine"] < 0.9
    assert r.status == "fail" and r.message.startswith("cosine")
    assert "of output 'class scores' below 0.99" in r.message
    same = numerics.check_numerics(yolo, yolo, feeds, 0.99, "seeded random inputs")
    assert same.status == "pass" and [o["name"] for o in same.details["outputs"]] == [out, "class scores"]


def test_class_scores_too_low_to_detect_anything_are_not_compared(yolo):
    """An unchanged random-weight YOLO12n failed reference.numerics (exit 1 after exact passes): on
    an image whose class scores all read below 1e-7, onnxruntime's optimized Sigmoid gave 0 where
    the plain one gave 9e-8, a cosine of 0.77. Scores under the evaluation's conf in both runs
    detect nothing either way and are left out; above it they are still compared."""
    feeds = numerics.input_feeds(yolo, None, 1, 0, None, None)
    out = verify.run(verify.session(yolo), feeds[0])[0]
    ref, new = out.copy(), out.copy()
    ref[..., 4:] = 3e-4   # objectness x class: 9e-8
    new[..., 4:] = np.where(np.random.default_rng(0).random(new[..., 4:].shape) < 0.5, 0.0, 3e-4)
    assert numerics.class_scores_diff(yolo, feeds, {"reference": [[ref]], "new": [[new]]}) is None
    ref[..., 4:], new[..., 4:] = 0.5, np.where(new[..., 4:] > 0, 0.5, 0.0)
    d = numerics.class_scores_diff(yolo, feeds, {"reference": [[ref]], "new": [[new]]})
    assert d is not None and d.cosine < 0.9


def test_numerics_runs_each_model_once_per_feed(yolo, monkeypatch):
    """The class-score row reads the outputs the output comparison already has: each model runs
    once per feed, in one session each (it ran both models a second time, in two more sessions)."""
    from onnxslim_yolo import verify

    opened, runs = [], []
    real_session, real_run = verify.session, verify.run
    monkeypatch.setattr(verify, "session", lambda m, **kw: opened.append(kw) or real_session(m, **kw))
    monkeypatch.setattr(verify, "run", lambda s, f: runs.append(1) or real_run(s, f))
    feeds = numerics.input_feeds(yolo, None, 3, 0, None, None)
    r = numerics.check_numerics(yolo, yolo, feeds, 0.99, "seeded random inputs")
    assert [o["name"] for o in r.details["outputs"]][-1] == "class scores"
    assert len(opened) == 2 and len(runs) == 2 * len(feeds) == 6


def test_latency_reports_medians_and_ratio(yolo):
    r = numerics.check_latency(yolo, yolo, feed(yolo), runs=3, threads=1)
    assert r.status in ("pass", "warn")  # same model: the ratio is noise around 1
    assert set(r.details["median_ms"]) == {"reference", "candidate"}
    med = r.details["median_ms"]
    assert r.details["ratio"] == pytest.approx(med["candidate"] / med["reference"])


def test_latency_refuses_zero_runs_before_starting_a_worker(yolo):
    from onnxslim_yolo.latency import latency_runs

    with pytest.raises(ValueError, match="latency runs must be at least 1, got 0"):
        latency_runs({"m": yolo}, runs=0)


def test_latency_sessions_without_a_shared_pool(yolo, tmp_path: Path, monkeypatch):
    """onnxruntime < 1.23 has no set_global_thread_pool_sizes (the worker failed there): per-session
    pools of the asked size, spinning off."""
    from onnxruntime.capi import _pybind_state as C

    from onnxslim_yolo import latency

    monkeypatch.delattr(C, "set_global_thread_pool_sizes", raising=False)
    onnx.save(yolo, tmp_path / "m.onnx")
    spec = {"models": {"m": str(tmp_path / "m.onnx")}, "threads": 2, "optimize": True}
    sess = latency._ort_sessions(spec)["m"]
    so = sess.get_session_options()
    assert getattr(so, "use_per_session_threads", True) and so.intra_op_num_threads == 2
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert np.isfinite(sess.run(None, feed(yolo))[0]).all()


# ------------------------------------------------------------------------------------ accuracy
def write_labels(dets, folder: Path, conf: float = 0.25) -> Path:
    """YOLO labels made from a model's confident detections (so that model scores high)."""
    folder.mkdir(exist_ok=True)
    for d in dets:
        h, w = d.hw
        rows = [f"{c} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
                f"{(b[3] - b[1]) / h:.6f}" for b, c, s in zip(d.boxes, d.classes, d.scores) if s >= conf]
        rows = list(dict.fromkeys(rows))   # boxes clipped to the image can print alike: one label each
        (folder / (Path(d.key).stem + ".txt")).write_text("\n".join(rows[:20]) + "\n")
    return folder


@pytest.fixture(scope="module")
def labels(yolo, images, tmp_path_factory) -> Path:
    from onnxslim_yolo.evaluate import detections

    return write_labels(detections(yolo, images, progress=False), tmp_path_factory.mktemp("run") / "labels")


def test_accuracy_passes_against_itself(yolo, images, labels):
    rep = run_checks(yolo, reference=yolo, images=str(images), labels=str(labels), latency=False)
    assert rep.ok, [(r.name, r.message) for r in rep.failures]
    ag, drop = rep.get("accuracy.agreement"), rep.get("accuracy.map_drop")
    assert ag.status == "pass" and ag.details["map"] > 0.9
    assert drop.status == "pass" and drop.details["drop_points"] == pytest.approx(0.0)


def test_moved_boxes_fail_agreement_and_map_drop(yolo, images, labels):
    rep = run_checks(shifted(yolo, 6.0), reference=yolo, images=str(images), labels=str(labels),
                     latency=False)
    st = statuses(rep)
    assert st["reference.io"] == "pass"
    assert st["accuracy.map_drop"] == "fail"
    assert "exceeds --max-drop 1" in rep.get("accuracy.map_drop").message
    ag = rep.get("accuracy.agreement").details
    assert ag["map"] < ag["min_agreement"]
    assert st["accuracy.agreement"] == "fail"
    assert ag["self_agreement"] > 0.9  # a stable reference: the move is the candidate's fault
    dets = accuracy.detect(shifted(yolo, 6.0), yolo, str(images), None, None, 1, None, False)
    assert accuracy.check_map_drop(dets, str(labels), max_drop=100.0).status == "pass"
    # optimize without --max-drop enforces none: past check's default it warns (a PASS that could
    # not fail said nothing of it), within it the message says no limit was asked for
    free = accuracy.check_map_drop(dets, str(labels), max_drop=float("inf"))
    said = f"drop {free.details['drop_points']:.2f} pts, over check's default --max-drop 1; not enforced"
    assert free.status == "warn" and free.message.startswith(said)
    same = accuracy.detect(yolo, yolo, str(images), None, None, 1, None, False)
    kept = accuracy.check_map_drop(same, str(labels), max_drop=float("inf"))
    assert kept.status == "pass" and kept.message.endswith("(no --max-drop: not enforced)")
    assert accuracy.check_agreement(dets, min_agreement=0.0).status == "pass"


def test_agreement_below_the_floor_only_warns_when_the_reference_fails_it_against_itself(yolo, images):
    dets = accuracy.detect(shifted(yolo, 6.0), yolo, str(images), None, None, 1, None, False)
    calls = []

    def noise(value):
        return lambda: calls.append(value) or {"box": value}

    unstable = accuracy.check_agreement(dets, 0.5, noise(0.02))
    assert unstable.status == "warn" and unstable.details["self_agreement"] == 0.02
    assert "the reference scores 0.0200 against itself" in unstable.message
    assert accuracy.check_agreement(dets, 0.5, noise(0.9)).status == "fail"
    assert accuracy.check_agreement(dets, 0.0, noise(0.02)).status == "pass" and calls == [0.02, 0.9]


def test_agreement_below_the_floor_warns_when_it_reaches_that_share_of_the_references_own(yolo, images):
    """The floor scales with what the reference scores against itself: a candidate that reaches
    the floor's share of the reference's own agreement warns; against a reference that agrees
    1.0, or just too well (1% above that share), it fails."""
    dets = accuracy.detect(shifted(yolo, 6.0), yolo, str(images), None, None, 1, None, False)
    a = accuracy.check_agreement(dets, 0.0).details["map"]
    assert 0.0 < a < 1.0
    floor = (a + a ** 0.5) / 2  # a < floor and floor * floor <= a, so a / floor is at least the floor
    near = accuracy.check_agreement(dets, floor, lambda: {"box": a / floor})
    assert near.status == "warn" and near.details["self_agreement"] == pytest.approx(a / floor)
    assert accuracy.check_agreement(dets, floor, lambda: {"box": 1.0}).status == "fail"
    assert accuracy.check_agreement(dets, floor, lambda: {"box": min(1.0, 1.01 * a / floor)}).status == "fail"


def _classifier() -> onnx.ModelProto:
    """Image in, (1, 10) logits out: runs, but has no detections to compare."""
    w = numpy_helper.from_array(np.full((10, 3, 1, 1), 0.1, np.float32), "w")
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], name="conv"),
             helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["logits"], name="flat")]
    g = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("images", T.FLOAT, [1, 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", T.FLOAT, [1, 10])], [w])
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])


def _convs(widths) -> onnx.ModelProto:
    """Image -> Conv 1x1 (3 -> widths[0]) -> Conv 1x1 (-> widths[1]) -> (1, widths[1], 8, 8)."""
    ws = [numpy_helper.from_array(np.full((c, cin, 1, 1), 0.1, np.float32), f"w{i}")
          for i, (cin, c) in enumerate(zip((3,) + tuple(widths[:-1]), widths))]
    nodes = [helper.make_node("Conv", ["images", "w0"], ["a"], name="conv0"),
             helper.make_node("Conv", ["a", "w1"], ["out"], name="conv1")]
    g = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("images", T.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("out", T.FLOAT, [1, widths[-1], 8, 8])], ws)
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])


def test_numerics_floor_is_the_lossy_one_for_a_quantized_or_pruned_copy():
    """`check` of an INT8 or pruned model against its float original uses the floor optimize's own
    checks use for lossy passes (0.9), and says so; any other pair 0.99; --min-cosine overrides."""
    from onnxslim_yolo.check.runner import lossy_copy

    classifier = _classifier()
    skewed = copy(classifier)   # logits 1 : 1.5 alternating against equal ones: cosine 0.980
    skewed.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        (np.full((10, 3, 1, 1), 0.1) * (1 + 0.5 * (np.arange(10) % 2))[:, None, None, None])
        .astype(np.float32), "w"))
    num = run_checks(skewed, reference=classifier, latency=False).get("reference.numerics")
    assert num.status == "fail" and num.details["min_cosine"] == 0.99
    assert num.message.startswith("cosine 0.98") and "below 0.99 (" in num.message
    quantized = insert_qdq(skewed, "c", scale=0.01, zp=0)
    assert lossy_copy(quantized, classifier) == "a quantized model against a float reference"
    num = run_checks(quantized, reference=classifier, latency=False).get("reference.numerics")
    assert num.status == "pass" and num.details["min_cosine"] == 0.9
    assert num.details["min_cosine_for"] == "a quantized model against a float reference"
    assert num.message.endswith(
        "(2 seeded random inputs; floor 0.9: a quantized model against a float reference)")
    num = run_checks(quantized, reference=classifier, latency=False,
                     min_cosine=0.99).get("reference.numerics")
    assert num.status == "fail" and "below 0.99 (" in num.message
    assert lossy_copy(quantized, quantized) is None and lossy_copy(classifier, quantized) is None
    assert lossy_copy(_convs((4, 6)), _convs((8, 6))).startswith("a pruned model (1 Convs")
    assert lossy_copy(_convs((8, 6)), _convs((8, 6))) is None


def test_accuracy_checks_skip_a_model_whose_output_is_not_detections(images, tmp_path):
    m = _classifier()
    rep = run_checks(m, reference=m, images=str(images), labels=str(tmp_path), latency=False)
    st = statuses(rep)
    assert st["accuracy.agreement"] == "skip"
    why = next(r.message for r in rep.results if r.name == "accuracy.agreement")
    assert why.startswith("not a detection output: output of shape [1, 10]")
    assert st["reference.numerics"] == "pass"
    # the mAP asked for with --labels is a warning, not a skip a CI gate lets through (it was)
    assert rep.get("accuracy.map_drop").status == "warn"
    assert rep.get("accuracy.map_drop").message.startswith(
        "--labels given, but its mAP cannot be measured: not a detection output: output of shape [1, 10]")
    no_labels = run_checks(m, reference=m, images=str(images), latency=False)
    assert statuses(no_labels)["accuracy.map_drop"] == "skip"


def test_preprocessing_check_skips_untrained_weights_and_a_given_preset(yolo, images):
    """A random-weight fixture looks wrong under every preset: nothing to advise, so the check
    skips and says why; a preset the user gives is not second-guessed."""
    rep = run_checks(yolo, reference=yolo, images=str(images), latency=False)
    r = rep.get("inputs.preprocessing")
    assert r.status == "skip" and r.details["verdict"] == "unknown" and r.details["images"] == 2
    assert r.message.startswith("cannot tell: fed as yolov5: ")
    assert "no other preprocessing looks right" in r.message
    assert set(r.details["scores"]) >= {"yolov5", "yolox"}
    given = run_checks(yolo, reference=yolo, images=str(images), latency=False, preset="yolox")
    assert given.get("inputs.preprocessing").status == "skip"
    assert given.get("inputs.preprocessing").message == "given with --preprocess yolox"
    assert run_checks(yolo, latency=False).get("inputs.preprocessing").message.startswith("no images")
    cls = _classifier()
    assert run_checks(cls, reference=cls, images=str(images), latency=False).get(
        "inputs.preprocessing").message.startswith("not a detection output")


def test_preprocessing_check_on_yolov5n(yolov5n_path, coco128, monkeypatch):
    """Trained yolov5n: its own preset passes; forced to the YOLOX guess (as a YOLOv6 v1 export
    is guessed), the check warns and names yolov5, which optimize's summary repeats."""
    from onnxslim_yolo import data, ir
    from onnxslim_yolo.api import optimize

    model = ir.load(yolov5n_path)
    images = str(coco128 / "images")
    ok = accuracy.check_preprocessing(model, images, None, None, None, 1)
    assert ok.status == "pass" and ok.details["verdict"] == "right", ok.message
    assert ok.message.endswith("on 8 images: as a trained detector fed as trained")
    monkeypatch.setattr(data, "preset_choice", lambda m: ("yolox", "the output layout, read as yolox"))
    monkeypatch.setattr(data, "detect_preset", lambda m: "yolox")
    wrong = accuracy.check_preprocessing(model, images, None, 4, None, 1)
    assert wrong.status == "warn" and wrong.details["images"] == 4
    assert wrong.message.endswith("rerun with --preprocess yolov5")
    res = optimize(model, calib=images, calib_limit=2, eval_limit=4, passes=["canonicalize"], bench=False,
                   progress=False)
    r = res.checks.get("inputs.preprocessing")
    assert r.status == "warn" and r.message in res.summary["notes"]


def test_a_reference_scoring_nothing_on_the_labels_warns(yolo, images, tmp_path):
    """A drop of 0.00 between two mAPs of 0.0000 passed: the labels (here: objects where neither
    model sees one) or the preprocessing measure nothing."""
    far = tmp_path / "far"
    far.mkdir()
    for f in images.iterdir():
        (far / (f.stem + ".txt")).write_text("0 0.01 0.01 0.005 0.005\n")
    dets = accuracy.detect(yolo, yolo, str(images), None, None, 1, None, False)
    r = accuracy.check_map_drop(dets, str(far), max_drop=1.0)
    assert r.details["reference"]["map"] < accuracy.NOTHING_MEASURED and r.details["drop_points"] == 0.0
    assert r.status == "warn" and r.message.startswith("the reference scores mAP 0.0000 on these labels")


def test_label_warnings_make_the_map_check_a_warning(yolo, images, labels, tmp_path):
    """Label problems (here a duplicated line) were log lines only: the check passed, and the table,
    the verdict and the JSON report said nothing of them."""
    dup = tmp_path / "dup"
    dup.mkdir()
    for f in labels.iterdir():
        text = f.read_text()
        (dup / f.name).write_text(text + text.splitlines()[0] + "\n" if f.stem == "im0" else text)
    dets = accuracy.detect(yolo, yolo, str(images), None, None, 1, None, False)
    for _ in range(2):   # the second time too, when the log line is not repeated
        r = accuracy.check_map_drop(dets, str(dup), max_drop=1.0)
        assert r.status == "warn" and r.details["drop_points"] == pytest.approx(0.0)
        assert r.message.startswith(f"{dup / 'im0.txt'}: 1 duplicate label lines left out")
        assert r.details["label_warnings"] == [r.message.split(": mAP@0.5:0.95")[0]]
    assert accuracy.check_map_drop(dets, str(labels), max_drop=1.0).status == "pass"


def test_labels_without_reference_report_candidate_map(yolo, images, labels):
    rep = run_checks(yolo, images=str(images), labels=str(labels), latency=False)
    r = rep.get("accuracy.map_drop")
    assert r.status == "pass" and "no reference" in r.message and r.details["candidate"]["map"] > 0.5
    assert rep.get("accuracy.agreement").status == "skip"


# ---------------------------------------------------------------------------- run_checks as a whole
def test_quantized_fixture_report(yolo):
    rep = run_checks(quantize_convs(fixtures.build_yolov5_v6(opset=13, bn=False)), latency=False)
    st = statuses(rep)
    assert all(st[n] == "pass" for n in ("qdq.pairs", "qdq.scales", "qdq.zero_points", "qdq.per_channel",
                                         "qdq.decode_tail", "runtime.runs"))
    assert st["qdq.ort_fusion"] == "warn"  # SiLU left float between Q/DQ
    assert rep.ok
    d = rep.to_dict()
    assert d["ok"] is True and d["counts"]["fail"] == 0 and len(d["checks"]) == len(rep.results)


def test_run_checks_usage_errors(yolo, images, tmp_path):
    with pytest.raises(UsageError, match="--labels needs --images"):
        run_checks(yolo, labels=str(tmp_path))
    with pytest.raises(UsageError, match="unknown target"):
        run_checks(yolo, target="tpu")
    with pytest.raises(UsageError, match="not found"):
        run_checks(str(tmp_path / "missing.onnx"))
    with pytest.raises(UsageError, match="image folder not found"):
        run_checks(yolo, images=str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="max-drop"):
        run_checks(yolo, max_drop=-1)
    with pytest.raises(UsageError, match=r"--max-drop nan: must be >= 0"):   # NaN passed every drop
        run_checks(yolo, max_drop=float("nan"))
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(UsageError, match=r"--min-agreement .*: must be within \[0, 1\]"):
            run_checks(yolo, min_agreement=bad)


def test_a_reference_that_is_the_models_own_file_warns(yolo, tmp_path):
    """check X --reference X (a link too) passed every comparison in silence: a CI script's slip."""
    path = tmp_path / "m.onnx"
    onnx.save(yolo, str(path))
    (tmp_path / "link.onnx").symlink_to(path)
    for ref in (path, tmp_path / "link.onnx"):
        rep = run_checks(str(path), reference=str(ref), latency=False)
        io = rep.get("reference.io")
        assert io.status == "warn" and io.message.startswith("the reference is the model's own file")
        assert rep.ok and rep.get("reference.numerics").status == "pass"
    other = tmp_path / "copy.onnx"
    onnx.save(yolo, str(other))
    assert run_checks(str(path), reference=str(other), latency=False).get("reference.io").status == "pass"


def test_a_cosine_just_below_its_floor_is_shown_below_it():
    """0.999974 against a floor of 1 read 'cosine 1.0000 below 1.0'."""
    assert numerics.below(0.999974, 1.0) == "0.99997" and numerics.below(0.98765, 0.99) == "0.9877"
    assert numerics.below(0.9999999999, 1.0) == "1.00000000"   # 8 decimals at most


def test_a_reference_with_non_finite_outputs_is_named_as_the_culprit(yolo):
    """A reference whose weights hold a NaN failed numerics as 'cosine -1.0000 ... below 0.99',
    which reads as the candidate's fault."""
    broken = copy(yolo)
    conv = next(n for n in broken.graph.node if n.op_type == "Conv")
    w = next(t for t in broken.graph.initializer if t.name == conv.input[1])
    arr = numpy_helper.to_array(w).copy()
    arr.flat[0] = np.nan
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    r = numerics.check_numerics(yolo, broken, [feed(yolo)], 0.99, "seeded random inputs")
    assert r.status == "fail" and r.message.startswith("the reference's outputs are not finite (output ")
    assert "it cannot serve as a reference" in r.message


def test_a_declared_dynamic_batch_that_fails_at_batch_2_is_a_warning():
    """check ran batch 1 only: a dynamic-batch export whose Reshape holds the export's batch passed
    as if it ran at any batch (optimize tests batch 2)."""
    def model(target):
        w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
        t = numpy_helper.from_array(np.array(target, np.int64), "t")
        g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]),
                               helper.make_node("Reshape", ["c", "t"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [None, None])], [w, t])
        return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)

    runs = run_checks(model([1, 32]), latency=False).get("runtime.runs")
    assert runs.status == "warn" and "declares a dynamic batch and fails at batch 2: " in runs.message
    runs = run_checks(model([0, -1]), latency=False).get("runtime.runs")
    assert runs.status == "pass" and runs.message.endswith("runs at batch 2 too (its batch is dynamic)")


def _counted(threshold: float) -> onnx.ModelProto:
    """(1, 8) -> the positions above ``threshold`` (NonZero: a data-dependent count) and x + 1."""
    g = helper.make_graph(
        [helper.make_node("Greater", ["x", "t"], ["hit"]), helper.make_node("NonZero", ["hit"], ["idx"]),
         helper.make_node("Add", ["x", "t"], ["y"])], "counted",
        [helper.make_tensor_value_info("x", T.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("idx", T.INT64, [2, "n"]),
         helper.make_tensor_value_info("y", T.FLOAT, [1, 8])],
        [numpy_helper.from_array(np.array(threshold, np.float32), "t")])
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])


def test_io_rows_counted_after_a_selection_may_differ_at_run_time():
    """An NMS keeps as many detections as the scores allow: a quantized model keeping 20 where
    the float one keeps 15 failed reference.io. Dims declared as numbers must still agree."""
    x = {"x": np.linspace(0, 1, 8, dtype=np.float32)[None]}
    few, many = _counted(0.7), _counted(0.3)
    assert numerics.io_differences(few, many, x)[0] == []
    assert numerics.check_io(few, many, x).status == "pass"
    assert not numerics._same_run_shape([3, 2], [2, 2], [onnx.TensorProto.INT64, [2, "n"]], True)
    assert not numerics._same_run_shape([1, 3], [1, 2], ["float", [1, "n"]], False)
    assert numerics._same_run_shape([2, 5], [2, 2], None, True)
    assert not numerics._same_run_shape([2, 5, 1], [2, 2], None, True)


def test_a_declared_dynamic_image_size_that_fails_at_another_size_is_a_warning():
    """A dynamic-size export whose Reshape (or grid) holds the export's size passed as if it ran
    at any size; it is run 64 pixels larger on each symbolic side now."""
    def model(target, dims):
        w = numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")
        t = numpy_helper.from_array(np.array(target, np.int64), "t")
        g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]),
                               helper.make_node("Reshape", ["c", "t"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", T.FLOAT, [None, None])], [w, t])
        return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)

    x = {"x": np.ones((1, 3, 8, 8), np.float32)}
    runs = numerics.check_runs(model([1, 128], [1, 3, "H", "W"]), x)
    assert runs.status == "warn" and "declares a dynamic image size and fails at 72x72: " in runs.message
    runs = numerics.check_runs(model([1, -1], [1, 3, 8, "W"]), x)
    assert runs.status == "pass" and runs.message.endswith("runs at 8x72 too (its image size is dynamic)")
    assert numerics.check_runs(model([1, 128], [1, 3, 8, 8]), x).status == "pass"   # fixed: not tried
    both = numerics.check_runs(model([1, 128], ["N", 3, "H", 8]), x)   # fails at batch 2 and at 72x8
    assert both.status == "warn" and "fails at batch 2: " in both.message
    assert "; and it declares a dynamic image size and fails at 72x8: " in both.message


def test_an_nms_output_of_another_row_count_is_said_so_not_shown_as_inf(yolo, monkeypatch):
    """An INT8 model whose NMS kept 20 rows where the float one kept 15 showed 'max abs inf, cosine
    0.000000, SQNR -inf dB' beside PASS, in the check and in optimize's summary."""
    from onnxslim_yolo.report import summary_table

    counted = verify.OutputDiff("dets", float("inf"), 600.0, 0.0, float("-inf"), role="selected")
    fed = verify.OutputDiff("scores", 0.01, 1.0, 0.9999, 45.0, role="candidates")
    assert counted.rows_differ and not fed.rows_differ
    assert not verify.OutputDiff("dets", 1.0, 600.0, 0.0, 3.0, role="selected").rows_differ
    monkeypatch.setattr(verify, "compare_models", lambda *a, **k: [counted, fed])
    r = numerics.check_numerics(yolo, yolo, [feed(yolo)], 0.99, "seeded random inputs")
    assert r.message.startswith("dets: another row count than the reference's (what the NMS kept), so "
                                "judged on the candidates fed to it; scores: max abs 0.01"), r.message
    as_json = dict(counted.as_dict(), max_abs=None, sqnr_db=None)   # strict JSON writes inf as null
    side = {"nodes": 1, "params": 1, "macs": 1, "flops": 2, "size_bytes": 1}
    text = summary_table({"before": side, "after": side, "outputs": [as_json, fed.as_dict()]})
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]]
            for line in text.splitlines()}
    assert rows["dets (after NMS/TopK)"] == ["other row count", "-", "-"], text
    assert rows["scores (into NMS/TopK)"][1] == "0.9999", text
