"""Timestep-dependent masks: routing by timestep, per-band exact counts and own-gradient growth
(one step's gradient, or each band's own running average: momentum), the cost over the sampler's
schedule, config errors, and bit-exact resume of a K-mask run."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.run_config import TINY_CHIRODIFF, compose_config
from omegaconf import OmegaConf
from torch import nn

from sparse_dm.diffusion import NoiseSchedule
from sparse_dm.diffusion.losses import per_sample_masked_mse
from sparse_dm.diffusion.samplers import ddim_sample
from sparse_dm.export import export
from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.planning.cost import compute_cost
from sparse_dm.run.checks import ConfigError, validate
from sparse_dm.run.load import load_module, module_from_lightning
from sparse_dm.sparsity.bands import (
    BAND_MASKS_SUFFIX,
    TimestepBands,
    band_masks,
    register_band_masks,
)
from sparse_dm.sparsity.bands_engine import BandedSparseEngine
from sparse_dm.sparsity.masks import register_masks
from sparse_dm.train import run
from sparse_dm.training.modules.chirodiff import ChiroDiffModule
from tests.training.test_ddp import SHORT, TWO_RANKS, assert_identical, rank_states, train_two_ranks
from tests.training.test_resume import CHIRODIFF, STEPS, assert_same_run, crash_at

T = 1000
BANDS = TimestepBands((500,), (0.6, 0.8), T)
BAND_OVERRIDES = ["+method.timestep_bands={boundaries:[500],sparsities:[0.6,0.8]}", "sparsity=0.7"]
ADAPTIVE_OVERRIDE = "+method.adaptive={loss_ema_decay:0.5,min_prune_rate:0.1}"


def tiny_net(seed: int = 0) -> ChiroDiffNet:
    torch.manual_seed(seed)
    return ChiroDiffNet(hidden_size=8, num_layers=1, num_timesteps=T)


def inputs(t: list[int], length: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(t), length, 3, generator=generator)
    lengths = torch.tensor([length - i % 2 for i in range(len(t))])
    return x, torch.tensor(t), lengths


def test_band_of_partitions_the_timesteps():
    bands = TimestepBands((250, 500, 900), (0.5, 0.6, 0.7, 0.8), T)
    t = torch.tensor([0, 249, 250, 499, 500, 899, 900, 999])
    assert bands.band_of(t).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [bands.band_of_step(int(v)) for v in t] == bands.band_of(t).tolist()
    assert bands.train_shares() == [0.25, 0.25, 0.4, 0.1]


def disjoint_engine() -> tuple[ChiroDiffNet, BandedSparseEngine, list[torch.Tensor]]:
    """Band 1's masks are the complement of band 0's, and every weight is nonzero: any mix-up of
    bands changes the output."""
    net = tiny_net()
    engine = BandedSparseEngine(net, TimestepBands((500,), (0.5, 0.5), T), grow="gradient", update_interval=3)
    firsts = [band_masks(w)[0].clone() for w in engine.weights]
    register_band_masks(engine.weights, [torch.stack([m, ~m]) for m in firsts])
    with torch.no_grad():
        for w in engine.weights:
            w.param.copy_(torch.randn_like(w.param).abs() + 0.1)
    return net, engine, firsts


def single_mask_copy(net: ChiroDiffNet, engine: BandedSparseEngine, band: int) -> ChiroDiffNet:
    """A plain single-mask model holding band `band`'s mask (its weights zeroed outside it)."""
    clone = copy.deepcopy(net)
    weights = [
        type(w)(w.name, clone.get_submodule(w.name.rpartition(".")[0]), w.attr) for w in engine.weights
    ]
    register_masks(weights, [band_masks(w)[band].clone() for w in engine.weights])
    return clone


def test_each_sample_uses_only_its_bands_mask():
    net, engine, _ = disjoint_engine()
    single = [single_mask_copy(net, engine, band) for band in (0, 1)]
    x, t, lengths = inputs([100, 700, 499, 500, 0, 999])
    routed = engine.router(x, t, lengths)
    for band, rows in enumerate(((t < 500).nonzero().flatten(), (t >= 500).nonzero().flatten())):
        assert torch.equal(routed[rows], single[band](x[rows], t[rows], lengths[rows]))
    assert not torch.allclose(single[0](x, t, lengths), single[1](x, t, lengths))  # bands really differ
    # DDIM: every step's band follows its timestep (steps at 980 ... 0 cross the boundary at 500).
    schedule = NoiseSchedule("linear", T, 1e-4, 2e-2)
    x_T = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(2))
    full = torch.full((3,), 5)
    banded = ddim_sample(lambda x, t: engine.router(x, t, full), x_T, schedule, num_steps=10)
    reference = ddim_sample(lambda x, t: single[int(t[0] >= 500)](x, t, full), x_T, schedule, num_steps=10)
    assert torch.equal(banded, reference)


def test_gradient_reaches_only_the_bands_positions_and_is_captured_per_band():
    net, engine, firsts = disjoint_engine()
    x, t, lengths = inputs([10, 20, 600, 30])
    noise = torch.randn_like(x)
    engine.router.begin_capture()
    per_sample = per_sample_masked_mse(engine.router(x, t, lengths), noise)
    per_sample.mean().backward()
    captured, samples = engine.router.end_capture()
    assert samples == [3, 1]
    band0 = (t < 500).nonzero().flatten()
    for i, (weight, m0) in enumerate(zip(engine.weights, firsts, strict=True)):
        # band 1's only sample: its gradient alone reaches the complement positions
        masked = [weight.param.detach().masked_fill(~m, 0.0).requires_grad_() for m in (m0, ~m0)]
        own = []
        for band, rows in enumerate((band0, (t >= 500).nonzero().flatten())):
            params = {w.name: w.param.detach().masked_fill(~band_masks(w)[band], 0.0) for w in engine.weights}
            params[weight.name] = masked[band]
            out = torch.func.functional_call(net, params, (x[rows], t[rows], lengths[rows]))
            loss = per_sample_masked_mse(out, noise[rows]).sum() / len(t)
            own.append(torch.autograd.grad(loss, masked[band])[0])
        # the router runs each band's rows through this very functional_call (same kernels, same
        # shapes; 1/N from mean() or sum()/N alike), and the masks are disjoint: bit-exact
        assert torch.equal(captured[0][i], own[0]), weight.name
        assert torch.equal(captured[1][i], own[1]), weight.name
        assert torch.equal(weight.param.grad, own[0] * m0 + own[1] * ~m0), weight.name


def train_steps(net, engine, steps, seed=3):
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 5, 3, generator=generator)
        t = torch.randint(0, T, (8,), generator=generator)
        optimizer.zero_grad()
        per_sample_masked_mse(engine.router(x, t, torch.full((8,), 5)), torch.randn_like(x)).mean().backward()
        engine.before_step()
        grads = [[g.clone() for g in band] for band in engine._band_grads] if engine._band_grads else None
        before = [band_masks(w).clone() for w in engine.weights]
        optimizer.step()
        report = engine.after_step(optimizer)
        yield optimizer, report, grads, before


@pytest.mark.parametrize("grow", ["gradient", "momentum", "random"])
def test_exact_counts_per_band_after_every_step(grow):
    net = tiny_net()
    engine = BandedSparseEngine(net, BANDS, grow=grow, prune_rate=0.3, update_interval=2)
    updates = 0
    for optimizer, report, grads, before in train_steps(net, engine, 12):
        engine.check_masks()  # exact count per band and layer, union == OR of bands
        for weight, targets in zip(engine.weights, zip(*engine.band_targets, strict=True), strict=True):
            assert [int(m.sum()) for m in band_masks(weight)] == list(targets)
            assert not weight.param[~band_masks(weight).any(0)].any(), "weights active in no band"
            for value in optimizer.state[weight.param].values():
                if value.shape == weight.param.shape:
                    assert not value[~weight.mask].any(), "optimizer state outside every band"
        if report is None:
            continue
        updates += 1
        changed = [(band_masks(w) != old).any() for w, old in zip(engine.weights, before, strict=True)]
        assert any(changed)
        if grow == "random":
            continue
        for i, (weight, old) in enumerate(zip(engine.weights, before, strict=True)):
            for band in range(BANDS.num_bands):
                grown = band_masks(weight)[band] & ~old[band]
                if not grown.any():
                    continue  # a layer whose p * active rounds to 0
                # grown positions are the band's own top-|gradient| (or |average|) among its inactive ones
                own = grads[band][i] if grow == "gradient" else engine.band_grad_ema[band][i]
                scores = own.abs()
                assert scores[grown].min() >= scores[~old[band] & ~grown].max(), (weight.name, band)
        assert not torch.equal(grads[0][0], grads[1][0])  # the bands' own gradients differ
        if grow == "momentum":
            assert not torch.equal(engine.band_grad_ema[0][0], engine.band_grad_ema[1][0])
    assert updates == 6  # steps 2, 4, ..., 12 (no run length set: no stop step)


AVERAGE_INTERVAL = 10
BAND_FAVOURITES = (5, 7)  # band k's persistent gradient: a flat position of the inactive row of a 2x4 weight


def grow_bands_after_constructed_averages(grad_scale: float = 1.0) -> tuple[BandedSparseEngine, list[int]]:
    """Both bands: row 0 active (|w| = 1..4), row 1 inactive. For 9 steps band k's captured gradient
    is 1 at BAND_FAVOURITES[k]; at the update step each band's gradient spikes (3) at the OTHER band's
    favourite. Gradients are written where the router's backward hooks accumulate them (scaled by
    `grad_scale`, as under AMP). Returns the position each band grew."""
    net = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]))
    engine = BandedSparseEngine(
        net,
        TimestepBands((500,), (0.5, 0.5), T),
        distribution="uniform",
        grow="momentum",
        prune_rate=0.25,  # floor(0.25 * 4 active) = 1 weight replaced per band
        update_interval=AVERAGE_INTERVAL,
        grad_ema_beta=0.9,
    )
    row0 = torch.tensor([[True] * 4, [False] * 4])
    register_band_masks(engine.weights, [torch.stack([row0, row0])])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    for step in range(1, AVERAGE_INTERVAL + 1):
        assert engine.router.capturing, f"momentum needs every step's band gradients (step {step})"
        for band, favourite in enumerate(BAND_FAVOURITES):
            grad = torch.zeros(8)
            if step < AVERAGE_INTERVAL:
                grad[favourite] = 1.0
            else:
                grad[BAND_FAVOURITES[1 - band]] = 3.0
            engine.router.captured[band][0] += grad_scale * grad.view(2, 4)
        net[0].weight.grad = torch.zeros(2, 4)
        engine.before_step(grad_scale)
        optimizer.step()
        engine.after_step(optimizer)
    assert engine.num_updates == 1
    grown = [(m & ~row0).flatten().nonzero().flatten().tolist() for m in band_masks(engine.weights[0])]
    assert all(len(g) == 1 for g in grown)
    return engine, [g[0] for g in grown]


def test_each_band_grows_where_its_own_gradient_average_is_largest():
    """Band 0's average favours position 5, band 1's favours 7; the update step's spikes point the
    other way, so growth by one step's gradient, or by the other band's average, grows elsewhere."""
    engine, grown = grow_bands_after_constructed_averages()
    assert grown == list(BAND_FAVOURITES)
    for band, favourite in enumerate(BAND_FAVOURITES):
        average = engine.band_grad_ema[band][0].flatten()
        assert average[favourite] == pytest.approx(0.9 * (1 - 0.9**9))
        assert average[BAND_FAVOURITES[1 - band]] == pytest.approx(0.1 * 3.0)
    # AMP: the captured gradients carry the loss scale; divided out, the averages are the same
    scaled, scaled_grown = grow_bands_after_constructed_averages(grad_scale=1024.0)
    assert scaled_grown == grown
    for band in range(2):
        assert torch.equal(scaled.band_grad_ema[band][0], engine.band_grad_ema[band][0])


def test_band_gradients_are_captured_only_when_growth_needs_them():
    """Gradient growth captures on update steps only (every other step runs without hooks); the
    per-band averages need every step while an update is still to come, and none after."""
    for grow, armed in (("gradient", [False, True, False, True]), ("random", [False] * 4)):
        engine = BandedSparseEngine(tiny_net(), BANDS, grow=grow, update_interval=2)
        seen = []
        for _ in range(4):
            seen.append(engine.router.capturing)
            engine.before_step()
            engine.after_step()
        assert seen == armed, grow
    engine = BandedSparseEngine(tiny_net(), BANDS, grow="momentum", update_interval=2)
    engine.set_total_steps(6)  # updates at 2 and 4; step 6 is the first without one
    seen = []
    for _ in range(6):
        seen.append(engine.router.capturing)
        engine.before_step()
        engine.after_step()
    assert seen == [True] * 5 + [False]


def test_equal_sampling_flops_over_the_ddim_schedule(tmp_path):
    bands = "+method.timestep_bands={boundaries:[500],sparsities:[0.85,0.95]}"
    cfg = compose_config(tmp_path, ["experiment=chirodiff_kanjivg", bands, "sparsity=0.9"])
    cost = compute_cost(cfg)
    info = cost["timestep_bands"]
    assert [b["sampling_steps"] for b in info["bands"]] == [25, 25]  # 50-step DDIM: 980, 960, ..., 0
    f0, f1 = (b["flops_forward"] for b in info["bands"])
    assert cost["flops_test_per_sample"] == 25 * f0 + 25 * f1
    single = compute_cost(compose_config(tmp_path, ["experiment=chirodiff_kanjivg", "sparsity=0.9"]))
    # ERK rounding makes 0.85 / 0.95 not exactly 0.9 on average; the helper finds the exact match
    assert abs(info["equal_sampling_flops_sparsity"] - 0.9) < 1e-3
    assert abs(single["flops_test_per_sample"] / cost["flops_test_per_sample"] - 1) < 2e-3
    skewed = compute_cost(
        compose_config(tmp_path, ["experiment=chirodiff_kanjivg", bands, "model.sampling.steps=3"])
    )
    assert [b["sampling_steps"] for b in skewed["timestep_bands"]["bands"]] == [2, 1]  # 667, 333, 0
    f0, f1 = (b["flops_forward"] for b in skewed["timestep_bands"]["bands"])
    assert skewed["flops_test_per_sample"] == 2 * f0 + f1


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+method.timestep_bands={boundaries:[0],sparsities:[0.5,0.9]}", "boundaries"),
        ("+method.timestep_bands={boundaries:[1000],sparsities:[0.5,0.9]}", "boundaries"),
        ("+method.timestep_bands={boundaries:[600,400],sparsities:[0.5,0.9,0.9]}", "boundaries"),
        ("+method.timestep_bands={boundaries:[500],sparsities:[0.5]}", "sparsities"),
        ("+method.timestep_bands={boundaries:[500],sparsities:[0.5,1.0]}", "sparsities"),
        ("+method.adaptive={loss_ema_decay:1.0,min_prune_rate:0.1}", "loss_ema_decay"),
        ("+method.adaptive={loss_ema_decay:0.9,min_prune_rate:0.9}", "min_prune_rate"),
    ],
)
def test_bad_band_or_adaptive_config_is_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        validate(compose_config(tmp_path, [*TINY_CHIRODIFF, "prune_rate=0.5", override]))


def test_bands_and_adaptive_need_a_method_that_uses_them(tmp_path):
    with pytest.raises(ConfigError, match=r"method\.timestep_bands with method=dense"):
        validate(
            compose_config(
                tmp_path, ["method=dense", "method.timestep_bands={boundaries:[5],sparsities:[0.1,0.2]}"]
            )
        )
    with pytest.raises(ConfigError, match=r"method\.adaptive with method=static"):
        validate(
            compose_config(
                tmp_path, ["method=static", "method.adaptive={loss_ema_decay:0.9,min_prune_rate:0.1}"]
            )
        )


def test_band_momentum_is_one_config_line_and_costs_its_dense_gradient_per_band(tmp_path):
    """Every step of the update window computes band k's dense gradient for band k's samples:
    2 f_S,k + f_D per band, weighted by the bands' shares of [0, T) (RigL's only at update steps)."""
    overrides = ["experiment=chirodiff_kanjivg", "method=rigl", *BAND_OVERRIDES]
    validate(compose_config(tmp_path, [*overrides, "method.grow=momentum"]))
    momentum = compute_cost(compose_config(tmp_path, [*overrides, "method.grow=momentum"]))
    random = compute_cost(compose_config(tmp_path, [*overrides, "method.grow=random"]))
    f_d = momentum["flops_forward_dense"]
    window = momentum["mask_updates_stop_step"] / momentum["train_steps"]  # updates happen before it
    assert 0 < window <= 1
    expected = sum(
        band["train_share"]
        * (window * (2 * band["flops_forward"] + f_d) + (1 - window) * 3 * band["flops_forward"])
        for band in momentum["timestep_bands"]["bands"]
    )
    assert momentum["flops_train_ratio"] == pytest.approx(expected / (3 * f_d))
    sparse_only = sum(b["train_share"] * b["flops_forward"] for b in random["timestep_bands"]["bands"])
    assert random["flops_train_ratio"] == pytest.approx(sparse_only / f_d)
    assert momentum["flops_test_per_sample"] == random["flops_test_per_sample"]


@pytest.fixture(scope="module")
def straight_banded(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight_banded")
    summary = run(
        compose_config(
            run_dir, [*CHIRODIFF, *BAND_OVERRIDES, ADAPTIVE_OVERRIDE, f"trainer.max_steps={STEPS}"]
        )
    )
    return run_dir, summary


def test_banded_adaptive_run_reports_bands_and_bounded_prune_rates(straight_banded):
    run_dir, summary = straight_banded
    for layer in summary["layers"]:
        assert layer["band_nnz"] == layer["band_target_nnz"]
        assert max(layer["band_nnz"]) <= layer["nnz"] <= sum(layer["band_nnz"])
    rates = [u["prune_rate"] for u in summary["prune_rate_effective"]]
    assert len(rates) == summary["mask_updates"] == 3
    assert all(0.1 <= p <= 0.5 for p in rates)
    assert rates[0] == 0.5  # the first window sets the reference rate
    assert summary["timestep_bands"]["sparsities"] == [0.6, 0.8]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    unions = {k[len("net.") : -len("_mask")]: v for k, v in state.items() if k.endswith("_mask")}
    for name, union in unions.items():
        assert torch.equal(union, state[f"net.{name}{BAND_MASKS_SUFFIX}"].any(0))
        assert not state[f"ema.{name.replace('.', '__')}"][~union].any(), f"EMA of {name} outside every band"
    # what memory and the checkpoint hold: the union of the band masks, not the densest band
    assert summary["params_stored"] == sum(int(union.sum()) for union in unions.values())
    assert summary["params_stored"] > summary["params_active"]


@pytest.mark.parametrize("suffix", [".safetensors", ".sdm"])
def test_export_keeps_the_band_masks_and_their_routing(tmp_path, straight_banded, suffix):
    run_dir, _ = straight_banded
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    path = export(
        OmegaConf.create(
            {"ckpt_path": str(ckpt), "run_dir": None, "out": str(tmp_path / f"m{suffix}"), "weights": "raw"}
        )
    )
    exported, _ = load_module(path)
    trained, _, _ = module_from_lightning(ckpt)
    pairs = zip(trained.timestep_bands.weights, exported.timestep_bands.weights, strict=True)
    assert all(torch.equal(band_masks(a), band_masks(b)) for a, b in pairs)
    x, t, lengths = inputs([100, 700, 499, 500, 0, 999])
    with torch.no_grad():
        assert torch.equal(exported.denoiser(x, t, lengths), trained.denoiser(x, t, lengths))
        generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        assert all(map(torch.equal, exported.generate(3, generator()), trained.generate(3, generator())))


def test_banded_adaptive_run_resumes_bit_exactly(tmp_path, straight_banded, monkeypatch):
    overrides = [*CHIRODIFF, *BAND_OVERRIDES, ADAPTIVE_OVERRIDE, f"trainer.max_steps={STEPS}"]
    monkeypatch.setattr(ChiroDiffModule, "training_step", crash_at(ChiroDiffModule, 9))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_config(tmp_path, overrides))
    monkeypatch.undo()
    resumed = run(compose_config(tmp_path, [*overrides, "resume=auto"]))
    run_dir, straight = straight_banded
    assert_same_run(tmp_path, run_dir)
    assert resumed["prune_rate_effective"] == straight["prune_rate_effective"]
    assert OmegaConf.load(tmp_path / "config.yaml").method.timestep_bands.boundaries == [500]


def test_banded_momentum_run_resumes_bit_exactly(tmp_path, monkeypatch):
    """Each band's gradient average rides in the checkpoint: resumed at step 7 (between the updates
    at 6 and 9), the run ends with the masks, weights and averages of the uninterrupted one."""
    overrides = [*CHIRODIFF, *BAND_OVERRIDES, "method.grow=momentum", f"trainer.max_steps={STEPS}"]
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    run(compose_config(straight_dir, overrides))
    monkeypatch.setattr(ChiroDiffModule, "training_step", crash_at(ChiroDiffModule, 9))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_config(resumed_dir, overrides))
    monkeypatch.undo()
    saved = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 7
    (engine_state,) = [v for k, v in saved["callbacks"].items() if "DSTCallback" in k]
    averages = engine_state["band_grad_ema"]
    assert len(averages) == 2 and all(a.abs().sum() > 0 for band in averages for a in band)
    run(compose_config(resumed_dir, [*overrides, "resume=auto"]))
    assert_same_run(resumed_dir, straight_dir)


@pytest.mark.parametrize("grow", ["gradient", "momentum"])
def test_two_ranks_keep_identical_band_masks(tmp_path, grow):
    """Each rank captures its own band gradients; reduced over ranks (momentum: at every step, before
    they enter the per-band averages), every rank grows the same positions (the cross-rank checksum
    covers every band's masks; the probe compares the engine states, averages included)."""
    overrides = [*TINY_CHIRODIFF, *SHORT, *TWO_RANKS, "method=rigl", f"method.grow={grow}", *BAND_OVERRIDES]
    result = train_two_ranks(tmp_path, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    for tag in ("start", "update1", "update2", "end"):
        rank0, rank1 = rank_states(tmp_path / "probe", tag)
        assert_identical(rank0, rank1, tag)
    start, end = rank_states(tmp_path / "probe", "start")[0], rank_states(tmp_path / "probe", "end")[0]
    bands = [k for k in end["module"] if k.endswith(BAND_MASKS_SUFFIX)]
    assert bands and any(not torch.equal(start["module"][k], end["module"][k]) for k in bands)
    if grow == "momentum":
        averages = end["engine"]["band_grad_ema"]
        assert len(averages) == 2 and all(a.abs().sum() > 0 for band in averages for a in band)
