"""`python -m benchmarks.timestep_bands [--quick]`: what timestep-band masks cost in wall time.

The default ChiroDiff on KanjiVG-shaped batches, one thread, paired in one process (which side runs
first alternates; the median of per-pair ratios is reported):
1. a training step (forward, backward, engine, AdamW) with one mask at S = 0.9 vs two bands at
   S = 0.85 / 0.95 (the batch split by band; each part through functional_call with masked copies);
2. 50-step DDIM sampling with the same two models (each step one band: one masked copy per layer).
Both sides run dense kernels, so this is the bookkeeping overhead of the bands, not a FLOPs saving.
Writes benchmarks/timestep_bands.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.suite import chirodiff_case, kanjivg_lengths, median_ratio, paired
from sparse_dm.diffusion import NoiseSchedule, ddim_sample
from sparse_dm.sparsity import BandedSparseEngine, SparseEngine, TimestepBands

ROOT = Path(__file__).resolve().parents[1]
FULL = {"pairs": 4, "batch": 128, "sample_batch": 16, "ddim_steps": 50, "sample_pairs": 2}
QUICK = {"pairs": 2, "batch": 8, "sample_batch": 4, "ddim_steps": 2, "sample_pairs": 1}
SINGLE_SPARSITY = 0.9
BANDS = TimestepBands((500,), (0.85, 0.95), 1000)


def build(batch: int, banded: bool):
    torch.manual_seed(0)
    net, loss_fn = chirodiff_case(batch)
    if banded:
        engine = BandedSparseEngine(net, BANDS, grow="gradient", update_interval=800)
        call = engine.router
    else:
        engine = SparseEngine(net, SINGLE_SPARSITY, grow="gradient", update_interval=800)
        call = net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(call).backward()
        engine.before_step()
        optimizer.step()
        engine.after_step(optimizer)

    return net, call, step


def run(settings: dict, out_json: Path) -> dict:
    torch.set_num_threads(1)
    _, single_call, single_step = build(settings["batch"], banded=False)
    _, banded_call, banded_step = build(settings["batch"], banded=True)
    single_step(), banded_step()  # warm-up
    t_single, t_banded = paired(single_step, banded_step, settings["pairs"])
    pool = kanjivg_lengths()
    generator = torch.Generator().manual_seed(1)
    lengths = pool[torch.randint(0, len(pool), (settings["sample_batch"],), generator=generator)]
    x_T = torch.randn(settings["sample_batch"], int(lengths.max()), 3, generator=generator)
    schedule = NoiseSchedule("linear", 1000, 1e-4, 2e-2)

    def sampler(call):
        return lambda: ddim_sample(lambda x, t: call(x, t, lengths), x_T, schedule, settings["ddim_steps"])

    s_single, s_banded = paired(sampler(single_call), sampler(banded_call), settings["sample_pairs"])
    results = {
        "settings": settings,
        "torch": torch.__version__,
        "train_step_ms_single": 1e3 * min(t_single),
        "train_step_ms_banded": 1e3 * min(t_banded),
        "train_step_ratio_banded_over_single": median_ratio(t_banded, t_single),
        "ddim_s_single": min(s_single),
        "ddim_s_banded": min(s_banded),
        "ddim_ratio_banded_over_single": median_ratio(s_banded, s_single),
    }
    out_json.write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke version")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "timestep_bands.json")
    args = parser.parse_args()
    print(json.dumps(run(QUICK if args.quick else FULL, args.out), indent=2))


if __name__ == "__main__":
    main()
