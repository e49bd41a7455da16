"""Whether the preprocessing guessed for a model suits it, judged on the user's own images.

The preprocessing of image folders is read from the model (``data.preset_choice``), and a wrong
guess spoils calibration without an error. A trained detector fed as it was trained detects a
few objects per image, and, since detectors are trained with left-right flips, detects the same
objects in the mirrored image. Fed otherwise, it either sees a nearly black image and detects
next to nothing, or it saturates: yolov5n fed pixel values 0-255 instead of 0-1 scores 300 boxes
per image at 0.999 that do not survive a flip (agreement 0.000, against 0.754 fed correctly).

:func:`preset_advice` runs the model on a few images and on their mirror images under each
distinct preset, and returns a warning when the chosen preset looks wrong and another one looks
right. Random-weight models look wrong under every preset, so they get no warning.
"""
from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import onnx
from PIL import Image

from . import data
from .pass_base import SlimError

log = logging.getLogger(__name__)

#: images the probe runs on (and their mirror images)
PROBE_IMAGES = 8
#: flip agreement at or above which a preset's detections look like a trained model's
GOOD_FLIP = 0.4
#: flip agreement below which detections look like noise
NOISE_FLIP = 0.2
#: mean detections per image (score >= the agreement threshold) a preset needs to look right
MIN_DETECTIONS = 0.5
#: more detections per image than this is a saturated model, not a trained one (random-weight
#: exports give the maximum, 100 here, and some of them agree with their mirror images)
MAX_DETECTIONS = 50
#: the images' detections count from this score (the agreement threshold); the mirror images'
#: (scored against them like candidates against ground truth) from the lower one; at most this many
PROBE_CONF, MIRROR_CONF, PROBE_MAX_DET = 0.25, 0.05, 100


@dataclass(frozen=True)
class PresetScore:
    """Detections per image (score >= :data:`PROBE_CONF`) and the agreement of the
    mirror images' detections, mirrored back, with the images' own (NaN with none to agree on,
    and for a saturated preset, which is not run on the mirror images)."""

    per_image: float
    flip: float

    @property
    def looks_right(self) -> bool:
        return MIN_DETECTIONS <= self.per_image <= MAX_DETECTIONS and self.flip >= GOOD_FLIP

    @property
    def looks_wrong(self) -> bool:
        return (self.per_image < MIN_DETECTIONS / 4 or self.per_image > MAX_DETECTIONS
                or math.isnan(self.flip) or self.flip < NOISE_FLIP)


def _mirror_folder(images: Path, limit: int, out: Path) -> None:
    """The first ``limit`` images, mirrored left-right, under their own names (the keys the
    detections are matched by; JPEG at quality 95)."""
    for p in data.list_images(images)[:limit]:
        Image.fromarray(np.ascontiguousarray(data.read_image(p)[:, ::-1])).save(out / p.name, quality=95)


def _feeding(model: onnx.ModelProto, name: str) -> tuple:
    p = data.get_preset(name, model)
    return (p.rgb, p.scale, p.center, p.pad_value, p.mean, p.std)


def _distinct(model: onnx.ModelProto, but: Optional[str] = None) -> List[str]:
    """The first name of every preset that feeds ``model`` differently (from ``but`` too)."""
    seen: Dict[object, str] = {_feeding(model, but): but} if but else {}
    for name in data.PRESETS:
        seen.setdefault(_feeding(model, name), name)
    return [n for n in seen.values() if n != but]


def score_presets(model: onnx.ModelProto, images: Union[str, Path], limit: int = PROBE_IMAGES,
                  names: Optional[Sequence[str]] = None) -> Dict[str, PresetScore]:
    """Score the presets ``names`` (default: every preset that feeds ``model`` differently) on
    the first ``limit`` images of ``images`` and their mirror images."""
    from .evaluate import ImageBoxes, agreement, detections

    out: Dict[str, PresetScore] = {}
    with tempfile.TemporaryDirectory(prefix="osy_probe_") as td:
        mirror = Path(td)
        _mirror_folder(Path(images), limit, mirror)
        for name in (names if names is not None else _distinct(model)):
            kw = dict(preset=name, limit=limit, progress=False, max_det=PROBE_MAX_DET)
            own = detections(model, images, conf=PROBE_CONF, **kw)
            per_image = float(np.mean([len(d.scores) for d in own]))
            if per_image > MAX_DETECTIONS:   # saturated: wrong whatever the mirror images say
                out[name] = PresetScore(round(per_image, 2), float("nan"))
                continue
            back = []
            for d in detections(model, mirror, conf=MIRROR_CONF, **kw):
                b = d.boxes.copy()
                b[:, [0, 2]] = d.hw[1] - b[:, [2, 0]]
                back.append(ImageBoxes(d.key, d.hw, b, d.classes, d.scores))
            try:
                flip = float(agreement(back, own)["map"])
            except SlimError:   # nothing detected to agree on
                flip = float("nan")
            out[name] = PresetScore(round(per_image, 2), round(flip, 3))
    return out


def advice(scores: Dict[str, PresetScore], chosen: str) -> Optional[str]:
    """A warning when ``chosen`` looks wrong and another preset looks right (the one detecting
    most), else None."""
    mine = scores.get(chosen)
    if mine is None or not mine.looks_wrong:
        return None
    right = [(s.per_image, n) for n, s in scores.items() if n != chosen and s.looks_right]
    if not right:
        return None
    name = max(right)[1]
    best = scores[name]
    flip = (f"mirror-image agreement {mine.flip:.2f}" if not math.isnan(mine.flip) else
            "saturated" if mine.per_image > MAX_DETECTIONS else "no detections to compare")
    return (f"the images fed as {chosen} give {mine.per_image:g} detections per image ({flip}); fed "
            f"as {name} they give {best.per_image:g} ({best.flip:.2f}), as a trained detector does. "
            f"If the model was trained that way, rerun with --preprocess {name}")


def preset_advice(model: onnx.ModelProto, images: Union[str, Path], chosen: str,
                  limit: int = PROBE_IMAGES) -> Optional[str]:
    """:func:`advice` for ``model`` on the first ``limit`` images of the folder ``images``; None
    when the model's outputs are not detections, the images cannot feed it, or anything else
    stops the probe (it only advises)."""
    try:   # a preset that saturates the model overflows its sigmoids: no numpy warnings for that
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            scores = score_presets(model, images, limit, [chosen])
            if not scores[chosen].looks_wrong:   # the usual case: one preset scored
                return None
            scores.update(score_presets(model, images, limit, _distinct(model, but=chosen)))
    except Exception as exc:   # advice only: whatever the probe meets must not fail the run
        log.info("preprocessing probe skipped: %s", exc)
        return None
    log.info("preprocessing probe: %s", {n: (s.per_image, s.flip) for n, s in scores.items()})
    return advice(scores, chosen)


__all__ = ["PresetScore", "score_presets", "advice", "preset_advice", "PROBE_IMAGES"]
