"""The Lightning layer: LightningModules (modules/), callbacks (callbacks/: mask updates, FID, non-finite
guard, RNG state), checkpoint IO and resume checks (checkpointing.py), loggers (loggers/)."""
