"""What calibration saves: statistics per tensor and the chosen ranges, to and from JSON."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import ir
from ..pass_base import UsageError
from .histogram import TensorStats
from .qparams import qrange, scale_zero_point

PathLike = Union[str, os.PathLike]
TABLE_FORMAT = "onnxslim-yolo/calibration-table/1"
STATS_FORMAT = "onnxslim-yolo/calibration-stats/1"


@dataclass(frozen=True)
class RangeEntry:
    """The range of one tensor: ``rmin <= 0 <= rmax``; ``errors`` maps method -> expected MSE."""

    rmin: float
    rmax: float
    method: str
    errors: Dict[str, float] = field(default_factory=dict)
    #: name of the group whose union range replaced this tensor's own (see force_same_range)
    shared: Optional[str] = None


@dataclass
class CalibrationTable(Mapping[str, RangeEntry]):
    """Mapping tensor name -> :class:`RangeEntry`, for one quantized type and symmetry."""

    entries: Dict[str, RangeEntry] = field(default_factory=dict)
    qdtype: str = "uint8"
    symmetric: bool = False
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        qrange(self.qdtype, self.symmetric)

    def __getitem__(self, name: str) -> RangeEntry:
        return self.entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def scale_zero_point(self, name: str) -> Tuple[np.float32, int]:
        """(scale, zero point) of one tensor for this table's type and symmetry."""
        e = self.entries[name]
        return scale_zero_point(e.rmin, e.rmax, self.qdtype, self.symmetric)

    def methods(self) -> Dict[str, int]:
        """How many tensors each method won (for reports)."""
        out: Dict[str, int] = {}
        for e in self.entries.values():
            out[e.method] = out.get(e.method, 0) + 1
        return out

    # ----------------------------------------------------------------------------- JSON
    def to_dict(self) -> Dict[str, Any]:
        return {"format": TABLE_FORMAT, "qdtype": self.qdtype, "symmetric": self.symmetric,
                "meta": self.meta, "tensors": {k: asdict(v) for k, v in self.entries.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "calibration table") -> "CalibrationTable":
        _check_format(d, source, "a calibration table", TABLE_FORMAT)
        try:
            entries = {k: RangeEntry(rmin=float(v["rmin"]), rmax=float(v["rmax"]), method=str(v["method"]),
                                     errors={m: float(e) for m, e in v.get("errors", {}).items()},
                                     shared=v.get("shared"))
                       for k, v in d["tensors"].items()}
            table = cls(entries, str(d["qdtype"]), bool(d["symmetric"]), dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{source}: malformed calibration table ({type(exc).__name__}: {exc})") from None
        for k, e in entries.items():   # NaN wrote scale 1, inf wrote scale inf, an inverted range ran
            if not (np.isfinite(e.rmin) and np.isfinite(e.rmax) and e.rmin <= e.rmax):
                raise UsageError(f"{source}: tensor '{k}' has range [{e.rmin}, {e.rmax}]; a range must be "
                                 "finite, its minimum at most its maximum")
        return table

    def to_json(self, path: PathLike) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: PathLike) -> "CalibrationTable":
        return cls.from_dict(read_json(path), str(path))


def _check_format(d: Any, source: str, what: str, fmt: str) -> None:
    """A UsageError naming ``source`` unless ``d`` (read from JSON) is an object of format ``fmt``."""
    found = f"format {d.get('format')!r}" if isinstance(d, Mapping) else f"a JSON {type(d).__name__}"
    if not isinstance(d, Mapping) or d.get("format") != fmt:
        raise UsageError(f"{source}: not {what} ({found}, expected format {fmt!r})")


@dataclass
class CalibrationStats(Mapping[str, TensorStats]):
    """Streaming statistics per tensor, plus the tensors that could not be calibrated and why."""

    tensors: Dict[str, TensorStats]
    samples: int = 0
    bins: int = 2048
    skipped: Dict[str, str] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def to_dict(self) -> Dict[str, Any]:
        return {"format": STATS_FORMAT, "samples": self.samples, "bins": self.bins,
                "skipped": dict(self.skipped), "meta": dict(self.meta),
                "tensors": {k: v.to_dict() for k, v in self.tensors.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "calibration statistics") -> "CalibrationStats":
        _check_format(d, source, "calibration statistics", STATS_FORMAT)
        try:
            tensors = {k: TensorStats.from_dict(k, v) for k, v in d["tensors"].items()}
            return cls(tensors, int(d["samples"]), int(d["bins"]), dict(d.get("skipped", {})),
                       dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{source}: malformed calibration statistics "
                             f"({type(exc).__name__}: {exc})") from None

    def to_json(self, path: PathLike):
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: PathLike) -> "CalibrationStats":
        return cls.from_dict(read_json(path), str(path))


def force_same_range(table: CalibrationTable, groups: Iterable[Sequence[str]]) -> CalibrationTable:
    """A copy of ``table`` where every tensor of a group gets the union of the group's ranges.

    Groups sharing a tensor are merged (a Concat output that is another Concat's input). Used for
    Concat inputs and output, which must share one scale to run as a requantization-free copy.
    """
    parent: Dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for group in groups:
        names = list(group)
        for n in names:
            if n not in table.entries:
                raise UsageError(f"force_same_range: tensor '{n}' has no calibration entry")
        for n in names[1:]:
            parent[find(n)] = find(names[0])
    members: Dict[str, list] = {}
    for n in list(parent):
        members.setdefault(find(n), []).append(n)
    entries = dict(table.entries)
    for root, names in members.items():
        if len(names) < 2:
            continue
        lo = min(entries[n].rmin for n in names)
        hi = max(entries[n].rmax for n in names)
        for n in names:
            entries[n] = replace(entries[n], rmin=lo, rmax=hi, shared=root)
    return CalibrationTable(entries, table.qdtype, table.symmetric, dict(table.meta))


# ------------------------------------------------------------------------------ files
def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json_atomic(path: PathLike, payload: Mapping[str, Any]) -> Path:
    """Compact JSON, written atomically (``ir.write_json``)."""
    return ir.write_json(path, _jsonable(payload))


def read_json(path: PathLike) -> Dict[str, Any]:
    p = Path(path)
    try:
        with open(p) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{p}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{p}: not readable JSON ({type(exc).__name__}: {exc})") from None
