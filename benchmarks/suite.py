"""`make bench` / `python -m benchmarks.suite [--quick]`: what sparsity costs and buys, measured.

1. Training step, sparse (SparseEngine, S=0.9, RigL) vs dense: ChiroDiff KanjiVG default and a small UNet.
2. The whole mask update (explore + optimizer-state reset + exploration history + EMA re-mask, with
   the dense gradient present) and its share of training time amortised over the paper's Te.
3. 50-step DDIM sampling of ChiroDiff KanjiVG, the dense nn.Module vs the sparse inference form as
   `auto` chooses it (calibrated in this run, on this workload), at S in {0.5, 0.75, 0.9, 0.95} with
   1 and 2 threads; at S = 0.9 also every fixed choice (each distinct form a fixed threshold_linear /
   threshold_gru / gru_loop gives), so `auto` can be compared with the best of them. All forms of a
   row group run in rounds, each form once per round in a freshly shuffled (seeded) order; ratios are
   per round, reported as median and min-max, in wall and CPU time.
4. File size: the dense state_dict vs the `.sdm` export.
Every comparison is paired in one process; which side runs first alternates between pairs and the
median of per-pair ratios is reported (the CPU is shared and noisy). Every table names the machine:
CPU model and the vector flags that matter, cores, compiler, torch and MKL, load averages. Writes
benchmarks/results.json and docs/benchmarks.md (generated from the JSON by `write_markdown`).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from sparse_dm import CONFIG_DIR
from sparse_dm.data.stroke3 import load_stroke3_npz, resolve_data_path
from sparse_dm.diffusion import NoiseSchedule, ddim_sample
from sparse_dm.inference import calibrated_thresholds, gru_loops, inference_form, resolve_settings
from sparse_dm.inference.config import default_inference_config
from sparse_dm.inference.convert import candidate_forms
from sparse_dm.kernels.build import find_compiler
from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.models.ldm_unet import UNetModel
from sparse_dm.run.sdm import pack_net
from sparse_dm.sparsity import MaskedEMA, SparseEngine
from sparse_dm.sparsity.masks import MASK_SUFFIX, apply_masks, mask_gradients
from sparse_dm.sparsity.step import SparseStep

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = CONFIG_DIR
FULL = {
    "train_pairs": 120,
    "warmup": 3,
    "update_repeats": 5,
    "ddim_rounds": 7,
    "ddim_batch": 64,
    "ddim_steps": 50,
    "sparsities": [0.5, 0.75, 0.9, 0.95],
    "fixed_choice_sparsities": [0.9],  # also time every fixed choice (both GRU loops) at these
    "threads": [1, 2],
    "train_batch": None,  # None: the default dataset.batch_size (128)
    # conf/inference/default.yaml as is: `auto`, calibrated in this run (cache_dir None: a fresh folder)
    "inference": {},
}
QUICK = {**FULL, "train_pairs": 2, "warmup": 1, "update_repeats": 1, "ddim_rounds": 1, "ddim_steps": 2,
         "ddim_batch": 8, "sparsities": [0.9], "threads": [1], "train_batch": 8,
         "inference": {"threshold_linear": 1.0, "threshold_gru": 1.0}}  # fmt: skip
# The CPU flags that decide which kernels run: the compiled loop's vector width (sse4_2 / avx2 + fma
# / avx512f) and MKL's code paths.
VECTOR_FLAGS = ("sse4_2", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_tile")  # fmt: skip
TRAIN_SPARSITY = 0.9
PAPER_TE = {"chirodiff": 800, "unet": 1100}  # the paper's Te per family


def paired(a: Callable[[], Any], b: Callable[[], Any], pairs: int) -> tuple[list[float], list[float]]:
    """Times of a and b in `pairs` pairs; a runs first in even pairs, b in odd ones."""
    times_a, times_b = [], []
    for i in range(pairs):
        order = ((a, times_a), (b, times_b)) if i % 2 == 0 else ((b, times_b), (a, times_a))
        for fn, sink in order:
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return times_a, times_b


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


# ----- training ---------------------------------------------------------------------------------
def kanjivg_lengths() -> torch.Tensor:
    splits = load_stroke3_npz(resolve_data_path(compose_cfg([]).dataset.path))
    return torch.tensor([len(d) for d in splits["train"]])


def compose_cfg(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def chirodiff_case(batch: int) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """The default ChiroDiff (conf/model/chirodiff.yaml) on a KanjiVG-shaped batch."""
    cfg = compose_cfg([]).model.net
    net = ChiroDiffNet(cfg.hidden_size, cfg.num_layers, cfg.time_embed_dim, cfg.time_freq_scale)
    generator = torch.Generator().manual_seed(0)
    pool = kanjivg_lengths()
    lengths = pool[torch.randint(0, len(pool), (batch,), generator=generator)]
    x = torch.randn(batch, int(lengths.max()), 3, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return net, lambda m: m(x, t, lengths).pow(2).mean()


def unet_case(batch: int) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    net = UNetModel(
        in_channels=3,
        out_channels=3,
        model_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[2],
        num_head_channels=32,
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 16, 16, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return net, lambda m: m(x, t).pow(2).mean()


class Trainer:
    """One optimisation step as the DiffusionModule runs it: backward, then `SparseStep` (gradient
    masks, clipping, AdamW, re-mask, EMA update, at mask updates explore + the EMA policy)."""

    def __init__(self, net: nn.Module, loss_fn, engine: SparseEngine | None) -> None:
        self.net, self.loss_fn, self.engine = net, loss_fn, engine
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-2)
        self.ema = MaskedEMA(net, 0.999)
        self.sparse_step = SparseStep(net, self.ema, engine)

    def clip(self) -> None:
        nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.net).backward()
        self.sparse_step.step(self.optimizer, self.clip)

    def bookkeeping_time(self) -> float:
        """Wall time of what sparsity adds to every step, and nothing else: the gradient masks and the
        weight re-mask (the calls SparseStep makes; the EMA needs no masking pass after the re-mask).
        Not sparse minus dense step parts: AdamW on masked (zero) state runs faster than on dense
        state (fewer denormals), which would hide the bookkeeping."""
        assert self.engine is not None
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.net).backward()
        start = time.perf_counter()
        mask_gradients(self.engine.weights)
        apply_masks(self.engine.weights)
        return time.perf_counter() - start

    def timed_update(self) -> float:
        """Wall time of the engine's and EMA's work at one mask-update step (gradients present)."""
        assert self.engine is not None
        interval = self.engine.schedule.interval
        self.engine.step = interval * (self.engine.num_updates + 1) - 1  # the next step updates
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.net).backward()
        start = time.perf_counter()
        report = self.sparse_step.step(self.optimizer, self.clip)  # explore + optimizer reset + EMA policy
        elapsed = time.perf_counter() - start
        assert report is not None, "the timed step was not a mask update"
        return elapsed


def measure_training(name: str, family: str, case, settings: dict) -> dict[str, Any]:
    torch.manual_seed(0)
    dense_net, loss_fn = case
    sparse_net = copy.deepcopy(dense_net)
    engine = SparseEngine(
        sparse_net, TRAIN_SPARSITY, grow="gradient", prune_rate=0.5, update_interval=PAPER_TE[family]
    )
    dense, sparse = Trainer(dense_net, loss_fn, None), Trainer(sparse_net, loss_fn, engine)
    paired(dense.step, sparse.step, settings["warmup"])
    dense_t, sparse_t = paired(dense.step, sparse.step, settings["train_pairs"])
    bookkeeping_s = statistics.median(sparse.bookkeeping_time() for _ in range(settings["update_repeats"]))
    update_s = statistics.median(sparse.timed_update() for _ in range(settings["update_repeats"]))
    dense_ms = 1e3 * statistics.median(dense_t)
    per_step = 100 * (median_ratio(sparse_t, dense_t) - 1)
    return {
        "model": name,
        "params": sum(p.numel() for p in dense_net.parameters()),
        "pairs": settings["train_pairs"],
        "dense_ms": dense_ms,
        "sparse_ms": 1e3 * statistics.median(sparse_t),
        "step_overhead_pct": per_step,
        "bookkeeping_ms": 1e3 * bookkeeping_s,
        "bookkeeping_pct": 100 * 1e3 * bookkeeping_s / dense_ms,
        "mask_update_ms": 1e3 * update_s,
        "paper_te": PAPER_TE[family],
        "update_share_pct": 100 * 1e3 * update_s / (PAPER_TE[family] * dense_ms),
    }


# ----- sampling ---------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """The machine a figure was measured on: CPU model and vector flags, cores, compiler, torch, MKL."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    compiler = find_compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    mkl = [line.strip(" -") for line in torch.__config__.show().splitlines() if "Math Kernel Library" in line]
    return {
        "cpu": fields.get("model name", f"{platform.machine()} {platform.processor()}".strip()),
        "arch": platform.machine(),
        "flags": [flag for flag in VECTOR_FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "compiler": version.stdout.splitlines()[0] if version.stdout else compiler,
        "torch": torch.__version__,
        "mkl": mkl[0] if mkl else "none",
    }


def machine_line(machine: dict[str, Any]) -> str:
    flags = " ".join(machine["flags"]) or "no vector flags listed"
    return (
        f"{machine['cpu']} ({machine['arch']}; {flags}), {machine['cores']} cores; "
        f"compiler {machine['compiler']}; torch {machine['torch']}; {machine['mkl']}"
    )


def sampling_net(sparsity: float) -> tuple[ChiroDiffNet, NoiseSchedule]:
    """The default ChiroDiff KanjiVG net with ERK masks at `sparsity`, and its noise schedule."""
    torch.manual_seed(0)
    cfg = compose_cfg(["experiment=chirodiff_kanjivg"]).model
    net = ChiroDiffNet(
        cfg.net.hidden_size, cfg.net.num_layers, cfg.net.time_embed_dim, cfg.net.time_freq_scale
    )
    SparseEngine(net, sparsity, distribution="erk")
    schedule = NoiseSchedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps, cfg.diffusion.beta_start,
                             cfg.diffusion.beta_end)  # fmt: skip
    return net.eval(), schedule


def in_rounds(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of each fn, once per round, in an order shuffled afresh each round (seeded),
    so no fn keeps one position or one neighbour while the machine's load drifts."""
    names = list(fns)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    shuffler = random.Random(0)
    for _ in range(rounds):
        for name in shuffler.sample(names, len(names)):
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@torch.no_grad()
def measure_sampling(
    sparsity: float, threads: int, settings: dict, lengths_pool: torch.Tensor, cache_dir: Path
) -> dict[str, Any]:
    """DDIM sampling with the dense net, `auto`'s form and (at fixed_choice_sparsities) every fixed
    choice's form, in rounds; `auto` is calibrated here, on this batch and these lengths."""
    torch.set_num_threads(threads)
    net, schedule = sampling_net(sparsity)
    generator = torch.Generator().manual_seed(0)
    batch = settings["ddim_batch"]
    lengths = lengths_pool[torch.randint(0, len(lengths_pool), (batch,), generator=generator)]
    x_T = torch.randn(batch, int(lengths.max()), 3, generator=generator)

    def ddim(model: nn.Module, steps: int) -> torch.Tensor:
        return ddim_sample(lambda x, t: model(x, t, lengths), x_T, schedule, steps)

    config = {**default_inference_config(), "cache_dir": str(cache_dir), **settings["inference"]}
    inference = resolve_settings(config)
    load_before = os.getloadavg()
    start = time.perf_counter()
    if inference.fixed is None:
        steps = inference.protocol.ddim_steps
        calibration = calibrated_thresholds(net, inference, lambda form: ddim(form, steps))
        thresholds, chosen = calibration.thresholds, calibration.record
    else:
        thresholds, chosen = inference.fixed, {"chosen": "fixed in the config", "speedup_vs_dense": []}
    calibration_s = time.perf_counter() - start
    forms: dict[str, tuple[nn.Module, str]] = {"dense": (net, "fixed: masked dense nn.Module")}
    auto_form, _ = inference_form(net, thresholds)
    forms["auto"] = (auto_form, f"auto: {chosen['chosen']}")
    if sparsity in settings.get("fixed_choice_sparsities", []):
        for loop in ("compiled", "torch"):
            _, candidates = candidate_forms(net, None, resolve_settings({**config, "gru_loop": loop}))
            for candidate in candidates:
                label = f"fixed: {candidate.label}"
                if label not in (described for _, described in forms.values()):
                    forms[f"fixed {len(forms) - 1}"] = (candidate.form, label)
    outputs: dict[str, torch.Tensor] = {}
    steps = settings["ddim_steps"]
    fns = {n: (lambda n=n, m=m: outputs.__setitem__(n, ddim(m, steps))) for n, (m, _) in forms.items()}
    for fn in fns.values():  # warm-up: allocations, MKL handles, the packing caches
        fn()
    times = in_rounds(fns, settings["ddim_rounds"])
    valid = torch.arange(x_T.shape[1])[None, :] < lengths[:, None]
    rows = []
    for name, (model, label) in forms.items():
        ratios = [d / f for d, f in zip(times["dense"]["wall"], times[name]["wall"], strict=True)]
        cpu_ratios = [d / f for d, f in zip(times["dense"]["cpu"], times[name]["cpu"], strict=True)]
        rows.append({
            "name": name,
            "label": label,
            "gru_loop": gru_loops(model),
            "wall_s": spread(times[name]["wall"]),
            "cpu_s": spread(times[name]["cpu"]),
            "speedup": spread(ratios),
            "cpu_speedup": spread(cpu_ratios),
            "max_abs_diff": float((outputs["dense"] - outputs[name]).abs()[valid].max()),
        })  # fmt: skip
    fixed = [row for row in rows if row["name"].startswith("fixed ")]
    best = max(fixed, key=lambda row: row["speedup"]["median"], default=None)
    return {
        "sparsity": sparsity,
        "threads": threads,
        "batch": batch,
        "ddim_steps": steps,
        "rounds": settings["ddim_rounds"],
        "lengths": {"max": int(lengths.max()), "mean": float(lengths.float().mean())},
        "max_abs_sample": float(outputs["dense"].abs()[valid].max()),
        "thresholds": {"linear": thresholds.linear, "gru": thresholds.gru},
        "calibration": {**chosen, "wall_s": calibration_s},
        "rows": rows,
        "best_fixed": None if best is None else best["label"],
        "auto_vs_best_fixed": None if best is None else spread([
            b / a for b, a in zip(times[best["name"]]["wall"], times["auto"]["wall"], strict=True)]),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
    }  # fmt: skip


def ratio_cell(values: dict[str, float]) -> str:
    return f"{values['median']:.2f}x ({values['min']:.2f}-{values['max']:.2f})"


def sampling_tables(records: list[dict[str, Any]]) -> list[str]:
    """The sampling section: `auto` vs dense per S and threads, then every fixed choice where timed."""
    lines = [
        "## DDIM sampling, ChiroDiff KanjiVG (bi-GRU 3x96): dense nn.Module vs the sparse inference form",
        "",
        "Speedup = dense time / the form's time, per round: median (min-max over rounds), wall clock; CPU =",
        "the same in process CPU time (steadier on a shared machine; at 2 threads it also counts workers",
        "spinning). `auto` is calibrated in the same run on the same batch and lengths (its own timing of",
        "a few DDIM steps per candidate). Load avg = the 1-minute load average before / after the row.",
        "",
        "| S | threads | batch x steps | rounds | dense s | auto s | auto speedup | CPU | auto chose "
        "| auto / best fixed | calibration s | load avg | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        rows = {row["name"]: row for row in r["rows"]}
        dense, auto = rows["dense"], rows["auto"]
        versus = "-" if r["auto_vs_best_fixed"] is None else ratio_cell(r["auto_vs_best_fixed"])
        load = r["load_average"]
        lines.append(
            f"| {r['sparsity']} | {r['threads']} | {r['batch']} x {r['ddim_steps']} | {r['rounds']} | "
            f"{dense['wall_s']['median']:.2f} | {auto['wall_s']['median']:.2f} | "
            f"{ratio_cell(auto['speedup'])} | "
            f"{ratio_cell(auto['cpu_speedup'])} | {auto['label'].removeprefix('auto: ')} | {versus} | "
            f"{r['calibration']['wall_s']:.1f} | {load['before'][0]:.1f} / {load['after'][0]:.1f} | "
            f"{auto['max_abs_diff']:.1e} |"
        )
    for r in records:
        if r["best_fixed"] is None:
            continue
        lines += [
            "",
            f"### Every fixed choice, S = {r['sparsity']}, {r['threads']} thread(s)",
            "",
            f"Best fixed choice: {r['best_fixed'].removeprefix('fixed: ')}.",
            "",
            "| form | GRU | median s | speedup | CPU | max abs diff |",
            "|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['label']} | {row['gru_loop'] or '-'} | {row['wall_s']['median']:.2f} | "
                f"{ratio_cell(row['speedup'])} | {ratio_cell(row['cpu_speedup'])} | "
                f"{row['max_abs_diff']:.1e} |"
            )
    return lines


# ----- file size --------------------------------------------------------------------------------
def saved_bytes(obj: Any) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def measure_size(sparsity: float) -> dict[str, Any]:
    cfg = compose_cfg(["experiment=chirodiff_kanjivg"]).model.net
    net = ChiroDiffNet(cfg.hidden_size, cfg.num_layers, cfg.time_embed_dim, cfg.time_freq_scale)
    dense_bytes = saved_bytes(net.state_dict())
    SparseEngine(net, sparsity, distribution="erk")
    sparse, dense = pack_net(net)
    export_bytes = saved_bytes({"sparse": sparse, "dense": dense})
    masked_bytes = saved_bytes(net.state_dict())  # what a masked checkpoint's weights + masks take
    nnz = sum(int(net.get_buffer(n + MASK_SUFFIX).sum()) for n in sparse)
    return {
        "sparsity": sparsity,
        "dense_state_dict_bytes": dense_bytes,
        "masked_state_dict_bytes": masked_bytes,
        "export_bytes": export_bytes,
        "export_ratio": export_bytes / dense_bytes,
        "active_prunable": nnz,
    }


# ----- report -----------------------------------------------------------------------------------
def training_table(records: list[dict[str, Any]], ms_digits: int) -> list[str]:
    """The training-step section (shared by the CPU and GPU benchmark reports)."""
    lines = [
        "## Training step, sparse (S=0.9, RigL) vs dense",
        "",
        "| model | params | dense ms | sparse ms | step overhead | sparse bookkeeping | mask update ms | Te "
        "| update share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        bookkeeping = "not measured"
        if "bookkeeping_ms" in r:
            bookkeeping = f"{r['bookkeeping_ms']:.2f} ms ({r['bookkeeping_pct']:.2f}%)"
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['dense_ms']:.{ms_digits}f} | "
            f"{r['sparse_ms']:.{ms_digits}f} | "
            f"{r['step_overhead_pct']:+.2f}% | {bookkeeping} | {r['mask_update_ms']:.1f} | {r['paper_te']} | "
            f"{r['update_share_pct']:.3f}% |"
        )
    return lines


# docs/benchmarks.md ends in hand-written notes (what the figures mean, how they were reached): a rerun
# regenerates the tables above the marker and keeps everything from the marker on.
NOTES_MARKER = "<!-- Hand-written notes: `make bench` regenerates everything above and keeps this part. -->"


def kept_notes(path: Path) -> list[str]:
    """The hand-written tail of an existing report (from NOTES_MARKER on), so regenerating keeps it."""
    text = path.read_text() if path.exists() else ""
    at = text.find(NOTES_MARKER)
    return [] if at < 0 else ["", *text[at:].rstrip("\n").splitlines()]


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    lines = [
        "# Benchmarks (generated by `make bench` from benchmarks/results.json; do not edit)",
        "",
        f"Machine: {machine_line(results['machine'])}. Paired in one process, order alternating, medians of "
        "ratios.",
        "",
        *training_table(results["training"], ms_digits=1),
    ]
    lines += [
        "",
        "Mask update = explore + optimizer-state reset + exploration history + EMA re-mask (plus the",
        "optimizer step it follows), with the dense gradient present; share = update / (Te x dense step).",
        "Step overhead = median of paired whole-step ratios, sparse / dense - 1 (forward + backward +",
        "update). Sparse bookkeeping = the work sparsity adds to every step, timed alone (gradient masks",
        "and weight re-mask, right after a backward), as a share of the dense step.",
        "",
        *sampling_tables(results["sampling"]),
        "",
        "## File size, ChiroDiff KanjiVG: dense state_dict vs `.sdm` export",
        "",
        "| S | dense bytes | masked state_dict bytes | export bytes | export / dense |",
        "|---|---|---|---|---|",
    ]
    for r in results["size"]:
        lines.append(
            f"| {r['sparsity']} | {r['dense_state_dict_bytes']:,} | {r['masked_state_dict_bytes']:,} | "
            f"{r['export_bytes']:,} | {r['export_ratio']:.3f} |"
        )
    lines += kept_notes(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def run(settings: dict, out_json: Path, out_md: Path) -> dict[str, Any]:
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(settings["threads"]))
    train_batch = settings["train_batch"] or compose_cfg([]).dataset.batch_size
    training = [
        measure_training(
            f"ChiroDiff KanjiVG default (bi-GRU 3x96), batch {train_batch}",
            "chirodiff",
            chirodiff_case(train_batch),
            settings,
        ),
        measure_training("UNet 32ch, 3x16x16, batch 8", "unet", unet_case(8), settings),
    ]
    pool = torch.tensor(
        [len(d) for d in load_stroke3_npz(resolve_data_path(compose_cfg([]).dataset.path))["valid"]]
    )
    with tempfile.TemporaryDirectory(prefix="sparse_dm_bench_cache_") as fresh:  # auto calibrates here
        sampling = [
            measure_sampling(s, n, settings, pool, Path(fresh))
            for n in settings["threads"]
            for s in settings["sparsities"]
        ]
    torch.set_num_threads(threads_before)
    results = {
        "machine": machine_info(),
        "settings": settings,
        "training": training,
        "sampling": sampling,
        "size": [measure_size(s) for s in settings["sparsities"]],
    }
    out_json.write_text(json.dumps(results, indent=2))
    write_markdown(results, out_md)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    results = run(QUICK if args.quick else FULL, args.out, args.markdown)
    print(args.markdown.read_text())
    del results


if __name__ == "__main__":
    main()
