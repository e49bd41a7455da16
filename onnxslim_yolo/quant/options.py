"""Options of the insert-qdq pass (``ctx.opts("insert-qdq")``), validated once."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, List, Mapping, Optional, Tuple

from ..analysis.calibration import METHODS
from ..pass_base import UsageError
from .targets import TARGETS


@dataclass(frozen=True)
class QdqOptions:
    #: "ort-cpu" (uint8 activations, onnxruntime fusions) or "tensorrt" (int8 symmetric)
    target: str = "ort-cpu"
    #: calibration method: "auto" picks per tensor the range with the lowest expected error, then
    #: keeps that table unless the percentile one gives a higher output SQNR (measured, by 0.5 dB)
    method: str = "auto"
    percentile: float = 99.99
    #: images the auto choice between the two tables is measured on (0: no choice, per tensor only)
    choice_images: int = 8
    per_channel: bool = True
    #: 7-bit weights (True), 8-bit (False), or None: 7-bit for ort-cpu on an x86 CPU without VNNI
    #: (onnxruntime's u8 x s8 kernels saturate there; on yolov5n on such a CPU 7-bit weights
    #: scored 0.3546 mAP and 8-bit 0.3525, against 0.3571 in float)
    reduce_range: Optional[bool] = None
    #: node names or fnmatch patterns kept float
    exclude: List[str] = field(default_factory=list)
    #: JSON calibration table: loaded when the file exists, else written after calibration
    calib_table: Optional[str] = None
    #: statistics from at most this many feeds, spread evenly over the calibration set (None: all);
    #: on yolov5n the output error was the same from 32, 64 and 128 coco128 images (13.74, 13.78,
    #: 13.81 dB) while calibration time grows linearly
    calib_limit: Optional[int] = 64
    #: subtract each INT8 Conv's own mean output error from its bias
    bias_correction: bool = True
    bias_correction_images: int = 8
    #: ort-cpu: "measure" keeps a Conv float when INT8 is not faster here; "all" quantizes every Conv
    placement: str = "measure"
    min_speedup: float = 1.05
    tune_threads: int = 1
    #: keep float every unit whose restoring alone gains at least this much head-map SQNR (dB);
    #: 0 disables; at most ``auto_float_max`` x the INT8 layers are restored this way
    auto_float_db: float = 0.0
    auto_float_max: float = 0.1
    #: mixed precision: restore the most sensitive units to float until the loss <= max_drop points
    max_drop: Optional[float] = None
    #: compute and report the full sensitivity ranking
    sensitivity: bool = False
    sensitivity_images: int = 2
    mixed_images: int = 32
    labels: Optional[str] = None
    images: Optional[str] = None
    #: restore sensitive layers to float when the output cosine falls below the manager's floor
    guard: bool = True
    threads: int = 0
    #: progress (a bar on a terminal, else a line now and then: :mod:`onnxslim_yolo.progress`)
    progress: bool = True

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        return tuple(sorted(f.name for f in fields(cls)))

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "QdqOptions":
        known = set(cls.option_names())
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UsageError(f"insert-qdq: unknown option '{unknown[0]}' (known: {', '.join(sorted(known))})")
        kw = dict(raw)
        if isinstance(kw.get("exclude"), str):
            kw["exclude"] = [p for p in kw["exclude"].split(",") if p]
        if kw.get("progress") is None:   # given as None: the default
            kw.pop("progress", None)
        o = cls(**kw)
        o.validate()
        return o

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(f"insert-qdq: unknown target '{self.target}' (use {', '.join(TARGETS)})")
        if self.method != "auto" and self.method not in METHODS:
            raise UsageError(f"insert-qdq: unknown method '{self.method}' (use auto, {', '.join(METHODS)})")
        if self.placement not in ("measure", "all"):
            raise UsageError(f"insert-qdq: placement must be 'measure' or 'all', got '{self.placement}'")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise UsageError(f"insert-qdq: max_drop must be >= 0 points, got {self.max_drop}")
        for name in ("bias_correction_images", "sensitivity_images", "mixed_images"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"insert-qdq: {name} must be at least 1")
        if int(self.choice_images) < 0:
            raise UsageError("insert-qdq: choice_images must be >= 0")
        if self.calib_limit is not None and self.calib_limit < 1:
            raise UsageError("insert-qdq: calib_limit must be at least 1")
        if not self.auto_float_db >= 0 or not 0 <= self.auto_float_max <= 1:
            raise UsageError("insert-qdq: auto_float_db must be >= 0 and auto_float_max in [0, 1]")
        if self.labels and not self.images:
            raise UsageError("insert-qdq: option 'labels' needs option 'images' (the labelled image folder)")
