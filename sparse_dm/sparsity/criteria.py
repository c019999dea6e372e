"""Prune and grow criteria: plain score functions of one `ScoreContext`, kept in registries.

A criterion maps the context of one weight at one mask update (its values, dense gradient, the
engine's running average of dense gradients, mask, optimizer state, step, generator) to a score per
position; higher means "keep" for pruning and
"grow first" for growth. A new criterion is one registered function plus one config line
(`method.prune` / `method.grow` are validated against these registries).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class ScoreContext:
    """What a criterion may look at for one prunable weight at one mask update.

    `grad` is the dense (unmasked) gradient of the update step, kept only for criteria with
    `needs_grad`; `grad_ema` is an exponential moving average of the dense gradient over every step
    (beta: `method.grad_ema_beta`), kept only for criteria with `needs_grad_ema`: the optimizer's own
    moments are zero at inactive positions, since their gradients are masked before each step;
    `optimizer_state` is the optimizer's per-parameter state (e.g. AdamW's exp_avg),
    None when the engine was given no optimizer or the optimizer has no state for it yet.
    """

    weight: Tensor
    mask: Tensor
    step: int
    generator: torch.Generator
    grad: Tensor | None = None
    optimizer_state: Mapping[str, Any] | None = None
    grad_ema: Tensor | None = None


ScoreFn = Callable[[ScoreContext], Tensor]


@dataclass(frozen=True)
class Criterion:
    score: ScoreFn
    needs_grad: bool
    needs_grad_ema: bool = False


PRUNE_CRITERIA: dict[str, Criterion] = {}
GROW_CRITERIA: dict[str, Criterion] = {}


def register(
    registry: dict[str, Criterion], name: str, needs_grad: bool = False, needs_grad_ema: bool = False
):
    """Decorator adding a score function to a criterion registry."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        registry[name] = Criterion(fn, needs_grad, needs_grad_ema)
        return fn

    return wrap


def get(registry: dict[str, Criterion], name: str, key: str) -> Criterion:
    if name not in registry:
        raise ValueError(f"{key}={name!r}; allowed: one of {sorted(registry)}")
    return registry[name]


@register(PRUNE_CRITERIA, "magnitude")
def magnitude(ctx: ScoreContext) -> Tensor:
    """Keep the largest |w| (RigL, SET, MagRan)."""
    return ctx.weight.detach().abs()


@register(GROW_CRITERIA, "gradient", needs_grad=True)
def gradient(ctx: ScoreContext) -> Tensor:
    """Grow where the dense gradient is largest (RigL)."""
    if ctx.grad is None:
        raise ValueError("gradient growth needs the dense gradient of the update step")
    return ctx.grad.abs()


@register(GROW_CRITERIA, "momentum", needs_grad_ema=True)
def momentum(ctx: ScoreContext) -> Tensor:
    """Grow where the running average of the dense gradient is largest (sparse_learning's momentum
    growth): persistent directions win over one step's noise."""
    if ctx.grad_ema is None:
        raise ValueError("momentum growth needs the engine's dense-gradient average")
    return ctx.grad_ema.abs()


@register(GROW_CRITERIA, "random")
def random(ctx: ScoreContext) -> Tensor:
    """Grow uniformly at random (SET, MagRan). Drawn on CPU so every rank draws the same numbers."""
    return torch.rand(ctx.weight.shape, generator=ctx.generator).to(ctx.weight.device)


def top_k_mask(scores: Tensor, eligible: Tensor, k: int) -> Tensor:
    """Bool mask of the k highest-scoring eligible positions; exact ties go to the lowest flat index.

    One `topk` for the threshold and one pass over the tied values: O(n), no full sort, and the
    result never depends on the kernel's tie order.
    """
    flat_scores = scores.flatten().float()
    flat_eligible = eligible.flatten()
    chosen = torch.zeros_like(flat_eligible)
    if k <= 0:
        return chosen.view_as(eligible)
    n_eligible = int(flat_eligible.sum())
    if k > n_eligible:
        raise ValueError(f"cannot select {k} of {n_eligible} eligible positions")
    masked = flat_scores.masked_fill(~flat_eligible, float("-inf"))
    threshold = torch.topk(masked, k, sorted=False).values.min()
    above = flat_eligible & (masked > threshold)
    chosen |= above
    missing = k - int(above.sum())
    tied = (flat_eligible & (masked == threshold)).nonzero().flatten()[:missing]
    chosen[tied] = True
    return chosen.view_as(eligible)
