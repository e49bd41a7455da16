#!/usr/bin/env python3
"""Export random-weight PaddleDetection detectors to ONNX as its export_model.py + paddle2onnx do.

    PADDLE_PYTHON tools/export_paddle.py --out DIR [--opset 11]

Writes, at 320x320:
- ``ppyoloe_s.onnx``: PP-YOLOE-s, the ``exclude_nms`` export: inputs ``image`` (N, 3, 320, 320) and
  ``scale_factor`` (N, 2); outputs boxes (N, A, 4) x1 y1 x2 y2 divided by the scale factor, and
  class scores (N, 80, A);
- ``ppyoloe_s_nms.onnx``: the same with MultiClassNMS kept: (K, 6) ``class score x1 y1 x2 y2`` rows
  and a count per image (batch 1 only, as paddle2onnx warns);
- ``picodet_s.onnx``: PP-PicoDet-S (LCNet x0.75, LCPAN, PicoHeadV2, strides 8-64) with its
  post-processing and NMS, inputs ``image`` and ``scale_factor`` (im_shape is unused, so dropped);
- ``picodet_s_nopost.onnx``: the same without post-processing (``export.post_process: False``):
  input ``image`` (1, 3, 320, 320), per level class scores (1, h*w, 80) and distance bins
  (1, h*w, 32).

The models are built from ppdet's classes at the crn_s and picodet_s_320 settings, RepVGG
branches fused as ppdet's export does. Nothing is downloaded: BatchNorm statistics and the head
Convs (zero-initialised by ppdet) get random values, so this tests graphs, not accuracy. Needs a
Python with paddlepaddle (3.x), paddle2onnx (2.x) and paddledet 2.6 (which wants numpy < 1.24),
which this project does not depend on. Workarounds for those versions:
- ppdet 2.6 builds multiclass_nms3 with the legacy static API, which Paddle 3's PIR refuses; the
  NMS here calls the same op through ``paddle._C_ops``, as later PaddleDetection releases do.
- Paddle 3.3 saves float arrays (the necks' upsampling scales) as float64, which paddle2onnx 2.1
  refuses ("MUST be ir::FloatAttribute"); a copy of the saved program has them as float32.
- ppdet 2.6's LCPAN appends to its default ``spatial_scales`` list; each PicoDet gets its own.
- PicoHeadV2 reads its loss objects' settings, so it gets real ones (unused at inference).
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


def randomise_bn(model, rng: np.random.RandomState) -> None:
    for layer in model.sublayers():
        if isinstance(layer, (paddle.nn.BatchNorm2D, paddle.nn.BatchNorm)):
            c = layer._mean.shape[0]
            layer._mean.set_value(rng.normal(0, 0.1, c).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.bias.set_value(rng.normal(0, 0.1, c).astype("float32"))


def _normal(rng: np.random.RandomState, mean: float, std: float, shape) -> np.ndarray:
    return (mean + rng.normal(0, std, shape)).astype("float32")


def deploy(model):
    model.eval()
    for layer in model.sublayers():  # RepVGG blocks fused, as ppdet's Trainer.export does
        if hasattr(layer, "convert_to_deploy"):
            layer.convert_to_deploy()
    return model


def build_picodet(size: int, post_process: bool, seed: int = 0):
    from ppdet.modeling.architectures import PicoDet
    from ppdet.modeling.backbones import LCNet
    from ppdet.modeling.heads.pico_head import PicoFeat, PicoHeadV2
    from ppdet.modeling.losses import DistributionFocalLoss, GIoULoss
    from ppdet.modeling.losses.varifocal_loss import VarifocalLoss
    from ppdet.modeling.necks import LCPAN

    paddle.seed(seed)
    backbone = LCNet(scale=0.75, feature_maps=[3, 4, 5])
    neck = LCPAN(in_channels=[s.channels for s in backbone.out_shape], out_channels=96, use_depthwise=True,
                 num_features=4, spatial_scales=[0.125, 0.0625, 0.03125])
    feat = PicoFeat(feat_in=96, feat_out=96, num_convs=2, num_fpn_stride=4, norm_type="bn",
                    share_cls_reg=True, use_se=True)
    nms = PirMultiClassNMS(nms_top_k=1000, keep_top_k=100, score_threshold=0.025, nms_threshold=0.6)
    head = PicoHeadV2(conv_feat=feat, num_classes=80, fpn_stride=[8, 16, 32, 64], prior_prob=0.01, reg_max=7,
                      feat_in_chan=96, cell_offset=0.5, grid_cell_scale=5.0, static_assigner_epoch=100,
                      use_align_head=True, nms=nms, eval_size=[size, size], static_assigner=None,
                      assigner=None, loss_class=VarifocalLoss(use_sigmoid=False, iou_weighted=True),
                      loss_dfl=DistributionFocalLoss(loss_weight=0.5), loss_bbox=GIoULoss(loss_weight=2.5))
    model = PicoDet(backbone=backbone, neck=neck, head=head)
    rng = np.random.RandomState(seed)
    randomise_bn(model, rng)
    for convs, bias in ((head.head_cls_list, -3.0), (head.head_reg_list, 0.0)):  # zeros in ppdet
        for conv in convs:
            conv.weight.set_value(_normal(rng, 0, 0.05, conv.weight.shape))
            conv.bias.set_value(_normal(rng, bias, 1.0, conv.bias.shape))
    model = deploy(model)
    model.export_post_process, model.export_nms = post_process, True
    return model


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
    randomise_bn(model, rng)
    for conv in list(head.pred_cls) + list(head.pred_reg):  # zeros in ppdet
        conv.weight.set_value(_normal(rng, 0, 0.01, conv.weight.shape))
    for conv in head.pred_cls:
        conv.bias.set_value(_normal(rng, -2.0, 0.5, conv.bias.shape))
    for conv in head.pred_reg:
        conv.bias.set_value(_normal(rng, 0.0, 1.0, conv.bias.shape))
    return deploy(model)


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


def export(out: str, name: str, model, spec: list, opset: int, work: str) -> str:
    import paddle2onnx

    prefix = os.path.join(work, name, "model")
    paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), prefix, input_spec=spec)
    program = prefix + ".json" if os.path.exists(prefix + ".json") else prefix + ".pdmodel"
    if program.endswith(".json"):
        program = float32_scales(program)
    path = os.path.join(out, name + ".onnx")
    paddle2onnx.export(program, prefix + ".pdiparams", save_file=path, opset_version=opset,
                       auto_upgrade_opset=False, enable_onnx_checker=True, optimize_tool="None")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the ONNX files")
    ap.add_argument("--opset", type=int, default=11)
    args = ap.parse_args()
    paddle.set_device("cpu")
    os.makedirs(args.out, exist_ok=True)
    size = 320
    image = InputSpec(shape=[None, 3, size, size], name="image")
    with_scale = [{"image": image, "scale_factor": InputSpec(shape=[None, 2], name="scale_factor")}]
    jobs = [("ppyoloe_s", lambda: build(size, True), with_scale),
            ("ppyoloe_s_nms", lambda: build(size, False), with_scale),
            ("picodet_s", lambda: build_picodet(size, True), with_scale),
            # without post-processing ppdet exports a fixed batch of 1 and the image alone
            ("picodet_s_nopost", lambda: build_picodet(size, False),
             [{"image": InputSpec(shape=[1, 3, size, size], name="image")}])]
    with tempfile.TemporaryDirectory() as work:
        for name, make, spec in jobs:
            print(export(args.out, name, make(), spec, args.opset, work))


if __name__ == "__main__":
    main()
