"""`make bench` / `python -m benchmarks.suite [--quick]`: what sparsity costs and buys, measured.

1. Training step, sparse (SparseEngine, S=0.9, RigL) vs dense: ChiroDiff KanjiVG default and a small UNet.
2. The whole mask update (explore + optimizer-state reset + exploration history + EMA re-mask, with
   the dense gradient present) and its share of training time amortised over the paper's Te.
3. 50-step DDIM sampling of ChiroDiff KanjiVG, dense nn.Module vs the sparse inference form, at
   S in {0.5, 0.75, 0.9, 0.95} with 1 and 2 threads (+ the largest sample difference).
4. File size: the dense state_dict vs the `.sdm` export.
Every comparison is paired in one process; which side runs first alternates between pairs and the
median of per-pair ratios is reported (the CPU is shared and noisy). Writes benchmarks/results.json
and docs/benchmarks.md (generated from the JSON by `write_markdown`).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import statistics
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
from sparse_dm.inference import gru_loops, inference_form, resolve_thresholds
from sparse_dm.inference.config import default_inference_config
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
    "ddim_pairs": 5,
    "ddim_batch": 64,
    "ddim_steps": 50,
    "sparsities": [0.5, 0.75, 0.9, 0.95],
    "torch_loop_sparsities": [0.9],  # extra rows with inference.gru_loop=torch (no C compiler)
    "threads": [1, 2],
    "train_batch": None,  # None: the default dataset.batch_size (128)
    "inference": {},  # conf/inference/default.yaml as is: thresholds measured on this machine (cached)
}
QUICK = {**FULL, "train_pairs": 2, "warmup": 1, "update_repeats": 1, "ddim_pairs": 1, "ddim_steps": 2,
         "ddim_batch": 8, "sparsities": [0.9], "torch_loop_sparsities": [0.9], "threads": [1],
         "train_batch": 8, "inference": {"threshold_linear": 1.0, "threshold_gru": 1.0}}  # fmt: skip
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
@torch.no_grad()
def measure_sampling(
    sparsity: float, threads: int, settings: dict, lengths_pool: torch.Tensor, gru_loop: str | None = None
) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = compose_cfg(["experiment=chirodiff_kanjivg"]).model
    net = ChiroDiffNet(
        cfg.net.hidden_size, cfg.net.num_layers, cfg.net.time_embed_dim, cfg.net.time_freq_scale
    )
    SparseEngine(net, sparsity, distribution="erk")
    net.eval()
    loop = {} if gru_loop is None else {"gru_loop": gru_loop}
    thresholds = resolve_thresholds({**default_inference_config(), **settings["inference"], **loop})
    form, choices = inference_form(net, thresholds)
    schedule = NoiseSchedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps, cfg.diffusion.beta_start,
                             cfg.diffusion.beta_end)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    batch = settings["ddim_batch"]
    lengths = lengths_pool[torch.randint(0, len(lengths_pool), (batch,), generator=generator)]
    x_T = torch.randn(batch, int(lengths.max()), 3, generator=generator)
    outputs = {}

    def run(model: nn.Module, key: str) -> Callable[[], None]:
        def sample() -> None:
            outputs[key] = ddim_sample(
                lambda x, t: model(x, t, lengths), x_T, schedule, settings["ddim_steps"]
            )

        return sample

    dense_fn, sparse_fn = run(net, "dense"), run(form, "sparse")
    paired(dense_fn, sparse_fn, 1)  # warm-up
    dense_t, sparse_t = paired(dense_fn, sparse_fn, settings["ddim_pairs"])
    valid = torch.arange(x_T.shape[1])[None, :] < lengths[:, None]
    diff = (outputs["dense"] - outputs["sparse"]).abs()[valid].max()
    return {
        "sparsity": sparsity,
        "threads": threads,
        "batch": batch,
        "ddim_steps": settings["ddim_steps"],
        "pairs": settings["ddim_pairs"],
        "dense_s": statistics.median(dense_t),
        "sparse_s": statistics.median(sparse_t),
        "speedup": median_ratio(dense_t, sparse_t),
        "max_abs_diff": float(diff),
        "max_abs_sample": float(outputs["dense"].abs()[valid].max()),
        "gru_loop": gru_loops(form),
        "csr_matrices": sum(c.kernel == "csr" for c in choices),
        "matrices": len(choices),
        "thresholds": {"linear": thresholds.linear, "gru": thresholds.gru},
    }


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
        f"Machine: {results['machine']}. Paired in one process, order alternating, medians of ratios.",
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
        "## DDIM sampling, ChiroDiff KanjiVG (bi-GRU 3x96): dense nn.Module vs sparse inference form",
        "",
        "| S | threads | batch | steps | GRU in the sparse form | dense s | sparse s | speedup "
        "| CSR matrices | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["sampling"]:
        lines.append(
            f"| {r['sparsity']} | {r['threads']} | {r['batch']} | {r['ddim_steps']} | {r['gru_loop']} | "
            f"{r['dense_s']:.2f} | {r['sparse_s']:.2f} | {r['speedup']:.2f}x | "
            f"{r['csr_matrices']}/{r['matrices']} | {r['max_abs_diff']:.1e} |"
        )
    lines += [
        "",
        "GRU in the sparse form: the CSR GRU with its compiled C loop (the default, `inference.gru_loop:",
        "auto`), the same GRU in torch ops (`gru_loop: torch`, what runs without a C compiler), or the",
        "dense nn.GRU, kept when the calibration finds the recurrent weights too dense for a CSR loop to win",
        "(then the row shows the noise level).",
    ]
    lines += [
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
    sampling = [
        measure_sampling(s, n, settings, pool, loop)
        for n in settings["threads"]
        for loop, sparsities in ((None, settings["sparsities"]), ("torch", settings["torch_loop_sparsities"]))
        for s in sparsities
    ]
    torch.set_num_threads(threads_before)
    results = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads max",
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
