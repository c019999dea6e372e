"""Phase-adaptive exploration: the prune rate p follows how fast the training loss still falls.

The paper (Sec. 4.5) suggests adapting DST hyperparameters to the training phase. Rule, applied at
every mask update u (bounded, deterministic, fully restored from checkpoints):

    e_n   = d * e_(n-1) + (1 - d) * loss_n        EMA of the training loss over optimizer steps (e_1 = loss_1)
    r_u   = (a_u - e_n) / a_u                     relative decrease since the previous update, whose EMA
                                                  was a_u (the first window starts at e_1)
    r_max = max(r_1, ..., r_u)
    p_u   = clip(p_sched * max(r_u, 0) / r_max, p_min, p_sched)

p_sched is the schedule's p at that step (constant: the configured p). So p stays at p_sched while
the loss falls as fast as it ever did, shrinks in proportion as learning slows (a measured version
of RigL's cosine decay), and sits at p_min when the loss stops falling or rises. Before any window
has shown a decrease (r_max <= 0) p = p_sched.
"""

from __future__ import annotations

import math
from typing import Any

DECAY_KEY = "method.adaptive.loss_ema_decay"
MIN_RATE_KEY = "method.adaptive.min_prune_rate"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class AdaptivePruneRate:
    """The rule of the module docstring. `observe` every optimizer step, `rate` at every due update."""

    def __init__(self, loss_ema_decay: float, min_prune_rate: float) -> None:
        """Refuses values outside their ranges, naming the config key. That min_prune_rate is at
        most the configured prune_rate is a rule between keys (config.check_cross_key_rules)."""
        if not _is_number(loss_ema_decay) or not 0.0 <= loss_ema_decay < 1.0:
            raise ValueError(f"{DECAY_KEY}={loss_ema_decay!r}; allowed: a number in [0, 1)")
        if not _is_number(min_prune_rate) or not 0.0 < min_prune_rate <= 1.0:
            raise ValueError(f"{MIN_RATE_KEY}={min_prune_rate!r}; allowed: a number in (0, prune_rate]")
        self.decay = float(loss_ema_decay)
        self.min_rate = float(min_prune_rate)
        self.loss_ema: float | None = None
        self.anchor: float | None = None  # the loss EMA at the previous update (window start)
        self.peak_decrease: float | None = None
        self.history: list[dict[str, float]] = []  # {step, prune_rate, loss_decrease} per update

    def observe(self, loss: float) -> None:
        """Fold one optimizer step's training loss into the EMA (non-finite losses are ignored: their
        step is skipped by the non-finite guard)."""
        if not math.isfinite(loss):
            return
        self.loss_ema = (
            loss if self.loss_ema is None else self.decay * self.loss_ema + (1 - self.decay) * loss
        )
        if self.anchor is None:
            self.anchor = self.loss_ema

    def rate(self, step: int, scheduled: float) -> float:
        """The prune rate of the update at `step`, given the schedule's rate there."""
        if self.loss_ema is None or self.anchor is None:
            raise RuntimeError("the adaptive prune rate needs the training loss: call observe() every step")
        decrease = (self.anchor - self.loss_ema) / abs(self.anchor) if self.anchor else 0.0
        self.peak_decrease = decrease if self.peak_decrease is None else max(self.peak_decrease, decrease)
        rate = scheduled if self.peak_decrease <= 0 else scheduled * max(decrease, 0.0) / self.peak_decrease
        rate = min(max(rate, self.min_rate), scheduled)
        self.anchor = self.loss_ema
        self.history.append({"step": float(step), "prune_rate": rate, "loss_decrease": decrease})
        return rate

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_ema": self.loss_ema,
            "anchor": self.anchor,
            "peak_decrease": self.peak_decrease,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_ema = state["loss_ema"]
        self.anchor = state["anchor"]
        self.peak_decrease = state["peak_decrease"]
        self.history = [dict(h) for h in state["history"]]
