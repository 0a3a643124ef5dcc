"""The ``Accelerator``'s tracking methods (``init_trackers``, ``log``, ``get_tracker``,
``end_training``), kept apart from the facade; the rules live in :mod:`hasten._tracking.lifecycle`.

As in Accelerate, trackers are built and logged to on the main process only; elsewhere
``get_tracker`` returns an empty tracker whose methods do nothing, so one script runs everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hasten._tracking.base import GeneralTracker
from hasten._tracking.lifecycle import find_tracker, finish_trackers, log_to_trackers, start_trackers
from hasten.engines.processes import ProcessMixin


class TrackingMixin(ProcessMixin):
    """What the ``Accelerator`` logs with; ``log_with`` and ``trackers`` are set by its constructor."""

    log_with: list[Any]
    trackers: list[GeneralTracker]
    logging_dir: Any

    def init_trackers(
        self,
        project_name: str,
        config: Mapping[str, Any] | None = None,
        init_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Start a run named ``project_name`` in every tracker of ``log_with`` (main process only),
        storing ``config`` as its hyperparameters; ``init_kwargs[name]`` go to that tracker's constructor.

        Raises:
            ConfigurationError: ``init_kwargs`` names no tracker in use.
        """
        if self.is_main_process:
            self.trackers.extend(
                start_trackers(self.log_with, project_name, self.logging_dir, config, init_kwargs or {})
            )

    def log(
        self,
        values: Mapping[str, Any],
        step: int | None = None,
        log_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Log ``values`` at ``step`` to every tracker (main process only); ``log_kwargs[name]`` go to
        that tracker's ``log``."""
        if self.is_main_process:
            log_to_trackers(self.trackers, values, step, log_kwargs)

    def get_tracker(self, name: str, unwrap: bool = False) -> Any:
        """The tracker called ``name`` (its backend object with ``unwrap``); an empty one on processes
        without trackers.

        Raises:
            ConfigurationError: there are trackers and none is called ``name``.
        """
        return find_tracker(self.trackers, name, unwrap)

    def end_training(self) -> None:
        """Finish every tracker, then end the process group (as Accelerate does): call it last."""
        finish_trackers(self.trackers)
        self.state.destroy_process_group()
