"""Detection-level checks on real images: agreement with the reference's detections, and the
true mAP drop against labels."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import onnx

from ..eval.metrics import MAP_KINDS, map_drops
from ..pass_base import SlimError
from .result import CheckResult, failed, passed, skipped, warned

#: agreement floor (mAP of the candidate scored on the reference's confident detections). INT8
#: yolov5n with a float decode tail scores 0.86-0.90 on coco128, a quantized decode tail 0.0
MIN_AGREEMENT = 0.5
#: a reference mAP below this says the labels, the preprocessing or the weights are not what the
#: drop assumes (a yolov5n fed as YOLOX scores 0.0000 on coco128)
NOTHING_MEASURED = 0.001
#: the result-key prefix of each thing compared (``mask`` -> ``mask_``: ``mask_map``, ...)
PREFIX = {what: prefix for prefix, what in MAP_KINDS}


@dataclass
class Detections:
    """Per-image detections of the candidate and (when there is one) the reference."""

    candidate: list
    reference: Optional[list]
    #: the runtime both models ran in ("onnxruntime" or "openvino")
    engine: str = "onnxruntime"

    def where(self) -> str:
        """' in OpenVINO' when the detections come from OpenVINO, else nothing."""
        return " in OpenVINO" if self.engine == "openvino" else ""


def detect(model: onnx.ModelProto, reference: Optional[onnx.ModelProto], images: str, preset: Optional[str],
           limit: Optional[int], threads: int, input_shape: Optional[Sequence[int]],
           progress: bool, engine: str = "onnxruntime", instances: bool = False) -> Detections:
    """Both models' detections (conf 0.001, IoU 0.6, max 300) in ``engine``, each image read once;
    with ``instances`` a segmentation or pose export's carry their masks or keypoints."""
    from ..evaluate import detections_multi

    models: List[onnx.ModelProto] = [model] + ([reference] if reference is not None else [])
    res = detections_multi(models, images, preset=preset, limit=limit, progress=progress, threads=threads,
                           input_shape=input_shape, engine=engine, instances=instances)
    return Detections(res[0], res[1] if reference is not None else None, engine)


def _carries_instances(found: list) -> bool:
    """Whether detections carry masks or keypoints (an obb export's rotated boxes come always)."""
    return any(d.segments is not None or d.keypoints is not None for d in found)


def self_agreement(reference: onnx.ModelProto, dets: Detections, images: str, preset: Optional[str],
                   limit: Optional[int], threads: int, input_shape: Optional[Sequence[int]],
                   progress: bool) -> Dict[str, float]:
    """Agreement of the reference run without onnxruntime's graph optimizations with its own
    (optimized) detections, by what is compared (``box``, and ``mask`` or ``keypoint`` when the
    detections carry them): near 1 for a stable model. Far below 1 when the detections hinge on
    float rounding (TopK or argmax over near ties, as in a DETR decoder with untrained weights)."""
    from ..evaluate import agreement, detections_multi, instance_agreement

    plain = detections_multi([reference], images, preset=preset, limit=limit, progress=progress,
                             threads=threads, input_shape=input_shape, optimize=False,
                             instances=_carries_instances(dets.reference))[0]
    out = {"box": agreement(plain, dets.reference)["map"]}
    out.update({what: r["map"] for what, r in instance_agreement(plain, dets.reference).items()})
    return out


def check_agreement(dets: Detections, min_agreement: float = MIN_AGREEMENT,
                    noise: Optional[Callable[[], Dict[str, float]]] = None) -> CheckResult:
    """mAP of the candidate's detections with the reference's confident detections as ground truth,
    of their boxes and, for segmentation and pose exports whose detections carry them, of their
    masks or keypoints; each must reach the floor. Below it, ``noise`` (the reference's
    :func:`self_agreement`, computed only then) turns the failure into a warning when the
    candidate still reaches the floor's share of the reference's own agreement (the floor scaled
    to what the reference itself can score: a random-weight darknet YOLOv3-tiny agreed 0.50 with
    itself and its INT8 copy 0.45, 90% of that). A reference below the floor against itself
    excuses no more than that: a candidate that detects nothing fails."""
    from ..evaluate import AGREEMENT_CONF, agreement, instance_agreement

    name = "accuracy.agreement"
    if dets.reference is None:
        return skipped(name, "no reference model")
    try:
        ag = agreement(dets.candidate, dets.reference)
        kinds = instance_agreement(dets.candidate, dets.reference)
    except SlimError as exc:
        return skipped(name, str(exc))
    scores = dict({"box": ag["map"]}, **{what: r["map"] for what, r in kinds.items()})
    details = {"map": ag["map"], "map50": ag["map50"], "images": len(dets.candidate),
               "reference_conf": AGREEMENT_CONF, "min_agreement": min_agreement}
    details.update({f"{PREFIX[what]}map": r["map"] for what, r in kinds.items()})
    text = (f"mAP {ag['map']:.4f} (mAP@0.5 {ag['map50']:.4f}) against the reference's detections "
            f"(score >= {AGREEMENT_CONF}) on {len(dets.candidate)} images{dets.where()}")
    text += "".join(f"; {what} mAP {r['map']:.4f} (mAP@0.5 {r['map50']:.4f})" for what, r in kinds.items())
    low = [what for what, v in scores.items() if v < min_agreement]
    if not low:
        return passed(name, text, **details)
    own = noise() if noise is not None else None
    if own is not None:
        details["self_agreement"] = own["box"]
        details.update({f"{PREFIX[what]}self_agreement": v for what, v in own.items() if what != "box"})
    said = "; ".join(("agreement" if what == "box" else f"{what} agreement") +
                     f" {scores[what]:.4f} below {min_agreement:g}" for what in low)
    if own is not None and all(w in own and scores[w] >= min_agreement * own[w] for w in low):
        itself = ", ".join(f"{own[w]:.4f}" + ("" if w == "box" else f" ({w})") for w in low)
        return warned(name, f"{said}, but the reference scores {itself} against itself with onnxruntime's "
                            "optimizations off: its detections hinge on float rounding, so agreement "
                            "cannot judge this model; " + text, **details)
    return failed(name, f"{said}: " + text, **details)


def check_map_drop(dets: Detections, labels: Optional[str], max_drop: float) -> CheckResult:
    """True mAP@0.5:0.95 of both models against labels; fails when the drop exceeds ``max_drop``
    points, of the boxes or (segmentation and pose exports whose labels give them) of the masks or
    keypoints."""
    from ..eval.metrics import label_notes
    from ..evaluate import score

    name = "accuracy.map_drop"
    if labels is None:
        return skipped(name, "no labels (pass --labels DIR for the true mAP)")
    with label_notes() as notes:
        cand = score(dets.candidate, labels)
        ref = score(dets.reference, labels) if dets.reference is not None else None

    def told(text: str, **details: Any) -> CheckResult:
        """A pass, or a warning when the labels gave one (most images without a label file, ...)."""
        if not notes:
            return passed(name, text, **details)
        more = f" (and {len(notes) - 1} more label warnings)" if len(notes) > 1 else ""
        return warned(name, f"{notes[0]}{more}: {text}", label_warnings=list(notes), **details)

    if ref is None:
        more = "".join(f", {what} mAP@0.5:0.95 {cand[prefix + 'map']:.4f}" for prefix, what in MAP_KINDS[1:]
                       if prefix + "map" in cand)
        return told(f"mAP@0.5:0.95 {cand['map']:.4f}, mAP@0.5 {cand['map50']:.4f}{more} on "
                    f"{cand['n_images']} images{dets.where()} (no reference to compare)", candidate=cand)
    drops = map_drops(ref, cand)
    drop = drops["box"]
    details = {"candidate": cand, "reference": ref, "drop_points": drop, "max_drop": max_drop}
    details.update({f"{PREFIX[what]}drop_points": d for what, d in drops.items() if what != "box"})
    text = (f"mAP@0.5:0.95 {cand['map']:.4f} vs reference {ref['map']:.4f} ({_signed(-drop)} pts; "
            f"mAP@0.5 {cand['map50']:.4f} vs {ref['map50']:.4f}) on {cand['n_images']} images{dets.where()}")
    for what, d in drops.items():
        if what != "box":
            key = PREFIX[what] + "map"
            text += f"; {what} mAP@0.5:0.95 {cand[key]:.4f} vs {ref[key]:.4f} ({_signed(-d)} pts)"
    worst = max(drops.items(), key=lambda x: x[1])
    if worst[1] > max_drop:
        what = "mAP" if worst[0] == "box" else f"{worst[0]} mAP"
        return failed(name, f"{what} drop {worst[1]:.2f} pts exceeds --max-drop {max_drop:g}: " + text,
                      **details)
    if ref["map"] < NOTHING_MEASURED:
        return warned(name, f"the reference scores mAP {ref['map']:.4f} on these labels, so the drop "
                            "measures nothing (images fed otherwise than trained, labels of other "
                            "classes, or untrained weights?): " + text, **details)
    if not math.isfinite(max_drop):   # optimize without --max-drop: no limit was asked for
        if worst[1] > DEFAULT_MAX_DROP:   # a PASS that could not fail said nothing of 3.4 points
            return warned(name, f"drop {worst[1]:.2f} pts, over check's default --max-drop "
                                f"{DEFAULT_MAX_DROP:g}; not enforced here (give --max-drop to): " + text,
                          **details)
        text += " (no --max-drop: not enforced)"
    return told(text, **details)


#: the mAP points ``check`` lets a candidate lose by default (its --max-drop); ``optimize``
#: enforces none unless asked, and warns past this one
DEFAULT_MAX_DROP = 1.0


def check_preprocessing(model: onnx.ModelProto, images: str, preset: Optional[str], limit: Optional[int],
                        input_shape: Optional[Sequence[int]], threads: int,
                        progress: bool = False) -> CheckResult:
    """Whether the images look fed to ``model`` (the reference when there is one: the trained
    model) as it was trained, when the preprocessing is guessed (:mod:`..preprobe`): detections per
    image and their agreement with the mirror images'. A warning names a preset that looks right
    when the guess looks wrong; untrained weights, which look wrong under every preset, skip."""
    from .. import preprobe
    from ..data import get_preset

    name = "inputs.preprocessing"
    if preset:
        return skipped(name, f"given with --preprocess {preset}")
    chosen = get_preset(None, model).name
    v = preprobe.judge(model, images, chosen, limit, input_shape, threads, progress)
    scores = {k: {"per_image": s.per_image, "mirror_agreement": s.flip} for k, s in v.scores.items()}
    details = {"preset": chosen, "verdict": v.status, "images": v.images, "scores": scores}
    if v.status == "wrong":
        return warned(name, v.message, **details)
    if v.status == "unknown":
        return skipped(name, f"cannot tell: {v.message}", **details)
    tail = ("as a trained detector fed as trained" if v.status == "right" else
            "nothing points to another preset")
    return passed(name, f"{v.message} on {v.images} images: {tail}", **details)


def _signed(x: float) -> str:
    return f"{x:+.2f}" if round(x, 2) != 0 else "0.00"
