"""The compiled GRU loop: equal to nn.GRU on awkward shapes, thread counts and instruction sets
(builds for baseline x86-64 levels too), its padded column layout, how it is built and cached, and
what happens when it cannot be."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.compiled_loop import X86_LANES, X86_LEVELS, cpu_flags, recurrence_for, recurrence_for_level
from helpers.tolerance import assert_close_computed, reductions
from torch import nn

from sparse_dm.inference import Thresholds, compiled
from sparse_dm.inference.calibrate import resolve_recurrence, resolve_settings
from sparse_dm.inference.compiled import KernelUnavailable, load_recurrence
from sparse_dm.inference.config import default_inference_config
from sparse_dm.inference.convert import inference_form
from sparse_dm.inference.packing import pack_columns, paired_input
from sparse_dm.inference.sparse_gru import SparseBiGRU
from sparse_dm.kernels import build as kernel_build
from sparse_dm.models.chirodiff import ChiroDiffNet
from tests.inference.test_inference import bigru_case, bigru_outputs

# The loop vs nn.GRU, per gate pre-activation a = sum_k w_k h_k + b (n terms), as Higham's bound
# (helpers.tolerance) sees it. nn.GRU's error is <= gamma_n S, S = sum|w_k h_k| + |b| <= the
# `reductions` scale (|h| < 1). The loop sums the same terms refolded onto the shifted state
# u = (h + 1) / 2 in [0, 1]: sum_k 2 w_k u_k + (b - sum_k w_k), each |term| summing to <= 3 S, and
# the folded bias was itself rounded once (<= gamma_n S), so its error is <= 4 gamma_n S: together
# 5 gamma_n S = float_bound(n, SHIFTED_SCALE * S). Its elementwise part per step and layer - three
# logistic functions (exp < 2 ulp, one add, one divide), tanh as 2 s(2a) - 1, the lerp - moves a
# state by a few u against torch's 1-ulp sigmoid and tanh (an r or z error times |W_n h| <= S adds
# u S); ELEMENTWISE_TERMS extra terms per step and layer bound it as part of the chain.
SHIFTED_SCALE = 2.5
ELEMENTWISE_TERMS = 8
LOOP_VS_GRU = "compiled loop vs nn.GRU: same terms on the shifted state, another order, own exp"


def assert_loop_matches_nn_gru(
    reference: nn.GRU, form: SparseBiGRU, x: torch.Tensor, lengths: torch.Tensor
) -> None:
    got, expected, chain = bigru_outputs(reference, form, x, lengths)
    length = chain.length + ELEMENTWISE_TERMS * int(lengths.max()) * reference.num_layers
    scale = SHIFTED_SCALE * chain.scale
    assert_close_computed(got, expected, reduction_length=length, scale=scale, why=LOOP_VS_GRU)


def run_on_threads(threads: int, fn) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_wide_batches_and_odd_hidden_sizes_match_nn_gru(threads):
    """130 sequences: steps of more than 64 columns (several vector groups per row) and partial
    vectors; hidden 20 is no multiple of the vector length."""
    case = bigru_case("compiled", True, hidden=20, batch=130, max_len=12, seed=3)
    run_on_threads(threads, lambda: assert_loop_matches_nn_gru(*case))


def expected_lanes() -> int:
    """The lanes the kernel should pick for this CPU: its widest float vectors."""
    flags = cpu_flags()
    return 16 if "avx512f" in flags else 8 if "avx" in flags else 4


@pytest.mark.parametrize("level", sorted(X86_LEVELS))
@pytest.mark.parametrize("threads", [1, 2])
def test_builds_for_baseline_x86_levels_match_nn_gru(level, threads):
    """The same source built for x86-64-v2 (SSE4.2, no FMA: 4 lanes) and x86-64-v3 (AVX2 + FMA: 8
    lanes) gives nn.GRU's results within the same bound as the -march=native build: nothing in it
    depends on one instruction set or one vector width."""
    recurrence = recurrence_for_level(level)
    assert recurrence.lanes == X86_LANES[level]
    reference, _, x, lengths = bigru_case("compiled", True, hidden=20, batch=130, max_len=12, seed=3)
    form = SparseBiGRU(reference, [True] * 3, [True] * 3, recurrence)
    run_on_threads(threads, lambda: assert_loop_matches_nn_gru(reference, form, x, lengths))


def test_the_native_build_uses_this_cpus_widest_vectors():
    assert recurrence_for("compiled").lanes == expected_lanes()


def test_both_directions_are_computed_the_same_on_one_or_two_threads():
    _, form, x, lengths = bigru_case("compiled", True, hidden=12, batch=40, max_len=10)
    columns = pack_columns(lengths, 40, 10, form.lanes)
    outputs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outputs.append(form(paired_input(x, columns), columns).clone())
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outputs[0], outputs[1])


def test_padded_layout_round_trips_the_real_columns():
    lengths = torch.tensor([3, 7, 1, 7, 5])
    plain, padded = pack_columns(lengths, 5, 8), pack_columns(lengths, 5, 8, lanes=4)
    assert padded.active == plain.active
    assert all(offset % 4 == 0 for offset in padded.offsets)
    assert torch.equal(padded.source_rows[padded.real], plain.source_rows)
    assert torch.equal(padded.sorted_batch[padded.real], plain.sorted_batch)
    assert torch.equal(padded.real[plain.mirror], padded.mirror[padded.real])  # same mirror pairs
    filler = torch.ones(padded.num_columns, dtype=torch.bool)
    filler[padded.real] = False
    assert torch.equal(padded.mirror[filler], torch.nonzero(filler).flatten())  # padding mirrors itself
    assert bool((padded.source_rows[filler] == 5 * 8).all())  # and reads the appended zero row
    x = torch.randn(5, 8, 2)
    assert torch.equal(paired_input(x, padded)[:, padded.real], paired_input(x, plain))


@pytest.mark.parametrize("loop", ["torch", "compiled"])
def test_columns_packed_for_the_other_loop_are_refused(loop):
    _, form, x, lengths = bigru_case(loop, True, hidden=8, batch=3, max_len=4)
    columns = pack_columns(lengths, 3, 4, lanes=16 if loop == "torch" else 1)
    with pytest.raises(ValueError, match=r"lanes="):
        form(paired_input(x, columns), columns)


def test_a_paired_input_of_the_wrong_shape_never_reaches_the_kernel():
    _, form, x, lengths = bigru_case("compiled", True, hidden=8, batch=3, max_len=4)
    columns = pack_columns(lengths, 3, 4, form.lanes)
    paired = paired_input(x, columns)
    for wrong in (paired[:-1], paired[:, :-16]):
        with pytest.raises(ValueError, match=r"paired input must have shape"):
            form(wrong.contiguous(), columns)


def test_float64_is_refused_by_the_loop_and_kept_dense_by_the_converter():
    recurrence = recurrence_for("compiled")
    gru = nn.GRU(3, 4, batch_first=True, bidirectional=True).double()
    with pytest.raises(ValueError, match=r"float32"):
        SparseBiGRU(gru, [True], [True], recurrence)
    net = ChiroDiffNet(hidden_size=8, num_layers=1).double().eval()
    form, _ = inference_form(net, Thresholds(1.0, 1.0, recurrence))
    assert isinstance(form.gru, nn.GRU)
    x, t = torch.randn(2, 4, 3, dtype=torch.float64), torch.tensor([3, 500])
    expected, chain = reductions(net, x, t)  # proj and out CSR in float64, the GRU dense
    assert_close_computed(form(x, t), expected, reduction_length=chain.length, scale=chain.scale, why="CSR")


def test_built_once_per_source_and_rebuilt_when_it_changes(tmp_path, monkeypatch):
    recurrence_for("compiled")  # skips visibly where no compiler works
    builds = []
    real_build = kernel_build.build
    monkeypatch.setattr(kernel_build, "build", lambda *a: (builds.append(a), real_build(*a)))
    load = load_recurrence.__wrapped__  # bypass the per-process cache
    first = load(tmp_path)
    assert load(tmp_path).library == first.library and len(builds) == 1
    changed = tmp_path / "changed.c"
    changed.write_text(compiled.SOURCE.read_text() + "\n/* an edit */\n")
    monkeypatch.setattr(compiled, "SOURCE", changed)
    assert load(tmp_path).library != first.library and len(builds) == 2
    assert first.lanes >= 1 and first.library.is_file()


def test_no_compiler_auto_warns_and_falls_back_compiled_refuses(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or clang
    monkeypatch.delenv("CC", raising=False)
    with caplog.at_level(logging.WARNING):
        assert resolve_recurrence("auto", tmp_path / "auto") is None
    assert "no C compiler found" in caplog.text and "torch-op" in caplog.text
    with pytest.raises(KernelUnavailable, match=r"inference.gru_loop=compiled: no C compiler"):
        resolve_recurrence("compiled", tmp_path / "compiled")
    with pytest.raises(ValueError, match=r"inference.gru_loop must be one of"):
        resolve_settings({**default_inference_config(), "threshold_linear": 1.0, "threshold_gru": 1.0,
                            "gru_loop": "fast"})  # fmt: skip


def test_a_failing_compiler_is_reported_with_its_message(tmp_path, monkeypatch):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    with pytest.raises(KernelUnavailable, match=r"cannot compile"):
        resolve_recurrence("compiled", tmp_path / "cache")
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-built left behind


def test_the_pthreads_build_matches_nn_gru_on_two_threads(tmp_path, monkeypatch):
    """Compilers without OpenMP (e.g. Apple clang) get the pthreads build: forced here."""
    recurrence_for("compiled")
    monkeypatch.setattr(kernel_build, "THREADING", {"pthreads": kernel_build.THREADING["pthreads"]})
    recurrence = load_recurrence.__wrapped__(tmp_path)
    assert recurrence.threading == "pthreads"
    reference, _, x, lengths = bigru_case("compiled", True, hidden=12, batch=70, max_len=9, seed=5)
    form = SparseBiGRU(reference, [True] * 3, [True] * 3, recurrence)
    run_on_threads(2, lambda: assert_loop_matches_nn_gru(reference, form, x, lengths))


def test_an_unwritable_cache_is_reported_not_raised_raw(tmp_path):
    recurrence_for("compiled")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache folder should go")
    with pytest.raises(KernelUnavailable, match=r"cannot write the kernel cache"):
        load_recurrence.__wrapped__(blocker)
