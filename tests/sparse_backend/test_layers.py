"""Sparse layers (reference and compiled) against masked dense float64 models (tolerances: oracle.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_dm.sparse_backend import ColumnPlan, SparseBiGRU, SparseLayout, SparseLinear
from tests.sparse_backend.kernels import BASELINE_IMPLS, IMPLS, kernels_for
from tests.sparse_backend.oracle import exact_mask, float64_copy, masked_gru, pack, packed_batch, tolerance

DENSITIES = [0.05, 0.3, 1.0]


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_layout_round_trip_is_bit_exact(density: float) -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(37, 53, generator=generator) < density
    dense = torch.randn(37, 53, generator=generator).masked_fill(~mask, 0.0)
    layout = SparseLayout.from_mask(mask)
    values = layout.compact(dense)
    assert layout.nnz == int(mask.sum()) and values.shape == (layout.nnz,)
    assert torch.equal(layout.expand(values).view(torch.int32), dense.view(torch.int32))
    assert torch.equal(layout.mask(), mask)
    assert all(t.dtype == torch.int32 for t in (layout.crow, layout.col, layout.ccol, layout.csc_perm))
    # CSC through the permutation: column by column, rows ascending, the same values
    csc = torch.sparse_csc_tensor(
        layout.ccol.long(), layout.csc_row.long(), values[layout.csc_perm.long()], (37, 53)
    ).to_dense()
    assert torch.equal(csc, dense)


def linear_pair(density: float, seed: int, impl: str = "reference") -> tuple[SparseLinear, nn.Linear]:
    torch.manual_seed(seed)
    linear = nn.Linear(70, 40)
    mask = exact_mask((40, 70), density, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        linear.weight.mul_(mask)
    sparse = SparseLinear.from_linear(linear, kernels=kernels_for(impl), mask=mask)
    return sparse, linear.double()


@pytest.mark.parametrize("impl", [*IMPLS, *BASELINE_IMPLS])
@pytest.mark.parametrize("density", DENSITIES)
def test_linear_matches_masked_dense(impl: str, density: float) -> None:
    sparse, dense = linear_pair(density, seed=3, impl=impl)
    x = torch.randn(2, 33, 70, dtype=torch.float64)
    x32 = x.float().requires_grad_()
    x64 = x.clone().requires_grad_()
    sparse.dense_grad_requested = True
    y32, y64 = sparse(x32), dense(x64)
    upstream = torch.randn_like(y64)
    (y32 * upstream.float()).sum().backward()
    (y64 * upstream).sum().backward()
    layout = sparse.layouts["weight"]
    mask = layout.mask()
    # forward sums 70 products (+ bias), input grads 40, weight grads the 66 rows of x
    scale = float(x.abs().max() * dense.weight.detach().abs().max() * 70 + dense.bias.detach().abs().max())
    torch.testing.assert_close(y32.double(), y64, rtol=0, atol=tolerance(71, scale))
    grad_scale = float(upstream.abs().max() * dense.weight.detach().abs().max() * 40)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=0, atol=tolerance(40, grad_scale))
    w_scale = float(upstream.abs().max() * x.abs().max() * 66)
    w_grad = dense.weight.grad
    torch.testing.assert_close(
        sparse.weight_values.grad.double(), w_grad[mask], rtol=0, atol=tolerance(66, w_scale)
    )
    dense_grad = sparse.dense_grad("weight")
    torch.testing.assert_close(dense_grad.double(), w_grad, rtol=0, atol=tolerance(66, w_scale))
    torch.testing.assert_close(
        sparse.bias.grad.double(),
        dense.bias.grad,
        rtol=0,
        atol=tolerance(66, float(upstream.abs().max()) * 66),
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_dense_grad_only_on_request(impl: str) -> None:
    sparse, _ = linear_pair(0.3, seed=4, impl=impl)
    sparse(torch.randn(5, 70)).sum().backward()
    assert sparse.dense_grad("weight") is None


GRU_LENGTHS = [7, 1, 4, 7, 2, 5, 1]  # variable, unsorted, length-1 sequences included


def run_gru(module: nn.Module, x, lengths):
    output, h_n = module(pack(x, lengths))
    return output.data, h_n


@pytest.mark.parametrize("impl", [*IMPLS, *BASELINE_IMPLS])
@pytest.mark.parametrize("density", DENSITIES)
def test_bigru_matches_masked_nn_gru(impl: str, density: float) -> None:
    gru, masks = masked_gru(input_size=5, hidden=8, layers=2, density=density, seed=11)
    sparse = SparseBiGRU(gru, kernels=kernels_for(impl))
    oracle = float64_copy(gru)
    x32, lengths = packed_batch(GRU_LENGTHS, 5, seed=12, dtype=torch.float32)
    x64 = x32.detach().double().requires_grad_()
    sparse.dense_grad_requested = True
    out32, h32 = run_gru(sparse, x32, lengths)
    out64, h64 = run_gru(oracle, x64, lengths)
    up_out, up_h = torch.randn_like(out64), torch.randn_like(h64)
    ((out32 * up_out.float()).sum() + (h32 * up_h.float()).sum()).backward()
    ((out64 * up_out).sum() + (h64 * up_h).sum()).backward()
    got, want = (out32, h32, x32.grad), (out64, h64, x64.grad)
    check_gru(sparse, oracle, masks, got, want, max(GRU_LENGTHS), len(GRU_LENGTHS))


def check_gru(sparse, oracle, masks, got, want, steps: int, batch: int) -> None:
    """Outputs, h_n, input, value, bias and dense weight gradients. Forward reduction chain: steps x
    (fan-in + 1) per layer; gradients add the sums over the packed columns. Gates are bounded (|s|, |tanh|
    <= 1), so the scale is the largest |input|, |state| (<= 1) times the largest weight row sum."""
    hidden, layers = sparse.hidden_size, sparse.num_layers
    fan_in = max(sparse.input_size, 2 * hidden) + hidden + 1
    chain = steps * fan_in * layers
    columns = steps * batch
    weights = [p.detach() for n, p in oracle.named_parameters() if n.startswith("weight")]
    row_sum = max(float(w.abs().sum(dim=1).max()) for w in weights)
    scale = max(1.0, float(want[2].abs().max())) * (1.0 + row_sum)
    names = ["output", "h_n", "input grad"]
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tolerance(chain, scale), msg=name)
    for name, param in oracle.named_parameters():
        grad_tol = tolerance(chain + columns, scale * max(1.0, float(param.grad.abs().max())))
        if name.startswith("weight"):
            mask = masks[name]
            torch.testing.assert_close(
                sparse.values(name).grad.double(),
                param.grad[mask],
                rtol=0,
                atol=grad_tol,
                msg=f"{name} values",
            )
            dense = sparse.dense_grad(name)
            assert dense is not None, name
            torch.testing.assert_close(dense.double(), param.grad, rtol=0, atol=grad_tol, msg=f"{name} dense")
        else:
            torch.testing.assert_close(
                getattr(sparse, name).grad.double(), param.grad, rtol=0, atol=grad_tol, msg=name
            )


@pytest.mark.parametrize("impl", IMPLS)
def test_bigru_full_length_batch_first_tensor(impl: str) -> None:
    gru, _ = masked_gru(input_size=4, hidden=6, layers=1, density=0.5, seed=21)
    sparse = SparseBiGRU(gru, kernels=kernels_for(impl))
    x = torch.randn(3, 5, 4)
    got, h_got = sparse(x)
    want, h_want = float64_copy(gru)(x.double())
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tolerance(5 * 11, 2.0 * 6))
    torch.testing.assert_close(h_got.double(), h_want, rtol=0, atol=tolerance(5 * 11, 2.0 * 6))


@pytest.mark.parametrize("density", [0.05, 1.0])
def test_compiled_bigru_at_the_chirodiff_shape(density: float) -> None:
    """13 -> 96, 3 layers, KanjiVG-like lengths (up to 57 points, two of length 1): the default model."""
    kernels = kernels_for("compiled")
    generator = torch.Generator().manual_seed(5)
    lengths = [57, 1, 1, *torch.randint(2, 58, (21,), generator=generator).tolist()]
    gru, masks = masked_gru(input_size=13, hidden=96, layers=3, density=density, seed=7)
    sparse, oracle = SparseBiGRU(gru, kernels=kernels), float64_copy(gru)
    x32, lengths_t = packed_batch(lengths, 13, seed=8, dtype=torch.float32)
    x64 = x32.detach().double().requires_grad_()
    sparse.dense_grad_requested = True
    out32, h32 = run_gru(sparse, x32, lengths_t)
    out64, h64 = run_gru(oracle, x64, lengths_t)
    up_out, up_h = torch.randn_like(out64), torch.randn_like(h64)
    ((out32 * up_out.float()).sum() + (h32 * up_h.float()).sum()).backward()
    ((out64 * up_out).sum() + (h64 * up_h).sum()).backward()
    got, want = (out32, h32, x32.grad), (out64, h64, x64.grad)
    check_gru(sparse, oracle, masks, got, want, max(lengths), len(lengths))


@pytest.mark.parametrize("impl", IMPLS)
def test_bigru_dense_grad_only_on_request_and_accumulates(impl: str) -> None:
    gru, masks = masked_gru(input_size=5, hidden=8, layers=1, density=0.3, seed=31)
    sparse = SparseBiGRU(gru, kernels=kernels_for(impl))
    x, lengths = packed_batch([4, 2, 3], 5, seed=32, dtype=torch.float32)
    run_gru(sparse, x, lengths)[0].sum().backward()
    assert all(sparse.dense_grad(name) is None for name in sparse.weight_names)
    sparse.zero_grad()
    sparse.dense_grad_requested = True
    for _ in range(2):
        run_gru(sparse, x, lengths)[0].sum().backward()
    columns = 2 * 9  # two passes over 9 packed columns: the same products, summed in another order
    for name in sparse.weight_names:
        dense, values = sparse.dense_grad(name), sparse.values(name).grad
        bound = tolerance(columns, columns * float(dense.abs().max()))
        torch.testing.assert_close(dense[masks[name]], values, rtol=0, atol=bound)
    sparse.clear_dense_grads()
    assert all(sparse.dense_grad(name) is None for name in sparse.weight_names)


def test_set_layout_keeps_the_parameter_and_its_size() -> None:
    gru, masks = masked_gru(input_size=5, hidden=8, layers=1, density=0.3, seed=41)
    sparse = SparseBiGRU(gru, kernels=None)
    name = "weight_hh_l0_reverse"
    param = sparse.values(name)
    new_mask = masks[name].flatten().roll(7).view_as(masks[name])  # same count, other positions
    new_values = torch.arange(param.numel(), dtype=torch.float32)
    sparse.set_layout(name, SparseLayout.from_mask(new_mask), new_values)
    assert sparse.values(name) is param and torch.equal(param.detach(), new_values)
    assert torch.equal(sparse.mask(name), new_mask)
    assert torch.equal(sparse.dense_weight(name)[new_mask], new_values)
    grown = new_mask.clone()
    grown[~new_mask] = True  # every position: another nnz
    with pytest.raises(ValueError, match="nnz"):
        sparse.set_layout(name, SparseLayout.from_mask(grown), torch.zeros(grown.numel()))


@pytest.mark.parametrize("impl", IMPLS)
def test_bigru_refuses_an_initial_state(impl: str) -> None:
    gru, _ = masked_gru(input_size=4, hidden=6, layers=1, density=0.5, seed=51)
    with pytest.raises(ValueError, match="hx"):
        SparseBiGRU(gru, kernels=kernels_for(impl))(torch.randn(2, 3, 4), torch.zeros(2, 2, 6))


def test_linear_forward_columns_equals_row_major() -> None:
    sparse, _ = linear_pair(0.3, seed=61, impl="compiled")
    x = torch.randn(40, 70)
    lanes = sparse.kernels.lanes
    x_fm = torch.nn.functional.pad(x.t(), (0, -(-40 // lanes) * lanes - 40)).contiguous()
    torch.testing.assert_close(sparse.forward_columns(x_fm)[:, :40].t(), sparse(x), rtol=0, atol=0)


def test_pooled_buffers_two_graphs_and_a_refused_second_backward() -> None:
    """Two forwards before their backwards (gradient accumulation) each keep their own saved state; a
    second backward through one graph is refused, not run on buffers another step may have reused."""
    gru, _ = masked_gru(input_size=5, hidden=8, layers=2, density=0.4, seed=71)
    sparse, oracle = SparseBiGRU(gru, kernels=kernels_for("compiled")), float64_copy(gru)
    batches = [packed_batch(lengths, 5, seed=72 + i, dtype=torch.float32) for i, lengths in
               enumerate(([5, 3, 1], [4, 4, 2, 1]))]  # fmt: skip
    outputs = [run_gru(sparse, x, lengths)[0] for x, lengths in batches]
    sum(out.sum() for out in outputs).backward()
    for x, lengths in batches:
        run_gru(oracle, x.detach().double(), lengths)[0].sum().backward()
    for name in sparse.weight_names:
        want = oracle.get_parameter(name).grad[sparse.mask(name)]
        bound = tolerance(2 * 5 * 25 * 2 + 16, 8 * max(1.0, float(want.abs().max())))
        torch.testing.assert_close(sparse.values(name).grad.double(), want, rtol=0, atol=bound, msg=name)
    out = run_gru(sparse, *batches[0])[0].sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        out.backward()


def test_forward_columns_leaves_padding_columns_zero() -> None:
    """A consumer of forward_columns may reduce over every column (a bias gradient does): padding stays 0."""
    gru, _ = masked_gru(input_size=5, hidden=8, layers=2, density=0.5, seed=81)
    sparse = SparseBiGRU(gru, kernels=kernels_for("compiled"))
    x, lengths = packed_batch([6, 3, 3, 1, 2], 5, seed=82, dtype=torch.float32)
    packed = pack(x, lengths)
    plan = ColumnPlan.build(packed.batch_sizes, sparse.kernels.lanes)
    columns = torch.zeros(plan.columns, 5).index_copy(0, plan.index, packed.data.detach()).t().contiguous()
    padding = torch.ones(plan.columns, dtype=torch.bool)
    padding[plan.index] = False
    assert padding.any()
    for out in sparse.forward_columns(columns, plan):
        assert torch.count_nonzero(out[:, padding]) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_other_dtypes_are_refused_not_converted(impl: str) -> None:
    gru, _ = masked_gru(input_size=4, hidden=6, layers=1, density=0.5, seed=91)
    with pytest.raises(ValueError, match="float32"):
        SparseBiGRU(gru, kernels=kernels_for(impl))(torch.randn(2, 3, 4, dtype=torch.float64))
    sparse, _ = linear_pair(0.3, seed=92, impl=impl)
    with pytest.raises(ValueError, match="float32"):
        sparse(torch.randn(3, 70, dtype=torch.float64))


def test_evaluation_without_a_graph_returns_the_lent_buffers() -> None:
    gru, _ = masked_gru(input_size=5, hidden=8, layers=2, density=0.5, seed=93)
    sparse = SparseBiGRU(gru, kernels=kernels_for("compiled"))
    x, lengths = packed_batch([4, 2, 1], 5, seed=94, dtype=torch.float32)
    with torch.no_grad():
        run_gru(sparse, x, lengths)
        pooled = {id(buffer) for buffer in sparse.scratch.free}
        run_gru(sparse, x, lengths)
    assert len(pooled) == 2 and {id(buffer) for buffer in sparse.scratch.free} == pooled  # hprev, saved
