"""``check`` on the real yolov5n (skipped without ../shared): canonicalized vs original passes with
its figures; a quantized decode tail fails with the reason."""
from __future__ import annotations

import onnx
import pytest

from onnxslim_yolo import ir
from onnxslim_yolo.check import run_checks
from onnxslim_yolo.pass_base import PassContext
from onnxslim_yolo.pass_manager import PassManager
from onnxslim_yolo.passes.canonicalize import Canonicalize

from .models import insert_qdq

LIMIT = 16  # images: enough for a stable verdict, fast on 2 cores


@pytest.fixture(scope="module")
def original(yolov5n_path) -> onnx.ModelProto:
    return ir.load(yolov5n_path)


def test_canonicalized_yolov5n_passes_against_original(original, coco128):
    cand = PassManager([Canonicalize()], PassContext(verify=False)).run(original).model
    rep = run_checks(cand, reference=original, images=str(coco128 / "images"), labels=str(coco128 / "labels"),
                     limit=LIMIT, latency=False)
    assert rep.ok, [(r.name, r.message) for r in rep.failures]
    assert rep.get("structure.checker").status == "pass" and rep.get("qdq.pairs").status == "skip"
    num = rep.get("reference.numerics").details["outputs"][0]
    assert num["cosine"] > 0.99999 and num["sqnr_db"] > 60
    assert rep.get("accuracy.agreement").details["map"] > 0.95
    drop = rep.get("accuracy.map_drop").details
    assert abs(drop["drop_points"]) < 0.2 and drop["reference"]["n_images"] == LIMIT
    assert 0.45 < drop["reference"]["map"] < 0.65  # yolov5n on the first 16 coco128 images: 0.546


def test_quantized_head_on_yolov5n_fails(original, coco128):
    # boxes (pixels) and scores (0..1) under one uint8 scale, as quantizing everything does
    bad = insert_qdq(original, "output", scale=640 / 255, zp=0)
    rep = run_checks(bad, reference=original, images=str(coco128 / "images"), limit=8, latency=False)
    failed = {r.name for r in rep.failures}
    assert {"qdq.decode_tail", "accuracy.agreement"} <= failed
    assert "output_Q" in rep.get("qdq.decode_tail").message
    assert rep.get("qdq.decode_tail").details["tail_nodes"] == 37
    assert rep.get("accuracy.agreement").details["map"] < 0.1
