"""Criteria get one ScoreContext: a new criterion is one registered function plus one config line."""

from __future__ import annotations

import torch
from run_config import compose_config
from torch import nn

from sparse_dm import config
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
