"""Click commands: a thin mapping onto the Python API, no graph logic here.

Exit codes: 0 ok, 1 a check failed, 2 usage / bad input, 3 refused precondition,
4 verification failed.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from .cli_types import Number
from .data import PRESETS
from .eval.anchors import ANCHORS_HELP
from .pass_base import SlimError, Terminated, UsageError
from .quant.targets import TARGETS


def _fail(exc: SlimError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _usage_error(exc: click.UsageError, path: str) -> None:
    cmd = exc.ctx.command_path if exc.ctx is not None else path
    click.echo(f"error: {exc.format_message()} (see '{cmd} --help')", err=True)
    sys.exit(exc.exit_code)


class SlimGroup(click.Group):
    """Turns the library's typed errors, and click's own for a bad option or argument, into
    one-line messages and exit codes (click would print its usage lines first); a run started
    on the main thread ends on SIGTERM as on an error (:func:`_terminated`)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return super().main(*args, **kwargs)
        old = signal.signal(signal.SIGTERM, _terminated)
        try:
            return super().main(*args, **kwargs)
        finally:   # an application running the CLI in-process keeps its own handling afterwards
            signal.signal(signal.SIGTERM, old)

    def make_context(self, info_name: Optional[str], args: List[str], parent: Optional[click.Context] = None,
                     **extra: Any) -> click.Context:
        try:   # the group's own options (-v, --version) and the command's name
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            _usage_error(exc, info_name or "onnxslim-yolo")
            raise   # not reached: _usage_error exits

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SlimError as exc:
            _fail(exc)
        except click.UsageError as exc:
            _usage_error(exc, ctx.command_path)
        except Terminated as exc:   # files being written were removed on the way out (ir.replacing)
            click.echo("error: terminated by SIGTERM; nothing more was written", err=True)
            raise exc
        except KeyboardInterrupt:   # click prints "Aborted!" and exits 1, the code of a failed check
            click.echo("error: interrupted (Ctrl-C); nothing more was written", err=True)
            sys.exit(128 + signal.SIGINT)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (``timeout``, ``kill``) ends the run as an exception does, so a file being
    written is removed, not left half written beside its target."""
    raise Terminated(128 + signum)


def _csv(value: Optional[str]) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _shape(value: Optional[str]) -> Optional[List[int]]:
    if not value:
        return None
    try:
        dims = [int(v) for v in value.replace("x", ",").split(",")]
    except ValueError:
        raise UsageError(f"--input-shape '{value}': expected integers like 1,3,640,640") from None
    if len(dims) != 4 or min(dims) <= 0:
        raise UsageError(f"--input-shape '{value}': expected four positive integers N,C,H,W")
    return dims


def write_json(path: str, data: Dict[str, Any]) -> None:
    """Atomic JSON write (temp file in the target folder, then rename)."""
    from . import ir  # late: ir imports onnx, which `--help` should not wait for

    ir.write_json(path, data, indent=2, default=_json_default)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


@click.group(cls=SlimGroup)
@click.version_option(package_name="onnxslim-yolo")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """onnxslim-yolo: make YOLO-family ONNX detectors smaller and faster."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    import onnxruntime as ort

    # onnxruntime's own graph-optimizer warnings (e.g. "can't constant fold Floor" on float16
    # models) go to its default logger, which session options do not reach; -vv shows them
    ort.set_default_logger_severity(2 if verbose >= 2 else 3)
    # so do graphsurgeon's ("[W] Could not convert: BFLOAT16 to a corresponding NumPy type"): the
    # passes handle what it warns of, or refuse it with a reason of their own
    from onnx_graphsurgeon.logger import G_LOGGER

    G_LOGGER.severity = G_LOGGER.WARNING if verbose >= 2 else G_LOGGER.ERROR


def _given(param: str) -> bool:
    """Whether the user gave the current command's option ``param`` (not its default)."""
    source = click.get_current_context().get_parameter_source(param)
    return source not in (None, click.core.ParameterSource.DEFAULT)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output model (default: MODEL.opt.onnx).")
@click.option("--passes", "passes", help="Comma-separated pass names to run instead of the default pipeline.")
@click.option("--skip", multiple=True, help="Pass to leave out (repeatable).")
@click.option("--int8", is_flag=True, help="Insert calibrated QDQ INT8 (needs --calib).")
@click.option("--calib", type=click.Path(), help="Calibration images folder or .npy/.npz of inputs.")
@click.option("--calib-limit", type=click.IntRange(min=1), help="Use at most N calibration images.")
@click.option("--target", type=click.Choice(list(TARGETS)), default="ort-cpu", show_default=True,
              help="Runtime the model is for: INT8 placement rules and the checks (openvino: run in it).")
@click.option("--method", type=click.Choice(["auto", "minmax", "percentile", "entropy", "mse"]),
              default="auto", show_default=True,
              help="Calibration method (auto: per tensor, or the percentile table when it measures better).")
@click.option("--weight-bits", type=click.Choice(["auto", "7", "8"]), default="auto", show_default=True,
              help="INT8 weight range: auto uses 7 bits on x86 CPUs without VNNI (the CPU kernels of "
                   "onnxruntime and OpenVINO saturate).")
@click.option("--calib-table", type=click.Path(),
              help="Load the calibration table from (or save it to) JSON.")
@click.option("--max-drop", type=Number(min=0), help="Mixed precision: keep sensitive nodes float until the "
              "measured mAP loss (points, with --labels; else 100 x (1 - agreement with the float model)) "
              "is within this.")
@click.option("--prune", type=float, help="Channel pruning: target fraction of multiply-adds removed.")
@click.option("--round-to", type=int, default=8, show_default=True,
              help="Pruned channel counts multiple of N (a layer no wider than N is kept whole).")
@click.option("--protect", multiple=True, help="Node name or pattern never pruned (repeatable).")
@click.option("--kept-json", type=click.Path(dir_okay=False),
              help="Pruning: write the kept channel indices per layer here (to fine-tune the same shape).")
@click.option("--images", type=click.Path(), help="Evaluation images (default: --calib).")
@click.option("--eval-limit", type=click.IntRange(min=1),
              help="Check and score the result on the first N images (by name) of --images (default: all).")
@click.option("--labels", type=click.Path(), help="YOLO labels folder or COCO json: accuracy before/after.")
@click.option("--preprocess", type=click.Choice(list(PRESETS)), help="Preprocessing preset.")
@click.option("--anchors", help=ANCHORS_HELP)
@click.option("--input-shape", help="Static input shape N,C,H,W (N,H,W,C for a channels-last input) "
                                    "for models with dynamic size.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--dump-dir", type=click.Path(file_okay=False), help="Save the model after each pass here.")
@click.option("--no-verify", is_flag=True, help="Skip the numeric verification of each pass.")
@click.option("--no-bench", is_flag=True, help="Skip the latency measurement in the summary.")
@click.option("--no-check", is_flag=True, help="Skip the pre-deployment checks on the result.")
@click.option("--threads", type=click.IntRange(min=0), default=2, show_default=True,
              help="onnxruntime threads for latency.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def optimize(model: str, output: Optional[str], passes: Optional[str], skip: Sequence[str], int8: bool,
             calib: Optional[str], calib_limit: Optional[int], target: str, method: str, weight_bits: str,
             calib_table: Optional[str], max_drop: Optional[float], prune: Optional[float], round_to: int,
             protect: Sequence[str], kept_json: Optional[str], images: Optional[str],
             eval_limit: Optional[int], labels: Optional[str], preprocess: Optional[str],
             anchors: Optional[str], input_shape: Optional[str], report: Optional[str],
             dump_dir: Optional[str], no_verify: bool, no_bench: bool, no_check: bool, threads: int,
             quiet: bool) -> None:
    """Run the optimization pipeline on MODEL and print a before/after summary."""
    from . import ir
    from .api import OptimizeOptions, optimize as run_optimize, run_files
    from .report import passes_table, summary_table

    if int8 and not calib:
        raise UsageError("--int8 needs calibration images: pass --calib DIR")
    for what, given in (("MODEL", model), ("-o/--output", output)):
        if given is not None and not given.strip():   # Path("") is ".": a traceback, or the default
            raise UsageError(f"{what}: empty path; give a file name")
    src = Path(model)
    stem = src.name[:-5] if src.name.endswith(".onnx") else src.name
    out = Path(output) if output else src.with_name(stem + ".opt.onnx")
    qdq: Dict[str, Any] = {"method": method}   # optimize adds --target and --max-drop
    if weight_bits != "auto":
        qdq["reduce_range"] = weight_bits == "7"
    if calib_table:
        qdq["calib_table"] = calib_table
    # options of a pass the run does not include were ignored, with exit 0
    for runs, flags, what, add in ((prune is not None or "prune-channels" in _csv(passes),
                                    ("--kept-json", "--protect", "--round-to"), "pruning", "--prune RATIO"),
                                   (int8 or "insert-qdq" in _csv(passes),
                                    ("--method", "--weight-bits", "--calib-table"), "INT8", "--int8")):
        unused = [f for f in flags if _given(f[2:].replace("-", "_"))]
        if unused and not runs:
            verb = "apply" if len(unused) > 1 else "applies"
            raise UsageError(f"{', '.join(unused)} only {verb} to {what}: add {add}")
    prune_opts: Dict[str, Any] = {"round_to": round_to}
    if protect:
        prune_opts["protect"] = list(protect)
    if kept_json:
        prune_opts["kept_json"] = kept_json
    opts = OptimizeOptions(
        passes=_csv(passes) or None, skip=list(skip), int8=int8, prune=prune, calib=calib,
        calib_limit=calib_limit, images=images, eval_limit=eval_limit, labels=labels, preprocess=preprocess,
        anchors=anchors,
        input_shape=_shape(input_shape), pass_options={"insert-qdq": qdq, "prune-channels": prune_opts},
        verify=not no_verify, dump_dir=dump_dir, bench=not no_bench, threads=threads, progress=not quiet,
        check=not no_check, max_drop=max_drop, target=target)
    ir.claim_outputs(*run_files(opts, src, out, report))
    result = run_optimize(model, output=out, options=opts)
    data = result.to_dict()
    click.echo(passes_table(data["passes"]))
    click.echo("")
    click.echo(summary_table(result.summary))
    echo_images_fed(result.summary.get("images"))
    for note in result.summary.get("notes", []):
        click.echo(f"warning: {note}")
    for rec in data["passes"]:
        for s in rec["report"]["skipped"][:10]:
            click.echo(f"skipped in {rec['name']}: {s['node']}: {s['reason']}")
        for note in rec["report"]["details"].get("notes", [])[:10]:
            click.echo(f"note from {rec['name']}: {note}")
    if report:
        write_json(report, data)
    click.echo(f"\nwrote {result.output}")
    if result.checks is not None:
        from .cli_check import render

        click.echo("\npre-deployment checks against the original:")
        click.echo(render(result.checks))
        if not result.checks.ok:
            sys.exit(1)


@main.command(name="passes")
def list_passes() -> None:
    """List the available passes, their numerics contracts and their order."""
    from .pass_manager import after_names, order_passes
    from .registry import all_passes, joins_default
    from .report import table

    table_ = all_passes()
    made = [cls() for cls in table_.values()]
    try:
        ordered = order_passes(made)
    except UsageError as exc:   # plugins whose "after" go round: list them as found, and say so
        click.echo(f"warning: {exc}; listed unordered", err=True)
        ordered = made
    rows = [[p.name, p.numerics.value, "yes" if joins_default(type(p)) else "opt-in",
             ",".join(after_names(p)) or "-", p.description] for p in ordered]
    click.echo(table(rows, ["pass", "contract", "default", "after", "what it does"]))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input-shape", help="Static input shape N,C,H,W (N,H,W,C for a channels-last input) "
                                    "for models with dynamic size.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the figures as JSON.")
def inspect(model: str, input_shape: Optional[str], json_out: Optional[str]) -> None:
    """Op counts, parameters, MACs/FLOPs, opset, inputs/outputs, YOLO family and head."""
    from . import data, ir, verify
    from .analysis.flops import infer_static, model_stats
    from .report import stats_table, table

    ir.claim_outputs({"JSON figures": json_out}, {"model": model})
    m = ir.load(model)
    shp = _shape(input_shape)
    if shp:   # as optimize takes it: only dims the model leaves symbolic (it was ignored, or gave 0 MACs)
        ir.static_input_shapes(m, {next(iter(data.image_inputs(m))): shp})
    at = None if shp else _dynamic_size(m)
    shapes = {next(iter(data.image_inputs(m))): shp or at} if shp or at else {}
    stats = model_stats(m, shapes).to_dict()
    if at:
        stats["macs_at"] = list(at)
    click.echo(stats_table(stats))
    foreign = verify.custom_op_nodes(m)
    if foreign:   # shape inference stops at such a node: the convs after it are not counted
        stats["unknown_ops"] = foreign
        click.echo(f"warning: {verify.custom_op_summary(foreign)}; shapes after it are unknown, "
                   "so MACs may be under-counted")
    # figures of a graph onnxruntime refuses (duplicate node names, stale shapes) mislead; one over
    # 2 GB is not loaded here (that writes it to a temporary file again): None
    stats["loads_in_onnxruntime"] = None if ir.model_size(m) > ir.PROTO_LIMIT else not foreign
    if stats["loads_in_onnxruntime"]:
        try:
            verify.session(m, optimize=False, threads=1)
        except SlimError as exc:
            stats["loads_in_onnxruntime"] = False
            click.echo(f"warning: {exc}; optimize and check refuse it")
    weighted = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    if stats["macs"] == 0 and any(n.op_type in weighted for n in m.graph.node):
        click.echo("warning: shape inference gave no shapes for the Convs and MatMuls, so their MACs are "
                   "unknown (counted 0)")
    click.echo("")
    click.echo(table([[k, v] for k, v in stats["op_counts"].items()], ["op", "count"]))
    feed = _input_summary(m, shp)
    if "error" in feed:   # said here, not only when --calib or --images meet it
        stats["input_error"] = feed["error"]
        click.echo(f"warning: {feed['error']}; images cannot feed it (optimize --calib, eval, check --images "
                   "refuse it)")
    elif feed:
        stats["input"] = feed
        click.echo("")
        click.echo(table([[k, v] for k, v in feed.items()], ["image input (as fed by --calib/--images)", ""]))
    # a dynamic export's head is read at the size its MACs are counted at: its output dims, computed
    # from the input's by Shape ops, were symbolic there, so the layout read "unknown" (no strides)
    head = _head_summary(infer_static(m, shapes) if shapes else m)
    if head:
        stats["head"] = head
        click.echo("")
        click.echo(table([[k, v] for k, v in head.items()], ["detection head", ""]))
    if json_out:
        write_json(json_out, stats)


def echo_images_fed(fed: Optional[Dict[str, str]]) -> None:
    """The line saying how image folders were fed (:func:`.api.images_fed`), if any were."""
    if fed:
        why = ("as --preprocess asked" if fed["chosen_by"] == "--preprocess" else
               f"chosen by {fed['chosen_by']}; --preprocess to change")
        click.echo(f"images fed as {fed['preprocessing']} ({why})")


def _dynamic_size(model: Any) -> Optional[Tuple[int, ...]]:
    """:func:`data.dynamic_input_shape`, None for a model with no single image input."""
    from . import data

    try:
        return data.dynamic_input_shape(model)
    except SlimError:
        return None


def _input_summary(model: Any, input_shape: Optional[List[int]]) -> Dict[str, Any]:
    """What calibration, evaluation and the checks feed the image input: layout, dtype, and the
    detected preprocessing (``--preprocess`` overrides it); ``{"error": why}`` when images cannot
    feed it."""
    from . import data, ir

    try:
        name, chw = data.model_input(model, input_shape)
        preset = data.get_preset(None, model)
    except SlimError as exc:
        return {"error": str(exc)}
    out = {"name": name, "layout": "NHWC" if data.channels_last(model) else "NCHW",
           "dtype": str(ir.input_dtypes(model).get(name)), "size (h, w)": list(chw[1:]),
           "preprocessing": data.describe_preset(preset)}
    aux = data.aux_inputs(model)
    if aux:  # PaddleDetection's
        out["also fed"] = ", ".join(f"{n} = {data.aux_value(n, chw[1:])}" for n in aux)
    return out


def _head_summary(model: Any) -> Dict[str, Any]:
    try:
        from .analysis.head import find_head
    except ImportError:
        return {}
    try:
        info = find_head(model)
    except SlimError as exc:
        return {"family": "unknown", "reason": str(exc)}
    d = info.to_dict() if hasattr(info, "to_dict") else dict(vars(info))
    keep = {}
    for k, v in d.items():
        if isinstance(v, (list, tuple, set)) and len(v) > 6:
            keep[k] = f"{len(v)} items"
        else:
            keep[k] = v
    return keep


def _register_optional() -> None:
    """Commands that live in their own modules (eval, check) are added when present."""
    import importlib

    commands = (("onnxslim_yolo.cli_eval", "eval_command"), ("onnxslim_yolo.cli_check", "check_command"))
    for mod, attr in commands:
        try:
            cmd = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
        main.add_command(cmd)


_register_optional()

if __name__ == "__main__":  # pragma: no cover
    main()
