"""ChiroDiff on its compact layers (forward_columns) against the masked dense model in float64."""

from __future__ import annotations

import pytest
import torch

from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.sparse_backend import SparseBiGRU, SparseLinear
from sparse_dm.sparse_backend.chirodiff import forward_columns
from sparse_dm.sparsity import SparseEngine
from tests.sparse_backend.kernels import kernels_for
from tests.sparse_backend.oracle import tolerance


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_sparse_chirodiff_matches_the_masked_model(sparsity: float) -> None:
    torch.manual_seed(0)
    net = ChiroDiffNet(hidden_size=16, num_layers=2)
    engine = SparseEngine(net, sparsity, seed=0)
    dense = ChiroDiffNet(hidden_size=16, num_layers=2)
    dense.load_state_dict(net.state_dict(), strict=False)  # masks stay on `net`: weights are zero outside
    dense = dense.double()
    kernels = kernels_for("compiled")
    layers = {"gru": SparseBiGRU(net.gru, kernels), "proj": SparseLinear.from_linear(net.proj, kernels),
              "out": SparseLinear.from_linear(net.out, kernels)}  # fmt: skip
    for name, layer in layers.items():
        setattr(net, name, layer)
        layer.dense_grad_requested = True
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 1, 5, 9, 2, 7])
    x = torch.randn(6, 9, 3, generator=generator, dtype=torch.float64)
    t = torch.randint(0, 1000, (6,), generator=generator)
    real = torch.arange(9)[None, :] < lengths[:, None]
    weights = torch.randn(6, 9, 3, generator=generator, dtype=torch.float64) * real[..., None]
    got = forward_columns(net, x.float(), t, lengths)
    want = dense(x, t, lengths)
    (got * weights.float()).sum().backward()
    (want * weights).sum().backward()
    # forward chain: 9 steps x (fan-in 32 + 16 + 1) x 2 layers, then the two linear layers (33 + 25 terms);
    # scale: the positions (cumsum of 9 deltas) times the largest weight row sums (< 4 here) and biases
    chain = 9 * 49 * 2 + 33 + 25
    scale = float(x.abs().sum(dim=1).max()) * 8
    torch.testing.assert_close(got.double() * real[..., None], want * real[..., None], rtol=0,
                               atol=tolerance(chain, scale))  # fmt: skip
    assert torch.count_nonzero(got[~real]) == 0
    columns = int(lengths.sum())
    for weight in engine.weights:
        module, attr = weight.name.split(".", 1)
        layer = layers[module]
        oracle_grad = dense.get_parameter(weight.name).grad
        bound = tolerance(chain + columns, scale * max(1.0, float(oracle_grad.abs().max())))
        torch.testing.assert_close(layer.values(attr).grad.double(), oracle_grad[weight.mask], rtol=0,
                                   atol=bound, msg=weight.name)  # fmt: skip
        torch.testing.assert_close(layer.dense_grad(attr).double(), oracle_grad, rtol=0, atol=bound,
                                   msg=weight.name)  # fmt: skip
    for name in ("proj.bias", "out.bias", "gru.bias_hh_l1_reverse"):
        oracle_grad = dense.get_parameter(name).grad
        bound = tolerance(chain + columns, scale * max(1.0, float(oracle_grad.abs().max())))
        torch.testing.assert_close(net.get_parameter(name).grad.double(), oracle_grad, rtol=0, atol=bound)
