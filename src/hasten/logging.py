"""Loggers that know about processes: log once on the main process, or from each rank in order.

``get_logger(__name__).info("...", main_process_only=False, in_order=True)``
logs from every process, one rank at a time. The default logs on the main
process only. Nothing here configures handlers: that is the application's call.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hasten.state import PartialState
from hasten.utils.errors import ConfigurationError


class MultiProcessAdapter(logging.LoggerAdapter[logging.Logger]):
    """A logger adapter that accepts ``main_process_only`` and ``in_order`` on each call."""

    @staticmethod
    def _should_log(main_process_only: bool) -> bool:
        return not main_process_only or PartialState().is_main_process

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log ``msg`` at ``level``, on the main process only unless ``main_process_only=False``.

        With ``in_order=True`` every process logs, one after the other in rank order.

        Raises:
            RuntimeError: the shared state has not been created; create ``PartialState()`` first.
        """
        if PartialState._shared is None:
            raise RuntimeError(
                "This logger needs the process state to know which rank it is on; create "
                "`PartialState()` (or an `Accelerator`) before logging through `get_logger`."
            )
        main_process_only = kwargs.pop("main_process_only", True)
        in_order = kwargs.pop("in_order", False)
        if not self.isEnabledFor(level):
            return
        if not in_order:
            if self._should_log(main_process_only):
                self.logger.log(level, msg, *args, **kwargs)
            return
        state = PartialState()
        for rank in range(state.num_processes):
            if rank == state.process_index:
                self.logger.log(level, msg, *args, **kwargs)
            state.wait_for_everyone()

    def warning_once(self, *args: Any, **kwargs: Any) -> None:
        """Like ``warning``, but a given message is logged only once per process."""
        key = repr((args, sorted(kwargs.items())))
        if key in _warned_once:
            return
        _warned_once.add(key)
        self.warning(*args, **kwargs)


_warned_once: set[str] = set()


def get_logger(name: str, log_level: str | None = None) -> MultiProcessAdapter:
    """A process-aware logger for ``name``; ``log_level`` (or ``ACCELERATE_LOG_LEVEL``) sets its level.

    Raises:
        ConfigurationError: the level (or the variable) is not a logging level; the message says which.
    """
    where = "log_level"
    if log_level is None:
        log_level, where = (
            os.environ.get("ACCELERATE_LOG_LEVEL") or None,
            "environment variable ACCELERATE_LOG_LEVEL",
        )
    logger = logging.getLogger(name)
    if log_level is not None:
        logger.setLevel(_level(log_level, where))
    return MultiProcessAdapter(logger, {})


def _level(value: Any, where: str) -> int:
    """The logging level named by ``value`` (a level name in any case, or a level number)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    level = logging.getLevelName(value.strip().upper()) if isinstance(value, str) else None
    if not isinstance(level, int):
        names = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
        raise ConfigurationError(f"{where}={value!r} is not a logging level; use one of {names}.")
    return level
