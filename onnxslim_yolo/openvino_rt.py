"""OpenVINO as a second runtime: load, run and time an ONNX model on OpenVINO's CPU plugin.

OpenVINO is optional (``pip install 'onnxslim-yolo[openvino]'``). :func:`available` says whether
it is installed; everything else raises :class:`OpenVinoMissing` (a usage error naming the
install command) when it is not.

:class:`OpenVinoSession` has the part of onnxruntime's ``InferenceSession`` interface that the
evaluator and the checks use (``run``, ``get_inputs``, ``get_outputs``), so the same code scores
a model in either runtime. OpenVINO reads the ONNX file itself (its ONNX frontend), so a model
it cannot import fails here with OpenVINO's own reason, which names the op.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import onnx

from . import ir
from .pass_base import UsageError, VerificationError

INSTALL = "pip install 'onnxslim-yolo[openvino]' (or pip install openvino)"
#: runtimes a model can be evaluated and timed in
ENGINES = ("onnxruntime", "openvino")


class OpenVinoMissing(UsageError):
    """OpenVINO is asked for but not installed."""


class OpenVinoError(VerificationError):
    """OpenVINO refused to compile or run a model; ``text`` is its whole message (the one-line
    error shows :func:`reason`)."""

    def __init__(self, what: str, exc: BaseException) -> None:
        self.text = str(exc)
        super().__init__(f"OpenVINO {what}: {reason(exc)}")


def reason(exc: BaseException, limit: int = 400) -> str:
    """OpenVINO's message on one line: its "Exception from <source file>" lines (a stack of
    where, not why) dropped, the first and last of the rest kept (the failing transformation
    and node; the check that failed)."""
    lines = [ln.strip() for ln in str(exc).splitlines()
             if ln.strip() and not ln.strip().startswith("Exception from")]
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def engine_for(target: str) -> str:
    """The runtime accuracy and latency are measured in for a deployment ``target``: OpenVINO for
    the openvino target when it is installed, else onnxruntime."""
    return "openvino" if target == "openvino" and available() else "onnxruntime"


def version() -> Optional[str]:
    if not available():
        return None
    import openvino as ov

    return str(ov.__version__).split("-")[0]


def _core():
    try:
        import openvino as ov
    except ImportError:
        raise OpenVinoMissing(f"OpenVINO is not installed: {INSTALL}") from None
    return ov.Core()


def _compile(core, path: Path, config: Dict[str, str]):
    try:
        return core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as exc:
        raise OpenVinoError("cannot load the model", exc) from None


@dataclass(frozen=True)
class _Port:
    name: str


class OpenVinoSession:
    """One model (a ModelProto, or the path of a saved one) compiled for OpenVINO's CPU plugin
    (``threads`` 0: OpenVINO's default)."""

    def __init__(self, model: Union[onnx.ModelProto, str, Path], threads: int = 0) -> None:
        core = _core()
        config: Dict[str, str] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(int(threads))
        if isinstance(model, onnx.ModelProto):
            with tempfile.TemporaryDirectory(prefix="osy_ov_") as td:
                path = Path(td) / "model.onnx"
                ir.save(model, path, external_data=ir.model_size(model) > ir.PROTO_LIMIT)
                self.compiled = _compile(core, path, config)
        else:   # a saved file is read as it is; only its graph's names are loaded here
            self.compiled = _compile(core, Path(model), config)
            model = onnx.load(str(model), load_external_data=False)
        inits = {t.name for t in model.graph.initializer}
        self._inputs = [_Port(v.name) for v in model.graph.input if v.name not in inits]
        self._outputs = [_Port(v.name) for v in model.graph.output]
        # OpenVINO 2024.0 drops an input the graph never reads and refuses a feed for it by name
        self._kept = {n for port in self.compiled.inputs for n in port.get_names()}
        self.request = self.compiled.create_infer_request()
        try:   # bf16 on CPUs with bf16 units (OpenVINO's default there), else f32
            hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
            self.precision = str(hint.get_type_name() if hasattr(hint, "get_type_name") else hint)
        except Exception:
            self.precision = "default"

    def get_inputs(self) -> List[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> List[_Port]:
        return list(self._outputs)

    def run(self, output_names: Optional[Sequence[str]], feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        try:
            res = self.request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()
                                      if k in self._kept})
        except Exception as exc:
            raise OpenVinoError("failed to run the model", exc) from None
        by_name: Dict[str, np.ndarray] = {}
        for port, value in res.items():
            for n in port.get_names():
                by_name[n] = np.array(value)
        names = [p.name for p in self._outputs] if output_names is None else list(output_names)
        missing = [n for n in names if n not in by_name]
        if missing:   # OpenVINO renamed an output: fall back on the output order
            values = [np.array(res[self.compiled.output(i)]) for i in range(len(self.compiled.outputs))]
            by_name.update(zip([p.name for p in self._outputs], values))
        return [by_name[n] for n in names]


__all__ = ["OpenVinoSession", "OpenVinoMissing", "OpenVinoError", "reason", "available", "engine_for",
           "version", "ENGINES", "INSTALL"]
