"""get_logger's level, from the argument or ACCELERATE_LOG_LEVEL (the multi-process behaviour: tests/dist)."""

from __future__ import annotations

import logging

import pytest

from hasten.logging import get_logger
from hasten.utils.environment import patch_environment
from hasten.utils.errors import ConfigurationError


def test_the_level_comes_from_the_argument_or_the_variable() -> None:
    assert get_logger("hasten.test.level", log_level="debug").logger.level == logging.DEBUG
    with patch_environment(ACCELERATE_LOG_LEVEL="Warning"):
        assert get_logger("hasten.test.level").logger.level == logging.WARNING
    with patch_environment(ACCELERATE_LOG_LEVEL=""):  # empty: unset, the level stays
        assert get_logger("hasten.test.level").logger.level == logging.WARNING
    assert get_logger("hasten.test.level", log_level=logging.ERROR).logger.level == logging.ERROR  # type: ignore[arg-type]


def test_a_bad_level_names_where_it_came_from() -> None:
    with (
        patch_environment(ACCELERATE_LOG_LEVEL="verbose"),
        pytest.raises(
            ConfigurationError,
            match=r"environment variable ACCELERATE_LOG_LEVEL='verbose' is not a logging level; use one of "
            r"\['DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL'\]",
        ),
    ):
        get_logger("hasten.test.level")
    with pytest.raises(ConfigurationError, match=r"^log_level='loud' is not a logging level"):
        get_logger("hasten.test.level", log_level="loud")
