"""Reading and writing sparse_dm's files safely (torch and the standard library only)."""

from sparse_dm.files.checkpoint import read_checkpoint

__all__ = ["read_checkpoint"]
