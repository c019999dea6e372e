"""Invariants of the sparsity engine over a few hundred AdamW steps with gradient clipping."""

from __future__ import annotations

import copy

import pytest
import torch
from sparse_nets import SmallConvNet, SmallGRUNet
from torch import nn

from sparse_dm.sparsity import SparseEngine
from sparse_dm.sparsity.criteria import top_k_mask

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
            assert not weight.param[grown].any(), "regrown weights must start at 0"
            state = optimizer.state[weight.param]
            for key in ("exp_avg", "exp_avg_sq"):
                assert not state[key][grown | pruned].any(), f"{key} not reset at changed positions"
        assert changed_any
    assert updates == STEPS // INTERVAL == engine.num_updates
    assert engine.exploration_rate() > 1 - 0.7


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
    net, engine, _ = make(SmallGRUNet, "rigl")
    names = {w.name for w in engine.weights}
    assert {"gru.weight_ih_l0", "gru.weight_hh_l1_reverse", "head.weight"} <= names
    assert not any("bias" in n for n in names)
    reference = copy.deepcopy(net)
    x = torch.randn(2, 5, 4)
    # Zeroing through the GRU's own Parameters must change the output the same way in both copies.
    assert torch.allclose(net(x), reference(x))
    for w in engine.weights:
        assert w.param.data_ptr() == getattr(net.get_submodule(w.name.rsplit(".", 1)[0]), w.attr).data_ptr()


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
