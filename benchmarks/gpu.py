"""`python -m benchmarks.gpu`: the CUDA counterpart of benchmarks/suite.py (needs an NVIDIA GPU).

1. Checks that only a GPU can run: short RigL/MagRan runs through `sparse_dm.train` on CUDA (cuDNN GRU)
   at 32-bit, fp16 AMP (GradScaler) and bf16 with mask updates inside the run; every layer must end
   with exactly its target non-zeros and the CUDA outputs must equal the CPU outputs of the same
   checkpoint (the cuDNN weight buffer really holds the masked weights).
2. Training step sparse (S=0.9, RigL) vs dense, the per-step mask work alone (multi-tensor ops) and the
   mask update, on the GPU: ChiroDiff KanjiVG default and the paper's CelebA-HQ LDM UNet (274M parameters).
3. 50-step DDIM sampling of ChiroDiff KanjiVG: masked dense cuDNN GRU; the CPU sparse inference form is
   not a CUDA path (recorded as such).
4. Linear-layer kernels at the LDM UNet's attention shapes, fp16: dense cuBLAS vs CSR (cuSPARSE) at
   S in {0.5, 0.75, 0.9, 0.95} vs 2:4 semi-structured (S = 0.5, the pattern sparse tensor cores run).
Timings are paired in one process with the order alternating and CUDA synchronised; medians of ratios.
Writes a JSON and a markdown table (default benchmarks/results_gpu.json, docs/benchmarks_gpu.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn
from torch.nn import functional as F

from benchmarks.suite import ROOT, Trainer, compose_cfg, kanjivg_lengths, median_ratio, paired, training_table
from sparse_dm.diffusion import NoiseSchedule, ddim_sample
from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.sparsity import SparseEngine

FULL = {
    "train_pairs": 20,
    "warmup": 3,
    "update_repeats": 3,
    "bookkeeping_repeats": 20,
    "unet_batch": 8,
    "chirodiff_batch": 128,
    "ddim_batches": [64, 1024],
    "ddim_steps": 50,
    "ddim_pairs": 3,
    "sparsities": [0.5, 0.75, 0.9, 0.95],
    "kernel_reps": 50,
    "kernel_shapes": [[8192, 448, 1344], [2048, 672, 2016], [512, 896, 2688], [16384, 4096, 4096]],
    "check_methods": [
        ["rigl", "32-true"],
        ["rigl", "16-mixed"],
        ["rigl", "bf16-mixed"],
        ["magran", "16-mixed"],
    ],
    "check_steps": 40,
    "check_interval": 10,
    "with_unet": True,
}
QUICK = {**FULL, "train_pairs": 2, "warmup": 1, "update_repeats": 1, "bookkeeping_repeats": 1,
         "unet_batch": 1, "chirodiff_batch": 8,
         "ddim_batches": [8], "ddim_steps": 2, "ddim_pairs": 1, "sparsities": [0.9], "kernel_reps": 2,
         "kernel_shapes": [[64, 32, 48]], "check_methods": [["rigl", "32-true"], ["magran", "bf16-mixed"]],
         "check_steps": 6,
         "check_interval": 2, "with_unet": False}  # fmt: skip
TRAIN_SPARSITY = 0.9
PAPER_TE = {"chirodiff": 800, "unet": 1100}


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


# ----- 1. checks through the real training command -------------------------------------------------
def start_check(check: list[str], settings: dict, device: torch.device, out: Path) -> subprocess.Popen:
    """Launch one short training run (the checks run side by side: each is mostly start-up time).
    `check` is [method, precision, *extra Hydra overrides]."""
    method, precision, *extra = check
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    steps, interval = settings["check_steps"], settings["check_interval"]
    cmd = [sys.executable, "-m", "sparse_dm.train", "debug=tiny", f"method={method}", "sparsity=0.9",
           f"trainer.accelerator={accelerator}", f"trainer.precision={precision}",
           f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", f"update_interval={interval}",
           "model.net.hidden_size=96", "model.net.num_layers=3", "dataset.batch_size=64",
           "dataset.num_train=512",
           f"callbacks.last.every_n_train_steps={steps}", f"paths.output_dir={out}",
           "trainer.enable_progress_bar=false", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def finish_check(check: list[str], proc: subprocess.Popen, device: torch.device, out: Path) -> dict:
    method, precision, *extra = check
    _, stderr = proc.communicate()
    record: dict[str, Any] = {
        "method": method,
        "precision": precision,
        "overrides": extra,
        "returncode": proc.returncode,
    }
    if proc.returncode != 0:
        record["error"] = stderr[-2000:]
        return record
    summary = json.loads((out / "summary.json").read_text())
    layers = summary["layers"]
    record |= {
        "mask_updates": summary["mask_updates"],
        "mask_updates_skipped": summary["mask_updates_skipped"],
        "layers_exact": all(exact_counts(r) for r in layers),
        "values_inside_masks": all(r["nonzero"] <= r["nnz"] for r in layers),
        "band_layers": sum(r.get("band_nnz") is not None for r in layers),
        "val_loss": summary["metrics"].get("val/loss"),
        "cpu_cuda_max_abs_diff": cpu_vs_device_output(out / "checkpoints" / "last.ckpt", device),
    }
    return record


def exact_counts(layer: dict[str, Any]) -> bool:
    """A summary row at its target: every band at its own (timestep-band runs, whose union has no
    target of its own), else the layer's."""
    if layer.get("band_nnz") is not None:
        return layer["band_nnz"] == layer["band_target_nnz"]
    return layer["nnz"] == layer["target_nnz"]


def run_checks(settings: dict, device: torch.device, work: Path) -> list[dict]:
    outs = [work / f"check_{i}" for i in range(len(settings["check_methods"]))]
    procs = [
        start_check(c, settings, device, out) for c, out in zip(settings["check_methods"], outs, strict=True)
    ]
    return [
        finish_check(c, proc, device, out)
        for c, proc, out in zip(settings["check_methods"], procs, outs, strict=True)
    ]


def cpu_vs_device_output(ckpt: Path, device: torch.device) -> float:
    """The same checkpoint's denoiser (routed by timestep band where the run has bands) on the CPU and on
    `device`, one input with timesteps in every band: the largest output difference."""
    from sparse_dm.run.load import load_module

    module, _ = load_module(ckpt)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([40, 25, 33, 12])
    x = torch.randn(4, 40, 3, generator=generator)
    t = torch.tensor([999, 500, 100, 1])
    with torch.no_grad():
        cpu = module.denoiser(x, t, lengths)
        module.to(device)
        other = module.denoiser(x.to(device), t.to(device), lengths.to(device)).cpu()
    valid = torch.arange(40)[None, :] < lengths[:, None]
    return float((cpu - other).abs()[valid].max())


# ----- 2. training step ----------------------------------------------------------------------------
def chirodiff_case(batch: int, device: torch.device) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    cfg = compose_cfg([]).model.net
    net = ChiroDiffNet(cfg.hidden_size, cfg.num_layers, cfg.time_embed_dim, cfg.time_freq_scale).to(device)
    generator = torch.Generator().manual_seed(0)
    pool = kanjivg_lengths()
    lengths = pool[torch.randint(0, len(pool), (batch,), generator=generator)]
    x = torch.randn(batch, int(lengths.max()), 3, generator=generator).to(device)
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    lengths = lengths.to(device)
    return net, lambda m: m(x, t, lengths).pow(2).mean()


def unet_case(batch: int, device: torch.device) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    cfg = compose_cfg(["experiment=ldm_celebahq"]).model
    net = instantiate(cfg.net).to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *cfg.latent_shape, generator=generator).to(device)
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    return net, lambda m: m(x, t).pow(2).mean()


def measure_training(name: str, family: str, case, settings: dict, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    dense_net, loss_fn = case
    sparse_net = copy.deepcopy(dense_net)
    engine = SparseEngine(
        sparse_net, TRAIN_SPARSITY, grow="gradient", prune_rate=0.5, update_interval=PAPER_TE[family]
    )
    dense, sparse = Trainer(dense_net, loss_fn, None), Trainer(sparse_net, loss_fn, engine)
    dense_step, sparse_step = synced(dense.step, device), synced(sparse.step, device)
    paired(dense_step, sparse_step, settings["warmup"])
    dense_t, sparse_t = paired(dense_step, sparse_step, settings["train_pairs"])

    def update() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = sparse.timed_update()
        if device.type == "cuda":  # timed_update stops its clock before the GPU is done
            start = time.perf_counter()
            torch.cuda.synchronize(device)
            seconds += time.perf_counter() - start
        return seconds

    def bookkeeping() -> float:
        """The per-step mask work alone (SparseStep's gradient masks and re-mask, multi-tensor ops),
        right after a backward, between two synchronisations."""
        sync = synced(lambda: None, device)
        sparse.optimizer.zero_grad(set_to_none=True)
        loss_fn(sparse.net).backward()
        sync()
        start = time.perf_counter()
        engine.mask_gradients()
        engine.apply_masks()
        sync()
        return time.perf_counter() - start

    update_s = statistics.median(update() for _ in range(settings["update_repeats"]))
    bookkeeping_s = statistics.median(bookkeeping() for _ in range(settings["bookkeeping_repeats"]))
    dense_ms = 1e3 * statistics.median(dense_t)
    return {
        "model": name,
        "params": sum(p.numel() for p in dense_net.parameters()),
        "pairs": settings["train_pairs"],
        "dense_ms": dense_ms,
        "sparse_ms": 1e3 * statistics.median(sparse_t),
        "step_overhead_pct": 100 * (median_ratio(sparse_t, dense_t) - 1),
        "bookkeeping_ms": 1e3 * bookkeeping_s,
        "bookkeeping_pct": 100 * 1e3 * bookkeeping_s / dense_ms,
        "mask_update_ms": 1e3 * update_s,
        "paper_te": PAPER_TE[family],
        "update_share_pct": 100 * 1e3 * update_s / (PAPER_TE[family] * dense_ms),
    }


# ----- 3. sampling ---------------------------------------------------------------------------------
@torch.no_grad()
def measure_sampling(sparsity: float, batch: int, settings: dict, device: torch.device) -> dict[str, Any]:
    """Masked dense cuDNN sampling vs the same net at S = 0 (the weights' zeros buy nothing on cuDNN)."""
    torch.manual_seed(0)
    cfg = compose_cfg(["experiment=chirodiff_kanjivg"]).model
    make = lambda: ChiroDiffNet(  # noqa: E731
        cfg.net.hidden_size, cfg.net.num_layers, cfg.net.time_embed_dim, cfg.net.time_freq_scale
    )
    dense_net, sparse_net = make(), make()
    SparseEngine(sparse_net, sparsity, distribution="erk")
    dense_net, sparse_net = dense_net.to(device).eval(), sparse_net.to(device).eval()
    schedule = NoiseSchedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps, cfg.diffusion.beta_start,
                             cfg.diffusion.beta_end).to(device)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    pool = kanjivg_lengths()
    lengths = pool[torch.randint(0, len(pool), (batch,), generator=generator)].to(device)
    x_T = torch.randn(batch, int(lengths.max()), 3, generator=generator).to(device)

    def sampler(net: nn.Module) -> Callable[[], None]:
        steps = settings["ddim_steps"]
        return synced(lambda: ddim_sample(lambda x, t: net(x, t, lengths), x_T, schedule, steps),
                      device)  # fmt: skip

    dense_fn, sparse_fn = sampler(dense_net), sampler(sparse_net)
    paired(dense_fn, sparse_fn, 1)
    dense_t, sparse_t = paired(dense_fn, sparse_fn, settings["ddim_pairs"])
    return {
        "sparsity": sparsity,
        "batch": batch,
        "ddim_steps": settings["ddim_steps"],
        "dense_s": statistics.median(dense_t),
        "masked_s": statistics.median(sparse_t),
        "speedup": median_ratio(dense_t, sparse_t),
        "samples_per_s_masked": batch / statistics.median(sparse_t),
    }


# ----- 4. linear kernels -----------------------------------------------------------------------------
def time_median(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    run = synced(fn, device)
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def two_four_mask(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Keep 2 random entries of every 4 consecutive inputs (the 2:4 pattern sparse tensor cores run)."""
    rows, cols = shape
    scores = torch.rand(rows, cols // 4, 4, generator=generator)
    keep = scores.argsort(dim=-1)[..., 2:]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.view(rows, cols)


def measure_kernels(shape: list[int], settings: dict, device: torch.device) -> dict[str, Any]:
    tokens, fan_in, fan_out = shape
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, fan_in, generator=generator).to(device, dtype)
    weight = torch.randn(fan_out, fan_in, generator=generator).to(device, dtype)
    reps = settings["kernel_reps"]
    dense_s = time_median(lambda: F.linear(x, weight), reps, device)
    record: dict[str, Any] = {"shape": shape, "dtype": str(dtype), "dense_ms": 1e3 * dense_s, "csr": {}}
    x_t = x.t().contiguous()
    for sparsity in settings["sparsities"]:
        keep = torch.rand(weight.shape, generator=generator).to(device) >= sparsity
        csr = (weight * keep).to_sparse_csr()
        try:
            seconds = time_median(lambda c=csr: torch.sparse.mm(c, x_t), reps, device)
            record["csr"][str(sparsity)] = {"ms": 1e3 * seconds, "speedup": dense_s / seconds}
        except RuntimeError as error:  # a dtype/device this torch build has no kernel for
            record["csr"][str(sparsity)] = {"error": str(error).splitlines()[0]}
    record["semi_structured_2_4"] = two_four(x, weight, generator, reps, dense_s, device)
    return record


def two_four(x, weight, generator, reps: int, dense_s: float, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return {"error": "needs an NVIDIA GPU with sparse tensor cores (compute capability >= 8.0)"}
    from torch.sparse import to_sparse_semi_structured

    pruned = weight * two_four_mask(tuple(weight.shape), generator).to(device)
    try:
        packed = to_sparse_semi_structured(pruned)
        seconds = time_median(lambda: F.linear(x, packed), reps, device)
        diff = float((F.linear(x, packed) - F.linear(x, pruned)).abs().max())
    except (RuntimeError, ValueError) as error:
        return {"error": str(error).splitlines()[0]}
    return {"ms": 1e3 * seconds, "speedup": dense_s / seconds, "max_abs_diff_vs_dense_masked": diff}


# ----- report -----------------------------------------------------------------------------------------
def write_markdown(results: dict[str, Any], path: Path) -> Path:
    lines = [
        "# GPU benchmarks (generated by `python -m benchmarks.gpu` from its JSON; do not edit)",
        "",
        f"Device: {results['device']}. Paired in one process, order alternating, medians of ratios.",
        "",
        *checks_table(results["checks"]),
    ]
    lines += ["", *training_table(results["training"], ms_digits=2)]
    lines += [
        "",
        "## DDIM sampling, ChiroDiff KanjiVG on cuDNN: masked weights vs the dense net",
        "",
        "| S | batch | steps | dense s | masked s | speedup | samples/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["sampling"]:
        lines.append(
            f"| {r['sparsity']} | {r['batch']} | {r['ddim_steps']} | {r['dense_s']:.3f} | "
            f"{r['masked_s']:.3f} | "
            f"{r['speedup']:.2f}x | {r['samples_per_s_masked']:.0f} |"
        )
    sparsities = results["settings"]["sparsities"]
    lines += [
        "",
        "## Linear kernels (tokens x in -> out): CSR (cuSPARSE) and 2:4 semi-structured vs dense",
        "",
        "| shape | dtype | dense ms | " + " | ".join(f"CSR S={s}" for s in sparsities) + " | 2:4 (S=0.5) |",
        "|---|---|---|" + "---|" * (len(sparsities) + 1),
    ]
    for r in results["kernels"]:
        cells = [_speed(r["csr"][str(s)]) for s in sparsities]
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['dense_ms']:.3f} | "
            + " | ".join(cells)
            + f" | {_speed(r['semi_structured_2_4'])} |"
        )
    lines += ["", "Speedup = dense time / sparse time (> 1: the sparse kernel is faster)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def checks_table(records: list[dict[str, Any]]) -> list[str]:
    """The checks section (shared with benchmarks/gpu_bands.py)."""
    lines = [
        "## Checks on the GPU: `sparse_dm.train` runs with mask updates (ChiroDiff 3x96, S=0.9)",
        "",
        "| method | precision | overrides | rc | updates | skipped | exact nnz | values inside masks "
        "| CPU vs CUDA max diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        overrides = " ".join(r.get("overrides", [])) or "-"
        if r["returncode"] != 0:
            lines.append(
                f"| {r['method']} | {r['precision']} | {overrides} | {r['returncode']} | failed | | | | |"
            )
            continue
        lines.append(
            f"| {r['method']} | {r['precision']} | {overrides} | 0 | {r['mask_updates']} | "
            f"{r['mask_updates_skipped']} | {r['layers_exact']} | {r['values_inside_masks']} | "
            f"{r['cpu_cuda_max_abs_diff']:.1e} |"
        )
    return lines


def _speed(cell: dict[str, Any]) -> str:
    return "n/a" if "error" in cell else f"{cell['speedup']:.2f}x"


def run(settings: dict, device: torch.device, out_json: Path, out_md: Path) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as work:
        checks = run_checks(settings, device, Path(work))
    training = [
        measure_training("ChiroDiff KanjiVG default (bi-GRU 3x96), batch "
                         f"{settings['chirodiff_batch']}", "chirodiff",
                         chirodiff_case(settings["chirodiff_batch"], device), settings, device)
    ]  # fmt: skip
    if settings["with_unet"]:
        training.append(
            measure_training(f"LDM UNet CelebA-HQ (paper), 3x64x64, batch {settings['unet_batch']}", "unet",
                             unet_case(settings["unet_batch"], device), settings, device)
        )  # fmt: skip
    sampling = [measure_sampling(s, b, settings, device) for b in settings["ddim_batches"]
                for s in settings["sparsities"]]  # fmt: skip
    kernels = [measure_kernels(shape, settings, device) for shape in settings["kernel_shapes"]]
    results = {
        "device": f"{name}, torch {torch.__version__}",
        "settings": settings,
        "checks": checks,
        "training": training,
        "sampling": sampling,
        "kernels": kernels,
    }
    out_json.write_text(json.dumps(results, indent=2))
    write_markdown(results, out_md)
    return results


def device_main(description: str, run_fn: Callable[..., Any], full: dict, quick: dict, name: str) -> None:
    """The command line of a GPU benchmark (this one and benchmarks/gpu_bands.py): settings, device,
    where the JSON and its markdown go (benchmarks/results_<name>.json, docs/benchmarks_<name>.md)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    parser.add_argument("--device", default="cuda", help="cuda (the point) or cpu (to test the script)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name(f"results_{name}.json"))
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / f"benchmarks_{name}.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{parser.prog}: no CUDA device here (use --device cpu only to test the script)")
    run_fn(quick if args.quick else full, device, args.out, args.markdown)
    print(args.markdown.read_text())


def main() -> None:
    device_main(__doc__.splitlines()[0], run, FULL, QUICK, "gpu")


if __name__ == "__main__":
    main()
