"""The masking every sparse step does. `zero_outside` (gradients, weights, EMA) is exactly
`masked_fill_(~mask, 0)`: NaN, inf and -0.0 outside the mask become +0.0, values inside keep every bit,
for every float width (its bitwise CPU path) and for anything else (the masked_fill_ path). The EMA
skips its own masking pass only after the weights were re-masked, where the result is bit-identical.
The multi-tensor path (`IntMasks`, what the engine and the EMA run each step) gives the same bits as
the per-tensor ops, in one call and over a whole training run, and follows every change of a mask."""

from __future__ import annotations

import pytest
import torch
from helpers.sparse_nets import SmallConvNet, SmallGRUNet

from sparse_dm.sparsity import MaskedEMA, SparseEngine
from sparse_dm.sparsity import ema as ema_module
from sparse_dm.sparsity import engine as engine_module
from sparse_dm.sparsity.batched import IntMasks
from sparse_dm.sparsity.masks import apply_masks, zero_outside
from sparse_dm.sparsity.step import SparseStep

SPECIALS = [float("nan"), float("inf"), -float("inf"), -0.0, 3.5]
FINITE_SPECIALS = [-0.0, 3.5, -1e30]


def reference(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values.clone().masked_fill_(~mask, 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("transposed", [False, True])
def test_zero_outside_equals_masked_fill_bit_for_bit(dtype, transposed):
    generator = torch.Generator().manual_seed(0)
    values = (torch.randn(24, 10, generator=generator) * 100).to(dtype)
    mask = torch.rand(24, 10, generator=generator) < 0.3
    if dtype.is_floating_point:  # non-finite values and -0.0 on both sides of the mask
        flat = values.view(-1)
        for i, special in enumerate(SPECIALS * 10):
            flat[7 * i % flat.numel()] = special
    if transposed:  # a non-contiguous tensor (e.g. a channels-last gradient)
        values, mask = values.t(), mask.t()
    expected = reference(values, mask)
    result = zero_outside(values, mask)
    assert result is values  # in place
    as_bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[values.element_size()]
    assert torch.equal(result.contiguous().view(as_bits), expected.contiguous().view(as_bits))
    if dtype.is_floating_point:
        assert not torch.signbit(result[~mask]).any()  # +0.0, as masked_fill_ writes
        assert torch.isnan(result[mask]).any()  # a NaN inside the mask stays visible


def test_ema_without_its_masking_pass_is_bit_identical_after_a_remask():
    generator = torch.Generator().manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    engines = [SparseEngine(net, 0.75) for net in nets]
    nets[1].load_state_dict(nets[0].state_dict())  # the same masks too
    emas = [MaskedEMA(net, decay=0.9) for net in nets]
    for _ in range(5):
        noise = [torch.randn(p.shape, generator=generator) for p in nets[0].parameters()]
        for net, engine in zip(nets, engines, strict=True):
            with torch.no_grad():  # an optimizer step that moved inactive weights too
                for param, delta in zip(net.parameters(), noise, strict=True):
                    param.add_(delta)
            apply_masks(engine.weights)
        emas[0].update(nets[0])
        emas[1].update(nets[1], weights_masked=True)
    for a, b in zip(emas[0].buffers(), emas[1].buffers(), strict=True):
        assert torch.equal(a, b)


def test_ema_masks_weights_that_were_not_remasked():
    net = torch.nn.Linear(8, 8)
    (weight,) = SparseEngine(net, 0.75).weights
    ema = MaskedEMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)  # live outside the mask
    ema.update(net)
    assert not ema.get_buffer("weight")[~weight.mask].any()
    assert ema.get_buffer("weight")[weight.mask].all()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern (so NaN == NaN and -0.0 != +0.0)."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[tensor.element_size()])


def with_specials(values: torch.Tensor, specials: list[float] = SPECIALS) -> torch.Tensor:
    flat = values.view(-1)
    for i, special in enumerate(specials * 10):
        flat[7 * i % flat.numel()] = special
    return values


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_int_masks_equal_per_tensor_masking_bit_for_bit(dtype):
    generator = torch.Generator().manual_seed(0)
    shapes = [(24, 10), (7,), (3, 4, 5), (10, 24)]
    masks = [torch.rand(shape, generator=generator) < 0.3 for shape in shapes]
    values = [(torch.randn(shape, generator=generator) * 100).to(dtype) for shape in shapes]
    if dtype.is_floating_point:
        values = [with_specials(v) for v in values]
    values[3], masks[3] = values[3].t(), masks[3].t()  # non-contiguous, as a channels-last gradient
    expected = [reference(v, m) for v, m in zip(values, masks, strict=True)]
    batched: list[torch.Tensor | None] = [v.clone() for v in values]
    batched.insert(1, None)  # a weight without a gradient
    IntMasks().zero_outside(batched, [masks[0], masks[0], *masks[1:]])
    del batched[1]
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(batched, expected, strict=True))


def test_int_masks_follow_every_change_of_a_mask():
    """The cached integer masks are rebuilt after an in-place write (a mask update, load_state_dict),
    a replaced buffer (`.to()` another device) and for values of another width (`.double()`)."""
    net = torch.nn.Linear(16, 16, bias=False)
    engine = SparseEngine(net, 0.5)
    (weight,) = engine.weights
    generator = torch.Generator().manual_seed(0)

    def check() -> None:
        with torch.no_grad():
            net.weight.copy_(with_specials(torch.randn(16, 16, generator=generator).to(net.weight.dtype)))
        expected = reference(net.weight.detach(), weight.mask)
        engine.apply_masks()
        assert torch.equal(bits(net.weight.detach()), bits(expected))

    check()
    weight.set_mask(torch.rand(16, 16, generator=generator) < 0.5)  # as explore() writes it
    check()
    net.load_state_dict({"weight": net.weight.detach(), "weight_mask": torch.rand(16, 16) < 0.5})
    check()
    net.register_buffer("weight_mask", torch.rand(16, 16, generator=generator) < 0.5)  # a new tensor
    check()
    net.double()
    check()


def per_tensor_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Today's per-tensor ops in place of the multi-tensor ones, for the reference run."""

    class PerTensorMasks:
        def zero_outside(self, values, masks) -> None:
            for value, mask in zip(values, masks, strict=True):
                if value is not None:
                    zero_outside(value, mask)

    def lerp(starts, ends, weight) -> None:
        for start, end in zip(starts, ends, strict=True):
            start.lerp_(end, weight)

    def copy(targets, sources) -> None:
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)

    monkeypatch.setattr(engine_module, "IntMasks", PerTensorMasks)
    monkeypatch.setattr(ema_module, "IntMasks", PerTensorMasks)
    monkeypatch.setattr(torch, "_foreach_lerp_", lerp)
    monkeypatch.setattr(torch, "_foreach_copy_", copy)


def leaky_run(net_cls: type[torch.nn.Module], grow: str) -> dict[str, torch.Tensor]:
    """14 steps of sparse training (updates at 4, 8, 12) through SparseStep, with -0.0, noise and
    (except at update steps, which a non-finite gradient would skip) NaN and inf at inactive positions
    of the gradients before the gradient masks, the same at inactive weights before the re-mask, and a
    second EMA that masks itself; returns every tensor of the state."""
    torch.manual_seed(0)
    net = net_cls()
    engine = SparseEngine(net, 0.7, grow=grow, prune_rate=0.3, update_interval=4, seed=3)
    ema, self_masking = MaskedEMA(net, decay=0.9), MaskedEMA(net, decay=0.8, on_mask_update="remask")
    step = SparseStep(net, ema, engine)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, foreach=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(14):
        x, y = net_cls.batch(generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        specials = FINITE_SPECIALS if step.update_due() else SPECIALS
        for w in engine.weights:
            noise = with_specials(torch.randn(w.param.shape, generator=generator), specials)
            w.param.grad[~w.mask] = noise[~w.mask]
        step.before_step()
        optimizer.step()
        with torch.no_grad():
            for w in engine.weights:
                w.param[~w.mask] = with_specials(torch.randn(w.param.shape, generator=generator))[~w.mask]
        self_masking.update(net)
        report = step.after_step(optimizer)
        if report is not None:
            self_masking.masks_changed(net)
    assert engine.num_updates == 3
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    state |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    state |= {f"self_masking.{k}": v for k, v in self_masking.state_dict().items()}
    for i, group in enumerate(optimizer.state.values()):
        state |= {f"adam.{i}.{k}": v for k, v in group.items()}
    for key in ("ever_active", "grad_ema"):  # the momentum criterion's gradient average
        state |= {f"engine.{key}.{i}": v for i, v in enumerate(engine.state_dict().get(key, []))}
    return state


@pytest.mark.parametrize(
    ("net_cls", "grow"), [(SmallConvNet, "gradient"), (SmallGRUNet, "random"), (SmallConvNet, "momentum")]
)
def test_multi_tensor_masking_trains_the_same_bits_as_per_tensor_ops(net_cls, grow, monkeypatch):
    batched_state = leaky_run(net_cls, grow)
    with monkeypatch.context() as patch:
        per_tensor_run(patch)
        reference_state = leaky_run(net_cls, grow)
    assert batched_state.keys() == reference_state.keys()
    same = {k: torch.equal(bits(v), bits(reference_state[k])) for k, v in batched_state.items()}
    assert all(same.values()), [k for k, equal in same.items() if not equal]


def test_ema_after_a_resync_is_the_live_network():
    """At a mask update the resync policy restarts the average from the live weights: every shadow
    holds exactly the live values (bit for bit) and the warm-up restarts; before it the average lagged."""
    torch.manual_seed(0)
    net = SmallConvNet()
    engine = SparseEngine(net, 0.7, grow="random", prune_rate=0.3, update_interval=3)
    ema = MaskedEMA(net, decay=0.9, on_mask_update="resync")
    step = SparseStep(net, ema, engine)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)

    def ema_is_live() -> bool:
        return all(
            torch.equal(bits(ema.get_buffer(name.replace(".", "__"))), bits(param.detach()))
            for name, param in net.named_parameters()
        )

    for index in range(3):
        x, y = SmallConvNet.batch(generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        report = step.step(optimizer)
        if index < 2:
            assert report is None and not ema_is_live() and int(ema.num_updates) == index + 1
    assert report is not None and report.skipped is None and sum(u.grown for u in report.layers) > 0
    assert ema_is_live() and int(ema.num_updates) == 0
