"""Mixed precision: restore the most sensitive units to float until the loss is within max_drop.

The loss of a candidate is measured on the real built model (not the switch model): restoring a
unit re-plans with its nodes excluded, so neighbouring ops fall back to float where they no
longer have INT8 readers. Restores grow 1, 2, 4, ... units until the loss fits, then a bisection
finds the smallest count that fits; every measured step is reported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import onnx

from .sensitivity import UnitSensitivity

log = logging.getLogger(__name__)


@dataclass
class MixedResult:
    model: onnx.ModelProto
    restored: List[str]
    loss: float
    met: bool
    steps: List[Dict[str, object]] = field(default_factory=list)


Ranking = Union[Sequence[UnitSensitivity], Callable[[], Sequence[UnitSensitivity]]]


def search(ranking: Ranking, build: Callable[[Sequence[str]], onnx.ModelProto],
           loss: Callable[[onnx.ModelProto], float], max_drop: float,
           first: Optional[onnx.ModelProto] = None) -> MixedResult:
    """Smallest k such that restoring the k most sensitive units gives loss <= max_drop.

    ``ranking`` may be a callable: it is only computed when the unrestored model misses max_drop.
    """
    units: List[str] = []
    cache: Dict[int, tuple] = {}
    steps: List[Dict[str, object]] = []

    def at(k: int) -> tuple:
        if k not in cache:
            m = first if (k == 0 and first is not None) else build(units[:k])
            cache[k] = (m, loss(m))
            steps.append({"restored": k, "loss": cache[k][1]})
            log.info("mixed precision: %d units float -> loss %.3f", k, cache[k][1])
        return cache[k]

    if at(0)[1] <= max_drop:
        return MixedResult(cache[0][0], [], cache[0][1], True, steps)
    units = [r.unit for r in (ranking() if callable(ranking) else ranking)]
    if not units:
        return MixedResult(cache[0][0], [], cache[0][1], False, steps)
    lo, k = 0, 1
    while k < len(units) and at(k)[1] > max_drop:
        lo, k = k, min(2 * k, len(units))
    k = min(k, len(units))
    if at(k)[1] > max_drop:
        return MixedResult(cache[k][0], units[:k], cache[k][1], False, steps)
    hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid)[1] <= max_drop:
            hi = mid
        else:
            lo = mid
    return MixedResult(cache[hi][0], units[:hi], cache[hi][1], True, steps)
