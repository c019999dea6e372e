"""`python -m benchmarks.masking [--quick]`: CPU time of the per-step mask bookkeeping, the per-tensor
ops it used before issue 20 vs the multi-tensor ops the engine and the EMA run now.

A sparse step zeroes the gradients of inactive weights (before clipping), zeroes the inactive weights
(after the optimizer step) and updates the EMA of the weights (no masking pass: the weights were just
re-masked). Each side is timed alone right after a backward (gradients present), on the same tensors,
paired in one process with the order alternating; the median of per-pair ratios is reported, at 1 and
2 threads, with the dense step's median time for scale.
- masks, before: `masks.mask_gradients` + `masks.apply_masks` (one `zero_outside` per tensor);
  after: `SparseEngine.mask_gradients` + `apply_masks` (`IntMasks`: one `_foreach_mul_`).
- EMA, before: one `lerp_` per parameter; after: `MaskedEMA.update(weights_masked=True)`.
Writes benchmarks/results_masking.json and docs/benchmarks_masking.md (generated; do not edit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.suite import ROOT, chirodiff_case, median_ratio, paired, unet_case
from sparse_dm.sparsity import MaskedEMA, SparseEngine
from sparse_dm.sparsity.masks import apply_masks, mask_gradients

FULL = {"pairs": 400, "warmup": 20, "dense_steps": 20, "threads": [1, 2], "chirodiff_batch": 128,
        "unet_batch": 8}  # fmt: skip
QUICK = {"pairs": 4, "warmup": 1, "dense_steps": 1, "threads": [1], "chirodiff_batch": 4, "unet_batch": 1}
SPARSITY = 0.9


def machine() -> dict[str, Any]:
    """CPU model, cores and the compiler that built the timed kernels (torch's own ops)."""
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    build = [line.strip(" -") for line in torch.__config__.show().splitlines() if line.strip(" -")]
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "family_model_stepping": [fields.get(k, "?") for k in ("cpu family", "model", "stepping")],
        "vector_flags": [f for f in ("avx2", "avx512f", "avx512_fp16", "amx_tile") if f in flags],
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_compiler": next((line for line in build if line.startswith(("GCC", "clang", "MSVC"))), "?"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": os.getloadavg(),
    }


def per_tensor_ema(ema: MaskedEMA, net: nn.Module) -> Callable[[], None]:
    """MaskedEMA.update(weights_masked=True) as it was: one lerp_ per parameter."""

    @torch.no_grad()
    def update() -> None:
        decay = ema.current_decay()
        for shadow, param, _ in ema._pairs(net):
            shadow.lerp_(param.detach(), 1.0 - decay)
        ema.num_updates += 1

    return update


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(name: str, case: tuple[nn.Module, Callable[[nn.Module], torch.Tensor]], threads: int,
            settings: dict) -> dict[str, Any]:  # fmt: skip
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net, loss_fn = case
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def dense_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net).backward()
        optimizer.step()

    dense_ms = median_ms(dense_step, settings["dense_steps"])  # before the masks: the dense step
    engine = SparseEngine(net, SPARSITY, grow="gradient")
    ema = MaskedEMA(net, 0.999)
    optimizer.zero_grad(set_to_none=True)
    loss_fn(net).backward()
    weights = engine.weights
    sides = {
        "masks": (lambda: (mask_gradients(weights), apply_masks(weights)),
                  lambda: (engine.mask_gradients(), engine.apply_masks())),
        "ema": (per_tensor_ema(ema, net), lambda: ema.update(net, weights_masked=True)),
    }  # fmt: skip
    record: dict[str, Any] = {
        "model": name,
        "threads": threads,
        "params": sum(p.numel() for p in net.parameters()),
        "prunable_tensors": len(weights),
        "prunable_weights": sum(w.param.numel() for w in weights),
        "dense_step_ms": dense_ms,
        "pairs": settings["pairs"],
    }
    for part, (before, after) in sides.items():
        paired(before, after, settings["warmup"])
        before_t, after_t = paired(before, after, settings["pairs"])
        record[part] = {
            "before_ms": 1e3 * statistics.median(before_t),
            "after_ms": 1e3 * statistics.median(after_t),
            "after_over_before": median_ratio(after_t, before_t),
        }
    return record


def write_markdown(results: dict[str, Any], path: Path) -> None:
    m = results["machine"]
    lines = [
        "# Per-step mask bookkeeping on the CPU: per-tensor vs multi-tensor ops "
        "(generated by `python -m benchmarks.masking`; do not edit)",
        "",
        f"Machine: {m['cpu']} (family/model/stepping {'/'.join(m['family_model_stepping'])}; "
        f"{' '.join(m['vector_flags'])}), {m['cores']} cores, torch {m['torch']} "
        f"(built with {m['torch_compiler']}, CPU capability {m['cpu_capability']}); load average at start "
        f"{', '.join(f'{v:.1f}' for v in m['load_average'])} (a shared machine: paired timings, order "
        "alternating, medians of per-pair ratios).",
        "",
        "| model | threads | prunable tensors | dense step ms | masks before ms | masks after ms "
        "| after / before | EMA before ms | EMA after ms | after / before |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["records"]:
        masks, ema = r["masks"], r["ema"]
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['prunable_tensors']} | {r['dense_step_ms']:.1f} | "
            f"{masks['before_ms']:.3f} | {masks['after_ms']:.3f} | {masks['after_over_before']:.2f} | "
            f"{ema['before_ms']:.3f} | {ema['after_ms']:.3f} | {ema['after_over_before']:.2f} |"
        )
    lines += [
        "",
        "Masks = zeroing the inactive gradients and the inactive weights (what sparsity adds to a step);",
        "EMA = the weight average's update after the re-mask (dense runs do it too). The dense step (median",
        "of a few steps before the pairs, not paired) is only for scale: on a loaded machine, and with 2",
        "threads on 2 shared cores, it shows the load more than the model. Both sides compute",
        "the same bits (tests/sparsity/test_step_masking.py). The GPU figures (+9.6% ChiroDiff, +10.8% the",
        "274M UNet, sparse over dense step, H200, per-tensor masking) were not re-measured with these ops;",
        "`python -m benchmarks.gpu` measures them on a CUDA machine.",
    ]
    path.write_text("\n".join(lines) + "\n")


def run(settings: dict, out_json: Path, out_md: Path) -> dict[str, Any]:
    info = machine()
    records = [
        measure(f"ChiroDiff KanjiVG default (bi-GRU 3x96), batch {settings['chirodiff_batch']}",
                chirodiff_case(settings["chirodiff_batch"]), threads, settings)
        for threads in settings["threads"]
    ] + [
        measure(f"UNet 32ch, 3x16x16, batch {settings['unet_batch']}", unet_case(settings["unet_batch"]),
                threads, settings)
        for threads in settings["threads"]
    ]  # fmt: skip
    results = {"machine": info, "settings": settings, "records": records}
    out_json.write_text(json.dumps(results, indent=2))
    write_markdown(results, out_md)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds), to test the script")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_masking.json"))
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks_masking.md")
    args = parser.parse_args()
    run(QUICK if args.quick else FULL, args.out, args.markdown)
    print(args.markdown.read_text())


if __name__ == "__main__":
    main()
