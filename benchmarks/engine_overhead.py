"""Training-step time of the sparse engine vs dense, in the same process (`make bench`).

For each model: identical copies, one trained dense and one under a SparseEngine (S=0.9, RigL),
AdamW with gradient clipping. Steps are interleaved (dense, sparse, dense, ...) and the median of
per-pair ratios is the per-step overhead (gradient masking + re-masking), since these machines are
noisy. One mask update (prune + grow + optimizer-state reset) is timed separately and amortised over
the paper's Te (800 ChiroDiff, 1100 LDM). Prints a table and writes benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sparse_dm.models.chirodiff import ChiroDiffNet
from sparse_dm.models.ldm_unet import UNetModel
from sparse_dm.sparsity import SparseEngine
from sparse_dm.sparsity.explorer import explore, update_generator

UPDATE_REPEATS = 3


def chirodiff_case(batch: int, length: int) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    net = ChiroDiffNet(hidden_size=128, num_layers=3)
    x = torch.randn(batch, length, 3)
    t = torch.randint(0, 1000, (batch,))
    lengths = torch.randint(length // 2, length + 1, (batch,))
    lengths[0] = length
    return net, lambda m: m(x, t, lengths).pow(2).mean()


def unet_case(batch: int, size: int) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    net = UNetModel(
        in_channels=3,
        out_channels=3,
        model_channels=64,
        channel_mult=[1, 2, 2],
        num_res_blocks=1,
        attention_resolutions=[2],
        num_head_channels=32,
    )
    x = torch.randn(batch, 3, size, size)
    t = torch.randint(0, 1000, (batch,))
    return net, lambda m: m(x, t).pow(2).mean()


def step_fn(net: nn.Module, loss_fn, engine: SparseEngine | None):
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-2)

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net).backward()
        if engine is not None:
            engine.before_step()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        if engine is not None:
            engine.after_step(optimizer)
        return time.perf_counter() - start

    return step


def update_ms(engine: SparseEngine) -> float:
    """Median wall time of one exploration step on the current weights and gradients."""
    grads = [w.param.grad for w in engine.weights]
    times = []
    for i in range(UPDATE_REPEATS):
        start = time.perf_counter()
        explore(engine.weights, 0.5, engine.prune, engine.grow, update_generator(0, i), grads)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(name: str, case, steps: int, warmup: int, sparsity: float, paper_te: int) -> dict:
    torch.manual_seed(0)
    dense_net, loss_fn = case
    sparse_net = copy.deepcopy(dense_net)
    engine = SparseEngine(sparse_net, sparsity, grow="gradient", prune_rate=0.5, update_interval=paper_te)
    dense_step, sparse_step = step_fn(dense_net, loss_fn, None), step_fn(sparse_net, loss_fn, engine)
    for _ in range(warmup):
        dense_step()
        sparse_step()
    pairs = [(dense_step(), sparse_step()) for _ in range(steps)]
    ratios = [s / d for d, s in pairs]
    dense_ms = 1e3 * statistics.median(d for d, _ in pairs)
    per_step = 100 * (statistics.median(ratios) - 1)
    update = update_ms(engine)
    return {
        "model": name,
        "params": sum(p.numel() for p in dense_net.parameters()),
        "steps": steps,
        "dense_ms": dense_ms,
        "sparse_ms": 1e3 * statistics.median(s for _, s in pairs),
        "overhead_pct": per_step,
        "update_ms": update,
        "paper_te": paper_te,
        "total_overhead_pct": per_step + 100 * update / (paper_te * dense_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = {  # name -> (case, the paper's Te for that family)
        "chirodiff bi-GRU 3x128, T=64, batch 128": (chirodiff_case(128, 64), 800),
        "UNet 64ch, 3x32x32, batch 16": (unet_case(16, 32), 1100),
    }
    results = [measure(n, c, args.steps, args.warmup, args.sparsity, te) for n, (c, te) in cases.items()]
    print(
        f"{'model':<42} {'params':>10} {'dense ms':>9} {'sparse ms':>10} {'per step':>9} "
        f"{'update ms':>10} {'total at Te':>12}"
    )
    for r in results:
        print(
            f"{r['model']:<42} {r['params']:>10,} {r['dense_ms']:>9.1f} {r['sparse_ms']:>10.1f} "
            f"{r['overhead_pct']:>8.2f}% {r['update_ms']:>10.1f} "
            f"{r['total_overhead_pct']:>7.2f}% @{r['paper_te']}"
        )
    args.out.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
