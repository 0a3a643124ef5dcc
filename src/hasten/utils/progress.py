"""A progress bar for long loads: shown only when it helps, never required.

It appears only after ``DELAY`` seconds (short loads stay silent), on the main process of a
launch, when stderr is a terminal, with tqdm or else rich if either is installed, and not when
``HASTEN_DISABLE_PROGRESS_BAR`` (or tqdm's own ``TQDM_DISABLE``) is set to a true value.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

from hasten.utils.environment import parse_flag_from_env
from hasten.utils.imports import is_rich_available, is_tqdm_available
from hasten.utils.process_env import LaunchEnvironment

DELAY = 2.0
"""Seconds a task must run before its bar appears."""


def progress_wanted() -> bool:
    """Whether a bar may be drawn here at all (terminal, main process, not disabled)."""
    if parse_flag_from_env("HASTEN_DISABLE_PROGRESS_BAR") or parse_flag_from_env("TQDM_DISABLE"):
        return False
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return False
    try:
        return LaunchEnvironment.from_environ().rank == 0
    except ValueError:  # an inconsistent launch environment is reported where it matters, not here
        return False


class Progress:
    """Counts ``total`` steps of ``description``; draws a bar once the work has lasted ``DELAY`` s."""

    def __init__(self, total: int, description: str, unit: str = "tensors") -> None:
        self.total = total
        self.description = description
        self.unit = unit
        self.done = 0
        self._enabled = total > 0 and progress_wanted() and (is_tqdm_available() or is_rich_available())
        self._start = time.monotonic()
        self._bar: Any = None

    def _open(self) -> None:
        if is_tqdm_available():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total, desc=self.description, unit=self.unit, initial=self.done, leave=False
            )
            return
        from rich.progress import Progress as RichProgress

        bar = RichProgress(transient=True)
        bar.start()
        task = bar.add_task(self.description, total=self.total, completed=self.done)
        self._bar = (bar, task)

    def update(self, steps: int = 1) -> None:
        self.done += steps
        if not self._enabled:
            return
        if self._bar is None:
            if time.monotonic() - self._start < DELAY:
                return
            self._open()
            return
        if isinstance(self._bar, tuple):
            self._bar[0].update(self._bar[1], completed=self.done)
        else:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is None:
            return
        if isinstance(self._bar, tuple):
            self._bar[0].stop()
        else:
            self._bar.close()
        self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
