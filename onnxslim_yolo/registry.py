"""The pass registry: an explicit tuple of built-in passes plus entry-point plugins.

No registration by import side effect: a pass is built in because it is listed here, and a
third-party pass is found through the ``onnxslim_yolo.passes`` entry-point group.
"""
from __future__ import annotations

import functools
import logging
from typing import Dict, List, Tuple, Type

from .pass_base import Numerics, Pass, UsageError, first_line, warn_once

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "onnxslim_yolo.passes"


def _builtin() -> Tuple[Type[Pass], ...]:
    from .passes.canonicalize import Canonicalize
    from .passes.focus_to_conv import FocusToConv
    from .passes.fold_affine import FoldAffine
    from .passes.fold_batchnorm import FoldBatchNorm
    from .passes.insert_qdq import InsertQDQ
    from .passes.merge_branches import MergeBranches
    from .passes.prune_channels import PruneChannels
    from .passes.restore_float16 import RestoreFloat16
    from .passes.upcast_float16 import UpcastFloat16
    return (
        UpcastFloat16,
        Canonicalize,
        FocusToConv,
        FoldBatchNorm,
        FoldAffine,
        MergeBranches,
        PruneChannels,
        InsertQDQ,
        RestoreFloat16,
    )


def builtin_passes() -> Tuple[Type[Pass], ...]:
    return _builtin()


def _plugin_problem(cls: object) -> str:
    """Why an entry point's object cannot serve as a pass, or "" when it can: a Pass subclass
    with a string name and a :class:`Numerics` contract that can be made with no arguments. One
    that could not (a name of 5, numerics "exact", an ``__init__`` taking an argument) broke
    ``onnxslim-yolo passes`` and every unknown-pass message for all passes."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        return "not a Pass subclass"
    if not isinstance(cls.name, str) or not cls.name:
        return f"its name {cls.name!r} is not a non-empty string"
    if not isinstance(cls.numerics, Numerics):
        return f"its numerics {cls.numerics!r} is not a Numerics member"
    try:
        cls()
    except Exception as exc:
        return f"it cannot be made without arguments ({type(exc).__name__}: {first_line(exc)})"
    return ""


@functools.lru_cache(maxsize=1)
def plugin_passes() -> List[Type[Pass]]:
    """Passes that other packages declare under the entry-point group, read once per process
    (each command looked them up several times, and warned each time). A plugin that cannot
    serve is left out with a warning; two plugins of one name are both left out, naming their
    packages (which one won depended on the order the entry points were found in)."""
    from importlib.metadata import entry_points

    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10
        eps = entry_points().get(ENTRY_POINT_GROUP, [])  # type: ignore[attr-defined]
    by_name: Dict[str, List[Tuple[Type[Pass], str]]] = {}
    for ep in eps:
        dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the tool down
            log.warning("pass plugin %s (package %s) could not be loaded: %s", ep.name, dist, exc)
            continue
        why = _plugin_problem(cls)
        if why:
            log.warning("pass plugin %s (package %s) ignored: %s", ep.name, dist, why)
            continue
        by_name.setdefault(cls.name, []).append((cls, dist))
    found: List[Type[Pass]] = []
    for name, entries in by_name.items():
        if len({c for c, _ in entries}) > 1:
            log.warning("pass plugins of packages %s all name themselves '%s': all ignored",
                        ", ".join(sorted({d for _, d in entries})), name)
            continue
        found.append(entries[0][0])
    return found


def all_passes() -> Dict[str, Type[Pass]]:
    """Name -> pass class, built-ins first; a plugin cannot shadow a built-in name."""
    table: Dict[str, Type[Pass]] = {}
    for cls in builtin_passes():
        table[cls.name] = cls
    for cls in plugin_passes():
        if cls.name in table:
            warn_once(log, ("shadows", cls.name), "plugin pass %s (%s) has a built-in pass's name; ignored",
                      cls.name, cls.__module__)
            continue
        table[cls.name] = cls
    return table


def joins_default(cls: Type[Pass]) -> bool:
    """Whether ``cls`` runs in ``optimize`` unasked: a built-in by its ``default_enabled``; a
    plugin only when its own class says ``default_enabled = True`` (it inherits True from Pass,
    and an installed package should not change every run without saying so)."""
    if cls in builtin_passes():
        return bool(cls.default_enabled)
    said = any("default_enabled" in vars(k) for k in cls.__mro__ if k is not Pass)
    return said and bool(cls.default_enabled)


def get(name: str) -> Type[Pass]:
    table = all_passes()
    if name not in table:
        raise UsageError(f"unknown pass '{name}'; known passes: {', '.join(sorted(table))}")
    return table[name]
