"""Options of prune-channels: defaults, validation and the error messages users see."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from onnxslim_yolo.analysis.importance import CRITERIA
from onnxslim_yolo.pass_base import UsageError

log = logging.getLogger(__name__)

NAME = "prune-channels"
MAX_RATIO = 0.9
CHOICES = {"cost": ("auto", "measured", "sweep", "lsq", "score"), "refit_scope": ("affected", "downstream"),
           "refit_head": ("yes", "no"), "probe_metric": ("auto", "detections", "agreement")}
#: options the API may pass along for every lossy pass (evaluation data); not used here
PASSED_THROUGH = ("labels", "images")


@dataclass(frozen=True)
class PruneOptions:
    """See the module docstring of passes/prune_channels.py for the meaning of each option."""

    ratio: Optional[float]
    per_layer: Dict[str, float]
    round_to: int = 8
    min_channels: int = 1
    protect: Tuple[str, ...] = ()
    criterion: str = "l1"
    reconstruct: bool = False
    fold_mean: bool = False
    kept_json: Optional[str] = None
    calib_images: int = 64
    sens_images: int = 8
    sweep_images: int = 64
    samples: int = 8192
    ridge: float = 1e-3
    refit_samples: int = 262144
    refit_ridge: float = 0.1
    refit_memory: float = 4.0
    sequential: bool = True
    refit_scope: str = "affected"
    refit_head: str = "yes"
    cost: str = "auto"
    probe_metric: str = "auto"
    saliency: bool = True
    gains: bool = True
    readers: bool = False
    max_layer_ratio: float = 0.75
    bn_by_var: bool = False
    relative: bool = True
    dead_tol: float = 1e-4
    threads: int = 1
    #: progress of the selection and the refit (a bar on a terminal, else a line now and then)
    progress: bool = True


INTS = ("round_to", "min_channels", "calib_images", "sens_images", "sweep_images", "samples", "refit_samples",
        "threads")
FLOATS = ("ridge", "refit_ridge", "refit_memory", "dead_tol")
#: the floats that must be finite and >= 0 (refit_memory is > 0, and may be inf: no cap)
FINITE = ("ridge", "refit_ridge", "dead_tol")
BOOLS = ("sequential", "saliency", "gains", "readers", "bn_by_var", "relative")
KNOWN = set(PruneOptions.__dataclass_fields__) | set(PASSED_THROUGH)


def _ratio(value: Any, what: str, allow_zero: bool = False) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{NAME}: {what} {value!r} is not a number") from None
    if not (0.0 <= r <= MAX_RATIO if allow_zero else 0.0 < r <= MAX_RATIO):
        raise UsageError(f"{NAME}: {what} {value} is outside (0, {MAX_RATIO}]: give the fraction of "
                         "multiply-adds to remove, e.g. 0.2")
    return r


def _bool(value: Any, what: str) -> bool:
    """True or False (numpy's too); anything else is a UsageError ("false" read as True before)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise UsageError(f"{NAME}: {what} must be true or false, got {value!r}")


def _typed(opts: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    defaults = PruneOptions(None, {})
    for k in INTS:
        v = opts.get(k, getattr(defaults, k))
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{NAME}: {k} must be a positive integer, got {v!r}")
        out[k] = int(v)
    for k in FLOATS:
        v = opts.get(k, getattr(defaults, k))
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise UsageError(f"{NAME}: {k} must be a number, got {v!r}") from None
        if k in FINITE and (not out[k] >= 0 or out[k] == float("inf")):   # a NaN ridge broke the refit
            raise UsageError(f"{NAME}: {k} must be a finite number >= 0, got {v!r}")
    if not out["refit_memory"] > 0:
        raise UsageError(f"{NAME}: refit_memory must be a positive number of GB, got {out['refit_memory']!r}")
    for k in BOOLS:
        out[k] = _bool(opts.get(k, getattr(defaults, k)), k)
    for k, allowed in CHOICES.items():
        v = str(opts.get(k, getattr(defaults, k)))
        if v not in allowed:
            raise UsageError(f"{NAME}: {k} '{v}' is not one of {', '.join(allowed)}")
        out[k] = v
    return out


def parse_options(opts: Mapping[str, Any], has_calib: bool) -> PruneOptions:
    """Validate the options; bad values raise UsageError naming the option."""
    unknown = sorted(set(opts) - KNOWN)
    if unknown:
        raise UsageError(f"{NAME}: unknown options {', '.join(unknown)}; known: {', '.join(sorted(KNOWN))}")
    ratio = None if opts.get("ratio") is None else _ratio(opts["ratio"], "ratio")
    per_layer = {str(k): _ratio(v, f"per-layer ratio for '{k}'", allow_zero=True)
                 for k, v in dict(opts.get("per_layer") or {}).items()}
    if ratio is None and not per_layer:
        raise UsageError(f"{NAME}: give ratio (fraction of multiply-adds to remove, e.g. 0.2) or "
                         "per_layer ratios")
    criterion = opts.get("criterion") or ("activation" if has_calib else "l1")
    if criterion not in CRITERIA:
        raise UsageError(f"{NAME}: unknown criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")
    if criterion == "activation" and not has_calib:
        raise UsageError(f"{NAME}: criterion 'activation' needs calibration images (--calib)")
    reconstruct = _bool(opts.get("reconstruct", has_calib), "reconstruct")
    if reconstruct and not has_calib:
        raise UsageError(f"{NAME}: reconstruct needs calibration images (--calib)")
    protect = opts.get("protect") or ()
    protect = (protect,) if isinstance(protect, str) else tuple(str(p) for p in protect)
    return PruneOptions(
        ratio=ratio, per_layer=per_layer, protect=protect, criterion=criterion, reconstruct=reconstruct,
        fold_mean=_bool(opts.get("fold_mean", has_calib), "fold_mean") and has_calib,
        kept_json=opts.get("kept_json"),
        max_layer_ratio=_ratio(opts.get("max_layer_ratio", 0.75), "max_layer_ratio"),
        progress=True if opts.get("progress") is None else _bool(opts["progress"], "progress"),
        **_typed(opts))
