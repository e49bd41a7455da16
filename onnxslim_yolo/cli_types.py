"""Click parameter types the commands share."""
from __future__ import annotations

import math
from typing import Any, Optional

import click


class Number(click.FloatRange):
    """A float within a range, NaN refused: click's FloatRange lets NaN through (every comparison
    with it is false), and a NaN floor or limit then passes every check."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        rv = super().convert(value, param, ctx)
        if isinstance(rv, float) and math.isnan(rv):
            self.fail(f"{value!r} is not a number", param, ctx)
        return rv
