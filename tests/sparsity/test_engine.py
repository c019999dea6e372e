"""Invariants of the sparsity engine over a few hundred AdamW steps with gradient clipping."""

from __future__ import annotations

import pytest
import torch
from helpers.sparse_nets import SmallConvNet, SmallGRUNet
from torch import nn

from sparse_dm.sparsity import SparseEngine
from sparse_dm.sparsity.criteria import top_k_mask
from sparse_dm.sparsity.engine import EmptyLayerError
from sparse_dm.sparsity.explorer import explore

STEPS = 200
INTERVAL = 10
GROW = {"rigl": "gradient", "magran": "random", "static": None}


def make(net_cls, method: str, sparsity: float = 0.7, seed: int = 0):
    torch.manual_seed(seed)
    net = net_cls()
    engine = SparseEngine(
        net, sparsity, grow=GROW[method], prune_rate=0.3, update_interval=INTERVAL, seed=seed
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
    return net, engine, optimizer


def train_step(net, engine, optimizer, generator, net_cls):
    x, y = net_cls.batch(generator)
    optimizer.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    engine.before_step()
    nn.utils.clip_grad_norm_(net.parameters(), 0.5)
    optimizer.step()
    return engine.after_step(optimizer)


def assert_exact(engine: SparseEngine) -> None:
    for weight, target in zip(engine.weights, engine.target_counts, strict=True):
        assert int(weight.mask.sum()) == target, weight.name
        assert not weight.param[~weight.mask].any(), f"{weight.name} has weights outside its mask"


@pytest.mark.parametrize("net_cls", [SmallConvNet, SmallGRUNet])
@pytest.mark.parametrize("method", ["rigl", "magran"])
def test_exact_counts_after_every_step_and_clean_updates(net_cls, method):
    net, engine, optimizer = make(net_cls, method)
    generator = torch.Generator().manual_seed(1)
    assert_exact(engine)
    updates = 0
    for _ in range(STEPS):
        before = [w.mask.clone() for w in engine.weights]
        report = train_step(net, engine, optimizer, generator, net_cls)
        assert_exact(engine)
        if report is None:
            assert all(torch.equal(b, w.mask) for b, w in zip(before, engine.weights, strict=True))
            continue
        updates += 1
        changed_any = False
        for layer, old, weight in zip(report.layers, before, engine.weights, strict=True):
            assert layer.pruned == layer.grown
            grown = weight.mask & ~old
            pruned = old & ~weight.mask
            assert int(grown.sum()) == layer.grown and int(pruned.sum()) == layer.pruned
            changed_any |= layer.grown > 0
            state = optimizer.state[weight.param]
            for key in ("exp_avg", "exp_avg_sq"):
                assert not state[key][grown | pruned].any(), f"{key} not reset at changed positions"
        assert changed_any
    assert updates == STEPS // INTERVAL == engine.num_updates
    assert engine.exploration_rate() > 1 - 0.7


def grown_by_two_updates_from_one_state(seed: int) -> list[torch.Tensor]:
    """Two consecutive random-growth updates, each started from the very same weights and masks: only
    the growth generator (seeded by seed and update index) can make them differ."""
    net = nn.Linear(32, 32, bias=False)
    engine = SparseEngine(
        net, 0.5, distribution="uniform", grow="random", prune_rate=0.25, update_interval=1, seed=seed
    )
    with torch.no_grad():
        net.weight.copy_(torch.randn(32, 32, generator=torch.Generator().manual_seed(5)))
    start_weight, start_mask = net.weight.detach().clone(), engine.weights[0].mask.clone()
    grown = []
    for index in range(2):
        engine.weights[0].set_mask(start_mask)
        with torch.no_grad():
            net.weight.copy_(start_weight)
        report = engine.after_step()
        assert report is not None and report.update_index == index and report.layers[0].grown == 128
        grown.append(engine.weights[0].mask & ~start_mask)
    return grown


def test_consecutive_random_growth_updates_grow_different_positions():
    """From one state, updates 0 and 1 must draw different growth (128 of 512 inactive positions:
    equal draws have probability 1 / C(512, 128)). Identical draws keep regrowing the same positions
    (measured: exploration after 30 random-growth updates 0.216 instead of 0.667). The same seed
    redraws the same positions (resume, data-parallel ranks); another seed draws others."""
    first, second = grown_by_two_updates_from_one_state(seed=0)
    assert not torch.equal(first, second)
    assert all(map(torch.equal, grown_by_two_updates_from_one_state(seed=0), (first, second)))
    assert not torch.equal(grown_by_two_updates_from_one_state(seed=1)[0], first)


@pytest.mark.parametrize("grow", ["random", "gradient"])
def test_grown_weights_are_exactly_zero_when_grown(grow):
    """RigL's convention: a grown weight starts at +0.0. The weights start non-zero everywhere, the
    positions that get grown included (a value a timestep band shares, or weights an optimizer moved
    before the re-mask), so an update that forgot the zeroing would leave them there."""
    generator = torch.Generator().manual_seed(0)
    net = nn.Linear(16, 16, bias=False)
    engine = SparseEngine(net, 0.5, distribution="uniform", grow=grow, prune_rate=0.5, update_interval=1)
    (weight,) = engine.weights
    before = weight.mask.clone()
    with torch.no_grad():
        net.weight.copy_(torch.rand(16, 16, generator=generator) + 1.0)
        net.weight[~before] *= -1.0  # negative at the grow candidates: -0.0 would be a sign bit left
    values = net.weight.detach().clone()
    grads = [torch.randn(16, 16, generator=generator)]
    updates, _ = explore(engine.weights, 0.5, engine.prune, engine.grow, generator, grads)
    grown, kept = weight.mask & ~before, weight.mask & before
    assert int(grown.sum()) == updates[0].grown == 64  # p * 128 active
    assert torch.equal(net.weight[grown].view(torch.int32), torch.zeros(64, dtype=torch.int32))  # +0.0
    assert torch.equal(net.weight[kept], values[kept])
    assert not net.weight[~weight.mask].any()


@pytest.mark.parametrize("net_cls", [SmallConvNet, SmallGRUNet])
def test_static_masks_never_change(net_cls):
    net, engine, optimizer = make(net_cls, "static")
    initial = [w.mask.clone() for w in engine.weights]
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        assert train_step(net, engine, optimizer, generator, net_cls) is None
        assert_exact(engine)
    assert all(torch.equal(m, w.mask) for m, w in zip(initial, engine.weights, strict=True))
    assert engine.num_updates == 0


def test_gru_weights_are_prunable_and_the_rnn_sees_the_masked_weights():
    """nn.GRU must compute with the masked values, also after an update changed the masks in place
    (its flat weights are the Parameters themselves). The reference applies the masks by hand."""
    torch.manual_seed(0)
    net = SmallGRUNet()
    original = {k: v.clone() for k, v in net.state_dict().items()}
    engine = SparseEngine(net, 0.7, grow="random", prune_rate=0.3, update_interval=1, seed=0)
    names = {w.name for w in engine.weights}
    assert {"gru.weight_ih_l0", "gru.weight_hh_l1_reverse", "head.weight"} <= names
    assert not any("bias" in n for n in names)
    x = torch.randn(2, 5, 4)

    def hand_masked_output() -> torch.Tensor:
        reference = SmallGRUNet()
        masks = {w.name: w.mask for w in engine.weights}
        reference.load_state_dict({k: v * masks[k] if k in masks else v for k, v in original.items()})
        return reference(x)

    unmasked = SmallGRUNet()
    unmasked.load_state_dict(original)
    assert not torch.allclose(net(x), unmasked(x))
    # the same nn.GRU kernels on the same shapes and the same values (zeros where masked): bit-exact
    assert torch.equal(net(x), hand_masked_output())
    # an update moves masks in place (regrown weights start at 0): the GRU must follow
    for w in engine.weights:
        w.param.grad = torch.ones_like(w.param)
    engine.before_step()
    report = engine.after_step()
    assert report is not None and sum(layer.grown for layer in report.layers) > 0
    original = {k: p.detach().clone() for k, p in net.named_parameters()}
    assert torch.equal(net(x), hand_masked_output())


@pytest.mark.parametrize("method", ["rigl", "magran"])
def test_optimizer_state_is_zero_outside_the_masks_after_every_step(method):
    """Fails if gradients of inactive weights reach the optimizer (no gradient masking) or if
    the moments of pruned weights survive an update (no optimizer-state reset)."""
    net, engine, optimizer = make(SmallGRUNet, method)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3 * INTERVAL):
        train_step(net, engine, optimizer, generator, SmallGRUNet)
        for weight in engine.weights:
            state = optimizer.state[weight.param]
            for key in ("exp_avg", "exp_avg_sq"):
                assert not state[key][~weight.mask].any(), f"{key} of {weight.name} outside its mask"
    assert engine.num_updates == 3


def test_gradients_of_inactive_weights_are_zeroed_before_clipping():
    net, engine, _ = make(SmallConvNet, "static")
    x, y = SmallConvNet.batch(torch.Generator().manual_seed(0))
    nn.functional.mse_loss(net(x), y).backward()
    for weight in engine.weights:
        weight.param.grad[~weight.mask] = float("nan")  # even non-finite values must go
    engine.before_step()
    for weight in engine.weights:
        assert torch.count_nonzero(weight.param.grad[~weight.mask]) == 0, weight.name
        assert weight.param.grad[weight.mask].abs().sum() > 0


def test_weights_are_remasked_after_the_step_even_if_the_optimizer_moved_them():
    _, engine, _ = make(SmallConvNet, "static")
    with torch.no_grad():
        for i, weight in enumerate(engine.weights):  # an optimizer that ignores masks, and a NaN
            weight.param.add_(1.0)
            weight.param[~weight.mask] = float("nan") if i == 0 else 3.0
    engine.after_step()
    assert_exact(engine)


@pytest.mark.parametrize("method", ["rigl", "magran"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_update_with_a_non_finite_gradient_is_skipped_and_counted(method, bad):
    """An AMP overflow step: growth scores would be meaningless (measured before: pruned=64,
    grown=0). The update is skipped, counts stay exact, and the next update runs normally."""
    net, engine, optimizer = make(SmallConvNet, method)
    generator = torch.Generator().manual_seed(1)
    for _ in range(INTERVAL - 1):
        train_step(net, engine, optimizer, generator, SmallConvNet)
    before = [w.mask.clone() for w in engine.weights]
    x, y = SmallConvNet.batch(generator)
    optimizer.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    engine.weights[1].param.grad.view(-1)[int(engine.weights[1].mask.view(-1).nonzero()[0])] = bad
    engine.before_step()
    report = engine.after_step(optimizer)
    assert report is not None and report.skipped == "non-finite gradient" and not report.layers
    assert (engine.num_updates, engine.skipped_updates) == (0, 1)
    assert all(torch.equal(b, w.mask) for b, w in zip(before, engine.weights, strict=True))
    with torch.no_grad():  # the step itself would have been skipped by the AMP scaler
        for w in engine.weights:
            w.param.nan_to_num_(0.0, 0.0, 0.0)
    for _ in range(INTERVAL):
        train_step(net, engine, optimizer, generator, SmallConvNet)
        assert_exact(engine)
    assert (engine.num_updates, engine.skipped_updates) == (1, 1)
    assert engine.state_dict()["skipped_updates"] == 1


def test_a_skipped_optimizer_step_skips_the_due_update():
    net, engine, optimizer = make(SmallConvNet, "magran")
    generator = torch.Generator().manual_seed(1)
    for _ in range(INTERVAL - 1):
        train_step(net, engine, optimizer, generator, SmallConvNet)
    engine.before_step()
    report = engine.after_step(optimizer, step_skipped=True)
    assert report.skipped == "optimizer step skipped" and engine.num_updates == 0


def test_explore_refuses_to_prune_more_than_it_grows():
    net = nn.Linear(8, 8, bias=False)
    engine = SparseEngine(net, 0.5, grow="gradient", prune_rate=0.5, update_interval=1)
    grads = [torch.full((8, 8), float("nan"))]
    with pytest.raises(RuntimeError, match=r"weight would prune 16 and grow 0 weights"):
        explore(engine.weights, 0.5, engine.prune, engine.grow, torch.Generator(), grads)


def test_a_layer_left_without_active_weights_is_refused_by_name():
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 1))
    with pytest.raises(EmptyLayerError, match=r"1 prunable layer\(s\) with 0 active weights: 1\.weight"):
        SparseEngine(net, 0.999, distribution="uniform", grow="random")


def test_layers_too_small_to_explore_are_named_in_one_warning(caplog):
    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))  # 1.weight: 13 active at S=0.9, p=0.05
    with caplog.at_level("WARNING", logger="sparse_dm.sparsity.engine"):
        SparseEngine(net, 0.9, distribution="uniform", grow="random", prune_rate=0.05)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "1.weight" in warnings[0] and "0.weight" not in warnings[0]


def test_masks_survive_state_dict_round_trip():
    net, engine, _ = make(SmallConvNet, "rigl")
    state = net.state_dict()
    assert "conv1.weight_mask" in state and state["conv1.weight_mask"].dtype == torch.bool
    fresh, fresh_engine, _ = make(SmallConvNet, "rigl", seed=5)
    assert not all(
        torch.equal(a.mask, b.mask) for a, b in zip(engine.weights, fresh_engine.weights, strict=True)
    )
    fresh.load_state_dict(state)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(engine.weights, fresh_engine.weights, strict=True))


@pytest.mark.parametrize("method", ["rigl", "magran"])
def test_two_ranks_seeded_alike_compute_identical_masks(method):
    """Same seed, same (all-reduced) gradients, different global RNG use per rank -> same masks."""
    ranks = [make(SmallConvNet, method) for _ in range(2)]
    data = [torch.Generator().manual_seed(3) for _ in range(2)]
    for step in range(3 * INTERVAL):
        for rank, ((net, engine, optimizer), generator) in enumerate(zip(ranks, data, strict=True)):
            torch.manual_seed(1000 * rank + step)  # ranks consume the global RNG differently
            torch.rand(7)
            train_step(net, engine, optimizer, generator, SmallConvNet)
    (_, first, _), (_, second, _) = ranks
    assert first.num_updates == 3
    for a, b in zip(first.weights, second.weights, strict=True):
        assert torch.equal(a.mask, b.mask)


def test_engine_state_round_trip():
    net, engine, optimizer = make(SmallConvNet, "magran")
    generator = torch.Generator().manual_seed(1)
    for _ in range(25):
        train_step(net, engine, optimizer, generator, SmallConvNet)
    _, other, _ = make(SmallConvNet, "magran")
    other.load_state_dict(engine.state_dict())
    assert (other.step, other.num_updates) == (25, 2)
    assert other.exploration_rate() == engine.exploration_rate()


def test_rigl_grows_where_the_dense_gradient_is_largest():
    net = nn.Linear(4, 4, bias=False)
    engine = SparseEngine(
        net, 0.5, distribution="uniform", grow="gradient", prune_rate=0.25, update_interval=1
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    inactive = ~engine.weights[0].mask
    grad = torch.zeros(4, 4)
    target = inactive.nonzero()[3]
    grad[target[0], target[1]] = 5.0
    net.weight.grad = grad.clone()
    engine.before_step()
    optimizer.step()
    report = engine.after_step(optimizer)
    assert report.layers[0].grown == 2
    assert engine.weights[0].mask[target[0], target[1]]


def test_top_k_breaks_ties_by_lowest_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    eligible = torch.tensor([True, True, False, True, True, True])
    chosen = top_k_mask(scores, eligible, 2)
    assert chosen.tolist() == [False, True, False, True, False, False]
    assert torch.equal(chosen, top_k_mask(scores, eligible, 2))
    with pytest.raises(ValueError):
        top_k_mask(scores, eligible, 6)


def test_cosine_schedule_decays_and_stops():
    net = nn.Linear(8, 8)
    engine = SparseEngine(
        net, 0.5, grow="random", prune_rate=0.5, update_interval=2, schedule="cosine", end_step=6
    )
    assert engine.schedule.drop_fraction(0) == pytest.approx(0.5)
    assert engine.schedule.drop_fraction(3) == pytest.approx(0.25)
    assert [s for s in range(10) if engine.update_due(s)] == [2, 4]


def test_loading_masks_of_another_sparsity_is_refused():
    net, engine, _ = make(SmallConvNet, "rigl", sparsity=0.7)
    other_net, other, _ = make(SmallConvNet, "rigl", sparsity=0.5)
    other_net.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match=r"sparsity=0\.5 implies"):
        other.load_state_dict(engine.state_dict())


def test_updates_stop_at_the_end_fraction_and_never_on_the_final_step():
    net = nn.Linear(8, 8)
    engine = SparseEngine(net, 0.5, grow="random", update_interval=2, end_fraction=0.75)
    engine.set_total_steps(12)
    assert [s for s in range(13) if engine.update_due(s)] == [2, 4, 6, 8]  # stop at 9
    until_end = SparseEngine(net, 0.5, grow="random", update_interval=2, end_fraction=None)
    until_end.set_total_steps(12)
    assert [s for s in range(13) if until_end.update_due(s)] == [2, 4, 6, 8, 10]
    assert until_end.schedule.num_updates() == 5 and engine.schedule.num_updates() == 4
    explicit = SparseEngine(net, 0.5, grow="random", update_interval=2, end_step=5, end_fraction=0.75)
    explicit.set_total_steps(12)
    assert explicit.schedule.stop_step == 5
