"""Sketch rasteriser, FID/KID, report tables and plots."""
