"""The model card written beside an exported model: what it is, how it was trained, what it measured.

Everything comes from the run folder (its resolved config, `.hydra/overrides.yaml` and `summary.json`) and the
exported file's own per-layer counts, so the card cannot disagree with the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sparse_dm.files.safetensors_file import layer_records
from sparse_dm.run.folder import SUMMARY

MARKER = "<!-- written by python -m sparse_dm.export -->"
# The data's licence, by dataset config name; a dataset not listed is said to be unrecorded.
DATA_LICENCES = {
    "kanjivg": "CC BY-SA 3.0 (KanjiVG, Ulrich Apel; see sparse_dm/data/assets/kanjivg/README.md)",
    "kanjivg_images": "CC BY-SA 3.0 (KanjiVG, Ulrich Apel)",
    "quickdraw": "CC BY 4.0 (Google, The Quick, Draw! Dataset)",
    "celebahq": "CelebA-HQ: non-commercial research use only (the CelebA agreement)",
    "lsun_bedrooms": "LSUN: see the LSUN terms of use",
    "imagenet": "ImageNet: the ImageNet terms of access (non-commercial research)",
    "imagenette": "Imagenette: Apache 2.0 (fast.ai), images from ImageNet",
}


class CardExists(FileExistsError):
    """A README.md not written by sparse_dm is where the card would go; it is never overwritten."""


def training_command(run_dir: Path) -> str:
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return "not recorded (the run folder has no .hydra/overrides.yaml)"
    return " ".join(["python -m sparse_dm.train", *OmegaConf.load(overrides)])


def _metric_rows(summary: dict[str, Any]) -> list[str]:
    rows = [f"| {key} | {value:.4g} |" for key, value in sorted(summary.get("metrics", {}).items())
            if isinstance(value, int | float)]  # fmt: skip
    rows += [f"| {key} | {summary[key]:.4g} |" for key in ("fid", "fsd_kanjivg", "ksd_kanjivg")
             if isinstance(summary.get(key), int | float)]  # fmt: skip
    return rows or ["| (none recorded) | |"]


def model_card(payload: dict[str, Any], run_cfg: DictConfig, run_dir: Path, file_name: str) -> str:
    summary_path = run_dir / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    layers = layer_records(payload["sparse"])
    dataset = str(run_cfg.dataset.name)
    flops = summary.get("flops_test_per_sample")
    flops_dense = summary.get("flops_test_per_sample_dense")
    lines = [
        MARKER,
        f"# {run_cfg.model.name} on {dataset}: {run_cfg.method.name}, S = {float(run_cfg.sparsity):g}",
        "",
        f"`{file_name}`: a sparse diffusion model trained with sparse_dm (sparse-to-sparse training).",
        "It loads with `torch` + `safetensors` alone (docs/exported_files.md) or with",
        f"`python -m sparse_dm.sample ckpt_path={file_name}`.",
        "",
        "| | |",
        "|---|---|",
        f"| model | {run_cfg.model.name} (`{run_cfg.model.net._target_}`) |",
        f"| data | {dataset} (`{OmegaConf.select(run_cfg, 'dataset.path', default='')}`) |",
        f"| data licence | {DATA_LICENCES.get(dataset, 'not recorded: see the dataset’s own terms')} |",
        f"| method | {summary.get('method', run_cfg.method.name)} |",
        f"| sparsity S | {float(run_cfg.sparsity):g} |",
        f"| prune/regrow rate p | {float(run_cfg.prune_rate):g} |",
        f"| update interval Te | {int(run_cfg.update_interval)} steps |",
        f"| seed | {int(run_cfg.seed)} |",
        f"| weights | {payload['weights']} at step {payload['step']} |",
        f"| parameters (total / active) | {summary.get('params_total', 'n/a')} / "
        f"{summary.get('params_active', 'n/a')} |",
        f"| sampling FLOPs per sample (sparse / dense) | {flops if flops is not None else 'n/a'} / "
        f"{flops_dense if flops_dense is not None else 'n/a'} ({summary.get('flops_convention', 'n/a')} "
        "convention) |",
        "",
        "## Trained with",
        "",
        f"```\n{training_command(run_dir)}\n```",
        "",
        "## Per-layer density",
        "",
        "| weight | shape | active | density |",
        "|---|---|---|---|",
        *[f"| {name} | {' x '.join(map(str, r['shape']))} | {r['active']} | {r['density']:.4f} |"
          for name, r in layers.items()],
        "",
        "## Metrics (from the run's summary.json)",
        "",
        "| metric | value |",
        "|---|---|",
        *_metric_rows(summary),
        "",
        "Numbers are from this run only (one seed, its own budget); they are not the paper's.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(text: str, path: Path) -> Path:
    if path.is_file() and MARKER not in path.read_text():
        raise CardExists(f"{path} was not written by sparse_dm.export; move it or choose another out=")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
