"""SparseEngine: exact sparse-to-sparse training for any nn.Module and any training loop.

engine = SparseEngine(model, sparsity=0.5, grow="gradient", update_interval=800)
loss.backward()
engine.before_step()            # after AMP unscaling, before clipping
clip_grad_norm_(model.parameters(), 1.0)
optimizer.step()
engine.after_step(optimizer)    # re-mask; every Te steps prune + grow + reset optimizer state

With an EMA of the weights, `sparse_dm.sparsity.step.SparseStep` runs these calls (and the EMA's)
in the one valid order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from sparse_dm.sparsity import criteria
from sparse_dm.sparsity.adaptive import AdaptivePruneRate
from sparse_dm.sparsity.batched import IntMasks
from sparse_dm.sparsity.distributions import layer_counts
from sparse_dm.sparsity.explorer import LayerUpdate, explore, reset_optimizer_state, update_generator
from sparse_dm.sparsity.masks import PrunableWeight, find_prunable, random_mask, register_masks
from sparse_dm.sparsity.schedule import UpdateSchedule

INIT_UPDATE_INDEX = -1  # the generator index used for the initial random masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateReport:
    """What one exploration did, for logging. `skipped` names why a due update did not happen."""

    step: int
    update_index: int
    drop_fraction: float
    layers: list[LayerUpdate]
    exploration_rate: float
    skipped: str | None = None


class EmptyLayerError(ValueError):
    """A sparsity budget that leaves a prunable layer without a single active weight."""


def check_layer_budget(names: Sequence[str], counts: Sequence[int]) -> None:
    """Refuse layer counts that cut a layer off entirely (its output would be constant)."""
    empty = [name for name, count in zip(names, counts, strict=True) if count == 0]
    if empty:
        raise EmptyLayerError(
            f"this sparsity leaves {len(empty)} prunable layer(s) with 0 active weights: {', '.join(empty)}; "
            "lower `sparsity`, use method.distribution=erk, or keep them dense with method.exclude"
        )


def frozen_layers(
    names: Sequence[str], counts: Sequence[int], numels: Sequence[int], rate: float
) -> list[str]:
    """Sparse layers where floor(p * active) = 0: an update can never replace a weight there."""
    return [
        name
        for name, count, numel in zip(names, counts, numels, strict=True)
        if count < numel and math.floor(rate * count) == 0
    ]


def check_grad_ema_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta < 1.0:
        raise ValueError(f"method.grad_ema_beta={beta!r}; allowed: a number in [0, 1)")


class SparseEngine:
    """Owns the masks of one model: init (uniform/ER/ERK, exact counts), gradient masking,
    re-masking after each optimizer step, and periodic prune/grow (dynamic methods only).

    `grow=None` means static sparsity: masks never change after init.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        distribution: str = "erk",
        prune: str = "magnitude",
        grow: str | None = None,
        prune_rate: float = 0.5,
        update_interval: int = 100,
        schedule: str = "constant",
        end_step: int | None = None,
        end_fraction: float | None = None,
        seed: int = 0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        grad_ema_beta: float = 0.9,
        name: str = "sparse",
        adaptive: AdaptivePruneRate | None = None,
    ) -> None:
        self._configure(model, prune, grow, prune_rate, update_interval, schedule, end_step, end_fraction,
                        seed, include, exclude, grad_ema_beta, name, adaptive)  # fmt: skip
        self.sparsity = sparsity
        self.target_counts = layer_counts(
            [tuple(w.param.shape) for w in self.weights], sparsity, distribution
        )
        names = [w.name for w in self.weights]
        numels = [w.param.numel() for w in self.weights]
        check_layer_budget(names, self.target_counts)
        if self.grow is not None and (stuck := frozen_layers(names, self.target_counts, numels, prune_rate)):
            log.warning(
                "prune_rate=%s replaces no weight in %d layer(s) with fewer than 1/p active weights; "
                "they keep their initial mask: %s",
                prune_rate,
                len(stuck),
                ", ".join(stuck),
            )
        generator = update_generator(seed, INIT_UPDATE_INDEX)
        masks = [
            random_mask(w.param.shape, c, generator)
            for w, c in zip(self.weights, self.target_counts, strict=True)
        ]
        register_masks(self.weights, masks)
        self._start_counters([m.clone() for m in masks])
        needs_average = self.grow is not None and self.grow.needs_grad_ema
        self.grad_ema: list[Tensor] | None = (
            [torch.zeros_like(w.param, memory_format=torch.contiguous_format) for w in self.weights]
            if needs_average
            else None
        )

    def _configure(
        self,
        model: nn.Module,
        prune: str,
        grow: str | None,
        prune_rate: float,
        update_interval: int,
        schedule: str,
        end_step: int | None,
        end_fraction: float | None,
        seed: int,
        include: Sequence[str] | None,
        exclude: Sequence[str],
        grad_ema_beta: float,
        name: str,
        adaptive: AdaptivePruneRate | None,
    ) -> None:
        """Settings shared by every engine (single-mask and timestep-band): weights, criteria, schedule."""
        check_grad_ema_beta(grad_ema_beta)
        self.name = name
        self.adaptive = adaptive
        self.weights: list[PrunableWeight] = find_prunable(model, include, exclude)
        self.prune = criteria.get(criteria.PRUNE_CRITERIA, prune, "method.prune")
        self.grow = criteria.get(criteria.GROW_CRITERIA, grow, "method.grow") if grow else None
        self.schedule = UpdateSchedule(update_interval, prune_rate, schedule, end_step, end_fraction)
        self.seed = seed
        self.grad_ema_beta = grad_ema_beta
        self._int_masks = IntMasks()  # the per-step masking as multi-tensor ops (sparsity/batched.py)

    def _start_counters(self, ever_active: list[Tensor]) -> None:
        """Step, update and skip counters, exploration history and per-step flags of a fresh run."""
        self.step = 0
        self.num_updates = 0
        self.skipped_updates = 0
        self.ever_active: list[Tensor] = ever_active
        self._dense_grads: list[Tensor | None] | None = None
        self._nonfinite_grads = False
        self._missing_grads = False
        self.last_report: UpdateReport | None = None

    @property
    def dynamic(self) -> bool:
        return self.grow is not None

    def observe_loss(self, loss: float) -> None:
        """The training loss of one optimizer step (the signal of `method.adaptive`; else unused)."""
        if self.adaptive is not None:
            self.adaptive.observe(loss)

    def drop_fraction(self, step: int) -> float:
        """p of the update at `step`: the schedule's, scaled by the adaptive rule if configured (which
        closes the rule's loss window: call it once per update that happens)."""
        scheduled = self.schedule.drop_fraction(step)
        return scheduled if self.adaptive is None else self.adaptive.rate(step, scheduled)

    def due_update_rate(self, step_skipped: bool) -> tuple[float, str | None]:
        """(p, why it is skipped or None) of the update due now. A skipped update reports the
        schedule's p and leaves the adaptive rule untouched: its loss window runs on to the next
        update that happens."""
        reason = self._skip_reason(step_skipped)
        if reason is not None:
            return self.schedule.drop_fraction(self.step), reason
        return self.drop_fraction(self.step), None

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of inactive weights (NaN and inf too), one multi-tensor op."""
        self._int_masks.zero_outside([w.param.grad for w in self.weights], [w.mask for w in self.weights])

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Set every weight outside its mask to exactly +0.0, one multi-tensor op."""
        self._int_masks.zero_outside([w.param.data for w in self.weights], [w.mask for w in self.weights])

    @property
    def checked_masks(self) -> Sequence[PrunableWeight]:
        """The masks data-parallel ranks must agree on."""
        return self.weights

    def reduce_across_ranks(self, reduce: Callable[..., Tensor]) -> None:
        """Data parallelism, after `before_step`: agree on what growth scores beyond the parameter
        gradients (DDP already averages those). One mask needs nothing; see BandedSparseEngine."""

    def update_due(self, step: int) -> bool:
        return self.dynamic and self.schedule.is_update_step(step)

    def set_total_steps(self, total_steps: int) -> None:
        """Tell the engine how long the run is, so updates stop at method.end_fraction / end_step
        and never land on the final step."""
        self.schedule = replace(self.schedule, total_steps=int(total_steps))

    @torch.no_grad()
    def _update_grad_ema(self) -> None:
        """m <- beta m + (1 - beta) g from the dense gradient, every step; a step without gradients
        (dropped by the non-finite guard) or with non-finite ones (AMP overflow: the optimizer
        skips it too) leaves the average unchanged."""
        assert self.grad_ema is not None
        grads = [w.param.grad for w in self.weights]
        if any(g is None for g in grads):
            return
        if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return
        torch._foreach_lerp_(self.grad_ema, grads, 1.0 - self.grad_ema_beta)

    @torch.no_grad()
    def before_step(self, grad_scale: float = 1.0) -> None:
        """Call when gradients are final (unscaled, accumulated) and before clipping/step
        (`grad_scale`: the AMP loss scale, which only gradients captured outside the parameters
        carry; one mask reads the unscaled parameter gradients). The
        dense gradient first feeds the gradient average (criteria with `needs_grad_ema`); at an
        update step it is kept, for gradient-based growth, and checked for non-finite values (an
        AMP overflow step: the scaler skips it, the update must too) or absence (a step dropped by
        the non-finite loss guard); then the gradients of inactive weights are zeroed."""
        if self.grad_ema is not None:
            self._update_grad_ema()
        if self.update_due(self.step + 1):
            grads = [w.param.grad for w in self.weights if w.param.grad is not None]
            self._missing_grads = not grads
            self._nonfinite_grads = bool(grads) and not bool(
                torch.stack([torch.isfinite(g).all() for g in grads]).all()
            )
            if self.grow is not None and self.grow.needs_grad:
                self._dense_grads = [
                    None if w.param.grad is None else w.param.grad.detach().clone() for w in self.weights
                ]
        self.mask_gradients()

    def _skip_reason(self, step_skipped: bool) -> str | None:
        if step_skipped:
            return "optimizer step skipped"
        if self._missing_grads:
            return "no gradient (step dropped)"
        if self._nonfinite_grads:
            return "non-finite gradient"
        if not all(bool(torch.isfinite(w.param).all()) for w in self.weights):
            return "non-finite weights"
        return None

    @torch.no_grad()
    def after_step(
        self, optimizer: torch.optim.Optimizer | None = None, step_skipped: bool = False
    ) -> UpdateReport | None:
        """Call right after `optimizer.step()`: `remask()` then `explore_if_due()`."""
        self.remask()
        return self.explore_if_due(optimizer, step_skipped)

    @torch.no_grad()
    def remask(self) -> None:
        """Count the optimizer step just taken and zero the inactive weights (exact counts)."""
        self.step += 1
        self.apply_masks()

    @torch.no_grad()
    def explore_if_due(
        self, optimizer: torch.optim.Optimizer | None = None, step_skipped: bool = False
    ) -> UpdateReport | None:
        """On update steps (after `remask`) explore and reset the optimizer state of every changed
        position. A due update is skipped (counted, reported) when the step was skipped or a
        gradient or weight is non-finite: growth scores would be meaningless and a layer could be
        pruned without being regrown. A skipped update does not consume a window of the adaptive
        prune rate."""
        if not self.update_due(self.step):
            return None
        assert self.grow is not None
        drop, reason = self.due_update_rate(step_skipped)
        self._nonfinite_grads = self._missing_grads = False
        if reason is not None:
            self._dense_grads = None
            self.skipped_updates += 1
            log.warning("%s mask update at step %d skipped: %s", self.name, self.step, reason)
            self.last_report = UpdateReport(
                self.step, self.num_updates, drop, [], self.exploration_rate(), reason
            )
            return self.last_report
        if self.grow.needs_grad and self._dense_grads is None:
            raise RuntimeError("gradient growth needs before_step() to run before the optimizer step")
        generator = update_generator(self.seed, self.num_updates)
        updates, changed = explore(
            self.weights,
            drop,
            self.prune,
            self.grow,
            generator,
            self._dense_grads,
            optimizer,
            self.step,
            self.grad_ema,
        )
        self._dense_grads = None
        if optimizer is not None:
            reset_optimizer_state(optimizer, self.weights, changed)
        for seen, weight in zip(self.ever_active, self.weights, strict=True):
            seen |= weight.mask.to(seen.device)
        self.num_updates += 1
        self.last_report = UpdateReport(
            self.step, self.num_updates - 1, drop, updates, self.exploration_rate()
        )
        return self.last_report

    def exploration_rate(self) -> float:
        """Fraction of prunable weights that were active at any point so far."""
        total = sum(m.numel() for m in self.ever_active)
        return float(sum(int(m.sum()) for m in self.ever_active)) / total

    def layer_stats(self) -> list[dict]:
        """Per layer: active connections from the mask (`nnz`), its target, and nonzero values."""
        return [
            {
                "name": w.name,
                "shape": list(w.param.shape),
                "numel": w.param.numel(),
                "nnz": int(w.mask.sum()),
                "target_nnz": target,
                "nonzero": int(torch.count_nonzero(w.param.detach())),
                "density": int(w.mask.sum()) / w.param.numel(),
            }
            for w, target in zip(self.weights, self.target_counts, strict=True)
        ]

    def state_dict(self) -> dict:
        """Counters, the exploration history and the gradient average (when a criterion uses it);
        masks themselves live in the model's state_dict."""
        state = {
            "step": self.step,
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "ever_active": [m.cpu() for m in self.ever_active],
            **({"adaptive": self.adaptive.state_dict()} if self.adaptive is not None else {}),
        }
        if self.grad_ema is not None:
            state["grad_ema"] = [m.cpu() for m in self.grad_ema]
        return state

    def check_masks(self) -> None:
        """Fail loudly if the masks on the model (e.g. just loaded from a checkpoint) do not hold the
        counts this engine's config implies, instead of silently training a different sparsity."""
        for weight, target in zip(self.weights, self.target_counts, strict=True):
            nnz = int(weight.mask.sum())
            if nnz != target:
                raise ValueError(
                    f"{weight.name}: the mask has {nnz} active weights but sparsity={self.sparsity} implies "
                    f"{target}; resume with the run's own config "
                    "(sparsity, method.distribution, method.include/exclude)"
                )

    def load_state_dict(self, state: dict) -> None:
        self.check_masks()
        self.step = int(state["step"])
        self.num_updates = int(state["num_updates"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.ever_active = [m.clone().to(torch.bool) for m in state["ever_active"]]
        if self.grad_ema is not None:
            if "grad_ema" not in state:
                raise ValueError(
                    "this method's growth criterion needs the dense-gradient average, which the "
                    "checkpoint does not hold; resume with the run's own method.grow"
                )
            for average, saved in zip(self.grad_ema, state["grad_ema"], strict=True):
                average.copy_(saved)
        if self.adaptive is not None:
            if "adaptive" not in state:
                raise ValueError(
                    "the checkpoint has no adaptive prune-rate state; resume with method.adaptive=null"
                )
            self.adaptive.load_state_dict(state["adaptive"])
