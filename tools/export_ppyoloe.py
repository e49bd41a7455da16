#!/usr/bin/env python3
"""Export a random-weight PP-YOLOE-s to ONNX as PaddleDetection's export_model.py + paddle2onnx do.

    PADDLE_PYTHON tools/export_ppyoloe.py --out DIR [--size 320] [--opset 11]

Writes ``DIR/ppyoloe_s.onnx`` (the ``exclude_nms`` export: inputs ``image`` (N, 3, S, S) and
``scale_factor`` (N, 2); outputs boxes (N, A, 4) x1 y1 x2 y2 divided by the scale factor, and
class scores (N, 80, A)) and ``DIR/ppyoloe_s_nms.onnx`` (MultiClassNMS kept: (K, 6) ``class score
x1 y1 x2 y2`` rows and a count per image; batch 1 only, as paddle2onnx warns).

The model is ppdet's ``YOLOv3`` architecture with CSPResNet, CustomCSPPAN and PPYOLOEHead at the
crn_s settings (width 0.50, depth 0.33, strides 32/16/8), RepVGG branches fused as ppdet's export
does. Nothing is downloaded: BatchNorm statistics and the head's output Convs (zero-initialised
by ppdet) get random values, so this tests graphs, not accuracy. Needs a Python with
paddlepaddle (3.x), paddle2onnx (2.x) and paddledet 2.6 (which wants numpy < 1.24), which this
project does not depend on. Two workarounds for those versions:
- ppdet 2.6 builds multiclass_nms3 with the legacy static API, which Paddle 3's PIR refuses; the
  NMS here calls the same op through ``paddle._C_ops``, as later PaddleDetection releases do.
- Paddle 3.3 saves the neck's 2x upsampling scales as float64 arrays, which paddle2onnx 2.1
  refuses ("MUST be ir::FloatAttribute"); a copy of the saved program has them as float32 (2.0
  either way).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import paddle
from paddle.static import InputSpec
from ppdet.modeling.architectures import YOLOv3
from ppdet.modeling.backbones import CSPResNet
from ppdet.modeling.heads import PPYOLOEHead
from ppdet.modeling.layers import MultiClassNMS
from ppdet.modeling.necks import CustomCSPPAN


class PirMultiClassNMS(MultiClassNMS):
    """ppdet's MultiClassNMS through ``paddle._C_ops`` (the op PIR can trace)."""

    def __call__(self, bboxes, score, background_label=-1):
        out, _, rois_num = paddle._C_ops.multiclass_nms3(
            bboxes, score, None, self.score_threshold, self.nms_top_k, self.keep_top_k,
            self.nms_threshold, self.normalized, self.nms_eta, background_label)
        return out, rois_num, None


def build(size: int, exclude_nms: bool, seed: int = 0) -> YOLOv3:
    paddle.seed(seed)
    width, depth = 0.50, 0.33
    backbone = CSPResNet(layers=[3, 6, 6, 3], channels=[64, 128, 256, 512, 1024], return_idx=[1, 2, 3],
                         use_large_stem=True, act="swish", width_mult=width, depth_mult=depth)
    neck = CustomCSPPAN(in_channels=[s.channels for s in backbone.out_shape], out_channels=[768, 384, 192],
                        stage_num=1, block_num=3, act="swish", spp=True, width_mult=width, depth_mult=depth)
    nms = PirMultiClassNMS(nms_top_k=1000, keep_top_k=300, score_threshold=0.01, nms_threshold=0.7)
    head = PPYOLOEHead(in_channels=[s.channels for s in neck.out_shape], num_classes=80, act="swish",
                       fpn_strides=[32, 16, 8], grid_cell_scale=5.0, grid_cell_offset=0.5,
                       static_assigner_epoch=100, use_varifocal_loss=True, static_assigner=None,
                       assigner=None, nms=nms, eval_size=[size, size], exclude_nms=exclude_nms)
    model = YOLOv3(backbone=backbone, neck=neck, yolo_head=head, post_process=None)
    rng = np.random.RandomState(seed)
    for layer in model.sublayers():
        if isinstance(layer, (paddle.nn.BatchNorm2D, paddle.nn.BatchNorm)):
            c = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0, 0.1, c).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.bias.set_value(rng.normal(0, 0.1, c).astype("float32"))
    for conv, bias in [(c, -2.0) for c in head.pred_cls] + [(c, 0.0) for c in head.pred_reg]:
        conv.weight.set_value(rng.normal(0, 0.01, conv.weight.shape).astype("float32"))
        conv.bias.set_value((bias + rng.normal(0, 0.5, conv.bias.shape)).astype("float32"))
    model.eval()
    for layer in model.sublayers():  # RepVGG blocks fused, as ppdet's Trainer.export does
        if hasattr(layer, "convert_to_deploy"):
            layer.convert_to_deploy()
    return model


def float32_scales(program: str) -> str:
    """A copy of a saved PIR program whose float64 array attributes are float32."""
    doc = json.loads(open(program).read())

    def walk(o) -> None:
        if isinstance(o, dict):
            if o.get("#") == "0.a_array":
                for e in o.get("D", []):
                    if isinstance(e, dict) and e.get("#") == "0.a_f64":
                        e["#"] = "0.a_f32"
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(doc)
    out = program[:-len(".json")] + "_f32.json"
    with open(out, "w") as f:
        json.dump(doc, f)
    return out


def export(out: str, size: int, opset: int, exclude_nms: bool, work: str) -> str:
    import paddle2onnx

    model = build(size, exclude_nms)
    spec = [{"image": InputSpec(shape=[None, 3, size, size], name="image"),
             "scale_factor": InputSpec(shape=[None, 2], name="scale_factor")}]
    prefix = os.path.join(work, "nonms" if exclude_nms else "nms", "model")
    paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), prefix, input_spec=spec)
    program = prefix + ".json" if os.path.exists(prefix + ".json") else prefix + ".pdmodel"
    if program.endswith(".json"):
        program = float32_scales(program)
    path = os.path.join(out, "ppyoloe_s.onnx" if exclude_nms else "ppyoloe_s_nms.onnx")
    paddle2onnx.export(program, prefix + ".pdiparams", save_file=path, opset_version=opset,
                       auto_upgrade_opset=False, enable_onnx_checker=True, optimize_tool="None")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the ONNX files")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--opset", type=int, default=11)
    args = ap.parse_args()
    paddle.set_device("cpu")
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for exclude_nms in (True, False):
            print(export(args.out, args.size, args.opset, exclude_nms, work))


if __name__ == "__main__":
    main()
