"""CLI through click's test runner: commands, summary, exit codes, one-line errors, nothing written."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import fixtures
from onnxslim_yolo import ir
from onnxslim_yolo.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    p = tmp_path / "det.onnx"
    ir.save(fixtures.build_yolov5_v6(opset=13), p)
    return p


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_inspect_checks_input_shape_and_warns_on_unknown_ops(model_file: Path, tmp_path: Path):
    """A static model's --input-shape was ignored (MACs at its own size), one contradicting a fixed
    dim gave 0 MACs; a node of an unknown op cut shape inference short, and the MACs after it
    went uncounted without a word."""
    r = CliRunner().invoke(main, ["inspect", str(model_file), "--input-shape", "1,3,32,32"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: --input-shape [1, 3, 32, 32]: input 'images' is [1, 3, 64, 64], and axis 2 is fixed at 64; "
        "only its symbolic dims can be set"], r.output
    m = ir.load(model_file)
    n = next(n for n in m.graph.node if n.op_type == "Sigmoid")
    n.op_type, n.name = "FooBarOp", "act"
    onnx.save(m, tmp_path / "u.onnx")
    r = invoke("inspect", tmp_path / "u.onnx", "--json", tmp_path / "u.json")
    assert r.exit_code == 0, r.output
    assert "warning: node 'act' is FooBarOp, which is no ONNX operator at opset 13; shapes after it are " \
           "unknown, so MACs may be under-counted" in r.output
    assert invoke("inspect", model_file, "--json", tmp_path / "s.json").exit_code == 0
    full = json.loads((tmp_path / "s.json").read_text())
    got = json.loads((tmp_path / "u.json").read_text())
    assert got["unknown_ops"] == ["node 'act' is FooBarOp, which is no ONNX operator at opset 13"]
    assert "unknown_ops" not in full and got["macs"] < full["macs"]


def test_passes_lists_names_and_contracts():
    r = invoke("passes")
    assert r.exit_code == 0
    assert re.search(r"canonicalize\s*\|\s*exact\s*\|\s*yes", r.output)


def test_inspect_reports_counts_and_convention(model_file: Path, tmp_path: Path):
    r = invoke("inspect", model_file, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["op_counts"]["Conv"] == sum(n.op_type == "Conv" for n in ir.load(model_file).graph.node)
    assert data["flops"] == 2 * data["macs"] > 0
    assert "FLOPs = 2 x MACs" in r.output
    assert data["input"]["layout"] == "NCHW" and data["input"]["size (h, w)"] == [64, 64]
    assert data["input"]["preprocessing"] == "yolov5: RGB, pixels / 255 (0-1), letterbox centred"


def test_inspect_shows_pixel_values_fed_to_a_model_normalising_its_input(tmp_path: Path):
    from fixtures.layout import channels_last_input, pixel_input

    path = tmp_path / "u8.onnx"
    ir.save(channels_last_input(pixel_input(fixtures.build_yolov5_v6(opset=13), "uint8")), path)
    r = invoke("inspect", path, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    feed = json.loads((tmp_path / "s.json").read_text())["input"]
    assert (feed["layout"], feed["dtype"]) == ("NHWC", "uint8")
    assert "pixel values 0-255" in feed["preprocessing"] and "pixel values 0-255" in r.output


def test_optimize_default_output_beside_input(model_file: Path, tmp_path: Path):
    before = model_file.read_bytes()
    r = invoke("optimize", model_file, "--no-bench", "--report", tmp_path / "rep.json")
    assert r.exit_code == 0, r.output
    out = tmp_path / "det.opt.onnx"
    assert out.exists() and model_file.read_bytes() == before
    onnx.checker.check_model(str(out), full_check=True)
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["passes"][0]["name"] == "canonicalize"
    assert rep["summary"]["outputs"][0]["cosine"] > 0.99999
    for word in ("nodes", "parameters", "MACs", "FLOPs", "size", "max abs diff"):
        assert word in r.output


def test_optimize_summary_has_latency(model_file: Path, tmp_path: Path):
    r = invoke("optimize", model_file, "-o", tmp_path / "o.onnx", "--passes", "canonicalize")
    assert r.exit_code == 0, r.output
    assert re.search(r"latency \(ms, ort cpu\)\s*\|\s*[\d.]+\s*\|\s*[\d.]+\s*\|\s*x[\d.]+", r.output)


@pytest.mark.parametrize("ratio, saturates, expect", [
    (1.04, True, None),
    (2.0, True, r"ran x2\.00 slower .*20 interleaved runs, 2 threads\); this x86 CPU has no VNNI"),
    (2.0, False, r"ran x2\.00 slower .*the Q/DQ conversions outweigh")])
def test_optimize_warns_when_the_result_runs_slower(model_file: Path, tmp_path: Path, monkeypatch, ratio,
                                                    saturates, expect):
    from onnxslim_yolo import latency
    from onnxslim_yolo.quant import targets
    monkeypatch.setattr(latency, "interleaved_latency", lambda models, **kw: {"before": 1.0, "after": ratio})
    monkeypatch.setattr(targets, "x86_int8_saturates", lambda cpuinfo=None: saturates)
    images = tmp_path / "calib.npy"
    model = ir.load(model_file)
    np.save(images, np.random.default_rng(0).random((2, *ir.input_shapes(model)["images"][1:]), np.float32))
    r = invoke("optimize", model_file, "-o", tmp_path / "o.onnx", "--int8", "--calib", images, "--no-check",
               "--quiet")
    assert r.exit_code == 0, r.output
    warnings = [ln for ln in r.output.splitlines() if ln.startswith("warning: the optimized model")]
    if expect is None:
        assert not warnings
    else:
        assert len(warnings) == 1 and re.search(expect, warnings[0]), warnings


@pytest.mark.parametrize("args, message", [
    # every JSON or table a command writes is kept off its inputs and its other outputs: each of
    # these overwrote the model (or wrote the report where the model was to go) with exit 0
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--report", "{m}"],
     "{m}: refusing to overwrite the input model with the report"),
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--report", "{t}/link.onnx"],
     "{t}/link.onnx: refusing to overwrite the input model with the report"),
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--report", "{t}/o.onnx"],
     "{t}/o.onnx: given for both the optimized model and the report"),
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--prune", "0.1", "--kept-json", "{m}"],
     "{m}: refusing to overwrite the input model with the kept-channel JSON"),
    (["optimize", "{m}", "-o", "{t}/n.onnx", "--int8", "--calib", "{t}/images",
      "--calib-table", "{t}/n.onnx"],
     "{t}/n.onnx: given for both the optimized model and the calibration table"),
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--int8", "--calib", "{t}/images",
      "--calib-table", "{t}/o.onnx"],
     "{t}/o.onnx: refusing to overwrite the calibration table with the optimized model"),
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--labels", "{t}/gt.json", "--report", "{t}/gt.json"],
     "{t}/gt.json: refusing to overwrite the labels with the report"),
    (["inspect", "{m}", "--json", "{m}"], "{m}: refusing to overwrite the model with the JSON figures"),
    (["check", "{t}/o.onnx", "--reference", "{m}", "--json", "{m}"],
     "{m}: refusing to overwrite the reference model with the JSON report"),
    (["eval", "{m}", "--images", "{t}/images", "--labels", "{t}/gt.json", "--json", "{t}/gt.json"],
     "{t}/gt.json: refusing to overwrite the labels with the JSON figures"),
    # a file inside an input folder: check --json replaced a label file (or an image), exit 0
    (["check", "{m}", "--images", "{t}/images", "--labels", "{t}/labels", "--json", "{t}/labels/a.txt"],
     "{t}/labels/a.txt: refusing to write the JSON report among the labels (a folder read for such files)"),
    (["check", "{m}", "--images", "{t}/images", "--json", "{t}/images/a.jpg"],
     "{t}/images/a.jpg: refusing to write the JSON report among the images (a folder read for such files)"),
    (["eval", "{m}", "--images", "{t}/images", "--labels", "{t}/labels", "--json", "{t}/labels/b.txt"],
     "{t}/labels/b.txt: refusing to write the JSON figures among the labels (a folder read for such files)"),
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--int8", "--calib", "{t}/images",
      "--report", "{t}/images/a.jpg"],
     "{t}/images/a.jpg: refusing to write the report among the calibration data "
     "(a folder read for such files)"),
])
def test_outputs_never_overwrite_inputs_or_each_other(tmp_path: Path, model_file: Path, args, message):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"not read")
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    (tmp_path / "gt.json").write_text("{}")
    (tmp_path / "link.onnx").hardlink_to(model_file)
    ir.save(onnx.load(str(model_file)), tmp_path / "o.onnx")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    fill = {"m": model_file, "t": tmp_path}
    r = CliRunner().invoke(main, [a.format(**fill) for a in args])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [f"error: {message.format(**fill)}; choose another path"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("args, message", [
    (["optimize", "{t}"],
     r"Invalid value for 'MODEL': File '{t}' is a directory\. \(see 'main optimize --help'\)"),
    (["optimize", "{m}", "--prune", "abc"], r"Invalid value for '--prune': 'abc' is not a valid float"),
    # click 8.0 and 8.1 word it "No such option: --nope"
    (["optimize", "{m}", "--nope"], r"No such option(: | ')--nope"),
    (["inspect", "{m}", "--json", "{t}"], r"Invalid value for '--json': File '{t}' is a directory"),
    (["nope"], r"No such command 'nope'\. \(see 'main --help'\)"),
    (["--nope", "passes"], r"No such option(: | ')--nope'?\.? \(see 'main --help'\)"),   # the group's own
    # values that ran before: --limit -1 evaluated all images but the last, --conf 2 found nothing
    (["eval", "{m}", "--images", "{t}", "--labels", "{t}", "--limit", "-1"],
     r"Invalid value for '--limit': -1 is not in the range x>=1"),
    (["eval", "{m}", "--images", "{t}", "--labels", "{t}", "--conf", "2"],
     r"Invalid value for '--conf': 2.0 is not in the range 0<=x<=1"),
    (["eval", "{m}", "--images", "{t}", "--labels", "{t}", "--max-det", "0"],
     r"Invalid value for '--max-det': 0 is not in the range x>=1"),
    (["optimize", "{m}", "--int8", "--calib", "{t}", "--calib-limit", "0"],
     r"Invalid value for '--calib-limit': 0 is not in the range x>=1"),
    # NaN passed click's ranges and then every check: --max-drop nan let a 57-point drop pass
    (["check", "{m}", "--max-drop", "nan"], r"Invalid value for '--max-drop': 'nan' is not a number"),
    (["check", "{m}", "--min-agreement", "1.5"],
     r"Invalid value for '--min-agreement': 1.5 is not in the range 0<=x<=1"),
    (["check", "{m}", "--min-agreement", "nan"],
     r"Invalid value for '--min-agreement': 'nan' is not a number"),
    (["check", "{m}", "--min-cosine", "nan"], r"Invalid value for '--min-cosine': 'nan' is not a number"),
    (["eval", "{m}", "--images", "{t}", "--labels", "{t}", "--iou", "nan"],
     r"Invalid value for '--iou': 'nan' is not a number"),
    (["optimize", "{m}", "--int8", "--calib", "{t}", "--max-drop", "nan"],
     r"Invalid value for '--max-drop': 'nan' is not a number"),
    # a missing folder was put behind the model's path, as if the model were at fault
    # pruning options without pruning were ignored, with exit 0
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--kept-json", "{t}/k.json", "--round-to", "4"],
     r"--kept-json, --round-to only apply to pruning: add --prune RATIO"),
    # the default's own value, given, was told from the default by comparing with 8
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--round-to", "8"],
     r"--round-to only applies to pruning: add --prune RATIO"),
    # INT8 options without INT8 were ignored, with exit 0 (the table was never written)
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--method", "entropy", "--calib-table", "{t}/t.json"],
     r"--method, --calib-table only apply to INT8: add --int8"),
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--weight-bits", "auto"], r"--weight-bits only applies to INT8"),
    # a skip removing the pass asked for wrote a float model, with exit 0
    (["optimize", "{m}", "-o", "{t}/o.onnx", "--int8", "--calib", "{t}", "--skip", "insert-qdq"],
     r"skip removes insert-qdq, which int8 asks for: drop one of the two"),
    (["check", "{m}", "--images", "{t}/nope"],
     r"Invalid value for '--images': Path '{t}/nope' does not exist"),
])
def test_a_bad_option_or_argument_is_one_line_too(tmp_path: Path, model_file: Path, args, message):
    """click printed its usage and a hint first (four lines); now one line, as every error."""
    fill = {"m": model_file, "t": tmp_path}
    r = CliRunner().invoke(main, [a.format(**fill) for a in args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and re.match("error: " + message.format(**fill), lines[0]), r.output


def test_the_sigterm_handler_lives_only_as_long_as_a_run_on_the_main_thread(model_file: Path):
    """It was installed for good: pytest (or an application running the CLI in-process) then
    ignored SIGTERM, and a run on another thread failed (signal only works in main thread)."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    assert invoke("inspect", model_file).exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before
    codes: list = []
    t = threading.Thread(target=lambda: codes.append(CliRunner().invoke(main, ["passes"]).exit_code))
    t.start()
    t.join()
    assert codes == [0]


def test_sigterm_while_writing_removes_the_partial_file(tmp_path: Path, model_file: Path):
    """``timeout`` sends SIGTERM: the file being written was left as ``.NAME.*.tmp`` beside its target."""
    import subprocess
    import sys

    script = f"""
import os, signal, time
from contextlib import contextmanager
from onnxslim_yolo import cli, ir
real = ir.replacing
@contextmanager
def killed_while_writing(out):
    with real(out) as tmp:
        yield tmp
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
ir.replacing = killed_while_writing
cli.main(["inspect", {str(model_file)!r}, "--json", {str(tmp_path / "s.json")!r}], prog_name="onnxslim-yolo")
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 128 + 15, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.onnx"]


@pytest.mark.parametrize("sig, code, said", [
    ("SIGTERM", 143, "error: terminated by SIGTERM; nothing more was written"),
    ("SIGINT", 130, "error: interrupted (Ctrl-C); nothing more was written")])
def test_a_signal_while_a_pass_runs_ends_the_run_with_its_code_and_one_line(tmp_path: Path, model_file: Path,
                                                                          sig, code, said):
    """The manager turned what a pass raises, SystemExit included, into one line: SIGTERM during a
    pass ended with exit 4 ('raised SystemExit: 143'), read as a broken contract, and then exited
    silently; click turned Ctrl-C into "Aborted!" and exit 1, the code of a failed check, so a CI
    script could not tell an interrupted run from a failed gate."""
    import subprocess
    import sys

    # a shell's background job (CI, nohup) starts with SIGINT ignored: Python then raises no
    # KeyboardInterrupt, as a terminal's Ctrl-C gives, so the test sets it as a terminal has it
    script = f"""
import os, signal, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from onnxslim_yolo import cli
from onnxslim_yolo.passes.fold_affine import FoldAffine
def signalled(self, model, ctx):
    os.kill(os.getpid(), signal.{sig})
    time.sleep(30)
FoldAffine.run = signalled
cli.main(["optimize", {str(model_file)!r}, "-o", {str(tmp_path / "o.onnx")!r}, "--no-bench", "--no-check"],
         prog_name="onnxslim-yolo")
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == code and "raised" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [said]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["det.onnx"]


@pytest.mark.parametrize("command", ["check", "eval"])
def test_an_unwritable_json_path_is_refused_before_the_work(tmp_path: Path, model_file: Path, monkeypatch,
                                                          command):
    from onnxslim_yolo import check, evaluate

    def never(*a, **k):
        raise AssertionError("ran before the JSON path was checked")

    monkeypatch.setattr(check, "run_checks", never)
    monkeypatch.setattr(evaluate, "evaluate", never)
    (tmp_path / "afile").write_text("")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    extra = ["--images", images, "--labels", labels] if command == "eval" else []
    r = CliRunner().invoke(main, [command, str(model_file), "--json", str(tmp_path / "afile" / "o.json")] +
                           [str(e) for e in extra])
    assert r.exit_code == 2, r.output
    assert re.search(r"^error: .*afile/o.json: cannot write the JSON (report|figures) there \(", r.output,
                     re.M), r.output


@pytest.mark.parametrize("command", ["optimize", "eval", "check"])
def test_a_model_with_two_inputs_is_named_in_the_error(tmp_path: Path, model_file: Path, command):
    """A model-level problem found while feeding images names the model file: one line, the file
    and the reason (it named only the inputs before)."""
    from fixtures import demo_paths

    m = ir.load(model_file)
    m.graph.input.append(onnx.helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, [1]))
    two = tmp_path / "two.onnx"
    ir.save(m, two)
    images = demo_paths()[1]
    extra = {"optimize": ["-o", tmp_path / "o.onnx", "--int8", "--calib", images, "--no-bench"],
             "eval": ["--images", images, "--labels", images],
             "check": ["--images", images, "--no-latency"]}[command]
    r = CliRunner().invoke(main, [command, str(two)] + [str(e) for e in extra])
    assert r.exit_code == 2, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {two}: expected a model with one image input (beside it only scale_factor "
                      "(N, 2) or im_shape (N, 2)), found 2: ['images', 'scale']"]


def test_inspect_says_images_cannot_feed_a_model_with_two_inputs(tmp_path: Path, model_file: Path):
    """inspect showed such a model without a word, while optimize --calib, eval and check --images
    refuse it: the reason is a warning and the JSON's input_error."""
    m = ir.load(model_file)
    m.graph.input.append(onnx.helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, [1]))
    two = tmp_path / "two.onnx"
    ir.save(m, two)
    r = invoke("inspect", two, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    why = "expected a model with one image input (beside it only scale_factor (N, 2) or im_shape (N, 2)), " \
          "found 2: ['images', 'scale']"
    assert f"warning: {why}; images cannot feed it" in r.output
    figures = json.loads((tmp_path / "s.json").read_text())
    assert figures["input_error"] == why and "input" not in figures
    r = invoke("inspect", model_file, "--json", tmp_path / "one.json")
    assert "images cannot feed it" not in r.output
    assert "input_error" not in json.loads((tmp_path / "one.json").read_text())


def test_a_paddle_export_with_scale_factor_and_im_shape_is_optimized_and_checked(tmp_path: Path,
                                                                               model_file: Path):
    """PaddleDetection exports take im_shape (before the image) and scale_factor beside it, each
    (N, 2); they were refused as a second image input. Calibration, evaluation and the checks now
    feed the image's size and 1, and the INT8 model keeps all three inputs."""
    from fixtures import demo_paths
    from fixtures.postprocess import split_boxes_scores

    paddle = tmp_path / "paddle.onnx"
    ir.save(split_boxes_scores(ir.load(model_file), True, ("im_shape", "scale_factor")), paddle)
    images = demo_paths()[1]
    out = tmp_path / "paddle.int8.onnx"
    # the fixture is a YOLOv5 model: fed as one (a Paddle export is stretched by default, test_evaluate).
    # Every Conv INT8: placed by measured speed, the INT8 guard of this random-weight model (output
    # cosine about 0.81) can restore every layer, and no Q would be left to check
    from onnxslim_yolo import optimize
    res = optimize(paddle, out, int8=True, calib=images, labels=demo_paths()[2], preprocess="yolov5",
                   bench=False, progress=False, pass_options={"insert-qdq": {"placement": "all"}})
    got = ir.load(out)
    assert [i.name for i in got.graph.input] == ["im_shape", "images", "scale_factor"]
    assert any(n.op_type == "QuantizeLinear" for n in got.graph.node)
    checks = {c["name"]: c for c in res.to_dict()["checks"]["checks"]}
    assert checks["reference.numerics"]["status"] == "pass"
    # random weights in INT8: on an AVX2 machine (no VNNI) agreement lands near its floor (0.45 of
    # 0.5, excused by the reference's own 0.85), so a warning is as good as a pass here
    assert checks["accuracy.agreement"]["status"] in ("pass", "warn", "skip"), checks["accuracy.agreement"]
    e = invoke("eval", out, "--images", images, "--labels", demo_paths()[2])
    assert e.exit_code == 0 and "mAP@0.5:0.95" in e.output, e.output
    i = invoke("inspect", paddle, "--json", tmp_path / "i.json")
    fed = json.loads((tmp_path / "i.json").read_text())["input"]
    assert i.exit_code == 0 and fed["name"] == "images", i.output
    assert fed["also fed"] == f"im_shape = {fed['size (h, w)']}, scale_factor = [1, 1]"


def test_naming_file_leaves_messages_that_name_their_own_file(tmp_path: Path):
    from onnxslim_yolo.pass_base import PreconditionError, UsageError, naming_file

    e = naming_file(PreconditionError("no prunable channels"), "m.onnx")
    assert str(e) == "m.onnx: no prunable channels" and e.exit_code == 3 and isinstance(e, PreconditionError)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for msg in (f"{folder}: no images found", "--int8 needs calibration images", "m.onnx: bad"):
        assert str(naming_file(UsageError(msg), "m.onnx")) == msg
    assert str(naming_file(UsageError("x"), None)) == "x"
    # a path the message says is not there is the user's option, not the model (it was prefixed)
    for msg in ("/no/such/dir: image folder does not exist", "/x/ref.onnx: reference model not found",
                "labels.json: no such label file"):
        assert str(naming_file(UsageError(msg), "m.onnx")) == msg
    assert str(naming_file(UsageError("output 'y' not found"), "m.onnx")) == "m.onnx: output 'y' not found"
    assert str(naming_file(UsageError("node 'a': input not found"), "m.onnx")).startswith("m.onnx: node")
    from onnxslim_yolo.openvino_rt import OpenVinoError   # its __init__ takes two arguments: copy.copy failed
    named = naming_file(OpenVinoError("cannot load the model", RuntimeError("no")), "m.onnx")
    assert isinstance(named, OpenVinoError) and str(named) == "m.onnx: OpenVINO cannot load the model: no"


def _no_outputs(folder: Path, keep: set) -> bool:
    return {p.name for p in folder.iterdir()} == keep


@pytest.mark.parametrize("case, code, message", [
    ("missing", 2, r"error: .*missing.onnx: no such file"),
    ("junk", 2, r"error: .*junk.onnx: not a readable ONNX model"),
    ("truncated", 2, r"error: .*truncated.onnx: not a readable ONNX model"),
    ("dynamic", 3, r"error: .*input 'images' has no static shape"),
    ("unknown-pass", 2, r"error: unknown pass 'no-such-pass'; known passes:"),
    ("overwrite", 2, r"error: .*refusing to overwrite the input model"),
    ("int8-no-calib", 2, r"error: --int8 needs calibration images"),
    ("custom-op", 3, r"error: .*plugin.onnx: node 'nms' is TRT.EfficientNMS_TRT, which onnxruntime "
                     r"cannot run"),
    ("custom-op-in-if", 3, r"error: .*plugin_if.onnx: node 'EfficientNMS_TRT\(nms_out\)' is "
                           r"TRT.EfficientNMS_TRT, which onnxruntime cannot run"),
    ("shape-conflict", 2, r"error: --input-shape \[1, 3, 32, 32\]: input 'images' is \[1, 3, 64, 64\], "
                          r"and axis 2 is fixed at 64; only its symbolic dims can be set"),
    ("no-weights-file", 2, r"error: .*ext.onnx: its weights are stored in 'ext.onnx.data' beside it "
                           r"\(external data\), and that file is missing"),
    # checked before the pipeline runs, not after it (a traceback at the end before 2026-12-06)
    ("unwritable-output", 2, r"error: .*afile/o.onnx: cannot write the optimized model there \("),
    ("unwritable-report", 2, r"error: .*afile/r.json: cannot write the report there \("),
    # graphs onnxruntime cannot run: the checker's or onnxruntime's words before, no file, no node
    ("unknown-op", 3, r"error: .*unknown_op.onnx: node 'act' is FooBarOp, which is no ONNX operator at "
                      r"opset 13; export the model without it$"),
    ("no-outputs", 2, r"error: .*no_outputs.onnx: the graph has no outputs"),
    ("undefined-input", 2, r"error: .*undefined.onnx: node 'Conv\(.*\)' reads 'images', which is no graph "
                           r"input, initializer or node output"),
    # --labels on outputs that are no detections: refused before the passes (it failed after them)
    ("labels-not-detections", 2, r"error: .*maps.onnx: --labels needs detections, and the outputs are none "
                                 r"this tool decodes \(output of shape \[1, 5, 8, 8\]; expected"),
])
def test_bad_input_one_line_error_and_nothing_written(tmp_path: Path, model_file: Path, case, code, message):
    args = ["optimize"]
    target = model_file
    extra: list = ["--no-bench"]
    if case == "missing":
        target = tmp_path / "missing.onnx"
    elif case == "junk":
        target = tmp_path / "junk.onnx"
        target.write_text("not onnx")
    elif case == "truncated":
        target = tmp_path / "truncated.onnx"
        target.write_bytes(model_file.read_bytes()[:2000])
    elif case == "dynamic":  # a lossy pass needs a static size; exact ones keep it dynamic (below)
        m = ir.load(model_file)
        m.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"
        target = tmp_path / "dyn.onnx"
        onnx.save(m, target)
        extra += ["--prune", "0.1"]
    elif case == "unknown-pass":
        extra += ["--passes", "canonicalize,no-such-pass"]
    elif case == "overwrite":
        extra += ["-o", model_file]
    elif case == "int8-no-calib":
        extra += ["--int8"]
    elif case == "custom-op":  # an end-to-end export's TensorRT NMS plugin on the head output
        m = ir.load(model_file)
        head = m.graph.output[0].name
        m.graph.node.append(onnx.helper.make_node("EfficientNMS_TRT", [head], ["num_dets"], name="nms",
                                                  domain="TRT"))
        m.opset_import.append(onnx.helper.make_opsetid("TRT", 1))
        target = tmp_path / "plugin.onnx"
        onnx.save(m, target)
    elif case == "custom-op-in-if":  # the plugin, unnamed, in one branch of an If
        m = ir.load(model_file)
        head = m.graph.output[0].name
        out = onnx.helper.make_tensor_value_info("nms_out", onnx.TensorProto.FLOAT, None)
        then = onnx.helper.make_graph([onnx.helper.make_node("EfficientNMS_TRT", [head], ["nms_out"],
                                                             domain="TRT")], "then", [], [out])
        other = onnx.helper.make_graph([onnx.helper.make_node("Identity", [head], ["nms_out"])], "else",
                                       [], [out])
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "use_plugin"))
        m.graph.node.append(onnx.helper.make_node("If", ["use_plugin"], ["selected"], name="select",
                                                  then_branch=then, else_branch=other))
        m.graph.output.append(onnx.helper.make_tensor_value_info("selected", onnx.TensorProto.FLOAT, None))
        m.opset_import.append(onnx.helper.make_opsetid("TRT", 1))
        target = tmp_path / "plugin_if.onnx"
        onnx.save(m, target)
    elif case == "shape-conflict":  # a static size is not changed by --input-shape
        extra += ["--input-shape", "1,3,32,32"]
    elif case == "no-weights-file":  # a dynamo export copied without its .onnx.data
        target = tmp_path / "ext.onnx"
        onnx.save(ir.load(model_file), target, save_as_external_data=True, location="ext.onnx.data",
                  size_threshold=0)
        (tmp_path / "ext.onnx.data").unlink()
    elif case == "labels-not-detections":  # one map of 5 channels: no layout reads it
        w = onnx.numpy_helper.from_array(np.full((5, 3, 8, 8), 0.01, np.float32), "w")
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Conv", ["images", "w"], ["maps"], strides=[8, 8])], "maps",
            [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 3, 64, 64])],
            [onnx.helper.make_tensor_value_info("maps", onnx.TensorProto.FLOAT, [1, 5, 8, 8])], [w])
        target = tmp_path / "maps.onnx"
        opsets = [onnx.helper.make_opsetid("", 13)]
        onnx.save(onnx.helper.make_model_gen_version(graph, opset_imports=opsets), target)
        _, images, labels = fixtures.demo_paths()
        extra += ["--calib", images, "--labels", labels, "--calib-limit", "2", "-o", tmp_path / "o.onnx"]
    elif case in ("unknown-op", "no-outputs", "undefined-input"):
        m = ir.load(model_file)
        if case == "unknown-op":
            n = next(n for n in m.graph.node if n.op_type in ("Sigmoid", "Relu", "Mul"))
            n.op_type, n.name = "FooBarOp", "act"
        elif case == "no-outputs":
            del m.graph.output[:]
        else:   # the image input taken out, its readers left (the first one unnamed)
            del m.graph.input[0]
            next(n for n in m.graph.node if "images" in n.input).name = ""
        target = tmp_path / {"unknown-op": "unknown_op.onnx", "no-outputs": "no_outputs.onnx",
                             "undefined-input": "undefined.onnx"}[case]
        onnx.save(m, target)
    elif case.startswith("unwritable"):   # a file where the output's folder should be
        (tmp_path / "afile").write_text("")
        extra += ["-o", tmp_path / "afile" / "o.onnx"] if case.endswith("output") else \
            ["-o", tmp_path / "o.onnx", "--report", tmp_path / "afile" / "r.json"]
    keep = {p.name for p in tmp_path.iterdir()}
    snapshot = model_file.read_bytes()
    r = CliRunner().invoke(main, args + [str(target)] + [str(e) for e in extra])
    assert r.exit_code == code, r.output
    assert re.search(message, r.output), r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1
    assert _no_outputs(tmp_path, keep)
    assert model_file.read_bytes() == snapshot


def test_exact_passes_keep_a_dynamic_size_and_verify_at_the_metadata_size(model_file: Path, tmp_path: Path):
    m = ir.load(model_file)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    hw = [dims[2].dim_value, dims[3].dim_value]
    for i, name in ((0, "batch"), (2, "height"), (3, "width")):
        dims[i].dim_param = name
    onnx.helper.set_model_props(m, {"imgsz": str(hw)})
    src = tmp_path / "dyn.onnx"
    onnx.save(m, src)
    r = invoke("optimize", src, "-o", tmp_path / "o.onnx", "--no-bench", "--report", tmp_path / "rep.json")
    assert r.exit_code == 0, r.output
    out = ir.load(tmp_path / "o.onnx")
    assert [d.dim_param or d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == \
        ["batch", 3, "height", "width"]
    rep = json.loads((tmp_path / "rep.json").read_text())
    ver = rep["passes"][0]["verification"]
    assert rep["passes"][0]["name"] == "canonicalize" and ver and min(d["cosine"] for d in ver) > 0.99999
    assert rep["summary"]["outputs"][0]["cosine"] > 0.99999
    checks = {c["name"]: c for c in rep["checks"]["checks"]}
    assert checks["reference.io"]["status"] == "pass"
    assert checks["structure.dynamic_dims"]["status"] == "warn"


def test_int8_of_a_dynamic_size_runs_at_the_metadata_size(model_file: Path, tmp_path: Path, caplog):
    """An Ultralytics export with dynamic axes names its size in ``imgsz``: INT8 calibrates at it
    with no --input-shape, fixes the result to it and says so; `inspect` counts MACs at it."""
    from fixtures import demo_paths

    _, images, _ = demo_paths()
    m = ir.load(model_file)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    static = [d.dim_value for d in dims]
    for i, name in ((2, "height"), (3, "width")):
        dims[i].dim_param = name
    onnx.helper.set_model_props(m, {"imgsz": str(static[2:])})
    src = tmp_path / "dyn.onnx"
    onnx.save(m, src)
    # the TensorRT target quantizes every Conv: on ort-cpu, a loaded machine can measure each one
    # slower in INT8 at this tiny size, and then nothing is calibrated
    r = invoke("optimize", src, "-o", tmp_path / "q.onnx", "--int8", "--calib", images, "--calib-limit", "4",
               "--target", "tensorrt", "--no-bench", "--no-check", "--quiet",
               "--report", tmp_path / "rep.json")
    assert r.exit_code == 0, r.output
    assert f"INT8 and pruning run at {static}, the size its metadata names" in caplog.text
    out = ir.load(tmp_path / "q.onnx")
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == static
    # calibrated on the 4 images at that size (how many Convs end up INT8 is measured per machine)
    passes = json.loads((tmp_path / "rep.json").read_text())["passes"]
    qdq = next(p for p in passes if p["name"] == "insert-qdq")
    assert qdq["report"]["details"]["calibration"]["calibration"]["samples"] == 4
    r = invoke("inspect", src, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    dyn = json.loads((tmp_path / "s.json").read_text())
    fixed = json.loads(_inspect_json(model_file, tmp_path).read_text())
    assert dyn["macs"] == fixed["macs"] > 0 and dyn["macs_at"] == static
    assert f"at input {static} (the input size is dynamic)" in r.output


def test_inspect_reads_the_head_of_a_dynamic_size_export_at_the_size_it_counts(tmp_path: Path):
    """Ultralytics' ``dynamic=True`` export declares its output (batch, 84, anchors), computed from
    the input's size: inspect counted MACs at the metadata's size but read the head on the symbolic
    graph (a YOLO11n: "unknown layout", strides [], no classes; here strides [])."""
    m = fixtures.build_yolov8(opset=13)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    static = [d.dim_value for d in dims]
    for i, name in ((2, "height"), (3, "width")):
        dims[i].dim_param = name
    m.graph.output[0].type.tensor_type.shape.dim[2].dim_param = "anchors"
    onnx.helper.set_model_props(m, {"imgsz": str(static[2:])})
    src = tmp_path / "dyn.onnx"
    onnx.save(m, src)
    ir.save(fixtures.build_yolov8(opset=13), tmp_path / "v8.onnx")
    fixed = json.loads(_inspect_json(tmp_path / "v8.onnx", tmp_path).read_text())["head"]
    for extra in ([], ["--input-shape", ",".join(map(str, static))]):
        r = invoke("inspect", src, *extra, "--json", tmp_path / "s.json")
        assert r.exit_code == 0, r.output
        head = json.loads((tmp_path / "s.json").read_text())["head"]
        assert head["strides"] == fixed["strides"] == [8, 16, 32]
        assert head["layout"] == fixed["layout"] and head["num_classes"] == fixed["num_classes"]


def _inspect_json(model: Path, tmp_path: Path) -> Path:
    path = tmp_path / "static.json"
    assert invoke("inspect", model, "--json", path).exit_code == 0
    return path


def test_inspect_real_yolov5n(yolov5n_path: Path, tmp_path: Path):
    r = invoke("inspect", yolov5n_path, "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["op_counts"]["Conv"] == 60
    assert 1.85e6 < s["params"] < 1.89e6
    assert 2.2e9 < s["macs"] < 2.26e9 and s["flops"] == 2 * s["macs"]


def _demo_command() -> list:
    """The optimize command that `make demo` (the README's demo) runs, with the venv prefix removed."""
    text = (REPO / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) :?= (.*)$", text, re.M))
    line = next(ln.strip() for ln in text.splitlines() if "onnxslim-yolo optimize" in ln)
    line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), line)
    argv = shlex.split(line)
    return argv[argv.index("optimize"):]


def test_readme_commands_are_the_makefile_targets():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
    # the demo command quoted in the README is the one `make demo` runs
    quoted = re.search(r"(onnxslim-yolo optimize fixtures/demo[^`]*?)\n```", readme).group(1)
    assert shlex.split(quoted.replace("\\\n", " "))[1:] == _demo_command()


@pytest.mark.slow
def test_readme_demo_command_runs(tmp_path: Path, monkeypatch):
    argv = _demo_command()
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo.opt.onnx"
    i = argv.index("-o")
    argv[i + 1] = str(out)
    if "--report" in argv:
        j = argv.index("--report")
        argv[j + 1] = str(tmp_path / "demo.json")
    r = CliRunner().invoke(main, argv, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert out.exists() and "accuracy.agreement" in r.output and "PASS:" in r.output
    # the demo model has a Focus stem and BatchNorm: both must be gone
    g = onnx.load(str(out)).graph
    assert "BatchNormalization" not in [n.op_type for n in g.node]
    assert [n.op_type for n in g.node if g.input[0].name in n.input] == ["Conv"]
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.slow
def test_optimize_prune_writes_kept_channels_json(model_file: Path, tmp_path: Path):
    from fixtures import demo_paths

    _, images, _ = demo_paths()
    kept = tmp_path / "kept.json"
    out = tmp_path / "pruned.onnx"
    r = invoke("optimize", model_file, "--prune", "0.2", "--calib", images, "--round-to", "1", "--no-bench",
               "--no-check", "--quiet", "--kept-json", kept, "-o", out)
    assert r.exit_code == 0, r.output
    doc = json.loads(kept.read_text())
    assert doc["mac_reduction"] >= 0.2 and doc["macs_after"] < doc["macs_before"]
    pruned = ir.load(out)
    shrunk = {n: v for n, v in doc["layers"].items() if v["out_channels"][1] < v["out_channels"][0]}
    assert shrunk
    inits = {t.name: t for t in pruned.graph.initializer}
    for node in pruned.graph.node:
        if node.name in shrunk:
            assert inits[node.input[1]].dims[0] == len(shrunk[node.name]["kept_out"])
    # a run that fails its contract writes no model, and so no JSON: the pass wrote it first, and
    # the pair on disk no longer matched (filter L1 without calibration breaks the lossy floor here)
    before = kept.read_bytes()
    r = invoke("optimize", model_file, "--prune", "0.5", "--round-to", "1", "--no-bench", "--quiet",
               "--kept-json", kept, "-o", tmp_path / "failed.onnx")
    assert r.exit_code == 4 and "below the lossy floor" in r.output, r.output
    assert kept.read_bytes() == before and not (tmp_path / "failed.onnx").exists()


@pytest.mark.parametrize("extra, expect", [
    ([], "images fed as yolov5: RGB, pixels / 255 (0-1), letterbox centred (chosen by the default: "
         "nothing in the model names another family; --preprocess to change)"),
    (["--preprocess", "yolox"], "images fed as yolox: BGR, pixel values 0-255, letterbox top-left "
                                "(as --preprocess asked)")])
def test_optimize_says_how_images_are_fed(model_file: Path, tmp_path: Path, extra, expect):
    """A wrong guess of the preprocessing ruins calibration silently (the agreement check only
    sees it afterwards), so the summary names the preprocessing and what chose it."""
    from fixtures import demo_paths

    _, images, _ = demo_paths()
    r = invoke("optimize", model_file, "--calib", images, "--calib-limit", 2, "--no-bench", "--no-check",
               "--quiet", "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", *extra)
    assert r.exit_code == 0, r.output
    assert expect in r.output
    fed = json.loads((tmp_path / "r.json").read_text())["summary"]["images"]
    assert expect == f"images fed as {fed['preprocessing']} (" + (
        "as --preprocess asked)" if extra else f"chosen by {fed['chosen_by']}; --preprocess to change)")
    r = invoke("optimize", model_file, "--no-bench", "--no-check", "--quiet", "-o", tmp_path / "p.onnx")
    assert r.exit_code == 0 and "images fed as" not in r.output


@pytest.mark.parametrize("pipeline", [[], ["--int8"], ["--prune", "0.2"]])
def test_optimize_over_the_protobuf_limit(model_file: Path, tmp_path: Path, monkeypatch, pipeline):
    """With the 2 GiB limit lowered below the fixture's size every step takes its large-model path:
    shape inference without weights, checker and sessions from files, external data on save."""
    from fixtures import demo_paths

    _, images, _ = demo_paths()
    monkeypatch.setattr(ir, "PROTO_LIMIT", 50_000)
    assert ir.model_size(ir.load(model_file)) > ir.PROTO_LIMIT
    if "--int8" in pipeline:  # every Conv INT8 whatever this machine measures: the floor below is fixed
        from onnxslim_yolo.quant.pipeline import Quantizer
        monkeypatch.setattr(Quantizer, "_filter", lambda self, node: None)
    out = tmp_path / "big.opt.onnx"
    calib = ["--calib", images, "--calib-limit", "4"] if pipeline else []
    # a random-weight fixture pruned by 20% on 4 images fails the agreement check by design
    check = ["--no-check"] if "--prune" in pipeline else []
    r = invoke("optimize", model_file, *pipeline, *calib, *check, "--no-bench", "--quiet", "-o", out,
               "--report", tmp_path / "rep.json")
    assert r.exit_code == 0, r.output
    data = tmp_path / "big.opt.onnx.data"
    assert data.exists() and data.stat().st_size > out.stat().st_size
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert check or rep["checks"]["verdict"].startswith("PASS")
    floor = {"exact": 0.99999, "--int8": 0.95, "--prune": 0.3}[pipeline[0] if pipeline else "exact"]
    assert rep["summary"]["outputs"][0]["cosine"] > floor
    assert all(p["modified"] for p in rep["passes"] if p["name"] in ("fold-batchnorm", "insert-qdq",
                                                                   "prune-channels"))
    monkeypatch.undo()
    back = ir.load(out)
    written = onnx.load(str(out), load_external_data=False).graph.initializer
    large = [t for t in written if t.dims and np.prod(t.dims) > 1024]
    assert large and all(t.data_location == onnx.TensorProto.EXTERNAL for t in large)
    onnx.checker.check_model(str(out), full_check=True)
    assert back.graph.node


def test_a_channels_last_model_is_calibrated_and_scored_from_images(tmp_path: Path):
    """The demo model behind a Transpose (tf2onnx's NHWC input): its detections on the demo images
    equal the NCHW model's, and INT8 calibrated from the same images quantizes the same layers
    with the same ranges (every layer INT8, so the CPU's timings do not choose)."""
    from fixtures import demo_paths
    from fixtures.layout import channels_last_input
    from onnxslim_yolo.api import optimize
    from onnxslim_yolo.evaluate import detections

    model_path, images, _ = demo_paths()
    nchw = ir.load(model_path)
    nhwc = channels_last_input(nchw)
    ref = detections(nchw, images, progress=False, threads=1)
    got = detections(nhwc, images, progress=False, threads=1)
    assert sum(len(d) for d in ref) > 0 and [d.key for d in got] == [d.key for d in ref]
    for a, b in zip(ref, got):
        assert np.allclose(a.boxes, b.boxes, atol=1e-3) and np.allclose(a.scores, b.scores, atol=1e-5)
    opts = dict(int8=True, calib=images, bench=False, check=False, progress=False,
                pass_options={"insert-qdq": {"placement": "all", "guard": False}})
    q_ref, q_got = optimize(nchw, **opts), optimize(nhwc, **opts)
    counts = [next(r for r in q.pipeline.records if r.name == "insert-qdq").report["counts"]
              for q in (q_ref, q_got)]
    assert counts[0]["int8_layers"] == counts[1]["int8_layers"] > 0

    def q_params(m: onnx.ModelProto) -> dict:
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
        return {n.input[0].replace("images_nchw", "images"):
                (float(inits[n.input[1]]), int(inits[n.input[2]]))
                for n in m.graph.node if n.op_type == "QuantizeLinear"}

    # the same calibration data gave every quantized tensor the same scale and zero point; the
    # image's own range is searched at the graph input in one, behind the Transpose in the other
    ref_q, got_q = q_params(q_ref.model), q_params(q_got.model)
    (s_ref, z_ref), (s_got, z_got) = ref_q.pop("images"), got_q.pop("images")
    assert len(ref_q) > 100 and got_q == ref_q
    assert z_ref == z_got and s_got == pytest.approx(s_ref, rel=0.01)


@pytest.mark.parametrize("how", ["uint8", "div", "mul"])
def test_a_model_normalising_its_input_is_fed_pixel_values(how: str):
    """The demo model taking pixels 0-255 (a uint8 input, or Div 255 / Mul 1/255 inside): its
    calibration feeds hold the pixel values, and on them it outputs what the original model
    outputs on its own feeds."""
    from fixtures import demo_paths
    from fixtures.layout import pixel_input
    from onnxslim_yolo import verify
    from onnxslim_yolo.data import load_calibration

    model_path, images, _ = demo_paths()
    f32 = ir.load(model_path)
    px = pixel_input(f32, how)
    feeds = [load_calibration(images, m, limit=3, progress=False) for m in (f32, px)]
    assert all(f["images"].max() > 200 for f in feeds[1]) and all(f["images"].max() <= 1 for f in feeds[0])
    assert feeds[1][0]["images"].dtype == (np.uint8 if how == "uint8" else np.float32)
    outs = [[verify.run(verify.session(m, threads=1), f)[0] for f in fs] for m, fs in zip((f32, px), feeds)]
    for a, b in zip(*outs):
        assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()


def test_feed_detections_read_a_channels_last_feed_in_its_layout():
    """Mixed precision's label-free loss runs the model on preprocessed feeds: an NHWC feed's size
    is its axes 1-2 (before, axes 2-3 read as 640 x 3 and the boxes came out clipped to 3 px)."""
    from fixtures import demo_paths
    from fixtures.layout import channels_last_input
    from onnxslim_yolo import data
    from onnxslim_yolo.evaluate import feed_detections

    model_path, images, _ = demo_paths()
    nchw = ir.load(model_path)
    name, (_, h, w) = data.model_input(nchw)
    x = next(iter(data.iter_images(images, data.get_preset(None, nchw), (h, w), 1, False)))[0][None]
    ref = feed_detections(nchw, [{name: x}], threads=1)
    got = feed_detections(channels_last_input(nchw), [{name: x.transpose(0, 2, 3, 1).copy()}], threads=1)
    assert len(ref[0]) > 0 and got[0].hw == ref[0].hw == (h, w)
    assert np.allclose(got[0].boxes, ref[0].boxes, atol=1e-3)


def test_api_options_take_a_comma_separated_string_and_name_an_unknown_keyword(model_file: Path):
    """A string of pass names was read as a sequence of letters ("unknown pass 'c'"), and an
    unknown keyword raised a bare TypeError."""
    import onnxslim_yolo as osy
    from onnxslim_yolo.api import OptimizeOptions
    from onnxslim_yolo.pass_base import UsageError

    opts = OptimizeOptions(passes="canonicalize, fold-batchnorm", skip="merge-branches")
    assert opts.passes == ["canonicalize", "fold-batchnorm"] and opts.skip == ["merge-branches"]
    res = osy.optimize(str(model_file), passes="canonicalize", bench=False, check=False)
    assert [r.name for r in res.pipeline.records] == ["canonicalize"]
    with pytest.raises(UsageError, match=r"optimize: .*'bogus'"):
        osy.optimize(str(model_file), bogus=1)


def test_a_dump_folder_holding_the_input_model_is_refused(tmp_path: Path, model_file: Path):
    """Optimizing a dump (NN_PASS.onnx) with --dump-dir its own folder overwrote it."""
    dump = tmp_path / "dump"
    dump.mkdir()
    src = dump / "02_fold-batchnorm.onnx"
    src.write_bytes(model_file.read_bytes())
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "o.onnx"),
                                  "--dump-dir", str(dump)])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: {dump}: --dump-dir holds the input model 02_fold-batchnorm.onnx, which a dump could "
        "overwrite; choose another folder"], r.output
    assert src.read_bytes() == model_file.read_bytes()


def test_an_unwritable_dump_folder_and_empty_paths_are_refused_before_the_work(tmp_path: Path,
                                                                              model_file: Path, monkeypatch):
    """A dump folder that takes no file was refused once the first pass's model was dumped; an
    empty MODEL gave a traceback, and an empty -o wrote MODEL.opt.onnx."""
    from onnxslim_yolo import api

    def never(*a, **k):
        raise AssertionError("the run started")
    monkeypatch.setattr(api, "build_context", never)
    (tmp_path / "afile").write_text("")
    r = CliRunner().invoke(main, ["optimize", str(model_file), "-o", str(tmp_path / "o.onnx"),
                                  "--dump-dir", str(tmp_path / "afile" / "dump")])
    want = r"error: .*afile/dump/00_dump.onnx: cannot write the model dumps \(--dump-dir\) there \(.*\)"
    assert r.exit_code == 2 and re.fullmatch(want, r.output.strip()), r.output
    for args, what in ((["optimize", ""], "MODEL"),
                       (["optimize", str(model_file), "-o", " "], "-o/--output")):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, r.output
        assert r.output.strip() == f"error: {what}: empty path; give a file name", r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "det.onnx"]


def test_a_sparse_initializer_is_a_defined_tensor():
    """A node reading a sparse initializer was refused as reading a tensor nothing defines."""
    from onnx import TensorProto, helper

    from onnxslim_yolo.api import _refuse_unrunnable

    values = helper.make_tensor("w", TensorProto.FLOAT, [1], [2.0])
    sparse = helper.make_sparse_tensor(values, helper.make_tensor("w_idx", TensorProto.INT64, [1], [0]), [4])
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                          sparse_initializer=[sparse])
    _refuse_unrunnable(helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)]), None)


@pytest.mark.parametrize("breakage, message", [
    ("duplicate_names", "two nodes with same node name"),
    ("ir_too_new", "Unsupported model IR version"),
])
def test_a_model_onnxruntime_will_not_load_is_refused_up_front(tmp_path: Path, breakage, message):
    """It reached the first pass and failed there (exit 4, a pass blamed), after graphsurgeon printed
    23,706 lines for a yolov5n whose nodes shared one name; inspect gave its figures without a word."""
    m = fixtures.build_yolov5_v6(opset=13)
    if breakage == "duplicate_names":
        for n in m.graph.node:
            n.name = "node"
    else:
        m.ir_version = onnx.IR_VERSION + 2
    src = tmp_path / "bad.onnx"
    onnx.save(m, str(src))
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "out.onnx"), "--no-bench"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith(f"error: {src}: onnxruntime cannot load the model") and message in lines[0]
    assert lines[0].endswith("the input model must load in onnxruntime")
    assert not (tmp_path / "out.onnx").exists()
    r = CliRunner().invoke(main, ["inspect", str(src), "--json", str(tmp_path / "i.json")])
    assert r.exit_code == 0 and "warning: onnxruntime cannot load the model" in r.output
    assert json.loads((tmp_path / "i.json").read_text())["loads_in_onnxruntime"] is False


def test_an_input_shape_the_model_cannot_run_at_is_refused_up_front(tmp_path: Path):
    """A dynamic export whose grids hold its export size (a Concat of two levels) failed the first
    pass at another --input-shape (exit 4, canonicalize blamed, onnxruntime's log line first)."""
    m = fixtures.build_yolov5_v6(opset=13)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for i, name in ((2, "h"), (3, "w")):
        dims[i].dim_param = name
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.shape.dim[1].dim_param = "rows"
    src = tmp_path / "dyn.onnx"
    onnx.save(m, str(src))
    ok = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "a.onnx"), "--no-bench",
                                   "--input-shape", "1,3,64,64"])
    assert ok.exit_code == 0, ok.output
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "b.onnx"), "--no-bench",
                                  "--input-shape", "1,3,96,96"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith(f"error: {src}: does not run at --input-shape 1,3,96,96 (onnxruntime failed")


def test_calibration_arrays_are_what_optimize_checks_the_result_on(model_file: Path, tmp_path: Path):
    """With --calib arrays (no image folder), the final checks and the summary compared on seeded
    random inputs, where a pruned model looks far off: the same model passed from images and
    failed (exit 1, class-score cosine 0.60) from the arrays of those images."""
    from fixtures import demo_paths
    from onnxslim_yolo import data

    _, images, _ = demo_paths()
    feeds = data.load_calibration(images, ir.load(model_file), progress=False)
    arrays = tmp_path / "calib.npy"
    np.save(arrays, np.concatenate([next(iter(f.values())) for f in feeds]))
    report = tmp_path / "r.json"
    r = invoke("optimize", model_file, "--prune", "0.1", "--calib", arrays, "--no-bench", "--quiet",
               "-o", tmp_path / "p.onnx", "--report", report)
    assert r.exit_code == 0, r.output
    doc = json.loads(report.read_text())
    num = next(c for c in doc["checks"]["checks"] if c["name"] == "reference.numerics")
    assert num["details"]["feeds"] == "2 calibration arrays" and num["status"] == "pass"
    # the same model compared on seeded random inputs, as before: it fails there
    from onnxslim_yolo.check import numerics
    noise = numerics.input_feeds(ir.load(model_file), None, 2, 0, None, None)
    assert numerics.check_numerics(ir.load(tmp_path / "p.onnx"), ir.load(model_file), noise, 0.9,
                                   "seeded random inputs").status == "fail"


def test_pass_options_name_real_passes_and_per_layer_ratios_prune(model_file: Path):
    """A misspelled pass in pass_options was ignored; per-layer ratios without prune= never ran."""
    from onnxslim_yolo.api import optimize
    from onnxslim_yolo.pass_base import UsageError

    with pytest.raises(UsageError, match=r"pass_options name no pass 'prune_channels'; the passes are .*"
                                         r"prune-channels"):
        optimize(str(model_file), pass_options={"prune_channels": {"round_to": 1}}, bench=False, check=False)
    _, images, _ = fixtures.demo_paths()
    per_layer = {"per_layer": {"model.2/m.0/cv1/Conv": 0.5}, "round_to": 1}
    res = optimize(str(model_file), pass_options={"prune-channels": per_layer}, calib=str(images),
                   bench=False, check=False, progress=False)
    rec = next(r for r in res.pipeline.records if r.name == "prune-channels")
    assert rec.modified and res.summary["after"]["macs"] < res.summary["before"]["macs"]


def test_the_api_quantizes_for_its_target_within_its_drop_and_refuses_what_cannot_work(model_file: Path):
    """optimize(target=, max_drop=) reached only the checks: the model was quantized for onnxruntime
    whatever the target, and mixed precision never ran. Bad values ran too (calib_limit=-3 left the
    last 3 images out), or failed after the exact passes (int8 without calib)."""
    from onnxslim_yolo.api import optimize
    from onnxslim_yolo.pass_base import UsageError

    _, images, labels = fixtures.demo_paths()
    base = dict(int8=True, calib=str(images), bench=False, check=False, progress=False, calib_limit=4)
    trt = optimize(str(model_file), target="tensorrt", **base)
    zero_points = [t for t in trt.model.graph.initializer if t.name.endswith("zero_point")]
    assert zero_points and all(t.data_type == onnx.TensorProto.INT8 for t in zero_points)
    rec = next(r for r in trt.pipeline.records if r.name == "insert-qdq")
    assert rec.report["details"]["target"] == "tensorrt"
    mixed = optimize(str(model_file), labels=str(labels), max_drop=50.0, **base)
    rec = next(r for r in mixed.pipeline.records if r.name == "insert-qdq")
    assert rec.report["details"]["mixed_precision"]["max"] == 50.0
    for kwargs, message in (
            (dict(base, target="bogus"), r"target 'bogus' is none of ort-cpu, tensorrt, openvino"),
            (dict(base, calib_limit=-3), r"calib_limit must be a whole number of images >= 1, got -3"),
            (dict(base, calib=None), r"insert-qdq needs calibration images: pass calib="),
            (dict(base, target="tensorrt", pass_options={"insert-qdq": {"target": "openvino"}}),
             r"pass_options\['insert-qdq'\]\['target'\] 'openvino' contradicts target='tensorrt'"),
            (dict(base, target="ort-cpu", pass_options={"insert-qdq": {"target": "openvino"}}),
             r"pass_options\['insert-qdq'\]\['target'\] 'openvino' contradicts target='ort-cpu'"),
            (dict(base, skip=["insert-qdq"]), r"skip removes insert-qdq, which int8 asks for")):
        with pytest.raises(UsageError, match=message):
            optimize(str(model_file), **kwargs)


def test_the_api_checks_and_times_for_the_target_a_pass_option_quantized_for(model_file: Path):
    """pass_options={"insert-qdq": {"target": "tensorrt"}} without target= quantized for TensorRT,
    but the checks judged the model by onnxruntime-CPU's rules: target= defaulted to ort-cpu, and
    a default could not be told from an ort-cpu asked for (which contradicts the pass option)."""
    from onnxslim_yolo.api import OptimizeOptions, optimize

    _, images, _ = fixtures.demo_paths()
    res = optimize(str(model_file), int8=True, calib=str(images), calib_limit=2, bench=False,
                   progress=False, pass_options={"insert-qdq": {"target": "tensorrt"}})
    rec = next(r for r in res.pipeline.records if r.name == "insert-qdq")
    assert rec.report["details"]["target"] == "tensorrt" and res.checks.target == "tensorrt"
    assert OptimizeOptions().target == "ort-cpu"


def test_the_api_names_a_value_of_the_wrong_kind_and_an_option_no_pass_reads(model_file: Path):
    """Wrong kinds were tracebacks inside the pipeline (input_shape="1,3,32,32": int(','); seed="x";
    bench_runs=0 after the whole pipeline) or blamed a pass (exit 4); options= with keywords ran
    without the keywords; a misspelt option of an exact pass, or for a misspelt pass, was ignored."""
    from onnxslim_yolo.api import OptimizeOptions, optimize
    from onnxslim_yolo.pass_base import Tolerances, UsageError

    fast = dict(bench=False, check=False, progress=False)
    for kwargs, message in (
            (dict(int8="no"), r"^int8='no': expected True or False$"),
            (dict(prune="0.1"), r"^prune='0.1': expected a number$"),
            (dict(seed="x"), r"^seed='x': expected a whole number$"),
            (dict(input_shape="1,3,a,32"), r"^input_shape '1,3,a,32': expected numbers like 1,3,640,640$"),
            (dict(tolerances={"exact": 1}), r"^tolerances: .*unexpected keyword argument 'exact'"),
            (dict(pass_options={"fold-batchnorm": "keep"}), r"^pass_options=.*expected \{pass name: "),
            (dict(bench_runs=0), r"^bench_runs=0, threads=2: bench_runs must be at least 1"),
            (dict(pass_options={"fold-batchnorm": {"shared_weight": "keep"}}),
             r"fold-batchnorm: unknown option 'shared_weight' \(known: standalone, shared_weights\)$"),
            (dict(pass_options={"merge-branches": {"x": 1}}),
             r"merge-branches: unknown option 'x' \(it takes none\)"),
            (dict(pass_options={"fold-batchnrom": {}}), r"^pass_options name no pass 'fold-batchnrom'"),
            (dict(options=OptimizeOptions(**fast), int8=True),
             r"^optimize: give options= or keyword options, not both \(got options= and int8\)$")):
        with pytest.raises(UsageError, match=message):
            optimize(str(model_file), **(kwargs if "options" in kwargs else dict(fast, **kwargs)))
    with pytest.raises(UsageError, match=r"^optimize takes a model path or an onnx.ModelProto, got bytes"):
        optimize(model_file.read_bytes(), **fast)
    # numpy's numbers are numbers
    assert OptimizeOptions(calib_limit=np.int64(4), prune=np.float32(0.1)).calib_limit == 4
    opts = OptimizeOptions(input_shape="1,3,32,32", tolerances={"exact_rtol": 1e-3})
    assert opts.input_shape == [1, 3, 32, 32] and opts.tolerances == Tolerances(exact_rtol=1e-3)


def test_a_pass_instance_written_in_code_runs_in_optimize(model_file: Path):
    """passes= took names only: a pass defined in the caller's code lost optimize's calibration,
    checks and summary unless installed as a plugin."""
    from onnxslim_yolo.api import optimize
    from onnxslim_yolo.pass_base import Numerics, Pass, PassReport, PassResult, UsageError

    class Tag(Pass):
        name = "tag-model"
        numerics = Numerics.EXACT

        def run(self, model, ctx):
            out = onnx.ModelProto()
            out.CopyFrom(model)
            out.metadata_props.add(key="tagged", value=str(ctx.opt(self.name, "value", "yes")))
            return PassResult(out, True, PassReport())

    res = optimize(str(model_file), passes=["canonicalize", Tag()], bench=False, progress=False,
                   pass_options={"tag-model": {"value": "42"}})
    assert [r.name for r in res.pipeline.records] == ["canonicalize", "tag-model"]
    assert {p.key: p.value for p in res.model.metadata_props}["tagged"] == "42" and res.ok
    with pytest.raises(UsageError, match=r"got the pass class Tag, not an instance: Tag\(\)"):
        optimize(str(model_file), passes=[Tag], bench=False, check=False)
    clash = type("Clash", (Tag,), {"name": "canonicalize"})
    with pytest.raises(UsageError, match=r"a pass instance named 'canonicalize', which is taken"):
        optimize(str(model_file), passes=[clash()], bench=False, check=False)


def test_int8_that_keeps_no_layer_int8_warns_in_the_summary(model_file: Path):
    """--int8 that kept no INT8 layer exited 0 with a float model and 'changed: yes'."""
    from onnxslim_yolo import ir
    from onnxslim_yolo.api import optimize

    _, images, _ = fixtures.demo_paths()
    res = optimize(str(model_file), int8=True, calib=str(images), calib_limit=2, bench=False, check=False,
                   progress=False, pass_options={"insert-qdq": {"min_speedup": 1000.0}})
    assert not ir.quantized_ops(res.model)
    assert any(n.startswith("--int8 left every layer float") for n in res.summary["notes"])


def test_a_bad_pruning_option_is_refused_before_any_pass_runs(model_file: Path, monkeypatch):
    """--prune 1.5, --prune nan, --round-to 0 were refused by the pass, after the calibration images
    had loaded and every exact pass had run and been verified."""
    from onnxslim_yolo.api import optimize
    from onnxslim_yolo.pass_base import UsageError
    from onnxslim_yolo.pass_manager import PassManager

    monkeypatch.setattr(PassManager, "run", lambda self, m: pytest.fail("a pass ran"))
    _, images, _ = fixtures.demo_paths()
    for kwargs, message in ((dict(prune=1.5), r"^prune-channels: ratio 1.5 is outside \(0, 0.9\]"),
                            (dict(prune=float("nan")), r"^prune-channels: ratio nan is outside"),
                            (dict(prune=0.1, pass_options={"prune-channels": {"round_to": 0}}),
                             r"^prune-channels: round_to")):
        with pytest.raises(UsageError, match=message):
            optimize(str(model_file), calib=str(images), bench=False, progress=False, **kwargs)


def test_the_summary_shows_no_difference_for_a_model_left_as_it_was(model_file: Path):
    """The original ran with onnxruntime's optimizations off and the result with them on: a run
    that changed nothing showed max abs diff 0.04 (the runtime's, not the tool's)."""
    from onnxslim_yolo.api import optimize

    res = optimize(str(model_file), passes=["fold-affine"], bench=False, check=False, progress=False)
    assert not res.pipeline.records[0].modified
    assert all(o["max_abs"] == 0.0 for o in res.summary["outputs"])


def test_labels_with_calibration_arrays_and_no_images_are_refused_before_any_work(tmp_path: Path,
                                                                                   model_file: Path):
    """--calib X.npy --labels DIR: arrays hold no image names to score; it failed after INT8 (41 s
    on yolov5n) with 'X.npy: not a folder'."""
    labels = fixtures.demo_paths()[2]
    arrays = tmp_path / "x.npy"
    np.save(arrays, np.zeros((2, 3, 64, 64), np.float32))
    r = invoke("optimize", model_file, "-o", tmp_path / "o.onnx", "--int8", "--calib", arrays,
               "--labels", labels)
    assert r.exit_code == 2 and not (tmp_path / "o.onnx").exists(), r.output
    assert "error: --labels needs images to score: pass --images DIR (images=); --calib x.npy holds " \
           "arrays, not named images" in r.output
    assert "insert-qdq" not in r.output   # no pass ran


def test_optimize_eval_limit_and_the_warning_before_checking_a_large_folder(
        model_file: Path, tmp_path: Path, monkeypatch, caplog):
    """--calib of 5000 images ran the checks and the mAP of the result on all 5000 with both models,
    over 30 minutes after an INT8 pass of 84 s that reads 64 of them, with nothing said and no flag
    to limit them (OptimizeOptions.eval_limit had none on the command line)."""
    from fixtures import demo_paths
    from onnxslim_yolo import api, data

    _, images, labels = demo_paths()
    n = len(data.list_images(images))
    monkeypatch.setattr(api, "MANY_EVAL_IMAGES", n)
    seen: list = []
    real = api.run_final_checks
    monkeypatch.setattr(api, "run_final_checks",
                        lambda o, r, opts: seen.append(opts.eval_limit) or real(o, r, opts))
    common = ["optimize", model_file, "--calib", images, "--calib-limit", 2, "--labels", labels,
              "--no-bench", "--quiet", "-o", tmp_path / "o.onnx"]
    with caplog.at_level("WARNING"):
        r = invoke(*common, "--eval-limit", 2)
    assert r.exit_code in (0, 1), r.output
    assert seen == [2] and "(--eval-limit N for the first N)" not in caplog.text
    with caplog.at_level("WARNING"):
        invoke(*common)
    assert seen == [2, None]
    assert (f"the checks and the mAP of the result run the original and the optimized model on all {n} "
            "images (--eval-limit N for the first N)") in caplog.text
