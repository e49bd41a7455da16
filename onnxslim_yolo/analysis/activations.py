"""Intermediate activations on calibration data: capture tensors and per-channel statistics.

The model is run by onnxruntime with the wanted intermediate tensors added as graph outputs
(a copy; the input model is not changed). Statistics are per channel (axis 1) over batch and
spatial positions, accumulated in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, Sequence

import numpy as np
import onnx

from .. import verify
from ..verify import with_outputs  # noqa: F401 -- re-exported: the analyses import it from here

Feeds = Dict[str, np.ndarray]


def capture(model: onnx.ModelProto, feeds: Iterable[Feeds], names: Sequence[str],
            threads: int = 1) -> Iterator[Dict[str, np.ndarray]]:
    """For each feed, the values of ``names`` (one dict per feed, in feed order)."""
    names = list(dict.fromkeys(names))
    if not names:   # onnxruntime refuses a model with no outputs
        for _ in feeds:
            yield {}
        return
    sess = verify.session(with_outputs(model, names, only=True), optimize=True, threads=threads)
    out_names = [o.name for o in sess.get_outputs()]
    idx = [out_names.index(n) for n in names]
    for f in feeds:
        res = verify.run(sess, dict(f))
        yield {n: res[i] for n, i in zip(names, idx)}


@dataclass
class ChannelStats:
    """Per-channel statistics of one tensor over the calibration positions."""

    count: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray


class _Acc:
    def __init__(self, c: int) -> None:
        self.n = 0
        self.s = np.zeros(c)
        self.ss = np.zeros(c)
        self.lo = np.full(c, np.inf)
        self.hi = np.full(c, -np.inf)
        self.shift: np.ndarray = np.zeros(c)

    def add(self, a: np.ndarray) -> None:
        # the tensor stays in its float type; the sums are taken in float64 (a float64 copy of
        # each activation took 4x as long, about 15% of a yolov5n prune)
        x = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
        if self.n == 0:  # shifted sums keep the variance accurate for large means
            self.shift = x.mean(axis=1, dtype=np.float64).astype(x.dtype).astype(np.float64)
        d = x - self.shift.astype(x.dtype)[:, None]
        self.n += x.shape[1]
        self.s += d.sum(axis=1, dtype=np.float64)
        self.ss += np.einsum("ij,ij->i", d, d, dtype=np.float64)
        self.lo = np.minimum(self.lo, x.min(axis=1))
        self.hi = np.maximum(self.hi, x.max(axis=1))

    def result(self) -> ChannelStats:
        m = self.s / max(self.n, 1)
        var = np.maximum(self.ss / max(self.n, 1) - m * m, 0.0)
        return ChannelStats(self.n, m + self.shift, np.sqrt(var), self.lo, self.hi)


def channel_stats(model: onnx.ModelProto, feeds: Sequence[Feeds], names: Sequence[str],
                  threads: int = 1) -> Dict[str, ChannelStats]:
    """Per-channel mean, std, min and max of each tensor in ``names`` over all ``feeds``."""
    accs: Dict[str, _Acc] = {}
    for vals in capture(model, feeds, names, threads):
        for n, a in vals.items():
            if a.ndim < 2:
                continue
            accs.setdefault(n, _Acc(a.shape[1])).add(a)
    return {n: acc.result() for n, acc in accs.items()}


def calib_batches(calib: Sequence[Feeds], limit: int) -> List[Feeds]:
    """The first feeds holding at most ``limit`` samples in total (at least one feed)."""
    out: List[Feeds] = []
    total = 0
    for f in calib:
        if out and total >= limit:
            break
        out.append(f)
        total += int(next(iter(f.values())).shape[0]) if f else 1
    return out


def stats_summary(stats: Mapping[str, ChannelStats]) -> Dict[str, int]:
    return {n: s.count for n, s in stats.items()}
