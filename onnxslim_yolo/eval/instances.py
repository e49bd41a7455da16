"""Masks, keypoints and rotated boxes of segmentation, pose and obb exports, attached to their
detections.

A segmentation export writes each candidate's mask coefficients after its class scores (or after
its ``x1 y1 x2 y2 score class`` row, end to end) and a second output of prototype masks
(1, nm, h, w), usually at a quarter of the input size. A detection's mask is, as ultralytics
computes it for pycocotools: coefficients @ prototypes, the logits resized bilinearly to the
original image (the letterbox undone), kept inside the detection's box, read at 0 (a sigmoid
of 0.5). A pose
export writes K keypoints (x y, or x y visibility) in input pixels after the class scores, as
its metadata's ``kpt_shape`` says; they are mapped back to the original image as boxes are. An
obb export writes each candidate's rotated box, cx cy w h in input pixels with its angle last;
those are what its NMS suppresses on and what its rotated-box mAP scores.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..data import Ratio, ratio_xy
from .decode import _trailing_axis, keypoint_shape, mask_coefficients, rotated_boxes, trailing_values
from .metrics import ImageBoxes

#: bytes of whole-image uint8 masks built per call of pycocotools' encoder (a 4000x3000 image: 5 at a time)
_ENCODE_BYTES = 64_000_000


@dataclass
class Parts:
    """One image's instance data, row by row like the candidates :func:`.decode.detection_output`
    reads: ``coefs`` (N, nm) with ``protos`` (nm, h, w), ``keypoints`` (N, K, D), or ``rotated``
    (N, 5) cx cy w h angle in input pixels."""

    coefs: Optional[np.ndarray] = None
    protos: Optional[np.ndarray] = None
    keypoints: Optional[np.ndarray] = None
    rotated: Optional[np.ndarray] = None


class InstanceReader:
    """What a model's outputs hold besides boxes: masks (two outputs, candidates and prototypes,
    :func:`.decode.mask_coefficients`), keypoints (a pose export's ``kpt_shape``) or rotated
    boxes (an obb export, :func:`.decode.rotated_boxes`)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.kpt = keypoint_shape(model)
        self.rotated = rotated_boxes(model)

    def parts(self, outputs: Sequence[np.ndarray], b: int, instances: bool = True) -> Optional[Parts]:
        """Image ``b``'s :class:`Parts` of a run's ``outputs``; None for a model with none. Without
        ``instances`` only an obb export's rotated boxes (which its NMS needs) are read."""
        cand = outputs[0][b:b + 1] if outputs and outputs[0].ndim == 3 else None
        if self.rotated and cand is not None:
            return Parts(rotated=rotated_candidates(cand))
        if not instances:
            return None
        nm = mask_coefficients([o.shape for o in outputs])
        if nm and cand is not None:
            return Parts(coefs=trailing_values(cand, nm).astype(np.float32),
                         protos=np.asarray(outputs[1][b], np.float32))
        if self.kpt is not None and cand is not None:
            k, d = self.kpt
            return Parts(keypoints=trailing_values(cand, k * d).reshape(-1, k, d).astype(np.float64))
        return None


def rotated_candidates(output: np.ndarray) -> np.ndarray:
    """(B * N, 5) cx cy w h angle of every candidate of an obb export's output, image after image
    (the order :func:`.decode.decode_rows` gives rows): (B, 4+C+1, N) candidates, cx cy w h, class
    scores, angle; or end-to-end (B, K, 7) rows cx cy w h score class angle."""
    a = output if _trailing_axis(output.shape) == 2 else output.transpose(0, 2, 1)
    return np.concatenate([a[..., :4], a[..., -1:]], -1).reshape(-1, 5).astype(np.float64)


def _samples(n_out: int, scale: float, offset: float,
             n_src: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear resize taps (pixel centres, edges clamped: torch's ``align_corners=False``): output
    pixel j samples source position (j + 0.5) * scale + offset - 0.5, that is ``(1 - frac[j])`` of
    source ``lo[j]`` plus ``frac[j]`` of source ``hi[j]``; returns (lo, hi, frac)."""
    x = np.clip((np.arange(n_out) + 0.5) * scale + offset - 0.5, 0, n_src - 1)
    lo = np.floor(x).astype(np.int64)
    return lo, np.minimum(lo + 1, n_src - 1), (x - lo).astype(np.float32)


def mask_rles(coefs: np.ndarray, protos: np.ndarray, boxes: np.ndarray, input_hw: Sequence[int],
              orig_hw: Sequence[int], ratio: Ratio, pad: Sequence[int]) -> List[Any]:
    """pycocotools RLEs of the detections' masks in the original image: ``coefs`` (M, nm),
    ``protos`` (nm, h, w) over the letterboxed input of ``input_hw``, ``boxes`` (M, 4) xyxy in
    original pixels; ``ratio`` and ``pad`` (left, top) as the letterbox made them."""
    from pycocotools import mask as mask_utils

    nm, ph, pw = protos.shape
    H, W = int(orig_hw[0]), int(orig_hw[1])
    sy, sx = ph / float(input_hw[0]), pw / float(input_hw[1])
    rx, ry = ratio_xy(ratio)
    ylo, yhi, fy = _samples(H, ry * sy, pad[1] * sy, ph)
    xlo, xhi, fx = _samples(W, rx * sx, pad[0] * sx, pw)
    rles: List[Any] = []
    step = max(1, min(32, _ENCODE_BYTES // max(H * W, 1)))
    for start in range(0, len(boxes), step):
        chunk = boxes[start:start + step]
        full = np.zeros((H, W, len(chunk)), np.uint8, order="F")
        for n, (x1, y1, x2, y2) in enumerate(chunk):
            # ultralytics' crop: pixel (r, c) stays when x1 <= c < x2 and y1 <= r < y2
            r0, r1 = int(np.clip(np.ceil(y1), 0, H)), int(np.clip(np.ceil(y2), 0, H))
            c0, c1 = int(np.clip(np.ceil(x1), 0, W)), int(np.clip(np.ceil(x2), 0, W))
            if r1 <= r0 or c1 <= c0:
                continue
            # the prototype cells the box's pixels sample (taps grow with the pixel index)
            a, b, e, f = ylo[r0], yhi[r1 - 1] + 1, xlo[c0], xhi[c1 - 1] + 1
            logits = np.tensordot(coefs[start + n], protos[:, a:b, e:f], axes=1)
            # ultralytics resizes the logits and keeps those above 0 (a sigmoid above 0.5):
            # the rows, then the columns, each pixel from its two taps
            wy = fy[r0:r1, None]
            rows = logits[ylo[r0:r1] - a] * (1 - wy) + logits[yhi[r0:r1] - a] * wy
            wx = fx[c0:c1]
            full[r0:r1, c0:c1, n] = (rows[:, xlo[c0:c1] - e] * (1 - wx) + rows[:, xhi[c0:c1] - e] * wx) > 0.0
        rles.extend(mask_utils.encode(full))
    return rles


def image_keypoints(kpts: np.ndarray, ratio: Ratio, pad: Sequence[int],
                    orig_hw: Optional[Sequence[int]] = None) -> np.ndarray:
    """(M, K, 2 or 3) keypoints in input pixels -> (M, K, 3) in original pixels (visibility 1
    when the model gives none; pycocotools reads only the labels' visibilities), inside the
    original image ``orig_hw`` when given, as ultralytics' ``scale_coords`` clips them."""
    rx, ry = ratio_xy(ratio)
    out = np.ones(kpts.shape[:2] + (3,), np.float64)
    out[..., 0] = (kpts[..., 0] - pad[0]) / rx
    out[..., 1] = (kpts[..., 1] - pad[1]) / ry
    if orig_hw is not None:
        out[..., 0] = np.clip(out[..., 0], 0, orig_hw[1])
        out[..., 1] = np.clip(out[..., 1], 0, orig_hw[0])
    if kpts.shape[2] == 3:
        out[..., 2] = kpts[..., 2]
    return out


def image_rotated(r: np.ndarray, ratio: Ratio, pad: Sequence[int]) -> np.ndarray:
    """(M, 5) rotated boxes cx cy w h angle in input pixels -> in original pixels. Stretched
    inputs ((x, y) ratios) scale each side by the ratio along its own direction, and the angle
    as the stretch turns it (a rectangle stretched along neither of its sides is a parallelogram:
    its sides keep their lengths, approximately)."""
    rx, ry = ratio_xy(ratio)
    out = r.astype(np.float64, copy=True)
    out[:, 0], out[:, 1] = (r[:, 0] - pad[0]) / rx, (r[:, 1] - pad[1]) / ry
    c, s = np.cos(r[:, 4]), np.sin(r[:, 4])
    out[:, 2] = r[:, 2] * np.hypot(c / rx, s / ry)  # the w side runs along the angle
    out[:, 3] = r[:, 3] * np.hypot(s / rx, c / ry)
    if rx != ry:
        out[:, 4] = np.arctan2(s / ry, c / rx)
    return out


def attach(boxes: ImageBoxes, parts: Parts, rows: np.ndarray, input_hw: Sequence[int], ratio: Ratio,
           pad: Sequence[int]) -> ImageBoxes:
    """``boxes`` (detections in original pixels, from candidates ``rows``) with their masks,
    keypoints or rotated boxes."""
    if parts.rotated is not None:
        return replace(boxes, rotated=image_rotated(parts.rotated[rows], ratio, pad))
    if parts.coefs is not None:
        return replace(boxes, segments=mask_rles(parts.coefs[rows], parts.protos, boxes.boxes, input_hw,
                                                 boxes.hw, ratio, pad))
    return replace(boxes, keypoints=image_keypoints(parts.keypoints[rows], ratio, pad, boxes.hw))
