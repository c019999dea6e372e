"""Phase-adaptive prune rate: the documented rule, its bounds, and its state across a resume."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.sparse_nets import SmallGRUNet
from torch import nn

from sparse_dm.sparsity import SparseEngine
from sparse_dm.sparsity.adaptive import AdaptivePruneRate

P0, P_MIN, DECAY = 0.5, 0.05, 0.5


def feed(rule: AdaptivePruneRate, losses: list[float], interval: int, start_step: int = 0) -> list[float]:
    rates = []
    for i, loss in enumerate(losses, start=start_step + 1):
        rule.observe(loss)
        if i % interval == 0:
            rates.append(rule.rate(i, P0))
    return rates


def test_rate_follows_the_loss_decrease_and_stays_in_bounds():
    # fast fall, then slower, then a plateau, then a rise
    losses = [2.0 * 0.9**i for i in range(20)] + [0.25 * 0.99**i for i in range(20)] + [0.2] * 20
    losses += [0.2 * 1.05**i for i in range(20)]
    rule = AdaptivePruneRate(DECAY, P_MIN)
    rates = feed(rule, losses, interval=5)
    assert rates[0] == P0
    assert all(P_MIN <= p <= P0 for p in rates)
    history = rule.history
    peak = max(h["loss_decrease"] for h in history[:1])
    for h in history:  # the documented formula, update by update
        peak = max(peak, h["loss_decrease"])
        expected = min(max(P0 * max(h["loss_decrease"], 0.0) / peak, P_MIN), P0)
        assert h["prune_rate"] == pytest.approx(expected)
    assert rates[5] < rates[1]  # slower learning, less exploration
    assert rates[-1] == P_MIN  # rising loss: the floor


def test_state_restores_the_rule_exactly():
    losses = [1.0 / (1 + 0.3 * i) + 0.01 * math.sin(i) for i in range(60)]
    straight = AdaptivePruneRate(DECAY, P_MIN)
    expected = feed(straight, losses, interval=4)
    first = AdaptivePruneRate(DECAY, P_MIN)
    head = feed(first, losses[:30], interval=4)
    resumed = AdaptivePruneRate(DECAY, P_MIN)
    resumed.load_state_dict(first.state_dict())
    assert head + feed(resumed, losses[30:], interval=4, start_step=30) == expected
    assert resumed.history == straight.history


def test_engine_uses_the_adaptive_rate_for_its_updates():
    torch.manual_seed(0)
    net = SmallGRUNet()
    engine = SparseEngine(
        net, 0.7, grow="gradient", prune_rate=P0, update_interval=3, adaptive=AdaptivePruneRate(DECAY, P_MIN)
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    reports = []
    for _ in range(12):
        x, y = SmallGRUNet.batch(generator)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        engine.before_step()
        optimizer.step()
        engine.observe_loss(float(loss.detach()))
        if (report := engine.after_step(optimizer)) is not None:
            reports.append(report)
    assert [r.drop_fraction for r in reports] == [h["prune_rate"] for h in engine.adaptive.history]
    assert len(set(r.drop_fraction for r in reports)) > 1  # it did adapt
    for report in reports:  # each layer replaced floor(p * active) weights at that update's p
        for layer, target, weight in zip(report.layers, engine.target_counts, engine.weights, strict=True):
            assert layer.grown == min(
                math.floor(report.drop_fraction * target), weight.param.numel() - target
            )
    assert engine.state_dict()["adaptive"]["history"] == engine.adaptive.history


def test_a_skipped_update_leaves_the_adaptive_state_unchanged():
    """A due update skipped for a non-finite gradient (an AMP overflow step; the scaler skips the
    optimizer step too) must not close a window of the rule: its state is what it was before the
    update was due, and the next update that happens measures the decrease from the last real one."""
    torch.manual_seed(0)
    net = SmallGRUNet()
    rule = AdaptivePruneRate(DECAY, P_MIN)
    engine = SparseEngine(net, 0.7, grow="gradient", prune_rate=P0, update_interval=3, adaptive=rule)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    reports = []
    for step in range(1, 10):
        x, y = SmallGRUNet.batch(generator)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        overflow = step == 6
        if overflow:
            engine.weights[0].param.grad.view(-1)[0] = float("inf")
        engine.before_step()
        if not overflow:
            optimizer.step()
        engine.observe_loss(float(loss.detach()))
        before = rule.state_dict()
        report = engine.after_step(optimizer)
        if report is not None:
            reports.append(report)
        if overflow:
            assert report is not None and report.skipped == "non-finite gradient"
            assert report.drop_fraction == P0  # the schedule's p: no adaptive rate was drawn
            assert rule.state_dict() == before
            anchor = rule.anchor  # the loss EMA at the update of step 3
        if step == 9:
            assert rule.history[-1]["loss_decrease"] == pytest.approx((anchor - before["loss_ema"]) / anchor)
    assert [r.step for r in reports] == [3, 6, 9] and engine.skipped_updates == 1
    assert [h["step"] for h in rule.history] == [3.0, 9.0]
