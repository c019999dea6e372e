"""sparse_dm: sparse-to-sparse training of diffusion models (Static-DM, RigL-DM, MagRan-DM)."""

__version__ = "0.1.0"
