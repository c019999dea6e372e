"""What a position that changes bands at an update starts from.

Band masks share ONE weight tensor, so a position grown into band k that band j already uses cannot start at
0 like a RigL-grown weight without also changing band j's trained weight: it keeps the shared value and its
optimizer state ("warm regrowth", documented in docs/bands.md). A position that joins the union (no band used
it) starts exactly like a RigL grown weight: value 0, fresh optimizer state. A position that leaves every band
is zeroed and its state cleared."""

from __future__ import annotations

import torch
from torch import nn

from sparse_dm.sparsity.bands import TimestepBands, band_masks, register_band_masks
from sparse_dm.sparsity.bands_engine import BandedSparseEngine

T = 1000
WARM, COLD, LEFT = 4, 6, 0  # flat positions of the 2 x 4 weight (see the test)


def test_warm_regrowth_keeps_the_shared_value_and_a_new_union_position_starts_at_zero():
    net = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    engine = BandedSparseEngine(
        net, TimestepBands((500,), (0.5, 0.5), T), distribution="uniform", grow="gradient",
        prune_rate=0.25, update_interval=2,  # floor(0.25 * 4) = 1 weight replaced per band
    )  # fmt: skip
    band0 = torch.tensor([[True, True, True, True], [False, False, False, False]])
    band1 = torch.tensor([[True, True, False, False], [True, True, False, False]])
    register_band_masks(engine.weights, [torch.stack([band0, band1])])  # union: 0..5; 6, 7 in no band
    weight = engine.weights[0]
    with torch.no_grad():  # the values the masks above hold (the engine zeroed its own first draw's gaps)
        weight.param.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]]))
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.0, weight_decay=0.0)  # state, values unchanged
    for step in (1, 2):
        if step == 2:
            assert engine.router.capturing, "gradient growth captures each band's gradient at the update"
            grads = torch.zeros(2, 2, 4)
            grads[0].view(-1)[WARM] = 9.0  # band 0 grows position 4, which band 1 uses
            grads[1].view(-1)[COLD] = 9.0  # band 1 grows position 6, which no band uses
            for band in (0, 1):  # what the router's backward hooks accumulate from each band's samples
                engine.router.captured[band][0] += grads[band]
                engine.router.captured_samples[band] += 1
        net[0].weight.grad = torch.ones(2, 4)
        engine.before_step()
        optimizer.step()
        if step == 2:
            state_before = {k: v.clone() for k, v in optimizer.state[weight.param].items() if v.dim()}
            value_before = weight.param.detach().clone()
        engine.after_step(optimizer)
    assert engine.num_updates == 1
    masks = band_masks(weight)
    flat = weight.param.detach().view(-1)
    # both bands pruned their smallest |w|, position 0: it left every band
    assert not masks[:, 0, 0].any() and flat[LEFT] == 0
    assert masks[0].view(-1)[WARM] and masks[1].view(-1)[WARM]
    assert masks[1].view(-1)[COLD] and not masks[0].view(-1)[COLD]
    assert flat[WARM] == value_before.view(-1)[WARM] == 5.0  # warm: the shared value
    assert flat[COLD] == 0.0  # cold: like a RigL grown weight
    for key, before in state_before.items():
        after = optimizer.state[weight.param][key].view(-1)
        assert after[WARM] == before.view(-1)[WARM] != 0, key  # warm: its optimizer state kept
        assert after[COLD] == 0 and after[LEFT] == 0, key  # joined / left the union: fresh state
