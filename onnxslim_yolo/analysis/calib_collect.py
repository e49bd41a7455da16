"""Run a model over calibration feeds and gather streaming statistics of chosen tensors.

The requested intermediate tensors become graph outputs of a copy of the model; onnxruntime runs
it once per feed with every graph optimization (it never fuses away a graph output, so each
requested tensor keeps its float value up to kernel rounding) and its memory arena for the
intermediates: on yolov5n at 640 with 2 threads, 73 ms per image against 103 ms with basic
optimizations and no arena. Outputs go through IO binding into two reused buffer sets: a worker
thread folds one feed's outputs into the statistics while onnxruntime computes the next.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .. import verify
from ..pass_base import UsageError, VerificationError, first_line
from ..progress import bar
from .calib_table import CalibrationStats
from .histogram import StreamingHistogram, TensorStats, _Scratch, samples_per_update

log = logging.getLogger(__name__)

#: feeds whose outputs may be alive at once (one being reduced, one being computed)
IN_FLIGHT = 2


# --------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class _Plan:
    from_feed: Tuple[str, ...]      # graph inputs: read from the feed itself
    constants: Tuple[str, ...]      # initializers: read once from the model
    run: Tuple[str, ...]            # everything else: graph outputs of the augmented copy
    inputs: Tuple[str, ...]         # the model's runtime inputs


def _plan(model: onnx.ModelProto, names: Sequence[str]) -> _Plan:
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = tuple(i.name for i in g.input if i.name not in inits)
    produced = {o for n in g.node for o in n.output if o}
    from_feed, constants, run = [], [], []
    for n in names:
        if n in inputs:
            from_feed.append(n)
        elif n in produced:
            run.append(n)
        elif n in inits:
            constants.append(n)
        else:
            raise UsageError(f"calibration: tensor '{n}' is not in the model's main graph")
    return _Plan(tuple(from_feed), tuple(constants), tuple(run), inputs)


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    try:
        return verify.session(model, optimize=True, threads=max(threads, 0))
    except VerificationError as exc:
        raise VerificationError(f"calibration: {exc}") from None


# ----------------------------------------------------------------------------------- runner
class _Runner:
    """Runs the augmented session into preallocated output buffers, one set per in-flight slot.

    Reusing buffers through IO binding avoids allocating (and page-faulting) every output on every
    feed, which otherwise doubles onnxruntime's time here. Buffers are keyed by the feed's shapes.
    """

    def __init__(self, sess: ort.InferenceSession, outputs: Sequence[str]) -> None:
        self.sess, self.outputs = sess, list(outputs)
        self.key: Optional[Tuple[Any, ...]] = None
        self.bufs: List[Optional[List[np.ndarray]]] = [None] * IN_FLIGHT

    def run(self, slot: int, feed: Dict[str, np.ndarray]) -> List[np.ndarray]:
        feed = {n: np.ascontiguousarray(a) for n, a in feed.items()}
        key = tuple((n, a.shape, a.dtype.str) for n, a in feed.items())
        if key != self.key:  # new shapes: in-flight buffers stay alive through the reducer's refs
            self.key, self.bufs = key, [None] * IN_FLIGHT
        bufs = self.bufs[slot]
        try:
            if bufs is None:
                out = self.sess.run(self.outputs, feed)  # learns the shapes; its arrays are ours
                self.bufs[slot] = [a if a.flags.writeable and a.flags.c_contiguous else np.empty_like(a)
                                   for a in out]
                return out
            binding = self.sess.io_binding()
            for n, a in feed.items():
                binding.bind_cpu_input(n, a)
            for n, b in zip(self.outputs, bufs):
                binding.bind_output(n, "cpu", 0, b.dtype, b.shape, b.ctypes.data)
            self.sess.run_with_iobinding(binding)
            return bufs
        except Exception as exc:
            raise VerificationError("calibration: onnxruntime failed to run the model: "
                                    f"{first_line(exc)}") from None


class _Reducer:
    """Folds one feed's tensors into the statistics on a background thread while onnxruntime
    computes the next feed (onnxruntime and numpy's loops release the GIL)."""

    def __init__(self, stats: Dict[str, TensorStats], skipped: Dict[str, str],
                 per_feed: Optional[int] = None) -> None:
        #: values of a large tensor binned per feed (None: all of them)
        self.stats, self.skipped, self.per_feed = stats, skipped, per_feed
        self.free: "queue.Queue[int]" = queue.Queue()
        for i in range(IN_FLIGHT):
            self.free.put(i)
        self.q: "queue.Queue[Optional[Tuple[int, List[Tuple[str, np.ndarray]]]]]" = queue.Queue()
        self.error: Optional[BaseException] = None
        #: CPU seconds spent reducing (diagnostics)
        self.cpu_seconds = 0.0
        self.thread = threading.Thread(target=self._loop, name="calibration-reducer", daemon=True)
        self.thread.start()

    def acquire(self) -> int:
        """A free output slot (waits while both are being reduced)."""
        slot = self.free.get()
        self._raise()
        return slot

    def submit(self, slot: int, items: List[Tuple[str, np.ndarray]]) -> None:
        self.q.put((slot, items))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        scratch = _Scratch()
        while True:
            job = self.q.get()
            if job is None:
                self.cpu_seconds = time.thread_time()
                return
            slot, items = job
            try:
                while items and self.error is None:
                    name, arr = items.pop()
                    self._update(name, arr, scratch)
                    del arr
            except BaseException as exc:  # re-raised in the main thread
                self.error = exc
            finally:
                job = items = None
                self.free.put(slot)

    def _update(self, name: str, arr: np.ndarray, scratch: _Scratch) -> None:
        if name in self.skipped:
            return
        if not np.issubdtype(arr.dtype, np.floating):
            self.skipped[name] = f"{arr.dtype} tensor, not float: nothing to calibrate"
            self.stats.pop(name, None)
            return
        self.stats[name].update(arr, scratch, self.per_feed)


# ------------------------------------------------------------------------------------ collect
def collect(model: onnx.ModelProto, tensors: Sequence[str], feeds: Iterable[Dict[str, np.ndarray]],
            bins: int = 2048, progress: bool = True, threads: int = 0) -> CalibrationStats:
    """Run ``model`` once per feed and gather min, max and a histogram of each of ``tensors``.

    Memory stays bounded: two sets of output buffers (one computed, one reduced), no samples kept.
    ``threads`` sets onnxruntime's intra-op threads; 0 picks every core when ``feeds`` has a
    length (histograms then bin a strided sample of large tensors, see ``histogram``), else one
    less, leaving a core to binning every value. Non-float tensors are reported in ``skipped``;
    unknown names and empty or malformed feeds raise UsageError.
    """
    if bins < 16:
        raise UsageError(f"calibration: bins must be at least 16, got {bins}")
    names = list(dict.fromkeys(tensors))
    plan = _plan(model, names)
    stats = {n: TensorStats(n, StreamingHistogram(bins)) for n in names}
    skipped: Dict[str, str] = {}
    start = time.perf_counter()
    total = len(feeds) if hasattr(feeds, "__len__") else None  # type: ignore[arg-type]
    # histograms of large tensors are binned on a stride (exact min/max): with a known feed count,
    # enough values per feed for HIST_TOTAL_SAMPLES in all; a stream of unknown length bins all
    per_feed = samples_per_update(total) if total else None
    if threads <= 0:  # binning everything needs a core of its own; a strided sample does not
        threads = max(1, (os.cpu_count() or 2) - (0 if per_feed else 1))
    runner = _Runner(_session(verify.with_outputs(model, plan.run), threads), plan.run) if plan.run else None
    reducer = _Reducer(stats, skipped, per_feed)
    samples, run_seconds = 0, 0.0
    try:
        for feed in bar(feeds, total=total, desc="calibration", unit="feed", enabled=progress):
            run_feed = _check_feed(feed, plan.inputs, samples)
            slot = reducer.acquire()
            # a copy: a feed generator may refill its array while the reducer still reads it
            items = [(n, np.array(run_feed[n])) for n in plan.from_feed]
            if runner is not None:
                t0 = time.perf_counter()
                items += zip(plan.run, runner.run(slot, run_feed))
                run_seconds += time.perf_counter() - t0
            reducer.submit(slot, items)
            del items, run_feed, feed
            samples += 1
    finally:
        reducer.close()
    if samples == 0:
        raise UsageError("calibration: no feeds (the calibration data is empty)")
    _add_constants(model, plan.constants, stats, skipped)
    seconds = time.perf_counter() - start
    log.info("calibration: %d tensors over %d feeds in %.1fs", len(stats), samples, seconds)
    return CalibrationStats(stats, samples, bins, skipped,
                            {"seconds": round(seconds, 3), "run_seconds": round(run_seconds, 3),
                             "reduce_cpu_seconds": round(reducer.cpu_seconds, 3), "ort_threads": threads})


def _check_feed(feed: Mapping[str, np.ndarray], inputs: Sequence[str], index: int) -> Dict[str, np.ndarray]:
    if not isinstance(feed, Mapping):
        raise UsageError(f"calibration: feed {index} is a {type(feed).__name__}, expected a dict "
                         "input name -> array")
    missing = [n for n in inputs if n not in feed]
    if missing:
        raise UsageError(f"calibration: feed {index} lacks input '{missing[0]}' "
                         f"(has {sorted(feed)})")
    return {n: feed[n] for n in inputs}


def _add_constants(model: onnx.ModelProto, names: Sequence[str], stats: Dict[str, TensorStats],
                   skipped: Dict[str, str]) -> None:
    """Initializers are the same for every feed: counted once."""
    if not names:
        return
    inits = {t.name: t for t in model.graph.initializer if t.name in set(names)}
    for n in names:
        value = numpy_helper.to_array(inits[n])
        if not np.issubdtype(value.dtype, np.floating):
            skipped[n] = f"{value.dtype} tensor, not float: nothing to calibrate"
            stats.pop(n, None)
            continue
        stats[n].update(value)


__all__ = ["CalibrationStats", "collect"]
