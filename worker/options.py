"""Click parameter types that both front ends use (``tlm`` and ``tlm-worker``): here, so the
worker never imports the CLI."""

from __future__ import annotations

import math
from typing import Any, Optional

import click


class FiniteRange(click.FloatRange):
    """A float range that also refuses nan and inf (which compare false with any bound)."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number
