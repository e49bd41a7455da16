"""``onnxslim-yolo eval``: COCO mAP of a model on an image folder with YOLO labels or a COCO JSON.

Registered on the ``main`` group by :mod:`onnxslim_yolo.cli` (``_register_optional``).
"""
from __future__ import annotations

import sys
from typing import Optional

import click

from . import ir
from .data import PRESETS
from .eval.anchors import ANCHORS_HELP, with_anchors
from .eval.decode import FORMATS
from .cli_types import Number
from .openvino_rt import ENGINES
from .pass_base import SlimError, naming_file


@click.command(name="eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--images", required=True, type=click.Path(), help="Folder of images (jpg/png/bmp).")
@click.option("--labels", required=True, type=click.Path(),
              help="YOLO labels folder (class cx cy w h per line, <image stem>.txt) or COCO instances .json.")
@click.option("--preprocess", type=click.Choice(list(PRESETS)),
              help="Preprocessing preset (default: detected from the model).")
@click.option("--conf", type=Number(0, 1), default=0.001, show_default=True,
              help="Score threshold.")
@click.option("--iou", type=Number(0, 1), default=0.6, show_default=True, help="NMS IoU threshold.")
@click.option("--max-det", type=click.IntRange(min=1), default=300, show_default=True,
              help="Detections kept per image.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)),
              help="Output layout (default: detected from metadata and output shape).")
@click.option("--anchors", help=ANCHORS_HELP)
@click.option("--limit", type=click.IntRange(min=1), help="Evaluate the first N images (by name).")
@click.option("--input-shape", help="Static input shape N,C,H,W (N,H,W,C for a channels-last input) "
                                    "for models with dynamic size.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="onnxruntime threads (0: default).")
@click.option("--runtime", type=click.Choice(list(ENGINES)), default="onnxruntime",
              show_default=True, help="Run the model in onnxruntime or in OpenVINO's CPU plugin.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the figures as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_command(model: str, images: str, labels: str, preprocess: Optional[str], conf: float, iou: float,
                 max_det: int, fmt: Optional[str], anchors: Optional[str], limit: Optional[int],
                 input_shape: Optional[str], threads: int, runtime: str, json_out: Optional[str],
                 quiet: bool) -> None:
    """pycocotools bbox mAP@0.5:0.95 and mAP@0.5 of MODEL (ultralytics val conventions); of its masks
    or keypoints too for a segmentation or pose export whose labels give polygons or keypoints."""
    from .api import images_fed
    from .cli import _shape, echo_images_fed, write_json  # late: cli imports this module while it loads
    from .eval.metrics import MAP_KINDS
    from .evaluate import evaluate
    from .report import table

    # before the evaluation runs, not after
    ir.claim_outputs({"JSON figures": json_out}, {"model": model, "labels": labels, "images": images})
    try:
        target = with_anchors(ir.load(model), anchors, copy=False) if anchors else ir.load(model)
        fed = images_fed(target, preprocess, (images,))
        res = evaluate(target, images, labels, preset=preprocess, conf=conf, iou=iou, max_det=max_det,
                       fmt=fmt, limit=limit, progress=not quiet, threads=threads,
                       input_shape=_shape(input_shape), engine=runtime)
    except SlimError as exc:
        click.echo(f"error: {naming_file(exc, model)}", err=True)
        sys.exit(exc.exit_code)
    probe = None
    if fed and not preprocess:   # a guess: do the images look fed as the model was trained?
        from .preprobe import judge

        probe = judge(target, images, fed["preset"], limit, input_shape=_shape(input_shape), threads=threads,
                      progress=not quiet)
    rows = [["mAP@0.5:0.95", f"{res['map']:.4f}"], ["mAP@0.5", f"{res['map50']:.4f}"],
            ["mAP@0.75", f"{res['map75']:.4f}"]]
    for prefix, what in MAP_KINDS[1:]:
        if prefix + "map" in res:
            rows += [[f"{what} mAP@0.5:0.95", f"{res[prefix + 'map']:.4f}"],
                     [f"{what} mAP@0.5", f"{res[prefix + 'map50']:.4f}"]]
    rows += [["images", res["n_images"]], ["ground-truth boxes", res["n_ground_truth"]],
             ["detections", res["n_detections"]]]
    echo_images_fed(fed)
    click.echo(table(rows, ["metric", "value"]))
    if runtime != "onnxruntime":
        click.echo(f"(the model ran in {runtime})")
    if probe is not None and probe.status == "wrong":
        click.echo(f"warning: {probe.message}")
    if json_out:
        checked = None if probe is None else {"verdict": probe.status, "message": probe.message}
        write_json(json_out, dict(res, model=model, conf=conf, iou=iou, max_det=max_det, runtime=runtime,
                                  images_fed=fed, preprocessing_probe=checked))
