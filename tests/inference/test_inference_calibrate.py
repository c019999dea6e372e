"""Calibration on the workload: the candidates cover every fixed choice, the race and the choice (on
a fake clock: no timing is asserted), the cache and what keys it, the module's own sampling as the
workload, config checks."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from helpers.compiled_loop import recurrence_for
from helpers.run_config import TINY_CHIRODIFF, compose_config
from torch import nn

from sparse_dm.diffusion import NoiseSchedule, ddim_sample
from sparse_dm.inference import (
    BandedForm,
    Thresholds,
    calibrate,
    calibrated_thresholds,
    gru_loops,
    inference_form,
)
from sparse_dm.inference.calibrate import (
    CACHE_FILE,
    CalibrationProtocol,
    InferenceSettings,
    resolve_settings,
    time_candidates,
)
from sparse_dm.inference.chirodiff import SparseChiroDiffNet
from sparse_dm.inference.config import default_inference_config
from sparse_dm.inference.convert import candidate_forms, gru_density
from sparse_dm.inference.kernels import is_csr
from sparse_dm.inference.prepare import prepare
from sparse_dm.inference.sparse_linear import SparseLinear
from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.run.build import build_run
from sparse_dm.sparsity import SparseEngine
from tests.sparsity.test_timestep_bands import BAND_OVERRIDES

TINY = {"rounds": 2, "runs_per_sample": 1, "ddim_steps": 1, "linear_candidates": 8, "seed": 0}


@pytest.fixture
def one_thread():
    """Tests that really time candidates run on one thread: on a shared, oversubscribed CPU two OpenMP
    threads wait at every op's barrier for the one that was descheduled (seconds per tiny sample)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def settings_for(tmp_path, loop: str = "compiled", **overrides) -> InferenceSettings:
    recurrence_for(loop)  # skips visibly where the compiled loop cannot build
    cfg = {**default_inference_config(), "cache_dir": str(tmp_path), "calibration": TINY}
    return resolve_settings({**cfg, **overrides, "gru_loop": loop})


def sparse_chirodiff(sparsity: float = 0.8, hidden: int = 8) -> ChiroDiffNet:
    torch.manual_seed(0)
    net = ChiroDiffNet(hidden_size=hidden, num_layers=2)
    SparseEngine(net, sparsity, distribution="erk")
    return net.eval()


def ddim_workload(lengths: torch.Tensor):
    schedule = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    x_T = torch.randn(len(lengths), int(lengths.max()), 3, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def run(form: nn.Module) -> None:
        ddim_sample(lambda x, t: form(x, t, lengths), x_T, schedule, TINY["ddim_steps"])

    return run


def form_of(net: nn.Module, thresholds: Thresholds) -> str:
    form, choices = inference_form(net, thresholds)
    return json.dumps([gru_loops(form), [(c.name, c.kernel) for c in choices]])


@pytest.mark.parametrize("loop", ["compiled", "torch"])
def test_candidates_are_every_distinct_fixed_choice(tmp_path, loop):
    """Whatever fixed thresholds a user could set, the form they give is one of the candidates (so
    the best candidate is at least as fast as the best fixed choice); no two candidates are alike."""
    net = sparse_chirodiff()
    settings = settings_for(tmp_path, loop)
    reference, candidates = candidate_forms(net, None, settings)
    assert len({c.signature for c in candidates}) == len(candidates)
    assert reference.signature in {c.signature for c in candidates}
    assert form_of(net, reference.thresholds) == form_of(net, Thresholds(0.0, 0.0))  # all dense
    forms = {form_of(net, c.thresholds) for c in candidates}
    densities = sorted({c.density for c in inference_form(net, Thresholds(1.0, 1.0))[1]})
    linear_grid = sorted({0.0, 1.0, *densities, *(d + 1e-4 for d in densities)})
    gru = gru_density(net.gru)
    for linear in linear_grid:
        for gru_threshold in (0.0, gru - 1e-4, gru, 1.0):
            assert form_of(net, Thresholds(linear, gru_threshold, settings.recurrence)) in forms
    sparse_loop = gru_loops(inference_form(net, Thresholds(1.0, 1.0, settings.recurrence))[0])
    assert {gru_loops(c.form) for c in candidates} == {"nn.GRU", sparse_loop}


def test_fixed_thresholds_stay_fixed_among_the_candidates(tmp_path):
    net = sparse_chirodiff()
    _, candidates = candidate_forms(net, None, settings_for(tmp_path, threshold_linear=0.3))
    assert {c.thresholds.linear for c in candidates} == {0.3}
    assert {c.thresholds.gru for c in candidates} == {0.0, gru_density(net.gru)}  # nn.GRU or the CSR GRU


def fake_clock(monkeypatch) -> SimpleNamespace:
    """calibrate's clock, advanced only by the fake workloads below."""
    clock = SimpleNamespace(now=0.0, strftime=time.strftime)
    clock.perf_counter = lambda: clock.now
    monkeypatch.setattr(calibrate, "time", clock)
    return clock


def race(monkeypatch, costs: list[list[float]], rounds: int) -> tuple[list[list[float]], list[int]]:
    """time_candidates on forms whose k-th round costs costs[i][k % len]; (ratios, calls per form)."""
    clock, calls = fake_clock(monkeypatch), [0] * len(costs)
    forms = [nn.Identity() for _ in costs]

    def workload(form: nn.Module) -> None:
        i = forms.index(form)
        clock.now += costs[i][(calls[i] // 2) % len(costs[i])]  # 2 calls a round: untimed, timed
        calls[i] += 1

    protocol = CalibrationProtocol(rounds, runs_per_sample=1, ddim_steps=1, linear_candidates=2, seed=0)
    return time_candidates(forms, workload, protocol), calls


def test_the_race_drops_forms_no_round_saw_as_fast_as_the_leader(monkeypatch):
    ratios, calls = race(monkeypatch, [[10.0], [5.0], [20.0], [4.0]], rounds=5)
    assert ratios == [[2.0, 2.0], [0.5, 0.5], [2.5] * 5]
    assert calls == [10, 4, 4, 10]
    # overlapping rounds: neither form is out, the best median decides later
    ratios, calls = race(monkeypatch, [[10.0], [5.0, 3.5], [4.0, 5.0]], rounds=5)
    assert [len(r) for r in ratios] == [5, 5] and calls == [10, 10, 10]


def csr_count(form: nn.Module) -> int:
    """How much of a form runs sparse: the fake cost model of the tests below (which call the form
    once, as calibration records what the denoiser is called with)."""
    with torch.no_grad():
        form(torch.zeros(2, 3, 3), torch.tensor([1, 900]))
    count = 0
    for module in form.modules():
        count += isinstance(module, SparseLinear)
        if isinstance(module, SparseChiroDiffNet):
            count += 2 * (module.gru.recurrence is not None)
            count += is_csr(module.proj_weight) + is_csr(module.out_weight)
    return count


def test_auto_keeps_the_all_dense_form_when_nothing_beats_it(tmp_path, monkeypatch):
    clock = fake_clock(monkeypatch)

    def workload(form: nn.Module) -> None:  # every sparse matrix costs time
        clock.now += 1.0 + csr_count(form)

    chosen = calibrated_thresholds(sparse_chirodiff(), settings_for(tmp_path), workload)
    assert chosen.thresholds == Thresholds(0.0, 0.0)
    assert chosen.record["chosen"].startswith("threshold_linear=0, threshold_gru=0:")


def test_auto_picks_the_fastest_candidate_and_caches_what_it_measured(tmp_path, monkeypatch):
    net = sparse_chirodiff()
    clock = fake_clock(monkeypatch)

    def workload(form: nn.Module) -> None:  # every sparse matrix saves time, the compiled GRU most
        clock.now += 10.0 - csr_count(form)

    settings = settings_for(tmp_path)
    chosen = calibrated_thresholds(net, settings, workload).thresholds
    everything_csr = Thresholds(1.0, 1.0, settings.recurrence)
    assert form_of(net, chosen) == form_of(net, everything_csr)  # compiled GRU, proj and out CSR
    (entry,) = json.loads((tmp_path / CACHE_FILE).read_text()).values()
    assert entry["thresholds"] == {"linear": chosen.linear, "gru": chosen.gru}
    best = max(entry["speedup_vs_dense"], key=lambda row: row["speedup_median"])
    assert best["speedup_median"] == pytest.approx(10.0 / 6.0) and "compiled" in best["label"]


def test_measured_once_per_key_then_read_from_the_cache(tmp_path, monkeypatch, one_thread):
    """Real timing of a tiny model (which form wins is not asserted), then the cache: the same key
    reads it; another protocol, workload, model, thread count or GRU loop measures again."""
    net = sparse_chirodiff()
    lengths = torch.tensor([5, 3, 7, 1])
    settings = settings_for(tmp_path)
    first = calibrated_thresholds(net, settings, ddim_workload(lengths))
    assert first.measured and (tmp_path / CACHE_FILE).is_file()
    monkeypatch.setattr(calibrate, "time_candidates", lambda *_: pytest.fail("re-measured"))
    again = calibrated_thresholds(net, settings, ddim_workload(lengths))
    assert (again.thresholds, again.record, again.measured) == (first.thresholds, first.record, False)
    other_protocol = settings_for(tmp_path, calibration={**TINY, "seed": 1})
    changed = [  # (net, settings, lengths) with one part changed
        (net, other_protocol, lengths),
        (net, settings, torch.tensor([5, 3, 7, 2])),
        (net, settings, lengths[:3]),  # the batch
        (sparse_chirodiff(0.7), settings, lengths),  # the masks
        (sparse_chirodiff(hidden=12), settings, lengths),  # the shapes
        (net, settings_for(tmp_path, "torch"), lengths),  # the GRU loop
    ]
    for other_net, other_settings, other_lengths in changed:
        with pytest.raises(pytest.fail.Exception, match="re-measured"):
            calibrated_thresholds(other_net, other_settings, ddim_workload(other_lengths))
    torch.set_num_threads(2)  # the fixture restores the count
    with pytest.raises(pytest.fail.Exception, match="re-measured"):
        calibrated_thresholds(net, settings, ddim_workload(lengths))


def test_the_module_workload_is_its_own_sampling_at_the_sampling_batch(tmp_path, monkeypatch, one_thread):
    """prepare(backend=sparse) with auto thresholds times the module's own generate: the denoiser
    sees the requested batch, with lengths drawn from the module's pool of data lengths."""
    overrides = [*TINY_CHIRODIFF, "model.net.num_layers=2", "method=static", "sparsity=0.8"]
    module, _, _ = build_run(compose_config(tmp_path, overrides))
    pool = [2, 6, 9, 15]
    module.set_length_pool(torch.tensor(pool))
    module.eval()
    calls = []
    real = calibrate.call_signature

    def spy(net: nn.Module, workload) -> str:
        signature = real(net, workload)
        calls.extend(json.loads(signature))
        return signature

    monkeypatch.setattr(calibrate, "call_signature", spy)
    cfg = {**default_inference_config(), "cache_dir": str(tmp_path), "calibration": TINY, "gru_loop": "torch"}
    record = prepare(module, "sparse", "ema", cfg, batch=5)
    assert len(calls) == TINY["ddim_steps"]  # one denoiser call per DDIM step
    x, _, lengths, cond = calls[0]
    drawn = json.loads(lengths.split("=", 1)[1])
    assert len(drawn) == 5 and set(drawn) <= set(pool) and cond == "None"
    assert x == f"torch.float32(5, {max(drawn)}, 3)"
    (entry,) = json.loads((tmp_path / CACHE_FILE).read_text()).values()
    assert record["thresholds"] == entry["thresholds"] and record["calibration"] == entry


def test_a_banded_module_calibrates_its_band_forms_each_gru_by_its_own_density(tmp_path, one_thread):
    """Bands with different sparsities have different GRU densities: `auto` also tries the form
    where one band runs the CSR GRU and the other nn.GRU, and installs what it chose."""
    module, _, _ = build_run(compose_config(tmp_path, [*TINY_CHIRODIFF, *BAND_OVERRIDES]))
    module.set_length_pool(torch.tensor([2, 6, 9, 15]))
    module.eval()
    cfg = {**default_inference_config(), "cache_dir": str(tmp_path), "calibration": TINY, "gru_loop": "torch"}
    record = prepare(module, "sparse", "raw", cfg, batch=4)
    assert isinstance(module.net, BandedForm) and module.timestep_bands is None
    labels = [row["label"] for row in record["calibration"]["speedup_vs_dense"]]
    assert any("GRU nn.GRU, torch ops," in label for label in labels)  # one band sparse, one dense
    for only in ("GRU nn.GRU,", "GRU torch ops,"):  # both bands dense, both sparse
        assert any(only in label for label in labels)


def test_config_is_checked_naming_the_key():
    cfg = default_inference_config()
    fixed = {**cfg, "threshold_linear": 0.2, "threshold_gru": 0.1}
    assert resolve_settings(fixed).fixed == Thresholds(0.2, 0.1)
    assert resolve_settings(cfg).fixed is None  # auto: calibrate on the workload
    for key, value, message in [
        ("threshold_gru", 1.5, r"inference.threshold_gru must be 'auto' or a density in \[0, 1\]"),
        ("threshold_linear", "often", r"inference.threshold_linear must be 'auto'"),
        ("gru_loop", "fast", r"inference.gru_loop must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve_settings({**cfg, key: value})
    for key, value in [("rounds", 0), ("runs_per_sample", 0), ("ddim_steps", 0), ("linear_candidates", 1)]:
        with pytest.raises(ValueError, match=rf"inference.calibration.{key}"):
            resolve_settings({**cfg, "calibration": {**TINY, key: value}})
    with pytest.raises(ValueError, match=r"inference.calibration.rounds is missing"):
        resolve_settings({**cfg, "calibration": {k: v for k, v in TINY.items() if k != "rounds"}})
