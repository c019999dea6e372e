"""Datasets and datamodules: stroke-3 sketches (safe loading) and image folders."""
