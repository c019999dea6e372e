"""`make bench-train-kernels` / `python -m benchmarks.train_step [--quick]`: the sparse training kernels
against masked dense PyTorch, forward + backward, at the default ChiroDiff's shapes.

Cases, each at S in {0.5, 0.75, 0.9, 0.95} (the engine's ER counts for that S) and 1 and 2 threads:
- `gru`: the whole bi-GRU (13 -> 96, 3 layers) on a packed KanjiVG batch of 128, nn.GRU (MKL/oneDNN,
  masked weights) vs SparseBiGRU (compiled); `gru_l0` / `gru_l1`: one layer of each input width;
  `gru_dense_grad`: SparseBiGRU also forming every dense weight gradient (mask-update steps);
- `proj`: Linear(192 -> 96) over the padded (B * L, 192) rows the model feeds it, nn.Linear vs
  SparseLinear (row-major, with its transposes) and SparseLinear.forward_columns (feature-major);
- `model_step`: a whole optimisation step of the denoiser (forward, masked MSE, backward, gradient
  clipping, AdamW), the masked engine (SparseEngine before/after the step, no mask update) vs the
  compact layers through `chirodiff.forward_columns` with AdamW over values and biases. It is this
  package's composition, not the Lightning step (`make bench-train` measures that).
Every comparison is paired in one process, the side that runs first alternating between pairs; the
median, min and max of the per-pair ratios (dense / sparse) are reported, as wall and CPU time (the
CPU time of a descheduled process does not grow, so it is the steadier figure on shared cores).
Kernel rows: each kernel's GFMA/s at the real shapes beside this CPU's attainable limits, measured
here: a large MKL SGEMM (FMA rate) and a 256 MiB copy (memory bandwidth). Writes
benchmarks/results_train_step.json and docs/benchmarks_train_kernels.md (from the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from benchmarks.pairing import pair_summary, paired
from sparse_dm.data.stroke3 import load_stroke3_npz, resolve_data_path
from sparse_dm.kernels.build import find_compiler
from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.sparse_backend import ColumnPlan, SparseBiGRU, SparseLayout, SparseLinear, load_train_kernels
from sparse_dm.sparse_backend.chirodiff import forward_columns
from sparse_dm.sparsity import SparseEngine

ROOT = Path(__file__).resolve().parents[1]
DATA = "kanjivg/kanji.rdp200.npz"  # the default dataset (conf/dataset/kanjivg.yaml)
FULL = {
    "pairs": 15,
    "warmup": 2,
    "repeats": 20,
    "sparsities": [0.5, 0.75, 0.9, 0.95],
    "threads": [1, 2],
    "batch": 128,
}
QUICK = {"pairs": 2, "warmup": 1, "repeats": 3, "sparsities": [0.9], "threads": [1], "batch": 16}


def kanjivg_batch(batch: int) -> torch.Tensor:
    pool = torch.tensor([len(d) for d in load_stroke3_npz(resolve_data_path(DATA))["train"]])
    return pool[torch.randint(0, len(pool), (batch,), generator=torch.Generator().manual_seed(0))]


def masked_model(sparsity: float) -> ChiroDiffNet:
    """The default ChiroDiff with the engine's masks for `sparsity` (ER counts, weights zero outside)."""
    torch.manual_seed(0)
    net = ChiroDiffNet()
    SparseEngine(net, sparsity, seed=0)
    return net


def single_layer(gru: nn.GRU, layer: int) -> nn.GRU:
    """Layer `layer` of `gru` (weights and masks) as a one-layer bidirectional nn.GRU."""
    input_size = gru.input_size if layer == 0 else 2 * gru.hidden_size
    one = nn.GRU(input_size, gru.hidden_size, 1, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for suffix in ("", "_reverse"):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(one, f"{kind}_l0{suffix}").copy_(getattr(gru, f"{kind}_l{layer}{suffix}"))
                mask = getattr(gru, f"{kind}_l{layer}{suffix}_mask", None)
                if mask is not None:
                    one.register_buffer(f"{kind}_l0{suffix}_mask", mask.clone())
    return one


def gru_step(module: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        output, _ = module(packed)
        output.data.sum().backward()

    return step


def linear_step(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, module: nn.Module):
    def step() -> None:
        module.zero_grad(set_to_none=True)
        forward(x).sum().backward()

    return step


def model_steps(sparsity: float, kernels: Any, lengths: torch.Tensor) -> tuple[Callable[[], None], ...]:
    """(masked dense step, compact step) of the whole denoiser on one KanjiVG-shaped batch."""
    torch.manual_seed(0)
    dense_net, sparse_net = ChiroDiffNet(), ChiroDiffNet()
    engine = SparseEngine(dense_net, sparsity, seed=0)
    SparseEngine(sparse_net, sparsity, seed=0)
    sparse_net.load_state_dict(dense_net.state_dict())
    sparse_net.gru = SparseBiGRU(sparse_net.gru, kernels)
    sparse_net.proj = SparseLinear.from_linear(sparse_net.proj, kernels)
    sparse_net.out = SparseLinear.from_linear(sparse_net.out, kernels)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(len(lengths), int(lengths.max()), 3, generator=generator)
    t = torch.randint(0, 1000, (len(lengths),), generator=generator)
    target = torch.randn(x.shape, generator=generator)
    real = (torch.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]

    def loss_of(eps: torch.Tensor) -> torch.Tensor:
        return ((eps - target).pow(2) * real).sum() / (real.sum() * 3)

    optimizers = [
        torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-2) for net in (dense_net, sparse_net)
    ]

    def dense_step() -> None:
        loss_of(dense_net(x, t, lengths)).backward()
        engine.before_step()
        torch.nn.utils.clip_grad_norm_(dense_net.parameters(), 1.0)
        optimizers[0].step()
        engine.remask()
        optimizers[0].zero_grad(set_to_none=True)

    def sparse_step() -> None:
        loss_of(forward_columns(sparse_net, x, t, lengths)).backward()
        torch.nn.utils.clip_grad_norm_(sparse_net.parameters(), 1.0)
        optimizers[1].step()
        optimizers[1].zero_grad(set_to_none=True)

    return dense_step, sparse_step


def measure_cases(sparsity: float, threads: int, settings: dict, kernels: Any, lengths: torch.Tensor) -> list:
    torch.set_num_threads(threads)
    net = masked_model(sparsity)
    batch, longest = len(lengths), int(lengths.max())
    generator = torch.Generator().manual_seed(1)
    x13 = torch.randn(batch, longest, 13, generator=generator).requires_grad_()
    x192 = torch.randn(batch, longest, 192, generator=generator).requires_grad_()
    cases: list[tuple[str, Callable[[], None], Callable[[], None]]] = []
    cases.append(
        ("gru", gru_step(net.gru, x13, lengths), gru_step(SparseBiGRU(net.gru, kernels), x13, lengths))
    )
    for layer, x in ((0, x13), (1, x192)):
        one = single_layer(net.gru, layer)
        cases.append(
            (f"gru_l{layer}", gru_step(one, x, lengths), gru_step(SparseBiGRU(one, kernels), x, lengths))
        )
    requesting = SparseBiGRU(net.gru, kernels)
    requesting.dense_grad_requested = True

    def with_dense_grads() -> None:
        requesting.clear_dense_grads()
        gru_step(requesting, x13, lengths)()

    cases.append(("gru_dense_grad", gru_step(net.gru, x13, lengths), with_dense_grads))
    rows = torch.randn(batch * longest, 192, generator=generator).requires_grad_()
    sparse_proj = SparseLinear.from_linear(net.proj, kernels)
    cases.append(("proj", linear_step(net.proj, rows, net.proj), linear_step(sparse_proj, rows, sparse_proj)))
    plan = ColumnPlan.build(pack_padded_sequence(x13, lengths, batch_first=True, enforce_sorted=False)
                            .batch_sizes, kernels.lanes)  # fmt: skip
    columns = torch.randn(192, plan.columns, generator=generator).requires_grad_()
    cases.append(("proj_columns", linear_step(net.proj, rows, net.proj),
                  linear_step(sparse_proj.forward_columns, columns, sparse_proj)))  # fmt: skip
    cases.append(("model_step", *model_steps(sparsity, kernels, lengths)))
    records = []
    for name, dense, sparse in cases:
        for _ in range(settings["warmup"]):
            dense()
            sparse()
        records.append({"case": name, "sparsity": sparsity, "threads": threads,
                        **pair_summary(paired(dense, sparse, settings["pairs"]))})  # fmt: skip
        print(json.dumps(records[-1]))
    return records


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """The least CPU time of this thread over `repeats` calls: single-threaded work only (the limits and
    kernel rows run at 1 thread), and not inflated when a busy machine deschedules the process."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return min(times)


def limits(repeats: int) -> dict[str, float]:
    """This core's attainable FMA rate (MKL SGEMM 2048^3) and copy bandwidth at the kernels' operand
    size (8 MiB: one layer's activations, cache resident) and from DRAM (256 MiB), 1 thread."""
    torch.set_num_threads(1)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out = {"sgemm_gfma_s": 2048**3 / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9}
    for key, mib in (("copy_gb_s", 8), ("dram_copy_gb_s", 256)):
        src, dst = torch.ones(mib * 2**18), torch.empty(mib * 2**18)
        out[key] = 2 * src.numel() * 4 / best_seconds(lambda src=src, dst=dst: dst.copy_(src), repeats) / 1e9
    return out


def kernel_rates(kernels: Any, sparsity: float, lengths: torch.Tensor, repeats: int) -> list[dict[str, Any]]:
    """GFMA/s of each product over one layer's real columns, 1 thread, best of `repeats` (warm buffers)."""
    torch.set_num_threads(1)
    net = masked_model(sparsity)
    x = torch.randn(len(lengths), int(lengths.max()), 13)
    plan = ColumnPlan.build(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
                            .batch_sizes, kernels.lanes)  # fmt: skip
    ld = plan.columns
    rows = []
    for name in ("weight_ih_l0", "weight_ih_l1", "weight_hh_l1"):
        layout = SparseLayout.from_mask(getattr(net.gru, name + "_mask"))
        values = layout.compact(getattr(net.gru, name).detach())
        out_rows, in_rows = layout.shape
        x_in, y = torch.randn(in_rows, ld), torch.randn(out_rows, ld)
        y_out, x_out, grads = torch.empty(out_rows, ld), torch.empty(in_rows, ld), torch.empty(layout.nnz)
        fma = layout.nnz * ld
        for kernel, fn in (
            ("spmm", partial(kernels.spmm, layout, values, x_in, y_out)),
            ("spmm_transpose", partial(kernels.spmm, layout, values, y, x_out, transpose=True)),
            ("sddmm", partial(kernels.sddmm, layout, y, x_in, grads)),
        ):
            seconds = best_seconds(fn, repeats)
            # bytes each kernel must move at least once: its dense operands and the result
            moved = 4 * ld * (in_rows + out_rows) + 8 * layout.nnz
            rows.append({"weight": name, "density": layout.density, "kernel": kernel, "ms": 1e3 * seconds,
                         "gfma_s": fma / seconds / 1e9, "min_bytes_gb_s": moved / seconds / 1e9})  # fmt: skip
    return rows


def cpu_model() -> str:
    """Model name, family/model numbers and the widest vector extension (a VM's name may be generic)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return f"{platform.machine()} {platform.processor()}"
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    vectors = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "")
    family, model = fields.get("cpu family", "?"), fields.get("model", "?")
    return f"{fields.get('model name', '?')} (family {family}, model {model}, {vectors})"


def machine() -> dict[str, str]:
    model = cpu_model()
    compiler = find_compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "compiler": version,
        "torch": torch.__version__,
    }


def limit_reading(kernels: list[dict[str, Any]], lim: dict[str, float]) -> list[str]:
    """Which limit each kernel is near, from the numbers: the memory traffic it must cause at least,
    against the copy bandwidth, and its FMA rate, against SGEMM on the same core."""
    fma = [r["gfma_s"] / lim["sgemm_gfma_s"] for r in kernels]
    traffic = [r["min_bytes_gb_s"] / lim["copy_gb_s"] for r in kernels]
    return [
        f"Reading: the kernels run at {100 * min(fma):.0f}-{100 * max(fma):.0f}% of this core's SGEMM FMA "
        f"rate while moving at least {100 * min(traffic):.0f}-{100 * max(traffic):.0f}% of the copy "
        "bandwidth at their operand size. "
        + (
            "Their minimum traffic stays below that bandwidth, so they are bound by the work per "
            "active entry (an index and a value load, a broadcast, then 1-4 vector FMAs over the columns, "
            "from L1/L2), not by DRAM; a dense GEMM reuses each loaded value across a register tile instead."
            if max(traffic) < 1.0
            else "At least one kernel moves as much as a copy of its operands does: it is memory bound."
        )
    ]


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    m, lim = results["machine"], results["limits"]
    lines = [
        "# Sparse training kernels vs masked dense PyTorch (forward + backward)",
        "",
        f"Generated by `make bench-train-kernels` from `{results['json']}`. CPU: {m['cpu']}; compiler: "
        f"{m['compiler']}; torch {m['torch']}; kernels built with `{results['threading']}` threads. "
        "Per-pair speed-ups (dense / sparse), median [min, max] of "
        f"{results['settings']['pairs']} alternating pairs; CPU time is the steadier figure. Load average "
        f"(1 min) {results['load_average'][0]:.1f} at the start, {results['load_average'][1]:.1f} at the end "
        f"on {m['cores']} cores.",
        "",
        f"This CPU, 1 thread (least CPU time of {results['settings']['repeats']} calls, as the kernel rows): "
        f"MKL SGEMM {lim['sgemm_gfma_s']:.1f} GFMA/s (attainable FMA rate); copy "
        f"{lim['copy_gb_s']:.1f} GB/s at 8 MiB (the kernels' operand size), {lim['dram_copy_gb_s']:.1f} GB/s "
        "at 256 MiB (DRAM).",
        "",
        "| case | S | threads | dense ms (cpu) | sparse ms (cpu) | speed-up cpu | speed-up wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["cases"]:
        cpu = f"{r['speedup_cpu']:.2f}x [{r['speedup_cpu_min']:.2f}, {r['speedup_cpu_max']:.2f}]"
        wall = f"{r['speedup_wall']:.2f}x [{r['speedup_wall_min']:.2f}, {r['speedup_wall_max']:.2f}]"
        lines.append(
            f"| {r['case']} | {r['sparsity']} | {r['threads']} | {r['dense_ms_cpu']:.1f} "
            f"| {r['sparse_ms_cpu']:.1f} | {cpu} | {wall} |"
        )
    lines += ["", f"Kernels at S = {results['kernel_sparsity']}, 1 thread, one layer's real columns:", "",
              "| weight | density | kernel | ms | GFMA/s | % of SGEMM | GB/s (minimum traffic) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["kernels"]:
        share = 100 * r["gfma_s"] / lim["sgemm_gfma_s"]
        lines.append(
            f"| {r['weight']} | {r['density']:.3f} | {r['kernel']} | {r['ms']:.3f} | {r['gfma_s']:.1f} "
            f"| {share:.0f}% | {r['min_bytes_gb_s']:.1f} |"
        )
    lines += ["", *limit_reading(results["kernels"], lim)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(settings: dict, out_json: Path, out_md: Path) -> dict[str, Any]:
    threads_before = torch.get_num_threads()
    kernels = load_train_kernels(Path(tempfile.mkdtemp(prefix="sparse_dm_bench_kernels_")))
    lengths = kanjivg_batch(settings["batch"])
    info = machine()
    load_before = os.getloadavg()[0]
    cases = [r for s in settings["sparsities"] for n in settings["threads"]
             for r in measure_cases(s, n, settings, kernels, lengths)]  # fmt: skip
    kernel_sparsity = 0.9
    results = {
        "machine": info,
        "load_average": [load_before, os.getloadavg()[0]],  # 1-minute, at start and after the cases
        "threading": kernels.threading,
        "settings": settings,
        "json": str(out_json.relative_to(ROOT) if out_json.is_relative_to(ROOT) else out_json),
        "batch_columns": int(lengths.sum()),
        "limits": limits(settings["repeats"]),
        "cases": cases,
        "kernel_sparsity": kernel_sparsity,
        "kernels": kernel_rates(kernels, kernel_sparsity, lengths, settings["repeats"]),
    }
    torch.set_num_threads(threads_before)
    out_json.write_text(json.dumps(results, indent=2))
    write_markdown(results, out_md)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds)")
    parser.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1 2)")
    parser.add_argument("--sparsities", type=float, nargs="+", help="S values (default: 0.5 0.75 0.9 0.95)")
    parser.add_argument("--pairs", type=int, help="alternating pairs per comparison (default: 15)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_train_step.json"))
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks_train_kernels.md")
    args = parser.parse_args()
    settings = dict(QUICK if args.quick else FULL)
    for key in ("threads", "sparsities", "pairs"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    run(settings, args.out, args.markdown)
    print(args.markdown.read_text())


if __name__ == "__main__":
    main()
