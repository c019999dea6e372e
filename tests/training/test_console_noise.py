"""The default run's console: third-party noise is filtered by exact message, nothing else is."""

from __future__ import annotations

import logging
import warnings

import pytest

from sparse_dm.training.loggers.console_noise import silence_known_noise
from sparse_dm.training.loggers.wandb import build_loggers, finish_loggers
from tests.training.test_logging import make_cfg

RANK_ZERO = "lightning.pytorch.utilities.rank_zero"


def test_the_litlogger_tip_is_dropped_and_other_lightning_info_kept(caplog):
    silence_known_noise()
    silence_known_noise()  # idempotent: installing twice must not double anything
    with caplog.at_level(logging.INFO, logger=RANK_ZERO):
        logging.getLogger(RANK_ZERO).info("💡 Tip: try installing [litlogger](...)")
        logging.getLogger(RANK_ZERO).info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_only_the_pytree_leafspec_future_warning_is_ignored():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("another future change", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another future change"]


def test_the_wandb_logger_sends_no_deprecated_anonymous_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    loggers = build_loggers(make_cfg(), tmp_path)
    wandb_init = loggers[1]._wandb_init
    finish_loggers(loggers)
    assert "anonymous" not in wandb_init
    assert wandb_init["project"] == "sparse_dm"


@pytest.fixture(autouse=True)
def restore_warning_filters():
    with warnings.catch_warnings():
        yield
