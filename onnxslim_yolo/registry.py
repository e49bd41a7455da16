"""The pass registry: an explicit tuple of built-in passes plus entry-point plugins.

No registration by import side effect: a pass is built in because it is listed here, and a
third-party pass is found through the ``onnxslim_yolo.passes`` entry-point group.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Tuple, Type

from .pass_base import Pass, UsageError

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


def plugin_passes() -> List[Type[Pass]]:
    """Passes that other packages declare under the entry-point group."""
    from importlib.metadata import entry_points

    found: List[Type[Pass]] = []
    try:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10
        eps = entry_points().get(ENTRY_POINT_GROUP, [])  # type: ignore[attr-defined]
    for ep in eps:
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plugin must not take the tool down
            log.warning("pass plugin %s could not be loaded: %s", ep.name, exc)
            continue
        if isinstance(cls, type) and issubclass(cls, Pass) and cls.name:
            found.append(cls)
        else:
            log.warning("entry point %s is not a Pass subclass with a name; ignored", ep.name)
    return found


def all_passes() -> Dict[str, Type[Pass]]:
    """Name -> pass class, built-ins first; a plugin cannot shadow a built-in name."""
    table: Dict[str, Type[Pass]] = {}
    for cls in builtin_passes():
        table[cls.name] = cls
    for cls in plugin_passes():
        if cls.name in table:
            log.warning("plugin pass %s shadows a built-in name; ignored", cls.name)
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
