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
    fit = ("stretch",) if p.stretch else (p.center, p.pad_value)  # a stretch pads nothing
    return (p.rgb, p.scale, p.mean, p.std) + fit


def _distinct(model: onnx.ModelProto, but: Optional[str] = None) -> List[str]:
    """The first name of every preset that feeds ``model`` differently (from ``but`` too)."""
    seen: Dict[object, str] = {_feeding(model, but): but} if but else {}
    for name in data.PRESETS:
        seen.setdefault(_feeding(model, name), name)
    return [n for n in seen.values() if n != but]


def score_presets(model: onnx.ModelProto, images: Union[str, Path], limit: int = PROBE_IMAGES,
                  names: Optional[Sequence[str]] = None, input_shape: Optional[Sequence[int]] = None,
                  threads: int = 0, progress: bool = False) -> Dict[str, PresetScore]:
    """Score the presets ``names`` (default: every preset that feeds ``model`` differently) on
    the first ``limit`` images of ``images`` and their mirror images (``input_shape`` for a
    model with a dynamic size). ``progress``: shown over the presets (:mod:`.progress`; each is up to
    2 x ``limit`` runs of the model: minutes for a large one)."""
    from .evaluate import ImageBoxes, agreement, detections
    from .progress import bar

    out: Dict[str, PresetScore] = {}
    with tempfile.TemporaryDirectory(prefix="osy_probe_") as td:
        mirror = Path(td)
        _mirror_folder(Path(images), limit, mirror)
        todo = list(names if names is not None else _distinct(model))
        for name in bar(todo, desc="preprocessing probe: presets", enabled=progress):
            kw = dict(preset=name, limit=limit, progress=False, max_det=PROBE_MAX_DET,
                      input_shape=input_shape, threads=threads)
            own = detections(model, images, conf=PROBE_CONF, **kw)
            per_image = float(np.mean([len(d.scores) for d in own]))
            # saturated: wrong whatever the mirror images say; nothing detected: nothing for them to
            # agree with (the agreement is undefined), so the mirror images are not run either
            if per_image > MAX_DETECTIONS or per_image == 0:
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


def _flip(s: PresetScore) -> str:
    return (f"mirror-image agreement {s.flip:.2f}" if not math.isnan(s.flip) else
            "saturated" if s.per_image > MAX_DETECTIONS else "no detections to compare")


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
    return (f"the images fed as {chosen} give {mine.per_image:g} detections per image ({_flip(mine)}); fed "
            f"as {name} they give {best.per_image:g} ({best.flip:.2f}), as a trained detector does. "
            f"If the model was trained that way, rerun with --preprocess {name}")


@dataclass(frozen=True)
class Verdict:
    """What the probe makes of the preset ``chosen``: ``status`` is "right" (it looks as a trained
    detector fed as trained), "wrong" (it looks wrong and another preset looks right: ``message``
    is the advice), "unsure" (neither) or "unknown" (it looks wrong and so does every other
    preset, as with untrained weights, or the probe could not run)."""

    status: str
    chosen: str
    message: str
    scores: Dict[str, PresetScore]
    images: int = 0   # how many images (and as many mirror images) it ran on


def _describe(name: str, s: PresetScore) -> str:
    return f"fed as {name}: {s.per_image:g} detections per image (score >= {PROBE_CONF:g}), {_flip(s)}"


def judge(model: onnx.ModelProto, images: Union[str, Path], chosen: str, limit: Optional[int] = None,
          input_shape: Optional[Sequence[int]] = None, threads: int = 0, progress: bool = False) -> Verdict:
    """Score ``chosen`` on the first :data:`PROBE_IMAGES` images of the folder ``images`` (fewer
    when the run's own ``limit`` is lower: eval --limit 2 probed 8, an image it left out could
    spoil the verdict), and the presets that feed ``model`` differently when it looks wrong. Never
    raises: whatever stops the probe (outputs that are not detections, images that cannot feed the
    model) gives "unknown"."""
    scores: Dict[str, PresetScore] = {}
    n = 0
    limit = min(limit or PROBE_IMAGES, PROBE_IMAGES)
    try:   # a preset that saturates the model overflows its sigmoids: no numpy warnings for that
        n = len(data.list_images(images)[:limit])
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            scores = score_presets(model, images, limit, [chosen], input_shape, threads, progress)
            mine = scores[chosen]
            if not mine.looks_wrong:   # the usual case: one preset scored
                status = "right" if mine.looks_right else "unsure"
                return Verdict(status, chosen, _describe(chosen, mine), scores, n)
            scores.update(score_presets(model, images, limit, _distinct(model, but=chosen), input_shape,
                                        threads, progress))
    except Exception as exc:   # advice only: whatever the probe meets must not fail the run
        log.info("preprocessing probe skipped: %s", exc)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Verdict("unknown", chosen, f"the probe could not run: {first}", scores, n)
    log.info("preprocessing probe: %s", {k: (s.per_image, s.flip) for k, s in scores.items()})
    note = advice(scores, chosen)
    if note:
        return Verdict("wrong", chosen, note, scores, n)
    return Verdict("unknown", chosen, f"{_describe(chosen, scores[chosen])}, and no other preprocessing "
                   "looks right either (untrained weights?)", scores, n)


def preset_advice(model: onnx.ModelProto, images: Union[str, Path], chosen: str,
                  limit: Optional[int] = None) -> Optional[str]:
    """:func:`judge`'s advice when ``chosen`` looks wrong and another preset looks right, else
    None (also when the model's outputs are not detections, the images cannot feed it, or
    anything else stops the probe: it only advises)."""
    v = judge(model, images, chosen, limit)
    return v.message if v.status == "wrong" else None


__all__ = ["PresetScore", "Verdict", "score_presets", "advice", "judge", "preset_advice", "PROBE_IMAGES"]
