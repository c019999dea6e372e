"""Narrow filters for third-party console messages a user of this project cannot act on.

Each filter matches one specific message (never a whole category or logger), so any other warning
from the same library still shows:
- Lightning's `LeafSpec` use inside its own `_pytree` helper triggers torch's FutureWarning;
- Lightning advertises its cloud logger (litlogger) whenever it is not installed.
W&B's "anonymous setting" deprecation is fixed at its cause in `wandb_logging.build_loggers`.
"""

from __future__ import annotations

import logging
import re
import warnings

PYTREE_LEAFSPEC_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LITLOGGER_TIP = re.compile(r"Tip: .*litlogger")
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")


class DropMessage(logging.Filter):
    """Drops log records whose message matches one pattern."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_known_noise() -> None:
    """Install the filters (idempotent: one filter per logger and one warnings entry)."""
    warnings.filterwarnings("ignore", message=PYTREE_LEAFSPEC_MESSAGE, category=FutureWarning)
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.pattern is LITLOGGER_TIP for f in logger.filters):
            logger.addFilter(DropMessage(LITLOGGER_TIP))
