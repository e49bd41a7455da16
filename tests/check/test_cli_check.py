"""``onnxslim-yolo check`` through click's runner: exit codes, one-line failures, JSON report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import fixtures
from onnxslim_yolo.cli import main

from .models import qdq_conv, set_init


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cli_check")
    good = fixtures.build_yolov5_v6(opset=13)
    onnx.save(good, d / "good.onnx")
    conv = next(n for n in good.graph.node if n.op_type == "Conv")
    w = onnx.numpy_helper.to_array(next(t for t in good.graph.initializer if t.name == conv.input[1])).copy()
    w.flat[0] = np.nan
    onnx.save(set_init(good, conv.input[1], w), d / "nan.onnx")
    onnx.save(qdq_conv("uint8"), d / "qdq_u8.onnx")
    onnx.save(set_init(qdq_conv("uint8"), "x_scale", 0.0), d / "qdq_zero_scale.onnx")
    return {"dir": d, "good": d / "good.onnx", "nan": d / "nan.onnx", "w": conv.input[1],
            "u8": d / "qdq_u8.onnx", "zero_scale": d / "qdq_zero_scale.onnx"}


def invoke(*args: str):
    return CliRunner().invoke(main, ["check", *[str(a) for a in args]])


def test_good_model_exits_0_with_table_and_verdict(paths):
    r = invoke(paths["good"], "--reference", paths["good"], "--no-latency")
    assert r.exit_code == 0, r.output
    assert "structure.checker" in r.output and "reference.numerics" in r.output
    assert r.output.strip().splitlines()[-1].startswith("PASS:")
    assert "FAIL" not in r.output


def test_failing_check_exits_1_with_one_line_reason(paths):
    r = invoke(paths["nan"], "--reference", paths["good"], "--no-latency")
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.startswith("FAIL ")]
    assert any(ln.startswith("FAIL structure.weights_finite: ") and paths["w"] in ln for ln in lines)
    assert r.output.strip().splitlines()[-1].startswith("FAIL:")


def test_bad_scale_exits_1(paths):
    r = invoke(paths["zero_scale"], "--no-latency")
    assert r.exit_code == 1
    assert any(ln.startswith("FAIL qdq.scales: ") and "x_Q" in ln for ln in r.output.splitlines())


def test_target_tensorrt_rejects_uint8_qdq(paths):
    assert invoke(paths["u8"], "--no-latency").exit_code == 0
    r = invoke(paths["u8"], "--target", "tensorrt", "--no-latency")
    assert r.exit_code == 1 and "FAIL qdq.target: " in r.output and "uint8" in r.output


def test_missing_file_exits_2(paths):
    r = invoke(paths["dir"] / "absent.onnx")
    assert r.exit_code == 2 and "absent.onnx" in r.output and "not found" in r.output
    r = invoke(paths["good"], "--reference", paths["dir"] / "absent_ref.onnx")
    assert r.exit_code == 2 and "absent_ref.onnx" in r.output


def test_usage_errors_exit_2(paths):
    r = invoke(paths["good"], "--labels", paths["dir"])
    assert r.exit_code == 2 and "--labels needs --images" in r.output
    r = invoke(paths["good"], "--target", "tpu")
    assert r.exit_code == 2
    r = invoke(paths["good"], "--runs", "0")
    assert r.exit_code == 2 and "--runs" in r.output


def test_not_onnx_exits_2(paths):
    junk = paths["dir"] / "junk.onnx"
    junk.write_bytes(b"not a model")
    r = invoke(junk)
    assert r.exit_code == 2 and "junk.onnx" in r.output


def test_json_report(paths):
    out = Path(paths["dir"]) / "reports" / "nan.json"
    r = invoke(paths["nan"], "--reference", paths["good"], "--no-latency", "--json", out)
    assert r.exit_code == 1
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["counts"]["fail"] >= 1
    by_name = {c["name"]: c for c in data["checks"]}
    assert by_name["structure.weights_finite"]["status"] == "fail"
    assert by_name["runtime.runs"]["status"] == "fail" and "NaN/Inf" in by_name["runtime.runs"]["message"]
    assert by_name["reference.numerics"]["status"] == "skip"
    assert data["settings"]["max_drop"] == 1.0 and data["target"] == "ort-cpu"
    assert not list(out.parent.glob(".*"))  # atomic write left no temp file


def test_json_report_has_numeric_figures(paths):
    out = Path(paths["dir"]) / "reports" / "good.json"
    assert invoke(paths["good"], "--reference", paths["good"], "--runs", "2", "--json", out).exit_code == 0
    data = json.loads(out.read_text())
    by_name = {c["name"]: c for c in data["checks"]}
    num = by_name["reference.numerics"]["details"]["outputs"][0]
    assert num["name"] == "output" and num["cosine"] > 0.999999 and num["max_abs"] < 1e-4 * num["ref_max"]
    assert by_name["latency"]["details"]["runs"] == 2 and by_name["latency"]["details"]["ratio"] > 0


def test_check_says_how_images_are_fed_before_its_verdict(paths):
    from fixtures import demo_paths

    _, images, _ = demo_paths()
    r = invoke(paths["good"], "--images", images, "--limit", 2, "--no-latency", "--quiet")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0] == ("images fed as yolov5: RGB, pixels / 255 (0-1), letterbox centred (chosen by the "
                        "default: nothing in the model names another family; --preprocess to change)")
    assert lines[-1].startswith("PASS:")
    r = invoke(paths["good"], "--images", images, "--limit", 2, "--no-latency", "--quiet",
               "--preprocess", "yolox")
    assert r.output.splitlines()[0].endswith("(as --preprocess asked)")
