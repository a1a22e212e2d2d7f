"""Divergence is more than NaN: a finite loss that has exploded (learning_rate 1e9 gave 4.6e20 and a run
that "finished" at chance) counts like a non-finite one: the micro-batch is skipped and counted, and
max_nonfinite_steps in a row stop the run with exit code 3."""

from __future__ import annotations

import math

# A loss this many times its first value (or above it when the first was below 1) has exploded: the
# losses here (cross-entropy, InfoNCE, KL) start near log(classes) and never legitimately grow 10^4-fold.
EXPLODED_FACTOR = 1e4


class LossGuard:
    def __init__(self):
        self.first: float | None = None

    def ok(self, loss: float) -> bool:
        """False for NaN/inf or an exploded loss. The first finite loss seen (after a resume too) is the scale."""
        if not math.isfinite(loss):
            return False
        if self.first is None:
            self.first = abs(loss)
        return abs(loss) <= EXPLODED_FACTOR * max(self.first, 1.0)
