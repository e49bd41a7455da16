"""Ground truth loading (YOLO label folders, COCO JSON) and pycocotools bbox mAP.

COCO conventions used (as ultralytics does when it scores with pycocotools): category ids are
the model's class ids, boxes are top-left ``x y w h`` in original-image pixels, ground-truth
``area = w * h`` and ``iscrowd = 0``, every evaluated image is in ``imgIds`` (detections on an
image without labels are false positives).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..pass_base import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageBoxes:
    """Boxes of one image: ``boxes`` xyxy (N, 4) in original pixels, ``classes`` (N,), ``scores``
    (N,) for detections (``None`` for ground truth). ``key`` is the image file name."""

    key: str
    hw: Tuple[int, int]
    boxes: np.ndarray
    classes: np.ndarray
    scores: Optional[np.ndarray] = None
    #: ground truth only: COCO crowd regions (detections inside them are neither TP nor FP)
    crowd: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def above(self, conf: float) -> "ImageBoxes":
        """The boxes scoring at least ``conf``, as ground truth (no scores)."""
        m = self.scores >= conf if self.scores is not None else np.ones(len(self), bool)
        return ImageBoxes(self.key, self.hw, self.boxes[m], self.classes[m], None)


def _parse_label_line(line: str, where: str) -> Tuple[int, List[float]]:
    parts = line.split()
    try:
        cls = int(float(parts[0]))
        vals = [float(v) for v in parts[1:]]
    except ValueError:
        raise UsageError(f"{where}: not a YOLO label line 'class cx cy w h': {line.strip()[:60]!r}") from None
    if len(vals) == 4:
        return cls, vals
    if len(vals) >= 6 and len(vals) % 2 == 0:  # polygon segment: its bounding box
        xs, ys = vals[0::2], vals[1::2]
        x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
        return cls, [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    raise UsageError(f"{where}: expected 'class cx cy w h' (5 values), got {len(vals) + 1}")


def read_yolo_labels(path: Path, hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """(boxes xyxy in pixels, classes) from one YOLO label file; a missing file means no objects."""
    if not path.exists():
        return np.zeros((0, 4), np.float64), np.zeros((0,), np.int64)
    rows, classes = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        c, (cx, cy, w, h) = _parse_label_line(line, f"{path}:{n}")
        H, W = hw
        rows.append([(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H])
        classes.append(c)
    return np.asarray(rows, np.float64).reshape(-1, 4), np.asarray(classes, np.int64)


ImageList = Sequence[Tuple[str, Tuple[int, int]]]


def load_yolo_labels(folder: Union[str, Path], images: ImageList) -> List[ImageBoxes]:
    """Ground truth for ``images`` (file name, (h, w)) from ``folder/<stem>.txt``."""
    p = Path(folder)
    if not p.is_dir():
        raise UsageError(f"{p}: label folder does not exist")
    out = []
    for key, hw in images:
        boxes, classes = read_yolo_labels(p / (Path(key).stem + ".txt"), hw)
        out.append(ImageBoxes(key, hw, boxes, classes))
    if not any(len(g) for g in out):
        raise UsageError(f"{p}: no labels found for the {len(images)} images (expected <image stem>.txt)")
    return out


def load_coco_json(path: Union[str, Path], images: ImageList, n_classes: int) -> List[ImageBoxes]:
    """Ground truth from a COCO instances JSON, images matched by file name.

    Category ids map to class indices: identity when they are 0..C-1, otherwise the i-th
    category by id is class i (the COCO 91 -> 80 mapping of YOLO models).
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text())
        cat_ids = sorted(int(c["id"]) for c in d["categories"])
        by_name = {Path(im["file_name"]).name: int(im["id"]) for im in d["images"]}
        anns = d["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{p}: not a COCO instances JSON ({type(exc).__name__}: {exc})") from None
    to_cls = {c: c for c in cat_ids} if cat_ids == list(range(len(cat_ids))) else \
        {c: i for i, c in enumerate(cat_ids)}
    per_img: Dict[int, List[dict]] = {}
    for a in anns:
        per_img.setdefault(int(a["image_id"]), []).append(a)
    out, missing = [], 0
    for key, hw in images:
        iid = by_name.get(Path(key).name)
        missing += iid is None
        rows = [a for a in per_img.get(iid, []) if int(a["category_id"]) in to_cls]
        xywh = np.asarray([a["bbox"] for a in rows], np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        classes = np.asarray([to_cls[int(a["category_id"])] for a in rows], np.int64)
        crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in rows], bool)
        out.append(ImageBoxes(key, hw, boxes, classes, crowd=crowd if crowd.any() else None))
    if missing == len(images):
        raise UsageError(f"{p}: none of the {len(images)} images is listed in the JSON")
    if missing:
        log.warning("%s: %d of %d images are not in the JSON (treated as having no objects)",
                    p, missing, len(images))
    if len(cat_ids) != n_classes:
        log.warning("%s: %d categories but the model predicts %d classes", p, len(cat_ids), n_classes)
    return out


def load_ground_truth(labels: Union[str, Path], images: ImageList, n_classes: int) -> List[ImageBoxes]:
    """A YOLO label folder, or a ``.json`` COCO instances file."""
    p = Path(labels)
    if p.suffix.lower() == ".json":
        if not p.is_file():
            raise UsageError(f"{p}: no such label file")
        return load_coco_json(p, images, n_classes)
    return load_yolo_labels(p, images)


def _coco_dicts(gt: Sequence[ImageBoxes], dt: Sequence[ImageBoxes]) -> Tuple[dict, list]:
    images, anns, res, cats = [], [], [], set()
    for img_id, (g, d) in enumerate(zip(gt, dt)):
        images.append({"id": img_id, "file_name": g.key, "height": g.hw[0], "width": g.hw[1]})
        crowd = g.crowd if g.crowd is not None else np.zeros(len(g), bool)
        for b, c, k in zip(g.boxes, g.classes, crowd):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            # pycocotools treats annotation id 0 as "unmatched": ids start at 1
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(c), "iscrowd": int(k),
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h})
            cats.add(int(c))
        for b, c, s in zip(d.boxes, d.classes, d.scores):
            res.append({"image_id": img_id, "category_id": int(c), "score": float(s),
                        "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    gt_dict = {"info": {}, "licenses": [], "images": images, "annotations": anns,
               "categories": [{"id": c, "name": str(c)} for c in sorted(cats)]}
    return gt_dict, res


def coco_map(gt: Sequence[ImageBoxes], dt: Sequence[ImageBoxes]) -> Dict[str, float]:
    """pycocotools bbox mAP of detections ``dt`` against ``gt`` (same images, same order)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if [g.key for g in gt] != [d.key for d in dt]:
        raise UsageError("ground truth and detections cover different images")
    gt_dict, res = _coco_dicts(gt, dt)
    stats = {"map": 0.0, "map50": 0.0, "map75": 0.0, "n_images": len(gt),
             "n_detections": len(res), "n_ground_truth": len(gt_dict["annotations"])}
    if not res or not gt_dict["annotations"]:
        return stats
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # pycocotools prints its progress and table
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(res), "bbox")
        ev.params.imgIds = list(range(len(gt)))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log.debug("pycocotools:\n%s", buf.getvalue())
    s = [max(float(v), 0.0) for v in ev.stats]
    stats.update({"map": s[0], "map50": s[1], "map75": s[2]})
    return stats
