"""Keep a resumed run's CSV log: Lightning's CSVLogger deletes an existing metrics.csv when it starts.

Rows up to the resumed checkpoint's step are kept; later rows came from the part of the interrupted
run that the resume repeats, and are dropped so every step is logged once, as in an uninterrupted run.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger

CsvHistory = tuple[list[str], list[dict[str, str]]]  # header, rows


def read_csv_history(metrics_file: Path, up_to_step: int) -> CsvHistory | None:
    if not metrics_file.is_file():
        return None
    with open(metrics_file, newline="") as file:
        reader = csv.DictReader(file)
        rows = [row for row in reader if int(row["step"]) <= up_to_step]
        return list(reader.fieldnames or []), rows


def restore_csv_history(loggers: list[Logger], history: CsvHistory | None) -> None:
    """Write the kept rows back and tell the logger's writer their columns, so it appends to them."""
    csv_logger = next((logger for logger in loggers if isinstance(logger, CSVLogger)), None)
    if csv_logger is None or history is None:
        return
    header, rows = history
    writer = csv_logger.experiment
    with open(writer.metrics_file_path, "w", newline="") as file:
        out = csv.DictWriter(file, fieldnames=header)
        out.writeheader()
        out.writerows(rows)
    writer.metrics_keys = sorted(header)
