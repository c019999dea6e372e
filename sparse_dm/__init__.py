"""sparse_dm: sparse-to-sparse training of diffusion models (Static-DM, RigL-DM, MagRan-DM)."""

__version__ = "0.1.0"

from pathlib import Path

# The Hydra config groups, shipped inside the package (so a wheel has them): `python -m sparse_dm.<command>`
# finds them through `config_path="conf"`; code and tests that compose a config themselves use this.
CONFIG_DIR = Path(__file__).resolve().with_name("conf")
