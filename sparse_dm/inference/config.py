"""The `inference` config group's defaults (conf/inference/default.yaml), for entry points that
build their config in code (benchmarks, tests) rather than from a Hydra defaults list."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from sparse_dm import CONFIG_DIR

DEFAULT_CONFIG = CONFIG_DIR / "inference" / "default.yaml"


def default_inference_config() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG), resolve=True)  # type: ignore[return-value]
