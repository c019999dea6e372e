"""FLOPs and parameter accounting: uses per weight and the paper's train/test conventions."""

import pytest
import torch
from torch import nn

from sparse_dm.sparsity.flops import cost_summary, forward_flops, measure_weight_uses


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.gru = nn.GRU(8, 4, num_layers=1, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        h = self.conv(x)  # (1, 8, 4, 4)
        seq = h.flatten(2).transpose(1, 2)  # (1, 16, 8)
        out, _ = self.gru(seq)
        return self.fc(out)


def test_uses_count_output_positions_rows_and_timesteps():
    with torch.device("meta"):
        net = Net()
        uses = {w.name: w.uses for w in measure_weight_uses(net, (torch.zeros(1, 3, 8, 8),))}
    assert uses["conv.weight"] == 16
    assert uses["gru.weight_ih_l0"] == uses["gru.weight_hh_l0_reverse"] == 16
    assert uses["fc.weight"] == 16


def test_paper_convention_and_rigl_dense_gradient_overhead():
    net = nn.Linear(10, 10, bias=False)
    weight_uses = measure_weight_uses(net, (torch.zeros(1, 10),))
    active = {"weight": 25}
    f_d, f_s = forward_flops(weight_uses), forward_flops(weight_uses, active)
    assert (f_d, f_s) == (200.0, 50.0)
    static = cost_summary(net, weight_uses, active, 50, 1000, 128, None, False)
    assert static["flops_train"] == 3 * f_s * 1000
    assert static["flops_test_per_sample"] == 50 * f_s
    assert static["flops_train_ratio"] == static["flops_test_ratio"] == 0.25
    rigl = cost_summary(net, weight_uses, active, 50, 1000, 128, 9, True)
    assert rigl["flops_train"] == pytest.approx(1000 * (3 * f_s * 9 + 2 * f_s + f_d) / 10)
    per_sample = cost_summary(net, weight_uses, active, 50, 1000, 128, None, False, convention="per_sample")
    assert per_sample["flops_train"] == 128 * static["flops_train"]
    assert static["params_active"] / static["params_prunable"] == 0.25
