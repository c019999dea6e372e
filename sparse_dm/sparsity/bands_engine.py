"""BandedSparseEngine: SparseEngine with one mask per timestep band over each shared weight.

Same call protocol as SparseEngine (before_step, then remask + explore_if_due after the optimizer
step; `SparseStep` orders them, with `reduce_across_ranks` under data parallelism). Per band k
and layer: exact counts nnz(m_k) == target_k after every step; magnitude pruning scores W restricted
to m_k; gradient growth scores the dense gradient dL/d(W * m_k) of band k's own samples (captured by
the `BandRouter` during the update step's backward); momentum growth scores band k's own running
average of that gradient (captured at every step while updates remain, decay
`method.grad_ema_beta`; a step without a sample of band k adds a zero gradient, and under data
parallelism every step's band gradients are averaged over ranks first, as DDP does for the
parameter gradients the single-mask average reads); random growth draws from one generator per
update. The ordinary mask is the union of the band masks: weights active in no band are zero, and
the optimizer state is reset where the union changed (positions that left every band, or joined
the first one). A position pruned from one band but still used by another keeps its value and
state; a position grown into a band that another band already uses starts from the shared value.
Under AMP the captured band gradients carry the loss scale (hooks run before unscaling);
`before_step(grad_scale)` divides it out, so the averages do not weight steps by the scale.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from sparse_dm.sparsity.adaptive import AdaptivePruneRate
from sparse_dm.sparsity.bands import (
    BandRouter,
    TimestepBands,
    band_masks,
    random_band_masks,
    register_band_masks,
    sync_union,
)
from sparse_dm.sparsity.criteria import ScoreContext, top_k_mask
from sparse_dm.sparsity.distributions import layer_counts
from sparse_dm.sparsity.engine import (
    INIT_UPDATE_INDEX,
    SparseEngine,
    UpdateReport,
    check_layer_budget,
    frozen_layers,
)
from sparse_dm.sparsity.explorer import LayerUpdate, reset_optimizer_state, update_generator
from sparse_dm.sparsity.masks import PrunableWeight

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BandMaskView:
    """One band's mask of one layer, shaped like a PrunableWeight for the cross-rank checksum."""

    name: str
    mask: Tensor


class BandedSparseEngine(SparseEngine):
    """K masks per prunable weight, one per `TimestepBands` band. `router` runs the denoiser with
    each sample's band mask (install it as the module's denoiser call)."""

    def __init__(
        self,
        model: nn.Module,
        bands: TimestepBands,
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
        self.bands = bands
        shapes = [tuple(w.param.shape) for w in self.weights]
        names = [w.name for w in self.weights]
        numels = [w.param.numel() for w in self.weights]
        self.band_targets = [layer_counts(shapes, s, distribution) for s in bands.sparsities]
        for counts in self.band_targets:
            check_layer_budget(names, counts)
            if self.grow is not None and (stuck := frozen_layers(names, counts, numels, prune_rate)):
                log.warning("prune_rate=%s replaces no weight in layer(s) %s", prune_rate, ", ".join(stuck))
        generator = update_generator(seed, INIT_UPDATE_INDEX)
        register_band_masks(self.weights, random_band_masks(self.weights, self.band_targets, generator))
        self.router = BandRouter(model, self.weights, bands)
        self._start_counters([w.mask.clone() for w in self.weights])  # growth scores band gradients
        self._band_grads: list[list[Tensor]] | None = None
        self._band_samples: list[int] | None = None
        self._grads_dropped = False
        self.grad_ema = None  # one average per band instead: band_grad_ema
        needs_average = self.grow is not None and self.grow.needs_grad_ema
        self.band_grad_ema: list[list[Tensor]] | None = (
            [
                [torch.zeros_like(w.param, memory_format=torch.contiguous_format) for w in self.weights]
                for _ in range(bands.num_bands)
            ]
            if needs_average
            else None
        )
        self._arm_capture()

    @property
    def needs_band_grads(self) -> bool:
        return self.grow is not None and self.grow.needs_grad

    def _updates_remain(self, step: int) -> bool:
        """Whether an update can still come at or after `step` (the averages matter until then)."""
        stop = self.schedule.stop_step
        return self.dynamic and (stop is None or step < stop)

    def _arm_capture(self) -> None:
        """Capture per-band dense gradients during the next step's backward iff it is an update step
        (gradient growth) or an update is still to come (the per-band averages of momentum growth);
        otherwise the router runs without gradient hooks."""
        next_step = self.step + 1
        if (self.needs_band_grads and self.update_due(next_step)) or (
            self.band_grad_ema is not None and self._updates_remain(next_step)
        ):
            self.router.begin_capture()
        else:
            self.router.end_capture()

    def set_total_steps(self, total_steps: int) -> None:
        self.schedule = replace(self.schedule, total_steps=int(total_steps))
        self._arm_capture()

    @property
    def checked_masks(self) -> Sequence[BandMaskView]:
        return [
            BandMaskView(f"{w.name}[band {k}]", band_masks(w)[k])
            for w in self.weights
            for k in range(self.bands.num_bands)
        ]

    @torch.no_grad()
    def before_step(self, grad_scale: float = 1.0) -> None:
        """Take the per-band dense gradients captured during backward, if armed (divided by the AMP
        loss scale `grad_scale` they carry); at an update step note missing or non-finite gradients;
        always zero the gradients of weights active in no band."""
        if self.router.capturing:
            grads, self._band_samples = self.router.end_capture()
            if grad_scale != 1.0:
                grads = [[g.div_(grad_scale) for g in band] for band in grads]
            self._band_grads = grads
        self._grads_dropped = any(w.param.grad is None for w in self.weights)
        if self.update_due(self.step + 1):
            grads = [w.param.grad for w in self.weights if w.param.grad is not None]
            self._missing_grads = not grads
            if self._band_grads is not None:
                grads += [g for band in self._band_grads for g in band]
            self._nonfinite_grads = bool(grads) and not bool(
                torch.stack([torch.isfinite(g).all() for g in grads]).all()
            )
        self.mask_gradients()

    @torch.no_grad()
    def reduce_across_ranks(self, reduce: Callable[..., Tensor]) -> None:
        """Data parallelism: average the captured band gradients over ranks (as DDP averages
        parameter gradients) and sum the sample counts, so every rank grows the same positions.
        `reduce(tensor, reduce_op=...)` is e.g. Lightning's `trainer.strategy.reduce`."""
        if self._band_grads is None or self._band_samples is None:
            return
        self._band_grads = [[reduce(g, reduce_op="mean") for g in band] for band in self._band_grads]
        counts = torch.tensor(self._band_samples, dtype=torch.long, device=self.weights[0].param.device)
        self._band_samples = [int(c) for c in reduce(counts, reduce_op="sum")]

    @torch.no_grad()
    def remask(self) -> None:
        """Count the step, zero the weights active in no band, fold this step's band gradients
        (reduced over ranks by now) into the per-band averages, and arm the gradient capture of the
        next step's backward."""
        self.step += 1
        self.apply_masks()
        if self.band_grad_ema is not None:
            self._update_band_grad_ema()
        self._arm_capture()

    @torch.no_grad()
    def _update_band_grad_ema(self) -> None:
        """m_k <- beta m_k + (1 - beta) g_k for every band k; a step whose gradients were dropped
        (non-finite loss guard) or are non-finite (AMP overflow) leaves every average unchanged, as
        the single-mask average does."""
        assert self.band_grad_ema is not None
        grads, dropped = self._band_grads, self._grads_dropped
        if not self.needs_band_grads:
            self._band_grads, self._band_samples = None, None
        if grads is None or dropped:
            return
        if not bool(torch.stack([torch.isfinite(g).all() for band in grads for g in band]).all()):
            return
        for averages, band in zip(self.band_grad_ema, grads, strict=True):
            for average, grad in zip(averages, band, strict=True):
                average.lerp_(grad, 1.0 - self.grad_ema_beta)

    @torch.no_grad()
    def explore_if_due(
        self, optimizer: torch.optim.Optimizer | None = None, step_skipped: bool = False
    ) -> UpdateReport | None:
        """On update steps (after `remask`) prune and grow every band (see the module docstring)."""
        if not self.update_due(self.step):
            return None
        assert self.grow is not None
        drop, reason = self.due_update_rate(step_skipped)  # a skip leaves the adaptive rule alone
        grads, samples = self._band_grads, self._band_samples
        self._band_grads, self._band_samples = None, None
        self._nonfinite_grads = self._missing_grads = False
        if reason is not None:
            self.skipped_updates += 1
            log.warning("%s mask update at step %d skipped: %s", self.name, self.step, reason)
            self.last_report = UpdateReport(
                self.step, self.num_updates, drop, [], self.exploration_rate(), reason
            )
            return self.last_report
        if self.needs_band_grads and (grads is None or samples is None):
            raise RuntimeError("gradient growth needs before_step() to run before the optimizer step")
        generator = update_generator(self.seed, self.num_updates)
        before = [w.mask.clone() for w in self.weights]
        updates: list[LayerUpdate] = []
        for band in range(self.bands.num_bands):
            if samples is not None and samples[band] == 0:
                log.warning(
                    "step %d: no sample of timestep band %d in the batch; its masks keep", self.step, band
                )
                continue
            for i, weight in enumerate(self.weights):
                grad = grads[band][i] if grads is not None else None
                average = self.band_grad_ema[band][i] if self.band_grad_ema is not None else None
                updates.append(self._explore_band(band, weight, drop, generator, grad, average, optimizer))
        sync_union(self.weights)
        changed = [w.mask ^ old for w, old in zip(self.weights, before, strict=True)]
        if optimizer is not None:
            reset_optimizer_state(optimizer, self.weights, changed)
        for seen, weight in zip(self.ever_active, self.weights, strict=True):
            seen |= weight.mask.to(seen.device)
        self.num_updates += 1
        self.last_report = UpdateReport(
            self.step, self.num_updates - 1, drop, updates, self.exploration_rate()
        )
        return self.last_report

    def _explore_band(
        self,
        band: int,
        weight: PrunableWeight,
        drop: float,
        generator: torch.Generator,
        grad: Tensor | None,
        average: Tensor | None,
        optimizer: torch.optim.Optimizer | None,
    ) -> LayerUpdate:
        assert self.grow is not None
        masks = band_masks(weight)
        mask = masks[band].clone()
        active = int(mask.sum())
        replace_count = min(math.floor(drop * active), mask.numel() - active)
        state = optimizer.state.get(weight.param) if optimizer is not None else None
        context = ScoreContext(weight.param, mask, self.step, generator, grad, state or None, average)
        keep = top_k_mask(self.prune.score(context), mask, active - replace_count)
        grown = top_k_mask(self.grow.score(context), ~mask, replace_count)
        pruned, regrown = active - int(keep.sum()), int(grown.sum())
        if not pruned == regrown == replace_count:
            raise RuntimeError(
                f"mask update of {weight.name} band {band} would prune {pruned} and grow {regrown} weights "
                f"(expected {replace_count} each): its prune or grow scores are not finite"
            )
        masks[band] = keep | grown
        return LayerUpdate(f"{weight.name}[band {band}]", pruned=pruned, grown=regrown)

    def layer_stats(self) -> list[dict]:
        """Per layer: the union (`nnz`; it has no fixed target, so `target_nnz` is None) and every band's
        active count and target."""
        stats = []
        for i, w in enumerate(self.weights):
            union = int(w.mask.sum())
            band_nnz = [int(m.sum()) for m in band_masks(w)]
            stats.append(
                {
                    "name": w.name,
                    "shape": list(w.param.shape),
                    "numel": w.param.numel(),
                    "nnz": union,
                    "target_nnz": None,
                    "nonzero": int(torch.count_nonzero(w.param.detach())),
                    "density": union / w.param.numel(),
                    "band_nnz": band_nnz,
                    "band_target_nnz": [targets[i] for targets in self.band_targets],
                }
            )
        return stats

    def check_masks(self) -> None:
        """Every band mask holds its exact count and the ordinary mask is their union."""
        for i, weight in enumerate(self.weights):
            masks = band_masks(weight)
            for band, targets in enumerate(self.band_targets):
                nnz = int(masks[band].sum())
                if nnz != targets[i]:
                    raise ValueError(
                        f"{weight.name} band {band}: the mask has {nnz} active weights but "
                        f"method.timestep_bands.sparsities[{band}]={self.bands.sparsities[band]} implies "
                        f"{targets[i]}; resume with the run's own config"
                    )
            if not torch.equal(weight.mask, masks.any(0)):
                raise ValueError(f"{weight.name}: its mask is not the union of its timestep-band masks")

    def state_dict(self) -> dict:
        """The single-mask engine's counters, plus every band's gradient average (momentum growth)."""
        state = super().state_dict()
        if self.band_grad_ema is not None:
            state["band_grad_ema"] = [[m.cpu() for m in band] for band in self.band_grad_ema]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.band_grad_ema is not None:
            saved = state.get("band_grad_ema")
            if saved is None or len(saved) != len(self.band_grad_ema):
                raise ValueError(
                    f"this growth criterion needs one dense-gradient average per timestep band "
                    f"({len(self.band_grad_ema)}), which the checkpoint does not hold; "
                    "resume with the run's own method.grow and method.timestep_bands"
                )
            for averages, band in zip(self.band_grad_ema, saved, strict=True):
                for average, value in zip(averages, band, strict=True):
                    average.copy_(value)
        self._arm_capture()
