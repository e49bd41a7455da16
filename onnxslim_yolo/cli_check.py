"""``onnxslim-yolo check``: is this model safe to deploy? Structure, runtime, numerics and accuracy
against the original, QDQ lint, latency. Exit 0 when every check passes (warnings allowed), 1 when
one fails (one line per failure), 2 on usage errors.

Registered on the ``main`` group by :mod:`onnxslim_yolo.cli` (``_register_optional``).
"""
from __future__ import annotations

from typing import Optional

import click

from .check.result import FAIL, WARN, CheckReport
from .cli_types import Number
from .data import PRESETS
from .eval.anchors import ANCHORS_HELP
from .quant.targets import TARGETS

#: width of the message column in the table (full messages are in the lines below and the JSON)
MESSAGE_WIDTH = 96


def render(report: CheckReport) -> str:
    """The human table, then one line per failure and warning, then the verdict."""
    from .report import table

    msgs = [r.message if len(r.message) <= MESSAGE_WIDTH else r.message[:MESSAGE_WIDTH - 3] + "..."
            for r in report.results]
    width = max((len(m) for m in msgs), default=0)
    # pre-padded so the text column reads left-aligned (report.table right-aligns columns after the first)
    rows = [[r.name, r.status.upper().ljust(4), m.ljust(width)] for r, m in zip(report.results, msgs)]
    lines = [table(rows, ["check", "status", "result".ljust(width)]), ""]
    for r in report.results:
        if r.status in (FAIL, WARN):
            lines.append(f"{r.status.upper()} {r.name}: {r.message}")
    lines.append(report.verdict())
    return "\n".join(lines)


@click.command(name="check")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--reference", type=click.Path(dir_okay=False), help="The original model to compare against.")
@click.option("--images", type=click.Path(exists=True),
              help="Image folder: numerics on real inputs, detection agreement.")
@click.option("--labels", type=click.Path(exists=True),
              help="YOLO labels folder or COCO json: true mAP and its drop.")
@click.option("--target", type=click.Choice(list(TARGETS)), default="ort-cpu", show_default=True,
              help="Runtime the model is for: INT8 placement rules and the checks (openvino: run in it).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the full report as JSON.")
@click.option("--max-drop", type=Number(min=0), default=1.0, show_default=True,
              help="mAP points the model may lose.")
@click.option("--min-cosine", type=Number(-1, 1),
              help="Per-output cosine floor against the reference [default: 0.99; 0.9 for a quantized "
                   "model against a float one, or a pruned one, as optimize checks its own output].")
@click.option("--min-agreement", type=Number(0, 1), default=0.5, show_default=True,
              help="Floor of the mAP of the model's detections against the reference's.")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time the model against the reference.")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Interleaved latency runs per model.")
@click.option("--limit", type=click.IntRange(min=1),
              help="Use the first N images (by name) for the detection checks.")
@click.option("--preprocess", type=click.Choice(list(PRESETS)), help="Preprocessing preset.")
@click.option("--anchors", help=ANCHORS_HELP)
@click.option("--input-shape", help="Static input shape N,C,H,W (N,H,W,C for a channels-last input) "
                                    "for models with dynamic size.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def check_command(ctx: click.Context, model: str, reference: Optional[str], images: Optional[str],
                  labels: Optional[str], target: str, json_out: Optional[str], max_drop: float,
                  min_cosine: Optional[float], min_agreement: float, latency: bool, runs: int,
                  limit: Optional[int],
                  preprocess: Optional[str], anchors: Optional[str],
                  input_shape: Optional[str], threads: int, quiet: bool) -> None:
    """Pre-deployment checks of MODEL, optionally against the original (--reference)."""
    from .check import CheckOptions, run_checks
    from .api import images_fed
    from .cli import _shape, echo_images_fed, write_json  # late: cli imports this module while it loads
    from . import ir
    from .pass_base import SlimError, naming_file

    # before the checks run, not after
    ir.claim_outputs({"JSON report": json_out},
                     {"model": model, "reference model": reference, "labels": labels, "images": images})
    opts = CheckOptions(target=target, max_drop=max_drop, min_cosine=min_cosine, min_agreement=min_agreement,
                        latency=latency, latency_runs=runs, threads=threads, limit=limit, preset=preprocess,
                        input_shape=_shape(input_shape), progress=not quiet, anchors=anchors)
    try:
        report = run_checks(model, reference=reference, images=images, labels=labels, options=opts)
    except SlimError as exc:
        raise naming_file(exc, model) from None
    if images:
        try:   # a model that does not load fails its checks, which say why
            echo_images_fed(images_fed(ir.load(model, load_external_data=False), preprocess, (images,)))
        except SlimError:
            pass
    click.echo(render(report))
    if json_out:
        write_json(json_out, report.to_dict())
    ctx.exit(0 if report.ok else 1)
