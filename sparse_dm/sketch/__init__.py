"""Sketch representations and the one renderer: below data, models and metrics (torch, NumPy, PIL only)."""
