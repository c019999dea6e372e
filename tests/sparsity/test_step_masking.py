"""The masking every sparse step does. `zero_outside` (gradients, weights, EMA) is exactly
`masked_fill_(~mask, 0)`: NaN, inf and -0.0 outside the mask become +0.0, values inside keep every bit,
for every float width (its bitwise CPU path) and for anything else (the masked_fill_ path). The EMA
skips its own masking pass only after the weights were re-masked, where the result is bit-identical."""

from __future__ import annotations

import pytest
import torch

from sparse_dm.sparsity import MaskedEMA, SparseEngine
from sparse_dm.sparsity.masks import apply_masks, zero_outside

SPECIALS = [float("nan"), float("inf"), -float("inf"), -0.0, 3.5]


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
