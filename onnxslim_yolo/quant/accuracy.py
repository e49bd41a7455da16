"""Accuracy control after insertion: sensitivity ranking, automatic float for very sensitive
candidates, mixed precision against ``max_drop``, and the numerics guard.

The guard keeps the pass inside its own contract: the pass manager checks a LOSSY pass by the
worst output cosine on seeded random inputs and calibration images; when the quantized model
falls below that floor (a model whose outputs amplify rounding noise), the most sensitive
candidates are restored to float until it holds, instead of returning a model that fails.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx

from .. import data, verify
from ..eval.anchors import OutputReader
from ..pass_base import PassReport, UsageError
from . import metrics, mixed
from .pipeline import Built, Quantizer
from .sensitivity import (SwitchEvaluator, UnitSensitivity, candidates, grouped_candidate, rank_units,
                          significant_units, switch_model, tensor_units)


log = logging.getLogger(__name__)
Feeds = Dict[str, np.ndarray]
#: the guard aims this much above the manager's floor (the manager's reference runs unoptimized)
GUARD_MARGIN = 0.005
#: reasons of the layers an accuracy or runtime stage restored to float (kept by later re-plans)
RESTORED = ("sensitive", "mixed", "guard", "openvino")
#: compiles tried by :meth:`Controller.fit_openvino`
OPENVINO_TRIES = 32


def named_nodes(text: str, names) -> List[str]:
    """The ``names`` that ``text`` mentions as whole names (not as the start of a longer name)."""
    found = []
    for n in names:
        if n and re.search(rf"(?<![\w/.\-]){re.escape(n)}(?![\w/.\-])", text):
            found.append(n)
    return sorted(found)


def output_format(q: Quantizer) -> Optional[str]:
    """The YOLO output format whose rows two models share ("v5", "v8", "yolox", "xyxy"), or None
    to measure the head maps."""
    from ..eval.decode import row_format

    if q.head.family == "unknown":
        return None
    shape = dict(q.head.outputs).get(q.model.graph.output[0].name, ())
    try:
        hw: Optional[Sequence[int]] = data.model_input(q.model)[1][1:]
    except UsageError:   # not one image input: formats that need no input size still decode
        hw = None
    try:
        return row_format(q.model, shape, hw)
    except Exception:  # unknown layout: fall back to the head maps
        return None


def within_budget(found: Sequence[UnitSensitivity], max_layers: int) -> List[UnitSensitivity]:
    """The most sensitive candidates whose layers together stay within ``max_layers``."""
    out: List[UnitSensitivity] = []
    used: set = set()
    for r in found:
        new = used | set(r.units)
        if len(new) <= max_layers:
            out.append(r)
            used = new
    return out


def keep_float(restored: Sequence[UnitSensitivity], why: str) -> Dict[str, str]:
    return {n: why.format(unit=r.unit, gain=r.sqnr_gain_db) for r in restored for n in r.nodes}


class Controller:
    """Runs the accuracy stages on a built model; every stage records itself in the report."""

    def __init__(self, q: Quantizer, report: PassReport) -> None:
        self.q, self.report, self.o = q, report, q.opts
        self.ranking: List[UnitSensitivity] = []
        self._quality: Dict[int, Dict[str, Dict[str, float]]] = {}
        self._ev: Optional[SwitchEvaluator] = None
        self._cands: List[Tuple[str, Tuple[str, ...]]] = []
        #: tensors fed into an NMS/TopK inside the model, and the graph outputs after it
        self.frontier, self.selected = verify.selection_frontier(q.model)

    def _evaluator(self, built: Built) -> SwitchEvaluator:
        if self._ev is None:
            units_of = tensor_units(built.graph, built.plan)
            sw = switch_model(built.graph, self.q.model, built.plan, built.record, units_of)
            feeds = self.q.feeds[: self.o.sensitivity_images]
            self._ev = SwitchEvaluator(sw, self.q.head.last_conv_outputs, feeds, self.o.threads,
                                       output_format(self.q), OutputReader(self.q.model))
            self._cands = candidates(built.plan, units_of) + grouped_candidate(built.graph, built.plan)
        return self._ev

    def _rank(self, built: Built) -> List[UnitSensitivity]:
        if not self.ranking:
            self.ranking = rank_units(self._evaluator(built), self._cands, built.plan.units, self.o.progress)
        return self.ranking

    def sensitivity(self, built: Built) -> Built:
        """Ranking (when asked) and automatic float for candidates above ``auto_float_db``."""
        o = self.o
        if not (o.sensitivity or o.auto_float_db > 0) or not built.plan.units:
            return built
        ev = self._evaluator(built)
        if o.sensitivity:
            significant = [r for r in self._rank(built)
                           if o.auto_float_db > 0 and r.sqnr_gain_db >= o.auto_float_db]
        else:
            significant = significant_units(ev, self._cands, built.plan.units, o.auto_float_db)
        significant = within_budget(significant, int(o.auto_float_max * len(built.plan.layers)))
        sens = self._sensitivity_report()
        if significant:
            together = ev.gain([u for r in significant for u in r.units])
            sens["auto_float"] = {"threshold_db": o.auto_float_db,
                                  "candidates": [r.as_dict() for r in significant],
                                  "gain_together_db": round(together, 3)}
            why = "sensitive: un-quantizing {unit} alone lowers the output loss {gain:.2f} dB"
            built = self.q.build(self.q.plan(keep_float(significant, why)))
        return built

    def _sensitivity_report(self) -> Dict[str, Any]:
        ev = self._ev
        if ev is None:
            return {}
        sens: Dict[str, Any] = self.report.details.setdefault("sensitivity", {})
        sens.update({"metric": ev.metric, "gain": "dB of that loss removed by restoring alone",
                     "images": len(ev.feeds), "int8_loss_db": round(ev.base, 3), "runs": ev.runs})
        if self.ranking:
            sens["ranking"] = [r.as_dict() for r in self.ranking]
        return sens

    def search(self, built: Built, loss: Callable[[onnx.ModelProto], float], max_drop: float,
               key: str, why: str) -> Built:
        """Restore the most sensitive candidates until ``loss <= max_drop`` (see ``quant.mixed``)."""
        ranked: List[UnitSensitivity] = []
        base = self._restored(built)
        variants: Dict[int, Built] = {0: built}

        def ranking() -> List[UnitSensitivity]:
            ranked.extend(r for r in self._rank(built) if not set(r.nodes) <= set(built.plan.float_nodes))
            self._sensitivity_report()
            return ranked

        def build(units: List[str]) -> onnx.ModelProto:
            chosen = [r for r in ranked if r.unit in set(units)]
            b = self.q.build(self.q.plan({**base, **keep_float(chosen, why)}))
            variants[len(units)] = b
            return b.model

        res = mixed.search(ranking, build, loss, max_drop, first=built.model)
        self.report.details[key] = {"max": max_drop, "met": res.met, "final": res.loss,
                                    "restored": res.restored, "steps": res.steps}
        if not res.met:
            self.report.skip(key, f"{res.loss:.4g} > {max_drop} even with {len(res.restored)} "
                                  "candidates float")
        return variants[len(res.restored)]

    @staticmethod
    def _restored(built: Built) -> Dict[str, str]:
        return {n: w for n, w in built.plan.float_nodes.items() if w.startswith(RESTORED)}

    def fit_openvino(self, built: Built) -> Built:
        """For the openvino target (with OpenVINO installed): the INT8 model compiles there.
        OpenVINO's low-precision transformations refuse some quantized patterns (a MatMul
        reading a Concat of tokens: RT-DETR's encoder output); a layer or INT8 op its message
        names is kept float and the model rebuilt, up to :data:`OPENVINO_TRIES` compiles."""
        from .. import openvino_rt

        if openvino_rt.engine_for(self.q.target.name) != "openvino":
            return built
        kept: Dict[str, str] = {}
        compiles = 0
        while True:
            compiles += 1
            try:
                openvino_rt.OpenVinoSession(built.model)
                break
            except openvino_rt.OpenVinoError as exc:
                names = named_nodes(exc.text, list(built.plan.layers) + list(built.plan.int8_ops))
                left = compiles >= OPENVINO_TRIES
                if not names or left:
                    why = (f"still fails after {compiles} compiles" if left and names
                           else "and its message names no quantized node")
                    log.warning("insert-qdq: the INT8 model does not compile in OpenVINO %s: %s", why, exc)
                    self.report.skip("openvino", f"the INT8 model does not compile in OpenVINO {why}: {exc}")
                    break
                why = f"openvino: its INT8 form does not compile there ({openvino_rt.reason(exc, 160)})"
                kept.update({n: why for n in names})
                built = self.q.build(self.q.plan({**self._restored(built), **kept}))
        self.report.details["openvino"] = {"compiles": compiles, "kept_float": sorted(kept)}
        return built

    def mixed_precision(self, built: Built) -> Built:
        if self.o.max_drop is None:
            return built
        o = self.o
        loss = metrics.DetectionLoss(self.q.model, self.q.feeds[: o.mixed_images], o.labels, o.images,
                                     o.threads)
        if not o.labels:   # the help says mAP points: say what is measured instead
            log.warning("insert-qdq: max_drop %s without labels is measured as %s on %d calibration images, "
                        "not in mAP points (--labels DIR for those)", o.max_drop, loss.kind,
                        len(self.q.feeds[: o.mixed_images]))
        out = self.search(built, loss, float(o.max_drop), "mixed_precision",
                          "mixed precision: {unit} restored to meet max_drop")
        self.report.details["mixed_precision"]["loss"] = loss.kind
        return out

    def quality(self, model: onnx.ModelProto, feeds: Sequence[Feeds]) -> Dict[str, Dict[str, float]]:
        """Per graph output and head map: cosine and SQNR against the float model (cached)."""
        if id(model) not in self._quality:
            extra = list(self.q.head.last_conv_outputs) + self.frontier
            self._quality[id(model)] = metrics.output_quality(self.q.model, model, feeds, extra,
                                                              self.o.threads, class_scores=True)
        return self._quality[id(model)]

    def guard(self, built: Built, feeds: Sequence[Feeds], floor: float) -> Built:
        """Keep the worst output cosine on ``feeds`` at or above ``floor`` (+ a margin), the
        decoded class scores' included, as the final checks hold them to the same floor."""
        target = floor + GUARD_MARGIN
        # outputs after an NMS/TopK are judged by what is fed into it, each tensor on its own
        # (stricter than the manager, which joins them)
        outs = [o.name for o in self.q.model.graph.output if o.name not in self.selected] + self.frontier
        outs += [metrics.CLASS_SCORES] if not self.selected else []

        def worst(m: onnx.ModelProto) -> float:
            qual = self.quality(m, feeds)
            return min(qual[n]["cosine_min"] for n in outs if n in qual)

        cos = worst(built.model)
        if cos >= target or not built.plan.units:
            return built
        log.warning("insert-qdq: output cosine %.4f below %.3f: restoring sensitive layers to float",
                    cos, target)
        out = self.search(built, lambda m: round(max(0.0, target - worst(m)), 6), 0.0, "guard",
                          f"guard: {{unit}} restored to keep the output cosine >= {target:g}")
        self.report.details["guard"].update({"cosine_before": round(cos, 6), "target_cosine": target})
        return out
