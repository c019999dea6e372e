"""`make bench-train` / `python -m benchmarks.train_backend [--quick]`: a whole training step of the default
ChiroDiff (bi-GRU 3 x 96, batch 128, bundled KanjiVG, RigL) with backend=sparse against backend=dense.

Both sides are built by the training code itself (`build_run`, plus `SparseBackend` for the sparse side),
from the same seed, and step through the module's own order (forward + masked MSE, backward,
`SparseStep.before_step`, AdamW, `after_step`: re-mask or count, EMA, mask update when due), on the same
real batches. At each S in {0.5, 0.75, 0.9, 0.95} and 1 and 2 threads, in one process:
- normal steps and mask-update steps (the engine's step counter set so that the step is an update:
  RigL's dense gradient, prune + grow, moment reset, EMA resync), paired dense/sparse with the side
  that runs first alternating; medians and per-pair ratios of wall and CPU time (CPU time does not
  grow while a process is descheduled: the steadier figure on shared cores);
- the amortised step at the paper's Te (800 for ChiroDiff): ((Te - 1) normal + 1 update) / Te;
- where the time goes: forward, backward and optimizer + bookkeeping of a normal step, per side;
- momentum growth at S = 0.9 (`method.grow=momentum`): its running average of the dense gradient is
  updated every step, so backend=sparse forms the dense weight gradient at every step there;
- AdamW's step alone over the compact values (the run's optimizer, foreach off and on) vs the dense
  parameters: whether an ordinary AdamW serves;
- memory: tensor bytes of weights, gradients (the .grad tensors of a step) and optimizer state of both
  sides, measured; the sparse side's layout indices and both sides' bool masks beside them.
Writes benchmarks/results_train_backend.json and docs/benchmarks_train.md (rendered from the JSON;
`--render` re-renders it alone), naming the CPU model, flags, threads, compiler and the machine's load.
Per-kernel timings against this CPU's FMA and memory-bandwidth limits: benchmarks/train_step.py
(`make bench-train-kernels`, docs/benchmarks_train_kernels.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from benchmarks.pairing import pair_summary, paired
from sparse_dm import CONFIG_DIR
from sparse_dm.kernels.build import FLAGS, find_compiler
from sparse_dm.run.build import build_run
from sparse_dm.sparse_backend import load_train_kernels
from sparse_dm.sparse_backend.backend import SparseBackend, layout_bytes
from sparse_dm.sparse_backend.optimizer import tensor_bytes
from sparse_dm.sparsity.masks import MASK_SUFFIX

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "benchmarks" / "results_train_backend.json"
MARKDOWN_PATH = ROOT / "docs" / "benchmarks_train.md"
PAPER_TE = 800  # ChiroDiff's update interval in the paper (appendix B.3)
FULL = {
    "sparsities": [0.5, 0.75, 0.9, 0.95],
    "threads": [1, 2],
    "pairs": 9,
    "update_pairs": 3,
    "batch": 128,
    "momentum": [[0.9, 1]],
}
QUICK = {"sparsities": [0.9], "threads": [1], "pairs": 2, "update_pairs": 1, "batch": 16, "momentum": []}
TARGETS = [  # (S, threads, what, target): the targets
    (0.9, 1, "amortised speed-up", 2.0),
    (0.75, 1, "amortised speed-up", 1.3),
    (0.9, 1, "memory ratio", 0.35),
]


def compose(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


class Side:
    """One backend's module, engine, optimizer and batches, stepping as DiffusionModule does."""

    def __init__(self, sparsity: float, batch: int, kernels: Any, grow: str = "gradient") -> None:
        cfg = compose(
            [
                f"paths.output_dir={tempfile.mkdtemp(prefix='bench_train_')}",
                "method=rigl",
                f"method.grow={grow}",
                f"sparsity={sparsity}",
                f"update_interval={PAPER_TE}",
                "method.end_fraction=null",
                f"dataset.batch_size={batch}",
                "logger.wandb=null",
            ]
        )
        self.module, datamodule, self.engine = build_run(cfg)
        self.engine.set_total_steps(10**9)
        self.backend = None
        if kernels is not None:
            self.backend = SparseBackend(self.module.net, self.module.ema, self.engine, kernels)
            self.module.attach_sparse_backend(self.backend)
        self.optimizer = self.module.optimizer_factory(self.module.net.parameters())
        datamodule.setup("fit")
        self.batches: Iterator[dict] = itertools.cycle(
            list(itertools.islice(datamodule.train_dataloader(), 4))
        )
        self.generator = torch.Generator().manual_seed(0)
        self.phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}
        self.updates = 0

    def step(self, update: bool = False) -> None:
        """One optimizer step; `update`: make it a mask-update step (else keep clear of one)."""
        engine = self.engine
        engine.step = (self.updates + 1) * PAPER_TE - 1 if update else (self.updates * PAPER_TE) + 1
        self.updates += int(update)
        batch = next(self.batches)
        data = self.module.prepare_batch(batch)
        t = torch.randint(0, 1000, (data.x0.shape[0],), generator=self.generator)
        noise = torch.randn(data.x0.shape, generator=self.generator)
        clock = time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        if self.backend is not None:
            self.backend.step.before_forward()
        loss = self.module.diffusion_loss(data, t, noise)
        forward = time.process_time()
        loss.backward()
        backward = time.process_time()
        self.module.sparse_step.before_step()
        self.optimizer.step()
        self.module.sparse_step.after_step(self.optimizer, loss=loss.detach())
        done = time.process_time()
        if not update:
            self.phases["forward"].append(forward - clock)
            self.phases["backward"].append(backward - forward)
            self.phases["optimizer"].append(done - backward)

    def memory(self) -> dict[str, int]:
        """Tensor bytes after a step's backward (the .grad tensors exist)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.backend is not None:
            self.backend.step.before_forward()
        batch = next(self.batches)
        data = self.module.prepare_batch(batch)
        t = torch.zeros(data.x0.shape[0], dtype=torch.long)
        self.module.diffusion_loss(data, t, torch.zeros_like(data.x0)).backward()
        net = self.module.net
        params = list(net.parameters())
        parts = {
            "weights": tensor_bytes(params),
            "grads": tensor_bytes([p.grad for p in params if p.grad is not None]),
            "optimizer_state": tensor_bytes(
                [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            ),
        }
        parts["total"] = sum(parts.values())
        parts["masks"] = tensor_bytes([b for n, b in net.named_buffers() if n.endswith(MASK_SUFFIX)])
        parts["indices"] = (
            0 if self.backend is None else sum(layout_bytes(x) for x in self.backend.layouts().values())
        )
        parts["ema"] = tensor_bytes([b for b in self.module.ema.buffers() if b.is_floating_point()])
        self.optimizer.zero_grad(set_to_none=True)
        return parts


def adamw_step_ms(side: Side, foreach: bool, repeats: int = 5) -> float:
    """AdamW's step alone (lr, betas, weight decay of the run) over the side's parameters, with grads."""
    params = [p.detach().clone().requires_grad_() for p in side.module.net.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    d = side.optimizer.defaults
    optimizer = torch.optim.AdamW(
        params, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"], foreach=foreach
    )
    optimizer.step()
    times = []
    for _ in range(repeats):
        clock = time.process_time()
        optimizer.step()
        times.append(time.process_time() - clock)
    return 1e3 * statistics.median(times)


def measure(
    sparsity: float, threads: int, settings: dict, kernels: Any, grow: str = "gradient"
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    batch = settings["batch"]
    dense, sparse = Side(sparsity, batch, None, grow), Side(sparsity, batch, kernels, grow)
    for side in (dense, sparse):  # warm-up: page faults, the kernels' pools, the first update
        side.step()
        side.step(update=True)
        side.phases = {k: [] for k in side.phases}
    normal = pair_summary(paired(dense.step, sparse.step, settings["pairs"]))
    update = pair_summary(
        paired(lambda: dense.step(update=True), lambda: sparse.step(update=True), settings["update_pairs"])
    )
    amortised = {}
    for clock in ("wall", "cpu"):
        per_side = {
            side: ((PAPER_TE - 1) * normal[f"{side}_ms_{clock}"] + update[f"{side}_ms_{clock}"]) / PAPER_TE
            for side in ("dense", "sparse")
        }
        amortised |= {f"{side}_ms_{clock}": ms for side, ms in per_side.items()}
        amortised[f"speedup_{clock}"] = per_side["dense"] / per_side["sparse"]
    memory = {"dense": dense.memory(), "sparse": sparse.memory()}
    memory["ratio"] = memory["sparse"]["total"] / memory["dense"]["total"]
    memory["ratio_with_indices_and_masks"] = (
        memory["sparse"]["total"] + memory["sparse"]["indices"] + memory["sparse"]["masks"]
    ) / (memory["dense"]["total"] + memory["dense"]["masks"])
    phases = {
        name: {phase: 1e3 * statistics.median(v) for phase, v in side.phases.items()}
        for name, side in (("dense", dense), ("sparse", sparse))
    }
    adamw = {
        "dense_foreach_off_ms": adamw_step_ms(dense, foreach=False),
        "sparse_foreach_off_ms": adamw_step_ms(sparse, foreach=False),
        "sparse_foreach_on_ms": adamw_step_ms(sparse, foreach=True),
    }
    nnz = sum(w.mask.sum().item() for w in sparse.engine.weights)
    numel = sum(w.mask.numel() for w in sparse.engine.weights)
    return {
        "sparsity": sparsity,
        "threads": threads,
        "grow": grow,
        "density": nnz / numel,
        "normal": normal,
        "update": update,
        "amortised": amortised,
        "phases_cpu_ms": phases,
        "adamw_cpu_ms": adamw,
        "memory_bytes": memory,
    }


def machine(kernels: Any) -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    compiler = find_compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "compiler": f"{compiler}: {version}",
        "flags": " ".join(FLAGS),
        "threading": kernels.threading,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def load() -> float:
    return os.getloadavg()[0]


def run(settings: dict) -> dict[str, Any]:
    kernels = load_train_kernels(Path(tempfile.mkdtemp(prefix="bench_train_kernels_")))
    started = time.time()
    info = machine(kernels) | {"load_average_start": load()}
    rows = [measure(s, t, settings, kernels) for t in settings["threads"] for s in settings["sparsities"]]
    rows += [measure(s, t, settings, kernels, grow="momentum") for s, t in settings.get("momentum", [])]
    info |= {"load_average_end": load(), "seconds": time.time() - started}
    return {"machine": info, "settings": settings, "paper_te": PAPER_TE, "rows": rows}


def target_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for sparsity, threads, what, target in TARGETS:
        row = next(
            (
                r
                for r in results["rows"]
                if (r["sparsity"], r["threads"], grow(r)) == (sparsity, threads, "gradient")
            ),
            None,
        )
        if row is None:
            continue
        if what == "memory ratio":
            value = row["memory_bytes"]["ratio"]
            met = value <= target
            lines.append(f"- S = {sparsity}, memory (weights + grads + AdamW): {value:.3f}x dense "
                         f"(target <= {target}x): {'met' if met else 'MISSED'}")  # fmt: skip
        else:
            value = row["amortised"]["speedup_cpu"]
            met = value >= target
            lines.append(f"- S = {sparsity}, {threads} thread: amortised step {value:.2f}x faster (CPU time; "
                         f"wall {row['amortised']['speedup_wall']:.2f}x), target >= {target}x: "
                         f"{'met' if met else 'MISSED'}")  # fmt: skip
    return lines


def grow(row: dict[str, Any]) -> str:
    return row.get("grow", "gradient")


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Training step: backend=sparse vs backend=dense",
        "",
        "Generated by `make bench-train` (`python -m benchmarks.train_backend`) from "
        "`benchmarks/results_train_backend.json`; do not edit by hand "
        "(`python -m benchmarks.train_backend --render` re-renders it).",
        "",
        f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs); load average "
        f"{m['load_average_start']:.1f} at the start, {m['load_average_end']:.1f} at the end"
        + load_note(m),
        f"- compiler: {m['compiler']}; flags `{m['flags']}`; threads: {m['threading']}",
        f"- torch {m['torch']}, Python {m['python']}; {results['machine']['seconds']:.0f} s",
        f"- model: default ChiroDiff (bi-GRU 3 x 96, Linear 192 -> 96, Linear 104 -> 3), batch "
        f"{results['settings']['batch']}, bundled KanjiVG, RigL p = 0.5, AdamW (lr 1e-3, wd 1e-2), EMA",
        f"- amortised: ((Te - 1) normal + 1 mask-update step) / Te at the paper's Te = {results['paper_te']}",
        "",
        "## Targets",
        "",
        *target_lines(results),
        "",
        "## Whole training step (median ms; speed-up = dense / sparse, median of pairs [min, max])",
        "",
        "| S | growth | density | threads | dense ms (CPU) | sparse ms (CPU) | normal step | update step | "
        "amortised (CPU) | amortised (wall) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        n, u, a = r["normal"], r["update"], r["amortised"]
        lines.append(
            f"| {r['sparsity']} | {grow(r)} | {r['density']:.3f} | {r['threads']} | "
            f"{n['dense_ms_cpu']:.1f} | "
            f"{n['sparse_ms_cpu']:.1f} | {n['speedup_cpu']:.2f}x [{n['speedup_cpu_min']:.2f}, "
            f"{n['speedup_cpu_max']:.2f}] | {u['speedup_cpu']:.2f}x ({u['dense_ms_cpu']:.0f} / "
            f"{u['sparse_ms_cpu']:.0f} ms) | {a['speedup_cpu']:.2f}x | {a['speedup_wall']:.2f}x |"
        )
    lines += [
        "",
        "## Where the time goes",
        "",
        "Normal step, median CPU ms: forward / backward / optimizer + bookkeeping (AdamW, EMA, engine).",
        "",
        "| S | growth | threads | dense | sparse | AdamW step alone: dense / compact (foreach off) / "
        "compact (foreach on) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        d, s, w = r["phases_cpu_ms"]["dense"], r["phases_cpu_ms"]["sparse"], r["adamw_cpu_ms"]
        lines.append(
            f"| {r['sparsity']} | {grow(r)} | {r['threads']} | {d['forward']:.1f} / {d['backward']:.1f} / "
            f"{d['optimizer']:.1f} | {s['forward']:.1f} / {s['backward']:.1f} / {s['optimizer']:.1f} | "
            f"{w['dense_foreach_off_ms']:.2f} / {w['sparse_foreach_off_ms']:.2f} / "
            f"{w['sparse_foreach_on_ms']:.2f} |"
        )
    lines += [
        "",
        "## Memory (tensor bytes, measured after a step's backward)",
        "",
        "| S | dense: weights + grads + AdamW | sparse: weights + grads + AdamW | ratio | sparse indices | "
        "masks (both) | ratio with indices and masks | EMA dense / sparse |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if r["threads"] != results["settings"]["threads"][0] or grow(r) != "gradient":
            continue
        mem = r["memory_bytes"]
        d, s = mem["dense"], mem["sparse"]
        lines.append(
            f"| {r['sparsity']} | {d['total']:,} | {s['total']:,} | {mem['ratio']:.3f} | {s['indices']:,} | "
            f"{s['masks']:,} | {mem['ratio_with_indices_and_masks']:.3f} | {d['ema']:,} / {s['ema']:,} |"
        )
    lines += [
        "",
        *baseline_note(results),
        "Reading the figures: the normal step is what 799 of 800 steps cost. The update step adds RigL's "
        "dense weight gradient (one dense GEMM per weight in the backward) and the masked engine's "
        "prune/grow on dense views; the update-step column shows what that costs against a dense run's "
        "update step. With momentum growth every step forms the dense gradient (its running average). "
        "Per-kernel rates against the FMA and memory-bandwidth limits of this CPU: "
        "`make bench-train-kernels` (docs/benchmarks_train_kernels.md).",
        "",
    ]
    return "\n".join(lines)


def load_note(m: dict[str, Any]) -> str:
    """A warning when the machine was busier than its CPU count during the run."""
    if max(m["load_average_start"], m["load_average_end"]) <= m["logical_cpus"]:
        return ""
    return " (above the CPU count: shared cores, wall times inflated; CPU times are the steadier figures)"


def baseline_note(results: dict[str, Any]) -> list[str]:
    """What the dense baseline is, and which part of the ratio sparsity alone buys: the dense step is
    torch's nn.GRU, whose CPU backward dominates it, so the sparse rows compared among themselves are the
    gain from sparsity at fixed kernels."""
    rows = [r for r in results["rows"] if grow(r) == "gradient" and r["threads"] == 1]
    if len(rows) < 2:
        return []
    first, last = rows[0], rows[-1]
    d = first["phases_cpu_ms"]["dense"]
    share = d["backward"] / (d["forward"] + d["backward"] + d["optimizer"])
    return [
        "The dense baseline is what `backend=dense` trains: torch's `nn.GRU` and `nn.Linear`, whose CPU "
        f"backward is {share:.0%} of a dense step here (1 thread, S = {first['sparsity']}). Part of every "
        "ratio above is that backward against our kernels, not sparsity: even at "
        f"S = {first['sparsity']} the compact step is {first['normal']['speedup_cpu']:.2f}x faster. What "
        "sparsity alone buys at fixed kernels is the compact rows among themselves: "
        f"{first['normal']['sparse_ms_cpu']:.0f} ms at S = {first['sparsity']} -> "
        f"{last['normal']['sparse_ms_cpu']:.0f} ms at S = {last['sparsity']} "
        f"({first['normal']['sparse_ms_cpu'] / last['normal']['sparse_ms_cpu']:.2f}x for "
        f"{(1 - first['sparsity']) / (1 - last['sparsity']):.0f}x fewer weights; the fixed cost is the "
        "gate math, activations and bookkeeping, which do not shrink with S).",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one S, one thread, two pairs, batch 16")
    parser.add_argument("--out", type=Path, default=JSON_PATH)
    parser.add_argument("--markdown", type=Path, default=MARKDOWN_PATH)
    parser.add_argument("--render", action="store_true", help="only re-render the markdown from --out")
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.out.read_text())
    else:
        results = run(QUICK if args.quick else FULL)
        args.out.write_text(json.dumps(results, indent=2))
    args.markdown.write_text(render(results))
    print("\n".join(target_lines(results)))


if __name__ == "__main__":
    main()
