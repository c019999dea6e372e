"""backend=sparse trains what backend=dense (the masked engine) trains: the tiny ChiroDiff of conf/debug/
tiny.yaml, both backends side by side on the same batches, timesteps and noise, for Static, RigL,
MagRan and momentum growth over a few hundred steps with several mask updates.

Checked: identical masks at every update (exact), and losses at every step, weights, EMA, optimizer
moments and the engine's gradient average at the end within a float bound.

Why the bound holds (helpers/tolerance.py's model): the two backends compute the same sums in other
orders (dense GEMMs vs CSR products, the sampled weight gradient vs the masked dense one), so one
step's reductions differ by at most 2 gamma_n S, n the terms of its reductions (the forward's, which
`reductions` counts on the masked dense net, and as many again for each of the input- and weight-
gradient sums of the backward: 3 n) and S the largest sum of |terms| of the step's loss (`mse_bound`).
A step's rounding reaches the next steps with gain <= 1 (the same stage model the tolerance helper
uses for layers and sampler steps; AdamW moves each weight by lr times a normalised gradient), so
after T steps the difference is at most float_bound(3 n T, S). In float64 (the sparse side on the
pure-torch reference layers) that is ~1e-8, while any logic difference (a moment not reset, a dense
gradient not formed, a weight gradient at a wrong position) moves weights by O(lr) = 1e-3 per step.
In float32 the same worst-case formula exceeds the weights themselves after a few steps (n u ~ 1e-3
per step), so the float32 runs (the compiled kernels that train) assert what is exact there: the
masks at every update, and that both runs trained (the loss fell, masks moved); their observed
differences are printed (pytest -s) and reported, not bounded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.run_config import TINY_CHIRODIFF, compose_config
from helpers.tolerance import float_bound, mse_bound, reductions

from sparse_dm.run.build import build_run
from sparse_dm.sparse_backend.backend import SparseBackend
from sparse_dm.sparse_backend.optimizer import dense_state
from sparse_dm.training.modules.diffusion import DiffusionModule
from tests.sparse_backend.kernels import kernels_for

STEPS = 200
INTERVAL = 25  # mask updates at 25, 50, ..., 175 (never on the final step)
CLIP = 0.5  # gradient clipping (trainer.gradient_clip_val); active in these runs (norms reach ~1)
BASE = [
    *TINY_CHIRODIFF,
    "dataset.batch_size=8",
    "sparsity=0.9",
    f"update_interval={INTERVAL}",
    "method.end_fraction=null",
    f"trainer.max_steps={STEPS}",
]
METHODS = {
    "static": ["method=static"],
    "rigl": ["method=rigl"],
    "magran": ["method=magran"],
    "momentum": ["method=rigl", "method.grow=momentum"],
}


@dataclass
class Side:
    """One backend's module, engine and optimizer."""

    module: DiffusionModule
    engine: Any
    optimizer: torch.optim.Optimizer

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer state as a masked run holds it (the checkpoint format)."""
        state = self.optimizer.state_dict()
        backend = self.module.sparse_backend
        if backend is None:
            return state
        return dense_state(state, backend.compact_names, backend.dense_names, backend.layouts())


@dataclass
class Trace:
    """What a lockstep run saw: losses per step, masks compared at each update, the float bound."""

    losses: list[tuple[float, float]] = field(default_factory=list)
    updates: list[int] = field(default_factory=list)
    chain: int = 1  # terms of one step's reductions (3 n: forward, input and weight gradients)
    scale: float = 0.0


def build_side(
    tmp_path: Path, overrides: list[str], backend: str, dtype: torch.dtype, kernels: Any = None
) -> tuple[Side, Any]:
    cfg = compose_config(tmp_path, [*BASE, *overrides])
    module, datamodule, engine = build_run(cfg)
    engine.set_total_steps(STEPS)
    if backend == "sparse":
        module.attach_sparse_backend(SparseBackend(module.net, module.ema, engine, kernels))
    module.to(dtype)
    if engine.grad_ema is not None:  # the engine's running average (momentum growth) is not a module
        engine.grad_ema = [average.to(dtype) for average in engine.grad_ema]
    datamodule.setup("fit")
    return Side(module, engine, module.optimizer_factory(module.net.parameters())), datamodule


def pair(tmp_path: Path, method: str, dtype: torch.dtype, kernels: Any) -> tuple[Side, Side, Any]:
    dense, datamodule = build_side(tmp_path / "dense", METHODS[method], "dense", dtype)
    sparse, _ = build_side(tmp_path / "sparse", METHODS[method], "sparse", dtype, kernels)
    return dense, sparse, datamodule


def train_step(side: Side, batch: dict, t: torch.Tensor, noise: torch.Tensor) -> float:
    """One optimizer step in DiffusionModule's order (see sparsity/step.py), clipping included."""
    module = side.module
    side.optimizer.zero_grad(set_to_none=True)
    if module.sparse_backend is not None:
        module.sparse_backend.step.before_forward()  # DiffusionModule.on_train_batch_start
    loss = module.diffusion_loss(module.prepare_batch(batch), t, noise)
    loss.backward()
    module.sparse_step.before_step()
    torch.nn.utils.clip_grad_norm_(module.net.parameters(), CLIP)
    side.optimizer.step()
    module.sparse_step.after_step(side.optimizer, loss=loss.detach())
    return float(loss.detach())


def lockstep(dense: Side, sparse: Side, datamodule: Any, steps: int, dtype: torch.dtype) -> Trace:
    """Both sides on the same batches, timesteps and noise; masks compared after every update."""
    trace = Trace()
    generator = torch.Generator().manual_seed(7)
    batches = itertools.cycle(list(datamodule.train_dataloader()))
    for step in range(1, steps + 1):
        batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in next(batches).items()}
        x0 = dense.module.prepare_batch(batch).x0
        t = torch.randint(0, dense.module.schedule.num_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=dtype)
        if step == 1 or dense.engine.update_due(step) or step == steps:
            measure_bound(trace, dense.module, batch, t, noise)
        trace.losses.append((train_step(dense, batch, t, noise), train_step(sparse, batch, t, noise)))
        if dense.engine.last_report is not None and dense.engine.last_report.step == step:
            assert sparse.engine.last_report.step == step and sparse.engine.last_report.skipped is None
            for a, b in zip(dense.engine.weights, sparse.engine.weights, strict=True):
                assert torch.equal(a.mask, b.mask), f"{a.name}: masks differ after the update at step {step}"
            trace.updates.append(step)
    return trace


@torch.no_grad()
def measure_bound(
    trace: Trace, module: DiffusionModule, batch: dict, t: torch.Tensor, noise: torch.Tensor
) -> None:
    """The step's reductions on the masked dense net; the largest seen bounds every step."""
    data = module.prepare_batch(batch)
    loss, run = reductions(module.net, data, t, noise, call=module.diffusion_loss)
    elements = int(data.mask.sum()) * data.x0.shape[-1]
    n, scale = mse_bound(float(loss), elements, run)
    trace.chain, trace.scale = max(trace.chain, 3 * n), max(trace.scale, scale)


def differences(dense: Side, sparse: Side) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every float tensor a checkpoint holds of both runs (checkpoint format), by name; masks and
    counters are compared exactly here."""
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    a, b = dense.module.state_dict(), sparse.module.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            pairs[key] = (a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key
    opt_a, opt_b = dense.optimizer_state(), sparse.optimizer_state()
    assert opt_a["param_groups"] == opt_b["param_groups"] and opt_a["state"].keys() == opt_b["state"].keys()
    for index, entry in opt_a["state"].items():
        assert entry.keys() == opt_b["state"][index].keys()
        for name, value in entry.items():
            pairs[f"optimizer/{index}/{name}"] = (value, opt_b["state"][index][name])
    engine_a, engine_b = dense.engine.state_dict(), sparse.engine.state_dict()
    assert all(
        torch.equal(x, y) for x, y in zip(engine_a["ever_active"], engine_b["ever_active"], strict=True)
    )
    plain = ("ever_active", "grad_ema")
    assert {k: v for k, v in engine_a.items() if k not in plain} == {
        k: v for k, v in engine_b.items() if k not in plain
    }
    for i, (x, y) in enumerate(zip(engine_a.get("grad_ema", []), engine_b.get("grad_ema", []), strict=True)):
        pairs[f"engine/grad_ema/{i}"] = (x, y)
    return pairs


def compare_final(dense: Side, sparse: Side, trace: Trace, dtype: torch.dtype) -> float:
    """Losses at every step and every tensor at the end within float_bound(3 n T, S); returns it."""
    for step, (a, b) in enumerate(trace.losses, start=1):
        assert abs(a - b) <= float_bound(trace.chain * step, trace.scale, dtype), (step, a, b)
    bound = float_bound(trace.chain * len(trace.losses), trace.scale, dtype)
    for key, (a, b) in differences(dense, sparse).items():
        torch.testing.assert_close(b, a, rtol=0, atol=bound, msg=lambda m, k=key: f"{k}: {m}")
    return bound


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("method", list(METHODS))
def test_float64_reference_layers_train_what_the_masked_engine_trains(tmp_path, method):
    dense, sparse, datamodule = pair(tmp_path, method, torch.float64, kernels=None)
    trace = lockstep(dense, sparse, datamodule, STEPS, torch.float64)
    assert trace.updates == ([] if method == "static" else list(range(INTERVAL, STEPS, INTERVAL)))
    bound = compare_final(dense, sparse, trace, torch.float64)
    assert bound < 1e-6  # far below what one step moves a weight (lr = 1e-3)
    if method in ("rigl", "momentum"):
        assert sparse.module.sparse_backend.step.dense_grad_steps == (
            STEPS if method == "momentum" else len(trace.updates)
        )


@pytest.mark.parametrize("method", list(METHODS))
def test_compiled_kernels_train_what_the_masked_engine_trains(tmp_path, method):
    dense, sparse, datamodule = pair(tmp_path, method, torch.float32, kernels=kernels_for("compiled"))
    trace = lockstep(dense, sparse, datamodule, STEPS, torch.float32)  # masks identical at every update
    assert trace.updates == ([] if method == "static" else list(range(INTERVAL, STEPS, INTERVAL)))
    first, last = trace.losses[:INTERVAL], trace.losses[-INTERVAL:]
    for side in (0, 1):  # both trained: the loss fell
        assert sum(loss[side] for loss in last) < sum(loss[side] for loss in first)
    observed = {key: float((a - b).abs().max()) for key, (a, b) in differences(dense, sparse).items()}
    worst = max(observed, key=observed.get)
    loss_gap = max(abs(a - b) for a, b in trace.losses)
    print(
        f"{method} float32: loss differs by <= {loss_gap:.3g}, tensors by <= {observed[worst]:.3g} ({worst})"
    )
