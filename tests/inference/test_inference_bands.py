"""The sparse inference form of a timestep-band model: one form per band, routed by each sample's
timestep, equals the banded dense model (mixed-timestep batches and DDIM), for ChiroDiff and the
generic path (UNet), from a checkpoint and from an `.sdm`, through `sparse_dm.sample`."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from helpers.compiled_loop import LOOPS, recurrence_for
from helpers.run_config import TINY_CHIRODIFF, compose_config, evaluate_config
from helpers.tiny_extractor import NAME as TINY_EXTRACTOR
from helpers.tiny_extractor import install as install_extractor
from helpers.tiny_run import fake_run
from helpers.tiny_unet import tiny_unet
from helpers.tolerance import assert_close_computed, reductions, sampling_bound
from omegaconf import OmegaConf

from sparse_dm.evaluate import evaluate
from sparse_dm.export import export
from sparse_dm.inference import (
    BandedForm,
    Thresholds,
    banded_inference_form,
    gru_loops,
    install_inference_form,
)
from sparse_dm.inference.chirodiff import SparseChiroDiffNet
from sparse_dm.inference.sparse_linear import SparseLinear
from sparse_dm.run.build import build_run
from sparse_dm.sample import sample
from sparse_dm.sparsity.bands import TimestepBands, sync_union
from sparse_dm.sparsity.bands_engine import BandedSparseEngine
from tests.commands.test_sample import dense_sampling_bound, sample_cfg
from tests.inference.test_inference import ALL_CSR, CSR_VS_DENSE
from tests.sparsity.test_timestep_bands import (
    BAND_OVERRIDES,
    T,
    disjoint_engine,
    inputs,
    single_mask_copy,
    tiny_net,
)

MIXED_T = [100, 700, 499, 500, 0, 999]


def max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def one_by_one(call, x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    """The banded model's output without any batch split: every sample on its own (one band)."""
    return torch.cat([call(x[i : i + 1], t[i : i + 1], *(r[i : i + 1] for r in rest)) for i in range(len(t))])


def test_each_band_form_is_its_bands_network_and_mixed_batches_route_by_t():
    """Disjoint bands (band 1 = complement of band 0, every weight nonzero): a sample run with the
    other band's form gives a clearly different output."""
    net, engine, _ = disjoint_engine()
    form, choices = banded_inference_form(net, engine.bands, ALL_CSR)
    assert all(isinstance(f, SparseChiroDiffNet) for f in form.forms)
    assert {c.name.split(".")[0] for c in choices} == {"band0", "band1"}
    x, t, lengths = inputs(MIXED_T)
    with torch.no_grad():
        per_band = [f(x, t, lengths) for f in form.forms]
        for band, band_form_output in enumerate(per_band):
            expected, chain = reductions(single_mask_copy(net, engine, band), x, t, lengths)
            assert_close_computed(
                band_form_output, expected, reduction_length=chain.length, scale=chain.scale, why=CSR_VS_DENSE
            )
        assert max_gap(per_band[0], per_band[1]) > 0.1  # a wrong band cannot pass
        expected, chain = reductions(net, engine.router, x, t, lengths, call=one_by_one)
        assert_close_computed(  # one call per sample, each on its own: the longest call bounds
            form(x, t, lengths), expected, reduction_length=chain.longest, scale=chain.scale, why=CSR_VS_DENSE
        )


@pytest.mark.parametrize("loop", LOOPS)
def test_band_densities_choose_kernels_per_band(loop):
    """Band 0 at density 0.5 keeps proj/out dense, band 1 at 0.1 stores them CSR; the routed output
    still equals the banded dense model, with either GRU loop."""
    net = tiny_net()
    engine = BandedSparseEngine(net, TimestepBands((500,), (0.5, 0.9), T), distribution="uniform")
    thresholds = Thresholds(linear=0.3, gru=1.0, recurrence=recurrence_for(loop))
    form, choices = banded_inference_form(net, engine.bands, thresholds)
    assert gru_loops(form) == (
        "torch ops" if loop == "torch" else f"compiled ({thresholds.recurrence.threading})"
    )
    kernels = {c.name: c.kernel for c in choices}
    assert kernels["band0.proj"] == kernels["band0.out"] == "dense"
    assert kernels["band1.proj"] == kernels["band1.out"] == "csr"
    x, t, lengths = inputs(MIXED_T)
    with torch.no_grad():
        expected, chain = reductions(net, engine.router, x, t, lengths, call=one_by_one)
        assert_close_computed(
            form(x, t, lengths), expected, reduction_length=chain.longest, scale=chain.scale, why=CSR_VS_DENSE
        )


def test_generic_band_form_of_a_conditional_unet_equals_the_banded_model():
    """Any net (here a one-level class-conditional UNet): masked Linears CSR, the rest dense; the
    class labels are split with the batch."""
    torch.manual_seed(0)
    net = tiny_unet(num_classes=3, channel_mult=[1], attention_resolutions=[1])
    engine = BandedSparseEngine(net, TimestepBands((500,), (0.5, 0.8), T))
    with torch.no_grad():  # the UNet's last conv starts at zero: give every layer live values
        for param in net.parameters():
            param.add_(0.1 * torch.randn_like(param))
        sync_union(engine.weights)
    form, _ = banded_inference_form(net, engine.bands, Thresholds(linear=1.0, gru=0.0))
    assert all(any(isinstance(m, SparseLinear) for m in f.modules()) for f in form.forms)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 4, 4, generator=generator)
    t, labels = torch.tensor([10, 900, 499, 500]), torch.tensor([0, 2, 1, 3])  # 3: the null label
    with torch.no_grad():
        expected, chain = reductions(net, engine.router, x, t, labels, call=one_by_one)
        assert_close_computed(
            form(x, t, labels), expected, reduction_length=chain.longest, scale=chain.scale, why=CSR_VS_DENSE
        )
        assert max_gap(form.forms[0](x, t, labels), form.forms[1](x, t, labels)) > 1e-2
    assert form.null_label == net.null_label  # read by classifier-free guidance


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_ddim_sampling_with_the_band_form_equals_the_banded_model(tmp_path, weights):
    """The module's own DDIM sampler: every step calls one band's form once on the whole batch,
    following t across the band boundary, and draws what the banded dense model draws."""
    overrides = [*TINY_CHIRODIFF, *BAND_OVERRIDES, "model.sampling.eta=0.0"]
    module, _, _ = build_run(compose_config(tmp_path, overrides))
    module.set_length_pool(torch.tensor([2, 6, 9, 15]))
    module.eval()
    router = module.timestep_bands
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for param in module.net.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
        sync_union(router.weights)
        for shadow in filter(torch.is_floating_point, module.ema.buffers()):
            shadow.add_(0.1 * torch.randn(shadow.shape, generator=generator))
        module.ema.remask(module.net)
    with module.ema_weights() if weights == "ema" else nullcontext():
        dense, n, scale = sampling_bound(module, 6, torch.Generator().manual_seed(0), steps=10)
    install_inference_form(module, ALL_CSR, weights=weights)
    assert isinstance(module.net, BandedForm) and module.timestep_bands is None
    calls: list[tuple[int, int]] = []
    for band, form in enumerate(module.net.forms):
        form.register_forward_hook(lambda _m, args, _out, band=band: calls.append((band, len(args[0]))))
    with module.sampling_weights():
        banded = module.generate(6, torch.Generator().manual_seed(0), steps=10)
    for got, expected in zip(banded, dense, strict=True):  # DDIM amplifies each step's eps error
        assert_close_computed(got, expected, reduction_length=n, scale=scale, why=f"{CSR_VS_DENSE}, DDIM")
    assert len(calls) == 10 and {size for _, size in calls} == {6}
    assert [band for band, _ in calls] == [1] * 5 + [0] * 5  # t = 900 ... 500, then 400 ... 0


def test_sample_and_evaluate_a_banded_checkpoint_and_its_export_with_the_sparse_backend(tmp_path):
    ckpt = fake_run(tmp_path / "run", tuple(BAND_OVERRIDES))
    sdm = export(OmegaConf.create({"ckpt_path": str(ckpt), "run_dir": None, "out": None, "weights": "ema"}))
    dense = sample(sample_cfg(tmp_path, ckpt, backend="dense"))
    sparse = sample(sample_cfg(tmp_path, ckpt, backend="sparse"))
    exported = sample(sample_cfg(tmp_path, sdm, backend="sparse"))
    arrays = [np.load(r["arrays"], allow_pickle=False) for r in (dense, sparse, exported)]
    assert len(arrays[0]["lengths"]) == 5
    n, scale = dense_sampling_bound(sample_cfg(tmp_path, ckpt, backend="dense"))
    for other in arrays[1:]:
        assert np.array_equal(other["lengths"], arrays[0]["lengths"])
        assert_close_computed(
            other["deltas"], arrays[0]["deltas"], reduction_length=n, scale=scale, why=f"{CSR_VS_DENSE}, DDIM"
        )
    record = json.loads((tmp_path / "out" / "samples_sparse.json").read_text())
    assert (record["weights"], record["backend"]) == ("as exported", "sparse")

    (tmp_path / "run" / "summary.json").write_text("{}")
    results = {}
    for backend in ("dense", "sparse"):
        cfg = sample_cfg(tmp_path, ckpt)  # for its inference thresholds (no calibration here)
        eval_cfg = evaluate_config([f"ckpt_path='{ckpt}'", f"backend={backend}"])
        eval_cfg.inference = cfg.inference
        eval_cfg.num_samples, eval_cfg.batch_size, eval_cfg.sampling_steps, eval_cfg.num_reference = (
            8,
            8,
            4,
            8,
        )
        eval_cfg.device = "cpu"
        eval_cfg.fidelity.feature_extractor = TINY_EXTRACTOR
        eval_cfg.fidelity.weights_path = str(install_extractor(tmp_path))
        eval_cfg.fidelity.kid_subset_size = 4
        results[backend] = evaluate(eval_cfg)
    assert results["sparse"]["backend"] == "sparse" and results["dense"]["sparse_form"] is None
    assert results["sparse"]["sparse_form"]["csr_matrices"] > 0  # the band forms ran CSR kernels
    assert results["sparse"]["fid"] == pytest.approx(results["dense"]["fid"], rel=1e-3, abs=1e-3)
