"""The preprocessing probe: detections per image and their agreement with the mirror images'
detections tell a preset a trained detector was fed as trained from one that feeds it wrongly."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from onnxslim_yolo import ir
from onnxslim_yolo.preprobe import MAX_DETECTIONS, PresetScore, advice, preset_advice, score_presets

RIGHT = PresetScore(2.75, 0.78)            # yolov5n fed RGB / 255
SATURATED = PresetScore(100.0, float("nan"))   # yolov5n fed pixel values 0-255 (mirror agreement 0.00)
BLACK = PresetScore(0.0, float("nan"))     # a model fed values 255 times too small
NOISE_THAT_MIRRORS = PresetScore(100.0, 0.8)   # a random-weight ShuffleNet YOLO, any preset


def test_scores_that_look_right_or_wrong():
    assert RIGHT.looks_right and not RIGHT.looks_wrong
    assert SATURATED.looks_wrong and not SATURATED.looks_right
    assert BLACK.looks_wrong and not BLACK.looks_right
    # as many boxes as the probe keeps is saturation, even when they mirror well
    assert NOISE_THAT_MIRRORS.per_image > MAX_DETECTIONS and NOISE_THAT_MIRRORS.looks_wrong
    assert not NOISE_THAT_MIRRORS.looks_right


def test_advice_names_the_preset_that_looks_right():
    scores = {"yolox": SATURATED, "yolov5": RIGHT, "imagenet": PresetScore(0.38, 0.9)}
    msg = advice(scores, "yolox")
    assert msg == ("the images fed as yolox give 100 detections per image (saturated); fed as yolov5 "
                   "they give 2.75 (0.78), as a trained detector does. If the model was trained that "
                   "way, rerun with --preprocess yolov5")
    noisy = advice({"yolox": PresetScore(3.0, 0.05), "yolov5": RIGHT}, "yolox")
    assert noisy is not None and "3 detections per image (mirror-image agreement 0.05)" in noisy
    black = advice({"yolov5": BLACK, "yolox": RIGHT}, "yolov5")
    assert black is not None and "(no detections to compare)" in black
    assert black.endswith("--preprocess yolox")


def test_no_advice_when_the_choice_looks_right_or_nothing_does():
    assert advice({"yolov5": RIGHT, "yolox": SATURATED}, "yolov5") is None
    # random weights: every preset looks wrong, so there is nothing to advise
    assert advice({"yolov5": SATURATED, "yolox": BLACK, "imagenet": NOISE_THAT_MIRRORS}, "yolov5") is None
    assert advice({"yolov5": RIGHT}, "nanodet") is None


def test_a_random_weight_model_gets_no_advice():
    from fixtures import demo_paths

    model_path, images, _ = demo_paths()
    model = ir.load(model_path)
    scores = score_presets(model, images, limit=4)
    assert set(scores) >= {"yolov5", "yolox"} and "yolov8" not in scores   # one name per feeding
    assert not any(s.looks_right for s in scores.values())
    assert preset_advice(model, images, "yolov5", limit=4) is None


def test_yolov5n_fed_as_yolox_is_told_to_use_yolov5(yolov5n_path: Path, coco128: Path):
    model = ir.load(yolov5n_path)
    images = coco128 / "images"
    assert preset_advice(model, images, "yolov5") is None
    msg = preset_advice(model, images, "yolox")
    assert msg is not None and msg.endswith("rerun with --preprocess yolov5"), msg
    scores = score_presets(model, images, names=["yolov5", "yolox"])
    assert scores["yolov5"].looks_right and scores["yolox"].looks_wrong
    assert scores["yolox"].per_image == 100 and math.isnan(scores["yolox"].flip)
    assert scores["yolov5"].flip >= 0.4


def test_optimize_warns_when_the_guessed_preprocessing_looks_wrong(yolov5n_path: Path, coco128: Path,
                                                                    monkeypatch):
    """yolov5n with its guess forced to yolox (as a YOLOv6 v1 export is guessed): the summary
    notes say so; a preprocessing the user gives is not second-guessed."""
    from onnxslim_yolo import data
    from onnxslim_yolo.api import optimize

    monkeypatch.setattr(data, "preset_choice", lambda m: ("yolox", "the output layout, read as yolox"))
    monkeypatch.setattr(data, "detect_preset", lambda m: "yolox")
    model = ir.load(yolov5n_path)
    images = coco128 / "images"
    res = optimize(model, calib=images, calib_limit=2, passes=["canonicalize"], bench=False, check=False,
                   progress=False)
    assert res.summary["images"]["preset"] == "yolox"
    notes = [n for n in res.summary.get("notes", []) if "--preprocess" in n]
    assert notes and notes[0].endswith("rerun with --preprocess yolov5")
    res = optimize(model, calib=images, calib_limit=2, passes=["canonicalize"], bench=False, check=False,
                   progress=False, preprocess="yolox")
    assert not any("--preprocess" in n for n in res.summary.get("notes", []))


def test_a_probe_that_fails_gives_no_advice_and_no_error(monkeypatch):
    from fixtures import demo_paths
    from onnxslim_yolo import preprobe

    def broken(*a, **k):
        raise ValueError("decode met an output it cannot read")

    monkeypatch.setattr(preprobe, "score_presets", broken)
    model_path, images, _ = demo_paths()
    assert preset_advice(ir.load(model_path), images, "yolov5") is None


def test_eval_warns_when_the_guessed_preprocessing_looks_wrong(yolov5n_path: Path, coco128: Path, monkeypatch,
                                                               tmp_path: Path):
    import json

    from click.testing import CliRunner

    from onnxslim_yolo import data
    from onnxslim_yolo.cli import main

    args = ["eval", str(yolov5n_path), "--images", str(coco128 / "images"), "--labels",
            str(coco128 / "labels"), "--limit", "8", "--quiet", "--json", str(tmp_path / "r.json")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert json.loads((tmp_path / "r.json").read_text())["preprocessing_probe"]["verdict"] == "right"
    monkeypatch.setattr(data, "preset_choice", lambda m: ("yolox", "the output layout, read as yolox"))
    monkeypatch.setattr(data, "detect_preset", lambda m: "yolox")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    last = r.output.splitlines()[-1]
    assert last.startswith("warning: the images fed as yolox give 100 detections per image")
    assert r.output.rstrip().endswith("rerun with --preprocess yolov5")
    assert json.loads((tmp_path / "r.json").read_text())["preprocessing_probe"]["verdict"] == "wrong"


def test_the_probe_reads_no_image_past_the_runs_own_limit(tmp_path: Path):
    """eval --limit 2 probed the first 8 images: one it had left out (here unreadable) turned the
    verdict saved in --json into 'the probe could not run'."""
    import json
    import shutil

    from click.testing import CliRunner

    from fixtures import demo_paths
    from onnxslim_yolo.cli import main
    from onnxslim_yolo.preprobe import judge

    model_path, images, labels = demo_paths()
    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted(images.iterdir())[:2]:
        shutil.copy(f, folder / f.name)
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")   # third by name
    r = CliRunner().invoke(main, ["eval", str(model_path), "--images", str(folder), "--labels", str(labels),
                                  "--limit", "2", "--quiet", "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    probe = json.loads((tmp_path / "e.json").read_text())["preprocessing_probe"]
    assert not probe["message"].startswith("the probe could not run"), probe
    assert judge(ir.load(model_path), folder, "yolov5").message.startswith("the probe could not run: ")


def test_the_probe_shows_its_progress_on_a_terminal(monkeypatch, capsys):
    """Each preset is up to 16 runs of the model: 6 silent minutes of a random-weight yolov8l's
    optimize at 640 on 2 cores, on a terminal that showed no bar."""
    from fixtures import demo_paths

    model_path, images, _ = demo_paths()
    model = ir.load(model_path)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    score_presets(model, images, limit=2, names=["yolov5", "yolox"], progress=True)
    assert "preprocessing probe: presets" in capsys.readouterr().err
    score_presets(model, images, limit=2, names=["yolov5"])
    assert "preprocessing probe" not in capsys.readouterr().err


def test_a_preset_that_detects_nothing_is_not_run_on_the_mirror_images(monkeypatch):
    """With no detection to agree with, the mirror images' agreement is undefined whatever they
    give: running them doubled the probe of a random-weight yolov8l at 640 (eval --limit 16: 11
    min, 16 of its model runs the evaluation's own)."""
    import numpy as np

    from fixtures import demo_paths
    from onnxslim_yolo import evaluate

    model_path, images, _ = demo_paths()
    runs = []

    def nothing(model, folder, **kw):
        runs.append(kw["preset"])
        return [evaluate.ImageBoxes(f"{i}.jpg", (8, 8), np.zeros((0, 4)), np.zeros(0), np.zeros(0))
                for i in range(kw["limit"])]

    monkeypatch.setattr(evaluate, "detections", nothing)
    scores = score_presets(ir.load(model_path), images, limit=2, names=["yolov5", "yolox"])
    assert runs == ["yolov5", "yolox"]
    assert all(s.per_image == 0 and math.isnan(s.flip) and s.looks_wrong for s in scores.values())
