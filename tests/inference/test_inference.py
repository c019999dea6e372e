"""The sparse inference form equals the masked dense network: per layer and end to end (DDIM)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.compiled_loop import LOOPS, recurrence_for
from helpers.run_config import TINY_CHIRODIFF, compose_config
from helpers.tolerance import Reductions, assert_close_computed, reductions, sampling_bound
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sparse_dm.inference import Thresholds, inference_form, install_inference_form
from sparse_dm.inference.chirodiff import SparseChiroDiffNet
from sparse_dm.inference.packing import pack_columns, paired_input
from sparse_dm.inference.sparse_gru import SparseBiGRU
from sparse_dm.inference.sparse_linear import SparseLinear
from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.run.build import build_run
from sparse_dm.sparsity.masks import find_prunable, random_mask, register_masks

ALL_CSR = Thresholds(linear=1.0, gru=1.0)
NEVER_CSR = Thresholds(linear=0.0, gru=0.0)
# Why a sparse form and its masked dense reference round differently: the CSR kernels (MKL's CSR
# product, the compiled GRU loop) sum each row's nonzeros in another order and blocking than MKL's
# dense GEMM / nn.GRU; masked-out terms are exact zeros on the dense side, so both sum the same terms.
CSR_VS_DENSE = "CSR kernels vs dense GEMM/nn.GRU: same terms, another summation order"


def masked_with_live_values(net: nn.Module, density: float, seed: int = 0) -> nn.Module:
    """Random masks on every prunable weight, then nonzero values written OUTSIDE the masks too, so a
    form that forgot a mask computes something else. Returns the masked dense reference."""
    generator = torch.Generator().manual_seed(seed)
    weights = find_prunable(net)
    masks = [random_mask(w.param.shape, int(density * w.param.numel()), generator) for w in weights]
    register_masks(weights, masks)
    reference = copy.deepcopy(net)  # masked values (zeros outside the masks)
    with torch.no_grad():
        for w in weights:
            w.param.add_(torch.randn(w.param.shape, generator=generator) * ~w.mask)
    return reference


def variable_lengths(batch: int, max_len: int, generator: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, max_len + 1, (batch,), generator=generator)
    lengths[0], lengths[1] = max_len, 1  # the longest fills the padding, one sequence of length 1
    return lengths


def bigru_case(loop: str, sparse_storage: bool, hidden: int, batch: int, max_len: int, seed: int = 0):
    """A 3-layer masked bi-GRU with live values outside its masks, its inference form, and inputs."""
    torch.manual_seed(seed)
    gru = nn.GRU(5, hidden, num_layers=3, batch_first=True, bidirectional=True)
    reference = masked_with_live_values(gru, density=0.3, seed=seed)
    form = SparseBiGRU(gru, [sparse_storage] * 3, [sparse_storage] * 3, recurrence_for(loop))
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, max_len, 5, generator=generator)
    return reference, form, x, variable_lengths(batch, max_len, generator)


def bigru_outputs(
    reference: nn.GRU, form: SparseBiGRU, x: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, Reductions]:
    """The inference form's padded outputs, nn.GRU's, and the reference's reduction chain."""
    batch, max_len, _ = x.shape
    with torch.no_grad():
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        (states, _), chain = reductions(reference, packed)
        expected, _ = pad_packed_sequence(states, batch_first=True, total_length=max_len)
        columns = pack_columns(lengths, batch, max_len, form.lanes)
        got = form.unpack(form(paired_input(x, columns), columns), columns)
    return got, expected, chain


def assert_bigru_matches(
    reference: nn.GRU, form: SparseBiGRU, x: torch.Tensor, lengths: torch.Tensor
) -> None:
    got, expected, chain = bigru_outputs(reference, form, x, lengths)
    assert_close_computed(got, expected, reduction_length=chain.length, scale=chain.scale, why=CSR_VS_DENSE)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("sparse_storage", [True, False])
def test_sparse_bigru_equals_packed_nn_gru(loop, sparse_storage):
    assert_bigru_matches(*bigru_case(loop, sparse_storage, hidden=8, batch=6, max_len=9))


@pytest.mark.parametrize("loop", LOOPS)
def test_sparse_bigru_reuses_its_buffers_only_for_the_same_steps(loop):
    """Two batches with the same size and the same number of real columns but different step
    structures: buffers made for the first must not serve the second."""
    reference, form, x, _ = bigru_case(loop, True, hidden=8, batch=4, max_len=6)
    for lengths in ([6, 1, 1, 4], [3, 3, 3, 3], [6, 1, 1, 4]):
        assert_bigru_matches(reference, form, x, torch.tensor(lengths))


def test_sparse_linear_equals_masked_linear():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    reference = masked_with_live_values(linear, density=0.25)
    x = torch.randn(2, 5, 12)
    expected, chain = reductions(reference, x)  # one row sum: 12 products and the bias
    assert_close_computed(
        SparseLinear(linear)(x), expected, reduction_length=chain.length, scale=chain.scale, why=CSR_VS_DENSE
    )


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("packed", [True, False])
def test_sparse_chirodiff_equals_masked_dense(conditional, packed, loop):
    torch.manual_seed(0)
    kwargs = {"num_classes": 3, "class_embed_dim": 4} if conditional else {}
    net = ChiroDiffNet(hidden_size=8, num_layers=2, **kwargs)
    reference = masked_with_live_values(net, density=0.2).eval()
    form, choices = inference_form(net, Thresholds(1.0, 1.0, recurrence_for(loop)))
    assert isinstance(form, SparseChiroDiffNet)
    assert {c.kernel for c in choices} == {"csr"}
    batch, max_len = 5, 11
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, max_len, 3, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    lengths = variable_lengths(batch, max_len, generator) if packed else None
    cond = torch.tensor([0, 2, 1, 1, 0]) if conditional else None
    with torch.no_grad():
        expected, chain = reductions(reference, x, t, lengths, cond)
        for _ in range(2):  # the second call reuses the cached packing and workspace
            assert_close_computed(
                form(x, t, lengths, cond), expected, reduction_length=chain.length, scale=chain.scale,
                why=CSR_VS_DENSE,
            )  # fmt: skip
        if packed:  # new lengths must not reuse them
            other = lengths.flip(0)
            expected, chain = reductions(reference, x, t, other, cond)
            assert_close_computed(
                form(x, t, other, cond), expected, reduction_length=chain.length, scale=chain.scale,
                why=CSR_VS_DENSE,
            )  # fmt: skip


def test_thresholds_choose_kernels_per_matrix():
    torch.manual_seed(0)
    net = ChiroDiffNet(hidden_size=8, num_layers=2)
    masked_with_live_values(net, density=0.2)
    dense_form, choices = inference_form(net, NEVER_CSR)
    assert isinstance(dense_form, ChiroDiffNet)  # the GRU is too dense for the CSR loop: stays nn.GRU
    assert {c.kernel for c in choices} == {"dense"}
    mixed, choices = inference_form(net, Thresholds(linear=0.15, gru=1.0))
    kernels = {c.name: c.kernel for c in choices}
    # every mask has density 0.2; GRU input matrices are stored paired (two directions side by side:
    # half that density, plus a bias column), proj and out as they are
    assert [kernels[f"gru.input.{layer}"] for layer in range(2)] == ["csr", "csr"]
    assert kernels["proj"] == kernels["out"] == "dense"
    assert isinstance(mixed, SparseChiroDiffNet)
    x, t = torch.randn(2, 4, 3), torch.tensor([3, 500])
    expected, chain = reductions(dense_form, x, t)
    assert_close_computed(
        mixed(x, t), expected, reduction_length=chain.length, scale=chain.scale, why=CSR_VS_DENSE
    )


def test_generic_form_replaces_sparse_linears_only():
    net = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    reference = masked_with_live_values(net, density=0.5)
    form, choices = inference_form(net, Thresholds(linear=0.6, gru=0.0))
    assert isinstance(form[2], SparseLinear) and isinstance(form[0], nn.Conv1d)
    x = torch.randn(4, 3, 4)
    expected, chain = reductions(reference, x)
    assert_close_computed(
        form(x), expected, reduction_length=chain.length, scale=chain.scale, why=CSR_VS_DENSE
    )
    assert len(choices) == 3


@pytest.mark.parametrize("loop", LOOPS)
def test_ddim_samples_equal_on_both_backends(tmp_path, loop):
    """End to end: the module's own sampler (DDIM, as configured) with the dense net and with the
    sparse form, same seed -> the same drawings."""
    overrides = [*TINY_CHIRODIFF, "model.net.num_layers=2", "method=static", "sparsity=0.8"]
    module, _, _ = build_run(compose_config(tmp_path, [*overrides, "model.sampling.eta=0.0"]))
    module.set_length_pool(torch.tensor([2, 6, 9, 15]))
    module.eval()
    with torch.no_grad():
        for shadow in filter(torch.is_floating_point, module.ema.buffers()):
            shadow.add_(0.1 * torch.randn_like(shadow))
        module.ema.remask(module.net)
    dense = module.generate(6, torch.Generator().manual_seed(0), steps=10)
    with module.ema_weights():
        dense_ema, n, scale = sampling_bound(module, 6, torch.Generator().manual_seed(0), steps=10)
    install_inference_form(module, Thresholds(1.0, 1.0, recurrence_for(loop)), weights="ema")
    assert isinstance(module.net, SparseChiroDiffNet)
    assert (module.net.gru.recurrence is None) == (loop == "torch")
    with module.sampling_weights():
        sparse = module.generate(6, torch.Generator().manual_seed(0), steps=10)
    assert [len(s) for s in sparse] == [len(s) for s in dense_ema]
    for got, expected in zip(sparse, dense_ema, strict=True):  # DDIM amplifies each step's eps error
        assert_close_computed(got, expected, reduction_length=n, scale=scale, why=f"{CSR_VS_DENSE}, DDIM")
    assert max((a - b).abs().max() for a, b in zip(dense, dense_ema, strict=True)) > 1e-2  # EMA mattered
