"""Criteria get one ScoreContext: a new criterion is one registered function plus one config line."""

from __future__ import annotations

import pytest
import torch
from helpers.run_config import compose_config
from torch import nn

from sparse_dm.run import checks as config
from sparse_dm.sparsity import SparseEngine, criteria
from sparse_dm.sparsity.criteria import GROW_CRITERIA, Criterion, ScoreContext


def test_a_new_criterion_is_one_function_and_one_config_line(tmp_path, monkeypatch):
    """Registering a function is all it takes: config validation accepts the name and the engine
    calls it with the full context (weights, dense gradient, mask, optimizer state, step)."""
    seen: list[ScoreContext] = []

    def last_column_first(ctx: ScoreContext) -> torch.Tensor:
        seen.append(ctx)
        return torch.arange(ctx.weight.numel(), dtype=torch.float32).view_as(ctx.weight) % ctx.weight.shape[1]

    monkeypatch.setitem(GROW_CRITERIA, "last_column_first", Criterion(last_column_first, needs_grad=True))
    config.validate(compose_config(tmp_path, ["method=rigl", "method.grow=last_column_first"]))

    net = nn.Linear(4, 4, bias=False)
    engine = SparseEngine(net, 0.5, distribution="uniform", grow="last_column_first", update_interval=1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.0)
    net.weight.grad = torch.full((4, 4), 7.0)
    engine.before_step()
    optimizer.step()
    engine.after_step(optimizer)

    (ctx,) = seen
    assert ctx.step == 1 and ctx.weight is net.weight
    assert torch.equal(ctx.grad, torch.full((4, 4), 7.0))  # dense: inactive positions included
    assert ctx.optimizer_state is optimizer.state[net.weight]
    assert criteria.get(GROW_CRITERIA, "last_column_first", "method.grow").score is last_column_first


MOMENTUM_INTERVAL = 10
PERSISTENT, SPIKE = 7, 5  # flat positions of the second (inactive) row of a 2x4 weight


def grow_after_constructed_gradients(grow: str) -> tuple[SparseEngine, nn.Linear, int]:
    """Row 0 active (|w| = 1..4), row 1 inactive. For 9 steps the inactive position PERSISTENT gets
    gradient 1; at the update step only SPIKE gets a gradient (3). Returns the grown position."""
    net = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]))
    engine = SparseEngine(
        net,
        0.5,
        distribution="uniform",
        grow=grow,
        prune_rate=0.25,  # floor(0.25 * 4 active) = 1 weight replaced
        update_interval=MOMENTUM_INTERVAL,
        grad_ema_beta=0.9,
    )
    mask = torch.tensor([[True] * 4, [False] * 4])
    engine.weights[0].set_mask(mask)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    for step in range(1, MOMENTUM_INTERVAL + 1):
        grad = torch.zeros(8)
        if step < MOMENTUM_INTERVAL:
            grad[PERSISTENT] = 1.0
        else:
            grad[SPIKE] = 3.0
        net.weight.grad = grad.view(2, 4).clone()
        engine.before_step()
        optimizer.step()
        engine.after_step(optimizer)
    (grown,) = (engine.weights[0].mask & ~mask).flatten().nonzero().flatten().tolist()
    return engine, net, grown


def test_momentum_growth_regrows_where_the_dense_gradient_average_is_largest():
    """The inactive positions' gradients are masked before the optimizer, so only the engine's own
    average of the dense gradient (updated before masking) remembers PERSISTENT: momentum growth
    picks it, plain gradient growth picks the one-step SPIKE."""
    engine, net, grown = grow_after_constructed_gradients("momentum")
    assert engine.num_updates == 1
    assert grown == PERSISTENT
    (average,) = engine.grad_ema
    assert average.flatten()[PERSISTENT] == pytest.approx(0.9 * (1 - 0.9**9))
    assert average.flatten()[SPIKE] == pytest.approx(0.1 * 3.0)
    assert not net.weight.grad.flatten()[SPIKE]  # the optimizer saw the masked gradient only
    _, _, gradient_grown = grow_after_constructed_gradients("gradient")
    assert gradient_grown == SPIKE


def test_gradient_average_is_kept_only_when_asked_and_restored_from_state(tmp_path):
    engine, _, _ = grow_after_constructed_gradients("momentum")
    state = engine.state_dict()
    path = tmp_path / "engine.pt"
    torch.save(state, path)
    restored = SparseEngine(
        nn.Linear(4, 2, bias=False), 0.5, distribution="uniform", grow="momentum", prune_rate=0.25
    )
    restored.weights[0].set_mask(engine.weights[0].mask.clone())
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(restored.grad_ema[0], engine.grad_ema[0])
    plain, _, _ = grow_after_constructed_gradients("gradient")
    assert plain.grad_ema is None and "grad_ema" not in plain.state_dict()


def test_momentum_growth_is_one_config_line(tmp_path):
    config.validate(compose_config(tmp_path, ["method=rigl", "method.grow=momentum"]))
    with pytest.raises(ValueError, match=r"method\.grad_ema_beta=1\.0; allowed: a number in \[0, 1\)"):
        SparseEngine(nn.Linear(4, 2), 0.5, grow="momentum", grad_ema_beta=1.0)
