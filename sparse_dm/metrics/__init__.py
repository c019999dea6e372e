"""Measurements of samples and runs: FID/KID, sketch statistics, report tables and plots."""
