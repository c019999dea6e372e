"""Criteria get one ScoreContext: a new criterion is one registered function plus one config line."""

from __future__ import annotations

import pytest
import torch
from run_config import compose_config
from torch import nn

from sparse_dm import config
from sparse_dm.sparsity import SparseEngine, criteria
from sparse_dm.sparsity.criteria import GROW_CRITERIA, Criterion, ScoreContext

GROWN_PER_UPDATE = 2  # floor(prune_rate 0.25 * 8 active) in a 4x4 layer at sparsity 0.5


def momentum_engine(optimizer_cls, **optimizer_kw):
    net = nn.Linear(4, 4, bias=False)
    engine = SparseEngine(
        net, 0.5, distribution="uniform", grow="momentum", prune_rate=0.25, update_interval=1
    )
    return net, engine, optimizer_cls(net.parameters(), lr=0.0, **optimizer_kw)


def step_with_momentum_at(net, engine, optimizer, state_key, values: dict[tuple[int, int], float]):
    """One engine step whose optimizer momentum at the given (inactive) positions is set by hand,
    as an optimizer that saw those positions' gradients would hold it."""
    net.weight.grad = torch.ones(4, 4)
    engine.before_step()
    optimizer.step()
    buffer = optimizer.state[net.weight][state_key]
    for (row, col), value in values.items():
        buffer[row, col] = value
    return engine.after_step(optimizer)


@pytest.mark.parametrize(
    ("optimizer_cls", "optimizer_kw", "state_key"),
    [(torch.optim.AdamW, {}, "exp_avg"), (torch.optim.SGD, {"momentum": 0.9}, "momentum_buffer")],
)
def test_momentum_growth_picks_the_inactive_positions_with_the_largest_momentum(
    optimizer_cls, optimizer_kw, state_key
):
    net, engine, optimizer = momentum_engine(optimizer_cls, **optimizer_kw)
    inactive = [tuple(p.tolist()) for p in (~engine.weights[0].mask).nonzero()]
    largest, runner_up, small = inactive[5], inactive[1], inactive[0]
    before = engine.weights[0].mask.clone()
    report = step_with_momentum_at(
        net, engine, optimizer, state_key, {largest: -3.0, runner_up: 2.0, small: 0.5}
    )
    grown = engine.weights[0].mask & ~before
    assert report.layers[0].pruned == report.layers[0].grown == GROWN_PER_UPDATE
    assert sorted(tuple(p.tolist()) for p in grown.nonzero()) == sorted([largest, runner_up])


def test_momentum_growth_refuses_an_optimizer_without_momentum():
    net, engine, optimizer = momentum_engine(torch.optim.SGD)  # momentum=0: no momentum_buffer
    net.weight.grad = torch.ones(4, 4)
    engine.before_step()
    optimizer.step()
    with pytest.raises(ValueError, match=r"\['exp_avg', 'momentum_buffer'\]"):
        engine.after_step(optimizer)


def test_momentum_growth_refuses_to_rank_all_zero_momentum():
    """The engine masks gradients before the step, so an unmodified optimizer holds zero momentum at
    every inactive position: growth would be arbitrary (lowest indices), so it must raise."""
    net, engine, optimizer = momentum_engine(torch.optim.AdamW)
    with pytest.raises(RuntimeError, match="every inactive position has zero momentum"):
        step_with_momentum_at(net, engine, optimizer, "exp_avg", {})


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
