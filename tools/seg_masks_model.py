#!/usr/bin/env python3
"""Build a YOLOv5n-seg whose masks mean something, from a detection YOLOv5n and box labels.

    EXPORTER_PYTHON tools/seg_masks_model.py --weights yolov5n_bn.onnx --images IMAGES --labels LABELS \\
        --out v5nseg_masks.onnx [--size 320] [--epochs 30]

No trained segmentation model is at hand here, and one with random mask weights has masks that
flip with float rounding, so what INT8 or pruning does to masks cannot be read from it. This
script builds the ``yolov5`` package's yolov5n-seg, copies the BN-kept YOLOv5n ONNX's weights
into its backbone, neck and detection rows, and trains only the mask parts (the prototype branch
and the mask-coefficient rows of the head's Convs) with each label box as its object's mask:
for each labelled object, the three candidates whose boxes overlap it most (IoU >= 0.3, score >=
0.05) learn its box as their mask (BCE inside their own box plus 2 prototype pixels). The box
outputs stay the detection model's exactly. It writes an ONNX export at 640x640 (opset 12).

Needs a Python with PyTorch and the ``yolov5`` package (7.0.x, ``pip install --no-deps``), which
this project does not depend on: run it with that interpreter. Figures measured with its output
are under "Output layouts" in README.md.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", required=True, help="a YOLOv5n ONNX export with its BatchNorms kept")
    ap.add_argument("--images", required=True)
    ap.add_argument("--labels", required=True, help="YOLO box labels (class cx cy w h)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=320, help="training input size")
    ap.add_argument("--epochs", type=int, default=30)
    a = ap.parse_args()

    import onnx
    import torch
    import torch.nn.functional as F
    import yolov5
    from onnx import numpy_helper
    from PIL import Image
    from yolov5.models.yolo import SegmentationModel

    torch.manual_seed(0)
    m = SegmentationModel(os.path.join(os.path.dirname(yolov5.__file__), "models/segment/yolov5n-seg.yaml"))
    src = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy())
           for i in onnx.load(a.weights).graph.initializer}
    sd = m.state_dict()
    for k, v in sd.items():
        if k in src and src[k].shape == v.shape:
            sd[k] = src[k]
        elif k in src:   # a head Conv: 3 x (85 detection rows + 32 coefficient rows)
            per, new = v.shape[0] // 3, v.clone() * 0.01
            for j in range(3):
                new[j * per: j * per + 85] = src[k][j * 85:(j + 1) * 85]
            sd[k] = new
    m.load_state_dict(sd)
    m.eval()
    head = m.model[-1]
    per, nm = head.no, head.nm
    for p in m.parameters():
        p.requires_grad_(False)
    rows = torch.zeros(3 * per, dtype=torch.bool)
    for j in range(3):
        rows[j * per + 85: (j + 1) * per] = True
    train = list(head.proto.parameters())
    for p in train:
        p.requires_grad_(True)
    for conv in head.m:
        for p in conv.parameters():
            p.requires_grad_(True)
            train.append(p)
            p.register_hook(lambda g: g * rows.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    opt = torch.optim.Adam(train, lr=2e-3)
    size = a.size

    def load(f: Path):
        img = Image.open(f).convert("RGB")
        w0, h0 = img.size
        r = min(size / h0, size / w0)
        nw, nh = round(w0 * r), round(h0 * r)
        canvas = Image.new("RGB", (size, size), (114, 114, 114))
        left, top = (size - nw) // 2, (size - nh) // 2
        canvas.paste(img.resize((nw, nh), Image.BILINEAR), (left, top))
        x = torch.from_numpy(np.asarray(canvas, np.float32) / 255).permute(2, 0, 1)
        boxes = []
        lf = Path(a.labels) / (f.stem + ".txt")
        if lf.exists():
            for line in lf.read_text().splitlines():
                _, cx, cy, bw, bh = map(float, line.split()[:5])
                boxes.append([(cx - bw / 2) * nw + left, (cy - bh / 2) * nh + top,
                              (cx + bw / 2) * nw + left, (cy + bh / 2) * nh + top])
        return x, torch.tensor(boxes).reshape(-1, 4)

    files = sorted(p for p in Path(a.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    data = [load(f) for f in files]

    def iou(p, q):
        lt, rb = torch.max(p[:, None, :2], q[None, :, :2]), torch.min(p[:, None, 2:], q[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(2)
        area = lambda b: (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)  # noqa: E731
        return inter / (area(p)[:, None] + area(q)[None] - inter + 1e-9)

    for ep in range(a.epochs):
        t0, total, pairs = time.time(), 0.0, 0
        order = np.random.default_rng(ep).permutation(len(data))
        for s in range(0, len(order), 8):
            batch = [data[i] for i in order[s:s + 8]]
            pred, protos = m(torch.stack([b[0] for b in batch]))[:2]
            ph, pw = protos.shape[2:]
            ys, xs = (torch.arange(ph) + 0.5)[:, None] * size / ph, (torch.arange(pw) + 0.5)[None] * size / pw
            loss, n = 0.0, 0
            for k, (_, gt) in enumerate(batch):
                if not len(gt):
                    continue
                p = pred[k]
                xyxy = torch.cat([p[:, :2] - p[:, 2:4] / 2, p[:, :2] + p[:, 2:4] / 2], 1).detach()
                conf = (p[:, 4:5] * p[:, 5:85]).max(1).values.detach()
                ov = iou(xyxy, gt) * (conf > 0.05)[:, None]
                best = ov.topk(min(3, len(ov)), dim=0)
                for g in range(len(gt)):
                    for j, v in zip(best.indices[:, g], best.values[:, g]):
                        if v < 0.3:
                            continue
                        logit = (p[j, 85:85 + nm] @ protos[k].reshape(nm, -1)).reshape(ph, pw)
                        b, c = gt[g], xyxy[j]
                        target = ((xs >= b[0]) & (xs < b[2]) & (ys >= b[1]) & (ys < b[3])).float()
                        pad = 2 * size / pw
                        inside = ((xs >= c[0] - pad) & (xs < c[2] + pad)
                                  & (ys >= c[1] - pad) & (ys < c[3] + pad)).float()
                        bce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
                        loss = loss + (bce * inside).sum() / inside.sum().clamp(min=1)
                        n += 1
            if n:
                opt.zero_grad()
                (loss / n).backward()
                opt.step()
                total, pairs = total + float(loss), pairs + n
        print(f"epoch {ep}: mask loss {total / max(pairs, 1):.4f} over {pairs} pairs, "
              f"{time.time() - t0:.0f} s", flush=True)

    for mod in m.modules():
        if hasattr(mod, "export") and hasattr(mod, "inplace"):
            mod.inplace, mod.export = False, True
    with torch.no_grad():
        torch.onnx.export(m, torch.zeros(1, 3, 640, 640), a.out, opset_version=12, input_names=["images"],
                          output_names=["output0", "output1"], dynamo=False, do_constant_folding=True)
    mp = onnx.load(a.out)
    for key, value in (("stride", "32"), ("names", str({i: f"c{i}" for i in range(80)}))):
        mp.metadata_props.add(key=key, value=value)
    onnx.save(mp, a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
