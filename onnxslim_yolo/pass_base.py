"""The pass interface: Pass, PassResult, PassReport, Numerics, PassContext and typed errors.

A pass reads an ``onnx.ModelProto`` and returns a new one in a :class:`PassResult`. The pass
manager, not the pass, proves the numerics contract the pass declares.
"""
from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx


# ----------------------------------------------------------------------------------------- errors
class SlimError(Exception):
    """Base of every user-facing failure. ``exit_code`` is what the CLI returns."""

    exit_code: int = 1


class UsageError(SlimError):
    """A bad request: unknown pass name, option out of range, missing file."""

    exit_code = 2


class ModelLoadError(UsageError):
    """The file is missing, not ONNX, truncated, or cannot be read."""


class PreconditionError(SlimError):
    """A pass (or the pipeline) refuses this model; the message names node and reason."""

    exit_code = 3


def naming_file(exc: SlimError, path: Optional[Union[str, Path]]) -> SlimError:
    """``exc`` with ``path`` (the model file) in front of its message, unless the message already
    starts with a file or folder that exists (calibration images, labels) or that it says is not
    there, an option (``--...``), or names ``path``: one line naming the file and the reason, as
    every error should."""
    msg = str(exc)
    head, _, rest = msg.partition(": ")
    named = re.sub(r":\d+$", "", head)   # a labels file's "FILE:LINE" too
    # or a path that is not there: "IMAGES: image folder does not exist" is no fault of the model
    gone = bool(re.match(r"(no such |.*\b(does not exist|not found)\b)", rest)) and " " not in named
    if path is None or msg.startswith("--") or str(path) in msg or gone or Path(named).exists():
        return exc
    out = type(exc).__new__(type(exc))   # not copy.copy: it calls __init__ again, which an
    out.__dict__.update(exc.__dict__)     # error taking other arguments (OpenVinoError) refused
    out.args = (f"{path}: {msg}",) + exc.args[1:]
    return out


class Terminated(SystemExit):
    """A signal ended the run (SIGTERM: exit code 128 + its number). What turns a pass's errors,
    its ``sys.exit()`` included, into one line lets it through."""


class VerificationError(SlimError):
    """A pass changed the numerics beyond its declared contract, or broke the model."""

    exit_code = 4


#: the keys :func:`warn_once` has warned about in this run (:func:`one_run`)
WARNED: set = set()
_RUNS = [0]   # depth of one_run calls: optimize runs the checks and evaluate inside its own run


def warn_once(logger: Any, key: Any, msg: str, *args: Any) -> None:
    """``logger.warning(msg, *args)`` the first time ``key`` comes in this run: a run opens
    sessions, lists folders and scores models many times, and one warning says it."""
    if key not in WARNED:
        WARNED.add(key)
        logger.warning(msg, *args)


def one_run(fn: Any) -> Any:
    """Make ``fn`` (optimize, evaluate, run_checks) one run for :func:`warn_once`, a call inside
    another run part of that one. The keys were kept for the process: a script that optimized two
    models was not told the second one's problem (a box order, sub-folder images) when the first
    had the same."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not _RUNS[0]:
            WARNED.clear()
        _RUNS[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _RUNS[0] -= 1
    return run


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -------------------------------------------------------------------------------------- contracts
class Numerics(str, enum.Enum):
    """What a pass promises about model outputs.

    EXACT: equal up to float summation order. TOLERANCE: within a stated bound.
    LOSSY: changes outputs; the cost is measured and reported, and a floor is enforced.
    """

    EXACT = "exact"
    TOLERANCE = "tolerance"
    LOSSY = "lossy"


@dataclass(frozen=True)
class Tolerances:
    """Numeric bounds the manager enforces. They live here, never as literals in passes.

    A comparison passes when ``max|a-b| <= atol + rtol * max|ref| + noise_factor * noise`` per
    output (EXACT/TOLERANCE), where ``noise`` is the difference onnxruntime's own graph
    optimizations make on the reference (float summation order); for LOSSY when every output's
    cosine similarity is at least ``lossy_min_cosine``.
    """

    exact_rtol: float = 1e-4
    exact_atol: float = 1e-5
    tolerance_rtol: float = 1e-2
    tolerance_atol: float = 1e-4
    lossy_min_cosine: float = 0.90
    noise_factor: float = 4.0


@dataclass(frozen=True)
class PassContext:
    """Everything a pass may read besides the model. Frozen: passes never change it.

    ``options`` maps a pass name to that pass's options (a plain dict).
    ``calib_inputs`` is a sequence of preprocessed input batches (dict input name -> array)
    or ``None``; passes that need data must say so in ``requires``.
    """

    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    calib_inputs: Optional[Sequence[Dict[str, np.ndarray]]] = None
    tolerances: Tolerances = field(default_factory=Tolerances)
    seed: int = 0
    dump_dir: Optional[Path] = None
    input_shapes: Mapping[str, Tuple[int, ...]] = field(default_factory=dict)
    #: False: ``input_shapes`` is only the size passes verify at; the model keeps its dynamic dims
    fix_input_shapes: bool = True
    verify: bool = True
    verify_samples: int = 2

    def opts(self, pass_name: str) -> Mapping[str, Any]:
        """Options for one pass (empty mapping if none were given)."""
        return self.options.get(pass_name, {})

    def opt(self, pass_name: str, key: str, default: Any = None) -> Any:
        return self.opts(pass_name).get(key, default)


# --------------------------------------------------------------------------------------- reports
@dataclass
class PassReport:
    """JSON-able account of what a pass did.

    counts: numbers (matches found, rewritten, nodes removed ...).
    skipped: one entry per match that was not rewritten, ``{"node": name, "reason": text}``.
    details: anything else (per-layer channels, per-tensor calibration choice ...).
    """

    counts: Dict[str, int] = field(default_factory=dict)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    details: Dict[str, Any] = field(default_factory=dict)
    _said: set = field(default_factory=set, repr=False, compare=False)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def skip(self, node: str, reason: str) -> None:
        """One entry per node and reason: a pass that looks again (canonicalize's fold rounds)
        listed the same refusal once a round."""
        if (node, reason) not in self._said:
            self._said.add((node, reason))
            self.skipped.append({"node": node, "reason": reason})

    def to_dict(self) -> Dict[str, Any]:
        return {"counts": dict(self.counts), "skipped": list(self.skipped), "details": self.details}


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    report: PassReport = field(default_factory=PassReport)


# ------------------------------------------------------------------------------------------ pass
class Pass:
    """Base class of every pass.

    Subclasses set ``name`` (kebab-case, stable), ``numerics`` and ``after`` (names of passes
    that must run first when both are scheduled), and implement ``run``. ``requires`` raises
    :class:`PreconditionError` when the model cannot be handled at all; per-match refusals go into
    the report instead. ``ensures`` checks postconditions and raises :class:`VerificationError`.
    """

    name: ClassVar[str] = ""
    numerics: ClassVar[Numerics] = Numerics.EXACT
    after: ClassVar[Tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    #: minimum opset the pass output needs; the manager upgrades the model first when lower.
    min_opset: ClassVar[int] = 0
    #: True when the pass is part of ``optimize`` without being asked for.
    default_enabled: ClassVar[bool] = True
    #: the keys of ``ctx.options[name]`` the pass reads: the manager refuses others before any
    #: pass runs (a misspelt option was ignored). None: not declared, nothing checked.
    option_names: ClassVar[Optional[Tuple[str, ...]]] = None

    def requires(self, model: onnx.ModelProto, ctx: PassContext) -> None:  # pragma: no cover
        return None

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: onnx.ModelProto, ctx: PassContext) -> None:  # pragma: no cover
        return None

    def tolerances(self, ctx: PassContext) -> Tolerances:
        """The bounds this pass is held to (override for a pass-specific TOLERANCE bound)."""
        return ctx.tolerances

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} ({self.numerics.value})>"
