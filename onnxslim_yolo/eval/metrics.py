"""Ground truth loading (YOLO label folders, COCO JSON) and pycocotools mAP.

COCO conventions used (as ultralytics does when it scores with pycocotools): category ids are
the model's class ids, boxes are top-left ``x y w h`` in original-image pixels, ground-truth
``area = w * h`` and ``iscrowd = 0``, every evaluated image is in ``imgIds`` (detections on an
image without labels are false positives).

Besides boxes, :func:`coco_map` scores masks (``segm``: a label's polygon against a detection's
mask), keypoints (``keypoints``: OKS, with COCO's 17 per-keypoint sigmas for 17 keypoints and
1/K each otherwise, a label's area taken as 0.53 x its box's, as ultralytics does) and rotated
boxes (``obb``: matched by probabilistic IoU, :func:`probiou`, as ultralytics' OBB validation
matches them; a label's rotated box is its polygon's minimum-area rectangle).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..pass_base import UsageError, warn_once

log = logging.getLogger(__name__)

#: the label notes being collected (:func:`label_notes`), innermost last
_NOTES: List[List[str]] = []


@contextlib.contextmanager
def label_notes() -> Iterator[List[str]]:
    """The label warnings given inside, as one-line notes: the checks make them a warning of their
    own (a log line alone left ``accuracy.map_drop`` passing and the JSON report silent)."""
    notes: List[str] = []
    _NOTES.append(notes)
    try:
        yield notes
    finally:
        _NOTES.remove(notes)


def _label_warning(key: Any, msg: str, *args: Any) -> None:
    """``log.warning`` (once per ``key`` in this process unless it is None), and a note in every
    :func:`label_notes` collecting, even when the log line was given before."""
    for notes in _NOTES:
        if msg % args not in notes:
            notes.append(msg % args)
    if key is None:
        log.warning(msg, *args)
    else:
        warn_once(log, key, msg, *args)


@dataclass(frozen=True)
class ImageBoxes:
    """Boxes of one image: ``boxes`` xyxy (N, 4) in original pixels, ``classes`` (N,), ``scores``
    (N,) for detections (``None`` for ground truth). ``key`` is the image file name.
    ``segments`` (one COCO ``segmentation`` per box: a list of pixel polygons or an RLE, None for a
    box without one) and ``keypoints`` (N, K, 3) x y visibility in pixels are there when labels or
    a model give them."""

    key: str
    hw: Tuple[int, int]
    boxes: np.ndarray
    classes: np.ndarray
    scores: Optional[np.ndarray] = None
    #: ground truth only: COCO crowd regions (detections inside them are neither TP nor FP)
    crowd: Optional[np.ndarray] = None
    segments: Optional[List[Any]] = None
    keypoints: Optional[np.ndarray] = None
    #: (N, 5) rotated boxes cx cy w h angle (radians) in pixels, of an obb export's detections
    rotated: Optional[np.ndarray] = None
    #: detections only: how many classes the model scores (None when its output does not say)
    n_classes: Optional[int] = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def above(self, conf: float) -> "ImageBoxes":
        """The boxes scoring at least ``conf``, as ground truth (no scores)."""
        m = self.scores >= conf if self.scores is not None else np.ones(len(self), bool)
        segs = None if self.segments is None else [s for s, k in zip(self.segments, m) if k]
        kpts = None if self.keypoints is None else self.keypoints[m]
        rot = None if self.rotated is None else self.rotated[m]
        return ImageBoxes(self.key, self.hw, self.boxes[m], self.classes[m], None, None, segs, kpts, rot)


@dataclass(frozen=True)
class Label:
    """One YOLO label line, normalized: class, box cx cy w h, and the polygon (x y pairs) or the
    keypoints (K, 2 or 3) it gave."""

    cls: int
    box: Tuple[float, float, float, float]
    polygon: Optional[np.ndarray] = None
    keypoints: Optional[np.ndarray] = None


#: how far past 0-1 a YOLO label's normalised value may lie (rounding in converters) before it
#: is refused; ultralytics drops such an image's labels as corrupt, with a warning
COORD_SLACK = 1e-3


def _normalised(values: List[float], where: str) -> List[float]:
    """``values`` when each is a coordinate normalised to 0-1 (within COORD_SLACK); a UsageError
    naming ``where`` and the first that is not (NaN included)."""
    bad = next((v for v in values if not -COORD_SLACK <= v <= 1 + COORD_SLACK), None)
    if bad is not None:
        raise UsageError(f"{where}: value {bad:g} is not a coordinate normalised to 0-1 "
                         f"(YOLO labels divide by the image's width and height)")
    return values


def _parse_label_line(line: str, where: str, keypoints: int = 0) -> Label:
    """A box line ``class cx cy w h``, a segment ``class x1 y1 x2 y2 ...`` (its box is the polygon's
    bounding box), or a pose line ``class cx cy w h`` then K keypoints of ``x y`` or ``x y v``.
    ``keypoints`` is K for a pose model (a line of 4 + 2K values is then a pose line, not a
    polygon); any line of 4 + 3K values (an odd count: no polygon has one) is read as a pose line."""
    parts = line.split()
    try:
        cls_value = float(parts[0])
        vals = [float(v) for v in parts[1:]]
    except ValueError:
        raise UsageError(f"{where}: not a YOLO label line 'class cx cy w h': {line.strip()[:60]!r}") from None
    if not cls_value.is_integer() or cls_value < 0:
        raise UsageError(f"{where}: class {parts[0]!r} is not a class index (a whole number >= 0)")
    cls = int(cls_value)
    n = len(vals)
    if n == 4:
        return Label(cls, tuple(_normalised(vals, where)))
    rest = n - 4
    dims = next((d for d in (3, 2) if keypoints and rest == keypoints * d), 0)
    if not dims and n > 4 and n % 2 and rest % 3 == 0:
        dims = 3
    if dims:
        if keypoints and rest != keypoints * dims:
            raise UsageError(f"{where}: {rest // dims} keypoints but the model predicts {keypoints}")
        kpts = np.asarray(vals[4:], np.float64).reshape(-1, dims)
        _normalised(vals[:4] + kpts[:, :2].ravel().tolist(), where)   # not the visibilities
        return Label(cls, tuple(vals[:4]), keypoints=kpts)
    if n >= 6 and n % 2 == 0:  # polygon segment: its bounding box
        xy = np.asarray(_normalised(vals, where), np.float64).reshape(-1, 2)
        (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
        return Label(cls, ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), polygon=xy)
    raise UsageError(f"{where}: expected 'class cx cy w h' (5 values), a polygon 'class x1 y1 x2 y2 x3 y3 "
                     f"...' or 'class cx cy w h' and keypoints; got {n + 1} values")


def _pixel_keypoints(k: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """(K, 2 or 3) normalized keypoints -> (K, 3) pixels; without visibilities a keypoint at
    (0, 0), the way YOLO pose labels write a missing one, is not visible (0) and the others are (2)."""
    H, W = hw
    out = np.zeros((len(k), 3), np.float64)
    out[:, 0], out[:, 1] = k[:, 0] * W, k[:, 1] * H
    out[:, 2] = k[:, 2] if k.shape[1] == 3 else np.where((k[:, 0] > 0) | (k[:, 1] > 0), 2.0, 0.0)
    return out


def read_labels(path: Path, hw: Tuple[int, int], keypoints: int = 0) -> ImageBoxes:
    """One YOLO label file as ground truth in pixels (a missing file means no objects), keyed by
    its name; polygons become ``segments``, and when every line has ``keypoints`` (K > 0) keypoints,
    they become ``keypoints`` (N, K, 3)."""
    H, W = hw
    labels = []
    if path.exists():
        try:   # utf-8-sig: a byte-order mark, as Windows editors write one, is no part of the class
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: cannot read the label file ({type(exc).__name__})") from None
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        labels = [_parse_label_line(line, f"{path}:{n}", keypoints) for n, line in lines]
        unique, seen = [], set()
        for lab, (_, line) in zip(labels, lines):
            values = tuple(map(float, line.split()))
            if values not in seen:
                seen.add(values)
                unique.append(lab)
        if len(unique) < len(labels):   # each copy would be an object no detection can match twice
            _label_warning(("duplicate labels", str(path)), "%s: %d duplicate label lines left out, as "
                           "ultralytics leaves them out", path, len(labels) - len(unique))
            labels = unique
    boxes = np.asarray([[(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H]
                        for cx, cy, w, h in (lab.box for lab in labels)], np.float64).reshape(-1, 4)
    classes = np.asarray([lab.cls for lab in labels], np.int64)
    segs = None
    if any(lab.polygon is not None for lab in labels):
        segs = [None if lab.polygon is None else [(lab.polygon * [W, H]).ravel().tolist()] for lab in labels]
    kpts = None
    if keypoints and labels and all(lab.keypoints is not None for lab in labels):
        kpts = np.stack([_pixel_keypoints(lab.keypoints, hw) for lab in labels])
    elif keypoints and not labels:
        kpts = np.zeros((0, keypoints, 3), np.float64)
    return ImageBoxes(path.name, hw, boxes, classes, segments=segs, keypoints=kpts)


def read_yolo_labels(path: Path, hw: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """(boxes xyxy in pixels, classes) from one YOLO label file; a missing file means no objects."""
    g = read_labels(path, hw)
    return g.boxes, g.classes


ImageList = Sequence[Tuple[str, Tuple[int, int]]]


def load_yolo_labels(folder: Union[str, Path], images: ImageList, keypoints: int = 0) -> List[ImageBoxes]:
    """Ground truth for ``images`` (file name, (h, w)) from ``folder/<stem>.txt`` (``keypoints``:
    K of a pose model, :func:`read_labels`)."""
    p = Path(folder)
    if p.is_file():
        raise UsageError(f"{p}: a file; expected a folder of YOLO labels (<image stem>.txt) or a COCO .json")
    if not p.is_dir():
        raise UsageError(f"{p}: label folder does not exist")
    out = []
    for key, hw in images:
        out.append(replace(read_labels(p / (Path(key).stem + ".txt"), hw, keypoints), key=key))
    if not any(len(g) for g in out):
        raise UsageError(f"{p}: no labels found for the {len(images)} images (expected <image stem>.txt)")
    missing = [key for key, _ in images if not (p / (Path(key).stem + ".txt")).exists()]
    if 2 * len(missing) > len(images):   # once: a run scores several models
        _label_warning(("no label files", p.resolve(), len(missing)),
                       "%s: %d of %d images have no label file (%s first), scored as showing no object; "
                       "are these the images' labels?", p, len(missing), len(images), missing[0])
    return out


#: the 80 COCO category names, in the order of the classes of COCO-trained YOLO models
COCO80 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush")


def _category_classes(categories: Sequence[dict], n_classes: int, path: Path) -> Dict[int, int]:
    """Category id -> class index. 0-based ids below ``n_classes`` are the classes themselves
    (all of them, or the subset a converter lists); COCO's category names map to a COCO-trained
    model's classes (COCO's ids 1..90 with gaps, all 80 or a subset); as many categories as the
    model has classes map by rank (ids 1..C). Anything else is ambiguous and refused: scoring it
    by rank put a subset's classes on the wrong ones (mAP 0.57 -> 0.06, with only a warning)."""
    ids = sorted(int(c["id"]) for c in categories)
    if ids and ids[0] == 0 and ids[-1] < max(n_classes, len(ids)):
        return {c: c for c in ids}
    names = {int(c["id"]): str(c.get("name", "")).strip().lower() for c in categories}
    coco = {n: i for i, n in enumerate(COCO80)}
    if ids and n_classes == len(COCO80) and all(n in coco for n in names.values()):
        return {c: coco[n] for c, n in names.items()}
    if len(ids) >= n_classes:
        return {c: i for i, c in enumerate(ids)}
    shown = ", ".join(map(str, ids[:6])) + (", ..." if len(ids) > 6 else "")
    raise UsageError(f"{path}: {len(ids)} categories (ids {shown}) for a model of {n_classes} classes: "
                     "which class each is cannot be told; give 0-based ids (the model's class indices), "
                     f"COCO's category names, or all {n_classes} categories")


def load_coco_json(path: Union[str, Path], images: ImageList, n_classes: int,
                   keypoints: int = 0) -> List[ImageBoxes]:
    """Ground truth from a COCO instances (or person keypoints) JSON, images matched by file name.

    Category ids map to class indices as :func:`_category_classes` says. Annotations'
    ``segmentation`` become ``segments``; with ``keypoints`` (K of a pose model) their
    ``keypoints`` of K x 3 values become ``keypoints``.
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8-sig"))
        categories = list(d["categories"])
        to_cls = _category_classes(categories, n_classes, p)
        by_name = {Path(im["file_name"]).name: int(im["id"]) for im in d["images"]}
        anns = d["annotations"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{p}: not a COCO instances JSON ({type(exc).__name__}: {exc})") from None
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
        segs = [a.get("segmentation") or None for a in rows]
        kpts = None
        if keypoints and all(len(a.get("keypoints") or ()) == 3 * keypoints for a in rows):
            kpts = np.asarray([a["keypoints"] for a in rows], np.float64).reshape(-1, keypoints, 3)
        out.append(ImageBoxes(key, hw, boxes, classes, crowd=crowd if crowd.any() else None,
                              segments=segs if any(x is not None for x in segs) else None, keypoints=kpts))
    if missing == len(images):
        raise UsageError(f"{p}: none of the {len(images)} images is listed in the JSON")
    unlisted = sum(int(a["category_id"]) not in to_cls for a in anns)
    if unlisted:
        _label_warning(None, "%s: %d of %d annotations have a category_id not in 'categories' (left out)",
                       p, unlisted, len(anns))
    if not any(len(g) for g in out):
        raise UsageError(f"{p}: no annotations for the {len(images)} images (of {len(anns)} in the JSON, "
                         f"{unlisted} with an unlisted category)")
    if missing:
        _label_warning(None, "%s: %d of %d images are not in the JSON (treated as having no objects)",
                       p, missing, len(images))
    if len(categories) > n_classes:
        _label_warning(None, "%s: %d categories but the model predicts %d classes", p, len(categories),
                       n_classes)
    return out


def without_unknown_classes(gt: Sequence[ImageBoxes], dt: Sequence[ImageBoxes], n_classes: int,
                            labels: Union[str, Path]) -> Tuple[List[ImageBoxes], List[ImageBoxes]]:
    """``gt`` and ``dt`` without the images whose labels hold a class the model cannot predict
    (``n_classes`` or above): ultralytics' val drops such an image as corrupt, where scoring it
    would count an AP of 0 for a class no model could find. Warns once per labels and class count,
    naming an image; a UsageError when no image is left."""
    bad = [i for i, g in enumerate(gt) if len(g) and int(g.classes.max()) >= n_classes]
    if not bad:
        return list(gt), list(dt)
    first = gt[bad[0]]
    if len(bad) == sum(1 for g in gt if len(g)):   # the images left hold no object to score
        raise UsageError(f"{labels}: every image with objects has label classes the model cannot predict "
                         f"(it scores {n_classes} classes; {first.key} has class "
                         f"{int(first.classes.max())}); are these the model's labels?")
    _label_warning(("unknown classes", str(labels), n_classes),   # once: a run scores several models
                   "%s: %d of %d images have label classes the model cannot predict (it scores %d classes; "
                   "%s has class %d); they are left out of the mAP, as ultralytics' val leaves them out",
                   labels, len(bad), len(gt), n_classes, first.key, int(first.classes.max()))
    drop = set(bad)
    return ([g for i, g in enumerate(gt) if i not in drop], [d for i, d in enumerate(dt) if i not in drop])


def load_ground_truth(labels: Union[str, Path], images: ImageList, n_classes: int,
                      keypoints: int = 0) -> List[ImageBoxes]:
    """A YOLO label folder, or a ``.json`` COCO instances file (``keypoints``: K of a pose model)."""
    p = Path(labels)
    if p.suffix.lower() == ".json":
        if not p.is_file():
            raise UsageError(f"{p}: no such label file")
        return load_coco_json(p, images, n_classes, keypoints)
    return load_yolo_labels(p, images, keypoints)


def labels_have_shapes(labels: Union[str, Path], stems: Optional[Sequence[str]] = None) -> bool:
    """Whether labels can give more than boxes (polygons or keypoints): a YOLO label line with
    more than 5 values (in the label files of the image ``stems`` when given, else in any), or a
    COCO JSON naming ``segmentation`` or ``keypoints``. Masks cost time to compute (about as much
    as the model's run on yolov5n-seg), so evaluation computes them only when this holds."""
    p = Path(labels)
    if p.suffix.lower() == ".json":
        try:
            text = p.read_bytes()
        except OSError:
            return True                 # load_ground_truth reports it
        return b'"segmentation"' in text or b'"keypoints"' in text
    if not p.is_dir():
        return True
    for f in (p / f"{stem}.txt" for stem in stems) if stems is not None else p.glob("*.txt"):
        try:
            lines = f.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError):
            continue                    # read_labels reports it
        if any(len(line.split()) > 5 for line in lines):
            return True
    return False


#: COCO's per-keypoint OKS sigmas of its 17 person keypoints
COCO_KPT_SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87,
                            .89, .89]) / 10.0
#: a keypoint label's object area: this fraction of its box (ultralytics' OKS does the same)
KPT_AREA = 0.53
KINDS = ("bbox", "segm", "keypoints", "obb")
#: (result key prefix, what is scored) of each mAP evaluation may report, boxes first: ``map``,
#: ``mask_map``, ``pose_map`` (and their ``map50``, ``map75``)
MAP_KINDS = (("", "box"), ("mask_", "mask"), ("pose_", "keypoint"), ("obb_", "rotated box"))


def map_drops(ref: Mapping[str, float], cand: Mapping[str, float]) -> Dict[str, float]:
    """mAP@0.5:0.95 points lost from ``ref`` to ``cand`` (results of evaluation's ``score``), by
    what both score (``box``, and ``mask``, ``keypoint`` or ``rotated box``; :data:`MAP_KINDS`)."""
    return {what: (ref[p + "map"] - cand[p + "map"]) * 100.0 for p, what in MAP_KINDS
            if p + "map" in ref and p + "map" in cand}


def _polygon_area(seg: Any, box: np.ndarray) -> float:
    """Area of a COCO segmentation given as pixel polygons (shoelace); the box's for an RLE."""
    if not isinstance(seg, list):
        return float((box[2] - box[0]) * (box[3] - box[1]))
    total = 0.0
    for poly in seg:
        xy = np.asarray(poly, np.float64).reshape(-1, 2)
        x, y = xy[:, 0], xy[:, 1]
        total += 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    return total


def _covariance(r: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, c) of the covariance [[a, c], [c, b]] of the uniform distribution over each rotated
    box cx cy w h angle of ``r`` (..., 5)."""
    w2, h2 = r[..., 2] ** 2 / 12.0, r[..., 3] ** 2 / 12.0
    cos, sin = np.cos(r[..., 4]), np.sin(r[..., 4])
    return w2 * cos ** 2 + h2 * sin ** 2, w2 * sin ** 2 + h2 * cos ** 2, (w2 - h2) * cos * sin


def probiou_pairs(r1: np.ndarray, r2: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Probabilistic IoU of rotated boxes (cx cy w h angle in the last axis), broadcast: one minus
    the Hellinger distance between the boxes' Gaussians (Llerena et al. 2021), as ultralytics
    matches and suppresses oriented boxes."""
    r1, r2 = np.asarray(r1, np.float64), np.asarray(r2, np.float64)
    a1, b1, c1 = _covariance(r1)
    a2, b2, c2 = _covariance(r2)
    dx, dy = r1[..., 0] - r2[..., 0], r1[..., 1] - r2[..., 1]
    a, b, c = a1 + a2, b1 + b2, c1 + c2
    det = a * b - c ** 2
    t1 = (a * dy ** 2 + b * dx ** 2) / (det + eps) * 0.25
    t2 = (c * -dx * dy) / (det + eps) * 0.5
    own = np.sqrt(np.clip(a1 * b1 - c1 ** 2, 0, None) * np.clip(a2 * b2 - c2 ** 2, 0, None))
    t3 = 0.5 * np.log(det / (4 * own + eps) + eps)
    bd = np.clip(t1 + t2 + t3, eps, 100.0)
    return 1.0 - np.sqrt(1.0 - np.exp(-bd) + eps)


def probiou(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """(N, M) :func:`probiou_pairs` of every rotated box of ``r1`` (N, 5) with every one of ``r2`` (M, 5)."""
    r1, r2 = np.asarray(r1, np.float64).reshape(-1, 5), np.asarray(r2, np.float64).reshape(-1, 5)
    return probiou_pairs(r1[:, None], r2[None])


def min_area_rect(points: np.ndarray) -> np.ndarray:
    """cx cy w h angle of the smallest rectangle around ``points`` (K, 2): the rectangle has a side
    along an edge of their convex hull, so each edge direction is tried (a DOTA label's four
    corners give their own rectangle)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    best = None
    for k in range(len(pts)):
        e = pts[(k + 1) % len(pts)] - pts[k]
        n = float(np.hypot(*e))
        if n == 0:
            continue
        u = e / n
        v = np.array([-u[1], u[0]])
        pu, pv = pts @ u, pts @ v
        area = (pu.max() - pu.min()) * (pv.max() - pv.min())
        if best is None or area < best[0] - 1e-9:
            mid_u, mid_v = (pu.max() + pu.min()) / 2, (pv.max() + pv.min()) / 2
            c = mid_u * u + mid_v * v
            angle = float(np.arctan2(u[1], u[0]))
            best = (area, [c[0], c[1], pu.max() - pu.min(), pv.max() - pv.min(), angle])
    if best is None:   # every point the same
        return np.array([pts[0, 0], pts[0, 1], 0.0, 0.0, 0.0])
    return np.asarray(best[1], np.float64)


def _label_rotated(g: ImageBoxes, i: int, b: np.ndarray) -> List[float]:
    """A ground-truth object's rotated box: given, else its polygon's minimum-area rectangle, else
    its axis-aligned box."""
    if g.rotated is not None:
        return [float(v) for v in g.rotated[i]]
    seg = g.segments[i] if g.segments is not None else None
    if isinstance(seg, list) and seg:
        return min_area_rect(np.concatenate([np.asarray(p, np.float64) for p in seg])).tolist()
    return [float((b[0] + b[2]) / 2), float((b[1] + b[3]) / 2), float(b[2] - b[0]), float(b[3] - b[1]), 0.0]


def _gt_ann(kind: str, g: ImageBoxes, i: int, b: np.ndarray) -> Dict[str, Any]:
    w, h = float(b[2] - b[0]), float(b[3] - b[1])
    ann: Dict[str, Any] = {"bbox": [float(b[0]), float(b[1]), w, h], "area": w * h}
    if kind == "segm":
        seg = g.segments[i] if g.segments is not None else None
        if seg is None:   # a box-only label: its rectangle
            seg = [[float(b[0]), float(b[1]), float(b[2]), float(b[1]), float(b[2]), float(b[3]),
                    float(b[0]), float(b[3])]]
        ann.update(segmentation=seg, area=_polygon_area(seg, b))
    elif kind == "keypoints":
        k = g.keypoints[i] if g.keypoints is not None else None
        ann.update(keypoints=[] if k is None else [float(v) for v in k.ravel()],
                   num_keypoints=0 if k is None else int((k[:, 2] > 0).sum()), area=w * h * KPT_AREA)
    elif kind == "obb":
        ann["rbox"] = _label_rotated(g, i, b)
    return ann


def _dt_ann(kind: str, d: ImageBoxes, i: int, b: np.ndarray) -> Dict[str, Any]:
    xywh = [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
    if kind == "segm":   # "box": the detection's own box (:func:`_segm_eval`)
        return {"segmentation": d.segments[i], "box": xywh}
    if kind == "keypoints":
        return {"keypoints": [float(v) for v in d.keypoints[i].ravel()]}
    ann: Dict[str, Any] = {"bbox": xywh}
    if kind == "obb":
        ann["rbox"] = [float(v) for v in d.rotated[i]]
    return ann


def _coco_dicts(gt: Sequence[ImageBoxes], dt: Sequence[ImageBoxes], kind: str = "bbox") -> Tuple[dict, list]:
    images, anns, res, cats = [], [], [], set()
    for img_id, (g, d) in enumerate(zip(gt, dt)):
        images.append({"id": img_id, "file_name": g.key, "height": g.hw[0], "width": g.hw[1]})
        crowd = g.crowd if g.crowd is not None else np.zeros(len(g), bool)
        for i, (b, c, k) in enumerate(zip(g.boxes, g.classes, crowd)):
            # pycocotools treats annotation id 0 as "unmatched": ids start at 1
            anns.append(dict(_gt_ann(kind, g, i, b), id=len(anns) + 1, image_id=img_id, category_id=int(c),
                             iscrowd=int(k)))
            cats.add(int(c))
        for i, (b, c, s) in enumerate(zip(d.boxes, d.classes, d.scores)):
            res.append(dict(_dt_ann(kind, d, i, b), image_id=img_id, category_id=int(c), score=float(s)))
    gt_dict = {"info": {}, "licenses": [], "images": images, "annotations": anns,
               "categories": [{"id": c, "name": str(c)} for c in sorted(cats)]}
    return gt_dict, res


def has_kind(gt: Sequence[ImageBoxes], dt: Sequence[ImageBoxes], kind: str) -> bool:
    """Whether ``kind`` can be scored: the detections carry masks (``segm``) or keypoints
    (``keypoints``), and some label gives a polygon or keypoints. Boxes always can."""
    if kind == "segm":
        return all(d.segments is not None for d in dt) and any(g.segments is not None for g in gt)
    if kind == "keypoints":
        return all(d.keypoints is not None for d in dt) and \
            any(g.keypoints is not None and len(g) for g in gt)
    if kind == "obb":
        return all(d.rotated is not None for d in dt) and any(
            (g.segments is not None or g.rotated is not None) and len(g) for g in gt)
    return True


def _rotated_eval(coco_gt, coco_dt):
    """pycocotools' bbox evaluation with each pair's IoU the :func:`probiou` of their ``rbox``."""
    from pycocotools.cocoeval import COCOeval

    class RotatedEval(COCOeval):
        def computeIoU(self, imgId, catId):   # noqa: N802 (pycocotools' name)
            p = self.params
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
            if not gt or not dt:
                return []
            dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")][:p.maxDets[-1]]
            return probiou(np.array([d["rbox"] for d in dt]), np.array([g["rbox"] for g in gt]))

    return RotatedEval(coco_gt, coco_dt, "bbox")


def _segm_eval(coco_gt, coco_dt):
    """pycocotools' segm evaluation, except that a detection and a ground truth whose masks are
    both empty overlap by the IoU of their boxes: a mask IoU of two empty masks is 0, so an empty
    mask could not be matched even by itself. Labels' polygons are not empty, but a model's
    confident detections can have empty masks (coarse prototypes, small objects), and agreement
    takes them as ground truth: a yolov5n-seg agreed 0.958 with its own identical masks."""
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    class SegmEval(COCOeval):
        def computeIoU(self, imgId, catId):   # noqa: N802 (pycocotools' name)
            ious = super().computeIoU(imgId, catId)
            if len(ious) == 0:
                return ious
            gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
            order = np.argsort([-d["score"] for d in dt], kind="mergesort")   # as pycocotools orders
            dt = [dt[i] for i in order][:self.params.maxDets[-1]]
            g_empty = mask_utils.area([g["segmentation"] for g in gt]) == 0
            d_empty = mask_utils.area([d["segmentation"] for d in dt]) == 0
            if g_empty.any() and d_empty.any():
                gi, di = np.nonzero(g_empty)[0], np.nonzero(d_empty)[0]
                boxes = mask_utils.iou([dt[i]["box"] for i in di], [gt[i]["bbox"] for i in gi],
                                       [int(gt[i]["iscrowd"]) for i in gi])
                ious = np.array(ious)
                ious[np.ix_(di, gi)] = boxes
            return ious

    return SegmEval(coco_gt, coco_dt, "segm")


def coco_map(gt: Sequence[ImageBoxes], dt: Sequence[ImageBoxes], kind: str = "bbox",
             max_dets: Optional[int] = None) -> Dict[str, float]:
    """pycocotools mAP of detections ``dt`` against ``gt`` (same images, same order): of their boxes
    (``bbox``), masks (``segm``), keypoints (``keypoints``, OKS) or rotated boxes (``obb``), scoring
    the best detections of a class in each image: ``max_dets`` when more than COCO's (100, and 20
    for keypoints), else COCO's."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if kind not in KINDS:
        raise UsageError(f"unknown mAP kind '{kind}'; choose one of {', '.join(KINDS)}")
    if [g.key for g in gt] != [d.key for d in dt]:
        raise UsageError("ground truth and detections cover different images")
    gt_dict, res = _coco_dicts(gt, dt, kind)
    stats = {"map": 0.0, "map50": 0.0, "map75": 0.0, "n_images": len(gt),
             "n_detections": len(res), "n_ground_truth": len(gt_dict["annotations"])}
    if not res or not gt_dict["annotations"]:
        return stats
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # pycocotools prints its progress and table
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        make = {"obb": _rotated_eval, "segm": _segm_eval}.get(kind)
        ev = make(coco_gt, coco_gt.loadRes(res)) if make else COCOeval(coco_gt, coco_gt.loadRes(res), kind)
        ev.params.imgIds = list(range(len(gt)))
        raised = max_dets is not None and max_dets > ev.params.maxDets[-1]
        if raised:
            ev.params.maxDets = [*ev.params.maxDets[:-1], int(max_dets)]
        if kind == "keypoints":
            k = len(res[0]["keypoints"]) // 3
            ev.params.kpt_oks_sigmas = COCO_KPT_SIGMAS if k == len(COCO_KPT_SIGMAS) else np.full(k, 1.0 / k)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log.debug("pycocotools:\n%s", buf.getvalue())
    s = [max(float(v), 0.0) for v in ev.stats]
    if raised:   # its summary reads COCO's maxDets: from the precisions (IoU .5:.95, .5, .75; all areas)
        prec = ev.eval["precision"][:, :, :, 0, -1]
        s[:3] = [_mean_precision(prec), _mean_precision(prec[0]), _mean_precision(prec[5])]
    stats.update({"map": s[0], "map50": s[1], "map75": s[2]})
    return stats


def _mean_precision(p: np.ndarray) -> float:
    """pycocotools' mean of the precisions it computed (-1 where a class has no ground truth)."""
    p = p[p > -1]
    return float(np.mean(p)) if p.size else 0.0
