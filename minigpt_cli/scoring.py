"""How well a model predicts text, in the units people read: shared by train, eval, inspect and runs.

No torch here: `minigpt runs` lists runs without importing it."""

from __future__ import annotations

import math


def bits_per_char(nats: float) -> float:
    """A loss in nats per character as bits per character (divide by ln 2)."""
    return nats / math.log(2.0)
