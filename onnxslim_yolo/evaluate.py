"""Accuracy of a YOLO ONNX model: detections, COCO mAP against labels, detection agreement.

One onnxruntime session per model; each image is read and preprocessed once, however many
models are run on it (:func:`detections_multi`). Conventions follow ultralytics ``val`` scored
with pycocotools: conf 0.001, IoU 0.6, multi-label class-aware NMS, at most 300 detections.
Segmentation and pose exports are scored on their masks and keypoints too, when the labels give
polygons or keypoints, and obb exports on their rotated boxes (:mod:`.eval.instances`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from . import data, ir, verify
from .eval.anchors import OutputReader, anchor_layout
from .eval.decode import (NotDetections, batch_rows_as_dets, decode, final_detections, named_classes,
                          normalize_format, outputs_format, per_image, score_columns)
from .eval.fastest import head_kind
from .eval.instances import InstanceReader, attach
from .eval.metrics import (MAP_KINDS, ImageBoxes, coco_map, has_kind, labels_have_shapes, load_ground_truth,
                           without_unknown_classes)
from .eval.nms import non_max_suppression, scale_boxes
from .pass_base import PreconditionError, UsageError, one_run, warn_once

log = logging.getLogger(__name__)

ModelLike = Union[str, os.PathLike, onnx.ModelProto]
#: score from which a reference model's detection counts as ground truth in :func:`agreement`
AGREEMENT_CONF = 0.25


def _as_model(m: ModelLike) -> onnx.ModelProto:
    return m if isinstance(m, onnx.ModelProto) else ir.load(m)


class _Runner:
    """A session, its output format and NMS settings for one model."""

    def __init__(self, model: onnx.ModelProto, fmt: Optional[str], threads: int, optimize: bool = True,
                 engine: str = "onnxruntime"):
        self.model = model
        self.sess = open_session(model, engine, optimize=optimize, threads=threads)
        self.fmt = normalize_format(fmt) if fmt else None
        self.read = OutputReader(model)
        self.instances = InstanceReader(model)
        #: how many classes the output scores (None: it does not say); read at the first image
        self.n_classes: Optional[int] = None
        self._classes_read = False

    def __call__(self, feeds: Dict[str, np.ndarray], hw) -> Tuple[np.ndarray, List[np.ndarray]]:
        """(the detection output :class:`OutputReader` reads, the raw outputs)."""
        outs = verify.run(self.sess, feeds)
        out = self.read(outs, hw)
        if self.fmt is None:
            self.fmt = outputs_format(self.model, outs, hw)
            log.info("output format: %s (detected from %s)", self.fmt, list(out.shape))
            whose = None
            if self.read.anchors is None and anchor_layout([o.shape for o in outs]) is not None:
                whose = "raw anchor maps decoded with YOLOv5's default anchors"
            elif self.read.anchors is None \
                    and head_kind(self.model, [o.shape for o in outs]) == "yolo-fastestv2":
                whose = "YOLO-FastestV2 maps decoded with its COCO anchors"
            if whose is not None:   # once: every run opens a session
                warn_once(log, ("anchors", whose, tuple(o.name for o in self.model.graph.output)),
                          "%s; pass --anchors if the model was trained with others", whose)
        return out, outs

    def image(self, out: np.ndarray, raw: Sequence[np.ndarray], b: int, hw: Sequence[int], key: str,
              orig_hw: Sequence[int], ratio: data.Ratio, pad: Sequence[float], instances: bool,
              conf: float = 0.001, iou: float = 0.6, max_det: int = 300) -> ImageBoxes:
        """Image ``b``'s detections in its original pixels, from its detection output ``out`` and
        the run's ``raw`` outputs (masks, keypoints or rotated boxes attached as in
        :func:`detections_multi`)."""
        parts = self.instances.parts(raw, b, instances)
        if parts is None:
            d, rows = raw_detections(out, self.fmt, hw, conf, iou, max_det), None
        else:
            d, rows = raw_detections(out, self.fmt, hw, conf, iou, max_det, with_rows=True,
                                     rotated=parts.rotated)
        d[:, :4] = scale_boxes(d[:, :4], ratio, pad, orig_hw)
        if not self._classes_read:
            self.n_classes = score_columns(out, self.fmt) or named_classes(self.model)
            self._classes_read = True
        found = _image_boxes(key, orig_hw, d, self.n_classes)
        return found if parts is None else attach(found, parts, rows, hw, ratio, pad)


def open_session(model: onnx.ModelProto, engine: str = "onnxruntime", optimize: bool = True,
                 threads: int = 0):
    """An onnxruntime CPU session, or for ``engine`` "openvino" an OpenVINO CPU one with the same
    ``run`` interface."""
    if engine == "openvino":
        from .openvino_rt import OpenVinoSession

        return OpenVinoSession(model, threads)
    if engine != "onnxruntime":
        from .openvino_rt import ENGINES

        raise UsageError(f"unknown runtime '{engine}'; choose one of {', '.join(ENGINES)}")
    return verify.session(model, optimize=optimize, threads=threads)


def raw_detections(output: np.ndarray, fmt: str, hw: Sequence[int], conf: float = 0.001, iou: float = 0.6,
                   max_det: int = 300, with_rows: bool = False, rotated: Optional[np.ndarray] = None):
    """(M, 6) detections ``x1 y1 x2 y2 score class`` in input pixels from one image's raw output
    (decode, then NMS, with evaluation's settings by default; a ``dets`` output ran NMS inside).
    With ``with_rows`` also (M,) the candidate row of ``output`` each came from; ``rotated`` (N, 5)
    are an obb export's rotated candidates, which NMS then measures overlap on."""
    if fmt in ("dets", "dets7"):
        return final_detections(batch_rows_as_dets(output) if fmt == "dets7" else output, conf, max_det,
                                with_rows)
    # rows are only numbered when none is dropped before NMS (the objectness pre-filter)
    boxes, scores = decode(output, fmt, hw, None if with_rows else conf)
    return non_max_suppression(boxes, scores, conf, iou, max_det, with_rows=with_rows, rotated=rotated)


def _image_boxes(key: str, hw: Sequence[int], d: np.ndarray, n_classes: Optional[int] = None) -> ImageBoxes:
    """ImageBoxes from (M, 6) ``x1 y1 x2 y2 score class`` rows (of a model scoring ``n_classes``)."""
    return ImageBoxes(key, tuple(hw), d[:, :4].astype(np.float64), d[:, 5].astype(np.int64),
                      d[:, 4].astype(np.float64), n_classes=n_classes)


def output_boxes(outputs: Sequence[np.ndarray], fmt: str, hw: Sequence[int],
                 start: int = 0) -> List[ImageBoxes]:
    """Detections (evaluation's settings, input pixels) of each image in detection outputs, one
    output per feed; a feed holding a batch of images gives one entry per image, keyed
    'feed.image' (feeds counted from ``start``). For outputs already run (the pruning probe's
    agreement metric); :func:`feed_detections` runs a model."""
    res = []
    for i, out in enumerate(outputs, start):
        for b, o in enumerate(per_image(out)):
            d = raw_detections(o, fmt, hw)
            res.append(_image_boxes(f"{i}.{b}", tuple(hw), d))
    return res


def feed_detections(model: onnx.ModelProto, feeds: Sequence[Dict[str, np.ndarray]], threads: int = 0,
                    instances: bool = False) -> List[ImageBoxes]:
    """Detections (evaluation's settings, input pixels) of ``model`` on preprocessed ``feeds``, one
    entry per image, keyed 'feed.image' (a feed may hold a batch); with ``instances`` a
    segmentation or pose export's carry their masks or keypoints, and an obb export's always carry
    their rotated boxes (as :func:`detections_multi`)."""
    run = _Runner(model, None, threads)
    name = next(iter(data.image_inputs(model)))  # not a Paddle scale_factor beside it
    res: List[ImageBoxes] = []
    for i, f in enumerate(feeds):  # one output at a time: 64 of them would hold 0.5 GB
        hw = data.feed_hw(f[name])
        out, raw = run(f, hw)
        for b, o in enumerate(per_image(out)):
            res.append(run.image(o, raw, b, hw, f"{i}.{b}", hw, 1.0, (0, 0), instances))
    return res


def detections_multi(models: Sequence[ModelLike], images: Union[str, os.PathLike],
                     preset: Optional[str] = None, conf: float = 0.001, iou: float = 0.6,
                     max_det: int = 300, fmt: Optional[str] = None,
                     limit: Optional[int] = None, progress: bool = True, threads: int = 0,
                     input_shape: Optional[Sequence[int]] = None,
                     optimize: bool = True, engine: str = "onnxruntime",
                     instances: bool = False) -> List[List[ImageBoxes]]:
    """Per-model, per-image detections (boxes in original-image pixels) for every image in ``images``.

    All models must share the input name and size (an optimized model and its original).
    ``preset`` and ``fmt`` are detected from the first model / each model's output when None.
    ``optimize`` False runs the sessions without onnxruntime's graph optimizations; ``engine``
    "openvino" runs them in OpenVINO instead (:mod:`.openvino_rt`). With ``instances`` the
    detections of a segmentation or pose export carry their masks or keypoints; an obb export's
    always carry their rotated boxes (its NMS runs on them).
    """
    protos = [_as_model(m) for m in models]
    if not protos:
        raise UsageError("no model to evaluate")
    name, chw = data.model_input(protos[0], input_shape)
    for m in protos[1:]:
        if data.model_input(m, input_shape) != (name, chw):
            raise UsageError(f"models differ in input: {(name, chw)} vs {data.model_input(m, input_shape)}")
    if chw[0] != 3:
        raise UsageError(f"model input '{name}' expects {chw[0]} channels; evaluation reads RGB images")
    p = data.get_preset(preset, protos[0])
    dtype = ir.input_dtypes(protos[0]).get(name, np.dtype(np.float32))
    runners = [_Runner(m, fmt, threads, optimize, engine) for m in protos]
    hw = chw[1:]
    last = data.channels_last(protos[0])
    batch = data.model_batch(protos[0], input_shape)
    aux = data.aux_inputs(protos[0])
    results: List[List[ImageBoxes]] = [[] for _ in protos]

    def run_batch(pending: List[Tuple[np.ndarray, data.Meta]]) -> None:
        """One feed of ``batch`` images (the last feed filled up); each real image's boxes kept."""
        stacked = np.stack([x for x, _ in data.groups(pending, batch)[0]])
        feeds = data.add_aux({name: data.to_layout(stacked, last).astype(dtype, copy=False)}, name, aux)
        for run, res in zip(runners, results):
            out, raw = run(feeds, hw)
            outs = per_image(out)
            if len(outs) != batch:
                raise NotDetections(f"output of shape {list(out.shape)} does not hold the {batch} images fed")
            for b, (o, (_, meta)) in enumerate(zip(outs, pending)):
                res.append(run.image(o, raw, b, hw, meta.path.name, meta.orig_hw, meta.ratio, meta.pad,
                                     instances, conf, iou, max_det))

    pending: List[Tuple[np.ndarray, data.Meta]] = []
    for item in data.iter_images(images, p, hw, limit, progress, desc="evaluate"):
        pending.append(item)
        if len(pending) == batch:
            run_batch(pending)
            pending = []
    if pending:
        run_batch(pending)
    return results


def detections(model: ModelLike, images: Union[str, os.PathLike], preset: Optional[str] = None,
               conf: float = 0.001, iou: float = 0.6, max_det: int = 300, fmt: Optional[str] = None,
               limit: Optional[int] = None, progress: bool = True, threads: int = 0,
               input_shape: Optional[Sequence[int]] = None, engine: str = "onnxruntime",
               instances: bool = False) -> List[ImageBoxes]:
    """Per-image detections of one model (see :func:`detections_multi`)."""
    return detections_multi([model], images, preset, conf, iou, max_det, fmt, limit, progress, threads,
                            input_shape, engine=engine, instances=instances)[0]


#: result keys of the mask, keypoint and rotated-box mAPs (``mask_map``, ``pose_map50``, ``obb_map``,
#: ...) by pycocotools kind
KIND_PREFIX = {"segm": MAP_KINDS[1][0], "keypoints": MAP_KINDS[2][0], "obb": MAP_KINDS[3][0]}


def score(dets: Sequence[ImageBoxes], labels: Union[str, os.PathLike]) -> Dict[str, float]:
    """COCO mAP of detections against a YOLO label folder or a COCO JSON: of the boxes (``map``,
    ``map50``, ``map75``), and when the detections carry masks or keypoints and the labels give
    polygons or keypoints, of those too (``mask_map``, ... ``pose_map``, ...); an obb export's
    rotated boxes against the labels' polygons (``obb_map``, ...)."""
    known = next((d.n_classes for d in dets if d.n_classes), None)
    n_classes = known or 1 + max((int(d.classes.max()) for d in dets if len(d)), default=0)
    kpts = next((d.keypoints.shape[1] for d in dets if d.keypoints is not None), 0)
    gt = load_ground_truth(labels, [(d.key, d.hw) for d in dets], n_classes, kpts)
    if known:
        gt, dets = without_unknown_classes(gt, dets, known, labels)
    res = coco_map(gt, dets)
    for kind, prefix in KIND_PREFIX.items():
        if has_kind(gt, dets, kind):
            part = coco_map(gt, dets, kind)
            res.update({prefix + k: part[k] for k in ("map", "map50", "map75")})
    return res


@one_run
def evaluate(model_or_path: ModelLike, images: Union[str, os.PathLike], labels: Union[str, os.PathLike],
             preset: Optional[str] = None, conf: float = 0.001, iou: float = 0.6, max_det: int = 300,
             fmt: Optional[str] = None, limit: Optional[int] = None, progress: bool = True,
             threads: int = 0, input_shape: Optional[Sequence[int]] = None,
             engine: str = "onnxruntime") -> Dict[str, float]:
    """pycocotools bbox mAP of a model on an image folder with YOLO labels (or a COCO JSON), run
    in ``engine`` (onnxruntime, or OpenVINO's CPU plugin).

    Returns ``map`` (0.5:0.95), ``map50``, ``map75``, ``n_images``, ``n_detections``, ``n_ground_truth``;
    for a segmentation, pose or obb export with polygon or keypoint labels also ``mask_map`` ...,
    ``pose_map`` ... or ``obb_map`` ... (:func:`score`).
    """
    lp = Path(labels)
    if not lp.exists():
        raise UsageError(f"{lp}: labels not found (expected a YOLO label folder or a COCO .json)")
    dets = detections(model_or_path, images, preset, conf, iou, max_det, fmt, limit, progress, threads,
                      input_shape, engine, instances=labels_have_shapes(lp, data.image_stems(images, limit)))
    res = score(dets, labels)
    log.info("mAP@0.5:0.95 %.4f  mAP@0.5 %.4f  (%d images, %d detections)", res["map"], res["map50"],
             res["n_images"], res["n_detections"])
    for prefix in KIND_PREFIX.values():
        if prefix + "map" in res:
            log.info("%smAP@0.5:0.95 %.4f  mAP@0.5 %.4f", prefix, res[prefix + "map"], res[prefix + "map50"])
    return res


def _as_truth(d: ImageBoxes, conf: float) -> ImageBoxes:
    """A model's detections scoring >= ``conf`` as ground truth; its keypoints whose visibility
    score is at least 0.5 are the visible ones."""
    g = d.above(conf)
    if g.keypoints is None:
        return g
    k = g.keypoints.copy()
    k[..., 2] = np.where(k[..., 2] >= 0.5, 2.0, 0.0)
    return dataclasses.replace(g, keypoints=k)


def agreement(cand_dets: Sequence[ImageBoxes], ref_dets: Sequence[ImageBoxes],
              ref_conf: float = AGREEMENT_CONF, kind: str = "bbox") -> Dict[str, float]:
    """mAP of a candidate's detections using the reference's detections scoring >= ``ref_conf``
    as ground truth (1.0 when the candidate reproduces them). Both cover the same images.
    ``kind`` ``segm``, ``keypoints`` or ``obb`` scores their masks, keypoints or rotated boxes
    instead of their boxes (detections carrying them, :func:`detections_multi`)."""
    if [d.key for d in cand_dets] != [d.key for d in ref_dets]:
        raise UsageError("candidate and reference detections cover different images")
    gt = [_as_truth(d, ref_conf) for d in ref_dets]
    if not any(len(g) for g in gt):
        raise PreconditionError(f"the reference model has no detection scoring >= {ref_conf} on "
                                f"{len(gt)} images: detection agreement is undefined")
    # every candidate detection is scored (max_det, 300), not the best 100 (keypoints: 20) of a class
    # per image: a copy reproducing a reference with 120 confident detections of a class per image
    # scored 0.81
    return coco_map(gt, cand_dets, kind, max_dets=max([len(d) for d in cand_dets], default=0))


def instance_agreement(cand_dets: Sequence[ImageBoxes], ref_dets: Sequence[ImageBoxes],
                       ref_conf: float = AGREEMENT_CONF) -> Dict[str, Dict[str, float]]:
    """:func:`agreement` of the masks, keypoints and rotated boxes, by what (``mask``,
    ``keypoint``, ``rotated box``), for those both models' detections carry; empty for plain
    detectors."""
    out = {}
    for kind, prefix in KIND_PREFIX.items():
        if has_kind(ref_dets, cand_dets, kind):
            out[dict(MAP_KINDS)[prefix]] = agreement(cand_dets, ref_dets, ref_conf, kind)
    return out


__all__ = ["evaluate", "detections", "detections_multi", "score", "agreement", "ImageBoxes",
           "AGREEMENT_CONF", "MAP_KINDS"]
