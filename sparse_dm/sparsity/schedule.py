"""When masks are updated and what fraction of active weights is replaced."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class UpdateSchedule:
    """Mask updates every `interval` optimizer steps (the paper's Te), replacing `prune_rate` (p) of
    each layer's active weights: constant (the paper) or cosine-decayed to 0 at `end_step` (RigL).
    No update at step 0 or at/after `end_step`."""

    interval: int
    prune_rate: float
    kind: str = "constant"
    end_step: int | None = None

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"update_interval must be >= 1, got {self.interval}")
        if not 0.0 <= self.prune_rate <= 1.0:
            raise ValueError(f"prune_rate must be in [0, 1], got {self.prune_rate}")
        if self.kind not in SCHEDULES:
            raise ValueError(f"method.schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if self.kind == "cosine" and (self.end_step is None or self.end_step < 1):
            raise ValueError("method.end_step must be a positive step count for the cosine schedule")

    def is_update_step(self, step: int) -> bool:
        """`step` counts completed optimizer steps (1 after the first step)."""
        if step <= 0 or step % self.interval:
            return False
        return self.end_step is None or step < self.end_step

    def drop_fraction(self, step: int) -> float:
        if self.kind == "constant":
            return self.prune_rate
        return self.prune_rate * 0.5 * (1.0 + math.cos(math.pi * min(step, self.end_step) / self.end_step))
