"""When masks are updated and what fraction of active weights is replaced."""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class UpdateSchedule:
    """Mask updates every `interval` optimizer steps (the paper's Te), replacing `prune_rate` (p) of
    each layer's active weights: constant (the paper) or cosine-decayed to 0 at the stop step (RigL).

    Updates stop at `stop_step`: the earliest of an explicit `end_step`, `floor(end_fraction *
    total_steps)` (RigL stops at 75% of training) and the final step itself, so a run never ends
    on weights that an update has just set to zero. `total_steps` is known once training starts.
    """

    interval: int
    prune_rate: float
    kind: str = "constant"
    end_step: int | None = None
    end_fraction: float | None = None
    total_steps: int | None = None

    def __post_init__(self) -> None:
        """The one check of these keys (config validation builds a schedule to run it early)."""
        if not _is_int(self.interval) or self.interval < 1:
            raise ValueError(f"update_interval={self.interval!r}; allowed: an integer >= 1")
        if not _is_number(self.prune_rate) or not 0.0 < self.prune_rate <= 1.0:
            raise ValueError(f"prune_rate={self.prune_rate!r}; allowed: a number in (0, 1]")
        if self.kind not in SCHEDULES:
            raise ValueError(f"method.schedule={self.kind!r}; allowed: one of {SCHEDULES}")
        if self.end_step is not None and (not _is_int(self.end_step) or self.end_step < 1):
            raise ValueError(f"method.end_step={self.end_step!r}; allowed: null or an integer >= 1")
        if self.end_fraction is not None and (
            not _is_number(self.end_fraction) or not 0.0 < self.end_fraction <= 1.0
        ):
            raise ValueError(
                f"method.end_fraction={self.end_fraction!r}; allowed: null or a number in (0, 1]"
            )
        if self.kind == "cosine" and self.end_step is None and self.end_fraction is None:
            raise ValueError(
                "method.schedule=cosine decays to 0 at the last update; allowed: set method.end_fraction "
                "(e.g. 0.75) or method.end_step"
            )

    @property
    def stop_step(self) -> int | None:
        """The first optimizer step with no update (None: unknown run length and no end set)."""
        by_fraction = None
        if self.end_fraction is not None and self.total_steps is not None:
            by_fraction = math.floor(self.end_fraction * self.total_steps)
        candidates = [s for s in (self.end_step, by_fraction, self.total_steps) if s is not None]
        return min(candidates) if candidates else None

    def is_update_step(self, step: int) -> bool:
        """`step` counts completed optimizer steps (1 after the first step)."""
        if step <= 0 or step % self.interval:
            return False
        stop = self.stop_step
        return stop is None or step < stop

    def num_updates(self) -> int | None:
        """Updates in the whole run (None while the run length is unknown)."""
        stop = self.stop_step
        return None if stop is None else (stop - 1) // self.interval

    def drop_fraction(self, step: int) -> float:
        if self.kind == "constant":
            return self.prune_rate
        stop = self.stop_step
        if stop is None:
            raise RuntimeError("the cosine schedule needs the run length: call set_total_steps() first")
        return self.prune_rate * 0.5 * (1.0 + math.cos(math.pi * min(step, stop) / stop))
